"""The root of every error raised by the bridge package."""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error raised by the bridge package."""
