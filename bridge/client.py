"""One WebSocket connection's outbound queue and backpressure. Pure.

The hub appends frames; the adapter asks ``take`` for the bytes to write given what the
transport still buffers. A client that falls behind has its conflatable topics' queued
frames replaced by newer ones, and is refused (SlowConsumerError) past its byte limit.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from bridge.auth import OPEN_GRANT, Grant
from bridge.errors import BridgeError

if TYPE_CHECKING:
    from bridge.history import SnapshotJob

# shared by every client that is not behind: slots are only written while behind
_NO_SLOTS: Final[dict[bytes, int]] = {}


class SlowConsumerError(BridgeError):
    """A client's outbound queue overflowed: it is closed with 4008 "slow consumer"."""


class Held(NamedTuple):
    """An event held back while a snapshot is prepared (topic and source None: a gap)."""

    frame: bytes
    topic: bytes | None
    source: bytes | None
    epoch: int
    seq: int


# (source, topic) -> the newest (epoch, seq) a snapshot or resume already sent
Sent = dict[tuple[bytes, bytes], tuple[int, int]]


class Client:
    """One WebSocket connection: its grant, its outbound queue and its snapshot jobs.

    The queue is ``frames`` (not yet written). While the transport holds more than the
    high-water mark the client is *behind*: new frames of conflatable topics replace the
    queued frame of the same topic, and the queue's size is checked against the limit.
    While a snapshot is being prepared, events are *held* and released after it, minus
    those the snapshot already contained.
    """

    __slots__ = (
        "behind",
        "conflated",
        "conn",
        "epoch",
        "frames",
        "grant",
        "held",
        "held_bytes",
        "id",
        "implicit",
        "ip",
        "jobs",
        "later_skip",
        "may_publish",
        "nbytes",
        "publisher",
        "refills",
        "session",
        "slots",
        "source",
        "special",
        "transport",
        "work",
    )

    def __init__(
        self,
        client_id: int,
        *,
        grant: Grant = OPEN_GRANT,
        publisher: bool = False,
        may_publish: bool = False,
        ip: str = "",
        source: str = "",
        epoch: int = 0,
    ) -> None:
        self.id = client_id
        self.session = secrets.token_hex(8)
        self.grant = grant
        self.publisher = publisher
        self.may_publish = may_publish
        self.ip = ip
        self.source = source
        self.epoch = epoch
        self.frames: list[bytes] = []
        self.nbytes = 0  # maintained only while behind
        self.behind = False
        self.slots: dict[bytes, int] = _NO_SLOTS
        self.held: list[Held] | None = None
        self.held_bytes = 0
        self.special = False  # behind or holding: the hot path's cue to call push_event
        self.conflated = 0
        self.implicit = False
        self.jobs: list[SnapshotJob] = []
        # gaps whose events are being fetched from the proxy's history (it holds until
        # none is left), and what a snapshot served meanwhile already sent
        self.refills = 0
        self.later_skip: Sent = {}
        # units of request work (patterns, positions, topics, frames) not yet charged to
        # the connection's rate limit: the adapter charges and resets it
        self.work = 0

        self.transport: Any = None  # set by the adapter: where frames are written
        self.conn: Any = None  # set by the adapter: its connection object

    def __repr__(self) -> str:
        return f"Client({self.id})"

    def push(self, frame: bytes) -> None:
        """Queue a control message (never held, never conflated)."""
        self.frames.append(frame)
        if self.behind:
            self.nbytes += len(frame)

    def push_event(
        self,
        frame: bytes,
        topic: bytes | None,
        source: bytes | None,
        epoch: int,
        seq: int,
        conflate: bool,
    ) -> None:
        if self.held is not None:
            self.held.append(Held(frame, topic, source, epoch, seq))
            self.held_bytes += len(frame)
            return
        if conflate and self.behind and topic is not None:
            slot = self.slots.get(topic)
            if slot is not None:
                self.nbytes += len(frame) - len(self.frames[slot])
                self.frames[slot] = frame
                self.conflated += 1
                return
            self.slots[topic] = len(self.frames)
        self.frames.append(frame)
        if self.behind:
            self.nbytes += len(frame)

    def take(self, buffered: int, high_water: int, limit: int) -> bytes | None:
        """The bytes to write now, or None to wait; raises SlowConsumerError on overflow.

        ``buffered`` is what the transport still holds: the client's queue is that plus
        the frames not yet written.
        """
        frames = self.frames
        if self.held_bytes + buffered > limit:
            raise SlowConsumerError(f"{self.held_bytes + buffered} bytes queued")
        if not frames:
            return None
        if buffered >= high_water:
            if not self.behind:
                self.behind = True
                self.special = True
                self.nbytes = sum(map(len, frames))
                self.slots = {}
            if self.nbytes + self.held_bytes + buffered > limit:
                raise SlowConsumerError(f"{self.nbytes + self.held_bytes + buffered} bytes queued")
            return None
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        frames.clear()
        if self.behind:
            self.behind = False
            self.nbytes = 0
            self.slots = _NO_SLOTS
            self.special = self.held is not None
        return data

    def queued_bytes(self) -> int:
        return (self.nbytes if self.behind else sum(map(len, self.frames))) + self.held_bytes

    def hold(self) -> None:
        if self.held is None:
            self.held = []
            self.special = True

    def fill(self, placeholder: bytes, events: list[Held]) -> None:
        """Put ``events`` where the held ``placeholder`` frame stands (by identity)."""
        held = self.held
        if held is None:
            return
        for index, event in enumerate(held):
            if event.frame is placeholder:
                held[index : index + 1] = events
                self.held_bytes += sum(len(e.frame) for e in events) - len(placeholder)
                return

    def release(self, skip: Sent) -> None:
        """Stop holding: queue held events, except those already sent (``skip``)."""
        held = self.held or []
        self.held = None
        self.held_bytes = 0
        self.special = self.behind
        if held and self.behind:
            # a newer event must not replace a queued one that precedes these
            self.slots = {}
        for event in held:
            topic, source = event.topic, event.source
            if topic is not None and source is not None:
                sent = skip.get((source, topic))
                if sent is not None and (event.epoch, event.seq) <= sent:
                    continue
            self.push_event(event.frame, topic, source, event.epoch, event.seq, False)
