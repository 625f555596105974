"""tradebus monitoring: structured logging and metrics."""
