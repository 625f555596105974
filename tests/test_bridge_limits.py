"""Limits and security of the bridge, each against a real bridge and a real bus."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import websockets
import zmq
from structlog.testing import capture_logs
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
    recv_until,
    request,
    running_bridge,
    subscribe,
    wait_for,
    ws_url,
)

SECRET = "test-secret-that-is-long-enough-for-hs256"


@pytest.fixture
def publisher(zmq_context: zmq.Context[zmq.Socket[bytes]], proxy: Proxy) -> Iterator[BusPublisher]:
    bus = BusPublisher(zmq_context, proxy.frontend_endpoint, "bot-1")
    yield bus
    bus.close()


async def expect_refused(server: BridgeServer, status: int, query: str = "", **kwargs: Any) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(ws_url(server, query), open_timeout=scaled(5), **kwargs)
    assert refused.value.response.status_code == status


async def closed_with(client: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; the close code and reason it sent."""

    async def read_to_the_end() -> None:
        while True:
            await asyncio.wait_for(client.recv(), scaled(5))

    with pytest.raises(websockets.ConnectionClosed) as closed:
        await read_to_the_end()
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def make_jwt(**claims: Any) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
async def server(proxy: Proxy, publisher: BusPublisher) -> AsyncIterator[BridgeServer]:
    await publisher.connected()
    config = bridge_config(proxy, max_subscriptions=3, max_errors=4, rate_limit=20, rate_burst=20)
    async with running_bridge(config) as running:
        yield running


# -- origin -----------------------------------------------------------------------------
async def test_foreign_origin_is_refused_with_403(proxy: Proxy, publisher: BusPublisher) -> None:
    config = bridge_config(proxy, origins=("https://dash.example.com",))
    async with running_bridge(config) as server:
        await expect_refused(server, 403, origin="https://evil.example")
        await expect_refused(server, 403, origin="null")
        # a loopback bridge trusts its own origin, not every page served from this machine
        await expect_refused(server, 403, origin="http://localhost:5173")
        await expect_refused(server, 403, origin="http://127.0.0.1")
        own = f"http://127.0.0.1:{server.port}"
        for allowed in ("https://dash.example.com", own):
            client = await connect(server, origin=allowed)
            await client.close()
        client = await connect(server)  # no Origin: not a browser
        await client.close()
        assert server.bridge.rejected["origin"] == 4


# -- authentication ---------------------------------------------------------------------
async def test_static_token_in_header_subprotocol_or_query(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    async with running_bridge(bridge_config(proxy, tokens=("s3cret-token",))) as server:
        await expect_refused(server, 401)
        await expect_refused(server, 401, "token=wrong")
        client = await connect(server, "token=s3cret-token")
        await client.close()
        client = await connect(server, additional_headers={"Authorization": "Bearer s3cret-token"})
        await client.close()
        client = await connect(server, subprotocols=["tradebus", "bearer.s3cret-token"])
        assert client.subprotocol == "tradebus"
        await client.close()


async def test_jwt_expiry_patterns_and_publish_flag(proxy: Proxy, publisher: BusPublisher) -> None:
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, jwt_secret=SECRET)) as server:
        now = int(time.time())
        await expect_refused(server, 401, "token=" + make_jwt(exp=now - 10))
        forged = jwt.encode({}, "another-secret-entirely-different-one")
        await expect_refused(server, 401, "token=" + forged)

        reader = await connect(server, "token=" + make_jwt(exp=now + 60, topics=["market_data"]))
        error = await request(reader, {"op": "subscribe", "topics": ["ai_decision"], "id": 1}, "x")
        assert (error["type"], error["code"], error["id"]) == ("error", "forbidden", 1)
        error = await request(reader, {"op": "subscribe", "topics": ["*"], "id": 2}, "x")
        assert error["code"] == "forbidden"
        await subscribe(reader, ["market_data.BTC-USD"])
        await reader.send('{"type": "market_data", "data": {"symbol": "BTC-USD"}, "id": 3}')
        error, _ = await recv_until(reader, lambda m: m["type"] == "error")
        assert (error["code"], error["id"]) == ("publish_forbidden", 3)

        writer = await connect(
            server,
            "role=publisher&source=jwt-bot&token="
            + make_jwt(exp=now + 60, publish=True, sources=["jwt-bot"]),
        )
        await writer.send('{"type": "market_data", "data": {"symbol": "BTC-USD"}, "id": 4}')
        assert await recv(writer) == {"type": "ack", "id": 4}
        (event,) = await collect_events(reader, 1)
        assert event["source"] == "jwt-bot"
        await writer.close()
        await reader.close()


async def test_token_expiring_mid_connection_closes_with_4001(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    async with running_bridge(bridge_config(proxy, jwt_secret=SECRET)) as server:
        client = await connect(server, "token=" + make_jwt(exp=time.time() + 1.0))
        started = time.monotonic()
        assert await closed_with(client) == (4001, "token expired")
        assert time.monotonic() - started < scaled(3)


async def test_tokens_never_reach_the_logs(proxy: Proxy, publisher: BusPublisher) -> None:
    await publisher.connected()
    token = make_jwt(exp=time.time() + 60, publish=True, sources=["jwt-bot"])
    with capture_logs() as logs:
        config = bridge_config(proxy, jwt_secret=SECRET, tokens=("static-sekrit",))
        async with running_bridge(config) as server:
            client = await connect(server, "token=" + token)
            await subscribe(client, ["ai_decision"])
            await client.send('{"type": "ai_decision", "data": {}, "id": 1}')
            await recv_until(client, lambda m: m["type"] == "ack")
            await client.close()
            await expect_refused(server, 401, "token=static-sekrit-wrong")
            await expect_refused(server, 401, "token=" + token + "x")
    text = repr(logs)
    assert "websocket.client_connected" in text
    assert "websocket.connection_rejected" in text
    assert token not in text
    assert "static-sekrit" not in text
    assert SECRET not in text


# -- inbound limits ---------------------------------------------------------------------
async def test_too_big_message_closes_with_1009(server: BridgeServer) -> None:
    client = await connect(server)
    await client.send('{"op": "ping", "pad": "' + "x" * (70 * 1024) + '"}')
    code, _reason = await closed_with(client)
    assert code == 1009


async def test_rate_limit_closes_with_1008(server: BridgeServer) -> None:
    client = await connect(server)
    for n in range(60):
        await client.send(orjson.dumps({"op": "ping", "id": n}).decode())
    assert await closed_with(client) == (1008, "rate limit exceeded")


async def test_publisher_above_its_rate_is_slowed_not_closed(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    config = bridge_config(
        proxy, allow_publish=True, publish_rate_limit=100.0, publish_rate_burst=5.0
    )
    async with running_bridge(config) as server:
        bot = await connect(server, "role=publisher&source=fast-bot")
        started = time.monotonic()
        for n in range(1, 31):
            await bot.send(orjson.dumps({"type": "ai_decision", "data": {}, "id": n}).decode())
        acks = [await recv(bot) for _ in range(30)]
        elapsed = time.monotonic() - started
        assert acks == [{"type": "ack", "id": n} for n in range(1, 31)]
        assert elapsed >= 0.2  # 25 events beyond the burst at 100/s
        await bot.close()


async def test_max_subscriptions(server: BridgeServer) -> None:
    client = await connect(server)
    await subscribe(client, ["a", "b"])
    error = await request(client, {"op": "subscribe", "topics": ["c", "d"], "id": 9}, "x")
    assert (error["code"], error["id"]) == ("too_many_subscriptions", 9)
    reply = await request(
        client, {"op": "subscribe", "topics": ["c"], "snapshot": False}, "subscribed"
    )
    assert reply["topics"] == ["a", "b", "c"]
    await client.close()


async def test_refused_url_topics_get_an_error_and_the_connection_survives(
    server: BridgeServer,
) -> None:
    client = await connect(server, "topics=a,b,c,d")  # over max_subscriptions=3
    error, _ = await recv_until(client, lambda m: m["type"] == "error")
    assert error["code"] == "too_many_subscriptions"
    pong = await request(client, {"op": "ping", "id": 1}, "pong")
    assert pong["id"] == 1
    await client.close()


async def test_jwt_url_topics_outside_the_token_get_an_error(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, jwt_secret=SECRET)) as server:
        token = make_jwt(exp=int(time.time()) + 60, topics=["market_data"])
        client = await connect(server, f"topics=ai_decision&token={token}")
        error, _ = await recv_until(client, lambda m: m["type"] == "error")
        assert error["code"] == "forbidden"
        await client.close()


async def test_a_publisher_cannot_take_over_a_live_source_or_claim_a_future_epoch(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, allow_publish=True)) as server:
        first = await connect(server, "role=publisher&source=bot-7")
        await expect_refused(server, 409, "role=publisher&source=bot-7")
        future = time.time_ns() + 3600 * 1_000_000_000
        await expect_refused(server, 400, f"role=publisher&source=bot-8&epoch={future}")
        await first.close()
        # once the first connection is gone the source is free again (a reconnecting bot)
        await wait_for(
            lambda: "bot-7" not in server.bridge.admission.publishing_sources, "source released"
        )
        again = await connect(server, "role=publisher&source=bot-7")
        await again.close()


async def test_a_refused_publish_closes_the_connection_so_nothing_overtakes_it(
    proxy: Proxy, publisher: BusPublisher, tmp_path: Path
) -> None:
    await publisher.connected()
    # the bus is reachable for subscribing, but nothing listens where events go out
    config = bridge_config(proxy, allow_publish=True).replace(publish_to=f"ipc://{tmp_path}/absent")
    async with running_bridge(config) as server:
        bridge = server.bridge
        await wait_for(lambda: time.monotonic() > bridge._publish_grace_until, "grace over")
        writer = await connect(server, "role=publisher&source=bot-9")
        await writer.send('{"type": "ai_decision", "data": {"n": 1}, "id": 1}')
        await writer.send('{"type": "ai_decision", "data": {"n": 2}, "id": 2}')
        error, _ = await recv_until(writer, lambda m: m["type"] == "error")
        assert (error["code"], error["id"]) == ("bus_unavailable", 1)
        assert await closed_with(writer) == (1013, "bus unavailable")
        assert bridge.hub.stats.publish_rejected == {"bus_unavailable": 1}, "id 2 was handled"


async def test_bad_requests_get_errors_and_the_connection_survives(server: BridgeServer) -> None:
    client = await connect(server)
    cases = [
        ("{not json", "bad_json"),
        ('{"op": "teleport"}', "unknown_op"),
        ('{"op": "subscribe", "topics": "ai_decision"}', "bad_request"),
        ('{"op": "subscribe", "topics": ["bad topic"]}', "bad_pattern"),
    ]
    for text, code in cases:
        await client.send(text)
        error, _ = await recv_until(client, lambda m: m["type"] == "error")
        assert error["code"] == code, text
        assert error["message"]
    pong = await request(client, {"op": "ping", "id": "still-here"}, "pong")
    assert pong == {"type": "pong", "id": "still-here"}
    # one more than max_errors (4): the connection is abusing, and is closed
    await client.send("[]")
    assert await closed_with(client) == (1008, "too many invalid messages")


async def test_max_connections_total_and_per_address(proxy: Proxy) -> None:
    async with running_bridge(bridge_config(proxy, max_connections_per_ip=2)) as server:
        first = await connect(server)
        second = await connect(server)
        await expect_refused(server, 429)
        await first.close()
        await wait_for(
            lambda: sum(server.bridge.admission.connections.values()) == 1, "a slot to free"
        )
        third = await connect(server)
        for client in (second, third):
            await client.close()
        assert server.bridge.rejected == {"max_connections_per_ip": 1}
    async with running_bridge(bridge_config(proxy, max_connections=2)) as server:
        clients = [await connect(server), await connect(server)]
        await expect_refused(server, 503)
        for client in clients:
            await client.close()
        assert server.bridge.rejected == {"max_connections": 1}


# -- liveness ---------------------------------------------------------------------------
async def test_server_pings_and_closes_a_dead_peer_within_two_intervals(proxy: Proxy) -> None:
    interval = 0.4
    async with running_bridge(bridge_config(proxy, ping_interval=interval)) as server:
        # a raw TCP peer: completes the handshake, then never answers anything
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(5))
        assert head.startswith(b"HTTP/1.1 101")
        started = time.monotonic()
        received = b""
        while chunk := await asyncio.wait_for(reader.read(65536), scaled(5)):
            received += chunk
        elapsed = time.monotonic() - started
        writer.close()
        assert b"\x89\x00" in received, "no ping frame was sent"
        assert elapsed < 2 * interval + scaled(0.3), f"closed after {elapsed:.2f} s"

    # a live client answers the pings and stays connected
    async with running_bridge(bridge_config(proxy, ping_interval=0.2)) as server:
        client = await connect(server)
        await asyncio.sleep(0.7)
        assert await request(client, {"op": "ping", "id": 1}, "pong") == {"type": "pong", "id": 1}
        await client.close()


# -- TLS --------------------------------------------------------------------------------
@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return str(cert), str(key)


async def test_wss_with_certificate_and_key(
    proxy: Proxy, publisher: BusPublisher, certificate: tuple[str, str]
) -> None:
    await publisher.connected()
    cert, key = certificate
    async with running_bridge(bridge_config(proxy, cert=cert, key=key)) as server:
        trust = ssl.create_default_context(cafile=cert)
        client = await websockets.connect(
            ws_url(server, scheme="wss"), ssl=trust, open_timeout=scaled(5)
        )
        assert orjson.loads(await client.recv())["type"] == "connection_established"
        await subscribe(client, ["ai_decision"])
        await publisher.publish("ai_decision", {"action": "BUY"})
        (event,) = await collect_events(client, 1)
        assert event["data"] == {"action": "BUY"}
        await client.close()
        with pytest.raises(ssl.SSLError):
            await websockets.connect(
                ws_url(server, scheme="wss"), ssl=ssl.create_default_context(), open_timeout=5
            )
