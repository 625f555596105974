"""The root of every error raised by the monitoring package (below common.errors.TradebusError)."""

from __future__ import annotations

from common.errors import TradebusError


class MonitoringError(TradebusError):
    """Root of every error raised by the monitoring package."""
