"""tradebus bus: the event envelope, topics, sequence tracking, the proxy and subscribers."""

from __future__ import annotations

from bus.envelope import Event, Meta, decode_event, encode_event
from bus.errors import (
    AuthError,
    BusError,
    EndpointError,
    EnvelopeError,
    KeyFileError,
    SettingError,
    SnapshotError,
    TopicError,
)
from bus.sequence import SeqStatus, SequenceTracker
from bus.subscriber import BlockingSubscriber, Gap, Subscriber, SubscriberStats
from bus.topics import Pattern, PatternIndex, validate_topic

__all__ = [
    "AuthError",
    "BlockingSubscriber",
    "BusError",
    "EndpointError",
    "EnvelopeError",
    "Event",
    "Gap",
    "KeyFileError",
    "Meta",
    "Pattern",
    "PatternIndex",
    "SeqStatus",
    "SequenceTracker",
    "SettingError",
    "SnapshotError",
    "Subscriber",
    "SubscriberStats",
    "TopicError",
    "decode_event",
    "encode_event",
    "validate_topic",
]
