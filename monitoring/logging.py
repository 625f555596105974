"""structlog set-up: JSON lines rendered by orjson, level from the environment.

Event names are stable identifiers (``proxy.started``, ``websocket.publish_failed``...);
values are fields, never interpolated into the event name. Secrets are never passed in.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

from monitoring.errors import MonitoringError

LEVEL_VARIABLES = ("TRADEBUS_LOG_LEVEL", "LOG_LEVEL")
_configured = False

# A secret can reach a log line inside text we do not build ourselves (an aiohttp error
# quoting the URL, a user's --url): it is removed from every value on the way out.
_SECRET_PATTERNS = (
    re.compile(r"(?i)((?:^|[?&;\s])(?:token|access_token|jwt|secret|password)=)[^&\s'\"]+"),
    re.compile(r"(?i)(\bbearer[ .])[A-Za-z0-9._~+/=-]+"),
)
REDACTED = "[REDACTED]"


class LogSettingError(MonitoringError):
    """TRADEBUS_LOG_LEVEL or LOG_LEVEL names no log level."""


def redact(text: str) -> str:
    """``text`` with token values (query parameters, bearer credentials) replaced."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redact_secrets(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redact secrets in every string value (and exception text)."""
    for key, value in event_dict.items():
        if isinstance(value, str) and ("=" in value or "earer" in value):
            event_dict[key] = redact(value)
    return event_dict


LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _parse_level(value: str, source: str) -> int:
    name = value.strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in LEVEL_NAMES:
        raise LogSettingError(
            f"{source}={value!r}: expected one of {', '.join(n.lower() for n in LEVEL_NAMES)}"
        )
    level: int = logging.getLevelName(name)
    return level


def _level_from_environment() -> int:
    for variable in LEVEL_VARIABLES:
        value = os.environ.get(variable)
        if value:
            return _parse_level(value, variable)
    return logging.INFO


def configure_logging(level: int | str | None = None, *, force: bool = False) -> None:
    """Configure structlog once per process: JSON lines to stderr, filtered by level."""
    global _configured
    if _configured and not force:
        return
    if isinstance(level, str):
        numeric = _parse_level(level, "log level")
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
            redact_secrets,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
    )
    _configured = True


def get_logger(component: str, **context: Any) -> Any:
    """A bound logger carrying ``component`` (e.g. "proxy", "bridge", "publisher")."""
    return structlog.get_logger().bind(component=component, **context)
