"""The demo bot's simulation: a pure generator, tested with plain values."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
import zmq

from bus.envelope import Event
from bus.errors import TopicError
from bus.proxy import Proxy
from bus.topics import make_topic
from tests.conftest import scaled, synced_subscriber
from tradebus.demo import DemoEvent, DemoSession, DemoSettings, play, rsi

START = 1_705_746_600.0  # 2024-01-20T10:30:00Z


def take(session: DemoSession, seconds: float) -> list[DemoEvent]:
    return list(itertools.takewhile(lambda e: e.at <= seconds, session.events()))


def test_same_seed_same_session() -> None:
    first = take(DemoSession(random.Random(7), START), 60)
    second = take(DemoSession(random.Random(7), START), 60)
    other = take(DemoSession(random.Random(8), START), 60)
    assert first == second
    assert first != other


def test_a_session_has_every_kind_of_event_in_time_order() -> None:
    events = take(DemoSession(random.Random(1), START), 120)
    kinds = Counter(e.type for e in events)
    for kind in (
        "market_data",
        "ai_decision",
        "trading_decision",
        "trading_loop",
        "indicator_update",
        "position_update",
        "trade_execution",
        "system_status",
        "performance_update",
    ):
        assert kinds[kind] > 0, kind
    assert [e.at for e in events] == sorted(e.at for e in events)
    # 3 symbols every 0.25 s for 120 s
    assert kinds["market_data"] == 3 * 480
    # a heartbeat at start and every 5 s
    assert kinds["system_status"] == 1 + 24
    for event in events:
        make_topic(event.type, event.key)  # every topic is valid


def test_events_have_the_guides_shapes() -> None:
    events = take(DemoSession(random.Random(3), START), 120)
    first = {e.type: e.data for e in reversed(events)}
    assert set(first["market_data"]) == {"symbol", "price", "timestamp"}
    assert first["market_data"]["timestamp"].startswith("2024-01-20T10:")
    assert {"action", "reasoning", "confidence", "timestamp"} <= set(first["ai_decision"])
    decision = first["trading_decision"]
    assert {
        "request_id",
        "action",
        "confidence",
        "reasoning",
        "price",
        "quantity",
        "leverage",
        "indicators",
        "risk_analysis",
        "timestamp",
    } <= set(decision)
    assert set(decision["risk_analysis"]) == {"stop_loss", "take_profit", "risk_reward_ratio"}
    assert decision["action"] in {"BUY", "SELL", "HOLD"}
    assert 0.5 <= decision["confidence"] <= 0.95
    assert set(first["system_status"]) >= {"status", "health", "errors", "timestamp"}
    assert {
        "symbol",
        "side",
        "size",
        "entry_price",
        "current_price",
        "unrealized_pnl",
    } <= set(first["position_update"])


def test_risk_figures_are_consistent_with_the_action() -> None:
    events = take(DemoSession(random.Random(5), START), 600)
    decisions = [e.data for e in events if e.type == "trading_decision"]
    trades = [d for d in decisions if d["action"] != "HOLD"]
    assert trades, "ten minutes without a trade is not a believable session"
    for d in trades:
        risk = d["risk_analysis"]
        if d["action"] == "BUY":
            assert risk["stop_loss"] < d["price"] < risk["take_profit"]
        else:
            assert risk["take_profit"] < d["price"] < risk["stop_loss"]
        loss = abs(d["price"] - risk["stop_loss"])
        gain = abs(risk["take_profit"] - d["price"])
        assert gain / loss == pytest.approx(risk["risk_reward_ratio"], rel=0.02)


@pytest.mark.parametrize("seed", range(6))
def test_decisions_agree_with_the_indicators_they_print(seed: int) -> None:
    events = take(DemoSession(random.Random(seed), START), 1800)
    decisions = [e.data for e in events if e.type == "trading_decision"]
    assert any(d["action"] != "HOLD" for d in decisions)
    for d in decisions:
        rsi_value = d["indicators"]["rsi"]
        trend_up = d["indicators"]["ema_trend"] == "up"
        bullish = d["indicators"]["wavetrend"] == "bullish"
        zone = "oversold" if rsi_value < 35 else "overbought" if rsi_value > 65 else "neutral"
        assert f"RSI {rsi_value:.1f} ({zone})" in d["reasoning"], d
        opening = "entering" in d["reasoning"]
        if d["action"] == "BUY" and opening:
            assert zone != "overbought", d  # never buys into an overbought market
            assert trend_up or bullish, d
        if d["action"] == "SELL" and opening:
            assert zone != "oversold", d
            assert not trend_up or not bullish, d
        if "bullish convergence" in d["reasoning"]:
            assert trend_up, d
            assert bullish, d
        if "bearish convergence" in d["reasoning"]:
            assert not trend_up, d
            assert not bullish, d


def test_positions_track_pnl_of_the_current_price() -> None:
    session = DemoSession(random.Random(11), START)
    events = take(session, 600)
    updates = [e.data for e in events if e.type == "position_update" and e.data["side"] != "flat"]
    assert updates
    for u in updates:
        direction = 1 if u["side"] == "long" else -1
        expected = (u["current_price"] - u["entry_price"]) * u["size"] * direction
        assert u["unrealized_pnl"] == pytest.approx(expected, abs=0.01)
    # every opened position is closed by a later execution or still open at the end
    executions = [e.data for e in events if e.type == "trade_execution"]
    opens = sum(1 for x in executions if x["trade_action"] == "OPEN")
    closes = sum(1 for x in executions if x["trade_action"].startswith("CLOSE_"))
    assert opens - closes == len(session.positions)
    assert session.trades == closes


def test_prices_walk_but_stay_believable() -> None:
    events = take(DemoSession(random.Random(2), START), 600)
    btc = [e.data["price"] for e in events if e.type == "market_data" and e.key == "BTC-USD"]
    assert len(set(btc)) > len(btc) // 2  # it moves
    # but not absurdly in ten minutes
    assert min(btc) > 0.7 * 45_000
    assert max(btc) < 1.3 * 45_000


def test_settings_choose_symbols_and_pace() -> None:
    settings = DemoSettings(symbols=("BTC/USD", "ETH-PERP"), tick=1.0, decision_every=2.0)
    events = take(DemoSession(random.Random(4), START, settings), 10)
    assert {e.key for e in events if e.type == "market_data"} == {"BTC/USD", "ETH-PERP"}
    assert sum(e.type == "trading_decision" for e in events) == 5


def test_bad_settings_are_refused() -> None:
    with pytest.raises(TopicError):
        DemoSettings(symbols=("BTC USD",))
    with pytest.raises(ValueError, match="tick"):
        DemoSettings(tick=0)
    with pytest.raises(ValueError, match="at least one symbol"):
        DemoSettings(symbols=())


def test_rsi() -> None:
    assert rsi([1.0]) == 50.0
    assert rsi([1.0, 2.0, 3.0]) == 100.0
    assert rsi([3.0, 2.0, 1.0]) == 0.0
    assert rsi([1.0, 2.0, 1.0, 2.0, 1.0]) == pytest.approx(50.0)


class ListSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any, str | None]] = []
        self.first = asyncio.Event()

    def publish(self, type_name: str, data: Any, key: str | None = None) -> None:
        self.events.append((type_name, data, key))
        self.first.set()


async def test_play_publishes_in_order_until_the_duration() -> None:
    sink = ListSink()
    expected = take(DemoSession(random.Random(9), START), 10)
    count = await play(
        DemoSession(random.Random(9), START).events(),
        sink,
        asyncio.Event(),
        speed=1000,
        duration=10,
    )
    assert count == len(expected)
    assert sink.events == [(e.type, e.data, e.key) for e in expected]


async def test_play_stops_when_told() -> None:
    sink = ListSink()
    stop = asyncio.Event()
    task = asyncio.create_task(
        play(DemoSession(random.Random(9), START).events(), sink, stop, speed=1.0)
    )
    await asyncio.wait_for(sink.first.wait(), scaled(2))
    stop.set()
    count = await asyncio.wait_for(task, scaled(2))
    assert count == len(sink.events)
    assert count < 20  # the heartbeat and at most the first tick or two, not the whole session


def test_tradebus_demo_delivers_its_whole_session_to_the_bus(
    proxy: Proxy, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    expected = take(DemoSession(random.Random(1), START), 2.0)
    with synced_subscriber(proxy, zmq_context) as subscriber:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tradebus",
                "demo",
                "--url",
                proxy.frontend_endpoint,
                "--seed",
                "1",
                "--speed",
                "20",
                "--duration",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=scaled(30),
            env={**os.environ, "SYSTEM__WEBSOCKET_HEARTBEAT_INTERVAL": "0"},
        )
        assert result.returncode == 0, result.stderr
        received = []
        while len(received) < len(expected):
            item = subscriber.recv(scaled(5))
            assert item is not None, f"{len(received)} of {len(expected)} events arrived"
            received.append(item)
    assert all(isinstance(e, Event) for e in received), "a gap was reported"
    events = [e for e in received if isinstance(e, Event)]
    assert {e.source for e in events} == {"demo-bot"}
    # the same seed gives the same session; only the timestamps differ
    assert [(e.type, e.topic) for e in events] == [
        (x.type, x.type if x.key is None else f"{x.type}.{x.key}") for x in expected
    ]
    assert [without_timestamp(e.data) for e in events] == [
        without_timestamp(x.data) for x in expected
    ]


def without_timestamp(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "timestamp"}
