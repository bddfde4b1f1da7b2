#!/usr/bin/env bash
# Failover drill: 3 web nodes behind fulcrum, steady load, SIGKILL one node mid-run, restart it
# later, and print a timeline (kill, marked down, errors, restart, marked up, traffic again) plus
# an SVG chart of responses per node per second.
#
# Usage: scripts/failover.sh [--interval 500ms] [--rate 200] [--duration 30] [--kill-at 8]
#                            [--restart-at 18] [--out target/failover]
# Ports: FAILOVER_BASE_PORT (default 18000): nodes +1..+3, balancer +80, admin +90.
set -euo pipefail
cd "$(dirname "$0")/.."

interval=500ms rate=200 duration=30 kill_at=8 restart_at=18 out=target/failover
while [ $# -gt 0 ]; do
  case "$1" in
    --interval) interval=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --kill-at) kill_at=$2; shift 2 ;;
    --restart-at) restart_at=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
base=${FAILOVER_BASE_PORT:-18000}
mkdir -p "$out"
out=$(cd "$out" && pwd)

cargo build --release --quiet
bin=./target/release/fulcrum

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

now_ms() { date +%s%3N; }

cat > "$out/failover.toml" <<TOML
shutdown_grace = "2s"
[[listeners]]
name = "http"
bind = "127.0.0.1:$((base + 80))"
[admin]
bind = "127.0.0.1:$((base + 90))"
[pools.web]
strategy = "round_robin"
backends = [
  { address = "127.0.0.1:$((base + 1))", name = "web-1" },
  { address = "127.0.0.1:$((base + 2))", name = "web-2" },
  { address = "127.0.0.1:$((base + 3))", name = "web-3" },
]
[pools.web.health]
path = "/healthz"
interval = "$interval"
fall = 3
rise = 3
TOML
"$bin" check -c "$out/failover.toml" >/dev/null

start_node() { # $1 = index
  "$bin" webnode --listen "127.0.0.1:$((base + $1))" --id "web-$1" >>"$out/web-$1.log" 2>&1 &
  node_pid[$1]=$!
  pids+=("$!")
}
declare -a node_pid
for i in 1 2 3; do start_node "$i"; done
"$bin" run -c "$out/failover.toml" --log-format json >"$out/fulcrum.log" 2>&1 &
pids+=("$!")

url="http://127.0.0.1:$((base + 80))/"
for _ in $(seq 100); do curl -fs -o /dev/null "$url" && break; sleep 0.1; done
curl -fs -o /dev/null "$url" || { echo "fulcrum did not come up; see $out/fulcrum.log" >&2; exit 1; }

"$bin" load --url "$url" --rate "$rate" --duration "${duration}s" --users 20 --json \
  --svg "$out/failover.svg" --title "failover drill: web-3 killed at ${kill_at}s, restarted at ${restart_at}s" \
  >"$out/load.json" 2>"$out/load.log" &
load_pid=$!
pids+=("$load_pid")
load_started=$(now_ms)

sleep "$kill_at"
kill -KILL "${node_pid[3]}"
killed=$(now_ms)
wait "${node_pid[3]}" 2>/dev/null || true # reap it quietly
sleep "$((restart_at - kill_at))"
start_node 3
restarted=$(now_ms)
wait "$load_pid"

python3 - "$out" "$killed" "$restarted" "$interval" "$rate" "$duration" <<'PY'
import json, sys, datetime, re
out, killed, restarted, interval, rate, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
report = json.load(open(f"{out}/load.json"))
t0 = report["started_unix_ms"]

def ms(ts):
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000

events = []
for line in open(f"{out}/fulcrum.log"):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    fields = entry.get("fields", {})
    if fields.get("backend") == "web-3" and fields.get("to") in ("up", "down"):
        events.append((ms(entry["timestamp"]), fields["to"], fields.get("reason", "")))

def at(t):
    return f"t={(t - t0) / 1000:7.2f}s"

unit = {"ms": 1, "s": 1000}
m = re.fullmatch(r"(\d+)(ms|s)", interval)
interval_ms = int(m.group(1)) * unit[m.group(2)] if m else None
down = next((e for e in events if e[1] == "down" and e[0] >= killed), None)
up = next((e for e in events if e[1] == "up" and e[0] >= restarted), None)
back = next((s for s in report["timeline"] if t0 + s["second"] * 1000 >= restarted and s["nodes"].get("web-3", 0) > 0), None)

print(f"failover drill: 3 web nodes, round robin, checks every {interval} (fall 3, rise 3), "
      f"{rate} req/s for {duration}s from 20 virtual users")
print(f"  {at(t0)}  load starts")
print(f"  {at(killed)}  web-3 killed (SIGKILL)")
if down:
    bound = f"; bound fall x interval + timeout = {3 * interval_ms + interval_ms}ms" if interval_ms else ""
    print(f"  {at(down[0])}  fulcrum marks web-3 down, {down[0] - killed:.0f}ms after the kill ({down[2]}{bound})")
else:
    print("  fulcrum never marked web-3 down")
print(f"  {at(restarted)}  web-3 restarted")
if up:
    bound = f"; bound about rise x interval = {3 * interval_ms}ms plus one interval of phase" if interval_ms else ""
    print(f"  {at(up[0])}  fulcrum marks web-3 up, {up[0] - restarted:.0f}ms after the restart{bound}")
else:
    print("  fulcrum never marked web-3 up again")
if back:
    print(f"  t={back['second']:4d}s     web-3 serves traffic again ({back['nodes']['web-3']} responses in that second)")
e = report["errors"]
print(f"client-visible errors: {e['total']} of {report['requests']} requests "
      f"(connect {e['connect']}, timeout {e['timeout']}, reset {e['reset']}, 5xx {e['status']}, other {e['other']})")
lat = report["latency_ms"]
print(f"latency ms: p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  p99.9 {lat['p999']:.2f}  max {lat['max']:.2f}")
print("responses per node: " + ", ".join(f"{n} {c['responses']}" for n, c in report["nodes"].items()))
print(f"chart: {out}/failover.svg   raw: {out}/load.json, {out}/fulcrum.log")
PY
