"""bus.Subscriber and bus.BlockingSubscriber against a real proxy on loopback sockets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from bus import Event, Gap, SnapshotError, Subscriber
from bus.envelope import encode_event
from bus.proxy import Proxy, ProxyConfig
from bus.subscriber import SubscriptionState
from bus.topics import Pattern
from bus.transport import send_event
from tests.conftest import scaled, synced_subscriber
from tests.support import wait_until

Context = zmq.Context[zmq.Socket[bytes]]

TOPICS = [
    "market_data.BTC-USD",
    "market_data.ETH-PERP",
    "market_data.BTC/USD",
    "position_update.BTC-USD",
    "position_update.ETH-PERP",
    "trading_decision",
]


class Publisher:
    """A test publisher: XPUB socket, waits for the proxy's subscribe-all, numbers per topic."""

    def __init__(self, context: Context, endpoint: str, source: str, epoch: int = 1) -> None:
        self.socket: zmq.Socket[bytes] = context.socket(zmq.XPUB)
        self.socket.linger = 0
        self.socket.sndhwm = 100_000
        self.socket.connect(endpoint)
        self.source = source
        self.epoch = epoch
        self.seqs: dict[str, int] = defaultdict(int)
        self.sent: list[tuple[str, int]] = []
        self.wait_connected()

    def wait_connected(self) -> None:
        assert self.socket.poll(int(scaled(5) * 1000)), "publisher never saw the proxy"
        assert self.socket.recv() == b"\x01"

    def publish(self, topic: str, **data: object) -> int:
        self.seqs[topic] += 1
        seq = self.seqs[topic]
        frames = encode_event(topic, topic.split(".")[0], data, self.source, self.epoch, seq)
        send_event(self.socket, *frames)
        self.sent.append((topic, seq))
        return seq

    def close(self) -> None:
        self.socket.close(linger=0)


@pytest.fixture
def publishers(zmq_context: Context, proxy: Proxy) -> Iterator[list[Publisher]]:
    made = [Publisher(zmq_context, proxy.frontend_endpoint, f"bot-{n}") for n in (1, 2)]
    yield made
    for publisher in made:
        publisher.close()


def subscriber(
    proxy: Proxy, context: Context, patterns: list[str], **options: object
) -> Subscriber:
    return Subscriber(
        patterns,
        endpoint=proxy.backend_endpoint,
        snapshot_endpoint=proxy.snapshot_endpoint,
        context=context,
        **options,  # type: ignore[arg-type]
    )


async def collect(sub: Subscriber, count: int) -> list[Event | Gap]:
    items: list[Event | Gap] = []

    async def run() -> None:
        while len(items) < count:
            items.append(await sub.recv())

    try:
        await asyncio.wait_for(run(), scaled(20))
    except TimeoutError:
        pytest.fail(f"received {len(items)} of {count} items; stats {sub.stats}")
    return items


# -- the functional test the issue asks for ----------------------------------------------


async def test_two_publishers_three_subscribers_get_exactly_their_events_in_order(
    zmq_context: Context, proxy: Proxy, publishers: list[Publisher]
) -> None:
    pattern_sets = [
        ["market_data"],
        ["*.BTC-USD"],
        ["trading_decision", "position_update.ETH-PERP"],
    ]
    subs = [subscriber(proxy, zmq_context, patterns, snapshot=True) for patterns in pattern_sets]
    for sub in subs:
        # the synced snapshot proves the subscriptions are in force at the proxy
        await sub.start()
        assert not sub.stats.unsynced_snapshot
    try:
        for index in range(10_000):
            for publisher in publishers:
                publisher.publish(TOPICS[index % len(TOPICS)], i=index)
        expected = {}
        for sub, patterns in zip(subs, pattern_sets, strict=True):
            parsed = [Pattern(p) for p in patterns]
            expected[id(sub)] = {
                p.source: [(t, s) for t, s in p.sent if any(q.matches(t) for q in parsed)]
                for p in publishers
            }
        results = await asyncio.gather(
            *(collect(sub, sum(len(v) for v in expected[id(sub)].values())) for sub in subs)
        )
        for sub, items in zip(subs, results, strict=True):
            assert all(isinstance(item, Event) for item in items), "no gap expected"
            for source, wanted in expected[id(sub)].items():
                got = [
                    (e.topic, e.seq) for e in items if isinstance(e, Event) and e.source == source
                ]
                assert got == wanted
            assert sub.stats.gaps == sub.stats.duplicates == sub.stats.invalid == 0
        # nothing more arrives: none extra (prefix over-delivery is filtered and counted)
        for sub in subs:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sub.recv(), 0.2)
        assert subs[1].stats.filtered > 0  # "*.BTC-USD" subscribes to everything
    finally:
        for sub in subs:
            sub.close()


# -- snapshots ----------------------------------------------------------------------------


async def test_late_joiner_starts_with_the_latest_event_of_each_matching_topic(
    zmq_context: Context, proxy: Proxy, publishers: list[Publisher]
) -> None:
    first, second = publishers
    for price in (1, 2, 3):
        first.publish("market_data.BTC-USD", price=price)
        first.publish("market_data.ETH-PERP", price=price * 10)
        second.publish("trading_decision", n=price)
    wait_until(lambda: proxy.cache.stats.events == 9, "the cache to hold 9 events")
    async with subscriber(proxy, zmq_context, ["market_data"], snapshot=True) as sub:
        items = await collect(sub, 2)
        assert [(e.topic, e.data) for e in items if isinstance(e, Event)] == [
            ("market_data.BTC-USD", {"price": 3}),
            ("market_data.ETH-PERP", {"price": 30}),
        ]
        assert sub.stats.snapshot_events == 2
        first.publish("market_data.BTC-USD", price=4)
        second.publish("trading_decision", n=4)
        (live,) = await collect(sub, 1)
        assert isinstance(live, Event)
        assert (live.topic, live.seq, live.data) == ("market_data.BTC-USD", 4, {"price": 4})
        assert sub.stats.gaps == 0


async def test_snapshot_racing_live_publishing_has_no_gap_and_no_duplicate(
    zmq_context: Context, proxy: Proxy, publishers: list[Publisher]
) -> None:
    publisher = publishers[0]
    topics = TOPICS[:4]
    total = 20_000
    started = threading.Event()

    def publish() -> None:
        for index in range(total):
            publisher.publish(topics[index % len(topics)], i=index)
            if index == 500:
                started.set()
            if index % 1000 == 0:
                time.sleep(0.001)  # spread the stream over the joins

    thread = threading.Thread(target=publish)
    thread.start()
    subs: list[Subscriber] = []
    try:
        assert started.wait(scaled(5))
        for _ in range(3):
            sub = subscriber(proxy, zmq_context, ["*"], snapshot=True)
            subs.append(sub)
            await sub.start()
            await asyncio.sleep(0.005)  # spreads the joins over the stream (pacing)
        thread.join(scaled(20))
        last = total // len(topics)
        for sub in subs:
            assert not sub.stats.unsynced_snapshot
            seen: dict[str, list[int]] = defaultdict(list)
            while any(not seen[t] or seen[t][-1] < last for t in topics):
                item = await asyncio.wait_for(sub.recv(), scaled(10))
                assert isinstance(item, Event), f"unexpected {item}"
                seen[item.topic].append(item.seq)
            for topic in topics:
                seqs = seen[topic]
                assert seqs == list(range(seqs[0], last + 1)), f"{topic}: gap or duplicate"
            assert sub.stats.gaps == 0
    finally:
        thread.join(scaled(20))
        for sub in subs:
            sub.close()


async def test_snapshot_timeout_raises_snapshot_error_and_closes(
    zmq_context: Context, proxy: Proxy
) -> None:
    probe = zmq_context.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")  # a peer that never answers
    try:
        sub = Subscriber(
            ["*"],
            endpoint=proxy.backend_endpoint,
            snapshot=True,
            snapshot_endpoint=f"tcp://127.0.0.1:{port}",
            snapshot_timeout=0.3,
            context=zmq_context,
        )
        with pytest.raises(SnapshotError, match=r"no snapshot reply .* within 0\.3 s"):
            await sub.start()
        with pytest.raises(RuntimeError, match="not started"):
            await sub.recv()
    finally:
        probe.close(linger=0)


def test_snapshot_error_status_raises_snapshot_error() -> None:
    state = SubscriptionState(["*"])
    with pytest.raises(SnapshotError, match="refused the request: bad pattern"):
        state.apply_snapshot([b"SNAPSHOT", b"error", b"bad pattern"])
    with pytest.raises(SnapshotError, match="malformed"):
        state.apply_snapshot([b"NOPE"])
    with pytest.raises(SnapshotError, match="unknown status"):
        state.apply_snapshot([b"SNAPSHOT", b"maybe"])
    with pytest.raises(SnapshotError, match="three-frame"):
        state.apply_snapshot([b"SNAPSHOT", b"ok", b"t"])


def test_snapshot_state_drops_live_duplicates_and_reports_unsynced() -> None:
    state = SubscriptionState(["market_data"])
    newest = encode_event("market_data.X", "market_data", {"p": 2}, "bot", 1, 2)
    other = encode_event("ai_decision", "ai_decision", {}, "bot", 1, 1)
    events = state.apply_snapshot([b"SNAPSHOT", b"unsynced", *newest, *other])
    assert [(e.topic, e.seq) for e in events] == [("market_data.X", 2)]
    assert state.stats.unsynced_snapshot
    older = encode_event("market_data.X", "market_data", {"p": 1}, "bot", 1, 1)
    assert state.receive(older) == []
    assert state.receive(newest) == []
    assert state.stats.duplicates == 2
    later = encode_event("market_data.X", "market_data", {"p": 5}, "bot", 1, 5)
    gap, event = state.receive(later)
    assert isinstance(gap, Gap)
    assert (gap.first_seq, gap.last_seq, gap.missed, gap.restart) == (3, 4, 2, False)
    assert str(gap) == "GAP market_data.X from bot: 2 missed (seq 3..4)"
    assert isinstance(event, Event)
    restarted = encode_event("market_data.X", "market_data", {}, "bot", 2, 3)
    gap, _event = state.receive(restarted)
    assert isinstance(gap, Gap)
    assert (gap.epoch, gap.missed, gap.restart) == (2, 2, True)
    assert state.receive(None) == []
    assert state.stats.invalid == 1


def test_subscriber_needs_valid_patterns() -> None:
    with pytest.raises(ValueError, match="at least one pattern"):
        SubscriptionState([])
    with pytest.raises(ValueError, match="invalid"):
        SubscriptionState(["market data"])


# -- malformed messages, transports, the blocking variant ----------------------------------


async def test_malformed_messages_are_refused_by_the_proxy_and_never_corrupt_later_ones(
    zmq_context: Context, proxy: Proxy, publishers: list[Publisher]
) -> None:
    publisher = publishers[0]
    async with subscriber(proxy, zmq_context, ["*"], snapshot=True) as sub:
        publisher.publish("market_data.X", n=1)
        publisher.socket.send(b"xyz")  # one frame, looks like a topic
        publisher.publish("market_data.X", n=2)  # read by its own frame boundaries: kept
        publisher.socket.send_multipart([b"abc", b"def", b"ghi", b"jkl"])
        publisher.socket.send_multipart([b"market_data.X", b"\x01" * 30, b"{not json"])
        publisher.publish("market_data.X", n=3)
        publisher.publish("market_data.X", n=4)
        items = await collect(sub, 4)
        assert [getattr(i, "seq", None) for i in items] == [1, 2, 3, 4]
        # the proxy's gate refuses them: they reach neither subscribers nor the cache
        assert sub.stats.invalid == 0
        wait_until(lambda: proxy.cache.stats.events == 4, "the cache to see 4 events")
        assert proxy.gate.stats.rejected == {"frames": 2, "source": 1}
        assert proxy.cache.stats.invalid == 0
        assert b'"seq":4}' in proxy.cache.entries[b"market_data.X"][1]


async def test_ipc_transport(zmq_context: Context, tmp_path: Path) -> None:
    config = ProxyConfig(
        frontend=f"ipc://{tmp_path}/in.sock",
        backend=f"ipc://{tmp_path}/out.sock",
        snapshot=f"ipc://{tmp_path}/snap.sock",
    )
    with Proxy(config, context=zmq_context) as proxy:
        publisher = Publisher(zmq_context, proxy.frontend_endpoint, "ipc-bot")
        try:
            publisher.publish("market_data.BTC-USD", price=1)
            wait_until(lambda: proxy.cache.stats.events == 1, "the cache")
            async with subscriber(proxy, zmq_context, ["market_data"], snapshot=True) as sub:
                publisher.publish("market_data.BTC-USD", price=2)
                items = await collect(sub, 2)
                assert [(e.data, e.seq) for e in items if isinstance(e, Event)] == [
                    ({"price": 1}, 1),
                    ({"price": 2}, 2),
                ]
        finally:
            publisher.close()


def test_blocking_subscriber(
    zmq_context: Context, proxy: Proxy, publishers: list[Publisher]
) -> None:
    publisher = publishers[0]
    publisher.publish("trading_decision", n=1)
    wait_until(lambda: proxy.cache.stats.events == 1, "the cache")
    with synced_subscriber(proxy, zmq_context, ["trading_decision"]) as sub:
        publisher.publish("market_data.X", n=2)
        publisher.publish("trading_decision", n=3)
        first = sub.recv(scaled(5))
        second = sub.recv(scaled(5))
        assert isinstance(first, Event)
        assert isinstance(second, Event)
        assert [(first.seq, first.data), (second.seq, second.data)] == [
            (1, {"n": 1}),
            (2, {"n": 3}),
        ]
        assert sub.recv(0.1) is None
        assert sub.stats.snapshot_events == 1


def test_blocking_recv_waits_without_spinning(
    zmq_context: Context, proxy: Proxy, publishers: list[Publisher]
) -> None:
    results: list[tuple[object, float]] = []
    with synced_subscriber(proxy, zmq_context) as sub:

        def wait_forever() -> None:
            started = time.thread_time()
            item = sub.recv()
            results.append((item, time.thread_time() - started))

        waiter = threading.Thread(target=wait_forever)
        waiter.start()
        time.sleep(0.5)  # the waiter must sit idle, not spin, for this long
        publishers[0].publish("ai_decision", n=1)
        waiter.join(scaled(5))
        assert not waiter.is_alive()
    ((item, cpu_seconds),) = results
    assert isinstance(item, Event)
    assert cpu_seconds < 0.1


async def test_async_recv_waits_without_spinning(zmq_context: Context, proxy: Proxy) -> None:
    async with subscriber(proxy, zmq_context, ["*"], snapshot=True) as sub:
        started = time.thread_time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sub.recv(), 0.5)
        assert time.thread_time() - started < 0.1
