#!/usr/bin/env bash
# The capacity drill: how many idle keep-alive connections one fulcrum holds on this machine,
# what each costs, and what a steady request rate sees meanwhile.
#
#   bash scripts/capacity.sh [--conns 200000] [--rate 2000] [--duration 10] [--bin PATH]
#
# A plain `fulcrum run` (one worker per core, as a user runs it) fronts one web node. A python3
# asyncio client (the one scripts/bench.sh uses for its idle-memory figure) opens --conns
# keep-alive connections from 127.0.0.1-8 (so ephemeral ports do not run out), sends one GET on
# each, reads the answer and then holds them idle. While they are held, `fulcrum load` sends
# --rate requests/s for --duration seconds through the same listener. It prints the RSS per
# idle connection, the latency p50/p99 of the steady traffic while the connections are held,
# and the arithmetic for the seed's 10 million concurrent connections.
#
# Raises the open-file limit (run as root), binds loopback ports 17901-17902 only, stops every
# process it started by PID on exit, and bounds every wait.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/bench.sh
source "$HERE/bench.sh" --lib

CONNS=200000 RATE=2000 DURATION=10 BIN=""
while [ $# -gt 0 ]; do
  case $1 in
    --conns) CONNS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "$BIN" ]; then
  (cd "$HERE/.." && cargo build --release --quiet)
  BIN="$HERE/../target/release/fulcrum"
fi
# Each side needs one file per connection plus a few hundred. Raising the hard limit needs
# CAP_SYS_RESOURCE; where it is missing (a container), the drill holds what the limit allows
# and says so.
want=$((CONNS + 1024))
ulimit -Hn "$want" 2>/dev/null || true
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  echo "note: this machine allows $hard open files per process (ulimit -Hn) and cannot raise" \
    "it; holding $((hard - 1024)) connections instead of $CONNS"
  CONNS=$((hard - 1024))
fi
ulimit -n $((CONNS + 1024))

DIR=$(mktemp -d /tmp/fulcrum-capacity.XXXXXX)
PIDS=()
cleanup() {
  touch "$DIR/release" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT
PORT=17901 ORIGIN=17902

"$BIN" webnode --listen "127.0.0.1:$ORIGIN" --id origin >/dev/null 2>&1 &
PIDS+=($!)
cat > "$DIR/fulcrum.toml" <<TOML
shutdown_grace = "1s"
[[listeners]]
name = "capacity"
bind = "127.0.0.1:$PORT"
max_connections = $((CONNS + 1000))
idle_timeout = "3600s"
header_read_timeout = "3600s"
[pools.web]
strategy = "round_robin"
backends = [ { address = "127.0.0.1:$ORIGIN" } ]
TOML
RUST_LOG=warn "$BIN" run -c "$DIR/fulcrum.toml" 2>"$DIR/fulcrum.log" &
FPID=$!
PIDS+=("$FPID")
for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$FPID/status"; }
workers=$(grep -l fulcrum-worker /proc/"$FPID"/task/*/comm 2>/dev/null | wc -l)
sleep 0.5
before=$(rss)

bench_write_idle_client "$DIR/idle_client.py"
python3 "$DIR/idle_client.py" "$PORT" "$CONNS" "$DIR/ready" "$DIR/release" 900 &
PIDS+=($!)
for _ in $(seq 6000); do [ -e "$DIR/ready" ] && break; sleep 0.1; done
[ -e "$DIR/ready" ] || { echo "the idle client did not finish opening in 600 s" >&2; exit 1; }
read -r opened failed took first < "$DIR/ready"
sleep 2
held=$(rss)
established=$(ss -Htn state established "( sport = :$PORT )" | wc -l)

timeout $((DURATION + 30)) "$BIN" load --url "http://127.0.0.1:$PORT/" --users 64 \
  --rate "$RATE" --duration "${DURATION}s" --json > "$DIR/load.json"
after=$(rss)

python3 - "$DIR/load.json" "$before" "$held" "$after" "$opened" "$failed" "$took" \
  "$established" "$RATE" "$DURATION" "$((workers + 1))" <<'PY'
import json, math, sys
report = json.load(open(sys.argv[1]))
before, held, after, opened, failed = (int(x) for x in sys.argv[2:7])
took, established, rate, duration, workers = sys.argv[7], int(sys.argv[8]), sys.argv[9], sys.argv[10], sys.argv[11]
lat = report["latency_ms"]
per_conn = (held - before) / max(opened, 1)
print(f"fulcrum run ({workers} workers), one web node behind it")
print(f"idle keep-alive connections: {opened} opened in {took} s ({failed} failed), "
      f"{established} established at the balancer")
print(f"RSS: {before} KiB before, {held} KiB holding them, {after} KiB after the steady traffic")
print(f"RSS per idle connection: {per_conn:.2f} KiB")
print(f"steady traffic while held: {rate} req/s for {duration} s: "
      f"{report['requests']} requests, {report.get('errors', {})}, "
      f"p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, p99.9 {lat['p999']:.3f} ms")
target = 10_000_000
total_gib = per_conn * target / 1024 / 1024
print()
print("sizing for the seed's 10,000,000 concurrent connections (idle keep-alive, HTTP/1.1):")
print(f"  memory for the connections alone: {per_conn:.2f} KiB x 10 M = {total_gib:.1f} GiB")
for per_instance in (250_000, 500_000, 1_000_000):
    n = math.ceil(target / per_instance)
    gib = per_conn * per_instance / 1024 / 1024
    print(f"  {per_instance:>9,} connections per balancer: {gib:6.1f} GiB each, {n} balancers "
          f"({n + 1} for one spare)")
PY
