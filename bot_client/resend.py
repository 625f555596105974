"""What the ZeroMQ publisher sends again after losing the proxy. Pure: no I/O, no clock reads.

ZeroMQ has no acknowledgements: an event handed to libzmq can still die with the proxy
(its queues, the kernel's socket buffers) when the proxy is killed. So the publisher keeps
the frames of what it sent recently (``ResendWindow``: bounded by events, bytes and a time
span). When the connection is lost, everything the window holds is *in doubt* and is sent
again, first and in the original order, once the proxy is back. Receivers drop what they
already have by its (source, epoch, seq) position (bus/sequence.py), so sending twice is
safe. What was in doubt and could not be kept (pushed out of the window by its event or
byte bound while still inside its time span) is reported as lost, for the publisher to
count as dropped: the publisher's own figures then account for every possible loss.

Before sending again, ``SubscriptionWatch`` waits (bounded) for the subscriptions that the
proxy forwarded before the loss to come back: a subscriber reconnecting to the restarted
proxy a little later than the publisher would otherwise miss what is sent meanwhile.

Frames travel as one flat list, ``[topic, meta, payload, topic, meta, payload, ...]``: that
is what the C send paths append to (bot_client/_publish.c), cheaper than a tuple each.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Final

FRAMES: Final = 3  # topic, meta, payload
# Subscription messages from the proxy (XPUB_VERBOSE): \x01 subscribe, \x00 unsubscribe.
_SUBSCRIBE: Final = 1
_UNSUBSCRIBE: Final = 0
# Subscribers' markers (bus.proxy.SYNC_PREFIX, b"\x00sync.") begin with \x00, which no topic
# does: they come and go with each snapshot and say nothing about a subscriber's return.
_MARKER_START: Final = b"\x00"


def type_of(topic: bytes) -> str:
    """The event type of a topic (``type`` or ``type.key``: a type has no dot)."""
    return topic.partition(b".")[0].decode("utf-8", "replace")


class _Batch:
    """Events sent together (one I/O round), held or evicted together."""

    __slots__ = ("at", "frames", "size")

    def __init__(self, at: float, frames: list[bytes], size: int) -> None:
        self.at = at
        self.frames = frames
        self.size = size  # bytes of the frames held

    @property
    def events(self) -> int:
        return len(self.frames) // FRAMES


class ResendWindow:
    """The frames of recently sent events with their send time, oldest first.

    Bounds: ``max_events`` events, ``max_bytes`` bytes of frames, ``max_seconds`` of age.
    Past the age an event counts as delivered and leaves quietly; an event pushed out by
    the event or byte bound while younger than that is remembered (by topic) until it ages
    out, because a loss within its age can no longer be repaired by sending it again.
    """

    def __init__(self, max_events: int, max_bytes: int, max_seconds: float) -> None:
        if max_events < 1 or max_bytes < 1 or max_seconds <= 0:
            raise ValueError("ResendWindow bounds must be positive")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self._batches: deque[_Batch] = deque()
        self._events = 0
        self._bytes = 0
        # (time evicted, topic -> events): pushed out by a bound while still resendable
        self._evicted: deque[tuple[float, Counter[bytes]]] = deque()

    @property
    def events(self) -> int:
        return self._events

    @property
    def size(self) -> int:
        return self._bytes

    def record(self, frames: list[bytes], now: float) -> None:
        """Events sent at ``now`` (flat frames, in send order). The list is kept as it is."""
        self.expire(now)
        if not frames:
            return
        size = sum(map(len, frames))
        self._batches.append(_Batch(now, frames, size))
        self._events += len(frames) // FRAMES
        self._bytes += size
        if self._events > self.max_events or self._bytes > self.max_bytes:
            self._evict_over_bounds(now)

    def expire(self, now: float) -> None:
        """Forget what is older than ``max_seconds``: delivered, as far as anyone can tell."""
        horizon = now - self.max_seconds
        batches = self._batches
        while batches and batches[0].at < horizon:
            batch = batches.popleft()
            self._events -= batch.events
            self._bytes -= batch.size
        evicted = self._evicted
        while evicted and evicted[0][0] < horizon:
            evicted.popleft()

    def take(self, now: float) -> tuple[list[bytes], dict[str, int]]:
        """Everything in doubt after a loss at ``now``: the frames held, oldest first, and
        the events (by type) that were sent within the time span but could not be kept.
        The window is empty afterwards."""
        self.expire(now)
        frames: list[bytes] = []
        for batch in self._batches:
            frames += batch.frames
        lost: dict[str, int] = {}
        for _at, topics in self._evicted:
            for topic, count in topics.items():
                name = type_of(topic)
                lost[name] = lost.get(name, 0) + count
        self._batches.clear()
        self._evicted.clear()
        self._events = self._bytes = 0
        return frames, lost

    def _evict_over_bounds(self, now: float) -> None:
        """Whole batches, oldest first, until both bounds hold: a little more than needed
        can go, never per-event work (a batch is what one I/O round sent)."""
        batches = self._batches
        while self._events > self.max_events or self._bytes > self.max_bytes:
            oldest = batches.popleft()
            self._events -= oldest.events
            self._bytes -= oldest.size
            self._evicted.append((now, Counter(oldest.frames[::FRAMES])))


class SubscriptionWatch:
    """The subscriptions the proxy forwards, and whether those seen before a loss are back.

    A subscriber's prefixes reach the publisher only after the proxy has put them in force
    (bus/proxy.py forwards what its XPUB read), so a prefix seen again means a subscriber
    with it is taking events again. Snapshot markers come and go and are ignored, and so
    is a subscription to everything (an empty prefix): it cannot be told from the proxy's
    own subscribe-all. Several subscribers sharing a prefix look like one. The wait is a
    good bet, bounded by ``settle`` seconds, not a guarantee.

    The proxy never drops its subscribe-all: an unsubscription from everything is the
    publisher's own socket ending the connection (ZMQ_IMMEDIATE), which unsubscribes every
    prefix, everything first; those say nothing about subscribers leaving.
    """

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._current: set[bytes] = set()
        self._expected: set[bytes] = set()
        self._waiting = False
        self._ended = False  # the connection ended: its unsubscriptions are not departures
        self._deadline: float | None = None

    def observe(self, message: bytes) -> None:
        """One subscription message the proxy forwarded (or the socket reported)."""
        prefix = message[1:]
        if prefix.startswith(_MARKER_START):
            return
        if message[0] == _SUBSCRIBE:
            if prefix:
                self._current.add(prefix)
        elif message[0] == _UNSUBSCRIBE:
            if not prefix:
                self.lost()
            elif not self._ended:
                self._current.discard(prefix)

    def lost(self) -> None:
        """The connection is gone: what was subscribed is expected back."""
        self._expected |= self._current
        self._current = set()
        self._waiting = self._ended = True
        self._deadline = None

    def reconnected(self, now: float) -> None:
        self._ended = False
        if self._waiting and self._deadline is None:
            self._deadline = now + self.settle

    def settled(self, now: float) -> bool:
        """True once every expected subscription is back or ``settle`` seconds passed since
        the reconnection; False while disconnected."""
        if not self._waiting:
            return True
        deadline = self._deadline
        if deadline is None:
            return False
        if now < deadline and not self._expected <= self._current:
            return False
        self._waiting = False
        self._expected = set()
        return True

    @property
    def missing(self) -> int:
        """Expected subscriptions not back yet."""
        return len(self._expected - self._current)


Send = Callable[[bytes, bytes, bytes], bool]


class Resend:
    """The link's resend state: the window while connected, the in-doubt events after a
    loss, sent again once the proxy and its subscribers are back. Single-threaded (the
    publisher's I/O thread)."""

    def __init__(self, window: ResendWindow, watch: SubscriptionWatch) -> None:
        self.window = window
        self.watch = watch
        self._pending: list[bytes] = []  # in doubt, flat frames, oldest first
        self._next = 0  # index in _pending of the next event to send
        self._connected = True

    def sent(self, frames: list[bytes], now: float) -> None:
        """Events handed to libzmq at ``now`` (flat). Sent while the loss was being noticed
        they went to a dead connection: in doubt at once."""
        if self._connected:
            self.window.record(frames, now)
        else:
            self._pending += frames

    def lost(self, now: float) -> dict[str, int]:
        """The connection is gone: the window becomes in doubt, ahead of whatever was still
        waiting from an earlier loss (only its re-sent part is in the window, and it came
        first). Returns the in-doubt events that cannot be sent again, by type."""
        self._connected = False
        self.watch.lost()
        frames, unresendable = self.window.take(now)
        if frames:
            self._pending = frames + self._pending[self._next :]
            self._next = 0
        return unresendable

    def reconnected(self, now: float) -> None:
        self._connected = True
        self.watch.reconnected(now)

    def holding(self, now: float) -> bool:
        """Whether nothing else may be sent yet: waiting for subscribers, or in-doubt events
        still to go first."""
        if not self.watch.settled(now):
            return True
        return self._next < len(self._pending)

    def resend(self, send: Send, now: float, limit: int) -> tuple[int, bool]:
        """Send up to ``limit`` in-doubt events in order: (sent, blocked by a full pipe).
        What goes out is recorded in the window again: it is in doubt like any send."""
        pending = self._pending
        start = index = self._next
        end = min(len(pending), start + limit * FRAMES)
        blocked = False
        while index < end:
            if not send(pending[index], pending[index + 1], pending[index + 2]):
                blocked = True
                break
            index += FRAMES
        self._next = index
        if index > start:
            self.window.record(pending[start:index], now)
        if index >= len(pending):
            self._pending = []
            self._next = 0
        return (index - start) // FRAMES, blocked

    @property
    def in_doubt(self) -> int:
        """In-doubt events not yet sent again."""
        return (len(self._pending) - self._next) // FRAMES

    def abandon(self) -> list[tuple[bytes, bytes, bytes]]:
        """The in-doubt events never sent again (closing): for the drop count."""
        pending, start = self._pending, self._next
        self._pending, self._next = [], 0
        return [(pending[i], pending[i + 1], pending[i + 2]) for i in range(start, len(pending), 3)]
