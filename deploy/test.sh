#!/usr/bin/env bash
# The compose cluster for real, on this machine's Docker engine (run by .ci/run):
#
#  1. compose up: three nodes and echo healthy; config through node 2; traffic
#     through node 3;
#  2. `docker kill` of the leader; a write through a survivor; the container started
#     again and caught up;
#  3. `docker network disconnect` of a node; a write meanwhile; reconnected, it
#     catches up;
#  4. a rolling restart of all three (SIGTERM: the graceful stop) under steady load
#     through a node that is not restarting: no request may fail; then a restart of
#     the node taking the load, whose failures are reported;
#  5. the Grafana dashboard: Prometheus scrapes the cluster under a mix of traffic, and
#     every panel's query must return data;
#  6. figures: image size, a node's RSS idle and with 10 000 routes;
#  7. `tollgate backup` through a node, a fresh cluster (new volumes), `tollgate
#     restore`: GET /config must be identical;
#  8. the StatefulSet's pods on Docker: three containers with the env of
#     deploy/k8s/statefulset.yaml, host names and DNS names as Kubernetes gives them,
#     must form a cluster as nodes 1..3.
# Every write acknowledged must be on every node at the end of each step.
#
#   deploy/test.sh                 (TOLLGATE_IMAGE=… to use an image already built;
#                                   LOAD_RPS, LOAD_SECONDS_MIN to change the load)
set -euo pipefail
cd "$(dirname "$0")/.."

project=tollgate-test
work=$(mktemp -d)
chmod 0777 "$work"
token=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
secret=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
rps=${LOAD_RPS:-200}
acked=$work/acked
: > "$acked"

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'deploy/test.sh: FAILED: %s\n' "$*" >&2; exit 1; }

if [ -z "${TOLLGATE_IMAGE:-}" ]; then
    say "building the image"
    deploy/build-image.sh tollgate:test
    TOLLGATE_IMAGE=tollgate:test
fi
load_bin=${STEADY_LOAD:-target/debug/steady-load}
if [ ! -x "$load_bin" ]; then
    cargo build -q -p tollgate-tests --bin steady-load
fi

cat > "$work/.env" <<EOF
TOLLGATE_ADMIN_TOKEN=$token
TOLLGATE_CLUSTER_SECRET=$secret
TOLLGATE_IMAGE=$TOLLGATE_IMAGE
EOF
compose() { docker-compose -p "$project" --env-file "$work/.env" -f deploy/docker-compose.yml "$@"; }
cleanup() {
    status=$?
    # Background load generators and Prometheus, if a step failed while they ran.
    jobs -p | xargs -r kill 2>/dev/null || true
    if [ $status -ne 0 ]; then
        compose logs --no-color --tail 60 node1 node2 node3 >&2 2>/dev/null || true
    fi
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$work"
    exit $status
}
trap cleanup EXIT

for port in 8000 8001 8010 8011 8020 8021; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        fail "127.0.0.1:$port is in use (a tollgate dev or compose cluster running?)"
    fi
done

admin_port() { echo "80$(( $1 - 1 ))1"; }
proxy_port() { echo "80$(( $1 - 1 ))0"; }
container() { docker ps -aq --filter "label=com.docker.compose.project=$project" --filter "label=com.docker.compose.service=$1"; }
network=$(echo "${project}_default" | tr -d '.')

# api NODE METHOD PATH [JSON]: prints the body, then the status on its own line.
api() {
    local args=(-sS -m 10 -o "$work/body" -w '%{http_code}' -X "$2" -H "Authorization: Bearer $token")
    if [ $# -ge 4 ]; then args+=(-H 'Content-Type: application/json' --data-binary "$4"); fi
    local code
    code=$(curl "${args[@]}" "http://127.0.0.1:$(admin_port "$1")$3" 2>/dev/null) || code=000
    cat "$work/body" 2>/dev/null || true
    printf '\n%s\n' "$code"
}
status_of() { tail -n1; }
body_of() { sed '$d'; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# wait_for SECONDS WHAT COMMAND...: polls COMMAND until it succeeds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$(( $(date +%s) + seconds ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then fail "timed out after ${seconds}s waiting for $what"; fi
        sleep 0.5
    done
}
healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$(container "node$1")")" = healthy ]; }
all_healthy() { healthy 1 && healthy 2 && healthy 3; }

# write NODE NAME: creates service NAME through NODE (retrying while no leader
# answers); an acknowledged one is recorded.
write() {
    local node=$1 name=$2 deadline=$(( $(date +%s) + 60 )) reply code
    while :; do
        reply=$(api "$node" POST /services "{\"name\":\"$name\",\"url\":\"http://echo:9000\"}")
        code=$(status_of <<<"$reply")
        if [ "$code" = 201 ]; then echo "$name" >> "$acked"; return 0; fi
        if [ "$code" = 409 ]; then echo "$name" >> "$acked"; return 0; fi # an earlier attempt landed
        [ "$(date +%s)" -lt "$deadline" ] || fail "write $name through node $node: $code $(body_of <<<"$reply")"
        sleep 0.3
    done
}
# has_all NODE: the node's own copy holds every acknowledged service.
has_all() {
    local names
    names=$(api "$1" GET '/services?size=1000&consistency=local' | body_of | json "'\n'.join(s['name'] for s in d['data'])") || return 1
    while read -r name; do grep -qx "$name" <<<"$names" || return 1; done < "$acked"
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$(docker inspect -f '{{.State.Pid}}' "$(container "node$1")")/status"; }

say "1. compose up"
compose up -d
wait_for 180 "three healthy nodes" all_healthy
idle_rss=$(rss_kb 2)
write 2 echo
reply=$(api 2 POST /services/echo/routes '{"name":"echo","paths":["/echo"]}')
[ "$(status_of <<<"$reply")" = 201 ] || fail "route through node 2: $reply"
proxied() { curl -sf -m 5 "http://127.0.0.1:$(proxy_port "$1")/echo/hello" | grep -q '"/hello"\|/echo/hello'; }
wait_for 30 "traffic through node 3" proxied 3
echo "config through node 2, traffic through node 3: ok"

say "2. docker kill the leader"
leader=$(api 1 GET /status | body_of | json "d['leader_id']")
echo "leader: node $leader"
docker kill "$(container "node$leader")" >/dev/null
survivor=$(( leader % 3 + 1 ))
write "$survivor" after-kill
echo "write through node $survivor acknowledged"
docker start "$(container "node$leader")" >/dev/null
wait_for 120 "node $leader healthy again" healthy "$leader"
wait_for 60 "node $leader to catch up" has_all "$leader"
echo "node $leader back and caught up"

say "3. docker network disconnect"
cut=$(( leader % 3 + 1 ))
other=$(( cut % 3 + 1 ))
docker network disconnect "$network" "$(container "node$cut")"
write "$other" during-partition
wait_for 30 "node $other to serve while node $cut is cut off" proxied "$other"
docker network connect --alias "node$cut" "$network" "$(container "node$cut")"
wait_for 120 "node $cut healthy after reconnecting" healthy "$cut"
wait_for 60 "node $cut to catch up" has_all "$cut"
for node in 1 2 3; do has_all "$node" || fail "node $node lost an acknowledged write"; done
echo "node $cut rejoined and caught up"

say "4. rolling restart under load (${rps} requests/s)"
# load NODE: steady load through NODE in the background, stopped by stop_load.
load() {
    rm -f "$work/stop" "$work/load-ready"
    "$load_bin" --url "http://127.0.0.1:$(proxy_port "$1")/echo" --rps "$rps" --stop-file "$work/stop" \
        --ready-file "$work/load-ready" > "$work/load.json" &
    load_pid=$!
    wait_for 30 "the load to flow" test -e "$work/load-ready"
}
stop_load() { touch "$work/stop"; wait "$load_pid"; }
total_sent=0
total_failed=0
started=$(date +%s)
for node in 1 2 3; do
    through=$(( node % 3 + 1 ))
    load "$through"
    restart_started=$(date +%s)
    docker restart -t 20 "$(container "node$node")" >/dev/null
    wait_for 120 "node $node healthy after its restart" healthy "$node"
    wait_for 60 "node $node to catch up" has_all "$node"
    stop_load
    summary=$(cat "$work/load.json")
    sent=$(json "d['sent']" <<<"$summary")
    failed=$(json "d['failed']" <<<"$summary")
    echo "restart of node $node ($(( $(date +%s) - restart_started )) s), load through node $through: $summary"
    total_sent=$(( total_sent + sent ))
    total_failed=$(( total_failed + failed ))
done
echo "rolling restart: $(( $(date +%s) - started )) s, $total_sent requests at $rps/s, $total_failed failed"
[ "$total_failed" -eq 0 ] || fail "$total_failed requests failed during the rolling restart"
write 1 after-rolling-restart
for node in 1 2 3; do wait_for 30 "node $node to hold every write" has_all "$node"; done

# The node taking the load restarts: its clients see its drain (reported, not failed).
load 1
docker restart -t 20 "$(container node1)" >/dev/null
wait_for 120 "node 1 healthy after its restart" healthy 1
stop_load
summary=$(cat "$work/load.json")
echo "restart of the node taking the load (node 1): $summary"

say "5. the dashboard on a real run"
# Prometheus (Debian's package) scrapes the three nodes with deploy/prometheus/
# prometheus.yml, its targets and token file pointed at this run, every second; the
# cluster serves a mix of traffic (rate-limited, 404, 502, an upstream with a dead
# target under active health checks); then every query of the Grafana dashboard must
# return data.
prometheus_port=19090
sed -e 's#node1:8001#127.0.0.1:8001#; s#node2:8001#127.0.0.1:8011#; s#node3:8001#127.0.0.1:8021#' \
    -e "s#/etc/prometheus/admin-token#$work/admin-token#" \
    -e 's#scrape_interval: 15s#scrape_interval: 1s#; s#evaluation_interval: 15s#evaluation_interval: 1s#' \
    -e 's#scrape_timeout: 10s#scrape_timeout: 1s#' \
    deploy/prometheus/prometheus.yml > "$work/prometheus.yml"
printf '%s' "$token" > "$work/admin-token"
promtool check config "$work/prometheus.yml" >/dev/null
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus" \
    --web.listen-address="127.0.0.1:$prometheus_port" > "$work/prometheus.log" 2>&1 &
prometheus_pid=$!
created() { [ "$(status_of <<<"$1")" = 201 ] || fail "$2: $1"; }
created "$(api 2 POST /services/echo/routes '{"name":"limited","paths":["/limited"]}')" "route /limited"
created "$(api 2 POST /routes/limited/plugins '{"name":"rate-limiting","config":{"second":5,"policy":"cluster"}}')" "rate-limiting"
created "$(api 2 POST /services '{"name":"broken","url":"http://echo:9999"}')" "service broken"
created "$(api 2 POST /services/broken/routes '{"paths":["/broken"]}')" "route /broken"
created "$(api 2 POST /upstreams '{"name":"pool","healthchecks":{"active":{"type":"http","http_path":"/","healthy":{"interval":1,"successes":1},"unhealthy":{"interval":1,"tcp_failures":1,"http_failures":1}}}}')" "upstream pool"
created "$(api 2 POST /upstreams/pool/targets '{"target":"echo:9000"}')" "target echo:9000"
created "$(api 2 POST /upstreams/pool/targets '{"target":"echo:9999"}')" "target echo:9999"
created "$(api 2 POST /services '{"name":"pooled","host":"pool"}')" "service pooled"
created "$(api 2 POST /services/pooled/routes '{"paths":["/pool"]}')" "route /pool"
limited() { [ "$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:8000/limited")" = 429 ]; }
loads=()
for node in 1 2 3; do
    port=$(proxy_port "$node")
    for path_rps in limited:20 pool:20 nope:5 broken:5; do
        "$load_bin" --url "http://127.0.0.1:$port/${path_rps%%:*}" --rps "${path_rps##*:}" --seconds 20 > /dev/null &
        loads+=($!)
    done
done
wait_for 30 "requests over the limit to get 429" limited
# The load generators stop by themselves after 20 s (Prometheus has scraped ~20 times).
wait "${loads[@]}"
python3 deploy/check-dashboard.py "http://127.0.0.1:$prometheus_port" deploy/grafana/tollgate.json tollgate 10s
kill "$prometheus_pid"
wait "$prometheus_pid" || true

say "6. figures"
echo "image $TOLLGATE_IMAGE: $(docker image inspect -f '{{.Size}}' "$TOLLGATE_IMAGE") bytes"
echo "node 2 RSS idle, just started: $idle_rss kB; after the steps above: $(rss_kb 2) kB"
python3 - "$work/routes.json" <<'EOF'
import json, sys
services = [{"name": "echo", "url": "http://echo:9000", "routes": [{"name": "echo", "paths": ["/echo"]}]}]
for i in range(100):
    services.append({"name": f"bulk-{i}", "url": f"http://echo:9000/{i}",
                     "routes": [{"name": f"bulk-{i}-{j}", "paths": [f"/bulk/{i}/{j}"]} for j in range(100)]})
json.dump({"_format_version": "3.0", "services": services}, open(sys.argv[1], "w"))
EOF
code=$(curl -sS -m 60 -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' --data-binary "@$work/routes.json" "http://127.0.0.1:$(admin_port 2)/config")
[ "$code" = 201 ] || [ "$code" = 200 ] || fail "POST /config with 10 000 routes: $code"
routes_published() { curl -sf -m 5 "http://127.0.0.1:$(proxy_port 2)/bulk/99/99" >/dev/null; }
wait_for 60 "10 000 routes to be served" routes_published
echo "node 2 RSS with 10 000 routes: $(rss_kb 2) kB"

say "7. backup, a fresh cluster, restore"
docker run --rm --network "$network" -v "$work:/backup" "$TOLLGATE_IMAGE" \
    backup --admin http://node1:8001,http://node2:8001 --token "$token" --out /backup/backup.json
api 3 GET /config | body_of > "$work/before.json"
compose down -v >/dev/null 2>&1
compose up -d
wait_for 180 "a fresh cluster of three healthy nodes" all_healthy
docker run --rm --network "$network" -v "$work:/backup" "$TOLLGATE_IMAGE" \
    restore --admin http://node3:8001 --token "$token" --in /backup/backup.json
api 1 GET /config | body_of > "$work/after.json"
python3 - "$work/before.json" "$work/backup.json" "$work/after.json" <<'EOF'
import json, sys
before, backup, after = (json.load(open(path)) for path in sys.argv[1:])
assert backup == before, "the backup differs from GET /config before it"
if after != before:
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            print(f"differs: {key}", file=sys.stderr)
    sys.exit("GET /config after the restore differs from before the backup")
print(f"GET /config identical after restore: {sum(len(v) for v in after.values() if isinstance(v, list))} entities")
EOF

say "8. the StatefulSet's pods, on Docker"
# No Kubernetes here: three containers of the image get the container env of
# deploy/k8s/statefulset.yaml as Kubernetes would give it (the downward API's pod name
# and namespace, $(VAR) expanded, the Secrets' values filled in), the pods' host
# names, and their DNS names under the headless Service as network aliases. They must
# form a cluster with node ids from the host names, certificate paths with {id}, and
# peers by fully qualified names.
compose down -v >/dev/null 2>&1
k8s_network=tollgate-test-k8s
k8s_certs=$work/k8s-certs
mkdir -m 0777 "$k8s_certs"
docker run --rm -v "$k8s_certs:/c" "$TOLLGATE_IMAGE" certs init --out /c --nodes 1,2,3 >/dev/null
chmod -R a+rX "$k8s_certs"
k8s_cleanup() {
    for i in 0 1 2; do docker rm -f "tollgate-$i" >/dev/null 2>&1 || true; done
    docker network rm "$k8s_network" >/dev/null 2>&1 || true
}
trap 'k8s_cleanup; cleanup' EXIT
docker network create "$k8s_network" >/dev/null
for i in 0 1 2; do
    python3 deploy/k8s/pod-env.py deploy/k8s/statefulset.yaml "tollgate-$i" tollgate "$token" "$secret" \
        > "$work/pod-$i.env"
    docker run -d --name "tollgate-$i" --hostname "tollgate-$i" --network "$k8s_network" \
        --network-alias "tollgate-$i.tollgate-peers.tollgate.svc.cluster.local" \
        --env-file "$work/pod-$i.env" -v "$k8s_certs:/etc/tollgate/cluster:ro" \
        --tmpfs /var/lib/tollgate:uid=65532,gid=65532 -p "127.0.0.1:1800$i:8001" \
        "$TOLLGATE_IMAGE" run >/dev/null
done
pod_status() { curl -sf -m 5 -H "Authorization: Bearer $token" "http://127.0.0.1:1800$1/status"; }
pod_ready() { curl -sf -m 5 "http://127.0.0.1:1800$1/status/ready" >/dev/null; }
for i in 0 1 2; do
    wait_for 60 "pod tollgate-$i ready" pod_ready "$i"
    id=$(pod_status "$i" | json "d['node_id']")
    [ "$id" = $(( i + 1 )) ] || fail "pod tollgate-$i is node $id, not $(( i + 1 ))"
done
echo "pods tollgate-0..2 formed a cluster as nodes 1..3 (leader: node $(pod_status 0 | json "d['leader_id']"))"

say "deploy/test.sh: passed"
