"""bot_client/_publish.c on its own: its lock, its hand-off ring (on real sockets), its clock
text, and a publisher driven flat out through it. End-to-end equality with the Python
publish() is in test_bot_client_bus.py (the ``publish_path`` fixture)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from bot_client import Publisher
from bot_client._publish import FastPath, HandOff, Lock
from bot_client.publisher import _Slot
from bus.envelope import timestamp_bytes
from bus.proxy import Proxy
from bus.subscriber import Gap
from bus.transport import libzmq_send_address
from tests.conftest import scaled, synced_subscriber

Context = zmq.Context[zmq.Socket[bytes]]
LAST_INT64_NS = 2**63 - 1


def send_address() -> int:
    address = libzmq_send_address()
    assert address is not None, "the C accelerator is not bound (bus.transport.ACCELERATED)"
    return address


def test_lock_excludes_other_threads() -> None:
    lock = Lock()
    assert lock.acquire() is True
    assert lock.locked()
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    with pytest.raises(TypeError, match="takes no arguments"):
        Lock(1)  # type: ignore[call-arg]
    total = [0]

    def work() -> None:
        for _ in range(300):
            with lock:
                value = total[0]
                time.sleep(0)  # lets the other threads run inside the critical section
                total[0] = value + 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(scaled(20))
    assert total[0] == 1200


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


def test_handoff_sends_in_order_and_waits_on_a_full_pipe(
    pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    xpub, sub = pipe
    handoff = HandOff(100, _Slot, send_address())
    slot = _Slot("custom", "custom.k", False, "src", 1)
    for n in range(30):
        handoff.append((slot, b"meta%d" % n, b"payload%d" % n))
    assert len(handoff) == 30
    assert [meta for _slot, meta, _payload in handoff][:2] == [b"meta0", b"meta1"]
    assert handoff.drain(xpub, 3) == (3, False)
    sent, blocked = handoff.drain(xpub, 100)
    assert blocked, "the pipe holds a few messages only"
    assert len(handoff) == 27 - sent
    received: list[list[bytes]] = []
    deadline = time.monotonic() + scaled(5)
    while len(received) < 30:
        assert time.monotonic() < deadline, f"received {len(received)} of 30"
        received += receive_all(sub)
        handoff.drain(xpub, 100)
    assert received == [[b"custom.k", b"meta%d" % n, b"payload%d" % n] for n in range(30)]
    assert len(handoff) == 0
    xpub.close(linger=0)
    handoff.append((slot, b"m", b"p"))
    assert handoff.drain(xpub, 100) == (0, True)  # closed: nothing goes, nothing is lost
    assert len(handoff) == 1
    handoff.clear()
    assert len(handoff) == 0


def test_handoff_ring_wraps_and_refuses_beyond_its_limit(
    pipe: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    xpub, sub = pipe
    handoff = HandOff(3, _Slot, send_address())
    slot = _Slot("custom", "custom", False, "src", 1)
    received: list[list[bytes]] = []
    for round_ in range(20):  # the ring's 4 places are reused again and again
        for n in range(3):
            handoff.append((slot, b"%d" % round_, b"%d" % n))
        with pytest.raises(BufferError, match="full"):
            handoff.append((slot, b"x", b"x"))
        while len(handoff):
            handoff.drain(xpub, 100)
            received += receive_all(sub)
    received += receive_all(sub)
    expected = [[b"custom", b"%d" % r, b"%d" % n] for r in range(20) for n in range(3)]
    assert received == expected
    with pytest.raises(TypeError, match="slot, meta, payload"):
        handoff.append((slot, "text", b"p"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="slot, meta, payload"):
        handoff.append(("not a slot", b"m", b"p"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        HandOff(0, _Slot, send_address())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=LAST_INT64_NS), min_size=1, max_size=5))
def test_c_timestamps_equal_the_envelope_text(stamps_ns: list[int]) -> None:
    publisher = Publisher(url="ipc:///nonexistent/tradebus-test.sock", autostart=False)
    try:
        assert publisher.fast_path
        path = publisher._fast_path
        # in order and out of order: the per-millisecond text cache must follow
        for ns in [*stamps_ns, *sorted(stamps_ns), stamps_ns[0] + 1]:
            if ns <= LAST_INT64_NS:
                assert path.timestamp(ns) == timestamp_bytes(ns)
        with pytest.raises(ValueError, match="1970 or later"):
            path.timestamp(-1)
    finally:
        publisher.close(timeout=0)


def test_fast_path_refuses_misuse_and_survives_hostile_keys(
    proxy: Proxy, zmq_context: Context
) -> None:
    with pytest.raises(RuntimeError, match="not initialised"):
        FastPath.__new__(FastPath).publish("custom", {})
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
        with pytest.raises(TypeError, match="already initialised"):
            publisher._fast_path.__init__()
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
        assert publisher.fast_path
        assert isinstance(publisher._fast, HandOff)  # the I/O thread sends, lock- and GIL-free
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
