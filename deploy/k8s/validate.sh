#!/usr/bin/env bash
# Offline check of the Kubernetes manifests: renders the kustomization (as it is, and
# with the scale-to-five component) with throwaway secret files, and validates every
# resource against the Kubernetes OpenAPI schemas bundled in kubernetes-validate
# (PyPI), unknown fields rejected. Exits non-zero on any invalid resource.
#
#   deploy/k8s/validate.sh
#
# Needs python3 and PyPI (once: the tool is cached in a venv). Rendering uses
# `kubectl kustomize` when kubectl is on PATH (no cluster needed); without it each
# file under `resources:` is validated as written and the component is skipped.
set -euo pipefail

KV_VERSION=1.37.0
# The oldest Kubernetes the manifests support (preStop `sleep` is 1.30+) and the newest
# schema the pinned tool has.
K8S_VERSIONS="1.30.0 1.37.0"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The validator, in its own venv so it touches nothing else.
venv=${TOLLGATE_K8S_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tollgate/kubernetes-validate-$KV_VERSION}
if ! "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  echo "installing kubernetes-validate==$KV_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi
validate() { # file...
  local version
  for version in $K8S_VERSIONS; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$@"
  done
  # Kubernetes leaves a $(VAR) that names no earlier entry of the same env list as
  # literal text, silently: check that every reference is defined before its use.
  "$venv/bin/python" - "$@" <<'PY'
import re, sys, yaml
bad = []
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        pod = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            defined = set()
            for entry in container.get("env", []):
                for name in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(entry.get("value", ""))):
                    if name not in defined:
                        bad.append(f"{path}: {container['name']}: {entry['name']} uses $({name}) before it is defined")
                defined.add(entry["name"])
if bad: print("\n".join(bad), file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

# A copy without the real secrets (if any), with a placeholder for each file the
# secretGenerator names: only the Secret objects' shape is checked, not their contents.
mkdir "$work/k8s"
tar -C "$here" --exclude=./secrets -cf - . | tar -C "$work/k8s" -xf -
mkdir "$work/k8s/secrets"
for file in $(grep -o 'secrets/[A-Za-z0-9._-]\+' "$here/kustomization.yaml" | sort -u); do
  echo "throwaway" >"$work/k8s/$file"
done

if command -v kubectl >/dev/null 2>&1; then
  echo "rendering with kubectl kustomize ($(kubectl version --client 2>/dev/null | grep -i kustomize || echo 'version unknown'))"
  render() { # name of the output file
    kubectl kustomize "$work/k8s" >"$work/$1.yaml"
    echo "$1: $(grep -c '^kind:' "$work/$1.yaml") resources"
    validate "$work/$1.yaml"
  }
  render as-configured
  # Again with the scale-to-five component switched on, unless it already is.
  if ! grep -q '^components:' "$work/k8s/kustomization.yaml"; then
    printf '\ncomponents:\n  - scale-to-five\n' >>"$work/k8s/kustomization.yaml"
    render scale-to-five
    # Its patch must have swapped the bootstrap for a join.
    if ! grep -q 'name: TOLLGATE_JOIN' "$work/scale-to-five.yaml" ||
      grep -q 'name: TOLLGATE_INITIAL_CLUSTER' "$work/scale-to-five.yaml"; then
      echo "scale-to-five: expected TOLLGATE_JOIN in place of TOLLGATE_INITIAL_CLUSTER" >&2
      exit 1
    fi
  fi
else
  echo "kubectl not found: validating the files under resources: as written (component skipped)"
  files=$(sed -n '/^resources:/,/^[^ ]/s/^  - \(.*\.yaml\)$/\1/p' "$here/kustomization.yaml")
  for file in $files; do echo "$file"; validate "$work/k8s/$file"; done
fi
echo "deploy/k8s: valid for Kubernetes ${K8S_VERSIONS// /, }"
