"""``tradebus record`` / ``tradebus replay``: bus topics to a JSON-lines file and back.

A recording is one JSON object per line:

* first a header: ``{"tradebus_recording": 1, "patterns": [...], "endpoint": ..., "started": ISO}``;
* one line per event: ``{"recv_ns", "topic", "source", "epoch", "seq", "publish_ns",
  "payload"}`` where ``payload`` is the event's payload JSON *as a string*, byte for byte as
  it crossed the bus (``json.loads(line["payload"])`` gives the event), and ``"snapshot":
  true`` on events that came from the proxy's snapshot with ``--snapshot``;
* ``{"gap": {"topic", "source", "epoch", "first_seq", "last_seq", "restart"}}`` where the
  recorder saw events missing, so a recording says where it is incomplete.

Replay publishes the events as a new run of their sources by default (``Restamper``: a new
epoch, fresh sequence numbers, the replay's timestamps), so a bus that already saw them
reports a source restart, not gaps, duplicates or latencies as old as the recording.
``--source`` also renames the source, for a bus where the original source is still live.
``--exact`` publishes every event with its topic, payload bytes, source, epoch and seq
unchanged (only the meta frame's publish time is the replay's), for a fresh bus: recording
an exact replay gives back the same events. Pacing follows the recorder's receive times,
scaled by ``--speed``, or ``--as-fast-as-possible``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

import orjson
import zmq
from zmq.utils.monitor import recv_monitor_message

from bus import settings
from bus.endpoints import DEFAULT_BACKEND, DEFAULT_SNAPSHOT
from bus.envelope import encode_meta, encode_payload, format_timestamp
from bus.errors import BusError, EnvelopeError, SnapshotError
from bus.keys import ClientKeys, configure_client, connect_checked, judge_handshake
from bus.subscriber import BlockingSubscriber, Gap, resolve_backend, resolve_snapshot
from bus.topics import validate_source, validate_topic
from monitoring.logging import configure_logging, get_logger
from tradebus.errors import ToolError
from tradebus.keys import add_client_key_arguments, client_keys

HELP = "record bus topics to a JSON-lines file (see `tradebus replay`)"
FORMAT_VERSION: Final = 1
DEFAULT_CONNECT_TIMEOUT: Final = 5.0


class RecordingError(ToolError):
    """A recording file is malformed or cannot be read or written."""


# -- pure core: lines in and out ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RecordedEvent:
    recv_ns: int
    topic: str
    source: str
    epoch: int
    seq: int
    publish_ns: int
    payload: bytes
    snapshot: bool = False

    def to_line(self) -> bytes:
        body: dict[str, Any] = {
            "recv_ns": self.recv_ns,
            "topic": self.topic,
            "source": self.source,
            "epoch": self.epoch,
            "seq": self.seq,
            "publish_ns": self.publish_ns,
            "payload": self.payload.decode(),
        }
        if self.snapshot:
            body["snapshot"] = True
        return orjson.dumps(body) + b"\n"


def header_line(patterns: list[str], endpoint: str, started_ns: int) -> bytes:
    return (
        orjson.dumps(
            {
                "tradebus_recording": FORMAT_VERSION,
                "patterns": patterns,
                "endpoint": endpoint,
                "started": format_timestamp(started_ns),
            }
        )
        + b"\n"
    )


def gap_line(gap: Gap) -> bytes:
    return (
        orjson.dumps(
            {
                "gap": {
                    "topic": gap.topic,
                    "source": gap.source,
                    "epoch": gap.epoch,
                    "first_seq": gap.first_seq,
                    "last_seq": gap.last_seq,
                    "restart": gap.restart,
                }
            }
        )
        + b"\n"
    )


def _int(body: dict[str, Any], name: str, where: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RecordingError(f"{where}: {name!r} must be a whole number, got {value!r}")
    return value


def parse_line(line: bytes, where: str) -> RecordedEvent | None:
    """The event on one line; None for the header and gap lines; RecordingError otherwise."""
    try:
        body = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        raise RecordingError(f"{where}: not JSON ({error})") from None
    if not isinstance(body, dict):
        raise RecordingError(f"{where}: expected a JSON object")
    if "tradebus_recording" in body:
        if body["tradebus_recording"] != FORMAT_VERSION:
            raise RecordingError(
                f"{where}: recording format {body['tradebus_recording']!r}, "
                f"this tradebus reads {FORMAT_VERSION}"
            )
        return None
    if "gap" in body:
        return None
    payload = body.get("payload")
    if not isinstance(payload, str):
        raise RecordingError(f"{where}: 'payload' must be the event's JSON as a string")
    try:
        topic = validate_topic(body.get("topic"))
        source = validate_source(body.get("source"))
    except BusError as error:
        raise RecordingError(f"{where}: {error}") from None
    return RecordedEvent(
        recv_ns=_int(body, "recv_ns", where),
        topic=topic,
        source=source,
        epoch=_int(body, "epoch", where),
        seq=_int(body, "seq", where),
        publish_ns=_int(body, "publish_ns", where),
        payload=payload.encode(),
        snapshot=body.get("snapshot") is True,
    )


def read_recording(lines: Iterable[bytes], name: str = "recording") -> Iterator[RecordedEvent]:
    """The events of a recording, lazily, in file order."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        event = parse_line(line, f"{name} line {number}")
        if event is not None:
            yield event


def schedule(events: Iterable[RecordedEvent], speed: float | None) -> Iterator[tuple[float, Any]]:
    """(seconds after the replay's start, event): the recorder's pace divided by ``speed``.

    ``speed`` None means as fast as possible (every offset 0).
    """
    first: int | None = None
    for event in events:
        if speed is None:
            yield 0.0, event
            continue
        if first is None:
            first = event.recv_ns
        yield max(0, event.recv_ns - first) / 1e9 / speed, event


class Restamper:
    """Republishes events as a new run: a new epoch, each (source, topic) numbered from 1,
    stamped with the replay's clock; under ``source`` when given, else each event's own.

    Subscribers that saw the recorded run take this as the source restarting, not as
    gaps or duplicates, and latencies measure the replay, not the age of the recording.
    """

    def __init__(
        self, source: str | None, epoch: int, clock_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self.source = None if source is None else validate_source(source)
        self.epoch = epoch
        self._clock_ns = clock_ns
        self._seqs: dict[tuple[str, str], int] = {}

    def __call__(self, event: RecordedEvent) -> RecordedEvent:
        try:
            body = orjson.loads(event.payload)
        except orjson.JSONDecodeError as error:
            raise RecordingError(f"event {event.topic} #{event.seq}: payload not JSON") from error
        if not isinstance(body, dict):
            raise RecordingError(f"event {event.topic} #{event.seq}: payload not an object")
        source = self.source or event.source
        key = (source, event.topic)
        seq = self._seqs.get(key, 0) + 1
        self._seqs[key] = seq
        now_ns = self._clock_ns()
        try:
            payload = encode_payload(
                str(body.get("type", event.topic.split(".", 1)[0])),
                body.get("data", {}),
                format_timestamp(now_ns),
                event.topic,
                source,
                self.epoch,
                seq,
            )
        except EnvelopeError as error:
            raise RecordingError(str(error)) from None
        return RecordedEvent(event.recv_ns, event.topic, source, self.epoch, seq, now_ns, payload)


# -- I/O adapters --------------------------------------------------------------------------------
@dataclass
class RecordStats:
    events: int = 0
    snapshot_events: int = 0
    gaps: int = 0
    missed: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)


def wait_for_proxy(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    timeout: float,
    keys: ClientKeys | None = None,
) -> None:
    """Return once a ZeroMQ peer completed a handshake at ``endpoint``; ToolError at once
    when nothing listens there, or after ``timeout`` seconds without an answer (with
    ``keys``, AuthError when the proxy refuses them)."""
    probe: zmq.Socket[bytes] = context.socket(zmq.SUB)
    probe.linger = 0
    if keys is not None:
        configure_client(probe, keys)
    monitor = probe.get_monitor_socket()
    hint = "(is `tradebus proxy` or `tradebus up` running?)"
    try:
        probe.connect(endpoint)
        deadline = time.monotonic() + timeout
        while monitor.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            message = recv_monitor_message(monitor)
            event = message["event"]
            if keys is not None:
                judge_handshake(event, message["value"], keys, endpoint)  # refused: AuthError
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            if event == zmq.EVENT_CONNECT_RETRIED:
                raise ToolError(f"no bus proxy at {endpoint}: nothing listens there {hint}")
            if event in _HANDSHAKE_FAILED:
                raise ToolError(f"{endpoint} answered, but not as a ZeroMQ bus proxy")
        raise ToolError(f"no bus proxy answered at {endpoint} within {timeout:g} s {hint}")
    finally:
        probe.disable_monitor()
        monitor.close(linger=0)
        probe.close(linger=0)


_HANDSHAKE_FAILED: Final = frozenset(
    {
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    }
)


def record(
    out: IO[bytes],
    patterns: list[str],
    stop: threading.Event,
    *,
    endpoint: str = DEFAULT_BACKEND,
    snapshot_endpoint: str = DEFAULT_SNAPSHOT,
    with_snapshot: bool = False,
    duration: float | None = None,
    count: int | None = None,
    ready: threading.Event | None = None,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    clock_ns: Callable[[], int] = time.time_ns,
    keys: ClientKeys | None = None,
) -> RecordStats:
    """Write matching bus events to ``out`` until ``stop``, ``duration`` or ``count``.

    The subscriber syncs with the proxy's snapshot service, so once ``ready`` is set every
    event published from then on is recorded.
    """
    log = get_logger("record")
    stats = RecordStats()
    subscriber = BlockingSubscriber(
        patterns,
        endpoint=endpoint,
        snapshot=True,
        snapshot_endpoint=snapshot_endpoint,
        context=context,
        keys=keys,
    )
    try:
        subscriber.start()
    except SnapshotError as error:
        if with_snapshot:
            raise ToolError(str(error)) from None
        # A proxy without a cache cannot sync: record anyway, from whenever the
        # subscription takes effect.
        log.warning("record.unsynced", reason=str(error))
        subscriber = BlockingSubscriber(patterns, endpoint=endpoint, context=context, keys=keys)
        subscriber.start()
    out.write(header_line(patterns, endpoint, clock_ns()))
    skip_snapshot = 0 if with_snapshot else subscriber.stats.snapshot_events
    in_snapshot = subscriber.stats.snapshot_events
    log.info("record.started", endpoint=endpoint, patterns=patterns)
    if ready is not None:
        ready.set()
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while not stop.is_set():
            if count is not None and stats.events >= count:
                break
            wait = 0.2
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            item = subscriber.recv(wait)
            if item is None:
                out.flush()
                continue
            if isinstance(item, Gap):
                stats.gaps += 1
                stats.missed += item.missed
                out.write(gap_line(item))
                log.warning("record.gap", topic=item.topic, missed=item.missed)
                continue
            from_snapshot = in_snapshot > 0
            in_snapshot -= from_snapshot
            if skip_snapshot:
                skip_snapshot -= 1
                continue
            out.write(
                RecordedEvent(
                    clock_ns(),
                    item.topic,
                    item.source,
                    item.epoch,
                    item.seq,
                    item.publish_ns,
                    item.payload,
                    from_snapshot,
                ).to_line()
            )
            stats.events += 1
            stats.snapshot_events += from_snapshot
            stats.by_topic[item.topic] = stats.by_topic.get(item.topic, 0) + 1
    finally:
        subscriber.close()
        out.flush()
    log.info("record.stopped", events=stats.events, gaps=stats.gaps, missed=stats.missed)
    return stats


def connect_publisher(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    timeout: float,
    keys: ClientKeys | None = None,
) -> zmq.Socket[bytes]:
    """An XPUB socket connected to the proxy, returned once the proxy is known to listen.

    XPUB_NODROP makes a full queue block the sender instead of dropping events: a replay
    loses nothing.
    """
    socket: zmq.Socket[bytes] = context.socket(zmq.XPUB)
    socket.setsockopt(zmq.XPUB_NODROP, 1)
    socket.sndhwm = 100_000
    socket.linger = int(timeout * 1000)
    try:
        if keys is None:
            socket.connect(endpoint)
        else:
            configure_client(socket, keys)
            connect_checked(socket, endpoint, keys, timeout)
    except zmq.ZMQError as error:
        socket.close(linger=0)
        raise ToolError(f"cannot connect to {endpoint}: {error.strerror}") from None
    except BusError:
        socket.close(linger=0)
        raise
    # the proxy subscribes every publisher to everything on connection
    if not socket.poll(int(timeout * 1000)):
        socket.close(linger=0)
        raise ToolError(f"no bus proxy answered at {endpoint} within {timeout:g} s")
    socket.recv()
    return socket


def replay(
    events: Iterable[RecordedEvent],
    socket: zmq.Socket[bytes],
    stop: threading.Event,
    *,
    speed: float | None = 1.0,
    transform: Callable[[RecordedEvent], RecordedEvent] | None = None,
    clock_ns: Callable[[], int] = time.time_ns,
) -> int:
    """Publish ``events`` on ``socket`` at the recorded pace; return how many went out."""
    sent = 0
    started = time.monotonic()
    for offset, event in schedule(events, speed):
        delay = started + offset - time.monotonic()
        if delay > 0 and stop.wait(delay):
            break
        if stop.is_set():
            break
        out = transform(event) if transform is not None else event
        # a restamped event carries its own publish time (the payload's timestamp)
        publish_ns = clock_ns() if transform is None else out.publish_ns
        meta = encode_meta(out.source.encode(), out.epoch, out.seq, publish_ns)
        socket.send_multipart([out.topic.encode(), meta, out.payload])
        sent += 1
    return sent


# -- command line: record ------------------------------------------------------------------------


def stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the JSON-lines file to write ('-' for stdout)")
    parser.add_argument(
        "--topics",
        default="*",
        help="comma-separated topic patterns to record (default: every topic)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help=f"the proxy's XPUB endpoint (default $TRADEBUS__PROXY_BACKEND or {DEFAULT_BACKEND})",
    )
    parser.add_argument(
        "--snapshot-endpoint",
        default=None,
        help="the proxy's snapshot endpoint "
        f"(default $TRADEBUS__PROXY_SNAPSHOT or {DEFAULT_SNAPSHOT})",
    )
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="start the recording with the latest event of every matching topic",
    )
    parser.add_argument(
        "--duration",
        type=settings.argument(settings.number(0)),
        help="stop after this many seconds",
    )
    parser.add_argument(
        "--count",
        type=settings.argument(settings.whole_number(1)),
        help="stop after this many events",
    )
    parser.add_argument(
        "--append", action="store_true", help="append to the file instead of replacing it"
    )
    parser.add_argument(
        "--connect-timeout",
        type=settings.argument(settings.number(0, what="seconds")),
        default=DEFAULT_CONNECT_TIMEOUT,
        help="seconds to wait for the proxy (default %(default)s; nothing listening fails at once)",
    )
    add_client_key_arguments(parser)


def run(args: argparse.Namespace) -> int:
    configure_logging()
    patterns = [p.strip() for p in args.topics.split(",") if p.strip()] or ["*"]
    endpoint = resolve_backend(args.backend, "--backend")
    snapshot_endpoint = resolve_snapshot(args.snapshot_endpoint, "--snapshot-endpoint")
    keys = client_keys(args)  # before the file is created: a bad key changes nothing
    # before the file is opened: no proxy must not leave an empty (or truncated) recording
    wait_for_proxy(zmq.Context.instance(), endpoint, args.connect_timeout, keys)
    stop = stop_on_signals()
    to_stdout = str(args.file) == "-"
    try:
        out: IO[bytes] = (
            sys.stdout.buffer if to_stdout else open(args.file, "ab" if args.append else "wb")  # noqa: SIM115
        )
    except OSError as error:
        raise RecordingError(f"cannot write {args.file}: {error.strerror}") from None
    try:
        stats = record(
            out,
            patterns,
            stop,
            endpoint=endpoint,
            snapshot_endpoint=snapshot_endpoint,
            with_snapshot=args.snapshot,
            duration=args.duration,
            count=args.count,
            keys=keys,
        )
    finally:
        if not to_stdout:
            out.close()
    where = "stdout" if to_stdout else os.fspath(args.file)
    print(
        f"recorded {stats.events} events ({stats.snapshot_events} from the snapshot) to "
        f"{where}; {stats.gaps} gaps, {stats.missed} events missed",
        file=sys.stderr,
    )
    return 0
