#!/usr/bin/env bash
# TLS benchmark: fulcrum vs HAProxy vs nginx terminating the same certificate in front of the
# same three origins, in interleaved rounds (fulcrum, HAProxy, nginx, fulcrum, ...). Figures:
#   - full TLS handshakes/s: h2load, every client a new TLS session making one request, in
#     batches of --batch concurrent clients (below every listen backlog);
#   - h2 over TLS req/s on kept connections: h2load, 8 connections x 8 streams;
#   - HTTPS HTTP/1.1 req/s on kept connections: wrk, 1 thread, 64 connections;
# each with the proxy's CPU per handshake / request (utime+stime of its process tree from
# /proc, the figure that repeats; see shared/BENCHMARKING.md) and the CPU other processes on
# the machine took meanwhile ("foreign", of both cores; a row above 10 % is flagged).
#
# Every proxy runs one worker pinned to core 0 (fulcrum: plain `run`, one worker by itself, HAProxy:
# nbthread 1, nginx: worker_processes 1); origins (one nginx, one worker, three ports answering
# "ok\n") and the load generators run on core 1. Upstream keep-alive everywhere, access logs
# off. Prints one table of medians with ratios to HAProxy.
#
# Usage: scripts/bench-tls.sh [--rounds 3] [--cert rsa|ec] [--handshakes 1500] [--batch 250]
#                             [--duration 6] [--port-base 17400]
#   --cert rsa: RSA-2048 (default), ec: ECDSA P-256; generated with openssl for this run.
# Needs: openssl, h2load (nghttp2-client), wrk, haproxy, nginx, taskset. Debian:
#   apt-get install -y haproxy nginx nghttp2-client wrk
# Runs in about 3-4 minutes with the defaults. The functions (tls_*) are meant to be reused:
# `source scripts/bench-tls.sh --lib` defines them without running anything.
set -euo pipefail
export LC_ALL=C # decimal points in $EPOCHREALTIME, awk and printf

# ---- reusable pieces ---------------------------------------------------------------------------

TLS_PIDS=()

# Stops every process this script started, by PID, and removes the work directory.
# A process still there 5 s after SIGTERM gets SIGKILL, so cleaning up never hangs.
tls_cleanup() {
  local pid i
  for pid in "${TLS_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for i in $(seq 50); do
    for pid in "${TLS_PIDS[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then sleep 0.1; continue 2; fi
    done
    break
  done
  for pid in "${TLS_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${TLS_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  TLS_PIDS=()
  if [ -n "${TLS_DIR:-}" ] && [ -d "$TLS_DIR" ]; then rm -rf "$TLS_DIR"; fi
}

tls_require_tools() {
  local missing=() tool
  for tool in openssl h2load wrk haproxy nginx taskset; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing: ${missing[*]} (Debian: apt-get install -y haproxy nginx nghttp2-client wrk)" >&2
    return 1
  fi
}

# tls_make_cert DIR rsa|ec: DIR/cert.pem, DIR/key.pem and DIR/combined.pem (HAProxy's form).
tls_make_cert() {
  local dir=$1 kind=$2 newkey
  case "$kind" in
    rsa) newkey=(-newkey rsa:2048) ;;
    ec) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
    *) echo "unknown certificate kind $kind" >&2; return 2 ;;
  esac
  openssl req -x509 "${newkey[@]}" -nodes -days 2 -subj /CN=bench.test \
    -addext subjectAltName=DNS:bench.test -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
  cat "$dir/cert.pem" "$dir/key.pem" > "$dir/combined.pem"
}

# tls_port_free PORT: succeeds when nothing listens on 127.0.0.1:PORT.
tls_port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# tls_wait_port PORT: waits up to 10 s for a listener.
tls_wait_port() {
  local i
  for i in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1 after 10s" >&2
  return 1
}

# tls_start_origins DIR PORT...: one nginx worker on core 1 answering "ok\n" on every port.
tls_start_origins() {
  local dir=$1; shift
  local listens="" port
  for port in "$@"; do listens+="    listen 127.0.0.1:$port;"$'\n'; done
  mkdir -p "$dir/origins"
  cat > "$dir/origins/nginx.conf" <<EOF
worker_processes 1;
pid $dir/origins/nginx.pid;
error_log $dir/origins/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
$listens
    location / { return 200 "ok\n"; }
  }
}
EOF
  taskset -c 1 nginx -p "$dir/origins/" -e "$dir/origins/error.log" -c "$dir/origins/nginx.conf" -g 'daemon off;' &
  TLS_PIDS+=($!)
  for port in "$@"; do tls_wait_port "$port"; done
}

# tls_start_fulcrum DIR BIN PORT ORIGIN_PORT...: fulcrum on one worker thread on core 0. With
# TLS_KEEP_IDLE set, each of the three proxies keeps idle keep-alive connections for 600 s (the
# idle-memory figure holds them while thousands more are opened).
tls_start_fulcrum() {
  local dir=$1 bin=$2 port=$3; shift 3
  local backends="" origin keep=""
  for origin in "$@"; do backends+="{ address = \"127.0.0.1:$origin\" }, "; done
  [ -z "${TLS_KEEP_IDLE:-}" ] || keep=$'idle_timeout = "600s"\nheader_read_timeout = "600s"'
  cat > "$dir/fulcrum.toml" <<EOF
shutdown_grace = "1s"
[[listeners]]
name = "bench"
bind = "127.0.0.1:$port"
max_connections = 20000
$keep
[listeners.tls]
cert = "$dir/cert.pem"
key = "$dir/key.pem"
[pools.origins]
backends = [ $backends]
[pools.origins.health]
interval = "30s"
EOF
  RUST_LOG=warn taskset -c 0 "$bin" run -c "$dir/fulcrum.toml" \
    2>"$dir/fulcrum.log" &
  TLS_PIDS+=($!)
  tls_wait_port "$port"
}

# tls_start_haproxy DIR PORT ORIGIN_PORT...: one HAProxy thread on core 0.
tls_start_haproxy() {
  local dir=$1 port=$2; shift 2
  local servers="" origin i=0 client_timeout=30s
  [ -z "${TLS_KEEP_IDLE:-}" ] || client_timeout=600s
  for origin in "$@"; do i=$((i + 1)); servers+="  server o$i 127.0.0.1:$origin"$'\n'; done
  cat > "$dir/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 20000
  no strict-limits
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 2s
  timeout client $client_timeout
  timeout server 30s
  option http-keep-alive
frontend bench
  bind 127.0.0.1:$port ssl crt $dir/combined.pem alpn h2,http/1.1
  default_backend origins
backend origins
  balance roundrobin
  http-reuse always
$servers
EOF
  taskset -c 0 haproxy -db -f "$dir/haproxy.cfg" 2>"$dir/haproxy.log" &
  TLS_PIDS+=($!)
  tls_wait_port "$port"
}

# tls_start_nginx DIR PORT ORIGIN_PORT...: one nginx worker on core 0.
tls_start_nginx() {
  local dir=$1 port=$2; shift 2
  local servers="" origin keepalive_timeout=75s
  [ -z "${TLS_KEEP_IDLE:-}" ] || keepalive_timeout=600s
  for origin in "$@"; do servers+="    server 127.0.0.1:$origin;"$'\n'; done
  mkdir -p "$dir/nginx"
  cat > "$dir/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout $keepalive_timeout;
  upstream origins {
$servers
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$port ssl http2;
    ssl_certificate $dir/cert.pem;
    ssl_certificate_key $dir/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://origins;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  taskset -c 0 nginx -p "$dir/nginx/" -e "$dir/nginx/error.log" -c "$dir/nginx/nginx.conf" -g 'daemon off;' &
  TLS_PIDS+=($!)
  tls_wait_port "$port"
}

# tls_tree_ticks PID: utime+stime (clock ticks) of PID and all its descendants.
tls_tree_ticks() {
  # Processes come and go while this reads: a vanished one is skipped, not an error.
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$1" '
    {
      pid = $1; line = $0; sub(/^[0-9]+ \(.*\) /, "", line); split(line, f, " ")
      parent[pid] = f[2]; ticks[pid] = f[12] + f[13]
    }
    END {
      total = 0
      for (p in ticks) {
        q = p
        while (q != "" && q != "0" && q != root) q = parent[q]
        if (q == root) total += ticks[p]
      }
      print total
    }'
}

# Busy clock ticks of the whole machine (all cores) so far.
tls_busy_ticks() {
  awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat
}

# Clock ticks used by this shell's finished children (the load generators).
tls_child_ticks() {
  local hz times
  hz=$(getconf CLK_TCK)
  times=$(times | tail -1)
  awk -v hz="$hz" '{
      t = 0
      for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }
      printf "%d\n", t * hz
    }' <<<"$times"
}

# tls_sample_begin PID ORIGINS_PID: notes the CPU counters before a run: the process tree of
# PID (the subject), that of ORIGINS_PID, the whole machine and this shell's finished children.
# PID may be ORIGINS_PID itself (a run straight at the origins).
tls_sample_begin() {
  TLS_S_PID=$1 TLS_S_ORIGINS=$2
  TLS_S_P=$(tls_tree_ticks "$1"); TLS_S_O=$(tls_tree_ticks "$2")
  TLS_S_B=$(tls_busy_ticks); TLS_S_C=$(tls_child_ticks); TLS_S_T=$EPOCHREALTIME
}

# tls_sample_end OPS SECS: for the run since tls_sample_begin, sets TLS_RATE (OPS per SECS,
# the load generator's own time), TLS_CPU_US (the subject's CPU per operation, microseconds)
# and TLS_FOREIGN (the CPU that other processes took meanwhile, % of both cores over the wall
# time since tls_sample_begin). The load generators must have run as children of this shell
# (so they count in tls_child_ticks), not in the background.
tls_sample_end() {
  local ops=$1 secs=$2 hz p o b c elapsed
  hz=$(getconf CLK_TCK)
  elapsed=$(awk -v a="$TLS_S_T" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')
  p=$(( $(tls_tree_ticks "$TLS_S_PID") - TLS_S_P ))
  o=$(( $(tls_tree_ticks "$TLS_S_ORIGINS") - TLS_S_O ))
  [ "$TLS_S_PID" = "$TLS_S_ORIGINS" ] && o=0
  b=$(( $(tls_busy_ticks) - TLS_S_B ))
  c=$(( $(tls_child_ticks) - TLS_S_C ))
  read -r TLS_RATE TLS_CPU_US TLS_FOREIGN < <(awk -v ops="$ops" -v secs="$secs" -v hz="$hz" \
    -v p="$p" -v o="$o" -v b="$b" -v c="$c" -v elapsed="$elapsed" 'BEGIN {
      foreign = b - p - o - c; if (foreign < 0) foreign = 0
      foreign = elapsed > 0 ? foreign / hz / (2 * elapsed) * 100 : 0
      if (ops > 0 && secs > 0) printf "%.0f %.1f %.0f\n", ops / secs, p / hz * 1e6 / ops, foreign
      else printf "0 0 %.0f\n", foreign
    }')
}

# tls_seconds TEXT: h2load's "finished in 3.00s," or "finished in 950.12ms," as seconds.
tls_seconds() {
  awk '/^finished in/ { v = $3; sub(/,$/, "", v)
      if (v ~ /ms$/) { sub(/ms$/, "", v); v /= 1000 } else if (v ~ /s$/) sub(/s$/, "", v)
      print v; exit }' <<<"$1"
}

# tls_measure URL PID ORIGINS_PID KIND: runs one load and sets TLS_RATE (per second),
# TLS_CPU_US (proxy CPU per operation, microseconds) and TLS_FOREIGN (% of both cores).
#   KIND handshakes: $TLS_HANDSHAKES new clients, $TLS_BATCH at a time, one request each;
#   KIND h2: h2load -c 8 -m 8 for $TLS_DURATION s; KIND h1: wrk -t1 -c64 for $TLS_DURATION s.
# Every client run is bounded in time (timeout); one that overruns counts what it reported.
tls_measure() {
  local url=$1 pid=$2 origins=$3 kind=$4
  local out="" ops=0 secs=0 limit=$((TLS_DURATION + 30))
  tls_sample_begin "$pid" "$origins"
  case "$kind" in
    handshakes)
      local done=0 n got
      while [ "$done" -lt "$TLS_HANDSHAKES" ]; do
        n=$TLS_BATCH
        out=$(timeout -k 5 60 taskset -c 1 h2load -n "$n" -c "$n" -m 1 "$url" 2>&1) || true
        got=$(awk '/^requests:/ { print $8 }' <<<"$out")
        ops=$((ops + ${got:-0}))
        secs=$(awk -v s="$secs" -v v="$(tls_seconds "$out")" 'BEGIN { print s + v }')
        done=$((done + n))
      done
      ;;
    h2)
      out=$(timeout -k 5 "$limit" taskset -c 1 h2load -c 8 -m 8 -D "$TLS_DURATION" "$url" 2>&1) || true
      ops=$(awk '/^requests:/ { print $8 }' <<<"$out")
      secs=$TLS_DURATION
      ;;
    h1)
      out=$(timeout -k 5 "$limit" taskset -c 1 wrk -t1 -c64 -d"${TLS_DURATION}s" "$url" 2>&1) || true
      ops=$(awk '/requests in/ { print $1 }' <<<"$out")
      secs=$(awk '/requests in/ { v = $4; sub(/s,$/, "", v); print v }' <<<"$out")
      if awk '/Non-2xx|Socket errors/ { bad = 1 } END { exit !bad }' <<<"$out"; then
        echo "  warning: wrk saw errors: $(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' ')" >&2
      fi
      ;;
  esac
  tls_sample_end "${ops:-0}" "${secs:-0}"
  if [ "${ops:-0}" = 0 ]; then
    echo "  no successful operations for $kind at $url:" >&2
    echo "$out" | tail -5 >&2
    TLS_RATE=0 TLS_CPU_US=0
  fi
}

# tls_median V...: the median of the values.
tls_median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# tls_ratio A B: A / B with two decimals, "-" when B is 0.
tls_ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'
}

# ---- the benchmark -----------------------------------------------------------------------------

tls_bench_main() {
  local rounds=3 cert=rsa base=17400
  TLS_HANDSHAKES=1500 TLS_BATCH=250 TLS_DURATION=6
  while [ $# -gt 0 ]; do
    case "$1" in
      --rounds) rounds=$2; shift 2 ;;
      --cert) cert=$2; shift 2 ;;
      --handshakes) TLS_HANDSHAKES=$2; shift 2 ;;
      --batch) TLS_BATCH=$2; shift 2 ;;
      --duration) TLS_DURATION=$2; shift 2 ;;
      --port-base) base=$2; shift 2 ;;
      *) echo "unknown argument: $1" >&2; return 2 ;;
    esac
  done
  tls_require_tools
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local target=${CARGO_TARGET_DIR:-target}
  cargo build --release --quiet
  local bin=$target/release/fulcrum

  TLS_DIR=$(mktemp -d /tmp/fulcrum-bench-tls.XXXXXX)
  trap tls_cleanup EXIT
  local o1=$((base + 1)) o2=$((base + 2)) o3=$((base + 3))
  local pf=$((base + 11)) ph=$((base + 12)) pn=$((base + 13)) port
  for port in $o1 $o2 $o3 $pf $ph $pn; do
    tls_port_free "$port" || { echo "port $port is busy; pass --port-base" >&2; return 1; }
  done
  tls_make_cert "$TLS_DIR" "$cert"
  local cert_label="RSA-2048"
  [ "$cert" = ec ] && cert_label="ECDSA P-256"

  tls_start_origins "$TLS_DIR" $o1 $o2 $o3
  local origins_pid=${TLS_PIDS[-1]}
  tls_start_fulcrum "$TLS_DIR" "$bin" $pf $o1 $o2 $o3
  local fulcrum_pid=${TLS_PIDS[-1]}
  tls_start_haproxy "$TLS_DIR" $ph $o1 $o2 $o3
  local haproxy_pid=${TLS_PIDS[-1]}
  tls_start_nginx "$TLS_DIR" $pn $o1 $o2 $o3
  local nginx_pid=${TLS_PIDS[-1]}

  local names=(fulcrum haproxy nginx)
  declare -A pid_of=([fulcrum]=$fulcrum_pid [haproxy]=$haproxy_pid [nginx]=$nginx_pid)
  declare -A url_of=([fulcrum]="https://127.0.0.1:$pf/" [haproxy]="https://127.0.0.1:$ph/"
    [nginx]="https://127.0.0.1:$pn/")
  local negotiated
  negotiated=$(openssl s_client -connect "127.0.0.1:$pf" -servername bench.test </dev/null 2>/dev/null \
    | awk '/^New, / { sub(/,$/, "", $2); print $2 " " $NF; exit }')
  echo "certificate: $cert_label; openssl s_client gets ${negotiated:-?} from fulcrum; $rounds interleaved rounds"
  echo "proxies on core 0 (one worker each), origins and load generators on core 1"
  echo

  declare -A results=()
  local round name kind
  for round in $(seq "$rounds"); do
    for name in "${names[@]}"; do
      for kind in handshakes h2 h1; do
        tls_measure "${url_of[$name]}" "${pid_of[$name]}" "$origins_pid" "$kind"
        results[$name.$kind.rate]+="$TLS_RATE "
        results[$name.$kind.cpu]+="$TLS_CPU_US "
        results[$name.$kind.foreign]+="$TLS_FOREIGN "
        printf 'round %d %-8s %-10s %8s/s  %8s us CPU each  foreign CPU %3s%%%s\n' \
          "$round" "$name" "$kind" "$TLS_RATE" "$TLS_CPU_US" "$TLS_FOREIGN" \
          "$([ "${TLS_FOREIGN%.*}" -gt 10 ] && echo '  (busy machine)')"
      done
    done
  done

  echo
  echo "medians of $rounds rounds ($cert_label; ratios are to HAProxy)"
  printf '| %-48s | %9s | %9s | %9s | %8s | %8s |\n' figure fulcrum HAProxy nginx "f/HAP" "ngx/HAP"
  printf '|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..50})" "----------:" "----------:" \
    "----------:" "---------:" "---------:"
  local label metric f h n
  for kind in handshakes h2 h1; do
    for metric in rate cpu; do
      case "$kind.$metric" in
        handshakes.rate) label="full TLS handshakes/s (h2load, new session each)" ;;
        handshakes.cpu) label="proxy CPU per full handshake (us)" ;;
        h2.rate) label="h2 over TLS req/s (h2load 8 conns x 8 streams)" ;;
        h2.cpu) label="proxy CPU per h2 request (us)" ;;
        h1.rate) label="HTTPS HTTP/1.1 req/s (wrk 1 thread, 64 conns)" ;;
        h1.cpu) label="proxy CPU per HTTP/1.1 request (us)" ;;
      esac
      # shellcheck disable=SC2086
      f=$(tls_median ${results[fulcrum.$kind.$metric]})
      # shellcheck disable=SC2086
      h=$(tls_median ${results[haproxy.$kind.$metric]})
      # shellcheck disable=SC2086
      n=$(tls_median ${results[nginx.$kind.$metric]})
      printf '| %-48s | %9s | %9s | %9s | %8s | %8s |\n' "$label" "$f" "$h" "$n" \
        "$(tls_ratio "$f" "$h")" "$(tls_ratio "$n" "$h")"
    done
  done
  local all=""
  for name in "${names[@]}"; do
    for kind in handshakes h2 h1; do all+="${results[$name.$kind.foreign]}"; done
  done
  # shellcheck disable=SC2086
  echo "foreign CPU during runs (other processes, % of both cores): median $(tls_median $all)%, max $(printf '%s\n' $all | sort -g | tail -1)%"
}

if [ "${1:-}" != "--lib" ]; then
  tls_bench_main "$@"
fi
