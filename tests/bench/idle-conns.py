#!/usr/bin/env python3
"""RSS per idle proxy connection, and what is left after they close.

Starts one node (one proxy worker) from BINARY, opens COUNT plain TCP connections to
its proxy listener that send nothing (clients that connected and have not spoken, or
keep-alive connections between requests), and reads the node's VmRSS from /proc
before, with them open, and 10 s after they all closed.

Usage: tests/bench/idle-conns.py [BINARY=target/release/tollgate] [COUNT=10000]
(COUNT needs as many open files in this process: ulimit -n.)
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/tollgate"
count = int(sys.argv[2]) if len(sys.argv) > 2 else 10000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


data = tempfile.mkdtemp(prefix="idle-conns-")
proxy, admin, cluster = free_port(), free_port(), free_port()
node = subprocess.Popen(
    [binary, "run", "--node-id", "1", "--data-dir", data, "--workers", "1", "--access-log", "false",
     "--admin-listen", f"127.0.0.1:{admin}", "--cluster-listen", f"127.0.0.1:{cluster}",
     "--proxy-listen", f"127.0.0.1:{proxy}", "--initial-cluster", f"1=127.0.0.1:{cluster}"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rss():
    with open(f"/proc/{node.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


try:
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", admin), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                sys.exit("the node did not start")
            time.sleep(0.1)
    time.sleep(2)
    start = rss()
    sockets = [socket.create_connection(("127.0.0.1", proxy)) for _ in range(count)]
    time.sleep(3)
    full = rss()
    for s in sockets:
        s.close()
    time.sleep(10)
    after = rss()
    print(f"RSS at start {start / 1e6:.1f} MB; with {count} idle connections {full / 1e6:.1f} MB: "
          f"{(full - start) / count:.0f} B per connection; 10 s after they closed {after / 1e6:.1f} MB "
          f"({(after - start) / start * 100:+.0f}% of the start)")
finally:
    node.terminate()
    node.wait()
    shutil.rmtree(data, ignore_errors=True)
