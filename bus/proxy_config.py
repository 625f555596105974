"""The proxy's settings: ``ProxyConfig`` and the TRADEBUS__PROXY_* variables and flags that fill it.

``SETTINGS`` is the table (bus.settings) ``tradebus proxy`` reads; ``tradebus up`` reads
its endpoint rows. Imports only bus's settings, endpoints, keys and gate defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from bus import settings
from bus.endpoints import (
    BACKEND_VARIABLE,
    DEFAULT_BACKEND,
    DEFAULT_FRONTEND,
    DEFAULT_SNAPSHOT,
    FRONTEND_VARIABLE,
    SNAPSHOT_VARIABLE,
)
from bus.errors import SettingError
from bus.gate import DEFAULT_EPOCH_SKEW_S, DEFAULT_OWNER_IDLE_S
from bus.keys import ServerKeys, load_server_keys

ENV_PREFIX: Final = "TRADEBUS__PROXY_"


@dataclass(frozen=True)
class ProxyConfig:
    frontend: str = DEFAULT_FRONTEND
    backend: str = DEFAULT_BACKEND
    snapshot: str = DEFAULT_SNAPSHOT
    # Per-peer queues, in messages. At the frontend a full queue makes libzmq stop reading
    # that publisher (its own send queue then fills); at the backend a full subscriber
    # queue drops that subscriber's messages, which its sequence tracker reports as a gap.
    frontend_hwm: int = 100_000
    backend_hwm: int = 100_000
    # Capture queue to the cache thread; overflowing it drops cache updates (counted as
    # cache gaps), never forwarded messages.
    capture_hwm: int = 200_000
    cache: bool = True
    # niceness of the cache thread (0 = same priority as forwarding)
    cache_nice: int = 10
    cache_max_topics: int = 100_000
    sync_timeout: float = 2.0
    heartbeat_ms: int = 2_000
    keys: ServerKeys | None = None  # CURVE: the proxy's pair and the keys it admits
    # The gate (bus/gate.py). Off only in benchmarks, to measure what it costs: without it
    # forwarding is libzmq's proxy loop and anything a publisher sends reaches everyone.
    gate: bool = True
    owner_idle_s: float = DEFAULT_OWNER_IDLE_S
    epoch_skew_s: float = DEFAULT_EPOCH_SKEW_S
    # Snapshot service bounds: patterns per request, bytes per reply, and replies queued
    # per requester before further replies to it are dropped (counted).
    snapshot_max_patterns: int = 100
    snapshot_max_bytes: int = 64 * 1024 * 1024
    snapshot_hwm: int = 16
    # The history (bus/history.py): per topic the last history_events events, none older
    # than history_seconds, history_max_bytes in all. history_events=0 turns it off.
    history_events: int = 1000
    history_seconds: float = 300.0
    history_max_bytes: int = 256 * 1024 * 1024

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        flags: Mapping[str, str | None] | None = None,
        **overrides: Any,
    ) -> ProxyConfig:
        """Defaults, then TRADEBUS__PROXY_* variables, then ``flags`` (command-line text by
        field), then ``overrides`` (values); a bad value raises SettingError naming the one
        given. The ``keys`` setting names a directory: its keys are loaded here."""
        env = os.environ if environ is None else environ
        values = settings.read(SETTINGS, env, SettingError, flags=flags, overrides=overrides)
        if isinstance(values.get("keys"), str):  # a directory; '' as no keys
            values["keys"] = load_server_keys(values["keys"]) if values["keys"] else None
        return cls(**values)


_DEFAULTS: Final = ProxyConfig()
_COUNT: Final = settings.whole_number(1)
_BIND: Final = settings.endpoint(bind=True)
_SECONDS: Final = settings.number(0, what="seconds")


def _setting(field: str, name: str, form: settings.Form[Any], help: str) -> settings.Setting:
    flag = "--" + name.lower().replace("_", "-")
    default = getattr(_DEFAULTS, field)
    return settings.Setting(field, ENV_PREFIX + name, form, flag, default, help)


FRONTEND: Final = settings.Setting(
    "frontend",
    FRONTEND_VARIABLE,
    _BIND,
    "--frontend",
    DEFAULT_FRONTEND,
    "XSUB endpoint publishers connect to",
)
BACKEND: Final = settings.Setting(
    "backend",
    BACKEND_VARIABLE,
    _BIND,
    "--backend",
    DEFAULT_BACKEND,
    "XPUB endpoint subscribers connect to",
)
SNAPSHOT: Final = settings.Setting(
    "snapshot",
    SNAPSHOT_VARIABLE,
    _BIND,
    "--snapshot",
    DEFAULT_SNAPSHOT,
    "snapshot service endpoint",
)
# field -> TRADEBUS__PROXY_<NAME> and --<name>; ProxyConfig fields missing here are
# for tests and benchmarks only
SETTINGS: Final = (
    FRONTEND,
    BACKEND,
    SNAPSHOT,
    _setting(
        "frontend_hwm",
        "FRONTEND_HWM",
        _COUNT,
        "messages queued per publisher before libzmq stops reading it",
    ),
    _setting(
        "backend_hwm",
        "BACKEND_HWM",
        _COUNT,
        "messages queued per subscriber before its messages are dropped",
    ),
    _setting(
        "capture_hwm",
        "CAPTURE_HWM",
        _COUNT,
        "messages queued for the cache before cache updates are dropped",
    ),
    _setting("cache_max_topics", "CACHE_MAX_TOPICS", _COUNT, "topics kept in the last-value cache"),
    _setting(
        "cache_nice",
        "CACHE_NICE",
        settings.whole_number(0, 19),
        "CPU niceness of the cache thread, 0..19: forwarding goes first",
    ),
    _setting(
        "history_events",
        "HISTORY_EVENTS",
        settings.whole_number(0),
        "events kept per topic for resumes, 0 = no history",
    ),
    _setting(
        "history_seconds", "HISTORY_SECONDS", _SECONDS, "age past which history events are dropped"
    ),
    _setting(
        "history_max_bytes",
        "HISTORY_MAX_BYTES",
        _COUNT,
        "memory of the whole history; oldest events go first",
    ),
    _setting(
        "owner_idle_s",
        "OWNER_IDLE",
        _SECONDS,
        "without keys: seconds a source's publisher may be silent before another"
        " connection may publish as that source",
    ),
    _setting(
        "epoch_skew_s",
        "EPOCH_SKEW",
        _SECONDS,
        "events whose epoch (publisher start time) is further in the future than this are refused",
    ),
    _setting(
        "snapshot_max_bytes",
        "SNAPSHOT_MAX_BYTES",
        _COUNT,
        "largest snapshot reply; a bigger one is refused with an error",
    ),
    _setting(
        "keys",
        "KEYS",
        settings.text("a directory"),
        "CURVE: encrypt every connection with the proxy's key DIR/proxy.key_secret and "
        "admit only the clients whose NAME.key is in DIR (see `tradebus keys --help`; "
        "default: no keys, anyone who reaches the ports is admitted)",
    ),
)
