"""``tradebus proxy``: the XSUB/XPUB proxy with its last-value cache and snapshot service."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from bus import settings
from bus.errors import SettingError
from bus.proxy import Proxy
from bus.proxy_config import SETTINGS as PROXY_SETTINGS
from bus.proxy_config import ProxyConfig
from monitoring.logging import configure_logging, get_logger

if TYPE_CHECKING:
    from monitoring.metrics import ProxyCollector

HELP = "run the bus proxy: publishers -> XSUB, XPUB -> subscribers, snapshots"

# the command's own settings besides ProxyConfig's
METRICS_PORT = settings.Setting(
    "metrics_port",
    "TRADEBUS__PROXY_METRICS_PORT",
    settings.port_number(1),
    "--metrics-port",
    None,
    "serve Prometheus metrics (/metrics) and /health on this port",
)
METRICS_HOST = settings.Setting(
    "metrics_host",
    "TRADEBUS__PROXY_METRICS_HOST",
    settings.text("an address"),
    "--metrics-host",
    "127.0.0.1",
    "address of the metrics port",
)
# read as text and parsed in ``run``, so an error names the flag or the variable actually set
SETTINGS = (*PROXY_SETTINGS, METRICS_PORT, METRICS_HOST)


def proxy_collector(proxy: Proxy) -> ProxyCollector:
    """The proxy's metrics, read from its stats at scrape time."""
    from monitoring.metrics import ProxyCollector

    return ProxyCollector(
        lambda: proxy.cache.stats,
        lambda: proxy.gate.stats,
        lambda: proxy.auth_refused,
        history=lambda: proxy.history.stats if proxy.history is not None else None,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, SETTINGS)
    parser.add_argument(
        "--no-cache", action="store_true", help="no last-value cache and no snapshot service"
    )


def run(args: argparse.Namespace) -> int:
    configure_logging()
    log = get_logger("proxy")
    config = ProxyConfig.from_env(
        os.environ,
        flags=settings.flag_texts(args, PROXY_SETTINGS),
        cache=False if args.no_cache else None,
    )
    settings.resolve(args, (METRICS_PORT, METRICS_HOST), os.environ, SettingError)
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # No logging here: the signal may interrupt a log write that holds structlog's
        # output lock, and logging again would deadlock on it.
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    proxy = Proxy(config)
    proxy.start()
    metrics = None
    if args.metrics_port is not None:
        from prometheus_client import CollectorRegistry

        from monitoring.metrics import MetricsServer

        registry = CollectorRegistry()
        registry.register(proxy_collector(proxy))
        try:
            metrics = MetricsServer(registry, host=args.metrics_host, port=args.metrics_port)
        except BaseException:
            proxy.stop()
            raise
    log.info(
        "proxy.started",
        frontend=proxy.frontend_endpoint,
        backend=proxy.backend_endpoint,
        snapshot=proxy.snapshot_endpoint or None,
        metrics=metrics.url if metrics else None,
    )
    while not stop.wait(1.0):
        pass
    log.info("proxy.stopping", signal=received[0] if received else None)
    if metrics is not None:
        metrics.close()
    proxy.stop()
    stats = proxy.cache.stats
    log.info("proxy.stopped", events=stats.events, topics=stats.topics, cache_gaps=stats.gaps)
    return 0
