"""tradebus.js in Chromium resumes through repeated connection cuts under load and loses
nothing: every event of its topics arrives exactly once, in order (issue 13).

Real proxy, real bridge (in process, so its history outlives the cuts), the real
bridge/static/tradebus.js on a page the bridge serves; the bridge cuts every connection
(close 1001) several times while a bot publishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import zmq
from aiohttp import web
from playwright.async_api import Browser

from bridge.app import CLOSE_GOING_AWAY
from bridge.config import BridgeConfig
from bus.proxy import Proxy
from tests.conftest import scaled
from tests.support import browser_module, chromium_browser
from tests.test_browser import Bridge, BusPublisher

pytestmark = browser_module(timeout=90)

SUBSCRIBED = ("trading_decision", "ai_decision")
# the client keeps its backoff short and resets it at once: the cuts come every ~second
PAGE = """<!doctype html><link rel="icon" href="data:,"><script type="module">
import { TradebusClient } from "/static/tradebus.js";
const client = new TradebusClient({ minDelayMs: 50, jitterMs: 50, stableAfterMs: 100 });
window.got = [];
window.last = {};
window.resumes = [];
client.subscribe(["trading_decision", "ai_decision"], (event, info) => {
  window.got.push([event.topic, Number(info.seq)]);
  window.last[event.topic] = Number(info.seq);
});
client.onSnapshot((s) => window.resumes.push(s));
client.connect();
window.client = client;
</script>"""

CUTS = 6
RATE = 600  # events per second, a third of them of a topic the page does not want


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def chromium() -> AsyncIterator[Browser]:
    async with chromium_browser() as launched:
        yield launched


@pytest.mark.parametrize("how", ["cut", "restart"])
async def test_resumes_through_repeated_cuts_under_load_lose_nothing(
    proxy: Proxy, zmq_context: zmq.Context[zmq.Socket[bytes]], chromium: Browser, how: str
) -> None:
    """``cut``: the bridge closes every connection; ``restart``: the bridge stops and a new
    one starts on the same port, without history, so the proxy's answers each resume."""

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    config = BridgeConfig(
        host="127.0.0.1",
        port=0,
        bus=proxy.backend_endpoint,
        snapshot=proxy.snapshot_endpoint,
        history_events=10_000,
    )
    bridge = Bridge(config, [web.get("/resume.html", page)])
    await bridge.start()
    publisher = BusPublisher(zmq_context, proxy.frontend_endpoint, "bot-1")
    context = await chromium.new_context()
    try:
        tab = await context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda error: errors.append(str(error)))
        await tab.goto(f"{bridge.url}/resume.html")
        await tab.wait_for_function(
            "window.resumes.length >= 1", timeout=scaled(10) * 1000, polling=50
        )
        published = {topic: 0 for topic in SUBSCRIBED}
        stop = asyncio.Event()

        async def publish() -> None:
            n = 0
            while not stop.is_set():
                for _ in range(RATE // 100):
                    n += 1
                    topic = ("trading_decision", "ai_decision", "market_data")[n % 3]
                    if topic == "market_data":
                        publisher.publish(topic, {"symbol": "BTC-USD", "n": n}, "BTC-USD")
                    else:
                        published[topic] = publisher.publish(topic, {"n": n})
                await asyncio.sleep(0.01)  # RATE events a second (pacing, not a sync)

        load = asyncio.create_task(publish())
        try:
            for cut in range(CUTS):
                # wait for the previous resume to be in force, under load, then cut again
                await tab.wait_for_function(
                    f"window.resumes.length >= {cut + 1}", timeout=scaled(10) * 1000, polling=20
                )
                await asyncio.sleep(0.3)  # load flows between cuts (pacing, not a sync)
                if how == "restart":
                    await bridge.stop()
                    await bridge.start()  # same port, empty history
                    continue
                assert bridge.server is not None
                for client in list(bridge.server.bridge.hub.clients):
                    bridge.server.bridge.close_client(client, CLOSE_GOING_AWAY, "test cut")
            await tab.wait_for_function(
                f"window.resumes.length >= {CUTS + 1}", timeout=scaled(10) * 1000, polling=20
            )
        finally:
            stop.set()
            await load
        expected = sum(published.values())
        # the last event of each topic arrived: whatever was lost on the way shows below
        await tab.wait_for_function(
            "(want) => Object.entries(want).every(([t, s]) => window.last[t] >= s)",
            arg=published,
            timeout=scaled(10) * 1000,
            polling=50,
        )
        got = await tab.evaluate("window.got")
        stats = await tab.evaluate("window.client.stats")
        resumes = await tab.evaluate("window.resumes")
        for topic in SUBSCRIBED:
            seqs = [seq for name, seq in got if name == topic]
            missing = sorted(set(range(1, published[topic] + 1)) - set(seqs))
            assert not missing, (topic, len(missing), missing[:10], stats)
            assert seqs == list(range(1, published[topic] + 1)), (topic, stats)
        assert len(got) == expected
        assert [r["mode"] for r in resumes] == ["snapshot"] + ["resume"] * CUTS
        assert all(r["recovered"] for r in resumes), resumes
        assert (stats["gaps"], stats["unrecovered"]) == (0, 0)
        assert errors == []
    finally:
        await context.close()
        publisher.close()
        await bridge.stop()
