"""What a publisher's link is and what it gets from the publisher.

A link owns one I/O thread and one connection: ``ZmqLink`` (bot_client.zmq_link) straight
onto the bus, ``WebSocketLink`` (bot_client.ws_link) to the bridge. It learns the
connection's state, takes events from the publisher's ``Delivery`` whenever the connection
allows, runs the publisher's timers and reconnects with backoff, forever. Everything it
needs from the publisher is in ``LinkHost``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from bot_client.core import Counters, Entry
from bot_client.delivery import Delivery
from bot_client.settings import PublisherSettings

# Longest sleep of an idle I/O thread: bounds how late a missed wake-up can make anything.
IDLE_WAIT: Final = 0.25
# While blocked on a full pipe (or stopping), re-check at least this often.
BLOCKED_WAIT: Final = 0.01


class Link(Protocol):
    connected: bool

    def start(self) -> None: ...
    def stop(self, timeout: float) -> None: ...
    def wake(self) -> None: ...
    def in_flight(self) -> int: ...
    def abandoned(self) -> list[Entry]: ...


@dataclass(frozen=True, slots=True)
class LinkHost:
    """The publisher as its link sees it."""

    settings: PublisherSettings
    source: str
    epoch: int
    delivery: Delivery
    counters: Counters
    # run the publisher's timers that are due at ``now`` (monotonic seconds), given
    # whether the link is connected; returns the next time anything is due
    run_timers: Callable[[float, bool], float]
    # events not yet delivered, for log lines
    queued: Callable[[], int]
    log: Any
