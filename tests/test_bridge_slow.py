"""Slow and stalled clients: conflation, the slow-consumer close, no delay for the others."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from bridge.app import BridgeServer
from bus.proxy import Proxy
from tests.conftest import scaled
from tests.test_bridge_support import (
    BusPublisher,
    bridge_config,
    collect_events,
    connect,
    recv,
    running_bridge,
    subscribe,
    wait_for,
    ws_url,
)

BLOB = "x" * 2000  # makes each event big enough to fill socket buffers quickly


@pytest.fixture
def bridge_options() -> dict[str, Any]:
    """The ``server`` fixture's bridge (tests/conftest.py): small queues fill quickly."""
    return {"max_queue_bytes": 256 * 1024, "write_buffer_high": 32 * 1024}


async def stalled_client(server: BridgeServer) -> ClientConnection:
    """A client whose socket takes little and whose library stops reading early."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", server.port))
    client = await websockets.connect(
        ws_url(server),
        sock=raw,
        max_queue=2,
        open_timeout=scaled(5),
        close_timeout=0.5,
        ping_interval=None,
    )
    greeting = await recv(client)
    assert greeting["type"] == "connection_established"
    return client


async def test_slow_client_gets_conflated_market_data_and_every_lossless_event(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    # a roomy queue: this test is about conflation, not about the slow-consumer close
    config = bridge_config(proxy, max_queue_bytes=8 * 1024 * 1024, write_buffer_high=32 * 1024)
    async with running_bridge(config) as server:
        await conflation_scenario(server, publisher)


async def conflation_scenario(server: BridgeServer, publisher: BusPublisher) -> None:
    slow = await stalled_client(server)
    await subscribe(slow, ["market_data", "trade_execution"])
    hub = server.bridge.hub
    topics = ("market_data.BTC-USD", "market_data.ETH-USD")
    published = 0
    # stop reading, publish until the bridge has had to conflate for a while
    deadline = time.monotonic() + scaled(20)
    while sum(c.conflated for c in hub.clients) < 200:
        assert time.monotonic() < deadline, "the client never fell behind"
        assert hub.stats.slow_disconnects == 0
        for topic in topics:
            await publisher.publish(topic, {"blob": BLOB, "n": published})
        await publisher.publish("trade_execution", {"n": published})
        published += 1
        if published % 20 == 0:
            # keep the bridge's batches small, as a steady stream would
            await wait_for(
                lambda n=published: hub.stats.events_by_type.get("trade_execution", 0) >= n,
                "the bridge to catch up",
            )
    for topic in topics:
        await publisher.publish(topic, {"blob": BLOB, "n": published})
    await publisher.publish("trade_execution", {"n": published, "last": True})
    total = published + 1
    await wait_for(lambda: hub.stats.events_by_type.get("trade_execution") == total, "bridge")

    received: dict[str, list[int]] = {t: [] for t in (*topics, "trade_execution")}
    while True:
        event = (await collect_events(slow, 1, timeout=10))[0]
        received[event["topic"]].append(event["seq"])
        if event["topic"] == "trade_execution" and event["data"].get("last"):
            break
    # lossless: every execution, in order
    assert received["trade_execution"] == list(range(1, total + 1))
    # conflated: fewer market data events, still in order, ending with the latest
    for topic in topics:
        seqs = received[topic]
        assert len(seqs) < total
        assert seqs == sorted(seqs)
    for topic in topics:
        while received[topic][-1] != total:
            event = (await collect_events(slow, 1))[0]
            received[event["topic"]].append(event["seq"])
    assert hub.stats.slow_disconnects == 0
    await slow.close()


async def test_slow_consumer_is_closed_with_code_and_reason(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    slow = await stalled_client(server)
    await subscribe(slow, ["trade_execution"])  # lossless: nothing can be conflated
    hub = server.bridge.hub
    deadline = time.monotonic() + scaled(20)
    n = 0
    while hub.stats.slow_disconnects == 0:
        assert time.monotonic() < deadline, "the slow client was never closed"
        await publisher.publish("trade_execution", {"blob": BLOB, "n": n})
        n += 1
        if n % 20 == 0:
            await asyncio.sleep(0.001)  # lets the bridge run between bursts (pacing)

    async def read_to_the_end() -> None:
        while True:
            await asyncio.wait_for(slow.recv(), scaled(10))

    with pytest.raises(websockets.ConnectionClosed) as closed:
        await read_to_the_end()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4008, "slow consumer")
    assert hub.stats.dropped.get("slow_consumer", 0) > 0
    # it may resume on reconnect: positions are in every event it received
    again = await connect(server)
    await subscribe(again, ["trade_execution"])
    await again.close()


async def test_stalled_client_does_not_delay_the_others(
    server: BridgeServer, publisher: BusPublisher
) -> None:
    stalled = await stalled_client(server)
    await subscribe(stalled, ["trade_execution"])
    healthy = await connect(server)
    await subscribe(healthy, ["trade_execution"])
    hub = server.bridge.hub
    latencies: list[float] = []
    measured = 200
    filled = 0
    drained = 0

    async def read_healthy() -> None:
        nonlocal drained
        while len(latencies) < measured:
            event = orjson.loads(await asyncio.wait_for(healthy.recv(), scaled(10)))
            if event.get("topic") != "trade_execution":
                continue
            if "sent" in event["data"]:
                latencies.append(time.time() - event["data"]["sent"])
            else:
                drained += 1

    reader = asyncio.create_task(read_healthy())
    # first the stalled client's socket buffers fill up until the bridge holds its frames
    deadline = time.monotonic() + scaled(20)
    while not any(c.behind for c in hub.clients) and hub.stats.slow_disconnects == 0:
        assert time.monotonic() < deadline, "the stalled client never fell behind"
        await publisher.publish("trade_execution", {"blob": BLOB})
        filled += 1
        if filled % 20 == 0:
            await asyncio.sleep(0.001)  # lets the bridge run between bursts (pacing)
    await wait_for(lambda: drained == filled, "the healthy client to read the fill events")
    # then the healthy client's latency is measured while the other stays stalled
    for n in range(measured):
        await publisher.publish("trade_execution", {"blob": BLOB, "n": n, "sent": time.time()})
        await asyncio.sleep(0.002)  # a steady 500 events/s for the latency sample (pacing)
    await asyncio.wait_for(reader, scaled(20))
    assert hub.stats.slow_disconnects == 1 or any(c.behind for c in hub.clients)
    # a design that waits on each client in turn would hold every event behind the stalled
    # client for as long as it stalls; the median is robust to a busy machine's hiccups
    latencies.sort()
    median, worst = latencies[len(latencies) // 2], latencies[-1]
    assert median < scaled(0.05), f"healthy client median {median * 1000:.1f} ms"
    assert worst < scaled(1.0), f"healthy client worst {worst * 1000:.1f} ms"
    await healthy.close()
    await stalled.close()
