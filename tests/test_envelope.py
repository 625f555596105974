"""The three-frame envelope: round trips, the exact meta layout, malformed input."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.envelope import (
    META_HEADER_SIZE,
    Event,
    assemble_payload,
    decode_event,
    decode_meta,
    encode_event,
    encode_meta,
    encode_payload,
    format_timestamp,
    meta_position,
    meta_publish_ns,
    meta_source,
    payload_parts,
    timestamp_bytes,
    with_timestamp,
)
from bus.errors import EnvelopeError

U64 = st.integers(0, 2**64 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def test_round_trip_keeps_every_field() -> None:
    frames = encode_event(
        "market_data.BTC-USD",
        "market_data",
        {"symbol": "BTC-USD", "price": 45000.5},
        "bot-1",
        1705746600000000000,
        42,
        publish_ns=1705746600000123456,
    )
    event = decode_event(frames)
    assert event == Event(
        topic="market_data.BTC-USD",
        type="market_data",
        data={"symbol": "BTC-USD", "price": 45000.5},
        timestamp="2024-01-20T10:30:00.000123Z",
        source="bot-1",
        epoch=1705746600000000000,
        seq=42,
        publish_ns=1705746600000123456,
        payload=frames[2],
    )
    assert event.meta.seq == 42


def test_payload_is_the_browser_json_with_fixed_field_order() -> None:
    frames = encode_event("ai_decision", "ai_decision", {"a": 1}, "s", 7, 3, publish_ns=0)
    assert frames[0] == b"ai_decision"
    assert frames[2] == (
        b'{"type":"ai_decision","data":{"a":1},"timestamp":"1970-01-01T00:00:00.000000Z",'
        b'"topic":"ai_decision","source":"s","epoch":7,"seq":3}'
    )


def test_meta_frame_layout_is_byte_exact() -> None:
    meta = encode_meta(b"bot-1", epoch=0x0102030405060708, seq=9, publish_ns=10)
    assert meta == struct.pack(">BBQQQ", 1, 0, 0x0102030405060708, 9, 10) + b"bot-1"
    assert META_HEADER_SIZE == 26
    assert meta[:2] == b"\x01\x00"
    assert meta_position(meta) == (0x0102030405060708, 9)
    assert meta_source(meta) == b"bot-1"
    assert meta_publish_ns(meta) == 10


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    U64,
    U64,
    U64,
    st.sampled_from(["bot-1", "x", "a.b:c-d_e"]),
)
def test_round_trip_property(
    data: dict[str, object], epoch: int, seq: int, ns: int, source: str
) -> None:
    frames = encode_event("t.k", "t", data, source, epoch, seq, publish_ns=ns)
    event = decode_event(frames)
    assert (event.data, event.epoch, event.seq, event.publish_ns, event.source) == (
        data,
        epoch,
        seq,
        ns,
        source,
    )
    body = orjson.loads(event.payload)
    assert (body["topic"], body["source"], body["epoch"], body["seq"]) == (
        "t.k",
        source,
        epoch,
        seq,
    )


def test_timestamp_is_iso_utc_with_microseconds() -> None:
    assert format_timestamp(1705746600_123456789) == "2024-01-20T10:30:00.123456Z"
    assert format_timestamp(1705746601_000000000) == "2024-01-20T10:30:01.000000Z"


@given(st.integers(0, 253402300799_999999999))  # up to 9999-12-31T23:59:59.999999999
def test_cached_timestamp_matches_datetime_formatting(ns: int) -> None:
    def expected(ns: int) -> str:
        seconds = datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{seconds}.{ns % 10**9 // 1000:06d}Z"

    # the second call is another microsecond of the same millisecond: from the cache
    same_millisecond = ns - ns % 1_000_000 + (ns % 1_000_000 + 1000) % 1_000_000
    for value in (ns, same_millisecond):
        assert format_timestamp(value) == expected(value)
        assert timestamp_bytes(value) == expected(value).encode()


@given(json_values, st.text(min_size=1, max_size=5), st.integers(0, 2**63), st.integers(1, 2**63))
def test_payload_parts_rebuild_encode_payload(
    data: object, source: str, epoch: int, seq: int
) -> None:
    data_object = {"value": data}
    head, tail = payload_parts("custom", "custom.k", source, epoch)
    stamp = b"2024-01-20T10:30:00.123456Z"
    built = assemble_payload(head, orjson.dumps(data_object), stamp, tail, seq, False)
    expected = encode_payload(
        "custom",
        {**data_object, "timestamp": stamp.decode()},
        stamp.decode(),
        "custom.k",
        source,
        epoch,
        seq,
    )
    assert built == expected
    assert with_timestamp(b"{}", stamp) == b'{"timestamp":"2024-01-20T10:30:00.123456Z"}'
    assert assemble_payload(head, b"{}", stamp, tail, seq, False) == encode_payload(
        "custom", {"timestamp": stamp.decode()}, stamp.decode(), "custom.k", source, epoch, seq
    )
    # the envelope built from parts equals the envelope encoded as one JSON object, whatever
    # the timestamp text holds (quotes, backslashes, control characters escape alike)
    for text in ("2024-01-20T10:30:00Z", 'quote " backslash \\ \n é'):
        assert encode_payload(
            "custom", data_object, text, "custom.k", source, epoch, seq
        ) == orjson.dumps(
            {
                "type": "custom",
                "data": data_object,
                "timestamp": text,
                "topic": "custom.k",
                "source": source,
                "epoch": epoch,
                "seq": seq,
            },
            option=orjson.OPT_NON_STR_KEYS,
        )
    # data with its own timestamp is taken as it is
    stamped = orjson.dumps({"timestamp": "earlier", **data_object})
    assert assemble_payload(head, stamped, stamp, tail, seq, True) == encode_payload(
        "custom", orjson.loads(stamped), stamp.decode(), "custom.k", source, epoch, seq
    )


def test_unencodable_data_is_an_envelope_error() -> None:
    with pytest.raises(EnvelopeError, match="not JSON-encodable"):
        encode_event("t", "t", {"x": object()}, "s", 1, 1)


def test_encode_uses_the_default_hook() -> None:
    frames = encode_event("t", "t", {"x": {1, 2}}, "s", 1, 1, default=sorted)
    assert decode_event(frames).data == {"x": [1, 2]}


GOOD = encode_event("t", "t", {}, "s", 1, 1)


@pytest.mark.parametrize(
    ("frames", "complaint"),
    [
        (GOOD[:2], "2 frames"),
        ([*GOOD, b"x"], "4 frames"),
        ([b"\xff", GOOD[1], GOOD[2]], "topic frame is not UTF-8"),
        ([GOOD[0], GOOD[1][:26], GOOD[2]], "at least 27"),
        ([GOOD[0], b"\x02" + GOOD[1][1:], GOOD[2]], "wire version 2"),
        ([GOOD[0], GOOD[1][:26] + b"\xff", GOOD[2]], "not UTF-8"),
        ([GOOD[0], GOOD[1], b"{nope"], "not JSON"),
        ([GOOD[0], GOOD[1], b"[1]"], "not a JSON object"),
        ([GOOD[0], GOOD[1], b'{"type":1,"data":{}}'], "lacks a string 'type'"),
        ([GOOD[0], GOOD[1], b'{"type":"t","data":[]}'], "object 'data'"),
    ],
)
def test_malformed_messages_raise_envelope_errors(frames: list[bytes], complaint: str) -> None:
    with pytest.raises(EnvelopeError, match=complaint):
        decode_event(frames)


def test_decode_meta_rejects_short_frames() -> None:
    with pytest.raises(EnvelopeError):
        decode_meta(b"\x01")


def test_event_prints_readably() -> None:
    event = decode_event(encode_event("t.k", "t", {"p": 1}, "bot", 1, 5))
    assert str(event) == "t.k bot#5 {'p': 1}"
