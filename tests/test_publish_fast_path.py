"""The publish path's delivery: ``bot_client.delivery.Delivery`` on real sockets (order,
a full pipe, holding while the link is down, waking the I/O thread); the batch send its
I/O thread uses (``bus.transport.batch_sender``: accelerated, where libzmq sends with the
GIL released, and on pyzmq's calls, alike: order, a partial batch on a full pipe, no
message sent in part, errors); and a publisher driven flat out and with hostile keys."""

from __future__ import annotations

import errno
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from bot_client import Publisher
from bot_client.core import Counters
from bot_client.delivery import Delivery, TopicSlot
from bus import transport
from bus.envelope import payload_parts
from bus.proxy import Proxy
from bus.subscriber import Gap
from bus.transport import batch_sender
from tests.conftest import scaled, synced_subscriber
from tests.support import wait_until

Context = zmq.Context[zmq.Socket[bytes]]
MakeBatchSender = Callable[[zmq.Socket[bytes]], transport.BatchSender]


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


def _python_batch_sender(socket: zmq.Socket[bytes]) -> transport.BatchSender:
    return functools.partial(transport._python_send_batch, socket)


@pytest.fixture(params=["accelerated", "pyzmq"])
def make_sender(request: pytest.FixtureRequest) -> MakeBatchSender:
    if request.param == "pyzmq":
        return _python_batch_sender
    assert transport.ACCELERATED, transport.ACCELERATOR_PROBLEM
    return transport.batch_sender


def messages(count: int, start: int = 0) -> list[tuple[Any, ...]]:
    # a fourth item, as the publisher's hand-off carries, is not sent
    return [
        (b"t.%d" % n, b"meta%d" % n, b"payload%d" % n, b"not a frame")
        for n in range(start, start + count)
    ]


def test_a_pipe_ends_the_batch_after_whole_messages(
    make_sender: MakeBatchSender, pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]
) -> None:
    xpub, sub = pipe
    send = make_sender(xpub)
    batch = messages(50)
    sent = send(batch)
    assert 0 < sent < 50, "the pipe holds a few messages only"
    assert send(batch[sent:]) == 0  # still full: nothing more goes
    received = receive_all(sub)
    # what went is whole and in order; the rest was not sent at all
    assert received == [list(message[:3]) for message in batch[: len(received)]]
    total = sent
    deadline_rounds = 10_000
    while total < 50:
        deadline_rounds -= 1
        assert deadline_rounds > 0, f"sent {total} of 50"
        total += send(batch[total:])
        received += receive_all(sub)
    while len(received) < 50:
        assert sub.poll(int(scaled(5) * 1000)), f"received {len(received)} of 50"
        received += receive_all(sub)
    assert received == [list(message[:3]) for message in batch]


def test_an_empty_batch_sends_nothing(
    make_sender: MakeBatchSender, pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]
) -> None:
    xpub, sub = pipe
    assert make_sender(xpub)([]) == 0
    assert make_sender(xpub)(messages(1)) == 1
    assert sub.poll(int(scaled(5) * 1000))
    assert sub.recv_multipart() == [b"t.0", b"meta0", b"payload0"]


def test_a_closed_socket_raises_enotsock(
    make_sender: MakeBatchSender, zmq_context: Context
) -> None:
    push = zmq_context.socket(zmq.PUSH)
    send = make_sender(push)
    push.close(linger=0)
    with pytest.raises(zmq.ZMQError) as raised:
        send(messages(3))
    assert raised.value.errno == errno.ENOTSOCK


def test_a_frame_that_is_not_bytes_sends_nothing_of_its_batch(
    pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    # the accelerator copies every frame before it sends any: a bad one fails the batch whole
    xpub, sub = pipe
    send = transport.batch_sender(xpub)
    bad: list[tuple[Any, ...]] = [*messages(1), ("t.1", b"meta1", b"payload1")]  # type: ignore[list-item]
    with pytest.raises(TypeError):
        send(bad)
    assert not sub.poll(int(scaled(0.2) * 1000))
    assert send(messages(1, start=2)) == 1
    assert sub.poll(int(scaled(5) * 1000))
    assert sub.recv_multipart() == [b"t.2", b"meta2", b"payload2"]


def open_delivery(queue_size: int = 100) -> tuple[Delivery, Counters]:
    """A Delivery whose hand-off is open (an empty drain opens it, as a link's does)."""
    counters = Counters()
    delivery = Delivery(queue_size, counters, time.monotonic, lambda _report: None)
    assert delivery.drain(len) == (0, False)
    return delivery, counters


def slot(topic: str) -> TopicSlot:
    head, tail = payload_parts("custom", topic, "src", 1)
    return TopicSlot("custom", topic, False, head, tail)


def test_delivery_sends_in_order_and_waits_on_a_full_pipe(
    pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    xpub, sub = pipe
    send = batch_sender(xpub)
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
        delivery.drain(batch_sender(xpub))
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
        wait_until(lambda: publisher.connected, "the publisher to connect")
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
