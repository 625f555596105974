"""Subscribers for analytics programs: ``bus.Subscriber`` (asyncio) and ``bus.BlockingSubscriber``.

Both connect a SUB socket to the proxy's XPUB endpoint, optionally start with a consistent
snapshot (docs/protocol.md, "Joining without a gap or a duplicate"), then deliver live events
in order. Iterating yields ``Event`` objects, and a ``Gap`` item just before the event that
revealed missed events, so a consumer sees losses where they happened in the stream.

The I/O-free part (``SubscriptionState``: pattern re-check, duplicate and gap detection,
snapshot parsing) is shared by both adapters and tested with plain values.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import zmq
import zmq.asyncio

from bus import settings
from bus.endpoints import (
    BACKEND_VARIABLE,
    DEFAULT_BACKEND,
    DEFAULT_SNAPSHOT,
    SNAPSHOT_VARIABLE,
)
from bus.envelope import Event, decode_event
from bus.errors import EnvelopeError, SettingError, SnapshotError
from bus.keys import ClientKeys, configure_client, connect_checked, connect_checked_async
from bus.proxy import (
    SNAPSHOT_COMMAND,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_UNSYNCED,
    SYNC_PREFIX,
    snapshot_request,
)
from bus.sequence import SeqStatus, SequenceTracker
from bus.topics import Pattern, minimal_prefixes
from bus.transport import recv_event
from monitoring.logging import get_logger

DEFAULT_RCVHWM: Final = 100_000
DEFAULT_SNAPSHOT_TIMEOUT: Final = 5.0
# Detects a proxy that vanished without closing TCP (host down, cable): ZeroMQ then
# drops the connection and reconnects, instead of waiting forever on a dead one.
HEARTBEAT_MS: Final = 2_000
YIELD_EVERY: Final = 256

_log = get_logger("subscriber")


@dataclass(frozen=True, slots=True)
class Gap:
    """Events of (source, topic) that were never received: seqs ``first_seq..last_seq``.

    ``restart`` is True when the source restarted (new ``epoch``) and its first events of
    the new run were missed.
    """

    topic: str
    source: str
    epoch: int
    first_seq: int
    last_seq: int
    restart: bool = False

    @property
    def missed(self) -> int:
        return self.last_seq - self.first_seq + 1

    def __str__(self) -> str:
        return (
            f"GAP {self.topic} from {self.source}: {self.missed} missed "
            f"(seq {self.first_seq}..{self.last_seq})"
        )


@dataclass(slots=True)
class SubscriberStats:
    """Counters of everything received, including what was not delivered and why."""

    events: int = 0  # delivered live events
    snapshot_events: int = 0  # delivered snapshot events
    gaps: int = 0  # Gap items delivered
    missed: int = 0  # events those gaps stand for
    duplicates: int = 0  # dropped: already delivered (snapshot overlap) or from an older epoch
    restarts: int = 0  # a source's epoch changed
    filtered: int = 0  # dropped: ZeroMQ prefix matched but no pattern did
    invalid: int = 0  # dropped: not a valid bus envelope
    unsynced_snapshot: bool = False  # the proxy could not sync the snapshot: a gap may follow


Item = Event | Gap


def resolve_endpoint(name: str, given: str | None, variable: str, default: str) -> str:
    """``given`` (an argument or flag called ``name``), else ``variable``, else ``default``.

    Raises SettingError naming the one that was given when it is not a ZeroMQ endpoint.
    """
    chosen = settings.pick(name, given or None, variable, os.environ)
    if chosen is None or not chosen.text:
        return default
    return settings.endpoint().parse(chosen, SettingError)


def resolve_backend(endpoint: str | None, name: str = "endpoint") -> str:
    return resolve_endpoint(name, endpoint, BACKEND_VARIABLE, DEFAULT_BACKEND)


def resolve_snapshot(endpoint: str | None, name: str = "snapshot_endpoint") -> str:
    return resolve_endpoint(name, endpoint, SNAPSHOT_VARIABLE, DEFAULT_SNAPSHOT)


class SubscriptionState:
    """What a subscriber knows between messages; turns received frames into items. No I/O."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = [Pattern(p) for p in patterns]
        if not self.patterns:
            raise ValueError("a subscriber needs at least one pattern ('*' for everything)")
        self.prefixes = sorted(minimal_prefixes(self.patterns))
        self.tracker = SequenceTracker()
        self.stats = SubscriberStats()

    def matches(self, topic: str) -> bool:
        return any(p.matches(topic) for p in self.patterns)

    def receive(self, frames: Sequence[bytes] | None) -> list[Item]:
        """Items for one live message (None: malformed): [], [event], or [gap, event]."""
        stats = self.stats
        if frames is None:
            stats.invalid += 1
            return []
        try:
            event = decode_event(frames)
        except EnvelopeError as error:
            stats.invalid += 1
            _log.warning("subscriber.invalid_message", error=str(error))
            return []
        if not self.matches(event.topic):
            stats.filtered += 1
            return []
        result = self.tracker.observe(event.source, event.topic, event.epoch, event.seq)
        status = result.status
        if not result.deliver:
            stats.duplicates += 1
            return []
        stats.events += 1
        if status is SeqStatus.GAP or (status is SeqStatus.RESTART and result.missed):
            restart = status is SeqStatus.RESTART
            gap = Gap(
                event.topic,
                event.source,
                event.epoch,
                event.seq - result.missed,
                event.seq - 1,
                restart,
            )
            stats.gaps += 1
            stats.missed += result.missed
            if restart:
                stats.restarts += 1
            return [gap, event]
        if status is SeqStatus.RESTART:
            stats.restarts += 1
        return [event]

    def apply_snapshot(self, reply: Sequence[bytes]) -> list[Event]:
        """The events of a snapshot reply (frames after the DEALER's empty delimiter).

        Raises SnapshotError for an error status or a malformed reply.
        """
        if len(reply) < 2 or reply[0] != SNAPSHOT_COMMAND:
            raise SnapshotError("the snapshot service sent a malformed reply")
        status, body = reply[1], reply[2:]
        if status == STATUS_ERROR:
            reason = body[0].decode(errors="replace") if body else "no reason given"
            raise SnapshotError(f"the snapshot service refused the request: {reason}")
        if status not in (STATUS_OK, STATUS_UNSYNCED):
            raise SnapshotError(f"the snapshot service answered with unknown status {status!r}")
        if len(body) % 3:
            raise SnapshotError("the snapshot reply's events are not whole three-frame messages")
        if status == STATUS_UNSYNCED:
            self.stats.unsynced_snapshot = True
            _log.warning("subscriber.snapshot_unsynced")
        events: list[Event] = []
        for index in range(0, len(body), 3):
            try:
                event = decode_event(body[index : index + 3])
            except EnvelopeError as error:
                self.stats.invalid += 1
                _log.warning("subscriber.invalid_snapshot_event", error=str(error))
                continue
            if not self.matches(event.topic):
                continue
            if self.tracker.observe(event.source, event.topic, event.epoch, event.seq).deliver:
                events.append(event)
        self.stats.snapshot_events += len(events)
        return events


def _configure_sub(
    socket: zmq.Socket[bytes] | zmq.asyncio.Socket, rcvhwm: int, state: SubscriptionState
) -> None:
    socket.linger = 0
    socket.rcvhwm = rcvhwm
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_MS * 3)
    for prefix in state.prefixes:
        socket.subscribe(prefix)


def _snapshot_error(endpoint: str, timeout: float) -> SnapshotError:
    return SnapshotError(
        f"no snapshot reply from {endpoint} within {timeout:g} s "
        "(is the proxy running, with its cache enabled?)"
    )


SocketT = TypeVar("SocketT", bound="zmq.Socket[Any]")


class _SubscriberBase(Generic[SocketT]):
    """Settings and the I/O-free steps both subscribers share; they differ only in waiting."""

    def __init__(
        self,
        patterns: Iterable[str] = ("*",),
        *,
        endpoint: str | None = None,
        snapshot: bool = False,
        snapshot_endpoint: str | None = None,
        snapshot_timeout: float = DEFAULT_SNAPSHOT_TIMEOUT,
        rcvhwm: int = DEFAULT_RCVHWM,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        self.state = SubscriptionState(patterns)
        self.endpoint = resolve_backend(endpoint)
        self.snapshot = snapshot
        self.snapshot_endpoint = resolve_snapshot(snapshot_endpoint)
        self.snapshot_timeout = snapshot_timeout
        self.rcvhwm = rcvhwm
        # CURVE keys for every socket this subscriber opens (see bus.keys)
        self.keys = keys
        self._context = self._use_context(context)
        self._socket: SocketT | None = None
        self._pending: deque[Item] = deque()

    @staticmethod
    def _use_context(context: zmq.Context[zmq.Socket[bytes]] | None) -> zmq.Context[SocketT]:
        """The context this subscriber's sockets come from (``context`` or a shared one)."""
        raise NotImplementedError

    @property
    def stats(self) -> SubscriberStats:
        return self.state.stats

    def _open(self, socket: SocketT) -> bytes:
        """Subscribe (and to the sync marker when a snapshot follows); connecting is next."""
        self._socket = socket
        _configure_sub(socket, self.rcvhwm, self.state)
        self._use_keys(socket)
        nonce = secrets.token_hex(8).encode()
        if self.snapshot:
            socket.subscribe(SYNC_PREFIX + nonce)
        return nonce

    def _use_keys(self, socket: zmq.Socket[Any]) -> None:
        if self.keys is not None:
            configure_client(socket, self.keys)

    def _snapshot_request(self, nonce: bytes) -> list[bytes]:
        """A DEALER's request: the empty delimiter a REQ would add, then the body."""
        return [b"", *snapshot_request(nonce, [p.text for p in self.state.patterns])]

    def _apply_reply(self, nonce: bytes, reply: list[bytes]) -> None:
        assert self._socket is not None
        self._pending.extend(
            self.state.apply_snapshot(reply[1:] if reply and reply[0] == b"" else reply)
        )
        self._socket.unsubscribe(SYNC_PREFIX + nonce)

    def close(self) -> None:
        """Close the socket at once (linger 0); safe to call more than once."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


class Subscriber(_SubscriberBase[zmq.asyncio.Socket]):
    """Asyncio subscriber: ``async with Subscriber(patterns) as sub: async for item in sub``.

    ``endpoint`` defaults to $TRADEBUS__PROXY_BACKEND or tcp://127.0.0.1:5556 and
    ``snapshot_endpoint`` to $TRADEBUS__PROXY_SNAPSHOT or tcp://127.0.0.1:5557. With
    ``snapshot=True`` the latest event of every matching topic comes first; a snapshot that
    does not arrive within ``snapshot_timeout`` seconds raises SnapshotError. With
    ``keys=bus.keys.load_client_keys(DIR)`` every socket is a CURVE client and a key the
    proxy refuses raises AuthError from ``start()``.
    """

    # reads since the last yield to the event loop (see recv)
    _reads_without_yield = 0

    @staticmethod
    def _use_context(
        context: zmq.Context[zmq.Socket[bytes]] | None,
    ) -> zmq.Context[zmq.asyncio.Socket]:
        return zmq.asyncio.Context.instance() if context is None else zmq.asyncio.Context(context)

    async def start(self) -> None:
        """Connect, subscribe and (with ``snapshot=True``) fetch the snapshot."""
        if self._socket is not None:
            raise RuntimeError("subscriber already started")
        try:
            socket = self._context.socket(zmq.SUB)
            nonce = self._open(socket)
            if self.keys is None:
                socket.connect(self.endpoint)
            else:
                # a refused key stops start-up here, not as a silent stream later
                await connect_checked_async(socket, self.endpoint, self.keys)
            if self.snapshot:
                self._apply_reply(nonce, await self._fetch_snapshot(nonce))
        except BaseException:
            self.close()
            raise

    async def _fetch_snapshot(self, nonce: bytes) -> list[bytes]:
        dealer = self._context.socket(zmq.DEALER)
        dealer.linger = 0
        self._use_keys(dealer)
        try:
            dealer.connect(self.snapshot_endpoint)
            await dealer.send_multipart(self._snapshot_request(nonce))
            # Live events meanwhile wait in the SUB socket's queue (up to rcvhwm).
            try:
                return await asyncio.wait_for(dealer.recv_multipart(), self.snapshot_timeout)
            except TimeoutError:
                raise _snapshot_error(self.snapshot_endpoint, self.snapshot_timeout) from None
        finally:
            dealer.close(linger=0)

    async def recv(self) -> Item:
        """The next item: an Event, or a Gap right before the event that revealed it."""
        socket = self._socket
        if socket is None:
            raise RuntimeError("subscriber not started (use `async with` or `await start()`)")
        while not self._pending:
            try:
                message = recv_event(socket)
            except zmq.Again:
                await socket.poll()
                self._reads_without_yield = 0
                continue
            self._pending.extend(self.state.receive(message))
        self._reads_without_yield += 1
        if self._reads_without_yield >= YIELD_EVERY:
            # a busy stream is read without awaiting: let other tasks run now and then
            self._reads_without_yield = 0
            await asyncio.sleep(0)
        return self._pending.popleft()

    async def __aenter__(self) -> Subscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[Item]:
        return self

    async def __anext__(self) -> Item:
        return await self.recv()


class BlockingSubscriber(_SubscriberBase["zmq.Socket[bytes]"]):
    """The same subscriber for plain scripts: ``with BlockingSubscriber(patterns) as sub``.

    ``recv(timeout)`` returns None when nothing arrived in ``timeout`` seconds; iterating
    blocks until the next item.
    """

    @staticmethod
    def _use_context(
        context: zmq.Context[zmq.Socket[bytes]] | None,
    ) -> zmq.Context[zmq.Socket[bytes]]:
        return context or zmq.Context.instance()

    def start(self) -> None:
        """Connect, subscribe and (with ``snapshot=True``) fetch the snapshot."""
        if self._socket is not None:
            raise RuntimeError("subscriber already started")
        try:
            socket: zmq.Socket[bytes] = self._context.socket(zmq.SUB)
            nonce = self._open(socket)
            if self.keys is None:
                socket.connect(self.endpoint)
            else:
                connect_checked(socket, self.endpoint, self.keys)
            if self.snapshot:
                self._apply_reply(nonce, self._fetch_snapshot(nonce))
        except BaseException:
            self.close()
            raise

    def _fetch_snapshot(self, nonce: bytes) -> list[bytes]:
        dealer: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        dealer.linger = 0
        self._use_keys(dealer)
        try:
            dealer.connect(self.snapshot_endpoint)
            dealer.send_multipart(self._snapshot_request(nonce))
            if not dealer.poll(int(self.snapshot_timeout * 1000)):
                raise _snapshot_error(self.snapshot_endpoint, self.snapshot_timeout)
            return dealer.recv_multipart()
        finally:
            dealer.close(linger=0)

    def recv(self, timeout: float | None = None) -> Item | None:
        """The next item, or None when ``timeout`` seconds passed without one."""
        if self._socket is None:
            raise RuntimeError("subscriber not started (use `with` or `start()`)")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            try:
                message = recv_event(self._socket)
            except zmq.Again:
                # Nothing queued: only now wait (Socket.poll costs microseconds per call).
                if deadline is None:
                    self._socket.poll()
                elif not self._socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                    return None
                continue
            self._pending.extend(self.state.receive(message))
        return self._pending.popleft()

    def __enter__(self) -> BlockingSubscriber:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Item]:
        while True:
            item = self.recv()
            if item is not None:
                yield item
