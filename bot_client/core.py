"""The publisher's pure core: outbox, publish-interval gate, significance filter, drop log.

No I/O and no clock reads: every time is passed in (monotonic seconds), so each policy is
tested with plain values. Nothing here is thread-safe; the publisher holds its lock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

# symbol-keyed types go under "<type>.<symbol>"; a newer event of a conflatable type
# makes an older queued one of the same topic redundant (the lists: bus/event_types.py)
from bus.event_types import CONFLATABLE_TYPES as CONFLATABLE_TYPES
from bus.event_types import SYMBOL_KEYED_TYPES as SYMBOL_KEYED_TYPES

# The last to be dropped when the outbox overflows.
CRITICAL_TYPES: Final = frozenset({"trading_decision", "trade_execution", "error"})
# Rate-limited by the publish interval (one per symbol per interval, latest value kept).
INTERVAL_TYPES: Final = frozenset({"market_data"})


@dataclass(slots=True)
class Entry:
    """One encoded event waiting in the outbox."""

    type_name: str
    topic: str
    critical: bool
    conflatable: bool
    frames: tuple[bytes, bytes, bytes]  # topic, meta, payload: exactly what goes on the bus


class Outbox:
    """A bounded, ordered queue of encoded events with a drop policy for overflow.

    When full, the event to drop is, in this order: a conflatable event for which a newer
    one of the same topic is queued (or arriving); the oldest non-critical event; the
    arriving event if it is not critical; the oldest critical event.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"outbox capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[int, Entry] = OrderedDict()
        self._noncritical: OrderedDict[int, None] = OrderedDict()
        self._critical: OrderedDict[int, None] = OrderedDict()
        self._superseded: OrderedDict[int, None] = OrderedDict()
        self._newest: dict[str, int] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def push(self, entry: Entry) -> Entry | None:
        """Queue ``entry``; returns the event dropped to make room, if any."""
        if entry.conflatable:
            older = self._newest.get(entry.topic)
            if older is not None:
                self._superseded[older] = None
        dropped: Entry | None = None
        if len(self._items) >= self.capacity:
            dropped = self._evict(entry)
            if dropped is entry:
                return dropped
        entry_id = self._next_id
        self._next_id += 1
        self._items[entry_id] = entry
        (self._critical if entry.critical else self._noncritical)[entry_id] = None
        if entry.conflatable:
            self._newest[entry.topic] = entry_id
        return dropped

    def _evict(self, incoming: Entry) -> Entry:
        if self._superseded:
            victim = next(iter(self._superseded))
        elif self._noncritical:
            victim = next(iter(self._noncritical))
        elif not incoming.critical:
            return incoming
        else:
            victim = next(iter(self._critical))
        return self._remove(victim)

    def _remove(self, entry_id: int) -> Entry:
        entry = self._items.pop(entry_id)
        (self._critical if entry.critical else self._noncritical).pop(entry_id)
        self._superseded.pop(entry_id, None)
        if entry.conflatable and self._newest.get(entry.topic) == entry_id:
            del self._newest[entry.topic]
        return entry

    def peek(self) -> Entry:
        """The oldest event (IndexError when empty)."""
        for entry in self._items.values():
            return entry
        raise IndexError("outbox is empty")

    def pop(self) -> Entry:
        """Remove and return the oldest event (IndexError when empty)."""
        for entry_id in self._items:
            return self._remove(entry_id)
        raise IndexError("outbox is empty")

    def drain(self) -> list[Entry]:
        """Remove and return every event, oldest first."""
        entries = list(self._items.values())
        self._items.clear()
        self._noncritical.clear()
        self._critical.clear()
        self._superseded.clear()
        self._newest.clear()
        return entries

    def entries(self) -> list[Entry]:
        return list(self._items.values())


Item = TypeVar("Item")


class IntervalGate(Generic[Item]):
    """At most one release per topic per interval; the latest value of each interval wins.

    The first event of a quiet topic goes at once (``offer`` returns True); events inside
    the interval are held, a newer one replacing the held one, and ``due`` releases the
    held value when the interval is over.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._released: dict[str, float] = {}
        self._held: dict[str, tuple[float, Item]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def offer(self, topic: str, now: float) -> bool:
        """True: send now (recorded as this topic's release). False: ``hold`` it."""
        if topic in self._held:
            return False
        released = self._released.get(topic)
        if released is None or now - released >= self.interval:
            self._released[topic] = now
            return True
        return False

    def hold(self, topic: str, item: Item) -> Item | None:
        """Hold ``item`` for release at the end of the interval; returns the item it replaced."""
        previous = self._held.get(topic)
        if previous is not None:
            self._held[topic] = (previous[0], item)
            return previous[1]
        self._held[topic] = (self._released[topic] + self.interval, item)
        return None

    def next_due(self) -> float | None:
        """When the earliest held item is due, or None when nothing is held."""
        return min((due for due, _item in self._held.values()), default=None)

    def due(self, now: float) -> list[Item]:
        """Release the held items whose interval is over, in due order."""
        ready = sorted(
            ((due, topic) for topic, (due, _item) in self._held.items() if due <= now),
        )
        released: list[Item] = []
        for _due, topic in ready:
            released.append(self._held.pop(topic)[1])
            self._released[topic] = now
        if len(self._released) > 4 * len(self._held) + 10_000:
            self._forget_quiet(now)
        return released

    def release_all(self) -> list[Item]:
        """Everything held, in due order (at close)."""
        items = [item for _due, item in sorted(self._held.values(), key=lambda held: held[0])]
        self._held.clear()
        return items

    def _forget_quiet(self, now: float) -> None:
        # a topic quiet for a whole interval behaves exactly as one never seen
        for topic in [
            t
            for t, at in self._released.items()
            if now - at >= self.interval and t not in self._held
        ]:
            del self._released[topic]


class SignificanceFilter:
    """Passes a price only when it moved more than ``threshold`` (relative) since the last
    one passed for the topic: the guide's 0.1 % example is ``threshold=0.001``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._last: dict[str, float] = {}

    def significant(self, topic: str, price: Any) -> bool:
        try:
            value = float(price)
        except (TypeError, ValueError):
            return True
        if not math.isfinite(value):
            return True
        last = self._last.get(topic)
        if last is None or last == 0 or abs(value - last) / abs(last) > self.threshold:
            self._last[topic] = value
            return True
        return False


class DropLog:
    """Collects drops by type and hands back a report at most once per ``every`` seconds."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._pending: dict[str, int] = {}
        self._next_report = -math.inf

    def record(self, type_name: str, now: float, count: int = 1) -> dict[str, int] | None:
        self._pending[type_name] = self._pending.get(type_name, 0) + count
        if now >= self._next_report:
            return self.take(now)
        return None

    def take(self, now: float) -> dict[str, int] | None:
        """The drops not yet reported (None when there are none)."""
        if not self._pending:
            return None
        report, self._pending = self._pending, {}
        self._next_report = now + self.every
        return report

    def due(self, now: float) -> bool:
        return bool(self._pending) and now >= self._next_report


@dataclass
class Counters:
    """What ``status()`` reports and the operations helper exports as metrics."""

    # market data accepted by the interval gate (other types count by their topic's seq)
    interval_accepted: int = 0
    sent: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    conflated: int = 0
    filtered: int = 0
    reconnects: int = 0
    connect_attempts: int = 0
    rejected: int = 0
    resent: int = 0
    heartbeats: int = 0
    # CURVE handshakes the bus refused (SYSTEM__TRADEBUS_KEYS not authorized there)
    auth_refusals: int = 0

    def count_drops(self, entries: Iterable[Entry]) -> dict[str, int]:
        counted: dict[str, int] = {}
        for entry in entries:
            counted[entry.type_name] = counted.get(entry.type_name, 0) + 1
        for type_name, count in counted.items():
            self.dropped[type_name] = self.dropped.get(type_name, 0) + count
        return counted


def backoff_delay(delays: list[float], failures: int) -> float:
    """Delay before the next attempt after ``failures`` consecutive failures (>= 1)."""
    return delays[min(max(failures, 1), len(delays)) - 1]
