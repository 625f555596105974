"""The bridge's bus subscriptions and its requests to the proxy, as typed commands. Pure.

Owns which ZeroMQ prefixes are subscribed and why: how many (client, pattern) pairs need
each, which linger unneeded for a later resume (bounded per client and in all), since when
each has been subscribed without a break (a topic's history is complete only after that),
and the snapshot syncs and history requests in flight. Every change the adapter must carry
out on its sockets is appended to ``commands``; the adapter drains them after each call.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from bridge.protocol import Position
from bridge.stats import HubStats

# bounded work per housekeeping call (every HOUSEKEEPING_INTERVAL in the adapter)
EXPIRIES_PER_CALL: Final = 64


@dataclass(frozen=True, slots=True)
class SubscribePrefix:
    prefix: bytes


@dataclass(frozen=True, slots=True)
class UnsubscribePrefix:
    prefix: bytes


@dataclass(frozen=True, slots=True)
class SnapshotSync:
    """Ask the proxy's snapshot service for the latest of ``patterns``, with a marker."""

    sync_id: int
    nonce: bytes
    patterns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HistoryAsk:
    """Ask the proxy's history for every event after ``positions`` (bus/history.py)."""

    sync_id: int
    nonce: bytes
    positions: tuple[Position, ...]
    patterns: tuple[str, ...]


Command = SubscribePrefix | UnsubscribePrefix | SnapshotSync | HistoryAsk


@dataclass
class Sync:
    """An upstream snapshot or history request with its marker nonce, covering
    ``prefixes`` (none for a history request)."""

    sync_id: int
    nonce: bytes
    prefixes: tuple[bytes, ...]
    deadline: float


def pattern_for_prefix(prefix: bytes) -> str:
    """The snapshot pattern equivalent to a ZeroMQ prefix made by Pattern.zmq_prefix."""
    return prefix.decode() if prefix else "*"


class Upstream:
    def __init__(
        self,
        stats: HubStats,
        arrival: Iterator[int],
        *,
        linger: float,
        max_lingering: int,
        max_per_client: int,
        snapshot_timeout: float,
    ) -> None:
        self.stats = stats
        # the hub's arrival numbers: coverage is compared with its history entries'
        self._arrival = arrival
        self.linger_time = linger
        self.max_lingering = max_lingering
        self.max_per_client = max_per_client
        self.snapshot_timeout = snapshot_timeout
        self.commands: list[Command] = []
        # prefix -> number of (client, pattern) needing it
        self.refs: dict[bytes, int] = {}
        self.subscribed: set[bytes] = set()
        # subscribed prefixes whose topics' latest events the hub holds (synced)
        self.held_prefixes: set[bytes] = set()
        # never dropped (the source status topic)
        self.permanent: set[bytes] = set()
        # prefix -> when it expires; insertion order is expiry order (one linger time)
        self.linger_until: dict[bytes, float] = {}
        # who let each prefix linger, and each client's lingering prefixes in order
        self.linger_owner: dict[bytes, int] = {}
        self.lingering_of: dict[int, dict[bytes, None]] = {}
        # arrival number at which each subscribed prefix was (re)subscribed
        self.covered_since: dict[bytes, int] = {}
        # prefixes dropped whose topics are still to be forgotten: (prefix, from)
        self.forgetting: deque[tuple[bytes, bytes]] = deque()
        self.syncs: dict[int, Sync] = {}
        self.syncing: dict[bytes, int] = {}
        self._sync_ids = itertools.count(1)

    # -- subscriptions ------------------------------------------------------------------
    def need(self, prefix: bytes) -> None:
        self.refs[prefix] = self.refs.get(prefix, 0) + 1
        self._unlinger(prefix)
        if prefix not in self.subscribed:
            self.subscribed.add(prefix)
            self.covered_since[prefix] = next(self._arrival)
            self.commands.append(SubscribePrefix(prefix))

    def release(self, prefix: bytes, owner: int, now: float, *, linger: bool) -> None:
        """One (client, pattern) no longer needs ``prefix``; unneeded, it lingers for
        resumes, or is dropped at once when ``linger`` is false."""
        left = self.refs.get(prefix, 0) - 1
        if left > 0:
            self.refs[prefix] = left
            return
        self.refs.pop(prefix, None)
        if prefix in self.permanent:
            return
        if linger or prefix in self.linger_until:
            self._linger(prefix, owner, now + self.linger_time)
        if not linger or self.linger_time == 0:
            self.drop(prefix)

    def _linger(self, prefix: bytes, owner: int, until: float) -> None:
        """Keep ``prefix`` subscribed until ``until``; at most max_per_client lingering
        prefixes per client and max_lingering in all (the oldest go first, counted)."""
        if prefix in self.linger_until:
            # re-inserted, so that the order of the dict stays the order of expiry
            until = max(until, self.linger_until.pop(prefix))
            self.linger_until[prefix] = until
            return
        mine = self.lingering_of.setdefault(owner, {})
        if len(mine) >= self.max_per_client:
            self.stats.linger_evicted += 1
            self.drop(next(iter(mine)))
        if len(self.linger_until) >= self.max_lingering:
            self.stats.linger_evicted += 1
            self.drop(next(iter(self.linger_until)))
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

    def drop(self, prefix: bytes) -> None:
        self._unlinger(prefix)
        if prefix in self.refs or prefix not in self.subscribed:
            return
        self.subscribed.discard(prefix)
        self.covered_since.pop(prefix, None)
        self.held_prefixes.discard(prefix)
        self.commands.append(UnsubscribePrefix(prefix))
        # The history of topics no other subscription covers stops being complete. A
        # resume checks coverage itself (coverage_start), so forgetting them only frees
        # memory, and is done a bounded number of topics per housekeeping call.
        self.forgetting.append((prefix, prefix))

    def expire(self, now: float) -> None:
        """Drop lingering prefixes whose time is up (a bounded number per call)."""
        for _ in range(EXPIRIES_PER_CALL):
            first = next(iter(self.linger_until.items()), None)
            if first is None or first[1] > now:
                break
            self.drop(first[0])

    def coverage_start(self, topic: bytes) -> int | None:
        """The arrival number since which ``topic`` has been subscribed without a break
        (None: it is not subscribed now). A prefix still subscribed has been since its
        covered_since, so the earliest of the topic's covering prefixes is the answer."""
        covered = self.covered_since
        if len(covered) <= len(topic):
            starts = [start for prefix, start in covered.items() if topic.startswith(prefix)]
        else:
            starts = [covered[topic[:i]] for i in range(len(topic) + 1) if topic[:i] in covered]
        return min(starts) if starts else None

    # -- snapshot syncs and history requests --------------------------------------------
    def is_held(self, prefix: bytes) -> bool:
        return any(prefix.startswith(held) for held in self.held_prefixes)

    def _new_sync(self, prefixes: tuple[bytes, ...], now: float) -> Sync:
        sync = Sync(
            next(self._sync_ids),
            secrets.token_hex(8).encode(),
            prefixes,
            now + self.snapshot_timeout,
        )
        self.syncs[sync.sync_id] = sync
        return sync

    def syncs_for(self, prefixes: set[bytes], now: float) -> set[int]:
        """Sync ids to wait for before the hub holds every topic of ``prefixes``."""
        waiting: set[int] = set()
        new: list[bytes] = []
        for prefix in sorted(prefixes):
            if self.is_held(prefix):
                continue
            sync_id = self.syncing.get(prefix)
            if sync_id is not None:
                waiting.add(sync_id)
            else:
                new.append(prefix)
        if new:
            sync = self._new_sync(tuple(new), now)
            self.stats.syncs += 1
            for prefix in new:
                self.syncing[prefix] = sync.sync_id
            self.commands.append(
                SnapshotSync(sync.sync_id, sync.nonce, tuple(pattern_for_prefix(p) for p in new))
            )
            waiting.add(sync.sync_id)
        return waiting

    def ask_history(
        self, positions: tuple[Position, ...], patterns: tuple[str, ...], now: float
    ) -> int:
        """Send a history request; its sync id."""
        sync = self._new_sync((), now)
        self.stats.history_requests += 1
        self.commands.append(HistoryAsk(sync.sync_id, sync.nonce, positions, patterns))
        return sync.sync_id

    def synced(self, sync_id: int) -> Sync | None:
        """The proxy answered ``sync_id`` (None: after its timeout, already served)."""
        sync = self.syncs.pop(sync_id, None)
        if sync is not None:
            for prefix in sync.prefixes:
                self.syncing.pop(prefix, None)
                if prefix in self.subscribed:
                    self.held_prefixes.add(prefix)
        return sync

    def failed(self, sync_id: int) -> Sync | None:
        sync = self.syncs.pop(sync_id, None)
        if sync is not None:
            for prefix in sync.prefixes:
                self.syncing.pop(prefix, None)
        return sync

    def overdue(self, now: float) -> list[int]:
        return [s.sync_id for s in self.syncs.values() if s.deadline <= now]
