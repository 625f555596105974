"""Resume never claims what it did not deliver (issue 13): real proxy, real bridge, clients
from the `websockets` library."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import zmq

from bot_client import Publisher
from bridge.app import BridgeServer
from bus.proxy import Proxy
from bus.resume import contiguous_from, follows
from tests.support import loopback_proxy_config
from tests.test_bridge_support import (
    BusPublisher,
    bridge_config,
    collect_events,
    connect,
    events_only,
    recv_until,
    running_bridge,
    subscribe,
    wait_for,
)
from tests.test_bus_outage import proxy_at

pytestmark = pytest.mark.timeout(30)


def test_contiguity_rule() -> None:
    assert follows((5, 3), 5, 4)
    assert not follows((5, 3), 5, 5)
    assert follows((5, 3), 6, 1)  # a restarted publisher's first event
    assert not follows((5, 3), 6, 2)
    assert not follows((5, 3), 4, 1)  # an older run is never "next"
    assert contiguous_from((1, 1), [(1, 2), (1, 3)])
    assert contiguous_from((1, 1), [])
    assert not contiguous_from((1, 1), [(1, 2), (1, 3), (1, 10), (1, 11)])


async def test_resume_across_a_hole_on_the_bus_is_not_a_recovery(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    """The bus carried seq 1, 2, 3, 10, 11: a client that saw 1 cannot get 4..9 back."""
    client = await connect(server)
    await subscribe(client, ["ai_decision"])
    await publisher.publish("ai_decision", {"n": 1}, seq=1)
    (seen,) = await collect_events(client, 1)
    await client.close()
    for seq in (2, 3, 10, 11):
        await publisher.publish("ai_decision", {"n": seq}, seq=seq)
    hub = server.bridge.hub
    await wait_for(lambda: hub.stats.events_by_type.get("ai_decision") == 5, "events at the bridge")
    assert hub.stats.missed == 6  # the bridge counted the hole

    position = {k: seen[k] for k in ("topic", "source", "epoch", "seq")}
    for seq_seen, recovered, replayed in (
        (1, False, [11]),  # across the hole: a fresh snapshot, said so
        (3, False, [11]),  # right before the hole
        (10, True, [11]),  # after it: complete
    ):
        again = await connect(server)
        begin, replay = await subscribe(
            again, ["ai_decision"], since=[position | {"seq": seq_seen}]
        )
        assert (begin["recovered"], begin["end"]["recovered"]) == (recovered, recovered), seq_seen
        assert [m["seq"] for m in replay] == replayed, seq_seen
        await again.close()
    assert hub.stats.resumes_unrecovered == 2


async def test_empty_topics_in_the_handshake_means_no_event_before_the_subscribe(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    """What a reconnecting client needs: its resume is in force before any event arrives."""
    watcher = await connect(server)
    await subscribe(watcher, ["ai_decision"])  # proves each event passed the bridge
    quiet = await connect(server, "topics=")
    await publisher.publish("ai_decision", {"n": 1})
    await collect_events(watcher, 1)
    await quiet.send(orjson.dumps({"op": "subscribe", "topics": ["ai_decision"]}).decode())
    reply, before = await recv_until(quiet, lambda m: m["type"] == "subscribed")
    assert events_only(before) == []  # the implicit "everything" would have sent n=1
    assert reply["topics"] == ["ai_decision"]
    await publisher.publish("ai_decision", {"n": 2})
    await collect_events(watcher, 1)
    _end, snapshot = await recv_until(quiet, lambda m: m["type"] == "snapshot_end")
    (live,) = await collect_events(quiet, 1)
    assert [m["data"] for m in events_only(snapshot)] == [{"n": 1}]
    assert live["data"] == {"n": 2}
    await watcher.close()
    await quiet.close()


def _position(event: dict[str, object], seq: int | None = None) -> dict[str, object]:
    position = {k: event[k] for k in ("topic", "source", "epoch", "seq")}
    return position if seq is None else position | {"seq": seq}


async def test_a_restarted_bridge_resumes_from_the_bus_history(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    """Positions from a bridge that is gone, events published while no bridge ran."""
    await publisher.connected()
    async with running_bridge(bridge_config(proxy)) as first:
        client = await connect(first)
        await subscribe(client, ["ai_decision"])
        await publisher.publish("ai_decision", {"n": 1})
        (seen,) = await collect_events(client, 1)
        await client.close()
    for n in range(2, 6):
        await publisher.publish("ai_decision", {"n": n})
    assert proxy.history is not None
    await wait_for(lambda: proxy.cache.stats.events >= 5, "the proxy's history")
    async with running_bridge(bridge_config(proxy)) as second:
        again = await connect(second, "topics=")
        begin, replay = await subscribe(again, ["ai_decision"], since=[_position(seen)])
        assert (begin["recovered"], begin["end"]["recovered"]) == (True, True)
        assert [m["data"]["n"] for m in replay] == [2, 3, 4, 5]
        await publisher.publish("ai_decision", {"n": 6})
        (live,) = await collect_events(again, 1)
        assert live["data"] == {"n": 6}  # no gap and no duplicate at the seam
        assert second.bridge.hub.stats.resumes_from_bus == 1
        await again.close()


async def test_positions_from_another_bridge_resume_on_this_one(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    async with (
        running_bridge(bridge_config(proxy)) as first,
        running_bridge(bridge_config(proxy)) as second,
    ):
        client = await connect(first)
        await subscribe(client, ["ai_decision", "trading_decision"])
        for n in range(1, 4):
            await publisher.publish("ai_decision", {"n": n})
        await publisher.publish("trading_decision", {"n": 1})
        seen = await collect_events(client, 4)
        await client.close()
        for n in range(4, 6):
            await publisher.publish("ai_decision", {"n": n})
        await wait_for(lambda: proxy.cache.stats.events >= 6, "the proxy's history")
        # the second bridge never had these topics: only the bus's history can answer
        since = [_position(seen[2]), _position(seen[3])]
        again = await connect(second, "topics=")
        begin, replay = await subscribe(again, ["ai_decision", "trading_decision"], since=since)
        assert begin["recovered"] is True
        assert [(m["topic"], m["data"]["n"]) for m in replay] == [
            ("ai_decision", 4),
            ("ai_decision", 5),
        ]
        await again.close()


async def test_a_hole_is_not_recovered_from_the_bus_history_either(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    for seq in (1, 2, 3, 10, 11):
        await publisher.publish("ai_decision", {"n": seq}, seq=seq)
    await wait_for(lambda: proxy.cache.stats.events >= 5, "the proxy's history")
    async with running_bridge(bridge_config(proxy)) as server:
        client = await connect(server, "topics=")
        position = {"topic": "ai_decision", "source": "bot-1", "epoch": publisher.epoch}
        begin, replay = await subscribe(client, ["ai_decision"], since=[position | {"seq": 1}])
        assert begin["recovered"] is False
        assert [m["seq"] for m in replay] == [11]  # a fresh snapshot instead
        await client.close()


async def test_without_the_proxys_history_a_restarted_bridge_says_not_recovered(
    publisher: BusPublisher,
) -> None:
    """An old proxy, or history off: as before."""
    publisher.close()
    off = Proxy(
        loopback_proxy_config(
            history_events=0,
        )
    )
    off.start()
    bus = BusPublisher(zmq.Context.instance(), off.frontend_endpoint, "bot-1")
    try:
        await bus.connected()
        for n in range(1, 4):
            await bus.publish("ai_decision", {"n": n})
        await wait_for(lambda: off.cache.stats.events >= 3, "the proxy's cache")
        async with running_bridge(bridge_config(off)) as server:
            client = await connect(server, "topics=")
            position = {"topic": "ai_decision", "source": "bot-1", "epoch": bus.epoch, "seq": 1}
            begin, replay = await subscribe(client, ["ai_decision"], since=[position])
            assert begin["recovered"] is False
            assert [m["data"]["n"] for m in replay] == [3]
            await client.close()
    finally:
        bus.close()
        off.stop()


async def test_whole_stack_restart_with_the_bot_holding_its_events(tmp_path: Path) -> None:
    """Proxy and bridge both restart; the bot held what it published meanwhile and delivers
    it once the new proxy is up: the client resumes with every event, recovered:true."""
    proxy = proxy_at(tmp_path)
    bot = Publisher(
        url=f"ipc://{tmp_path}/in.sock",
        source_id="bot-1",
        publish_interval=0,
        retry_delay=0.05,
        heartbeat_interval=0,
    )
    try:
        await wait_for(lambda: bot.connected, "the bot on the bus")
        async with running_bridge(bridge_config(proxy)) as bridge:
            client = await connect(bridge)
            await subscribe(client, ["trading_decision"])
            for n in range(1, 4):
                bot.publish("trading_decision", {"n": n})
            seen = await collect_events(client, 3)
            await client.close()
        proxy.stop()
        await wait_for(lambda: not bot.connected, "the bot to see the outage")
        for n in range(4, 9):
            bot.publish("trading_decision", {"n": n})  # held by the bot
        proxy = proxy_at(tmp_path)
        await wait_for(lambda: proxy.cache.stats.events >= 5, "the bot's held events")
        async with running_bridge(bridge_config(proxy)) as bridge:
            again = await connect(bridge, "topics=")
            begin, replay = await subscribe(
                again, ["trading_decision"], since=[_position(seen[-1])]
            )
            assert begin["recovered"] is True
            assert [m["data"]["n"] for m in replay] == [4, 5, 6, 7, 8]
            await again.close()
    finally:
        bot.close(timeout=1)
        proxy.stop()
