"""The root of every error tradebus raises, below every package so that each may import it.

TradebusError
├── monitoring.errors.MonitoringError
├── bus.errors.BusError
├── bridge.errors.BridgeError
├── bot_client.errors.PublisherError
└── tradebus.errors.ToolError

``except TradebusError`` catches any of them (``tradebus``'s commands turn one into a
one-line message); the package roots stay for callers that handle one package's errors.
This module imports nothing, so no package reaches upwards for it.
"""

from __future__ import annotations


class TradebusError(Exception):
    """Root of every error raised by tradebus's packages."""
