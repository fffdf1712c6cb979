#!/usr/bin/env python3
"""Issue 9 item 2's starvation check: a well-behaved bench's round trips per second, alone and
beside clients that send without ever reading their echo.

For each model: starts `multiecho serve --model M --workers 1` (release build; for uring with
MULTIECHO_URING_BUFFERS=--buffers unless 0), runs `multiecho bench` (--conns, 512 B) alone, then opens
--stalled clients that each send up to --each bytes without reading (until their connection is
full both ways), runs the same bench beside them, and prints both rates and their ratio. The
issue's target: the loaded rate is at least half the unloaded one.

usage: scripts/starvation.py [--stalled N] [--each BYTES] [--buffers N] [--conns N] MODEL...
"""
import argparse
import json
import os
import socket
import subprocess
import threading
import time

from multiecho_server import BIN, require_binary, running


def bench(host, port, conns, duration):
    out = subprocess.run([BIN, "bench", "--conns", str(conns), "--size", "512", "--duration",
                          duration, "--warmup", "1s", "--json", "-q", f"{host}:{port}"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return 0.0, out.stderr.strip().splitlines()[-1:] or ["bench failed"]
    report = json.loads(out.stdout)
    return report["requests_per_sec"], []


def never_read(host, port, each, socks):
    sock = socket.create_connection((host, port))
    sock.setblocking(False)
    socks.append(sock)
    chunk, sent, quiet = b"\x5a" * 65536, 0, 0
    while sent < each and quiet < 5:
        try:
            sent += sock.send(chunk[: min(len(chunk), each - sent)])
            quiet = 0
        except BlockingIOError:
            quiet += 1
            time.sleep(0.02)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stalled", type=int, default=80)
    parser.add_argument("--each", type=int, default=8 << 20)
    parser.add_argument("--buffers", type=int, default=32, help="uring's buffers; 0: its default")
    parser.add_argument("--conns", type=int, default=20)
    parser.add_argument("--duration", default="3s")
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    require_binary()
    if args.buffers:
        os.environ["MULTIECHO_URING_BUFFERS"] = str(args.buffers)
    print("| model | alone (round trips/s) | beside never-reading clients | ratio |")
    print("|---|---:|---:|---:|")
    for model in args.models:
        with running(model, "--workers", "1") as (_, host, port):
            alone, _ = bench(host, port, args.conns, args.duration)
            socks = []
            pushers = [threading.Thread(target=never_read, args=(host, port, args.each, socks))
                       for _ in range(args.stalled)]
            for p in pushers:
                p.start()
            for p in pushers:
                p.join()
            loaded, problems = bench(host, port, args.conns, args.duration)
            for sock in socks:
                sock.close()
        note = f" ({problems[0]})" if problems else ""
        print(f"| {model} | {alone:,.0f} | {loaded:,.0f}{note} | {loaded / alone:.2f} |")


if __name__ == "__main__":
    main()
