#!/usr/bin/env bash
# The cost of admission control (issue: one connection lifecycle): epoll with 10,000 --allow
# rules and per-source limits on ("rules-on"), against the same server with every rule off
# ("rules-off"), in one interleaved compare run (the servers take turns at each point). Both servers have one worker and are pinned
# to CPU 0, the load generator to CPU 1; 50 and 1000 connections, 512-byte messages.
# scripts/paired_ratios.py then divides the ruled server's figures by the plain one's of the
# same round.
#
# usage: [REPEAT=5] [DURATION=3] [OUT=target/benchmarks] scripts/admission-cost.sh
set -euo pipefail

default_port=5199
# shellcheck source=scripts/bench_setup.sh
source "$(dirname "$0")/bench_setup.sh"

# 10,000 allow rules (single addresses across 10.0.0.0/8), plus loopback so the bench is served.
rules=(--allow 127.0.0.0/8)
for n in $(seq 0 9999); do
    rules+=(--allow "10.$((n / 65536)).$(((n / 256) % 256)).$((n % 256))")
done

# Two servers started the same way, pinned to the same CPU, one with the rules; compare's own
# epoll runs beside them as a third contender (compare needs one model), which also shows how
# far two identical servers differ here.
taskset -c 0 "$multiecho" -q serve --workers 1 --listen "127.0.0.1:$port" &
plain=$!
taskset -c 0 "$multiecho" -q serve --workers 1 --listen "127.0.0.1:$((port + 1))" \
    "${rules[@]}" --max-per-source 2000 --max-conn-rate 100000 &
ruled=$!
trap 'kill $plain $ruled 2>/dev/null; wait 2>/dev/null || true' EXIT
wait_for_port "$port"
wait_for_port $((port + 1))

"$multiecho" compare --models epoll --workers 1 --server-cpus 0 --client-cpus 1 --threads 1 \
    --duration "$duration" --warmup 1 --repeat "$repeat" --conns 50,1000 --size 512 \
    --external "rules-off=127.0.0.1:$port@$plain" \
    --external "rules-on=127.0.0.1:$((port + 1))@$ruled" \
    --out "$out/admission-cost"
python3 "$root/scripts/paired_ratios.py" "$out/admission-cost/report.json" rules-off
