"""Sequence tracking per (source, topic): gaps, duplicates and source restarts. Pure.

Each publisher numbers its events per topic from 1 and stamps every event with its epoch
(its start time in nanoseconds), so a restarted publisher has a larger epoch. The tracker
remembers the last position seen for each (source, topic) and classifies the next one.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class SeqStatus(enum.Enum):
    FIRST = "first"  # first event seen for this (source, topic)
    IN_ORDER = "in_order"
    GAP = "gap"  # ``missed`` events were skipped before this one
    DUPLICATE = "duplicate"  # already seen (or older): drop it
    RESTART = "restart"  # the source restarted (new epoch); ``missed`` counts its lost first events
    STALE_EPOCH = "stale_epoch"  # from an older run of the source: drop it


class SeqResult(NamedTuple):
    status: SeqStatus
    missed: int = 0

    @property
    def deliver(self) -> bool:
        """Whether the event is new and should be passed on."""
        return self.status not in (SeqStatus.DUPLICATE, SeqStatus.STALE_EPOCH)


_IN_ORDER = SeqResult(SeqStatus.IN_ORDER)
_DUPLICATE = SeqResult(SeqStatus.DUPLICATE)
_STALE = SeqResult(SeqStatus.STALE_EPOCH)
_FIRST = SeqResult(SeqStatus.FIRST)


class SequenceTracker:
    """Last (epoch, seq) per (source, topic); ``observe`` classifies each new position."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[tuple[str | bytes, str | bytes], tuple[int, int]] = {}

    def observe(self, source: str | bytes, topic: str | bytes, epoch: int, seq: int) -> SeqResult:
        key = (source, topic)
        last = self._last.get(key)
        if last is None:
            self._last[key] = (epoch, seq)
            return _FIRST
        last_epoch, last_seq = last
        if epoch == last_epoch:
            if seq == last_seq + 1:
                self._last[key] = (epoch, seq)
                return _IN_ORDER
            if seq <= last_seq:
                return _DUPLICATE
            self._last[key] = (epoch, seq)
            return SeqResult(SeqStatus.GAP, seq - last_seq - 1)
        if epoch < last_epoch:
            return _STALE
        self._last[key] = (epoch, seq)
        return SeqResult(SeqStatus.RESTART, max(seq - 1, 0))

    def position(self, source: str | bytes, topic: str | bytes) -> tuple[int, int] | None:
        """The last (epoch, seq) seen for (source, topic), if any."""
        return self._last.get((source, topic))

    def set_position(self, source: str | bytes, topic: str | bytes, epoch: int, seq: int) -> None:
        """Start tracking from a known position (e.g. the one a snapshot delivered)."""
        self._last[(source, topic)] = (epoch, seq)

    def forget(self, source: str | bytes, topic: str | bytes) -> None:
        self._last.pop((source, topic), None)

    def __len__(self) -> int:
        return len(self._last)
