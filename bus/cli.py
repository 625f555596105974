"""``tradebus proxy``: the XSUB/XPUB proxy with its last-value cache and snapshot service."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from bus.proxy import DEFAULT_BACKEND, DEFAULT_FRONTEND, DEFAULT_SNAPSHOT, Proxy, ProxyConfig
from monitoring.logging import configure_logging, get_logger

HELP = "run the bus proxy: publishers -> XSUB, XPUB -> subscribers, snapshots"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = ProxyConfig()
    parser.add_argument(
        "--frontend",
        default=DEFAULT_FRONTEND,
        help="XSUB endpoint publishers connect to (default %(default)s)",
    )
    parser.add_argument(
        "--backend",
        default=DEFAULT_BACKEND,
        help="XPUB endpoint subscribers connect to (default %(default)s)",
    )
    parser.add_argument(
        "--snapshot",
        default=DEFAULT_SNAPSHOT,
        help="snapshot service endpoint (default %(default)s)",
    )
    parser.add_argument(
        "--frontend-hwm",
        type=_positive_int,
        default=defaults.frontend_hwm,
        help="messages queued per publisher before libzmq stops reading it (default %(default)s)",
    )
    parser.add_argument(
        "--backend-hwm",
        type=_positive_int,
        default=defaults.backend_hwm,
        help="messages queued per subscriber before its messages are dropped (default %(default)s)",
    )
    parser.add_argument(
        "--capture-hwm",
        type=_positive_int,
        default=defaults.capture_hwm,
        help="messages queued for the cache before cache updates are dropped (default %(default)s)",
    )
    parser.add_argument(
        "--cache-max-topics",
        type=_positive_int,
        default=defaults.cache_max_topics,
        help="topics kept in the last-value cache (default %(default)s)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="no last-value cache and no snapshot service"
    )


def run(args: argparse.Namespace) -> int:
    configure_logging()
    log = get_logger("proxy")
    config = ProxyConfig(
        frontend=args.frontend,
        backend=args.backend,
        snapshot=args.snapshot,
        frontend_hwm=args.frontend_hwm,
        backend_hwm=args.backend_hwm,
        capture_hwm=args.capture_hwm,
        cache_max_topics=args.cache_max_topics,
        cache=not args.no_cache,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("proxy.stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    proxy = Proxy(config)
    proxy.start()
    log.info(
        "proxy.started",
        frontend=proxy.frontend_endpoint,
        backend=proxy.backend_endpoint,
        snapshot=proxy.snapshot_endpoint or None,
    )
    while not stop.wait(1.0):
        pass
    proxy.stop()
    stats = proxy.cache.stats
    log.info("proxy.stopped", events=stats.events, topics=stats.topics, cache_gaps=stats.gaps)
    return 0
