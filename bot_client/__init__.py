"""tradebus bot_client: the trading bot's publisher."""
