"""The ZeroMQ link's resend hooks: bot_client/resend.py's state, fed and counted.

The link's I/O thread calls these at a few points (bot_client/zmq_link.py, ZmqLink: marked
``resend``): what was sent is collected from the delivery's sent log (``Delivery.drain``
appends every event it sends), a monitor "disconnected" puts the window in doubt, the
proxy's subscriptions are watched, and before anything else is sent the in-doubt events
go again. Losses it cannot repair are counted where every other drop is (status(),
metrics) and logged as ``bus.publish_unresendable``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from bot_client.core import CONFLATABLE_TYPES, CRITICAL_TYPES, Entry
from bot_client.resend import Resend, ResendWindow, Send, SubscriptionWatch, type_of

if TYPE_CHECKING:
    from bot_client.links import LinkHost

# In-doubt events sent in one go before the link looks at its state and timers again.
RESEND_BATCH: Final = 1024


class ZmqResend:
    """One ZmqLink's resend state; used by the link's I/O thread only."""

    def __init__(self, host: LinkHost) -> None:
        settings = host.settings
        self.host = host
        self._sent_log: list[bytes] = []
        host.delivery.sent_log = self._sent_log
        self.state = Resend(
            ResendWindow(settings.resend_events, settings.resend_bytes, settings.resend_seconds),
            SubscriptionWatch(settings.resend_settle),
        )
        self._resent = 0  # since the last loss

    @classmethod
    def of(cls, host: LinkHost) -> ZmqResend | None:
        """The hooks for a link of ``host``, or None when its resend window is off."""
        return cls(host) if host.settings.resend_events > 0 else None

    def collect(self, now: float) -> None:
        """Take what was sent since the last call (the log is this thread's own)."""
        log = self._sent_log
        if not log:
            return
        frames = log[:]
        del log[:]
        self.state.sent(frames, now)

    def lost(self, now: float) -> None:
        """The monitor said disconnected: everything recently sent is in doubt."""
        self.collect(now)
        unresendable = self.state.lost(now)
        self._resent = 0
        host = self.host
        if unresendable:
            with host.delivery.lock:  # status() reads the counters under it
                dropped = host.counters.dropped
                for type_name, count in unresendable.items():
                    dropped[type_name] = dropped.get(type_name, 0) + count
            host.log.warning(
                "bus.publish_unresendable",
                message="bus publisher lost the bus; events sent shortly before "
                "could not be kept for sending again and are counted as dropped",
                dropped=unresendable,
                window_events=host.settings.resend_events,
                window_bytes=host.settings.resend_bytes,
            )
        in_doubt = self.state.in_doubt
        if in_doubt:
            host.log.info(
                "bus.publish_in_doubt",
                message="bus publisher lost the bus; recently sent events will be "
                "sent again when it is back",
                in_doubt=in_doubt,
            )

    def reconnected(self, now: float) -> None:
        """The link is connected again."""
        self.state.reconnected(now)

    def observe(self, message: bytes) -> None:
        """A subscription message the proxy forwarded."""
        self.state.watch.observe(message)

    def drain(self, send: Send, now: float) -> tuple[int, bool, bool]:
        """Before the link sends anything else: (resent, blocked, hold). ``hold``: send
        nothing else yet (waiting for subscribers, or in-doubt events still to go)."""
        state = self.state
        if not state.holding(now):
            return 0, False, False
        if not state.watch.settled(now):
            return 0, True, True  # re-checked every BLOCKED_WAIT, never a busy loop
        sent, blocked = state.resend(send, now, RESEND_BATCH)
        if sent:
            self._resent += sent
            self.host.counters.resent += sent
        if not state.in_doubt and self._resent:
            self.host.log.info(
                "bus.publish_resent",
                message="bus publisher sent again the events in doubt after losing the bus",
                resent=self._resent,
            )
            self._resent = 0
        return sent, blocked, state.in_doubt > 0

    def in_flight(self) -> int:
        return self.state.in_doubt

    def abandoned(self) -> list[Entry]:
        """In-doubt events never sent again (closing): counted as dropped by close()."""
        return [_entry(frames) for frames in self.state.abandon()]


def _entry(frames: tuple[bytes, bytes, bytes]) -> Entry:
    type_name = type_of(frames[0])
    return Entry(
        type_name,
        frames[0].decode("utf-8", "replace"),
        type_name in CRITICAL_TYPES,
        type_name in CONFLATABLE_TYPES,
        frames,
    )
