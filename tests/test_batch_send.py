"""bus.transport.batch_sender on real sockets: the accelerated batch (libzmq sends with the
GIL released) and the pyzmq loop behave alike: order, a partial batch on a full pipe, no
message sent in part, errors."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from bus import transport
from tests.conftest import scaled

Context = zmq.Context[zmq.Socket[bytes]]
MakeBatchSender = Callable[[zmq.Socket[bytes]], transport.BatchSender]


def _python_batch_sender(socket: zmq.Socket[bytes]) -> transport.BatchSender:
    return functools.partial(transport._python_send_batch, socket)


@pytest.fixture(params=["accelerated", "pyzmq"])
def make_sender(request: pytest.FixtureRequest) -> MakeBatchSender:
    if request.param == "pyzmq":
        return _python_batch_sender
    assert transport.ACCELERATED, transport.ACCELERATOR_PROBLEM
    return transport.batch_sender


@pytest.fixture
def full_pipe(zmq_context: Context) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """A NODROP XPUB and a SUB on inproc with room for a few messages only."""
    xpub = zmq_context.socket(zmq.XPUB)
    xpub.setsockopt(zmq.XPUB_NODROP, 1)
    xpub.setsockopt(zmq.SNDHWM, 2)
    xpub.bind("inproc://batch")
    sub = zmq_context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 2)
    sub.connect("inproc://batch")
    sub.subscribe(b"")
    assert xpub.poll(int(scaled(5) * 1000)), "no subscription"
    assert xpub.recv() == b"\x01"
    yield xpub, sub
    xpub.close(linger=0)
    sub.close(linger=0)


def messages(count: int, start: int = 0) -> list[tuple[Any, ...]]:
    # a fourth item, as the publisher's hand-off carries, is not sent
    return [
        (b"t.%d" % n, b"meta%d" % n, b"payload%d" % n, b"not a frame")
        for n in range(start, start + count)
    ]


def receive_all(sub: zmq.Socket[bytes]) -> list[list[bytes]]:
    received = []
    while sub.poll(0):
        received.append(sub.recv_multipart())
    return received


def test_a_full_pipe_ends_the_batch_after_whole_messages(
    make_sender: MakeBatchSender, full_pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]
) -> None:
    xpub, sub = full_pipe
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
    make_sender: MakeBatchSender, full_pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]
) -> None:
    xpub, sub = full_pipe
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
    full_pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    # the accelerator copies every frame before it sends any: a bad one fails the batch whole
    xpub, sub = full_pipe
    send = transport.batch_sender(xpub)
    bad: list[tuple[Any, ...]] = [*messages(1), ("t.1", b"meta1", b"payload1")]  # type: ignore[list-item]
    with pytest.raises(TypeError):
        send(bad)
    assert not sub.poll(int(scaled(0.2) * 1000))
    assert send(messages(1, start=2)) == 1
    assert sub.poll(int(scaled(5) * 1000))
    assert sub.recv_multipart() == [b"t.2", b"meta2", b"payload2"]
