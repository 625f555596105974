#!/usr/bin/env bash
# `make test-compose`: the compose stack built and run on a real Docker engine, as a user
# would run it, with a PASS line for every check.
#
#   1. the engine: Debian's docker.io (dockerd started here in the background when none is
#      running, and stopped again at the end, by its PID); the compose v2 plugin
#      from Debian 13's docker-compose package when `docker compose` is missing (Debian 12's
#      docker-compose is v1, which rejects the file's `name:` key)
#   2. the base image compose/Dockerfile names (FROM): used as it is when present; else
#      built here, because no image registry is reachable from CI: debootstrap of Debian
#      bookworm with its Python, `docker import`, and compose/ci/base.Dockerfile on top,
#      tagged with exactly the name compose/Dockerfile pins. A second run reuses it.
#   3. each stack (docker-compose.yml, then with docker-compose.websocket.yml): build the
#      image from compose/Dockerfile unchanged, `up --wait` until healthy,
#      check_stack.sh inside dashboard-backend, the websocket-tester profile, the
#      dashboard's / and /health and the bus from the host's loopback, then `down`.
#   4. everything torn down: containers, networks, volumes of the stack; the engine
#      stopped if this script started it.
#
# Environment: TRADEBUS_TEST_TIMEOUT_FACTOR multiplies every wait (slow machines);
# TRADEBUS_COMPOSE_KEEP_ENGINE=1 leaves an engine this script started running.
# Exit status 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"

factor="${TRADEBUS_TEST_TIMEOUT_FACTOR:-1}"
seconds() { awk -v s="$1" -v f="$factor" 'BEGIN { printf "%d", s * f }'; }

work="$(mktemp -d /tmp/tradebus-compose-ci.XXXXXX)"
dockerd_pid=""
project="tradebus"
compose_files=()
started_at=$(date +%s)

say() { echo "[test-compose +$(($(date +%s) - started_at))s] $*"; }
pass() { echo "PASS [+$(($(date +%s) - started_at))s] $*"; }
fail() {
  echo "FAIL $*" >&2
  exit 1
}

# -- the engine ---------------------------------------------------------------------------------
engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

stop_engine() {
  [ -n "$dockerd_pid" ] || return 0
  if [ "${TRADEBUS_COMPOSE_KEEP_ENGINE:-}" = 1 ]; then
    say "leaving the engine this run started running (pid $dockerd_pid)"
    return 0
  fi
  say "stopping the engine this run started (pid $dockerd_pid)"
  kill -TERM "$dockerd_pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$dockerd_pid" 2>/dev/null; then
    say "dockerd $dockerd_pid did not stop within 30 s: killing it"
    kill -KILL "$dockerd_pid" 2>/dev/null || true
  fi
  wait "$dockerd_pid" 2>/dev/null || true
  dockerd_pid=""
}

stack() { docker compose -p "$project" "${compose_files[@]}" "$@"; }
# the same, killed after $1 seconds
stack_within() {
  local limit="$1"
  shift
  timeout "$limit" docker compose -p "$project" "${compose_files[@]}" "$@"
}

cleanup() {
  local status=$?
  trap - EXIT
  if engine_answers; then
    if [ $status -ne 0 ] && [ ${#compose_files[@]} -gt 0 ]; then
      echo "---- last lines of the stack's logs ----" >&2
      stack --profile debug logs --no-color --tail 40 >&2 2>&1 || true
      stack --profile debug ps -a >&2 2>&1 || true
    fi
    if [ ${#compose_files[@]} -gt 0 ]; then
      # (the scale file's profile single holds the bridge the debug profile's tester needs)
      timeout 120 docker compose -p "$project" "${compose_files[@]}" --profile debug \
        down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 \
        || timeout 120 docker compose -p "$project" "${compose_files[@]}" --profile debug \
          --profile single down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
    fi
    remove_leftovers
  fi
  stop_engine
  if [ $status -ne 0 ] && [ -s "$work/dockerd.log" ]; then
    echo "---- last lines of dockerd's log ----" >&2
    tail -n 20 "$work/dockerd.log" >&2
  fi
  rm -rf "$work"
  say "done, exit status $status"
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

apt_install() {
  apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 update -q >"$work/apt.log" 2>&1 \
    || fail "apt-get update: $(tail -n 3 "$work/apt.log")"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 \
    install -y -q \
    --no-install-recommends "$@" >>"$work/apt.log" 2>&1 \
    || fail "apt-get install $*: $(tail -n 3 "$work/apt.log")"
}

install_tools() {
  local need=()
  command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
  command -v docker >/dev/null 2>&1 || need+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} (Debian packages)"
    apt_install "${need[@]}"
  fi
  if ! docker compose version 2>/dev/null | grep -q 'version v\?2\.'; then
    install_compose_plugin
  fi
  pass "tools: $(docker --version | head -n 1); $(docker compose version | head -n 1)"
}

# Debian 13's docker-compose package is the compose v2 plugin (it needs only libc6 >= 2.34).
# Fetched with a private apt configuration, so no Debian 13 source is ever enabled on the
# machine.
install_compose_plugin() {
  say "installing the compose v2 plugin from Debian 13's docker-compose package"
  local apt="$work/apt-trixie"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/deb"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    >"$apt/sources.list"
  local options=(
    -o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o APT::Sandbox::User=root
    -o Acquire::Retries=3
  )
  apt-get "${options[@]}" update -q >"$work/apt-trixie.log" 2>&1 \
    || fail "reading Debian 13's package list: $(tail -n 3 "$work/apt-trixie.log")"
  (cd "$apt/deb" && apt-get "${options[@]}" download docker-compose >>"$work/apt-trixie.log" 2>&1) \
    || fail "downloading docker-compose from Debian 13: $(tail -n 3 "$work/apt-trixie.log")"
  dpkg-deb -x "$apt"/deb/docker-compose_*.deb "$apt/unpacked"
  install -D -m 0755 "$apt/unpacked/usr/libexec/docker/cli-plugins/docker-compose" \
    /usr/local/lib/docker/cli-plugins/docker-compose
  docker compose version | grep -q 'version v\?2\.' || fail "docker compose is not v2 after install"
}

start_engine() {
  if engine_answers; then
    pass "engine: a running Docker engine is used ($(docker info -f '{{.ServerVersion}}'); not started here, not stopped here)"
    return 0
  fi
  say "starting dockerd in the background"
  dockerd >"$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  local deadline=$(($(date +%s) + $(seconds 60)))
  until engine_answers; do
    kill -0 "$dockerd_pid" 2>/dev/null || {
      dockerd_pid=""
      fail "dockerd exited at start: $(tail -n 5 "$work/dockerd.log")"
    }
    [ "$(date +%s)" -lt "$deadline" ] || fail "dockerd did not answer within $(seconds 60) s"
    sleep 0.5
  done
  pass "engine: dockerd $(docker info -f '{{.ServerVersion}}') started by this run (pid $dockerd_pid, storage $(docker info -f '{{.Driver}}'))"
}

# -- the base image ------------------------------------------------------------------------------
base_image="$(awk 'toupper($1) == "FROM" { print $2; exit }' compose/Dockerfile)"
rootfs_image="tradebus-ci/debian-bookworm-python:rootfs"
stand_in_label="org.tradebus.ci.stand-in"
ca_bundle=/etc/ssl/certs/ca-certificates.crt

label_of() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

# Debian bookworm with its Python, from debootstrap: the root of the stand-in images
ensure_rootfs() {
  docker image inspect "$rootfs_image" >/dev/null 2>&1 && return 0
  say "building $rootfs_image with debootstrap (Debian bookworm, minbase, Python 3)"
  local rootfs="$work/rootfs" attempt
  for attempt in 1 2; do
    rm -rf "$rootfs"
    if timeout "$(seconds 1200)" debootstrap --variant=minbase \
      --include=python3,python3-venv,python3-pip,python3-dev,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1; then
      break
    fi
    [ "$attempt" = 1 ] || fail "debootstrap: $(tail -n 5 "$work/debootstrap.log")"
    say "debootstrap failed ($(tail -n 1 "$work/debootstrap.log")): retrying once"
  done
  printf '%s\n' "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" \
    >"$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$rootfs_image" >/dev/null || fail "docker import of the debootstrap root"
  rm -rf "$rootfs"
}

# The load balancer's image docker-compose.scale.yml names: used as it is when present,
# else Debian's HAProxy on the same root (compose/ci/haproxy.Dockerfile) under that name
haproxy_image="$(awk '$1 == "image:" && $2 ~ /^haproxy:/ { print $2; exit }' compose/docker-compose.scale.yml 2>/dev/null || true)"

ensure_haproxy_image() {
  [ -n "$haproxy_image" ] || return 0
  if docker image inspect "$haproxy_image" >/dev/null 2>&1; then
    pass "load balancer image: $haproxy_image present, used as it is"
    return 0
  fi
  ensure_rootfs
  local context="$work/haproxy" attempt
  mkdir -p "$context"
  cp compose/ci/haproxy.Dockerfile "$context/Dockerfile"
  for attempt in 1 2; do
    if DOCKER_BUILDKIT=0 timeout "$(seconds 600)" docker build --quiet \
      --build-arg ROOTFS="$rootfs_image" --label "$stand_in_label=haproxy" \
      -t "$haproxy_image" "$context" >"$work/haproxy-build.log" 2>&1; then
      break
    fi
    [ "$attempt" = 1 ] || fail "building the stand-in $haproxy_image: $(tail -n 5 "$work/haproxy-build.log")"
    say "building $haproxy_image failed: retrying once"
  done
  pass "load balancer image: $haproxy_image built here ($(docker run --rm "$haproxy_image" haproxy -v 2>&1 | head -n 1))"
}

ensure_base_image() {
  [ -n "$base_image" ] || fail "compose/Dockerfile names no base image"
  local ca_sum
  ca_sum="$(sha256sum "$ca_bundle" | cut -d' ' -f1)"
  if docker image inspect "$base_image" >/dev/null 2>&1; then
    local stand_in
    stand_in="$(label_of "$base_image" "$stand_in_label")"
    if [ -z "$stand_in" ] || [ "$stand_in" = "<no value>" ]; then
      pass "base image: $base_image present (not built here), used as it is"
      return 0
    fi
    if [ "$stand_in" = "$ca_sum" ]; then
      pass "base image: $base_image reused (stand-in built by an earlier run)"
      return 0
    fi
    say "the machine's CA bundle changed since $base_image was built: rebuilding its top layer"
  fi
  ensure_rootfs
  local context="$work/base"
  mkdir -p "$context"
  cp compose/ci/base.Dockerfile "$context/Dockerfile"
  cp "$ca_bundle" "$context/host-ca-bundle.crt"
  DOCKER_BUILDKIT=0 timeout "$(seconds 600)" docker build --quiet \
    --build-arg ROOTFS="$rootfs_image" --label "$stand_in_label=$ca_sum" \
    -t "$base_image" "$context" >"$work/base-build.log" 2>&1 \
    || fail "building the stand-in base image: $(tail -n 5 "$work/base-build.log")"
  pass "base image: $base_image built here (Debian bookworm's $(docker run --rm "$base_image" python --version 2>&1))"
}

# -- leftovers of an older stack -----------------------------------------------------------------
# The old stack fixed trading-network's subnet; another project's network of the same name
# or range must not stop `up` (docker compose only warns about a network another compose
# project created).
leftover_range="tradebus-ci-leftover-range"
leftover_subnet="172.28.0.0/16"

# containers of this project an interrupted earlier run left (they would hold the ports)
remove_earlier_runs() {
  local left
  left="$(docker ps -aq --filter "label=com.docker.compose.project=$project")"
  if [ -n "$left" ]; then
    say "removing containers an earlier run left: $(echo "$left" | wc -l)"
    echo "$left" | xargs docker rm -f >/dev/null
  fi
  docker volume ls -q --filter "label=com.docker.compose.project=$project" | xargs -r docker volume rm >/dev/null
}

remove_leftovers() {
  docker network rm "$leftover_range" >/dev/null 2>&1 || true
  if [ "$(docker network inspect -f '{{ index .Labels "com.docker.compose.project" }}' trading-network 2>/dev/null)" = "tradebus-ci-old-stack" ]; then
    docker network rm trading-network >/dev/null 2>&1 || true
  fi
}

leave_network_in_old_range() {
  docker network create --subnet "$leftover_subnet" "$leftover_range" >/dev/null
  say "left over: network $leftover_range holding $leftover_subnet (the old stack's range)"
}

leave_network_of_old_stack() {
  docker network create --subnet "$leftover_subnet" \
    --label com.docker.compose.project=tradebus-ci-old-stack \
    --label com.docker.compose.network=trading-network trading-network >/dev/null
  say "left over: network trading-network ($leftover_subnet) of another compose project"
}

# -- one stack -----------------------------------------------------------------------------------
http_check() {
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
url, needle = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(url, timeout=10) as reply:
    body = reply.read().decode(errors="replace")
    if reply.status != 200 or needle not in body:
        sys.exit(f"{url}: HTTP {reply.status}, {needle!r} not in the body")
print(f"{url}: HTTP {reply.status}, {len(body)} bytes")
PY
}

run_stack() {
  local label="$1"
  shift
  compose_files=()
  for file in "$@"; do compose_files+=(-f "compose/$file"); done
  say "stack $label: $*"

  # pip and apt in the build reach the package registries: one retry for a network hiccup
  if ! stack_within "$(seconds 1200)" build >"$work/build.log" 2>&1; then
    say "[$label] docker compose build failed ($(tail -n 1 "$work/build.log")): retrying once"
    stack_within "$(seconds 1200)" build >"$work/build.log" 2>&1 \
      || fail "[$label] docker compose build: $(tail -n 15 "$work/build.log")"
  fi
  pass "[$label] image built from compose/Dockerfile"

  stack_within "$(seconds 300)" up -d --wait --wait-timeout "$(seconds 240)" \
    >"$work/up.log" 2>&1 || fail "[$label] up --wait: $(tail -n 15 "$work/up.log")"
  pass "[$label] up --wait: $(stack ps --format '{{.Service}} {{.Health}}' | sort | paste -sd, -)"

  local published
  published="$(stack port dashboard-backend 8000)"
  [ "$published" = "127.0.0.1:8000" ] || fail "[$label] dashboard-backend port 8000 published on $published, not the host's loopback"
  pass "[$label] dashboard-backend published on the host's loopback only ($published)"

  stack_within "$(seconds 120)" exec -T dashboard-backend check_stack.sh \
    --url http://127.0.0.1:8000 --timeout "$(seconds 20)" >"$work/check.log" 2>&1 \
    || fail "[$label] check_stack.sh in dashboard-backend: $(cat "$work/check.log")"
  pass "[$label] check_stack.sh inside dashboard-backend: $(tail -n 1 "$work/check.log")"

  stack_within "$(seconds 120)" --profile debug run --rm websocket-tester \
    >"$work/tester.log" 2>&1 || fail "[$label] websocket-tester: $(tail -n 15 "$work/tester.log")"
  pass "[$label] websocket-tester profile: $(grep -m1 '^tap summary' "$work/tester.log" || tail -n 1 "$work/tester.log")"

  pass "[$label] dashboard from the host: $(http_check http://127.0.0.1:8000/ '<html')"
  pass "[$label] health from the host: $(http_check http://127.0.0.1:8000/health ok)"

  check_key_mounts "$label"
  authorize_host_key "$label"
  check_bus_from_host "$label"
  check_bus_refuses_strangers "$label"
  if [ "$label" = base ]; then
    rotate_bot_key "$label"
    add_second_bot "$label"
  fi

  stack_within "$(seconds 120)" --profile debug down --volumes --remove-orphans --timeout 10 \
    >"$work/down.log" 2>&1 || fail "[$label] down: $(tail -n 5 "$work/down.log")"
  [ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$project")" ] \
    || fail "[$label] containers left after down"
  pass "[$label] down: no container left"
  compose_files=()
}

# -- CURVE keys ----------------------------------------------------------------------------------
# the files a service's key volume holds, as that service sees them
keys_seen_by() { stack exec -T "$1" sh -c 'cd /keys && ls -A | sort | paste -sd" " -'; }

check_key_mounts() {
  local label="$1" seen
  seen="$(keys_seen_by ai-trading-bot)"
  [ "$seen" = "ai-trading-bot.key ai-trading-bot.key_secret proxy.key" ] \
    || fail "[$label] ai-trading-bot sees these keys: $seen"
  pass "[$label] ai-trading-bot sees only its own key pair and proxy.key"
  seen="$(keys_seen_by dashboard-backend)"
  [ "$seen" = "bridge.key bridge.key_secret proxy.key" ] \
    || fail "[$label] dashboard-backend sees these keys: $seen"
  pass "[$label] dashboard-backend sees only its own key pair and proxy.key"
  seen="$(keys_seen_by bus-proxy)"
  case " $seen " in
    *" proxy.key_secret "*) ;;
    *) fail "[$label] bus-proxy has no proxy.key_secret: $seen" ;;
  esac
  [ "$(echo "$seen" | tr ' ' '\n' | grep -c '_secret$')" = 1 ] \
    || fail "[$label] bus-proxy sees another service's secret: $seen"
  pass "[$label] bus-proxy sees its own key pair and the public keys it admits: $seen"
}

# README's "let an analytics program on another host subscribe", with this host as the other
host_keys=""
authorize_host_key() {
  local label="$1"
  host_keys="$work/host-keys-$label"
  "$repo/.venv/bin/tradebus" keys new ci-analytics --dir "$host_keys" >/dev/null
  stack_within "$(seconds 120)" run --rm \
    -v "$host_keys/ci-analytics.key:/keys/add/ci-analytics.key:ro" keys >"$work/keys.log" 2>&1 \
    || fail "[$label] adding the host's public key: $(tail -n 5 "$work/keys.log")"
  stack_within "$(seconds 120)" restart bus-proxy >"$work/restart.log" 2>&1 \
    || fail "[$label] restarting bus-proxy: $(tail -n 5 "$work/restart.log")"
  stack_within "$(seconds 300)" up -d --wait --wait-timeout "$(seconds 240)" >"$work/up.log" 2>&1 \
    || fail "[$label] up --wait after the proxy restart: $(tail -n 15 "$work/up.log")"
  stack cp bus-proxy:/keys/proxy.key "$host_keys/proxy.key" >/dev/null 2>&1 \
    || fail "[$label] copying proxy.key out of bus-proxy"
  pass "[$label] the host's key ci-analytics admitted by the proxy (after its restart)"
}

# lines of a recording but its header
recorded_events() { grep -vc '"tradebus_recording"' "$1" || true; }

# bus.Subscriber / tradebus record on the host, against the proxy's ports published on
# the host's loopback, exactly as docs/subscriber.md runs them against `tradebus up`.
check_bus_from_host() {
  local label="$1"
  local tradebus="$repo/.venv/bin/tradebus"
  [ -x "$tradebus" ] || fail "no $tradebus: run make venv first (make test-compose does)"
  TRADEBUS_KEYS="$host_keys" timeout "$(seconds 60)" "$tradebus" record - --snapshot \
    --count 5 --duration "$(seconds 30)" >"$work/record.jsonl" 2>"$work/record.err" \
    || fail "[$label] tradebus record on the host: $(tail -n 3 "$work/record.err")"
  local events
  events="$(recorded_events "$work/record.jsonl")"
  [ "$events" -ge 5 ] || fail "[$label] tradebus record on the host got $events events, wanted 5: $(tail -n 3 "$work/record.err")"
  pass "[$label] bus from the host's loopback with the host's key: tradebus record got $events events"
}

check_bus_refuses_strangers() {
  local label="$1" stranger="$work/stranger-keys-$label"
  "$repo/.venv/bin/tradebus" keys new stranger --dir "$stranger" >/dev/null
  cp "$host_keys/proxy.key" "$stranger/proxy.key"
  local status=0
  TRADEBUS_KEYS="$stranger" timeout "$(seconds 60)" "$repo/.venv/bin/tradebus" record - \
    --snapshot --count 1 --duration "$(seconds 10)" >"$work/stranger.jsonl" 2>"$work/stranger.err" \
    || status=$?
  [ "$(recorded_events "$work/stranger.jsonl")" = 0 ] \
    || fail "[$label] a key the proxy never admitted received events"
  [ "$status" -ne 0 ] || fail "[$label] tradebus record with an unknown key exited 0"
  local plain=0
  timeout "$(seconds 60)" "$repo/.venv/bin/tradebus" record - --count 1 \
    --duration "$(seconds 5)" >"$work/plain.jsonl" 2>"$work/plain.err" || plain=$?
  [ "$(recorded_events "$work/plain.jsonl")" = 0 ] \
    || fail "[$label] a subscriber without CURVE received events"
  pass "[$label] the bus refuses an unknown key (exit $status: $(tail -n 1 "$work/stranger.err" | cut -c1-160)) and a client without keys (no event)"
}

# README's key rotation: retire the bot's key, restart the proxy and the bot, events flow again
rotate_bot_key() {
  local label="$1" before after
  before="$(stack exec -T ai-trading-bot sh -c 'sed -n "/public-key/p" /keys/ai-trading-bot.key')"
  stack_within "$(seconds 120)" run --rm keys --rotate ai-trading-bot >"$work/keys.log" 2>&1 \
    || fail "[$label] compose-keys --rotate: $(tail -n 5 "$work/keys.log")"
  stack_within "$(seconds 120)" restart bus-proxy ai-trading-bot >"$work/restart.log" 2>&1 \
    || fail "[$label] restart after the rotation: $(tail -n 5 "$work/restart.log")"
  stack_within "$(seconds 300)" up -d --wait --wait-timeout "$(seconds 240)" >"$work/up.log" 2>&1 \
    || fail "[$label] up --wait after the rotation: $(tail -n 15 "$work/up.log")"
  after="$(stack exec -T ai-trading-bot sh -c 'sed -n "/public-key/p" /keys/ai-trading-bot.key')"
  [ -n "$after" ] && [ "$before" != "$after" ] || fail "[$label] the bot's key did not change"
  stack_within "$(seconds 120)" exec -T dashboard-backend check_stack.sh \
    --url http://127.0.0.1:8000 --timeout "$(seconds 20)" >"$work/check.log" 2>&1 \
    || fail "[$label] check_stack.sh after the rotation: $(cat "$work/check.log")"
  pass "[$label] ai-trading-bot's key rotated: the bot's events flow again (check_stack.sh)"
}

# README's "add a second bot": the example file, `up`, restart the proxy, its events arrive
add_second_bot() {
  local label="$1"
  compose_files+=(-f compose/docker-compose.second-bot.yml)
  stack_within "$(seconds 120)" run --rm keys >"$work/keys.log" 2>&1 \
    || fail "[$label] keys for the second bot: $(tail -n 5 "$work/keys.log")"
  stack_within "$(seconds 120)" restart bus-proxy >"$work/restart.log" 2>&1 \
    || fail "[$label] restarting bus-proxy for the second bot: $(tail -n 5 "$work/restart.log")"
  stack_within "$(seconds 300)" up -d --wait --wait-timeout "$(seconds 240)" >"$work/up.log" 2>&1 \
    || fail "[$label] up --wait with the second bot: $(tail -n 15 "$work/up.log")"
  local seen
  seen="$(keys_seen_by second-bot)"
  [ "$seen" = "proxy.key second-bot.key second-bot.key_secret" ] \
    || fail "[$label] second-bot sees these keys: $seen"
  stack_within "$(seconds 120)" exec -T dashboard-backend tradebus tap \
    --url ws://127.0.0.1:8000/ws --from second-bot --expect 3 --duration "$(seconds 30)" --quiet \
    >"$work/second.log" 2>&1 || fail "[$label] no event of second-bot: $(tail -n 5 "$work/second.log")"
  pass "[$label] a second bot added with its own key: $(grep -m1 '^tap summary' "$work/second.log" || tail -n 1 "$work/second.log")"
}

# docker-compose.scale.yml: two bridges behind the load balancer, one address for browsers
run_scale_stack() {
  local label="scale"
  compose_files=(-f compose/docker-compose.yml -f compose/docker-compose.scale.yml)
  say "stack $label: docker-compose.yml docker-compose.scale.yml"
  stack_within "$(seconds 300)" up -d --wait --wait-timeout "$(seconds 240)" \
    >"$work/up.log" 2>&1 || fail "[$label] up --wait: $(tail -n 15 "$work/up.log")"
  pass "[$label] up --wait: $(stack ps --format '{{.Service}} {{.State}} {{.Health}}' | sort | paste -sd, -)"
  local published
  published="$(stack port load-balancer 8000)"
  [ "$published" = "127.0.0.1:8000" ] || fail "[$label] load-balancer port 8000 published on $published, not the host's loopback"
  pass "[$label] load-balancer published on the host's loopback only ($published)"
  local bridge seen
  for bridge in dashboard-backend-1 dashboard-backend-2; do
    seen="$(keys_seen_by "$bridge")"
    [ "$seen" = "bridge.key bridge.key_secret proxy.key" ] || fail "[$label] $bridge sees these keys: $seen"
    stack_within "$(seconds 120)" exec -T "$bridge" check_stack.sh \
      --url http://127.0.0.1:8000 --timeout "$(seconds 20)" >"$work/check.log" 2>&1 \
      || fail "[$label] check_stack.sh in $bridge: $(cat "$work/check.log")"
    pass "[$label] $bridge: only the bridge's keys; check_stack.sh inside it: $(tail -n 1 "$work/check.log")"
  done
  pass "[$label] dashboard through the load balancer: $(http_check http://127.0.0.1:8000/ '<html')"
  tap_through_load_balancer "$label" "both bridges up"
  stack_within "$(seconds 60)" stop dashboard-backend-1 >"$work/stop.log" 2>&1 \
    || fail "[$label] stopping dashboard-backend-1: $(tail -n 5 "$work/stop.log")"
  tap_through_load_balancer "$label" "dashboard-backend-1 stopped"
  stack_within "$(seconds 120)" down --volumes --remove-orphans --timeout 10 \
    >"$work/down.log" 2>&1 || fail "[$label] down: $(tail -n 5 "$work/down.log")"
  [ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$project")" ] \
    || fail "[$label] containers left after down"
  pass "[$label] down: no container left"
  compose_files=()
}

# a WebSocket subscriber on the host, through HAProxy: the bot's live events arrive
tap_through_load_balancer() {
  local label="$1" state="$2"
  timeout "$(seconds 60)" "$repo/.venv/bin/tradebus" tap --url ws://127.0.0.1:8000/ws \
    --expect 5 --duration "$(seconds 30)" --quiet >"$work/lb.log" 2>&1 \
    || fail "[$label] no events through the load balancer ($state): $(tail -n 3 "$work/lb.log")"
  pass "[$label] events through the load balancer, $state: $(grep -m1 '^tap summary' "$work/lb.log" || tail -n 1 "$work/lb.log")"
}

install_tools
start_engine
ensure_base_image
ensure_haproxy_image
remove_earlier_runs
remove_leftovers
leave_network_in_old_range
run_stack "base" docker-compose.yml
remove_leftovers
leave_network_of_old_stack
# the override's tokens, as an operator puts them in compose/.env
TRADEBUS_PUBLISH_TOKEN="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
TRADEBUS_VIEW_TOKEN="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
export TRADEBUS_PUBLISH_TOKEN TRADEBUS_VIEW_TOKEN
run_stack "websocket" docker-compose.yml docker-compose.websocket.yml
remove_leftovers
run_scale_stack
pass "compose stack: every check passed in $(($(date +%s) - started_at)) s"
