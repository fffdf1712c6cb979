# Sourced by the interleaved cost scripts (admission-cost.sh, haproxy-cost.sh,
# metrics-cost.sh, udp-bench.sh): the repository root, wait_for_port, REPEAT / DURATION / OUT /
# PORT with their defaults (the caller sets default_port first), the output folder, and a fresh
# release build in $multiecho.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/wait_for_port.sh
source "$root/scripts/wait_for_port.sh"
repeat=${REPEAT:-5}
duration=${DURATION:-3}
out=${OUT:-$root/target/benchmarks}
port=${PORT:-$default_port}
mkdir -p "$out"
(cd "$root" && cargo build --release --quiet)
multiecho="$root/target/release/multiecho"
