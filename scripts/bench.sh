#!/usr/bin/env bash
# The proxy benchmark: fulcrum against HAProxy and nginx, per core, in front of the same three
# origins, in interleaved rounds (the order of the three rotates every round). Figures:
#   - requests/s over keep-alive: wrk, 1 thread, 64 connections;
#   - the proxy's CPU seconds per 100k of those requests: utime+stime of its process tree
#     (HAProxy's process, nginx's master and worker, fulcrum's process) from /proc/PID/stat,
#     the figure that repeats (see shared/BENCHMARKING.md);
#   - latency p50 / p99 / p99.9 at one fixed request rate for all three, below saturation:
#     h2load --h1 --rps, 64 clients started 1 ms apart so their request timers do not fire in
#     step, percentiles from h2load's per-request log; the rate is half of HAProxy's keep-alive
#     req/s in a calibration run at the start (or --rate), and is printed;
#   - memory per idle client connection, first, on fresh processes: a new proxy, one warm-up
#     request, its tree's RSS (VmRSS), then 10,000 connections that each make one request and
#     stay open and idle (a python3 asyncio client), `ss` confirms all are established at the
#     proxy, RSS again; (after - before) / connections; and the same over TLS (HTTP/1.1 by
#     ALPN, RSA-2048, 5,000 connections), reported without a goal; and the peak memory (VmHWM
#     of its tree, above its RSS before) of a fresh TLS proxy when 2,000 new TLS clients
#     connect at once (h2load, one request each);
#   - new connections/s without keep-alive: wrk with `Connection: close` (a new TCP connection
#     per request), and the proxy's CPU per connection;
#   - TLS (the functions of scripts/bench-tls.sh, RSA-2048): full handshakes/s (h2load, every
#     client a new session), HTTP/2 over TLS req/s (h2load 8 connections x 8 streams) and
#     HTTPS HTTP/1.1 keep-alive req/s (wrk), each with the proxy's CPU per operation;
#   - straight at one origin port (no proxy) for keep-alive req/s and the fixed-rate latency:
#     the physical ceiling and floor on this machine.
# It prints one table of medians with each figure's ratio to HAProxy, nginx as a column too,
# and a goal column for the goals the proxy is judged by (req/s >= 1.10x HAProxy, CPU per
# request <= 0.85x, p99 at the fixed rate <= HAProxy, KiB per idle connection and peak memory
# under the TLS storm <= HAProxy, TLS full handshakes/s and h2-over-TLS req/s >= HAProxy);
# then the CPU other processes took meanwhile (each run line flags above 10 % of both cores)
# and the total runtime.
# The access log's cost (fulcrum with and without a JSON log) is scripts/bench-access-log.sh.
#
# Every proxy runs ONE worker thread pinned to core 0 with taskset (fulcrum: plain `run`, which picks one worker on one core,
# a current_thread runtime; HAProxy: nbthread 1; nginx: worker_processes 1), round robin over
# the three origins with upstream keep-alive and no access logs. The origins (one nginx worker
# answering "ok\n" on three loopback ports) and every load generator run on core 1.
#
# Usage: scripts/bench.sh [--rounds 3] [--duration 5] [--quick] [--bin PATH] [--rate N]
#                         [--idle-conns 10000] [--idle-tls-conns 5000] [--handshakes 1500]
#                         [--no-tls] [--no-install]
#                         [--port-base 17500] [--json FILE] [--markdown FILE]
#   --rounds N       interleaved rounds (default 3; medians of fewer are not comparisons)
#   --duration S     seconds per timed run (default 5)
#   --quick          --duration 2 --idle-conns 2000 --idle-tls-conns 1000 --handshakes 500: a
#                    smoke run, ~2 minutes
#   --bin PATH       a fulcrum binary to use instead of `cargo build --release`
#   --rate N         the fixed rate (req/s) for the latency figures instead of the calibration
#   --idle-conns N   idle connections for the memory figure (default 10000; under `ulimit -n`)
#   --idle-tls-conns N  idle TLS connections for its memory figure (default 5000)
#   --no-tls         leave out the TLS figures
#   --no-install     do not apt-get install missing tools, fail instead
#   --port-base P    origins on P+1..P+3, proxies on P+11..P+13 (cleartext), P+21..P+23 (TLS),
#                    P+31..P+33 and P+41..P+43 (the fresh proxies of the idle-memory figures,
#                    cleartext and TLS); default 17500
#   --json FILE      also write every figure (medians, ratios, goals, each round's values)
#   --markdown FILE  also write the table (it is printed as Markdown) with a caption line
# Installs what it needs from Debian's packages when missing (apt-get update once, then
# apt-get install -y haproxy nginx wrk nghttp2-client ...; it must run as root for that).
# Takes about 7 minutes with the defaults on a 2-core machine. Every process it starts is
# stopped by PID on exit (also on Ctrl-C), and every client run is bounded by a timeout.
set -euo pipefail

BENCH_T0=$SECONDS
BENCH_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/bench-tls.sh
source "$BENCH_HERE/bench-tls.sh" --lib

# ---- setup -------------------------------------------------------------------------------------

# Installs the missing tools from Debian's packages (apt-get update once, then install). The
# packages' own services are kept from starting (policy-rc.d) while they install.
bench_install() {
  local allowed=$1 need=() pair
  for pair in haproxy:haproxy nginx:nginx wrk:wrk h2load:nghttp2-client openssl:openssl \
    python3:python3 ss:iproute2 taskset:util-linux timeout:coreutils; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$allowed" = 0 ] || [ "$(id -u)" != 0 ]; then
    echo "missing: ${need[*]} (Debian: apt-get install -y ${need[*]})" >&2
    return 1
  fi
  echo "installing ${need[*]} from Debian's packages" >&2
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
  fi
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } \
    >&2 || rc=$?
  [ "$made_policy" = 1 ] && rm -f "$policy"
  return "$rc"
}

# bench_start_fulcrum DIR BIN PORT ORIGIN_PORT...: cleartext fulcrum, one thread, core 0.
# Idle timeouts are long (the idle-memory figure holds connections), limits high.
bench_start_fulcrum() {
  local dir=$1 bin=$2 port=$3; shift 3
  local backends="" origin
  for origin in "$@"; do backends+="{ address = \"127.0.0.1:$origin\" }, "; done
  cat > "$dir/fulcrum-$port.toml" <<EOF
shutdown_grace = "1s"
[[listeners]]
name = "bench"
bind = "127.0.0.1:$port"
max_connections = 20000
idle_timeout = "600s"
header_read_timeout = "600s"
[pools.origins]
strategy = "round_robin"
backends = [ $backends]
[pools.origins.health]
interval = "30s"
EOF
  # The default mode, as a user runs it: pinned to one core, it picks one worker by itself.
  RUST_LOG=warn taskset -c 0 "$bin" run -c "$dir/fulcrum-$port.toml" \
    2>"$dir/fulcrum-$port.log" &
  TLS_PIDS+=($!)
  tls_wait_port "$port"
}

# bench_start_haproxy DIR PORT ORIGIN_PORT...: cleartext HAProxy, nbthread 1, core 0.
bench_start_haproxy() {
  local dir=$1 port=$2; shift 2
  local servers="" origin i=0
  for origin in "$@"; do i=$((i + 1)); servers+="  server o$i 127.0.0.1:$origin"$'\n'; done
  cat > "$dir/haproxy-$port.cfg" <<EOF
global
  nbthread 1
  maxconn 20000
  no strict-limits
defaults
  mode http
  timeout connect 2s
  timeout client 600s
  timeout http-keep-alive 600s
  timeout http-request 600s
  timeout server 30s
  option http-keep-alive
frontend bench
  bind 127.0.0.1:$port
  default_backend origins
backend origins
  balance roundrobin
  http-reuse always
$servers
EOF
  taskset -c 0 haproxy -db -f "$dir/haproxy-$port.cfg" 2>"$dir/haproxy-$port.log" &
  TLS_PIDS+=($!)
  tls_wait_port "$port"
}

# bench_start_nginx DIR PORT ORIGIN_PORT...: cleartext nginx, one worker, core 0.
bench_start_nginx() {
  local dir=$1 port=$2; shift 2
  local servers="" origin prefix="$dir/nginx-$port"
  for origin in "$@"; do servers+="    server 127.0.0.1:$origin;"$'\n'; done
  mkdir -p "$prefix"
  cat > "$prefix/nginx.conf" <<EOF
worker_processes 1;
pid $prefix/nginx.pid;
error_log $prefix/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  client_header_timeout 600s;
  upstream origins {
$servers
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$port;
    location / {
      proxy_pass http://origins;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  taskset -c 0 nginx -p "$prefix/" -e "$prefix/error.log" -c "$prefix/nginx.conf" \
    -g 'daemon off;' &
  TLS_PIDS+=($!)
  tls_wait_port "$port"
}

# bench_start NAME DIR BIN PORT ORIGIN_PORT...: one of the three cleartext proxies.
bench_start() {
  local name=$1 dir=$2 bin=$3; shift 3
  case "$name" in
    fulcrum) bench_start_fulcrum "$dir" "$bin" "$@" ;;
    haproxy) bench_start_haproxy "$dir" "$@" ;;
    nginx) bench_start_nginx "$dir" "$@" ;;
  esac
}

# tls_start NAME DIR BIN PORT ORIGIN_PORT...: one of the three TLS proxies (scripts/bench-tls.sh).
tls_start() {
  local name=$1 dir=$2 bin=$3; shift 3
  case "$name" in
    fulcrum) tls_start_fulcrum "$dir" "$bin" "$@" ;;
    haproxy) tls_start_haproxy "$dir" "$@" ;;
    nginx) tls_start_nginx "$dir" "$@" ;;
  esac
}

# bench_stop PID: stops one process this script started (SIGTERM, SIGKILL after 5 s).
bench_stop() {
  local pid=$1 i keep=() p
  kill "$pid" 2>/dev/null || true
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for p in "${TLS_PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  TLS_PIDS=("${keep[@]}")
}

# bench_tree_rss PID [FIELD]: resident memory (KiB, VmRSS, or FIELD of /proc/PID/status such
# as VmHWM, the peak) of PID and all its descendants.
bench_tree_rss() {
  local field=${2:-VmRSS}
  local pids
  pids=$({ cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$1" '
    { pid = $1; line = $0; sub(/^[0-9]+ \(.*\) /, "", line); split(line, f, " "); parent[pid] = f[2] }
    END {
      for (p in parent) {
        q = p
        while (q != "" && q != "0" && q != root) q = parent[q]
        if (q == root) print p
      }
    }')
  local pid total=0 kib
  for pid in $pids; do
    kib=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    total=$((total + ${kib:-0}))
  done
  echo "$total"
}

# bench_get PORT: one GET / on its own connection; fails unless the answer is 200.
bench_get() {
  local fd answer
  exec {fd}<>"/dev/tcp/127.0.0.1/$1"
  printf 'GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' >&"$fd"
  answer=$(timeout 5 cat <&"$fd" || true)
  exec {fd}>&-
  [[ "$answer" == "HTTP/1.1 200"* ]] || { echo "no 200 from 127.0.0.1:$1: ${answer%%$'\r'*}" >&2; return 1; }
}

# bench_get_tls PORT: bench_get over TLS (HTTP/1.1 by ALPN).
bench_get_tls() {
  local answer
  answer=$(printf 'GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' |
    timeout 5 openssl s_client -quiet -alpn http/1.1 -connect "127.0.0.1:$1" 2>/dev/null || true)
  [[ "$answer" == "HTTP/1.1 200"* ]] || { echo "no 200 over TLS from 127.0.0.1:$1: ${answer%%$'\r'*}" >&2; return 1; }
}

# bench_write_idle_client FILE: the python3 client that holds idle keep-alive connections.
#   python3 FILE PORT COUNT READY RELEASE HOLD_SECONDS [tls]
# (with `tls`: over TLS, ALPN http/1.1, the certificate not checked)
# opens COUNT connections (200 connecting at a time, from 127.0.0.1-8 so ephemeral ports do
# not run short), sends one GET on each and reads the whole answer, then writes "opened failed
# seconds first-error" to READY and keeps every connection idle until the file RELEASE
# appears (or HOLD_SECONDS pass); it closes with RST (SO_LINGER 0), leaving no TIME_WAIT.
bench_write_idle_client() {
  cat > "$1" <<'EOF'
import asyncio, os, resource, socket, ssl, struct, sys, time

port, count, ready, release = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
hold = float(sys.argv[5])
tls = None
if len(sys.argv) > 6 and sys.argv[6] == "tls":
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    tls.set_alpn_protocols(["http/1.1"])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < count + 64:
    want = count + 64 if hard == resource.RLIM_INFINITY else min(hard, max(count + 64, 65536))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = want
if soft < count + 64:
    sys.exit(f"open-file limit {soft} is too low for {count} connections")
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
IP_BIND_ADDRESS_NO_PORT = 24


async def one_tls(i, sem, socks):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname="bench",
                local_addr=(f"127.0.0.{1 + i % 8}", 0)), 20)
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.write(REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await asyncio.wait_for(reader.readexactly(length), 10)
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
            # The writer too: a collected StreamWriter closes its connection.
            socks.append((reader, writer))
            return None
        except Exception as e:  # counted and reported, one example shown
            return repr(e).replace(" ", "_")


async def one(i, sem, socks):
    if tls:
        return await one_tls(i, sem, socks)
    async with sem:
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            s.bind((f"127.0.0.{1 + i % 8}", 0))
            await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 10)
            await loop.sock_sendall(s, REQUEST)
            buf = b""
            while True:
                chunk = await asyncio.wait_for(loop.sock_recv(s, 4096), 10)
                if not chunk:
                    raise ConnectionError("closed before a whole answer")
                buf += chunk
                head, sep, body = buf.partition(b"\r\n\r\n")
                if sep:
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if len(body) >= length:
                        break
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
            socks.append(s)
            return None
        except Exception as e:  # counted and reported, one example shown
            s.close()
            return repr(e).replace(" ", "_")


async def main():
    sem = asyncio.Semaphore(200)
    socks = []
    start = time.monotonic()
    results = await asyncio.gather(*(one(i, sem, socks) for i in range(count)))
    errors = [e for e in results if e]
    took = time.monotonic() - start
    with open(ready + ".tmp", "w") as f:
        f.write(f"{len(socks)} {len(errors)} {took:.1f} {errors[0] if errors else '-'}\n")
    os.rename(ready + ".tmp", ready)
    deadline = time.monotonic() + hold
    while not os.path.exists(release) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for s in socks:
        s[1].transport.abort() if tls else s.close()


asyncio.run(main())
EOF
}

# bench_idle MODE COUNT NAME DIR BIN PORT ORIGIN_PORT...: starts a fresh proxy (MODE plain or
# tls; a tls one's certificate is already in DIR), measures the memory COUNT idle client
# connections take, stops it. Sets B_IDLE_KIB (per connection), B_IDLE_LINE.
bench_idle() {
  local mode=$1 count=$2 name=$3 dir=$4 bin=$5 port=$6; shift 6
  local pid client ready="$dir/idle.ready" release="$dir/idle.release" i
  rm -f "$ready" "$release"
  if [ "$mode" = tls ]; then
    TLS_KEEP_IDLE=1 tls_start "$name" "$dir" "$bin" "$port" "$@"
  else
    bench_start "$name" "$dir" "$bin" "$port" "$@"
  fi
  pid=${TLS_PIDS[-1]}
  if [ "$mode" = tls ]; then bench_get_tls "$port"; else bench_get "$port"; fi
  sleep 0.5
  local before after opened failed took first established
  before=$(bench_tree_rss "$pid")
  local tls_arg=()
  [ "$mode" = plain ] || tls_arg=(tls)
  taskset -c 1 python3 "$dir/idle_client.py" "$port" "$count" "$ready" "$release" 120 \
    "${tls_arg[@]}" &
  client=$!
  TLS_PIDS+=("$client")
  for i in $(seq 1200); do [ -e "$ready" ] && break; sleep 0.1; done
  if [ ! -e "$ready" ]; then
    echo "  $name: the idle client did not finish opening in 120 s" >&2
    touch "$release"; bench_stop "$client"; bench_stop "$pid"
    B_IDLE_KIB=0 B_IDLE_LINE="failed"
    return
  fi
  read -r opened failed took first < "$ready"
  sleep 1
  established=$(ss -Htn state established "( sport = :$port )" | wc -l)
  after=$(bench_tree_rss "$pid")
  touch "$release"
  wait "$client" 2>/dev/null || true
  bench_stop "$client"
  bench_stop "$pid"
  if [ "$failed" != 0 ] || [ "$established" -lt "$count" ]; then
    echo "  warning: $name: $failed of $count connections failed (first: $first);" \
      "$established established at the proxy" >&2
  fi
  B_IDLE_KIB=$(awk -v a="$after" -v b="$before" -v n="$opened" \
    'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else print 0 }')
  B_IDLE_LINE="RSS $before -> $after KiB, $established of $count established (opened in ${took}s)"
}

# bench_storm NAME DIR BIN PORT ORIGIN_PORT...: a fresh TLS proxy (certificate in DIR), one
# warm-up request, then $B_STORM_CLIENTS new TLS clients at once (h2load, one request each);
# sets B_STORM_MIB, the peak RSS of its tree (VmHWM) above its RSS before, and B_STORM_LINE.
bench_storm() {
  local name=$1 dir=$2 bin=$3 port=$4; shift 4
  local pid before peak out got
  tls_start "$name" "$dir" "$bin" "$port" "$@"
  pid=${TLS_PIDS[-1]}
  bench_get_tls "$port"
  sleep 0.5
  before=$(bench_tree_rss "$pid")
  out=$(timeout -k 5 60 taskset -c 1 h2load -n "$B_STORM_CLIENTS" -c "$B_STORM_CLIENTS" -m 1 \
    "https://127.0.0.1:$port/" 2>&1) || true
  got=$(awk '/^requests:/ { print $8 }' <<<"$out")
  peak=$(bench_tree_rss "$pid" VmHWM)
  bench_stop "$pid"
  B_STORM_MIB=$(awk -v p="$peak" -v b="$before" 'BEGIN { printf "%.1f", (p - b) / 1024 }')
  B_STORM_LINE="RSS $before KiB before, peak $peak KiB; ${got:-0} of $B_STORM_CLIENTS answered"
}

# bench_percentiles LOG: "p50 p99 p99.9" in ms of the 200 answers in h2load's --log-file
# (nearest rank), then the count of answers that were not 200.
bench_percentiles() {
  awk '$2 == 200 { print $3 }' "$1" | sort -n | awk -v bad="$(awk '$2 != 200' "$1" | wc -l)" '
    { v[NR] = $1 }
    function rank(p,  i) { i = int(p * NR + 0.999999); if (i < 1) i = 1; return v[i] / 1000 }
    END { if (NR == 0) print "0 0 0", bad; else printf "%.3f %.3f %.3f %d\n", rank(0.5), rank(0.99), rank(0.999), bad }'
}

# bench_measure KIND URL PID ORIGINS_PID: one cleartext run, on core 1. Sets TLS_RATE,
# TLS_CPU_US, TLS_FOREIGN (see tls_sample_end) and, for KIND rate, B_P50 B_P99 B_P999 (ms).
#   ka: wrk -t1 -c64 for $B_DURATION s; close: the same with `Connection: close`;
#   rate: h2load --h1 at $B_RATE req/s in all for $B_DURATION s (64 clients, 1 ms apart).
bench_measure() {
  local kind=$1 url=$2 pid=$3 origins=$4
  local out="" ops=0 secs=0 limit=$((B_DURATION + 30)) log="$TLS_DIR/latency.log"
  tls_sample_begin "$pid" "$origins"
  case "$kind" in
    ka | close)
      local header=()
      [ "$kind" = close ] && header=(-H "Connection: close")
      out=$(timeout -k 5 "$limit" taskset -c 1 wrk -t1 -c64 -d"${B_DURATION}s" "${header[@]}" \
        "$url" 2>&1) || true
      ops=$(awk '/requests in/ { print $1 }' <<<"$out")
      secs=$(awk '/requests in/ { v = $4; sub(/s,$/, "", v); print v }' <<<"$out")
      if awk '/Non-2xx|Socket errors/ { bad = 1 } END { exit !bad }' <<<"$out"; then
        echo "  warning: wrk saw errors: $(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' ')" >&2
      fi
      ;;
    rate)
      local per_client
      per_client=$(awk -v r="$B_RATE" 'BEGIN { printf "%.3f", r / 64 }')
      rm -f "$log"
      out=$(timeout -k 5 $((limit + B_DURATION)) taskset -c 1 h2load --h1 -c 64 -r 1 \
        --rate-period 1ms --rps "$per_client" -n $((B_RATE * B_DURATION)) --log-file "$log" \
        "$url" 2>&1) || true
      ops=$(awk '/^requests:/ { print $8 }' <<<"$out")
      secs=$(tls_seconds "$out")
      if [ -s "$log" ]; then
        local bad
        read -r B_P50 B_P99 B_P999 bad < <(bench_percentiles "$log")
        [ "$bad" = 0 ] || echo "  warning: $bad requests failed at $url" >&2
      else
        B_P50=0 B_P99=0 B_P999=0
      fi
      ;;
  esac
  tls_sample_end "${ops:-0}" "${secs:-0}"
  if [ "${ops:-0}" = 0 ]; then
    echo "  no successful requests for $kind at $url:" >&2
    echo "$out" | tail -5 >&2
  fi
}

# ---- the table ---------------------------------------------------------------------------------

# One row per figure: key|label|printf format|goal (fulcrum / HAProxy: ">=1.10", "<=0.85", or
# empty for none). Keys are KIND.METRIC as recorded in B_RESULTS[KEY.NAME].
bench_rows() {
  local r=$B_RATE
  cat <<EOF
ka.rate|keep-alive req/s (wrk, 64 conns)|%.0f|>=1.10
ka.cpu|proxy CPU s per 100k keep-alive req|%.2f|<=0.85
rate.p50|p50 ms at $r req/s (h2load --rps)|%.3f|
rate.p99|p99 ms at $r req/s|%.3f|<=1.00
rate.p999|p99.9 ms at $r req/s|%.3f|
rate.achieved|req/s achieved at the fixed rate|%.0f|
rate.cpu|proxy CPU us per req at the fixed rate|%.1f|
idle.kib|KiB per idle client conn ($B_IDLE_CONNS open)|%.2f|<=1.00
close.rate|new conns/s (wrk, Connection: close)|%.0f|
close.cpu|proxy CPU us per new connection|%.1f|
EOF
  if [ "$B_TLS" = 1 ]; then
    cat <<EOF
idle_tls.kib|KiB per idle TLS conn ($B_IDLE_TLS_CONNS open, h1)|%.2f|
storm.mib|peak MiB, $B_STORM_CLIENTS new TLS clients at once|%.1f|<=1.00
hs.rate|TLS full handshakes/s (RSA-2048)|%.0f|>=1.00
hs.cpu|proxy CPU us per full handshake|%.0f|
h2.rate|HTTP/2 over TLS req/s (8 conns x 8 str)|%.0f|>=1.00
h2.cpu|proxy CPU us per h2 request|%.1f|
h1.rate|HTTPS keep-alive req/s (wrk, 64 conns)|%.0f|
h1.cpu|proxy CPU us per HTTPS request|%.1f|
EOF
  fi
}

# bench_median_of KEY NAME: the median of a figure's values, empty when there are none.
bench_median_of() {
  local values=${B_RESULTS[$1.$2]:-}
  [ -n "$values" ] || return 0
  # shellcheck disable=SC2086
  tls_median $values
}

# bench_goal RATIO GOAL: "met" / "NOT met" (GOAL like ">=1.10" or "<=0.85"), "" without one.
bench_goal() {
  local ratio=$1 goal=$2
  [ -n "$goal" ] || return 0
  [ "$ratio" != "-" ] || { echo "?"; return 0; }
  awk -v r="$ratio" -v op="${goal:0:2}" -v t="${goal:2}" 'BEGIN {
      ok = (op == ">=") ? (r >= t) : (r <= t)
      printf "%s%sx %s", op, t, ok ? "met" : "NOT met" }'
}

# bench_table: sets B_TABLE, the Markdown table of medians, and B_JSON_ROWS for --json.
bench_table() {
  local key label fmt goal f h n o fr nr g noise row line
  line=$(printf -- '-%.0s' {1..41})
  printf -v B_TABLE '| %-39s | %9s | %9s | %9s | %9s | %5s | %5s | %-15s | %6s |\n' figure \
    fulcrum HAProxy nginx "origin" "f/HAP" "n/HAP" "goal (f/HAP)" "other%"
  printf -v row '|%s|%s|%s|%s|%s|%s|%s|%s|%s|' "$line" "----------:" "----------:" \
    "----------:" "----------:" "------:" "------:" "-----------------" "-------:"
  B_TABLE+=$row
  B_JSON_ROWS=""
  while IFS='|' read -r key label fmt goal; do
    f=$(bench_median_of "$key" fulcrum); h=$(bench_median_of "$key" haproxy)
    n=$(bench_median_of "$key" nginx); o=$(bench_median_of "$key" origin)
    fr=$(tls_ratio "${f:-0}" "${h:-0}"); nr=$(tls_ratio "${n:-0}" "${h:-0}")
    g=$(bench_goal "$fr" "$goal")
    noise=$(bench_median_of "${key%%.*}" foreign)
    printf -v row '\n| %-39s | %9s | %9s | %9s | %9s | %5s | %5s | %-15s | %6s |' "$label" \
      "$(bench_fmt "$fmt" "$f")" "$(bench_fmt "$fmt" "$h")" "$(bench_fmt "$fmt" "$n")" \
      "$(bench_fmt "$fmt" "$o")" "$fr" "$nr" "$g" "${noise:--}"
    B_TABLE+=$row
    B_JSON_ROWS+="$(bench_json_row "$key" "$label" "$goal" "$f" "$h" "$n" "$o" "$fr" "$nr" "$g"),"
  done < <(bench_rows)
  B_JSON_ROWS=${B_JSON_ROWS%,}
}

# bench_fmt FORMAT VALUE: VALUE formatted, "-" when empty.
bench_fmt() {
  if [ -z "$2" ]; then echo "-"; else awk -v f="$1" -v v="$2" 'BEGIN { printf f, v }'; fi
}

# bench_json_list KEY NAME: that figure's per-round values as a JSON array.
bench_json_list() {
  local values=${B_RESULTS[$1.$2]:-}
  # shellcheck disable=SC2086
  printf '[%s]' "$(printf '%s\n' $values | paste -sd, -)"
}

bench_json_num() { if [ -z "$1" ] || [ "$1" = "-" ]; then echo null; else echo "$1"; fi; }

bench_json_row() {
  local key=$1 label=$2 goal=$3 f=$4 h=$5 n=$6 o=$7 fr=$8 nr=$9 g=${10} name rounds=""
  for name in fulcrum haproxy nginx origin; do
    rounds+="\"$name\": $(bench_json_list "$key" "$name"), "
  done
  rounds+="\"other_cpu_pct\": $(bench_json_list "${key%%.*}" foreign), "
  printf '\n    {"key": "%s", "figure": "%s", "fulcrum": %s, "haproxy": %s, "nginx": %s, "origin": %s, "fulcrum_to_haproxy": %s, "nginx_to_haproxy": %s, "goal": %s, "goal_met": %s, "rounds": {%s}}' \
    "$key" "$label" "$(bench_json_num "$f")" "$(bench_json_num "$h")" "$(bench_json_num "$n")" \
    "$(bench_json_num "$o")" "$(bench_json_num "$fr")" "$(bench_json_num "$nr")" \
    "$([ -n "$goal" ] && echo "\"$goal\"" || echo null)" \
    "$(case "$g" in *NOT*) echo false ;; *met) echo true ;; *) echo null ;; esac)" \
    "${rounds%, }"
}

# ---- the benchmark -----------------------------------------------------------------------------

bench_main() {
  local rounds=3 base=17500 bin="" install=1 json="" markdown="" fixed_rate=""
  B_DURATION=5 B_IDLE_CONNS=10000 B_IDLE_TLS_CONNS=5000 B_STORM_CLIENTS=2000 B_TLS=1 TLS_HANDSHAKES=1500 TLS_BATCH=250
  while [ $# -gt 0 ]; do
    case "$1" in
      --rounds) rounds=$2; shift 2 ;;
      --duration) B_DURATION=$2; shift 2 ;;
      --quick) B_DURATION=2 B_IDLE_CONNS=2000 B_IDLE_TLS_CONNS=1000 TLS_HANDSHAKES=500; shift ;;
      --bin) bin=$2; shift 2 ;;
      --rate) fixed_rate=$2; shift 2 ;;
      --idle-conns) B_IDLE_CONNS=$2; shift 2 ;;
      --idle-tls-conns) B_IDLE_TLS_CONNS=$2; shift 2 ;;
      --handshakes) TLS_HANDSHAKES=$2; shift 2 ;;
      --no-tls) B_TLS=0; shift ;;
      --no-install) install=0; shift ;;
      --port-base) base=$2; shift 2 ;;
      --json) json=$2; shift 2 ;;
      --markdown) markdown=$2; shift 2 ;;
      -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; return 0 ;;
      *) echo "unknown argument: $1 (--help lists them)" >&2; return 2 ;;
    esac
  done
  TLS_DURATION=$B_DURATION
  [ "$rounds" -ge 3 ] || echo "note: $rounds rounds; medians of fewer than 3 are not comparisons" >&2
  bench_install "$install"
  tls_require_tools

  cd "$BENCH_HERE/.."
  if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin=${CARGO_TARGET_DIR:-target}/release/fulcrum
  fi
  [ -x "$bin" ] || { echo "no fulcrum binary at $bin" >&2; return 1; }
  [ -z "$json" ] || json=$(realpath -m "$json")
  [ -z "$markdown" ] || markdown=$(realpath -m "$markdown")

  TLS_DIR=$(mktemp -d /tmp/fulcrum-bench.XXXXXX)
  trap tls_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local o1=$((base + 1)) o2=$((base + 2)) o3=$((base + 3)) port
  local -A plain_port=([fulcrum]=$((base + 11)) [haproxy]=$((base + 12)) [nginx]=$((base + 13)))
  local -A tls_port=([fulcrum]=$((base + 21)) [haproxy]=$((base + 22)) [nginx]=$((base + 23)))
  local -A idle_port=([fulcrum]=$((base + 31)) [haproxy]=$((base + 32)) [nginx]=$((base + 33)))
  local -A idle_tls_port=([fulcrum]=$((base + 41)) [haproxy]=$((base + 42)) [nginx]=$((base + 43)))
  for port in $o1 $o2 $o3 "${plain_port[@]}" "${tls_port[@]}" "${idle_port[@]}" \
    "${idle_tls_port[@]}"; do
    tls_port_free "$port" || { echo "port $port is busy; pass --port-base" >&2; return 1; }
  done
  bench_write_idle_client "$TLS_DIR/idle_client.py"

  local names=(fulcrum haproxy nginx)
  local commit haproxy_v nginx_v
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
  haproxy_v=$(haproxy -v 2>/dev/null | awk 'NR == 1 { print $3 }')
  nginx_v=$(nginx -v 2>&1 | awk -F/ '{ print $2 }')
  echo "fulcrum $bin (commit $commit) vs HAProxy $haproxy_v vs nginx $nginx_v"
  echo "per core: ONE worker thread each, pinned to core 0 with taskset (plain fulcrum run: one worker on one core, a"
  echo "current_thread runtime; HAProxy nbthread 1; nginx worker_processes 1), round robin over 3"
  echo "origins with upstream keep-alive, access logs off; origins (one nginx worker, 3 loopback"
  echo "ports) and load generators on core 1. $rounds interleaved rounds, ${B_DURATION}s per run."
  echo

  tls_start_origins "$TLS_DIR" $o1 $o2 $o3
  local origins_pid=${TLS_PIDS[-1]}

  # Idle-connection memory first, on fresh processes, before any load has grown an allocator.
  declare -gA B_RESULTS=()
  local round name i
  echo "memory per idle client connection: fresh proxy, one warm-up request, $B_IDLE_CONNS idle connections"
  for round in $(seq "$rounds"); do
    for i in 0 1 2; do
      name=${names[$(((round - 1 + i) % 3))]}
      bench_idle plain "$B_IDLE_CONNS" "$name" "$TLS_DIR" "$bin" "${idle_port[$name]}" \
        $o1 $o2 $o3
      B_RESULTS[idle.kib.$name]+="$B_IDLE_KIB "
      printf 'round %d %-8s %-6s %8s KiB per connection   (%s)\n' "$round" "$name" idle \
        "$B_IDLE_KIB" "$B_IDLE_LINE"
    done
  done
  echo
  if [ "$B_TLS" = 1 ]; then
    echo "memory per idle TLS client connection: the same, $B_IDLE_TLS_CONNS connections over TLS;"
    echo "and the peak memory a fresh TLS proxy reaches under $B_STORM_CLIENTS new clients at once"
    mkdir -p "$TLS_DIR/idle-tls"
    tls_make_cert "$TLS_DIR/idle-tls" rsa
    bench_write_idle_client "$TLS_DIR/idle-tls/idle_client.py"
    for round in $(seq "$rounds"); do
      for i in 0 1 2; do
        name=${names[$(((round - 1 + i) % 3))]}
        bench_idle tls "$B_IDLE_TLS_CONNS" "$name" "$TLS_DIR/idle-tls" "$bin" \
          "${idle_tls_port[$name]}" $o1 $o2 $o3
        B_RESULTS[idle_tls.kib.$name]+="$B_IDLE_KIB "
        printf 'round %d %-8s %-6s %8s KiB per connection   (%s)\n' "$round" "$name" idle-tls \
          "$B_IDLE_KIB" "$B_IDLE_LINE"
        bench_storm "$name" "$TLS_DIR/idle-tls" "$bin" "${idle_tls_port[$name]}" $o1 $o2 $o3
        B_RESULTS[storm.mib.$name]+="$B_STORM_MIB "
        printf 'round %d %-8s %-6s %8s MiB peak above base   (%s)\n' "$round" "$name" storm \
          "$B_STORM_MIB" "$B_STORM_LINE"
      done
    done
    echo
  fi

  local -A pid_of=() url_of=() tls_pid_of=() tls_url_of=()
  for name in "${names[@]}"; do
    bench_start "$name" "$TLS_DIR" "$bin" "${plain_port[$name]}" $o1 $o2 $o3
    pid_of[$name]=${TLS_PIDS[-1]}
    url_of[$name]="http://127.0.0.1:${plain_port[$name]}/"
  done
  pid_of[origin]=$origins_pid
  url_of[origin]="http://127.0.0.1:$o1/"
  if [ "$B_TLS" = 1 ]; then
    mkdir -p "$TLS_DIR/tls"
    tls_make_cert "$TLS_DIR/tls" rsa
    tls_start_fulcrum "$TLS_DIR/tls" "$bin" "${tls_port[fulcrum]}" $o1 $o2 $o3
    tls_pid_of[fulcrum]=${TLS_PIDS[-1]}
    tls_start_haproxy "$TLS_DIR/tls" "${tls_port[haproxy]}" $o1 $o2 $o3
    tls_pid_of[haproxy]=${TLS_PIDS[-1]}
    tls_start_nginx "$TLS_DIR/tls" "${tls_port[nginx]}" $o1 $o2 $o3
    tls_pid_of[nginx]=${TLS_PIDS[-1]}
    for name in "${names[@]}"; do tls_url_of[$name]="https://127.0.0.1:${tls_port[$name]}/"; done
  fi

  # Warm-up (1 s each), then the fixed rate: half of HAProxy's keep-alive req/s.
  local saved=$B_DURATION
  B_DURATION=1
  for name in "${names[@]}" origin; do bench_measure ka "${url_of[$name]}" "${pid_of[$name]}" "$origins_pid"; done
  B_DURATION=3
  bench_measure ka "${url_of[haproxy]}" "${pid_of[haproxy]}" "$origins_pid"
  B_DURATION=$saved
  local calibration=$TLS_RATE
  if [ -n "$fixed_rate" ]; then
    B_RATE=$fixed_rate
    echo "fixed rate for latency: $B_RATE req/s (--rate; HAProxy's keep-alive calibration run: $calibration req/s)"
  else
    B_RATE=$(awk -v r="$calibration" 'BEGIN { v = int(r / 2 / 1000) * 1000; print v < 1000 ? 1000 : v }')
    echo "fixed rate for latency: $B_RATE req/s (half of HAProxy's $calibration req/s in a 3 s keep-alive calibration run)"
  fi
  echo

  local kinds=(ka rate close) kind subjects pid url
  [ "$B_TLS" = 1 ] && kinds+=(handshakes h2 h1)
  for round in $(seq "$rounds"); do
    local order=()
    for i in 0 1 2; do order+=("${names[$(((round - 1 + i) % 3))]}"); done
    for kind in "${kinds[@]}"; do
      subjects=("${order[@]}")
      case "$kind" in ka | rate) subjects+=(origin) ;; esac
      for name in "${subjects[@]}"; do
        local key=$kind extra=""
        case "$kind" in
          ka | rate | close)
            pid=${pid_of[$name]} url=${url_of[$name]}
            bench_measure "$kind" "$url" "$pid" "$origins_pid"
            ;;
          *)
            pid=${tls_pid_of[$name]} url=${tls_url_of[$name]}
            tls_measure "$url" "$pid" "$origins_pid" "$kind"
            [ "$kind" = handshakes ] && key=hs
            ;;
        esac
        B_RESULTS[$key.foreign]+="$TLS_FOREIGN "
        case "$kind" in
          ka)
            B_RESULTS[ka.rate.$name]+="$TLS_RATE "
            B_RESULTS[ka.cpu.$name]+="$(awk -v u="$TLS_CPU_US" 'BEGIN { print u / 10 }') "
            ;;
          rate)
            B_RESULTS[rate.p50.$name]+="$B_P50 "
            B_RESULTS[rate.p99.$name]+="$B_P99 "
            B_RESULTS[rate.p999.$name]+="$B_P999 "
            B_RESULTS[rate.achieved.$name]+="$TLS_RATE "
            B_RESULTS[rate.cpu.$name]+="$TLS_CPU_US "
            extra=$(printf '  p50 %.3f  p99 %.3f  p99.9 %.3f ms' "$B_P50" "$B_P99" "$B_P999")
            if awk -v a="$TLS_RATE" -v r="$B_RATE" 'BEGIN { exit !(a < 0.95 * r) }'; then
              extra+="  (SATURATED: below 95 % of $B_RATE req/s)"
            fi
            ;;
          *)
            B_RESULTS[$key.rate.$name]+="$TLS_RATE "
            B_RESULTS[$key.cpu.$name]+="$TLS_CPU_US "
            ;;
        esac
        printf 'round %d %-8s %-10s %8s/s %9s us CPU each  other CPU %3s%%%s%s\n' "$round" "$name" \
          "$kind" "$TLS_RATE" "$TLS_CPU_US" "$TLS_FOREIGN" "$extra" \
          "$([ "${TLS_FOREIGN%.*}" -gt 10 ] && echo '  (busy machine)')"
      done
    done
  done

  echo
  local caption="medians of $rounds interleaved rounds, ${B_DURATION}s runs, one core per proxy; ratios to HAProxy; fixed rate $B_RATE req/s"
  bench_table
  echo "$caption"
  echo "$B_TABLE"
  local all="" k
  for k in ka rate close hs h2 h1; do all+="${B_RESULTS[$k.foreign]:-}"; done
  local busy
  # shellcheck disable=SC2086
  busy=$(printf '%s\n' $all | awk '$1 > 10' | wc -l)
  # shellcheck disable=SC2086
  echo "other%: median CPU other processes took during that figure's runs, % of both cores;" \
    "over all runs median $(tls_median $all)%, max $(printf '%s\n' $all | sort -g | tail -1)%," \
    "$busy of $(wc -w <<<"$all") runs above 10 %"
  echo "origin: straight at one origin port (the ceiling for req/s, the floor for latency);" \
    "its CPU row is the origin's own"
  echo "idle memory: nginx's worker also sets aside ~0.42 KiB per worker_connections slot at" \
    "start (20000 slots: ~8 MiB), before the connections open, which its figure leaves out"
  echo "CPU rows are the steadiest (utime+stime of the proxy's process tree); req/s and p99" \
    "move with the other CPU"
  local total=$((SECONDS - BENCH_T0))
  printf 'total runtime %dm%02ds\n' $((total / 60)) $((total % 60))

  if [ -n "$markdown" ]; then
    { echo "$caption"; echo; echo "$B_TABLE"; } > "$markdown"
    echo "table written to $markdown"
  fi
  if [ -n "$json" ]; then
    # shellcheck disable=SC2086
    printf '{\n  "commit": "%s", "date": "%s", "rounds": %d, "duration_s": %s, "fixed_rate": %s,\n  "idle_conns": %s, "haproxy": "%s", "nginx": "%s", "runtime_s": %d,\n  "other_cpu_pct_median": %s,\n  "figures": [%s\n  ]\n}\n' \
      "$commit" "$(date -u +%FT%TZ)" "$rounds" "$B_DURATION" "$B_RATE" "$B_IDLE_CONNS" \
      "$haproxy_v" "$nginx_v" "$total" "$(tls_median $all)" "$B_JSON_ROWS" > "$json"
    echo "figures written to $json"
  fi
}

# `source bench.sh --lib` (scripts/capacity.sh) takes the functions without running.
if [ "${1:-}" != --lib ]; then
  bench_main "$@"
fi
