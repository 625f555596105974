"""``tradebus tap``: watch or feed a bridge's WebSocket, the guide's test client made real.

Listening (default): connect to ``/ws``, optionally subscribe to ``--topics``, print every
event (readable or ``--json``), and end with a summary: events per type, rate, gaps, and
end-to-end latency percentiles (receive time minus the event's publish timestamp).
``--expect N`` makes the exit status say whether N live events arrived, so scripts can
rely on delivery, not just on a connection opening.

Sending (``--send TYPE``): connect as a publisher (``?role=publisher``) and send the guide's
example events 0.5 s apart, each with an ``id``, and wait for the bridge's acks.

The counting and formatting are pure (``TapStats``, ``guide_events``); the aiohttp client
below feeds them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import orjson

from bus.endpoints import DEFAULT_BRIDGE_URL
from bus.envelope import format_timestamp
from bus.sequence import SeqStatus, SequenceTracker
from bus.settings import argument, bad_value, number, whole_number
from monitoring.logging import configure_logging, get_logger, redact
from tradebus.errors import ToolError

HELP = "watch a bridge's WebSocket (or --send test events to it) and summarise what arrived"

DEFAULT_URL: Final = DEFAULT_BRIDGE_URL
DOCKER_URL: Final = "ws://dashboard-backend:8000/ws"
SEND_CHOICES: Final = (
    "market_data",
    "ai_decision",
    "trading_loop",
    "trading_decision",
    "system_status",
    "position_update",
    "all",
)
SEND_SPACING: Final = 0.5  # seconds between sent events, as the guide's tool did
_MAX_LATENCY_SAMPLES: Final = 1_000_000


# -- pure core ----------------------------------------------------------------------------------
def guide_events(kind: str, now_ns: int, number: int = 1) -> list[dict[str, Any]]:
    """The guide's example events of ``kind`` (or all of them), stamped with ``now_ns``."""
    stamp = format_timestamp(now_ns)
    examples: dict[str, dict[str, Any]] = {
        "market_data": {"symbol": "BTC-USD", "price": 45000.0, "timestamp": stamp},
        "ai_decision": {
            "action": "BUY",
            "reasoning": "Strong bullish signals detected",
            "confidence": 0.85,
            "timestamp": stamp,
        },
        "trading_loop": {
            "price": 45000.0,
            "action": "BUY",
            "confidence": 0.85,
            "symbol": "BTC-USD",
            "timestamp": stamp,
        },
        "trading_decision": {
            "request_id": f"tap-{number}",
            "action": "BUY",
            "confidence": 0.85,
            "reasoning": "Multiple indicators show bullish convergence",
            "price": 45000.0,
            "quantity": 0.1,
            "leverage": 5,
            "indicators": {"rsi": 45.2, "wavetrend": "bullish", "ema_trend": "up"},
            "risk_analysis": {
                "stop_loss": 44000.0,
                "take_profit": 46000.0,
                "risk_reward_ratio": 2.0,
            },
            "timestamp": stamp,
        },
        "system_status": {"status": "healthy", "health": True, "errors": [], "timestamp": stamp},
        "position_update": {
            "symbol": "BTC-USD",
            "side": "long",
            "size": 0.1,
            "entry_price": 45000.0,
            "current_price": 45500.0,
            "unrealized_pnl": 50.0,
            "timestamp": stamp,
        },
    }
    kinds = [k for k in SEND_CHOICES if k != "all"] if kind == "all" else [kind]
    return [{"type": k, "data": examples[k], "timestamp": stamp} for k in kinds]


def parse_timestamp_ns(text: object) -> int | None:
    """Nanoseconds since the epoch of an ISO-8601 timestamp, None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    whole = int(moment.timestamp())
    return whole * 1_000_000_000 + moment.microsecond * 1_000


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered) - 1e-9)))
    return ordered[rank - 1]


@dataclass
class TapStats:
    """What a tap saw: live and snapshot events by type, gaps, latency; fed plain dicts."""

    started_ns: int
    only_source: str | None = None  # count events of this source only (``--from``)
    ignored: int = 0  # events of other sources
    events: Counter[str] = field(default_factory=Counter)
    snapshot_events: int = 0
    control: Counter[str] = field(default_factory=Counter)
    gaps_seen: int = 0  # by the tap's own sequence tracking
    missed_seen: int = 0
    gaps_reported: int = 0  # by the bridge's ``gap`` messages
    missed_reported: int = 0
    duplicates: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    last_ns: int = 0
    _in_snapshot: bool = False
    _tracker: SequenceTracker = field(default_factory=SequenceTracker)

    @property
    def live(self) -> int:
        return sum(self.events.values())

    def observe(self, message: Any, received_ns: int) -> str:
        """Account for one message; its kind: "event", "snapshot", "control" or "ignored"."""
        self.last_ns = received_ns
        if not isinstance(message, dict):
            self.control["invalid"] += 1
            return "control"
        kind = message.get("type")
        data = message.get("data")
        if isinstance(kind, str) and isinstance(data, dict) and "topic" in message:
            if self.only_source is not None and message.get("source") != self.only_source:
                self.ignored += 1
                return "ignored"
            return self._event(kind, message, received_ns)
        name = kind if isinstance(kind, str) else "invalid"
        self.control[name] += 1
        if name == "snapshot_begin":
            self._in_snapshot = True
        elif name == "snapshot_end":
            self._in_snapshot = False
        elif name == "gap":
            self.gaps_reported += 1
            missed = message.get("missed")
            self.missed_reported += missed if isinstance(missed, int) else 0
        elif name == "error":
            self.errors.append(f"{message.get('code')}: {message.get('message')}")
        return "control"

    def _event(self, kind: str, message: dict[str, Any], received_ns: int) -> str:
        source, topic = message.get("source"), message.get("topic")
        epoch, seq = message.get("epoch"), message.get("seq")
        if (
            isinstance(source, str)
            and isinstance(topic, str)
            and isinstance(epoch, int)
            and isinstance(seq, int)
        ):
            result = self._tracker.observe(source, topic, epoch, seq)
            if result.status is SeqStatus.GAP and not self._in_snapshot:
                self.gaps_seen += 1
                self.missed_seen += result.missed
            elif not result.deliver:
                self.duplicates += 1
        if self._in_snapshot:
            self.snapshot_events += 1
            return "snapshot"
        self.events[kind] += 1
        published = parse_timestamp_ns(message.get("timestamp"))
        if published is not None and len(self.latencies_ms) < _MAX_LATENCY_SAMPLES:
            self.latencies_ms.append((received_ns - published) / 1e6)
        return "event"

    def summary(self, now_ns: int) -> dict[str, Any]:
        seconds = max((now_ns - self.started_ns) / 1e9, 1e-9)
        ordered = sorted(self.latencies_ms)
        return {
            "type": "tap_summary",
            "duration_s": round(seconds, 3),
            "events": self.live,
            "rate_per_s": round(self.live / seconds, 2),
            "by_type": dict(sorted(self.events.items())),
            "snapshot_events": self.snapshot_events,
            "gaps": self.gaps_seen + self.gaps_reported,
            "missed": self.missed_seen + self.missed_reported,
            "duplicates": self.duplicates,
            "ignored_other_sources": self.ignored,
            # none measured: null, not a latency of 0
            "latency_ms": {
                "count": len(ordered),
                "p50": round(percentile(ordered, 0.50), 3) if ordered else None,
                "p90": round(percentile(ordered, 0.90), 3) if ordered else None,
                "p99": round(percentile(ordered, 0.99), 3) if ordered else None,
                "max": round(ordered[-1], 3) if ordered else None,
            },
            "control": dict(sorted(self.control.items())),
            "errors": self.errors,
        }


def format_event(message: dict[str, Any], received_ns: int, kind: str) -> str:
    """One readable line for an event or control message."""
    clock = format_timestamp(received_ns)[11:23]
    if kind == "control":
        body = {k: v for k, v in message.items() if k != "type"}
        return f"{clock} [{message.get('type')}] {orjson.dumps(body).decode()}"
    published = parse_timestamp_ns(message.get("timestamp"))
    latency = f" {(received_ns - published) / 1e6:.1f}ms" if published else ""
    marker = " (snapshot)" if kind == "snapshot" else ""
    data = orjson.dumps(message.get("data")).decode()
    if len(data) > 160:
        data = data[:157] + "..."
    return (
        f"{clock} {message.get('topic')} #{message.get('seq')} from {message.get('source')}"
        f"{latency}{marker} {data}"
    )


def format_summary(summary: dict[str, Any]) -> str:
    latency = summary["latency_ms"]
    lines = [
        f"tap summary: {summary['events']} events in {summary['duration_s']:.1f} s "
        f"({summary['rate_per_s']:.1f}/s), {summary['gaps']} gaps ({summary['missed']} missed), "
        f"{summary['snapshot_events']} snapshot events, {summary['duplicates']} duplicates",
    ]
    lines += [f"  {name:<22} {count}" for name, count in summary["by_type"].items()]
    if summary["ignored_other_sources"]:
        lines.append(f"  ({summary['ignored_other_sources']} events of other sources ignored)")
    shown = {
        name: "-" if latency[name] is None else f"{latency[name]:.2f}"
        for name in ("p50", "p90", "p99", "max")
    }
    lines.append(
        f"latency ms: p50 {shown['p50']}  p90 {shown['p90']}  "
        f"p99 {shown['p99']}  max {shown['max']}  (n={latency['count']})"
    )
    lines += [f"error from bridge: {text}" for text in summary["errors"]]
    return "\n".join(lines)


def with_query(url: str, params: dict[str, str]) -> str:
    """``url`` with ``params`` added to its query string."""
    parts = urlsplit(url)
    extra = urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query and extra else parts.query or extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


# -- aiohttp adapter ---------------------------------------------------------------------------
@dataclass
class TapOptions:
    url: str = DEFAULT_URL
    duration: float | None = None
    topics: list[str] = field(default_factory=list)
    snapshot: bool = False
    expect: int | None = None
    json_output: bool = False
    quiet: bool = False
    only_source: str | None = None
    token: str | None = None
    connect_timeout: float = 10.0


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _connect(
    session: aiohttp.ClientSession, url: str, token: str | None, connect_seconds: float
) -> aiohttp.ClientWebSocketResponse:
    try:
        return await session.ws_connect(
            url,
            headers=_headers(token),
            timeout=aiohttp.ClientWSTimeout(ws_close=connect_seconds),
            autoping=True,
            max_msg_size=0,
        )
    except aiohttp.WSServerHandshakeError as error:
        raise ToolError(
            f"{redact(url)} refused the WebSocket handshake: HTTP {error.status}"
        ) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as error:
        raise ToolError(
            redact(f"cannot connect to {url}: {error or type(error).__name__}")
        ) from None


async def listen(
    options: TapOptions,
    out: TextIO,
    stop: asyncio.Event,
    clock_ns: Callable[[], int] = time.time_ns,
) -> dict[str, Any]:
    """Run a listening tap until ``stop``, the duration or ``--expect`` is reached."""
    log = get_logger("tap")
    stats = TapStats(started_ns=clock_ns(), only_source=options.only_source)
    url = options.url
    if options.topics:
        # subscribing in the URL takes effect at connect: no moment of "everything" first
        url = with_query(url, {"topics": ",".join(options.topics)})
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=options.connect_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        ws = await _connect(session, url, options.token, options.connect_timeout)
        async with ws:
            log.info("tap.websocket_connected", url=options.url, topics=options.topics or None)
            deadline = None if options.duration is None else time.monotonic() + options.duration
            stopping = asyncio.ensure_future(stop.wait())
            try:
                while not stop.is_set():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    receiving = asyncio.ensure_future(ws.receive())
                    done, _ = await asyncio.wait(
                        {receiving, stopping},
                        timeout=remaining,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if receiving not in done:
                        receiving.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await receiving
                        break
                    message = receiving.result()
                    if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                        received = clock_ns()
                        try:
                            body = orjson.loads(message.data)
                        except orjson.JSONDecodeError:
                            stats.control["invalid"] += 1
                            continue
                        kind = stats.observe(body, received)
                        _print_message(options, out, body, received, kind)
                        if kind == "control" and body.get("type") in ("subscribed",):
                            log.info("tap.subscribed", topics=body.get("topics"))
                        if options.expect is not None and stats.live >= options.expect:
                            break
                    elif message.type in (
                        aiohttp.WSMsgType.CLOSE,
                        aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.CLOSED,
                    ):
                        code = ws.close_code
                        reason = message.extra if isinstance(message.extra, str) else ""
                        stats.errors.append(f"closed by the bridge: code {code} {reason}".strip())
                        log.warning("tap.websocket_closed", code=code, reason=reason)
                        break
                    elif message.type is aiohttp.WSMsgType.ERROR:
                        stats.errors.append(f"connection error: {ws.exception()}")
                        break
            finally:
                stopping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stopping
    return stats.summary(clock_ns())


def _print_message(
    options: TapOptions, out: TextIO, body: Any, received_ns: int, kind: str
) -> None:
    if options.quiet or kind == "ignored" or (kind == "snapshot" and not options.snapshot):
        return
    if options.json_output:
        out.write(orjson.dumps(body).decode() + "\n")
    elif isinstance(body, dict):
        out.write(format_event(body, received_ns, kind) + "\n")
    out.flush()


async def send(
    url: str,
    kind: str,
    repeat: int,
    source: str,
    out: TextIO,
    token: str | None = None,
    ack_timeout: float = 5.0,
    spacing: float = SEND_SPACING,
    quiet: bool = False,
) -> tuple[int, list[str]]:
    """Publish the guide's events through the bridge; return (acked, errors).

    Each answer is a line on ``out``; ``quiet`` leaves out the acknowledged ones."""
    log = get_logger("tap")
    epoch = time.time_ns()
    query = {"role": "publisher", "epoch": str(epoch)}
    if source:
        # without one the bridge names the source: the publish token's own
        query["source"] = source
    target = with_query(url, query)
    acked = 0
    errors: list[str] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=ack_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        ws = await _connect(session, target, token, ack_timeout)
        async with ws:
            log.info("tap.websocket_connected", url=url, role="publisher", source=source)
            number = 0
            for round_number in range(1, repeat + 1):
                for event in guide_events(kind, time.time_ns(), round_number):
                    if number:
                        await asyncio.sleep(spacing)
                    number += 1
                    event["id"] = number
                    await ws.send_str(orjson.dumps(event).decode())
                    log.info("tap.websocket_publish", type=event["type"], id=number)
                    answer = await _await_answer(ws, number, ack_timeout)
                    if answer.get("type") == "ack":
                        acked += 1
                        if not quiet:
                            out.write(f"sent {event['type']} id={number}: acknowledged\n")
                    else:
                        text = f"{answer.get('code')}: {answer.get('message')}"
                        errors.append(f"{event['type']} id={number}: {text}")
                        out.write(f"sent {event['type']} id={number}: REFUSED {text}\n")
                        if answer.get("code") in ("publish_forbidden", "closed", "timeout"):
                            return acked, errors
                    out.flush()
    return acked, errors


async def _await_answer(
    ws: aiohttp.ClientWebSocketResponse, number: int, wait_seconds: float
) -> dict[str, Any]:
    """The bridge's ack or error for message ``number`` (other messages are skipped)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            text = f"no ack within {wait_seconds} s"
            return {"type": "error", "code": "timeout", "message": text}
        try:
            message = await ws.receive(timeout=remaining)
        except TimeoutError:
            continue
        if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            reason = message.extra if isinstance(message.extra, str) else ""
            return {
                "type": "error",
                "code": "closed",
                "message": f"connection closed (code {ws.close_code}) {reason}".strip(),
            }
        try:
            body = orjson.loads(message.data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(body, dict):
            continue
        if body.get("type") == "ack" and body.get("id") == number:
            return body
        # an error naming no id (e.g. publish_forbidden at connect) answers this one too
        if body.get("type") == "error" and body.get("id") in (number, None):
            return body


# -- command line ------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=DEFAULT_URL, help="the bridge's WebSocket URL (default %(default)s)"
    )
    parser.add_argument(
        "--docker-url",
        action="store_const",
        const=DOCKER_URL,
        dest="url",
        help=f"use {DOCKER_URL} (inside the compose network)",
    )
    parser.add_argument(
        "--duration",
        type=argument(number(0, what="seconds")),
        help="seconds to listen (default: until Ctrl-C; 30 with --expect)",
    )
    parser.add_argument(
        "--topics",
        default="",
        help="comma-separated topic patterns to subscribe to (default: everything)",
    )
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="also print the snapshot the bridge sends on subscribing (the latest event of "
        "each matching topic); it is counted apart from live events either way",
    )
    parser.add_argument(
        "--expect",
        type=argument(whole_number(0)),
        help="stop once N live events arrived; exit status 1 if fewer arrived in time "
        "(it is 1 too when the bridge reports an error or closes the connection)",
    )
    parser.add_argument(
        "--send", choices=SEND_CHOICES, help="publish the guide's example event(s) instead"
    )
    parser.add_argument(
        "--repeat",
        type=argument(whole_number(0)),
        default=1,
        help="with --send, rounds of events (default 1)",
    )
    parser.add_argument(
        "--source",
        help="with --send, the source id to publish as (default: the token's source, "
        "or tap-<pid> without a token)",
    )
    parser.add_argument("--json", action="store_true", help="print messages as JSON lines")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print only the summary (and problems: refusals, warnings, errors)",
    )
    parser.add_argument(
        "--from",
        dest="only_source",
        metavar="SOURCE",
        help="show and count only the events of this source id (others are just counted)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TRADEBUS_TOKEN"),
        help="bearer token when the bridge requires one (default: env TRADEBUS_TOKEN)",
    )


def check_url(url: str) -> str:
    """``url`` if it is a bridge's WebSocket URL, else ToolError naming --url."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        expected = "a ws:// or wss:// URL such as ws://localhost:8000/ws"
        raise ToolError(bad_value("--url", redact(url), expected))
    return url


def run(args: argparse.Namespace) -> int:
    configure_logging(logging.WARNING if args.quiet else None)
    check_url(args.url)
    if args.send:
        acked, errors = asyncio.run(
            send(
                args.url,
                args.send,
                args.repeat,
                args.source or ("" if args.token else f"tap-{os.getpid()}"),
                sys.stdout,
                args.token,
                quiet=args.quiet,
            )
        )
        print(f"tap: {acked} acknowledged, {len(errors)} refused")
        return 0 if not errors else 1
    options = TapOptions(
        url=args.url,
        duration=args.duration if args.duration or args.expect is None else 30.0,
        topics=[t.strip() for t in args.topics.split(",") if t.strip()],
        snapshot=args.snapshot,
        expect=args.expect,
        json_output=args.json,
        quiet=args.quiet,
        only_source=args.only_source,
        token=args.token,
    )
    summary = asyncio.run(_listen_until_signal(options))
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        print(format_summary(summary))
    failed = False
    if options.expect is not None and summary["events"] < options.expect:
        print(
            f"tap: expected {options.expect} events, {summary['events']} arrived",
            file=sys.stderr,
        )
        failed = True
    if summary["errors"]:
        # a refused pattern or a closed connection: what was asked for was not watched
        print(f"tap: {summary['errors'][0]}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


async def _listen_until_signal(options: TapOptions) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        return await listen(options, sys.stdout, stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
