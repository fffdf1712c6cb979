#!/usr/bin/env bash
# UDP echo: datagrams per second, server CPU per datagram and p99 latency for every UDP model
# against the plain C loop ../shared/bench/udp_echo.c, at 64 B and 1,472 B, 1 and 16 flows
# (4 in flight each). Each server runs alone, pinned to CPU 0 (one worker), the bench on CPU 1.
# usage: scripts/udp-bench.sh [SECONDS]   (prints a Markdown table)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
cargo build --release --quiet
bin=target/release/multiecho
cc -O2 -o /tmp/udp_echo ../shared/bench/udp_echo.c

# Server CPU ticks of PID and its children (prefork's workers).
ticks() {
    local total=0 pid
    for pid in "$1" $(pgrep -P "$1" || true); do
        read -r -a f < "/proc/$pid/stat"
        total=$((total + f[13] + f[14]))
    done
    echo "$total"
}
wait_for_udp_port() {
    for _ in $(seq 1 300); do
        if ss -Huln "sport = :$1" | grep -q .; then return 0; fi
        sleep 0.01
    done
    echo "nothing listens on udp port $1" >&2
    return 1
}

hz=$(getconf CLK_TCK)
port=5600
echo "| server | size | flows | datagrams/s | server CPU µs/datagram | p99 µs | lost |"
echo "|---|---|---|---|---|---|---|"
for server in udp_echo.c iterative prefork pool epoll async; do
    for size in 64 1472; do
        for flows in 1 16; do
            port=$((port + 1))
            if [ "$server" = udp_echo.c ]; then
                taskset -c 0 /tmp/udp_echo "$port" & pid=$!
            else
                taskset -c 0 "$bin" -q serve --model "$server" --workers 1 --udp-rate 0 \
                    --listen "udp://127.0.0.1:$port" & pid=$!
            fi
            wait_for_udp_port "$port"
            before=$(ticks "$pid")
            json=$(taskset -c 1 "$bin" bench "udp://127.0.0.1:$port" --conns "$flows" \
                --pipeline 4 --size "$size" --duration "${secs}s" --threads 1 --json)
            after=$(ticks "$pid")
            kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
            python3 - "$server" "$size" "$flows" "$before" "$after" "$hz" "$json" <<'PY'
import json, sys
server, size, flows, before, after, hz, raw = sys.argv[1:]
r = json.loads(raw)
cpu = (int(after) - int(before)) / int(hz)
per = cpu / max(r["requests"], 1) * 1e6
print(f"| {server} | {size} | {flows} | {r['requests_per_sec']:.0f} | {per:.2f} | "
      f"{r['latency_us']['p99']:.0f} | {r['lost']} |")
PY
        done
    done
done
