"""The bridge's routing core: clients, subscriptions, outbound queues, history. Pure.

No I/O and no clock of its own: the adapter (bridge/app.py) feeds it bus messages and
client requests with the current time, writes what the clients' queues hold, and carries
out the upstream operations (ZeroMQ subscriptions, snapshot requests) the hub asks for.

Hot path, per bus message: one dict lookup for the topic's state (which caches the set of
matching clients until subscriptions change), one sequence check, one WebSocket frame built
from the payload bytes (never decoded), then one list append per matching client. The
adapter then writes each dirty client's frames with a single transport write.
"""

from __future__ import annotations

import bisect
import itertools
import secrets
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from bridge.auth import OPEN_GRANT, Grant
from bridge.errors import BridgeError
from bridge.frames import message_frame, text_frame
from bridge.protocol import (
    Position,
    PublishRequest,
    RequestError,
    RequestId,
    Subscribe,
    Unsubscribe,
)
from bus.envelope import META_HEADER, META_HEADER_SIZE, encode_event
from bus.errors import TopicError
from bus.event_types import CONFLATABLE_TYPES, SYMBOL_KEYED_TYPES
from bus.sequence import SeqStatus, SequenceTracker
from bus.topics import Pattern, PatternIndex, make_topic, validate_topic

SOURCE_STATUS_TYPE: Final = "system_status"
EVERYTHING: Final = Pattern("*")
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

_unpack_meta = META_HEADER.unpack_from
_DELIVER_DROPS: Final = {SeqStatus.DUPLICATE: "duplicate", SeqStatus.STALE_EPOCH: "stale_epoch"}

# (arrival number, source, epoch, seq, frame, monotonic time of arrival, topic)
Entry = tuple[int, bytes, int, int, bytes, float, bytes]
# (frame, topic, source, epoch, seq): an event held back while a snapshot is prepared
Held = tuple[bytes, bytes | None, bytes | None, int, int]


# bounded work per housekeeping call (every HOUSEKEEPING_INTERVAL in the adapter)
EXPIRIES_PER_CALL: Final = 64
FORGET_TOPICS_PER_CALL: Final = 100

# shared by every client that is not behind: slots are only written while behind
_NO_SLOTS: Final[dict[bytes, int]] = {}


class SlowConsumerError(BridgeError):
    """A client's outbound queue overflowed: it is closed with 4008 "slow consumer"."""


def iso_from_ns(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rest // 1000:06d}Z"


@dataclass
class SnapshotJob:
    """A subscribe that asked for a snapshot or a resume, waiting for upstream syncs."""

    patterns: tuple[Pattern, ...]
    since: tuple[Position, ...] | None
    waiting: set[int]
    complete: bool = True
    # a resume this bridge's history cannot prove complete is asked of the proxy's history
    # (bus/history.py): None until asked, then whether it was; ``bus_entries`` are its
    # events when the proxy answered complete
    asked_bus: bool = False
    bus_entries: list[Entry] | None = None


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
        "may_publish",
        "nbytes",
        "publisher",
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
            self.held.append((frame, topic, source, epoch, seq))
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

    def release(self, skip: dict[tuple[bytes, bytes], tuple[int, int]]) -> None:
        """Stop holding: queue held events, except those already sent (``skip``)."""
        held = self.held or []
        self.held = None
        self.held_bytes = 0
        self.special = self.behind
        for frame, topic, source, epoch, seq in held:
            if topic is not None and source is not None:
                sent = skip.get((source, topic))
                if sent is not None and (epoch, seq) <= sent:
                    continue
            self.push_event(frame, topic, source, epoch, seq, False)


class TopicState:
    """What the hub knows of one topic: matching clients (cached), history, latest event."""

    __slots__ = (
        "by_source",
        "conflate",
        "count",
        "generation",
        "history",
        "latest",
        "name",
        "sources",
        "subs",
        "type",
    )

    def __init__(self, name: str, conflate: bool, history_events: int) -> None:
        self.name = name
        self.type = name.partition(".")[0]
        self.conflate = conflate
        self.subs: frozenset[Client] = frozenset()
        self.generation = -1
        # every entry in arrival order, and once a second source appears the same entries
        # per source: a resume finds a source's events after a position from the end, in
        # O(missed events). None while every entry is of the one source in ``sources``
        # (the common case, which costs the hot path nothing).
        self.history: deque[Entry] = deque(maxlen=history_events)
        self.by_source: dict[bytes, deque[Entry]] | None = None
        self.latest: Entry | None = None
        self.sources: set[bytes] = set()
        self.count = 0


def _split_by_source(state: TopicState) -> dict[bytes, deque[Entry]]:
    """Start the per-source view of a topic's history (a second source appeared)."""
    if state.by_source is None:
        by_source: dict[bytes, deque[Entry]] = {}
        for entry in state.history:
            per_source = by_source.get(entry[1])
            if per_source is None:
                per_source = by_source[entry[1]] = deque()
            per_source.append(entry)
        state.by_source = by_source
    return state.by_source


def _append_history(state: TopicState, entry: Entry, oldest: float) -> None:
    """Add ``entry`` to the topic's history (both views); drop what fell out of it.
    A new source of the topic must be in ``state.sources`` already (see _new_source)."""
    history = state.history
    by_source = state.by_source
    if by_source is None:
        history.append(entry)
        while len(history) > 1 and history[0][5] < oldest:
            history.popleft()
        return
    if len(history) == history.maxlen:
        _drop_oldest(by_source, history[0])
    history.append(entry)
    per_source = by_source.get(entry[1])
    if per_source is None:
        per_source = by_source[entry[1]] = deque()
    per_source.append(entry)
    while len(history) > 1 and history[0][5] < oldest:
        _drop_oldest(by_source, history.popleft())


def _drop_oldest(by_source: dict[bytes, deque[Entry]], entry: Entry) -> None:
    per_source = by_source[entry[1]]
    per_source.popleft()
    if not per_source:
        del by_source[entry[1]]


def _new_source(state: TopicState, source: bytes) -> None:
    """Record a source new to the topic; the history's single-source form ends."""
    if state.history:
        _split_by_source(state)
    state.sources.add(source)


def _entries_of(state: TopicState, source: bytes) -> deque[Entry] | None:
    """The topic's history entries of ``source``, oldest first."""
    if state.by_source is None:
        return state.history if source in state.sources else None
    return state.by_source.get(source)


def _follows(entry: Entry, later: tuple[int, int]) -> bool:
    """Whether position ``later`` comes right after ``entry``'s in its (source, topic)."""
    epoch, seq = entry[2], entry[3]
    return later == (epoch, seq + 1) or (later[0] > epoch and later[1] == 1)


def _candidate_patterns(topic: str) -> tuple[str, ...]:
    """Every pattern text that matches ``topic`` (the grammar allows six at most)."""
    kind, dot, key = topic.partition(".")
    if not dot:
        return ("*", kind)
    return ("*", kind, topic, f"*.{key}", f"{kind}.*", "*.*")


@dataclass
class SourceState:
    last_seen: float  # monotonic
    last_seen_ns: int  # wall clock, for the client message
    live: bool = True
    topics: set[bytes] = field(default_factory=set)  # where it has a sequence position


@dataclass
class Sync:
    """An upstream snapshot request with its marker nonce, covering ``prefixes``."""

    sync_id: int
    nonce: bytes
    prefixes: tuple[bytes, ...]
    deadline: float


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
    published: int = 0
    publish_rejected: dict[str, int] = field(default_factory=dict)
    snapshots: int = 0
    resumes: int = 0
    resumes_unrecovered: int = 0
    resumes_from_bus: int = 0  # recovered from the proxy's history
    syncs: int = 0
    sync_timeouts: int = 0
    linger_evicted: int = 0  # lingering prefixes dropped early by the caps
    sources_forgotten: int = 0
    topics_untracked: int = 0  # events of topics beyond max_topics (served, not kept)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count


def pattern_for_prefix(prefix: bytes) -> str:
    """The snapshot pattern equivalent to a ZeroMQ prefix made by Pattern.zmq_prefix."""
    return prefix.decode() if prefix else "*"


class Hub:
    """Routing state of one bridge. The adapter drains ``upstream_ops`` after each call."""

    def __init__(
        self,
        *,
        conflate_types: Iterable[str] = CONFLATABLE_TYPES,
        history_events: int = 1000,
        history_seconds: float = 300.0,
        max_subscriptions: int = 100,
        upstream_linger: float = 300.0,
        snapshot_timeout: float = 3.0,
        stale_after: float = 15.0,
        track_sources: bool = True,
        snapshots_available: bool = True,
        max_lingering: int = 1000,
        max_topics: int = 100_000,
        max_sources: int = 10_000,
        forget_sources_after: float = 3600.0,
        bus_history: bool = False,
    ) -> None:
        self.conflate_types = frozenset(conflate_types)
        self.max_lingering = max_lingering
        self.max_topics = max_topics
        self.max_sources = max_sources
        self.forget_sources_after = forget_sources_after
        self.history_events = history_events
        self.history_seconds = history_seconds
        self.max_subscriptions = max_subscriptions
        self.upstream_linger = upstream_linger
        self.snapshot_timeout = snapshot_timeout
        self.stale_after = stale_after
        self.snapshots_available = snapshots_available
        # whether to ask the proxy's history (bus/history.py) for resumes
        self.bus_history = bus_history
        self.index = PatternIndex[Client]()
        self.generation = 0
        self.clients: set[Client] = set()
        self.topics: dict[bytes, TopicState | None] = {}
        # the same topics by type and by key: a snapshot finds its topics without a scan
        self.topics_by_type: dict[str, dict[bytes, TopicState]] = {}
        self.topics_by_key: dict[str, dict[bytes, TopicState]] = {}
        self.tracker = SequenceTracker()
        self.dirty: set[Client] = set()
        self.stats = HubStats()
        self.latency = Histogram()
        self.pending_latency: list[int] = []
        self.sources: dict[bytes, SourceState] = {}
        self._arrival = itertools.count(1)
        # upstream: prefix -> number of (client, pattern) needing it
        self.prefix_refs: dict[bytes, int] = {}
        self.subscribed: set[bytes] = set()
        self.held_prefixes: set[bytes] = set()
        # prefix -> when it expires; insertion order is expiry order (one linger time)
        self.linger_until: dict[bytes, float] = {}
        # who let each prefix linger, and each client's lingering prefixes in order
        self.linger_owner: dict[bytes, int] = {}
        self.lingering_of: dict[int, dict[bytes, None]] = {}
        # arrival number at which each subscribed prefix was (re)subscribed: a topic's
        # history is complete only after the start of its coverage
        self.covered_since: dict[bytes, int] = {}
        # every stored topic, sorted: the topics under a prefix are one slice of it
        self.topic_names: list[bytes] = []
        # prefixes dropped upstream whose topics are still to be forgotten: (prefix, from)
        self.forgetting: deque[tuple[bytes, bytes]] = deque()
        self.syncs: dict[int, Sync] = {}
        # the proxy's history requests in flight: sync id -> the client waiting for it
        self.history_requests: dict[int, Client] = {}
        self.clock = 0.0  # the latest monotonic time a call brought
        self.syncing: dict[bytes, int] = {}
        self._sync_ids = itertools.count(1)
        self.upstream_ops: list[tuple[Any, ...]] = []
        self.published_seq: dict[tuple[str, int, str], int] = {}
        self._ws_publishers = itertools.count(1)
        self.permanent: set[bytes] = set()
        if track_sources:
            self.permanent.add(SOURCE_STATUS_TYPE.encode())
            self._need_prefix(SOURCE_STATUS_TYPE.encode())

    # -- clients ------------------------------------------------------------------------
    def add_client(self, client: Client, now_ns: int, *, receive_all: bool = True) -> None:
        """Register ``client`` and queue its greeting; a subscriber gets everything until it
        subscribes (within its grant's patterns), unless ``receive_all`` is false: a
        reconnecting client must see no event before its resume is in force."""
        self.clients.add(client)
        if not client.publisher and receive_all:
            client.implicit = True
            # a grant of no topics ("topics": []) gets nothing, not everything
            granted = client.grant.topics
            for pattern in (EVERYTHING,) if granted is None else granted:
                self._add_pattern(client, pattern)
        self.mark(client)
        if not client.publisher and client.grant.allows_topic(SOURCE_STATUS_TYPE):
            for source, state in self.sources.items():
                client.push(self._source_status_frame(source, state))

    def remove_client(self, client: Client, now: float) -> None:
        self.clients.discard(client)
        self.dirty.discard(client)
        self.stats.conflated += client.conflated
        client.conflated = 0
        for pattern in self.index.patterns_of(client):
            self._remove_pattern(client, pattern, now, linger=not client.implicit)
        client.frames.clear()
        client.held = None

    def mark(self, client: Client) -> None:
        self.dirty.add(client)

    def greeting(self, client: Client, ping_interval: float, max_message_bytes: int) -> bytes:
        return message_frame(
            {
                "type": "connection_established",
                "server": "tradebus",
                "session": client.session,
                "ping_interval": int(ping_interval)
                if float(ping_interval).is_integer()
                else ping_interval,
                # what a client may send: publishers refuse bigger events themselves
                # instead of learning it from a 1009 close
                "max_message_bytes": max_message_bytes,
            }
        )

    def _add_pattern(self, client: Client, pattern: Pattern) -> bool:
        if not self.index.add(pattern, client):
            return False
        self.generation += 1
        self._need_prefix(pattern.zmq_prefix)
        return True

    def _remove_pattern(
        self, client: Client, pattern: Pattern, now: float, *, linger: bool = True
    ) -> bool:
        """Drop one pattern; a bus subscription nobody needs lingers for resumes, except
        the implicit "everything" of a client that never subscribed (it cannot resume)."""
        if not self.index.remove(pattern, client):
            return False
        self.generation += 1
        prefix = pattern.zmq_prefix
        left = self.prefix_refs.get(prefix, 0) - 1
        if left > 0:
            self.prefix_refs[prefix] = left
        else:
            self.prefix_refs.pop(prefix, None)
            if prefix not in self.permanent:
                if linger or prefix in self.linger_until:
                    self._linger(prefix, client.id, now + self.upstream_linger)
                if not linger or self.upstream_linger == 0:
                    self._drop_prefix(prefix)
        return True

    # -- requests -----------------------------------------------------------------------
    def subscribe(self, client: Client, request: Subscribe, now: float) -> None:
        """Apply a subscribe; the reply (and a snapshot, maybe later) goes to the queue."""
        self.clock = now
        request_id = request.request_id
        client.work += len(request.patterns) + len(request.since or ())
        for pattern in request.patterns:
            if not client.grant.allows_pattern(pattern):
                raise RequestError(
                    "forbidden", f"your token does not allow pattern {pattern.text!r}", request_id
                )
        if client.implicit:
            current: frozenset[Pattern] = frozenset()
        else:
            current = self.index.patterns_of(client)
        total = len(current | set(request.patterns))
        if total > self.max_subscriptions:
            raise RequestError(
                "too_many_subscriptions",
                f"{total} patterns requested; at most {self.max_subscriptions} per connection",
                request_id,
            )
        if client.implicit:
            client.implicit = False
            for pattern in self.index.patterns_of(client):
                if pattern not in request.patterns:
                    self._remove_pattern(client, pattern, now, linger=False)
        for pattern in request.patterns:
            self._add_pattern(client, pattern)
        held_now = sorted(p.text for p in self.index.patterns_of(client))
        if request.legacy:
            client.push(
                message_frame(
                    {
                        "type": "subscription_confirmed",
                        "channels": [p.text for p in request.patterns],
                    }
                )
            )
        else:
            client.push(message_frame({"type": "subscribed", "id": request_id, "topics": held_now}))
        self.mark(client)
        if request.legacy or not (request.snapshot or request.since is not None):
            return
        prefixes = {p.zmq_prefix for p in request.patterns}
        waiting = self._syncs_for(prefixes, now)
        complete = self.snapshots_available or all(self._is_held(p) for p in prefixes)
        client.jobs.append(SnapshotJob(request.patterns, request.since, waiting, complete))
        if waiting:
            client.hold()
        self._serve_jobs(client)

    def unsubscribe(self, client: Client, request: Unsubscribe, now: float) -> None:
        if client.implicit:
            client.implicit = False
            for pattern in self.index.patterns_of(client):
                self._remove_pattern(client, pattern, now, linger=False)
        for pattern in request.patterns:
            self._remove_pattern(client, pattern, now)
        held_now = sorted(p.text for p in self.index.patterns_of(client))
        client.push(
            message_frame({"type": "unsubscribed", "id": request.request_id, "topics": held_now})
        )
        self.mark(client)

    def pong(self, client: Client, request_id: RequestId) -> None:
        client.push(message_frame({"type": "pong", "id": request_id}))
        self.mark(client)

    def error(self, client: Client, code: str, message: str, request_id: RequestId) -> None:
        client.push(
            message_frame({"type": "error", "code": code, "message": message, "id": request_id})
        )
        self.mark(client)

    def ack(self, client: Client, request_id: RequestId, *, duplicate: bool = False) -> None:
        if request_id is None:
            return
        reply: dict[str, Any] = {"type": "ack", "id": request_id}
        if duplicate:
            reply["duplicate"] = True
        client.push(message_frame(reply))
        self.mark(client)

    def publish(self, client: Client, request: PublishRequest, now_ns: int) -> list[bytes] | None:
        """The bus frames for a publisher's event, or None when it is a duplicate."""
        if not client.may_publish:
            self.stats.publish_rejected["forbidden"] = (
                self.stats.publish_rejected.get("forbidden", 0) + 1
            )
            raise RequestError(
                "publish_forbidden",
                "this connection may not publish (needs a publish token naming a source, or "
                "--allow-publish and a loopback connection without an Origin header)",
                request.request_id,
            )
        topic = request.topic or self._derive_topic(request.type, request.data)
        if not client.grant.allows_topic(topic):
            raise RequestError(
                "publish_forbidden",
                f"your token does not allow topic {topic!r}",
                request.request_id,
            )
        if not client.source:
            # a credential publishes as the first source it names (it may name no other)
            named = client.grant.sources
            client.source = named[0] if named else f"ws-{next(self._ws_publishers)}"
        if not client.epoch:
            client.epoch = now_ns
        key = (client.source, client.epoch, topic)
        last = self.published_seq.get(key, 0)
        if request.seq is not None:
            if request.seq <= last:
                self.stats.publish_rejected["duplicate"] = (
                    self.stats.publish_rejected.get("duplicate", 0) + 1
                )
                return None
            seq = request.seq
        else:
            seq = last + 1
        self.published_seq[key] = seq
        self.stats.published += 1
        return encode_event(
            topic,
            request.type,
            request.data,
            client.source,
            client.epoch,
            seq,
            publish_ns=now_ns,
            timestamp=request.timestamp,
        )

    @staticmethod
    def _derive_topic(type_name: str, data: dict[str, Any]) -> str:
        symbol = data.get("symbol")
        if type_name in SYMBOL_KEYED_TYPES and isinstance(symbol, str):
            try:
                return make_topic(type_name, symbol)
            except TopicError:
                pass
        return type_name

    # -- the hot path -------------------------------------------------------------------
    def _topic_state(self, topic: bytes) -> TopicState | None:
        try:
            name = validate_topic(topic.decode())
        except (UnicodeDecodeError, TopicError):
            state = None
        else:
            conflate = name.partition(".")[0] in self.conflate_types
            state = TopicState(name, conflate, self.history_events)
        if len(self.topics) >= self.max_topics:
            # served, but not remembered: no history, no snapshot, counted
            self.stats.topics_untracked += 1
            return state
        self.topics[topic] = state
        bisect.insort(self.topic_names, topic)
        if state is not None:
            kind, _dot, key = state.name.partition(".")
            self.topics_by_type.setdefault(kind, {})[topic] = state
            if key:
                self.topics_by_key.setdefault(key, {})[topic] = state
        return state

    def _unindex_topic(self, topic: bytes, state: TopicState) -> None:
        kind, _dot, key = state.name.partition(".")
        for index, name in ((self.topics_by_type, kind), (self.topics_by_key, key)):
            known = index.get(name)
            if known is not None:
                known.pop(topic, None)
                if not known:
                    del index[name]

    def dispatch(self, batch: Sequence[Sequence[bytes]], now: float, now_ns: int) -> None:
        """Route a batch of bus messages [topic, meta, payload] to the clients' queues."""
        topics = self.topics
        observe = self.tracker.observe
        dirty_update = self.dirty.update
        sources = self.sources
        generation = self.generation
        match = self.index.match
        by_type = self.stats.events_by_type
        latency = self.pending_latency
        oldest = now - self.history_seconds
        arrival = self._arrival
        max_sources = self.max_sources
        deliveries = 0
        for message in batch:
            if len(message) != 3:
                self.stats.drop("invalid")
                continue
            topic, meta, payload = message
            state = topics.get(topic)
            if state is None:
                state = self._topic_state(topic) if topic not in topics else None
                if state is None:
                    self.stats.drop("invalid")
                    continue
            if len(meta) <= META_HEADER_SIZE:
                self.stats.drop("invalid")
                continue
            _version, _flags, epoch, seq, publish_ns = _unpack_meta(meta)
            source = meta[META_HEADER_SIZE:]
            source_state = sources.get(source)
            if source_state is None and len(sources) >= max_sources:
                self.stats.drop("too_many_sources")
                continue
            result = observe(source, topic, epoch, seq)
            status = result.status
            if status is SeqStatus.DUPLICATE or status is SeqStatus.STALE_EPOCH:
                self.stats.drop(_DELIVER_DROPS[status])
                continue
            if source_state is None or not source_state.live:
                source_state = self._source_live(source, now, now_ns)
            else:
                source_state.last_seen = now
                source_state.last_seen_ns = now_ns
            frame = text_frame(payload)
            entry = (next(arrival), source, epoch, seq, frame, now, topic)
            if source not in state.sources:
                _new_source(state, source)
                source_state.topics.add(topic)
            history = state.history
            if state.by_source is None:
                history.append(entry)
                while len(history) > 1 and history[0][5] < oldest:
                    history.popleft()
            else:
                _append_history(state, entry, oldest)
            state.latest = entry
            state.count += 1
            by_type[state.type] = by_type.get(state.type, 0) + 1
            if state.generation != generation:
                state.subs = match(state.name)
                state.generation = generation
            subs = state.subs
            if result.missed and (status is SeqStatus.GAP or status is SeqStatus.RESTART):
                self._gap(state, source, result.missed)
            if not subs:
                continue
            conflate = state.conflate
            for client in subs:
                if client.special:
                    client.push_event(frame, topic, source, epoch, seq, conflate)
                else:
                    client.frames.append(frame)
            dirty_update(subs)
            deliveries += len(subs)
            latency.append(publish_ns)
        self.stats.deliveries += deliveries

    def _gap(self, state: TopicState, source: bytes, missed: int) -> None:
        self.stats.gaps += 1
        self.stats.missed += missed
        if not state.subs:
            return
        frame = message_frame(
            {
                "type": "gap",
                "topic": state.name,
                "source": source.decode(errors="replace"),
                "missed": missed,
            }
        )
        for client in state.subs:
            client.push_event(frame, None, None, 0, 0, False)

    def observe_latency(self, now_ns: int) -> None:
        """Record publish -> written latency of the events delivered since the last call."""
        if self.pending_latency:
            self.latency.observe_ns(self.pending_latency, now_ns)
            self.pending_latency.clear()

    # -- source liveness ----------------------------------------------------------------
    def _source_status_frame(self, source: bytes, state: SourceState) -> bytes:
        return message_frame(
            {
                "type": "source_status",
                "source": source.decode(errors="replace"),
                "status": "live" if state.live else "stale",
                "last_seen": iso_from_ns(state.last_seen_ns),
            }
        )

    def _source_live(self, source: bytes, now: float, now_ns: int) -> SourceState:
        state = self.sources.get(source)
        if state is None:
            state = self.sources[source] = SourceState(now, now_ns)
        state.last_seen, state.last_seen_ns, state.live = now, now_ns, True
        self._broadcast(self._source_status_frame(source, state))
        return state

    def _broadcast(self, frame: bytes) -> None:
        """A source's status, to the clients whose grant covers the status topic (source
        names are data too: a token limited to market data does not learn them)."""
        for client in self.clients:
            if (
                not client.publisher or self.index.patterns_of(client)
            ) and client.grant.allows_topic(SOURCE_STATUS_TYPE):
                client.push(frame)
                self.dirty.add(client)

    def housekeeping(self, now: float) -> None:
        """Periodic work: stale sources, expired lingering subscriptions, sync timeouts."""
        self.clock = now
        forgotten: list[bytes] = []
        for source, state in self.sources.items():
            if state.live and now - state.last_seen > self.stale_after:
                state.live = False
                self._broadcast(self._source_status_frame(source, state))
            elif not state.live and now - state.last_seen > self.forget_sources_after:
                forgotten.append(source)
        for source in forgotten:
            self._forget_source(source)
        # a bounded amount of work per call, so that no call holds the loop for long:
        # the rest waits for the next call
        for _ in range(EXPIRIES_PER_CALL):
            first = next(iter(self.linger_until.items()), None)
            if first is None or first[1] > now:
                break
            self._drop_prefix(first[0])
        self._forget_topics(FORGET_TOPICS_PER_CALL)
        for sync in [s for s in self.syncs.values() if s.deadline <= now]:
            self.stats.sync_timeouts += 1
            self.sync_failed(sync.sync_id)

    def stale_sources(self) -> dict[str, bool]:
        return {s.decode(errors="replace"): state.live for s, state in self.sources.items()}

    # -- upstream subscriptions and snapshot syncs --------------------------------------
    def _need_prefix(self, prefix: bytes) -> None:
        self.prefix_refs[prefix] = self.prefix_refs.get(prefix, 0) + 1
        self._unlinger(prefix)
        if prefix not in self.subscribed:
            self.subscribed.add(prefix)
            self.covered_since[prefix] = next(self._arrival)
            self.upstream_ops.append(("subscribe", prefix))

    def _linger(self, prefix: bytes, owner: int, until: float) -> None:
        """Keep ``prefix`` subscribed until ``until``; at most max_subscriptions lingering
        prefixes per client and max_lingering in all (the oldest go first, counted)."""
        if prefix in self.linger_until:
            # re-inserted, so that the order of the dict stays the order of expiry
            until = max(until, self.linger_until.pop(prefix))
            self.linger_until[prefix] = until
            return
        mine = self.lingering_of.setdefault(owner, {})
        if len(mine) >= self.max_subscriptions:
            self.stats.linger_evicted += 1
            self._drop_prefix(next(iter(mine)))
        if len(self.linger_until) >= self.max_lingering:
            self.stats.linger_evicted += 1
            self._drop_prefix(next(iter(self.linger_until)))
        self.linger_until[prefix] = until
        self.linger_owner[prefix] = owner
        self.lingering_of.setdefault(owner, {})[prefix] = None

    def _unlinger(self, prefix: bytes) -> None:
        if self.linger_until.pop(prefix, None) is None:
            return
        owner = self.linger_owner.pop(prefix)
        mine = self.lingering_of[owner]
        del mine[prefix]
        if not mine:
            del self.lingering_of[owner]

    def _drop_prefix(self, prefix: bytes) -> None:
        self._unlinger(prefix)
        if prefix in self.prefix_refs or prefix not in self.subscribed:
            return
        self.subscribed.discard(prefix)
        self.covered_since.pop(prefix, None)
        self.held_prefixes.discard(prefix)
        self.upstream_ops.append(("unsubscribe", prefix))
        # The history of topics no other subscription covers stops being complete. A
        # resume checks coverage itself (_coverage_start), so forgetting them only frees
        # memory, and is done a bounded number of topics per housekeeping call.
        self.forgetting.append((prefix, prefix))

    def _coverage_start(self, topic: bytes) -> int | None:
        """The arrival number since which ``topic`` has been subscribed without a break
        (None: it is not subscribed now). A prefix still subscribed has been since its
        covered_since, so the earliest of the topic's covering prefixes is the answer."""
        covered = self.covered_since
        if len(covered) <= len(topic):
            starts = [start for prefix, start in covered.items() if topic.startswith(prefix)]
        else:
            starts = [covered[topic[:i]] for i in range(len(topic) + 1) if topic[:i] in covered]
        return min(starts) if starts else None

    def _forget_topics(self, budget: int) -> None:
        """Forget up to ``budget`` topics under dropped prefixes that nothing covers now."""
        names = self.topic_names
        while self.forgetting and budget > 0:
            prefix, start = self.forgetting[0]
            low = index = bisect.bisect_left(names, start)
            kept: list[bytes] = []
            while budget > 0 and index < len(names) and names[index].startswith(prefix):
                budget -= 1
                topic = names[index]
                index += 1
                if self._coverage_start(topic) is not None:
                    kept.append(topic)
                    continue
                state = self.topics.pop(topic)
                if state is not None:
                    for source in state.sources:
                        self.tracker.forget(source, topic)
                    self._unindex_topic(topic, state)
            names[low:index] = kept  # one move of the list for the whole run
            index = low + len(kept)
            if index < len(names) and names[index].startswith(prefix):
                self.forgetting[0] = (prefix, names[index])
                return
            self.forgetting.popleft()

    def _forget_source(self, source: bytes) -> None:
        """A source stale for forget_sources_after: its status and positions go."""
        state = self.sources.pop(source)
        for topic in state.topics:
            self.tracker.forget(source, topic)
            topic_state = self.topics.get(topic)
            if topic_state is not None and source in topic_state.sources:
                if topic_state.history:
                    _split_by_source(topic_state)  # its entries stay, its name goes
                topic_state.sources.discard(source)
        self.stats.sources_forgotten += 1

    def _is_held(self, prefix: bytes) -> bool:
        return any(prefix.startswith(held) for held in self.held_prefixes)

    def _syncs_for(self, prefixes: set[bytes], now: float) -> set[int]:
        """Sync ids to wait for before the local cache holds every topic of ``prefixes``."""
        if not self.snapshots_available:
            return set()
        waiting: set[int] = set()
        new: list[bytes] = []
        for prefix in sorted(prefixes):
            if self._is_held(prefix):
                continue
            sync_id = self.syncing.get(prefix)
            if sync_id is not None:
                waiting.add(sync_id)
            else:
                new.append(prefix)
        if new:
            sync = Sync(
                next(self._sync_ids),
                secrets.token_hex(8).encode(),
                tuple(new),
                now + self.snapshot_timeout,
            )
            self.syncs[sync.sync_id] = sync
            self.stats.syncs += 1
            for prefix in new:
                self.syncing[prefix] = sync.sync_id
            self.upstream_ops.append(
                ("sync", sync.sync_id, sync.nonce, [pattern_for_prefix(p) for p in new])
            )
            waiting.add(sync.sync_id)
        return waiting

    def snapshot_reply(
        self, sync_id: int, synced: bool, messages: Sequence[Sequence[bytes]], now: float
    ) -> None:
        """Apply the proxy's snapshot for ``sync_id`` to the cache; serve waiting clients."""
        self.clock = now
        sync = self.syncs.pop(sync_id, None)
        if sync is None:
            return  # answered after its timeout: the clients were already served
        for topic, meta, payload in messages:
            state = self.topics.get(topic)
            if state is None:
                state = self._topic_state(topic) if topic not in self.topics else None
                if state is None or len(meta) <= META_HEADER_SIZE:
                    self.stats.drop("invalid")
                    continue
            _version, _flags, epoch, seq, _publish_ns = _unpack_meta(meta)
            source = meta[META_HEADER_SIZE:]
            source_state = self.sources.get(source)
            if source_state is None and len(self.sources) >= self.max_sources:
                self.stats.drop("too_many_sources")
                continue
            known = self.tracker.position(source, topic)
            if known is not None and (epoch, seq) <= known:
                continue  # the live stream already brought this or a newer event
            self.tracker.set_position(source, topic, epoch, seq)
            entry = (next(self._arrival), source, epoch, seq, text_frame(payload), now, topic)
            if source not in state.sources:
                _new_source(state, source)
                if source_state is not None:
                    source_state.topics.add(topic)
            _append_history(state, entry, now - self.history_seconds)
            state.latest = entry
        for prefix in sync.prefixes:
            self.syncing.pop(prefix, None)
            if prefix in self.subscribed:
                self.held_prefixes.add(prefix)
        self._sync_done(sync_id, complete=synced)

    def sync_failed(self, sync_id: int) -> None:
        """The proxy did not answer in time: serve waiting clients from what is known."""
        sync = self.syncs.pop(sync_id, None)
        self.history_requests.pop(sync_id, None)
        if sync is None:
            return
        for prefix in sync.prefixes:
            self.syncing.pop(prefix, None)
        self._sync_done(sync_id, complete=False)

    def _sync_done(self, sync_id: int, *, complete: bool) -> None:
        for client in list(self.clients):
            touched = False
            for job in client.jobs:
                if sync_id in job.waiting:
                    job.waiting.discard(sync_id)
                    job.complete = job.complete and complete
                    touched = True
            if touched:
                self._serve_jobs(client)

    def _serve_jobs(self, client: Client) -> None:
        skip: dict[tuple[bytes, bytes], tuple[int, int]] = {}
        while client.jobs and not client.jobs[0].waiting:
            job = client.jobs[0]
            if self._ask_bus_history(client, job):
                break
            client.jobs.pop(0)
            skip.update(self._serve(client, job))
        if not client.jobs and client.held is not None:
            client.release(skip)
        self.mark(client)

    def _ask_bus_history(self, client: Client, job: SnapshotJob) -> bool:
        """Ask the proxy's history for a resume this bridge's own cannot prove complete (it
        restarted, or the positions come from another bridge); True when now waiting."""
        if job.since is None or job.asked_bus or not self.bus_history:
            return False
        states = self._allowed_states(client, job.patterns)
        if job.complete and self._missed(job, states)[1]:
            return False
        job.asked_bus = True
        sync = Sync(
            next(self._sync_ids),
            secrets.token_hex(8).encode(),
            (),
            self.clock + self.snapshot_timeout,
        )
        self.syncs[sync.sync_id] = sync
        self.history_requests[sync.sync_id] = client
        job.waiting.add(sync.sync_id)
        client.hold()
        positions = [
            p for p in job.since if any(pattern.matches(p.topic) for pattern in job.patterns)
        ]
        self.upstream_ops.append(
            ("history", sync.sync_id, sync.nonce, positions, [p.text for p in job.patterns])
        )
        return True

    def history_reply(
        self, sync_id: int, complete: bool, messages: Sequence[Sequence[bytes]], now: float
    ) -> None:
        """The proxy's history answer for a resume: its events serve the resume when it
        says complete; otherwise the resume is served as without it (recovered: false)."""
        self.clock = now
        client = self.history_requests.pop(sync_id, None)
        if self.syncs.pop(sync_id, None) is None or client is None:
            return  # answered after its timeout
        job = next((j for j in client.jobs if sync_id in j.waiting), None)
        if job is None or client not in self.clients:
            return
        if complete:
            entries: list[Entry] = []
            for order, (topic, meta, payload) in enumerate(messages):
                if len(meta) <= META_HEADER_SIZE or not client.grant.allows_topic(
                    topic.decode(errors="replace")
                ):
                    continue
                _version, _flags, epoch, seq, _publish_ns = _unpack_meta(meta)
                source = meta[META_HEADER_SIZE:]
                entries.append((order, source, epoch, seq, text_frame(payload), now, topic))
            job.bus_entries = entries
        self._sync_done(sync_id, complete=True)

    def _allowed_states(
        self, client: Client, patterns: Sequence[Pattern]
    ) -> list[tuple[bytes, TopicState]]:
        return [
            (topic, state)
            for topic, state in self._matching_states(patterns)
            if client.grant.allows_topic(state.name)
        ]

    def _matching_states(self, patterns: Sequence[Pattern]) -> list[tuple[bytes, TopicState]]:
        """Topics with an event matching any of ``patterns``, by name: the cost is the
        topics each pattern can match (by type, by key, or one topic), not all topics."""
        found: dict[bytes, TopicState] = {}
        for pattern in patterns:
            kind = pattern.tokens[0]
            key = pattern.tokens[1] if len(pattern.tokens) > 1 else "*"
            candidates: Iterable[tuple[bytes, TopicState | None]]
            if kind != "*" and key != "*":
                topic = pattern.text.encode()
                candidates = ((topic, self.topics.get(topic)),)
            elif kind != "*":
                candidates = self.topics_by_type.get(kind, {}).items()
            elif key != "*":
                candidates = self.topics_by_key.get(key, {}).items()
            else:
                candidates = self.topics.items()
            for topic, state in candidates:
                if state is not None and state.latest is not None and pattern.matches(state.name):
                    found[topic] = state
        result = sorted(found.items(), key=lambda item: item[1].name)
        return result

    def _serve(
        self, client: Client, job: SnapshotJob
    ) -> dict[tuple[bytes, bytes], tuple[int, int]]:
        """Queue the framed snapshot or resume of ``job``; returns the positions it sent."""
        sent: dict[tuple[bytes, bytes], tuple[int, int]] = {}
        states = [
            (topic, state)
            for topic, state in self._matching_states(job.patterns)
            if client.grant.allows_topic(state.name)
        ]
        mode = "snapshot"
        frames: list[bytes] = []
        recovered = job.complete
        if job.since is not None:
            mode = "resume"
            self.stats.resumes += 1
            if job.bus_entries is not None:
                entries, recovered = job.bus_entries, True
                self.stats.resumes_from_bus += 1
            else:
                entries, recovered = self._missed(job, states)
                recovered = recovered and job.complete
            if not recovered:
                self.stats.resumes_unrecovered += 1
                entries = [state.latest for _topic, state in states if state.latest is not None]
                entries.sort()
            for position in job.since:
                sent[(position.source.encode(), position.topic.encode())] = (
                    position.epoch,
                    position.seq,
                )
            for entry in entries:
                frames.append(entry[4])
                key = (entry[1], entry[6])
                if (entry[2], entry[3]) > sent.get(key, (-1, -1)):
                    sent[key] = (entry[2], entry[3])
        else:
            self.stats.snapshots += 1
            for topic, state in states:
                latest = state.latest
                if latest is not None:
                    frames.append(latest[4])
                    sent[(latest[1], topic)] = (latest[2], latest[3])
        client.work += len(job.since or ()) + len(states) + len(frames)
        client.push(message_frame({"type": "snapshot_begin", "mode": mode, "recovered": recovered}))
        for frame in frames:
            client.push(frame)
        client.push(
            message_frame(
                {
                    "type": "snapshot_end",
                    "mode": mode,
                    "recovered": recovered,
                    "count": len(frames),
                }
            )
        )
        return sent

    def _missed(
        self, job: SnapshotJob, states: list[tuple[bytes, TopicState]]
    ) -> tuple[list[Entry], bool]:
        """Events after the client's positions, in arrival order, and whether all are known.

        Topics the client named: every event after its position (recovered only when the
        history still holds the next one). Matching topics it did not name: their latest.
        """
        assert job.since is not None
        allowed = {pattern.text for pattern in job.patterns}
        # one position per (topic, source): the earliest, should a client repeat one
        wanted: dict[tuple[bytes, bytes], tuple[int, int]] = {}
        for position in job.since:
            if allowed.isdisjoint(_candidate_patterns(position.topic)):
                continue
            key = (position.topic.encode(), position.source.encode())
            mark = (position.epoch, position.seq)
            if mark < wanted.get(key, (1 << 64, 0)):
                wanted[key] = mark
        entries: list[Entry] = []
        named: set[bytes] = set()
        tracker_position = self.tracker.position
        for (topic, source), (epoch, seq) in wanted.items():
            named.add(topic)
            state = self.topics.get(topic)
            if state is None:
                return [], False
            if tracker_position(source, topic) == (epoch, seq):
                # nothing new since, if the topic was followed since that event (when
                # it aged out of the history, since the topic's latest event)
                coverage = self._coverage_start(topic)
                per_source = _entries_of(state, source)
                seen = per_source[-1] if per_source else state.latest
                if coverage is None or seen is None or seen[0] < coverage:
                    return [], False
                continue
            per_source = _entries_of(state, source)
            coverage = self._coverage_start(topic)
            if not per_source or coverage is None:
                return [], False
            first = per_source[0]
            if (first[2], first[3]) > (epoch, seq) and (first[2], first[3]) != (epoch, seq + 1):
                return [], False  # the next event already left the history
            newer: list[Entry] = []
            previous = (-1, -1)
            for entry in reversed(per_source):
                if (entry[2], entry[3]) <= (epoch, seq):
                    break
                if previous != (-1, -1) and not _follows(entry, previous):
                    return [], False  # a hole: events the bridge never received
                previous = (entry[2], entry[3])
                newer.append(entry)
            if not newer or (newer[-1][2], newer[-1][3]) != (epoch, seq + 1):
                return [], False
            if newer[-1][0] < coverage:
                # received before the topic's current subscription began: what came
                # between the two subscriptions is unknown
                return [], False
            newer.reverse()
            entries.extend(newer)
        for topic, state in states:
            if topic not in named and state.latest is not None:
                entries.append(state.latest)
        entries.sort()
        return entries, True
