"""Bus throughput: publisher -> proxy -> subscriber, each in its own process.

Run: ``python -m bench.bench_bus_throughput`` (or ``make bench``). Prints, measured in the
same run:

* raw pyzmq PUB -> SUB, one 300-byte frame, no proxy, no envelope (the baseline);
* tradebus publisher -> ``tradebus`` proxy (gate, last-value cache and history, the
  defaults) -> SUB, 300-byte three-frame envelopes (topic + meta + payload);
* the same on the pure-Python path (``TRADEBUS_NO_ACCELERATOR`` in all three processes:
  pyzmq's calls instead of bus._wire), to show what the accelerator buys;
* the same with the cache but no history (``history_events=0``), to show what the history
  costs, without the gate (libzmq's own loop), with CURVE on every hop, and through a
  proxy with ``cache=False``, to show what the cache costs;
* CPU time per event of each process, and of the proxy's threads (forwarder, cache,
  libzmq's I/O thread), so that "2 cores allow at most N events/s" can be read off;
* below saturation, paced at ``--latency-rates``: publish -> receive latency through the
  proxy with the cache on and off (the cache must not slow forwarding).

Events are encoded before the clock starts so the figures are the bus's, not orjson's.
Throughput = events / (first send -> last receive), both on the system-wide monotonic clock.
HWMs are raised so that no event is dropped; losses would be printed.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import zmq
import zmq.backend

from bus.envelope import META_HEADER_SIZE, encode_meta, meta_publish_ns
from bus.keys import ClientKeys, configure_client, create_key, load_client_keys, load_server_keys
from bus.transport import (
    ACCELERATED,
    ACCELERATOR_OFF_VARIABLE,
    ACCELERATOR_PROBLEM,
    NOBLOCK,
    receiver,
    sender,
)

EVENT_BYTES = 300
HWM = 2_000_000
WARMUP_TOPIC = b"warmup"
# the fastest raw pyzmq calls, without the sugar layer (as bus.transport uses)
raw_send = zmq.backend.Socket.send
raw_recv = zmq.backend.Socket.recv


def _encoded_events(count: int, envelope: bool) -> list[list[bytes]]:
    """``count`` messages of exactly EVENT_BYTES bytes in total."""
    if not envelope:
        return [[os.urandom(EVENT_BYTES)] for _ in range(count)]
    from bus.envelope import encode_event

    symbols = ["BTC-USD", "ETH-USD", "SOL-USD", "ETH-PERP"]

    def encode(index: int, pad: str) -> list[bytes]:
        symbol = symbols[index % len(symbols)]
        data = {"symbol": symbol, "price": 45000.5 + index, "volume": 1.25, "pad": pad}
        return encode_event(
            f"market_data.{symbol}", "market_data", data, "bench-1", 1, index // 4 + 1
        )

    pad = "x" * (EVENT_BYTES - sum(len(f) for f in encode(count, "")))
    messages = [encode(index, pad) for index in range(count)]
    return messages


def _warm_publisher(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    bind: bool,
    envelope: bool,
    go: MpEvent,
    keys: ClientKeys | None = None,
) -> zmq.Socket[bytes]:
    """A PUB socket on ``endpoint`` once the subscriber has received from it."""
    socket = context.socket(zmq.PUB)
    if keys is not None:
        configure_client(socket, keys)
    socket.sndhwm = HWM
    socket.linger = -1
    if bind:
        socket.bind(endpoint)
    else:
        socket.connect(endpoint)
    # Until the subscriber says it receives, send warm-up messages: proves the whole path
    # (subscriptions included) is connected before the measured stream starts.
    warmups = 0
    while not go.wait(0.01):
        warmups += 1
        socket.send_multipart(_warmup_event(warmups) if envelope else [WARMUP_TOPIC])
    return socket


def _warmup_event(seq: int) -> list[bytes]:
    """A well-formed event (the proxy's gate refuses anything else) on the warm-up topic."""
    from bus.envelope import encode_event

    return encode_event(WARMUP_TOPIC.decode(), "warmup", {}, "bench-warmup", 1, seq)


def _warm_subscriber(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    bind: bool,
    go: MpEvent,
    keys: ClientKeys | None = None,
) -> zmq.Socket[bytes]:
    """A SUB socket on ``endpoint`` that has received warm-up messages and then, consumed
    here, the first measured one."""
    socket = context.socket(zmq.SUB)
    if keys is not None:
        configure_client(socket, keys)
    socket.rcvhwm = HWM
    socket.subscribe(b"")
    if bind:
        socket.bind(endpoint)
    else:
        socket.connect(endpoint)
    while socket.recv_multipart()[0] == WARMUP_TOPIC:
        go.set()
    return socket


def _publisher(
    endpoint: str,
    bind: bool,
    count: int,
    envelope: bool,
    go: MpEvent,
    report: Connection,
    keys: ClientKeys | None = None,
) -> None:
    messages = _encoded_events(count, envelope)
    context = zmq.Context()
    socket = _warm_publisher(context, endpoint, bind, envelope, go, keys)
    started = time.monotonic()
    cpu_started = time.process_time()  # all threads: this one and libzmq's I/O thread
    if envelope:
        send = sender(socket)  # one C call per message (bus.transport)
        for topic, meta, payload in messages:
            send(topic, meta, payload)
    else:
        for (frame,) in messages:
            raw_send(socket, frame)
    report.send(started)
    socket.close()  # waits (linger) until libzmq has written everything out
    report.send(time.process_time() - cpu_started)
    context.term()


def _subscriber(
    endpoint: str,
    bind: bool,
    count: int,
    envelope: bool,
    go: MpEvent,
    report: Connection,
    keys: ClientKeys | None = None,
) -> None:
    context = zmq.Context()
    socket = _warm_subscriber(context, endpoint, bind, go, keys)
    received = 1
    cpu_started = time.process_time()
    # a whole message per call: three frames through the C accelerator, or the one frame
    recv: Any = receiver(socket) if envelope else partial(raw_recv, socket, flags=NOBLOCK)
    while received < count:
        try:
            recv()
        except zmq.Again:
            # the queue is empty: wait (Socket.poll is too slow to call per message)
            if not socket.poll(2_000):
                break  # events were lost; the count shows how many
            continue
        received += 1
    finished = time.monotonic()
    report.send((finished, received, time.process_time() - cpu_started))
    socket.close(linger=0)
    context.term()


def _paced_publisher(endpoint: str, rate: int, count: int, go: MpEvent, report: Connection) -> None:
    """``count`` events at ``rate`` per second, each stamped with its send time in meta.

    Sent in bursts of one millisecond's worth (sleeping between them: a spinning publisher
    would take a core from the proxy); the meta frame is built right before each send.
    """
    (topic, meta, payload), *_ = _encoded_events(1, True)
    source = meta[META_HEADER_SIZE:]
    # the payload repeats the meta frame's seq (the proxy's gate checks that they agree)
    payload_head = payload[: payload.rindex(b'"seq":') + len(b'"seq":')]
    context = zmq.Context()
    socket = _warm_publisher(context, endpoint, False, True, go)
    send = sender(socket)
    burst = max(1, rate // 1000)
    started = time.monotonic()
    for first in range(0, count, burst):
        due = started + first / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for seq in range(first + 1, min(first + burst, count) + 1):
            send(topic, encode_meta(source, 1, seq, time.time_ns()), b"%s%d}" % (payload_head, seq))
    report.send(started)
    socket.close()
    context.term()


def _latency_subscriber(endpoint: str, count: int, go: MpEvent, report: Connection) -> None:
    """Receives ``count`` events; reports (received, p50, p99, p99.9 latency in us)."""
    context = zmq.Context()
    socket = _warm_subscriber(context, endpoint, False, go)
    latencies = array("q")
    receive = receiver(socket)
    now_ns = time.time_ns
    while len(latencies) < count - 1:
        try:
            _topic, meta, _payload = receive()
        except zmq.Again:
            if not socket.poll(2_000):
                break
            continue
        latencies.append(now_ns() - meta_publish_ns(meta))
    ordered = sorted(latencies)
    n = len(ordered)
    report.send(
        (n + 1, *(ordered[min(n - 1, int(n * q))] / 1000 for q in (0.5, 0.99, 0.999)))
        if n
        else (1, 0.0, 0.0, 0.0)
    )
    socket.close(linger=0)
    context.term()


def _thread_cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every thread of this process, by native id."""
    ticks = os.sysconf("SC_CLK_TCK")
    result = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as stat:
            text = stat.read()
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        result[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return result


def _proxy(
    frontend: str,
    backend: str,
    snapshot: str,
    options: dict[str, Any],
    count: int,
    stop: MpEvent,
    report: Connection,
) -> None:
    from bus.proxy import Proxy, ProxyConfig

    config = ProxyConfig(
        frontend=frontend,
        backend=backend,
        snapshot=snapshot,
        frontend_hwm=HWM,
        backend_hwm=HWM,
        **options,
    )
    cache = config.cache
    with Proxy(config) as proxy:
        forwarder = proxy.threads["forwarder"].native_id
        cache_thread = [t.native_id for job, t in proxy.threads.items() if job == "cache"]
        stop.wait()
        # the subscriber has everything; how far behind is the (lower-priority) cache?
        backlog = count - proxy.cache.stats.events if cache else 0
        deadline = time.monotonic() + 60
        while cache and proxy.cache.stats.events < count and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu = {"forwarder": 0.0, "cache": 0.0, "zmq io": 0.0}
        for tid, (name, seconds) in _thread_cpu_seconds().items():
            if tid == forwarder:
                cpu["forwarder"] += seconds
            elif tid in cache_thread:
                cpu["cache"] += seconds
            elif name.startswith("ZMQbg/IO"):
                cpu["zmq io"] += seconds
        report.send((cpu, backlog, proxy.cache.stats.events, proxy.cache.stats.gaps))


@dataclass
class Run:
    rate: float
    received: int
    publisher_cpu: float = 0.0  # seconds, all threads of that process
    subscriber_cpu: float = 0.0
    proxy_cpu: dict[str, float] = field(default_factory=dict)
    cache_backlog: int = 0
    cached: int = 0
    cache_gaps: int = 0


def _free_endpoints(count: int) -> list[str]:
    """``count`` distinct loopback endpoints free right now (probed together: a port
    probed and closed alone may be handed out again to the next probe)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    probes = [context.socket(zmq.PUB) for _ in range(count)]
    ports = [probe.bind_to_random_port("tcp://127.0.0.1") for probe in probes]
    for probe in probes:
        probe.close(linger=0)
    return [f"tcp://127.0.0.1:{port}" for port in ports]


@contextlib.contextmanager
def _running(processes: Sequence[BaseProcess], stop: MpEvent) -> Iterator[None]:
    """Start ``processes``; on the way out set ``stop`` and join them, killing stragglers."""
    for process in processes:
        process.start()
    try:
        yield
    finally:
        stop.set()
        for process in processes:
            process.join(60)
            if process.is_alive():
                process.kill()


def _measure(
    count: int,
    envelope: bool,
    proxy_options: dict[str, Any] | None,
    client_keys: tuple[ClientKeys, ClientKeys] | None = None,
    environment: dict[str, str] | None = None,
) -> Run:
    """One run; ``proxy_options`` (ProxyConfig fields) None means no proxy (publisher binds,
    subscriber connects); ``environment`` is added to every process's."""
    spawn = mp.get_context("spawn")
    go = spawn.Event()
    stop = spawn.Event()
    pub_report, pub_end = spawn.Pipe(duplex=False)
    sub_report, sub_end = spawn.Pipe(duplex=False)
    proxy_report, proxy_end = spawn.Pipe(duplex=False)
    processes = []
    if proxy_options is None:
        (endpoint,) = _free_endpoints(1)
        pub_args = (endpoint, True, count, envelope, go, pub_end)
        sub_args = (endpoint, False, count, envelope, go, sub_end)
    else:
        frontend, backend, snapshot = _free_endpoints(3)
        proxy_args = (frontend, backend, snapshot, proxy_options, count, stop, proxy_end)
        processes.append(spawn.Process(target=_proxy, args=proxy_args))
        publisher_keys, subscriber_keys = client_keys or (None, None)
        pub_args = (frontend, False, count, envelope, go, pub_end, publisher_keys)
        sub_args = (backend, False, count, envelope, go, sub_end, subscriber_keys)
    processes.append(spawn.Process(target=_subscriber, args=sub_args))
    processes.append(spawn.Process(target=_publisher, args=pub_args))
    with _environment(environment or {}), _running(processes, stop):
        started: float = pub_report.recv()
        finished, received, subscriber_cpu = sub_report.recv()
        run = Run(received / (finished - started), received, pub_report.recv(), subscriber_cpu)
        stop.set()
        if proxy_options is not None:
            run.proxy_cpu, run.cache_backlog, run.cached, run.cache_gaps = proxy_report.recv()
    return run


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` set while processes start (spawn copies the environment then)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _measure_latency(rate: int, seconds: float, proxy_cache: bool) -> tuple[int, ...]:
    """(received, p50, p99, p99.9 us) of events paced at ``rate`` through a proxy."""
    count = int(rate * seconds)
    spawn = mp.get_context("spawn")
    go = spawn.Event()
    stop = spawn.Event()
    pub_report, pub_end = spawn.Pipe(duplex=False)
    sub_report, sub_end = spawn.Pipe(duplex=False)
    _proxy_report, proxy_end = spawn.Pipe(duplex=False)
    frontend, backend, snapshot = _free_endpoints(3)
    processes = [
        spawn.Process(
            target=_proxy,
            args=(frontend, backend, snapshot, {"cache": proxy_cache}, count, stop, proxy_end),
        ),
        spawn.Process(target=_latency_subscriber, args=(backend, count, go, sub_end)),
        spawn.Process(target=_paced_publisher, args=(frontend, rate, count, go, pub_end)),
    ]
    with _running(processes, stop):
        pub_report.recv()
        result: tuple[int, ...] = sub_report.recv()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per configuration")
    parser.add_argument(
        "--only",
        choices=["baseline", "cache", "python", "nohistory", "nogate", "curve", "nocache"],
        action="append",
        help="run only these",
    )
    parser.add_argument(
        "--capture-hwm", type=int, help="the proxy's capture HWM (default: its own)"
    )
    parser.add_argument("--cache-nice", type=int, help="the cache thread's niceness")
    parser.add_argument(
        "--latency-rates",
        default="10000,50000",
        help="paced rates (events/s) at which to compare forwarding latency with the cache "
        "on and off; empty to skip (default %(default)s)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=2.0, help="seconds per latency run"
    )
    args = parser.parse_args()
    cache_options: dict[str, Any] = {}
    if args.capture_hwm is not None:
        cache_options["capture_hwm"] = args.capture_hwm
    if args.cache_nice is not None:
        cache_options["cache_nice"] = args.cache_nice
    keys_dir = tempfile.mkdtemp(prefix="bench-keys-")
    create_key(keys_dir, "proxy")
    create_key(keys_dir, "bench-publisher", ["bench-1", "bench-warmup"])
    create_key(keys_dir, "bench-subscriber")
    curve = {**cache_options, "keys": load_server_keys(keys_dir)}
    curve_clients = (
        load_client_keys(keys_dir, "bench-publisher"),
        load_client_keys(keys_dir, "bench-subscriber"),
    )
    pure_python = {ACCELERATOR_OFF_VARIABLE: "1"}
    # (envelope, proxy options or None for no proxy, --only key, client keys, environment)
    configurations: dict[
        str,
        tuple[
            bool, dict[str, Any] | None, str, tuple[ClientKeys, ClientKeys] | None, dict[str, str]
        ],
    ] = {
        "raw PUB -> SUB (baseline)": (False, None, "baseline", None, {}),
        # the default proxy: gate, cache and its history (bus/history.py)
        "proxy, cache on": (True, cache_options, "cache", None, {}),
        # the same on pyzmq's calls alone (bus._wire not used), at all three processes
        "proxy, cache on, pure Python": (True, cache_options, "python", None, pure_python),
        "proxy, cache on, no history": (
            True,
            {**cache_options, "history_events": 0},
            "nohistory",
            None,
            {},
        ),
        "proxy, no gate, cache on": (True, {**cache_options, "gate": False}, "nogate", None, {}),
        "proxy, cache on, CURVE": (True, curve, "curve", curve_clients, {}),
        "proxy, cache off": (True, {"cache": False}, "nocache", None, {}),
    }
    results: dict[str, list[Run]] = {name: [] for name in configurations}
    print(
        f"{args.events} events of {EVENT_BYTES} bytes per run, {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"accelerator bus._wire {'on' if ACCELERATED else f'OFF ({ACCELERATOR_PROBLEM})'}",
        flush=True,
    )
    # interleave configurations so a busy spell on the machine hits them alike
    for _round in range(args.rounds):
        for name, (envelope, options, key, clients, environment) in configurations.items():
            if args.only and key not in args.only:
                continue
            results[name].append(_measure(args.events, envelope, options, clients, environment))
    medians = {}
    for name, runs in results.items():
        if not runs:
            continue
        medians[name] = statistics.median(r.rate for r in runs)
        lost = sum(args.events - r.received for r in runs)
        rates = ", ".join(f"{r.rate:,.0f}" for r in runs)
        print(
            f"{name:28s} median {medians[name]:>10,.0f} events/s  (runs: {rates})"
            + (f"  LOST {lost}" if lost else ""),
            flush=True,
        )
    for name, runs in results.items():
        if not runs:
            continue
        total = args.events * len(runs)
        per_event = {
            part: sum(r.proxy_cpu[part] for r in runs) / total * 1e6 for part in runs[0].proxy_cpu
        }
        if per_event:
            parts = ", ".join(f"{part} {us:.2f}" for part, us in per_event.items())
            print(f"{name:28s} proxy CPU per event (us): {parts}")
        # what each event costs the whole machine: at best 2 cores / that many events/s
        ends = (
            sum(r.publisher_cpu for r in runs) / total * 1e6,
            sum(r.subscriber_cpu for r in runs) / total * 1e6,
        )
        all_us = sum(ends) + sum(per_event.values())
        print(
            f"{name:28s} CPU per event (us): publisher {ends[0]:.2f}, subscriber {ends[1]:.2f}, "
            f"all processes {all_us:.2f}: {os.cpu_count()} cores allow at most "
            f"{(os.cpu_count() or 1) / all_us * 1e6:,.0f} events/s"
        )
    cached = results["proxy, cache on"]
    if cached:
        print(
            "cache: backlog when the subscriber had everything "
            + ", ".join(f"{r.cache_backlog:,}" for r in cached)
            + "; events cached in the end "
            + ", ".join(f"{r.cached:,}" for r in cached)
            + "; cache gaps "
            + ", ".join(str(r.cache_gaps) for r in cached)
        )
    baseline = medians.get("raw PUB -> SUB (baseline)")
    with_cache = medians.get("proxy, cache on")
    without_cache = medians.get("proxy, cache off")
    if baseline and with_cache:
        ratio = with_cache / baseline
        print(f"ratio proxy (cache on) / raw baseline: {ratio:.2f}")
        print(
            f"targets: >= 200,000 events/s through the proxy: "
            f"{'met' if with_cache >= 200_000 else 'NOT met'}; ratio >= 0.7: "
            f"{'met' if ratio >= 0.7 else 'NOT met'}"
        )
    if baseline and without_cache:
        print(f"ratio proxy (cache off) / raw baseline: {without_cache / baseline:.2f}")
    if with_cache and without_cache:
        print(f"ratio proxy cache on / cache off:      {with_cache / without_cache:.2f}")
    without_history = medians.get("proxy, cache on, no history")
    if with_cache and without_history:
        print(
            f"ratio proxy history on / history off:  {with_cache / without_history:.2f}; "
            f"history on >= 200,000 events/s: {'met' if with_cache >= 200_000 else 'NOT met'}"
        )
    without_gate = medians.get("proxy, no gate, cache on")
    if with_cache and without_gate:
        print(f"ratio proxy gate on / gate off:        {with_cache / without_gate:.2f}")
    pure = medians.get("proxy, cache on, pure Python")
    if with_cache and pure:
        print(f"ratio proxy accelerated / pure Python:  {with_cache / pure:.2f}")
    with_curve = medians.get("proxy, cache on, CURVE")
    if with_cache and with_curve:
        print(f"ratio proxy CURVE on / off (gate on):  {with_curve / with_cache:.2f}")
        print(
            "target: >= 200,000 events/s with the gate and CURVE: "
            f"{'met' if with_curve >= 200_000 else 'NOT met'}"
        )
    shutil.rmtree(keys_dir, ignore_errors=True)
    paced_rates = [int(text) for text in args.latency_rates.split(",") if text]
    for paced in paced_rates:
        # below saturation: does the cache slow forwarding? (publish -> receive, same host)
        latency_runs: dict[bool, list[tuple[int, ...]]] = {True: [], False: []}
        for _round in range(args.rounds):
            for cache in (True, False):
                latency_runs[cache].append(_measure_latency(paced, args.latency_seconds, cache))
        for cache, measured in latency_runs.items():
            lost = sum(int(paced * args.latency_seconds) - run[0] for run in measured)
            p50s = ", ".join(f"{run[1]:.0f}" for run in measured)
            p99s = ", ".join(f"{run[2]:.0f}" for run in measured)
            print(
                f"latency at {paced:,} events/s, cache {'on ' if cache else 'off'}: median p50 "
                f"{statistics.median(run[1] for run in measured):5.0f} us (runs {p50s}), "
                f"median p99 {statistics.median(run[2] for run in measured):5.0f} us "
                f"(runs {p99s})" + (f"  LOST {lost}" if lost else ""),
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
