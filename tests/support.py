"""Shared test helpers: scaled waits, free ports, waiting on a condition, a raw bus
publisher and a running bridge. tests/conftest.py builds its fixtures from these; test
modules import the plain functions from here.

Every wait is scaled by TRADEBUS_TEST_TIMEOUT_FACTOR (default 1), so a slow machine raises
one number instead of editing many tests (conftest scales pytest-timeout's limits too).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from bridge.app import BridgeServer, start_bridge
from bridge.config import BridgeConfig
from bus.envelope import encode_event
from bus.proxy import Proxy, ProxyConfig

if TYPE_CHECKING:
    from playwright.async_api import Browser

# the helpers take a plain seconds argument and scale it themselves
# ruff: noqa: ASYNC109

TIMEOUT_FACTOR = float(os.environ.get("TRADEBUS_TEST_TIMEOUT_FACTOR", "1"))


def scaled(seconds: float) -> float:
    """A test wait, scaled for the machine."""
    return seconds * TIMEOUT_FACTOR


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for servers that must be told a port
    before they start; anything that can bind port 0 itself should do that instead)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_until(
    condition: Callable[[], object],
    what: str = "the condition",
    timeout: float = 5.0,
    interval: float = 0.005,
) -> float:
    """Poll ``condition`` (from this thread) until it holds; the seconds it took. Fails the
    test after ``scaled(timeout)``. For state another thread or process changes."""
    start = time.monotonic()
    deadline = start + scaled(timeout)
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {scaled(timeout):g} s waiting for {what}")
        time.sleep(interval)  # the poll interval, not a synchronisation
    return time.monotonic() - start


async def wait_for(
    condition: Callable[[], object] | Callable[[], Awaitable[object]],
    what: str = "the condition",
    timeout: float = 5.0,
    interval: float = 0.01,
) -> float:
    """``wait_until`` for a coroutine: the event loop keeps running between polls.
    ``condition`` may be a coroutine function (an HTTP probe, say): each poll awaits it."""
    start = time.monotonic()
    deadline = start + scaled(timeout)

    async def holds() -> bool:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        return bool(result)

    while not await holds():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {scaled(timeout):g} s waiting for {what}")
        await asyncio.sleep(interval)  # the poll interval, not a synchronisation
    return time.monotonic() - start


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


def loopback_proxy_config(**changes: Any) -> ProxyConfig:
    """A proxy's settings with its three sockets on random loopback TCP ports."""
    return ProxyConfig(
        frontend="tcp://127.0.0.1:*",
        backend="tcp://127.0.0.1:*",
        snapshot="tcp://127.0.0.1:*",
        **changes,
    )


def bridge_config(proxy: Proxy, **changes: Any) -> BridgeConfig:
    """A bridge on a free loopback port, reading from and publishing to ``proxy``."""
    return BridgeConfig(
        port=0,
        bus=proxy.backend_endpoint,
        snapshot=proxy.snapshot_endpoint,
        publish_to=proxy.frontend_endpoint,
        **changes,
    )


@contextlib.asynccontextmanager
async def running_bridge(config: BridgeConfig) -> AsyncIterator[BridgeServer]:
    """A started bridge, yielded once its bus subscription is up; closed on exit."""
    server = await start_bridge(config)
    try:
        await wait_for(lambda: server.bridge.ready, "bridge ready")
        yield server
    finally:
        await server.close()


async def answers_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    """Whether a GET of ``url`` answers 200 now (refused or failing: not yet); a condition
    for ``wait_for`` while a server starts."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=scaled(2))
            ) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def bot_output_after_attempts(
    url: str,
    source: str,
    attempts: int,
    *,
    token: str | None = None,
    configure_logging: bool = False,
) -> str:
    """Run the real bot client in a child process against ``url`` until it has tried to
    connect ``attempts`` times (or 10 s passed) and closed; its stdout and stderr. Without
    ``configure_logging`` it logs in structlog's default format, unredacted."""
    token_argument = f"token={token!r}, " if token is not None else ""
    logging_setup = (
        "from monitoring.logging import configure_logging\nconfigure_logging()\n"
        if configure_logging
        else ""
    )
    script = logging_setup + textwrap.dedent(
        f"""
        import time
        from bot_client import Publisher
        publisher = Publisher(
            url={url!r}, {token_argument}source_id={source!r},
            retry_delay=0.05, heartbeat_interval=0,
        )
        publisher.publish("custom_event", {{"n": 1}})
        deadline = time.monotonic() + 10
        while publisher.status()["connect_attempts"] < {attempts} and time.monotonic() < deadline:
            time.sleep(0.02)  # the poll interval of this wait, not a synchronisation
        publisher.close(timeout=0.5)
        """
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(child.communicate(), scaled(30))
    return (out + err).decode()


def run_tradebus(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m tradebus ARGS`` to completion (scaled 30 s at most), output captured as
    text, logging only warnings so stderr holds what the command itself says."""
    return subprocess.run(
        [sys.executable, "-m", "tradebus", *args],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        cwd=cwd,
        env={**os.environ, "TRADEBUS_LOG_LEVEL": "WARNING"},
    )


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def browser_module(timeout: float) -> list[pytest.MarkDecorator]:
    """The ``pytestmark`` of a module of headless-Chromium tests: marked ``browser``, one
    event loop for the module (its Chromium is launched once), skipped without Chromium."""
    return [
        pytest.mark.browser,
        pytest.mark.timeout(timeout),
        pytest.mark.asyncio(loop_scope="module"),
        pytest.mark.skipif(
            shutil.which(CHROMIUM) is None, reason="Debian chromium is not installed at /usr/bin"
        ),
    ]


@contextlib.asynccontextmanager
async def chromium_browser() -> AsyncIterator[Browser]:
    """A launched headless Chromium (closed on exit), for a module-scoped fixture."""
    from playwright.async_api import async_playwright  # only the browser modules pay for it

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()
