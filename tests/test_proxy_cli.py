"""``tradebus proxy`` as a subprocess: errors, signals, and a kill -9 plus restart."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from bus import BlockingSubscriber, Event, Gap
from bus.envelope import encode_event
from bus.transport import send_event
from tests.conftest import scaled
from tests.support import free_port

Context = zmq.Context[zmq.Socket[bytes]]
ROOT = Path(__file__).resolve().parent.parent


class ProxyProcess:
    """``python -m tradebus proxy ...`` with its stderr lines collected by a thread."""

    def __init__(self, *args: str) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("TRADEBUS__")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tradebus", "proxy", *args],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def wait_for_line(self, text: str) -> str:
        deadline = time.monotonic() + scaled(10)
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if text in line:
                return line
        pytest.fail(f"no {text!r} from the proxy; stderr: {''.join(self.stderr)}")

    def finish(self) -> tuple[int, str]:
        """Wait for the exit; (status, all of stderr)."""
        status = self.process.wait(scaled(10))
        self.reader.join(scaled(5))
        return status, "".join(self.stderr)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(scaled(10))


@pytest.fixture
def ports() -> list[int]:
    return [free_port(), free_port(), free_port()]


def endpoints(ports: list[int]) -> list[str]:
    return [
        "--frontend",
        f"tcp://127.0.0.1:{ports[0]}",
        "--backend",
        f"tcp://127.0.0.1:{ports[1]}",
        "--snapshot",
        f"tcp://127.0.0.1:{ports[2]}",
    ]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_the_proxy_cleanly(ports: list[int], signum: signal.Signals) -> None:
    proxy = ProxyProcess(*endpoints(ports))
    try:
        proxy.wait_for_line('"proxy.started"')
        proxy.process.send_signal(signum)
        status, stderr = proxy.finish()
    finally:
        proxy.kill()
    assert status == 0
    assert '"proxy.stopped"' in stderr
    assert "Traceback" not in stderr


def one_line_error(*args: str, **environment: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tradebus", "proxy", *args],
        cwd=ROOT,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=scaled(20),
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_port_in_use_is_one_line_and_exit_2(ports: list[int]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[1]))
        holder.listen()
        line = one_line_error(*endpoints(ports))
    assert line == (
        f"tradebus proxy: error: cannot bind subscriber (XPUB) socket to "
        f"tcp://127.0.0.1:{ports[1]}: Address already in use"
    )


def test_bad_endpoint_is_one_line_and_exit_2() -> None:
    line = one_line_error("--frontend", "not-an-endpoint")
    assert line == (
        "tradebus proxy: error: --frontend='not-an-endpoint': "
        "expected a ZeroMQ endpoint tcp://host:port or ipc://path"
    )


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--backend-hwm", "-5"], "--backend-hwm='-5': expected a whole number above 0"),
        (["--capture-hwm", "lots"], "--capture-hwm='lots': expected a whole number above 0"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--cache-nice", "20"], "--cache-nice='20': expected a whole number 0..19"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args: list[str], complaint: str) -> None:
    assert complaint in one_line_error(*args)


def connected_publisher(context: Context, endpoint: str) -> zmq.Socket[bytes]:
    publisher: zmq.Socket[bytes] = context.socket(zmq.XPUB)
    publisher.linger = 0
    # IMMEDIATE: drop events while the proxy is away (instead of queueing them for the
    # reconnection), so the gap is certain; and see b"\x00" / b"\x01" on loss / return.
    publisher.setsockopt(zmq.IMMEDIATE, 1)
    publisher.connect(endpoint)
    wait_for_subscribe_all(publisher)
    return publisher


def wait_for_subscribe_all(publisher: zmq.Socket[bytes]) -> None:
    """The proxy's XSUB subscribes to everything on every (re)connection."""
    deadline = time.monotonic() + scaled(10)
    while time.monotonic() < deadline:
        if publisher.poll(100) and publisher.recv() == b"\x01":
            return
    pytest.fail("the publisher never (re)connected to the proxy")


def test_killed_proxy_restarts_and_everyone_reconnects_reporting_the_gap(
    zmq_context: Context, ports: list[int]
) -> None:
    first = ProxyProcess(*endpoints(ports))
    second: ProxyProcess | None = None
    publisher: zmq.Socket[bytes] | None = None
    seq = 0

    def publish() -> None:
        nonlocal seq
        seq += 1
        assert publisher is not None
        frames = encode_event("market_data.BTC-USD", "market_data", {"n": seq}, "bot", 1, seq)
        send_event(publisher, *frames)

    try:
        first.wait_for_line('"proxy.started"')
        publisher = connected_publisher(zmq_context, f"tcp://127.0.0.1:{ports[0]}")
        with BlockingSubscriber(
            ["market_data"],
            endpoint=f"tcp://127.0.0.1:{ports[1]}",
            snapshot=True,
            snapshot_endpoint=f"tcp://127.0.0.1:{ports[2]}",
            context=zmq_context,
        ) as subscriber:
            for _ in range(5):
                publish()
            received = [subscriber.recv(scaled(5)) for _ in range(5)]
            assert [getattr(item, "seq", None) for item in received] == [1, 2, 3, 4, 5]

            first.process.send_signal(signal.SIGKILL)
            first.kill()
            for _ in range(5):
                publish()  # nobody is listening: lost
            second = ProxyProcess(*endpoints(ports))
            second.wait_for_line('"proxy.started"')
            wait_for_subscribe_all(publisher)
            # The subscriber resubscribes by itself; publish until its subscription is back.
            item = None
            deadline = time.monotonic() + scaled(10)
            while item is None:
                assert time.monotonic() < deadline, "the subscriber never came back"
                publish()
                item = subscriber.recv(0.05)
            assert isinstance(item, Gap), f"expected the gap first, got {item}"
            assert item.first_seq == 6
            event = subscriber.recv(scaled(5))
            assert isinstance(event, Event)
            assert item.last_seq == event.seq - 1
            assert item.missed >= 5
            assert subscriber.stats.gaps == 1
            publish()
            after = subscriber.recv(scaled(5))
            assert isinstance(after, Event)
            assert after.seq == event.seq + 1
        second.process.send_signal(signal.SIGTERM)
        status, _stderr = second.finish()
        assert status == 0
    finally:
        if publisher is not None:
            publisher.close(linger=0)
        first.kill()
        if second is not None:
            second.kill()


def test_settings_come_from_the_environment_too(ports: list[int]) -> None:
    line = one_line_error(TRADEBUS__PROXY_BACKEND_HWM="lots")
    assert line == (
        "tradebus proxy: error: TRADEBUS__PROXY_BACKEND_HWM='lots': expected a whole number above 0"
    )
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[0]))
        holder.listen()
        line = one_line_error(TRADEBUS__PROXY_FRONTEND=f"tcp://127.0.0.1:{ports[0]}")
    assert f"publisher (XSUB) socket to tcp://127.0.0.1:{ports[0]}: Address already" in line
