"""The proxy's history: recent events per topic, exactly as published, and the answer to
"every event after these positions". Pure: no I/O, the clock is an argument.

It lives next to the last-value cache, in the cache thread, fed by the capture stream
(bus/proxy.py). Bounds: the last ``max_events`` events of each topic, none older than
``max_seconds``, and ``max_bytes`` in all (frames plus bookkeeping, estimated per event);
whatever leaves early is counted by reason. A history request is answered as complete
only when it provably is: for every position, the held events of its (topic, source) pick
up right after it and follow each other without a hole (bus/resume.py's rule, the one
the bridge applies to its own history). docs/protocol.md, "History", has the wire format.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from bus.envelope import META_HEADER, META_HEADER_SIZE
from bus.resume import contiguous_from
from bus.topics import Pattern

# Per event beyond its two frames' lengths: the entry tuple, two bytes objects' headers,
# its deque slot and its place in the arrival order (measured with tracemalloc, see
# docs/protocol.md; rounded up so the byte bound holds).
ENTRY_OVERHEAD_BYTES: Final = 384

_unpack_meta = META_HEADER.unpack_from
# the last-value cache's entry of a topic: (meta, payload, source, epoch, seq)
CacheEntry = tuple[bytes, bytes, bytes, int, int]


# (arrival, source, epoch, seq, meta, payload, monotonic time it was captured): a plain
# tuple, built per event on the cache thread, where a NamedTuple's constructor costs more
HistoryEntry = tuple[int, bytes, int, int, bytes, bytes, float]
ARRIVAL: Final = 0
SOURCE: Final = 1
EPOCH: Final = 2
SEQ: Final = 3
META: Final = 4
PAYLOAD: Final = 5
AT: Final = 6


class HistoryPosition(NamedTuple):
    """Where a client is in one (topic, source): the last (epoch, seq) it received."""

    topic: bytes
    source: bytes
    epoch: int
    seq: int


@dataclass
class HistoryStats:
    events: int = 0  # events held, in all, since start
    held: int = 0  # events held now
    bytes: int = 0  # their estimated memory
    evicted: dict[str, int] = field(default_factory=dict)  # reason -> events
    requests: int = 0
    complete: int = 0  # requests answered as complete
    incomplete: int = 0  # requests that could not be (positions older than the history)

    def evict(self, reason: str) -> None:
        self.evicted[reason] = self.evicted.get(reason, 0) + 1


@dataclass
class HistoryAnswer:
    complete: bool
    # (topic, meta, payload) of the events after the positions, in the order captured
    events: list[tuple[bytes, bytes, bytes]]


def entry_size(meta: bytes, payload: bytes) -> int:
    return len(meta) + len(payload) + ENTRY_OVERHEAD_BYTES


class BusHistory:
    """Recent events per topic. Not thread-safe (the cache thread owns it)."""

    def __init__(self, max_events: int, max_seconds: float, max_bytes: int) -> None:
        if max_events < 1 or max_seconds <= 0 or max_bytes < 1:
            raise ValueError("history bounds must be positive (turn history off instead)")
        self.max_events = max_events
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.topics: dict[bytes, deque[HistoryEntry]] = {}
        # topics in the order of their events' arrival: memory is freed oldest first
        self._order: deque[tuple[int, bytes]] = deque()
        self._arrival = 0
        self.stats = HistoryStats()

    def add(self, topic: bytes, meta: bytes, payload: bytes, now: float) -> None:
        """Hold one event the cache accepted (well-formed, not a duplicate)."""
        _version, _flags, epoch, seq, _publish_ns = _unpack_meta(meta)
        self.take([(topic, (meta, payload, meta[META_HEADER_SIZE:], epoch, seq))], now)

    def take(self, accepted: Iterable[tuple[bytes, CacheEntry]], now: float) -> None:
        """Hold the events the cache kept, given as its entries (meta, payload, source,
        epoch, seq): the history shares those objects with the cache."""
        topics, order, stats = self.topics, self._order, self.stats
        max_events = self.max_events
        arrival = self._arrival
        added = 0
        dropped = 0
        for topic, (meta, payload, source, epoch, seq) in accepted:
            arrival += 1
            held = topics.get(topic)
            if held is None:
                held = topics[topic] = deque()
            elif len(held) >= max_events:
                oldest = held.popleft()  # the per-topic bound, inline: this loop is hot
                added -= len(oldest[META]) + len(oldest[PAYLOAD]) + ENTRY_OVERHEAD_BYTES
                dropped += 1
            held.append((arrival, source, epoch, seq, meta, payload, now))
            order.append((arrival, topic))
            added += len(meta) + len(payload) + ENTRY_OVERHEAD_BYTES
        count = arrival - self._arrival
        self._arrival = arrival
        stats.events += count
        stats.held += count - dropped
        stats.bytes += added
        if dropped:
            stats.evicted["events"] = stats.evicted.get("events", 0) + dropped
        while stats.bytes > self.max_bytes and self._evict_oldest("bytes"):
            pass

    def expire(self, now: float) -> None:
        """Drop events older than ``max_seconds`` (the cache thread calls this each drain)."""
        oldest = now - self.max_seconds
        order, topics = self._order, self.topics
        while order:
            arrival, topic = order[0]
            held = topics.get(topic)
            if not held or held[0][ARRIVAL] != arrival:
                order.popleft()  # already gone (per-topic bound)
                continue
            if held[0][AT] >= oldest:
                return
            self._evict_oldest("age")

    def _evict_oldest(self, reason: str) -> bool:
        order, topics = self._order, self.topics
        while order:
            arrival, topic = order.popleft()
            held = topics.get(topic)
            if held and held[0][ARRIVAL] == arrival:
                self._drop_oldest(topic, held, reason)
                return True
        return False

    def _drop_oldest(self, topic: bytes, held: deque[HistoryEntry], reason: str) -> None:
        entry = held.popleft()
        self.stats.held -= 1
        self.stats.bytes -= entry_size(entry[META], entry[PAYLOAD])
        self.stats.evict(reason)
        if not held:
            del self.topics[topic]

    def after(
        self,
        positions: Sequence[HistoryPosition],
        patterns: Iterable[Pattern],
        latest: dict[bytes, tuple[bytes, bytes]],
    ) -> HistoryAnswer:
        """Every held event after each position, and the latest event (from ``latest``,
        the cache: topic -> (meta, payload)) of each topic matching ``patterns`` that no
        position names; complete when every position's later events are all held."""
        self.stats.requests += 1
        complete = True
        picked: list[tuple[int, bytes, bytes, bytes]] = []
        named: set[bytes] = set()
        for position in positions:
            named.add(position.topic)
            start = (position.epoch, position.seq)
            newer = [
                entry
                for entry in self.topics.get(position.topic, ())
                if entry[SOURCE] == position.source and (entry[EPOCH], entry[SEQ]) > start
            ]
            marks = ((entry[EPOCH], entry[SEQ]) for entry in newer)
            if not newer:
                # nothing held after it: complete only if it is known to be the newest
                # (newer events may have come and been evicted)
                complete = complete and _is_latest(
                    position, self.topics.get(position.topic), latest.get(position.topic)
                )
            elif not contiguous_from(start, marks):
                complete = False
            picked.extend((e[ARRIVAL], position.topic, e[META], e[PAYLOAD]) for e in newer)
        wanted = list(patterns)
        extra_arrival = self._arrival + 1  # latest values of unnamed topics come last
        for topic in sorted(latest):
            if topic in named:
                continue
            text = topic.decode(errors="replace")
            if any(p.matches(text) for p in wanted):
                meta, payload = latest[topic]
                picked.append((extra_arrival, topic, meta, payload))
        picked.sort(key=lambda item: item[0])
        if complete:
            self.stats.complete += 1
        else:
            self.stats.incomplete += 1
        return HistoryAnswer(complete, [(t, m, p) for _a, t, m, p in picked])


def _is_latest(
    position: HistoryPosition,
    held: deque[HistoryEntry] | None,
    cached: tuple[bytes, bytes] | None,
) -> bool:
    """With no held event after ``position``: whether it is known to be the newest one of
    its (topic, source): the history still holds that very event, or the cache's latest
    event of the topic is it (a quiet topic whose events aged out of the history)."""
    mark = (position.epoch, position.seq)
    if cached is not None:
        meta = cached[0]
        _version, _flags, epoch, seq, _publish_ns = _unpack_meta(meta)
        if meta[META_HEADER_SIZE:] == position.source and (epoch, seq) == mark:
            return True
    return any(
        entry[SOURCE] == position.source and (entry[EPOCH], entry[SEQ]) == mark
        for entry in held or ()
    )
