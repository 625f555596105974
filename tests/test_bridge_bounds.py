"""Bounded work and memory at the bridge: sockets before the upgrade, resumes, maps.

Every case runs against a real bridge on a loopback port with real clients: raw TCP
sockets for half-sent requests, the ``websockets`` library for WebSocket clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.request
from collections.abc import AsyncIterator

import orjson
import pytest

from bridge.app import BridgeServer
from bus.proxy import Proxy
from tests.conftest import scaled
from tests.test_bridge_support import (
    BusPublisher,
    bridge_config,
    connect,
    request,
    running_bridge,
    subscribe,
    wait_for,
)


async def open_socket(server: BridgeServer) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", server.port)), scaled(5))
    return sock


async def read_to_end(sock: socket.socket, within: float) -> bytes:
    """Everything the server sends until it closes the socket (fails after ``within``)."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    deadline = time.monotonic() + scaled(within)
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the server kept the socket open; got {bytes(received)!r}"
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
        except ConnectionResetError:
            return bytes(received)
        except TimeoutError:
            pytest.fail(f"the server kept the socket open; got {bytes(received)!r}")
        if not data:
            return bytes(received)
        received += data


def metrics(server: BridgeServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
    return text


# -- sockets before the upgrade ----------------------------------------------------------
@pytest.fixture
async def edge_server(proxy: Proxy) -> AsyncIterator[BridgeServer]:
    config = bridge_config(
        proxy, handshake_timeout=0.5, keepalive_timeout=0.5, max_handshakes_per_ip=3
    )
    async with running_bridge(config) as running:
        yield running


async def test_a_half_sent_request_is_closed_at_the_handshake_deadline(
    edge_server: BridgeServer,
) -> None:
    silent = await open_socket(edge_server)
    half = await open_socket(edge_server)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(half, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: web")
        for sock in (silent, half):
            assert (await read_to_end(sock, 5)).startswith(b"HTTP/1.1 408 ")
        rejected = edge_server.bridge.rejected
        assert rejected.get("handshake_timeout") == 2
        text = await asyncio.to_thread(metrics, edge_server)
        assert 'tradebus_bridge_connections_rejected_total{reason="handshake_timeout"} 2.0' in text
    finally:
        silent.close()
        half.close()


async def test_an_idle_keep_alive_socket_is_closed(edge_server: BridgeServer) -> None:
    sock = await open_socket(edge_server)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = await read_to_end(sock, 5)
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert b'{"status": "ok"}' in reply
    finally:
        sock.close()


async def test_sockets_before_the_upgrade_are_capped_per_address(
    edge_server: BridgeServer,
) -> None:
    guard = edge_server.bridge.edge
    # WebSockets are counted by the connection limits, not as handshakes
    websockets_open = [await connect(edge_server) for _ in range(3)]
    pending = [await open_socket(edge_server) for _ in range(3)]
    try:
        await wait_for(lambda: guard.handshakes_total == 3, "three handshakes counted")
        refused = await open_socket(edge_server)
        try:
            assert (await read_to_end(refused, 5)).startswith(b"HTTP/1.1 429 ")
        finally:
            refused.close()
        assert edge_server.bridge.rejected.get("handshakes_per_ip") == 1
        pending.pop().close()
        await wait_for(lambda: guard.handshakes_total == 2, "a handshake released")
        websockets_open.append(await connect(edge_server))
        text = await asyncio.to_thread(metrics, edge_server)
        assert 'tradebus_bridge_connections_rejected_total{reason="handshakes_per_ip"} 1.0' in text
        assert "tradebus_bridge_handshakes_open 3.0" in text  # two pending and this scrape
    finally:
        for sock in pending:
            sock.close()
        for client in websockets_open:
            await client.close()


# -- resume and snapshot cost ------------------------------------------------------------
async def test_a_flood_of_the_largest_resumes_does_not_delay_another_clients_ping(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    config = bridge_config(proxy, max_message_bytes=256 * 1024)
    async with running_bridge(config) as server:
        hub = server.bridge.hub
        flooder = await connect(server, max_size=None, close_timeout=0.5)
        await subscribe(flooder, ["trade_execution"])
        # a full history (1,000 events) of which the flooder's positions are all older
        published = 1200
        for number in range(published):
            await publisher.publish("trade_execution", {"n": number})
        await wait_for(
            lambda: hub.stats.events_by_type.get("trade_execution") == published, "history"
        )
        stale = {
            "topic": "trade_execution",
            "source": "bot-1",
            "epoch": publisher.epoch,
            "seq": 10,
        }
        largest = orjson.dumps(
            {
                "op": "subscribe",
                "topics": ["trade_execution"],
                "since": [stale] * server.bridge.config.max_resume_positions,
            }
        ).decode()
        assert len(largest) <= config.max_message_bytes
        victim = await connect(server)
        await request(victim, {"op": "subscribe", "topics": ["nothing_here"]}, "subscribed")

        async def flood() -> None:
            for _ in range(40):
                await flooder.send(largest)

        flooding = asyncio.create_task(flood())
        try:
            await wait_for(lambda: hub.stats.resumes >= 1, "the flood to start")
            round_trips: list[float] = []
            for number in range(40):
                started = time.perf_counter()
                reply = await request(victim, {"op": "ping", "id": number}, "pong")
                round_trips.append(time.perf_counter() - started)
                assert reply["id"] == number
            resumes_served = hub.stats.resumes
        finally:
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flooding
        round_trips.sort()
        # 50 ms per round trip; a loaded 2-core machine may stall any one of them for a
        # few hundred ms, so the 95th percentile is held to it and the worst to 1 s (the
        # bridge before this bound: 13 s and 22 s for the first two)
        assert round_trips[int(len(round_trips) * 0.95)] < scaled(0.05), round_trips
        assert round_trips[-1] < scaled(1.0), round_trips
        # charged in proportion to their work, the flood's requests wait their turn
        assert resumes_served < 40
        await victim.close()
        await flooder.close()


async def test_a_refused_upgrade_still_counts_as_a_handshake(proxy: Proxy) -> None:
    # a socket whose upgrade is refused goes on as plain HTTP: it must not escape the cap
    config = bridge_config(proxy, keepalive_timeout=10.0, max_handshakes_per_ip=2)
    async with running_bridge(config) as server:
        loop = asyncio.get_running_loop()
        refused_upgrades = [await open_socket(server) for _ in range(2)]
        try:
            for sock in refused_upgrades:
                await loop.sock_sendall(
                    sock,
                    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\nOrigin: http://elsewhere.example\r\n\r\n",
                )
                reply = await asyncio.wait_for(loop.sock_recv(sock, 65536), scaled(5))
                assert reply.startswith(b"HTTP/1.1 403 "), reply
            assert server.bridge.edge.handshakes_total == 2
            third = await open_socket(server)
            try:
                assert (await read_to_end(third, 5)).startswith(b"HTTP/1.1 429 ")
            finally:
                third.close()
        finally:
            for sock in refused_upgrades:
                sock.close()
