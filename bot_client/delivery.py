"""``Delivery``: the one owner of the events between ``publish()`` and the link that sends them.

It holds the publisher's lock, the hand-off (events built by callers while the link is up
and nothing is held, sent by the link's I/O thread in order), the bounded outbox (events
held while the link is down or behind, with its drop policy) and the flags that say which
of the two a new event takes. The publisher puts events in (``hand_over``); a link takes
them out (``drain`` on ZeroMQ, ``take`` on WebSocket) and says when its connection is lost
(``shut``). Nothing outside this module reads its fields.

One hand-off design: a deque that callers append to and the I/O thread pops from (both
atomic in CPython, so the I/O thread sends without the lock). Measured against callers
sending on the socket themselves, it cost callers less and kept p99 lower
(docs/performance.md). The I/O thread sends what waits in one batch call
(``bus.transport.batch_sender``), which with the accelerator sends with the GIL released:
a caller is then not kept waiting for the interpreter while libzmq works.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any, Final

from bot_client.core import CONFLATABLE_TYPES, CRITICAL_TYPES, Counters, DropLog, Entry, Outbox

# Events in the hand-off at most; beyond it the outbox (and its drop policy) takes over.
HANDOFF_LIMIT: Final = 8192
# Events sent in one batch call at most. Flat out, a caller keeps the GIL until the
# interpreter's switch interval (5 ms) forces it to give way, so the I/O thread gets it back
# about that often: one batch must carry what callers handed over meanwhile (1,000-2,000
# events), or the hand-off fills and events back up into the outbox.
DRAIN_BATCH: Final = HANDOFF_LIMIT
DROP_REPORT_SECONDS: Final = 5.0

# send(messages) -> how many went before the pipe filled (bus.transport.batch_sender);
# a message is a tuple whose first three items are its frames
SendBatch = Callable[[list[tuple[Any, ...]]], int]


class TopicSlot:
    """One topic's state: its name in both forms, its seq counter, its policies and the
    constant bytes of its payloads (``bus.envelope.payload_parts``)."""

    __slots__ = (
        "conflatable",
        "critical",
        "gated",
        "head",
        "seq",
        "tail",
        "topic",
        "topic_bytes",
        "type_name",
    )

    def __init__(self, type_name: str, topic: str, gated: bool, head: bytes, tail: bytes) -> None:
        self.type_name = type_name
        self.topic = topic
        self.topic_bytes = topic.encode()
        # the last seq given out: also the count of this topic's published events
        self.seq = 0
        self.critical = type_name in CRITICAL_TYPES
        self.conflatable = type_name in CONFLATABLE_TYPES
        self.gated = gated
        self.head = head
        self.tail = tail

    def entry(self, meta: bytes, payload: bytes) -> Entry:
        return Entry(
            self.type_name,
            self.topic,
            self.critical,
            self.conflatable,
            (self.topic_bytes, meta, payload),
        )


class Delivery:
    """Events on their way out, in order, whichever thread publishes.

    ``lock`` is the publisher's lock: ``publish()`` holds it while it stamps an event and
    hands it over, so seq, timestamps and delivery order agree. Methods marked "lock held"
    expect the caller to hold it; the others take it when they need it.
    """

    def __init__(
        self,
        queue_size: int,
        counters: Counters,
        clock: Callable[[], float],
        warn_drops: Callable[[dict[str, int]], None],
    ) -> None:
        self.lock = threading.Lock()
        self._counters = counters
        self._clock = clock
        self._warn_drops = warn_drops
        self._drop_log = DropLog(DROP_REPORT_SECONDS)
        # (topic, meta, payload, slot): the frames as the batch sender takes them
        self._handed: deque[tuple[bytes, bytes, bytes, TopicSlot]] = deque()
        # no more than the queue size waits in the hand-off, so what is held stays within
        # twice it
        self._handoff_limit = min(HANDOFF_LIMIT, queue_size)
        self._outbox = Outbox(queue_size)
        # the hand-off is open: the link is up and the outbox empty (drain opens it, shut
        # and close close it)
        self._open = False
        # the I/O thread is about to sleep until woken (see doze)
        self._sleeping = False
        self._closed = False
        self._stopped = False
        self._wake: Callable[[], None] = _nothing
        # resend: when a list, drain appends the frames of every event it sends
        # (topic, meta, payload, ...), for the ZeroMQ link's resend window
        # (bot_client/resend.py). The link's thread only.
        self.sent_log: list[bytes] | None = None

    def set_waker(self, wake: Callable[[], None]) -> None:
        """``wake()`` rouses the link's I/O thread (called with the lock held: never blocks)."""
        self._wake = wake

    # -- the publisher's side ---------------------------------------------------------------
    def hand_over(self, slot: TopicSlot, meta: bytes, payload: bytes) -> None:
        """Hand a stamped event to the I/O thread, or hold it in the outbox. Lock held.

        The hand-off is open only while nothing waits in the outbox, so order is kept.
        """
        if self._open and len(self._handed) < self._handoff_limit:
            self._handed.append((slot.topic_bytes, meta, payload, slot))
            if self._sleeping:
                self._sleeping = False
                self._wake()
            return
        self._open = False
        self._hold(slot.entry(meta, payload))

    def drop(self, type_name: str) -> None:
        """Count one lost event of ``type_name`` and report it (rate-limited). Lock held."""
        counters = self._counters
        counters.dropped[type_name] = counters.dropped.get(type_name, 0) + 1
        report = self._drop_log.record(type_name, self._clock())
        if report is not None:
            self._warn_drops(report)

    @property
    def stopped(self) -> bool:
        """Nothing will be sent any more: events handed over now are dropped (counted)."""
        return self._stopped

    def close(self) -> None:
        """No more hand-offs: what comes now goes through the outbox. Lock held."""
        self._closed = True
        self._open = False

    def stop(self) -> tuple[list[Entry], dict[str, int]]:
        """After the link stopped: what was never sent, and the drop report not yet logged.
        Events handed over from now on are dropped (counted). Lock held."""
        self._stopped = True
        lost = [slot.entry(meta, payload) for _topic, meta, payload, slot in self._handed]
        self._handed.clear()
        lost += self._outbox.drain()
        return lost, self._drop_log.take(float("inf")) or {}

    def due_report(self, now: float) -> dict[str, int] | None:
        """The drop report if one is due (the I/O thread's timer). Lock held."""
        return self._drop_log.take(now) if self._drop_log.due(now) else None

    def waiting(self) -> int:
        """Events handed over or held, not yet sent."""
        return len(self._handed) + len(self._outbox)

    def held(self) -> int:
        """Events in the outbox."""
        return len(self._outbox)

    # -- the link's side --------------------------------------------------------------------
    def idle(self) -> bool:
        return not self._handed and not self._outbox

    def handed(self) -> bool:
        """Events wait in the hand-off (the I/O thread keeps sending instead of napping)."""
        return bool(self._handed)

    def doze(self) -> bool:
        """The I/O thread is about to sleep: True if it may (nothing handed over). Until
        ``awake()`` a caller that hands over an event wakes it."""
        self._sleeping = True
        # re-checked after raising the flag: a caller that appended before saw it down
        return not self._handed

    def awake(self) -> None:
        self._sleeping = False

    def shut(self) -> None:
        """The link is down: new events go to the outbox. A plain store, so it may run with
        or without the lock; a caller already past its check hands over an event that the
        link sends once it is back (libzmq's pipe survives the reconnect)."""
        self._open = False

    def drain(self, send: SendBatch) -> tuple[int, bool]:
        """Send what is handed over, else the outbox, in order, up to DRAIN_BATCH events:
        (sent, the pipe is full). Once both are empty the hand-off opens. The link's
        thread only, while connected."""
        handed = self._handed
        counters = self._counters
        log = self.sent_log
        if handed:
            # popleft is atomic and callers only append: no lock here, so callers never
            # wait on the send
            batch: list[tuple[Any, ...]] = list(islice(handed, DRAIN_BATCH))
            sent = send(batch)
            # counted before they leave the hand-off: status() sees each event in both,
            # never in neither
            counters.sent += sent
            popleft = handed.popleft
            if log is not None:  # resend
                for message in batch[:sent]:
                    log += message[:3]
            for _ in range(sent):
                popleft()
            return sent, sent < len(batch)
        outbox = self._outbox
        if not outbox:
            if not self._open and not self._closed:
                with self.lock:
                    self._open = not self._outbox and not self._closed
            return 0, False
        # under the lock: a caller's push may drop the oldest event to make room
        with self.lock:
            entries = outbox.oldest(DRAIN_BATCH)
            sent = send([entry.frames for entry in entries])
            counters.sent += sent
            if log is not None:  # resend
                for entry in entries[:sent]:
                    log += entry.frames
            for _ in range(sent):
                outbox.pop()
            self._open = not outbox and not handed and not self._closed
        return sent, sent < len(entries)

    def take(self, limit: int) -> list[Entry]:
        """Up to ``limit`` events from the outbox, oldest first (the WebSocket link, which
        never opens the hand-off)."""
        taken: list[Entry] = []
        with self.lock:
            outbox = self._outbox
            while outbox and len(taken) < limit:
                taken.append(outbox.pop())
        return taken

    def _hold(self, entry: Entry) -> None:
        """Put an encoded event in the outbox, counting what overflow drops. Lock held."""
        if self._stopped:
            self.drop(entry.type_name)
            return
        was_empty = not self._outbox
        dropped = self._outbox.push(entry)
        if dropped is not None:
            self.drop(dropped.type_name)
        if was_empty:
            self._wake()


def _nothing() -> None:
    pass
