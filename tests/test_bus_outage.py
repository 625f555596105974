"""A proxy outage, short or long, ends for publishers and bridges as soon as the proxy is
back; a short one is visible on the bridge's /ready (issue 13). Real proxies restarted on
the same ipc endpoints, a real Publisher, a real bridge."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from bot_client import Publisher
from bridge.config import BridgeConfig
from bus.proxy import Proxy, ProxyConfig
from tests.support import wait_until
from tests.test_bridge_support import running_bridge, wait_for

pytestmark = pytest.mark.timeout(60)


def proxy_at(tmp_path: Path) -> Proxy:
    """A proxy on fixed ipc endpoints in ``tmp_path``: a restart binds the same ones. Own
    ZeroMQ context (a proxy answers its context's ZAP requests)."""
    proxy = Proxy(
        ProxyConfig(
            frontend=f"ipc://{tmp_path}/in.sock",
            backend=f"ipc://{tmp_path}/out.sock",
            snapshot=f"ipc://{tmp_path}/snap.sock",
            heartbeat_ms=500,
        )
    )
    proxy.start()
    return proxy


def test_publisher_is_back_within_a_second_of_the_proxys_return(tmp_path: Path) -> None:
    """A 4 s outage grows libzmq's backoff from RETRY_DELAY (1 s: 1, 2, 4, 8 s); it must not
    keep the bot off the bus once the proxy is back."""
    proxy = proxy_at(tmp_path)
    publisher = Publisher(
        url=f"ipc://{tmp_path}/in.sock",
        source_id="outage",
        retry_delay=1.0,
        max_retries=3,
        heartbeat_interval=0,
    )
    try:
        wait_until(lambda: publisher.connected, "the first connection")
        proxy.stop()
        wait_until(lambda: not publisher.connected, "the publisher to see the outage")
        time.sleep(4.0)  # the outage's length is what is tested, not a synchronisation
        proxy = proxy_at(tmp_path)
        took = wait_until(lambda: publisher.connected, "the reconnection", timeout=15.0)
        assert took < 1.0, f"back on the bus {took:.2f} s after the proxy's return"
    finally:
        publisher.close(timeout=1)
        proxy.stop()


async def test_ready_reports_a_short_proxy_outage(tmp_path: Path) -> None:
    proxy = proxy_at(tmp_path)
    config = BridgeConfig(
        port=0,
        bus=proxy.backend_endpoint,
        snapshot=proxy.snapshot_endpoint,
        track_sources=False,
    )
    try:
        async with running_bridge(config) as server, aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{server.port}/ready"

            async def status() -> int:
                async with http.get(url) as response:
                    return response.status

            assert await status() == 200
            proxy.stop()
            # a 1 s outage: the probes (every 5 s, 2 s to answer) alone would not see it
            deadline = time.monotonic() + 1.0
            seen: set[int] = set()
            while time.monotonic() < deadline:
                seen.add(await status())
                await asyncio.sleep(0.05)  # samples the fixed 1 s window (not a sync)
            proxy = proxy_at(tmp_path)
            assert 503 in seen, "/ready never reported the outage"
            await wait_for(lambda: server.bridge.ready, "ready again after the outage")
            assert await status() == 200
    finally:
        proxy.stop()
