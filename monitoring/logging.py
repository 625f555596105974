"""structlog set-up: JSON lines rendered by orjson, level from the environment.

Event names are stable identifiers (``proxy.started``, ``websocket.publish_failed``...);
values are fields, never interpolated into the event name. Secrets are never passed in.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import orjson
import structlog

LEVEL_VARIABLES = ("TRADEBUS_LOG_LEVEL", "LOG_LEVEL")
_configured = False


def _level_from_environment() -> int:
    for variable in LEVEL_VARIABLES:
        value = os.environ.get(variable)
        if value:
            level = logging.getLevelName(value.strip().upper())
            if isinstance(level, int):
                return level
    return logging.INFO


def configure_logging(level: int | str | None = None, *, force: bool = False) -> None:
    """Configure structlog once per process: JSON lines to stderr, filtered by level."""
    global _configured
    if _configured and not force:
        return
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        numeric = resolved if isinstance(resolved, int) else logging.INFO
    else:
        numeric = _level_from_environment() if level is None else level
    structlog.configure(
        cache_logger_on_first_use=True,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
    )
    _configured = True


def get_logger(component: str, **context: Any) -> Any:
    """A bound logger carrying ``component`` (e.g. "proxy", "bridge", "publisher")."""
    return structlog.get_logger().bind(component=component, **context)
