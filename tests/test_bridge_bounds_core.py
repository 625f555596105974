"""Bounded work in the bridge's pure core: indexed history and topics, request caps."""

from __future__ import annotations

import time
from collections import deque

import pytest

from bridge.client import Client
from bridge.hub import FORGET_TOPICS_PER_CALL, Hub
from bridge.limits import TokenBucket
from bridge.protocol import Position, RequestError, Subscribe, Unsubscribe, parse_request
from bridge.rfc6455 import MaskScanner, close_code_allowed
from bridge.upstream import SnapshotSync, UnsubscribePrefix
from bus.topics import Pattern
from tests.conftest import scaled
from tests.test_bridge_core import hub_with_clients, message, resumed


def consistent(hub: Hub) -> None:
    """Each topic's per-source history holds exactly its arrival-order history (or, while
    it has none, every entry is of the topic's one source)."""
    for state in hub.topics.values():
        if state is None:
            continue
        if state.by_source is None:
            assert {entry.source for entry in state.history} <= state.sources
            assert len(state.sources) <= 1
            continue
        per_source = sorted(entry for entries in state.by_source.values() for entry in entries)
        assert per_source == list(state.history)


def test_resume_per_source_from_an_interleaved_history() -> None:
    hub, _clients = hub_with_clients(("t",), history_events=4)
    hub.upstream.held_prefixes.add(b"t")
    interleaved = [message("t", n, source=s) for n in (1, 2, 3) for s in ("a", "b")]
    hub.dispatch(interleaved, 1.0, 1)
    consistent(hub)  # a1 and b1 left the history (4 kept): a2 b2 a3 b3
    state = hub.topics[b"t"]
    assert state is not None
    assert state.by_source is not None
    assert {s: [e[3] for e in q] for s, q in state.by_source.items()} == {
        b"a": [2, 3],
        b"b": [2, 3],
    }
    both = (Position("t", "a", 1, 1), Position("t", "b", 1, 1))
    got = resumed(hub, both)
    assert got[0]["recovered"] is True
    assert [(m["source"], m["seq"]) for m in got[1:-1]] == [("a", 2), ("b", 2), ("a", 3), ("b", 3)]
    only_b = resumed(hub, (Position("t", "b", 1, 2),))
    assert [(m["source"], m["seq"]) for m in only_b[1:-1]] == [("b", 3)]
    # the event after a's position left the history: not recovered, latest values instead
    assert resumed(hub, (Position("t", "a", 1, 0),))[0]["recovered"] is False
    # a position repeated is served once
    twice = resumed(hub, (Position("t", "a", 1, 2), Position("t", "a", 1, 2)))
    assert [(m["source"], m["seq"]) for m in twice[1:-1]] == [("a", 3)]


def test_a_single_source_topic_keeps_one_view_until_a_second_source_appears() -> None:
    hub, _clients = hub_with_clients(("t",), history_events=3)
    hub.upstream.held_prefixes.add(b"t")
    hub.dispatch([message("t", n, source="a") for n in range(1, 6)], 1.0, 1)
    state = hub.topics[b"t"]
    assert state is not None
    assert state.by_source is None
    assert [(m["source"], m["seq"]) for m in resumed(hub, (Position("t", "a", 1, 3),))[1:-1]] == [
        ("a", 4),
        ("a", 5),
    ]
    assert resumed(hub, (Position("t", "b", 1, 3),))[0]["recovered"] is False
    hub.dispatch([message("t", 1, source="b")], 2.0, 1)
    assert state.by_source is not None
    consistent(hub)
    assert [(m["source"], m["seq"]) for m in resumed(hub, (Position("t", "a", 1, 4),))[1:-1]] == [
        ("a", 5)
    ]


def test_history_views_agree_after_time_trimming_and_snapshot_replies() -> None:
    hub, _clients = hub_with_clients(("t",), history_events=5, history_seconds=10.0)
    hub.dispatch([message("t", 1, source="a"), message("t", 1, source="b")], 1.0, 1)
    hub.dispatch([message("t", 2, source="a")], 20.0, 1)
    consistent(hub)
    state = hub.topics[b"t"]
    assert state is not None
    assert state.by_source is not None
    assert list(state.by_source) == [b"a"]
    client = Client(50)
    hub.add_client(client, 0)
    hub.subscribe(client, Subscribe((Pattern("u"),), True, None, None), 21.0)
    (sync,) = [op for op in hub.upstream_ops if isinstance(op, SnapshotSync)]
    hub.snapshot_reply(sync.sync_id, True, [message("u.x", 4, source="c")[0:3]], 22.0)
    consistent(hub)


@pytest.mark.parametrize(
    "patterns", [["*"], ["*.X"], ["t"], ["t.*"], ["t.X"], ["u.Y", "*.X"], ["*.*"], ["v"]]
)
def test_snapshot_topics_found_by_index_are_those_a_scan_finds(patterns: list[str]) -> None:
    hub, _clients = hub_with_clients(("*",))
    topics = ["t", "t.X", "t.Y", "u", "u.X", "u.Y", "w.Z"]
    hub.dispatch([message(topic, 1) for topic in topics], 1.0, 1)
    wanted = [Pattern(p) for p in patterns]
    found = [state.name for _topic, state in hub._matching_states(wanted)]
    assert found == sorted(t for t in topics if any(p.matches(t) for p in wanted))


def test_request_lists_are_capped_before_their_entries_are_parsed() -> None:
    position = '{"topic":"t","source":"s","epoch":1,"seq":1}'
    text = '{"op":"subscribe","topics":["t"],"since":[' + ",".join([position] * 3) + "]}"
    assert len(parse_request(text, max_positions=3).since or ()) == 3  # type: ignore[union-attr]
    with pytest.raises(RequestError) as refused:
        parse_request(text, max_positions=2)
    assert refused.value.code == "too_many_positions"
    # entries past the cap are not even looked at: this one is invalid
    bad = '{"op":"subscribe","topics":["a","b","bad topic"]}'
    with pytest.raises(RequestError) as refused:
        parse_request(bad, max_patterns=2)
    assert refused.value.code == "too_many_subscriptions"


def test_request_work_is_counted_for_the_rate_limit() -> None:
    hub, (client,) = hub_with_clients(("t",))
    hub.upstream.held_prefixes.add(b"t")
    hub.dispatch([message(f"t.k{n}", 1) for n in range(30)], 1.0, 1)
    client.work = 0
    hub.subscribe(client, Subscribe((Pattern("t"),), True, None, None), 2.0)
    assert client.work == 1 + 30 + 30  # one pattern, thirty topics, thirty frames
    bucket = TokenBucket(rate=10.0, burst=5.0, now=0.0)
    assert bucket.charge(0.0, 2.0) == 0.0  # 3 left
    assert bucket.charge(0.0, 5.0) == pytest.approx(0.3)  # -2: 3 tokens to one
    assert not bucket.take(0.29)
    assert bucket.take(0.31)


# -- RFC 6455 pure parts -----------------------------------------------------------------
def test_close_codes_a_peer_may_send() -> None:
    allowed = [c for c in range(0, 6000) if close_code_allowed(c)]
    assert allowed[:12] == [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
    assert allowed[12] == 3000
    assert allowed[-1] == 4999
    assert len(allowed) == 12 + 2000


def masked(payload_size: int) -> bytes:
    if payload_size < 126:
        header = bytes((0x81, 0x80 | payload_size))
    elif payload_size < 65536:
        header = bytes((0x81, 0x80 | 126)) + payload_size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 0x80 | 127)) + payload_size.to_bytes(8, "big")
    return header + b"\x00" * 4 + b"x" * payload_size


def test_mask_scanner_follows_headers_across_reads_byte_by_byte() -> None:
    stream = masked(5) + masked(200) + masked(70_000) + bytes((0x81, 0x03)) + b"abc"
    scanner = MaskScanner()
    results = [scanner.feed(stream[i : i + 1]) for i in range(len(stream))]
    bad_at = len(stream) - 5
    assert results[:bad_at] == [None] * bad_at
    assert results[bad_at + 1] == 0  # the unmasked header is complete: fail at its start
    assert scanner.reason == "client frames must be masked"
    whole = MaskScanner()
    assert whole.feed(stream) == bad_at
    assert whole.feed(b"more") == 0  # stays failed


# -- lingering subscriptions, sources, topics --------------------------------------------
def subscribe_to(hub: Hub, client: Client, *patterns: str, now: float = 0.0) -> None:
    hub.subscribe(client, Subscribe(tuple(Pattern(p) for p in patterns), False, None, None), now)


def unsubscribe_from(hub: Hub, client: Client, *patterns: str, now: float = 0.0) -> None:
    hub.unsubscribe(client, Unsubscribe(tuple(Pattern(p) for p in patterns), None), now)


def test_lingering_subscriptions_are_capped_per_client_and_in_total() -> None:
    hub = Hub(track_sources=False, max_subscriptions=3, max_lingering=4, upstream_linger=300.0)
    first, second = Client(1), Client(2)
    for client in (first, second):
        hub.add_client(client, 0)
    subscribe_to(hub, first, "a", "b", "c")
    unsubscribe_from(hub, first, "a", "b", "c", now=1.0)
    assert list(hub.upstream.linger_until) == [b"a", b"b", b"c"]
    hub.upstream_ops.clear()
    # the same client lets three more linger: its own oldest go first
    subscribe_to(hub, first, "d", "e")
    unsubscribe_from(hub, first, "d", "e", now=2.0)
    assert list(hub.upstream.linger_until) == [b"c", b"d", b"e"]
    assert [op for op in hub.upstream_ops if isinstance(op, UnsubscribePrefix)] == [
        UnsubscribePrefix(b"a"),
        UnsubscribePrefix(b"b"),
    ]
    # another client's: the total cap (4) drops the oldest of anyone's
    subscribe_to(hub, second, "x", "y")
    unsubscribe_from(hub, second, "x", "y", now=3.0)
    assert list(hub.upstream.linger_until) == [b"d", b"e", b"x", b"y"]
    assert hub.stats.linger_evicted == 3  # a, b (per client), c (in total)
    assert hub.upstream.lingering_of == {1: {b"d": None, b"e": None}, 2: {b"x": None, b"y": None}}
    # a prefix needed again stops lingering, and no longer counts for its old owner
    subscribe_to(hub, second, "d")
    assert list(hub.upstream.linger_until) == [b"e", b"x", b"y"]
    assert hub.upstream.lingering_of[1] == {b"e": None}


def test_expiry_and_forgetting_do_a_bounded_amount_of_work_per_call() -> None:
    hub = Hub(track_sources=False, max_subscriptions=200, upstream_linger=10.0)
    client = Client(1)
    hub.add_client(client, 0)
    patterns = [f"k{n}" for n in range(150)]
    subscribe_to(hub, client, *patterns, "big")
    hub.dispatch([message(f"big.t{n}", 1) for n in range(2500)], 0.5, 1)
    unsubscribe_from(hub, client, *patterns, "big", now=1.0)
    hub.upstream_ops.clear()
    hub.housekeeping(20.0)
    assert len(hub.upstream_ops) == 64
    calls = 1
    durations: list[float] = []
    while hub.upstream.linger_until or hub.upstream.forgetting:
        kept = len(hub.topics)
        started = time.perf_counter()
        hub.housekeeping(20.0)
        durations.append(time.perf_counter() - started)
        calls += 1
        assert kept - len(hub.topics) <= FORGET_TOPICS_PER_CALL
        assert calls < 5 + 2500 // FORGET_TOPICS_PER_CALL
    # each call holds the loop about a millisecond on an idle machine (the work bound
    # above is the guarantee); the median, with room for a loaded 2-core machine
    durations.sort()
    assert durations[len(durations) // 2] < scaled(0.02), durations
    assert len(hub.upstream_ops) == 151
    assert hub.topics == {}
    assert hub.topic_names == []
    assert hub.topics_by_type == {}
    assert hub.topics_by_key == {}


def test_a_resume_is_not_recovered_across_a_break_in_the_subscription() -> None:
    hub = Hub(track_sources=False, upstream_linger=10.0, snapshots_available=False)
    client = Client(1)
    hub.add_client(client, 0)
    subscribe_to(hub, client, "t")
    hub.upstream.held_prefixes.add(b"t")
    hub.dispatch([message("t", 1), message("t", 2)], 1.0, 1)
    unsubscribe_from(hub, client, "t", now=2.0)
    hub.housekeeping(20.0)  # unsubscribed upstream; the topic is forgotten later
    assert hub.upstream_ops[-1] == UnsubscribePrefix(b"t")
    assert b"t" in hub.topics or hub.upstream.forgetting == deque()
    hub.upstream.forgetting.clear()  # as if forgetting had not reached it yet
    subscribe_to(hub, client, "t", now=21.0)
    hub.upstream.held_prefixes.add(b"t")
    hub.dispatch([message("t", 5)], 22.0, 1)
    assert resumed(hub, (Position("t", "bot", 1, 1),))[0]["recovered"] is False  # hole 3-4
    assert resumed(hub, (Position("t", "bot", 1, 5),))[0]["recovered"] is True
    assert resumed(hub, (Position("t", "bot", 1, 4),))[0]["recovered"] is True


def test_stale_sources_are_forgotten_and_their_number_is_capped() -> None:
    hub, _clients = hub_with_clients(("*",), max_sources=2, forget_sources_after=100.0)
    hub.dispatch([message("t", 1, source="a"), message("t", 1, source="b")], 1.0, 1)
    hub.dispatch([message("t", 1, source="c")], 1.0, 1)
    assert set(hub.sources.states) == {b"a", b"b"}
    assert hub.stats.dropped == {"too_many_sources": 1}
    assert hub.tracker.position(b"c", b"t") is None
    hub.housekeeping(50.0)  # stale after 15 s
    assert not hub.sources.states[b"a"].live
    hub.housekeeping(200.0)  # forgotten after 100 s stale
    assert hub.sources.states == {}
    assert hub.stats.sources_forgotten == 2
    assert hub.tracker.position(b"a", b"t") is None
    state = hub.topics[b"t"]
    assert state is not None
    assert state.sources == set()
    late = Client(9)
    hub.add_client(late, 0)
    assert [f for f in late.frames if b"source_status" in f] == []
    hub.dispatch([message("t", 2, source="c")], 201.0, 1)
    assert set(hub.sources.states) == {b"c"}


def test_topics_beyond_the_cap_are_delivered_but_not_kept() -> None:
    hub, (client,) = hub_with_clients(("*",), max_topics=3)
    hub.dispatch([message(f"t.k{n}", 1) for n in range(5)], 1.0, 1)
    assert len(hub.topics) == 3
    assert hub.stats.topics_untracked == 2
    assert len([f for f in client.frames if b'"seq"' in f]) == 5
