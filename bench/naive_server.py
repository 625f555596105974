"""The naive broadcast server the bridge is measured against (the original system's design).

One ``/ws`` handler keeps a list of connections; a task reads the bus SUB socket and, for
every event, awaits ``send_str`` to every connection in turn. Like the original it has no
topic routing, no per-client queue and no slow-client policy. It is fed by the same bus
and measured by the same load generator as the bridge, in the same bench run.

``python -m bench.naive_server --host 127.0.0.1 --port P --bus tcp://127.0.0.1:5556``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import zmq
import zmq.asyncio
from aiohttp import WSMsgType, web


class NaiveBroadcaster:
    def __init__(self, bus: str) -> None:
        self.bus = bus
        self.connections: list[web.WebSocketResponse] = []
        self.failed_sends = 0

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections.append(ws)
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT and message.data == '{"type":"ping"}':
                    await ws.send_str('{"type":"pong"}')
        finally:
            self.connections.remove(ws)
        return ws

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def pump(self) -> None:
        context = zmq.asyncio.Context()
        socket = context.socket(zmq.SUB)
        socket.rcvhwm = 100_000
        socket.connect(self.bus)
        socket.subscribe(b"")
        try:
            while True:
                _topic, _meta, payload = await socket.recv_multipart()
                text = payload.decode()
                for ws in list(self.connections):
                    try:
                        await ws.send_str(text)
                    except ConnectionError:
                        self.failed_sends += 1
        finally:
            socket.close(linger=0)
            context.term()


async def serve(host: str, port: int, bus: str) -> None:
    broadcaster = NaiveBroadcaster(bus)
    app = web.Application()
    app.router.add_get("/ws", broadcaster.websocket)
    app.router.add_get("/health", broadcaster.health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # a deep accept backlog so that thousands of connections opened at once are not refused
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    try:
        await broadcaster.pump()
    finally:
        await runner.cleanup()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bus", required=True, help="the proxy's XPUB endpoint")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args(argv)
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if args.uvloop:
        import uvloop

        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port, args.bus))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
