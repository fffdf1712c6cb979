#!/usr/bin/env bash
# Where a server's CPU time goes under echo load: samples CPU 0 (where the server is pinned)
# with `perf record -e cpu-clock` while `multiecho bench` (pinned to CPU 1) loads it, and
# prints the share of samples in user space, in the kernel's TCP/IP and socket code, in the
# event mechanism (epoll or io_uring) and in the rest of the kernel.
#
# usage: scripts/cpu-profile.sh NAME [CONNS] [SIZE] [SECS]
#   NAME: c-reference, c-uring (scripts/c_uring_echo.c), or a model (epoll, uring, ...)
# Needs perf (Debian's linux-perf); c-reference needs a C compiler, c-uring liburing-dev too.
set -euo pipefail

name=$1
conns=${2:-50}
size=${3:-512}
secs=${4:-3}
port=${PORT:-5098}
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/wait_for_port.sh
source "$root/scripts/wait_for_port.sh"
out=$root/target/cpu-profile
mkdir -p "$out"
(cd "$root" && cargo build --release --quiet)
multiecho=$root/target/release/multiecho

if [ "$name" = c-reference ]; then
    cc -O2 -o "$out/epoll_echo" "${EPOLL_ECHO_C:-$root/../shared/bench/epoll_echo.c}"
    taskset -c 0 "$out/epoll_echo" "$port" &
elif [ "$name" = c-uring ]; then
    cc -O2 -o "$out/c_uring_echo" "$root/scripts/c_uring_echo.c" -luring
    taskset -c 0 "$out/c_uring_echo" "$port" &
else
    taskset -c 0 "$multiecho" -q serve --model "$name" --workers 1 --listen "127.0.0.1:$port" &
fi
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
wait_for_port "$port"

taskset -c 1 "$multiecho" bench "127.0.0.1:$port" --conns "$conns" --size "$size" \
    --warmup 1 --duration $((secs + 2)) --threads 1 --json > "$out/$name.bench.json" &
bench=$!
sleep 1.5
# Also count the system calls made on CPU 0 over the same window.
perf stat -x, -e raw_syscalls:sys_enter -C 0 -o "$out/$name.syscalls.csv" -- sleep "$secs" &
syscall_count=$!
perf record -q -e cpu-clock -C 0 -o "$out/$name.perf.data" -- sleep "$secs" 2>/dev/null
wait "$syscall_count" "$bench"

perf report -q -i "$out/$name.perf.data" --sort dso,sym --stdio 2>/dev/null |
    awk -v name="$name" '
    /%/ {
        pct = $1; sub("%", "", pct); sym = $NF
        if ($0 ~ /\[\.\]/) user += pct
        else if (sym ~ /^(bbr|cubic|tcp|__tcp|ip_|__ip|inet|sk_|__sk|skb|__skb|kfree_skb|alloc_skb|__alloc_skb|net_|__net|netif|__netif|loopback|__dev|dev_|process_backlog|sock_|__sock|security_sock|_copy_to_iter|_copy_from_iter|copy_user|rep_movs|__check_object|check_heap|release_sock|lock_sock|raw_local_deliver|nf_|ipv4_|validate_xmit|sch_|__qdisc|napi|do_softirq|__do_softirq|__local_bh|ktime|bpf_skops|mem_cgroup|__mod_memcg|refill_stock|page_counter)/) net += pct
        else if (sym ~ /(io_uring|^io_|^__io_|^ep_|epoll|^__ep|eventfd|poll_freewait|wake_up|__wake_up|fget|fput|__fdget|__fput)/) events += pct
        else if (sym ~ /(entry_SYSCALL|syscall_|do_syscall|__x64_sys|ksys_|__sys_|x64_sys_call|syscall_exit)/) syscalls += pct
        else if (sym ~ /(idle|cpuidle|default_idle|acpi|mwait|poll_idle|pv_native_safe_halt)/) idle += pct
        else other += pct
    }
    END {
        busy = 100 - idle
        if (busy <= 0) busy = 1
        printf "%s: busy %.1f%% of CPU 0; of that: user space %.1f%%, TCP/IP and sockets %.1f%%, event mechanism %.1f%%, syscall entry %.1f%%, other kernel %.1f%%\n",
            name, busy, 100*user/busy, 100*net/busy, 100*events/busy, 100*syscalls/busy, 100*other/busy
    }'
python3 - "$out/$name.bench.json" "$out/$name.syscalls.csv" "$name" "$secs" <<'EOF'
import json, sys
bench, syscalls, name, secs = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
r = json.load(open(bench))
count = next(float(line.split(",")[0]) for line in open(syscalls)
             if line.strip() and not line.startswith("#"))
rate = r["requests_per_sec"]
print(f"{name}: {rate:,.0f} round trips/s, {r['mismatches']} mismatches, "
      f"{count / (rate * secs):.2f} system calls per round trip on CPU 0")
EOF
