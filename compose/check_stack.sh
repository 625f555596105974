#!/usr/bin/env bash
# The guide's test_docker_websocket.sh, checking real delivery instead of "a socket opened":
# an event published at one end of a running stack must reach a subscriber at the other.
#
#   compose/check_stack.sh [--url http://localhost:8000] [--metrics URL] [--no-bot] [--timeout S]
#
# --url       the bridge (dashboard backend) of the stack: `tradebus up`, `tradebus bridge`
#             or the compose service dashboard-backend (default http://localhost:8000)
# --metrics   a Prometheus endpoint of the stack to check (e.g. http://localhost:9100/metrics)
# --no-bot    do not require a bot's own events (a stack without the demo bot)
# --timeout   seconds each delivery check may take (default 20)
# Environment: TRADEBUS (command, default `tradebus`, else .venv/bin/tradebus),
# PYTHON (default python3), VIEW_TOKEN / PUBLISH_TOKEN when the bridge requires tokens
# (a bridge without tokens lets only loopback connections publish: use --allow-publish),
# CHECK_STACK_SOURCE: the source id of the test events (default check-<pid>; on a bus with
# keys, one the bridge's key may publish as).
# Exit status: 0 when every check passed, 1 at the first failed check.
set -euo pipefail

url="http://localhost:8000"
metrics=""
want_bot=1
timeout=20
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url="${2:?--url needs a value}"; shift 2 ;;
    --metrics) metrics="${2:?--metrics needs a value}"; shift 2 ;;
    --no-bot) want_bot=0; shift ;;
    --timeout) timeout="${2:?--timeout needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "check_stack.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

here="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${TRADEBUS:-}" ]; then
  if command -v tradebus >/dev/null 2>&1; then TRADEBUS=tradebus
  else TRADEBUS="$here/../.venv/bin/tradebus"; fi
fi
PYTHON="${PYTHON:-python3}"
url="${url%/}"
ws="${url/#http/ws}/ws"
work="$(mktemp -d)"
listener=""
cleanup() {
  if [ -n "$listener" ]; then kill "$listener" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

step=0
ok() { echo "  ok   $*"; }
fail() {
  echo "  FAIL $1" >&2
  shift
  for hint in "$@"; do echo "       -> $hint" >&2; done
  exit 1
}
check() { step=$((step + 1)); echo "[$step] $*"; }

# GET a URL; prints the body; non-zero on connection errors and HTTP errors.
http_get() {
  "$PYTHON" - "$1" <<'PY'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as reply:
        sys.stdout.write(reply.read().decode(errors="replace"))
except urllib.error.HTTPError as error:
    sys.stdout.write(error.read().decode(errors="replace"))
    sys.exit(3)
except OSError as error:
    sys.stderr.write(f"{error}\n")
    sys.exit(4)
PY
}

echo "Checking the tradebus stack at $url"

check "bridge is alive ($url/health)"
body="$(http_get "$url/health" 2>"$work/err")" || fail "no answer from $url/health: $(cat "$work/err")" \
  "is the stack running? (tradebus up / docker compose ps)" \
  "is --url right? the compose file publishes the bridge on port 8000"
ok "$body"

check "bridge is connected to the bus ($url/ready)"
body="$(http_get "$url/ready" 2>"$work/err")" || fail "not ready: $body" \
  "the bridge cannot reach the proxy: check the bus-proxy service and TRADEBUS__BRIDGE_BUS"
ok "$body"

check "dashboard page is served ($url/)"
http_get "$url/" >"$work/page" 2>"$work/err" || fail "GET / failed: $(cat "$work/err")"
grep -qi "<html" "$work/page" || fail "GET / did not return a page"
ok "$(wc -c <"$work/page") bytes"

if [ "$want_bot" = 1 ]; then
  check "a bot's events reach a WebSocket subscriber"
  TRADEBUS_TOKEN="${VIEW_TOKEN:-}" $TRADEBUS tap --url "$ws" --expect 1 --duration "$timeout" \
    --quiet >"$work/bot.out" 2>"$work/bot.err" \
    || fail "no bot event within ${timeout}s: $(tail -n 3 "$work/bot.out" "$work/bot.err")" \
      "is the bot publishing? docker compose logs ai-trading-bot | grep -i websocket" \
      "is publishing enabled? SYSTEM__ENABLE_WEBSOCKET_PUBLISHING=true" \
      "metric tradebus_publisher_connected should be 1, tradebus_proxy_events_total growing"
  ok "$(head -n 1 "$work/bot.out")"
fi

check "an event published at one end is received at the other"
source_id="${CHECK_STACK_SOURCE:-check-$$}"
# Listen first, for events of this check's own source only, so the bot's traffic cannot
# stand in for the delivery being checked.
TRADEBUS_TOKEN="${VIEW_TOKEN:-}" TRADEBUS_LOG_LEVEL=INFO $TRADEBUS tap --url "$ws" \
  --from "$source_id" --expect 5 --duration "$timeout" >"$work/listen.out" 2>"$work/listen.err" &
listener=$!
for _ in $(seq 1 300); do  # a busy machine may take seconds to start python
  grep -q '"tap.websocket_connected"' "$work/listen.err" 2>/dev/null && break
  kill -0 "$listener" 2>/dev/null || break
  sleep 0.1
done
grep -q '"tap.websocket_connected"' "$work/listen.err" \
  || fail "the subscriber could not connect: $(tail -n 2 "$work/listen.err")"
TRADEBUS_TOKEN="${PUBLISH_TOKEN:-${VIEW_TOKEN:-}}" $TRADEBUS tap --url "$ws" --send all \
  --source "$source_id" >"$work/send.out" 2>"$work/send.err" \
  || fail "publishing was refused: $(grep -h -E 'REFUSED|error' "$work/send.out" "$work/send.err" | head -n 2)" \
    "publish_forbidden: run the bridge with --allow-publish (loopback) or use a publish token (PUBLISH_TOKEN)"
ok "$(tail -n 1 "$work/send.out")"
if wait "$listener"; then
  listener=""
  ok "received: $(grep -m1 '^tap summary' "$work/listen.out")"
else
  listener=""
  fail "the subscriber did not receive the 5 events: $(grep -m1 '^tap summary' "$work/listen.out" || true)" \
    "the bridge acknowledged them, so they went to the bus: check TRADEBUS__BRIDGE_PUBLISH_TO" \
    "on a bus with keys the bridge's key must name source $source_id (tradebus keys list; metric tradebus_proxy_rejected_total{reason="not_owner"})" \
    "metrics: tradebus_bridge_published_total vs tradebus_bridge_deliveries_total"
fi
grep -q ', 0 gaps ' "$work/listen.out" || fail "gaps reported: $(grep -m1 '^tap summary' "$work/listen.out")"

if [ -n "$metrics" ]; then
  check "metrics are exported ($metrics)"
  http_get "$metrics" >"$work/metrics" 2>"$work/err" || fail "no metrics: $(cat "$work/err")"
  grep -q '^tradebus_' "$work/metrics" || fail "no tradebus_ metrics at $metrics"
  ok "$(grep -c '^tradebus_' "$work/metrics") tradebus samples"
fi

echo "All checks passed: events published at one end arrive at the other."
