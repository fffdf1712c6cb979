#!/usr/bin/env python3
"""What a refused connection costs the server: refusals per server CPU-second, by model.

For each model, starts `multiecho serve --model M --deny 127.0.0.0/8` (release build) on a free
loopback port, so every connection is refused by admission control. Client threads then
connect, wait for the server's close and connect again, for the given time. The server's CPU
time (user + system, and its reaped children's, from /proc) is read before and after; the
figure is refused connections per second of server CPU. Run with the server pinned (taskset)
for steadier figures; the script pins the server to CPU 0 and the clients to the other CPUs
when the machine has more than one.

usage: scripts/refusal_cost.py [--seconds S] [--threads T] [--repeat R] MODEL...
"""
import argparse
import os
import socket
import statistics
import threading
import time

from multiecho_server import require_binary, running

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime are fields 14-17 (1-based); after the comm they start at 11.
    return sum(int(x) for x in fields[11:15]) / TICKS


def refuse_loop(host, port, stop, counts, index):
    refused = 0
    while not stop.is_set():
        with socket.create_connection((host, port)) as sock:
            sock.settimeout(5)
            try:
                if sock.recv(1) != b"":
                    raise SystemExit("a refused connection was served")
            except ConnectionResetError:
                pass
        refused += 1
    counts[index] = refused


def measure(model, seconds, threads):
    cpus = os.sched_getaffinity(0)
    with running(model, "--deny", "127.0.0.0/8", "-q") as (server, host, port):
        if len(cpus) > 1:
            os.sched_setaffinity(server.pid, {min(cpus)})
            os.sched_setaffinity(0, cpus - {min(cpus)})
        stop = threading.Event()
        counts = [0] * threads
        workers = [threading.Thread(target=refuse_loop, args=(host, port, stop, counts, i))
                   for i in range(threads)]
        before = cpu_seconds(server.pid)
        for w in workers:
            w.start()
        time.sleep(seconds)
        stop.set()
        for w in workers:
            w.join()
        used = cpu_seconds(server.pid) - before
        os.sched_setaffinity(0, cpus)
    return sum(counts), used


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("models", nargs="+")
    opts = parser.parse_args()
    require_binary()
    for model in opts.models:
        rates = []
        for _ in range(opts.repeat):
            refused, used = measure(model, opts.seconds, opts.threads)
            rates.append(refused / used if used > 0 else float("inf"))
            print(f"  {model}: {refused} refused, {used:.2f} s of server CPU", flush=True)
        print(f"{model}: {statistics.median(rates):,.0f} refusals per server CPU-second "
              f"(median of {opts.repeat}; range {min(rates):,.0f}-{max(rates):,.0f})")


if __name__ == "__main__":
    main()
