"""``tradebus bridge``: the WebSocket edge between the bus and browsers (and WS publishers).

Every flag has a TRADEBUS__BRIDGE_<NAME> environment variable; a flag given on the command
line wins over the variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from bridge.config import SETTINGS, BridgeConfig
from bus import settings
from monitoring.logging import configure_logging, get_logger

HELP = "run the WebSocket bridge: bus -> browsers at ws://HOST:PORT/ws, plus WS publishers"


def configure(parser: argparse.ArgumentParser) -> None:
    # values stay text: BridgeConfig.from_env parses them, naming the flag in its errors
    settings.add_arguments(parser, SETTINGS)


def config_from_args(args: argparse.Namespace) -> BridgeConfig:
    return BridgeConfig.from_env(flags=settings.flag_texts(args, SETTINGS))


async def _serve_until_signalled(config: BridgeConfig) -> None:
    from bridge.app import run_bridge

    serving = asyncio.create_task(run_bridge(config))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, serving.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serving


def run(args: argparse.Namespace) -> int:
    configure_logging()
    config = config_from_args(args)
    log = get_logger("bridge")
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_until_signalled(config))
    else:
        # uvloop's transports cost about half of asyncio's per write and per wakeup
        uvloop.run(_serve_until_signalled(config))
    log.info("bridge.exited")
    return 0
