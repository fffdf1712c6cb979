#!/usr/bin/env bash
# The cost of `--metrics` on the echo path: epoll with `--metrics` ("metrics-on") against the
# same server without it ("metrics-off"), in one interleaved compare run (the servers take
# turns at each point). Both servers have one worker and are pinned to CPU 0, the load
# generator to CPU 1; 50 and 1000 connections, 512-byte messages. The metrics endpoint is
# scraped once a second during the run, as a (busy) Prometheus would. scripts/paired_ratios.py
# then divides the metrics server's figures by the plain one's of the same round.
#
# usage: [REPEAT=5] [DURATION=3] [OUT=target/benchmarks] scripts/metrics-cost.sh
set -euo pipefail

default_port=5399
# shellcheck source=scripts/bench_setup.sh
source "$(dirname "$0")/bench_setup.sh"

taskset -c 0 "$multiecho" -q serve --workers 1 --listen "127.0.0.1:$port" &
plain=$!
taskset -c 0 "$multiecho" -q serve --workers 1 --listen "127.0.0.1:$((port + 1))" \
    --metrics "127.0.0.1:$((port + 2))" &
metered=$!
scraper=
trap 'kill $plain $metered $scraper 2>/dev/null; wait 2>/dev/null || true' EXIT
wait_for_port "$port"
wait_for_port $((port + 1))
wait_for_port $((port + 2))
(while sleep 1; do
    curl -s -o /dev/null "http://127.0.0.1:$((port + 2))/metrics" || true
done) &
scraper=$!

"$multiecho" compare --models epoll --workers 1 --server-cpus 0 --client-cpus 1 --threads 1 \
    --duration "$duration" --warmup 1 --repeat "$repeat" --conns 50,1000 --size 512 \
    --external "metrics-off=127.0.0.1:$port@$plain" \
    --external "metrics-on=127.0.0.1:$((port + 1))@$metered" \
    --out "$out/metrics-cost"
python3 "$root/scripts/paired_ratios.py" "$out/metrics-cost/report.json" metrics-off
