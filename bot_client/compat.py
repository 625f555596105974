"""``WebSocketPublisher``: the guide's publisher surface, so a guide-era bot changes one import.

``WebSocketPublisher()`` (or ``WebSocketPublisher(settings)`` with the bot's settings object,
whose ``settings.system.websocket_*`` attributes are read) takes the guide's ``SYSTEM__*``
configuration. Every coroutine returns as soon as the event is handed over: none waits for
the network or fails because the dashboard is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import zmq

from bot_client.errors import InvalidEventError
from bot_client.publisher import Publisher
from bot_client.settings import PublisherSettings


class WebSocketPublisher:
    """Drop-in for the guide's ``bot/websocket_publisher.py`` class."""

    def __init__(
        self,
        settings: Any = None,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        **overrides: Any,
    ) -> None:
        if settings is None:
            resolved = PublisherSettings.from_env(**overrides)
        elif isinstance(settings, PublisherSettings):
            resolved = settings.replace(**overrides) if overrides else settings
        else:
            resolved = PublisherSettings.from_object(settings, **overrides)
        self.settings = resolved
        self.publisher = Publisher(resolved, context=context, autostart=False)

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @property
    def connected(self) -> bool:
        return self.publisher.connected

    is_connected = connected

    def status(self) -> dict[str, Any]:
        return self.publisher.status()

    async def initialize(self) -> bool:
        """Start delivering (events published earlier are held, then sent in order).

        Returns whether publishing is enabled; a dashboard that is down is not an error.
        """
        self.publisher.start()
        return self.settings.enabled

    async def close(self) -> None:
        """Deliver what is held (up to SYSTEM__WEBSOCKET_TIMEOUT, at most 5 s), then stop."""
        await asyncio.to_thread(self.publisher.close)

    async def ping(self) -> bool:
        """Whether the publisher is connected to the bus or bridge right now."""
        return self.publisher.connected

    async def publish_market_data(self, symbol: str, price: Any, timestamp: Any = None) -> None:
        self.publisher.publish_market_data(symbol, price, timestamp)

    async def publish_trading_loop(
        self, price: Any, action: str, confidence: Any, symbol: str = "BTC-USD"
    ) -> None:
        self.publisher.publish_trading_loop(price, action, confidence, symbol)

    async def publish_ai_decision(self, action: str, reasoning: str, confidence: Any) -> None:
        self.publisher.publish_ai_decision(action, reasoning, confidence)

    async def publish_trading_decision(
        self,
        request_id: str,
        action: str,
        confidence: Any,
        reasoning: str,
        price: Any,
        quantity: Any = None,
        leverage: Any = None,
        indicators: Mapping[str, Any] | None = None,
        risk_analysis: Mapping[str, Any] | None = None,
    ) -> None:
        self.publisher.publish_trading_decision(
            request_id,
            action,
            confidence,
            reasoning,
            price,
            quantity,
            leverage,
            indicators,
            risk_analysis,
        )

    async def publish_system_status(
        self, status: str, health: Any, errors: list[Any] | None = None
    ) -> None:
        self.publisher.publish_system_status(status, health, errors)

    async def publish_llm_request(
        self,
        request_id: str,
        model: str,
        prompt_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        context: Any = None,
    ) -> None:
        self.publisher.publish_llm_request(
            request_id, model, prompt_tokens, max_tokens, temperature, context
        )

    async def publish_llm_response(
        self,
        request_id: str,
        model: str,
        response_time_ms: Any,
        completion_tokens: int | None = None,
        total_tokens: int | None = None,
        cost_estimate_usd: Any = None,
        success: bool = True,
        error: str | None = None,
        raw_response: Any = None,
    ) -> None:
        self.publisher.publish_llm_response(
            request_id,
            model,
            response_time_ms,
            completion_tokens,
            total_tokens,
            cost_estimate_usd,
            success,
            error,
            raw_response,
        )

    async def publish_position_update(
        self,
        symbol: str,
        side: str,
        size: Any,
        entry_price: Any,
        current_price: Any,
        unrealized_pnl: Any,
    ) -> None:
        self.publisher.publish_position_update(
            symbol, side, size, entry_price, current_price, unrealized_pnl
        )

    async def publish_indicator_data(self, symbol: str, indicators: Mapping[str, Any]) -> None:
        self.publisher.publish_indicator_data(symbol, indicators)

    async def publish_trade_execution(
        self,
        order_id: str,
        symbol: str,
        side: str,
        quantity: Any,
        price: Any,
        status: str,
        trade_action: Any = None,
    ) -> None:
        self.publisher.publish_trade_execution(
            order_id, symbol, side, quantity, price, status, trade_action
        )

    async def publish_performance_update(
        self, metrics: Mapping[str, Any] | None = None, **fields: Any
    ) -> None:
        self.publisher.publish_performance_update(metrics, **fields)

    async def publish_error(self, error_message: str, level: str = "ERROR") -> None:
        self.publisher.publish_error(error_message, level)

    async def publish_custom_event(self, data: Mapping[str, Any]) -> None:
        self.publisher.publish_custom_event(data)

    async def _send_message(self, message: Mapping[str, Any]) -> None:
        """The guide's extension point: subclasses sent ``{"type": ..., "data": {...}}``."""
        if not isinstance(message, Mapping) or "type" not in message:
            raise InvalidEventError(
                f"message must be a mapping with 'type' and 'data', got {type(message).__name__}"
            )
        self.publisher.publish(message["type"], message.get("data", {}))
