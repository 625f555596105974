"""Whether the bridge can use the bus: its subscriber's link, the proxy's answers to
probes, and the publishing link. Pure: the adapter reports events with the time.

The SUB socket's monitor says at once when the link drops, however short the outage (the
probes alone see one within 2-7 s); until it says otherwise the probes alone decide. The
bridge is *ready* while the proxy's snapshot service answers and the link is up; a
WebSocket publisher's event may go onto the bus (*usable*) while ready and while the
publishing link is connected too.
"""

from __future__ import annotations

from typing import Final

PROBE_TIMEOUT: Final = 2.0
PROBE_INTERVAL_READY: Final = 5.0
PROBE_INTERVAL_UNREADY: Final = 1.0


class BusHealth:
    def __init__(self, *, probing: bool, publishing: bool) -> None:
        # without a snapshot service there is nothing to probe: ready from the start
        self.probing = probing
        self.publishing = publishing
        self.ready = not probing
        self.publish_ready = False
        self.sub_up = True
        self.probe_sent = 0.0
        self.probe_answered = 0.0

    @property
    def usable(self) -> bool:
        return self.publishing and self.publish_ready and self.ready

    def link_up(self) -> bool:
        """The SUB socket (re)connected: probe now, not at the next interval. True when
        the link was lost before (not the first connection)."""
        restored = not self.sub_up
        self.sub_up = True
        self.probe_sent = 0.0
        return restored

    def link_down(self) -> bool:
        """The SUB socket lost its link; True when that made the bridge unready."""
        self.sub_up = False
        if self.ready and self.probing:
            self.ready = False
            return True
        return False

    def answered(self, now: float) -> bool:
        """The proxy answered a request; True when that made the bridge ready."""
        self.probe_answered = now
        if not self.ready and self.sub_up:
            self.ready = True
            return True
        return False

    def publisher_linked(self) -> bool:
        """The publishing link saw the proxy subscribe; True the first time."""
        if self.publish_ready:
            return False
        self.publish_ready = True
        return True

    def probe(self, now: float) -> tuple[bool, bool]:
        """(whether an unanswered probe just made the bridge unready, whether to send a
        probe now)."""
        if not self.probing:
            return False, False
        lost = False
        if (
            self.ready
            and self.probe_sent > self.probe_answered
            and now - self.probe_sent > PROBE_TIMEOUT
        ):
            self.ready = False
            lost = True
        interval = PROBE_INTERVAL_READY if self.ready else PROBE_INTERVAL_UNREADY
        send = now - self.probe_sent >= interval and (
            self.probe_answered >= self.probe_sent or now - self.probe_sent > PROBE_TIMEOUT
        )
        if send:
            self.probe_sent = now
        return lost, send
