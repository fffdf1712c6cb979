#!/usr/bin/env bash
# UDP echo: datagrams per second, server CPU per datagram and p99 latency for every UDP model
# against the plain C loop ../shared/bench/udp_echo.c (and, to show what batching alone buys,
# the C recvmmsg/sendmmsg loop udp_mmsg_echo.c), at 64 B and 1,472 B, 1 and 16 flows, 4 in
# flight per flow. One interleaved run: every server runs for the whole run, all pinned to
# CPU 0 (one worker each, --udp-rate 0), the bench on CPU 1; for each point, each of REPEAT
# rounds gives every server one run in turn, so the machine's drift hits them alike. The
# ratios are medians of paired rounds: a server's figure ÷ udp_echo.c's of the same round.
#
# usage: [REPEAT=5] [DURATION=3] [OUT=target/benchmarks] scripts/udp-bench.sh
# Prints the per-server medians and the paired ratios as Markdown; the raw runs are in
# $OUT/udp-bench/runs.tsv.
set -euo pipefail

default_port=5600
# shellcheck source=scripts/bench_setup.sh
source "$(dirname "$0")/bench_setup.sh"
cc -O2 -o /tmp/udp_echo "$root/../shared/bench/udp_echo.c"
cc -O2 -o /tmp/udp_mmsg_echo "$root/../shared/bench/udp_mmsg_echo.c"
mkdir -p "$out/udp-bench"
runs="$out/udp-bench/runs.tsv"

# shellcheck source=scripts/udp_bench_common.sh
source "$(dirname "$0")/udp_bench_common.sh"

servers=(udp_echo.c udp_mmsg_echo.c iterative prefork pool epoll async uring)
declare -A pids ports
next=$port
for server in "${servers[@]}"; do
    ports[$server]=$next
    case $server in
        udp_echo.c) taskset -c 0 /tmp/udp_echo "$next" & ;;
        udp_mmsg_echo.c) taskset -c 0 /tmp/udp_mmsg_echo "$next" & ;;
        *) taskset -c 0 "$multiecho" -q serve --model "$server" --workers 1 --udp-rate 0 \
               --listen "udp://127.0.0.1:$next" & ;;
    esac
    pids[$server]=$!
    next=$((next + 1))
done
trap 'kill ${pids[*]} 2>/dev/null; wait 2>/dev/null || true' EXIT
for server in "${servers[@]}"; do wait_for_udp_port "${ports[$server]}"; done

hz=$(getconf CLK_TCK)
echo "# uptime at the start: $(uptime)" >&2
printf 'server\tsize\tflows\tround\tdatagrams_per_sec\tcpu_us_per_datagram\tp99_us\tlost\tduplicates\treordered\n' > "$runs"
for size in 64 1472; do
    for flows in 1 16; do
        for round in $(seq 1 "$repeat"); do
            for server in "${servers[@]}"; do
                pid=${pids[$server]}
                before=$(ticks "$pid")
                json=$(taskset -c 1 "$multiecho" bench "udp://127.0.0.1:${ports[$server]}" \
                    --conns "$flows" --pipeline 4 --size "$size" --duration "${duration}s" \
                    --threads 1 --json)
                after=$(ticks "$pid")
                python3 - "$server" "$size" "$flows" "$round" "$before" "$after" "$hz" \
                    "$json" >> "$runs" <<'PY'
import json, sys
server, size, flows, rnd, before, after, hz, raw = sys.argv[1:]
r = json.loads(raw)
cpu = (int(after) - int(before)) / int(hz)
per = cpu / max(r["requests"], 1) * 1e6
print(f"{server}\t{size}\t{flows}\t{rnd}\t{r['requests_per_sec']:.0f}\t{per:.3f}\t"
      f"{r['latency_us']['p99']:.0f}\t{r['lost']}\t{r['duplicates']}\t{r['reordered']}")
PY
            done
        done
    done
done
echo "# uptime at the end: $(uptime)" >&2

python3 - "$runs" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
servers = list(dict.fromkeys(r["server"] for r in rows))
points = list(dict.fromkeys((int(r["size"]), int(r["flows"])) for r in rows))
by = {(r["server"], int(r["size"]), int(r["flows"]), int(r["round"])): r for r in rows}
rounds = sorted({int(r["round"]) for r in rows})
med = statistics.median

print("| server | size | flows | datagrams/s | server CPU µs/datagram | p99 µs | lost | dupes | reordered |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in servers:
    for size, flows in points:
        mine = [by[(s, size, flows, k)] for k in rounds]
        f = lambda key: med(float(r[key]) for r in mine)
        total = lambda key: sum(int(r[key]) for r in mine)
        print(f"| {s} | {size} | {flows} | {f('datagrams_per_sec'):.0f} | "
              f"{f('cpu_us_per_datagram'):.2f} | {f('p99_us'):.0f} | {total('lost')} | "
              f"{total('duplicates')} | {total('reordered')} |")

def paired(s, size, flows, ratio):
    values = [ratio(by[(s, size, flows, k)], by[("udp_echo.c", size, flows, k)]) for k in rounds]
    return f"{med(values):.2f} ({min(values):.2f}–{max(values):.2f})"

heads = " | ".join(f"{size} B, {flows} flow{'s' if flows > 1 else ''}" for size, flows in points)
for title, ratio in [
    ("datagrams per server CPU-second",
     lambda a, b: float(b["cpu_us_per_datagram"]) / float(a["cpu_us_per_datagram"])),
    ("datagrams per second", lambda a, b: float(a["datagrams_per_sec"]) / float(b["datagrams_per_sec"])),
]:
    print(f"\n{title}, ÷ udp_echo.c in the same round: median (range) over {len(rounds)} rounds\n")
    print(f"| server | {heads} |")
    print("|---|" + "---:|" * len(points))
    for s in servers[1:]:
        print(f"| {s} | " + " | ".join(paired(s, size, flows, ratio) for size, flows in points) + " |")
PY
