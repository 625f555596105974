"""Client requests of the WebSocket protocol: parsing and validation. Pure.

docs/websocket-protocol.md is the reference. Every request is a JSON object; ``op`` names
the new forms, ``type`` the original dashboard's forms and guide-shaped events to publish.
A bad request raises RequestError carrying the snake_case code sent back to the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from bridge.errors import BridgeError
from bus.errors import TopicError
from bus.topics import Pattern, validate_source, validate_topic, validate_type

RequestId = str | int | None

# types a client may send that are not events: the original dashboard answered the
# server's ping with pong, and sent ping itself
LEGACY_PING: Final = "ping"
LEGACY_SUBSCRIBE: Final = "subscribe"
IGNORED_TYPES: Final = frozenset({"pong"})
# per request, checked before any entry is parsed (the bridge passes its settings)
MAX_PATTERNS: Final = 100
MAX_POSITIONS: Final = 1000


class RequestError(BridgeError):
    """An invalid client request; ``code`` is sent to the client with the message."""

    def __init__(self, code: str, message: str, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Position:
    """The last event a client saw of (topic, source): where a resume starts."""

    topic: str
    source: str
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    patterns: tuple[Pattern, ...]
    snapshot: bool
    since: tuple[Position, ...] | None
    request_id: RequestId
    legacy: bool = False  # {"type": "subscribe", "channels": [...]}


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    patterns: tuple[Pattern, ...]
    request_id: RequestId


@dataclass(frozen=True, slots=True)
class Ping:
    request_id: RequestId


@dataclass(frozen=True, slots=True)
class Ignore:
    pass


@dataclass(frozen=True, slots=True)
class PublishRequest:
    """A guide-shaped event to put on the bus: {"type", "data", "timestamp"?, "topic"?, ...}."""

    type: str
    data: dict[str, Any]
    timestamp: str | None
    topic: str | None
    seq: int | None
    request_id: RequestId


Request = Subscribe | Unsubscribe | Ping | Ignore | PublishRequest


def _request_id(message: dict[str, Any]) -> RequestId:
    value = message.get("id")
    if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
        return value
    raise RequestError("bad_request", "id must be a number or a string")


def _patterns(
    value: object, field: str, request_id: RequestId, limit: int = MAX_PATTERNS
) -> tuple[Pattern, ...]:
    if not isinstance(value, list):
        raise RequestError("bad_request", f"{field} must be a list of patterns", request_id)
    if len(value) > limit:
        raise RequestError(
            "too_many_subscriptions",
            f"{len(value)} patterns in one request; at most {limit}",
            request_id,
        )
    try:
        patterns = tuple(Pattern(item) for item in value)
    except TopicError as error:
        raise RequestError("bad_pattern", str(error), request_id) from None
    return tuple(dict.fromkeys(patterns))


def _positions(value: object, request_id: RequestId, limit: int) -> tuple[Position, ...]:
    if not isinstance(value, list):
        raise RequestError("bad_request", "since must be a list of positions", request_id)
    if len(value) > limit:
        raise RequestError(
            "too_many_positions",
            f"{len(value)} positions in since; at most {limit} per request",
            request_id,
        )
    positions: list[Position] = []
    for item in value:
        if not isinstance(item, dict):
            raise RequestError(
                "bad_request", "each since entry must be {topic, source, epoch, seq}", request_id
            )
        epoch, seq = item.get("epoch"), item.get("seq")
        if (
            not isinstance(epoch, int)
            or not isinstance(seq, int)
            or isinstance(epoch, bool)
            or isinstance(seq, bool)
            or epoch < 0
            or seq < 0
        ):
            raise RequestError(
                "bad_request", "since epoch and seq must be whole numbers >= 0", request_id
            )
        try:
            topic = validate_topic(item.get("topic"))
            source = validate_source(item.get("source"))
        except TopicError as error:
            raise RequestError("bad_request", f"since: {error}", request_id) from None
        positions.append(Position(topic, source, epoch, seq))
    return tuple(positions)


def parse_request(
    text: str | bytes, *, max_patterns: int = MAX_PATTERNS, max_positions: int = MAX_POSITIONS
) -> Request:
    """Parse one client message; raises RequestError (the connection survives).

    ``max_patterns`` and ``max_positions`` bound a request's lists before their entries
    are parsed, so a request's cost is bounded whatever its size limit.
    """
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise RequestError("bad_json", f"message is not valid JSON: {error}") from None
    if not isinstance(message, dict):
        raise RequestError("bad_request", "message must be a JSON object")
    request_id = _request_id(message)
    op = message.get("op")
    if op is not None:
        return _parse_op(op, message, request_id, max_patterns, max_positions)
    type_name = message.get("type")
    if type_name is None:
        raise RequestError("bad_request", "message needs an 'op' or a 'type'", request_id)
    if type_name == LEGACY_PING:
        return Ping(request_id)
    if type_name == LEGACY_SUBSCRIBE:
        channels = message.get("channels", message.get("topics"))
        patterns = _patterns(channels, "channels", request_id, max_patterns)
        return Subscribe(patterns, snapshot=False, since=None, request_id=request_id, legacy=True)
    if type_name in IGNORED_TYPES:
        return Ignore()
    return parse_publish(message, request_id)


def _parse_op(
    op: object,
    message: dict[str, Any],
    request_id: RequestId,
    max_patterns: int,
    max_positions: int,
) -> Request:
    if op == "subscribe":
        patterns = _patterns(message.get("topics"), "topics", request_id, max_patterns)
        snapshot = message.get("snapshot", True)
        if not isinstance(snapshot, bool):
            raise RequestError("bad_request", "snapshot must be true or false", request_id)
        since_value = message.get("since")
        since = None if since_value is None else _positions(since_value, request_id, max_positions)
        return Subscribe(patterns, snapshot, since, request_id)
    if op == "unsubscribe":
        return Unsubscribe(
            _patterns(message.get("topics"), "topics", request_id, max_patterns), request_id
        )
    if op == "ping":
        return Ping(request_id)
    if op == "publish":
        return parse_publish(message, request_id)
    if not isinstance(op, str):
        raise RequestError("bad_request", "op must be a string", request_id)
    raise RequestError(
        "unknown_op",
        f"unknown op {op[:40]!r}: expected subscribe, unsubscribe, ping or publish",
        request_id,
    )


def parse_publish(message: dict[str, Any], request_id: RequestId) -> PublishRequest:
    """Validate a guide-shaped event (type name, object data, optional topic/seq/timestamp)."""
    try:
        type_name = validate_type(message.get("type"))
    except TopicError as error:
        raise RequestError("bad_event", str(error), request_id) from None
    data = message.get("data")
    if not isinstance(data, dict):
        raise RequestError("bad_event", "event data must be a JSON object", request_id)
    timestamp = message.get("timestamp")
    if timestamp is not None and not isinstance(timestamp, str):
        raise RequestError("bad_event", "timestamp must be an ISO-8601 string", request_id)
    topic = message.get("topic")
    if topic is not None:
        try:
            validate_topic(topic)
        except TopicError as error:
            raise RequestError("bad_event", str(error), request_id) from None
        if topic.partition(".")[0] != type_name:
            raise RequestError(
                "bad_event", f"topic {topic!r} does not start with type {type_name!r}", request_id
            )
    seq = message.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
        raise RequestError("bad_event", "seq must be a whole number >= 1", request_id)
    return PublishRequest(type_name, data, timestamp, topic, seq, request_id)
