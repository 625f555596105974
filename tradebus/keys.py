"""``tradebus keys new|list``: CURVE keys that decide who may connect to the bus."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Final

from bus.keys import (
    DEFAULT_KEYS_DIR,
    PROXY_KEY_NAME,
    ClientKeys,
    create_key,
    list_keys,
    load_client_keys,
)

HELP = "create and list the CURVE keys that decide who may connect to the bus"

DESCRIPTION = f"""\
CURVE keys for the bus. With keys, the proxy encrypts every connection and admits only
the clients whose public keys sit in its key directory; without them, anyone who can reach
its ports may publish and subscribe.

A key NAME is two files in the directory (--dir, default ./{DEFAULT_KEYS_DIR}):
  NAME.key         the public key, with the source ids NAME may publish as (--sources).
                   Copying it into the proxy's directory authorizes NAME.
  NAME.key_secret  the key pair, mode 0600, read only by the program that uses NAME.
                   Never copy it to another machine; programs refuse it if group or
                   others may read it.

Setting up (one directory on one machine, as `tradebus up --keys DIR` does):
  tradebus keys new proxy                          the proxy's own key, always named proxy
  tradebus keys new bridge                         a subscriber (no --sources)
  tradebus keys new bot-1 --sources bot-1          may publish as source bot-1 only
  tradebus proxy --keys ./{DEFAULT_KEYS_DIR}            admits bridge and bot-1
  tradebus bridge --keys ./{DEFAULT_KEYS_DIR}           uses bridge.key_secret and proxy.key
  SYSTEM__TRADEBUS_KEYS=./bot-keys python bot.py   a bot's directory: its pair + proxy.key

Clients on other machines: create the key where it is used
(`tradebus keys new bot-1 --dir ./bot-keys --sources bot-1`), copy bot-1.key to the
proxy's directory and the proxy's proxy.key into ./bot-keys. The proxy trusts the
--sources written in the copy it holds: check them with `tradebus keys list`.

Authorize a key: put NAME.key in the proxy's directory and restart the proxy.
Remove a key: delete NAME.key from the proxy's directory and restart the proxy.
Rotate a key: keys are never overwritten; create NAME-2, authorize it, switch the client
to it (--key-name or its directory), restart the proxy without the old NAME.key, then
delete the old files.
"""

# the key directory and key name of `tradebus record` and `tradebus replay`
KEYS_VARIABLE: Final = "TRADEBUS_KEYS"
KEY_NAME_VARIABLE: Final = "TRADEBUS_KEY_NAME"

NEW_HELP = "create a key pair NAME.key + NAME.key_secret (never overwrites)"
LIST_HELP = "show every key in the directory: name, role, sources, fingerprint"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="keys_action", metavar="ACTION")
    new = actions.add_parser("new", help=NEW_HELP, description=NEW_HELP)
    new.add_argument(
        "name",
        help=f"the key's name: {PROXY_KEY_NAME} for the proxy's own key, else the client's "
        "(letters, digits, _ . -); it is also the name the proxy knows the client by",
    )
    new.add_argument(
        "--sources",
        default="",
        help="comma-separated source ids this key may publish as (none: it may only subscribe)",
    )
    _add_dir(new)
    shown = actions.add_parser("list", help=LIST_HELP, description=LIST_HELP)
    _add_dir(shown)


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(DEFAULT_KEYS_DIR),
        help="the key directory (default ./%(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    if args.keys_action == "new":
        sources = [part.strip() for part in args.sources.split(",") if part.strip()]
        public, secret = create_key(args.dir, args.name, sources)
        print(f"created {public} (public) and {secret} (secret, mode 0600)")
        if args.name == PROXY_KEY_NAME:
            print(f"clients need a copy of {public}; the proxy uses {secret}")
        else:
            print(f"to authorize {args.name}: put {public.name} in the proxy's key directory")
        return 0
    if args.keys_action == "list":
        keys = list_keys(args.dir)
        if not keys:
            print(f"no keys in {args.dir}", file=sys.stderr)
            return 0
        width = max(len(info.name) for info in keys)
        print(f"{'NAME':<{width}}  {'ROLE':<10}  {'FINGERPRINT':<12}  SOURCES")
        for info in keys:
            shown = ",".join(sorted(info.sources)) or "-"
            print(f"{info.name:<{width}}  {info.role:<10}  {info.fingerprint:<12}  {shown}")
        return 0
    print("tradebus keys: say what to do: new or list (see tradebus keys --help)", file=sys.stderr)
    return 2


def add_client_key_arguments(parser: argparse.ArgumentParser) -> None:
    """``--keys DIR`` and ``--key-name NAME`` for a tool that connects to the bus."""
    parser.add_argument(
        "--keys",
        metavar="DIR",
        default=os.environ.get(KEYS_VARIABLE) or None,
        help="CURVE key directory for a proxy started with --keys: this client's "
        f"NAME.key_secret and the proxy's proxy.key (default ${KEYS_VARIABLE}; "
        "see `tradebus keys --help`)",
    )
    parser.add_argument(
        "--key-name",
        default=os.environ.get(KEY_NAME_VARIABLE) or None,
        help=f"which key pair in --keys (default ${KEY_NAME_VARIABLE}, or the only one)",
    )


def client_keys(args: argparse.Namespace) -> ClientKeys | None:
    """The keys ``--keys``/``--key-name`` name, or None; KeyFileError names file and why."""
    if not args.keys:
        return None
    return load_client_keys(args.keys, args.key_name)
