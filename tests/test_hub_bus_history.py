"""The hub's use of the proxy's history, pure (injected clock and replies): a resume its
own history cannot prove complete waits for the proxy's answer, holding live events, and
is served from it without a gap or a duplicate at the seam (issue 13)."""

from __future__ import annotations

from bridge.client import Client
from bridge.hub import Hub
from bridge.protocol import Position, Subscribe
from bridge.upstream import HistoryAsk
from bus.topics import Pattern
from tests.test_bridge_core import message, texts


def settle_snapshot(hub: Hub) -> None:
    """Answer the prefix's snapshot sync (empty: the proxy holds nothing else)."""
    for sync_id in [s for s, sync in hub.upstream.syncs.items() if sync.prefixes]:
        hub.snapshot_reply(sync_id, True, [], 10.0)


def resuming(hub: Hub, seq: int) -> tuple[Client, HistoryAsk]:
    client = Client(7)
    hub.add_client(client, 0, receive_all=False)
    since = (Position("t", "bot", 1, seq),)
    hub.subscribe(client, Subscribe((Pattern("t"),), True, since, None), 10.0)
    settle_snapshot(hub)
    (ask,) = [op for op in hub.upstream_ops if isinstance(op, HistoryAsk)]
    hub.upstream_ops.clear()
    return client, ask


def test_a_resume_is_served_from_the_proxys_history_without_a_seam() -> None:
    hub = Hub(track_sources=False, bus_history=True)
    client, ask = resuming(hub, 1)
    sync_id = ask.sync_id
    assert (ask.positions, ask.patterns) == ((Position("t", "bot", 1, 1),), ("t",))
    # live events while the proxy answers: held, the one the answer also has dropped
    hub.dispatch([message("t", 4), message("t", 5)], 11.0, 1)
    hub.history_reply(sync_id, True, [message("t", n) for n in (2, 3, 4)], 11.0)
    got = texts(client)
    assert got[0]["type"] == "subscribed"
    assert got[1] == {"type": "snapshot_begin", "mode": "resume", "recovered": True}
    end = next(i for i, m in enumerate(got) if m["type"] == "snapshot_end")
    assert [m["seq"] for m in got[2:end]] == [2, 3, 4]
    # then the held live events, without the 4 the answer already had
    assert [m["seq"] for m in got[end + 1 :]] == [5]
    hub.dispatch([message("t", 6)], 12.0, 1)
    assert [m["seq"] for m in texts(client) if "seq" in m] == [6]
    assert hub.stats.resumes_from_bus == 1


def test_an_incomplete_answer_or_none_is_not_a_recovery() -> None:
    hub = Hub(track_sources=False, bus_history=True)
    client, ask = resuming(hub, 1)
    hub.history_reply(ask.sync_id, False, [], 11.0)
    begin = next(m for m in texts(client) if m["type"] == "snapshot_begin")
    assert begin["recovered"] is False

    client, ask = resuming(hub, 1)
    hub.housekeeping(10.0 + hub.snapshot_timeout + 1)  # the proxy never answered
    begin = next(m for m in texts(client) if m["type"] == "snapshot_begin")
    assert begin["recovered"] is False
    assert hub.stats.resumes_from_bus == 0


def test_the_proxy_is_not_asked_when_the_bridges_own_history_suffices() -> None:
    hub = Hub(track_sources=False, bus_history=True)
    watcher = Client(1)
    hub.add_client(watcher, 0)
    hub.subscribe(watcher, Subscribe((Pattern("t"),), False, None, None), 0.0)
    hub.upstream.held_prefixes.add(b"t")
    hub.dispatch([message("t", n) for n in (1, 2, 3)], 1.0, 1)
    hub.upstream_ops.clear()
    client = Client(2)
    hub.add_client(client, 0, receive_all=False)
    since = (Position("t", "bot", 1, 1),)
    hub.subscribe(client, Subscribe((Pattern("t"),), True, since, None), 2.0)
    assert [op for op in hub.upstream_ops if isinstance(op, HistoryAsk)] == []
    got = texts(client)
    assert got[1]["recovered"] is True
    assert [m["seq"] for m in got if "seq" in m] == [2, 3]


def resume_from(hub: Hub, client_id: int, seq: int, now: float) -> Client:
    client = Client(client_id)
    hub.add_client(client, 0, receive_all=False)
    since = (Position("t", "bot", 1, seq),)
    hub.subscribe(client, Subscribe((Pattern("t"),), True, since, None), now)
    settle_snapshot(hub)
    return client


def resumed_events(client: Client) -> tuple[bool, list[int]]:
    """(recovered, every event's seq in the order the client got them)."""
    got = texts(client)
    begin = next(m for m in got if m["type"] == "snapshot_begin")
    return begin["recovered"], [m["seq"] for m in got if "seq" in m]


def test_resumes_asking_the_same_share_one_request_and_later_ones_are_served_here() -> None:
    """A thousand browsers back from a killed bridge ask the same question: one request to
    the proxy, whose answer, merged into the history, serves them all and every later
    resume (bench/bench_resume.py: 838 of 1,000 were unrecovered with one request each)."""
    hub = Hub(track_sources=False, bus_history=True)
    first = resume_from(hub, 1, 1, 10.0)
    hub.dispatch([message("t", 4), message("t", 5)], 11.0, 1)
    # a second browser while the request is in flight: it holds live events only from
    # now, so 4 and 5 are known to it only through the bridge's history
    second = resume_from(hub, 2, 1, 11.5)
    hub.dispatch([message("t", 6)], 11.6, 1)
    (ask,) = [op for op in hub.upstream_ops if isinstance(op, HistoryAsk)]
    hub.upstream_ops.clear()
    hub.history_reply(ask.sync_id, True, [message("t", n) for n in (2, 3, 4)], 12.0)
    for client in (first, second):
        assert resumed_events(client) == (True, [2, 3, 4, 5, 6])
    # later resumes: no request at all, every missed event exactly once
    third = resume_from(hub, 3, 1, 13.0)
    assert [op for op in hub.upstream_ops if isinstance(op, HistoryAsk)] == []
    assert resumed_events(third) == (True, [2, 3, 4, 5, 6])
    fourth = resume_from(hub, 4, 4, 13.0)
    assert resumed_events(fourth) == (True, [5, 6])
    assert hub.stats.resumes_from_bus == 2
    assert hub.stats.resumes_unrecovered == 0


def test_an_answer_that_does_not_join_the_live_events_is_not_merged() -> None:
    """The answer stops at 3 while the bridge's own events start at 5: 4 is known to no
    one, so the resume that shared the request is not told recovered, and a later one
    asks the proxy again."""
    hub = Hub(track_sources=False, bus_history=True)
    first = resume_from(hub, 1, 1, 10.0)
    hub.dispatch([message("t", 5)], 11.0, 1)
    second = resume_from(hub, 2, 1, 11.5)
    (ask,) = [op for op in hub.upstream_ops if isinstance(op, HistoryAsk)]
    hub.upstream_ops.clear()
    hub.history_reply(ask.sync_id, True, [message("t", n) for n in (2, 3)], 12.0)
    # the asker is served from the answer, as before: 2, 3, then the live 5 (the gap
    # message for 4 was held before it)
    assert resumed_events(first) == (True, [2, 3, 5])
    assert resumed_events(second)[0] is False
    resume_from(hub, 3, 1, 13.0)
    assert len([op for op in hub.upstream_ops if isinstance(op, HistoryAsk)]) == 1


def following_t() -> tuple[Hub, Client]:
    hub = Hub(track_sources=False, bus_history=True)
    client = Client(1)
    hub.add_client(client, 0)
    hub.subscribe(client, Subscribe((Pattern("t"),), False, None, None), 0.0)
    hub.dispatch([message("t", 1), message("t", 2)], 1.0, 1)
    assert [m["seq"] for m in texts(client)[1:]] == [1, 2]
    hub.upstream_ops.clear()
    return hub, client


def test_a_gap_after_the_bus_link_came_back_is_filled_from_the_proxys_history() -> None:
    """Events the proxy forwarded before the bridge's subscription was in force again are
    fetched from its history and delivered in their place: no gap for what the bus holds."""
    hub, client = following_t()
    hub.link_restored(5.0)
    hub.dispatch([message("t", 5)], 6.0, 1)
    assert texts(client) == []  # held until the proxy answers
    (ask,) = [op for op in hub.upstream_ops if isinstance(op, HistoryAsk)]
    assert (ask.positions, ask.patterns) == ((Position("t", "bot", 1, 2),), ())
    hub.dispatch([message("t", 6)], 6.1, 1)
    # "incomplete" (another position of the request may lack events) still proves this one
    hub.history_reply(ask.sync_id, False, [message("t", n) for n in (3, 4, 5)], 6.2)
    got = texts(client)
    assert [m["type"] for m in got] == ["t"] * 4
    assert [m["seq"] for m in got] == [3, 4, 5, 6]
    assert (hub.stats.gaps, hub.stats.gaps_refilled) == (1, 1)


def test_a_gap_the_proxy_cannot_fill_is_reported_where_it_was() -> None:
    hub, client = following_t()
    hub.link_restored(5.0)
    hub.dispatch([message("t", 5)], 6.0, 1)
    (ask,) = [op for op in hub.upstream_ops if isinstance(op, HistoryAsk)]
    hub.dispatch([message("t", 6)], 6.1, 1)
    hub.history_reply(ask.sync_id, False, [message("t", 4)], 6.2)  # 3 is not held
    got = texts(client)
    assert [(m["type"], m.get("seq")) for m in got] == [("gap", None), ("t", 5), ("t", 6)]
    assert got[0]["missed"] == 2
    # no answer in time: the same, once the request times out
    hub.link_restored(7.0)
    hub.dispatch([message("t", 9)], 7.0, 1)
    assert texts(client) == []
    hub.housekeeping(7.0 + hub.snapshot_timeout + 1)
    assert [(m["type"], m.get("seq")) for m in texts(client)] == [("gap", None), ("t", 9)]
    # outside the window after a reconnect, a gap is reported at once, as always
    hub.upstream_ops.clear()
    hub.dispatch([message("t", 12)], 100.0, 1)
    assert [(m["type"], m.get("seq")) for m in texts(client)] == [("gap", None), ("t", 12)]
    assert [op for op in hub.upstream_ops if isinstance(op, HistoryAsk)] == []
