"""``tradebus proxy``: the XSUB/XPUB proxy with its last-value cache and snapshot service."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from types import FrameType

from bus import settings
from bus.errors import SettingError
from bus.keys import load_server_keys
from bus.proxy import DEFAULT_BACKEND, DEFAULT_FRONTEND, DEFAULT_SNAPSHOT, Proxy, ProxyConfig
from monitoring.logging import configure_logging, get_logger

HELP = "run the bus proxy: publishers -> XSUB, XPUB -> subscribers, snapshots"


_DEFAULTS = ProxyConfig()
_COUNT = settings.whole_number(1)
_ENDPOINT = settings.endpoint(bind=True)
# flag -> (its variable, its form, its default, help); read as text and parsed in ``run``
# (settings.resolve_options), so an error names the flag or the variable actually set
OPTIONS: dict[str, settings.Option] = {
    "--frontend": settings.Option(
        "TRADEBUS__PROXY_FRONTEND",
        _ENDPOINT,
        DEFAULT_FRONTEND,
        "XSUB endpoint publishers connect to",
    ),
    "--backend": settings.Option(
        "TRADEBUS__PROXY_BACKEND",
        _ENDPOINT,
        DEFAULT_BACKEND,
        "XPUB endpoint subscribers connect to",
    ),
    "--snapshot": settings.Option(
        "TRADEBUS__PROXY_SNAPSHOT", _ENDPOINT, DEFAULT_SNAPSHOT, "snapshot service endpoint"
    ),
    "--frontend-hwm": settings.Option(
        "TRADEBUS__PROXY_FRONTEND_HWM",
        _COUNT,
        _DEFAULTS.frontend_hwm,
        "messages queued per publisher before libzmq stops reading it",
    ),
    "--backend-hwm": settings.Option(
        "TRADEBUS__PROXY_BACKEND_HWM",
        _COUNT,
        _DEFAULTS.backend_hwm,
        "messages queued per subscriber before its messages are dropped",
    ),
    "--capture-hwm": settings.Option(
        "TRADEBUS__PROXY_CAPTURE_HWM",
        _COUNT,
        _DEFAULTS.capture_hwm,
        "messages queued for the cache before cache updates are dropped",
    ),
    "--cache-max-topics": settings.Option(
        "TRADEBUS__PROXY_CACHE_MAX_TOPICS",
        _COUNT,
        _DEFAULTS.cache_max_topics,
        "topics kept in the last-value cache",
    ),
    "--cache-nice": settings.Option(
        "TRADEBUS__PROXY_CACHE_NICE",
        settings.whole_number(0, 19),
        _DEFAULTS.cache_nice,
        "CPU niceness of the cache thread, 0..19: forwarding goes first",
    ),
    "--history-events": settings.Option(
        "TRADEBUS__PROXY_HISTORY_EVENTS",
        settings.whole_number(0),
        _DEFAULTS.history_events,
        "events kept per topic for resumes, 0 = no history",
    ),
    "--history-seconds": settings.Option(
        "TRADEBUS__PROXY_HISTORY_SECONDS",
        settings.number(0, what="seconds"),
        _DEFAULTS.history_seconds,
        "age past which history events are dropped",
    ),
    "--history-max-bytes": settings.Option(
        "TRADEBUS__PROXY_HISTORY_MAX_BYTES",
        _COUNT,
        _DEFAULTS.history_max_bytes,
        "memory of the whole history; oldest events go first",
    ),
    "--owner-idle": settings.Option(
        "TRADEBUS__PROXY_OWNER_IDLE",
        settings.number(0, what="seconds"),
        _DEFAULTS.owner_idle_s,
        "without keys: seconds a source's publisher may be silent before another"
        " connection may publish as that source",
    ),
    "--epoch-skew": settings.Option(
        "TRADEBUS__PROXY_EPOCH_SKEW",
        settings.number(0, what="seconds"),
        _DEFAULTS.epoch_skew_s,
        "events whose epoch (publisher start time) is further in the future than this are refused",
    ),
    "--snapshot-max-bytes": settings.Option(
        "TRADEBUS__PROXY_SNAPSHOT_MAX_BYTES",
        _COUNT,
        _DEFAULTS.snapshot_max_bytes,
        "largest snapshot reply; a bigger one is refused with an error",
    ),
    "--keys": settings.Option(
        "TRADEBUS__PROXY_KEYS",
        settings.Form("a directory", str),
        None,
        "CURVE: encrypt every connection with the proxy's key DIR/proxy.key_secret and "
        "admit only the clients whose NAME.key is in DIR (see `tradebus keys --help`; "
        "default: no keys, anyone who reaches the ports is admitted)",
    ),
    "--metrics-port": settings.Option(
        "TRADEBUS__PROXY_METRICS_PORT",
        settings.whole_number(1, 65535, "a port number"),
        None,
        "serve Prometheus metrics (/metrics) and /health on this port",
    ),
    "--metrics-host": settings.Option(
        "TRADEBUS__PROXY_METRICS_HOST",
        settings.Form("an address", str),
        "127.0.0.1",
        "address of the metrics port",
    ),
}


def configure(parser: argparse.ArgumentParser) -> None:
    settings.add_options(parser, OPTIONS)
    parser.add_argument(
        "--no-cache", action="store_true", help="no last-value cache and no snapshot service"
    )


def run(args: argparse.Namespace) -> int:
    configure_logging()
    log = get_logger("proxy")
    settings.resolve_options(args, OPTIONS, os.environ, SettingError)
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
