#!/usr/bin/env bash
# Is `multiecho bench` as fast a client as a hand-written C epoll client?
#
# Builds the C reference server (/work/shared/bench/epoll_echo.c) and the C client
# (scripts/c_epoll_client.c), pins the server to one CPU and each client in turn to the
# other, drives the same load (pipeline 1, fixed size) for a few seconds, and prints both
# rates and their ratio. `multiecho bench` runs with --threads 1 and verifies every byte;
# the C client only checks lengths.
#
# usage: [ROUNDS=3] [SERVER_CPU=0] [CLIENT_CPU=1] scripts/bench-vs-c-client.sh [CONNS] [SIZE] [SECS] [PORT]
set -euo pipefail

conns=${1:-50}
size=${2:-512}
secs=${3:-5}
port=${4:-5077}
rounds=${ROUNDS:-3}
server_cpu=${SERVER_CPU:-0}
client_cpu=${CLIENT_CPU:-1}

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/wait_for_port.sh
source "$root/scripts/wait_for_port.sh"
out="$root/target/bench-c"
mkdir -p "$out"
# The reference server lives next to the main checkout, also when this runs in a worktree.
main_checkout=$(cd "$(git -C "$root" rev-parse --path-format=absolute --git-common-dir)/.." && pwd)
cc -O2 -o "$out/epoll_echo" "${EPOLL_ECHO_C:-$main_checkout/../shared/bench/epoll_echo.c}"
cc -O2 -o "$out/c_epoll_client" "$root/scripts/c_epoll_client.c"
(cd "$root" && cargo build --release --quiet)
multiecho="$root/target/release/multiecho"

taskset -c "$server_cpu" "$out/epoll_echo" "$port" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
wait_for_port "$port"

echo "load: $conns connections, $size B messages, pipeline 1, ${secs}s x $rounds rounds;" \
     "server on CPU $server_cpu, clients on CPU $client_cpu"
# The machine may be shared, so alternate the clients, keep each one's best round, and also
# report CPU time per round trip (user + sys of the client process), which contention
# disturbs less than the rate.
TIMEFORMAT='%U %S'
best_c=0 best_rust=0 c_cpu_us="" rust_cpu_us=""
for round in $(seq 1 "$rounds"); do
    { time taskset -c "$client_cpu" "$out/c_epoll_client" "$port" "$conns" "$size" "$secs" \
        >"$out/c.out"; } 2>"$out/c.time"
    c_rate=$(sed -n 's/.*per_sec=\([0-9]*\).*/\1/p' "$out/c.out")
    c_trips=$(sed -n 's/.*round_trips=\([0-9]*\).*/\1/p' "$out/c.out")
    c_us=$(awk -v n="$c_trips" '{printf "%.2f", ($1 + $2) * 1e6 / n}' "$out/c.time")

    { time taskset -c "$client_cpu" "$multiecho" bench "127.0.0.1:$port" --threads 1 \
        --conns "$conns" --size "$size" --duration "$secs" --json >"$out/rust.json"; } \
        2>"$out/rust.time"
    read -r rust_rate rust_trips failures < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(round(r["requests_per_sec"]), r["requests"], r["mismatches"] + r["errors"])' "$out/rust.json")
    rust_us=$(awk -v n="$rust_trips" '{printf "%.2f", ($1 + $2) * 1e6 / n}' "$out/rust.time")
    echo "round $round: C $c_rate/s (${c_us} us CPU/trip)   multiecho $rust_rate/s" \
         "(${rust_us} us CPU/trip, $failures failures)"
    if [ "$c_rate" -gt "$best_c" ]; then best_c=$c_rate; c_cpu_us=$c_us; fi
    if [ "$rust_rate" -gt "$best_rust" ]; then best_rust=$rust_rate; rust_cpu_us=$rust_us; fi
done
echo "best C epoll client:              $best_c round trips/s, $c_cpu_us us CPU per round trip"
echo "best multiecho bench --threads 1: $best_rust round trips/s, $rust_cpu_us us CPU per round trip"
python3 -c "print(f'ratio multiecho/C: {$best_rust / $best_c:.3f} (rate), {$c_cpu_us / $rust_cpu_us:.3f} (C CPU / multiecho CPU per round trip)')"
