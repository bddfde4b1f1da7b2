#!/usr/bin/env bash
# Elastic scaling drill: under steady `fulcrum load`, grow a pool from 3 to 6 nodes (two web
# nodes register themselves over the gRPC registry, one is added through the admin API), reload
# the config once, then shrink to 2 (the registered nodes decommission themselves on SIGTERM,
# two more are drained through the admin API). Prints the events, the errors seen (goal: zero)
# and the traffic per node over time; writes an SVG chart.
#
# Usage: scripts/elastic.sh [--rate 300] [--out target/elastic]
# Ports: ELASTIC_BASE_PORT (default 18300): nodes +1..+6, balancer +80, admin +90, registry +91.
# Needs curl and python3 (for the traffic table).
set -euo pipefail
cd "$(dirname "$0")/.."

rate=300 out=target/elastic
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) rate=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
base=${ELASTIC_BASE_PORT:-18300}
duration=36
mkdir -p "$out"
out=$(cd "$out" && pwd)

cargo build --release --quiet
bin=./target/release/fulcrum
admin="http://127.0.0.1:$((base + 90))"
registry="http://127.0.0.1:$((base + 91))"
# The registry takes calls with this token only; nodes read it from the environment (an
# argument would show in `ps`).
registry_token=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
export FULCRUM_REGISTRY_TOKEN=$registry_token

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

started=$(date +%s%N)
event() { printf '  t=%6.2fs  %s\n' "$(awk "BEGIN { print ($(date +%s%N) - $started) / 1e9 }")" "$*"; }
at() { # sleep until $1 seconds after the start
  local wait
  wait=$(awk "BEGIN { w = $1 - ($(date +%s%N) - $started) / 1e9; print (w > 0 ? w : 0) }")
  sleep "$wait"
}
wait_for() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; return 1; }

write_config() { # $@ = extra backend lines
  {
    cat <<TOML
shutdown_grace = "5s"
[[listeners]]
name = "http"
bind = "127.0.0.1:$((base + 80))"
[admin]
bind = "127.0.0.1:$((base + 90))"
[registry]
bind = "127.0.0.1:$((base + 91))"
pool = "web"
heartbeat_interval = "1s"
token = "$registry_token"
[pools.web]
strategy = "least_connections"
backends = [
  { address = "127.0.0.1:$((base + 1))", name = "web-1" },
  { address = "127.0.0.1:$((base + 2))", name = "web-2" },
  { address = "127.0.0.1:$((base + 3))", name = "web-3" },
TOML
    for line in "$@"; do echo "  $line,"; done
    cat <<TOML
]
[pools.web.health]
interval = "250ms"
rise = 2
TOML
  } >"$out/elastic.toml"
}
write_config
"$bin" check -c "$out/elastic.toml" >/dev/null

declare -A node_pid
start_node() { # $1 = index, $2... = extra flags
  local i=$1; shift
  "$bin" webnode --listen "127.0.0.1:$((base + i))" --id "web-$i" "$@" >"$out/web-$i.log" 2>&1 &
  node_pid[$i]=$!
  pids+=("$!")
}
for i in 1 2 3; do start_node "$i"; done
"$bin" run -c "$out/elastic.toml" --log-format json >"$out/fulcrum.log" 2>&1 &
fulcrum_pid=$!
pids+=("$fulcrum_pid")
wait_for "http://127.0.0.1:$((base + 80))/" || { echo "fulcrum did not come up; see $out/fulcrum.log" >&2; exit 1; }

started=$(date +%s%N)
"$bin" load --url "http://127.0.0.1:$((base + 80))/" --rate "$rate" --duration "${duration}s" \
  --users 30 --json --svg "$out/elastic.svg" --title "elastic drill: 3 -> 6 -> 2 nodes" \
  >"$out/load.json" 2>"$out/load.log" &
load_pid=$!
pids+=("$load_pid")
echo "steady load: $rate req/s for ${duration}s; pool web starts with web-1..3"

at 4
start_node 4 --register "$registry"
start_node 5 --register "$registry"
event "web-4 and web-5 started with --register and the registry token (registry adds them; routable after rise passes)"
at 8
start_node 6
wait_for "http://127.0.0.1:$((base + 6))/healthz"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$admin/api/pools/web/backends" \
  -H 'Content-Type: application/json' -d "{\"address\":\"127.0.0.1:$((base + 6))\",\"name\":\"web-6\"}")
event "web-6 added through POST /api/pools/web/backends ($code)"
at 12
write_config "{ address = \"127.0.0.1:$((base + 6))\", name = \"web-6\", weight = 2 }"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$admin/api/reload")
event "config reloaded with web-6 in the file at weight 2 (POST /api/reload: $code)"
at 18
kill -TERM "${node_pid[4]}" "${node_pid[5]}"
event "web-4 and web-5 sent SIGTERM (they decommission themselves through the registry)"
at 20
for name in web-3 web-6; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$admin/api/pools/web/backends/$name?drain=3s")
  event "$name drained through DELETE ...?drain=3s ($code)"
done
at 26
curl -s "$admin/api/pools" >"$out/pools.json"
python3 - "$out/pools.json" <<'PY'
import json, sys
pool = json.load(open(sys.argv[1]))["pools"]["web"]
print("  pool web now:", ", ".join("%s (%s)" % (b["name"], b["state"]) for b in pool["backends"]))
PY
kill "${node_pid[3]}" "${node_pid[6]}" 2>/dev/null || true
wait "${node_pid[4]}" 2>/dev/null; event "web-4 exited ($?)"
wait "${node_pid[5]}" 2>/dev/null; event "web-5 exited ($?)"
event "web-3 and web-6 stopped after their drain"

wait "$load_pid" || true
python3 - "$out/load.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
e = report["errors"]
print(f"\nclient-visible errors: {e['total']} of {report['requests']} requests "
      f"(connect {e['connect']}, timeout {e['timeout']}, reset {e['reset']}, 5xx {e['status']}, other {e['other']})")
nodes = sorted({n for s in report["timeline"] for n in s["nodes"]})
print("\nresponses per node per 2 s:")
print("   t  " + " ".join(f"{n:>6}" for n in nodes) + "  errors")
timeline = report["timeline"]
for start in range(0, len(timeline), 2):
    window = timeline[start:start + 2]
    counts = [sum(s["nodes"].get(n, 0) for s in window) for n in nodes]
    errors = sum(s["errors"]["total"] for s in window)
    print(f"{start:>4}s " + " ".join(f"{c:>6}" for c in counts) + f"  {errors:>6}")
PY
echo "chart: $out/elastic.svg"
