"""``tradebus <command>``: each command is a module of this package, on top of the others.

A command module exposes ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``.
A TradebusError (common.errors, the root of every package's errors) becomes one line on
stderr and exit status 2. bus, bridge, bot_client and monitoring import nothing from here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn, Protocol

from common.errors import TradebusError
from tradebus import __version__

# command name -> module; modules are imported only when their command runs
COMMANDS: dict[str, str] = {
    "proxy": "tradebus.proxy",
    "bridge": "tradebus.bridge",
    "up": "tradebus.up",
    "demo": "tradebus.demo",
    "tap": "tradebus.tap",
    "record": "tradebus.record",
    "replay": "tradebus.replay",
    "keys": "tradebus.keys",
}


class CommandModule(Protocol):
    HELP: str

    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, not usage plus message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _load(name: str) -> CommandModule:
    module: CommandModule = importlib.import_module(COMMANDS[name])
    return module


def build_parser(command: str | None) -> OneLineParser:
    parser = OneLineParser(prog="tradebus", description="Real-time event pipe for trading bots.")
    parser.add_argument("--version", action="version", version=f"tradebus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in COMMANDS:
        if command is None or name == command:
            module = _load(name)
            module.configure(sub.add_parser(name, help=module.HELP, description=module.HELP))
        else:
            sub.add_parser(name, help=f"run `tradebus {name} --help`")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _load(args.command).run(args)
    except TradebusError as error:
        print(f"tradebus {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
