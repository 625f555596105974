"""Bridge benchmark: latency, fan-out and idle memory, against a naive broadcast server.

``python -m bench.bench_bridge`` (also run by ``make bench``) starts a ``tradebus proxy``,
a paced publisher process (bench/loadgen_publisher.py) and, one after the other, the
naive aiohttp broadcast server (bench/naive_server.py, the original system's design; on
uvloop like the bridge when uvloop is installed) and ``tradebus bridge``. Both servers
are measured by the same load generator, bench/loadgen.c (compiled here with gcc into a
temporary directory: one epoll process that parses only frame headers, so the client is
not the bottleneck; its CPU use is reported), for:

1. end-to-end latency publisher -> proxy -> server -> client, p50/p99, at 1,000 and
   10,000 events/s to 10 clients (the publisher stamps each event's publish time into
   it; everything runs on one host, so clocks agree); best of two 4 s runs;
2. fan-out deliveries/s to 100 and 1,000 clients on one topic at the highest publish rate
   sustained without loss: the rate steps up until a trial loses an event, closes a
   client or falls behind (the last delivery trails the last publish by more than
   0.15 s + 5 % of the trial; a failing rate is tried twice), then bisects; delivered
   must equal published x clients, and every client must get every event exactly once;
3. memory per idle connection: RSS growth of the server process over 5,000 connections.

Everything is on 127.0.0.1, bounded in count and time (about 3-5 minutes in all).
``--quick`` runs smaller, shorter measurements to check the harness itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
# How far the last delivery may trail the last publish for a rate to count as sustained.
# A server that keeps up finishes right after the publisher; one that does not falls
# behind in proportion to the trial's length. The fixed part absorbs one scheduling stall
# of a busy 2-core machine, which would otherwise fail a rate the server sustains.
MAX_LAG_FIXED_S = 0.15
MAX_LAG_FRACTION = 0.05
OVERLOADED_LAG_S = 2.0
LATENCY_CONNECTIONS = 10
# `tradebus bridge` runs on uvloop when it is installed; the baseline runs on the same
# event loop, so that the ratios measure the design, not the loop
NAIVE_ON_UVLOOP = importlib.util.find_spec("uvloop") is not None
# fan-out clients read every 2 ms, many frames per read, so the client stays cheap
FANOUT_NAP_US = 2_000


@dataclass(frozen=True)
class Plan:
    latency_rates: tuple[int, ...] = (1_000, 10_000)
    latency_seconds: float = 4.0
    latency_runs: int = 2
    fanout_clients: tuple[int, ...] = (100, 1_000)
    trial_seconds: float = 3.0
    max_trials: int = 10
    idle_connections: int = 5_000


QUICK = Plan(
    latency_rates=(1_000,),
    latency_seconds=1.0,
    latency_runs=1,
    fanout_clients=(100,),
    trial_seconds=0.5,
    max_trials=3,
    idle_connections=500,
)


class BenchError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; child processes inherit it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def compile_loadgen(directory: Path) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BenchError("the load generator needs a C compiler (gcc or cc) on PATH")
    binary = directory / "loadgen"
    source = HERE / "loadgen.c"
    built = subprocess.run(
        [gcc, "-O2", "-Wall", "-o", str(binary), str(source)], capture_output=True, text=True
    )
    if built.returncode != 0:
        raise BenchError(f"{gcc} could not compile {source}:\n{built.stderr}")
    return binary


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process so far (schedstat: nanoseconds, not ticks)."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total_ns += int((task / "schedstat").read_text().split()[0])
    return total_ns / 1e9


class Child:
    """A child process that takes commands on stdin and answers one line each on stdout."""

    def __init__(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log
        self.log: IO[bytes] = log.open("wb")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=HERE.parent,
            env=None if env is None else {**os.environ, **env},
        )
        self.buffer = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def read_line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            readable = select.select([fd], [], [], max(remaining, 0))[0] if remaining > 0 else []
            if not readable:
                raise BenchError(f"{self.name}: no answer within {timeout:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise BenchError(f"{self.name} exited ({self.process.wait()}): {self.tail()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def expect_line(self, prefix: str, timeout: float) -> str:
        line = self.read_line(timeout)
        while line == "DONE" and prefix != "DONE":
            line = self.read_line(timeout)  # a trial's clients completed after its report
        if not line.startswith(prefix):
            raise BenchError(f"{self.name}: expected {prefix}, got {line!r}")
        return line

    def expect(self, prefix: str, timeout: float) -> list[str]:
        return self.expect_line(prefix, timeout).split()[1:]

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.log.close()


@contextlib.contextmanager
def child(
    name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[Child]:
    running = Child(name, argv, log, env)
    try:
        yield running
    finally:
        running.stop()


def wait_http(url: str, process: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.process.poll() is not None:
            raise BenchError(f"{process.name} exited: {process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{process.name}: {url} not answering 200 within {timeout:.0f} s")
        time.sleep(0.1)


@dataclass
class Trial:
    rate: float  # events/s asked for
    clients: int
    published: int
    sent_rate: float  # events/s the publisher achieved
    delivered: int
    lost: int
    closed: int
    # events received by the client that got the fewest and the most: a lossless, exact
    # delivery has both equal to published (a duplicate would hide a loss in the total)
    min_per_client: int
    max_per_client: int
    duration_s: float  # first publish -> last delivery
    deliveries_per_s: float
    lag_s: float  # last publish -> last delivery
    p50_us: float
    p99_us: float
    loadgen_cpu: float  # loadgen CPU seconds per wall second
    server_cpu: float
    server_cpu_s: float  # server CPU seconds used by the trial

    @property
    def deliveries_per_cpu_s(self) -> float:
        """Deliveries per second of server CPU: the server's cost, whatever else runs."""
        return self.delivered / self.server_cpu_s if self.server_cpu_s > 0 else math.nan

    close_codes: dict[str, int]

    @property
    def sustained(self) -> bool:
        publish_s = self.published / self.sent_rate if self.sent_rate else 0.0
        return (
            self.lost == 0
            and self.closed == 0
            and self.min_per_client == self.max_per_client == self.published
            and self.lag_s <= MAX_LAG_FIXED_S + MAX_LAG_FRACTION * publish_s
        )


@dataclass
class ServerResults:
    name: str
    latency: dict[int, Trial] = field(default_factory=dict)
    fanout: dict[int, list[Trial]] = field(default_factory=dict)
    idle_bytes_per_connection: float = math.nan
    idle_connections: int = 0
    idle_failed: int = 0

    def best_fanout(self, clients: int) -> Trial | None:
        good = [t for t in self.fanout.get(clients, []) if t.sustained]
        return max(good, key=lambda t: t.deliveries_per_s) if good else None


class Bench:
    def __init__(self, plan: Plan, workdir: Path, loadgen: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self.loadgen = loadgen
        self.stack = contextlib.ExitStack()
        self.frontend = f"tcp://{HOST}:{free_port()}"
        self.backend = f"tcp://{HOST}:{free_port()}"
        self.snapshot = f"tcp://{HOST}:{free_port()}"
        self.publisher: Child

    def __enter__(self) -> Bench:
        tradebus = [sys.executable, "-m", "tradebus"]
        self.stack.enter_context(
            child(
                "proxy",
                [
                    *tradebus,
                    "proxy",
                    "--frontend",
                    self.frontend,
                    "--backend",
                    self.backend,
                    "--snapshot",
                    self.snapshot,
                ],
                self.workdir / "proxy.log",
            )
        )
        self.publisher = self.stack.enter_context(
            child(
                "publisher",
                [sys.executable, "-m", "bench.loadgen_publisher", self.frontend],
                self.workdir / "publisher.log",
            )
        )
        self.publisher.expect("CONNECTED", 20)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(BenchError, OSError):
            self.publisher.send("QUIT")
        self.stack.close()

    # servers

    def server_argv(self, name: str, port: int) -> list[str]:
        if name == "naive":
            command = ["-m", "bench.naive_server"]
            if NAIVE_ON_UVLOOP:
                command.append("--uvloop")
        else:
            command = ["-m", "tradebus", "bridge", "--snapshot", self.snapshot]
            command += ["--publish-to", self.frontend]
        return [
            sys.executable,
            *command,
            "--host",
            HOST,
            "--port",
            str(port),
            "--bus",
            self.backend,
        ]

    def server_env(self, name: str) -> dict[str, str] | None:
        if name == "naive":
            return None
        # every client comes from 127.0.0.1: lift the per-address limit above the idle test
        limit = str(self.plan.idle_connections + 1_000)
        return {
            "TRADEBUS__BRIDGE_MAX_CONNECTIONS": limit,
            "TRADEBUS__BRIDGE_MAX_CONNECTIONS_PER_IP": limit,
        }

    @contextlib.contextmanager
    def server(self, name: str) -> Iterator[tuple[Child, int]]:
        port = free_port()
        argv, env = self.server_argv(name, port), self.server_env(name)
        with child(name, argv, self.workdir / f"{name}.log", env) as process:
            ready = "/health" if name == "naive" else "/ready"
            wait_http(f"http://{HOST}:{port}{ready}", process, 30)
            yield process, port

    @contextlib.contextmanager
    def clients(
        self, port: int, count: int, latency_count: int, nap_us: int = 0
    ) -> Iterator[Child]:
        argv = [str(self.loadgen), HOST, str(port), "/ws", str(count), str(latency_count)]
        argv += ["100", str(nap_us)]
        with child("loadgen", argv, self.workdir / "loadgen.log") as loadgen:
            opened, failed = (int(x) for x in loadgen.expect("READY", 60 + count / 100)[:2])
            if failed or opened != count:
                raise BenchError(f"loadgen opened {opened} of {count} connections: {failed} failed")
            try:
                yield loadgen
            finally:
                with contextlib.suppress(BenchError, OSError):
                    loadgen.send("QUIT")

    # measurements

    def warm_up(self, loadgen: Child) -> None:
        """Publish warm-up events until every client received one: the path is live."""
        loadgen.send("WARM")
        self.publisher.send("WARM 200")
        loadgen.expect("WARMED", 30)
        self.publisher.send("STOP")
        self.publisher.expect("STOPPED", 10)
        self.quiesce(loadgen)

    def quiesce(self, loadgen: Child, timeout: float = 15.0) -> None:
        """Wait until nothing arrives any more, so one trial's backlog cannot load the next."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            loadgen.send("STAT")
            counts = loadgen.expect("STAT", 10)[:4]
            if counts == last:
                return
            last = counts
            time.sleep(0.3)

    def trial(self, loadgen: Child, server: Child, clients: int, rate: float, count: int) -> Trial:
        self.publisher.send(f"RUN {rate} {count}")
        (first_seq,) = self.publisher.expect("PREPARED", 60)
        loadgen.send(f"EXPECT {count} {first_seq}")
        cpu_before = cpu_seconds(server.pid)
        self.publisher.send("GO")
        _count, first_ns, last_ns = (
            int(x) for x in self.publisher.expect("SENT", 30 + count / rate)
        )
        publish_s = (last_ns - first_ns) / 1e9
        try:
            loadgen.expect("DONE", 1.0 + publish_s)
        except BenchError:
            self.quiesce(loadgen)  # late is not lost: let the backlog arrive, then count
        loadgen.send("REPORT")
        report: dict[str, Any] = json.loads(loadgen.expect_line("{", 30))
        cpu_after = cpu_seconds(server.pid)
        delivered = int(report["events"])
        last_event_ns = int(report["last_event_ns"]) or last_ns
        duration_s = max((last_event_ns - first_ns) / 1e9, 1e-9)
        wall_s = (time.time_ns() - int(report["trial_start_ns"])) / 1e9
        trial = Trial(
            rate=rate,
            clients=clients,
            published=count,
            sent_rate=count / publish_s if publish_s > 0 else math.inf,
            delivered=delivered,
            lost=count * clients - delivered,
            closed=int(report["closed"]),
            min_per_client=int(report["min_per_conn"]),
            max_per_client=int(report["max_per_conn"]),
            duration_s=duration_s,
            deliveries_per_s=delivered / duration_s,
            lag_s=(last_event_ns - last_ns) / 1e9,
            p50_us=float(report["p50_us"]),
            p99_us=float(report["p99_us"]),
            loadgen_cpu=(float(report["cpu_user_s"]) + float(report["cpu_sys_s"])) / wall_s,
            server_cpu=(cpu_after - cpu_before) / wall_s,
            server_cpu_s=cpu_after - cpu_before,
            close_codes=dict(report["close_codes"]),
        )
        return trial

    def measure_latency(self, name: str, results: ServerResults) -> None:
        with (
            self.server(name) as (server, port),
            self.clients(port, LATENCY_CONNECTIONS, LATENCY_CONNECTIONS) as loadgen,
        ):
            self.warm_up(loadgen)
            for rate in self.plan.latency_rates:
                count = int(rate * self.plan.latency_seconds)
                for _ in range(self.plan.latency_runs):
                    trial = self.trial(loadgen, server, LATENCY_CONNECTIONS, rate, count)
                    print(f"  {name} latency @ {rate} ev/s: {describe(trial)}", flush=True)
                    # a stall of a busy machine decides a p99 alone: keep the best run
                    best = results.latency.get(rate)
                    if best is None or (trial.sustained, -trial.p99_us) > (
                        best.sustained,
                        -best.p99_us,
                    ):
                        results.latency[rate] = trial
                    if trial.lag_s > OVERLOADED_LAG_S:
                        break  # seconds behind is overload, not a stall: no second run

    def measure_fanout(self, name: str, results: ServerResults, clients: int) -> None:
        """Step the publish rate up until a trial is not sustained, then bisect."""
        trials = results.fanout.setdefault(clients, [])
        rate: float | None = 100_000 / clients  # the start: 100,000 deliveries/s
        good: float | None = None
        bad: float | None = None
        retried: float | None = None
        trials_left = self.plan.max_trials
        with self.server(name) as (server, port):
            while rate is not None and trials_left > 0:
                # fresh clients after a trial in which the server closed some of them
                with self.clients(port, clients, LATENCY_CONNECTIONS, FANOUT_NAP_US) as loadgen:
                    self.warm_up(loadgen)
                    while rate is not None and trials_left > 0:
                        trials_left -= 1
                        count = max(int(rate * self.plan.trial_seconds), 1)
                        trial = self.trial(loadgen, server, clients, rate, count)
                        trials.append(trial)
                        print(f"  {name} fan-out {clients} @ {rate:.0f} ev/s: {describe(trial)}")
                        if trial.sustained:
                            good = rate
                        elif retried != rate:
                            # one stall of a busy machine must not fail a rate: try it again
                            retried = rate
                            if trial.closed:
                                break
                            continue
                        else:
                            bad = rate
                        rate = next_rate(rate, good, bad)
                        if trial.closed:
                            break

    def measure_idle_memory(self, name: str, results: ServerResults) -> None:
        count = self.plan.idle_connections
        with self.server(name) as (server, port):
            # let the server load every code path of a connection before the baseline
            with self.clients(port, 10, 0):
                pass
            time.sleep(0.5)
            before = rss_bytes(server.pid)
            with self.clients(port, count, 0) as loadgen:
                time.sleep(1.0)
                loadgen.send("STAT")
                opened = int(loadgen.expect("STAT", 10)[4])
                after = rss_bytes(server.pid)
        results.idle_connections = opened
        results.idle_bytes_per_connection = (after - before) / max(opened, 1)
        print(
            f"  {name} idle memory: {opened} connections, RSS {before / 2**20:.1f} -> "
            f"{after / 2**20:.1f} MiB, {results.idle_bytes_per_connection / 1024:.1f} KiB each",
            flush=True,
        )

    def run_server(self, name: str) -> ServerResults:
        results = ServerResults(name)
        print(f"{name}:", flush=True)
        self.measure_idle_memory(name, results)
        self.measure_latency(name, results)
        for clients in self.plan.fanout_clients:
            self.measure_fanout(name, results, clients)
        return results


def next_rate(rate: float, good: float | None, bad: float | None) -> float | None:
    """Halve until a rate is sustained, double until one is not, then bisect to 15 %."""
    if good is None:
        return rate / 2
    if bad is None:
        return rate * 2
    if bad / good > 1.15:
        return math.sqrt(good * bad)
    return None


def describe(trial: Trial) -> str:
    verdict = "ok" if trial.sustained else "NOT SUSTAINED"
    closed = f", {trial.closed} closed {trial.close_codes}" if trial.closed else ""
    if trial.min_per_client != trial.max_per_client:
        closed += f", per client {trial.min_per_client}..{trial.max_per_client}"
    return (
        f"{verdict}: sent {trial.published} at {trial.sent_rate:,.0f}/s, delivered "
        f"{trial.delivered:,}/{trial.published * trial.clients:,} (lost {trial.lost:,}{closed}), "
        f"{trial.deliveries_per_s:,.0f} deliveries/s, lag {trial.lag_s * 1000:.0f} ms, "
        f"p50 {trial.p50_us:.0f} us p99 {trial.p99_us:.0f} us, "
        f"server CPU {trial.server_cpu:.0%}, loadgen CPU {trial.loadgen_cpu:.0%}"
    )


def summary(plan: Plan, all_results: dict[str, ServerResults]) -> list[str]:
    """A markdown table: each figure for both servers and the ratio bridge / naive."""
    naive = all_results["naive"]
    bridge = all_results.get("bridge")
    lines = ["", "| measurement | bridge | naive | bridge / naive |", "|---|---|---|---|"]

    def row(label: str, b: float | None, n: float | None, unit: str) -> None:
        def show(v: float | None) -> str:
            return "n/a" if v is None or math.isnan(v) else f"{v:,.1f} {unit}".rstrip()

        usable = b is not None and n is not None and not math.isnan(b) and not math.isnan(n)
        r = f"{b / n:.2f}x" if usable and n else "n/a"  # type: ignore[operator]
        lines.append(f"| {label} | {show(b)} | {show(n)} | {r} |")

    for rate in plan.latency_rates:
        trials = [r.latency.get(rate) if r else None for r in (bridge, naive)]
        for q in ("p50", "p99"):
            b, n = (getattr(t, f"{q}_us") / 1000 if t else None for t in trials)
            row(
                f"latency {q} @ {rate:,} ev/s, {LATENCY_CONNECTIONS} clients (lower is better)",
                b,
                n,
                "ms",
            )
        b, n = (float(t.lost) if t else None for t in trials)
        expected = rate * plan.latency_seconds * LATENCY_CONNECTIONS
        row(
            f"  undelivered @ {rate:,} ev/s (of {expected:,.0f})",
            b,
            n,
            "",
        )
    for clients in plan.fanout_clients:
        best = [r.best_fanout(clients) if r else None for r in (bridge, naive)]
        b, n = (t.deliveries_per_s if t else None for t in best)
        row(f"fan-out to {clients:,} clients, lossless deliveries/s", b, n, "")
        b, n = (t.sent_rate if t else None for t in best)
        row("  its publish rate, events/s", b, n, "")
        b, n = (t.server_cpu * 100 if t else None for t in best)
        row("  server CPU at that rate", b, n, "%")
        b, n = (t.deliveries_per_cpu_s if t else None for t in best)
        row("  deliveries per server CPU-second", b, n, "")
        b, n = (t.loadgen_cpu * 100 if t else None for t in best)
        row("  loadgen CPU at that rate", b, n, "%")
    b = bridge.idle_bytes_per_connection / 1024 if bridge else None
    row(
        f"memory per idle connection, {plan.idle_connections:,} connections (lower is better)",
        b,
        naive.idle_bytes_per_connection / 1024,
        "KiB",
    )
    return lines


def machine_state() -> str:
    load1, load5, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load1:.2f} (1 min) {load5:.2f} (5 min)"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_bridge", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small, short runs (harness check)")
    parser.add_argument(
        "--servers", default="naive,bridge", help="comma-separated: naive, bridge (default both)"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - {"naive", "bridge"}
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    if "naive" not in servers:
        servers.insert(0, "naive")  # every figure needs its baseline from the same run
    limit = raise_fd_limit()
    if limit < plan.idle_connections + 100:
        print(f"RLIMIT_NOFILE hard limit {limit} is below {plan.idle_connections + 100}")
        return 1
    started = time.monotonic()
    print(f"machine: {machine_state()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_bridge_") as tmp:
        workdir = Path(tmp)
        all_results: dict[str, ServerResults] = {}
        try:
            loadgen = compile_loadgen(workdir)
            with Bench(plan, workdir, loadgen) as bench:
                for name in servers:
                    all_results[name] = bench.run_server(name)
        except BenchError as error:
            print(f"bench failed: {error}")
            for log in sorted(workdir.glob("*.log")):
                print(f"--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-1500:]}")
            return 1
    print("\n".join(summary(plan, all_results)))
    print(f"\nmachine after: {machine_state()}; bench took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
