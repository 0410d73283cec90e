#!/usr/bin/env bash
# Quick load check: requests per second and latency of non-streamed chat completions, straight
# to the fake OpenAI upstream and through the gateway in front of it (SQLite, one tenant).
# Needs wrk (apt-get install wrk). Usage: scripts/load-check.sh [seconds] [connections]
#   TENANT_SETTINGS='"rateLimit": {...}, "cache": {...}'  more settings sections for the tenant
#   UNIQUE_BODIES=1   every request differs (a cache never hits)
#   REDIS_URL=...     limits, budgets and cache in Redis
#   TARGETS="gateway" only some of: direct gateway
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-8}
connections=${2:-32}
cargo build --release --workspace --bins
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait; rm -rf "$work"' EXIT
bin=$PWD/target/release
fake_port=4411
gateway_port=8811
"$bin/meta-chat-fake" --bind "127.0.0.1:$fake_port" >"$work/fake.log" 2>&1 &
export ADMIN_API_KEY=admin-load-check-key-0123456789abcdef
export OPENAI_API_KEY=fake OPENAI_BASE_URL="http://127.0.0.1:$fake_port"
export BIND_ADDR="127.0.0.1:$gateway_port" DATABASE_URL="sqlite://$work/load.db" RUST_LOG=warn
"$bin/meta-chat" serve >"$work/gateway.log" 2>&1 &
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$gateway_port/healthz" >/dev/null &&
    curl -s "http://127.0.0.1:$fake_port/v1/models" >/dev/null && break
  sleep 0.1
done
key=$(curl -sf "http://127.0.0.1:$gateway_port/api/tenants" \
  -H "Authorization: Bearer $ADMIN_API_KEY" -H "Content-Type: application/json" \
  -d "{\"name\": \"load\", \"settings\": {\"llm\": {\"provider\": \"openai\", \"model\": \"gpt-4o-mini\"}${TENANT_SETTINGS:+, $TENANT_SETTINGS}}}" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["apiKey"])')
script() {
  cat <<LUA
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello there, how are you?"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $1"
LUA
  if [ "${UNIQUE_BODIES:-0}" = 1 ]; then
    cat <<'LUA'
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil,
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello there, how are you? ' .. n .. '"}]}')
end
LUA
  fi
}
script fake >"$work/direct.lua"
script "$key" >"$work/gateway.lua"
for target in ${TARGETS:-direct gateway}; do
  if [ "$target" = direct ]; then port=$fake_port; else port=$gateway_port; fi
  echo "== $target"
  wrk -t1 -c"$connections" -d"${seconds}s" --latency -s "$work/$target.lua" \
    "http://127.0.0.1:$port/v1/chat/completions" | grep -E 'Requests/sec|50%|99%|Non-2xx'
done
