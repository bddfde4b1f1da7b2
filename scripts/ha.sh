#!/usr/bin/env bash
# The high-availability drill: PostgreSQL, Redis, two balancers A and B sharing one registry
# store and one sticky secret, web nodes registering through either, and `fulcrum load`
# spread over both balancers for the whole timeline. It kills A, stops and restarts
# PostgreSQL, and prints what users saw.
#
#   bash scripts/ha.sh                # builds the release binary first
#   FULCRUM_BIN=path/to/fulcrum bash scripts/ha.sh
#
# Everything listens on 127.0.0.1; every process is started and stopped by its PID; the
# scratch directory is removed on exit. Output: target/ha/ha.svg (and the load report as
# target/ha/load.json).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/target/ha"
mkdir -p "$OUT"
if [[ -z "${FULCRUM_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --release --quiet)
    FULCRUM_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/fulcrum"
fi
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
for tool in "$FULCRUM_BIN" "$PGBIN/initdb" "$PGBIN/pg_ctl" redis-server redis-cli curl jq python3 bc; do
    command -v "$tool" >/dev/null || { echo "ha.sh: $tool is missing" >&2; exit 1; }
done

T0=$(date +%s.%N)
say() { printf '[%6.1fs %s] %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$(date -u +%H:%M:%S)" "$*"; }

WORK=$(mktemp -d /tmp/fulcrum-ha.XXXXXX)
PIDS=()
PGDATA="$WORK/pg/data"
cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    done
    if [[ -f "$PGDATA/postmaster.pid" ]]; then
        pgpid=$(head -1 "$PGDATA/postmaster.pid")
        kill -QUIT "$pgpid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pgpid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# A free loopback port (the kernel's pick; released at once, taken right after).
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_for WHAT SECONDS COMMAND...: polls every 100 ms; fails the drill after SECONDS.
wait_for() {
    local what=$1 limit=$2; shift 2
    local tries=$((limit * 10))
    for _ in $(seq "$tries"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    say "FAILED: $what within ${limit}s"; return 1
}

# mark PHASE: the timeline table below splits the load report's seconds at these moments.
mark() { echo "$1 $(date +%s%3N)" >>"$WORK/phases"; }

as_postgres() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# --- PostgreSQL (as its own user, in the scratch directory) and Redis ---------------------
PG_PORT=$(port)
mkdir -p "$WORK/pg"
[[ $(id -u) == 0 ]] && chown -R postgres:postgres "$WORK/pg" && chmod 755 "$WORK"
as_postgres "$PGBIN/initdb" --auth=trust --username=postgres --no-sync -D "$PGDATA" >/dev/null
pg_start() {
    as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -w -t 30 -l "$WORK/pg/server.log" \
        -o "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
}
pg_start
PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
say "PostgreSQL up on 127.0.0.1:$PG_PORT (pid $(head -1 "$PGDATA/postmaster.pid"))"

REDIS_PORT=$(port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_for "Redis answers" 10 timeout 2 redis-cli -p "$REDIS_PORT" ping
say "Redis up on 127.0.0.1:$REDIS_PORT (pid ${PIDS[-1]})"

# --- Two balancers, one store, one sticky secret -----------------------------------------
SECRET="ha-drill-$(date +%s%N)"
# Live window 3 x 5 s: longer than the store outage below plus a node's retry backoff (at most
# 5 s), so the nodes that could not heartbeat during the outage are still live when it ends.
HEARTBEAT=${HEARTBEAT:-5s}
balancer() { # NAME -> writes its config, starts it, sets ${NAME}_PID
    local name=$1 http=$2 admin=$3 registry=$4
    cat >"$WORK/$name.toml" <<TOML
shutdown_grace = "2s"
[[listeners]]
name = "http"
bind = "127.0.0.1:$http"
[admin]
bind = "127.0.0.1:$admin"
[pools.web]
strategy = "sticky_cookie"
backends = []
[pools.web.sticky]
secret = "$SECRET"
fallback = "round_robin"
[pools.web.health]
path = "/healthz"
interval = "200ms"
timeout = "150ms"
[registry]
bind = "127.0.0.1:$registry"
pool = "web"
heartbeat_interval = "$HEARTBEAT"
store = "$PG_URL"
store_poll_interval = "1s"
TOML
    "$FULCRUM_BIN" -c "$WORK/$name.toml" run >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    printf -v "${name}_PID" '%s' "$!"
}
A_HTTP=$(port); A_ADMIN=$(port); A_REG=$(port)
B_HTTP=$(port); B_ADMIN=$(port); B_REG=$(port)
balancer A "$A_HTTP" "$A_ADMIN" "$A_REG"
balancer B "$B_HTTP" "$B_ADMIN" "$B_REG"
wait_for "balancer A answers" 20 curl -sf -m 2 "http://127.0.0.1:$A_ADMIN/healthz"
wait_for "balancer B answers" 20 curl -sf -m 2 "http://127.0.0.1:$B_ADMIN/healthz"
say "balancer A http :$A_HTTP admin :$A_ADMIN registry :$A_REG (pid $A_PID)"
say "balancer B http :$B_HTTP admin :$B_ADMIN registry :$B_REG (pid $B_PID)"

# --- Web nodes ----------------------------------------------------------------------------
declare -A NODE_PORT
webnode() { # ID REGISTER_URLS
    local id=$1 register=$2 p
    p=$(port)
    NODE_PORT[$id]=$p
    FULCRUM_WEBNODE_DATABASE="$PG_URL" "$FULCRUM_BIN" webnode --listen "127.0.0.1:$p" --id "$id" \
        --register "$register" --sessions "redis://127.0.0.1:$REDIS_PORT" \
        >"$WORK/$id.log" 2>&1 &
    PIDS+=($!)
}
state_on() { # ADMIN_PORT ID -> the node's state in that balancer's pool
    curl -sf -m 2 "http://127.0.0.1:$1/api/pools" |
        jq -r --arg id "$2" '[.. | objects | select(.name? == $id) | .state][0] // "absent"'
}
is_up() { [[ $(state_on "$1" "$2") == up ]]; }
BOTH="http://127.0.0.1:$A_REG,http://127.0.0.1:$B_REG"
webnode web-1 "$BOTH"
webnode web-2 "$BOTH"
for id in web-1 web-2; do
    wait_for "$id up on A" 30 is_up "$A_ADMIN" "$id"
    wait_for "$id up on B" 30 is_up "$B_ADMIN" "$id"
done
say "t0: web-1 and web-2 up on A and B"

# --- Load over both balancers for the whole timeline ---------------------------------------
LOAD_SECONDS=${LOAD_SECONDS:-75}
"$FULCRUM_BIN" load --url "http://127.0.0.1:$A_HTTP/session" --url "http://127.0.0.1:$B_HTTP/session" \
    --users 100 --rate 200 --duration "${LOAD_SECONDS}s" --json --svg "$OUT/ha.svg" \
    --title "fulcrum HA drill: A killed, PostgreSQL stopped and restarted" \
    >"$OUT/load.json" 2>"$WORK/load.log" &
LOAD_PID=$!
PIDS+=($LOAD_PID)
say "load: 100 users at 200 req/s over A and B for ${LOAD_SECONDS}s (pid $LOAD_PID)"
mark "both balancers, web-1..2"
sleep 8

# --- Two new nodes register through A only and serve through B -----------------------------
START=$(date +%s.%N)
mark "web-3..4 join through A"
webnode web-3 "http://127.0.0.1:$A_REG"
webnode web-4 "http://127.0.0.1:$A_REG"
say "web-3 and web-4 register through A only"
wait_for "web-3 up on B" 30 is_up "$B_ADMIN" web-3
wait_for "web-4 up on B" 30 is_up "$B_ADMIN" web-4
say "web-3 and web-4 up on B after $(printf '%.2f' "$(echo "$(date +%s.%N) - $START" | bc)")s (store poll + B's own rise checks)"
# A new user (no cookie) through B: the fallback places it on any node, the new ones included.
declare -A FRESH
for _ in $(seq 40); do
    n=$(curl -s -m 2 -o /dev/null -D - "http://127.0.0.1:$B_HTTP/" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-served-by"{print $2}')
    FRESH[$n]=$(( ${FRESH[$n]:-0} + 1 ))
done
say "40 new users through B landed on: $(for k in "${!FRESH[@]}"; do printf '%s=%s\n' "$k" "${FRESH[$k]}"; done | sort | paste -sd' ')"
sleep 6

# --- A is SIGKILLed ------------------------------------------------------------------------
disown "$A_PID" # no "Killed" notice from the shell: the drill says it itself
mark "A killed"
kill -9 "$A_PID"
for _ in $(seq 50); do kill -0 "$A_PID" 2>/dev/null || break; sleep 0.1; done
for i in "${!PIDS[@]}"; do [[ ${PIDS[$i]} == "$A_PID" ]] && unset 'PIDS[i]'; done
say "balancer A SIGKILLed (pid $A_PID): its users move to B"
sleep 10

# --- PostgreSQL stops: routing carries on through B, registrations wait ---------------------
pg_stop() { as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null; }
store_up() { curl -sf -m 2 "http://127.0.0.1:$B_ADMIN/metrics" | awk '$1=="fulcrum_registry_store_up"{print $2}'; }
store_is() { [[ $(store_up) == "$1" ]]; }
pg_stop
mark "PostgreSQL down"
say "PostgreSQL stopped"
wait_for "B reports the store down" 20 store_is 0
say "B: $(curl -sf -m 2 "http://127.0.0.1:$B_ADMIN/metrics" | grep '^fulcrum_registry_store_up')"
webnode web-5 "http://127.0.0.1:$B_REG"
say "web-5 registers through B while the store is down"
sleep 5
say "web-5 on B after 5s: $(state_on "$B_ADMIN" web-5); its log: $(sed 's/\x1b\[[0-9;]*m//g' "$WORK/web-5.log" | grep -m1 -o 'report active failed.*retry later' || true)"

# --- PostgreSQL returns: the waiting registration lands ------------------------------------
START=$(date +%s.%N)
pg_start
mark "PostgreSQL back"
say "PostgreSQL restarted"
wait_for "B reports the store up" 30 store_is 1
say "B: fulcrum_registry_store_up $(store_up) after $(printf '%.2f' "$(echo "$(date +%s.%N) - $START" | bc)")s"
wait_for "web-5 up on B" 30 is_up "$B_ADMIN" web-5
say "web-5 up on B $(printf '%.2f' "$(echo "$(date +%s.%N) - $START" | bc)")s after the restart"

# --- Redis loses its memory: sessions are read from PostgreSQL and re-filled -----------------
timeout 5 redis-cli -p "$REDIS_PORT" flushall >/dev/null
mark "Redis flushed"
say "Redis flushed (FLUSHALL): sessions come back from PostgreSQL"

# --- The end of the load run ---------------------------------------------------------------
for _ in $(seq $((LOAD_SECONDS * 10 + 100))); do kill -0 "$LOAD_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$LOAD_PID" 2>/dev/null; then say "FAILED: the load run outlived its duration"; exit 1; fi
wait "$LOAD_PID" || true
say "load finished"

# Session lookup latency from each web node's histogram.
for id in "${!NODE_PORT[@]}"; do
    curl -sf -m 2 "http://127.0.0.1:${NODE_PORT[$id]}/metrics" >"$WORK/metrics-$id.txt" || true
done
python3 - "$OUT/load.json" "$WORK" "$OUT/ha.svg" <<'PY'
import json, sys, glob, re, collections
report = json.load(open(sys.argv[1]))
work, svg = sys.argv[2], sys.argv[3]
print("\n== timeline (load report seconds, split at each step) ==")
marks = [l.rsplit(" ", 1) for l in open(f"{work}/phases").read().splitlines()]
marks = [(name, (int(ms) - report["started_unix_ms"]) / 1000) for name, ms in marks]
print(f"{'from':>6}  {'step':<28} {'answers':>8} {'errors':>6}  nodes answering")
for i, (name, at) in enumerate(marks):
    end = marks[i + 1][1] if i + 1 < len(marks) else float("inf")
    # Second s covers [s, s+1): it goes to the step it ended in (the first takes any before).
    secs = [s for s in report["timeline"] if (at < s["second"] + 1 or i == 0) and s["second"] + 1 <= end]
    answers = sum(s["responses"] for s in secs)
    errors = sum(s["errors"]["total"] for s in secs)
    nodes = collections.Counter()
    for s in secs:
        nodes.update(s["nodes"])
    print(f"{max(at, 0):>5.1f}s  {name:<28} {answers:>8} {errors:>6}  " + ", ".join(f"{k} {v}" for k, v in sorted(nodes.items())))
print("\n== per balancer ==")
fo = report.get("failover") or {}
print(f"{'balancer':<36} {'users':>5} {'requests':>9} {'answers':>8} {'errors':>6} {'reset':>5} {'connect':>7} {'moved away':>10}")
for name, b in zip("AB", fo.get("balancers", [])):
    e = b["errors"]
    print(f"{name + ' ' + b['url']:<36} {b['users_started']:>5} {b['requests']:>9} {b['responses']:>8} {e['total']:>6} {e['reset']:>5} {e['connect']:>7} {b['moves_away']:>10}")
print("\n== per node ==")
print(f"{'node':<10} {'answers':>8} {'share':>7}")
for node, c in report["nodes"].items():
    print(f"{node:<10} {c['responses']:>8} {c['share_pct']:>6.1f}%")
e, s = report["errors"], report["sessions"]
print(f"\nrequests {report['requests']} ({report['unfinished']} unfinished at the end), errors {e['total']} "
      f"(reset {e['reset']}, connect {e['connect']}, timeout {e['timeout']}, 5xx {e['status']}, other {e['other']})")
cont = s["continuity"]
print(f"session continuity {cont*100 if cont is not None else float('nan'):.2f}% "
      f"({s['users_reset']} of {s['users_tracked']} users saw their visit count reset), node switches {s['switches']}")
kept = fo.get("sticky_kept")
print(f"moves A->B {fo.get('moves', 0)} ({fo.get('users_moved', 0)} users); sticky node honoured across balancers: "
      f"{fo.get('kept_node', 0)} kept, {fo.get('changed_node', 0)} changed"
      + (f" ({kept*100:.1f}%)" if kept is not None else ""))
print(f"latency p50 {report['latency_ms']['p50']} ms, p99 {report['latency_ms']['p99']} ms, max {report['latency_ms']['max']} ms")

# p99 of webnode_session_lookup_seconds{source} summed over every node's buckets.
buckets = collections.defaultdict(lambda: collections.defaultdict(float))
line = re.compile(r'^webnode_session_lookup_seconds_bucket\{(.*)\} (\S+)$')
for path in glob.glob(f"{work}/metrics-*.txt"):
    for l in open(path):
        m = line.match(l.strip())
        if not m: continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        buckets[labels.get("source", "?")][le] += float(m.group(2))
print("\n== session lookup (web nodes' /metrics) ==")
for source, b in sorted(buckets.items()):
    les = sorted(b)
    total = b[les[-1]]
    if total == 0:
        print(f"{source:<10} no lookups"); continue
    want, prev_le, prev_n = 0.99 * total, 0.0, 0.0
    for le in les:
        if b[le] >= want:
            if le == float("inf"):
                p99 = prev_le
            else:  # linear inside the bucket, as Prometheus' histogram_quantile does
                p99 = prev_le + (le - prev_le) * (want - prev_n) / max(b[le] - prev_n, 1e-9)
            break
        prev_le, prev_n = le, b[le]
    print(f"{source:<10} lookups {int(total):>7}  p99 {p99*1000:.3f} ms")
print(f"\nchart: {svg}")
PY
