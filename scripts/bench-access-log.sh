#!/usr/bin/env bash
# The access log's cost: the same fulcrum (one worker thread pinned to core 0, round robin over
# three origins) with and without `access_log = { path = FILE, format = "json" }`, in
# interleaved rounds (off, on, off, on, ...; the order flips every round). Figures per run:
#   - requests/s over keep-alive: wrk, 1 thread, 64 connections, on core 1;
#   - fulcrum's CPU per request (utime+stime of its process tree from /proc, the figure that
#     repeats; see shared/BENCHMARKING.md), the writer thread included;
#   - the CPU other processes took meanwhile ("other%", of both cores; above 10 % is flagged).
# Prints each run, then the medians and the ratio on/off (goal: CPU per request <= 1.10x), the
# access log lines written against the requests wrk counted, and
# fulcrum_access_log_dropped_total.
#
# Usage: scripts/bench-access-log.sh [--rounds 3] [--duration 5] [--bin PATH] [--port-base 17600]
#   --bin PATH  a fulcrum binary instead of `cargo build --release`
# Needs: nginx (the origins), wrk, taskset (Debian: apt-get install -y nginx wrk). Takes about
# rounds x 2 x (duration + 3) seconds. Every process it starts is stopped by PID on exit.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/bench-tls.sh
source "$HERE/bench-tls.sh" --lib

rounds=3 duration=5 bin="" base=17600
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --port-base) base=$2; shift 2 ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
  esac
done
for tool in nginx wrk taskset; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install -y nginx wrk)" >&2; exit 1; }
done
if [ -z "$bin" ]; then
  (cd "$HERE/.." && cargo build --release --quiet --bin fulcrum)
  bin="${CARGO_TARGET_DIR:-$HERE/../target}/release/fulcrum"
fi

TLS_DIR=$(mktemp -d /tmp/fulcrum-bench-log.XXXXXX)
trap tls_cleanup EXIT INT TERM
TLS_DURATION=$duration
origins=($((base + 1)) $((base + 2)) $((base + 3)))
tls_start_origins "$TLS_DIR" "${origins[@]}"
origins_pid=${TLS_PIDS[-1]}

# start MODE PORT ADMIN_PORT: fulcrum with (MODE on) or without (off) a JSON access log.
start() {
  local mode=$1 port=$2 admin=$3 backends="" o log=""
  for o in "${origins[@]}"; do backends+="{ address = \"127.0.0.1:$o\" }, "; done
  [ "$mode" = on ] && log="access_log = { path = \"$TLS_DIR/access-$port.log\", format = \"json\" }"
  cat > "$TLS_DIR/fulcrum-$mode.toml" <<EOF
shutdown_grace = "1s"
[[listeners]]
name = "bench"
bind = "127.0.0.1:$port"
$log
[admin]
bind = "127.0.0.1:$admin"
[pools.origins]
strategy = "round_robin"
backends = [ $backends]
[pools.origins.health]
interval = "30s"
EOF
  RUST_LOG=warn taskset -c 0 "$bin" run --threads 1 -c "$TLS_DIR/fulcrum-$mode.toml" \
    2>"$TLS_DIR/fulcrum-$mode.err" &
  TLS_PIDS+=($!)
  tls_wait_port "$port"
}

start off $((base + 11)) $((base + 21)); pid_off=${TLS_PIDS[-1]}
start on $((base + 12)) $((base + 22)); pid_on=${TLS_PIDS[-1]}
declare -A cpu rate other
requests_on=0
printf '%-5s %-4s %10s %12s %7s\n' round log 'req/s' 'CPU us/req' 'other%'
for r in $(seq "$rounds"); do
  order="off on"; [ $((r % 2)) = 0 ] && order="on off"
  for mode in $order; do
    if [ "$mode" = on ]; then port=$((base + 12)) pid=$pid_on; else port=$((base + 11)) pid=$pid_off; fi
    tls_measure "http://127.0.0.1:$port/" "$pid" "$origins_pid" h1
    flag=""; [ "$TLS_FOREIGN" -gt 10 ] && flag=" (busy machine)"
    printf '%-5s %-4s %10s %12s %7s%s\n' "$r" "$mode" "$TLS_RATE" "$TLS_CPU_US" "$TLS_FOREIGN" "$flag"
    cpu[$mode]+="$TLS_CPU_US "; rate[$mode]+="$TLS_RATE "; other[$mode]+="$TLS_FOREIGN "
    [ "$mode" = on ] && requests_on=$((requests_on + TLS_RATE * duration))
  done
done
# shellcheck disable=SC2086
{
  cpu_off=$(tls_median ${cpu[off]}) cpu_on=$(tls_median ${cpu[on]})
  rate_off=$(tls_median ${rate[off]}) rate_on=$(tls_median ${rate[on]})
  other_all=$(tls_median ${other[off]} ${other[on]})
}
ratio=$(tls_ratio "$cpu_on" "$cpu_off")
goal=$(awk -v r="$ratio" 'BEGIN { print (r != "-" && r <= 1.10) ? "met" : "NOT met" }')
echo
echo "| figure (median of $rounds) | log off | JSON log to a file | on / off |"
echo "|---|---:|---:|---:|"
echo "| keep-alive req/s | $rate_off | $rate_on | $(tls_ratio "$rate_on" "$rate_off") |"
echo "| CPU per request, us | $cpu_off | $cpu_on | $ratio (goal <= 1.10: $goal) |"
echo
sleep 0.2 # the writer flushes within 10 ms of going idle
lines=$(wc -l < "$TLS_DIR/access-$((base + 12)).log")
dropped=$(curl -fsS "http://127.0.0.1:$((base + 22))/metrics" 2>/dev/null |
  awk '$1 == "fulcrum_access_log_dropped_total" { print $2 }')
echo "access log: $lines lines for ~$requests_on requests wrk counted (plus its warm-up);" \
  "fulcrum_access_log_dropped_total ${dropped:-?}"
echo "other%: median $other_all % of both cores taken by other processes during the runs"
