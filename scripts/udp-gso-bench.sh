#!/usr/bin/env bash
# UDP segment trains: what UDP GSO on the client and GRO on the server buy. The bench sends
# each flow's datagrams one by one (--udp-gso 1) or as trains of 8 (and 16, with MODES) with
# one UDP_SEGMENT sendmsg per train, against the plain C loop ../shared/bench/udp_echo.c, the
# C recvmmsg/sendmmsg loop udp_mmsg_echo.c and the multiecho UDP models, epoll twice: as
# everyone else (one message per datagram) and with --udp-gro on (a train arrives as one
# message and goes back as one UDP_SEGMENT send). 64 B and 1,472 B, 1 and 16 flows, PIPELINE
# (16) datagrams in flight per flow. One interleaved run: every server runs for the whole run,
# all pinned to CPU 0 (one worker each, --udp-rate 0), the bench (one thread) on CPU 1; for
# each point, each of REPEAT rounds gives every server one run per sender mode, so drift hits
# them alike. Ratios are medians of paired rounds: a figure ÷ udp_echo.c's with the same
# sender in the same round, and a server's trains ÷ its own single sends in the same round.
#
# usage: [REPEAT=5] [DURATION=3] [MODES="1 8"] [PIPELINE=16] [OUT=target/benchmarks] \
#        scripts/udp-gso-bench.sh
# Prints the per-server medians and the paired ratios as Markdown; the raw runs are in
# $OUT/udp-gso-bench/runs.tsv.
set -euo pipefail

default_port=5700
# shellcheck source=scripts/bench_setup.sh
source "$(dirname "$0")/bench_setup.sh"
modes=${MODES:-1 8}
pipeline=${PIPELINE:-16}
cc -O2 -o /tmp/udp_echo "$root/../shared/bench/udp_echo.c"
cc -O2 -o /tmp/udp_mmsg_echo "$root/../shared/bench/udp_mmsg_echo.c"
mkdir -p "$out/udp-gso-bench"
runs="$out/udp-gso-bench/runs.tsv"

# shellcheck source=scripts/udp_bench_common.sh
source "$(dirname "$0")/udp_bench_common.sh"

servers=(udp_echo.c udp_mmsg_echo.c iterative prefork pool epoll epoll+gro async uring)
declare -A pids ports
next=$port
for server in "${servers[@]}"; do
    ports[$server]=$next
    case $server in
        udp_echo.c) taskset -c 0 /tmp/udp_echo "$next" & ;;
        udp_mmsg_echo.c) taskset -c 0 /tmp/udp_mmsg_echo "$next" & ;;
        epoll+gro) taskset -c 0 "$multiecho" -q serve --model epoll --workers 1 --udp-rate 0 \
               --udp-gro on --listen "udp://127.0.0.1:$next" & ;;
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
printf 'server\tgso\tsize\tflows\tround\tdatagrams_per_sec\tcpu_us_per_datagram\tp99_us\tlost\tduplicates\treordered\n' > "$runs"
for size in 64 1472; do
    for flows in 1 16; do
        for round in $(seq 1 "$repeat"); do
            for gso in $modes; do
                for server in "${servers[@]}"; do
                    pid=${pids[$server]}
                    before=$(ticks "$pid")
                    json=$(taskset -c 1 "$multiecho" bench "udp://127.0.0.1:${ports[$server]}" \
                        --conns "$flows" --pipeline "$pipeline" --udp-gso "$gso" --size "$size" \
                        --duration "${duration}s" --threads 1 --json)
                    after=$(ticks "$pid")
                    python3 - "$server" "$gso" "$size" "$flows" "$round" "$before" "$after" \
                        "$hz" "$json" >> "$runs" <<'PY'
import json, sys
server, gso, size, flows, rnd, before, after, hz, raw = sys.argv[1:]
r = json.loads(raw)
cpu = (int(after) - int(before)) / int(hz)
per = cpu / max(r["requests"], 1) * 1e6
print(f"{server}\t{gso}\t{size}\t{flows}\t{rnd}\t{r['requests_per_sec']:.0f}\t{per:.3f}\t"
      f"{r['latency_us']['p99']:.0f}\t{r['lost']}\t{r['duplicates']}\t{r['reordered']}")
PY
                done
            done
        done
    done
done
echo "# uptime at the end: $(uptime)" >&2

python3 - "$runs" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
servers = list(dict.fromkeys(r["server"] for r in rows))
modes = list(dict.fromkeys(int(r["gso"]) for r in rows))
points = list(dict.fromkeys((int(r["size"]), int(r["flows"])) for r in rows))
by = {(r["server"], int(r["gso"]), int(r["size"]), int(r["flows"]), int(r["round"])): r
      for r in rows}
rounds = sorted({int(r["round"]) for r in rows})
med = statistics.median
name = lambda g: "single sends" if g == 1 else f"trains of {g}"

print("| server | sender | size | flows | datagrams/s | server CPU µs/datagram | p99 µs | lost | dupes | reordered |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in servers:
    for g in modes:
        for size, flows in points:
            mine = [by[(s, g, size, flows, k)] for k in rounds]
            f = lambda key: med(float(r[key]) for r in mine)
            total = lambda key: sum(int(r[key]) for r in mine)
            print(f"| {s} | {name(g)} | {size} | {flows} | {f('datagrams_per_sec'):.0f} | "
                  f"{f('cpu_us_per_datagram'):.2f} | {f('p99_us'):.0f} | {total('lost')} | "
                  f"{total('duplicates')} | {total('reordered')} |")

def paired(a_key, b_key, size, flows, ratio):
    values = [ratio(by[a_key + (size, flows, k)], by[b_key + (size, flows, k)]) for k in rounds]
    return f"{med(values):.2f} ({min(values):.2f}–{max(values):.2f})"

per_cpu = lambda a, b: float(b["cpu_us_per_datagram"]) / float(a["cpu_us_per_datagram"])
per_sec = lambda a, b: float(a["datagrams_per_sec"]) / float(b["datagrams_per_sec"])
heads = " | ".join(f"{size} B, {flows} flow{'s' if flows > 1 else ''}" for size, flows in points)
for title, ratio in [("datagrams per server CPU-second", per_cpu), ("datagrams per second", per_sec)]:
    print(f"\n{title}, ÷ udp_echo.c with the same sender in the same round: median (range) "
          f"over {len(rounds)} rounds\n")
    print(f"| server | sender | {heads} |")
    print("|---|---|" + "---:|" * len(points))
    for s in servers[1:]:
        for g in modes:
            print(f"| {s} | {name(g)} | " + " | ".join(
                paired((s, g), ("udp_echo.c", g), size, flows, ratio) for size, flows in points)
                + " |")
for title, ratio in [("datagrams per server CPU-second", per_cpu), ("datagrams per second", per_sec)]:
    for g in modes[1:]:
        print(f"\n{title} with {name(g)} ÷ the same server with single sends, same round: "
              f"median (range)\n")
        print(f"| server | {heads} |")
        print("|---|" + "---:|" * len(points))
        for s in servers:
            print(f"| {s} | " + " | ".join(
                paired((s, g), (s, 1), size, flows, ratio) for size, flows in points) + " |")
PY
