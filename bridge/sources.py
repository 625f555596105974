"""Source liveness: when each publishing source was last heard, and its status message. Pure.

A source is live while its events keep coming; ``stale_after`` seconds of silence make it
stale, and ``forget_after`` seconds stale forget it. Every change of status is one
``source_status`` frame for the hub to send to the clients allowed to see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from bridge.frames import message_frame


def iso_from_ns(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rest // 1000:06d}Z"


@dataclass
class SourceState:
    last_seen: float  # monotonic
    last_seen_ns: int  # wall clock, for the client message
    live: bool = True
    topics: set[bytes] = field(default_factory=set)  # where it has a sequence position


def status_frame(source: bytes, state: SourceState) -> bytes:
    return message_frame(
        {
            "type": "source_status",
            "source": source.decode(errors="replace"),
            "status": "live" if state.live else "stale",
            "last_seen": iso_from_ns(state.last_seen_ns),
        }
    )


class Sources:
    """Every known source's liveness. The hot path reads ``states`` directly and calls
    ``heard`` only for a source that is new or was stale."""

    def __init__(self, *, stale_after: float, forget_after: float, max_sources: int) -> None:
        self.stale_after = stale_after
        self.forget_after = forget_after
        self.max_sources = max_sources
        self.states: dict[bytes, SourceState] = {}

    def heard(self, source: bytes, now: float, now_ns: int) -> tuple[SourceState, bytes]:
        """A new or stale source sent an event: it is live; its status frame to send."""
        state = self.states.get(source)
        if state is None:
            state = self.states[source] = SourceState(now, now_ns)
        state.last_seen, state.last_seen_ns, state.live = now, now_ns, True
        return state, status_frame(source, state)

    def check(self, now: float) -> tuple[list[bytes], list[bytes]]:
        """Sources gone quiet: (status frames of those now stale, sources to forget)."""
        frames: list[bytes] = []
        forgotten: list[bytes] = []
        for source, state in self.states.items():
            if state.live and now - state.last_seen > self.stale_after:
                state.live = False
                frames.append(status_frame(source, state))
            elif not state.live and now - state.last_seen > self.forget_after:
                forgotten.append(source)
        return frames, forgotten

    def forget(self, source: bytes) -> SourceState:
        return self.states.pop(source)

    def liveness(self) -> dict[str, bool]:
        return {s.decode(errors="replace"): state.live for s, state in self.states.items()}
