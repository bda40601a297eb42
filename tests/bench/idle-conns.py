#!/usr/bin/env python3
"""RSS per idle keep-alive proxy connection, and what is left after they close.

For each server measured (Tollgate from BINARY, and nginx as a reverse proxy), in
ROUNDS alternating rounds, each round with fresh processes:
  1. start it with one proxy worker, send warm-up requests, read its RSS ("start");
  2. open COUNT connections, each sends one proxied request (HTTP/1.1 keep-alive, over
     TLS 1.3 with --tls) and reads the answer, then stays open and silent: a keep-alive
     connection between requests, as a browser or a mobile client leaves it;
  3. with all of them open, read the RSS again: (full - start) / COUNT is the cost of
     one idle connection;
  4. close them all, wait 10 s, read the RSS: how much of the start it is back to.
RSS is the VmRSS of the process that holds the connections (Tollgate's whole process;
nginx's worker), from /proc. Medians over the rounds are printed last.

Usage: tests/bench/idle-conns.py [--binary target/release/tollgate] [--count 10000]
           [--rounds 3] [--tls] [--no-nginx] [--upstream HOST:PORT]
Without --upstream, an nginx answering 200 is the upstream.
Needs: nginx, openssl; COUNT open files in this process (`ulimit -n`); the script
raises its own soft limit to the hard one.
"""
import argparse
import json
import os
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--binary", default="target/release/tollgate")
parser.add_argument("--count", type=int, default=10000)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--tls", action="store_true", help="connections over TLS 1.3 (P-256 certificate)")
parser.add_argument("--no-nginx", action="store_true", help="measure Tollgate only")
parser.add_argument("--upstream", help="HOST:PORT of an HTTP/1.1 upstream answering GET /bench")
parser.add_argument("--settle", type=float, default=10.0, help="seconds between the close and the last reading")
args = parser.parse_args()

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < args.count + 100:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.count + 1000), hard))

work = tempfile.mkdtemp(prefix="idle-conns-")
NAME = "bench.test"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_until(check, what, seconds=30):
    deadline = time.time() + seconds
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.time() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


def nginx(directory, server, connections=1024):
    """Starts nginx with one worker serving `server` (a `server { }` body); its master."""
    os.makedirs(directory)
    with open(os.path.join(directory, "nginx.conf"), "w") as conf:
        conf.write(f"""daemon off; worker_processes 1; pid {directory}/nginx.pid; error_log {directory}/error.log warn;
events {{ worker_connections {connections}; }}
worker_rlimit_nofile {connections + 1000};
http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    upstream backend {{ server {upstream}; keepalive 64; }}
    server {{
        {server}
    }}
}}
""")
    return subprocess.Popen(["nginx", "-c", f"{directory}/nginx.conf", "-p", directory],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


upstream_process = None
if args.upstream:
    upstream = args.upstream
else:
    upstream = f"127.0.0.1:{free_port()}"
    upstream_process = nginx(os.path.join(work, "upstream"),
                             f"listen {upstream}; location / {{ return 200 'hello from upstream\\n'; }}")

cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={NAME}",
                "-addext", f"subjectAltName=DNS:{NAME}"], check=True, capture_output=True)
client_tls = ssl.create_default_context()
client_tls.check_hostname = False
client_tls.verify_mode = ssl.CERT_NONE
client_tls.minimum_version = ssl.TLSVersion.TLSv1_3


def request(sock):
    """One keep-alive GET /bench on `sock`; its status."""
    sock.sendall(f"GET /bench HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += sock.recv(4096)
    return int(head.split()[1])


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port))
    if args.tls:
        sock = client_tls.wrap_socket(sock, server_hostname=NAME)
    return sock


def start_tollgate():
    data = os.path.join(work, f"tollgate-{time.time_ns()}")
    proxy, tls, admin, cluster = free_port(), free_port(), free_port(), free_port()
    node = subprocess.Popen(
        [args.binary, "run", "--node-id", "1", "--data-dir", data, "--workers", "1", "--access-log", "false",
         "--admin-listen", f"127.0.0.1:{admin}", "--cluster-listen", f"127.0.0.1:{cluster}",
         "--proxy-listen", f"127.0.0.1:{proxy}", "--proxy-tls-listen", f"127.0.0.1:{tls}",
         "--initial-cluster", f"1=127.0.0.1:{cluster}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as answer:
            return json.load(answer)

    def configured():
        post("/services", {"name": "bench", "url": f"http://{upstream}"})
        return True

    wait_until(configured, "tollgate's Admin API")
    post("/services/bench/routes", {"name": "bench", "paths": ["/bench"]})
    with open(cert) as c, open(key) as k:
        created = post("/certificates", {"cert": c.read(), "key": k.read()})
    post(f"/certificates/{created['id']}/snis", {"name": NAME})
    port = tls if args.tls else proxy

    def proxies():
        with connect(port) as sock:
            return request(sock) == 200

    wait_until(proxies, "tollgate's proxy")
    return node, node.pid, port, lambda: shutil.rmtree(data, ignore_errors=True)


def start_nginx():
    directory = os.path.join(work, f"nginx-{time.time_ns()}")
    port = free_port()
    listen = f"listen 127.0.0.1:{port} ssl; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate {cert}; ssl_certificate_key {key};" if args.tls \
        else f"listen 127.0.0.1:{port};"
    master = nginx(directory, f"""{listen}
        location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}""",
                   args.count + 1000)

    def proxies():
        with connect(port) as sock:
            return request(sock) == 200

    wait_until(proxies, f"nginx (see {directory}/error.log)")
    worker = int(subprocess.run(["pgrep", "-P", str(master.pid)], capture_output=True, text=True,
                                check=True).stdout.split()[0])
    return master, worker, port, lambda: shutil.rmtree(directory, ignore_errors=True)


def measure(start):
    process, pid, port, clean = start()
    try:
        for _ in range(200):  # warm-up: pools, caches, the allocator's first pages
            with connect(port) as sock:
                request(sock)
        time.sleep(1)
        before = rss(pid)
        sockets = []
        for _ in range(args.count):
            sock = connect(port)
            if request(sock) != 200:
                sys.exit("a request was not answered 200")
            sockets.append(sock)
        time.sleep(2)
        full = rss(pid)
        for sock in sockets:
            sock.close()
        time.sleep(args.settle)
        after = rss(pid)
        return before, full, after
    finally:
        process.terminate()
        process.wait()
        clean()


servers = [("tollgate", start_tollgate)] + ([] if args.no_nginx else [("nginx", start_nginx)])
results = {name: [] for name, _ in servers}
try:
    for round_ in range(1, args.rounds + 1):
        for name, start in servers:
            before, full, after = measure(start)
            per = (full - before) / args.count
            back = (after - before) / before * 100
            results[name].append((per, back, before, full, after))
            print(f"{name} ({round_}): RSS at start {before / 1e6:.1f} MB, with {args.count} idle connections "
                  f"{full / 1e6:.1f} MB: {per:.0f} B per connection; {args.settle:.0f} s after they closed "
                  f"{after / 1e6:.1f} MB ({back:+.0f}% of the start)", flush=True)
    kind = "TLS" if args.tls else "plain"
    for name, rows in results.items():
        print(f"{name} {kind}: median RSS per idle connection {statistics.median(r[0] for r in rows):.0f} B; "
              f"median RSS after the close {statistics.median(r[1] for r in rows):+.0f}% of the start "
              f"({len(rows)} rounds of {args.count})")
finally:
    if upstream_process:
        upstream_process.terminate()
        upstream_process.wait()
    shutil.rmtree(work, ignore_errors=True)
