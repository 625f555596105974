"""The bridge's routing core: clients, subscriptions, routing, and the parts it drives. Pure.

No I/O and no clock of its own: the adapter (bridge/app.py) feeds it bus messages and
client requests with the current time, writes what the clients' queues hold, and carries
out the upstream commands (bridge/upstream.py) the hub leaves in ``upstream_ops``.

The hub routes; each other job has its own module: a client's queue and backpressure
(bridge/client.py), bus subscriptions, lingering and syncs (bridge/upstream.py), history,
snapshots and resumes (bridge/history.py), source liveness (bridge/sources.py),
WebSocket-publish intake (bridge/intake.py), counters (bridge/stats.py).

Hot path, per bus message: one dict lookup for the topic's state (which caches the set of
matching clients until subscriptions change), one sequence check, one WebSocket frame built
from the payload bytes (never decoded), then one list append per matching client. The
adapter then writes each dirty client's frames with a single transport write.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from bridge.client import Client, Held, Sent
from bridge.frames import message_frame, text_frame
from bridge.history import (
    Entry,
    Refill,
    SnapshotJob,
    TopicState,
    append_history,
    forget_source,
    merge_answer,
    missed,
    new_source,
    refill_events,
    serve,
    tuple_new,
)
from bridge.intake import Intake
from bridge.protocol import (
    Position,
    PublishRequest,
    RequestError,
    RequestId,
    Subscribe,
    Unsubscribe,
)
from bridge.sources import Sources, status_frame
from bridge.stats import Histogram, HubStats
from bridge.upstream import Command, Upstream
from bus.envelope import META_HEADER, META_HEADER_SIZE
from bus.errors import TopicError
from bus.event_types import CONFLATABLE_TYPES, SYMBOL_KEYED_TYPES
from bus.sequence import SeqStatus, SequenceTracker
from bus.topics import Pattern, PatternIndex, validate_topic

SOURCE_STATUS_TYPE: Final = "system_status"
EVERYTHING: Final = Pattern("*")

_unpack_meta = META_HEADER.unpack_from
_DELIVER_DROPS: Final = {SeqStatus.DUPLICATE: "duplicate", SeqStatus.STALE_EPOCH: "stale_epoch"}

# bounded work per housekeeping call (every HOUSEKEEPING_INTERVAL in the adapter)
FORGET_TOPICS_PER_CALL: Final = 100
# how long after the bus link came back a gap is first asked of the proxy's history: the
# events the proxy forwarded before the bridge's subscriptions were in force again
REFILL_WINDOW: Final = 60.0


# a history request's question: its positions (topic, source, epoch, seq) and patterns
AskKey = tuple[tuple[tuple[str, str, int, int], ...], tuple[str, ...]]


@dataclass
class BusAsk:
    """A history request to the proxy and the resumes waiting for it: the first asked it,
    the others asked the same question while it was in flight."""

    key: AskKey
    positions: tuple[Position, ...]
    clients: list[Client]
    # the hub's arrival number when it was sent: a topic subscribed before it was in
    # force when the proxy answered (the answer waits for its marker)
    asked_at: int


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
        self.max_topics = max_topics
        self.history_events = history_events
        self.history_seconds = history_seconds
        self.max_subscriptions = max_subscriptions
        self.snapshot_timeout = snapshot_timeout
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
        # every stored topic, sorted: the topics under a prefix are one slice of it
        self.topic_names: list[bytes] = []
        self.tracker = SequenceTracker()
        self.dirty: set[Client] = set()
        self.stats = HubStats()
        self.latency = Histogram()
        self.pending_latency: list[int] = []
        self.sources = Sources(
            stale_after=stale_after,
            forget_after=forget_sources_after,
            max_sources=max_sources,
        )
        self._arrival = itertools.count(1)
        self.upstream = Upstream(
            self.stats,
            self._arrival,
            linger=upstream_linger,
            max_lingering=max_lingering,
            max_per_client=max_subscriptions,
            snapshot_timeout=snapshot_timeout,
        )
        self.upstream_ops: list[Command] = self.upstream.commands
        # the proxy's history requests in flight, by sync id and by question: resumes
        # asking the same share one request (a thousand browsers back from one bridge)
        self.history_requests: dict[int, BusAsk] = {}
        self.bus_asks: dict[AskKey, int] = {}
        # gaps after the bus link came back (until refill_until), asked of the proxy's
        # history: those of the current batch, then by sync id
        self.refill_until = 0.0
        self._new_refills: list[Refill] = []
        self.refills: dict[int, list[Refill]] = {}
        self.clock = 0.0  # the latest monotonic time a call brought
        self.intake = Intake(self.stats, SYMBOL_KEYED_TYPES)
        if track_sources:
            self.upstream.permanent.add(SOURCE_STATUS_TYPE.encode())
            self.upstream.need(SOURCE_STATUS_TYPE.encode())

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
            for source, state in self.sources.states.items():
                client.push(status_frame(source, state))

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
        self.upstream.need(pattern.zmq_prefix)
        return True

    def _remove_pattern(
        self, client: Client, pattern: Pattern, now: float, *, linger: bool = True
    ) -> bool:
        """Drop one pattern; a bus subscription nobody needs lingers for resumes, except
        the implicit "everything" of a client that never subscribed (it cannot resume)."""
        if not self.index.remove(pattern, client):
            return False
        self.generation += 1
        self.upstream.release(pattern.zmq_prefix, client.id, now, linger=linger)
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
        waiting = self.upstream.syncs_for(prefixes, now) if self.snapshots_available else set()
        complete = self.snapshots_available or all(self.upstream.is_held(p) for p in prefixes)
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
        return self.intake.publish(client, request, now_ns)

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
        sources = self.sources.states
        generation = self.generation
        match = self.index.match
        by_type = self.stats.events_by_type
        latency = self.pending_latency
        oldest = now - self.history_seconds
        arrival = self._arrival
        max_sources = self.sources.max_sources
        make_entry = tuple_new
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
                source_state, status_message = self.sources.heard(source, now, now_ns)
                self._broadcast(status_message)
            else:
                source_state.last_seen = now
                source_state.last_seen_ns = now_ns
            frame = text_frame(payload)
            entry: Entry = make_entry(Entry, (next(arrival), source, epoch, seq, frame, now, topic))
            if source not in state.sources:
                new_source(state, source)
                source_state.topics.add(topic)
            history = state.history
            if state.by_source is None:
                history.append(entry)
                while len(history) > 1 and history[0].time < oldest:
                    history.popleft()
            else:
                append_history(state, entry, oldest)
            state.latest = entry
            state.count += 1
            by_type[state.type] = by_type.get(state.type, 0) + 1
            if state.generation != generation:
                state.subs = match(state.name)
                state.generation = generation
            subs = state.subs
            if result.missed and (status is SeqStatus.GAP or status is SeqStatus.RESTART):
                self._gap(state, topic, source, epoch, seq, result.missed, now)
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
        if self._new_refills:
            self._ask_refills()

    def _gap(
        self,
        state: TopicState,
        topic: bytes,
        source: bytes,
        epoch: int,
        seq: int,
        missed_events: int,
        now: float,
    ) -> None:
        self.stats.gaps += 1
        self.stats.missed += missed_events
        if not state.subs:
            return
        frame = message_frame(
            {
                "type": "gap",
                "topic": state.name,
                "source": source.decode(errors="replace"),
                "missed": missed_events,
            }
        )
        refill = self.bus_history and now < self.refill_until
        for client in state.subs:
            if refill:
                # its events wait for the proxy's answer, the gap message in the missed
                # events' place until then (and instead of them if it has not all)
                client.hold()
                client.refills += 1
            client.push_event(frame, None, None, 0, 0, False)
        if refill:
            after = (epoch, seq - missed_events - 1)
            self._new_refills.append(
                Refill(topic, source, after, (epoch, seq), frame, list(state.subs))
            )

    def link_restored(self, now: float) -> None:
        """The bus link is back: for a while, gaps are asked of the proxy's history."""
        if self.bus_history:
            self.refill_until = now + REFILL_WINDOW

    def _ask_refills(self) -> None:
        """One history request for the gaps of a batch (a restart shows them all at once)."""
        refills, self._new_refills = self._new_refills, []
        positions = tuple(
            Position(r.topic.decode(), r.source.decode(errors="replace"), *r.after) for r in refills
        )
        sync_id = self.upstream.ask_history(positions, (), self.clock)
        self.refills[sync_id] = refills

    def _refilled(self, refills: list[Refill], answer: list[Entry]) -> None:
        """Deliver each gap's events where the proxy had them all, else the gap message."""
        for refill in refills:
            events = refill_events(refill, answer)
            if events is not None:
                self.stats.gaps_refilled += 1
            for client in refill.clients:
                if client not in self.clients:
                    continue
                if events is not None:
                    client.fill(
                        refill.frame,
                        [Held(e.frame, e.topic, e.source, e.epoch, e.seq) for e in events],
                    )
                client.refills -= 1
                if not client.refills and not client.jobs:
                    skip, client.later_skip = client.later_skip, {}
                    client.release(skip)
                self.mark(client)

    def observe_latency(self, now_ns: int) -> None:
        """Record publish -> written latency of the events delivered since the last call."""
        if self.pending_latency:
            self.latency.observe_ns(self.pending_latency, now_ns)
            self.pending_latency.clear()

    # -- source liveness ----------------------------------------------------------------
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
        frames, forgotten = self.sources.check(now)
        for frame in frames:
            self._broadcast(frame)
        for source in forgotten:
            self._forget_source(source)
        # a bounded amount of work per call, so that no call holds the loop for long:
        # the rest waits for the next call
        self.upstream.expire(now)
        self._forget_topics(FORGET_TOPICS_PER_CALL)
        for sync_id in self.upstream.overdue(now):
            self.stats.sync_timeouts += 1
            self.sync_failed(sync_id)

    def stale_sources(self) -> dict[str, bool]:
        return self.sources.liveness()

    def _forget_topics(self, budget: int) -> None:
        """Forget up to ``budget`` topics under dropped prefixes that nothing covers now."""
        names = self.topic_names
        forgetting = self.upstream.forgetting
        coverage_start = self.upstream.coverage_start
        while forgetting and budget > 0:
            prefix, start = forgetting[0]
            low = index = bisect.bisect_left(names, start)
            kept: list[bytes] = []
            while budget > 0 and index < len(names) and names[index].startswith(prefix):
                budget -= 1
                topic = names[index]
                index += 1
                if coverage_start(topic) is not None:
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
                forgetting[0] = (prefix, names[index])
                return
            forgetting.popleft()

    def _forget_source(self, source: bytes) -> None:
        """A source stale for forget_sources_after: its status and positions go."""
        state = self.sources.forget(source)
        for topic in state.topics:
            self.tracker.forget(source, topic)
            topic_state = self.topics.get(topic)
            if topic_state is not None:
                forget_source(topic_state, source)
        self.stats.sources_forgotten += 1

    # -- snapshots and resumes ----------------------------------------------------------
    def snapshot_reply(
        self, sync_id: int, synced: bool, messages: Sequence[Sequence[bytes]], now: float
    ) -> None:
        """Apply the proxy's snapshot for ``sync_id`` to the cache; serve waiting clients."""
        self.clock = now
        if self.upstream.synced(sync_id) is None:
            return  # answered after its timeout: the clients were already served
        sources = self.sources.states
        for topic, meta, payload in messages:
            state = self.topics.get(topic)
            if state is None:
                state = self._topic_state(topic) if topic not in self.topics else None
                if state is None or len(meta) <= META_HEADER_SIZE:
                    self.stats.drop("invalid")
                    continue
            _version, _flags, epoch, seq, _publish_ns = _unpack_meta(meta)
            source = meta[META_HEADER_SIZE:]
            source_state = sources.get(source)
            if source_state is None and len(sources) >= self.sources.max_sources:
                self.stats.drop("too_many_sources")
                continue
            known = self.tracker.position(source, topic)
            if known is not None and (epoch, seq) <= known:
                continue  # the live stream already brought this or a newer event
            self.tracker.set_position(source, topic, epoch, seq)
            entry = Entry(next(self._arrival), source, epoch, seq, text_frame(payload), now, topic)
            if source not in state.sources:
                new_source(state, source)
                if source_state is not None:
                    source_state.topics.add(topic)
            append_history(state, entry, now - self.history_seconds)
            state.latest = entry
        self._sync_done(sync_id, complete=synced)

    def sync_failed(self, sync_id: int) -> None:
        """The proxy did not answer in time: serve waiting clients from what is known."""
        sync = self.upstream.failed(sync_id)
        refills = self.refills.pop(sync_id, None)
        if refills is not None:
            self._refilled(refills, [])
            return
        ask = self.history_requests.pop(sync_id, None)
        if ask is not None:
            self.bus_asks.pop(ask.key, None)
        if sync is None:
            return
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
        skip: Sent = {}
        while client.jobs and not client.jobs[0].waiting:
            job = client.jobs[0]
            if self._ask_bus_history(client, job):
                break
            client.jobs.pop(0)
            states = self._allowed_states(client, job.patterns)
            resumed: tuple[list[Entry], bool] | None = None
            if job.since is not None:
                if job.bus_entries is not None:
                    resumed = job.bus_entries, True
                    self.stats.resumes_from_bus += 1
                else:
                    entries, recovered = self._missed(job, states)
                    resumed = entries, recovered and job.complete
                    if job.asked_bus and resumed[1]:
                        # the proxy's answer to a request it shared, merged into the history
                        self.stats.resumes_from_bus += 1
            skip.update(serve(client, job, states, resumed, self.stats))
        if client.refills:
            client.later_skip.update(skip)  # released once its gaps are refilled
        elif not client.jobs and client.held is not None:
            if client.later_skip:
                skip, client.later_skip = {**client.later_skip, **skip}, {}
            client.release(skip)
        self.mark(client)

    def _missed(
        self, job: SnapshotJob, states: list[tuple[bytes, TopicState]]
    ) -> tuple[list[Entry], bool]:
        return missed(job, states, self.topics, self.tracker.position, self.upstream.coverage_start)

    def _ask_bus_history(self, client: Client, job: SnapshotJob) -> bool:
        """Ask the proxy's history for a resume this bridge's own cannot prove complete (it
        restarted, or the positions come from another bridge); True when now waiting."""
        if job.since is None or job.asked_bus or not self.bus_history:
            return False
        states = self._allowed_states(client, job.patterns)
        if job.complete and self._missed(job, states)[1]:
            return False
        job.asked_bus = True
        positions = tuple(
            p for p in job.since if any(pattern.matches(p.topic) for pattern in job.patterns)
        )
        patterns = tuple(p.text for p in job.patterns)
        key: AskKey = (
            tuple(sorted({(p.topic, p.source, p.epoch, p.seq) for p in positions})),
            tuple(sorted(set(patterns))),
        )
        sync_id = self.bus_asks.get(key)
        if sync_id is None:
            sync_id = self.upstream.ask_history(positions, patterns, self.clock)
            self.bus_asks[key] = sync_id
            self.history_requests[sync_id] = BusAsk(key, positions, [client], next(self._arrival))
        else:
            self.history_requests[sync_id].clients.append(client)
        job.waiting.add(sync_id)
        client.hold()
        return True

    def history_reply(
        self, sync_id: int, complete: bool, messages: Sequence[Sequence[bytes]], now: float
    ) -> None:
        """The proxy's history answer for resumes. When complete its events go into the
        history in front of the live ones where they join without a hole, which serves
        every resume that shared the request and later ones alike; the resume that asked
        is served from the answer itself. Otherwise the resumes are served as without it
        (recovered: false, unless the bridge's own history covers them)."""
        self.clock = now
        refills = self.refills.pop(sync_id, None)
        ask = self.history_requests.pop(sync_id, None)
        if self.upstream.syncs.pop(sync_id, None) is None or (ask is None and refills is None):
            return  # answered after its timeout
        entries: list[Entry] = []
        for order, (topic, meta, payload) in enumerate(messages):
            if len(meta) <= META_HEADER_SIZE:
                continue
            _version, _flags, epoch, seq, _publish_ns = _unpack_meta(meta)
            source = meta[META_HEADER_SIZE:]
            entries.append(Entry(order, source, epoch, seq, text_frame(payload), now, topic))
        if refills is not None:
            # an incomplete answer still proves the gaps it covers (checked one by one)
            self._refilled(refills, entries)
            return
        assert ask is not None
        self.bus_asks.pop(ask.key, None)
        if complete:
            self._merge_answer(ask, entries)
            asker = ask.clients[0]
            job = next((j for j in asker.jobs if sync_id in j.waiting), None)
            if job is not None and asker in self.clients:
                job.bus_entries = [
                    e for e in entries if asker.grant.allows_topic(e.topic.decode(errors="replace"))
                ]
        self._sync_done(sync_id, complete=True)

    def _merge_answer(self, ask: BusAsk, entries: list[Entry]) -> None:
        by_key: dict[tuple[bytes, bytes], list[Entry]] = {}
        for entry in entries:
            by_key.setdefault((entry.topic, entry.source), []).append(entry)
        for position in ask.positions:
            topic, source = position.topic.encode(), position.source.encode()
            state = self.topics.get(topic)
            coverage = self.upstream.coverage_start(topic)
            if state is None or coverage is None or coverage >= ask.asked_at:
                continue  # not subscribed since before the request: the seam is unknown
            answer = by_key.get((topic, source), [])
            merge_answer(state, source, (position.epoch, position.seq), answer, coverage)

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
