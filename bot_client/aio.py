"""``AsyncPublisher``: the publisher for asyncio bots.

``publish`` and the typed helpers are plain methods that return at once (they never wait
for the network), so they are called without ``await`` from coroutines; start, flush and
close are coroutines. Delivery runs on the publisher's own I/O thread, so a busy event
loop never delays it and it never delays the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import zmq

from bot_client.publisher import EventHelpers, Publisher
from bot_client.settings import PublisherSettings


class AsyncPublisher(EventHelpers):
    """``async with AsyncPublisher(url="ipc:///run/tradebus/in.sock") as publisher: ...``"""

    def __init__(
        self,
        settings: PublisherSettings | None = None,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        **overrides: Any,
    ) -> None:
        self.publisher = Publisher(settings, context=context, autostart=False, **overrides)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        **overrides: Any,
    ) -> AsyncPublisher:
        """Settings from ``SYSTEM__*`` variables (disabled unless ENABLE_WEBSOCKET_PUBLISHING)."""
        return cls(PublisherSettings.from_env(env, **overrides), context=context)

    @property
    def settings(self) -> PublisherSettings:
        return self.publisher.settings

    @property
    def source(self) -> str:
        return self.publisher.source

    @property
    def epoch(self) -> int:
        return self.publisher.epoch

    @property
    def connected(self) -> bool:
        return self.publisher.connected

    def publish(self, type_name: str, data: Any, key: str | None = None) -> None:
        """See Publisher.publish: returns at once, raises only InvalidEventError."""
        self.publisher.publish(type_name, data, key)

    def status(self) -> dict[str, Any]:
        return self.publisher.status()

    async def start(self) -> None:
        self.publisher.start()

    async def flush(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109 - a delivery bound
        """Wait until nothing is held or in flight; False after ``timeout`` seconds."""
        return await asyncio.to_thread(self.publisher.flush, timeout)

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - as above
        """Deliver what is held (up to ``timeout``), then stop; see Publisher.close."""
        await asyncio.to_thread(self.publisher.close, timeout)

    async def __aenter__(self) -> AsyncPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
