"""Rate limiting for inbound client messages: a token bucket with an injected clock. Pure."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; each message takes one."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens at time ``now``; False when the bucket holds too few."""
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def reserve(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens even if the bucket runs into debt; returns how long the
        caller should wait before acting (0 when the tokens were there)."""
        self.take(now, 0.0)  # refill
        self._tokens -= cost
        return max(0.0, -self._tokens / self.rate)

    def charge(self, now: float, cost: float) -> float:
        """Take ``cost`` tokens, running into debt if needed; returns how long to wait
        before the next message may be taken (0 when a token is left)."""
        self.take(now, 0.0)  # refill
        self._tokens -= cost
        return max(0.0, (1.0 - self._tokens) / self.rate)
