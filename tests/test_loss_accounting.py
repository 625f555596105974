"""Loss accounting, as a standing test (issue 13): nothing is lost without being reported.

A bot publishes at a steady rate, skipping some sequence numbers as a bot does when its
queue overflows (it counts those as dropped). 100 WebSocket clients with mixed patterns,
five of them stalled for a while so that the bridge conflates their market data, and one
``bus.Subscriber`` receive the stream. For every one of them, per topic matching its
patterns:

    received + reported as gaps + conflated (conflating types only) = published

and the conflated events of all clients add up to the bridge's conflated count (the
metric tradebus_bridge_conflated_total). Real proxy, real bridge, real sockets.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field

import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from bridge.app import BridgeServer
from bus import Event, Gap, Subscriber
from bus.proxy import Proxy
from bus.topics import Pattern
from tests.support import wait_for
from tests.test_bridge_slow import stalled_client
from tests.test_bridge_support import (
    BusPublisher,
    bridge_config,
    connect,
    running_bridge,
    subscribe,
)

pytestmark = pytest.mark.timeout(60)

TOPICS = (
    "market_data.BTC-USD",
    "market_data.ETH-USD",
    "market_data.SOL-USD",
    "position_update.BTC-USD",
    "position_update.ETH-USD",
    "trading_decision",
    "ai_decision",
    "trade_execution.BTC-USD",
)
CONFLATING = ("market_data", "position_update")
PATTERN_SETS = (
    ("*",),
    ("market_data",),
    ("market_data.BTC-USD", "trading_decision"),
    ("*.ETH-USD",),
    ("ai_decision", "trading_decision"),
    ("position_update", "trade_execution"),
    ("*.BTC-USD", "ai_decision"),
    ("market_data.SOL-USD", "market_data.ETH-USD", "trade_execution.BTC-USD"),
)
CLIENTS = 100
STALLED = 5
RATE = 120  # events per second, for
SECONDS = 6.0
DROP_EVERY = 53  # the bot "drops" every 53rd event (its seq is used, the event never sent)
BLOB = "x" * 1500  # market data big enough for stalled clients to fall behind


@dataclass
class Tally:
    """What one receiver got, per topic: seqs received and events reported missing."""

    patterns: tuple[str, ...]
    received: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    gaps: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def wants(self, topic: str) -> bool:
        return any(Pattern(p).matches(topic) for p in self.patterns)

    def caught_up(self, last: dict[str, int]) -> bool:
        return all(
            self.received[t][-1:] == [seq] for t, seq in last.items() if self.wants(t) and seq
        )


async def read_client(client: ClientConnection, tally: Tally, stall_until: float) -> None:
    if stall_until:
        # the socket is not read at all: its 4 KiB buffer fills, then the bridge's
        client.transport.pause_reading()
        await asyncio.sleep(max(0.0, stall_until - time.monotonic()))  # load shape, not sync
        client.transport.resume_reading()
    async for raw in client:
        message = orjson.loads(raw)
        if "seq" in message and "topic" in message:
            tally.received[message["topic"]].append(message["seq"])
        elif message.get("type") == "gap":
            tally.gaps[message["topic"]] += message["missed"]


async def read_bus(subscriber: Subscriber, tally: Tally) -> None:
    async for item in subscriber:
        if isinstance(item, Gap):
            tally.gaps[item.topic] += item.missed
        elif isinstance(item, Event):
            tally.received[item.topic].append(item.seq)


async def test_every_event_is_received_or_reported(proxy: Proxy, publisher: BusPublisher) -> None:
    await publisher.connected()
    config = bridge_config(proxy, max_queue_bytes=16 * 1024 * 1024, write_buffer_high=32 * 1024)
    async with running_bridge(config) as server:
        await scenario(server, proxy, publisher)


async def scenario(server: BridgeServer, proxy: Proxy, publisher: BusPublisher) -> None:
    tallies: list[Tally] = []
    clients: list[ClientConnection] = []
    for n in range(CLIENTS):
        stalled = n < STALLED
        patterns = ("market_data", "trading_decision") if stalled else PATTERN_SETS[n % 8]
        client = await (stalled_client(server) if stalled else connect(server))
        if stalled:
            # the bridge's side of that connection small too, as on a congested link
            # (loopback would otherwise buffer megabytes in the kernel)
            newest = max(server.bridge.hub.clients, key=lambda c: c.id)
            newest.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 8192
            )
        await subscribe(client, list(patterns))  # in force once its (empty) snapshot ends
        tallies.append(Tally(patterns))
        clients.append(client)
    # the stalled clients read nothing for the first half of the stream
    stalled_until = time.monotonic() + SECONDS / 2
    readers = [
        asyncio.create_task(read_client(c, t, stalled_until if n < STALLED else 0.0))
        for n, (c, t) in enumerate(zip(clients, tallies, strict=True))
    ]
    bus_tally = Tally(("*",))
    async with Subscriber(
        ["*"],
        endpoint=proxy.backend_endpoint,
        snapshot=True,
        snapshot_endpoint=proxy.snapshot_endpoint,
    ) as subscriber:
        bus_reader = asyncio.create_task(read_bus(subscriber, bus_tally))
        published = await publish_steadily(publisher)
        everyone = [*tallies, bus_tally]
        await wait_for(
            lambda: all(t.caught_up(published) for t in everyone),
            "the receivers to get the last events",
            timeout=30,
        )
        bus_reader.cancel()
    hub = server.bridge.hub
    conflated_by_bridge = hub.stats.conflated + sum(c.conflated for c in hub.clients)
    for reader in readers:
        reader.cancel()
    for client in clients:
        await client.close()

    conflated_seen = 0
    for index, tally in enumerate(everyone):
        for topic, total in published.items():
            if not tally.wants(topic):
                assert not tally.received[topic], (index, topic)
                continue
            seqs = tally.received[topic]
            assert seqs == sorted(set(seqs)), (index, topic, "out of order or duplicated")
            unaccounted = total - len(seqs) - tally.gaps[topic]
            if topic.partition(".")[0] in CONFLATING and tally is not bus_tally:
                assert unaccounted >= 0, (index, topic)
                conflated_seen += unaccounted
            else:
                assert unaccounted == 0, (index, topic, total, len(seqs), tally.gaps[topic])
    assert conflated_seen == conflated_by_bridge
    assert conflated_seen > 0, "no client fell behind: the conflation path went untested"
    assert hub.stats.slow_disconnects == 0


async def publish_steadily(publisher: BusPublisher) -> dict[str, int]:
    """Publish at RATE for SECONDS; returns the last seq of each topic (dropped included)."""
    seqs = dict.fromkeys(TOPICS, 0)
    cycle = itertools.cycle(TOPICS)
    start = time.monotonic()
    sent = 0
    for n in itertools.count(1):
        if time.monotonic() - start >= SECONDS:
            break
        topic = next(cycle)
        seqs[topic] += 1
        if n % DROP_EVERY == 0:
            continue  # dropped by the bot: a gap every receiver must be told about
        data = {"n": n, "blob": BLOB} if topic.startswith("market_data") else {"n": n}
        await publisher.publish(topic, data, seq=seqs[topic])
        sent += 1
        ahead = sent / RATE - (time.monotonic() - start)
        if ahead > 0:
            await asyncio.sleep(ahead)  # a steady rate
    # the last event of every topic is sent (never "dropped"): receivers wait for it
    for topic in TOPICS:
        seqs[topic] += 1
        await publisher.publish(topic, {"last": True}, seq=seqs[topic])
    return seqs
