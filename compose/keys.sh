#!/bin/sh
# The compose stack's CURVE keys (the one-shot service `keys`, run before the others start).
#
# Every key is created once, into the key store (/keys/store, the volume `keys-store`), and
# never overwritten. Then each service's own volume gets exactly the files it needs:
#   /keys/proxy       proxy.key_secret + proxy.key, and NAME.key of every client it admits
#   /keys/bridge      bridge.key_secret + bridge.key + proxy.key; the bridge may publish as
#                     the sources in $BRIDGE_SOURCES (comma-separated), for its WebSocket
#                     publishers
#   /keys/bot/NAME    (one volume per bot) NAME.key_secret + NAME.key + proxy.key; NAME may
#                     publish as source NAME only
# so no service sees another's secret. A bot's key is created for every directory mounted
# under /keys/bot/. Public keys of programs elsewhere (an analytics host) that are mounted
# under /keys/add/ are added to the store, so the proxy admits them.
#
#   compose-keys                     create what is missing, then copy
#   compose-keys --rotate NAME...    retire NAME's key (kept in /keys/store/retired/), make
#                                    a new one, copy; then restart the proxy and NAME
#   compose-keys --remove NAME...    retire NAME's key: the proxy no longer admits it
#
# Environment (for tests): COMPOSE_KEYS_ROOT instead of /keys; COMPOSE_KEYS_OWNER, the user
# owning the files (default tradebus, the image's; empty: leave the owner as it is).
set -eu

root="${COMPOSE_KEYS_ROOT:-/keys}"
store="$root/store"
owner="${COMPOSE_KEYS_OWNER-tradebus}"

note() { echo "compose-keys: $*"; }

retire() {
  name="$1"
  if [ ! -e "$store/$name.key" ] && [ ! -e "$store/$name.key_secret" ]; then
    note "no key $name in the store"
    exit 2
  fi
  retired="$store/retired/$(date -u +%Y%m%dT%H%M%SZ)"
  mkdir -p "$retired"
  for file in "$store/$name.key" "$store/$name.key_secret"; do
    if [ -e "$file" ]; then mv "$file" "$retired/"; fi
  done
  note "retired $name (its files are in $retired)"
}

# create NAME [SOURCES]: a key in the store, unless it is there
create() {
  if [ ! -e "$store/$1.key_secret" ] && [ ! -e "$store/$1.key" ]; then
    if [ -n "${2:-}" ]; then
      tradebus keys new "$1" --dir "$store" --sources "$2" >/dev/null
    else
      tradebus keys new "$1" --dir "$store" >/dev/null
    fi
    note "created $1"
  fi
}

# fill DIR with exactly the given files from the store (anything else in DIR is removed)
fill() {
  dir="$1"
  shift
  mkdir -p "$dir"
  find "$dir" -mindepth 1 -maxdepth 1 -name '*.key*' -exec rm -f {} +
  for file in "$@"; do
    cp "$store/$file" "$dir/$file"
  done
  if [ -n "$owner" ]; then chown -R "$owner:$owner" "$dir"; fi
  chmod 0700 "$dir"
  find "$dir" -name '*.key_secret' -exec chmod 0600 {} +
  find "$dir" -name '*.key' -exec chmod 0644 {} +
}

mkdir -p "$store"
chmod 0700 "$store"
action="${1:-}"
case "$action" in
  --rotate | --remove)
    shift
    [ $# -gt 0 ] || { note "$action needs the key names"; exit 2; }
    for name in "$@"; do retire "$name"; done
    ;;
  "") ;;
  *)
    note "unknown argument $action (see the comment at the top of this script)"
    exit 2
    ;;
esac

create proxy
if [ -d "$root/bridge" ]; then create bridge "${BRIDGE_SOURCES:-}"; fi
for dir in "$root"/bot/*/; do
  [ -d "$dir" ] || continue
  bot="$(basename "$dir")"
  if [ "$action" = --remove ] && [ ! -e "$store/$bot.key_secret" ]; then
    continue  # removed on purpose: the bot's volume is emptied below, not refilled
  fi
  create "$bot" "$bot"
done
for added in "$root"/add/*.key; do
  [ -e "$added" ] || continue
  name="$(basename "$added" .key)"
  if [ "$name" = proxy ] || [ -e "$store/$name.key_secret" ]; then
    note "refusing $root/add/$name.key: the store has a key of that name"
    exit 2
  fi
  cp "$added" "$store/$name.key"
  note "added the public key $name (from another host)"
done

# the proxy admits every public key in the store
clients=""
for public in "$store"/*.key; do
  name="$(basename "$public")"
  [ "$name" = proxy.key ] || clients="$clients $name"
done
# shellcheck disable=SC2086  # the names hold no spaces (tradebus keys allows [A-Za-z0-9_.-])
fill "$root/proxy" proxy.key_secret proxy.key $clients
if [ -d "$root/bridge" ]; then fill "$root/bridge" bridge.key_secret bridge.key proxy.key; fi
for dir in "$root"/bot/*/; do
  [ -d "$dir" ] || continue
  bot="$(basename "$dir")"
  if [ -e "$store/$bot.key_secret" ]; then
    fill "${dir%/}" "$bot.key_secret" "$bot.key" proxy.key
  else
    fill "${dir%/}"
  fi
done
if [ -n "$owner" ]; then chown -R "$owner:$owner" "$store"; fi
note "keys ready: proxy admits$(echo "$clients" | sed 's/\.key//g')"
