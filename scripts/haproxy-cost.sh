#!/usr/bin/env bash
# Round trips per second and p99 latency behind a real HAProxy (send-proxy-v2 to a
# tcp+proxy:// listener) against the same multiecho reached directly, in one interleaved
# compare run. One multiecho (epoll, one worker, pinned to CPU 0) listens both ways; HAProxy
# (nbthread 1) and the load generator share CPU 1. The "via-haproxy" CPU figures are HAProxy's
# own, not the echo server's. 50 and 1000 connections, 512-byte messages.
#
# usage: [REPEAT=5] [DURATION=3] [OUT=target/benchmarks] scripts/haproxy-cost.sh
set -euo pipefail

default_port=5299
# shellcheck source=scripts/bench_setup.sh
source "$(dirname "$0")/bench_setup.sh"
command -v haproxy >/dev/null || { echo "haproxy is not installed" >&2; exit 1; }

cfg="$out/haproxy-cost.cfg"
cat >"$cfg" <<CFG
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend echo
    bind 127.0.0.1:$((port + 2))
    default_backend multiecho
backend multiecho
    server m1 127.0.0.1:$((port + 1)) send-proxy-v2 maxconn 8000
CFG

taskset -c 0 "$multiecho" -q serve --workers 1 --listen "127.0.0.1:$port" \
    --listen "tcp+proxy://127.0.0.1:$((port + 1))" &
server=$!
taskset -c 1 haproxy -db -f "$cfg" &
proxy=$!
trap 'kill $server $proxy 2>/dev/null; wait 2>/dev/null || true' EXIT
wait_for_port "$port"
wait_for_port $((port + 2))

"$multiecho" compare --models epoll --workers 1 --server-cpus 0 --client-cpus 1 --threads 1 \
    --duration "$duration" --warmup 1 --repeat "$repeat" --conns 50,1000 --size 512 \
    --external "direct=127.0.0.1:$port@$server" \
    --external "via-haproxy=127.0.0.1:$((port + 2))@$proxy" \
    --out "$out/haproxy-cost"
python3 "$root/scripts/paired_ratios.py" "$out/haproxy-cost/report.json" direct
