"""The bridge's per-topic history, and snapshots and resumes served from it. Pure.

Each topic keeps its last events (by count and age) as ``Entry`` records holding the
ready-made WebSocket frame, in arrival order and, once a second source appears, per
source too. A snapshot is each matching topic's latest event; a resume is every event
after the client's positions, claimed ``recovered`` only when the history holds them
contiguously (bus/resume.py's rule, shared with the proxy's history) since the topic's
current bus subscription began.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from bridge.client import Client, Sent
from bridge.frames import message_frame
from bridge.protocol import Position
from bridge.stats import HubStats
from bus.resume import contiguous_from
from bus.topics import Pattern


class Entry(NamedTuple):
    """One event in a topic's history. Entries sort by ``arrival``."""

    arrival: int  # the hub's arrival number (or the order in a proxy's history reply)
    source: bytes
    epoch: int
    seq: int
    frame: bytes  # the WebSocket frame of the publisher's payload bytes
    time: float  # monotonic time of arrival
    topic: bytes


# the hot path builds entries with this (a C call), not Entry(...) (a Python __new__)
tuple_new = tuple.__new__


@dataclass
class SnapshotJob:
    """A subscribe that asked for a snapshot or a resume, waiting for upstream syncs."""

    patterns: tuple[Pattern, ...]
    since: tuple[Position, ...] | None
    waiting: set[int]
    complete: bool = True
    # a resume this bridge's history cannot prove complete is asked of the proxy's history
    # (bus/history.py): False until asked (or joined to another resume's request);
    # ``bus_entries`` are its events when the proxy answered this job's own request complete
    asked_bus: bool = False
    bus_entries: list[Entry] | None = None


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


def split_by_source(state: TopicState) -> dict[bytes, deque[Entry]]:
    """Start the per-source view of a topic's history (a second source appeared)."""
    if state.by_source is None:
        by_source: dict[bytes, deque[Entry]] = {}
        for entry in state.history:
            per_source = by_source.get(entry.source)
            if per_source is None:
                per_source = by_source[entry.source] = deque()
            per_source.append(entry)
        state.by_source = by_source
    return state.by_source


def append_history(state: TopicState, entry: Entry, oldest: float) -> None:
    """Add ``entry`` to the topic's history (both views); drop what fell out of it.
    A new source of the topic must be in ``state.sources`` already (see new_source)."""
    history = state.history
    by_source = state.by_source
    if by_source is None:
        history.append(entry)
        while len(history) > 1 and history[0].time < oldest:
            history.popleft()
        return
    if len(history) == history.maxlen:
        _drop_oldest(by_source, history[0])
    history.append(entry)
    per_source = by_source.get(entry.source)
    if per_source is None:
        per_source = by_source[entry.source] = deque()
    per_source.append(entry)
    while len(history) > 1 and history[0].time < oldest:
        _drop_oldest(by_source, history.popleft())


def _drop_oldest(by_source: dict[bytes, deque[Entry]], entry: Entry) -> None:
    per_source = by_source[entry.source]
    per_source.popleft()
    if not per_source:
        del by_source[entry.source]


def new_source(state: TopicState, source: bytes) -> None:
    """Record a source new to the topic; the history's single-source form ends."""
    if state.history:
        split_by_source(state)
    state.sources.add(source)


def forget_source(state: TopicState, source: bytes) -> None:
    """A forgotten source: its entries stay, its name goes."""
    if source in state.sources:
        if state.history:
            split_by_source(state)
        state.sources.discard(source)


def entries_of(state: TopicState, source: bytes) -> deque[Entry] | None:
    """The topic's history entries of ``source``, oldest first."""
    if state.by_source is None:
        return state.history if source in state.sources else None
    return state.by_source.get(source)


def candidate_patterns(topic: str) -> tuple[str, ...]:
    """Every pattern text that matches ``topic`` (the grammar allows six at most)."""
    kind, dot, key = topic.partition(".")
    if not dot:
        return ("*", kind)
    return ("*", kind, topic, f"*.{key}", f"{kind}.*", "*.*")


def missed(
    job: SnapshotJob,
    states: Sequence[tuple[bytes, TopicState]],
    topics: Mapping[bytes, TopicState | None],
    position_of: Callable[[bytes, bytes], tuple[int, int] | None],
    coverage_start: Callable[[bytes], int | None],
) -> tuple[list[Entry], bool]:
    """Events after the client's positions, in arrival order, and whether all are known.

    Topics the client named: every event after its position (recovered only when the
    history still holds the next one). Matching topics it did not name: their latest.
    ``position_of(source, topic)`` is the newest position the bridge saw;
    ``coverage_start(topic)`` the arrival number since which it has been subscribed.
    """
    assert job.since is not None
    allowed = {pattern.text for pattern in job.patterns}
    # one position per (topic, source): the earliest, should a client repeat one
    wanted: dict[tuple[bytes, bytes], tuple[int, int]] = {}
    for position in job.since:
        if allowed.isdisjoint(candidate_patterns(position.topic)):
            continue
        key = (position.topic.encode(), position.source.encode())
        mark = (position.epoch, position.seq)
        if mark < wanted.get(key, (1 << 64, 0)):
            wanted[key] = mark
    entries: list[Entry] = []
    named: set[bytes] = set()
    for (topic, source), (epoch, seq) in wanted.items():
        named.add(topic)
        state = topics.get(topic)
        if state is None:
            return [], False
        if position_of(source, topic) == (epoch, seq):
            # nothing new since, if the topic was followed since that event (when
            # it aged out of the history, since the topic's latest event)
            coverage = coverage_start(topic)
            per_source = entries_of(state, source)
            seen = per_source[-1] if per_source else state.latest
            if coverage is None or seen is None or seen.arrival < coverage:
                return [], False
            continue
        per_source = entries_of(state, source)
        coverage = coverage_start(topic)
        if not per_source or coverage is None:
            return [], False
        first = per_source[0]
        if (first.epoch, first.seq) > (epoch, seq) and (first.epoch, first.seq) != (epoch, seq + 1):
            return [], False  # the next event already left the history: no need to look
        newer: list[Entry] = []
        for entry in reversed(per_source):
            if (entry.epoch, entry.seq) <= (epoch, seq):
                break
            newer.append(entry)
        newer.reverse()
        # the next event must still be held (it may have left the history), and the rest
        # follow it without a hole (events the bridge never received). Stricter than the
        # rule at the seam: the bridge's history does not resume an old run's position
        # into a new run (its first event at seq 1); the proxy's may, for its own answer
        if (
            not newer
            or (newer[0].epoch, newer[0].seq) != (epoch, seq + 1)
            or not contiguous_from((epoch, seq), ((e.epoch, e.seq) for e in newer))
        ):
            return [], False
        if newer[0].arrival < coverage:
            # received before the topic's current subscription began: what came
            # between the two subscriptions is unknown
            return [], False
        entries.extend(newer)
    for topic, state in states:
        if topic not in named and state.latest is not None:
            entries.append(state.latest)
    entries.sort()
    return entries, True


def serve(
    client: Client,
    job: SnapshotJob,
    states: Sequence[tuple[bytes, TopicState]],
    resumed: tuple[list[Entry], bool] | None,
    stats: HubStats,
) -> Sent:
    """Queue the framed snapshot or resume of ``job`` (``resumed``: the resume's entries
    and whether they are every missed event); returns the positions it sent."""
    sent: Sent = {}
    mode = "snapshot"
    frames: list[bytes] = []
    recovered = job.complete
    if job.since is not None:
        assert resumed is not None
        mode = "resume"
        stats.resumes += 1
        entries, recovered = resumed
        if not recovered:
            stats.resumes_unrecovered += 1
            entries = [state.latest for _topic, state in states if state.latest is not None]
            entries.sort()
        for position in job.since:
            sent[(position.source.encode(), position.topic.encode())] = (
                position.epoch,
                position.seq,
            )
        for entry in entries:
            frames.append(entry.frame)
            key = (entry.source, entry.topic)
            if (entry.epoch, entry.seq) > sent.get(key, (-1, -1)):
                sent[key] = (entry.epoch, entry.seq)
    else:
        stats.snapshots += 1
        for topic, state in states:
            latest = state.latest
            if latest is not None:
                frames.append(latest.frame)
                sent[(latest.source, topic)] = (latest.epoch, latest.seq)
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


def merge_answer(
    state: TopicState,
    source: bytes,
    start: tuple[int, int],
    answer: Sequence[Entry],
    coverage: int,
) -> bool:
    """Put the proxy's history answer for (``state``'s topic, ``source``) after ``start``
    in front of what the bridge received itself, so that later resumes are served here.

    Only when it proves something: the bridge's own entries of the source, received since
    the topic's current subscription began (``coverage``), must continue the answer
    without a hole (bus/resume.py). The answer's events older than the bridge's first
    take that entry's arrival number and time, so they sort and age with it. True when
    the history now holds every event after ``start`` (merged or already there).
    """
    local = entries_of(state, source)
    if not local or local[0].arrival < coverage:
        return False
    first = local[0]
    first_mark = (first.epoch, first.seq)
    before = [e for e in answer if start < (e.epoch, e.seq) < first_mark]
    marks = [(e.epoch, e.seq) for e in before]
    marks.extend((e.epoch, e.seq) for e in local)
    if not contiguous_from(start, marks):
        return False
    if not before:
        return True
    stamped = [
        tuple_new(Entry, (first.arrival, source, e.epoch, e.seq, e.frame, first.time, e.topic))
        for e in before
    ]
    # entries sort by arrival, then source, epoch and seq: the answer's land just before
    # the bridge's first entry of that source
    history = state.history
    state.history = deque(sorted([*history, *stamped]), maxlen=history.maxlen)
    if state.by_source is not None:
        state.by_source = None
        split_by_source(state)
    return len(state.history) == len(history) + len(stamped)


@dataclass
class Refill:
    """A gap seen after the bus link came back: the events of (topic, source) between
    ``after`` and ``upto`` (the event that showed the gap) are asked of the proxy's
    history. Its ``clients`` hold their events meanwhile, ``frame`` (the gap message)
    standing where the missed events go."""

    topic: bytes
    source: bytes
    after: tuple[int, int]
    upto: tuple[int, int]
    frame: bytes
    clients: list[Client]


def refill_events(refill: Refill, answer: Sequence[Entry]) -> list[Entry] | None:
    """The missed events of ``refill`` from the proxy's answer, in order, or None unless
    it holds every one of them (bus/resume.py's rule, up to the event that showed the gap)."""
    events = sorted(
        (
            e
            for e in answer
            if e.topic == refill.topic
            and e.source == refill.source
            and refill.after < (e.epoch, e.seq) < refill.upto
        ),
        key=lambda e: (e.epoch, e.seq),
    )
    marks = [(e.epoch, e.seq) for e in events]
    marks.append(refill.upto)
    return events if contiguous_from(refill.after, marks) else None
