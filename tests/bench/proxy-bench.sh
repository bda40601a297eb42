#!/usr/bin/env bash
# Data-plane benchmark on loopback, in one invocation, Tollgate against nginx as a
# reverse proxy of the same upstream:
#   HTTP/1.1 keep-alive; HTTPS (HTTP/1.1 over TLS 1.3) keep-alive; a full TLS handshake
#   per request; h2c and h2 over TLS (h2load, 10 streams per connection); 10 000 routes;
#   four plugins; cluster rate limits; RSS per idle keep-alive connection, plain and
#   TLS, and what is left of it 10 s after they close (tests/bench/idle-conns.py).
# Each proxy is pinned to core 0 (nginx worker_processes 1, tollgate --workers 1); the
# load generator (wrk, h2load) and the upstream (nginx serving a fixed 200) share core 1.
# For each: requests/s, latency, and CPU-µs per request of the proxy process, from
# /proc/<pid>/stat (utime + stime, all threads) over the measured run.
#
# This machine's neighbours make single runs vary by up to 15%: nginx and tollgate are
# measured in alternation, ROUNDS times, and the median of the per-round ratios is the
# figure.
#
# TLS: a P-256 certificate for bench.test made here; the clients run in a mount
# namespace of their own whose /etc/hosts maps bench.test to 127.0.0.1, so that they
# send it as SNI (`unshare -m`: run as root).
#
# Usage: tests/bench/proxy-bench.sh [duration_s=10] [connections=32] [rounds=3]
#   IDLE_COUNT=10000 (connections of the RSS measure; 0 skips it)
# Needs: nginx, wrk, h2load, openssl, taskset, unshare (apt-get install -y nginx-light wrk
# nghttp2-client openssl util-linux), a release build (the script runs
# `cargo build --release -p tollgate-node`, unless TOLLGATE_BIN names the binary to
# measure).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION_S=${1:-10}
CONNECTIONS=${2:-32}
ROUNDS=${3:-3}
ROUTES=10000
UPSTREAM_PORT=18080
NGINX_PROXY_PORT=18081
NGINX_TLS_PORT=18082
NGINX_H2C_PORT=18083
TG_TLS_PORT=18002
IDLE_COUNT=${IDLE_COUNT:-10000}
TG_PROXY_PORT=18000
TG_ADMIN_PORT=18001
TG_CLUSTER_PORT=18005
WORK=$(mktemp -d)
CLK_TCK=$(getconf CLK_TCK)

for tool in nginx wrk h2load openssl taskset unshare curl python3; do
    command -v "$tool" >/dev/null ||
        { echo "missing $tool: apt-get install -y nginx-light wrk nghttp2-client openssl util-linux curl" >&2; exit 1; }
done
# TOLLGATE_BIN measures another build (an earlier commit's, to compare before and
# after a change); otherwise this tree's release build.
if [ -n "${TOLLGATE_BIN:-}" ]; then
    TOLLGATE=$TOLLGATE_BIN
else
    cargo build --release -q -p tollgate-node
    TOLLGATE=target/release/tollgate
fi

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$WORK/key.pem" \
    -out "$WORK/cert.pem" -days 2 -subj /CN=bench.test -addext subjectAltName=DNS:bench.test 2>/dev/null
printf '127.0.0.1 bench.test\n' > "$WORK/hosts"
# client CMD...: CMD where bench.test is 127.0.0.1.
client() {
    unshare -m sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$WORK/hosts" "$@"
}

# start_nginx NAME CORE HTTP_BLOCK: one nginx, one worker pinned to CORE, with the
# common settings of both runs and HTTP_BLOCK inside `http { }`.
start_nginx() {
    local dir="$WORK/$1"
    mkdir -p "$dir"
    cat > "$dir/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
$3
}
EOF
    taskset -c "$2" nginx -c "$dir/nginx.conf" -p "$dir" &
    pids+=($!)
}

# --- upstream: nginx answering 200 with a small body, on core 1 -----------------------
start_nginx upstream 1 "    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / { return 200 'hello from upstream\n'; }
    }"

# --- nginx as reverse proxy, one worker on core 0 -------------------------------------
start_nginx proxy 0 "    upstream backend {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGINX_PROXY_PORT;
        listen 127.0.0.1:$NGINX_TLS_PORT ssl http2;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }
    server {
        listen 127.0.0.1:$NGINX_H2C_PORT http2;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"

# --- tollgate, one worker on core 0 ---------------------------------------------------
RUST_LOG=warn taskset -c 0 "$TOLLGATE" run --node-id 1 --data-dir "$WORK/tollgate" --workers 1 \
    --access-log false --proxy-listen 127.0.0.1:$TG_PROXY_PORT --proxy-tls-listen 127.0.0.1:$TG_TLS_PORT --admin-listen 127.0.0.1:$TG_ADMIN_PORT \
    --cluster-listen 127.0.0.1:$TG_CLUSTER_PORT --initial-cluster 1=127.0.0.1:$TG_CLUSTER_PORT \
    > "$WORK/tollgate.log" 2>&1 &
TG_PID=$!
pids+=($TG_PID)

wait_for() { # url
    for _ in $(seq 1 200); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.05; done
    echo "timed out waiting for $1" >&2; exit 1
}
wait_for "http://127.0.0.1:$UPSTREAM_PORT/"
wait_for "http://127.0.0.1:$NGINX_PROXY_PORT/"
wait_for "http://127.0.0.1:$TG_ADMIN_PORT/status"

admin() { curl -fsS -X "$1" "http://127.0.0.1:$TG_ADMIN_PORT$2" -H 'content-type: application/json' ${3:+-d "$3"} > /dev/null; }
for _ in $(seq 1 100); do admin POST /services "{\"name\":\"bench\",\"url\":\"http://127.0.0.1:$UPSTREAM_PORT\"}" 2>/dev/null && break; sleep 0.1; done
admin POST /services/bench/routes '{"name":"bench","paths":["/bench"]}'
CERT_ID=$(python3 -c 'import json, sys; print(json.dumps({"cert": open(sys.argv[1]).read(), "key": open(sys.argv[2]).read()}))' \
    "$WORK/cert.pem" "$WORK/key.pem" | curl -fsS -X POST "http://127.0.0.1:$TG_ADMIN_PORT/certificates" \
    -H 'content-type: application/json' --data-binary @- | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
admin POST "/certificates/$CERT_ID/snis" '{"name":"bench.test"}'
wait_for "http://127.0.0.1:$TG_PROXY_PORT/bench"
for _ in $(seq 1 200); do
    client curl -fksS -o /dev/null "https://bench.test:$TG_TLS_PORT/bench" 2>/dev/null && break; sleep 0.05
done
NGINX_PID=$(pgrep -P "$(cat "$WORK/proxy/nginx.pid")" | head -1)

nginx_worker_pid() { # master pid file -> its (single) worker
    pgrep -P "$(cat "$1")" | head -1
}

user_ticks() { # pid -> utime of the whole process (the rest of cpu_ticks is the kernel's)
    awk '{print $14}' "/proc/$1/stat"
}

cpu_ticks() { # pid -> utime + stime of the whole process
    awk '{print $14 + $15}' "/proc/$1/stat"
}

per_request() { # ticks requests -> CPU-µs per request
    awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}'
}

kernel_part() { # cpu_us user_us -> the kernel's part
    awk -v t="$1" -v u="$2" 'BEGIN {printf "%.1f", t - u}'
}

# run NAME URL PID(or -) [wrk args...]; the requests/s also land in $LAST_RPS.
run() {
    local name=$1 url=$2 pid=$3 before after out requests rps p50 p99 cpu_us
    shift 3
    client taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s "$@" "$url" > /dev/null   # warm-up: pools, caches
    [ "$pid" != "-" ] && before=$(cpu_ticks "$pid") && user_before=$(user_ticks "$pid")
    out=$(client taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION_S}s" --latency "$@" "$url")
    [ "$pid" != "-" ] && after=$(cpu_ticks "$pid") && user_after=$(user_ticks "$pid")
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
    if echo "$out" | grep -q "Non-2xx\|Socket errors"; then echo "$name: errors!" >&2; echo "$out" >&2; exit 1; fi
    if [ "$pid" != "-" ]; then
        cpu_us=$(per_request $((after - before)) "$requests")
        user_us=$(per_request $((user_after - user_before)) "$requests")
    else
        cpu_us="-"
        user_us="-"
    fi
    printf "%-28s %12s %10s %10s %14s %10s\n" "$name" "$rps" "$p50" "$p99" "$cpu_us" "$user_us"
    LAST_RPS=$rps
    LAST_CPU=$cpu_us
    LAST_USER=$user_us
}

# run_h2 NAME URL PID [h2load args...]: as run, with h2load (HTTP/2, 10 streams per
# connection); its latency column is the mean (h2load prints no percentiles).
run_h2() {
    local name=$1 url=$2 pid=$3 before after out requests rps mean cpu_us
    shift 3
    client taskset -c 1 h2load -t1 -c"$CONNECTIONS" -m10 -D 2 "$@" "$url" > /dev/null
    before=$(cpu_ticks "$pid")
    user_before=$(user_ticks "$pid")
    out=$(client taskset -c 1 h2load -t1 -c"$CONNECTIONS" -m10 -D "$DURATION_S" "$@" "$url")
    after=$(cpu_ticks "$pid")
    user_after=$(user_ticks "$pid")
    # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
    requests=$(echo "$out" | awk '$1 == "requests:" {print $8}')
    if ! echo "$out" | grep -q " 0 failed, 0 errored" || [ "${requests:-0}" -eq 0 ] ||
        ! echo "$out" | awk '$1 == "status" {exit !($5 == 0 && $7 == 0 && $9 == 0)}'; then
        echo "$name: failed or non-2xx requests!" >&2; echo "$out" >&2; exit 1
    fi
    rps=$(echo "$out" | awk '$1 == "finished" {print $4}')
    mean=$(echo "$out" | awk '$1 == "time" && $3 == "request:" {print $6}')
    cpu_us=$(per_request $((after - before)) "$requests")
    user_us=$(per_request $((user_after - user_before)) "$requests")
    printf "%-28s %12s %10s %10s %14s %10s\n" "$name" "$rps" "$mean" "-" "$cpu_us" "$user_us"
    LAST_RPS=$rps
    LAST_CPU=$cpu_us
    LAST_USER=$user_us
}

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# compare LABEL GOAL RUNNER NGINX_URL TOLLGATE_URL [args...]: ROUNDS rounds of nginx
# then tollgate; prints the per-round CPU ratios and their median. nginx's CPU per
# request by round lands in NGINX_ROUNDS.
compare() {
    local label=$1 goal=$2 runner=$3 nginx_url=$4 tg_url=$5 round nginx_round ratios=()
    local nginx_user=() nginx_kernel=() tg_user=() tg_kernel=()
    shift 5
    NGINX_ROUNDS=()
    for round in $(seq 1 "$ROUNDS"); do
        $runner "nginx, $label ($round)" "$nginx_url" "$NGINX_PID" "$@"
        nginx_round=$LAST_CPU
        NGINX_ROUNDS+=("$nginx_round")
        nginx_user+=("$LAST_USER")
        nginx_kernel+=("$(kernel_part "$LAST_CPU" "$LAST_USER")")
        $runner "tollgate, $label ($round)" "$tg_url" "$TG_PID" "$@"
        tg_user+=("$LAST_USER")
        tg_kernel+=("$(kernel_part "$LAST_CPU" "$LAST_USER")")
        # Each round's two runs are back to back, so their ratio is what the
        # neighbours disturb least.
        ratios+=("$(awk -v t="$LAST_CPU" -v n="$nginx_round" 'BEGIN {printf "%.3f", t / n}')")
    done
    echo "tollgate / nginx CPU per request, $label, by round: ${ratios[*]}; median $(median "${ratios[@]}") (goal $goal)"
    echo "  medians, CPU-µs per request in user space / in the kernel: nginx $(median "${nginx_user[@]}") / $(median "${nginx_kernel[@]}"), tollgate $(median "${tg_user[@]}") / $(median "${tg_kernel[@]}")"
}

# CPU-µs per request of the proxy process, and the part of it spent in user space
# (the rest is the kernel's: TCP on loopback, charged to the sender for both ends).
printf "%-28s %12s %10s %10s %14s %10s\n" "target" "requests/s" "p50" "p99" "proxy CPU-µs/req" "of it user"
run "direct (no proxy)" "http://127.0.0.1:$UPSTREAM_PORT/bench" -
compare "HTTP/1.1" "<= 0.8" run "http://127.0.0.1:$NGINX_PROXY_PORT/bench" "http://127.0.0.1:$TG_PROXY_PORT/bench"
NGINX_CPU=$(median "${NGINX_ROUNDS[@]}")
compare "HTTPS" "<= 1" run "https://bench.test:$NGINX_TLS_PORT/bench" "https://bench.test:$TG_TLS_PORT/bench"
# Connection: close: one full TLS 1.3 handshake (wrk resumes no session) per request.
compare "TLS handshake per request" "<= 1" run "https://bench.test:$NGINX_TLS_PORT/bench" \
    "https://bench.test:$TG_TLS_PORT/bench" -H "Connection: close"
compare "h2c" "<= 1" run_h2 "http://127.0.0.1:$NGINX_H2C_PORT/bench" "http://127.0.0.1:$TG_PROXY_PORT/bench"
compare "h2 over TLS" "<= 1" run_h2 "https://bench.test:$NGINX_TLS_PORT/bench" "https://bench.test:$TG_TLS_PORT/bench"

# 10 000 more routes, one declarative document (the bench route stays).
python3 - "$ROUTES" "$UPSTREAM_PORT" > "$WORK/routes.json" <<'EOF'
import json, sys
count, port = int(sys.argv[1]), sys.argv[2]
routes = [{"name": f"r{i}", "paths": [f"/api/v1/resource-{i}"], "hosts": [f"h{i % 50}.example.com"] if i % 3 == 0 else None} for i in range(count)]
routes = [{k: v for k, v in r.items() if v is not None} for r in routes]
doc = {"_format_version": "3.0", "services": [{"name": "bench", "url": f"http://127.0.0.1:{port}",
       "routes": [{"name": "bench", "paths": ["/bench"]}] + routes}]}
print(json.dumps(doc))
EOF
curl -fsS -X POST "http://127.0.0.1:$TG_ADMIN_PORT/config" -H 'content-type: application/json' --data-binary @"$WORK/routes.json" > /dev/null
for _ in $(seq 1 200); do
    published=$(curl -fsS "http://127.0.0.1:$TG_ADMIN_PORT/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["entities"]["routes"])')
    [ "$published" -gt "$ROUTES" ] && break; sleep 0.1
done
run "tollgate, $ROUTES routes" "http://127.0.0.1:$TG_PROXY_PORT/bench" "$TG_PID"
NO_PLUGINS_RPS=$LAST_RPS
awk -v n="$NGINX_CPU" -v t="$LAST_CPU" \
    'BEGIN {printf "10 000 routes / nginx (median of its rounds) CPU per request: %.3f (goal <= 1.15)\n", t / n}'

# The same route with plugins (issue 4's figure): key-auth, rate-limiting (local, a
# limit never reached), prometheus (status codes and latencies) and correlation-id,
# on a second route of the same service, with the 10 000 routes still configured.
admin POST /services/bench/routes '{"name":"bench-plugins","paths":["/bench-plugins"]}'
admin POST /consumers '{"username":"bench"}'
admin POST /consumers/bench/key-auth '{"key":"bench-key"}'
for plugin in '{"name":"key-auth"}' \
    '{"name":"rate-limiting","config":{"second":1000000000,"policy":"local"}}' \
    '{"name":"prometheus","config":{"status_code_metrics":true,"latency_metrics":true}}' \
    '{"name":"correlation-id"}'; do
    admin POST /routes/bench-plugins/plugins "$plugin"
done
for _ in $(seq 1 200); do
    curl -fsS -o /dev/null -H 'apikey: bench-key' "http://127.0.0.1:$TG_PROXY_PORT/bench-plugins" 2>/dev/null && break
    sleep 0.05
done
run "tollgate, 4 plugins" "http://127.0.0.1:$TG_PROXY_PORT/bench-plugins" "$TG_PID" -H "apikey: bench-key"
awk -v with="$LAST_RPS" -v without="$NO_PLUGINS_RPS" \
    'BEGIN {printf "requests/s with the 4 plugins / without: %.3f (goal >= 0.85)\n", with / without}'

# Cluster rate limits (issue 5's figure): the same hour limit, never reached, counted
# per node (`local`) and through the Raft ledger (`cluster`) on two more routes.
# Reports the CPU per request of each and the quota Raft entries per admitted request.
for policy in local cluster; do
    admin POST /services/bench/routes "{\"name\":\"bench-$policy\",\"paths\":[\"/bench-$policy\"]}"
    admin POST /routes/bench-$policy/plugins \
        "{\"name\":\"rate-limiting\",\"config\":{\"hour\":1000000000,\"policy\":\"$policy\",\"limit_by\":\"service\"}}"
done
wait_for "http://127.0.0.1:$TG_PROXY_PORT/bench-cluster"
quota_metric() { # name -> value from /metrics (0 when absent)
    curl -fsS "http://127.0.0.1:$TG_ADMIN_PORT/metrics" | awk -v name="$1" '$1 == name {print $2; found=1} END {if (!found) print 0}'
}
# Alternating rounds, as for nginx above: each round's pair is back to back.
cluster_ratios=() entries=0 admitted=0
for round in $(seq 1 "$ROUNDS"); do
    run "tollgate, rate-limit local ($round)" "http://127.0.0.1:$TG_PROXY_PORT/bench-local" "$TG_PID"
    local_round=$LAST_CPU
    entries_before=$(quota_metric tollgate_quota_raft_entries_total)
    admitted_before=$(quota_metric tollgate_quota_admitted_total)
    run "tollgate, rate-limit cluster ($round)" "http://127.0.0.1:$TG_PROXY_PORT/bench-cluster" "$TG_PID"
    entries=$(( entries + $(quota_metric tollgate_quota_raft_entries_total) - entries_before ))
    admitted=$(( admitted + $(quota_metric tollgate_quota_admitted_total) - admitted_before ))
    cluster_ratios+=("$(awk -v c="$LAST_CPU" -v l="$local_round" 'BEGIN {printf "%.3f", c / l}')")
done
echo "cluster / local CPU per request, by round: ${cluster_ratios[*]}; median $(median "${cluster_ratios[@]}") (goal <= 1.10)"
awk -v e="$entries" -v a="$admitted" \
    'BEGIN {printf "quota Raft entries: %d for %d admitted (%.4f per 100; goal <= 1)\n", e, a, (a > 0 ? e * 100 / a : 0)}'

# RSS per idle keep-alive connection, plain and over TLS, against nginx (fresh processes
# of the same binaries, the same upstream), in alternating rounds.
if [ "$IDLE_COUNT" -gt 0 ]; then
    for tls in "" --tls; do
        python3 tests/bench/idle-conns.py --binary "$TOLLGATE" --count "$IDLE_COUNT" --rounds "$ROUNDS" \
            --upstream "127.0.0.1:$UPSTREAM_PORT" $tls | tail -2
    done
fi
