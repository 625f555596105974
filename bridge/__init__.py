"""tradebus bridge: the aiohttp WebSocket edge between the bus and browsers."""
