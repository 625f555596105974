"""CURVE keys end to end through the real proxy (``ProxyConfig(keys=...)``) and ``tradebus up``.

The proxy's three sockets are CURVE servers (configure_server) admitting the authorized
keys (BusAuthenticator); its gate lets a key publish only the sources its certificate names.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import websockets.sync.client as ws_client
import zmq
from structlog.testing import capture_logs

from bot_client.publisher import Publisher
from bus.envelope import Event, encode_event
from bus.errors import AuthError
from bus.keys import (
    configure_client,
    create_key,
    fingerprint,
    load_client_keys,
    load_server_keys,
)
from bus.proxy import Proxy
from bus.subscriber import BlockingSubscriber
from tests.conftest import scaled
from tests.support import loopback_proxy_config, run_tradebus, wait_until
from tests.test_bus_keys import make_keys
from tests.test_up import start_up

Context = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    make_keys(directory)
    return directory


@pytest.fixture
def keyed_proxy(key_dir: Path, zmq_context: Context) -> Iterator[Proxy]:
    config = loopback_proxy_config(
        heartbeat_ms=500,
        keys=load_server_keys(key_dir),
    )
    running = Proxy(config, context=zmq_context)
    running.start()
    yield running
    running.stop()


def keyed_subscriber(
    proxy: Proxy, context: Context, keys_dir: Path, name: str
) -> BlockingSubscriber:
    return BlockingSubscriber(
        ["*"],
        endpoint=proxy.backend_endpoint,
        snapshot=True,
        snapshot_endpoint=proxy.snapshot_endpoint,
        snapshot_timeout=scaled(5),
        context=context,
        keys=load_client_keys(keys_dir, name),
    )


def test_a_keyed_publisher_reaches_a_keyed_subscriber_and_anonymous_peers_get_nothing(
    keyed_proxy: Proxy, key_dir: Path, zmq_context: Context
) -> None:
    anonymous_sub: zmq.Socket[bytes] = zmq_context.socket(zmq.SUB)
    anonymous_sub.linger = 0
    anonymous_sub.subscribe(b"")
    anonymous_sub.connect(keyed_proxy.backend_endpoint)
    anonymous_pub: zmq.Socket[bytes] = zmq_context.socket(zmq.PUB)
    anonymous_pub.linger = 0
    anonymous_pub.connect(keyed_proxy.frontend_endpoint)
    publisher = Publisher(
        url=keyed_proxy.frontend_endpoint,
        source_id="bot-1",
        keys=str(key_dir),
        key_name="bot-1",
        publish_interval=0,
        heartbeat_interval=0,
        context=zmq_context,
    )
    try:
        assert publisher.wait_admitted(scaled(5))
        with keyed_subscriber(keyed_proxy, zmq_context, key_dir, "viewer") as subscriber:
            for number in range(20):
                # well formed: only the missing key keeps it out
                forged = encode_event("ai_decision", "ai_decision", {}, "anon", 1, number + 1)
                anonymous_pub.send_multipart(forged)
                publisher.publish("ai_decision", {"n": number})
            received = []
            while len(received) < 20:
                item = subscriber.recv(scaled(5))
                assert item is not None, f"only {len(received)} of 20 events arrived"
                assert isinstance(item, Event)
                received.append(item)
            assert [event.data["n"] for event in received] == list(range(20))
            assert {event.source for event in received} == {"bot-1"}
            assert subscriber.stats.invalid == 0, "the anonymous publisher got something in"
        assert not anonymous_sub.poll(0), "the anonymous subscriber received events"
        # both anonymous peers' handshakes were refused, and counted
        wait_until(lambda: keyed_proxy.auth_refused >= 2, "both refusals to be counted")
    finally:
        publisher.close(scaled(2))
        anonymous_sub.close(linger=0)
        anonymous_pub.close(linger=0)


def test_an_unauthorized_subscriber_is_refused_at_start_and_logged_once(
    keyed_proxy: Proxy, key_dir: Path, tmp_path: Path, zmq_context: Context
) -> None:
    stranger_dir = tmp_path / "stranger"
    create_key(stranger_dir, "stranger")
    (stranger_dir / "proxy.key").write_bytes((key_dir / "proxy.key").read_bytes())
    keys = load_client_keys(stranger_dir)
    with capture_logs() as logs:
        for _attempt in range(2):
            subscriber = BlockingSubscriber(
                endpoint=keyed_proxy.backend_endpoint, context=zmq_context, keys=keys
            )
            with pytest.raises(AuthError, match="refused key stranger"):
                subscriber.start()
    refusals = [entry for entry in logs if entry["event"] == "bus.auth_refused"]
    assert [entry["fingerprint"] for entry in refusals] == [fingerprint(keys.public_key)]


def test_record_with_a_key_the_proxy_does_not_know_stops_with_one_line(
    keyed_proxy: Proxy, tmp_path: Path
) -> None:
    stranger_dir = tmp_path / "stranger"
    create_key(stranger_dir, "stranger")
    (stranger_dir / "proxy.key").write_bytes((tmp_path / "keys" / "proxy.key").read_bytes())
    result = run_tradebus(
        "record",
        str(tmp_path / "out.jsonl"),
        "--backend",
        keyed_proxy.backend_endpoint,
        "--snapshot-endpoint",
        keyed_proxy.snapshot_endpoint,
        "--keys",
        str(stranger_dir),
        "--duration",
        "1",
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "refused key stranger" in result.stderr


def test_up_with_keys_creates_them_and_serves_the_demo(tmp_path: Path) -> None:
    directory = tmp_path / "stack-keys"
    stack = start_up("--keys", str(directory), "--demo-speed", "20", "--demo-seed", "3")
    try:
        names = sorted(path.name for path in directory.iterdir())
        assert names == [
            "bridge.key",
            "bridge.key_secret",
            "demo-bot.key",
            "demo-bot.key_secret",
            "proxy.key",
            "proxy.key_secret",
        ]
        deadline = time.monotonic() + scaled(20)
        with ws_client.connect(stack.websocket, open_timeout=scaled(5)) as ws:
            while True:
                remaining = deadline - time.monotonic()
                assert remaining > 0, "no demo event reached the browser side"
                message = json.loads(ws.recv(timeout=remaining))
                if message.get("type") == "market_data":
                    break
        assert message["source"] == "demo-bot"
    finally:
        stack.process.send_signal(signal.SIGTERM)
        stack.process.communicate(timeout=scaled(15))


def keyed_xpub(proxy: Proxy, context: Context, keys_dir: Path, name: str) -> zmq.Socket[bytes]:
    """A raw publisher with ``name``'s key, once the proxy's subscription reached it."""
    socket: zmq.Socket[bytes] = context.socket(zmq.XPUB)
    socket.linger = 0
    configure_client(socket, load_client_keys(keys_dir, name))
    socket.connect(proxy.frontend_endpoint)
    assert socket.poll(int(scaled(5) * 1000)), f"the proxy never admitted {name}"
    socket.recv()
    return socket


def test_a_key_cannot_publish_or_poison_a_source_its_certificate_does_not_name(
    keyed_proxy: Proxy, key_dir: Path, zmq_context: Context
) -> None:
    create_key(key_dir, "mallory", ["mallory"])
    keyed_proxy.stop()
    # a context of its own: the stopped proxy's ZAP endpoint is released asynchronously
    proxy = Proxy(replace(keyed_proxy.config, keys=load_server_keys(key_dir)))
    proxy.start()
    bot = keyed_xpub(proxy, zmq_context, key_dir, "bot-1")
    mallory = keyed_xpub(proxy, zmq_context, key_dir, "mallory")
    epoch = time.time_ns()
    topic = "trading_decision.BTC-USD"
    try:
        with keyed_subscriber(proxy, zmq_context, key_dir, "viewer") as subscriber:
            bot.send_multipart(encode_event(topic, "trading_decision", {"n": 1}, "bot-1", epoch, 1))
            # the victim's source and epoch, and the largest seq: it would be cached forever
            mallory.send_multipart(
                encode_event(topic, "trading_decision", {"n": -1}, "bot-1", epoch, 2**64 - 1)
            )
            # its own source passes (on a topic of its own, so the cache check below is exact)
            mallory.send_multipart(
                encode_event("trading_decision.ETH-USD", "trading_decision", {}, "mallory", 1, 1)
            )
            bot.send_multipart(encode_event(topic, "trading_decision", {"n": 2}, "bot-1", epoch, 2))
            received = []
            while len(received) < 3:
                item = subscriber.recv(scaled(5))
                assert item is not None, f"only {len(received)} of 3 events arrived"
                assert isinstance(item, Event)
                received.append((item.source, item.seq))
            # two connections: no order between them, only within each
            assert sorted(received) == [("bot-1", 1), ("bot-1", 2), ("mallory", 1)]
        assert proxy.gate.stats.rejected == {"not_owner": 1}
        wait_until(
            lambda: (proxy.cache.entries.get(topic.encode()) or ())[2:] == (b"bot-1", epoch, 2),
            "the real bot's event to be the cached one",
        )
    finally:
        bot.close(linger=0)
        mallory.close(linger=0)
        proxy.stop()
