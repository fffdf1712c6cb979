#!/usr/bin/env bash
# Reproduces the figures in BENCHMARKS.md on this machine.
#
# 1. Head to head with the C reference (../shared/bench/epoll_echo.c): the event-driven models
#    with one worker and the C server, each pinned to CPU 0, the load generator (one thread)
#    pinned to CPU 1; 1, 50 and 1000 connections, 512-byte messages.
# 2. Every model, same pinning, the default sweep of `multiecho compare` (1, 50, 500
#    connections; 64, 512, 16384 bytes).
# 3. Server memory with 10,000 idle connections (scripts/idle_rss.py).
# Every point is measured REPEAT times (default 3) and the reports quote medians.
#
# usage: [REPEAT=3] [DURATION=3] [OUT=target/benchmarks] scripts/benchmarks.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
repeat=${REPEAT:-3}
duration=${DURATION:-3}
out=${OUT:-$root/target/benchmarks}
port=${PORT:-5099}
mkdir -p "$out"

(cd "$root" && cargo build --release --quiet)
multiecho="$root/target/release/multiecho"
cc -O2 -o "$out/epoll_echo" "${EPOLL_ECHO_C:-$root/../shared/bench/epoll_echo.c}"

taskset -c 0 "$out/epoll_echo" "$port" &
c_server=$!
trap 'kill "$c_server" 2>/dev/null; wait "$c_server" 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.01
done

common=(--server-cpus 0 --client-cpus 1 --threads 1 --duration "$duration" --warmup 1
        --repeat "$repeat")

echo "== head to head with the C reference"
"$multiecho" compare "${common[@]}" --models epoll,async,uring --workers 1 \
    --external "c-reference=127.0.0.1:$port@$c_server" \
    --conns 1,50,1000 --size 512 --out "$out/head-to-head"

echo "== every model"
"$multiecho" compare "${common[@]}" --out "$out/all-models"

echo "== memory with 10,000 idle connections"
python3 "$root/scripts/idle_rss.py" --conns 10000 epoll async uring thread | tee "$out/idle-rss.txt"
