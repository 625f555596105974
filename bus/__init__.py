"""tradebus bus: the event envelope, topics, sequence tracking, the proxy and subscribers."""

from __future__ import annotations

from bus.envelope import Event, Meta, decode_event, encode_event
from bus.errors import BusError, EndpointError, EnvelopeError, SnapshotError, TopicError
from bus.sequence import SeqStatus, SequenceTracker
from bus.topics import Pattern, PatternIndex, validate_topic

__all__ = [
    "BusError",
    "EndpointError",
    "EnvelopeError",
    "Event",
    "Meta",
    "Pattern",
    "PatternIndex",
    "SeqStatus",
    "SequenceTracker",
    "SnapshotError",
    "TopicError",
    "decode_event",
    "encode_event",
    "validate_topic",
]
