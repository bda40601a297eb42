#!/usr/bin/env python3
"""Prints the environment Kubernetes gives the StatefulSet's container in pod POD, as
`NAME=value` lines for `docker run --env-file`: the downward API's pod name and
namespace, `$(VAR)` references expanded as Kubernetes expands them (only names defined
earlier in the list), and the Secrets' values given here. deploy/test.sh runs the
image with it to check the manifest's wiring without a Kubernetes cluster.

    pod-env.py STATEFULSET_YAML POD NAMESPACE ADMIN_TOKEN CLUSTER_SECRET
"""
import re
import sys

import yaml

path, pod, namespace, token, secret = sys.argv[1:6]
container = yaml.safe_load(open(path))["spec"]["template"]["spec"]["containers"][0]
fields = {"metadata.name": pod, "metadata.namespace": namespace}
secrets = {("tollgate-admin", "token"): token, ("tollgate-cluster-secret", "secret"): secret}
values = {}
for entry in container["env"]:
    if "value" in entry:
        value = re.sub(
            r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
            lambda match: values.get(match.group(1), match.group(0)),
            entry["value"],
        )
    elif "fieldRef" in entry.get("valueFrom", {}):
        value = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
    else:
        reference = entry["valueFrom"]["secretKeyRef"]
        value = secrets[(reference["name"], reference["key"])]
    values[entry["name"]] = value
    print(f"{entry['name']}={value}")
