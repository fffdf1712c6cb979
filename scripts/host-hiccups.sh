#!/usr/bin/env bash
# How much the host takes this machine's CPUs away: scripts/hiccup_probe.c spinning and then
# sleeping 100 us at a time on each CPU in turn (nothing else should run meanwhile). A gap of
# a few ms in a spinning loop is time the hypervisor gave to another guest; in an open-loop run
# at 70% load every such gap leaves a queue that takes about three times as long to drain.
#
# usage: [SECS=5] scripts/host-hiccups.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/target/benchmarks
mkdir -p "$out"
cc -O2 -o "$out/hiccup_probe" "$root/scripts/hiccup_probe.c"
secs=${SECS:-5}
echo "$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
for cpu in $(seq 0 $(($(nproc) - 1))); do
    for mode in spin sleep; do
        echo "CPU $cpu $(taskset -c "$cpu" "$out/hiccup_probe" "$mode" "$secs")"
    done
done
