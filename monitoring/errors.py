"""The root of every error raised by the monitoring package."""

from __future__ import annotations


class MonitoringError(Exception):
    """Root of every error raised by the monitoring package."""
