"""The proxy's history (bus/history.py) on the wire: events after positions, exactly as
published, complete only when provably so; bounds and evictions counted (issue 13)."""

from __future__ import annotations

import time

import pytest
import zmq

from bus.envelope import encode_event
from bus.history import BusHistory, HistoryPosition
from bus.proxy import Proxy, history_request
from tests.support import loopback_proxy_config, wait_until
from tests.test_proxy import Context, connected_publisher, request

pytestmark = pytest.mark.timeout(30)
EPOCH = time.time_ns()


def history_proxy(context: Context, **changes: object) -> Proxy:
    config = loopback_proxy_config(
        **changes,  # type: ignore[arg-type]
    )
    proxy = Proxy(config, context=context)
    proxy.start()
    return proxy


def publish(socket: zmq.Socket[bytes], topic: str, seqs: list[int]) -> dict[int, list[bytes]]:
    sent = {}
    for seq in seqs:
        frames = encode_event(topic, topic.partition(".")[0], {"n": seq}, "bot-1", EPOCH, seq)
        socket.send_multipart(frames)
        sent[seq] = frames
    return sent


def ask(
    context: Context, proxy: Proxy, positions: list[tuple[str, int]], patterns: tuple[str, ...] = ()
) -> tuple[bytes, list[list[bytes]]]:
    wanted = [HistoryPosition(t.encode(), b"bot-1", EPOCH, seq) for t, seq in positions]
    reply = request(context, proxy, history_request(b"", wanted, patterns))
    assert reply[0] == b"HISTORY"
    body = reply[2:]
    return reply[1], [body[i : i + 3] for i in range(0, len(body), 3)]


def test_events_after_positions_exactly_as_published(zmq_context: Context) -> None:
    proxy = history_proxy(zmq_context)
    publisher = connected_publisher(zmq_context, proxy)
    try:
        t = publish(publisher, "ai_decision", [1, 2, 3, 4, 5])
        u = publish(publisher, "trading_decision", [1, 2, 3, 10, 11])  # a hole: 4..9
        latest = publish(publisher, "market_data.BTC-USD", [1, 2])
        wait_until(lambda: proxy.cache.stats.events == 12, "the cache thread")

        status, events = ask(zmq_context, proxy, [("ai_decision", 2)])
        assert status == b"ok"
        assert events == [t[3], t[4], t[5]]  # byte for byte, in order

        status, events = ask(zmq_context, proxy, [("ai_decision", 5)], ("market_data",))
        assert status == b"ok"  # nothing missed; an unnamed topic brings its latest
        assert events == [latest[2]]

        status, _events = ask(zmq_context, proxy, [("trading_decision", 1)])
        assert status == b"incomplete"  # across the hole: never claimed complete
        status, events = ask(zmq_context, proxy, [("trading_decision", 10)])
        assert (status, events) == (b"ok", [u[11]])
        status, _events = ask(zmq_context, proxy, [("ai_decision", 2), ("trading_decision", 3)])
        assert status == b"incomplete"  # one position alone makes the whole reply incomplete
        assert proxy.history is not None
        assert (proxy.history.stats.complete, proxy.history.stats.incomplete) == (3, 2)
    finally:
        publisher.close(linger=0)
        proxy.stop()


def test_bounded_by_count_with_evictions_counted(zmq_context: Context) -> None:
    proxy = history_proxy(zmq_context, history_events=3)
    publisher = connected_publisher(zmq_context, proxy)
    try:
        publish(publisher, "ai_decision", list(range(1, 8)))
        wait_until(lambda: proxy.cache.stats.events == 7, "the cache thread")
        status, _ = ask(zmq_context, proxy, [("ai_decision", 1)])
        assert status == b"incomplete"  # 2, 3 and 4 are gone
        status, events = ask(zmq_context, proxy, [("ai_decision", 4)])
        assert (status, len(events)) == (b"ok", 3)
        assert proxy.history is not None
        assert proxy.history.stats.evicted == {"events": 4}
    finally:
        publisher.close(linger=0)
        proxy.stop()


def test_off_and_malformed_requests_get_errors(zmq_context: Context) -> None:
    proxy = history_proxy(zmq_context, history_events=0)
    try:
        assert request(zmq_context, proxy, [b"HISTORY", b"", b"0"]) == [
            b"HISTORY",
            b"error",
            b"history is off",
        ]
    finally:
        proxy.stop()
    proxy = history_proxy(zmq.Context())  # its own context: one proxy per context (ZAP)
    try:
        for body in (
            [b"HISTORY", b"", b"x"],
            [b"HISTORY", b"", b"2", b"t", b"s", b"1", b"1"],
            [b"HISTORY", b"", b"1", b"t", b"s", b"one", b"1"],
            [b"HISTORY", b"", b"0", b"bad pattern"],
        ):
            reply = request(zmq_context, proxy, body)
            assert reply[:2] == [b"HISTORY", b"error"], body
        assert proxy.cache.stats.bad_requests == 4
    finally:
        proxy.stop()
        proxy.context.term()


def test_bounded_by_age_and_memory() -> None:
    """The pure history with an injected clock."""
    meta = encode_event("t", "t", {}, "s", 1, 1)[1]
    history = BusHistory(max_events=100, max_seconds=10.0, max_bytes=10_000)
    payload = b"{" + b" " * 1000 + b"}"
    for second in range(5):
        history.add(b"t", meta, payload, float(second))
    history.expire(12.5)  # events of seconds 0, 1 and 2 are older than 10 s
    assert history.stats.evicted == {"age": 3}
    for _ in range(20):
        history.add(b"u", meta, payload, 13.0)
    assert history.stats.bytes <= 10_000
    assert history.stats.evicted["bytes"] > 0
    assert history.stats.held == sum(len(held) for held in history.topics.values())
