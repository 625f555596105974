"""``tradebus demo``: a simulated trading bot publishing a believable session.

The simulation is a pure generator (``DemoSession.events``): random-walk prices for several
symbols, periodic AI and trading decisions with reasoning and risk figures, positions that
open, move and close with PnL, indicator updates and status heartbeats. Time and randomness
are injected (a start time and a ``random.Random``), so a seed reproduces a session exactly.
The adapter below paces those events on the real clock and hands them to a bot_client
publisher, so the demo exercises the same code path as a real bot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bus.envelope import format_timestamp
from bus.errors import TopicError
from bus.settings import argument, number, port_number
from bus.topics import validate_key
from monitoring.logging import configure_logging, get_logger
from tradebus.errors import ToolError

HELP = "run a simulated trading bot that publishes to a bus (tcp://, ipc://) or bridge (ws://)"

DEFAULT_SYMBOLS: dict[str, float] = {"BTC-USD": 45_000.0, "ETH-USD": 2_500.0, "SOL-USD": 100.0}
# A price for symbols given on the command line that are not in DEFAULT_SYMBOLS.
_OTHER_START_PRICE = 50.0
# with keys, how long start-up waits for the bus to admit or refuse the key
ADMISSION_SECONDS = 5.0


# -- pure simulation ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DemoEvent:
    """One event to publish ``at`` seconds after the session start."""

    at: float
    type: str
    data: dict[str, Any]
    key: str | None = None


@dataclass(frozen=True, slots=True)
class DemoSettings:
    symbols: tuple[str, ...] = tuple(DEFAULT_SYMBOLS)
    tick: float = 0.25  # seconds between market data updates of every symbol
    decision_every: float = 6.0  # seconds between AI + trading decisions (symbols in turn)
    position_every: float = 1.0
    indicators_every: float = 2.0
    heartbeat_every: float = 5.0
    performance_every: float = 15.0
    volatility: float = 0.0012  # standard deviation of one tick's log return
    notional: float = 5_000.0  # account currency per trade before leverage

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("the demo needs at least one symbol")
        for symbol in self.symbols:
            validate_key(symbol)
        for name in ("tick", "decision_every", "position_every", "indicators_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be above 0")


@dataclass(slots=True)
class _Position:
    side: str  # "long" or "short"
    size: float
    entry_price: float
    stop_loss: float
    take_profit: float
    leverage: int

    def pnl(self, price: float) -> float:
        direction = 1.0 if self.side == "long" else -1.0
        return (price - self.entry_price) * self.size * direction


@dataclass(slots=True)
class _Market:
    price: float
    drift: float = 0.0  # per-tick log drift, redrawn now and then: trends, not just noise
    history: deque[float] = field(default_factory=lambda: deque(maxlen=60))
    ema_fast: float = 0.0
    ema_slow: float = 0.0


def _round_price(price: float) -> float:
    # Quote like an exchange would: 2 decimals above 1, more below.
    return round(price, 2 if price >= 1 else 6)


def rsi_zone(value: float) -> str:
    """How the demo reads an RSI value: below 35 oversold, above 65 overbought."""
    return "oversold" if value < 35 else "overbought" if value > 65 else "neutral"


def rsi(prices: Sequence[float], period: int = 14) -> float:
    """Wilder's relative strength index of the last ``period`` changes (50 when flat/short)."""
    if len(prices) < 2:
        return 50.0
    window = prices[-period - 1 :]
    changes = [b - a for a, b in itertools.pairwise(window)]
    gains = sum(c for c in changes if c > 0)
    losses = -sum(c for c in changes if c < 0)
    if gains == losses == 0:
        return 50.0
    if losses == 0:
        return 100.0
    return 100.0 - 100.0 / (1.0 + gains / losses)


class DemoSession:
    """A deterministic simulated trading session; iterate ``events()`` for ever."""

    def __init__(
        self,
        rng: random.Random,
        start_time: float,
        settings: DemoSettings | None = None,
        start_prices: dict[str, float] | None = None,
    ) -> None:
        self.settings = settings or DemoSettings()
        self.rng = rng
        self.start_time = start_time
        prices = start_prices or {}
        self.markets = {
            s: _Market(prices.get(s, DEFAULT_SYMBOLS.get(s, _OTHER_START_PRICE)))
            for s in self.settings.symbols
        }
        for market in self.markets.values():
            market.ema_fast = market.ema_slow = market.price
            market.history.append(market.price)
        self.positions: dict[str, _Position] = {}
        self.realized_pnl = 0.0
        self.trades = 0
        self.wins = 0
        self.decisions = 0
        self._order_number = 0

    # Timestamps inside ``data`` are the simulated wall clock, in the guide's ISO form.
    def _stamp(self, at: float) -> str:
        return format_timestamp(int((self.start_time + at) * 1e9))

    def events(self) -> Iterator[DemoEvent]:
        settings = self.settings
        tick = 0
        every = {
            name: max(1, round(getattr(settings, name) / settings.tick))
            for name in (
                "decision_every",
                "position_every",
                "indicators_every",
                "heartbeat_every",
                "performance_every",
            )
        }
        yield from self._heartbeat(0.0)
        while True:
            tick += 1
            at = tick * settings.tick
            yield from self._step_prices(at)
            yield from self._check_exits(at)
            if tick % every["indicators_every"] == 0:
                yield from self._indicators(at)
            if tick % every["decision_every"] == 0:
                symbols = settings.symbols
                symbol = symbols[(tick // every["decision_every"] - 1) % len(symbols)]
                yield from self._decide(at, symbol)
            if tick % every["position_every"] == 0:
                yield from self._position_updates(at)
            if tick % every["heartbeat_every"] == 0:
                yield from self._heartbeat(at)
            if tick % every["performance_every"] == 0:
                yield self._performance(at)

    def _step_prices(self, at: float) -> Iterator[DemoEvent]:
        rng = self.rng
        volatility = self.settings.volatility
        for symbol, market in self.markets.items():
            if rng.random() < 0.01:
                market.drift = rng.gauss(0.0, volatility / 4)
            shock = rng.gauss(market.drift, volatility)
            market.price = _round_price(market.price * math.exp(shock))
            market.history.append(market.price)
            market.ema_fast += (market.price - market.ema_fast) * (2 / 13)
            market.ema_slow += (market.price - market.ema_slow) * (2 / 27)
            yield DemoEvent(
                at,
                "market_data",
                {"symbol": symbol, "price": market.price, "timestamp": self._stamp(at)},
                symbol,
            )

    def _indicator_values(self, symbol: str) -> dict[str, Any]:
        market = self.markets[symbol]
        history = list(market.history)
        momentum = history[-1] - history[max(0, len(history) - 10)]
        return {
            "rsi": round(rsi(history), 1),
            "ema_fast": _round_price(market.ema_fast),
            "ema_slow": _round_price(market.ema_slow),
            "ema_trend": "up" if market.ema_fast >= market.ema_slow else "down",
            "wavetrend": "bullish" if momentum > 0 else "bearish",
        }

    def _indicators(self, at: float) -> Iterator[DemoEvent]:
        for symbol in self.markets:
            yield DemoEvent(
                at,
                "indicator_update",
                {"symbol": symbol, "indicators": self._indicator_values(symbol)},
                symbol,
            )

    def _decide(self, at: float, symbol: str) -> Iterator[DemoEvent]:
        rng = self.rng
        market = self.markets[symbol]
        price = market.price
        indicators = self._indicator_values(symbol)
        # A bullish score from the indicators plus the model's own "opinion" (noise).
        score = (50.0 - indicators["rsi"]) / 50.0 * 0.6
        score += 0.35 if indicators["ema_trend"] == "up" else -0.35
        score += 0.2 if indicators["wavetrend"] == "bullish" else -0.2
        score += rng.gauss(0.0, 0.25)
        position = self.positions.get(symbol)
        zone = rsi_zone(indicators["rsi"])
        trend_up = indicators["ema_trend"] == "up"
        bullish = indicators["wavetrend"] == "bullish"
        # The decision must agree with the indicators it prints: no buying into an
        # overbought market or selling into an oversold one, and a trade needs at least
        # one trend signal on its side.
        if score > 0.3 and zone != "overbought" and (trend_up or bullish):
            action = "BUY"
        elif score < -0.3 and zone != "oversold" and not (trend_up and bullish):
            action = "SELL"
        else:
            action = "HOLD"
        if position is not None and (
            (position.side == "long" and action == "BUY")
            or (position.side == "short" and action == "SELL")
        ):
            action = "HOLD"  # already positioned that way
        confidence = round(min(0.95, 0.5 + abs(score) / 2), 2)
        reasoning = self._reasoning(action, indicators, position)
        self.decisions += 1
        request_id = f"req-{self.decisions:06d}"
        yield DemoEvent(
            at,
            "ai_decision",
            {
                "action": action,
                "reasoning": reasoning,
                "confidence": confidence,
                "timestamp": self._stamp(at),
            },
        )
        yield DemoEvent(
            at,
            "trading_loop",
            {"price": price, "action": action, "confidence": confidence, "symbol": symbol},
            symbol,
        )
        stop_distance = rng.uniform(0.01, 0.03)
        reward_multiple = round(rng.uniform(1.5, 3.0), 1)
        direction = 1.0 if action != "SELL" else -1.0
        stop_loss = _round_price(price * (1 - direction * stop_distance))
        take_profit = _round_price(price * (1 + direction * stop_distance * reward_multiple))
        leverage = rng.choice((2, 3, 5))
        quantity = float(f"{self.settings.notional / price:.4g}")
        decision: dict[str, Any] = {
            "request_id": request_id,
            "symbol": symbol,
            "action": action,
            "confidence": confidence,
            "reasoning": reasoning,
            "price": price,
            "quantity": quantity if action != "HOLD" else 0.0,
            "leverage": leverage,
            "indicators": indicators,
            "risk_analysis": {
                "stop_loss": stop_loss,
                "take_profit": take_profit,
                "risk_reward_ratio": reward_multiple,
            },
            "timestamp": self._stamp(at),
        }
        yield DemoEvent(at, "trading_decision", decision)
        if action == "HOLD":
            return
        if position is not None:
            yield from self._close(at, symbol, "signal_reversal")
        else:
            self.positions[symbol] = _Position(
                side="long" if action == "BUY" else "short",
                size=quantity,
                entry_price=price,
                stop_loss=stop_loss,
                take_profit=take_profit,
                leverage=leverage,
            )
            yield self._execution(at, symbol, action, quantity, price, "OPEN")
            yield self._position_update(at, symbol)

    @staticmethod
    def _reasoning(action: str, indicators: dict[str, Any], position: _Position | None) -> str:
        value = indicators["rsi"]
        facts = (
            f"RSI {value:.1f} ({rsi_zone(value)}), EMA trend {indicators['ema_trend']}, "
            f"wavetrend {indicators['wavetrend']}"
        )
        trend_up = indicators["ema_trend"] == "up"
        bullish = indicators["wavetrend"] == "bullish"
        if action == "HOLD":
            return f"{facts}: signals mixed, waiting for confirmation"
        if position is not None:
            return f"{facts}: momentum turned against the {position.side} position, closing it"
        if action == "BUY":
            agreement = "bullish convergence" if trend_up and bullish else "leaning bullish"
            return f"{facts}: {agreement}, entering long"
        agreement = "bearish convergence" if not trend_up and not bullish else "leaning bearish"
        return f"{facts}: {agreement}, entering short"

    def _check_exits(self, at: float) -> Iterator[DemoEvent]:
        for symbol, position in list(self.positions.items()):
            price = self.markets[symbol].price
            long = position.side == "long"
            if (price <= position.stop_loss) if long else (price >= position.stop_loss):
                yield from self._close(at, symbol, "stop_loss")
            elif (price >= position.take_profit) if long else (price <= position.take_profit):
                yield from self._close(at, symbol, "take_profit")

    def _close(self, at: float, symbol: str, reason: str) -> Iterator[DemoEvent]:
        position = self.positions.pop(symbol)
        price = self.markets[symbol].price
        pnl = round(position.pnl(price), 2)
        self.realized_pnl += pnl
        self.trades += 1
        self.wins += pnl > 0
        side = "SELL" if position.side == "long" else "BUY"
        yield self._execution(at, symbol, side, position.size, price, f"CLOSE_{reason.upper()}")
        yield DemoEvent(
            at,
            "position_update",
            {
                "symbol": symbol,
                "side": "flat",
                "size": 0.0,
                "entry_price": position.entry_price,
                "current_price": price,
                "unrealized_pnl": 0.0,
                "realized_pnl": pnl,
                "timestamp": self._stamp(at),
            },
            symbol,
        )

    def _execution(
        self, at: float, symbol: str, side: str, quantity: float, price: float, trade_action: str
    ) -> DemoEvent:
        self._order_number += 1
        return DemoEvent(
            at,
            "trade_execution",
            {
                "order_id": f"ord-{self._order_number:06d}",
                "symbol": symbol,
                "side": side,
                "quantity": quantity,
                "price": price,
                "status": "FILLED",
                "trade_action": trade_action,
            },
            symbol,
        )

    def _position_update(self, at: float, symbol: str) -> DemoEvent:
        position = self.positions[symbol]
        price = self.markets[symbol].price
        return DemoEvent(
            at,
            "position_update",
            {
                "symbol": symbol,
                "side": position.side,
                "size": position.size,
                "entry_price": position.entry_price,
                "current_price": price,
                "unrealized_pnl": round(position.pnl(price), 2),
                "timestamp": self._stamp(at),
            },
            symbol,
        )

    def _position_updates(self, at: float) -> Iterator[DemoEvent]:
        for symbol in list(self.positions):
            yield self._position_update(at, symbol)

    def _heartbeat(self, at: float) -> Iterator[DemoEvent]:
        yield DemoEvent(
            at,
            "system_status",
            {
                "status": "healthy",
                "health": True,
                "errors": [],
                "uptime_seconds": round(at, 1),
                "open_positions": len(self.positions),
                "timestamp": self._stamp(at),
            },
        )

    def _performance(self, at: float) -> DemoEvent:
        unrealized = sum(p.pnl(self.markets[s].price) for s, p in self.positions.items())
        return DemoEvent(
            at,
            "performance_update",
            {
                "realized_pnl": round(self.realized_pnl, 2),
                "unrealized_pnl": round(unrealized, 2),
                "trades": self.trades,
                "win_rate": round(self.wins / self.trades, 3) if self.trades else None,
                "decisions": self.decisions,
                "timestamp": self._stamp(at),
            },
        )


# -- adapter: pace the session on the real clock -----------------------------------------------
class EventSink(Protocol):
    def publish(self, type_name: str, data: Any, key: str | None = None) -> None: ...


async def play(
    events: Iterator[DemoEvent],
    sink: EventSink,
    stop: asyncio.Event,
    *,
    speed: float = 1.0,
    duration: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Publish ``events`` at their simulated times (divided by ``speed``) until ``stop``.

    ``duration`` is in simulated seconds. Returns how many events were published.
    """
    started = clock()
    published = 0
    for event in events:
        if duration is not None and event.at > duration:
            break
        delay = started + event.at / speed - clock()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            break
        sink.publish(event.type, event.data, event.key)
        published += 1
    return published


# -- command line -------------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The simulation's options (``tradebus up`` adds them with the prefix ``demo-``)."""
    parser.add_argument(
        f"--{prefix}symbols",
        default=",".join(DEFAULT_SYMBOLS),
        help="comma-separated symbols to simulate (default %(default)s)",
    )
    parser.add_argument(
        f"--{prefix}seed", type=int, help="random seed: the same seed replays the same session"
    )
    parser.add_argument(
        f"--{prefix}speed",
        type=argument(number(0)),
        default=1.0,
        help="simulated seconds per real second (default 1)",
    )


def demo_settings(symbols_text: str) -> DemoSettings:
    symbols = tuple(s.strip() for s in symbols_text.split(",") if s.strip())
    try:
        return DemoSettings(symbols=symbols)
    except (ValueError, TopicError) as error:
        raise ToolError(f"--symbols {symbols_text!r}: {error}") from None


def make_publisher(
    url: str | None,
    source: str | None,
    context: Any = None,
    *,
    keys: str | None = None,
    key_name: str | None = None,
) -> Any:
    """A bot_client Publisher configured like a guide bot (SYSTEM__* variables) but enabled.

    ``url`` (tcp://, ipc://, ws://, wss://) overrides the environment's. Market data is not
    conflated unless SYSTEM__WEBSOCKET_PUBLISH_INTERVAL asks for it: the demo's charts
    should move at the simulation's pace. ``keys``/``key_name`` override
    SYSTEM__TRADEBUS_KEYS/SYSTEM__TRADEBUS_KEY_NAME; a key the bus refuses stops it here.
    """
    from bot_client.errors import PublisherError
    from bot_client.publisher import Publisher
    from bot_client.settings import BUS_SCHEMES, PublisherSettings, environment

    env = environment()
    overrides: dict[str, Any] = {"enabled": True}
    if "SYSTEM__WEBSOCKET_PUBLISH_INTERVAL" not in env:
        overrides["publish_interval"] = 0.0
    if "SYSTEM__TRADEBUS_SOURCE_ID" not in env or source:
        overrides["source_id"] = source or "demo-bot"
    if url:
        scheme = url.split("://", 1)[0]
        if scheme in BUS_SCHEMES:
            overrides["bus_url"] = url
        else:
            overrides["bus_url"] = None
            overrides["dashboard_url"] = url
    if keys:
        overrides["keys"] = keys
    if key_name:
        overrides["key_name"] = key_name
    try:
        settings = PublisherSettings.from_env(env, **overrides)
    except PublisherError as error:
        raise ToolError(str(error)) from None
    publisher = Publisher(settings, context=context)
    try:
        publisher.wait_admitted(min(settings.timeout, ADMISSION_SECONDS))
    except BaseException:
        publisher.close(0)
        raise
    return publisher


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help="where to publish: tcp://host:5555 or ipc://... (the bus proxy) or ws://host:8000/ws "
        "(a bridge that allows publishing); default $SYSTEM__TRADEBUS_BUS_URL or "
        "$SYSTEM__WEBSOCKET_DASHBOARD_URL or ws://localhost:8000/ws",
    )
    parser.add_argument(
        "--source",
        help="source id (default $SYSTEM__TRADEBUS_SOURCE_ID or demo-bot)",
    )
    parser.add_argument(
        "--keys",
        metavar="DIR",
        help="CURVE key directory for a bus proxy started with --keys: this bot's "
        "NAME.key_secret and the proxy's proxy.key (default $SYSTEM__TRADEBUS_KEYS; "
        "see `tradebus keys --help`)",
    )
    parser.add_argument(
        "--key-name",
        help="which key pair in --keys (default $SYSTEM__TRADEBUS_KEY_NAME, or the only one)",
    )
    add_demo_arguments(parser)
    parser.add_argument(
        "--duration",
        type=argument(number(0)),
        help="simulated seconds to run (default: until Ctrl-C)",
    )
    parser.add_argument(
        "--metrics-port",
        type=argument(port_number()),
        help="serve the publisher's Prometheus metrics (/metrics) and /health on this port",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the metrics port (default %(default)s)",
    )


async def run_demo(
    publisher: EventSink,
    settings: DemoSettings,
    stop: asyncio.Event,
    *,
    seed: int | None = None,
    speed: float = 1.0,
    duration: float | None = None,
) -> int:
    session = DemoSession(random.Random(seed), time.time(), settings)
    return await play(session.events(), publisher, stop, speed=speed, duration=duration)


def run(args: argparse.Namespace) -> int:
    configure_logging()
    log = get_logger("demo")
    settings = demo_settings(args.symbols)
    if args.url is not None:
        from bot_client.settings import check_url

        check_url("--url", args.url)
    publisher = make_publisher(args.url, args.source, keys=args.keys, key_name=args.key_name)
    metrics = None
    if args.metrics_port is not None:
        from prometheus_client import CollectorRegistry

        from monitoring.metrics import MetricsServer, PublisherCollector

        registry = CollectorRegistry()
        registry.register(PublisherCollector(publisher.status, publisher.source))
        metrics = MetricsServer(registry, host=args.metrics_host, port=args.metrics_port)
    log.info(
        "demo.started",
        url=publisher.settings.url,
        source=publisher.source,
        symbols=list(settings.symbols),
        metrics=metrics.url if metrics else None,
    )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await run_demo(
            publisher,
            settings,
            stop,
            seed=args.seed,
            speed=args.speed,
            duration=args.duration,
        )

    try:
        published = asyncio.run(main())
    finally:
        publisher.close()
        if metrics is not None:
            metrics.close()
    log.info("demo.stopped", published=published, **_figures(publisher.status()))
    return 0


def _figures(status: dict[str, Any]) -> dict[str, Any]:
    return {k: status.get(k) for k in ("sent", "queued", "dropped_total", "reconnects")}
