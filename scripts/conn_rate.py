#!/usr/bin/env python3
"""Connections served per second, one client at a time, by each model.

For each model given, starts `multiecho serve --model M` (release build) on a free loopback
port, then N times: connect, send one byte, read its echo, close. Prints connections per
second for each model. Sequential on purpose: it measures the cost of setting up and tearing
down one connection (accept, fork or thread or task, first echo, close), not concurrency.

usage: scripts/conn_rate.py [--count N] [--repeat R] MODEL...
"""
import argparse
import socket
import statistics
import sys
import time

from multiecho_server import require_binary, running


def rate(model, count):
    with running(model) as (_, host, port):
        started = time.perf_counter()
        for _ in range(count):
            with socket.create_connection((host, port)) as sock:
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    sys.exit(f"{model}: wrong echo")
        return count / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("models", nargs="+")
    opts = parser.parse_args()
    require_binary()
    for model in opts.models:
        rates = [rate(model, opts.count) for _ in range(opts.repeat)]
        print(f"{model}: {statistics.median(rates):,.0f} connections/s "
              f"(median of {opts.repeat} runs of {opts.count})", flush=True)


if __name__ == "__main__":
    main()
