"""Shared helpers for the bridge tests: a real bus publisher, a real bridge, WS clients.

Imported by the tests/test_bridge_*.py modules (kept in a test module of the bridge's own,
as tests/conftest.py belongs to the foundation). It holds no tests itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import websockets
import zmq
import zmq.asyncio
from websockets.asyncio.client import ClientConnection

from bridge.app import BridgeServer, start_bridge
from bridge.config import BridgeConfig
from bus.envelope import encode_event
from bus.proxy import Proxy
from tests.conftest import scaled

# the helpers take a plain seconds argument, scaled here, like the tests' own waits
# ruff: noqa: ASYNC109

Message = dict[str, Any]


class BusPublisher:
    """A publisher on the real bus (XPUB, so it knows when the proxy is listening)."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, source: str):
        self.context = zmq.asyncio.Context.shadow(context.underlying)
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.linger = 0
        self.socket.sndhwm = 1_000_000
        self.socket.connect(endpoint)
        self.source = source
        self.epoch = time.time_ns()
        self.seqs: dict[str, itertools.count[int]] = {}

    async def connected(self) -> None:
        """Wait for the proxy's subscribe-all: events sent before it would be dropped."""
        message = await asyncio.wait_for(self.socket.recv(), scaled(5))
        assert message[:1] == b"\x01"

    async def publish(
        self, topic: str, data: dict[str, Any] | None = None, *, seq: int | None = None
    ) -> list[bytes]:
        counter = self.seqs.setdefault(topic, itertools.count(1))
        number = next(counter) if seq is None else seq
        frames = encode_event(
            topic, topic.partition(".")[0], data or {}, self.source, self.epoch, number
        )
        await self.socket.send_multipart(frames)
        return frames

    def close(self) -> None:
        self.socket.close(linger=0)


def bridge_config(proxy: Proxy, **changes: Any) -> BridgeConfig:
    return BridgeConfig(
        port=0,
        bus=proxy.backend_endpoint,
        snapshot=proxy.snapshot_endpoint,
        publish_to=proxy.frontend_endpoint,
        **changes,
    )


@contextlib.asynccontextmanager
async def running_bridge(config: BridgeConfig) -> AsyncIterator[BridgeServer]:
    server = await start_bridge(config)
    try:
        await wait_for(lambda: server.bridge.ready, "bridge ready")
        yield server
    finally:
        await server.close()


async def wait_for(condition: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def ws_url(server: BridgeServer, query: str = "", scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{server.port}/ws" + (f"?{query}" if query else "")


async def connect(server: BridgeServer, query: str = "", **kwargs: Any) -> ClientConnection:
    """A client built with the independent ``websockets`` library; greeting consumed."""
    client = await websockets.connect(ws_url(server, query), open_timeout=scaled(5), **kwargs)
    greeting = await recv(client)
    assert greeting["type"] == "connection_established"
    return client


async def recv(client: ClientConnection, timeout: float = 5.0) -> Message:
    message: Message = orjson.loads(await asyncio.wait_for(client.recv(), scaled(timeout)))
    return message


async def recv_until(
    client: ClientConnection, predicate: Callable[[Message], bool], timeout: float = 5.0
) -> tuple[Message, list[Message]]:
    """Messages up to and including the first matching one (returned separately)."""
    before: list[Message] = []
    deadline = time.monotonic() + scaled(timeout)
    while True:
        message = await recv(client, max(0.01, deadline - time.monotonic()))
        if predicate(message):
            return message, before
        before.append(message)


async def request(client: ClientConnection, message: Message, reply_type: str) -> Message:
    """Send a request and return the reply of ``reply_type`` (source_status etc. skipped)."""
    await client.send(orjson.dumps(message).decode())
    reply, _ = await recv_until(client, lambda m: m["type"] in (reply_type, "error"))
    return reply


async def subscribe(
    client: ClientConnection, topics: list[str], **extra: Any
) -> tuple[Message, list[Message]]:
    """Subscribe with a snapshot; returns the ``subscribed`` reply and the snapshot events.

    The snapshot's end also proves the bridge's bus subscription is in force.
    """
    await client.send(orjson.dumps({"op": "subscribe", "topics": topics, **extra}).decode())
    reply, _ = await recv_until(client, lambda m: m["type"] in ("subscribed", "error"))
    assert reply["type"] == "subscribed", reply
    begin, _ = await recv_until(client, lambda m: m["type"] == "snapshot_begin")
    end, events = await recv_until(client, lambda m: m["type"] == "snapshot_end")
    assert end["count"] == len(events)
    return begin | {"end": end, "reply": reply}, events


def events_only(messages: list[Message]) -> list[Message]:
    return [m for m in messages if "seq" in m and "topic" in m]


async def collect_events(
    client: ClientConnection, count: int, timeout: float = 5.0
) -> list[Message]:
    """The next ``count`` events (control messages skipped)."""
    found: list[Message] = []
    deadline = time.monotonic() + scaled(timeout)
    while len(found) < count:
        message = await recv(client, max(0.01, deadline - time.monotonic()))
        if "seq" in message and "topic" in message:
            found.append(message)
    return found


async def assert_silent(client: ClientConnection, seconds: float = 0.3) -> None:
    """No event arrives within ``seconds`` (control messages are ignored)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = orjson.loads(await asyncio.wait_for(client.recv(), left))
        except TimeoutError:
            return
        assert "seq" not in message, f"unexpected event {message}"


async def sync_everything(server: BridgeServer) -> None:
    """Make sure the bridge's bus subscription to every topic is in force.

    A client that never subscribes gets everything, but nothing tells it when the bus
    subscription took effect; a snapshot subscribe to ``*`` does (and is then closed).
    """
    sentinel = await connect(server)
    try:
        await subscribe(sentinel, ["*"])
    finally:
        await sentinel.close()
