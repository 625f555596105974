"""``tradebus proxy``: the XSUB/XPUB proxy with its last-value cache and snapshot service."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from types import FrameType

from bus.keys import load_server_keys
from bus.proxy import DEFAULT_BACKEND, DEFAULT_FRONTEND, DEFAULT_SNAPSHOT, Proxy, ProxyConfig
from monitoring.logging import configure_logging, get_logger
from tradebus.arguments import positive_int, positive_number, whole_number

HELP = "run the bus proxy: publishers -> XSUB, XPUB -> subscribers, snapshots"


def _setting(name: str, default: object) -> str:
    """The TRADEBUS__PROXY_<NAME> variable, else the default; argparse validates both."""
    return os.environ.get(f"TRADEBUS__PROXY_{name}", str(default))


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = ProxyConfig()
    parser.add_argument(
        "--frontend",
        default=_setting("FRONTEND", DEFAULT_FRONTEND),
        help="XSUB endpoint publishers connect to (default %(default)s)",
    )
    parser.add_argument(
        "--backend",
        default=_setting("BACKEND", DEFAULT_BACKEND),
        help="XPUB endpoint subscribers connect to (default %(default)s)",
    )
    parser.add_argument(
        "--snapshot",
        default=_setting("SNAPSHOT", DEFAULT_SNAPSHOT),
        help="snapshot service endpoint (default %(default)s)",
    )
    parser.add_argument(
        "--frontend-hwm",
        type=positive_int,
        default=_setting("FRONTEND_HWM", defaults.frontend_hwm),
        help="messages queued per publisher before libzmq stops reading it (default %(default)s)",
    )
    parser.add_argument(
        "--backend-hwm",
        type=positive_int,
        default=_setting("BACKEND_HWM", defaults.backend_hwm),
        help="messages queued per subscriber before its messages are dropped (default %(default)s)",
    )
    parser.add_argument(
        "--capture-hwm",
        type=positive_int,
        default=_setting("CAPTURE_HWM", defaults.capture_hwm),
        help="messages queued for the cache before cache updates are dropped (default %(default)s)",
    )
    parser.add_argument(
        "--cache-max-topics",
        type=positive_int,
        default=_setting("CACHE_MAX_TOPICS", defaults.cache_max_topics),
        help="topics kept in the last-value cache (default %(default)s)",
    )
    parser.add_argument(
        "--cache-nice",
        type=whole_number(0, 19),
        default=_setting("CACHE_NICE", defaults.cache_nice),
        help="CPU niceness of the cache thread, 0..19: forwarding goes first (default %(default)s)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="no last-value cache and no snapshot service"
    )
    parser.add_argument(
        "--history-events",
        type=whole_number(0),
        default=_setting("HISTORY_EVENTS", defaults.history_events),
        help="events kept per topic for resumes, 0 = no history (default %(default)s)",
    )
    parser.add_argument(
        "--history-seconds",
        type=positive_number("seconds"),
        default=_setting("HISTORY_SECONDS", defaults.history_seconds),
        help="age past which history events are dropped (default %(default)s)",
    )
    parser.add_argument(
        "--history-max-bytes",
        type=positive_int,
        default=_setting("HISTORY_MAX_BYTES", defaults.history_max_bytes),
        help="memory of the whole history; oldest events go first (default %(default)s)",
    )
    parser.add_argument(
        "--owner-idle",
        type=positive_number("seconds"),
        default=_setting("OWNER_IDLE", defaults.owner_idle_s),
        help="without keys: seconds a source's publisher may be silent before another"
        " connection may publish as that source (default %(default)s)",
    )
    parser.add_argument(
        "--epoch-skew",
        type=positive_number("seconds"),
        default=_setting("EPOCH_SKEW", defaults.epoch_skew_s),
        help="events whose epoch (publisher start time) is further in the future than this"
        " are refused (default %(default)s)",
    )
    parser.add_argument(
        "--snapshot-max-bytes",
        type=positive_int,
        default=_setting("SNAPSHOT_MAX_BYTES", defaults.snapshot_max_bytes),
        help="largest snapshot reply; a bigger one is refused with an error (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=positive_int,
        default=os.environ.get("TRADEBUS__PROXY_METRICS_PORT"),
        help="serve Prometheus metrics (/metrics) and /health on this port (default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default=_setting("METRICS_HOST", "127.0.0.1"),
        help="address of the metrics port (default %(default)s)",
    )
    parser.add_argument(
        "--keys",
        metavar="DIR",
        default=os.environ.get("TRADEBUS__PROXY_KEYS") or None,
        help="CURVE: encrypt every connection with the proxy's key DIR/proxy.key_secret and "
        "admit only the clients whose NAME.key is in DIR (see `tradebus keys --help`; "
        "default: no keys, anyone who reaches the ports is admitted)",
    )


def run(args: argparse.Namespace) -> int:
    configure_logging()
    log = get_logger("proxy")
    keys = load_server_keys(args.keys) if args.keys else None
    config = ProxyConfig(
        frontend=args.frontend,
        backend=args.backend,
        snapshot=args.snapshot,
        frontend_hwm=args.frontend_hwm,
        backend_hwm=args.backend_hwm,
        capture_hwm=args.capture_hwm,
        cache_max_topics=args.cache_max_topics,
        cache_nice=args.cache_nice,
        cache=not args.no_cache,
        keys=keys,
        owner_idle_s=args.owner_idle,
        epoch_skew_s=args.epoch_skew,
        snapshot_max_bytes=args.snapshot_max_bytes,
        history_events=args.history_events,
        history_seconds=args.history_seconds,
        history_max_bytes=args.history_max_bytes,
    )
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

        from monitoring.metrics import MetricsServer, ProxyCollector

        registry = CollectorRegistry()
        registry.register(
            ProxyCollector(
                lambda: proxy.cache.stats,
                lambda: proxy.gate.stats,
                lambda: proxy.auth_refused,
                history=lambda: proxy.history.stats if proxy.history is not None else None,
            )
        )
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
