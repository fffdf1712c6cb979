#!/usr/bin/env python3
"""Connections served per second, one client at a time, by each model.

For each model given, starts `multiecho serve --model M` (release build) on a free loopback
port, then N times: connect, send one byte, read its echo, close. Prints connections per
second for each model. Sequential on purpose: it measures the cost of setting up and tearing
down one connection (accept, fork or thread or task, first echo, close), not concurrency.

usage: scripts/conn_rate.py [--count N] [--repeat R] MODEL...
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "multiecho")


def rate(model, count):
    env = dict(os.environ, RUST_LOG="info")
    server = subprocess.Popen([BIN, "serve", "--model", model, "--listen", "127.0.0.1:0"],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        addr = None
        for line in server.stderr:
            if "listening on " in line:
                addr = line.split("listening on ", 1)[1].split()[0]
                break
        if addr is None:
            sys.exit(f"{model}: the server did not start")
        # Keep reading the log (one line per connection) so the server never blocks on it.
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        host, port = addr.rsplit(":", 1)
        started = time.perf_counter()
        for _ in range(count):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    sys.exit(f"{model}: wrong echo")
        return count / (time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("models", nargs="+")
    opts = parser.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run cargo build --release first")
    for model in opts.models:
        rates = [rate(model, opts.count) for _ in range(opts.repeat)]
        print(f"{model}: {statistics.median(rates):,.0f} connections/s "
              f"(median of {opts.repeat} runs of {opts.count})", flush=True)


if __name__ == "__main__":
    main()
