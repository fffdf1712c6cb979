#!/usr/bin/env bash
# Shared by scripts/udp-bench.sh and scripts/udp-gso-bench.sh (sourced, not run): a UDP
# server's CPU ticks, and waiting until a UDP port is bound.

# Server CPU ticks of PID, its threads and its children (prefork's workers).
ticks() {
    local total=0 pid f
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
