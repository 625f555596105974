"""The proxy's gate: which bus messages may reach subscribers, the cache and snapshots. No I/O.

Every message a publisher sends passes ``Gate.check`` before the proxy forwards it; a
message that fails is refused whole and counted by reason (docs/protocol.md, "The gate").
A message passes when:

* it has exactly three frames: topic, meta, payload;
* the topic follows the topic grammar and the meta frame is wire version 1 with a valid
  source id;
* its publisher may publish as that source: with keys, the source is one its key names;
  without keys, the first live publisher (connection) of a source owns it until it has been
  silent for ``owner_idle_s`` seconds, or until a connection from the same host address
  sends the source with a newer epoch (the bot restarted: its epoch is its start time);
* its epoch is not further in the future than ``epoch_skew_ns``;
* the payload is at most MAX_PAYLOAD_BYTES of valid UTF-8 holding one JSON object whose
  ``topic``, ``source``, ``epoch`` and ``seq`` equal the frames'.

The caller passes the clock (``now`` monotonic seconds for ownership, ``wall_ns`` for the
epoch check) and the publisher's identity: the ZAP User-Id libzmq attaches to each message
(a key's name with CURVE, ``connection-N@ADDRESS`` without). Topics and sources already seen
valid are remembered (bounded), so a known topic costs one dict look-up.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import msgspec

from bus.envelope import MAX_PAYLOAD_BYTES, META_HEADER_SIZE, WIRE_VERSION
from bus.errors import TopicError
from bus.topics import validate_source, validate_topic

# A publisher's epoch is its start time in ns (docs/protocol.md); clocks of hosts differ
# by at most this much before an epoch counts as "from the future".
DEFAULT_EPOCH_SKEW_S: Final = 60.0
# A source whose publisher has sent nothing for this long may be claimed by another one
# (a restarted bot reconnects as a new connection).
DEFAULT_OWNER_IDLE_S: Final = 30.0
# Bounds of the gate's own memory: valid topics and sources remembered, sources owned.
KNOWN_NAMES_MAX: Final = 200_000
OWNED_SOURCES_MAX: Final = 10_000

_unpack_position = struct.Struct(">QQ").unpack_from


class _Routing(msgspec.Struct):
    """The payload fields that repeat the frames (docs/protocol.md); others are skipped."""

    topic: str
    source: str
    epoch: int
    seq: int


# msgspec validates the whole JSON text but builds only these four fields: about half the
# cost of orjson.loads building every value of the payload (measured, docs/performance.md).
# Strict types: JSON true or 1.0 is no seq. It does not check the UTF-8 of strings it
# skips, so the gate decodes the payload for that first.
_decode_routing = msgspec.json.Decoder(_Routing).decode
_POSITION_OFFSET: Final = 2


class Reason(StrEnum):
    """Why the gate refused a message: the ``reason`` label of tradebus_proxy_rejected_total."""

    FRAMES = "frames"  # not exactly three frames
    TOPIC = "topic"  # topic frame not UTF-8 or not in the topic grammar
    META = "meta"  # meta frame too short or with an unknown wire version
    SOURCE = "source"  # source id not in the source grammar
    UNIDENTIFIED = "unidentified"  # libzmq attached no publisher identity
    NOT_OWNER = "not_owner"  # the publisher may not publish as that source
    TOO_MANY_SOURCES = "too_many_sources"  # OWNED_SOURCES_MAX live sources already
    FUTURE_EPOCH = "future_epoch"  # epoch beyond the clock-skew allowance
    TOO_LARGE = "too_large"  # payload over MAX_PAYLOAD_BYTES
    PAYLOAD = "payload"  # payload not UTF-8 JSON
    NOT_OBJECT = "not_object"  # payload JSON but not an object
    MISMATCH = "mismatch"  # payload's topic/source/epoch/seq differ from the frames'
    INTERNAL = "internal"  # the check itself failed (a bug): refused, forwarding goes on


@dataclass
class GateStats:
    passed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    # sources whose owner went silent and that another publisher then claimed
    ownership_changes: int = 0
    owned_sources: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused message, as the proxy logs it (topic and source as far as they were read)."""

    reason: Reason
    topic: str
    source: str
    publisher: str
    detail: str


def _text(frame: bytes, limit: int = 80) -> str:
    """A frame as loggable text: decoded with replacement, cut to ``limit`` characters."""
    return frame[:limit].decode(errors="replace")


class _Owner:
    """The publisher (ZAP User-Id) that owns a source without keys, when it last sent, and
    the newest epoch it sent."""

    __slots__ = ("epoch", "last_seen", "user_id")

    def __init__(self, user_id: bytes, last_seen: float, epoch: int) -> None:
        self.user_id = user_id
        self.last_seen = last_seen
        self.epoch = epoch


def _host(user_id: bytes) -> bytes:
    """The peer address in a connection's User-Id (``connection-N@ADDRESS``)."""
    return user_id.rpartition(b"@")[2]


class Gate:
    """Checks bus messages; not thread-safe (one forwarding thread owns it)."""

    def __init__(
        self,
        sources_for: Callable[[str], frozenset[str]] | None = None,
        *,
        owner_idle_s: float = DEFAULT_OWNER_IDLE_S,
        epoch_skew_s: float = DEFAULT_EPOCH_SKEW_S,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        known_names_max: int = KNOWN_NAMES_MAX,
    ) -> None:
        """``sources_for(user_id)``: the sources a key may publish as (keys on); None: the
        first live publisher of a source owns it."""
        self.sources_for = sources_for
        self.owner_idle_s = owner_idle_s
        self.epoch_skew_ns = int(epoch_skew_s * 1e9)
        self.max_payload_bytes = max_payload_bytes
        self.known_names_max = known_names_max
        self.stats = GateStats()
        # topic bytes -> topic text, for topics already seen valid
        self._topics: dict[bytes, str] = {}
        # source bytes -> source text, for sources already seen valid
        self._sources: dict[bytes, str] = {}
        # keys on: (user_id, source bytes) pairs already allowed
        self._allowed: set[tuple[bytes, bytes]] = set()
        # keys off: source bytes -> its owner
        self._owners: dict[bytes, _Owner] = {}
        # the previous passed event's owner check (see check())
        self._last_owner: bytes | None = None
        self._last_source = b""
        self._last_now = -1.0
        self._last_epoch = -1

    def check(
        self, frames: tuple[bytes, ...], user_id: bytes | None, now: float, wall_ns: int
    ) -> Refusal | None:
        """None if the message may pass, else why not (and the refusal is counted).

        Written as one function on purpose: it runs for every event the bus carries.
        """
        if len(frames) != 3:
            detail = f"{len(frames)} frames" if len(frames) < 4 else "4+ frames"
            return self._refused(Reason.FRAMES, detail, frames, user_id)
        topic_frame, meta, payload = frames
        topic = self._topics.get(topic_frame)
        if topic is None:
            try:
                topic = validate_topic(topic_frame.decode())
            except (UnicodeDecodeError, TopicError) as error:
                return self._refused(Reason.TOPIC, str(error)[:120], frames, user_id)
            self._remember(self._topics, topic_frame, topic, self.known_names_max)
        if len(meta) <= META_HEADER_SIZE or meta[0] != WIRE_VERSION:
            detail = f"{len(meta)} bytes, version {meta[0] if meta else None}"
            return self._refused(Reason.META, detail, frames, user_id)
        source_frame = meta[META_HEADER_SIZE:]
        source = self._sources.get(source_frame)
        if source is None:
            try:
                source = validate_source(source_frame.decode())
            except (UnicodeDecodeError, TopicError) as error:
                return self._refused(Reason.SOURCE, str(error)[:120], frames, user_id)
            self._remember(self._sources, source_frame, source, self.known_names_max)
        if user_id is None:
            return self._refused(Reason.UNIDENTIFIED, "no User-Id", frames, user_id)
        epoch, seq = _unpack_position(meta, _POSITION_OFFSET)
        if epoch > wall_ns + self.epoch_skew_ns:
            detail = f"epoch {epoch} is {(epoch - wall_ns) / 1e9:.0f} s ahead"
            return self._refused(Reason.FUTURE_EPOCH, detail, frames, user_id)
        # A batch of events mostly comes from one publisher and source: the owner of the
        # previous event's source, at the same time and epoch, needs no second look.
        if (
            user_id is not self._last_owner
            or source_frame != self._last_source
            or now != self._last_now
            or epoch != self._last_epoch
        ):
            owner_reason = self._check_owner(user_id, source_frame, source, epoch, now)
            if owner_reason is not None:
                return self._refused(owner_reason, "", frames, user_id)
            self._last_owner = user_id
            self._last_source = source_frame
            self._last_now = now
            self._last_epoch = epoch
        if len(payload) > self.max_payload_bytes:
            return self._refused(Reason.TOO_LARGE, f"{len(payload)} bytes", frames, user_id)
        try:
            payload.decode()
        except UnicodeDecodeError as error:
            return self._refused(Reason.PAYLOAD, f"not UTF-8: {error.reason}", frames, user_id)
        try:
            routing = _decode_routing(payload)
        except msgspec.ValidationError as error:
            if payload.lstrip()[:1] != b"{":
                return self._refused(Reason.NOT_OBJECT, str(error)[:120], frames, user_id)
            return self._refused(Reason.MISMATCH, str(error)[:120], frames, user_id)
        except msgspec.DecodeError as error:
            return self._refused(Reason.PAYLOAD, str(error)[:120], frames, user_id)
        if (
            routing.topic != topic
            or routing.source != source
            or routing.epoch != epoch
            or routing.seq != seq
        ):
            detail = "payload topic/source/epoch/seq differ from the frames"
            return self._refused(Reason.MISMATCH, detail, frames, user_id)
        self.stats.passed += 1
        return None

    def count_internal_failure(self) -> None:
        """Count a message whose check raised (the caller logs it) as refused."""
        self._count(Reason.INTERNAL)

    def _count(self, reason: Reason) -> None:
        rejected = self.stats.rejected
        rejected[reason] = rejected.get(reason, 0) + 1

    def _refused(
        self, reason: Reason, detail: str, frames: tuple[bytes, ...], user_id: bytes | None
    ) -> Refusal:
        self._count(reason)
        topic = _text(frames[0]) if frames else ""
        source = _text(frames[1][META_HEADER_SIZE:]) if len(frames) > 1 else ""
        publisher = "" if user_id is None else _text(user_id)
        return Refusal(reason, topic, source, publisher, detail)

    def _check_owner(
        self, user_id: bytes, source_frame: bytes, source: str, epoch: int, now: float
    ) -> Reason | None:
        if self.sources_for is not None:
            pair = (user_id, source_frame)
            if pair in self._allowed:
                return None
            if source not in self.sources_for(user_id.decode(errors="replace")):
                return Reason.NOT_OWNER
            if len(self._allowed) >= self.known_names_max:
                self._allowed.clear()
            self._allowed.add(pair)
            return None
        owners = self._owners
        owner = owners.get(source_frame)
        if owner is not None:
            if owner.user_id == user_id:
                owner.last_seen = now
                if epoch > owner.epoch:
                    owner.epoch = epoch
                return None
            restarted = epoch > owner.epoch and _host(user_id) == _host(owner.user_id)
            if not restarted and now - owner.last_seen < self.owner_idle_s:
                return Reason.NOT_OWNER
            self.stats.ownership_changes += 1
            owner.user_id = user_id
            owner.last_seen = now
            owner.epoch = epoch
            return None
        if len(owners) >= OWNED_SOURCES_MAX and not self._forget_idle_owners(now):
            return Reason.TOO_MANY_SOURCES
        owners[source_frame] = _Owner(user_id, now, epoch)
        self.stats.owned_sources = len(owners)
        return None

    def _forget_idle_owners(self, now: float) -> bool:
        """Forget every source silent for owner_idle_s; whether any room was made."""
        idle = [
            source
            for source, owner in self._owners.items()
            if now - owner.last_seen >= self.owner_idle_s
        ]
        for source in idle:
            del self._owners[source]
        self.stats.owned_sources = len(self._owners)
        return bool(idle)

    @property
    def remembered_names(self) -> int:
        """Topics and sources held as already validated (bounded by known_names_max each)."""
        return len(self._topics) + len(self._sources)

    @staticmethod
    def _remember(known: dict[bytes, str], frame: bytes, text: str, limit: int) -> None:
        if len(known) >= limit:
            known.clear()  # forgetting costs one re-validation per name, never a wrong pass
        known[frame] = text


class RefusalLog:
    """Decides which refusals are logged: at most ``per_second`` lines, the rest summed up.

    Pure: the caller passes the monotonic clock and writes the lines. ``admit`` says whether
    to log this refusal, and how many were suppressed since the last logged one.
    """

    def __init__(self, per_second: float = 10.0) -> None:
        self.interval = 1.0 / per_second
        self._next = 0.0
        self._suppressed = 0

    def admit(self, now: float) -> tuple[bool, int]:
        if now < self._next:
            self._suppressed += 1
            return False, 0
        self._next = now + self.interval
        suppressed, self._suppressed = self._suppressed, 0
        return True, suppressed
