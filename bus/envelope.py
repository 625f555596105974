"""The bus envelope: encoding and decoding of the three-frame message, no I/O.

A bus message is ZeroMQ multipart ``[topic, meta, payload]`` (docs/protocol.md):

* ``topic``: the UTF-8 topic, e.g. ``market_data.BTC-USD``;
* ``meta``: big-endian ``version:u8 flags:u8 epoch:u64 seq:u64 publish_ns:u64`` then the
  UTF-8 source id (the rest of the frame);
* ``payload``: the UTF-8 JSON object a browser receives, encoded once by the publisher:
  ``{"type", "data", "timestamp", "topic", "source", "epoch", "seq"}``.

Routers (proxy, bridge) read the topic and meta frames and pass the payload bytes on
untouched; only end consumers decode it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from bus.errors import EnvelopeError

WIRE_VERSION: Final = 1
META_HEADER: Final = struct.Struct(">BBQQQ")
META_HEADER_SIZE: Final = META_HEADER.size  # 26 bytes
MAX_PAYLOAD_BYTES: Final = 1024 * 1024

_pack_header = META_HEADER.pack
_unpack_header = META_HEADER.unpack_from


@dataclass(frozen=True, slots=True)
class Meta:
    """The metadata frame: who published, in which run (epoch), which position, when."""

    source: str
    epoch: int
    seq: int
    publish_ns: int


@dataclass(frozen=True, slots=True)
class Event:
    """A decoded bus event, as analytics programs see it."""

    topic: str
    type: str
    data: dict[str, Any]
    timestamp: str
    source: str
    epoch: int
    seq: int
    publish_ns: int
    payload: bytes

    @property
    def meta(self) -> Meta:
        return Meta(self.source, self.epoch, self.seq, self.publish_ns)

    def __str__(self) -> str:
        return f"{self.topic} {self.source}#{self.seq} {self.data}"


def encode_meta(source: bytes, epoch: int, seq: int, publish_ns: int) -> bytes:
    """Pack the metadata frame; ``source`` is the already-encoded source id."""
    return _pack_header(WIRE_VERSION, 0, epoch, seq, publish_ns) + source


def decode_meta(frame: bytes | memoryview) -> Meta:
    """Unpack a metadata frame, raising EnvelopeError when it is malformed."""
    if len(frame) < META_HEADER_SIZE + 1:
        raise EnvelopeError(f"meta frame is {len(frame)} bytes, expected at least 27")
    version, _flags, epoch, seq, publish_ns = _unpack_header(frame)
    if version != WIRE_VERSION:
        raise EnvelopeError(f"meta frame has wire version {version}, expected {WIRE_VERSION}")
    try:
        source = bytes(frame[META_HEADER_SIZE:]).decode()
    except UnicodeDecodeError as error:
        raise EnvelopeError(f"meta frame source id is not UTF-8: {error}") from None
    return Meta(source, epoch, seq, publish_ns)


def meta_position(frame: bytes | memoryview) -> tuple[int, int]:
    """(epoch, seq) of a metadata frame, for routers that need nothing else."""
    _version, _flags, epoch, seq, _publish_ns = _unpack_header(frame)
    return epoch, seq


def meta_source(frame: bytes | memoryview) -> bytes:
    return bytes(frame[META_HEADER_SIZE:])


def meta_publish_ns(frame: bytes | memoryview) -> int:
    publish_ns: int = _unpack_header(frame)[4]
    return publish_ns


# (millisecond, its formatted prefix): one tuple, swapped whole, so threads never see a
# millisecond paired with another's prefix
_millisecond_prefix: tuple[int, bytes] = (-1, b"")
# the last three digits of the microseconds and the closing "Z"
_MICROSECOND_SUFFIXES: Final = tuple(b"%03dZ" % n for n in range(1000))


def timestamp_bytes(ns: int) -> bytes:
    """ISO-8601 UTC with microseconds and a ``Z``: ``b"2024-01-20T10:30:00.123456Z"``.

    Publishers call this for every event: the text up to the millisecond is cached.
    """
    global _millisecond_prefix
    millisecond, rest = divmod(ns, 1_000_000)
    cached_millisecond, prefix = _millisecond_prefix
    if cached_millisecond != millisecond:
        seconds, milliseconds = divmod(millisecond, 1000)
        text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        prefix = b"%s.%03d" % (text.encode(), milliseconds)
        _millisecond_prefix = (millisecond, prefix)
    return prefix + _MICROSECOND_SUFFIXES[rest // 1000]


def format_timestamp(ns: int) -> str:
    """ISO-8601 UTC with microseconds and a ``Z``: ``2024-01-20T10:30:00.123456Z``."""
    return timestamp_bytes(ns).decode()


# Payloads are built from pre-encoded parts, here only (publishers build one per event, so
# the envelope is not a dict encoded per event):
#   head + data JSON + TIMESTAMP_FIELD + timestamp + tail + seq + b"}"
TIMESTAMP_FIELD: Final = b',"timestamp":"'
# the longest timestamp and seq with its "}": what a payload adds to its parts at most
LONGEST_STAMP_AND_SEQ: Final = len(b"2024-01-20T10:30:00.123456Z") + len(b"%d}" % (2**64 - 1))


def payload_parts(type_name: str, topic: str, source: str, epoch: int) -> tuple[bytes, bytes]:
    """(head, tail): the constant bytes of one topic's payloads around data and timestamp."""
    head = b'{"type":%s,"data":' % orjson.dumps(type_name)
    tail = b'","topic":%s,"source":%s,"epoch":%d,"seq":' % (
        orjson.dumps(topic),
        orjson.dumps(source),
        epoch,
    )
    return head, tail


# a timestamp added to a data object: as its only field, or after the others
_FIRST_FIELD: Final = b'"timestamp":"'
_END_OF_STAMP: Final = b'"}'


def _timestamp_opening(data_json: bytes) -> bytes:
    return _FIRST_FIELD if data_json == b"{}" else TIMESTAMP_FIELD


def with_timestamp(data_json: bytes, stamp: bytes) -> bytes:
    """A JSON object's bytes with ``"timestamp": stamp`` added as its last field."""
    return b"".join((data_json[:-1], _timestamp_opening(data_json), stamp, _END_OF_STAMP))


def assemble_payload(
    head: bytes, data_json: bytes, stamp: bytes, tail: bytes, seq: int, data_stamped: bool
) -> bytes:
    """One payload from its parts (``payload_parts``), the encoded data object, the
    timestamp text (JSON-escaped, without quotes) and the seq. ``data_stamped``: the data
    has its own ``timestamp``; otherwise ``stamp`` is added to it (``with_timestamp``, in
    the same join: this runs for every event), as the guide's bot did."""
    if data_stamped:
        return b"".join((head, data_json, TIMESTAMP_FIELD, stamp, tail, b"%d}" % seq))
    return b"".join(
        (
            head,
            data_json[:-1],
            _timestamp_opening(data_json),
            stamp,
            _END_OF_STAMP,
            TIMESTAMP_FIELD,
            stamp,
            tail,
            b"%d}" % seq,
        )
    )


def encode_payload(
    type_name: str,
    data: Any,
    timestamp: str,
    topic: str,
    source: str,
    epoch: int,
    seq: int,
    default: Callable[[Any], Any] | None = None,
    option: int = orjson.OPT_NON_STR_KEYS,
) -> bytes:
    """The payload JSON, field order fixed: type, data, timestamp, topic, source, epoch, seq.

    ``option`` lets publishers add orjson options (numpy, datetime handling) to the data's
    encoding. The data is taken as it is (no timestamp is added to it).
    """
    try:
        data_json = orjson.dumps(data, default=default, option=option)
    except TypeError as error:
        raise EnvelopeError(
            f"event data of type {type_name!r} is not JSON-encodable: {error}"
        ) from None
    head, tail = payload_parts(type_name, topic, source, epoch)
    stamp = orjson.dumps(timestamp)[1:-1]
    return assemble_payload(head, data_json, stamp, tail, seq, data_stamped=True)


def encode_event(
    topic: str,
    type_name: str,
    data: Any,
    source: str,
    epoch: int,
    seq: int,
    *,
    publish_ns: int | None = None,
    timestamp: str | None = None,
    default: Callable[[Any], Any] | None = None,
) -> list[bytes]:
    """Encode one event into its three frames (inputs are assumed validated)."""
    now = time.time_ns() if publish_ns is None else publish_ns
    payload = encode_payload(
        type_name,
        data,
        timestamp if timestamp is not None else format_timestamp(now),
        topic,
        source,
        epoch,
        seq,
        default,
    )
    return [topic.encode(), encode_meta(source.encode(), epoch, seq, now), payload]


def decode_event(frames: Sequence[bytes | memoryview]) -> Event:
    """Decode a three-frame bus message, raising EnvelopeError when it is malformed."""
    if len(frames) != 3:
        raise EnvelopeError(f"bus message has {len(frames)} frames, expected 3")
    topic_frame, meta_frame, payload_frame = frames
    try:
        topic = bytes(topic_frame).decode()
    except UnicodeDecodeError:
        raise EnvelopeError("topic frame is not UTF-8") from None
    meta = decode_meta(meta_frame)
    payload = bytes(payload_frame)
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise EnvelopeError(f"payload of {topic!r} is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise EnvelopeError(f"payload of {topic!r} is not a JSON object")
    type_name = body.get("type")
    data = body.get("data")
    if not isinstance(type_name, str) or not isinstance(data, dict):
        raise EnvelopeError(f"payload of {topic!r} lacks a string 'type' or an object 'data'")
    timestamp = body.get("timestamp")
    return Event(
        topic=topic,
        type=type_name,
        data=data,
        timestamp=timestamp if isinstance(timestamp, str) else "",
        source=meta.source,
        epoch=meta.epoch,
        seq=meta.seq,
        publish_ns=meta.publish_ns,
        payload=payload,
    )
