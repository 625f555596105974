"""The proxy's gate as a pure function of messages, identities and the clock."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.envelope import MAX_PAYLOAD_BYTES, encode_event, encode_meta
from bus.gate import KNOWN_NAMES_MAX, Gate, Reason, RefusalLog

EPOCH = 1_700_000_000_000_000_000
NOW_NS = EPOCH + 3_600 * 10**9
BOT = b"connection-1@10.0.0.1"
OTHER = b"connection-2@10.0.0.2"
BOT_AGAIN = b"connection-3@10.0.0.1"


def event(
    topic: str = "market_data.BTC-USD", source: str = "bot-1", epoch: int = EPOCH, seq: int = 1
) -> tuple[bytes, ...]:
    return tuple(encode_event(topic, topic.partition(".")[0], {"p": 1}, source, epoch, seq))


def check(gate: Gate, frames: tuple[bytes, ...], user: bytes | None = BOT, now: float = 0.0):  # type: ignore[no-untyped-def]
    refusal = gate.check(frames, user, now, NOW_NS)
    return None if refusal is None else refusal.reason


def with_payload(frames: tuple[bytes, ...], payload: bytes) -> tuple[bytes, ...]:
    return (frames[0], frames[1], payload)


def test_well_formed_events_pass_and_are_counted() -> None:
    gate = Gate()
    assert check(gate, event(seq=1)) is None
    assert check(gate, event(seq=2)) is None
    assert gate.stats.passed == 2
    assert gate.stats.rejected == {}


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ((b"market_data.BTC-USD",), Reason.FRAMES),
        (event()[:2], Reason.FRAMES),
        ((*event(), b"extra"), Reason.FRAMES),
        ((b"market_data.\xff", *event()[1:]), Reason.TOPIC),
        ((b"market data", *event()[1:]), Reason.TOPIC),
        ((event()[0], b"\x02" + event()[1][1:], event()[2]), Reason.META),
        ((event()[0], event()[1][:26], event()[2]), Reason.META),
        ((event()[0], encode_meta(b"bot 1", EPOCH, 1, 0), event()[2]), Reason.SOURCE),
        ((event()[0], encode_meta(b"bot-\xff", EPOCH, 1, 0), event()[2]), Reason.SOURCE),
        (with_payload(event(), b'{"type":"market_data","note":"\xff"}'), Reason.PAYLOAD),
        (with_payload(event(), b"{not json"), Reason.PAYLOAD),
        (with_payload(event(), event()[2] + b"{}"), Reason.PAYLOAD),
        (with_payload(event(), b"[1, 2]"), Reason.NOT_OBJECT),
        (with_payload(event(), b'"text"'), Reason.NOT_OBJECT),
        (with_payload(event(), b' \n [{"topic": 1}]'), Reason.NOT_OBJECT),
        (with_payload(event(), b'{"type":"market_data","data":{}}'), Reason.MISMATCH),
        (with_payload(event(), event()[2].replace(b'"seq":1', b'"seq":"1"')), Reason.MISMATCH),
        (with_payload(event(), event()[2][:-1] + b',"x":[1,]}'), Reason.PAYLOAD),
        (with_payload(event(), event()[2][:-1] + b',"x":"\\q"}'), Reason.PAYLOAD),
        (with_payload(event(), event(seq=2)[2]), Reason.MISMATCH),
        (with_payload(event(), event(topic="market_data.ETH-USD")[2]), Reason.MISMATCH),
        (with_payload(event(), event(source="bot-2")[2]), Reason.MISMATCH),
        (with_payload(event(), event(epoch=EPOCH + 1)[2]), Reason.MISMATCH),
        (with_payload(event(), event()[2].replace(b'"seq":1', b'"seq":true')), Reason.MISMATCH),
        (with_payload(event(), event()[2].replace(b'"seq":1', b'"seq":1.0')), Reason.MISMATCH),
    ],
)
def test_malformed_messages_are_refused_by_reason(
    frames: tuple[bytes, ...], reason: Reason
) -> None:
    gate = Gate()
    assert check(gate, frames) == reason
    assert gate.stats.rejected == {reason: 1}
    assert gate.stats.passed == 0


def test_json_whitespace_and_field_order_do_not_matter() -> None:
    frames = event()
    body = orjson.loads(frames[2])
    reordered = b" \n" + orjson.dumps(dict(reversed(body.items())), option=orjson.OPT_INDENT_2)
    assert check(Gate(), with_payload(frames, reordered)) is None


def test_payload_over_the_limit_is_refused_at_one_byte_over() -> None:
    gate = Gate()
    frames = event()
    padding = MAX_PAYLOAD_BYTES - len(frames[2])
    data = {"p": 1, "pad": "x" * (padding - len(',"pad":""'))}
    exact = tuple(encode_event(frames[0].decode(), "market_data", data, "bot-1", EPOCH, 1))
    assert len(exact[2]) == MAX_PAYLOAD_BYTES
    assert check(gate, exact) is None
    data["pad"] += "x"
    over = tuple(encode_event(frames[0].decode(), "market_data", data, "bot-1", EPOCH, 2))
    assert check(gate, over) == Reason.TOO_LARGE


def test_epochs_beyond_the_skew_are_refused() -> None:
    gate = Gate(epoch_skew_s=60)
    assert check(gate, event(epoch=NOW_NS + 59 * 10**9)) is None
    assert check(gate, event(epoch=NOW_NS + 61 * 10**9)) == Reason.FUTURE_EPOCH
    assert check(gate, event(epoch=2**64 - 1)) == Reason.FUTURE_EPOCH


def test_without_keys_the_first_live_publisher_owns_a_source() -> None:
    gate = Gate(owner_idle_s=30)
    assert check(gate, event(seq=1), BOT, now=0.0) is None
    # the poisoning attempt: the owner's epoch and the largest seq, from another connection
    assert check(gate, event(seq=2**64 - 1), OTHER, now=1.0) == Reason.NOT_OWNER
    assert check(gate, event(seq=2), BOT, now=29.0) is None
    # silent for less than owner_idle_s after its last event: still owned
    assert check(gate, event(seq=5), OTHER, now=58.9) == Reason.NOT_OWNER
    # silent for owner_idle_s: a restarted bot (a new connection) takes over
    assert check(gate, event(epoch=EPOCH + 1), OTHER, now=59.0) is None
    assert gate.stats.ownership_changes == 1
    assert check(gate, event(seq=3), BOT, now=60.0) == Reason.NOT_OWNER
    # other sources are not affected
    assert check(gate, event(source="bot-2"), BOT, now=60.0) is None


def test_a_restarted_bot_takes_its_source_over_at_once() -> None:
    gate = Gate(owner_idle_s=30)
    assert check(gate, event(seq=7), BOT, now=0.0) is None
    # same host, same run: a forgery (or a second copy), refused
    assert check(gate, event(seq=2**64 - 1), BOT_AGAIN, now=1.0) == Reason.NOT_OWNER
    # another host with a newer epoch: refused while the owner is live
    assert check(gate, event(epoch=EPOCH + 5), OTHER, now=1.0) == Reason.NOT_OWNER
    # same host, newer epoch: the bot restarted
    assert check(gate, event(epoch=EPOCH + 10), BOT_AGAIN, now=2.0) is None
    assert gate.stats.ownership_changes == 1
    # the old run is now the stranger
    assert check(gate, event(seq=8), BOT, now=3.0) == Reason.NOT_OWNER


def test_messages_without_an_identity_are_refused() -> None:
    assert check(Gate(), event(), None) == Reason.UNIDENTIFIED


def test_with_keys_a_source_passes_only_for_keys_that_name_it() -> None:
    allowed = {"bot-a-key": frozenset({"bot-a"}), "bridge": frozenset({"demo-bot", "bot-a"})}
    gate = Gate(lambda user: allowed.get(user, frozenset()))
    assert check(gate, event(source="bot-a"), b"bot-a-key") is None
    assert check(gate, event(source="bot-a", seq=2), b"bridge") is None
    assert check(gate, event(source="bot-b"), b"bot-a-key") == Reason.NOT_OWNER
    assert check(gate, event(source="bot-a"), b"analytics") == Reason.NOT_OWNER
    # keys decide, not liveness: two keys naming one source may both publish it
    assert check(gate, event(source="bot-a", seq=3), b"bot-a-key", now=0.5) is None


def test_the_gate_memory_is_bounded() -> None:
    gate = Gate(known_names_max=100)
    for n in range(250):
        # forgotten topics are validated again: still passed, never refused
        assert check(gate, event(topic=f"custom.k{n}")) is None
    assert gate.remembered_names <= 2 * 100
    assert KNOWN_NAMES_MAX >= 100_000  # room for the cache's 100,000 topics


def test_refusal_log_admits_a_bounded_rate_and_sums_the_rest() -> None:
    limiter = RefusalLog(per_second=2)
    assert limiter.admit(0.0) == (True, 0)
    assert limiter.admit(0.1) == (False, 0)
    assert limiter.admit(0.2) == (False, 0)
    assert limiter.admit(0.5) == (True, 2)
    assert limiter.admit(1.0) == (True, 0)


def test_payload_mismatch_detail_never_quotes_the_payload() -> None:
    gate = Gate()
    secret = orjson.dumps({"token": "s3cr3t"})
    refusal = gate.check(with_payload(event(), secret), BOT, 0.0, NOW_NS)
    assert refusal is not None
    assert "s3cr3t" not in refusal.detail


frame_strategy = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([event()[0], event()[1], event()[2], b"{}", b"[]", b"\xff", b""]),
)


@settings(max_examples=400, deadline=None)
@given(
    frames=st.lists(frame_strategy, min_size=0, max_size=5).map(tuple),
    user=st.one_of(st.none(), st.binary(max_size=16)),
)
def test_the_gate_never_raises_whatever_it_is_given(
    frames: tuple[bytes, ...], user: bytes | None
) -> None:
    for gate in (Gate(), Gate(lambda _user: frozenset({"bot-1"}))):
        refusal = gate.check(frames, user, 0.0, NOW_NS)
        assert refusal is None or isinstance(refusal.reason, Reason)
