#!/usr/bin/env bash
# The splice bulk path (issue 14, target 2): epoll with `--splice auto` and with
# `--splice off` (one worker each) against the C reference (../shared/bench/epoll_echo.c), in
# one interleaved compare run at 64 KiB and 256 KiB, 1 and 50 connections; servers pinned to
# CPU 0, the load generator to CPU 1. scripts/paired_ratios.py then divides each figure by the
# C reference's of the same round, leaving out pairs in which the host stole more than
# MAX_STEAL percent (default 5) of the machine's CPU time for other guests.
#
# usage: [REPEAT=5] [DURATION=3] [MAX_STEAL=5] [OUT=target/benchmarks] scripts/splice-bench.sh
set -euo pipefail

default_port=5399
# shellcheck source=scripts/bench_setup.sh
source "$(dirname "$0")/bench_setup.sh"
cc -O2 -o "$out/epoll_echo" "${EPOLL_ECHO_C:-$root/../shared/bench/epoll_echo.c}"

taskset -c 0 "$out/epoll_echo" "$port" >/dev/null &
c_reference=$!
taskset -c 0 "$multiecho" -q serve --workers 1 --splice auto --listen "127.0.0.1:$((port + 1))" &
spliced=$!
taskset -c 0 "$multiecho" -q serve --workers 1 --splice off --listen "127.0.0.1:$((port + 2))" &
copied=$!
trap 'kill $c_reference $spliced $copied 2>/dev/null; wait 2>/dev/null || true' EXIT
wait_for_port "$port"
wait_for_port $((port + 1))
wait_for_port $((port + 2))

"$multiecho" compare --models epoll --workers 1 --server-cpus 0 --client-cpus 1 --threads 1 \
    --duration "$duration" --warmup 1 --repeat "$repeat" --conns 1,50 --size 65536,262144 \
    --external "c-reference=127.0.0.1:$port@$c_reference" \
    --external "splice-auto=127.0.0.1:$((port + 1))@$spliced" \
    --external "splice-off=127.0.0.1:$((port + 2))@$copied" \
    --out "$out/splice-bench"
python3 "$root/scripts/paired_ratios.py" "$out/splice-bench/report.json" \
    --max-steal "${MAX_STEAL:-5}"
