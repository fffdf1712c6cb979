#!/usr/bin/env bash
# Reproduces the figures in BENCHMARKS.md on this machine.
#
# 1. Head to head with the C reference (../shared/bench/epoll_echo.c): the event-driven models
#    with one worker and the C server, each pinned to CPU 0, the load generator (one thread)
#    pinned to CPU 1; 1, 50 and 1000 connections, 512-byte messages. Also a hand-written C
#    io_uring server (scripts/c_uring_echo.c, needs liburing-dev; skipped without it), the
#    yardstick for what io_uring can save here. Then 1000 connections again with twice the
#    rounds, and each server's figures divided by the C reference's of the same round
#    (scripts/paired_ratios.py).
# 2. Every model, same pinning, the default sweep of `multiecho compare` (1, 50, 500
#    connections; 64, 512, 16384 bytes).
# 3. Connection churn: every model, one connection at a time, a new connection for every
#    1-byte round trip (`compare --churn`): what a connection costs each model.
# 4. Server memory with 10,000 idle connections (scripts/idle_rss.py).
# Every point is measured REPEAT times (HEAD_REPEAT, default 5, for the head to head; REPEAT,
# default 3, for the rest), the servers taking turns, and the reports quote medians.
#
# usage: [HEAD_REPEAT=5] [REPEAT=3] [DURATION=3] [OUT=target/benchmarks] scripts/benchmarks.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/wait_for_port.sh
source "$root/scripts/wait_for_port.sh"
repeat=${REPEAT:-3}
head_repeat=${HEAD_REPEAT:-5}
duration=${DURATION:-3}
out=${OUT:-$root/target/benchmarks}
port=${PORT:-5099}
mkdir -p "$out"

(cd "$root" && cargo build --release --quiet)
multiecho="$root/target/release/multiecho"
cc -O2 -o "$out/epoll_echo" "${EPOLL_ECHO_C:-$root/../shared/bench/epoll_echo.c}"

taskset -c 0 "$out/epoll_echo" "$port" &
c_server=$!
servers=("$c_server")
trap 'kill "${servers[@]}" 2>/dev/null; wait 2>/dev/null || true' EXIT
wait_for_port "$port"
externals=(--external "c-reference=127.0.0.1:$port@$c_server")

if cc -O2 -o "$out/c_uring_echo" "$root/scripts/c_uring_echo.c" -luring 2>/dev/null; then
    taskset -c 0 "$out/c_uring_echo" $((port + 1)) &
    c_uring=$!
    servers+=("$c_uring")
    wait_for_port $((port + 1))
    externals+=(--external "c-uring=127.0.0.1:$((port + 1))@$c_uring")
else
    echo "(no c-uring: scripts/c_uring_echo.c needs liburing-dev)"
fi

common=(--server-cpus 0 --client-cpus 1 --threads 1 --duration "$duration" --warmup 1)

echo "== head to head with the C reference"
"$multiecho" compare "${common[@]}" --repeat "$head_repeat" --models epoll,async,uring --workers 1 \
    "${externals[@]}" \
    --conns 1,50,1000 --size 512 --out "$out/head-to-head"

echo "== head to head at 1000 connections, twice the rounds (the noisiest point)"
"$multiecho" compare "${common[@]}" --repeat $((head_repeat * 2)) --models epoll,uring --workers 1 \
    "${externals[@]}" \
    --conns 1000 --size 512 --out "$out/head-to-head-1000"

echo "== every model"
"$multiecho" compare "${common[@]}" --repeat "$repeat" --out "$out/all-models"

for report in head-to-head head-to-head-1000; do
    python3 "$root/scripts/paired_ratios.py" "$out/$report/report.json" | tee "$out/$report/paired-ratios.md"
done
python3 "$root/scripts/paired_ratios.py" "$out/all-models/report.json" epoll > "$out/all-models/paired-ratios.md"

echo "== connection churn"
"$multiecho" compare "${common[@]}" --repeat "$repeat" --churn --conns 1 --size 1 --out "$out/churn"

echo "== memory with 10,000 idle connections"
python3 "$root/scripts/idle_rss.py" --conns 10000 epoll async uring thread | tee "$out/idle-rss.txt"
