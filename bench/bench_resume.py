"""Resume benchmark: 1,000 browsers move to another bridge through HAProxy (issue 13).

``python -m bench.bench_resume`` (also run by ``make bench``) starts ``tradebus proxy``,
two ``tradebus bridge`` processes and Debian's ``haproxy`` with compose/haproxy.cfg (the
stack of tests/test_scale_haproxy.py). 1,000 WebSocket clients connect through HAProxy
while only the first bridge is up, so all are on it; then the second bridge starts, the
first is SIGKILLed, the bot publishes 100 events of the clients' topic, and the clients
reconnect through HAProxy to the second bridge, which never saw those events: each resume
is answered from the proxy's history. Reported: seconds from the reconnects' start to the
last client's resume, how many said recovered:true, that each client got its 100
events exactly once, and how many history requests the second bridge sent the proxy
(resumes asking the same share one). The clients run in this one Python process (about
100,000 frames to parse), so the figure includes their cost too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import websockets

from tests.test_scale_haproxy import HAPROXY, Bot, Stack, ready

MISSED = 100


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.position: tuple[int, int] | None = None
        self.source = ""
        self.received: list[int] = []
        self.resumes: list[tuple[bool, float]] = []
        self.connections = 0

    async def run(self, may_connect: asyncio.Event, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await may_connect.wait()
            with contextlib.suppress(OSError, TimeoutError, websockets.WebSocketException):
                async with websockets.connect(
                    self.url + "?topics=", open_timeout=30, ping_interval=None, max_queue=None
                ) as connection:
                    self.connections += 1
                    request: dict[str, Any] = {"op": "subscribe", "topics": ["trading_decision"]}
                    if self.position is not None:
                        epoch, seq = self.position
                        request["since"] = [
                            {
                                "topic": "trading_decision",
                                "source": self.source,
                                "epoch": epoch,
                                "seq": seq,
                            }
                        ]
                    await connection.send(orjson.dumps(request).decode())
                    async for raw in connection:
                        message = orjson.loads(raw)
                        if "seq" in message:
                            mark = (message["epoch"], message["seq"])
                            if self.position is None or mark > self.position:
                                self.position = mark
                                self.source = message["source"]
                                self.received.append(message["seq"])
                        elif message.get("type") == "snapshot_end":
                            self.resumes.append((message["recovered"], time.monotonic()))
            await asyncio.sleep(0.05)


async def until(condition: Any, what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def metric_values(url: str, names: tuple[str, ...]) -> dict[str, str]:
    """The bridge counters ``names`` (without the tradebus_bridge_ prefix); "n/a" for one a
    bridge does not have (one older than the counter)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    found = dict.fromkeys(names, "n/a")
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        short = name.removeprefix("tradebus_bridge_")
        if short in found:
            found[short] = str(int(float(value)))
    return found


async def measure(clients_wanted: int, directory: Path) -> None:
    stack = Stack(directory)
    bot: Bot | None = None
    stop = asyncio.Event()
    may_connect = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        stack.start_proxy()
        stack.start_bridge(0)
        await ready(f"http://127.0.0.1:{stack.bridge_ports[0]}/ready")
        stack.start_haproxy()
        await ready(f"http://127.0.0.1:{stack.front}/ready")
        bot = Bot(stack.endpoint("in"))
        await until(lambda: bot is not None and bot.publisher.connected, "the bot", 10)
        url = f"ws://127.0.0.1:{stack.front}/ws"
        clients = [Client(url) for _ in range(clients_wanted)]
        may_connect.set()
        for start in range(0, clients_wanted, 100):  # a browser fleet arrives over a moment
            for client in clients[start : start + 100]:
                tasks.append(asyncio.create_task(client.run(may_connect, stop)))
            await asyncio.sleep(0.1)
        await until(lambda: all(c.resumes for c in clients), "every client subscribed", 120)
        bot.publisher.publish("trading_decision", {"n": 0})
        await until(lambda: all(c.received for c in clients), "the first event everywhere", 60)
        stack.start_bridge(1)
        await ready(f"http://127.0.0.1:{stack.bridge_ports[1]}/ready")
        may_connect.clear()  # each client misses MISSED events before it reconnects
        stack.kill("bridge-0")
        killed_at = time.monotonic()
        for n in range(1, MISSED + 1):
            bot.publisher.publish("trading_decision", {"n": n})
        assert bot.publisher.flush(10)
        await asyncio.sleep(0.5)  # the proxy's cache thread drains every few ms
        # HAProxy has marked the dead bridge down by now (fall 2 x fastinter 250 ms)
        reconnect_at = time.monotonic()
        may_connect.set()
        await until(lambda: all(len(c.resumes) >= 2 for c in clients), "every client resumed", 300)
        last = max(c.resumes[-1][1] for c in clients)
        recovered = sum(1 for c in clients if c.resumes[-1][0])
        exact = sum(1 for c in clients if c.received == list(range(1, MISSED + 2)))
        asked = await metric_values(
            f"http://127.0.0.1:{stack.bridge_ports[1]}/metrics",
            ("history_requests_total", "resumes_from_bus_total"),
        )
        print(
            f"{clients_wanted} clients, {MISSED} missed events each, bridge SIGKILLed: "
            f"last resume {last - reconnect_at:.2f} s after the reconnects began "
            f"({last - killed_at:.2f} s after the kill, which includes {MISSED} events "
            f"published and 0.5 s for the proxy to hold them); recovered:true "
            f"{recovered}/{clients_wanted}; every missed event exactly once: "
            f"{exact}/{clients_wanted}; the second bridge sent "
            f"{asked['history_requests_total']} history requests to the proxy, "
            f"{asked['resumes_from_bus_total']} resumes waited for one",
            flush=True,
        )
    finally:
        stop.set()
        may_connect.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if bot is not None:
            bot.close()
        stack.stop_all()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_resume", description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args(argv)
    if HAPROXY is None:
        print("haproxy is not installed (apt-get install haproxy)")
        return 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    try:
        asyncio.run(measure(args.clients, directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
