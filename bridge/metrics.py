"""Prometheus view of a bridge: read from the hub's plain counters at scrape time.

The hot path only increments integers; this collector turns them into metric families
when /metrics is scraped, so metrics cost nothing per delivery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bridge.hub import Hub

PREFIX = "tradebus_bridge_"


@dataclass(frozen=True)
class BridgeView:
    """What a scrape reads: the hub's counters and state, and the adapter's own figures."""

    hub: Hub
    rejected: dict[str, int]  # handshakes refused, by reason
    handshakes_open: int
    protocol_errors: int
    ready: bool


class BridgeCollector(Collector):
    """Reads the bridge through ``read`` (called once per scrape), not the app itself."""

    def __init__(self, read: Callable[[], BridgeView]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        view = self.read()
        hub = view.hub
        stats = hub.stats
        events = CounterMetricFamily(
            PREFIX + "events_in", "Bus events received, by event type", labels=["type"]
        )
        for type_name, count in sorted(stats.events_by_type.items()):
            events.add_metric([type_name], count)
        yield events
        yield CounterMetricFamily(
            PREFIX + "deliveries", "Events queued to clients", value=stats.deliveries
        )
        conflated = stats.conflated + sum(c.conflated for c in hub.clients)
        yield CounterMetricFamily(
            PREFIX + "conflated",
            "Queued events replaced by a newer one of the same topic (slow clients)",
            value=conflated,
        )
        dropped = CounterMetricFamily(
            PREFIX + "dropped", "Events not delivered, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily(
            PREFIX + "slow_consumer_disconnects",
            "Clients closed with 4008 because their queue overflowed",
            value=stats.slow_disconnects,
        )
        yield CounterMetricFamily(
            PREFIX + "gaps", "Sequence gaps seen on the bus", value=stats.gaps
        )
        yield CounterMetricFamily(
            PREFIX + "missed_events", "Events missing in those gaps", value=stats.missed
        )
        yield CounterMetricFamily(
            PREFIX + "published", "Events published by WebSocket publishers", value=stats.published
        )
        rejected = CounterMetricFamily(
            PREFIX + "publish_rejected", "Publish requests refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.publish_rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        refused = CounterMetricFamily(
            PREFIX + "connections_rejected", "Handshakes refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(view.rejected.items()):
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily(
            PREFIX + "handshakes_open",
            "Open sockets that are not WebSockets: plain HTTP and handshakes in progress",
            value=view.handshakes_open,
        )
        yield CounterMetricFamily(
            PREFIX + "protocol_errors",
            "WebSocket connections failed by the edge with 1002 (unmasked client frames)",
            value=view.protocol_errors,
        )
        yield CounterMetricFamily(
            PREFIX + "snapshots", "Snapshots served to clients", value=stats.snapshots
        )
        yield CounterMetricFamily(
            PREFIX + "snapshot_syncs",
            "Snapshot round trips to the proxy (marker protocol)",
            value=stats.syncs,
        )
        resumes = CounterMetricFamily(
            PREFIX + "resumes", "Resume requests, by outcome", labels=["recovered"]
        )
        resumes.add_metric(["true"], stats.resumes - stats.resumes_unrecovered)
        resumes.add_metric(["false"], stats.resumes_unrecovered)
        yield resumes
        yield CounterMetricFamily(
            PREFIX + "resumes_from_bus",
            "Resumes recovered from the proxy's history (this bridge's own did not cover them)",
            value=stats.resumes_from_bus,
        )
        yield CounterMetricFamily(
            PREFIX + "history_requests",
            "Requests to the proxy's history (resumes asking the same share one; gaps seen "
            "after the bus link came back)",
            value=stats.history_requests,
        )
        yield CounterMetricFamily(
            PREFIX + "gaps_refilled",
            "Gaps seen after the bus link came back whose events the proxy's history held",
            value=stats.gaps_refilled,
        )
        clients = GaugeMetricFamily(
            PREFIX + "connected_clients", "Open WebSocket connections", labels=["role"]
        )
        publishers = sum(1 for c in hub.clients if c.publisher)
        clients.add_metric(["subscriber"], len(hub.clients) - publishers)
        clients.add_metric(["publisher"], publishers)
        yield clients
        yield GaugeMetricFamily(
            PREFIX + "queue_bytes",
            "Bytes queued in the bridge for all clients (not yet handed to the socket)",
            value=sum(c.queued_bytes() for c in hub.clients),
        )
        yield GaugeMetricFamily(
            PREFIX + "upstream_subscriptions",
            "Topic prefixes subscribed on the bus",
            value=len(hub.upstream.subscribed),
        )
        yield GaugeMetricFamily(
            PREFIX + "lingering_subscriptions",
            "Bus subscriptions no client needs, kept for resumes (--upstream-linger)",
            value=len(hub.upstream.linger_until),
        )
        yield CounterMetricFamily(
            PREFIX + "linger_evicted",
            "Lingering bus subscriptions dropped early by --max-lingering or per client",
            value=stats.linger_evicted,
        )
        yield GaugeMetricFamily(
            PREFIX + "topics", "Topics whose history the bridge keeps", value=len(hub.topics)
        )
        yield CounterMetricFamily(
            PREFIX + "topics_untracked",
            "Events of topics beyond --max-topics (delivered, not kept for snapshots)",
            value=stats.topics_untracked,
        )
        yield GaugeMetricFamily(PREFIX + "sources", "Sources known", value=len(hub.sources.states))
        yield CounterMetricFamily(
            PREFIX + "sources_forgotten",
            "Sources forgotten after --forget-sources-after seconds stale",
            value=stats.sources_forgotten,
        )
        yield GaugeMetricFamily(PREFIX + "ready", "1 when connected to the bus", value=view.ready)
        live = GaugeMetricFamily(
            PREFIX + "source_live", "1 when the source sent an event recently", labels=["source"]
        )
        for source, is_live in sorted(hub.stale_sources().items()):
            live.add_metric([source], 1.0 if is_live else 0.0)
        yield live
        histogram = hub.latency
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
            running += count
            buckets.append((repr(bound), running))
        buckets.append(("+Inf", running + histogram.counts[-1]))
        yield HistogramMetricFamily(
            PREFIX + "latency_seconds",
            "Publish (publish_ns) to written-to-socket latency per delivered event",
            buckets=buckets,
            sum_value=histogram.total,
        )
