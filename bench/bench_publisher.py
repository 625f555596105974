"""Publisher call cost: ``Publisher.publish()`` from one thread over ipc://, 300-byte events.

A proxy runs in its own process (``tradebus proxy --no-cache`` on ipc:// endpoints), so
this process measures only the publisher. Each call is timed with ``perf_counter_ns``.

Baseline, same run, same proxy: raw pyzmq ``send_multipart`` of pre-encoded three-frame
messages on an XPUB socket: the cost of handing bytes to ZeroMQ with no validation, no
encoding, no sequencing. The ratio shows what the publisher adds on top.

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

import zmq

from bot_client import Publisher
from bus.envelope import encode_event

EVENTS = int(os.environ.get("PUBLISHER_BENCH_EVENTS", "200000"))
WARMUP = 20_000
TARGET_RATE = 250_000
TARGET_P99_US = 20.0


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


def _timed(call: Callable[[int], None], count: int) -> tuple[float, array[int]]:
    """Seconds for ``count`` calls and each call's duration in ns."""
    durations = array("q", bytes(8 * count))
    clock = time.perf_counter_ns
    started = clock()
    for index in range(count):
        before = clock()
        call(index)
        durations[index] = clock() - before
    return (clock() - started) / 1e9, durations


def _report(name: str, seconds: float, durations: array[int]) -> tuple[float, float, float]:
    ordered = sorted(durations)
    count = len(ordered)
    rate = count / seconds
    p50 = ordered[count // 2] / 1000
    p99 = ordered[int(count * 0.99)] / 1000
    p999 = ordered[int(count * 0.999)] / 1000
    print(
        f"{name:<34} {rate:>10,.0f} events/s   p50 {p50:6.2f} us   p99 {p99:6.2f} us   "
        f"p99.9 {p999:7.2f} us"
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
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
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
    base_seconds, base_durations = _timed(baseline, EVENTS)
    raw.close(linger=1000)

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
    payloads = [_data(i) for i in range(100)]

    def publish_call(index: int) -> None:
        publish("market_data", payloads[index % 100])

    _timed(publish_call, WARMUP)
    pub_seconds, pub_durations = _timed(publish_call, EVENTS)
    publisher.flush(10)
    status = publisher.status()
    publisher.close()

    # the same call with the guide's defaults around it: market data rate-limited to one per
    # symbol per second (conflated, nothing sent), and a disabled publisher (the default)
    gated = Publisher(url=frontend, source_id="bench-gated", heartbeat_interval=0, context=context)
    gated_publish = gated.publish

    def gated_call(index: int) -> None:
        gated_publish("market_data", payloads[index % 100])

    _timed(gated_call, WARMUP)
    gated_seconds, gated_durations = _timed(gated_call, EVENTS)
    gated.close()
    disabled = Publisher.from_env({})
    disabled_publish = disabled.publish

    def disabled_call(index: int) -> None:
        disabled_publish("market_data", payloads[index % 100])

    disabled_seconds, disabled_durations = _timed(disabled_call, EVENTS)

    print(f"{'':<34} {'throughput':>10}")
    base_rate, base_p50, base_p99 = _report(
        "baseline: raw send_multipart", base_seconds, base_durations
    )
    rate, p50, p99 = _report("Publisher.publish()", pub_seconds, pub_durations)
    print(
        f"ratio publish/baseline: throughput {rate / base_rate:.2f}x, "
        f"p50 {p50 / base_p50:.2f}x, p99 {p99 / base_p99:.2f}x"
    )
    _report("publish(), 1 s interval (conflated)", gated_seconds, gated_durations)
    _report("publish(), disabled (default)", disabled_seconds, disabled_durations)
    print(
        f"publisher status: sent {status['sent']}, dropped {status['dropped_total']}, "
        f"queued {status['queued']}"
    )
    met = rate >= TARGET_RATE and p99 < TARGET_P99_US
    print(
        f"target >= {TARGET_RATE:,} events/s and p99 < {TARGET_P99_US:.0f} us: "
        f"{'met' if met else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
