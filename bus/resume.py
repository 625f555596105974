"""When a history proves a resume complete: the contiguity rule. Pure.

A resume may claim ``recovered: true`` only when every event after the client's position
is held, in order and without a hole: a gap seen on the bus is part of the history, and a
resume across it must not pretend otherwise. Shared by the bridge's own history and the
proxy's (bus/history.py), so that both state "complete" by the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable

# (epoch, seq) of one event of a (source, topic)
Mark = tuple[int, int]


def follows(previous: Mark, epoch: int, seq: int) -> bool:
    """Whether (epoch, seq) is the very next event after ``previous``, nothing lost between.

    Within an epoch that is seq + 1; a newer epoch (the publisher restarted) starts at 1.
    A restarted publisher's unsent tail of its old run cannot be seen by anyone, so, as for
    the sequence trackers (bus/sequence.py), only events of the new run count as missed.
    """
    previous_epoch, previous_seq = previous
    if epoch == previous_epoch:
        return seq == previous_seq + 1
    return epoch > previous_epoch and seq == 1


def contiguous_from(start: Mark, marks: Iterable[Mark]) -> bool:
    """Whether ``marks`` (the held events after ``start``, in order) follow ``start`` without
    a hole. An empty history after ``start`` is contiguous: nothing newer is known."""
    previous = start
    for epoch, seq in marks:
        if not follows(previous, epoch, seq):
            return False
        previous = (epoch, seq)
    return True
