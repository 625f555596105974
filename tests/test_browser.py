"""The dashboard and tradebus.js in headless Chromium against a real bus and a real bridge.

Chain under test: publisher -> proxy (``proxy`` fixture) -> bridge (bridge.app.create_app on
a random port) -> Chromium (Debian's /usr/bin/chromium through Playwright; never a
downloaded browser). What the page receives is checked on the wire through Playwright's
WebSocket frame events, not only in the DOM.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import zmq
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, BrowserContext, Page, WebSocket

from bot_client import Publisher
from bridge.app import BridgeServer, create_app
from bridge.config import BridgeConfig
from bus.envelope import encode_event
from bus.proxy import Proxy
from tests.conftest import scaled
from tests.support import answers_ok, browser_module, chromium_browser, wait_for

DOCS = Path(__file__).resolve().parent.parent / "docs" / "dashboard.md"

pytestmark = browser_module(timeout=60)


# ----------------------------------------------------------------------------- helpers


class BusPublisher:
    """Publishes bus envelopes like a bot: XPUB connected to the proxy's XSUB."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, source: str):
        self.source = source
        self.epoch = time.time_ns()  # beyond 2^53: the page must echo it digit for digit
        self.seqs: dict[str, int] = {}
        self.socket = context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        # The proxy subscribes every publisher to everything; before that, sends are dropped.
        if not self.socket.poll(int(scaled(5) * 1000)):
            raise TimeoutError("the proxy never subscribed to the test publisher")
        self.socket.recv()

    def publish(self, type_name: str, data: dict[str, Any], key: str | None = None) -> int:
        topic = type_name if key is None else f"{type_name}.{key}"
        seq = self.seqs.get(topic, 0) + 1
        self.seqs[topic] = seq
        self.socket.send_multipart(
            encode_event(topic, type_name, data, self.source, self.epoch, seq)
        )
        return seq

    def close(self) -> None:
        self.socket.close(linger=0)


class Bridge:
    """A real bridge application on a loopback port that can be stopped and started again."""

    def __init__(self, config: BridgeConfig, extra_routes: list[web.RouteDef] | None = None):
        self.config = config
        self.extra_routes = extra_routes or []
        self.port = 0
        self.reuse_port = False  # to take over a port a test holds (see the backoff test)
        self.server: BridgeServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = create_app(self.config)
        app.router.add_routes(self.extra_routes)
        runner = web.AppRunner(app, shutdown_timeout=self.config.close_timeout)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_port=self.reuse_port or None)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()  # a bridge that never listened still holds its bus sockets
            raise
        self.port = runner.addresses[0][1]
        self.server = BridgeServer(runner, app, self.port)
        await self.wait_ready()

    async def wait_ready(self) -> None:
        await wait_for(lambda: answers_ok(f"{self.url}/ready"), "the bridge ready", 10, 0.05)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None


class Wire:
    """Every WebSocket frame the page sent and received, with waits on conditions."""

    def __init__(self, page: Page) -> None:
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.urls: list[str] = []
        self._changed = asyncio.Event()
        page.on("websocket", self._attach)

    def _attach(self, ws: WebSocket) -> None:
        self.urls.append(ws.url)
        ws.on("framereceived", lambda payload: self._record(self.received, payload))
        ws.on("framesent", lambda payload: self._record(self.sent, payload))

    def _record(self, into: list[dict[str, Any]], payload: str | bytes) -> None:
        into.append(json.loads(payload))
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], what: str, within: float = 5.0) -> None:
        deadline = time.monotonic() + scaled(within)
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue

    def events(self, start: int = 0) -> list[dict[str, Any]]:
        return [m for m in self.received[start:] if "topic" in m and "data" in m]

    def controls(self, type_name: str, start: int = 0) -> list[dict[str, Any]]:
        return [m for m in self.received[start:] if m.get("type") == type_name and "topic" not in m]


@pytest.fixture
def bridge_config(proxy: Proxy) -> BridgeConfig:
    return BridgeConfig(
        host="127.0.0.1",
        port=0,
        bus=proxy.backend_endpoint,
        snapshot=proxy.snapshot_endpoint,
        publish_to=proxy.frontend_endpoint,
    )


@pytest_asyncio.fixture(loop_scope="module")
async def bridge(bridge_config: BridgeConfig) -> AsyncIterator[Bridge]:
    running = Bridge(bridge_config)
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
def publisher(proxy: Proxy, zmq_context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[BusPublisher]:
    bot = BusPublisher(zmq_context, proxy.frontend_endpoint, "bot-1")
    yield bot
    bot.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def chromium() -> AsyncIterator[Browser]:
    """One Chromium for the module (a launch costs about a second); tests get own contexts."""
    async with chromium_browser() as launched:
        yield launched


@pytest_asyncio.fixture(loop_scope="module")
async def browser(chromium: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser context (cookies, storage, pages) closed with the test."""
    context = await chromium.new_context(viewport={"width": 1400, "height": 900})
    yield context
    await context.close()


class Console:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on(
            "console",
            lambda message: (
                self.errors.append(f"console.{message.type}: {message.text}")
                if message.type in ("error", "warning")
                else None
            ),
        )
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))


async def open_dashboard(browser: BrowserContext, url: str) -> tuple[Page, Wire, Console]:
    page = await browser.new_page()
    wire = Wire(page)
    console = Console(page)
    await page.goto(url)
    await wait_connected(page, wire)
    return page, wire, console


async def wait_connected(page: Page, wire: Wire, start: int = 0) -> None:
    """The page is connected and its subscription is in force (the bridge answered it)."""
    await page.wait_for_selector(
        '[data-testid="connection-state"][data-state="open"]', timeout=scaled(10) * 1000
    )
    await wire.wait_for(
        lambda: bool(wire.controls("snapshot_end", start)), "the page's subscribe to be answered"
    )


def decision_data(n: int, action: str = "BUY") -> dict[str, Any]:
    return {
        "request_id": f"req-{n}",
        "action": action,
        "confidence": 0.85,
        "reasoning": f"decision number {n}: multiple indicators show bullish convergence",
        "price": 45000.0 + n,
        "quantity": 0.1,
        "leverage": 5,
        "indicators": {"rsi": 45.2},
        "risk_analysis": {"stop_loss": 44000.0, "take_profit": 46000.0, "risk_reward_ratio": 2.0},
    }


def decision_selector(n: int) -> str:
    return f'[data-testid="decision"][data-request-id="req-{n}"]'


# ------------------------------------------------------------------------------- tests


async def test_page_loads_without_console_errors(bridge: Bridge, browser: BrowserContext) -> None:
    page, wire, console = await open_dashboard(browser, bridge.url + "/")
    assert await page.title() == "tradebus dashboard"
    subscribe = next(m for m in wire.sent if m.get("op") == "subscribe")
    assert sorted(subscribe["topics"]) == sorted(
        [
            "market_data",
            "position_update",
            "ai_decision",
            "trading_decision",
            "system_status",
            "error",
        ]
    )
    assert "connected" in (await page.text_content('[data-testid="connection-state"]') or "")
    # Let a few animation frames and the footer's first tick run before judging the console.
    await page.wait_for_function(
        "document.querySelector('[data-testid=event-rate]') !== null", timeout=2000
    )
    await asyncio.sleep(1.2)  # the footer ticks once a second: let it run once
    assert console.errors == []


@pytest.fixture
def bot(proxy: Proxy, zmq_context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[Publisher]:
    """The real bot client, publishing straight onto the bus."""
    publisher = Publisher(
        url=proxy.frontend_endpoint, source_id="bot-1", publish_interval=0.0, context=zmq_context
    )
    yield publisher
    publisher.close(timeout=1.0)


async def test_bot_client_events_are_shown_within_one_second(
    bridge: Bridge, browser: BrowserContext, bot: Publisher
) -> None:
    page, _wire, console = await open_dashboard(browser, bridge.url + "/")
    await wait_for(lambda: bot.connected, "the bot client to connect to the proxy")
    started = time.monotonic()
    bot.publish_market_data("BTC-USD", 45123.45)
    data = decision_data(1)
    bot.publish_trading_decision(
        "req-1",
        "buy",
        0.85,
        data["reasoning"],
        45001.0,
        0.1,
        5,
        data["indicators"],
        data["risk_analysis"],
    )
    bot.publish_position_update("BTC-USD", "long", 0.1, 45000.0, 45123.45, 12.35)
    budget = scaled(1.0) * 1000
    await page.wait_for_function(
        """() => document.querySelector('[data-testid="price-card"][data-symbol="BTC-USD"]'
             + ' [data-testid="price"]')?.textContent === "45,123.45" """,
        timeout=budget,
    )
    await page.wait_for_selector(decision_selector(1), timeout=budget)
    await page.wait_for_selector(
        '[data-testid="position"][data-symbol="BTC-USD"] >> text=+12.35', timeout=budget
    )
    assert time.monotonic() - started < scaled(1.0)
    bot.publish_error("exchange timeout", level="WARNING")
    await page.wait_for_selector(
        '[data-testid="source"][data-source="bot-1"] >> text=exchange timeout', timeout=budget
    )
    decision = page.locator(decision_selector(1))
    assert await decision.locator('[data-testid="action"]').text_content() == "BUY"
    assert await decision.locator('[data-testid="confidence"]').text_content() == "85%"
    assert await decision.locator('[data-testid="stop-loss"]').text_content() == "44,000.00"
    assert await decision.locator('[data-testid="take-profit"]').text_content() == "46,000.00"
    assert "bullish convergence" in (
        await decision.locator('[data-testid="reasoning"]').text_content() or ""
    )
    # The footer measures end-to-end latency from the payload's timestamp.
    await page.wait_for_function(
        "/^-?\\d+ ms$/.test(document.querySelector('[data-testid=latency]').textContent)",
        timeout=scaled(2) * 1000,
    )
    assert console.errors == []


async def test_topic_selector_changes_what_the_bridge_sends(
    bridge: Bridge, browser: BrowserContext, publisher: BusPublisher
) -> None:
    page, wire, console = await open_dashboard(browser, bridge.url + "/")
    publisher.publish("market_data", {"symbol": "BTC-USD", "price": 100.0}, "BTC-USD")
    publisher.publish("market_data", {"symbol": "ETH-USD", "price": 10.0}, "ETH-USD")
    toggle = '[data-testid="symbol-toggle"][data-symbol="ETH-USD"]'
    await page.wait_for_selector(toggle, timeout=scaled(2) * 1000)

    # Deselect ETH-USD: the page must subscribe per symbol and drop the type-wide pattern.
    mark = len(wire.received)
    await page.uncheck(toggle)
    await wire.wait_for(lambda: bool(wire.controls("unsubscribed", mark)), "unsubscribed reply")
    last_sent = [m for m in wire.sent if m.get("op") in ("subscribe", "unsubscribe")][-2:]
    assert [m["op"] for m in last_sent] == ["subscribe", "unsubscribe"]
    assert "market_data.BTC-USD" in last_sent[0]["topics"]
    assert "market_data.ETH-USD" not in last_sent[0]["topics"]
    assert "market_data" in last_sent[1]["topics"]

    mark = len(wire.received)
    publisher.publish("market_data", {"symbol": "ETH-USD", "price": 11.0}, "ETH-USD")
    publisher.publish("market_data", {"symbol": "BTC-USD", "price": 101.0}, "BTC-USD")
    await wire.wait_for(
        lambda: any(e["data"]["price"] == 101.0 for e in wire.events(mark)), "BTC-USD event"
    )
    assert [e["topic"] for e in wire.events(mark)] == ["market_data.BTC-USD"]
    assert await page.locator('[data-testid="price-card"][data-symbol="ETH-USD"]').count() == 0

    # Deselect a type: its events stop on the wire too.
    mark = len(wire.received)
    await page.uncheck('[data-testid="type-toggle"][data-type="trading_decision"]')
    await wire.wait_for(lambda: bool(wire.controls("unsubscribed", mark)), "unsubscribed reply")
    mark = len(wire.received)
    publisher.publish("trading_decision", decision_data(7))
    publisher.publish("market_data", {"symbol": "BTC-USD", "price": 102.0}, "BTC-USD")
    await wire.wait_for(
        lambda: any(e["data"]["price"] == 102.0 for e in wire.events(mark)), "BTC-USD event"
    )
    assert [e["type"] for e in wire.events(mark)] == ["market_data"]
    assert await page.locator(decision_selector(7)).count() == 0

    # Select ETH-USD again: the bridge sends its latest value (snapshot) and live ones.
    mark = len(wire.received)
    await page.check(toggle)
    await wire.wait_for(
        lambda: any(e["topic"] == "market_data.ETH-USD" for e in wire.events(mark)),
        "ETH-USD snapshot after re-subscribing",
    )
    await page.wait_for_selector(
        '[data-testid="price-card"][data-symbol="ETH-USD"]', timeout=scaled(2) * 1000
    )
    assert console.errors == []


async def test_dropped_connection_resumes_with_every_missed_decision(
    bridge: Bridge, browser: BrowserContext, publisher: BusPublisher
) -> None:
    page, wire, _console = await open_dashboard(browser, bridge.url + "/")
    publisher.publish("trading_decision", decision_data(1))
    await page.wait_for_selector(decision_selector(1), timeout=scaled(2) * 1000)

    # Cut the link from the page side; the client reconnects after its 1-2 s backoff.
    await page.evaluate("window.tradebus._ws.close(4000, 'test drops the link')")
    await page.wait_for_selector(
        '[data-testid="connection-state"][data-state="disconnected"]', timeout=scaled(2) * 1000
    )
    mark = len(wire.received)
    for n in (2, 3, 4):
        publisher.publish("trading_decision", decision_data(n))
    await wait_connected(page, wire, mark)

    resume = [m for m in wire.sent if m.get("op") == "subscribe"][-1]
    positions = {(p["topic"], p["source"]): p for p in resume["since"]}
    # The epoch is beyond 2^53: it must come back digit for digit.
    assert positions["trading_decision", "bot-1"]["epoch"] == publisher.epoch
    assert positions["trading_decision", "bot-1"]["seq"] == 1
    end = wire.controls("snapshot_end", mark)[0]
    assert end["mode"] == "resume"
    assert end["recovered"] is True
    for n in (2, 3, 4):
        await page.wait_for_selector(decision_selector(n), timeout=scaled(2) * 1000)
    ids = await page.eval_on_selector_all(
        '[data-testid="decision"]', "nodes => nodes.map(n => n.dataset.requestId)"
    )
    assert ids == ["req-4", "req-3", "req-2", "req-1"]  # newest first, each exactly once
    assert await page.is_hidden('[data-testid="recovery"]')


async def test_bridge_restart_page_reconnects_and_shows_outage_decisions(
    bridge: Bridge, browser: BrowserContext, publisher: BusPublisher
) -> None:
    page, wire, _console = await open_dashboard(browser, bridge.url + "/")
    publisher.publish("trading_decision", decision_data(1))
    publisher.publish("ai_decision", {"action": "HOLD", "confidence": 0.5, "reasoning": "before"})
    await page.wait_for_selector(decision_selector(1), timeout=scaled(2) * 1000)

    await bridge.stop()
    await page.wait_for_selector(
        '[data-testid="connection-state"][data-state="disconnected"]', timeout=scaled(5) * 1000
    )
    mark = len(wire.received)
    # two per topic: a latest-value snapshot alone cannot bring back the first of them
    publisher.publish("trading_decision", decision_data(2, "SELL"))
    publisher.publish("trading_decision", decision_data(3, "BUY"))
    publisher.publish("ai_decision", {"action": "SELL", "confidence": 0.9, "reasoning": "outage"})
    await bridge.start()  # same port

    await wait_connected(page, wire, mark)
    await page.wait_for_selector(decision_selector(3), timeout=scaled(3) * 1000)
    await page.wait_for_selector(
        '[data-testid="decision"][data-type="ai_decision"] >> text=outage',
        timeout=scaled(3) * 1000,
    )
    resume = [m for m in wire.sent if m.get("op") == "subscribe"][-1]
    assert {(p["topic"], p["seq"]) for p in resume["since"]} >= {
        ("trading_decision", 1),
        ("ai_decision", 1),
    }
    # A new bridge holds no history from before it started; the proxy's does (issue 13):
    # every outage decision is shown, and no "resume incomplete"
    end = wire.controls("snapshot_end", mark)[0]
    assert end["mode"] == "resume"
    assert end["recovered"] is True
    await page.wait_for_selector(decision_selector(2), timeout=scaled(2) * 1000)
    assert await page.is_hidden('[data-testid="recovery"]')
    assert int(await page.text_content('[data-testid="reconnects"]') or "0") >= 1


@pytest.mark.parametrize("judge", ["bridge", "page"])
async def test_a_stalled_source_shows_stale(
    bridge_config: BridgeConfig,
    browser: BrowserContext,
    publisher: BusPublisher,
    judge: str,
) -> None:
    # Either the bridge reports the source stale (source_status) or the page's own timer
    # does; each variant makes the other one slow so that only it can pass the test.
    config = bridge_config.replace(stale_after=1.0 if judge == "bridge" else 60.0)
    running = Bridge(config)
    await running.start()
    try:
        page_stale = 60 if judge == "bridge" else 1
        page, wire, console = await open_dashboard(browser, f"{running.url}/?stale={page_stale}")
        publisher.publish("system_status", {"status": "healthy", "health": True, "errors": []})
        source = '[data-testid="source"][data-source="bot-1"]'
        await page.wait_for_selector(f'{source}[data-state="live"]', timeout=scaled(2) * 1000)
        started = time.monotonic()
        await page.wait_for_selector(f'{source}[data-state="stale"]', timeout=scaled(5) * 1000)
        assert time.monotonic() - started >= 0.5
        assert (await page.text_content(f'{source} [data-testid="source-state"]')) == "stale"
        if judge == "bridge":
            assert any(
                m["source"] == "bot-1" and m["status"] == "stale"
                for m in wire.controls("source_status")
            )
        # A new heartbeat brings it back.
        publisher.publish("system_status", {"status": "healthy", "health": True, "errors": []})
        await page.wait_for_selector(f'{source}[data-state="live"]', timeout=scaled(2) * 1000)
        assert console.errors == []
    finally:
        await running.stop()


async def test_a_stale_source_marks_its_price_cards_and_decisions(
    bridge: Bridge,
    browser: BrowserContext,
    publisher: BusPublisher,
    proxy: Proxy,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    other = BusPublisher(zmq_context, proxy.frontend_endpoint, "bot-2")
    try:
        page, _wire, console = await open_dashboard(browser, f"{bridge.url}/?stale=2")
        publisher.publish("market_data", {"symbol": "BTC-USD", "price": 45000.0}, "BTC-USD")
        publisher.publish("trading_decision", decision_data(1))
        btc = '[data-testid="price-card"][data-symbol="BTC-USD"]'
        eth = '[data-testid="price-card"][data-symbol="ETH-USD"]'
        wait = scaled(5) * 1000
        await page.wait_for_selector(f'{btc}[data-stale="false"]', timeout=wait)
        await page.wait_for_selector(f'{decision_selector(1)}[data-stale="false"]', timeout=wait)
        # bot-2 keeps publishing ETH-USD: only bot-1's card and decision go stale, seen
        # together in one look at the page while bot-2 is still publishing
        look = """([btc, eth, decision]) => [btc, eth, decision].map(
            (selector) => document.querySelector(selector)?.dataset.stale)"""
        deadline = time.monotonic() + scaled(15)
        price = 3000.0
        while True:
            price += 1
            other.publish("market_data", {"symbol": "ETH-USD", "price": price}, "ETH-USD")
            marks = await page.evaluate(look, [btc, eth, decision_selector(1)])
            if marks[0] == "true":
                break
            assert time.monotonic() < deadline, f"bot-1's card never went stale: {marks}"
            await asyncio.sleep(0.1)  # the pace of bot-2's prices, not a wait for the page
        assert marks == ["true", "false", "true"]
        stale_opacity = await page.eval_on_selector(btc, "node => getComputedStyle(node).opacity")
        assert float(stale_opacity) < 1
        # bot-1 speaks again: its card and decision are live again
        publisher.publish("market_data", {"symbol": "BTC-USD", "price": 45010.0}, "BTC-USD")
        await page.wait_for_selector(f'{btc}[data-stale="false"]', timeout=wait)
        await page.wait_for_selector(f'{decision_selector(1)}[data-stale="false"]', timeout=wait)
        assert console.errors == []
    finally:
        other.close()


async def test_a_source_not_seen_for_a_while_leaves_the_system_panel(
    bridge: Bridge, browser: BrowserContext, publisher: BusPublisher
) -> None:
    # stale after 1 s, gone after 4: a window wide enough to see it stale on a busy machine
    page, _wire, console = await open_dashboard(browser, f"{bridge.url}/?stale=1&forget=4")
    source = '[data-testid="source"][data-source="bot-1"]'
    wait = scaled(8) * 1000
    publisher.publish("system_status", {"status": "healthy", "health": True, "errors": []})
    await page.wait_for_selector(f'{source}[data-state="live"]', timeout=wait)
    seen = time.monotonic()
    await page.wait_for_selector(f'{source}[data-state="stale"]', timeout=wait)
    await page.wait_for_selector(source, state="detached", timeout=wait)
    assert time.monotonic() - seen >= 1.5
    assert await page.is_visible("#sources-empty")
    publisher.publish("system_status", {"status": "healthy", "health": True, "errors": []})
    await page.wait_for_selector(f'{source}[data-state="live"]', timeout=wait)
    assert console.errors == []


async def test_the_footer_stays_in_view_at_1400x900_with_positions_open(
    bridge: Bridge, browser: BrowserContext, publisher: BusPublisher
) -> None:
    page, _wire, console = await open_dashboard(browser, bridge.url + "/")
    symbols = ["BTC-USD", "ETH-USD", "SOL-USD", "ADA-USD", "XRP-USD", "DOT-USD"]
    for n, symbol in enumerate(symbols):
        publisher.publish("market_data", {"symbol": symbol, "price": 100.0 + n}, symbol)
        position = {
            "symbol": symbol,
            "side": "long",
            "size": 1.5,
            "entry_price": 100.0,
            "current_price": 101.0 + n,
            "unrealized_pnl": 1.5 * (1 + n),
        }
        publisher.publish("position_update", position, symbol)
        publisher.publish("trading_decision", decision_data(n))
    publisher.publish("system_status", {"status": "healthy", "health": True, "errors": []})
    await page.wait_for_function(
        "document.querySelectorAll('[data-testid=\"position\"]').length === 6",
        timeout=scaled(5) * 1000,
    )
    await page.wait_for_selector('[data-testid="source"]', timeout=scaled(5) * 1000)
    footer = await page.locator(".footer").bounding_box()
    assert footer is not None
    assert footer["y"] >= 0
    assert footer["y"] + footer["height"] <= 900, footer
    # nothing covers it: the element at its middle is the footer or inside it
    covered = await page.evaluate(
        """([x, y]) => !document.querySelector('.footer').contains(
               document.elementFromPoint(x, y))""",
        [footer["x"] + 40, footer["y"] + footer["height"] / 2],
    )
    assert not covered
    assert await page.is_visible('[data-testid="gaps"]')
    assert console.errors == []


def docs_example() -> str:
    """The example page of docs/dashboard.md, exactly as printed there."""
    match = re.search(r"<!-- example:begin -->\s*```html\n(.*?)```", DOCS.read_text(), re.S)
    assert match, "docs/dashboard.md lost its example page"
    return match.group(1)


async def test_the_documented_example_page_works_as_written(
    bridge_config: BridgeConfig, browser: BrowserContext, publisher: BusPublisher
) -> None:
    example = docs_example()
    assert len(example.strip().splitlines()) <= 25

    async def serve_example(_request: web.Request) -> web.Response:
        return web.Response(text=example, content_type="text/html")

    async def no_icon(_request: web.Request) -> web.Response:
        return web.Response(status=204)  # the browser asks; its 404 would be a console error

    routes = [web.get("/example.html", serve_example), web.get("/favicon.ico", no_icon)]
    running = Bridge(bridge_config, routes)
    await running.start()
    try:
        page = await browser.new_page()
        console = Console(page)
        wire = Wire(page)
        await page.goto(f"{running.url}/example.html")
        await wire.wait_for(lambda: bool(wire.controls("snapshot_end")), "the example's subscribe")
        publisher.publish("market_data", {"symbol": "BTC-USD", "price": 45678.9}, "BTC-USD")
        publisher.publish("trading_decision", decision_data(5, "SELL"))
        await page.wait_for_selector("text=45678.9", timeout=scaled(2) * 1000)
        await page.wait_for_selector("text=SELL", timeout=scaled(2) * 1000)
        assert console.errors == []
    finally:
        await running.stop()


async def test_page_keeps_up_with_1000_events_per_second(
    bridge: Bridge, browser: BrowserContext, publisher: BusPublisher
) -> None:
    page, _wire, console = await open_dashboard(browser, bridge.url + "/")
    await page.evaluate(
        """() => {
            window.frames_seen = 0;
            const count = () => { window.frames_seen += 1; requestAnimationFrame(count); };
            requestAnimationFrame(count);
        }"""
    )
    symbols = ["BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD"]
    seconds, per_second, batch = 3, 1000, 10
    published = 0
    started = time.monotonic()
    for tick in range(seconds * per_second // batch):
        for n in range(batch):
            symbol = symbols[n % len(symbols)]
            publisher.publish("market_data", {"symbol": symbol, "price": 100.0 + tick}, symbol)
            published += 1
        if tick % 2 == 0:
            publisher.publish(
                "ai_decision", {"action": "HOLD", "confidence": 0.5, "reasoning": "x"}
            )
            published += 1
        # holds the feed to per_second (pacing, not a synchronisation)
        await asyncio.sleep(max(0.0, started + (tick + 1) * batch / per_second - time.monotonic()))
    elapsed = time.monotonic() - started
    await page.wait_for_function(
        f"window.tradebus.stats.received >= {published}", timeout=scaled(5) * 1000
    )
    last_price = f"{100.0 + seconds * per_second // batch - 1:,.2f}"
    for symbol in symbols:
        await page.wait_for_function(
            f"""document.querySelector('[data-testid="price-card"][data-symbol="{symbol}"]'
                 + ' [data-testid="price"]')?.textContent === "{last_price}" """,
            timeout=scaled(2) * 1000,
        )
    frames = await page.evaluate("window.frames_seen")
    # Rendering kept running under load (headless Chromium paces frames at up to 60/s).
    assert frames / elapsed >= 10, f"{frames} frames in {elapsed:.1f} s"
    assert await page.locator('[data-testid="decision"]').count() == 100  # capped feed
    assert console.errors == []


async def test_reconnect_backs_off_with_jitter_until_the_bridge_appears(
    bridge_config: BridgeConfig, browser: BrowserContext
) -> None:
    # A port with nothing listening yet; a second bridge starts on it later. The page is
    # served by the first (the dashboard itself connects only to its own origin). The port
    # is held, bound but not listening (connects are refused), so no other process on the
    # machine takes it meanwhile; the second bridge joins it through SO_REUSEPORT.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]

    async def client_page(_request: web.Request) -> web.Response:
        return web.Response(
            content_type="text/html",
            text=f"""<!doctype html><link rel="icon" href="data:,"><script type="module">
                import {{ connect }} from "/static/tradebus.js";
                window.delays = [];
                window.tradebus = connect("ws://127.0.0.1:{port}/ws");
                window.tradebus.onState(
                    (s) => s.delayMs === undefined || window.delays.push(s.delayMs));
            </script>""",
        )

    bridge = Bridge(bridge_config, [web.get("/client.html", client_page)])
    await bridge.start()
    page = await browser.new_page()
    await page.goto(f"{bridge.url}/client.html")
    late: Bridge | None = None
    try:
        await page.wait_for_function("window.delays && window.delays.length >= 2", timeout=10_000)
        first, second = await page.evaluate("window.delays.slice(0, 2)")
        assert 1000 <= first <= 2000  # 1 s plus 0-1 s jitter
        assert 2000 <= second <= 3000  # doubled
        late = Bridge(bridge_config.replace(origins=(bridge.url,)))
        late.port = port
        late.reuse_port = True
        await late.start()
        await page.wait_for_function("window.tradebus.state === 'open'", timeout=scaled(6) * 1000)
    finally:
        if late is not None:
            await late.stop()
        await bridge.stop()
        holder.close()


class Relay:
    """A TCP relay between the browser and the bridge whose current links can be frozen:
    bytes stop flowing but no FIN or RST is sent, like a dead NAT entry or a sleeping peer."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.links: list[tuple[asyncio.Event, list[asyncio.StreamWriter]]] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        flowing = asyncio.Event()
        flowing.set()
        self.links.append((flowing, [writer, upstream_writer]))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                await flowing.wait()
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(
            pump(reader, upstream_writer), pump(upstream_reader, writer), return_exceptions=True
        )

    def freeze(self) -> None:
        for flowing, _writers in self.links:
            flowing.clear()

    async def stop(self) -> None:
        for _flowing, writers in self.links:
            for writer in writers:
                writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_silently_dead_link_is_detected_by_pings_and_replaced(
    bridge_config: BridgeConfig, browser: BrowserContext
) -> None:
    async def client_page(_request: web.Request) -> web.Response:
        relay_port = _request.query["relay"]
        return web.Response(
            content_type="text/html",
            text=f"""<!doctype html><link rel="icon" href="data:,"><script type="module">
                import {{ connect }} from "/static/tradebus.js";
                window.states = [];
                window.bus = connect("ws://127.0.0.1:{relay_port}/ws",
                                     {{ pingIntervalMs: 400, pingTimeoutMs: 400 }});
                window.bus.onState((s) => window.states.push(s));
                window.bus.subscribe("market_data");
            </script>""",
        )

    # the relay's port is in the page's Host: a name:port the bridge is told it serves
    running = Bridge(
        bridge_config.replace(origins=("*",), server_names=("127.0.0.1",)),
        [web.get("/client.html", client_page)],
    )
    await running.start()
    relay = Relay(running.port)
    await relay.start()
    try:
        page = await browser.new_page()
        wire = Wire(page)
        console = Console(page)
        await page.goto(f"{running.url}/client.html?relay={relay.port}")
        await wire.wait_for(lambda: bool(wire.controls("pong")), "a pong to the client's ping")
        assert any(m.get("op") == "ping" for m in wire.sent)

        relay.freeze()
        started = time.monotonic()
        await page.wait_for_function(
            "window.states.some(s => s.state === 'disconnected')", timeout=scaled(4) * 1000
        )
        # Two ping periods of silence: the client gave up on the link without a close from
        # the server, then reconnected through a fresh (unfrozen) link.
        assert time.monotonic() - started >= 0.7
        dropped = await page.evaluate("window.states.find(s => s.state === 'disconnected')")
        assert dropped["code"] == 4000
        assert dropped["reason"] == "no traffic from server"
        await page.wait_for_function(
            "window.states.filter(s => s.state === 'open').length === 2",
            timeout=scaled(5) * 1000,
        )
        assert console.errors == []
    finally:
        await relay.stop()
        await running.stop()


async def test_a_refused_selection_keeps_the_subscriptions_in_force_and_says_why(
    bridge_config: BridgeConfig, browser: BrowserContext, publisher: BusPublisher
) -> None:
    running = Bridge(bridge_config.replace(max_subscriptions=6))
    await running.start()
    try:
        page, wire, _console = await open_dashboard(browser, running.url + "/")
        for symbol in ("BTC-USD", "ETH-USD"):
            publisher.publish("market_data", {"symbol": symbol, "price": 1.0}, symbol)
        toggle = '[data-testid="symbol-toggle"][data-symbol="ETH-USD"]'
        await page.wait_for_selector(toggle, timeout=scaled(2) * 1000)
        before = await page.text_content('[data-testid="wire-patterns"]')

        # Per-symbol patterns next to the 5 held ones exceed the bridge's limit of 6.
        mark = len(wire.received)
        await page.click(toggle)  # not uncheck(): the page puts the tick back at once
        await wire.wait_for(lambda: bool(wire.controls("error", mark)), "the bridge's refusal")
        assert wire.controls("error", mark)[0]["code"] == "too_many_subscriptions"
        await page.wait_for_selector(
            '[data-testid="server-error"] >> text=too_many_subscriptions', timeout=2000
        )
        await page.wait_for_function(
            f"document.querySelector('{toggle}').checked", timeout=scaled(2) * 1000
        )
        assert await page.is_checked('[data-testid="symbol-all"]')
        assert await page.text_content('[data-testid="wire-patterns"]') == before
        assert not [m for m in wire.sent if m.get("op") == "unsubscribe"]
        # Still subscribed to everything it had: ETH-USD keeps arriving.
        mark = len(wire.received)
        publisher.publish("market_data", {"symbol": "ETH-USD", "price": 2.0}, "ETH-USD")
        await wire.wait_for(
            lambda: any(e["topic"] == "market_data.ETH-USD" for e in wire.events(mark)),
            "ETH-USD after the refusal",
        )
    finally:
        await running.stop()


async def test_url_parameters_choose_the_initial_subscription(
    bridge: Bridge, browser: BrowserContext, publisher: BusPublisher
) -> None:
    page, wire, console = await open_dashboard(
        browser, bridge.url + "/?types=market_data,ai_decision&symbols=ETH-USD"
    )
    subscribe = next(m for m in wire.sent if m.get("op") == "subscribe")
    assert sorted(subscribe["topics"]) == ["ai_decision", "market_data.ETH-USD"]
    assert await page.is_checked('[data-testid="symbol-toggle"][data-symbol="ETH-USD"]')
    assert not await page.is_checked('[data-testid="symbol-all"]')
    assert not await page.is_checked('[data-testid="type-toggle"][data-type="trading_decision"]')
    mark = len(wire.received)
    publisher.publish("market_data", {"symbol": "BTC-USD", "price": 1.0}, "BTC-USD")
    publisher.publish("market_data", {"symbol": "ETH-USD", "price": 2.0}, "ETH-USD")
    await wire.wait_for(lambda: bool(wire.events(mark)), "the ETH-USD event")
    assert [e["topic"] for e in wire.events(mark)] == ["market_data.ETH-USD"]
    assert console.errors == []


async def test_a_token_reaches_the_bridge_without_staying_in_urls(
    bridge_config: BridgeConfig, chromium: Browser
) -> None:
    safe, unsafe = "s3cret.token-1", "a/b=c+d"  # the second cannot be a subprotocol
    running = Bridge(bridge_config.replace(tokens=(safe, unsafe)))
    await running.start()
    contexts = [await chromium.new_context() for _ in range(3)]
    try:
        page, wire, console = await open_dashboard(contexts[0], f"{running.url}/?token={safe}")
        assert "token" not in page.url  # moved out of the address bar
        assert "token" not in wire.urls[0]  # sent as the subprotocol "bearer.<token>"
        await page.reload()  # the tab keeps it for reloads
        await page.wait_for_selector(
            '[data-testid="connection-state"][data-state="open"]', timeout=scaled(5) * 1000
        )
        assert console.errors == []

        page, wire, _console = await open_dashboard(
            contexts[1], f"{running.url}/?token=a%2Fb%3Dc%2Bd"
        )
        assert "?token=a%2Fb%3Dc%2Bd" in wire.urls[0]

        page = await contexts[2].new_page()  # no token: refused, never open
        await page.goto(running.url + "/")
        await page.wait_for_selector(
            '[data-testid="connection-state"][data-state="disconnected"]', timeout=scaled(5) * 1000
        )
        assert await page.evaluate("window.tradebus.stats.received") == 0
    finally:
        for context in contexts:
            await context.close()
        await running.stop()


async def test_the_dashboard_connects_only_to_its_own_bridge(
    bridge: Bridge, browser: BrowserContext
) -> None:
    # another WebSocket server on loopback, standing in for a bridge elsewhere
    handshakes: list[str] = []

    async def elsewhere(request: web.Request) -> web.StreamResponse:
        handshakes.append(request.path_qs)
        ws = web.WebSocketResponse(protocols=("tradebus",))
        await ws.prepare(request)
        await ws.send_str('{"type":"connection_established","server":"tradebus","session":"x"}')
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/ws", elsewhere)
    async with TestServer(app, host="127.0.0.1") as served:
        other = served.port
        page = await browser.new_page()
        wire = Wire(page)
        await page.goto(f"{bridge.url}/?ws=ws://127.0.0.1:{other}/ws&token=s3cret")
        badge = '[data-testid="connection-state"][data-state="refused"]'
        await page.wait_for_selector(badge, timeout=scaled(5) * 1000)
        text = await page.text_content(badge)
        assert text is not None
        assert f"ws://127.0.0.1:{other}/ws" in text
        assert "not this page's bridge" in text
        assert await page.is_visible(badge)
        assert wire.urls == []
        assert handshakes == []
        assert await page.evaluate("window.tradebus.stats.received") == 0

        # its own /ws, named explicitly, is still fine
        page, wire, console = await open_dashboard(browser, f"{bridge.url}/?ws=/ws")
        assert wire.urls[0].startswith(f"ws://127.0.0.1:{bridge.port}/ws")
        assert console.errors == []


async def test_malformed_bus_messages_never_reach_or_close_the_dashboard(
    bridge: Bridge, browser: BrowserContext, publisher: BusPublisher, proxy: Proxy
) -> None:
    # One message whose payload is not UTF-8 used to close every browser on its topic (1007)
    # and the proxy's cache served it again on every reconnect: the gate refuses it, and
    # every other malformed kind, while the good decisions around them are shown.
    from tests.test_proxy_gate import TOPIC, malformed_messages

    page, wire, console = await open_dashboard(browser, bridge.url + "/")
    type_name, _, key = TOPIC.partition(".")
    kinds = malformed_messages(publisher)  # type: ignore[arg-type]
    for n, frames in enumerate(kinds.values(), start=1):
        publisher.publish(type_name, decision_data(n), key)
        publisher.socket.send_multipart(frames)
    last = len(kinds) + 1
    publisher.publish(type_name, decision_data(last), key)
    await page.wait_for_selector(decision_selector(last), timeout=scaled(5) * 1000)
    for n in range(1, last + 1):
        assert await page.locator(decision_selector(n)).count() == 1
    assert await page.get_attribute('[data-testid="connection-state"]', "data-state") == "open"
    assert len(wire.urls) == 1, "the page had to reconnect"
    assert [m["seq"] for m in wire.events() if m["topic"] == TOPIC] == list(range(1, last + 1))
    assert sum(proxy.gate.stats.rejected.values()) == len(kinds)
    assert console.errors == []
