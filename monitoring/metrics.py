"""Prometheus metrics of the proxy and of publishers, and a metrics HTTP endpoint.

Nothing here runs per event: the collectors read the counters the components already keep
(``Proxy.cache.stats``, a publisher's ``status()``) when Prometheus scrapes, so metrics cost
the forwarding path nothing. The bridge exports its own metrics on its ``/metrics`` route.

Metric names (all prefixed ``tradebus_``) are listed in README.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any, Final, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitoring.errors import MonitoringError


class MetricsServerError(MonitoringError):
    """The metrics HTTP endpoint could not be started."""


class _CacheStats(Protocol):
    events: int
    invalid: int
    gaps: int
    missed: int
    evictions: int
    snapshots: int
    unsynced_snapshots: int
    bad_requests: int
    refused_snapshots: dict[str, int]
    topics: int
    by_type: dict[str, int]


class _GateStats(Protocol):
    passed: int
    rejected: dict[str, int]
    ownership_changes: int
    owned_sources: int


def _copy_counts(counts: Mapping[str, int]) -> dict[str, int]:
    # The owning thread may add a key while a scrape copies the dict; a retry sees it whole.
    for _ in range(10):
        try:
            return dict(counts)
        except RuntimeError:
            continue
    return {}


class _HistoryStats(Protocol):
    held: int
    bytes: int
    evicted: dict[str, int]
    complete: int
    incomplete: int


class ProxyCollector(Collector):
    """The proxy's forwarding and cache figures, read from ``stats`` at scrape time.

    Every forwarded event passes through the cache's capture stream, so the cache's counts
    are the proxy's "events in": by type, gaps seen per (source, topic), topics held.
    """

    def __init__(
        self,
        stats: Callable[[], _CacheStats],
        gate: Callable[[], _GateStats] | None = None,
        auth_refused: Callable[[], int] | None = None,
        *,
        history: Callable[[], _HistoryStats | None] | None = None,
    ) -> None:
        self._stats = stats
        self._gate = gate
        self._auth_refused = auth_refused
        self._history = history

    def collect(self) -> Iterable[Metric]:
        if self._gate is not None:
            yield from self._collect_gate(self._gate())
        if self._auth_refused is not None:
            yield CounterMetricFamily(
                "tradebus_proxy_auth_refused",
                "Connections refused by the proxy's CURVE authenticator (key not authorized)",
                value=self._auth_refused(),
            )
        held = self._history() if self._history is not None else None
        if held is not None:
            yield from self._collect_history(held)
        stats = self._stats()
        by_type = CounterMetricFamily(
            "tradebus_proxy_events",
            "Events forwarded by the proxy, by event type",
            labels=["type"],
        )
        for type_name, count in sorted(_copy_counts(stats.by_type).items()):
            by_type.add_metric([type_name], count)
        yield by_type
        yield CounterMetricFamily(
            "tradebus_proxy_invalid_messages",
            "Messages with a malformed envelope seen by the proxy's cache (not cached)",
            value=stats.invalid,
        )
        yield CounterMetricFamily(
            "tradebus_proxy_gaps",
            "Sequence gaps seen by the proxy per (source, topic): events lost before the proxy"
            " or cache updates dropped at the capture high-water mark",
            value=stats.gaps,
        )
        yield CounterMetricFamily(
            "tradebus_proxy_missed_events",
            "Events missing in those gaps",
            value=stats.missed,
        )
        yield GaugeMetricFamily(
            "tradebus_proxy_cache_topics",
            "Topics held in the last-value cache",
            value=stats.topics,
        )
        yield CounterMetricFamily(
            "tradebus_proxy_cache_evictions",
            "Topics evicted from the last-value cache because it was full",
            value=stats.evictions,
        )
        snapshots = CounterMetricFamily(
            "tradebus_proxy_snapshots",
            "Snapshot requests answered, by outcome",
            labels=["status"],
        )
        snapshots.add_metric(["ok"], stats.snapshots - stats.unsynced_snapshots)
        snapshots.add_metric(["unsynced"], stats.unsynced_snapshots)
        snapshots.add_metric(["error"], stats.bad_requests)
        yield snapshots
        refused = CounterMetricFamily(
            "tradebus_proxy_snapshots_refused",
            "Snapshot requests refused by the service's bounds, by reason (patterns: too many;"
            " too_large: reply over the size limit; busy: too many waiting; unread: the"
            " requester's queue is full; gone: the requester disconnected)",
            labels=["reason"],
        )
        for reason, count in sorted(_copy_counts(stats.refused_snapshots).items()):
            refused.add_metric([reason], count)
        yield refused

    @staticmethod
    def _collect_history(stats: _HistoryStats) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "tradebus_proxy_history_events", "Events held in the history", value=stats.held
        )
        yield GaugeMetricFamily(
            "tradebus_proxy_history_bytes",
            "Estimated memory of the history's events",
            value=stats.bytes,
        )
        evicted = CounterMetricFamily(
            "tradebus_proxy_history_evicted",
            "Events dropped from the history, by bound (events: per topic; age; bytes: total)",
            labels=["reason"],
        )
        for reason, count in sorted(_copy_counts(stats.evicted).items()):
            evicted.add_metric([reason], count)
        yield evicted
        requests = CounterMetricFamily(
            "tradebus_proxy_history_requests",
            "History requests answered, by whether they were complete",
            labels=["status"],
        )
        requests.add_metric(["ok"], stats.complete)
        requests.add_metric(["incomplete"], stats.incomplete)
        yield requests

    @staticmethod
    def _collect_gate(gate: _GateStats) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "tradebus_proxy_accepted",
            "Publisher messages the proxy's gate let through",
            value=gate.passed,
        )
        rejected = CounterMetricFamily(
            "tradebus_proxy_rejected",
            "Publisher messages the proxy's gate refused (never forwarded, cached or served),"
            " by reason (docs/protocol.md)",
            labels=["reason"],
        )
        for reason, count in sorted(_copy_counts(gate.rejected).items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "tradebus_proxy_owned_sources",
            "Sources with a live owning publisher (without keys)",
            value=gate.owned_sources,
        )
        yield CounterMetricFamily(
            "tradebus_proxy_source_owner_changes",
            "Sources claimed by another publisher after their owner went silent",
            value=gate.ownership_changes,
        )


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


class PublisherCollector(Collector):
    """A publisher's ``status()`` as metrics, labelled with its source id.

    ``status`` returns a mapping with (any of) ``connected``, ``sent``, ``queued``,
    ``dropped`` (type -> count) and ``reconnects``, as bot_client publishers do.
    """

    def __init__(self, status: Callable[[], Mapping[str, Any]], source: str) -> None:
        self._status = status
        self._source = source

    def collect(self) -> Iterable[Metric]:
        status = self._status()
        labels = ["source"]
        value = [self._source]

        def gauge(name: str, text: str, figure: Any) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, text, labels=labels)
            family.add_metric(value, _number(figure))
            return family

        def counter(name: str, text: str, figure: Any) -> CounterMetricFamily:
            family = CounterMetricFamily(name, text, labels=labels)
            family.add_metric(value, _number(figure))
            return family

        yield gauge(
            "tradebus_publisher_connected",
            "1 when the publisher is connected to the bus or bridge",
            bool(status.get("connected")),
        )
        yield counter(
            "tradebus_publisher_sent_events", "Events handed to the network", status.get("sent")
        )
        yield gauge(
            "tradebus_publisher_queue_size",
            "Events held while disconnected or waiting to be sent",
            status.get("queued"),
        )
        yield counter(
            "tradebus_publisher_resent_events",
            "Events sent again after a reconnect (unacknowledged, or in doubt after a lost proxy)",
            status.get("resent"),
        )
        yield counter(
            "tradebus_publisher_reconnects",
            "Connection attempts after the first",
            status.get("reconnects"),
        )
        dropped = CounterMetricFamily(
            "tradebus_publisher_dropped_events",
            "Events dropped (queue full, in doubt after a lost proxy and not resendable,"
            " rejected, undelivered at close), by event type",
            labels=["source", "type"],
        )
        drops = status.get("dropped")
        if isinstance(drops, Mapping):
            for type_name, count in sorted(_copy_counts(drops).items()):
                dropped.add_metric([self._source, type_name], _number(count))
        yield dropped


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the structured logs."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


HEALTH_BODY: Final = b'{"status":"ok"}'


class MetricsServer:
    """Serves ``GET /metrics`` (Prometheus text) and ``GET /health`` on its own thread."""

    ROUTES: Final = ("/health", "/metrics")

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0):
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                result: Iterable[bytes] = metrics_app(environ, start_response)
                return result
            if path == "/health":
                start_response("200 OK", [("Content-Type", "application/json")])
                return [HEALTH_BODY]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: this port serves /metrics and /health\n"]

        try:
            self._server = make_server(
                host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
            )
        except OSError as error:
            raise MetricsServerError(
                f"cannot serve metrics on {host}:{port}: {error.strerror or error}"
            ) from None
        self.host = host
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="tradebus-metrics", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format (for tests and for embedding in other servers)."""
    return generate_latest(registry)
