#!/usr/bin/env bash
# Runs `fulcrum demo`, sends a few requests through it, shows the rotation and the metrics it
# produced, then stops the demo. Usage: scripts/rotation.sh [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-6}

cargo build --release --quiet
./target/release/fulcrum demo >/tmp/fulcrum-demo.$$.log 2>&1 &
demo=$!
trap 'kill "$demo" 2>/dev/null; wait "$demo" 2>/dev/null || true; rm -f /tmp/fulcrum-demo.$$.log' EXIT

for _ in $(seq 50); do
  curl -fs -o /dev/null http://127.0.0.1:8080/ && break
  sleep 0.1
done

echo "== ${requests} requests through http://127.0.0.1:8080/"
for _ in $(seq "$requests"); do curl -s --max-time 5 http://127.0.0.1:8080/; done
echo "== fulcrum_requests_total"
curl -s --max-time 5 http://127.0.0.1:9090/metrics | grep '^fulcrum_requests_total'
