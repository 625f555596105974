"""The proxy's gate with real sockets: what it refuses never reaches a subscriber, the
cache, a snapshot or a WebSocket client, and the good events around it all do."""

from __future__ import annotations

import time

import orjson
import pytest
import zmq
from prometheus_client import CollectorRegistry, generate_latest

from bridge.app import BridgeServer
from bus.envelope import encode_event
from bus.proxy import SNAPSHOT_COMMAND, STATUS_ERROR, Proxy
from monitoring.metrics import ProxyCollector
from tests.conftest import scaled
from tests.support import loopback_proxy_config, wait_until
from tests.test_bridge_support import (
    BusPublisher,
    connect,
    recv_until,
    subscribe,
    wait_for,
)

Context = zmq.Context[zmq.Socket[bytes]]
TOPIC = "trading_decision.BTC-USD"


@pytest.fixture
def bot(publisher: BusPublisher) -> BusPublisher:
    """The conftest ``publisher`` (the one the ``server`` fixture waits for), by its role."""
    return publisher


def malformed_messages(bot: BusPublisher) -> dict[str, list[bytes]]:
    """One message of every kind the gate refuses, on the bot's own connection, source and
    epoch (so only the defect named by the key is wrong), each with a seq of its own."""

    def good(seq: int, **data: object) -> list[bytes]:
        return encode_event(TOPIC, "trading_decision", data, bot.source, bot.epoch, seq)

    topic, meta, _payload = good(901)
    two_mib = good(908, pad="x" * (2 * 1024 * 1024))
    return {
        "frames/1": [topic],
        "frames/2": [topic, meta],
        "frames/4": [*good(902), b"extra"],
        "meta": [topic, b"\x07" + good(903)[1][1:], good(903)[2]],
        "payload/utf8": [topic, good(904)[1], good(904)[2].replace(b"}", b',"x":"\xff\xfe"}', 1)],
        "topic": [b"trading_decision.\xff", good(905)[1], good(905)[2]],
        "payload/json": [topic, good(906)[1], b"{not json"],
        "not_object": [topic, good(907)[1], b"[1,2,3]"],
        "mismatch": [topic, good(909)[1], good(910)[2]],
        "too_large": two_mib,
    }


async def test_malformed_messages_are_refused_and_clients_get_the_good_ones_around_them(
    proxy: Proxy, server: BridgeServer, bot: BusPublisher
) -> None:
    client = await connect(server)
    await subscribe(client, [TOPIC])
    sent_good = []
    for kind, frames in malformed_messages(bot).items():
        sent_good.append(await bot.publish(TOPIC, {"before": kind}))
        await bot.socket.send_multipart(frames)
    sent_good.append(await bot.publish(TOPIC, {"last": True}))

    received = []
    for _ in sent_good:
        message, _before = await recv_until(client, lambda m: m.get("type") == "trading_decision")
        received.append(message)
    assert [m["seq"] for m in received] == list(range(1, len(sent_good) + 1))
    assert received[-1]["data"] == {"last": True}
    # still connected and served: a ping is answered
    await client.send('{"type":"ping","id":1}')
    pong, _ = await recv_until(client, lambda m: m.get("type") == "pong")
    assert pong["id"] == 1

    await wait_for(lambda: proxy.cache.stats.events == len(sent_good), "the cache to catch up")
    assert proxy.gate.stats.rejected == {
        "frames": 3,
        "meta": 1,
        "payload": 2,
        "topic": 1,
        "not_object": 1,
        "mismatch": 1,
        "too_large": 1,
    }
    assert proxy.cache.stats.invalid == 0
    cached_meta, cached_payload = proxy.cache.entries[TOPIC.encode()][:2]
    assert cached_payload == sent_good[-1][2]
    assert cached_meta == sent_good[-1][1]

    registry = CollectorRegistry()
    registry.register(ProxyCollector(lambda: proxy.cache.stats, lambda: proxy.gate.stats))
    metrics = generate_latest(registry).decode()
    assert 'tradebus_proxy_rejected_total{reason="too_large"} 1.0' in metrics
    assert f"tradebus_proxy_accepted_total {float(len(sent_good))}" in metrics
    await client.close()


async def test_a_forged_event_from_another_connection_cannot_poison_a_source(
    zmq_context: Context, proxy: Proxy, server: BridgeServer, bot: BusPublisher
) -> None:
    client = await connect(server)
    await subscribe(client, [TOPIC])
    await bot.publish(TOPIC, {"n": 1})
    await recv_until(client, lambda m: m.get("seq") == 1)

    attacker = BusPublisher(zmq_context, proxy.frontend_endpoint, "bot-1")
    try:
        await attacker.connected()
        attacker.epoch = bot.epoch  # the victim's run...
        await attacker.publish(TOPIC, {"action": "SELL EVERYTHING"}, seq=2**64 - 1)  # ...and seq
        await wait_for(lambda: proxy.gate.stats.rejected.get("not_owner") == 1, "the refusal")
    finally:
        attacker.close()

    await bot.publish(TOPIC, {"n": 2})
    message, skipped = await recv_until(client, lambda m: m.get("type") == "trading_decision")
    assert (message["seq"], message["data"]) == (2, {"n": 2})
    assert not any("SELL" in orjson.dumps(m).decode() for m in skipped)
    await wait_for(lambda: proxy.cache.stats.events == 2, "the cache")
    assert proxy.cache.entries[TOPIC.encode()][4] == 2  # the real bot's seq, not 2**64 - 1
    await client.close()


async def test_an_epoch_from_the_future_is_refused(proxy: Proxy, bot: BusPublisher) -> None:
    await bot.connected()
    bot.epoch = time.time_ns() + 3_600 * 10**9
    await bot.publish(TOPIC, {"n": 1})
    await wait_for(lambda: proxy.gate.stats.rejected.get("future_epoch") == 1, "the refusal")
    assert proxy.cache.entries == {}


async def test_a_giant_frame_is_refused_by_libzmq_and_others_go_on(
    zmq_context: Context, proxy: Proxy, server: BridgeServer, bot: BusPublisher
) -> None:
    client = await connect(server)
    await subscribe(client, [TOPIC])
    vandal = BusPublisher(zmq_context, proxy.frontend_endpoint, "vandal")
    try:
        await vandal.connected()
        # 8 MiB: libzmq drops the vandal's connection before the proxy reads the frame
        await vandal.publish(TOPIC, {"pad": "x" * (8 * 1024 * 1024)})
        await bot.publish(TOPIC, {"n": 1})
        message, _ = await recv_until(client, lambda m: m.get("type") == "trading_decision")
        assert message["source"] == "bot-1"
    finally:
        vandal.close()
    assert proxy.gate.stats.passed == 1
    assert b"vandal" not in b"".join(entry[0] for entry in proxy.cache.entries.values())
    await client.close()


def snapshot_request(context: Context, proxy: Proxy, body: list[bytes]) -> list[bytes]:
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(proxy.snapshot_endpoint)
        dealer.send_multipart([b"", *body])
        assert dealer.poll(int(scaled(5) * 1000)), "no snapshot reply"
        return dealer.recv_multipart()[1:]
    finally:
        dealer.close(linger=0)


def test_snapshot_requests_are_bounded(zmq_context: Context) -> None:
    config = loopback_proxy_config(
        snapshot_max_patterns=3,
        snapshot_max_bytes=1_000,
    )
    with Proxy(config, context=zmq_context) as proxy:
        reply = snapshot_request(zmq_context, proxy, [SNAPSHOT_COMMAND, b"", *[b"a"] * 4])
        assert reply[:2] == [SNAPSHOT_COMMAND, STATUS_ERROR]
        assert b"more than 3 patterns" in reply[2]

        publisher = zmq_context.socket(zmq.XPUB)
        publisher.linger = 0
        try:
            publisher.connect(proxy.frontend_endpoint)
            assert publisher.poll(int(scaled(5) * 1000)), "the proxy's subscription"
            publisher.recv()
            for n in range(10):
                topic = f"market_data.S{n}"
                data = {"pad": "x" * 200}
                publisher.send_multipart(encode_event(topic, "market_data", data, "b", 1, 1))
            wait_until(lambda: proxy.cache.stats.events >= 10, "the cache to see 10 events")
            assert proxy.cache.stats.events == 10
        finally:
            publisher.close(linger=0)
        reply = snapshot_request(zmq_context, proxy, [SNAPSHOT_COMMAND, b"", b"market_data"])
        assert reply[:2] == [SNAPSHOT_COMMAND, STATUS_ERROR]
        assert b"over the limit of 1000" in reply[2]
        # a narrower request still gets its snapshot
        reply = snapshot_request(zmq_context, proxy, [SNAPSHOT_COMMAND, b"", b"market_data.S1"])
        assert reply[:2] == [SNAPSHOT_COMMAND, b"ok"]
        assert len(reply) == 5
        assert proxy.cache.stats.refused_snapshots == {"patterns": 1, "too_large": 1}
