"""Publisher settings: the guide's ``SYSTEM__*`` variables plus tradebus's own, parsed strictly.

Every variable is documented in docs/publisher.md (one table). ``SPECS`` is their table
(bus.settings, as the proxy's and the bridge's): a bad value raises SettingsError at
start-up with one line naming the variable, the value and the expected form; nothing is
silently replaced by a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from bot_client.errors import SettingsError
from bus.endpoints import DEFAULT_BRIDGE_URL
from bus.errors import KeyFileError, TopicError
from bus.keys import validate_key_name
from bus.settings import Form, Setting, boolean, number, read, text, whole_number
from bus.topics import SOURCE_MAX_LEN, validate_source
from monitoring.logging import redact

BUS_SCHEMES: Final = ("tcp", "ipc")
WS_SCHEMES: Final = ("ws", "wss")
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
    dashboard_url: str = DEFAULT_BRIDGE_URL
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
        for setting in SPECS:
            setting.check(getattr(self, setting.field), SettingsError)
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
        values.update(read(SPECS, source, SettingsError))
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
        for setting in SPECS:
            raw = getattr(holder, setting.variable.removeprefix("SYSTEM__").lower(), None)
            if raw is None:
                raw = env.get(setting.variable)
            if raw is not None:
                values[setting.field] = setting.parse(str(raw), SettingsError)
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


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    """A converter: the text when it is a URL of one of ``schemes`` a publisher can use."""

    def convert(value: str) -> str:
        parts = urlsplit(value)
        port = parts.port  # ValueError when it is not a number
        if parts.scheme not in schemes:
            raise ValueError(value)
        if parts.scheme == "ipc":
            ok = len(value) > len("ipc://")
        elif parts.scheme == "tcp":
            ok = bool(parts.hostname) and port is not None
        else:
            ok = bool(parts.hostname)
        if not ok:
            raise ValueError(value)
        return value

    return convert


def _key_name(value: str) -> str:
    try:
        return validate_key_name(value)
    except KeyFileError:
        raise ValueError(value) from None


def _source(value: str) -> str:
    try:
        return validate_source(value)
    except TopicError:
        raise ValueError(value) from None


def check_url(name: str, url: str) -> str:
    """``url`` if a publisher can send there, else SettingsError naming ``name`` (a flag)."""
    setting = SPEC_BY_FIELD["dashboard_url"]
    setting.check(url, SettingsError, name)
    return url


_ANY_URL: Final = "a ws://, wss://, tcp://host:port or ipc://path URL"
# field -> its SYSTEM__* variable (the guide's names, and tradebus's own) and its form
SPECS: Final = (
    Setting("enabled", "SYSTEM__ENABLE_WEBSOCKET_PUBLISHING", boolean()),
    Setting(
        "dashboard_url",
        "SYSTEM__WEBSOCKET_DASHBOARD_URL",
        Form(_ANY_URL, _url(WS_SCHEMES + BUS_SCHEMES)),
    ),
    Setting(
        "bus_url",
        "SYSTEM__TRADEBUS_BUS_URL",
        Form("a tcp://host:port or ipc://path URL", _url(BUS_SCHEMES)),
        optional=True,
    ),
    Setting(
        "publish_interval",
        "SYSTEM__WEBSOCKET_PUBLISH_INTERVAL",
        number(0, above=False, expected="seconds >= 0 (0 = every market data event)"),
    ),
    Setting("max_retries", "SYSTEM__WEBSOCKET_MAX_RETRIES", whole_number(0)),
    Setting("retry_delay", "SYSTEM__WEBSOCKET_RETRY_DELAY", number(0, expected="seconds > 0")),
    Setting("timeout", "SYSTEM__WEBSOCKET_TIMEOUT", number(0, expected="seconds > 0")),
    Setting(
        "queue_size",
        "SYSTEM__WEBSOCKET_QUEUE_SIZE",
        whole_number(1, expected="a whole number >= 1"),
    ),
    Setting(
        "source_id",
        "SYSTEM__TRADEBUS_SOURCE_ID",
        Form(
            f"1..{SOURCE_MAX_LEN} characters: a letter or digit, then letters, digits, _ . : -",
            _source,
        ),
    ),
    Setting(
        "significance_filter",
        "SYSTEM__WEBSOCKET_SIGNIFICANCE_FILTER",
        number(0, above=False, below=1, expected="a fraction 0 <= x < 1 (0.001 = 0.1%; 0 = off)"),
    ),
    Setting(
        "heartbeat_interval",
        "SYSTEM__WEBSOCKET_HEARTBEAT_INTERVAL",
        number(0, above=False, expected="seconds >= 0 (0 = no heartbeat)"),
    ),
    Setting(
        "token",
        "SYSTEM__TRADEBUS_TOKEN",
        text("a non-empty bridge token", required=True),
        secret=True,
        optional=True,
    ),
    Setting(
        "keys",
        "SYSTEM__TRADEBUS_KEYS",
        text("a directory holding this bot's key pair and the proxy's proxy.key", required=True),
        optional=True,
    ),
    Setting(
        "key_name",
        "SYSTEM__TRADEBUS_KEY_NAME",
        Form("a key name: letters, digits, _ . - (the NAME of NAME.key_secret)", _key_name),
        optional=True,
    ),
    Setting(
        "resend_events",
        "SYSTEM__TRADEBUS_RESEND_EVENTS",
        whole_number(0, expected="a whole number >= 0 (0 = no resending)"),
    ),
    Setting(
        "resend_bytes",
        "SYSTEM__TRADEBUS_RESEND_BYTES",
        whole_number(1, expected="a whole number of bytes >= 1"),
    ),
    Setting("resend_seconds", "SYSTEM__TRADEBUS_RESEND_SECONDS", number(0, expected="seconds > 0")),
    Setting(
        "resend_settle",
        "SYSTEM__TRADEBUS_RESEND_SETTLE",
        number(0, above=False, expected="seconds >= 0"),
    ),
)
SPEC_BY_FIELD: Final = {setting.field: setting for setting in SPECS}
