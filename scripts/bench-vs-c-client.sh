#!/usr/bin/env bash
# Is `multiecho bench` as fast a client as a hand-written C epoll client?
#
# Builds the C reference server (/work/shared/bench/epoll_echo.c) and the C client
# (scripts/c_epoll_client.c), pins the server to one CPU and each client in turn to the
# other, drives the same load (pipeline 1, fixed size) for a few seconds, and prints both
# rates and their ratio. `multiecho bench` runs with --threads 1 and verifies every byte;
# the C client only checks lengths.
#
# usage: scripts/bench-vs-c-client.sh [CONNS] [SIZE] [SECS] [PORT]
set -euo pipefail

conns=${1:-50}
size=${2:-512}
secs=${3:-5}
port=${4:-5077}
server_cpu=${SERVER_CPU:-0}
client_cpu=${CLIENT_CPU:-1}

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/bench-c"
mkdir -p "$out"
cc -O2 -o "$out/epoll_echo" "${EPOLL_ECHO_C:-/work/shared/bench/epoll_echo.c}"
cc -O2 -o "$out/c_epoll_client" "$root/scripts/c_epoll_client.c"
(cd "$root" && cargo build --release --quiet)
multiecho="$root/target/release/multiecho"

taskset -c "$server_cpu" "$out/epoll_echo" "$port" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
# Wait until the server accepts connections (no sleeping for readiness).
for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.01
done

echo "load: $conns connections, $size B messages, pipeline 1, ${secs}s; server on CPU $server_cpu, client on CPU $client_cpu"
c_line=$(taskset -c "$client_cpu" "$out/c_epoll_client" "$port" "$conns" "$size" "$secs")
c_rate=${c_line##*per_sec=}
echo "C epoll client:            $c_rate round trips/s"

json=$(taskset -c "$client_cpu" "$multiecho" bench "127.0.0.1:$port" --threads 1 \
    --conns "$conns" --size "$size" --duration "$secs" --json)
rust_rate=$(printf '%s' "$json" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["requests_per_sec"]))')
mismatches=$(printf '%s' "$json" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["mismatches"] + r["errors"])')
echo "multiecho bench --threads 1: $rust_rate round trips/s (failures: $mismatches)"
python3 -c "print(f'ratio multiecho/C: {$rust_rate / $c_rate:.3f}')"
