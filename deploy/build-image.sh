#!/usr/bin/env bash
# Builds the `tollgate` container image with no registry access: a statically linked
# binary (glibc, +crt-static) alone in an image imported from a root file system made
# here (as `FROM scratch`), run as uid 65532. Needs cargo, python3 and docker.
#
#   deploy/build-image.sh [TAG]        (default tollgate:dev; TOLLGATE_PROFILE=release)
#
# Name lookups do not need glibc's NSS modules (the image has none): the node reads
# /etc/hosts and /etc/resolv.conf itself (node/src/dns.rs), which Docker and
# Kubernetes write into every container.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-tollgate:dev}
target=$(rustc -vV | sed -n 's/^host: //p')
case "$target" in
    *-linux-gnu) ;;
    *) echo "build-image: needs a *-linux-gnu host to link statically with glibc (host is $target)" >&2; exit 1 ;;
esac
# --target keeps these flags off build scripts and proc-macros, and the output in its
# own directory (target/$target/release), apart from the dynamically linked build.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked -p tollgate-node --bin tollgate --target "$target"
binary="target/$target/release/tollgate"
if ldd "$binary" >/dev/null 2>&1 && ! ldd "$binary" 2>&1 | grep -q "statically linked\|not a dynamic"; then
    echo "build-image: $binary is not statically linked" >&2
    exit 1
fi
# The image is one layer imported from a root file system made here (no Dockerfile,
# no base image): the binary and /etc/passwd owned by root, the data, certificate and
# temporary directories by the node's user, set per file in the tar stream (no root
# needed to build it).
strip -o "target/$target/release/tollgate.stripped" "$binary" 2>/dev/null || cp "$binary" "target/$target/release/tollgate.stripped"
python3 - "target/$target/release/tollgate.stripped" <<'PYTHON' | docker import \
    --change 'USER 65532:65532' \
    --change 'ENV TOLLGATE_DATA_DIR=/var/lib/tollgate/data' \
    --change 'EXPOSE 8000 8001 8005 8005/udp' \
    --change 'ENTRYPOINT ["/usr/local/bin/tollgate"]' \
    --change 'CMD ["run"]' \
    - "$tag" >/dev/null
import io, sys, tarfile, time
binary = sys.argv[1]
now = int(time.time())
out = tarfile.open(fileobj=sys.stdout.buffer, mode="w|")
def add(name, uid, mode, data=None):
    info = tarfile.TarInfo(name)
    info.uid = info.gid = uid
    info.mtime = now
    info.mode = mode
    if data is None:
        info.type = tarfile.DIRTYPE
        out.addfile(info)
    else:
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
for directory in ["etc", "usr", "usr/local", "usr/local/bin", "var", "var/lib", "etc/tollgate"]:
    add(directory, 0, 0o755)
add("tmp", 0, 0o1777)
for directory in ["var/lib/tollgate", "etc/tollgate/cluster"]:
    add(directory, 65532, 0o700)
add("etc/passwd", 0, 0o644, b"root:x:0:0:root:/:/sbin/nologin\ntollgate:x:65532:65532:tollgate:/var/lib/tollgate:/sbin/nologin\n")
add("etc/group", 0, 0o644, b"root:x:0:\ntollgate:x:65532:\n")
add("usr/local/bin/tollgate", 0, 0o755, open(binary, "rb").read())
out.close()
PYTHON
echo "built $tag: $(docker image inspect --format '{{.Size}}' "$tag") bytes"
