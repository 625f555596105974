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
