"""The sequence tracker: in order, gaps, duplicates, restarts, stale epochs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bus.sequence import SeqStatus, SequenceTracker


def test_first_then_in_order() -> None:
    tracker = SequenceTracker()
    assert tracker.observe("s", "t", 1, 5).status is SeqStatus.FIRST
    assert tracker.observe("s", "t", 1, 6).status is SeqStatus.IN_ORDER
    assert tracker.position("s", "t") == (1, 6)


def test_gap_reports_how_many_were_missed() -> None:
    tracker = SequenceTracker()
    tracker.observe("s", "t", 1, 1)
    result = tracker.observe("s", "t", 1, 5)
    assert (result.status, result.missed, result.deliver) == (SeqStatus.GAP, 3, True)
    assert tracker.observe("s", "t", 1, 6).status is SeqStatus.IN_ORDER


def test_duplicates_and_older_events_are_not_delivered() -> None:
    tracker = SequenceTracker()
    tracker.observe("s", "t", 1, 3)
    for seq in (3, 2, 1):
        result = tracker.observe("s", "t", 1, seq)
        assert result.status is SeqStatus.DUPLICATE
        assert not result.deliver
    assert tracker.position("s", "t") == (1, 3)


def test_restart_counts_the_new_runs_missed_first_events() -> None:
    tracker = SequenceTracker()
    tracker.observe("s", "t", 1, 100)
    clean = tracker.observe("s", "t", 2, 1)
    assert (clean.status, clean.missed) == (SeqStatus.RESTART, 0)
    late = SequenceTracker()
    late.observe("s", "t", 1, 100)
    result = late.observe("s", "t", 2, 4)
    assert (result.status, result.missed, result.deliver) == (SeqStatus.RESTART, 3, True)


def test_events_from_an_older_run_are_stale() -> None:
    tracker = SequenceTracker()
    tracker.observe("s", "t", 5, 1)
    result = tracker.observe("s", "t", 4, 99)
    assert result.status is SeqStatus.STALE_EPOCH
    assert not result.deliver


def test_positions_are_per_source_and_topic() -> None:
    tracker = SequenceTracker()
    tracker.observe("a", "t", 1, 1)
    assert tracker.observe("b", "t", 1, 7).status is SeqStatus.FIRST
    assert tracker.observe("a", "u", 1, 9).status is SeqStatus.FIRST
    assert tracker.observe("a", "t", 1, 2).status is SeqStatus.IN_ORDER
    assert len(tracker) == 3


def test_set_position_and_forget() -> None:
    tracker = SequenceTracker()
    tracker.set_position("s", "t", 1, 10)
    assert tracker.observe("s", "t", 1, 10).status is SeqStatus.DUPLICATE
    assert tracker.observe("s", "t", 1, 11).status is SeqStatus.IN_ORDER
    tracker.forget("s", "t")
    assert tracker.position("s", "t") is None
    assert tracker.observe("s", "t", 1, 50).status is SeqStatus.FIRST


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=60))
def test_delivered_seqs_increase_and_missed_counts_add_up(arrivals: list[int]) -> None:
    """Whatever the arrival order, delivered seqs strictly increase, and first + delivered
    + missed accounts for every seq up to the highest one delivered."""
    tracker = SequenceTracker()
    delivered: list[int] = []
    missed = 0
    for seq in arrivals:
        result = tracker.observe("s", "t", 1, seq)
        if result.deliver:
            delivered.append(seq)
            missed += result.missed
    assert delivered == sorted(set(delivered))
    assert delivered[0] == arrivals[0]
    assert len(delivered) + missed == delivered[-1] - delivered[0] + 1
