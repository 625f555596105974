"""The examples in docs/subscriber.md run exactly as written against a live proxy."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zmq

from bus.envelope import encode_event
from bus.proxy import Proxy
from bus.transport import send_event
from tests.conftest import scaled
from tests.support import wait_until

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "subscriber.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_the_doc_has_the_five_line_example() -> None:
    blocks = python_blocks()
    assert len(blocks) == 2
    assert len(blocks[0].strip().splitlines()) == 5
    assert "bus.Subscriber(" in blocks[0]
    assert "bus.BlockingSubscriber(" in blocks[1]


@pytest.mark.parametrize("block", [0, 1], ids=["asyncio-five-lines", "blocking"])
def test_doc_example_runs_as_written(
    zmq_context: zmq.Context[zmq.Socket[bytes]], proxy: Proxy, block: int
) -> None:
    publisher: zmq.Socket[bytes] = zmq_context.socket(zmq.XPUB)
    publisher.linger = 0
    publisher.connect(proxy.frontend_endpoint)
    assert publisher.poll(int(scaled(5) * 1000))
    publisher.recv()

    def publish(topic: str, seq: int, **data: object) -> None:
        frames = encode_event(topic, topic.split(".")[0], data, "bot-1", 1, seq)
        send_event(publisher, *frames)

    publish("market_data.ETH-USD", 1, price=2500.0)
    publish("ai_decision", 1, action="hold")
    wait_until(lambda: proxy.cache.stats.events >= 2, "the proxy's cache to hold both")

    environment = dict(os.environ)
    environment.update(
        TRADEBUS__PROXY_BACKEND=proxy.backend_endpoint,
        TRADEBUS__PROXY_SNAPSHOT=proxy.snapshot_endpoint,
        PYTHONUNBUFFERED="1",
    )
    example = subprocess.Popen(
        [sys.executable, "-c", python_blocks()[block]],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert example.stdout is not None
        for line in example.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()

    def next_line() -> str:
        try:
            return lines.get(timeout=scaled(10))
        except queue.Empty:
            example.kill()
            _out, err = example.communicate(timeout=scaled(5))
            pytest.fail(f"the example printed nothing more; stderr: {err}")

    try:
        assert next_line() == "market_data.ETH-USD bot-1#1 {'price': 2500.0}"
        # the snapshot is in: the example's subscriptions are in force at the proxy
        publish("ai_decision", 2, action="buy")
        publish("position_update.BTC-USD", 1, size=0.5)
        publish("market_data.BTC-USD", 1, price=45000.0)
        publish("market_data.BTC-USD", 5, price=45001.5)
        assert [next_line() for _ in range(4)] == [
            "position_update.BTC-USD bot-1#1 {'size': 0.5}",
            "market_data.BTC-USD bot-1#1 {'price': 45000.0}",
            "GAP market_data.BTC-USD from bot-1: 3 missed (seq 2..4)",
            "market_data.BTC-USD bot-1#5 {'price': 45001.5}",
        ]
    finally:
        example.kill()
        example.wait(scaled(5))
        publisher.close(linger=0)
