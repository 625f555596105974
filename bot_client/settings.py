"""Publisher settings: the guide's ``SYSTEM__*`` variables plus tradebus's own, parsed strictly.

Every variable is documented in docs/publisher.md (one table). A bad value raises
SettingsError at start-up with one line naming the variable, the value and the expected
form; nothing is silently replaced by a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from bot_client.errors import SettingsError
from bus.errors import KeyFileError, TopicError
from bus.keys import validate_key_name
from bus.settings import bad_value
from bus.topics import SOURCE_MAX_LEN, validate_source
from monitoring.logging import redact

BUS_SCHEMES: Final = ("tcp", "ipc")
WS_SCHEMES: Final = ("ws", "wss")
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
# Backoff never waits longer than this, however large RETRY_DELAY * 2**MAX_RETRIES gets.
MAX_BACKOFF_SECONDS: Final = 300.0


DOTENV_FILE: Final = ".env"


def environment() -> Mapping[str, str]:
    """The process environment over the working directory's ``.env``, as the guide's bots
    read their settings: a variable really set wins over the file. os.environ is left as
    it is (a library does not change its host's environment)."""
    path = os.path.join(os.getcwd(), DOTENV_FILE)
    if not os.path.isfile(path):
        return os.environ
    from dotenv import dotenv_values

    from_file = {k: v for k, v in dotenv_values(path).items() if v is not None}
    return {**from_file, **os.environ}


def default_source_id() -> str:
    """``bot-<hostname>``, reduced to the source grammar; stable across restarts of a bot."""
    host = re.sub(r"[^A-Za-z0-9_.:\-]", "-", socket.gethostname()) or "host"
    return f"bot-{host}"[:SOURCE_MAX_LEN]


@dataclass(frozen=True)
class PublisherSettings:
    """Everything a publisher needs; ``from_env`` fills it from ``SYSTEM__*`` variables.

    Built directly (``PublisherSettings(url=...)``) it is enabled; read from the
    environment it follows the guide: disabled unless SYSTEM__ENABLE_WEBSOCKET_PUBLISHING.
    """

    enabled: bool = True
    dashboard_url: str = "ws://localhost:8000/ws"
    bus_url: str | None = None
    publish_interval: float = 1.0
    max_retries: int = 3
    retry_delay: float = 5.0
    timeout: float = 10.0
    queue_size: int = 100
    source_id: str = field(default_factory=default_source_id)
    significance_filter: float = 0.0
    heartbeat_interval: float = 10.0
    token: str | None = field(default=None, repr=False)
    keys: str | None = None  # CURVE key directory for the bus (see bus.keys)
    key_name: str | None = None  # which pair in it; None: the only one
    # ZeroMQ only: recently sent events kept to send again after losing the proxy
    # (bot_client/resend.py); 0 events turns it off
    resend_events: int = 100_000
    resend_bytes: int = 32 * 1024 * 1024
    resend_seconds: float = 10.0
    resend_settle: float = 1.0

    def __post_init__(self) -> None:
        for spec in SPECS:
            value = getattr(self, spec.field)
            if value is None and spec.optional:
                continue
            spec.check(value)
        if self.keys and self.transport == "ws":
            raise SettingsError(
                f"SYSTEM__TRADEBUS_KEYS is set but events go to {self.url}: CURVE keys are for "
                "the bus (tcp://, ipc://); a bridge takes SYSTEM__TRADEBUS_TOKEN"
            )

    @property
    def url(self) -> str:
        """Where events go: the bus URL when set, else the dashboard URL."""
        return self.bus_url or self.dashboard_url

    @property
    def loggable_url(self) -> str:
        """``url`` for log lines: a token someone put into it is replaced (the bot's own
        logging may not be tradebus's, which redacts on the way out)."""
        return redact(self.url)

    @property
    def transport(self) -> str:
        """``"zmq"`` (tcp://, ipc:// straight onto the bus) or ``"ws"`` (bridge ingest)."""
        return "ws" if urlsplit(self.url).scheme in WS_SCHEMES else "zmq"

    def backoff_delays(self) -> list[float]:
        """The quick reconnect delays; the last one repeats forever."""
        return [
            min(self.retry_delay * 2**attempt, max(MAX_BACKOFF_SECONDS, self.retry_delay))
            for attempt in range(self.max_retries + 1)
        ]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> PublisherSettings:
        """Read every ``SYSTEM__*`` variable of ``env`` (default: the environment over the
        working directory's ``.env``); kwargs win."""
        source = environment() if env is None else env
        values: dict[str, Any] = {"enabled": False}
        for spec in SPECS:
            raw = source.get(spec.variable)
            if raw is not None:
                values[spec.field] = spec.parse(raw)
        return cls.with_overrides(values, overrides)

    @classmethod
    def from_object(cls, settings: object, **overrides: Any) -> PublisherSettings:
        """Read a bot's settings object, as the guide's bots passed it.

        Their configuration nests ``SYSTEM__X`` under ``settings.system.x``; attributes
        that are missing fall back to the environment, then to the defaults.
        """
        holder = getattr(settings, "system", settings)
        env = environment()
        values: dict[str, Any] = {"enabled": False}
        for spec in SPECS:
            raw = getattr(holder, spec.variable.removeprefix("SYSTEM__").lower(), None)
            if raw is None:
                raw = env.get(spec.variable)
            if raw is not None:
                values[spec.field] = spec.parse(str(raw))
        return cls.with_overrides(values, overrides)

    @classmethod
    def with_overrides(
        cls, values: Mapping[str, Any], overrides: Mapping[str, Any]
    ) -> PublisherSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SettingsError(
                f"unknown publisher setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**{**values, **overrides})

    def replace(self, **overrides: Any) -> PublisherSettings:
        return PublisherSettings.with_overrides(dataclasses.asdict(self), overrides)


@dataclass(frozen=True)
class _Spec:
    field: str
    variable: str
    expected: str
    convert: Callable[[str], Any]
    valid: Callable[[Any], bool]
    optional: bool = False

    def parse(self, raw: str) -> Any:
        try:
            value = self.convert(raw.strip())
        except (ValueError, TypeError):
            raise self.error(raw) from None
        self.check(value, raw)
        return value

    def check(self, value: Any, raw: object = None) -> None:
        try:
            ok = self.valid(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise self.error(value if raw is None else raw)

    def error(self, value: object, name: str | None = None) -> SettingsError:
        return SettingsError(
            bad_value(name or self.variable, value, self.expected, secret=self.field == "token")
        )


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(text)


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _is_number(value: Any, low: float, high: float = math.inf, *, low_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return (value > low if low_open else value >= low) and value <= high


def _is_whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _url_ok(value: Any, schemes: tuple[str, ...]) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in schemes:
        return False
    if parts.scheme == "ipc":
        return len(value) > len("ipc://")
    if parts.scheme == "tcp":
        return bool(parts.hostname) and port is not None
    return bool(parts.hostname)


def _key_name_ok(value: Any) -> bool:
    try:
        validate_key_name(value)
    except (KeyFileError, TypeError):
        return False
    return True


def _source_ok(value: Any) -> bool:
    try:
        validate_source(value)
    except TopicError:
        return False
    return True


def check_url(name: str, url: str) -> str:
    """``url`` if a publisher can send there, else SettingsError naming ``name`` (a flag)."""
    spec = SPEC_BY_FIELD["dashboard_url"]
    if not _url_ok(url, WS_SCHEMES + BUS_SCHEMES):
        raise spec.error(url, name)
    return url


SPECS: Final = (
    _Spec(
        "enabled",
        "SYSTEM__ENABLE_WEBSOCKET_PUBLISHING",
        "true or false",
        _bool,
        lambda v: isinstance(v, bool),
    ),
    _Spec(
        "dashboard_url",
        "SYSTEM__WEBSOCKET_DASHBOARD_URL",
        "a ws://, wss://, tcp://host:port or ipc://path URL",
        str,
        lambda v: _url_ok(v, WS_SCHEMES + BUS_SCHEMES),
    ),
    _Spec(
        "bus_url",
        "SYSTEM__TRADEBUS_BUS_URL",
        "a tcp://host:port or ipc://path URL",
        str,
        lambda v: _url_ok(v, BUS_SCHEMES),
        optional=True,
    ),
    _Spec(
        "publish_interval",
        "SYSTEM__WEBSOCKET_PUBLISH_INTERVAL",
        "seconds >= 0 (0 = every market data event)",
        _number,
        lambda v: _is_number(v, 0),
    ),
    _Spec(
        "max_retries",
        "SYSTEM__WEBSOCKET_MAX_RETRIES",
        "a whole number >= 0",
        int,
        lambda v: _is_whole(v, 0),
    ),
    _Spec(
        "retry_delay",
        "SYSTEM__WEBSOCKET_RETRY_DELAY",
        "seconds > 0",
        _number,
        lambda v: _is_number(v, 0, low_open=True),
    ),
    _Spec(
        "timeout",
        "SYSTEM__WEBSOCKET_TIMEOUT",
        "seconds > 0",
        _number,
        lambda v: _is_number(v, 0, low_open=True),
    ),
    _Spec(
        "queue_size",
        "SYSTEM__WEBSOCKET_QUEUE_SIZE",
        "a whole number >= 1",
        int,
        lambda v: _is_whole(v, 1),
    ),
    _Spec(
        "source_id",
        "SYSTEM__TRADEBUS_SOURCE_ID",
        f"1..{SOURCE_MAX_LEN} characters: a letter or digit, then letters, digits, _ . : -",
        str,
        _source_ok,
    ),
    _Spec(
        "significance_filter",
        "SYSTEM__WEBSOCKET_SIGNIFICANCE_FILTER",
        "a fraction 0 <= x < 1 (0.001 = 0.1%; 0 = off)",
        _number,
        lambda v: _is_number(v, 0) and v < 1,
    ),
    _Spec(
        "heartbeat_interval",
        "SYSTEM__WEBSOCKET_HEARTBEAT_INTERVAL",
        "seconds >= 0 (0 = no heartbeat)",
        _number,
        lambda v: _is_number(v, 0),
    ),
    _Spec(
        "token",
        "SYSTEM__TRADEBUS_TOKEN",
        "a non-empty bridge token",
        str,
        lambda v: isinstance(v, str) and bool(v),
        optional=True,
    ),
    _Spec(
        "keys",
        "SYSTEM__TRADEBUS_KEYS",
        "a directory holding this bot's key pair and the proxy's proxy.key",
        str,
        lambda v: isinstance(v, str) and bool(v),
        optional=True,
    ),
    _Spec(
        "key_name",
        "SYSTEM__TRADEBUS_KEY_NAME",
        "a key name: letters, digits, _ . - (the NAME of NAME.key_secret)",
        str,
        _key_name_ok,
        optional=True,
    ),
    _Spec(
        "resend_events",
        "SYSTEM__TRADEBUS_RESEND_EVENTS",
        "a whole number >= 0 (0 = no resending)",
        int,
        lambda v: _is_whole(v, 0),
    ),
    _Spec(
        "resend_bytes",
        "SYSTEM__TRADEBUS_RESEND_BYTES",
        "a whole number of bytes >= 1",
        int,
        lambda v: _is_whole(v, 1),
    ),
    _Spec(
        "resend_seconds",
        "SYSTEM__TRADEBUS_RESEND_SECONDS",
        "seconds > 0",
        _number,
        lambda v: _is_number(v, 0, low_open=True),
    ),
    _Spec(
        "resend_settle",
        "SYSTEM__TRADEBUS_RESEND_SETTLE",
        "seconds >= 0",
        _number,
        lambda v: _is_number(v, 0),
    ),
)
SPEC_BY_FIELD: Final = {spec.field: spec for spec in SPECS}
