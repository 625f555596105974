"""record -> file -> replay -> record: the round trip is lossless, over a real proxy."""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
import zmq

from bus.envelope import Event, encode_event
from bus.proxy import Proxy
from tests.conftest import scaled, synced_subscriber
from tests.support import loopback_proxy_config, run_tradebus
from tradebus.record import (
    RecordedEvent,
    RecordingError,
    RecordStats,
    Restamper,
    connect_publisher,
    header_line,
    parse_line,
    read_recording,
    record,
    replay,
    schedule,
)
from tradebus.tap import parse_timestamp_ns

Ctx = zmq.Context[zmq.Socket[bytes]]


def seq_of(frames: list[bytes]) -> int:
    return int.from_bytes(frames[1][10:18])


class Recorder:
    """``record`` on a thread, ready once its subscription is in force."""

    def __init__(self, proxy: Proxy, context: Ctx, path: Path, patterns: list[str], count: int):
        self.path = path
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.stats: RecordStats | None = None
        self.error: BaseException | None = None

        def work() -> None:
            try:
                with open(path, "wb") as out:
                    self.stats = record(
                        out,
                        patterns,
                        self.stop,
                        endpoint=proxy.backend_endpoint,
                        snapshot_endpoint=proxy.snapshot_endpoint,
                        count=count,
                        ready=self.ready,
                        context=context,
                    )
            except BaseException as error:
                self.error = error
                self.ready.set()

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()
        assert self.ready.wait(scaled(10)), "recorder never became ready"
        assert self.error is None, self.error

    def join(self) -> list[RecordedEvent]:
        self.thread.join(scaled(20))
        self.stop.set()
        self.thread.join(scaled(5))
        assert not self.thread.is_alive(), "recorder did not finish"
        assert self.error is None, self.error
        with open(self.path, "rb") as lines:
            return list(read_recording(lines))


def key(event: RecordedEvent) -> tuple[str, str, int, int, bytes]:
    return (event.topic, event.source, event.epoch, event.seq, event.payload)


def test_round_trip_is_lossless(proxy: Proxy, zmq_context: Ctx, tmp_path: Path) -> None:
    wanted = 600
    first = Recorder(
        proxy, zmq_context, tmp_path / "first.jsonl", ["market_data", "*.ETH-USD"], wanted
    )
    publisher = connect_publisher(zmq_context, proxy.frontend_endpoint, scaled(5))
    published = []
    try:
        for n in range(1, 301):
            for source, symbol in (("bot-a", "BTC-USD"), ("bot-b", "ETH-USD")):
                frames = encode_event(
                    f"market_data.{symbol}",
                    "market_data",
                    {"symbol": symbol, "price": 45000.0 + n / 7, "note": "é✓", "n": n},
                    source,
                    1_700_000_000_000_000_000,
                    n,
                )
                publisher.send_multipart(frames)
                published.append(frames)
            # not recorded: no pattern matches it
            publisher.send_multipart(encode_event("ai_decision", "ai_decision", {}, "bot-a", 1, n))
    finally:
        publisher.close(linger=scaled(5_000))
    recorded = first.join()
    assert first.stats is not None
    assert first.stats.events == wanted
    assert first.stats.gaps == 0
    assert sorted((e.topic, e.source, e.seq, e.payload) for e in recorded) == sorted(
        (f[0].decode(), f[1][26:].decode(), int.from_bytes(f[1][10:18]), f[2]) for f in published
    )

    # Backtesting replays into a fresh bus: one that saw these (source, epoch, seq)
    # positions drops them as duplicates (that is what `replay --source` is for).
    # A proxy answers its context's ZAP requests: the second one gets a context of its own.
    with Proxy(loopback_proxy_config()) as fresh:
        second = Recorder(fresh, zmq_context, tmp_path / "second.jsonl", ["*"], wanted)
        replayer = connect_publisher(zmq_context, fresh.frontend_endpoint, scaled(5))
        try:
            sent = replay(iter(recorded), replayer, threading.Event(), speed=None)
        finally:
            replayer.close(linger=scaled(5_000))
        assert sent == wanted
        again = second.join()
    assert [key(e) for e in again] == [key(e) for e in recorded]
    # the replay's publish time is its own; the recording keeps the original one
    assert min(e.publish_ns for e in again) > max(e.publish_ns for e in recorded)


def test_recorder_writes_gap_lines(proxy: Proxy, zmq_context: Ctx, tmp_path: Path) -> None:
    recorder = Recorder(proxy, zmq_context, tmp_path / "gaps.jsonl", ["*"], 2)
    publisher = connect_publisher(zmq_context, proxy.frontend_endpoint, scaled(5))
    try:
        for seq in (1, 5):
            publisher.send_multipart(encode_event("ai_decision", "ai_decision", {}, "bot", 9, seq))
    finally:
        publisher.close(linger=scaled(5_000))
    events = recorder.join()
    assert [e.seq for e in events] == [1, 5]
    assert recorder.stats is not None
    assert (recorder.stats.gaps, recorder.stats.missed) == (1, 3)
    lines = (tmp_path / "gaps.jsonl").read_bytes().splitlines()
    assert orjson.loads(lines[0])["tradebus_recording"] == 1
    gap = orjson.loads(lines[2])["gap"]
    assert (gap["first_seq"], gap["last_seq"], gap["restart"]) == (2, 4, False)


def sample(recv_ns: int, seq: int = 1, topic: str = "market_data.BTC-USD") -> RecordedEvent:
    payload = orjson.dumps(
        {
            "type": "market_data",
            "data": {"price": 1.5},
            "timestamp": "2024-01-20T10:30:00.000000Z",
            "topic": topic,
            "source": "bot",
            "epoch": 3,
            "seq": seq,
        }
    )
    return RecordedEvent(recv_ns, topic, "bot", 3, seq, recv_ns - 10, payload)


def test_schedule_keeps_scales_or_drops_the_pace() -> None:
    events = [sample(1_000_000_000), sample(1_500_000_000), sample(3_000_000_000)]
    assert [o for o, _ in schedule(events, 1.0)] == [0.0, 0.5, 2.0]
    assert [o for o, _ in schedule(events, 2.0)] == [0.0, 0.25, 1.0]
    assert [o for o, _ in schedule(events, None)] == [0.0, 0.0, 0.0]


def test_lines_round_trip_and_bad_lines_say_where() -> None:
    event = sample(5_000, seq=4)
    assert parse_line(event.to_line(), "x") == event
    snap = RecordedEvent(1, "a", "s", 1, 1, 1, b'{"type":"a","data":{}}', snapshot=True)
    assert parse_line(snap.to_line(), "x") == snap
    assert parse_line(b'{"tradebus_recording": 1}', "x") is None
    assert parse_line(b'{"gap": {}}', "x") is None
    with pytest.raises(RecordingError, match="rec line 2: not JSON"):
        list(read_recording(io.BytesIO(b'{"tradebus_recording": 1}\n{oops\n'), "rec"))
    with pytest.raises(RecordingError, match="format 2"):
        parse_line(b'{"tradebus_recording": 2}', "x")
    with pytest.raises(RecordingError, match="'seq' must be a whole number"):
        parse_line(event.to_line().replace(b'"seq":4', b'"seq":-1'), "x")
    with pytest.raises(RecordingError, match="topic"):
        parse_line(event.to_line().replace(b"market_data.BTC-USD", b"bad topic", 1), "x")


def test_restamper_renumbers_under_a_new_source() -> None:
    restamp = Restamper("replayer", 77, clock_ns=lambda: 1_800_000_000_000_000_000)
    first = restamp(sample(1, seq=40))
    second = restamp(sample(2, seq=41))
    other = restamp(sample(3, seq=9, topic="market_data.ETH-USD"))
    assert [(e.source, e.epoch, e.seq) for e in (first, second, other)] == [
        ("replayer", 77, 1),
        ("replayer", 77, 2),
        ("replayer", 77, 1),
    ]
    body = orjson.loads(second.payload)
    assert body["source"] == "replayer"
    assert body["seq"] == 2
    assert body["data"] == {"price": 1.5}
    # stamped when replayed: latencies measure the replay, not the recording's age
    assert body["timestamp"] == "2027-01-15T08:00:00.000000Z"
    assert second.publish_ns == 1_800_000_000_000_000_000


def test_restamper_keeps_each_source_by_default() -> None:
    restamp = Restamper(None, 78)
    first = restamp(sample(1, seq=40))
    other = restamp(dataclasses.replace(sample(2, seq=41), source="bot-b"))
    again = restamp(sample(3, seq=42))
    assert [(e.source, e.epoch, e.seq) for e in (first, other, again)] == [
        ("bot", 78, 1),
        ("bot-b", 78, 1),
        ("bot", 78, 2),
    ]


def test_cli_replay_errors_are_one_line(tmp_path: Path) -> None:
    missing = run_tradebus("replay", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0
    assert "cannot read" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tradebus_recording": 1}\nnot json\n')
    # a valid file but no proxy there: a clear error naming the endpoint
    result = run_tradebus(
        "replay", str(bad), "--frontend", "tcp://127.0.0.1:1", "--connect-timeout", "0.3"
    )
    assert result.returncode == 2
    assert "no bus proxy answered at tcp://127.0.0.1:1" in result.stderr


def test_cli_record_then_replay_with_a_new_source(
    proxy: Proxy, zmq_context: Ctx, tmp_path: Path
) -> None:
    path = tmp_path / "cli.jsonl"
    recorder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tradebus",
            "record",
            str(path),
            "--topics",
            "ai_decision",
            "--count",
            "3",
            "--backend",
            proxy.backend_endpoint,
            "--snapshot-endpoint",
            proxy.snapshot_endpoint,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TRADEBUS_LOG_LEVEL": "INFO"},
    )
    try:
        assert recorder.stderr is not None
        started = orjson.loads(recorder.stderr.readline())
        assert started["event"] == "record.started"
        publisher = connect_publisher(zmq_context, proxy.frontend_endpoint, scaled(5))
        try:
            for seq in (1, 2, 3):
                publisher.send_multipart(
                    encode_event("market_data.X", "market_data", {}, "bot", 5, seq)
                )
                publisher.send_multipart(
                    encode_event("ai_decision", "ai_decision", {"n": seq}, "bot", 5, seq)
                )
        finally:
            publisher.close(linger=scaled(5_000))
        assert recorder.wait(scaled(20)) == 0
        _, errors = recorder.communicate(timeout=scaled(5))
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.communicate()
    assert "recorded 3 events" in errors
    with open(path, "rb") as lines:
        recorded = list(read_recording(lines))
    assert [(e.topic, e.seq) for e in recorded] == [
        ("ai_decision", 1),
        ("ai_decision", 2),
        ("ai_decision", 3),
    ]

    # replaying into the same bus needs a new identity, or every event is a duplicate
    again = Recorder(proxy, zmq_context, tmp_path / "again.jsonl", ["ai_decision"], 3)
    result = run_tradebus(
        "replay",
        str(path),
        "--frontend",
        proxy.frontend_endpoint,
        "--as-fast-as-possible",
        "--source",
        "replayer",
    )
    assert result.returncode == 0, result.stderr
    assert "replayed 3 events" in result.stderr
    replayed = again.join()
    assert [(e.source, e.seq) for e in replayed] == [
        ("replayer", 1),
        ("replayer", 2),
        ("replayer", 3),
    ]
    assert [orjson.loads(e.payload)["data"] for e in replayed] == [{"n": 1}, {"n": 2}, {"n": 3}]


@pytest.mark.parametrize(("speed", "expected_gap"), [(1.0, 0.3), (3.0, 0.1), (None, 0.0)])
def test_replay_keeps_the_recorded_pace_on_a_real_clock(
    zmq_context: Ctx, speed: float | None, expected_gap: float
) -> None:
    events = [
        RecordedEvent(
            recv_ns=1_000_000_000 + n * 300_000_000,  # recorded 0.3 s apart
            topic="ai_decision",
            source="bot-a",
            epoch=1,
            seq=n + 1,
            publish_ns=0,
            payload=b'{"type":"ai_decision","data":{}}',
        )
        for n in range(4)
    ]
    sender = zmq_context.socket(zmq.PUSH)
    receiver = zmq_context.socket(zmq.PULL)
    try:
        receiver.bind("inproc://replay-pace")
        sender.connect("inproc://replay-pace")
        arrivals: list[float] = []

        def receive() -> None:
            while len(arrivals) < len(events) and receiver.poll(scaled(5_000)):
                receiver.recv_multipart()
                arrivals.append(time.monotonic())

        reader = threading.Thread(target=receive)
        reader.start()
        assert replay(iter(events), sender, threading.Event(), speed=speed) == len(events)
        reader.join(scaled(10))
        assert len(arrivals) == len(events)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        # never early; late only by scheduling noise (not cumulative: offsets are absolute)
        assert all(gap >= expected_gap - 0.02 for gap in gaps), gaps
        total = arrivals[-1] - arrivals[0]
        assert total == pytest.approx(3 * expected_gap, abs=scaled(0.1)), gaps
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)


def test_replay_onto_a_bus_that_saw_the_events_is_a_restart_not_gaps(
    proxy: Proxy, zmq_context: Ctx, tmp_path: Path
) -> None:
    old_ns = 1_705_746_600_000_000_000  # recorded long ago (2024-01-20)
    originals = [
        encode_event(
            "market_data.BTC-USD",
            "market_data",
            {"price": 45000.0 + seq},
            "bot-a",
            5,
            seq,
            publish_ns=old_ns + seq,
        )
        for seq in range(1, 6)
    ]
    path = tmp_path / "seen.jsonl"
    with open(path, "wb") as out:
        out.write(header_line(["*"], proxy.backend_endpoint, old_ns))
        for frames in originals:
            out.write(
                RecordedEvent(
                    old_ns, frames[0].decode(), "bot-a", 5, seq_of(frames), old_ns, frames[2]
                ).to_line()
            )
    with synced_subscriber(proxy, zmq_context, ["market_data"]) as watcher:
        publisher = connect_publisher(zmq_context, proxy.frontend_endpoint, scaled(5))
        try:
            for frames in originals:
                publisher.send_multipart(frames)
        finally:
            publisher.close(linger=scaled(5_000))
        seen = [watcher.recv(scaled(10)) for _ in originals]
        assert all(isinstance(item, Event) for item in seen)

        result = run_tradebus(
            "replay", str(path), "--frontend", proxy.frontend_endpoint, "--as-fast-as-possible"
        )
        assert result.returncode == 0, result.stderr
        replayed = [watcher.recv(scaled(10)) for _ in originals]
        stats = watcher.stats
    assert all(isinstance(item, Event) for item in replayed), replayed
    events = [item for item in replayed if isinstance(item, Event)]
    assert [(e.source, e.seq) for e in events] == [("bot-a", n) for n in range(1, 6)]
    assert len({e.epoch for e in events}) == 1
    assert events[0].epoch != 5
    assert (stats.gaps, stats.missed, stats.duplicates, stats.restarts) == (0, 0, 0, 1)
    for event in events:
        stamped = parse_timestamp_ns(orjson.loads(event.payload)["timestamp"])
        assert stamped is not None
        assert abs(time.time_ns() - stamped) < scaled(60) * 1e9


def test_cli_record_with_no_proxy_says_so_at_once(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        closed = holder.getsockname()[1]
    kept = tmp_path / "kept.jsonl"
    kept.write_bytes(b"an earlier recording\n")
    started = time.monotonic()
    result = run_tradebus(
        "record",
        str(kept),
        "--backend",
        f"tcp://127.0.0.1:{closed}",
        "--connect-timeout",
        "120",
        "--duration",
        "120",
    )
    assert time.monotonic() - started < scaled(20)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"tradebus record: error: no bus proxy at tcp://127.0.0.1:{closed}: nothing listens "
        "there (is `tradebus proxy` or `tradebus up` running?)"
    )
    assert kept.read_bytes() == b"an earlier recording\n"  # not truncated
