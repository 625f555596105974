"""The proxy in-process: forwarding, the last-value cache, the snapshot service on the wire."""

from __future__ import annotations

import re
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.envelope import encode_event
from bus.errors import EndpointError
from bus.proxy import CaptureQueue, LastValueCache, Proxy, ProxyConfig, drain_capture
from bus.topics import Pattern
from bus.transport import ACCELERATED, _python_recv_message, receiver, send_event
from tests.conftest import scaled
from tests.support import loopback_proxy_config, wait_until

Context = zmq.Context[zmq.Socket[bytes]]


def connected_publisher(context: Context, proxy: Proxy) -> zmq.Socket[bytes]:
    socket: zmq.Socket[bytes] = context.socket(zmq.XPUB)
    socket.linger = 0
    socket.connect(proxy.frontend_endpoint)
    assert socket.poll(int(scaled(5) * 1000)), "no subscribe-all from the proxy"
    assert socket.recv() == b"\x01"
    return socket


def request(
    context: Context, proxy: Proxy, frames: list[bytes], *, delimiter: bool = True
) -> list[bytes]:
    dealer: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(proxy.snapshot_endpoint)
        dealer.send_multipart(([b""] if delimiter else []) + frames)
        assert dealer.poll(int(scaled(5) * 1000)), "no snapshot reply"
        reply = dealer.recv_multipart()
    finally:
        dealer.close(linger=0)
    if delimiter:
        assert reply[0] == b""
        return reply[1:]
    return reply


def test_forwards_events_and_caches_the_latest_per_topic(
    zmq_context: Context, proxy: Proxy
) -> None:
    publisher = connected_publisher(zmq_context, proxy)
    subscriber: zmq.Socket[bytes] = zmq_context.socket(zmq.SUB)
    subscriber.linger = 0
    try:
        subscriber.subscribe(b"")
        subscriber.connect(proxy.backend_endpoint)
        # prove the subscription is in force: publish until one arrives
        probe = encode_event("probe", "probe", {}, "bot", 1, 1)
        deadline = time.monotonic() + scaled(5)
        while not subscriber.poll(10):
            assert time.monotonic() < deadline
            send_event(publisher, *probe)
        while subscriber.poll(50):
            subscriber.recv_multipart()
        sent = [encode_event("market_data.X", "market_data", {"p": n}, "bot", 1, n) for n in (1, 2)]
        for frames in sent:
            send_event(publisher, *frames)
        assert [subscriber.recv_multipart() for _ in sent] == sent
        wait_until(lambda: proxy.cache.stats.events >= 3, "the cache")
        assert proxy.cache.entries[b"market_data.X"][:2] == (sent[1][1], sent[1][2])
        assert proxy.cache.stats.by_type["market_data"] == 2
    finally:
        subscriber.close(linger=0)
        publisher.close(linger=0)


def test_snapshot_with_an_empty_nonce_answers_at_once_sorted_by_topic(
    zmq_context: Context, proxy: Proxy
) -> None:
    publisher = connected_publisher(zmq_context, proxy)
    try:
        for topic in ("b.X", "a.Y", "a.X", "c"):
            send_event(publisher, *encode_event(topic, topic.split(".")[0], {}, "bot", 1, 1))
        wait_until(lambda: proxy.cache.stats.events == 4, "the cache")
        reply = request(zmq_context, proxy, [b"SNAPSHOT", b"", b"a", b"c"])
        assert reply[:2] == [b"SNAPSHOT", b"ok"]
        assert reply[2::3] == [b"a.X", b"a.Y", b"c"]
        everything = request(zmq_context, proxy, [b"SNAPSHOT", b""])
        assert everything[2::3] == [b"a.X", b"a.Y", b"b.X", b"c"]
    finally:
        publisher.close(linger=0)


def test_snapshot_waits_for_the_sync_marker(zmq_context: Context, proxy: Proxy) -> None:
    nonce = secrets.token_hex(8).encode()
    dealer: zmq.Socket[bytes] = zmq_context.socket(zmq.DEALER)
    subscriber: zmq.Socket[bytes] = zmq_context.socket(zmq.SUB)
    for socket in (dealer, subscriber):
        socket.linger = 0
    try:
        dealer.connect(proxy.snapshot_endpoint)
        dealer.send_multipart([b"", b"SNAPSHOT", nonce, b"market_data"])
        assert not dealer.poll(300), "answered before the marker passed"
        subscriber.subscribe(b"\x00sync." + nonce)
        subscriber.connect(proxy.backend_endpoint)
        assert dealer.poll(int(scaled(5) * 1000))
        assert dealer.recv_multipart() == [b"", b"SNAPSHOT", b"ok"]
    finally:
        dealer.close(linger=0)
        subscriber.close(linger=0)


def test_unseen_marker_gives_an_unsynced_snapshot(zmq_context: Context) -> None:
    config = loopback_proxy_config(
        sync_timeout=0.2,
    )
    with Proxy(config, context=zmq_context) as proxy:
        reply = request(zmq_context, proxy, [b"SNAPSHOT", b"never-subscribed"])
        assert reply == [b"SNAPSHOT", b"unsynced"]
        assert proxy.cache.stats.unsynced_snapshots == 1


@pytest.mark.parametrize(
    ("frames", "delimiter", "complaint"),
    [
        ([b"HELLO", b"x"], True, b"expected snapshot"),
        ([b"SNAPSHOT"], True, b"expected snapshot"),
        ([b"SNAPSHOT", b"n", b"market data"], True, b"invalid"),
        ([b"SNAPSHOT", b"n", b"\xff"], True, b"utf-8"),
        ([b"HELLO"], False, b"expected snapshot"),
    ],
)
def test_bad_snapshot_requests_get_an_error_status(
    zmq_context: Context, proxy: Proxy, frames: list[bytes], delimiter: bool, complaint: bytes
) -> None:
    reply = request(zmq_context, proxy, frames, delimiter=delimiter)
    assert reply[:2] == [b"SNAPSHOT", b"error"]
    assert complaint in reply[2].lower()
    assert len(reply) == 3
    assert proxy.cache.stats.bad_requests == 1


def test_port_in_use_and_bad_endpoints_raise_endpoint_errors(
    zmq_context: Context, proxy: Proxy
) -> None:
    taken = proxy.backend_endpoint
    for config, complaint in [
        (ProxyConfig(frontend=taken, backend="tcp://127.0.0.1:*"), "Address already in use"),
        (ProxyConfig(frontend="tcp://127.0.0.1:*", backend="nonsense"), "subscriber (XPUB)"),
        (
            ProxyConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*", snapshot=taken),
            "snapshot",
        ),
    ]:
        # one proxy per ZeroMQ context (it serves the context's ZAP requests)
        with pytest.raises(EndpointError, match=re.escape(complaint)):
            Proxy(config).start()


def test_threads_are_named_by_job(zmq_context: Context) -> None:
    anywhere = "tcp://127.0.0.1:*"
    config = ProxyConfig(frontend=anywhere, backend=anywhere, snapshot=anywhere)
    with Proxy(config, zmq_context) as proxy:
        threads = proxy.threads
        assert sorted(threads) == ["cache", "forwarder"]
        assert all(thread.is_alive() and thread.native_id for thread in threads.values())
    without_cache = replace(config, cache=False)
    with Proxy(without_cache) as proxy:  # its own context: one ZAP handler per context
        assert list(proxy.threads) == ["forwarder"]


def test_proxy_without_cache_forwards_and_has_no_snapshot_socket(zmq_context: Context) -> None:
    config = ProxyConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*", cache=False)
    with Proxy(config, context=zmq_context) as proxy:
        assert proxy.snapshot_endpoint == ""
        publisher = connected_publisher(zmq_context, proxy)
        publisher.close(linger=0)


def test_cache_bounds_topics_and_counts_gaps_duplicates_and_restarts() -> None:
    cache = LastValueCache(max_topics=2)

    def put(topic: str, epoch: int, seq: int) -> None:
        frames = encode_event(topic, "t", {"seq": seq}, "bot", epoch, seq)
        cache.update(frames[0], frames[1], frames[2])

    put("t.A", 1, 1)
    put("t.A", 1, 4)  # gap of 2
    put("t.A", 1, 3)  # late: the newer one stays
    put("t.B", 1, 1)
    put("t.C", 1, 1)  # evicts the oldest topic
    put("t.C", 2, 1)  # the source restarted: no gap
    put("t.C", 1, 2)  # from the old run: ignored
    assert (cache.stats.gaps, cache.stats.missed, cache.stats.evictions) == (1, 2, 1)
    assert sorted(cache.entries) == [b"t.B", b"t.C"]
    assert b'"seq":1' in cache.entries[b"t.C"][1]
    assert cache.stats.topics == 2
    cache.update(b"t.D", b"\x02short", b"{}")
    assert cache.stats.invalid == 1
    frames = cache.matching([Pattern("t.C")])
    assert frames[0] == b"t.C"
    assert len(frames) == 3


def test_cache_needs_room_for_a_topic() -> None:
    with pytest.raises(ValueError, match="at least one topic"):
        LastValueCache(0)


def test_cache_tracks_each_source_of_a_shared_topic() -> None:
    cache = LastValueCache(max_topics=10)

    def put(source: str, epoch: int, seq: int) -> None:
        frames = encode_event("system_status", "system_status", {"n": seq}, source, epoch, seq)
        cache.update(frames[0], frames[1], frames[2])

    # two bots interleaved on one topic: each in sequence, no gap
    for seq in (1, 2, 3):
        put("bot-a", 1, seq)
        put("bot-b", 7, seq)
    assert (cache.stats.gaps, cache.stats.events) == (0, 6)
    put("bot-a", 1, 6)  # bot-a lost 4 and 5 while bot-b's event was the latest
    assert (cache.stats.gaps, cache.stats.missed) == (1, 2)
    put("bot-b", 7, 2)  # late for bot-b: the newer event of the topic stays
    assert b'"n":6' in cache.entries[b"system_status"][1]
    put("bot-b", 7, 4)
    assert (cache.stats.gaps, cache.stats.missed) == (1, 2)
    assert b'"source":"bot-b"' in cache.entries[b"system_status"][1]
    cache.fold_counts()
    assert cache.stats.by_type == {"system_status": 9}


# -- the cache fed through bus._wire and through pyzmq's calls ----------------------------

_U64_MAX = 2**64 - 1
_events = st.builds(
    lambda topic, source, epoch, seq: encode_event(
        topic, topic.split(".")[0], {"seq": seq}, source, epoch, seq
    ),
    st.sampled_from(["t.A", "t.B", "u.C"]),
    st.sampled_from(["bot-a", "bot-b", "bot-c"]),
    st.integers(1, 2) | st.sampled_from([0, _U64_MAX - 1, _U64_MAX]),
    st.integers(1, 6) | st.sampled_from([0, _U64_MAX - 1, _U64_MAX]),
)
_oddities = st.sampled_from(
    [
        [b"t.A", b"\x01short", b"{}"],  # meta too short
        [b"t.A", b"\x02" + bytes(30), b"{}"],  # unknown wire version
        [b"1bad", bytes([1]) + bytes(30), b"{}"],  # topic not starting with a letter
        [b"t.A", bytes([1]) + bytes(30), b"[1]"],  # payload not an object
        [b"t.A", b"m"],
        [b"t.A", b"m", b"{}", b"extra"],
        [b"\x01t.A"],  # a subscription
        [b"\x00t.A"],  # an unsubscription
        [b"\x01\x00sync.n1"],  # a snapshot sync marker
        [b"\x01\x00sync.n2"],
        [b""],
    ]
)


def _drain_all(
    drain: Callable[[LastValueCache, int], tuple[int, bytes | None]],
    cache: LastValueCache,
    limit: int,
) -> list[tuple[int, bytes | None]]:
    calls = []
    while True:
        count, sync = drain(cache, limit)
        calls.append((count, sync))
        if count == 0 and sync is None:
            return calls


@pytest.mark.skipif(not ACCELERATED, reason="needs the accelerator")
@settings(max_examples=150, deadline=None)
@given(
    st.lists(_events | _oddities, max_size=60),
    st.integers(1, 7),
    st.integers(1, 3) | st.sampled_from([2**62, sys.maxsize]),
)
def test_cache_fed_through_the_accelerator_matches_pyzmqs_calls(
    messages: list[list[bytes]], limit: int, max_topics: int
) -> None:
    context: Context = zmq.Context()
    sockets = []
    try:
        caches, drains = [], []
        for index in range(2):
            pull = context.socket(zmq.PULL)
            push = context.socket(zmq.PUSH)
            for socket in (pull, push):
                socket.sndhwm = socket.rcvhwm = 0
                socket.linger = 0
                sockets.append(socket)
            pull.bind(f"inproc://drain-{index}")
            push.connect(f"inproc://drain-{index}")
            for frames in messages:
                push.send_multipart(frames)
            caches.append(LastValueCache(max_topics))
            caches[-1].accepted = []  # what the proxy's history takes (bus/history.py)
            # the reference reads with pyzmq's own calls, not the accelerator
            receive = receiver(pull) if index == 0 else partial(_python_recv_message, pull)
            captured: CaptureQueue = deque()
            for _ in messages:
                captured.append(receive())
            drains.append(partial(drain_capture, captured))
        accelerated_calls = _drain_all(drains[0], caches[0], limit)
        python_calls = _drain_all(drains[1], caches[1], limit)
        assert accelerated_calls == python_calls
        assert sum(count for count, _sync in accelerated_calls) == len(messages)
        accelerated_cache, python_cache = caches
        assert accelerated_cache.entries == python_cache.entries
        assert list(accelerated_cache.entries) == list(python_cache.entries)  # eviction order too
        assert accelerated_cache._positions == python_cache._positions
        assert accelerated_cache._counts == python_cache._counts
        assert accelerated_cache.accepted == python_cache.accepted
        assert asdict(accelerated_cache.stats) == asdict(python_cache.stats)
    finally:
        for socket in sockets:
            socket.close(linger=0)
        context.term()
