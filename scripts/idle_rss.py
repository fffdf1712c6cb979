#!/usr/bin/env python3
"""Server memory with many idle connections.

For each model given, starts `multiecho serve --model M` (release build) on a free loopback
port, opens N connections, echoes one byte on each (so every connection is accepted and has
been served once), then reads the server's resident memory (VmRSS, summed over its child
processes for fork-based models) before and after, and prints one line per model.

usage: scripts/idle_rss.py [--conns N] [--workers W] MODEL...
"""
import argparse
import os
import resource
import socket

from multiecho_server import require_binary, running


def rss_kib(pid):
    total = 0
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    pids.append(int(entry))
            except (OSError, IndexError):
                pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(model, conns, workers):
    args = ["--max-conns", str(conns + 100)]
    if workers:
        args += ["--workers", str(workers)]
    with running(model, *args) as (server, host, port):
        before = rss_kib(server.pid)
        socks = []
        for _ in range(conns):
            s = socket.create_connection((host, port))
            s.sendall(b"x")
            socks.append(s)
        for s in socks:
            if s.recv(1) != b"x":
                return f"{model}: wrong echo"
        after = rss_kib(server.pid)
        for s in socks:
            s.close()
    per_conn = (after - before) * 1024 / conns
    return (f"{model}: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB with "
            f"{conns} idle connections ({per_conn:.0f} bytes each)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("models", nargs="+")
    opts = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    require_binary()
    for model in opts.models:
        print(measure(model, opts.conns, opts.workers), flush=True)


if __name__ == "__main__":
    main()
