"""tradebus bot_client: the trading bot's publisher.

* ``Publisher``: for threaded/blocking bots; ``AsyncPublisher``: for asyncio bots;
* ``WebSocketPublisher``: the guide's drop-in (``from bot_client import WebSocketPublisher``);
* ``PublisherSettings``: the ``SYSTEM__*`` settings (docs/publisher.md).
"""

from __future__ import annotations

from bot_client.aio import AsyncPublisher
from bot_client.compat import WebSocketPublisher
from bot_client.errors import InvalidEventError, PublisherError, SettingsError
from bot_client.publisher import Publisher
from bot_client.settings import PublisherSettings

__all__ = [
    "AsyncPublisher",
    "InvalidEventError",
    "Publisher",
    "PublisherError",
    "PublisherSettings",
    "SettingsError",
    "WebSocketPublisher",
]
