"""The publish path's delivery: ``bot_client.delivery.Delivery`` on real sockets (order,
a full pipe, holding while the link is down, waking the I/O thread), and a publisher
driven flat out and with hostile keys."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from bot_client import Publisher
from bot_client.core import Counters
from bot_client.delivery import Delivery, TopicSlot
from bus.envelope import payload_parts
from bus.proxy import Proxy
from bus.subscriber import Gap
from bus.transport import sender
from tests.conftest import scaled, synced_subscriber

Context = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture
def pipe(zmq_context: Context) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """A NODROP XPUB and a SUB on inproc with room for a few messages only."""
    xpub = zmq_context.socket(zmq.XPUB)
    xpub.setsockopt(zmq.XPUB_NODROP, 1)
    xpub.setsockopt(zmq.SNDHWM, 2)
    xpub.bind("inproc://handoff")
    sub = zmq_context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 2)
    sub.connect("inproc://handoff")
    sub.subscribe(b"")
    assert xpub.poll(int(scaled(5) * 1000)), "no subscription"
    assert xpub.recv() == b"\x01"
    yield xpub, sub
    xpub.close(linger=0)
    sub.close(linger=0)


def receive_all(sub: zmq.Socket[bytes]) -> list[list[bytes]]:
    messages = []
    while sub.poll(0):
        messages.append(sub.recv_multipart())
    return messages


def open_delivery(queue_size: int = 100) -> tuple[Delivery, Counters]:
    """A Delivery whose hand-off is open (an empty drain opens it, as a link's does)."""
    counters = Counters()
    delivery = Delivery(queue_size, counters, time.monotonic, lambda _report: None)
    assert delivery.drain(lambda *_frames: True) == (0, False)
    return delivery, counters


def slot(topic: str) -> TopicSlot:
    head, tail = payload_parts("custom", topic, "src", 1)
    return TopicSlot("custom", topic, False, head, tail)


def test_delivery_sends_in_order_and_waits_on_a_full_pipe(
    pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    xpub, sub = pipe
    send = sender(xpub)
    delivery, counters = open_delivery()
    custom = slot("custom.k")
    with delivery.lock:
        for n in range(30):
            delivery.hand_over(custom, b"meta%d" % n, b"payload%d" % n)
    assert (delivery.waiting(), delivery.held()) == (30, 0)  # all handed over, none held
    sent, blocked = delivery.drain(send)
    assert blocked, "the pipe holds a few messages only"
    assert delivery.waiting() == 30 - sent
    received: list[list[bytes]] = []
    deadline = time.monotonic() + scaled(5)
    while len(received) < 30:
        assert time.monotonic() < deadline, f"received {len(received)} of 30"
        received += receive_all(sub)
        delivery.drain(send)
    assert received == [[b"custom.k", b"meta%d" % n, b"payload%d" % n] for n in range(30)]
    assert (delivery.waiting(), counters.sent) == (0, 30)


def test_delivery_holds_while_shut_and_sends_the_held_first(
    pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    xpub, sub = pipe
    delivery, counters = open_delivery()
    custom = slot("custom")
    with delivery.lock:
        delivery.hand_over(custom, b"m", b"0")
    delivery.shut()  # the link went down: what comes now is held, in order
    with delivery.lock:
        delivery.hand_over(custom, b"m", b"1")
        delivery.hand_over(custom, b"m", b"2")
    assert (delivery.waiting(), delivery.held()) == (3, 2)
    received: list[list[bytes]] = []
    deadline = time.monotonic() + scaled(5)
    while len(received) < 3:
        assert time.monotonic() < deadline, f"received {len(received)} of 3"
        delivery.drain(sender(xpub))
        received += receive_all(sub)
    assert [payload for _topic, _meta, payload in received] == [b"0", b"1", b"2"]
    with delivery.lock:  # the outbox is empty again: the hand-off reopened
        delivery.hand_over(custom, b"m", b"3")
    assert (delivery.waiting(), delivery.held()) == (1, 0)
    with delivery.lock:
        delivery.close()
        delivery.hand_over(custom, b"m", b"4")
        lost, _report = delivery.stop()
        delivery.hand_over(custom, b"m", b"5")  # after stop: dropped, counted
    assert [entry.frames[2] for entry in lost] == [b"3", b"4"]
    assert counters.dropped == {"custom": 1}


def test_a_handed_over_event_wakes_a_dozing_io_thread() -> None:
    delivery, _counters = open_delivery()
    wakes: list[int] = []
    delivery.set_waker(lambda: wakes.append(1))
    assert delivery.doze()  # nothing handed over: it may sleep
    with delivery.lock:
        delivery.hand_over(slot("custom"), b"m", b"p")
        delivery.hand_over(slot("custom"), b"m", b"p")
    assert wakes == [1]  # once: the flag is down after the first
    assert not delivery.doze()  # events wait: it must not sleep
    delivery.awake()


def test_publish_survives_hostile_keys(proxy: Proxy, zmq_context: Context) -> None:
    with (
        synced_subscriber(proxy, zmq_context, ["trading_loop"]) as sub,
        Publisher(
            url=proxy.frontend_endpoint,
            source_id="hostile",
            queue_size=1000,
            heartbeat_interval=0,
            context=zmq_context,
        ) as publisher,
    ):
        publisher.publish("trading_loop", {"symbol": "BTC-USD", "n": 0})

        class Symbol:
            """A symbol whose hashing drops the data's only reference to it."""

            def __init__(self, data: dict[str, object]) -> None:
                self.data: dict[str, object] | None = data

            def __hash__(self) -> int:
                if self.data is not None:
                    self.data.pop("symbol", None)
                    self.data = None
                return hash("BTC-USD")

            def __eq__(self, other: object) -> bool:
                return True

        for n in range(1, 200):
            data: dict[str, object] = {"n": n}
            data["symbol"] = Symbol(data)
            publisher.publish("trading_loop", data)
        numbers = []
        deadline = time.monotonic() + scaled(5)
        while len(numbers) < 200:
            item = sub.recv(max(0.0, deadline - time.monotonic()))
            assert item is not None, (numbers, publisher.status())
            assert not isinstance(item, Gap), item
            assert item.topic == "trading_loop.BTC-USD"
            numbers.append(item.data["n"])
        assert numbers == list(range(200))


def test_flat_out_publishing_arrives_whole_and_in_order(
    proxy: Proxy, zmq_context: Context, tmp_path: Path
) -> None:
    count = 20_000
    with (
        synced_subscriber(proxy, zmq_context, ["flat"]) as sub,
        Publisher(
            url=proxy.frontend_endpoint,
            source_id="flat-out",
            queue_size=count,
            heartbeat_interval=0,
            context=zmq_context,
        ) as publisher,
    ):
        deadline = time.monotonic() + scaled(5)
        while not publisher.connected:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        for n in range(count):
            publisher.publish("flat", {"n": n})
            if n % 500 == 0:  # while the I/O thread sends: no event is in neither figure
                status = publisher.status()
                assert status["sent"] + status["queued"] + status["dropped_total"] >= n + 1
        numbers = []
        deadline = time.monotonic() + scaled(20)
        while len(numbers) < count:
            item = sub.recv(max(0.0, deadline - time.monotonic()))
            assert item is not None, f"received {len(numbers)} of {count}"
            assert not isinstance(item, Gap), str(item)
            assert item.seq == len(numbers) + 1
            numbers.append(item.data["n"])
        assert numbers == list(range(count))
        status = publisher.status()
        assert (status["sent"], status["dropped_total"], status["queued"]) == (count, 0, 0)
