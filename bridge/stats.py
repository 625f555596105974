"""The bridge core's plain counters and its latency histogram. Pure.

The hot path only increments integers here; bridge/metrics.py turns them into metric
families when /metrics is scraped, so metrics cost nothing per delivery.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


@dataclass
class Histogram:
    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    samples: int = 0

    def observe_ns(self, values_ns: Iterable[int], now_ns: int) -> None:
        counts, bounds = self.counts, self.bounds
        for published in values_ns:
            seconds = (now_ns - published) / 1e9
            counts[bisect.bisect_left(bounds, seconds)] += 1
            self.total += seconds
            self.samples += 1


@dataclass
class HubStats:
    events_by_type: dict[str, int] = field(default_factory=dict)
    deliveries: int = 0
    conflated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    slow_disconnects: int = 0
    gaps: int = 0
    missed: int = 0
    gaps_refilled: int = 0  # gaps after a bus link outage filled from the proxy's history
    published: int = 0
    publish_rejected: dict[str, int] = field(default_factory=dict)
    snapshots: int = 0
    resumes: int = 0
    resumes_unrecovered: int = 0
    resumes_from_bus: int = 0  # recovered from the proxy's history
    history_requests: int = 0  # sent to the proxy's history (resumes and gap refills)
    syncs: int = 0
    sync_timeouts: int = 0
    linger_evicted: int = 0  # lingering prefixes dropped early by the caps
    sources_forgotten: int = 0
    topics_untracked: int = 0  # events of topics beyond max_topics (served, not kept)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    def reject_publish(self, reason: str) -> None:
        self.publish_rejected[reason] = self.publish_rejected.get(reason, 0) + 1
