"""tradebus.js's pure logic, run in headless Chromium: pattern matching, exact epochs,
duplicates, snapshot framing, gaps, routing and the size of resume requests.

Frames are handed to the client's frame handler as text, exactly as a WebSocket delivers
them; nothing here pretends to be a WebSocket (the end-to-end paths are in
tests/test_browser.py against a real bridge).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Page

from bridge.config import STATIC_DIR
from tests.support import browser_module, chromium_browser

BIG_EPOCH = 1795610363681458841  # beyond 2^53: as a JS number it would round
HARNESS = """<!doctype html><link rel="icon" href="data:,"><script type="module">
import * as lib from "/static/tradebus.js";
window.lib = lib;
// "data" holds an "epoch" key too: only the top-level one is the event's.
window.frameOf = (topic, epoch, seq) =>
  `{"type":"${topic.split(".")[0]}","data":{"epoch":1},"timestamp":"2026-01-01T00:00:00Z",` +
  `"topic":"${topic}","source":"bot-1","epoch":${epoch},"seq":${seq}}`;
window.ready = true;
</script>"""

pytestmark = browser_module(timeout=60)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def page() -> AsyncIterator[Page]:
    async def harness(_request: web.Request) -> web.Response:
        return web.Response(text=HARNESS, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", harness)
    app.router.add_static("/static/", STATIC_DIR)
    errors: list[str] = []
    async with TestServer(app, host="127.0.0.1") as served, chromium_browser() as browser:
        opened = await browser.new_page()
        opened.on("pageerror", lambda error: errors.append(str(error)))
        await opened.goto(f"http://127.0.0.1:{served.port}/")
        await opened.wait_for_function("window.ready === true", timeout=5000)
        yield opened
    assert errors == []


async def run(page: Page, body: str) -> Any:
    """Evaluate ``body`` (statements ending in a return) with a fresh, unconnected client."""
    return await page.evaluate(
        f"() => {{ const {{ TradebusClient, patternMatches }} = window.lib;"
        f" const client = new TradebusClient({{ url: 'ws://127.0.0.1:9/ws' }}); {body} }}"
    )


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("market_data", "market_data", True),
        ("market_data", "market_data.BTC-USD", True),
        ("market_data", "market_datax", False),
        ("market_data", "ai_decision", False),
        ("market_data.BTC-USD", "market_data.BTC-USD", True),
        ("market_data.BTC-USD", "market_data.BTC-USDT", False),
        ("market_data.BTC-USD", "market_data", False),
        ("*.BTC-USD", "position_update.BTC-USD", True),
        ("*.BTC-USD", "market_data.ETH-USD", False),
        ("*.BTC-USD", "ai_decision", False),
        ("*", "anything.at-all", True),
    ],
)
async def test_pattern_matching_follows_the_bus_rules(
    page: Page, pattern: str, topic: str, expected: bool
) -> None:
    assert await page.evaluate(f"window.lib.patternMatches({pattern!r}, {topic!r})") is expected


async def test_epochs_beyond_2_53_are_kept_digit_for_digit_and_duplicates_skipped(
    page: Page,
) -> None:
    result = await run(
        page,
        f"""
        const seen = [];
        client.on("*", (e, info) => seen.push([info.epoch, info.seq]));
        client._onFrame(frameOf("ai_decision", "{BIG_EPOCH}", 5));
        client._onFrame(frameOf("ai_decision", "{BIG_EPOCH}", 5));   // duplicate
        client._onFrame(frameOf("ai_decision", "{BIG_EPOCH}", 4));   // older
        client._onFrame(frameOf("ai_decision", "{BIG_EPOCH + 1}", 1)); // restarted publisher
        client._onFrame(frameOf("ai_decision", "{BIG_EPOCH}", 9));   // late, from the old run
        return {{ seen, positions: client.positions(), stats: client.stats }};
        """,
    )
    # BIG_EPOCH and BIG_EPOCH + 1 are the same JS number: only exact digits tell them apart.
    assert result["seen"] == [[str(BIG_EPOCH), "5"], [str(BIG_EPOCH + 1), "1"]]
    assert result["positions"] == [
        {"topic": "ai_decision", "source": "bot-1", "epoch": str(BIG_EPOCH + 1), "seq": "1"}
    ]
    assert result["stats"]["duplicates"] == 3
    assert result["stats"]["received"] == 2


async def test_snapshot_framing_gaps_and_unrecovered_resumes_reach_the_application(
    page: Page,
) -> None:
    result = await run(
        page,
        """
        const infos = [], ends = [], gaps = [];
        client.on("*", (e, info) => infos.push([e.seq, info.snapshot, info.mode]));
        client.onSnapshot((end) => ends.push(end));
        client.onGap((gap) => gaps.push(gap));
        client._onFrame('{"type":"snapshot_begin","mode":"resume","recovered":false}');
        client._onFrame(frameOf("market_data.BTC-USD", 7, 3));
        client._onFrame('{"type":"snapshot_end","mode":"resume","recovered":false,"count":1}');
        client._onFrame(frameOf("market_data.BTC-USD", 7, 4));
        client._onFrame('{"type":"gap","topic":"market_data.BTC-USD","source":"bot-1","missed":5}');
        return { infos, ends, gaps, stats: client.stats };
        """,
    )
    assert result["infos"] == [[3, True, "resume"], [4, False, None]]
    assert result["ends"] == [{"mode": "resume", "recovered": False, "count": 1}]
    assert result["gaps"] == [{"topic": "market_data.BTC-USD", "source": "bot-1", "missed": 5}]
    assert result["stats"]["gaps"] == 5
    assert result["stats"]["unrecovered"] == 1


async def test_events_reach_the_subscriptions_and_type_handlers_that_match(page: Page) -> None:
    result = await run(
        page,
        """
        const got = { btc: [], any_btc: [], market: [], error_events: [], server_errors: [] };
        client.subscribe(["market_data.BTC-USD"], (e) => got.btc.push(e.topic));
        client.subscribe("*.BTC-USD", (e) => got.any_btc.push(e.topic));
        client.on("market_data", (e) => got.market.push(e.topic));
        client.on("error", (e) => got.error_events.push(e.data.message));
        client.onServerError((e) => got.server_errors.push(e.code));
        client.subscribe(["market_data.ETH-USD", "error"]);  // type handlers see these too
        // a topic no subscription asks for (e.g. still in flight after an unsubscribe)
        // reaches no handler and moves no position
        client._onFrame(frameOf("market_data.SOL-USD", 1, 1));
        client._onFrame(frameOf("market_data.ETH-USD", 1, 1));
        client._onFrame(frameOf("market_data.BTC-USD", 1, 1));
        client._onFrame(frameOf("position_update.BTC-USD", 1, 1));
        // A bot's "error" event is an event; the bridge's error reply is not.
        client._onFrame('{"type":"error","data":{"message":"exchange down","level":"ERROR"},'
          + '"timestamp":"2026-01-01T00:00:00Z","topic":"error","source":"bot-1",'
          + '"epoch":1,"seq":1}');
        client._onFrame('{"type":"error","code":"bad_pattern","message":"no","id":null}');
        return { got, patterns: client.patterns(), unrequested: client.stats.unrequested,
                 positions: client.positions().map((p) => p.topic) };
        """,
    )
    got = result["got"]
    assert result["unrequested"] == 1
    assert "market_data.SOL-USD" not in result["positions"]
    assert got["btc"] == ["market_data.BTC-USD"]
    assert got["any_btc"] == ["market_data.BTC-USD", "position_update.BTC-USD"]
    assert got["market"] == ["market_data.ETH-USD", "market_data.BTC-USD"]
    assert got["error_events"] == ["exchange down"]
    assert got["server_errors"] == ["bad_pattern"]
    assert result["patterns"] == [
        "market_data.BTC-USD",
        "*.BTC-USD",
        "market_data.ETH-USD",
        "error",
    ]


async def test_unsubscribing_a_pattern_keeps_the_subscriptions_other_patterns(page: Page) -> None:
    result = await run(
        page,
        """
        const got = [];
        const sub = client.subscribe(["market_data", "ai_decision"], (e) => got.push(e.topic));
        client.subscribe("ai_decision");
        client._onFrame(frameOf("market_data.BTC-USD", 1, 1));
        client.unsubscribe("market_data");
        client._onFrame(frameOf("ai_decision", 1, 1));
        const afterFirst = client.patterns();
        sub.unsubscribe();
        const afterSecond = client.patterns();
        return { got, subPatterns: sub.patterns, afterFirst, afterSecond,
                 positions: client.positions().map((p) => p.topic) };
        """,
    )
    assert result["got"] == ["market_data.BTC-USD", "ai_decision"]
    assert result["subPatterns"] == ["ai_decision"]
    assert result["afterFirst"] == ["ai_decision"]
    assert result["afterSecond"] == ["ai_decision"]  # still held by the second subscription
    # The position of a topic nobody subscribes to any more is forgotten.
    assert result["positions"] == ["ai_decision"]


async def test_resume_requests_stay_below_the_size_limit(page: Page) -> None:
    result = await run(
        page,
        f"""
        client.subscribe(["market_data", "trading_decision"]);
        for (let i = 0; i < 2000; i += 1) {{
          client._onFrame(frameOf(`market_data.SYM-${{i}}`, "{BIG_EPOCH}", 3));
        }}
        for (let i = 0; i < 5; i += 1) {{
          client._onFrame(frameOf("trading_decision", "{BIG_EPOCH}", 10 + i));
        }}
        const ends = [];
        client.onSnapshot((end) => ends.push(end));
        const requests = client._resumeRequests(client.patterns());
        return {{ requests, ends, limit: client.options.maxRequestBytes }};
        """,
    )
    requests = [json.loads(text) for text in result["requests"]]
    assert all(len(text) <= result["limit"] for text in result["requests"])
    assert len(requests) == 2
    market, decisions = requests
    assert market["topics"] == ["market_data"]
    assert 100 < len(market["since"]) < 2000  # truncated: latest values suffice for prices
    assert decisions["topics"] == ["trading_decision"]
    assert decisions["since"] == [
        {"topic": "trading_decision", "source": "bot-1", "epoch": BIG_EPOCH, "seq": 14}
    ]
    assert result["ends"] == []  # nothing lossless was left out


async def test_resume_that_cannot_name_every_lossless_position_says_so(page: Page) -> None:
    result = await run(
        page,
        """
        client.subscribe("*");
        for (let i = 0; i < 2000; i += 1) client._onFrame(frameOf(`custom.K-${i}`, 1, 1));
        const ends = [];
        client.onSnapshot((end) => ends.push(end));
        const requests = client._resumeRequests(client.patterns());
        return { sizes: requests.map((r) => r.length), ends, stats: client.stats };
        """,
    )
    assert len(result["sizes"]) == 1
    assert result["sizes"][0] <= 32768
    assert result["ends"] == [{"mode": "resume", "recovered": False, "count": 0}]
    assert result["stats"]["unrecovered"] == 1


async def test_only_a_connection_that_lasted_resets_the_backoff(page: Page) -> None:
    result = await run(
        page,
        """
        const delays = [];
        client.onState((s) => s.delayMs === undefined || delays.push(s.delayMs));
        client._attempt = 3;
        client._openedAt = Date.now() - 100;   // accepted, then closed at once: keep backing off
        client._scheduleReconnect({ code: 1008, reason: "rate limit" });
        client._openedAt = Date.now() - 6000;  // had been fine for 6 s: start again at 1 s
        client._scheduleReconnect({ code: 1006, reason: "" });
        client.close();
        return delays;
        """,
    )
    first, second = result
    assert 8000 <= first <= 9000
    assert 1000 <= second <= 2000
