#!/usr/bin/env bash
# What TLS costs: every multiecho model over tls:// (compare --tls only) against the two
# baselines the issue names, in one interleaved compare run: a minimal tokio-rustls echo
# server written the way its users write it (examples/tls_echo_server.rs) and Debian's
# `ncat --ssl --keep-open --exec /bin/cat`. All present one certificate made here by
# `openssl req` (the usual CA:TRUE one: bench trusts it as a pinned certificate). Servers
# are pinned to CPU 0, the load generator to CPU 1. 512 B and 16 KiB, 50 and 1000
# connections; CHURN=1 sweeps full handshakes (a new connection per round trip) instead.
# Models that do not serve TLS yet are listed as skipped with their reason.
#
# usage: [REPEAT=5] [DURATION=3] [MODELS=epoll,async,...] [CONNS=50,1000] [SIZES=512,16384]
#        [CHURN=1] [OUT=target/benchmarks] scripts/tls-bench.sh
set -euo pipefail

default_port=5399
# shellcheck source=scripts/bench_setup.sh
source "$(dirname "$0")/bench_setup.sh"
command -v ncat >/dev/null || { echo "ncat is not installed" >&2; exit 1; }
command -v openssl >/dev/null || { echo "openssl is not installed" >&2; exit 1; }
(cd "$root" && cargo build --release --quiet --example tls_echo_server)
baseline="$root/target/release/examples/tls_echo_server"

models=${MODELS:-iterative,process,prefork,thread,pool,epoll,async,uring}
conns=${CONNS:-50,1000}
sizes=${SIZES:-512,16384}
churn=()
name=tls-bench
if [ "${CHURN:-0}" = 1 ]; then
    churn=(--churn)
    name=tls-handshakes
fi

cert="$out/tls-bench-cert.pem"
key="$out/tls-bench-key.pem"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$key" -out "$cert" 2>/dev/null

taskset -c 0 "$baseline" "127.0.0.1:$port" "$cert" "$key" >/dev/null 2>&1 &
tokio_rustls=$!
# ncat's default --max-conns is 100: raised so the 1000-connection points can run.
taskset -c 0 ncat --ssl --ssl-cert "$cert" --ssl-key "$key" --max-conns 2000 \
    -l --keep-open --exec /bin/cat 127.0.0.1 $((port + 1)) >/dev/null 2>&1 &
ncat=$!
trap 'kill $tokio_rustls $ncat 2>/dev/null; wait 2>/dev/null || true' EXIT
wait_for_port "$port"
wait_for_port $((port + 1))

# ncat forks a /bin/cat per connection: its CPU and memory are its children's too, which
# compare counts (descendants included).
"$multiecho" compare --tls only --tls-cert "$cert" --tls-key "$key" --models "$models" \
    --server-cpus 0 --client-cpus 1 --threads 1 --duration "$duration" --warmup 1 \
    --repeat "$repeat" --conns "$conns" --size "$sizes" "${churn[@]}" \
    --external "tokio-rustls=tls://127.0.0.1:$port@$tokio_rustls" \
    --external "ncat-ssl=tls://127.0.0.1:$((port + 1))@$ncat" \
    --out "$out/$name"
python3 "$root/scripts/paired_ratios.py" "$out/$name/report.json" tokio-rustls
