"""The XSUB/XPUB proxy with a last-value cache and a snapshot service.

Forwarding is libzmq's own ``zmq_proxy_steerable`` loop in a thread that holds no GIL, so
no Python code runs per forwarded message. The proxy's capture socket copies every
forwarded message, in forwarding order and subscription messages included, to the cache
thread, which keeps the latest event of every topic and answers snapshot requests.

Consistent snapshots (no gap, no unmarked duplicate between snapshot and live stream):
a subscriber first subscribes to its patterns and to the marker ``\\x00sync.<nonce>``, then
asks for a snapshot naming that nonce. The marker's subscription passes through the proxy
after the subscriber's other subscriptions took effect, and the capture stream shows it at
exactly that point, so the cache answers with the state as of that point: every earlier
event is in the snapshot, every later one reaches the subscriber live. Events that arrive
live *and* in the snapshot carry the same (source, epoch, seq) and are dropped by the
subscriber's sequence tracker.
"""

from __future__ import annotations

import contextlib
import functools
import os
import string
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import zmq

from bus.envelope import META_HEADER_SIZE, WIRE_VERSION
from bus.errors import EndpointError, TopicError
from bus.keys import ServerKeys
from bus.topics import Pattern
from bus.transport import Receiver, cache_drainer, receiver

DEFAULT_FRONTEND: Final = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND: Final = "tcp://127.0.0.1:5556"
DEFAULT_SNAPSHOT: Final = "tcp://127.0.0.1:5557"

SNAPSHOT_COMMAND: Final = b"SNAPSHOT"
SYNC_PREFIX: Final = b"\x00sync."
STATUS_OK: Final = b"ok"
STATUS_UNSYNCED: Final = b"unsynced"
STATUS_ERROR: Final = b"error"

_SUBSCRIBE: Final = 1
# The cache drains its capture queue every CACHE_DRAIN_BUSY_MS while events flow, backing
# off to CACHE_DRAIN_IDLE_MS when idle; a snapshot request always drains first.
CACHE_DRAIN_BUSY_MS: Final = 2
CACHE_DRAIN_IDLE_MS: Final = 100
# at most this many messages per C call: the call holds the GIL (about 2 ms here)
CACHE_DRAIN_BATCH: Final = 2_000
# a topic starts with a letter (docs/protocol.md), a payload is a JSON object
_TOPIC_FIRST_BYTES: Final = frozenset(bytes([c]) for c in string.ascii_letters.encode())
_PAYLOAD_FIRST_BYTE: Final = b"{"
_SYNC_SUBSCRIPTION: Final = bytes([_SUBSCRIBE]) + SYNC_PREFIX
# epoch and seq: the two u64 after the meta frame's version and flags bytes
_unpack_position = struct.Struct(">QQ").unpack_from
_POSITION_OFFSET: Final = 2


@dataclass(frozen=True)
class ProxyConfig:
    frontend: str = DEFAULT_FRONTEND
    backend: str = DEFAULT_BACKEND
    snapshot: str = DEFAULT_SNAPSHOT
    # Per-peer queues, in messages. At the frontend a full queue makes libzmq stop reading
    # that publisher (its own send queue then fills); at the backend a full subscriber
    # queue drops that subscriber's messages, which its sequence tracker reports as a gap.
    frontend_hwm: int = 100_000
    backend_hwm: int = 100_000
    # Capture queue to the cache thread; overflowing it drops cache updates (counted as
    # cache gaps), never forwarded messages.
    capture_hwm: int = 200_000
    cache: bool = True
    # niceness of the cache thread (0 = same priority as forwarding)
    cache_nice: int = 10
    cache_max_topics: int = 100_000
    sync_timeout: float = 2.0
    heartbeat_ms: int = 2_000
    keys: ServerKeys | None = None  # CURVE: the proxy's pair and the keys it admits


@dataclass
class CacheStats:
    events: int = 0
    invalid: int = 0
    gaps: int = 0
    missed: int = 0
    evictions: int = 0
    snapshots: int = 0
    unsynced_snapshots: int = 0
    bad_requests: int = 0
    topics: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


def _bind(socket: zmq.Socket[bytes], endpoint: str, role: str) -> str:
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as error:
        raise EndpointError(
            f"cannot bind {role} socket to {endpoint}: {zmq.strerror(error.errno or 0)}"
        ) from None
    bound: bytes = socket.getsockopt(zmq.LAST_ENDPOINT)  # type: ignore[assignment]
    return bound.decode()


class LastValueCache:
    """Latest event per topic, fed from the capture stream. Not thread-safe.

    ``entries[topic]`` is ``(meta, payload, source, epoch, seq)``: the latest event's
    frames and its position, kept beside them so that the next event of the same source
    is checked for gaps without unpacking the previous meta.
    """

    def __init__(self, max_topics: int) -> None:
        if max_topics < 1:
            raise ValueError(f"the cache needs room for at least one topic, not {max_topics}")
        self.max_topics = max_topics
        self.entries: dict[bytes, tuple[bytes, bytes, bytes, int, int]] = {}
        self.stats = CacheStats()
        # (source, topic) -> (epoch, seq) of sources other than the one of a topic's entry
        self._positions: dict[tuple[bytes, bytes], tuple[int, int]] = {}
        # events per topic since the last fold_counts()
        self._counts: dict[bytes, int] = {}

    def update(self, topic: bytes, meta: bytes, payload: bytes) -> None:
        """Keep the event as the latest of ``topic``; count events and gaps.

        This runs for every forwarded event on the CPU that forwarding needs too, so it
        does only that (see docs/performance.md): the position of the latest event per
        (source, topic) to count gaps, and a count per topic that fold_counts() turns into
        the counts by type.
        """
        stats = self.stats
        if len(meta) <= META_HEADER_SIZE or meta[0] != WIRE_VERSION:
            stats.invalid += 1
            return
        stats.events += 1
        counts = self._counts
        counts[topic] = counts.get(topic, 0) + 1
        epoch, seq = _unpack_position(meta, _POSITION_OFFSET)
        source = meta[META_HEADER_SIZE:]
        entries = self.entries
        entry = entries.get(topic)
        if entry is not None and entry[2] == source:
            last_epoch = entry[3]
            last_seq = entry[4]
        else:
            # a new topic, or another source than the one of its latest event
            last = self._positions.get((source, topic))
            if last is None:
                last_epoch = -1
                last_seq = 0
            else:
                last_epoch, last_seq = last
        if epoch == last_epoch:
            if seq != last_seq + 1:
                if seq <= last_seq:
                    return  # a duplicate or late event: the cache keeps the newer one
                stats.gaps += 1
                stats.missed += seq - last_seq - 1
        elif epoch < last_epoch:
            return  # from an older run of that source
        if entry is None:
            if len(entries) >= self.max_topics:
                del entries[next(iter(entries))]
                stats.evictions += 1
            stats.topics = len(entries) + 1
        elif entry[2] != source:
            positions = self._positions
            if len(positions) >= 4 * self.max_topics:
                # bound memory when sources churn; forgetting positions invents no gaps
                positions.clear()
            positions[(entry[2], topic)] = (entry[3], entry[4])
            positions.pop((source, topic), None)
        entries[topic] = (meta, payload, source, epoch, seq)

    def fold_counts(self) -> None:
        """Add the events counted per topic since the last call to ``stats.by_type``."""
        by_type = self.stats.by_type
        for topic, count in self._counts.items():
            type_name = topic.split(b".", 1)[0].decode(errors="replace")
            by_type[type_name] = by_type.get(type_name, 0) + count
        self._counts.clear()

    def matching(self, patterns: list[Pattern]) -> list[bytes]:
        """Frames ``topic, meta, payload, ...`` for every cached topic matching a pattern."""
        frames: list[bytes] = []
        for topic in sorted(self.entries):
            text = topic.decode(errors="replace")
            if not patterns or any(p.matches(text) for p in patterns):
                entry = self.entries[topic]
                frames += (topic, entry[0], entry[1])
        return frames


def drain_capture_python(
    receive: Receiver, cache: LastValueCache, limit: int
) -> tuple[int, bytes | None]:
    """Feed up to ``limit`` captured messages to ``cache``: (messages, sync marker or None).

    Stops after a snapshot sync subscription and returns it, so that the caller answers
    the snapshots waiting for it before later events reach the cache. bus/_wire.c's
    cache_drain does the same in C; this is its reference (the tests compare them).
    """
    count = 0
    while count < limit:
        try:
            frames = receive()
        except zmq.Again:
            break
        count += 1
        if len(frames) == 3:
            topic, meta, payload = frames
            if topic[:1] in _TOPIC_FIRST_BYTES and payload[:1] == _PAYLOAD_FIRST_BYTE:
                cache.update(topic, meta, payload)
                continue
        elif len(frames) == 1 and frames[0][:1] in (b"\x00", b"\x01"):
            # a (un)subscription on its way from a subscriber to the publishers
            if frames[0].startswith(_SYNC_SUBSCRIPTION):
                return count, frames[0]
            continue
        cache.stats.invalid += 1
    return count, None


class Proxy:
    """Binds the three sockets and runs the forwarder and cache threads."""

    def __init__(
        self,
        config: ProxyConfig | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.config = config or ProxyConfig()
        self._own_context = context is None
        self.context: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self.cache = LastValueCache(self.config.cache_max_topics)
        self.frontend_endpoint = ""
        self.backend_endpoint = ""
        self.snapshot_endpoint = ""
        self._sockets: list[zmq.Socket[bytes]] = []
        self._threads: list[threading.Thread] = []
        self._forwarder_control: zmq.Socket[bytes] | None = None
        self._cache_control: zmq.Socket[bytes] | None = None
        self._stopped = threading.Event()
        self._started = False
        self._tag = f"{id(self):x}"

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Bind every socket (raising EndpointError) and start forwarding."""
        if self._started:
            raise RuntimeError("proxy already started")
        self._started = True
        try:
            self._start()
        except BaseException:
            self._close_sockets()
            if self._own_context:
                self.context.term()
            raise

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        socket: zmq.Socket[bytes] = self.context.socket(kind)
        socket.linger = 0
        self._sockets.append(socket)
        return socket

    def _start(self) -> None:
        config = self.config
        frontend = self._socket(zmq.XSUB)
        frontend.rcvhwm = config.frontend_hwm
        backend = self._socket(zmq.XPUB)
        backend.sndhwm = config.backend_hwm
        for socket in (frontend, backend):
            socket.setsockopt(zmq.HEARTBEAT_IVL, config.heartbeat_ms)
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, config.heartbeat_ms * 3)
        self.frontend_endpoint = _bind(frontend, config.frontend, "publisher (XSUB)")
        self.backend_endpoint = _bind(backend, config.backend, "subscriber (XPUB)")
        # Every publisher receives this subscribe-all on connection: all events reach the
        # cache, and publishers may take it as their "connected" signal.
        frontend.send(bytes([_SUBSCRIBE]))

        capture: zmq.Socket[bytes] | None = None
        if config.cache:
            snapshot = self._socket(zmq.ROUTER)
            snapshot.setsockopt(zmq.ROUTER_MANDATORY, 0)
            self.snapshot_endpoint = _bind(snapshot, config.snapshot, "snapshot (ROUTER)")
            capture = self._socket(zmq.PUB)
            capture.sndhwm = config.capture_hwm
            capture.bind(f"inproc://tradebus-capture-{self._tag}")
            capture_in = self._socket(zmq.SUB)
            capture_in.rcvhwm = config.capture_hwm
            capture_in.subscribe(b"")
            capture_in.connect(f"inproc://tradebus-capture-{self._tag}")
            cache_control_in = self._socket(zmq.PAIR)
            cache_control_in.bind(f"inproc://tradebus-cache-control-{self._tag}")
            self._cache_control = self._socket(zmq.PAIR)
            self._cache_control.connect(f"inproc://tradebus-cache-control-{self._tag}")
            cache_thread = threading.Thread(
                target=self._run_cache,
                args=(capture_in, snapshot, cache_control_in),
                name="tradebus-cache",
                daemon=True,
            )
            self._threads.append(cache_thread)

        control_in = self._socket(zmq.PAIR)
        control_in.bind(f"inproc://tradebus-proxy-control-{self._tag}")
        self._forwarder_control = self._socket(zmq.PAIR)
        self._forwarder_control.connect(f"inproc://tradebus-proxy-control-{self._tag}")
        forwarder = threading.Thread(
            target=self._run_forwarder,
            args=(frontend, backend, capture, control_in),
            name="tradebus-forwarder",
            daemon=True,
        )
        self._threads.append(forwarder)
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both threads and close every socket. Safe to call more than once."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._forwarder_control is not None:
            self._forwarder_control.send(b"TERMINATE")
        if self._cache_control is not None:
            self._cache_control.send(b"STOP")
        for thread in self._threads:
            thread.join(timeout)
        self._close_sockets()
        if self._own_context:
            self.context.term()

    def _close_sockets(self) -> None:
        for socket in self._sockets:
            socket.close(linger=0)
        self._sockets.clear()

    def __enter__(self) -> Proxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- threads ------------------------------------------------------------------------
    @staticmethod
    def _run_forwarder(
        frontend: zmq.Socket[bytes],
        backend: zmq.Socket[bytes],
        capture: zmq.Socket[bytes] | None,
        control: zmq.Socket[bytes],
    ) -> None:
        with contextlib.suppress(zmq.ContextTerminated):
            zmq.proxy_steerable(frontend, backend, capture, control)

    def _run_cache(
        self,
        capture: zmq.Socket[bytes],
        snapshot: zmq.Socket[bytes],
        control: zmq.Socket[bytes],
    ) -> None:
        # Forwarding must not wait for the cache when both need the CPU: the cache runs at
        # a lower priority (Linux applies nice per thread) and catches up from its capture
        # queue; only past capture_hwm are updates dropped, and counted as cache gaps.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.cache_nice)
        receive = receiver(capture)
        drain = cache_drainer(capture) or functools.partial(drain_capture_python, receive)
        # The capture socket is drained on a cadence, not when it becomes readable: waiting
        # on it would make the forwarder wake this thread for every event, a system call
        # (and on a VM an interrupt to the other CPU) made before the event goes on to the
        # subscribers. Snapshot requests and stop still wake the thread at once, and each
        # request is answered after a drain (docs/performance.md has the measurements).
        poller = zmq.Poller()
        poller.register(snapshot, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        seen_syncs: dict[bytes, float] = {}
        # nonce -> [(reply envelope, patterns, deadline)]
        parked: dict[bytes, list[tuple[list[bytes], list[Pattern], float]]] = {}
        wait_ms = CACHE_DRAIN_BUSY_MS
        while True:
            ready = dict(poller.poll(CACHE_DRAIN_BUSY_MS if parked else wait_ms))
            if control in ready:
                return
            now = time.monotonic()
            drained = self._drain_capture(drain, snapshot, seen_syncs, parked, now)
            if drained >= CACHE_DRAIN_BATCH:
                wait_ms = 0  # more is queued: go on after a look at requests
            elif drained:
                wait_ms = CACHE_DRAIN_BUSY_MS
            else:
                wait_ms = min(2 * wait_ms + 1, CACHE_DRAIN_IDLE_MS)
            if snapshot in ready:
                while True:
                    try:
                        request = snapshot.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle_request(snapshot, request, seen_syncs, parked, now)
            self._expire(snapshot, seen_syncs, parked, now)

    def _drain_capture(
        self,
        drain: Callable[[LastValueCache, int], tuple[int, bytes | None]],
        snapshot: zmq.Socket[bytes],
        seen_syncs: dict[bytes, float],
        parked: dict[bytes, list[tuple[list[bytes], list[Pattern], float]]],
        now: float,
    ) -> int:
        """Feed up to CACHE_DRAIN_BATCH captured messages to the cache; how many there were.

        A sync marker is handled where it stands in the stream: the snapshots waiting for
        it are answered before any later event reaches the cache.
        """
        count = 0
        while count < CACHE_DRAIN_BATCH:
            drained, sync = drain(self.cache, CACHE_DRAIN_BATCH - count)
            count += drained
            if sync is None:
                break
            self._synced(snapshot, sync, seen_syncs, parked, now)
        if count:
            self.cache.fold_counts()
        return count

    def _synced(
        self,
        snapshot: zmq.Socket[bytes],
        subscription: bytes,
        seen_syncs: dict[bytes, float],
        parked: dict[bytes, list[tuple[list[bytes], list[Pattern], float]]],
        now: float,
    ) -> None:
        nonce = subscription[len(_SYNC_SUBSCRIPTION) :]
        waiting = parked.pop(nonce, None)
        if waiting is None:
            seen_syncs[nonce] = now
            return
        for envelope, patterns, _deadline in waiting:
            self._answer(snapshot, envelope, patterns, STATUS_OK)

    def _handle_request(
        self,
        snapshot: zmq.Socket[bytes],
        request: list[bytes],
        seen_syncs: dict[bytes, float],
        parked: dict[bytes, list[tuple[list[bytes], list[Pattern], float]]],
        now: float,
    ) -> None:
        # ROUTER frames: identity, empty delimiter (REQ or DEALER+delimiter), then the body.
        # A DEALER that forgot the delimiter still gets its error reply (without one).
        delimiter = request.index(b"") if b"" in request else 0
        envelope, body = request[: delimiter + 1], request[delimiter + 1 :]
        if len(body) < 2 or body[0] != SNAPSHOT_COMMAND:
            self.cache.stats.bad_requests += 1
            snapshot.send_multipart(
                [
                    *envelope,
                    SNAPSHOT_COMMAND,
                    STATUS_ERROR,
                    b"expected SNAPSHOT, nonce, patterns...",
                ]
            )
            return
        try:
            patterns = [Pattern(p.decode()) for p in body[2:]]
        except (TopicError, UnicodeDecodeError) as error:
            self.cache.stats.bad_requests += 1
            snapshot.send_multipart(
                [*envelope, SNAPSHOT_COMMAND, STATUS_ERROR, str(error).encode()]
            )
            return
        nonce = body[1]
        if not nonce or seen_syncs.pop(nonce, None) is not None:
            self._answer(snapshot, envelope, patterns, STATUS_OK)
            return
        parked.setdefault(nonce, []).append((envelope, patterns, now + self.config.sync_timeout))

    def _answer(
        self,
        snapshot: zmq.Socket[bytes],
        envelope: list[bytes],
        patterns: list[Pattern],
        status: bytes,
    ) -> None:
        self.cache.stats.snapshots += 1
        if status == STATUS_UNSYNCED:
            self.cache.stats.unsynced_snapshots += 1
        snapshot.send_multipart(
            [*envelope, SNAPSHOT_COMMAND, status, *self.cache.matching(patterns)]
        )

    def _expire(
        self,
        snapshot: zmq.Socket[bytes],
        seen_syncs: dict[bytes, float],
        parked: dict[bytes, list[tuple[list[bytes], list[Pattern], float]]],
        now: float,
    ) -> None:
        for nonce in [n for n, waiting in parked.items() if waiting[0][2] <= now]:
            for envelope, patterns, _deadline in parked.pop(nonce):
                self._answer(snapshot, envelope, patterns, STATUS_UNSYNCED)
        if len(seen_syncs) > 1000 or (seen_syncs and next(iter(seen_syncs.values())) < now - 60):
            for nonce in [n for n, seen in seen_syncs.items() if seen < now - 60]:
                del seen_syncs[nonce]
            while len(seen_syncs) > 1000:
                del seen_syncs[next(iter(seen_syncs))]


def snapshot_request(nonce: bytes, patterns: Iterable[str]) -> list[bytes]:
    """The request body a client sends (after REQ's or its own empty delimiter frame)."""
    return [SNAPSHOT_COMMAND, nonce, *(p.encode() for p in patterns)]
