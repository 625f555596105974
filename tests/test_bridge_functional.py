"""The bridge end to end: real proxy, real bridge, clients from the `websockets` library."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
import websockets
import zmq
from aiohttp import web
from websockets.asyncio.client import ClientConnection

from bot_client import PublisherSettings, WebSocketPublisher
from bridge.app import BRIDGE_KEY, BridgeServer, create_app, start_bridge
from bridge.config import BridgeConfig
from bus.proxy import Proxy, ProxyConfig
from tests.conftest import scaled
from tests.test_bridge_support import (
    BusPublisher,
    bridge_config,
    collect_events,
    connect,
    events_only,
    recv,
    recv_until,
    request,
    running_bridge,
    subscribe,
    sync_everything,
    wait_for,
)


@pytest.fixture
def publisher(zmq_context: zmq.Context[zmq.Socket[bytes]], proxy: Proxy) -> Iterator[BusPublisher]:
    bus = BusPublisher(zmq_context, proxy.frontend_endpoint, "bot-1")
    yield bus
    bus.close()


@pytest.fixture
async def server(proxy: Proxy, publisher: BusPublisher) -> AsyncIterator[BridgeServer]:
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, allow_publish=True)) as running:
        yield running


async def test_event_reaches_three_clients_each_by_its_patterns(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    btc_market = await connect(server)
    # custom_event, wanted by all, marks the end of the stream for every client
    await subscribe(btc_market, ["market_data.BTC-USD", "custom_event"])
    every_btc = await connect(server)
    await subscribe(every_btc, ["*.BTC-USD", "custom_event"])
    decisions = await connect(server)
    await subscribe(decisions, ["ai_decision", "trading_decision", "custom_event"])

    await publisher.publish("market_data.BTC-USD", {"symbol": "BTC-USD", "price": 1.0})
    await publisher.publish("market_data.ETH-USD", {"symbol": "ETH-USD", "price": 2.0})
    await publisher.publish("position_update.BTC-USD", {"symbol": "BTC-USD", "size": 1})
    await publisher.publish("ai_decision", {"action": "BUY"})
    await publisher.publish("trading_decision", {"action": "HOLD"})
    await publisher.publish("system_status", {"status": "healthy"})
    await publisher.publish("custom_event", {"end": True})

    async def topics_until_end(client: ClientConnection) -> list[str]:
        _end, before = await recv_until(client, lambda m: m.get("topic") == "custom_event")
        return [m["topic"] for m in events_only(before)]

    assert await topics_until_end(btc_market) == ["market_data.BTC-USD"]
    assert await topics_until_end(every_btc) == [
        "market_data.BTC-USD",
        "position_update.BTC-USD",
    ]
    assert await topics_until_end(decisions) == ["ai_decision", "trading_decision"]
    for client in (btc_market, every_btc, decisions):
        await client.close()


async def test_payload_bytes_reach_the_client_unchanged(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    client = await connect(server)
    await subscribe(client, ["ai_decision"])
    # key order (z before a) and a non-ASCII character: what a re-encoding may change
    await publisher.publish("ai_decision", {"action": "SELL", "confidence": 0.5})
    _found, _ = await recv_until(client, lambda m: m.get("topic") == "ai_decision")
    frames = await publisher.publish("ai_decision", {"z": 1, "a": [1.50, "\u00e9"]})
    raw = await asyncio.wait_for(client.recv(), scaled(5))
    assert isinstance(raw, str), "events are text frames"
    assert raw.encode() == frames[2], "the bridge changed the publisher's payload bytes"
    await client.close()


async def test_original_dashboard_behaviour(server: BridgeServer, publisher: BusPublisher) -> None:
    legacy = await connect(server)  # never subscribes: receives everything
    await sync_everything(server)
    await publisher.publish("market_data.BTC-USD", {"symbol": "BTC-USD", "price": 1.0})
    await publisher.publish("ai_decision", {"action": "BUY"})
    received = await collect_events(legacy, 2)
    assert [m["type"] for m in received] == ["market_data", "ai_decision"]
    assert set(received[0]) >= {"type", "data", "timestamp", "topic", "source", "seq"}

    await legacy.send('{"type": "ping"}')
    pong, _ = await recv_until(legacy, lambda m: m["type"] == "pong")
    assert pong == {"type": "pong", "id": None}

    await legacy.send('{"type": "subscribe", "channels": ["ai_decision"]}')
    confirmed, _ = await recv_until(legacy, lambda m: m["type"] == "subscription_confirmed")
    assert confirmed["channels"] == ["ai_decision"]
    await publisher.publish("market_data.BTC-USD", {"symbol": "BTC-USD", "price": 2.0})
    await publisher.publish("ai_decision", {"action": "SELL"})
    await publisher.publish("market_data.BTC-USD", {"symbol": "BTC-USD", "price": 3.0})
    await publisher.publish("ai_decision", {"action": "END"})
    # the market data in between never arrives: the channels really filter
    assert [m["data"] for m in await collect_events(legacy, 2)] == [
        {"action": "SELL"},
        {"action": "END"},
    ]
    await legacy.send('{"type": "pong"}')  # the old client answered server pings so
    await legacy.send('{"op": "ping", "id": 5}')
    pong, skipped = await recv_until(legacy, lambda m: m["type"] == "pong")
    assert pong["id"] == 5
    assert not [m for m in skipped if m["type"] == "error"]
    await legacy.close()


async def test_topics_query_subscribes_at_connect(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    client = await connect(server, "topics=ai_decision,market_data.ETH-USD")
    reply, _ = await recv_until(client, lambda m: m["type"] == "subscribed")
    assert reply["topics"] == ["ai_decision", "market_data.ETH-USD"]
    await recv_until(client, lambda m: m["type"] == "snapshot_end")
    await publisher.publish("market_data.BTC-USD", {"symbol": "BTC-USD"})
    await publisher.publish("market_data.ETH-USD", {"symbol": "ETH-USD"})
    (event,) = await collect_events(client, 1)
    assert event["topic"] == "market_data.ETH-USD"
    await client.close()


@pytest.mark.parametrize(
    ("pattern", "expected", "round_trips"),
    [
        # the bridge already follows market_data in step with the proxy: served locally
        ("market_data", ["market_data.BTC-USD", "market_data.ETH-USD"], 0),
        # a new bus subscription (everything): the marker/snapshot round trip to the proxy
        ("*.BTC-USD", ["market_data.BTC-USD"], 1),
    ],
)
async def test_snapshot_then_live_without_gap_or_duplicate(
    server: BridgeServer,
    publisher: BusPublisher,
    pattern: str,
    expected: list[str],
    round_trips: int,
) -> None:
    for price in range(5):
        await publisher.publish("market_data.BTC-USD", {"price": price})
        await publisher.publish("market_data.ETH-USD", {"price": price})
    await publisher.publish("ai_decision", {"action": "BUY"})
    # wait until the proxy's cache holds them: a snapshot of its own shows them
    watcher = await connect(server)
    for _ in range(50):
        _begin, cached = await subscribe(watcher, ["market_data"])
        if len(cached) == 2 and cached[1]["data"] == {"price": 4}:
            break
        await asyncio.sleep(0.02)
    await watcher.close()

    client = await connect(server)
    # publish continuously while the client subscribes: the seam must be exact
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        while not stop.is_set():
            await publisher.publish("market_data.BTC-USD", {"price": 100})
            await asyncio.sleep(0.001)

    task = asyncio.create_task(keep_publishing())
    try:
        stats = server.bridge.hub.stats
        syncs_before, timeouts_before = stats.syncs, stats.sync_timeouts
        begin, snapshot = await subscribe(client, [pattern])
        assert begin["mode"] == "snapshot"
        assert begin["recovered"] is True
        assert [m["topic"] for m in snapshot] == expected
        assert (stats.syncs - syncs_before, stats.sync_timeouts) == (round_trips, timeouts_before)
        live = await collect_events(client, 20)
    finally:
        stop.set()
        await task
    seqs = [snapshot[0]["seq"]] + [m["seq"] for m in live if m["topic"] == "market_data.BTC-USD"]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    await client.close()


async def test_snapshot_false_sends_no_snapshot(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    await publisher.publish("ai_decision", {"action": "BUY"})
    client = await connect(server)
    reply = await request(
        client,
        {"op": "subscribe", "topics": ["ai_decision"], "snapshot": False, "id": "a"},
        "subscribed",
    )
    assert reply == {"type": "subscribed", "id": "a", "topics": ["ai_decision"]}
    await request(client, {"op": "ping", "id": 1}, "pong")
    await client.close()


async def test_resume_inside_window_recovers_every_missed_event(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    client = await connect(server)
    await subscribe(client, ["market_data"])
    await publisher.publish("market_data.BTC-USD", {"n": 1})
    await publisher.publish("market_data.ETH-USD", {"n": 1})
    seen = await collect_events(client, 2)
    await client.close()

    for n in range(2, 6):
        await publisher.publish("market_data.BTC-USD", {"n": n})
    await publisher.publish("market_data.ETH-USD", {"n": 2})
    await publisher.publish("market_data.SOL-USD", {"n": 1})  # new while away
    await wait_for(lambda: _count(server) >= 8, "events at the bridge")

    since = [{k: m[k] for k in ("topic", "source", "epoch", "seq")} for m in seen]
    again = await connect(server)
    begin, replay = await subscribe(again, ["market_data"], since=since)
    assert begin["mode"] == "resume"
    assert begin["recovered"] is True
    btc = [m["data"]["n"] for m in replay if m["topic"] == "market_data.BTC-USD"]
    eth = [m["data"]["n"] for m in replay if m["topic"] == "market_data.ETH-USD"]
    sol = [m["data"]["n"] for m in replay if m["topic"] == "market_data.SOL-USD"]
    assert (btc, eth, sol) == ([2, 3, 4, 5], [2], [1])
    await publisher.publish("market_data.BTC-USD", {"n": 6})
    (live,) = await collect_events(again, 1)
    assert live["data"] == {"n": 6}
    await again.close()


def _count(server: BridgeServer) -> int:
    return sum(server.bridge.hub.stats.events_by_type.values())


async def test_resume_outside_the_bridges_window_comes_from_the_bus_history(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, history_events=3)) as server:
        client = await connect(server)
        await subscribe(client, ["ai_decision"])
        await publisher.publish("ai_decision", {"n": 1})
        (seen,) = await collect_events(client, 1)
        await client.close()
        for n in range(2, 8):  # 6 missed, only 3 kept
            await publisher.publish("ai_decision", {"n": n})
        await wait_for(lambda: _count(server) >= 7, "events at the bridge")
        since = [{k: seen[k] for k in ("topic", "source", "epoch", "seq")}]
        again = await connect(server)
        begin, replay = await subscribe(again, ["ai_decision"], since=since)
        # beyond the bridge's own window the proxy's history has them (tests/test_resume.py
        # has the resume no history covers)
        assert begin == begin | {"mode": "resume", "recovered": True}
        assert [m["data"]["n"] for m in replay] == [2, 3, 4, 5, 6, 7]
        assert server.bridge.hub.stats.resumes_from_bus == 1
        await again.close()


async def test_gap_on_the_bus_is_reported(server: BridgeServer, publisher: BusPublisher) -> None:
    client = await connect(server)
    await subscribe(client, ["ai_decision"])
    await publisher.publish("ai_decision", {"n": 1}, seq=1)
    await publisher.publish("ai_decision", {"n": 5}, seq=5)
    gap, before = await recv_until(client, lambda m: m["type"] == "gap")
    assert gap == {"type": "gap", "topic": "ai_decision", "source": "bot-1", "missed": 3}
    assert [m["seq"] for m in events_only(before)] == [1]
    (after,) = await collect_events(client, 1)
    assert after["seq"] == 5
    await client.close()


async def test_upstream_subscriptions_follow_what_clients_need(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    config = bridge_config(proxy, upstream_linger=0, track_sources=False)
    async with running_bridge(config) as server:
        hub = server.bridge.hub
        assert hub.upstream.subscribed == set()
        client = await connect(server)
        await subscribe(client, ["ai_decision"])
        assert hub.upstream.subscribed == {b"ai_decision"}
        await publisher.publish("market_data.BTC-USD", {"price": 1})
        await publisher.publish("ai_decision", {"action": "BUY"})
        await collect_events(client, 1)
        # the bus never sent the market data: the bridge saw only what a client wanted
        assert hub.stats.events_by_type == {"ai_decision": 1}
        await request(client, {"op": "unsubscribe", "topics": ["ai_decision"]}, "unsubscribed")
        await wait_for(lambda: hub.upstream.subscribed == set(), "upstream unsubscribe")
        await client.close()


async def test_source_status_live_then_stale(proxy: Proxy, publisher: BusPublisher) -> None:
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, stale_after=0.3)) as server:
        client = await connect(server)
        await subscribe(client, ["ai_decision"])
        await publisher.publish("system_status", {"status": "healthy", "health": True})
        live, _ = await recv_until(client, lambda m: m["type"] == "source_status")
        assert (live["source"], live["status"]) == ("bot-1", "live")
        stale, _ = await recv_until(client, lambda m: m["type"] == "source_status")
        assert (stale["source"], stale["status"]) == ("bot-1", "stale")
        assert stale["last_seen"] == live["last_seen"]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{server.port}/metrics") as response,
        ):
            text = await response.text()
        assert 'tradebus_bridge_source_live{source="bot-1"} 0.0' in text
        await client.close()


async def test_websocket_publisher_reaches_subscribers(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    browser = await connect(server)
    await subscribe(browser, ["market_data", "custom_event"])
    bot = await connect(server, "role=publisher&source=guide-bot&epoch=7")
    await bot.send(
        orjson.dumps(
            {"type": "market_data", "data": {"symbol": "BTC-USD", "price": 45000.0}, "id": 1}
        ).decode()
    )
    assert await recv(bot) == {"type": "ack", "id": 1}
    await bot.send(
        orjson.dumps({"type": "custom_event", "data": {"x": 1}, "seq": 9, "id": 2}).decode()
    )
    await bot.send(
        orjson.dumps({"type": "custom_event", "data": {"x": 2}, "seq": 9, "id": 3}).decode()
    )
    assert await recv(bot) == {"type": "ack", "id": 2}
    assert await recv(bot) == {"type": "ack", "id": 3, "duplicate": True}
    market, custom = await collect_events(browser, 2)
    assert market["topic"] == "market_data.BTC-USD"
    assert (market["source"], market["epoch"], market["seq"]) == ("guide-bot", 7, 1)
    assert market["data"] == {"symbol": "BTC-USD", "price": 45000.0}
    assert (custom["topic"], custom["seq"]) == ("custom_event", 9)
    await bot.send('{"type": "market_data", "data": [1, 2]}')
    error = await recv(bot)
    assert error["type"] == "error"
    assert error["code"] == "bad_event"
    await bot.close()
    await browser.close()


async def test_bot_client_websocket_publisher_reaches_a_client(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    browser = await connect(server)
    await subscribe(browser, ["ai_decision", "market_data"])
    settings = PublisherSettings(dashboard_url=f"ws://127.0.0.1:{server.port}/ws")
    bot = WebSocketPublisher(settings)
    await bot.initialize()
    try:
        await bot.publish_ai_decision("BUY", "strong signals", 0.85)
        await bot.publish_market_data("BTC-USD", 45000.0)
        decision, market = await collect_events(browser, 2, timeout=10)
    finally:
        await bot.close()
    assert decision["type"] == "ai_decision"
    assert decision["data"]["action"] == "BUY"
    assert market["topic"] == "market_data.BTC-USD"
    await browser.close()


async def test_http_endpoints(server: BridgeServer, publisher: BusPublisher) -> None:
    client = await connect(server)
    await subscribe(client, ["ai_decision"])
    await publisher.publish("ai_decision", {"action": "BUY"})
    await collect_events(client, 1)
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/health") as response:
            assert response.status == 200
        async with http.get(base + "/ready") as response:
            assert response.status == 200
            assert (await response.json())["ready"] is True
        async with http.get(base + "/metrics") as response:
            text = await response.text()
        async with http.get(base + "/") as response:
            assert response.status == 200
            assert "text/html" in response.headers["Content-Type"]
        async with http.get(base + "/static/../app.py") as response:
            assert response.status == 404
    assert 'tradebus_bridge_events_in_total{type="ai_decision"} 1.0' in text
    assert "tradebus_bridge_deliveries_total 1.0" in text
    assert 'tradebus_bridge_connected_clients{role="subscriber"} 1.0' in text
    assert "tradebus_bridge_latency_seconds_count 1.0" in text
    await client.close()


async def test_starts_without_proxy_and_becomes_ready_when_it_appears(
    zmq_context: zmq.Context[zmq.Socket[bytes]], unused_tcp_port_factory: object
) -> None:
    ports = [unused_tcp_port_factory() for _ in range(3)]  # type: ignore[operator]
    endpoints = [f"tcp://127.0.0.1:{p}" for p in ports]
    config = BridgeConfig(port=0, publish_to=endpoints[0], bus=endpoints[1], snapshot=endpoints[2])
    server = await start_bridge(config)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{server.port}/ready") as response:
                assert response.status == 503
            proxy = Proxy(
                ProxyConfig(frontend=endpoints[0], backend=endpoints[1], snapshot=endpoints[2]),
                context=zmq_context,
            )
            proxy.start()
            try:
                await wait_for(lambda: server.bridge.ready, "ready after the proxy starts", 10)
                async with http.get(f"http://127.0.0.1:{server.port}/ready") as response:
                    assert response.status == 200
            finally:
                proxy.stop()
    finally:
        await server.close()


async def test_app_shutdown_closes_clients_with_going_away(proxy: Proxy) -> None:
    """The app itself (create_app on any aiohttp runner, not only BridgeServer) tells its
    clients 1001 when aiohttp shuts it down."""
    app = create_app(bridge_config(proxy))
    runner = web.AppRunner(app, shutdown_timeout=scaled(5))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        await wait_for(lambda: app[BRIDGE_KEY].ready, "bridge ready")
        client = await websockets.connect(
            f"ws://127.0.0.1:{port}/ws", open_timeout=scaled(5), ping_interval=None
        )
        assert (await recv(client))["type"] == "connection_established"
        await wait_for(lambda: len(app[BRIDGE_KEY].hub.clients) == 1, "client registered")
    finally:
        await runner.cleanup()
    await asyncio.wait_for(client.wait_closed(), scaled(5))
    assert client.close_code == 1001
    assert client.close_reason == "server shutting down"
