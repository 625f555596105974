"""``tradebus up``: the whole stack in one process: proxy, bridge and a demo bot.

The proxy forwards on its own threads (libzmq), the bridge and the demo bot share one
asyncio loop, and the demo bot publishes straight onto the bus through bot_client, exactly
like a real bot would. The bridge lets loopback connections publish, so a bot configured as
the guide says (``SYSTEM__WEBSOCKET_DASHBOARD_URL=ws://localhost:8000/ws``) reaches the
dashboard too. Ctrl-C or SIGTERM stops everything in reverse order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from bridge import config as bridge_config
from bus import proxy_config, settings
from bus.errors import SettingError
from bus.keys import PROXY_KEY_NAME, SECRET_SUFFIX, create_key, load_server_keys
from bus.proxy import Proxy, ProxyConfig
from monitoring.logging import configure_logging, get_logger
from monitoring.metrics import MetricsServer, PublisherCollector
from tradebus.demo import add_demo_arguments, demo_settings, make_publisher, run_demo
from tradebus.proxy import proxy_collector

HELP = "run proxy + bridge + demo bot in one process and print the dashboard URL"

DEFAULT_METRICS_PORT = 9100
# the keys `tradebus up --keys DIR` creates when absent: name -> sources
BRIDGE_KEY_NAME = "bridge"
DEMO_KEY_NAME = "demo-bot"
STACK_KEYS: dict[str, tuple[str, ...]] = {
    PROXY_KEY_NAME: (),
    # the bridge puts its WebSocket publishers' events on the bus under its own key, so its
    # certificate names their sources (--demo-via-websocket: the demo bot's)
    BRIDGE_KEY_NAME: (DEMO_KEY_NAME,),
    DEMO_KEY_NAME: (DEMO_KEY_NAME,),
}


class RegistryCollector(Collector):
    """Re-exports another registry, so one scrape of ``tradebus up`` sees the bridge too."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


# the proxy's and the bridge's settings that ``up`` takes too, with its own help; read as
# text and parsed in ``run`` (settings.resolve), so an error names the flag or the variable
SETTINGS: tuple[settings.Setting, ...] = (
    replace(bridge_config.SETTING["host"], help="address the bridge and metrics listen on"),
    replace(
        bridge_config.SETTING["port"],
        help="the bridge's HTTP/WebSocket port; 0 picks a free one",
    ),
    replace(
        proxy_config.FRONTEND,
        help="the proxy's publisher endpoint (tcp://127.0.0.1:* = any port)",
    ),
    replace(proxy_config.BACKEND, help="the proxy's subscriber endpoint"),
    replace(proxy_config.SNAPSHOT, help="the proxy's snapshot endpoint"),
    settings.Setting(
        "metrics_port",
        "TRADEBUS__UP_METRICS_PORT",
        settings.port_number(),
        "--metrics-port",
        DEFAULT_METRICS_PORT,
        "Prometheus metrics of proxy, bridge and demo bot; 0 picks a free port",
    ),
)


def configure(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, SETTINGS)
    parser.add_argument("--no-metrics", action="store_true", help="serve no metrics port")
    parser.add_argument(
        "--keys",
        metavar="DIR",
        help="run the bus with CURVE keys from DIR, creating the proxy's, the bridge's and "
        "the demo bot's (source demo-bot) when absent (see `tradebus keys --help`)",
    )
    parser.add_argument("--no-demo", action="store_true", help="start no demo bot")
    parser.add_argument(
        "--demo-via-websocket",
        action="store_true",
        help="the demo bot publishes through the bridge's /ws like a guide bot, not on the bus",
    )
    add_demo_arguments(parser, prefix="demo-")


def ensure_stack_keys(directory: str) -> list[str]:
    """Create the stack's keys that ``directory`` lacks; the names of those created."""
    created = []
    for name, sources in STACK_KEYS.items():
        if not os.path.lexists(os.path.join(directory, name + SECRET_SUFFIX)):
            create_key(directory, name, sources)
            created.append(name)
    return created


def _dashboard_url(host: str, port: int) -> str:
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1", "") else host
    return f"http://{shown}:{port}/"


def run(args: argparse.Namespace) -> int:
    configure_logging()
    settings.resolve(args, SETTINGS, os.environ, SettingError)
    return asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> int:
    from bridge.app import start_bridge
    from bridge.config import BridgeConfig

    log = get_logger("up")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    settings = None if args.no_demo else demo_settings(args.demo_symbols)
    keys = None
    if args.keys:
        created = ensure_stack_keys(args.keys)
        if created:
            log.info("up.keys_created", directory=args.keys, keys=created)
        keys = load_server_keys(args.keys)

    proxy = Proxy(
        ProxyConfig(frontend=args.frontend, backend=args.backend, snapshot=args.snapshot, keys=keys)
    )
    proxy.start()
    cleanups: list[Any] = [proxy.stop]
    try:
        config = BridgeConfig.from_env(
            host=args.host,
            port=args.port,
            bus=proxy.backend_endpoint,
            snapshot=proxy.snapshot_endpoint,
            publish_to=proxy.frontend_endpoint,
            allow_publish=True,
            # the stack's keys, or none: never a TRADEBUS__BRIDGE_KEYS meant for another bus
            keys=args.keys or "",
            key_name=BRIDGE_KEY_NAME,
        )
        server = await start_bridge(config)
        cleanups.append(server.close)
        registry = CollectorRegistry()
        registry.register(proxy_collector(proxy))
        registry.register(RegistryCollector(server.bridge.registry))
        dashboard = _dashboard_url(args.host, server.port)
        publisher = None
        if settings is not None:
            url = (
                f"ws://127.0.0.1:{server.port}/ws"
                if args.demo_via_websocket
                else proxy.frontend_endpoint
            )
            on_bus = args.keys and not args.demo_via_websocket
            publisher = make_publisher(
                url,
                None,
                keys=args.keys if on_bus else None,
                key_name=DEMO_KEY_NAME if on_bus else None,
            )
            cleanups.append(publisher.close)
            registry.register(PublisherCollector(publisher.status, publisher.source))
        metrics = None
        if not args.no_metrics:
            metrics = MetricsServer(registry, host=args.host, port=args.metrics_port)
            cleanups.append(metrics.close)
        demo: asyncio.Task[int] | None = None
        if publisher is not None and settings is not None:
            demo = asyncio.create_task(
                run_demo(publisher, settings, stop, seed=args.demo_seed, speed=args.demo_speed)
            )
        log.info(
            "up.started",
            dashboard=dashboard,
            websocket=f"ws://{dashboard[7:]}ws",
            proxy_frontend=proxy.frontend_endpoint,
            proxy_backend=proxy.backend_endpoint,
            proxy_snapshot=proxy.snapshot_endpoint,
            metrics=metrics.url if metrics else None,
            demo_source=publisher.source if publisher else None,
        )
        print(f"tradebus is up. Dashboard: {dashboard}", flush=True)
        print(f"  WebSocket   ws://{dashboard[7:]}ws", flush=True)
        print(
            f"  bus         publish {proxy.frontend_endpoint}  subscribe {proxy.backend_endpoint}"
        )
        if metrics is not None:
            print(f"  metrics     {metrics.url}  (bridge: {dashboard}metrics)")
        if args.keys:
            print(f"  keys        {args.keys} (CURVE: only its keys may use the bus)")
        print("Ctrl-C stops everything.", flush=True)
        waiter = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait(
            {waiter} if demo is None else {waiter, demo}, return_when=asyncio.FIRST_COMPLETED
        )
        if demo in done:
            demo.result()  # the demo never ends by itself unless it failed: surface that
            await waiter
        log.info("up.stopping")
        if demo is not None:
            await demo
    finally:
        stop.set()  # a demo still running (we are here because of an error) ends too
        for cleanup in reversed(cleanups):
            result = cleanup()
            if asyncio.iscoroutine(result):
                await result
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    log.info("up.stopped")
    print("tradebus stopped.", file=sys.stderr, flush=True)
    return 0
