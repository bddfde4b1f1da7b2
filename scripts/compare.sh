#!/usr/bin/env bash
# Sticky versus round robin, measured: the same simulated users (each with its own cookie jar
# and source address) visit /session through every strategy, over web nodes that keep sessions
# in memory and again over web nodes that keep them in Redis. Prints one table (share per node,
# CV, max/min, session continuity, errors, p99) and writes an SVG bar chart.
#
# Usage: scripts/compare.sh [--users 1000] [--visits 20] [--rate 2000] [--kill-halfway]
#                           [--out target/compare]
#   --rate          requests per second in all, on a fixed schedule: each user's visits are
#                   spread over the whole run (users x visits / rate seconds), as real sessions
#                   are, so a node killed halfway has users in the middle of their sessions
#   --kill-halfway  also run every row with web-3 SIGKILLed halfway through (restarted after)
# Ports: COMPARE_BASE_PORT (default 18100): memory nodes +1..+3, Redis nodes +11..+13,
#        redis-server +20, balancer +80, admin +90.
# Needs curl and python3 (for the table and chart); redis-server for the Redis rows.
set -euo pipefail
cd "$(dirname "$0")/.."

users=1000 visits=20 rate=2000 kill_halfway=0 out=target/compare
while [ $# -gt 0 ]; do
  case "$1" in
    --users) users=$2; shift 2 ;;
    --visits) visits=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --kill-halfway) kill_halfway=1; shift ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
base=${COMPARE_BASE_PORT:-18100}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/*.json

cargo build --release --quiet
bin=./target/release/fulcrum

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_for() { # $1 = URL
  for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "nothing answers at $1" >&2
  return 1
}

stores=(memory)
if command -v redis-server >/dev/null; then
  redis-server --port $((base + 20)) --bind 127.0.0.1 --save '' --appendonly no \
    >"$out/redis.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/$((base + 20))) 2>/dev/null && break
    sleep 0.1
  done
  stores+=(redis)
else
  echo "redis-server is not installed: only the memory-session rows are measured" >&2
  echo "(apt-get install redis-server to add the Redis rows)" >&2
fi

declare -A node_pid
node_port() { # $1 = store, $2 = index
  if [ "$1" = memory ]; then echo $((base + $2)); else echo $((base + 10 + $2)); fi
}
start_node() { # $1 = store, $2 = index
  local sessions=memory
  [ "$1" = redis ] && sessions="redis://127.0.0.1:$((base + 20))"
  "$bin" webnode --listen "127.0.0.1:$(node_port "$1" "$2")" --id "web-$2" --sessions "$sessions" \
    >>"$out/web-$1-$2.log" 2>&1 &
  node_pid[$1-$2]=$!
  pids+=("$!")
  wait_for "http://127.0.0.1:$(node_port "$1" "$2")/healthz"
}
for store in "${stores[@]}"; do
  for i in 1 2 3; do start_node "$store" "$i"; done
done

# One balancer per row, so no row inherits another's state.
run_row() { # $1 = strategy, $2 = store, $3 = kill (0|1)
  local strategy=$1 store=$2 kill=$3
  local kill_after
  kill_after=$(awk "BEGIN { printf \"%.2f\", $users * $visits / $rate / 2 }")
  local label="$strategy/$store" config="$out/fulcrum-$strategy-$store.toml"
  [ "$kill" = 1 ] && label="$label+kill"
  cat >"$config" <<TOML
shutdown_grace = "1s"
[[listeners]]
name = "http"
bind = "127.0.0.1:$((base + 80))"
[admin]
bind = "127.0.0.1:$((base + 90))"
[pools.web]
strategy = "$strategy"
backends = [
  { address = "127.0.0.1:$(node_port "$store" 1)", name = "web-1" },
  { address = "127.0.0.1:$(node_port "$store" 2)", name = "web-2" },
  { address = "127.0.0.1:$(node_port "$store" 3)", name = "web-3" },
]
[pools.web.health]
interval = "500ms"
[pools.web.sticky]
secret = "compare-secret"
fallback = "round_robin"
TOML
  "$bin" run -c "$config" >"$out/fulcrum-$strategy-$store.log" 2>&1 &
  local balancer=$!
  pids+=("$balancer")
  wait_for "http://127.0.0.1:$((base + 90))/healthz"

  local started
  started=$(date +%s%N)
  "$bin" load --url "http://127.0.0.1:$((base + 80))/session" --users "$users" --visits "$visits" \
    --rate "$rate" --source-ips 127.0.1.1-127.0.8.250 --duration 300s --json \
    >"$out/${label//\//_}.json" 2>>"$out/load.log" &
  local load=$!
  pids+=("$load")
  if [ "$kill" = 1 ]; then
    sleep "$kill_after"
    kill -KILL "${node_pid[$store-3]}" 2>/dev/null || true
    wait "${node_pid[$store-3]}" 2>/dev/null || true
  fi
  wait "$load"
  local elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))
  kill "$balancer"; wait "$balancer" 2>/dev/null || true
  if [ "$kill" = 1 ]; then start_node "$store" 3; fi
  echo "$label: ${elapsed_ms} ms" >&2
}

for store in "${stores[@]}"; do
  for strategy in round_robin least_connections sticky_cookie ip_hash; do
    run_row "$strategy" "$store" 0
  done
done
if [ "$kill_halfway" = 1 ]; then
  for store in "${stores[@]}"; do
    for strategy in round_robin least_connections sticky_cookie ip_hash; do
      run_row "$strategy" "$store" 1
    done
  done
fi

python3 - "$out" "$users" "$visits" <<'PY'
import json, pathlib, sys

out, users, visits = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
order = ["round_robin", "least_connections", "sticky_cookie", "ip_hash"]
rows = []
for path in out.glob("*.json"):
    name = path.stem  # e.g. sticky_cookie_memory+kill
    store = "redis" if "_redis" in name else "memory"
    killed = name.endswith("+kill")
    strategy = name.split("_" + store)[0]
    report = json.loads(path.read_text())
    rows.append((store, killed, order.index(strategy), strategy, report))
rows.sort(key=lambda r: (r[0] != "memory", r[1], r[2]))

nodes = ["web-1", "web-2", "web-3"]
header = f"{'strategy':<24} {'sessions':<9} " + " ".join(f"{n:>6}" for n in nodes) + \
    f" {'CV':>6} {'max/min':>8} {'continuity':>11} {'errors':>7} {'p99 ms':>7}"
print(f"\n{users} users x {visits} visits of /session each, 3 web nodes"
      + (", web-3 SIGKILLed halfway in +kill rows" if any(r[1] for r in rows) else "") + "\n")
print(header)
print("-" * len(header))
for store, killed, _, strategy, r in rows:
    shares = r["distribution"]["shares"]
    cells = " ".join(f"{100 * shares.get(n, 0):5.1f}%" for n in nodes)
    cv = r["distribution"]["cv"]
    ratio = r["distribution"]["max_min_ratio"]
    cont = r["sessions"]["continuity"]
    label = strategy + (" +kill" if killed else "")
    print(f"{label:<24} {store:<9} {cells} {cv if cv is not None else float('nan'):6.3f} "
          f"{ratio if ratio is not None else float('nan'):8.2f} "
          f"{100 * cont if cont is not None else float('nan'):10.1f}% "
          f"{r['errors']['total']:7d} {r['latency_ms']['p99']:7.2f}")

# Grouped bars per row: continuity, then each node's share (an even split is the dashed line).
short = {"round_robin": "round robin", "least_connections": "least conn", "sticky_cookie": "sticky",
         "ip_hash": "ip hash"}
width, height, left, top, bottom = 1200, 480, 110, 50, 130
groups = [(f"{short[s]}{' +kill' if k else ''} / {st}", r) for st, k, _, s, r in rows]
plot_w, plot_h = width - left - 20, height - top - bottom
slot = plot_w / max(len(groups), 1)
series = [("session continuity", "#2b8a3e", lambda r: r["sessions"]["continuity"] or 0)] + [
    (f"{n} share", c, (lambda n: lambda r: r["distribution"]["shares"].get(n, 0))(n))
    for n, c in zip(nodes, ["#1c7ed6", "#4dabf7", "#a5d8ff"])
]
bar = slot * 0.8 / len(series)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
       f'<rect width="{width}" height="{height}" fill="white"/>',
       f'<text x="{width/2}" y="24" text-anchor="middle" font-size="16">Session continuity and share per node: {users} users x {visits} visits, 3 web nodes</text>']
for pct in range(0, 101, 25):
    y = top + plot_h * (1 - pct / 100)
    svg.append(f'<line x1="{left}" x2="{width-20}" y1="{y}" y2="{y}" stroke="#ddd"/>')
    svg.append(f'<text x="{left-8}" y="{y+4}" text-anchor="end">{pct}%</text>')
for g, (label, r) in enumerate(groups):
    x0 = left + g * slot + slot * 0.1
    for i, (_, color, value) in enumerate(series):
        h = plot_h * max(0.0, min(1.0, value(r)))
        svg.append(f'<rect x="{x0 + i*bar:.1f}" y="{top + plot_h - h:.1f}" width="{bar*0.9:.1f}" height="{h:.1f}" fill="{color}"/>')
    lx, ly = x0 + slot * 0.4, top + plot_h + 14
    svg.append(f'<text x="{lx:.1f}" y="{ly}" text-anchor="end" transform="rotate(-35 {lx:.1f} {ly})">{label}</text>')
even = top + plot_h * (1 - 1 / 3)
svg.append(f'<line x1="{left}" x2="{width-20}" y1="{even:.1f}" y2="{even:.1f}" stroke="#e03131" stroke-dasharray="6 4"/>')
svg.append(f'<text x="{width-24}" y="{even-6:.1f}" text-anchor="end" fill="#e03131">even share (33.3%)</text>')
for i, (name, color, _) in enumerate(series):
    x = left + i * 170
    svg.append(f'<rect x="{x}" y="{height-22}" width="12" height="12" fill="{color}"/>')
    svg.append(f'<text x="{x+18}" y="{height-12}">{name}</text>')
svg.append("</svg>")
(out / "compare.svg").write_text("\n".join(svg))
print(f"\nchart: {out / 'compare.svg'}")
PY
