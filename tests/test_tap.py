"""tradebus tap: the pure counting and formatting, then the real client against a bridge."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from bridge.app import start_bridge
from bridge.config import BridgeConfig
from bus.proxy import Proxy
from tests.conftest import scaled
from tests.support import wait_for
from tradebus.tap import (
    SEND_CHOICES,
    TapOptions,
    TapStats,
    format_event,
    format_summary,
    guide_events,
    listen,
    parse_timestamp_ns,
    percentile,
    send,
    with_query,
)

T0 = 1_705_746_600_000_000_000  # 2024-01-20T10:30:00Z


def event(topic: str, seq: int, published_ns: int, source: str = "bot") -> dict[str, object]:
    return {
        "type": topic.split(".")[0],
        "data": {"price": 1.0},
        "timestamp": guide_events("market_data", published_ns)[0]["timestamp"],
        "topic": topic,
        "source": source,
        "epoch": 7,
        "seq": seq,
    }


def test_counts_events_by_type_rate_and_latency() -> None:
    stats = TapStats(started_ns=T0)
    for seq in range(1, 11):
        sent = T0 + seq * 100_000_000
        assert stats.observe(event("market_data.BTC-USD", seq, sent), sent + seq * 1_000_000) == (
            "event"
        )
    stats.observe(event("ai_decision", 1, T0), T0 + 2_000_000)
    summary = stats.summary(T0 + 2_000_000_000)
    assert summary["events"] == 11
    assert summary["by_type"] == {"ai_decision": 1, "market_data": 10}
    assert summary["rate_per_s"] == 5.5
    assert summary["gaps"] == 0
    latency = summary["latency_ms"]
    assert latency["count"] == 11
    assert latency["p50"] == 5.0
    assert latency["max"] == 10.0
    assert latency["p99"] == 10.0


def test_gaps_from_sequence_and_from_the_bridge_and_duplicates() -> None:
    stats = TapStats(started_ns=T0)
    for seq in (1, 2, 5, 5, 6):  # 3 and 4 missing, 5 twice
        stats.observe(event("market_data.BTC-USD", seq, T0), T0)
    stats.observe({"type": "gap", "topic": "ai_decision", "source": "bot", "missed": 3}, T0)
    summary = stats.summary(T0 + 1)
    assert summary["gaps"] == 2
    assert summary["missed"] == 5
    assert summary["duplicates"] == 1
    assert summary["control"] == {"gap": 1}


def test_snapshot_events_are_not_live_and_do_not_count_latency() -> None:
    stats = TapStats(started_ns=T0)
    stats.observe({"type": "snapshot_begin", "mode": "snapshot", "recovered": True}, T0)
    assert stats.observe(event("market_data.BTC-USD", 40, T0 - 60 * 10**9), T0) == "snapshot"
    stats.observe({"type": "snapshot_end", "mode": "snapshot", "recovered": True, "count": 1}, T0)
    stats.observe(event("market_data.BTC-USD", 41, T0), T0 + 1_000_000)
    summary = stats.summary(T0 + 1)
    assert summary["events"] == 1
    assert summary["snapshot_events"] == 1
    assert summary["latency_ms"]["count"] == 1
    assert summary["latency_ms"]["max"] == 1.0
    assert summary["gaps"] == 0


def test_control_messages_and_errors() -> None:
    stats = TapStats(started_ns=T0)
    stats.observe({"type": "connection_established", "server": "tradebus"}, T0)
    stats.observe({"type": "error", "code": "bad_pattern", "message": "no"}, T0)
    stats.observe(["not", "an", "object"], T0)
    # the bot's own "error" event type is an event, not a bridge error
    bot_error = {"type": "error", "data": {"message": "x", "level": "ERROR"}, "topic": "error"}
    assert stats.observe(bot_error, T0) == "event"
    summary = stats.summary(T0 + 1)
    assert summary["control"] == {"connection_established": 1, "error": 1, "invalid": 1}
    assert summary["errors"] == ["bad_pattern: no"]
    assert summary["events"] == 1
    assert "error from bridge: bad_pattern: no" in format_summary(summary)


def test_from_counts_only_one_source() -> None:
    stats = TapStats(started_ns=T0, only_source="check")
    assert stats.observe(event("market_data.BTC-USD", 1, T0, source="demo-bot"), T0) == "ignored"
    assert stats.observe(event("market_data.BTC-USD", 1, T0, source="check"), T0) == "event"
    summary = stats.summary(T0 + 1)
    assert summary["events"] == 1
    assert summary["ignored_other_sources"] == 1
    assert "(1 events of other sources ignored)" in format_summary(summary)


def test_guide_events_have_the_guides_shapes() -> None:
    every = guide_events("all", T0)
    assert [e["type"] for e in every] == [
        "market_data",
        "ai_decision",
        "trading_loop",
        "trading_decision",
        "system_status",
        "position_update",
    ]
    assert every[0]["data"] == {
        "symbol": "BTC-USD",
        "price": 45000.0,
        "timestamp": "2024-01-20T10:30:00.000000Z",
    }
    # the guide's publish_trading_loop(price, action, confidence, symbol)
    assert every[2]["data"] == {
        "price": 45000.0,
        "action": "BUY",
        "confidence": 0.85,
        "symbol": "BTC-USD",
        "timestamp": "2024-01-20T10:30:00.000000Z",
    }
    assert every[3]["data"]["risk_analysis"]["risk_reward_ratio"] == 2.0
    assert [e["type"] for e in guide_events("system_status", T0)] == ["system_status"]


def test_timestamps_percentiles_urls_and_lines() -> None:
    assert parse_timestamp_ns("2024-01-20T10:30:00.000123Z") == T0 + 123_000
    assert parse_timestamp_ns("2024-01-20T10:30:00+00:00") == T0
    assert parse_timestamp_ns("2024-01-20T10:30:00") is None  # no zone: not comparable
    assert parse_timestamp_ns("yesterday") is None
    assert parse_timestamp_ns(12) is None
    assert percentile([], 0.5) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert with_query("ws://h:1/ws", {"topics": "a,b"}) == "ws://h:1/ws?topics=a%2Cb"
    assert with_query("ws://h:1/ws?token=x", {"role": "publisher"}) == (
        "ws://h:1/ws?token=x&role=publisher"
    )
    line = format_event(event("market_data.BTC-USD", 3, T0), T0 + 1_500_000, "event")
    assert line.startswith("10:30:00.001 market_data.BTC-USD #3 from bot 1.5ms ")
    assert '"price":1.0' in line


def test_send_offers_every_type_the_guides_test_client_could_send() -> None:
    # test_websocket_client.py --send {market_data, ai_decision, trading_loop, system_status, all}
    assert {"market_data", "ai_decision", "trading_loop", "system_status", "all"} <= set(
        SEND_CHOICES
    )


def test_a_run_that_received_nothing_shows_dashes_not_zero_latencies() -> None:
    summary = TapStats(started_ns=T0).summary(T0 + 2_000_000_000)
    assert summary["latency_ms"] == {
        "count": 0,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
    }
    text = format_summary(summary)
    assert "latency ms: p50 -  p90 -  p99 -  max -  (n=0)" in text
    assert "0.00" not in text


@pytest.mark.parametrize("kind", ["market_data", "all"])
def test_guide_events_are_stamped(kind: str) -> None:
    for e in guide_events(kind, T0 + 5_000):
        assert e["timestamp"] == "2024-01-20T10:30:00.000005Z"


# -- the real client against a real bridge and proxy ---------------------------------------------
@pytest.fixture
async def bridge_url(proxy: Proxy) -> AsyncIterator[str]:
    server = await start_bridge(
        BridgeConfig(
            port=0,
            bus=proxy.backend_endpoint,
            snapshot=proxy.snapshot_endpoint,
            publish_to=proxy.frontend_endpoint,
            allow_publish=True,
        )
    )
    try:
        yield f"ws://127.0.0.1:{server.port}/ws"
    finally:
        await server.close()


async def test_an_event_sent_by_one_tap_reaches_another(bridge_url: str) -> None:
    stop = asyncio.Event()
    out = io.StringIO()
    listener = asyncio.create_task(
        listen(TapOptions(url=bridge_url, expect=6, duration=scaled(20)), out, stop)
    )
    await wait_listening(bridge_url)
    sent_out = io.StringIO()
    acked, errors = await send(bridge_url, "all", 1, "tap-test", sent_out, spacing=0.01)
    assert (acked, errors) == (6, [])
    summary = await asyncio.wait_for(listener, scaled(20))
    assert summary["by_type"] == {
        "ai_decision": 1,
        "market_data": 1,
        "position_update": 1,
        "system_status": 1,
        "trading_decision": 1,
        "trading_loop": 1,
    }
    assert summary["gaps"] == 0
    assert summary["latency_ms"]["count"] == 6
    assert 0 <= summary["latency_ms"]["max"] < scaled(5_000)
    lines = out.getvalue().splitlines()
    assert any(" market_data.BTC-USD #1 from tap-test " in line for line in lines)
    assert sent_out.getvalue().count("acknowledged") == 6


async def test_topics_filter_what_the_tap_receives(bridge_url: str) -> None:
    out = io.StringIO()
    options = TapOptions(url=bridge_url, topics=["ai_decision"], expect=1, json_output=True)
    listener = asyncio.create_task(listen(options, out, asyncio.Event()))
    await wait_listening(bridge_url)
    acked, _ = await send(bridge_url, "all", 1, "tap-test", io.StringIO(), spacing=0.01)
    assert acked == 6
    summary = await asyncio.wait_for(listener, scaled(20))
    assert summary["by_type"] == {"ai_decision": 1}
    received = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [m["type"] for m in received if "data" in m] == ["ai_decision"]


async def test_publishing_is_refused_without_permission(proxy: Proxy) -> None:
    server = await start_bridge(
        BridgeConfig(port=0, bus=proxy.backend_endpoint, snapshot=proxy.snapshot_endpoint)
    )
    try:
        acked, errors = await send(
            f"ws://127.0.0.1:{server.port}/ws", "market_data", 1, "tap-test", io.StringIO()
        )
    finally:
        await server.close()
    assert acked == 0
    assert len(errors) == 1
    assert "publish_forbidden" in errors[0]


async def test_cli_expect_fails_when_nothing_arrives_and_connection_errors_are_clear(
    bridge_url: str,
) -> None:
    quiet = await tap_cli("--url", bridge_url, "--expect", "1", "--duration", "0.5", "--json")
    assert quiet.returncode == 1
    summary = json.loads(quiet.stdout.strip().splitlines()[-1])
    assert summary["type"] == "tap_summary"
    assert summary["events"] == 0
    assert "expected 1 events, 0 arrived" in quiet.stderr
    refused = await tap_cli("--url", "ws://127.0.0.1:1/ws", "--duration", "1")
    assert refused.returncode == 2
    assert "tradebus tap: error: cannot connect to ws://127.0.0.1:1/ws" in refused.stderr


async def test_quiet_prints_nothing_but_the_summary(bridge_url: str) -> None:
    logs_on = {"TRADEBUS_LOG_LEVEL": "INFO"}  # --quiet alone must silence the INFO lines
    listener = asyncio.create_task(
        tap_cli("--url", bridge_url, "--expect", "1", "--duration", "20", "--quiet", **logs_on)
    )
    await wait_listening(bridge_url, subscribers=1)
    sender = await tap_cli(
        "--url", bridge_url, "--send", "trading_loop", "--quiet", "--source", "loop", **logs_on
    )
    assert sender.returncode == 0, sender.stderr
    assert (sender.stdout, sender.stderr) == ("tap: 1 acknowledged, 0 refused\n", "")
    listened = await asyncio.wait_for(listener, scaled(30))
    assert listened.returncode == 0, listened.stderr
    assert listened.stderr == ""
    assert listened.stdout.startswith("tap summary: 1 events"), listened.stdout
    assert "  trading_loop           1" in listened.stdout
    assert "from loop" not in listened.stdout  # no event lines


async def test_cli_send_and_expect_round_trip(bridge_url: str) -> None:
    listener = asyncio.create_task(
        tap_cli("--url", bridge_url, "--expect", "2", "--duration", "20", "--quiet")
    )
    await wait_listening(bridge_url, subscribers=1)
    sender = await tap_cli("--url", bridge_url, "--send", "market_data", "--repeat", "2")
    assert sender.returncode == 0, sender.stderr
    assert "2 acknowledged, 0 refused" in sender.stdout
    listened = await asyncio.wait_for(listener, scaled(30))
    assert listened.returncode == 0, listened.stderr
    assert "tap summary: 2 events" in listened.stdout
    assert "market_data" in listened.stdout


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


async def tap_cli(*args: str, **environment: str) -> Finished:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tradebus",
        "tap",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TRADEBUS_LOG_LEVEL": "WARNING", **environment},
    )
    out, err = await asyncio.wait_for(process.communicate(), scaled(40))
    assert process.returncode is not None
    return Finished(process.returncode, out.decode(), err.decode())


async def wait_listening(url: str, subscribers: int = 1) -> None:
    """Wait until the bridge counts the listening tap(s) among its clients."""
    port = url.split(":")[2].split("/")[0]

    async def counted() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/ready") as reply,
        ):
            body = await reply.json()
        return bool(body.get("clients", 0) >= subscribers)

    await wait_for(counted, "the tap to connect", timeout=20, interval=0.02)


async def test_the_snapshot_is_shown_but_not_counted_as_live(bridge_url: str) -> None:
    acked, _ = await send(bridge_url, "position_update", 1, "earlier", io.StringIO())
    assert acked == 1
    out = io.StringIO()
    options = TapOptions(url=bridge_url, topics=["position_update"], expect=1, snapshot=True)
    listener = asyncio.create_task(listen(options, out, asyncio.Event()))
    await wait_listening(bridge_url)
    acked, _ = await send(bridge_url, "position_update", 1, "later", io.StringIO())
    assert acked == 1
    summary = await asyncio.wait_for(listener, scaled(20))
    assert summary["snapshot_events"] == 1
    assert summary["events"] == 1
    lines = out.getvalue().splitlines()
    assert any("from earlier" in line and "(snapshot)" in line for line in lines)
    assert any("from later" in line and "(snapshot)" not in line for line in lines)


async def test_a_bridge_going_away_or_refusing_a_pattern_fails_the_tap(proxy: Proxy) -> None:
    server = await start_bridge(
        BridgeConfig(port=0, bus=proxy.backend_endpoint, snapshot=proxy.snapshot_endpoint)
    )
    url = f"ws://127.0.0.1:{server.port}/ws"
    try:
        listener = asyncio.create_task(tap_cli("--url", url, "--duration", "20", "--quiet"))
        await wait_listening(url)
        refused = await tap_cli("--url", url, "--topics", "market data", "--duration", "2")
    finally:
        await server.close()
    gone = await asyncio.wait_for(listener, scaled(30))
    assert gone.returncode == 1
    assert "tap: closed by the bridge: code 10" in gone.stderr
    assert refused.returncode == 2
    assert "refused the WebSocket handshake: HTTP 400" in refused.stderr
