"""Several bridges behind a real HAProxy, killed and restarted under load (issue 13).

The real thing without Docker: ``tradebus proxy`` and two ``tradebus bridge`` processes,
Debian's ``haproxy`` running compose/haproxy.cfg with its addresses replaced, a bot
publishing 1,000 events/s, and 50 WebSocket clients with varied patterns that reconnect
through HAProxy and resume from their last positions as tradebus.js does (``?topics=``,
then a subscribe with ``since``). Each process is SIGKILLed, never asked to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from bot_client import Publisher
from bus.topics import Pattern
from tests.conftest import scaled
from tests.support import answers_ok, free_port, wait_for

HAPROXY = shutil.which("haproxy")
SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "compose" / "haproxy.cfg"

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(HAPROXY is None, reason="Debian haproxy is not installed (.ci/run does)"),
]

SYMBOLS = [f"S{n}" for n in range(8)]
TOPICS = [f"trade_execution.{s}" for s in SYMBOLS] + ["ai_decision", "trading_decision"]
RATE = 1000  # events per second, spread over TOPICS
CLIENTS = 50


def pattern_sets() -> Iterator[tuple[str, ...]]:
    n = 0
    while True:
        symbol = SYMBOLS[n % len(SYMBOLS)]
        yield (
            ("ai_decision",),
            (f"trade_execution.{symbol}",),
            (f"*.{symbol}", "trading_decision"),
            ("trade_execution",),
            ("ai_decision", "trading_decision", f"trade_execution.{symbol}"),
            ("*",),
        )[n % 6]
        n += 1


def haproxy_config(front: int, bridges: list[int]) -> str:
    """compose/haproxy.cfg with this test's addresses: the shipped file is what runs."""
    text = SHIPPED_CONFIG.read_text()
    text = text.replace("bind 0.0.0.0:8000", f"bind 127.0.0.1:{front}")
    servers = iter(bridges)
    text = re.sub(
        r"server (bridge-\d) \S+ check",
        lambda match: f"server {match.group(1)} 127.0.0.1:{next(servers)} check",
        text,
    )
    assert f"127.0.0.1:{bridges[-1]}" in text
    return text


class Stack:
    """The processes of the test: proxy, bridges, HAProxy; each can be SIGKILLed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.front = free_port()
        self.bridge_ports = [free_port(), free_port()]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.directory}/{name}"

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 (kept by the child)
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def start_proxy(self) -> None:
        self._start(
            "proxy",
            [
                *tradebus(),
                "proxy",
                f"--frontend={self.endpoint('in')}",
                f"--backend={self.endpoint('out')}",
                f"--snapshot={self.endpoint('snap')}",
            ],
        )

    def start_bridge(self, index: int) -> None:
        self._start(
            f"bridge-{index}",
            [
                *tradebus(),
                "bridge",
                "--host=127.0.0.1",
                f"--port={self.bridge_ports[index]}",
                f"--bus={self.endpoint('out')}",
                f"--snapshot={self.endpoint('snap')}",
                f"--publish-to={self.endpoint('in')}",
                f"--server-names=tradebus,127.0.0.1:{self.front}",
            ],
        )

    def start_haproxy(self) -> None:
        config = self.directory / "haproxy.cfg"
        config.write_text(haproxy_config(self.front, self.bridge_ports))
        assert HAPROXY is not None
        self._start("haproxy", [HAPROXY, "-db", "-f", str(config)])

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.kill(name)

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")[-3000:]


def tradebus() -> list[str]:
    return [sys.executable, "-m", "tradebus"]


async def ready(url: str, within: float = 15.0) -> None:
    headers = {"Host": "tradebus"}
    await wait_for(lambda: answers_ok(url, headers), f"{url} to answer 200", within, 0.1)


async def client_count(port: int) -> int:
    """WebSocket clients of the bridge on ``port`` (its /ready says)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/ready") as response,
    ):
        body = await response.json()
    return int(body["clients"])


@dataclass
class ResumingClient:
    """A WebSocket client that reconnects through the load balancer and resumes."""

    url: str
    patterns: tuple[str, ...]
    positions: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    received: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    gaps: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    resumes: list[tuple[str, bool, float]] = field(default_factory=list)  # mode, recovered, at
    duplicates: int = 0
    connections: int = 0

    def wants(self, topic: str) -> bool:
        return any(Pattern(p).matches(topic) for p in self.patterns)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, TimeoutError, websockets.WebSocketException):
                async with websockets.connect(
                    self.url + "?topics=", open_timeout=scaled(5), ping_interval=None
                ) as connection:
                    self.connections += 1
                    await connection.send(self._subscribe())
                    async for raw in connection:
                        self._on(orjson.loads(raw))
            await asyncio.sleep(0.05)  # the client's reconnect delay, not a synchronisation

    def _subscribe(self) -> str:
        request: dict[str, Any] = {"op": "subscribe", "topics": list(self.patterns)}
        if self.positions:
            request["since"] = [
                {"topic": topic, "source": source, "epoch": epoch, "seq": seq}
                for (topic, source), (epoch, seq) in self.positions.items()
            ]
        return orjson.dumps(request).decode()  # a text frame: the bridge refuses binary

    def _on(self, message: dict[str, Any]) -> None:
        if "seq" in message and "topic" in message:
            key = (message["topic"], message["source"])
            mark = (message["epoch"], message["seq"])
            if key in self.positions and mark <= self.positions[key]:
                self.duplicates += 1
                return
            self.positions[key] = mark
            self.received[message["topic"]].append(message["seq"])
        elif message.get("type") == "snapshot_end":
            self.resumes.append((message["mode"], message["recovered"], time.monotonic()))
        elif message.get("type") == "gap":
            self.gaps[message["topic"]] += message["missed"]

    def caught_up(self, last: dict[str, int]) -> bool:
        return all(
            self.received[topic][-1:] == [seq]
            or len(self.received[topic]) + self.gaps[topic] >= seq
            for topic, seq in last.items()
            if seq and self.wants(topic)
        )


class Bot:
    """A bot_client.Publisher at RATE events/s in a thread, cycling over ``topics``; counts
    what it published."""

    def __init__(
        self,
        url: str,
        topics: tuple[str, ...] = tuple(TOPICS),
        source_id: str = "bot-1",
        **settings: Any,
    ) -> None:
        self.publisher = Publisher(
            url=url,
            source_id=source_id,
            publish_interval=0,
            queue_size=50_000,
            heartbeat_interval=0,
            **settings,
        )
        self.topics = topics
        self.published: dict[str, int] = dict.fromkeys(topics, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.count = 0

    def publish_next(self) -> None:
        topic = self.topics[self.count % len(self.topics)]
        kind, _, symbol = topic.partition(".")
        data: dict[str, Any] = {"n": self.count}
        if symbol:
            data["symbol"] = symbol
        self.publisher.publish(kind, data)
        self.published[topic] += 1
        self.count += 1

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        start, first = time.monotonic(), self.count
        while not self._stop.is_set():
            for _ in range(RATE // 100):
                self.publish_next()
            ahead = (self.count - first) / RATE - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)  # holds the bot to RATE (pacing, not a synchronisation)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        return dict(self.published)

    def close(self) -> None:
        self.publisher.close(timeout=2)


@pytest.fixture
def stack() -> Iterator[Stack]:
    # ipc paths must stay under ~100 bytes: pytest's tmp_path can be longer
    directory = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    running = Stack(directory)
    try:
        yield running
    finally:
        running.stop_all()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def clients_through(
    stack: Stack,
) -> AsyncIterator[tuple[list[ResumingClient], asyncio.Event]]:
    stop = asyncio.Event()
    patterns = pattern_sets()
    url = f"ws://127.0.0.1:{stack.front}/ws"
    clients = [ResumingClient(url, next(patterns)) for _ in range(CLIENTS)]
    tasks = [asyncio.create_task(client.run(stop)) for client in clients]
    try:
        await wait_for(
            lambda: all(client.resumes for client in clients), "every client subscribed", 20
        )
        yield clients, stop
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def start_stack(stack: Stack) -> None:
    stack.start_proxy()
    for index in range(2):
        stack.start_bridge(index)
    for port in stack.bridge_ports:
        await ready(f"http://127.0.0.1:{port}/ready")
    stack.start_haproxy()
    await ready(f"http://127.0.0.1:{stack.front}/ready")


async def test_a_killed_bridge_is_a_non_event_for_browsers(stack: Stack) -> None:
    await start_stack(stack)
    bot = Bot(stack.endpoint("in"))
    try:
        await wait_for(lambda: bot.publisher.connected, "the bot on the bus", 10)
        async with clients_through(stack) as (clients, _stop):
            bot.start()
            await asyncio.sleep(1.5)  # traffic before the kill (load, not a sync)
            on_killed = await client_count(stack.bridge_ports[0])
            killed_at = time.monotonic()
            stack.kill("bridge-0")

            def resumed() -> list[float]:
                return [
                    max(at for _m, _r, at in c.resumes)
                    for c in clients
                    if c.resumes[-1][2] > killed_at
                ]

            await wait_for(
                lambda: len(resumed()) >= on_killed, "every client of the killed bridge", 30
            )
            reconnected = [c for c in clients if c.connections > 1]
            took = max(resumed()) - killed_at
            print(f"\nkill -> last of {len(reconnected)} clients resumed: {took:.2f} s")
            await asyncio.sleep(1.0)  # traffic after the resumes
            published = bot.stop()
            await wait_for(
                lambda: all(c.caught_up(published) for c in clients), "the last events", 30
            )
        assert on_killed > 0, "nobody was on the killed bridge"
        assert len(reconnected) == on_killed
        assert bot.publisher.status()["dropped_total"] == 0
        for index, client in enumerate(clients):
            for topic, total in published.items():
                expected = list(range(1, total + 1)) if client.wants(topic) else []
                assert client.received[topic] == expected, (index, client.patterns, topic)
            assert [r for m, r, _at in client.resumes if m == "resume" and not r] == [], index
            assert client.duplicates == 0
    finally:
        bot.stop()
        bot.close()
        for name in ("bridge-1", "proxy"):
            if name in stack.processes and stack.processes[name].poll() is not None:
                print(stack.log(name))


async def test_a_killed_proxy_restarted_loses_only_what_clients_are_told(stack: Stack) -> None:
    await start_stack(stack)
    bot = Bot(stack.endpoint("in"))
    try:
        await wait_for(lambda: bot.publisher.connected, "the bot on the bus", 10)
        async with clients_through(stack) as (clients, _stop):
            bot.start()
            await asyncio.sleep(1.0)  # traffic before the kill (load, not a sync)
            stack.kill("proxy")
            await wait_for(lambda: not bot.publisher.connected, "the bot to see the outage", 10)
            await asyncio.sleep(0.5)  # the outage (its length is the scenario)
            stack.start_proxy()
            await wait_for(lambda: bot.publisher.connected, "the bot back on the bus", 10)
            await asyncio.sleep(1.0)  # traffic after the outage (load, not a sync)
            published = bot.stop()
            await wait_for(
                lambda: all(c.caught_up(published) for c in clients), "the last events", 30
            )
        status = bot.publisher.status()
        dropped = status["dropped"]
        lost_somewhere = 0
        for index, client in enumerate(clients):
            for topic, total in published.items():
                if not client.wants(topic):
                    continue
                seqs = client.received[topic]
                assert seqs == sorted(set(seqs)), (index, topic)
                # every event received, or reported lost to this client
                missing = total - len(seqs)
                lost_somewhere += missing
                unrecovered = [r for m, r, _at in client.resumes if m == "resume" and not r]
                assert missing == client.gaps[topic] or unrecovered, (index, topic, missing)
                # and nothing lost that the bot did not count as dropped: what died inside
                # the killed proxy was sent again (docs/publisher.md)
                assert missing <= dropped.get(topic.partition(".")[0], 0), (index, topic, missing)
        print(
            f"\nproxy restart: bot dropped {status['dropped_total']}, resent {status['resent']},"
            f" events missing over all clients {lost_somewhere} (each reported as a gap),"
            f" duplicates at clients {sum(c.duplicates for c in clients)}"
        )
    finally:
        bot.stop()
        bot.close()
        if os.environ.get("TRADEBUS_TEST_SHOW_LOGS"):
            for name in stack.processes:
                print(stack.log(name))
