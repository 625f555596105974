"""The bridge's pure core with plain values: frames, limits, auth, requests, queues, hub."""

from __future__ import annotations

import struct
from typing import Any

import jwt
import orjson
import pytest

from bridge.admission import origin_allowed
from bridge.auth import Authenticator, Grant, covers, token_from_request
from bridge.client import Client, SlowConsumerError
from bridge.config import BridgeConfig
from bridge.errors import AuthError, ConfigError
from bridge.frames import close_frame, text_frame
from bridge.hub import Hub
from bridge.limits import TokenBucket
from bridge.protocol import (
    Ignore,
    Ping,
    Position,
    PublishRequest,
    RequestError,
    Subscribe,
    Unsubscribe,
    parse_request,
)
from bridge.upstream import SnapshotSync, SubscribePrefix, UnsubscribePrefix
from bus.envelope import encode_event, encode_meta
from bus.topics import Pattern

SECRET = "core-test-secret-of-at-least-32-bytes!"


# -- frames -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f" + struct.pack(">Q", 65536)),
    ],
)
def test_text_frame_header_lengths(size: int, header: bytes) -> None:
    payload = b"a" * size
    assert text_frame(payload) == header + payload


def test_close_frame_carries_code_and_reason() -> None:
    frame = close_frame(4008, "slow consumer")
    assert frame[0] == 0x88
    assert frame[1] == 2 + len("slow consumer")
    assert struct.unpack(">H", frame[2:4]) == (4008,)
    assert len(close_frame(1000, "x" * 500)) == 2 + 125


# -- rate limit -------------------------------------------------------------------------
def test_token_bucket_with_injected_clock() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.4) is False  # 0.8 tokens
    assert bucket.take(100.5) is True  # 1.0 token
    assert bucket.take(200.0)
    assert bucket.take(200.0)
    assert bucket.take(200.0)
    assert not bucket.take(200.0)  # never more than the burst


# -- auth -------------------------------------------------------------------------------
def test_static_tokens_and_open_mode() -> None:
    assert Authenticator().authenticate(None, 0) == Grant()
    auth = Authenticator(tokens=["read"], publish_tokens={"write": ("bot-1",)})
    assert auth.authenticate("read", 0) == Grant(publish=False, sources=())
    assert auth.authenticate("write", 0) == Grant(publish=True, sources=("bot-1",))
    for bad in (None, "", "nope"):
        with pytest.raises(AuthError):
            auth.authenticate(bad, 0)


def test_jwt_claims_checked_against_the_injected_clock() -> None:
    auth = Authenticator(jwt_secret=SECRET)
    token = jwt.encode(
        {"exp": 1000, "topics": ["market_data", "*.BTC-USD"], "publish": True, "sub": "dash"},
        SECRET,
        algorithm="HS256",
    )
    grant = auth.authenticate(token, now=999.0)
    assert (grant.publish, grant.expires_at, grant.subject) == (True, 1000.0, "dash")
    assert grant.allows_pattern(Pattern("market_data.ETH-USD"))
    assert grant.allows_pattern(Pattern("position_update.BTC-USD"))
    assert not grant.allows_pattern(Pattern("*"))
    assert not grant.allows_pattern(Pattern("ai_decision"))
    assert grant.allows_topic("market_data.X")
    assert not grant.allows_topic("ai_decision")
    with pytest.raises(AuthError) as expired:
        auth.authenticate(token, now=1000.0)
    assert expired.value.code == "token_expired"
    for claims in (
        {"exp": 1000, "topics": "market_data"},
        {"exp": 1000, "topics": ["bad topic"]},
        {"exp": 1000, "publish": "yes"},
        {"exp": 1000, "sources": "bot-1"},
        {"exp": 1000, "sources": ["bad source!"]},
    ):
        with pytest.raises(AuthError):
            auth.authenticate(jwt.encode(claims, SECRET, algorithm="HS256"), 0)
    with pytest.raises(AuthError):
        auth.authenticate(jwt.encode({}, SECRET + "x", algorithm="HS256"), 0)


def test_pattern_coverage() -> None:
    assert covers(Pattern("*"), Pattern("market_data.BTC-USD"))
    assert covers(Pattern("market_data"), Pattern("market_data.*"))
    assert not covers(Pattern("market_data.BTC-USD"), Pattern("market_data"))
    assert not covers(Pattern("market_data"), Pattern("*.BTC-USD"))


def test_token_sources() -> None:
    assert token_from_request("Bearer abc", [], None) == "abc"
    assert token_from_request(None, ["tradebus", "bearer.xyz"], None) == "xyz"
    assert token_from_request(None, ["tradebus"], "q") == "q"
    assert token_from_request("Basic abc", [], None) is None


def test_origin_rules() -> None:
    host = "trading.example.com:8000"
    assert origin_allowed(None, host, False, ())
    assert origin_allowed("http://trading.example.com:8000", host, False, ())
    assert origin_allowed("HTTP://Trading.Example.com:8000", host, False, ())
    assert origin_allowed("https://trading.example.com:8000", host, True, ())
    # the full origin is compared: another scheme or port of the same host is another site
    assert not origin_allowed("https://trading.example.com", host, False, ())
    assert not origin_allowed("http://trading.example.com:8001", host, False, ())
    assert not origin_allowed("http://localhost:5173", host, False, ())
    assert not origin_allowed("https://evil.example", host, False, ())
    assert not origin_allowed("null", host, False, ())
    assert origin_allowed("https://evil.example", host, False, ("https://evil.example",))
    assert origin_allowed("https://evil.example", host, False, ("https://evil.example:443",))
    assert origin_allowed("https://any.example", host, False, ("*",))


def test_config_validation_and_environment() -> None:
    config = BridgeConfig.from_env(
        {
            "TRADEBUS__BRIDGE_PORT": "9001",
            "TRADEBUS__BRIDGE_ALLOW_PUBLISH": "true",
            "TRADEBUS__BRIDGE_ORIGINS": "https://a.example, https://b.example",
            "TRADEBUS__BRIDGE_HISTORY_SECONDS": "60",
        },
        host="0.0.0.0",
    )
    assert (config.port, config.allow_publish, config.host) == (9001, True, "0.0.0.0")
    assert config.origins == ("https://a.example", "https://b.example")
    assert config.history_seconds == 60.0
    with pytest.raises(ConfigError, match="TRADEBUS__BRIDGE_PORT"):
        BridgeConfig.from_env({"TRADEBUS__BRIDGE_PORT": "eighty"})
    with pytest.raises(ConfigError, match="jwt_secret"):
        BridgeConfig(jwt_secret="short")
    with pytest.raises(ConfigError, match="cert and key"):
        BridgeConfig(cert="c.pem")
    with pytest.raises(ConfigError, match="max_queue_bytes"):
        BridgeConfig(max_queue_bytes=0)


# -- requests ---------------------------------------------------------------------------
def test_parse_requests() -> None:
    sub = parse_request(
        '{"op":"subscribe","topics":["market_data","market_data"],"id":3,'
        '"since":[{"topic":"market_data.X","source":"bot","epoch":1,"seq":2}]}'
    )
    assert sub == Subscribe(
        (Pattern("market_data"),), True, (Position("market_data.X", "bot", 1, 2),), 3
    )
    assert parse_request('{"op":"unsubscribe","topics":["a"]}') == Unsubscribe(
        (Pattern("a"),), None
    )
    assert parse_request('{"op":"ping","id":"x"}') == Ping("x")
    assert parse_request('{"type":"ping"}') == Ping(None)
    assert parse_request('{"type":"pong"}') == Ignore()
    legacy = parse_request('{"type":"subscribe","channels":["ai_decision"]}')
    assert isinstance(legacy, Subscribe)
    assert legacy.legacy
    assert not legacy.snapshot
    event = parse_request('{"type":"market_data","data":{"symbol":"BTC-USD"},"seq":4,"id":1}')
    assert event == PublishRequest("market_data", {"symbol": "BTC-USD"}, None, None, 4, 1)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{", "bad_json"),
        ("[1]", "bad_request"),
        ('{"id": 1}', "bad_request"),
        ('{"op": "dance"}', "unknown_op"),
        ('{"op": 5}', "bad_request"),
        ('{"op": "subscribe", "topics": "x"}', "bad_request"),
        ('{"op": "subscribe", "topics": ["a.b.c"]}', "bad_pattern"),
        ('{"op": "subscribe", "topics": ["a"], "snapshot": "yes"}', "bad_request"),
        ('{"op": "subscribe", "topics": ["a"], "since": [{"topic": "a"}]}', "bad_request"),
        ('{"op": "ping", "id": [1]}', "bad_request"),
        ('{"type": "9lives", "data": {}}', "bad_event"),
        ('{"type": "market_data", "data": 5}', "bad_event"),
        ('{"type": "market_data", "data": {}, "topic": "ai_decision"}', "bad_event"),
        ('{"type": "market_data", "data": {}, "seq": 0}', "bad_event"),
        ('{"type": "market_data", "data": {}, "timestamp": 5}', "bad_event"),
    ],
)
def test_bad_requests_have_codes(text: str, code: str) -> None:
    with pytest.raises(RequestError) as error:
        parse_request(text)
    assert error.value.code == code


# -- the outbound queue -----------------------------------------------------------------
def test_queue_writes_everything_at_once_when_the_socket_keeps_up() -> None:
    client = Client(1)
    client.push(b"a")
    client.frames.append(b"b")
    assert client.take(buffered=0, high_water=10, limit=100) == b"ab"
    assert client.take(buffered=0, high_water=10, limit=100) is None


def test_queue_conflates_while_behind_and_overflows_as_slow() -> None:
    client = Client(1)
    client.push(b"first")
    assert client.take(buffered=10, high_water=10, limit=100) is None  # behind now
    assert client.behind
    assert client.special
    client.push_event(b"md-1", b"market_data.X", b"s", 1, 1, True)
    client.push_event(b"ai-1", b"ai_decision", b"s", 1, 1, False)
    client.push_event(b"md-2", b"market_data.X", b"s", 1, 2, True)
    client.push_event(b"ai-2", b"ai_decision", b"s", 1, 2, False)
    assert client.conflated == 1
    assert client.frames == [b"first", b"md-2", b"ai-1", b"ai-2"]
    assert client.queued_bytes() == 5 + 4 + 4 + 4
    assert client.take(buffered=0, high_water=10, limit=100) == b"firstmd-2ai-1ai-2"
    assert not client.behind
    assert not client.special
    client.push(b"x" * 50)
    with pytest.raises(SlowConsumerError):
        client.take(buffered=60, high_water=10, limit=100)


def test_a_newer_event_never_overtakes_released_ones_while_behind() -> None:
    """Conflation replaces a topic's queued frame in place: after a release while behind,
    that frame precedes the released events, so a newer one must queue after them."""
    client = Client(1)
    client.push(b"first")
    assert client.take(buffered=10, high_water=10, limit=1000) is None  # behind now
    client.push_event(b"md-1", b"market_data.X", b"s", 1, 1, True)
    client.hold()
    client.push_event(b"md-2", b"market_data.X", b"s", 1, 2, True)
    client.push_event(b"md-3", b"market_data.X", b"s", 1, 3, True)
    client.release({})
    client.push_event(b"md-4", b"market_data.X", b"s", 1, 4, True)
    client.push_event(b"md-5", b"market_data.X", b"s", 1, 5, True)
    assert client.frames == [b"first", b"md-1", b"md-2", b"md-3", b"md-5"]
    assert client.conflated == 1


def test_held_events_are_released_without_what_a_snapshot_sent() -> None:
    client = Client(1)
    client.hold()
    client.push_event(b"e5", b"t", b"s", 1, 5, False)
    client.push_event(b"e6", b"t", b"s", 1, 6, False)
    client.push_event(b"gap", None, None, 0, 0, False)
    client.push_event(b"o1", b"other", b"s", 1, 1, False)
    client.push(b"reply")  # control messages are not held
    assert client.frames == [b"reply"]
    client.release({(b"s", b"t"): (1, 5)})
    assert client.frames == [b"reply", b"e6", b"gap", b"o1"]
    assert client.held is None
    assert not client.special


# -- the hub ----------------------------------------------------------------------------
def message(topic: str, seq: int, source: str = "bot", epoch: int = 1, **data: Any) -> list[bytes]:
    return encode_event(topic, topic.partition(".")[0], data, source, epoch, seq, publish_ns=1)


def texts(client: Client, *, statuses: bool = False) -> list[dict[str, Any]]:
    """The client's queued messages (source_status only when asked), queue emptied."""
    out = [orjson.loads(frame[frame.index(b"{") :]) for frame in client.frames]
    client.frames.clear()
    return [m for m in out if statuses or m["type"] != "source_status"]


def hub_with_clients(*patterns: tuple[str, ...], **options: Any) -> tuple[Hub, list[Client]]:
    options.setdefault("track_sources", False)
    hub = Hub(**options)
    clients = []
    for number, client_patterns in enumerate(patterns, 1):
        client = Client(number)
        hub.add_client(client, 0)
        if client_patterns:
            request = Subscribe(tuple(Pattern(p) for p in client_patterns), False, None, None)
            hub.subscribe(client, request, 0.0)
        client.frames.clear()
        clients.append(client)
    return hub, clients


def test_routing_by_pattern_and_implicit_everything() -> None:
    hub, (btc, star, decisions, everything) = hub_with_clients(
        ("market_data.BTC-USD",), ("*.BTC-USD",), ("ai_decision",), ()
    )
    hub.dispatch(
        [
            message("market_data.BTC-USD", 1),
            message("market_data.ETH-USD", 1),
            message("position_update.BTC-USD", 1),
            message("ai_decision", 1),
        ],
        now=1.0,
        now_ns=1,
    )
    topics = {c.id: [m["topic"] for m in texts(c)] for c in (btc, star, decisions, everything)}
    assert topics == {
        1: ["market_data.BTC-USD"],
        2: ["market_data.BTC-USD", "position_update.BTC-USD"],
        3: ["ai_decision"],
        4: ["market_data.BTC-USD", "market_data.ETH-USD", "position_update.BTC-USD", "ai_decision"],
    }
    assert hub.stats.deliveries == 8
    assert hub.stats.events_by_type == {"market_data": 2, "position_update": 1, "ai_decision": 1}


def test_one_frame_shared_by_every_client() -> None:
    hub, clients = hub_with_clients(("a",), ("a",), ("*",))
    hub.dispatch([message("a", 1)], 1.0, 1)
    assert clients[0].frames[0] is clients[1].frames[0] is clients[2].frames[0]


def test_duplicates_dropped_and_gaps_reported() -> None:
    hub, (client,) = hub_with_clients(("a",))
    hub.dispatch([message("a", 1), message("a", 1), message("a", 4)], 1.0, 1)
    got = texts(client)
    assert [m.get("seq", m["type"]) for m in got] == [1, "gap", 4]
    assert got[1] == {"type": "gap", "topic": "a", "source": "bot", "missed": 2}
    assert hub.stats.dropped == {"duplicate": 1}
    hub.dispatch([[b"bad topic", b"x", b"{}"], [b"a"]], 1.0, 1)
    assert hub.stats.dropped["invalid"] == 2


def test_upstream_follows_subscriptions_with_linger() -> None:
    hub = Hub(track_sources=True, upstream_linger=10.0)
    assert hub.upstream_ops == [SubscribePrefix(b"system_status")]
    hub.upstream_ops.clear()
    client = Client(1)
    hub.add_client(client, 0)
    assert hub.upstream_ops == [SubscribePrefix(b"")]  # everything, until it subscribes
    hub.upstream_ops.clear()
    hub.subscribe(client, Subscribe((Pattern("market_data.BTC-USD"),), False, None, None), 0.0)
    # the implicit "everything" goes at once: such a client cannot resume
    assert hub.upstream_ops == [UnsubscribePrefix(b""), SubscribePrefix(b"market_data.BTC-USD")]
    hub.upstream_ops.clear()
    hub.remove_client(client, 20.0)
    hub.housekeeping(29.0)
    assert hub.upstream_ops == []  # kept for a resume within the linger time
    hub.housekeeping(31.0)
    assert hub.upstream_ops == [UnsubscribePrefix(b"market_data.BTC-USD")]
    assert hub.upstream.subscribed == {b"system_status"}


def test_snapshot_waits_for_the_proxy_then_releases_live_events_without_duplicates() -> None:
    hub, (client,) = hub_with_clients(("ai_decision",))
    hub.upstream_ops.clear()
    hub.subscribe(client, Subscribe((Pattern("market_data"),), True, None, 7), 0.0)
    (sync,) = [op for op in hub.upstream_ops if isinstance(op, SnapshotSync)]
    sync_id = sync.sync_id
    assert sync.patterns == ("market_data",)
    assert [m["type"] for m in texts(client)] == ["subscribed"]
    # live events arrive before the snapshot reply: held
    hub.dispatch([message("market_data.X", 5), message("market_data.X", 6)], 1.0, 1)
    hub.dispatch([message("ai_decision", 1)], 1.0, 1)
    assert texts(client) == []  # (the new source's status is a control message: not held)
    assert client.held is not None
    assert len(client.held) == 3
    snapshot = [message("market_data.X", 5)[0:3], message("market_data.Y", 2)[0:3]]
    hub.snapshot_reply(sync_id, True, snapshot, 2.0)
    got = texts(client)
    assert [m["type"] for m in got] == [
        "snapshot_begin",
        "market_data",
        "market_data",
        "snapshot_end",
        "ai_decision",
    ]
    assert [(m["topic"], m["seq"]) for m in got[1:3]] == [
        ("market_data.X", 6),
        ("market_data.Y", 2),
    ]
    assert got[3] == {"type": "snapshot_end", "mode": "snapshot", "recovered": True, "count": 2}
    # the prefix is now held: the next snapshot is served at once, with no proxy round trip
    hub.upstream_ops.clear()
    hub.subscribe(client, Subscribe((Pattern("market_data.Y"),), True, None, 8), 3.0)
    assert not [op for op in hub.upstream_ops if isinstance(op, SnapshotSync)]
    assert [m["type"] for m in texts(client)][1:] == [
        "snapshot_begin",
        "market_data",
        "snapshot_end",
    ]


def test_snapshot_timeout_serves_what_is_known_marked_incomplete() -> None:
    hub, (client,) = hub_with_clients(("a",), snapshot_timeout=1.0)
    hub.subscribe(client, Subscribe((Pattern("b"),), True, None, None), 0.0)
    texts(client)
    hub.housekeeping(1.5)
    got = texts(client)
    assert got[0] == {"type": "snapshot_begin", "mode": "snapshot", "recovered": False}
    assert hub.stats.sync_timeouts == 1


def since(topic: str, seq: int) -> tuple[Position, ...]:
    return (Position(topic, "bot", 1, seq),)


def resumed(hub: Hub, positions: tuple[Position, ...], pattern: str = "t") -> list[dict[str, Any]]:
    client = Client(99)
    hub.add_client(client, 0)
    hub.subscribe(client, Subscribe((Pattern(pattern),), True, positions, None), 100.0)
    got = texts(client)
    hub.remove_client(client, 100.0)
    return got[got.index(next(m for m in got if m["type"] == "snapshot_begin")) :]


def test_resume_from_history() -> None:
    hub, _clients = hub_with_clients(("t",), history_events=3)
    hub.upstream.held_prefixes.add(b"t")
    hub.dispatch([message("t", n) for n in range(1, 6)] + [message("t.new", 1)], 1.0, 1)
    got = resumed(hub, since("t", 3))
    assert got[0] == {"type": "snapshot_begin", "mode": "resume", "recovered": True}
    assert [(m["topic"], m["seq"]) for m in got[1:-1]] == [("t", 4), ("t", 5), ("t.new", 1)]
    assert got[-1]["count"] == 3
    # nothing missed in "t"; "t.new" was not named, so its latest comes as in a snapshot
    got = resumed(hub, since("t", 5))
    assert got[0]["recovered"] is True
    assert [(m["topic"], m["seq"]) for m in got[1:-1]] == [("t.new", 1)]
    # outside the window (3 kept: 3, 4, 5): not recovered, the latest values instead
    got = resumed(hub, since("t", 1))
    assert got[0]["recovered"] is False
    assert [(m["topic"], m["seq"]) for m in got[1:-1]] == [("t", 5), ("t.new", 1)]
    assert hub.stats.resumes_unrecovered == 1


def test_history_is_also_bounded_in_time() -> None:
    hub, _ = hub_with_clients(("t",), history_seconds=10.0)
    hub.upstream.held_prefixes.add(b"t")
    hub.dispatch([message("t", 1), message("t", 2)], 1.0, 1)
    hub.dispatch([message("t", 3)], 20.0, 1)
    assert [entry.seq for entry in hub.topics[b"t"].history] == [3]  # type: ignore[union-attr]
    assert resumed(hub, since("t", 1))[0]["recovered"] is False
    assert resumed(hub, since("t", 2))[0]["recovered"] is True


def test_publish_stamps_topic_source_and_sequence() -> None:
    hub = Hub(track_sources=False)
    client = Client(1, publisher=True, may_publish=True, source="bot-a", epoch=5)
    hub.add_client(client, 0)
    request = PublishRequest("market_data", {"symbol": "BTC-USD", "price": 1}, None, None, None, 1)
    frames = hub.publish(client, request, now_ns=10**18)
    assert frames is not None
    topic, meta, payload = frames
    assert topic == b"market_data.BTC-USD"
    assert meta == encode_meta(b"bot-a", 5, 1, 10**18)
    body = orjson.loads(payload)
    assert (body["source"], body["epoch"], body["seq"]) == ("bot-a", 5, 1)
    assert body["timestamp"].startswith("2001-09-09T")
    odd = PublishRequest("market_data", {"symbol": "a b"}, "2024-01-01T00:00:00Z", None, None, 2)
    odd_frames = hub.publish(client, odd, 1)
    assert odd_frames is not None
    assert odd_frames[0] == b"market_data"
    assert orjson.loads(odd_frames[2])["timestamp"] == "2024-01-01T00:00:00Z"
    explicit = PublishRequest("ai_decision", {}, None, None, 7, 3)
    assert hub.publish(client, explicit, 1) is not None
    assert hub.publish(client, explicit, 1) is None  # seq not above the last: duplicate
    reader = Client(2)
    with pytest.raises(RequestError) as refused:
        hub.publish(reader, explicit, 1)
    assert refused.value.code == "publish_forbidden"


def test_source_liveness_with_injected_time() -> None:
    hub, (client,) = hub_with_clients(("system_status",), stale_after=15.0)
    hub.dispatch([message("system_status", 1, source="bot-9")], 100.0, 5 * 10**18)
    got = texts(client, statuses=True)
    assert got[0]["type"] == "source_status"
    assert (got[0]["source"], got[0]["status"]) == ("bot-9", "live")
    hub.housekeeping(110.0)
    assert texts(client, statuses=True) == []
    hub.housekeeping(116.0)
    (stale,) = texts(client, statuses=True)
    assert (stale["status"], stale["last_seen"]) == ("stale", got[0]["last_seen"])
    assert hub.stale_sources() == {"bot-9": False}
    hub.dispatch([message("system_status", 2, source="bot-9")], 117.0, 1)
    assert texts(client, statuses=True)[0]["status"] == "live"
    late = Client(5)
    hub.add_client(late, 0)
    assert [m["type"] for m in texts(late, statuses=True)] == ["source_status"]


def test_token_bucket_reservation_for_publishers() -> None:
    bucket = TokenBucket(rate=4.0, burst=1.0, now=0.0)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == pytest.approx(0.25)  # in debt: wait a quarter second
    assert bucket.reserve(0.0) == pytest.approx(0.5)
    assert not bucket.take(0.4)
    assert bucket.take(0.75)
