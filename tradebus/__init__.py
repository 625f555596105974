"""tradebus command-line entry point; the work lives in bus, bridge, bot_client, monitoring."""

from __future__ import annotations

__version__ = "0.1.0"
