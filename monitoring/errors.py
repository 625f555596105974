"""The root of every error raised by the monitoring package."""

from __future__ import annotations


class MonitoringError(Exception):
    """Root of every error raised by the monitoring package."""


class ToolError(MonitoringError):
    """An operations tool (up, demo, tap, record, replay) could not do its job."""
