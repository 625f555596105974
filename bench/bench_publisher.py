"""Publisher call cost: ``Publisher.publish()`` from one thread over ipc://, 300-byte events.

A proxy runs in its own process (``tradebus proxy --no-cache`` on ipc:// endpoints), so
this process measures only the publisher. Each call is timed with ``perf_counter_ns``.

Baseline, same run, same proxy: raw pyzmq ``send_multipart`` of pre-encoded three-frame
messages on an XPUB socket: the cost of handing bytes to ZeroMQ with no validation, no
encoding, no sequencing. The ratio shows what the publisher adds on top. A second reference
sends the same frames with three calls of pyzmq's Cython ``send`` (no Python wrapper), a
third with one call of the C accelerator (bus/_wire.c), the cheapest way to hand them to
ZeroMQ from Python.

``publish()`` is all Python (bot_client/publisher.py, bot_client/delivery.py): the caller
stamps the event and hands it to the publisher's I/O thread, which sends it.

    python -m bench publisher        (PUBLISHER_BENCH_EVENTS=200000 by default)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from bot_client import Publisher
from bus.envelope import encode_event
from bus.transport import ACCELERATED, sender

EVENTS = int(os.environ.get("PUBLISHER_BENCH_EVENTS", "200000"))
WARMUP = 20_000
TARGET_RATE = 150_000
TARGET_P99_US = 25.0
PACED_RATE = 10_000


def _start_proxy(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    frontend = f"ipc://{directory}/in.sock"
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tradebus",
            "proxy",
            "--frontend",
            frontend,
            "--backend",
            f"ipc://{directory}/out.sock",
            "--snapshot",
            f"ipc://{directory}/snap.sock",
            "--no-cache",
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not (directory / "in.sock").exists():
        if time.monotonic() > deadline or proxy.poll() is not None:
            proxy.kill()
            raise SystemExit("proxy did not start")
        time.sleep(0.05)
    return proxy, frontend


def _data(index: int) -> dict[str, object]:
    return {
        "symbol": "BTC-USD",
        "price": 45000.0 + (index % 100) * 0.5,
        "bid": 44999.5,
        "ask": 45000.5,
        "volume_24h": 123456.789,
        "exchange": "coinbase",
    }


Timing = tuple[float, float, "array[int]"]


def _timed(call: Callable[[int], None], count: int) -> Timing:
    """Wall seconds and calling-thread CPU seconds for ``count`` calls, each call's ns."""
    durations = array("q", bytes(8 * count))
    clock = time.perf_counter_ns
    cpu_started = time.thread_time()
    started = clock()
    for index in range(count):
        before = clock()
        call(index)
        durations[index] = clock() - before
    return (clock() - started) / 1e9, time.thread_time() - cpu_started, durations


def _paced(call: Callable[[int], None], rate: int) -> Timing:
    """Like _timed, for 2 s of calls at ``rate`` per second (10 per sleep), each call timed."""
    count = 2 * rate
    durations = array("q", bytes(8 * count))
    clock = time.perf_counter_ns
    cpu_started = time.thread_time()
    started = time.perf_counter()
    for index in range(count):
        if index % 10 == 0:
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        before = clock()
        call(index)
        durations[index] = clock() - before
    return time.perf_counter() - started, time.thread_time() - cpu_started, durations


def _report(name: str, timing: Timing) -> tuple[float, float, float]:
    seconds, cpu_seconds, durations = timing
    ordered = sorted(durations)
    count = len(ordered)
    rate = count / seconds
    p50 = ordered[count // 2] / 1000
    p99 = ordered[int(count * 0.99)] / 1000
    p999 = ordered[int(count * 0.999)] / 1000
    # CPU per call of the calling thread only: what the call costs the bot, free of the
    # time it spent descheduled on a busy machine
    cpu_us = cpu_seconds / count * 1e6
    print(
        f"{name:<36} {rate:>9,.0f} ev/s  p50 {p50:6.2f} us  p99 {p99:7.2f} us  "
        f"p99.9 {p999:8.2f} us  cpu {cpu_us:5.2f} us"
    )
    return rate, p50, p99


def main() -> int:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="tradebus-bench-") as tmp:
        proxy, frontend = _start_proxy(Path(tmp))
        try:
            return _run(context, frontend)
        finally:
            proxy.terminate()
            proxy.wait(10)
            context.term()


def _run(context: zmq.Context[zmq.Socket[bytes]], frontend: str) -> int:
    # the payload an event of _data() becomes, measured with the real encoder
    sample = encode_event(
        "market_data.BTC-USD", "market_data", {**_data(0), "timestamp": "x" * 27}, "bench", 1, 1
    )
    print(
        f"{EVENTS} events per run, payload {len(sample[2])} bytes, ipc:// to a proxy process; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"C accelerator {'on' if ACCELERATED else 'OFF'}"
    )

    raw: zmq.Socket[bytes] = context.socket(zmq.XPUB)
    raw.setsockopt(zmq.XPUB_NODROP, 1)
    raw.setsockopt(zmq.SNDHWM, 10_000)
    raw.connect(frontend)
    raw.recv()  # the proxy's subscribe-all: connected
    send_multipart = raw.send_multipart
    retries = 0

    def baseline(_index: int) -> None:
        # non-blocking, as the publisher sends; a full pipe is retried, not dropped
        nonlocal retries
        while True:
            try:
                send_multipart(sample, zmq.NOBLOCK)
                return
            except zmq.Again:
                retries += 1

    _timed(baseline, WARMUP)
    base_timing = _timed(baseline, EVENTS)
    # a second reference: the three frames through pyzmq's Cython send, the cheapest way
    # without the C accelerator
    cython_send = zmq.backend.Socket.send.__get__(raw)
    topic, meta, payload = sample
    more = zmq.SNDMORE | zmq.NOBLOCK

    def three_sends(_index: int) -> None:
        nonlocal retries
        while True:
            try:
                cython_send(topic, more)
            except zmq.Again:
                retries += 1
                continue
            cython_send(meta, more)
            cython_send(payload, zmq.NOBLOCK)
            return

    _timed(three_sends, WARMUP)
    sends_timing = _timed(three_sends, EVENTS)
    # the third: one call of the C accelerator, as publish() hands its frames over: the
    # floor of any publish() on this machine
    send_message = sender(raw)

    def one_call(_index: int) -> None:
        nonlocal retries
        while not send_message(topic, meta, payload):
            retries += 1

    _timed(one_call, WARMUP)
    accelerated_timing = _timed(one_call, EVENTS)
    raw.close(linger=1000)

    payloads = [_data(i) for i in range(100)]

    def measure(paced: int = 0) -> tuple[Timing, dict[str, Any], float]:
        publisher = Publisher(
            url=frontend,
            source_id="bench",
            publish_interval=0,
            queue_size=100_000,
            heartbeat_interval=0,
            retry_delay=0.05,
            context=context,
        )
        deadline = time.monotonic() + 10
        while not publisher.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        publish = publisher.publish

        def publish_call(index: int) -> None:
            publish("market_data", payloads[index % 100])

        _timed(publish_call, WARMUP)
        publisher.flush(10)
        sent_before = publisher.status()["sent"]
        timing = _timed(publish_call, EVENTS) if not paced else _paced(publish_call, paced)
        flush_started = time.perf_counter()
        publisher.flush(30)
        flush_seconds = time.perf_counter() - flush_started
        status = publisher.status()
        publisher.close()
        # what reached ZeroMQ, per second until the last event did: the call rate only
        # counts if the I/O thread kept up (nothing dropped)
        delivered = status["sent"] - sent_before
        return timing, status, delivered / (timing[0] + flush_seconds)

    pub_timing, status, delivered_rate = measure()
    # a trading loop's pace rather than flat out: what one call costs the bot then
    paced_timing, _paced_status, _rate = measure(paced=PACED_RATE)

    # the same call with the guide's defaults around it: market data rate-limited to one per
    # symbol per second (conflated, nothing sent), and a disabled publisher (the default)
    gated = Publisher(url=frontend, source_id="bench-gated", heartbeat_interval=0, context=context)
    gated_publish = gated.publish

    def gated_call(index: int) -> None:
        gated_publish("market_data", payloads[index % 100])

    _timed(gated_call, WARMUP)
    gated_timing = _timed(gated_call, EVENTS)
    gated.close()
    disabled = Publisher.from_env({})
    disabled_publish = disabled.publish

    def disabled_call(index: int) -> None:
        disabled_publish("market_data", payloads[index % 100])

    disabled_timing = _timed(disabled_call, EVENTS)

    base_rate, base_p50, base_p99 = _report("baseline: raw send_multipart", base_timing)
    _report("reference: 3 Cython sends", sends_timing)
    _report("reference: 1 accelerated send", accelerated_timing)
    rate, p50, p99 = _report("Publisher.publish()", pub_timing)
    print(
        f"ratio publish/baseline: throughput {rate / base_rate:.2f}x, "
        f"p50 {p50 / base_p50:.2f}x, p99 {p99 / base_p99:.2f}x"
    )
    _paced_rate, _paced_p50, paced_p99 = _report(f"publish() at {PACED_RATE:,}/s", paced_timing)
    _report("publish(), 1 s interval (conflated)", gated_timing)
    _report("publish(), disabled (default)", disabled_timing)
    print(
        f"publish(): delivered {delivered_rate:,.0f} events/s to ZeroMQ "
        f"(sent {status['sent']}, dropped {status['dropped_total']}, "
        f"queued {status['queued']})"
    )
    met = (
        rate >= TARGET_RATE
        and paced_p99 <= TARGET_P99_US
        and status["dropped_total"] == 0
        and delivered_rate >= TARGET_RATE
    )
    print(
        f"target >= {TARGET_RATE:,} calls/s flat out, all delivered, and p99 <= "
        f"{TARGET_P99_US:.0f} us at {PACED_RATE:,}/s: {'met' if met else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
