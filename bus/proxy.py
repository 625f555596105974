"""The XSUB/XPUB proxy with a gate, a last-value cache and a snapshot service.

The forwarding thread receives every publisher message, lets it pass only if the gate
(bus/gate.py) accepts it, and sends it on to the subscribers and appends it to the
capture queue; refused messages are counted by reason and logged at a bounded rate.
Subscriptions flow the other way untouched. The capture queue holds every forwarded
message, in forwarding order and subscription messages included, as the very frames the
forwarder received, for the cache thread, which keeps the latest event of every topic and
answers snapshot requests. So nothing the gate refuses reaches a
subscriber, the cache or a snapshot.

Publishers are identified per message by the ZAP User-Id libzmq attaches: with keys
(CURVE) the name of the publisher's key, without keys a number the proxy gives each
connection when it is made (the proxy answers ZAP requests for the NULL mechanism itself).

Consistent snapshots (no gap, no unmarked duplicate between snapshot and live stream):
a subscriber first subscribes to its patterns and to the marker ``\\x00sync.<nonce>``, then
asks for a snapshot naming that nonce. The marker's subscription passes through the proxy
after the subscriber's other subscriptions took effect, and the capture queue shows it at
exactly that point, so the cache answers with the state as of that point: every earlier
event is in the snapshot, every later one reaches the subscriber live. Events that arrive
live *and* in the snapshot carry the same (source, epoch, seq) and are dropped by the
subscriber's sequence tracker.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import string
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from bus.envelope import MAX_PAYLOAD_BYTES, META_HEADER_SIZE, WIRE_VERSION
from bus.errors import EndpointError, TopicError
from bus.gate import Gate, Refusal, RefusalLog
from bus.history import BusHistory, HistoryPosition
from bus.keys import ZAP_DOMAIN as KEYS_ZAP_DOMAIN
from bus.keys import BusAuthenticator, configure_server
from bus.proxy_config import ProxyConfig as ProxyConfig  # its home before bus.proxy_config
from bus.topics import Pattern
from bus.transport import (
    IdentifiedReceiver,
    Receiver,
    identified_receiver,
    receiver,
    sender,
)
from monitoring.logging import get_logger

log = get_logger("bus.proxy")


SNAPSHOT_COMMAND: Final = b"SNAPSHOT"
HISTORY_COMMAND: Final = b"HISTORY"
STATUS_INCOMPLETE: Final = b"incomplete"
# positions one history request may name
HISTORY_MAX_POSITIONS: Final = 10_000
SYNC_PREFIX: Final = b"\x00sync."
STATUS_OK: Final = b"ok"
STATUS_UNSYNCED: Final = b"unsynced"
STATUS_ERROR: Final = b"error"

_SUBSCRIBE: Final = 1
# libzmq drops the connection of a publisher sending a frame larger than this, before
# reading it; smaller frames over MAX_PAYLOAD_BYTES reach the gate and are counted there.
FRONTEND_MAX_FRAME_BYTES: Final = 4 * MAX_PAYLOAD_BYTES
# messages the forwarder takes from the publishers between two looks at its other sockets
GATE_BATCH: Final = 1_000
ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
_HANDSHAKE_FAILURES: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
ZAP_DOMAIN: Final = KEYS_ZAP_DOMAIN.encode()
# snapshot requests waiting for their sync marker, in all
MAX_PARKED_REQUESTS: Final = 10_000
# The cache drains its capture queue every CACHE_DRAIN_BUSY_MS while events flow, backing
# off to CACHE_DRAIN_IDLE_MS when idle; a snapshot request always drains first.
CACHE_DRAIN_BUSY_MS: Final = 2
CACHE_DRAIN_IDLE_MS: Final = 100
# at most this many messages per drain between two looks at snapshot requests
CACHE_DRAIN_BATCH: Final = 2_000
# a topic starts with a letter (docs/protocol.md), a payload is a JSON object
_TOPIC_FIRST_BYTES: Final = frozenset(bytes([c]) for c in string.ascii_letters.encode())
_PAYLOAD_FIRST_BYTE: Final = b"{"
_SYNC_SUBSCRIPTION: Final = bytes([_SUBSCRIBE]) + SYNC_PREFIX
# epoch and seq: the two u64 after the meta frame's version and flags bytes
_unpack_position = struct.Struct(">QQ").unpack_from
_POSITION_OFFSET: Final = 2


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
    # snapshot replies refused: too many patterns, too large, requester not reading
    refused_snapshots: dict[str, int] = field(default_factory=dict)
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
        # when a list: gets (topic, entry) of every event kept, for the history to take
        self.accepted: list[tuple[bytes, tuple[bytes, bytes, bytes, int, int]]] | None = None

    def update(self, topic: bytes, meta: bytes, payload: bytes) -> bool:
        """Keep the event as the latest of ``topic``; count events and gaps. False for an
        event not kept (malformed, duplicate, late or of an older run).

        This runs for every forwarded event on the CPU that forwarding needs too, so it
        does only that (see docs/performance.md): the position of the latest event per
        (source, topic) to count gaps, and a count per topic that fold_counts() turns into
        the counts by type.
        """
        stats = self.stats
        if len(meta) <= META_HEADER_SIZE or meta[0] != WIRE_VERSION:
            stats.invalid += 1
            return False
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
                    return False  # a duplicate or late event: the cache keeps the newer one
                stats.gaps += 1
                stats.missed += seq - last_seq - 1
        elif epoch < last_epoch:
            return False  # from an older run of that source
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
        kept = entries[topic] = (meta, payload, source, epoch, seq)
        if self.accepted is not None:
            self.accepted.append((topic, kept))
        return True

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


# the forwarder's copy of what it forwarded, for the cache thread (deque appends and
# pops are atomic: the two threads need no lock)
CaptureQueue = deque[tuple[bytes, ...]]


def drain_capture(
    captured: CaptureQueue, cache: LastValueCache, limit: int
) -> tuple[int, bytes | None]:
    """Feed up to ``limit`` captured messages to ``cache``: (messages, sync marker or None).

    Stops after a snapshot sync subscription and returns it, so that the caller answers
    the snapshots waiting for it before later events reach the cache.
    """
    take = captured.popleft
    count = 0
    while count < limit:
        try:
            frames = take()
        except IndexError:
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


@dataclass(frozen=True)
class HistoryQuery:
    """A parsed history request: positions, and patterns whose unnamed topics get their latest."""

    positions: tuple[HistoryPosition, ...]
    patterns: list[Pattern]


def parse_history_request(body: list[bytes], max_patterns: int) -> HistoryQuery:
    """``HISTORY nonce count (topic source epoch seq)*count pattern*`` (body[2:] here).

    Raises ValueError (the error reply's text) for anything else."""
    try:
        count = int(body[2])
    except (IndexError, ValueError):
        raise ValueError("expected HISTORY, nonce, count, positions..., patterns...") from None
    if not 0 <= count <= HISTORY_MAX_POSITIONS:
        raise ValueError(f"position count must be 0..{HISTORY_MAX_POSITIONS}")
    fields = body[3 : 3 + 4 * count]
    if len(fields) != 4 * count:
        raise ValueError(f"{count} positions announced, {len(fields) // 4} given")
    positions = []
    for at in range(0, len(fields), 4):
        topic, source, epoch, seq = fields[at : at + 4]
        try:
            positions.append(HistoryPosition(topic, source, int(epoch), int(seq)))
        except ValueError:
            raise ValueError("epoch and seq are decimal integers") from None
    raw_patterns = body[3 + 4 * count :]
    if len(raw_patterns) > max_patterns:
        raise ValueError(f"more than {max_patterns} patterns in one request")
    try:
        patterns = [Pattern(p.decode()) for p in raw_patterns]
    except (TopicError, UnicodeDecodeError) as error:
        raise ValueError(str(error)) from None
    return HistoryQuery(tuple(positions), patterns)


# (reply envelope, query, deadline): a request waiting for its sync marker
Parked = tuple[list[bytes], "list[Pattern] | HistoryQuery", float]


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
        self.history: BusHistory | None = None
        if self.config.cache and self.config.history_events > 0:
            self.history = BusHistory(
                self.config.history_events,
                self.config.history_seconds,
                self.config.history_max_bytes,
            )
        keys = self.config.keys
        self.gate = Gate(
            keys.sources_for if keys is not None else None,
            owner_idle_s=self.config.owner_idle_s,
            epoch_skew_s=self.config.epoch_skew_s,
        )
        # with keys: pyzmq's authenticator admits the authorized keys (bus/keys.py)
        self.authenticator: BusAuthenticator | None = None
        # with keys: handshakes that failed before reaching the authenticator (no CURVE)
        self.handshake_failures = 0
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

    @property
    def threads(self) -> dict[str, threading.Thread]:
        """The proxy's threads by job, once started: "forwarder", and "cache" when the
        cache is on (benchmarks read their CPU time by ``native_id``)."""
        return {thread.name.removeprefix("tradebus-"): thread for thread in self._threads}

    @property
    def auth_refused(self) -> int:
        """Connections refused with keys on: keys not authorized, and peers without CURVE."""
        authenticator = self.authenticator
        refused = authenticator.refused if authenticator is not None else 0
        return refused + self.handshake_failures

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

    def _warn_if_exposed(self) -> None:
        """One warning when an endpoint other hosts can reach is served without keys."""
        if self.config.keys is not None:
            return
        exposed = [
            endpoint
            for endpoint in (self.frontend_endpoint, self.backend_endpoint, self.snapshot_endpoint)
            if endpoint and not _is_loopback(endpoint)
        ]
        if exposed:
            log.warning(
                "proxy.unauthenticated_bind",
                endpoints=exposed,
                risk="any host that reaches these ports can read every event and publish as"
                " any source not yet live; run with --keys (README, Security)",
            )

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        socket: zmq.Socket[bytes] = self.context.socket(kind)
        socket.linger = 0
        self._sockets.append(socket)
        return socket

    def _start(self) -> None:
        config = self.config
        keys = config.keys
        # The ZAP handler comes first, so that no connection ever finds none: with keys
        # pyzmq's authenticator, without keys (and with the gate) the forwarder's own
        # handler that numbers connections. Either binds this context's ZAP endpoint.
        zap: zmq.Socket[bytes] | None = None
        if keys is not None:
            self.authenticator = BusAuthenticator(self.context, keys)
            try:
                self.authenticator.start()
            except zmq.ZMQError as error:
                self.authenticator.stop()
                self.authenticator = None
                raise EndpointError(
                    f"cannot start the ZAP authenticator: {zmq.strerror(error.errno or 0)}"
                    " (one proxy per ZeroMQ context)"
                ) from None
        elif config.gate:
            zap = self._socket(zmq.REP)
            _bind(zap, ZAP_ENDPOINT, "ZAP handler (one proxy per ZeroMQ context)")
        frontend = self._socket(zmq.XSUB)
        frontend.rcvhwm = config.frontend_hwm
        frontend.setsockopt(zmq.MAXMSGSIZE, FRONTEND_MAX_FRAME_BYTES)
        if keys is not None:
            configure_server(frontend, keys)
        elif config.gate:
            # Every connection is handed to the ZAP handler, which gives it its identity;
            # ZAP_ENFORCE_DOMAIN: never a connection without one.
            frontend.zap_domain = ZAP_DOMAIN
            frontend.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        backend = self._socket(zmq.XPUB)
        backend.sndhwm = config.backend_hwm
        if keys is not None:
            configure_server(backend, keys)
        for socket in (frontend, backend):
            socket.setsockopt(zmq.HEARTBEAT_IVL, config.heartbeat_ms)
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, config.heartbeat_ms * 3)
        self.frontend_endpoint = _bind(frontend, config.frontend, "publisher (XSUB)")
        self.backend_endpoint = _bind(backend, config.backend, "subscriber (XPUB)")
        # Every publisher receives this subscribe-all on connection: all events reach the
        # cache, and publishers may take it as their "connected" signal.
        frontend.send(bytes([_SUBSCRIBE]))

        # without the gate, libzmq's loop copies what it forwards to a capture socket, from
        # which the cache thread fills the queue
        captured: CaptureQueue | None = None
        capture: zmq.Socket[bytes] | None = None
        capture_in: zmq.Socket[bytes] | None = None
        if config.cache:
            captured = deque()
            snapshot = self._socket(zmq.ROUTER)
            # with ROUTER_MANDATORY a reply to a requester whose queue is full raises EAGAIN
            # (counted) instead of vanishing, and unread replies stay bounded
            snapshot.setsockopt(zmq.ROUTER_MANDATORY, 1)
            snapshot.sndhwm = config.snapshot_hwm
            if keys is not None:
                configure_server(snapshot, keys)
            self.snapshot_endpoint = _bind(snapshot, config.snapshot, "snapshot (ROUTER)")
            if not config.gate:
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
                args=(captured, capture_in, snapshot, cache_control_in),
                name="tradebus-cache",
                daemon=True,
            )
            self._threads.append(cache_thread)

        control_in = self._socket(zmq.PAIR)
        control_in.bind(f"inproc://tradebus-proxy-control-{self._tag}")
        self._forwarder_control = self._socket(zmq.PAIR)
        self._forwarder_control.connect(f"inproc://tradebus-proxy-control-{self._tag}")
        monitors: list[zmq.Socket[bytes]] = []
        if keys is not None and config.gate:
            # Peers without a key (or with CURVE off) never reach the authenticator: their
            # failed handshakes are counted from the sockets' monitors instead.
            for socket in (frontend, backend, *([snapshot] if config.cache else [])):
                monitor: zmq.Socket[bytes] = socket.get_monitor_socket(_HANDSHAKE_FAILURES)
                monitor.linger = 0
                self._sockets.append(monitor)
                monitors.append(monitor)
        if config.gate:
            forwarder = threading.Thread(
                target=self._run_gate,
                args=(frontend, backend, captured, control_in, zap, monitors),
                name="tradebus-forwarder",
                daemon=True,
            )
        else:
            forwarder = threading.Thread(
                target=self._run_forwarder,
                args=(frontend, backend, capture, control_in),
                name="tradebus-forwarder",
                daemon=True,
            )
        self._threads.append(forwarder)
        for thread in self._threads:
            thread.start()
        self._warn_if_exposed()

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
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
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
        """Forwarding without the gate (benchmarks only): libzmq's loop, no Python per message."""
        with contextlib.suppress(zmq.ContextTerminated):
            zmq.proxy_steerable(frontend, backend, capture, control)

    def _run_gate(
        self,
        frontend: zmq.Socket[bytes],
        backend: zmq.Socket[bytes],
        captured: CaptureQueue | None,
        control: zmq.Socket[bytes],
        zap: zmq.Socket[bytes] | None,
        monitors: list[zmq.Socket[bytes]],
    ) -> None:
        receive = identified_receiver(frontend)
        send_out = sender(backend)
        refusals = RefusalLog()
        handshake_log = RefusalLog(per_second=1.0)
        poller = zmq.Poller()
        for socket in (frontend, backend, control, *monitors):
            poller.register(socket, zmq.POLLIN)
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        connections = 0
        with contextlib.suppress(zmq.ContextTerminated):
            while True:
                ready = dict(poller.poll())
                if control in ready:
                    return
                if zap is not None and zap in ready:
                    connections = _answer_zap(zap, connections)
                for monitor in monitors:
                    if monitor in ready:
                        self._count_handshake_failure(monitor, handshake_log)
                if backend in ready:
                    _forward_subscriptions(backend, frontend, captured)
                if frontend in ready:
                    self._forward_events(receive, send_out, captured, refusals)

    def _count_handshake_failure(self, monitor: zmq.Socket[bytes], limiter: RefusalLog) -> None:
        event = recv_monitor_message(monitor, zmq.NOBLOCK)
        self.handshake_failures += 1
        logged, suppressed = limiter.admit(time.monotonic())
        if logged:
            log.warning(
                "bus.handshake_refused",
                endpoint=event["endpoint"].decode(errors="replace"),
                reason="a peer without an authorized CURVE key (or without CURVE) was refused",
                code=event["value"],
                suppressed=suppressed,
            )

    def _forward_events(
        self,
        receive: IdentifiedReceiver,
        send_out: Callable[[bytes, bytes, bytes], bool],
        captured: CaptureQueue | None,
        refusals: RefusalLog,
    ) -> None:
        """Up to GATE_BATCH queued publisher messages through the gate."""
        check = self.gate.check
        capture_hwm = self.config.capture_hwm
        now = time.monotonic()
        wall_ns = time.time_ns()
        for _ in range(GATE_BATCH):
            try:
                user_id, frames = receive()
            except zmq.Again:
                return
            try:
                refusal = check(frames, user_id, now, wall_ns)
            except Exception:
                # the gate must refuse, never stop forwarding: a bug here is logged, the
                # message counted as refused, and the stream goes on
                log.exception("bus.gate_failed", frames=len(frames))
                self.gate.count_internal_failure()
                continue
            if refusal is None:
                topic, meta, payload = frames
                send_out(topic, meta, payload)
                # past capture_hwm the cache misses the event (a cache gap), never a subscriber
                if captured is not None and len(captured) < capture_hwm:
                    captured.append(frames)
            else:
                _log_refusal(refusal, refusals, now)

    def _run_cache(
        self,
        captured: CaptureQueue,
        capture: zmq.Socket[bytes] | None,
        snapshot: zmq.Socket[bytes],
        control: zmq.Socket[bytes],
    ) -> None:
        # Forwarding must not wait for the cache when both need the CPU: the cache runs at
        # a lower priority (Linux applies nice per thread) and catches up from its capture
        # queue; only past capture_hwm are updates dropped, and counted as cache gaps.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.cache_nice)
        # without the gate: what libzmq's loop copied to the capture socket
        fill = functools.partial(_fill_capture, receiver(capture), captured) if capture else None
        drain = functools.partial(drain_capture, captured)
        if self.history is not None:
            # the cache hands what it kept to the history after each drain
            self.cache.accepted = []
        # The capture queue is drained on a cadence: having the forwarder wake this thread
        # for every event would cost a system call (and on a VM an interrupt to the other
        # CPU) made before the event goes on to the subscribers. Snapshot requests and stop
        # still wake the thread at once, and each request is answered after a drain
        # (docs/performance.md has the measurements).
        poller = zmq.Poller()
        poller.register(snapshot, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        seen_syncs: dict[bytes, float] = {}
        # nonce -> [(reply envelope, patterns, deadline)]
        parked: dict[bytes, list[Parked]] = {}
        wait_ms = CACHE_DRAIN_BUSY_MS
        while True:
            ready = dict(poller.poll(CACHE_DRAIN_BUSY_MS if parked else wait_ms))
            if control in ready:
                return
            now = time.monotonic()
            if fill is not None:
                fill(CACHE_DRAIN_BATCH)
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
        parked: dict[bytes, list[Parked]],
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
            accepted = self.cache.accepted
            if accepted:
                assert self.history is not None
                # before the snapshots at a sync marker are answered: the history holds
                # everything up to it
                self.history.take(accepted, now)
                accepted.clear()
            if sync is None:
                break
            self._synced(snapshot, sync, seen_syncs, parked, now)
        if count:
            self.cache.fold_counts()
        if self.history is not None:
            self.history.expire(now)
        return count

    def _synced(
        self,
        snapshot: zmq.Socket[bytes],
        subscription: bytes,
        seen_syncs: dict[bytes, float],
        parked: dict[bytes, list[Parked]],
        now: float,
    ) -> None:
        nonce = subscription[len(_SYNC_SUBSCRIPTION) :]
        waiting = parked.pop(nonce, None)
        if waiting is None:
            seen_syncs[nonce] = now
            return
        for envelope, query, _deadline in waiting:
            self._answer(snapshot, envelope, query, STATUS_OK)

    def _handle_request(
        self,
        snapshot: zmq.Socket[bytes],
        request: list[bytes],
        seen_syncs: dict[bytes, float],
        parked: dict[bytes, list[Parked]],
        now: float,
    ) -> None:
        # ROUTER frames: identity, empty delimiter (REQ or DEALER+delimiter), then the body.
        # A DEALER that forgot the delimiter still gets its error reply (without one).
        delimiter = request.index(b"") if b"" in request else 0
        envelope, body = request[: delimiter + 1], request[delimiter + 1 :]
        if len(body) >= 2 and body[0] == HISTORY_COMMAND:
            self._handle_history(snapshot, envelope, body, seen_syncs, parked, now)
            return
        if len(body) < 2 or body[0] != SNAPSHOT_COMMAND:
            self.cache.stats.bad_requests += 1
            self._error(snapshot, envelope, b"expected SNAPSHOT, nonce, patterns...")
            return
        if len(body) - 2 > self.config.snapshot_max_patterns:
            self._refuse(
                snapshot,
                envelope,
                "patterns",
                b"more than %d patterns in one request" % self.config.snapshot_max_patterns,
            )
            return
        try:
            patterns = [Pattern(p.decode()) for p in body[2:]]
        except (TopicError, UnicodeDecodeError) as error:
            self.cache.stats.bad_requests += 1
            self._error(snapshot, envelope, str(error).encode())
            return
        nonce = body[1]
        if not nonce or seen_syncs.pop(nonce, None) is not None:
            self._answer(snapshot, envelope, patterns, STATUS_OK)
            return
        if sum(len(waiting) for waiting in parked.values()) >= MAX_PARKED_REQUESTS:
            self._refuse(snapshot, envelope, "busy", b"too many snapshot requests waiting")
            return
        parked.setdefault(nonce, []).append((envelope, patterns, now + self.config.sync_timeout))

    def _handle_history(
        self,
        snapshot: zmq.Socket[bytes],
        envelope: list[bytes],
        body: list[bytes],
        seen_syncs: dict[bytes, float],
        parked: dict[bytes, list[Parked]],
        now: float,
    ) -> None:
        if self.history is None:
            self._send_reply(
                snapshot, [*envelope, HISTORY_COMMAND, STATUS_ERROR, b"history is off"]
            )
            return
        try:
            query = parse_history_request(body, self.config.snapshot_max_patterns)
        except ValueError as error:
            self.cache.stats.bad_requests += 1
            self._send_reply(
                snapshot, [*envelope, HISTORY_COMMAND, STATUS_ERROR, str(error).encode()]
            )
            return
        nonce = body[1]
        if not nonce or seen_syncs.pop(nonce, None) is not None:
            self._answer(snapshot, envelope, query, STATUS_OK)
            return
        if sum(len(waiting) for waiting in parked.values()) >= MAX_PARKED_REQUESTS:
            self._refuse(snapshot, envelope, "busy", b"too many snapshot requests waiting")
            return
        parked.setdefault(nonce, []).append((envelope, query, now + self.config.sync_timeout))

    def _error(self, snapshot: zmq.Socket[bytes], envelope: list[bytes], text: bytes) -> None:
        self._send_reply(snapshot, [*envelope, SNAPSHOT_COMMAND, STATUS_ERROR, text])

    def _refuse(
        self, snapshot: zmq.Socket[bytes], envelope: list[bytes], reason: str, text: bytes
    ) -> None:
        refused = self.cache.stats.refused_snapshots
        refused[reason] = refused.get(reason, 0) + 1
        self._error(snapshot, envelope, text)

    def _send_reply(self, snapshot: zmq.Socket[bytes], frames: list[bytes]) -> None:
        """Send a reply unless its requester is gone or not reading (counted, never waited for)."""
        try:
            snapshot.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as error:
            reason = "unread" if error.errno == zmq.EAGAIN else "gone"
            refused = self.cache.stats.refused_snapshots
            refused[reason] = refused.get(reason, 0) + 1

    def _answer(
        self,
        snapshot: zmq.Socket[bytes],
        envelope: list[bytes],
        query: list[Pattern] | HistoryQuery,
        status: bytes,
    ) -> None:
        if isinstance(query, HistoryQuery):
            self._answer_history(snapshot, envelope, query, status)
            return
        patterns = query
        entries = self.cache.matching(patterns)
        size = sum(len(frame) for frame in entries)
        if size > self.config.snapshot_max_bytes:
            self._refuse(
                snapshot,
                envelope,
                "too_large",
                b"snapshot of %d bytes is over the limit of %d: subscribe to fewer topics"
                % (size, self.config.snapshot_max_bytes),
            )
            return
        self.cache.stats.snapshots += 1
        if status == STATUS_UNSYNCED:
            self.cache.stats.unsynced_snapshots += 1
        self._send_reply(snapshot, [*envelope, SNAPSHOT_COMMAND, status, *entries])

    def _answer_history(
        self,
        snapshot: zmq.Socket[bytes],
        envelope: list[bytes],
        query: HistoryQuery,
        status: bytes,
    ) -> None:
        assert self.history is not None
        latest = {topic: (entry[0], entry[1]) for topic, entry in self.cache.entries.items()}
        answer = self.history.after(query.positions, query.patterns, latest)
        frames = [frame for event in answer.events for frame in event]
        size = sum(len(frame) for frame in frames)
        if size > self.config.snapshot_max_bytes:
            refused = self.cache.stats.refused_snapshots
            refused["too_large"] = refused.get("too_large", 0) + 1
            text = b"history of %d bytes is over the limit of %d" % (
                size,
                self.config.snapshot_max_bytes,
            )
            self._send_reply(snapshot, [*envelope, HISTORY_COMMAND, STATUS_ERROR, text])
            return
        if not answer.complete:
            status = STATUS_INCOMPLETE
        self._send_reply(snapshot, [*envelope, HISTORY_COMMAND, status, *frames])

    def _expire(
        self,
        snapshot: zmq.Socket[bytes],
        seen_syncs: dict[bytes, float],
        parked: dict[bytes, list[Parked]],
        now: float,
    ) -> None:
        for nonce in [n for n, waiting in parked.items() if waiting[0][2] <= now]:
            for envelope, query, _deadline in parked.pop(nonce):
                self._answer(snapshot, envelope, query, STATUS_UNSYNCED)
        if len(seen_syncs) > 1000 or (seen_syncs and next(iter(seen_syncs.values())) < now - 60):
            for nonce in [n for n, seen in seen_syncs.items() if seen < now - 60]:
                del seen_syncs[nonce]
            while len(seen_syncs) > 1000:
                del seen_syncs[next(iter(seen_syncs))]


def _is_loopback(endpoint: str) -> bool:
    """Whether only this host can reach ``endpoint`` (ipc://, inproc:// or a loopback tcp://)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an interface: assume reachable


def _answer_zap(zap: zmq.Socket[bytes], connections: int) -> int:
    """Admit one NULL-mechanism connection with its own User-Id; the new connection count.

    Without keys this is how the gate tells publishers apart: each connection gets the
    next number and its peer address, so a second connection claiming a live source is
    another publisher (or, from the same address with a newer epoch, its restart).
    """
    request = zap.recv_multipart()
    if len(request) < 6 or request[0] != b"1.0":
        zap.send_multipart(
            [b"1.0", request[1] if len(request) > 1 else b"", b"400", b"bad", b"", b""]
        )
        return connections
    connections += 1
    user_id = b"connection-%d@%s" % (connections, request[3])
    zap.send_multipart([b"1.0", request[1], b"200", b"OK", user_id, b""])
    return connections


def _forward_subscriptions(
    backend: zmq.Socket[bytes], frontend: zmq.Socket[bytes], captured: CaptureQueue | None
) -> None:
    """Every queued (un)subscription from the subscribers on to the publishers and the cache."""
    while True:
        try:
            message = backend.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        frontend.send_multipart(message)
        if captured is not None:
            captured.append(tuple(message))


def _fill_capture(receive: Receiver, captured: CaptureQueue, limit: int) -> None:
    """Up to ``limit`` messages from the capture socket into the queue (no gate only)."""
    for _ in range(limit):
        try:
            captured.append(receive())
        except zmq.Again:
            return


def _log_refusal(refusal: Refusal, refusals: RefusalLog, now: float) -> None:
    logged, suppressed = refusals.admit(now)
    if logged:
        log.warning(
            "bus.event_rejected",
            reason=str(refusal.reason),
            topic=refusal.topic,
            source=refusal.source,
            publisher=refusal.publisher,
            detail=refusal.detail,
            suppressed=suppressed,
        )


def snapshot_request(nonce: bytes, patterns: Iterable[str]) -> list[bytes]:
    """The request body a client sends (after REQ's or its own empty delimiter frame)."""
    return [SNAPSHOT_COMMAND, nonce, *(p.encode() for p in patterns)]


def history_request(
    nonce: bytes, positions: Iterable[HistoryPosition], patterns: Iterable[str]
) -> list[bytes]:
    """A history request's body (docs/protocol.md, "History")."""
    fields: list[bytes] = []
    for position in positions:
        fields += (position.topic, position.source, b"%d" % position.epoch, b"%d" % position.seq)
    return [
        HISTORY_COMMAND,
        nonce,
        b"%d" % (len(fields) // 4),
        *fields,
        *(p.encode() for p in patterns),
    ]
