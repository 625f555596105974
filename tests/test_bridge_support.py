"""Helpers for the bridge tests: WebSocket clients of a real bridge.

Imported by the tests/test_bridge_*.py modules. It holds no tests itself. The bus
publisher, the bridge and the waits come from tests/support.py (and are re-exported here
for the modules that import them from this one); tests/conftest.py has them as fixtures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from bridge.app import BridgeServer
from tests.support import BusPublisher as BusPublisher
from tests.support import bridge_config as bridge_config
from tests.support import running_bridge as running_bridge
from tests.support import scaled
from tests.support import wait_for as wait_for

# the helpers take a plain seconds argument, scaled here, like the tests' own waits
# ruff: noqa: ASYNC109

Message = dict[str, Any]


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
