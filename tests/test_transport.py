"""bus.transport on real sockets: the C accelerator and the pyzmq fallback behave alike."""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import zmq

from bus import transport
from tests.conftest import scaled

Context = zmq.Context[zmq.Socket[bytes]]
Implementation = tuple[
    Callable[[zmq.Socket[bytes]], transport.Sender],
    Callable[[zmq.Socket[bytes]], transport.Receiver],
]


def _python_sender(socket: zmq.Socket[bytes]) -> transport.Sender:
    return functools.partial(transport._python_send3, socket)


def _python_receiver(socket: zmq.Socket[bytes]) -> transport.Receiver:
    return functools.partial(transport._python_recv_message, socket)


@pytest.fixture
def implementation(accelerated: bool) -> Implementation:
    if not accelerated:
        return _python_sender, _python_receiver
    return transport.sender, transport.receiver


@pytest.fixture
def pair(zmq_context: Context) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """A connected PUSH -> PULL pair on a random loopback port."""
    pull = zmq_context.socket(zmq.PULL)
    push = zmq_context.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    yield push, pull
    push.close(linger=0)
    pull.close(linger=0)


def _next(receive: transport.Receiver, socket: zmq.Socket[bytes]) -> tuple[bytes, ...]:
    assert socket.poll(int(scaled(5) * 1000)), "nothing arrived"
    return receive()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="binds through /proc")
def test_the_accelerator_is_built_and_bound() -> None:
    # CI builds it (gcc, Python headers); without it every hop runs several times slower
    assert transport.ACCELERATED, "bus._wire was not built or not bound: see pyproject.toml"


def test_the_variable_turns_the_accelerator_off() -> None:
    probe = "import bus.transport as t; print(t.ACCELERATED, t.ACCELERATOR_PROBLEM)"
    environment = {**os.environ, transport.ACCELERATOR_OFF_VARIABLE: "1"}
    output = subprocess.run(
        [sys.executable, "-c", probe], env=environment, capture_output=True, text=True, timeout=30
    )
    assert output.stdout.strip() == "False TRADEBUS_NO_ACCELERATOR is set", output.stderr
    assert transport.ACCELERATOR_PROBLEM is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_accelerator_calls_the_libzmq_pyzmq_loaded() -> None:
    # bus._wire is linked to pyzmq's own libzmq (setup.py): never a second copy in the process
    probe = (
        "import bus.transport as t; assert t.ACCELERATED, t.ACCELERATOR_PROBLEM; "
        "print(len({line.split()[-1] for line in open('/proc/self/maps') if 'libzmq' in line}))"
    )
    output = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30
    )
    assert output.stdout.strip() == "1", output.stderr


def test_three_frames_round_trip(
    implementation: Implementation, pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]
) -> None:
    make_sender, make_receiver = implementation
    push, pull = pair
    send, receive = make_sender(push), make_receiver(pull)
    frames = (b"market_data.BTC-USD", b"\x01" + bytes(range(40)), b'{"x":' + b"9" * 5000 + b"}")
    assert send(*frames) is True
    assert _next(receive, pull) == frames
    # and what pyzmq itself sends is read the same way
    push.send_multipart([b"", b"", b""])
    assert _next(receive, pull) == (b"", b"", b"")


def test_whole_messages_of_any_length_never_shift_the_next(
    implementation: Implementation, pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]
) -> None:
    _make_sender, make_receiver = implementation
    push, pull = pair
    receive = make_receiver(pull)
    for count in (1, 2, 3, 4, 7):
        push.send_multipart([f"{count}.{i}".encode() for i in range(count)])
        push.send_multipart([b"after", b"m", b"{}"])
        kept = min(count, transport.MAX_FRAMES)
        assert _next(receive, pull) == tuple(f"{count}.{i}".encode() for i in range(kept))
        assert _next(receive, pull) == (b"after", b"m", b"{}")
    with pytest.raises(zmq.Again) as raised:
        receive()
    assert raised.value.errno == errno.EAGAIN


def test_recv_event_takes_only_three_frame_messages(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    push, pull = pair
    push.send_multipart([b"a", b"b"])
    push.send_multipart([b"a", b"b", b"c"])
    assert pull.poll(int(scaled(5) * 1000))
    assert transport.recv_event(pull) is None
    assert pull.poll(int(scaled(5) * 1000))
    assert transport.recv_event(pull) == (b"a", b"b", b"c")


def test_full_nodrop_pipe_refuses_the_whole_message(
    implementation: Implementation, zmq_context: Context
) -> None:
    make_sender, make_receiver = implementation
    xpub = zmq_context.socket(zmq.XPUB)
    xpub.setsockopt(zmq.XPUB_NODROP, 1)
    xpub.sndhwm = 2
    sub = zmq_context.socket(zmq.SUB)
    sub.rcvhwm = 2
    sub.subscribe(b"")
    try:
        port = xpub.bind_to_random_port("tcp://127.0.0.1")
        sub.connect(f"tcp://127.0.0.1:{port}")
        assert xpub.poll(int(scaled(5) * 1000))
        assert xpub.recv() == b"\x01"
        send = make_sender(xpub)
        sent = 0
        while send(b"t", b"m", str(sent).encode()):
            sent += 1
            assert sent < 100_000, "the pipe never filled"
        receive = make_receiver(sub)
        # every accepted message arrives whole and in order; the refused one not at all
        for index in range(sent):
            assert _next(receive, sub) == (b"t", b"m", str(index).encode())
        assert not sub.poll(50)
    finally:
        xpub.close(linger=0)
        sub.close(linger=0)


def test_errors_are_pyzmq_errors(implementation: Implementation, zmq_context: Context) -> None:
    make_sender, make_receiver = implementation
    sub = zmq_context.socket(zmq.SUB)
    pub = zmq_context.socket(zmq.PUB)
    try:
        with pytest.raises(zmq.ZMQError) as raised:
            make_sender(sub)(b"t", b"m", b"p")  # SUB cannot send
        assert raised.value.errno == errno.ENOTSUP
        with pytest.raises(zmq.ZMQError) as raised:
            make_receiver(pub)()  # PUB cannot receive
        assert raised.value.errno == errno.ENOTSUP
    finally:
        sub.close(linger=0)
        pub.close(linger=0)


def test_a_closed_socket_is_enotsock(implementation: Implementation, zmq_context: Context) -> None:
    make_sender, make_receiver = implementation
    push = zmq_context.socket(zmq.PUSH)
    # made while it is open, used after it is closed
    send, receive = make_sender(push), make_receiver(push)
    push.close(linger=0)
    with pytest.raises(zmq.ZMQError) as raised:
        send(b"t", b"m", b"p")
    assert raised.value.errno == errno.ENOTSOCK
    with pytest.raises(zmq.ZMQError) as raised:
        receive()
    assert raised.value.errno == errno.ENOTSOCK
    with pytest.raises(zmq.ZMQError) as raised:
        transport.send_event(push, b"t", b"m", b"p")
    assert raised.value.errno == errno.ENOTSOCK
    with pytest.raises(zmq.ZMQError) as raised:
        transport.receive_message(push)
    assert raised.value.errno == errno.ENOTSOCK


def test_frames_must_be_bytes(pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    push, _pull = pair
    with pytest.raises(TypeError):
        transport.sender(push)(b"t", "meta", b"p")  # type: ignore[arg-type]


def test_identified_receive_returns_the_zap_user_id_with_the_frames(
    zmq_context: Context, accelerated: bool
) -> None:
    zap = zmq_context.socket(zmq.REP)
    zap.bind("inproc://zeromq.zap.01")
    pull = zmq_context.socket(zmq.PULL)
    pull.zap_domain = b"test"
    plain = zmq_context.socket(zmq.PULL)  # no ZAP domain: its peers carry no User-Id
    pushes = [zmq_context.socket(zmq.PUSH) for _ in range(2)]
    try:
        receive = (
            transport.identified_receiver(pull)
            if accelerated
            else functools.partial(transport._python_recv_identified, pull)
        )
        if accelerated:
            assert transport._recv_identified is not None, "the C receiver is not bound"
        pushes[0].connect(f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}")
        request = zap.recv_multipart()
        zap.send_multipart([b"1.0", request[1], b"200", b"OK", b"publisher-\xc3\xa9", b""])
        for frames in ([b"a"], [b"t", b"m", b"p"], [b"1", b"2", b"3", b"4", b"5"]):
            pushes[0].send_multipart(frames)
            assert pull.poll(int(scaled(5) * 1000))
            user_id, received = receive()
            assert user_id == b"publisher-\xc3\xa9"
            assert list(received) == frames[: transport.MAX_FRAMES]
        with pytest.raises(zmq.Again):
            receive()

        pushes[1].connect(f"tcp://127.0.0.1:{plain.bind_to_random_port('tcp://127.0.0.1')}")
        pushes[1].send_multipart([b"t", b"m", b"p"])
        assert plain.poll(int(scaled(5) * 1000))
        receive_plain = (
            transport.identified_receiver(plain)
            if accelerated
            else functools.partial(transport._python_recv_identified, plain)
        )
        assert receive_plain() == (None, (b"t", b"m", b"p"))
    finally:
        for socket in (zap, pull, plain, *pushes):
            socket.close(linger=0)
