"""bot_client's ws:// transport end to end: publisher -> real bridge ingest -> real proxy ->
bus subscriber. (Written once the bridge of issue 4 existed; uses its start_bridge.)"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest
import zmq
from aiohttp import web

from bot_client import AsyncPublisher
from bridge.app import BridgeServer, start_bridge
from bridge.config import BridgeConfig
from bus.envelope import Event
from bus.proxy import Proxy
from bus.subscriber import BlockingSubscriber, Gap
from tests.conftest import scaled, staging_proxy, synced_subscriber
from tests.support import free_port, loopback_proxy_config, wait_for

Context = zmq.Context[zmq.Socket[bytes]]


def bridge_config(proxy: Proxy, port: int = 0, allow_publish: bool = True) -> BridgeConfig:
    return BridgeConfig(
        port=port,
        bus=proxy.backend_endpoint,
        snapshot=proxy.snapshot_endpoint,
        publish_to=proxy.frontend_endpoint,
        allow_publish=allow_publish,
    )


async def started_bridge(config: BridgeConfig) -> BridgeServer:
    server = await start_bridge(config)
    await wait_for(lambda: server.bridge.ready and server.bridge.publish_ready)
    return server


async def serve_ws(
    port: int, handler: Callable[[web.Request], Awaitable[web.WebSocketResponse]]
) -> web.AppRunner:
    """A bare WebSocket peer on ``port`` at /ws (stop it with ``runner.cleanup()``)."""
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.fixture
def subscriber(proxy: Proxy, zmq_context: Context) -> Iterator[BlockingSubscriber]:
    with synced_subscriber(proxy, zmq_context) as sub:
        yield sub


@pytest.fixture
async def bridge(proxy: Proxy) -> AsyncIterator[BridgeServer]:
    server = await started_bridge(bridge_config(proxy))
    yield server
    await server.close()


async def receive(
    sub: BlockingSubscriber, count: int, source: str, within: float = 10.0
) -> list[Event]:
    """``count`` events of ``source`` from the bus, failing on a gap; others are skipped."""
    events: list[Event] = []
    deadline = time.monotonic() + scaled(within)
    while len(events) < count:
        assert time.monotonic() < deadline, f"got {len(events)} of {count} events"
        item = await asyncio.to_thread(sub.recv, 0.05)
        if item is None:
            continue
        assert not isinstance(item, Gap), str(item)
        if item.source == source:
            events.append(item)
    return events


def ws_publisher(port: int, source: str, **settings: object) -> AsyncPublisher:
    return AsyncPublisher(
        url=f"ws://127.0.0.1:{port}/ws",
        source_id=source,
        publish_interval=0,
        heartbeat_interval=0,
        **settings,
    )


async def test_ws_events_reach_the_bus_with_source_epoch_and_seq(
    bridge: BridgeServer, subscriber: BlockingSubscriber
) -> None:
    async with ws_publisher(bridge.port, "ws-bot", queue_size=1000) as publisher:
        for n in range(200):
            publisher.publish_trading_loop(45000.0 + n, "HOLD", 0.5, symbol="BTC-USD")
        publisher.publish_trading_decision("r1", "sell", 0.9, "why", 45100.0)
        events = await receive(subscriber, 201, "ws-bot")
        await wait_for(lambda: publisher.status()["sent"] == 201)
        status = publisher.status()
    assert status["connected"] is True
    assert (status["queued"], status["dropped_total"], status["rejected"]) == (0, 0, 0)
    loops = [e for e in events if e.type == "trading_loop"]
    assert [e.data["price"] for e in loops] == [45000.0 + n for n in range(200)]
    assert [e.seq for e in loops] == list(range(1, 201))
    assert {e.topic for e in loops} == {"trading_loop.BTC-USD"}
    assert all(e.epoch == publisher.epoch for e in events)
    assert events[-1].data["action"] == "SELL"


async def test_ws_bridge_down_at_start_then_up_delivers_in_order(
    proxy: Proxy, subscriber: BlockingSubscriber
) -> None:
    port = free_port()
    publisher = ws_publisher(port, "late-bridge", retry_delay=0.05, max_retries=2)
    await publisher.start()
    try:
        for n in range(50):
            publisher.publish("custom_event", {"n": n})
        await wait_for(lambda: publisher.status()["connect_attempts"] >= 2)
        assert publisher.status()["connected"] is False
        assert publisher.status()["queued"] == 50
        server = await started_bridge(bridge_config(proxy, port))
        try:
            events = await receive(subscriber, 50, "late-bridge")
            assert [e.data["n"] for e in events] == list(range(50))
            await wait_for(lambda: publisher.status()["queued"] == 0)
            assert publisher.connected
        finally:
            await publisher.close(timeout=1)
            await server.close()
    finally:
        await publisher.close(timeout=0)


async def test_ws_events_in_flight_at_a_disconnect_are_resent_once(
    zmq_context: Context,
) -> None:
    # Without keys the proxy lets a second connection (the new bridge) publish a source only
    # once the first one has been silent for owner_idle_s: keep that short here.
    config = loopback_proxy_config(
        owner_idle_s=0.2,
    )
    with Proxy(config, context=zmq_context) as proxy, synced_subscriber(proxy, zmq_context) as sub:
        await _resend_across_a_bridge_restart(proxy, sub)


async def _resend_across_a_bridge_restart(proxy: Proxy, subscriber: BlockingSubscriber) -> None:
    port = free_port()
    server = await started_bridge(bridge_config(proxy, port))
    publisher = ws_publisher(port, "resend", retry_delay=0.05, queue_size=5000)
    await publisher.start()
    try:
        await wait_for(lambda: publisher.connected)
        for n in range(1000):
            publisher.publish("custom_event", {"n": n})
        # drop the bridge while events are in flight, then bring a new one up on the port
        await wait_for(lambda: publisher.status()["sent"] > 0, timeout=10)
        await server.close()
        await wait_for(lambda: not publisher.connected)
        closed = time.monotonic()
        for n in range(1000, 1100):
            publisher.publish("custom_event", {"n": n})
        # the rule is about time: the old bridge's connection must have been silent that long
        # (so this sleep is the thing under test, not a synchronisation)
        await asyncio.sleep(max(0.0, closed + proxy.config.owner_idle_s - time.monotonic()))
        server = await started_bridge(bridge_config(proxy, port))
        await wait_for(lambda: publisher.status()["sent"] == 1100, timeout=15)
        # the subscriber's sequence tracker skips what the second bridge republished: every
        # event arrives exactly once, in order, with no gap
        events = await receive(subscriber, 1100, "resend")
        assert [e.data["n"] for e in events] == list(range(1100))
        assert [e.seq for e in events] == list(range(1, 1101))
        status = publisher.status()
        assert status["reconnects"] >= 1
        assert status["dropped_total"] == 0
    finally:
        await publisher.close(timeout=1)
        await server.close()


async def test_ws_unacknowledged_events_are_resent_after_reconnect(
    proxy: Proxy, subscriber: BlockingSubscriber
) -> None:
    # A peer that takes events and never acknowledges them, then goes away (it stops
    # listening, then closes the connection): all 30 were in flight, so all 30 must be
    # resent, once, to the real bridge that comes up on the same port.
    port = free_port()
    taken: list[dict[str, object]] = []

    async def silent_ingest(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            taken.append(orjson.loads(message.data))
        return ws

    runner = await serve_ws(port, silent_ingest)
    publisher = ws_publisher(port, "unacked", retry_delay=0.05)
    await publisher.start()
    try:
        for n in range(30):
            publisher.publish("custom_event", {"n": n})
        await wait_for(lambda: len(taken) == 30)
        await runner.cleanup()
        assert [body["seq"] for body in taken] == list(range(1, 31))
        assert all(isinstance(body["id"], int) for body in taken)
        server = await started_bridge(bridge_config(proxy, port))
        try:
            events = await receive(subscriber, 30, "unacked")
            assert [e.data["n"] for e in events] == list(range(30))
            await wait_for(lambda: publisher.status()["sent"] == 30)
            # 30, or a multiple when the new bridge said "bus_unavailable" while starting
            assert publisher.status()["resent"] >= 30
        finally:
            await publisher.close(timeout=1)
            await server.close()
    finally:
        await publisher.close(timeout=0)
        await runner.cleanup()


async def test_ws_events_refused_for_now_are_kept_and_delivered_later(
    proxy: Proxy, zmq_context: Context, tmp_path: Path
) -> None:
    # The bridge is up but cannot reach the bus's publisher endpoint yet: it answers
    # "bus_unavailable". The publisher keeps those events and resends them with backoff
    # until the bus is there; nothing is dropped.
    target = tmp_path / "in.sock"
    config = bridge_config(proxy).replace(publish_to=f"ipc://{target}")
    server = await start_bridge(config)
    await wait_for(lambda: server.bridge.ready)
    publisher = ws_publisher(server.port, "deferred", retry_delay=0.05, max_retries=2)
    await publisher.start()
    later = staging_proxy(tmp_path)
    try:
        for n in range(10):
            publisher.publish("custom_event", {"n": n})
        await wait_for(lambda: publisher.status()["resent"] >= 10)
        assert publisher.status()["dropped_total"] == 0
        later.start()
        with synced_subscriber(later, zmq_context) as sub:
            os.rename(tmp_path / "staging.sock", target)
            events = await receive(sub, 10, "deferred")
        assert [e.data["n"] for e in events] == list(range(10))
        await wait_for(lambda: publisher.status()["sent"] == 10)
        assert publisher.status()["dropped_total"] == 0
    finally:
        await publisher.close(timeout=1)
        await server.close()
        later.stop()


async def test_ws_events_too_big_for_a_bridge_that_only_closes_are_refused_once() -> None:
    # A peer like an older bridge: its greeting does not say its size limit, and it closes
    # the connection with 1009 on a bigger message. The publisher drops the largest event
    # in flight (counted), remembers its size, and refuses later ones that big itself.
    port = free_port()
    seen: list[str] = []

    async def old_bridge(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await ws.send_str('{"type":"connection_established","server":"tradebus"}')
        async for message in ws:
            if len(message.data.encode()) > 65_536:
                seen.append("big")
                await ws.close(code=1009, message=b"too big")
                break
            body = orjson.loads(message.data)
            seen.append(body["data"]["reasoning"])
            await ws.send_str(orjson.dumps({"type": "ack", "id": body["id"]}).decode())
        return ws

    runner = await serve_ws(port, old_bridge)
    try:
        async with ws_publisher(port, "old-peer", retry_delay=0.05) as publisher:
            publisher.publish_ai_decision("BUY", "before", 0.5)
            publisher.publish("custom", {"blob": "x" * 100_000})
            publisher.publish_ai_decision("SELL", "after", 0.5)
            await wait_for(
                lambda: (publisher.status()["rejected"], publisher.status()["sent"]) == (1, 2)
            )
            publisher.publish("custom", {"blob": "y" * 200_000})
            publisher.publish_ai_decision("HOLD", "last", 0.5)
            await wait_for(
                lambda: (publisher.status()["rejected"], publisher.status()["sent"]) == (2, 3)
            )
            status = publisher.status()
        assert status["dropped"] == {"custom": 2}
        assert seen.count("big") == 1  # the second big event never left the publisher
        assert [text for text in seen if text != "big"][-1] == "last"
        assert {"before", "after", "last"} <= set(seen)
    finally:
        await runner.cleanup()


async def test_ws_rejected_events_are_counted(proxy: Proxy, subscriber: BlockingSubscriber) -> None:
    server = await started_bridge(bridge_config(proxy, allow_publish=False))
    try:
        async with ws_publisher(server.port, "forbidden") as publisher:
            publisher.publish_ai_decision("BUY", "r", 0.5)
            publisher.publish_error("boom")
            await wait_for(lambda: publisher.status()["rejected"] == 2)
            status = publisher.status()
        assert status["dropped"] == {"ai_decision": 1, "error": 1}
        assert status["sent"] == 0
        assert await asyncio.to_thread(subscriber.recv, 0.2) is None
    finally:
        await server.close()


async def test_ws_events_too_big_for_the_bridge_are_counted_and_do_not_block_others(
    bridge: BridgeServer, subscriber: BlockingSubscriber
) -> None:
    # the bridge takes messages up to 64 KiB (close 1009 beyond); the bus up to 1 MiB
    async with ws_publisher(bridge.port, "big-bot", queue_size=100) as publisher:
        publisher.publish_ai_decision("BUY", "before", 0.5)
        publisher.publish("custom", {"blob": "x" * 100_000})
        publisher.publish_ai_decision("SELL", "after", 0.5)
        events = await receive(subscriber, 2, "big-bot")
        await wait_for(lambda: publisher.status()["rejected"] == 1)
        # later events of that size are refused without another round trip
        publisher.publish("custom", {"blob": "y" * 200_000})
        publisher.publish_ai_decision("HOLD", "last", 0.5)
        events += await receive(subscriber, 1, "big-bot")
        await wait_for(
            lambda: (publisher.status()["rejected"], publisher.status()["queued"]) == (2, 0)
        )
        status = publisher.status()
    assert [e.data["reasoning"] for e in events] == ["before", "after", "last"]
    assert status["dropped"] == {"custom": 2}
    assert (status["reconnects"] <= 1, status["sent"]) == (True, 3)


async def test_ws_an_event_of_exactly_the_announced_size_is_sent_and_one_byte_more_is_not(
    proxy: Proxy, subscriber: BlockingSubscriber
) -> None:
    # the greeting's max_message_bytes is the largest message the bridge takes: the
    # publisher sends up to it, and the bridge accepts it (no 1009, no reconnect)
    limit = 2048
    server = await started_bridge(bridge_config(proxy).replace(max_message_bytes=limit))
    try:
        async with ws_publisher(server.port, "edge-bot", queue_size=100) as publisher:
            publisher.publish("custom", {"blob": ""})
            first = (await receive(subscriber, 1, "edge-bot"))[0]
            # the WebSocket message is the bus payload plus ',"id":N'; ids 2..6 and seqs
            # 2..6 have one digit like the first event's, so only the blob changes the size
            base = len(first.payload) + len(',"id":1')
            blobs = [limit - base + delta for delta in (-2, -1, 0, 1, 2)]
            for blob in blobs:
                publisher.publish("custom", {"blob": "x" * blob})
            await wait_for(lambda: publisher.status()["queued"] == 0)
            status = publisher.status()
            fitting = [blob for blob in blobs if base + blob <= limit]
            events = await receive(subscriber, len(fitting), "edge-bot")
        assert [len(event.data["blob"]) for event in events] == fitting
        assert max(len(e.payload) + len(',"id":1') for e in events) == limit
        assert status["reconnects"] == 0
        assert status["dropped"] == {"custom": 2}
    finally:
        await server.close()
