"""The root of every error raised by the bot_client package."""

from __future__ import annotations


class PublisherError(Exception):
    """Root of every error raised by the bot_client package."""
