"""Bridge settings: one dataclass, filled from defaults, TRADEBUS__BRIDGE_* variables, flags.

``SETTINGS`` is its table (bus.settings): variable TRADEBUS__BRIDGE_<FIELD>, flag --<field>,
the form of each value; ``tradebus bridge`` turns it into its flags.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bridge.admission import ServerName, parse_origin
from bridge.errors import ConfigError
from bus import settings
from bus.endpoints import (
    DEFAULT_BACKEND,
    DEFAULT_BRIDGE_HOST,
    DEFAULT_BRIDGE_PORT,
    DEFAULT_FRONTEND,
    DEFAULT_SNAPSHOT,
)
from bus.errors import KeyFileError, TopicError
from bus.event_types import CONFLATABLE_TYPES
from bus.keys import validate_key_name
from bus.topics import validate_source, validate_type

ENV_PREFIX: Final = "TRADEBUS__BRIDGE_"
STATIC_DIR: Final = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class BridgeConfig:
    host: str = DEFAULT_BRIDGE_HOST
    port: int = DEFAULT_BRIDGE_PORT
    bus: str = DEFAULT_BACKEND  # the proxy's XPUB
    snapshot: str = DEFAULT_SNAPSHOT  # the proxy's snapshot service; "" = none
    publish_to: str = DEFAULT_FRONTEND  # the proxy's XSUB, for WebSocket publishers
    allow_publish: bool = False  # loopback connections may publish without a token
    publish_networks: tuple[str, ...] = ()  # trusted networks (CIDR) that may publish too
    origins: tuple[str, ...] = ()  # extra allowed Origin values; "*" allows any
    server_names: tuple[str, ...] = ()  # Host names served besides the bind address
    tokens: tuple[str, ...] = ()  # static tokens: subscribe to everything
    publish_tokens: tuple[str, ...] = ()  # SOURCE=TOKEN: subscribe, and publish as SOURCE
    jwt_secret: str | None = None  # HS256 secret; claims exp, topics, publish, sources
    jwt_audience: str | None = None  # when set, a JWT's aud must name it
    jwt_issuer: str | None = None  # when set, a JWT's iss must be it
    jwt_max_lifetime: float = 86400.0  # a JWT's exp may be at most this far ahead
    cert: str | None = None  # TLS certificate (PEM) for wss://
    key: str | None = None  # TLS private key (PEM)
    max_queue_bytes: int = 1024 * 1024  # per client: bytes waiting to be sent
    conflate_types: tuple[str, ...] = tuple(sorted(CONFLATABLE_TYPES))
    history_events: int = 1000  # resume window per topic, in events ...
    history_seconds: float = 300.0  # ... and in time
    max_message_bytes: int = 64 * 1024  # inbound message size (close 1009)
    rate_limit: float = 50.0  # inbound messages per second per connection (close 1008)
    rate_burst: float = 100.0
    publish_rate_limit: float = 5000.0  # for connections allowed to publish
    publish_rate_burst: float = 10000.0
    max_subscriptions: int = 100  # patterns per connection
    max_resume_positions: int = 1000  # `since` entries per subscribe request
    max_connections: int = 10000
    max_connections_per_ip: int = 1000
    # sockets that are not (yet) WebSockets: plain HTTP and handshakes in progress
    max_handshakes_per_ip: int = 128
    max_handshakes: int = 1024
    handshake_timeout: float = 5.0  # request line and headers of a new socket
    keepalive_timeout: float = 15.0  # an idle plain-HTTP keep-alive socket is closed
    max_errors: int = 20  # invalid requests tolerated per connection before close 1008
    ping_interval: float = 20.0  # server pings; a silent peer is closed within 2 intervals
    stale_after: float = 15.0  # a source with no event for this long is reported stale
    upstream_linger: float = 300.0  # keep an unneeded bus subscription (resume history)
    max_lingering: int = 1000  # lingering bus subscriptions in all (per client: max_subscriptions)
    max_topics: int = 100_000  # topics whose history and latest event are kept
    max_sources: int = 10_000  # sources known at once (events of more are dropped, counted)
    forget_sources_after: float = 3600.0  # a source stale this long is forgotten
    snapshot_timeout: float = 3.0  # waiting for the proxy's snapshot service
    write_buffer_high: int = 256 * 1024  # transport bytes above which a client is behind
    close_timeout: float = 2.0  # wait for the client's close reply, then drop it
    track_sources: bool = True  # subscribe to system_status for source liveness
    static_dir: str = str(STATIC_DIR)
    keys: str | None = None  # CURVE key directory for a proxy with --keys (bus.keys)
    key_name: str = "bridge"  # the bridge's pair in it: NAME.key_secret

    def __post_init__(self) -> None:
        for name in ABOVE_ZERO:
            if getattr(self, name) <= 0:
                raise ConfigError(f"bridge setting {name} must be above 0")
        if self.upstream_linger < 0:
            raise ConfigError("bridge setting upstream_linger must be 0 or more")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"bridge setting port must be 0..65535, got {self.port}")
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < 32:
            # RFC 7518 3.2: an HS256 key must be at least as long as the hash (32 bytes)
            raise ConfigError("bridge setting jwt_secret must be at least 32 bytes")
        for network in self.publish_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(
                    f"bridge setting publish_networks: {network!r} is not a network "
                    "such as 172.16.0.0/12 or 10.0.0.5/32"
                ) from None
        self.publish_token_sources()  # SOURCE=TOKEN entries, checked at start-up
        for origin in self.origins:
            if origin != "*" and parse_origin(origin) is None:
                raise ConfigError(
                    f"bridge setting origins: {origin!r} is not an origin such as "
                    "https://dash.example.com or http://localhost:5173 (or *)"
                )
        for name in self.server_names:
            if ServerName.parse(name) is None:
                raise ConfigError(
                    f"bridge setting server_names: {name!r} is not a host name such as "
                    "dash.example.com or dash.example.com:8443"
                )
        if bool(self.cert) != bool(self.key):
            raise ConfigError("bridge settings cert and key must be given together")
        try:
            validate_key_name(self.key_name)
        except KeyFileError as error:
            raise ConfigError(f"bridge setting key_name: {error}") from None
        for type_name in self.conflate_types:
            try:
                validate_type(type_name)
            except TopicError as error:
                raise ConfigError(f"bridge setting conflate_types: {error}") from None

    def publish_trusted(self, address: str | None) -> bool:
        """Whether a connection from ``address`` may publish without a publisher token."""
        if not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if self.allow_publish and ip.is_loopback:
            return True
        return any(ip in ipaddress.ip_network(n, strict=False) for n in self.publish_networks)

    def publish_token_sources(self) -> dict[str, tuple[str, ...]]:
        """Each publish token with the sources it may publish as (from SOURCE=TOKEN).

        A bare TOKEN is refused: a publish credential that names no source could publish
        as any bot. Error messages never quote an entry, which holds a secret.
        """
        sources: dict[str, tuple[str, ...]] = {}
        for number, entry in enumerate(self.publish_tokens, 1):
            source, equals, token = entry.partition("=")
            if not equals or not token or token.startswith("="):
                raise ConfigError(
                    f"bridge setting publish_tokens: entry {number} is not SOURCE=TOKEN "
                    "(a publish token names the source it may publish as, e.g. bot-1=TOKEN)"
                )
            try:
                validate_source(source.strip())
            except TopicError:
                raise ConfigError(
                    f"bridge setting publish_tokens: entry {number}: the part before '=' "
                    "is not a source id (letters, digits and _ . : -)"
                ) from None
            sources[token] = (*sources.get(token, ()), source.strip())
        return sources

    @property
    def auth_required(self) -> bool:
        return bool(self.tokens or self.publish_tokens or self.jwt_secret)

    def replace(self, **changes: Any) -> BridgeConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        flags: Mapping[str, str | None] | None = None,
        **overrides: Any,
    ) -> BridgeConfig:
        """Defaults, then ``TRADEBUS__BRIDGE_<FIELD>`` variables, then ``flags`` (command-line
        text by field, parsed here), then ``overrides`` (values); a bad value names the one
        given. An override's variable is not read at all: the caller decided."""
        env = os.environ if environ is None else environ
        return cls(**settings.read(SETTINGS, env, ConfigError, flags=flags, overrides=overrides))


SECRET_FIELDS: Final = frozenset({"tokens", "publish_tokens", "jwt_secret"})
ABOVE_ZERO: Final = (
    "max_queue_bytes",
    "history_events",
    "max_message_bytes",
    "max_subscriptions",
    "max_connections",
    "max_connections_per_ip",
    "max_errors",
    "write_buffer_high",
    "history_seconds",
    "rate_limit",
    "rate_burst",
    "publish_rate_limit",
    "publish_rate_burst",
    "ping_interval",
    "stale_after",
    "snapshot_timeout",
    "close_timeout",
    "jwt_max_lifetime",
    "max_resume_positions",
    "max_lingering",
    "max_topics",
    "max_sources",
    "max_handshakes_per_ip",
    "max_handshakes",
    "handshake_timeout",
    "keepalive_timeout",
    "forget_sources_after",
)


def _items(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _networks(text: str) -> tuple[str, ...]:
    networks = _items(text)
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise settings.HintError(f"{network!r} is not a network") from None
    return networks


def _types(text: str) -> tuple[str, ...]:
    names = _items(text)
    for name in names:
        try:
            validate_type(name)
        except TopicError as error:
            raise settings.HintError(str(error)) from None
    return names


def _origins(text: str) -> tuple[str, ...]:
    origins = _items(text)
    for origin in origins:
        if origin != "*" and parse_origin(origin) is None:
            raise settings.HintError(f"{origin!r} is not an origin")
    return origins


def _server_names(text: str) -> tuple[str, ...]:
    names = _items(text)
    for name in names:
        if ServerName.parse(name) is None:
            raise settings.HintError(f"{name!r} is not a host name")
    return names


def _publish_tokens(text: str) -> tuple[str, ...]:
    entries = _items(text)
    try:
        BridgeConfig(publish_tokens=entries)  # its check words the rule; it never quotes a secret
    except ConfigError as error:
        # the expected form states the rule already: keep only which entry broke it
        rule = str(error).removeprefix("bridge setting publish_tokens: ").split(" (")[0]
        raise settings.HintError(rule) from None
    return entries


def _key_name(text: str) -> str:
    try:
        return validate_key_name(text)
    except KeyFileError:
        raise ValueError(text) from None


def _jwt_secret(text: str) -> str | None:
    if text and len(text.encode()) < 32:
        raise ValueError("too short")
    return text or None


_FORMS: Final[dict[str, settings.Form[Any]]] = {
    "port": settings.whole_number(0, 65535, "a port number"),
    "bus": settings.endpoint(),
    "snapshot": settings.endpoint(optional=True),
    "publish_to": settings.endpoint(),
    "publish_networks": settings.Form(
        "networks (CIDR), comma-separated, such as 172.16.0.0/12,10.0.0.5/32", _networks
    ),
    "conflate_types": settings.Form(
        "event types, comma-separated, such as market_data,position_update", _types
    ),
    "jwt_secret": settings.Form("a secret of at least 32 bytes (RFC 7518)", _jwt_secret),
    "key_name": settings.Form(
        "a key name: a letter or digit, then letters, digits, _ . - (NAME of NAME.key_secret)",
        _key_name,
    ),
    "publish_tokens": settings.Form(
        "SOURCE=TOKEN entries, comma-separated, such as bot-1=TOKEN", _publish_tokens
    ),
    "origins": settings.Form(
        "origins, comma-separated, such as https://dash.example.com,http://localhost:5173 (or *)",
        _origins,
    ),
    "server_names": settings.Form(
        "host names, comma-separated, such as dash.example.com,dash.example.com:8443",
        _server_names,
    ),
    "upstream_linger": settings.number(0, above=False, what="seconds"),
}


def field_form(name: str, annotation: Any) -> settings.Form[Any]:
    """How the text of setting ``name`` (of type ``annotation``) becomes its value."""
    if name in _FORMS:
        return _FORMS[name]
    if annotation is bool:
        return settings.boolean()
    if annotation is int:
        return settings.whole_number(1 if name in ABOVE_ZERO else 0)
    if annotation is float:
        if name in ABOVE_ZERO:
            return settings.number(0)
        return settings.number(0, above=False)
    if annotation == tuple[str, ...]:
        return settings.Form("values, comma-separated", _items, tuple)
    if annotation == str | None:
        return settings.Form("a value", lambda text: text or None)
    return settings.text()


HELP: Final = {
    "host": "address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    "port": "port to listen on (default 8000)",
    "bus": "the proxy's XPUB endpoint to subscribe to",
    "snapshot": "the proxy's snapshot service ('' for none)",
    "publish_to": "the proxy's XSUB endpoint WebSocket publishers' events go to",
    "allow_publish": "let loopback connections publish without a token",
    "publish_networks": "trusted networks (CIDR, comma-separated) that may publish without a token",
    "origins": "extra allowed Origin values (scheme://host[:port]), comma-separated ('*': any)",
    "server_names": "Host names served besides the bind address (name or name:port), "
    "comma-separated; other Hosts get 421",
    "tokens": "static tokens that may subscribe, comma-separated (enables auth)",
    "publish_tokens": "SOURCE=TOKEN pairs: TOKEN subscribes and publishes as SOURCE (enables auth)",
    "jwt_secret": "HS256 secret for JWTs with exp, topics, publish, sources claims (enables auth)",
    "jwt_audience": "when set, a JWT's aud claim must name it",
    "jwt_issuer": "when set, a JWT's iss claim must be it",
    "jwt_max_lifetime": "seconds: a JWT whose exp is further ahead is refused",
    "cert": "TLS certificate (PEM) to serve wss://",
    "key": "TLS private key (PEM) for --cert",
    "max_queue_bytes": "bytes queued per client before it is closed as a slow consumer",
    "conflate_types": "event types whose queued events a newer one replaces, comma-separated",
    "history_events": "events kept per topic for resume",
    "history_seconds": "seconds of events kept per topic for resume",
    "max_message_bytes": "largest client message (bigger: close 1009)",
    "rate_limit": "client messages per second (above: close 1008)",
    "rate_burst": "client messages allowed in a burst",
    "publish_rate_limit": "messages per second for connections allowed to publish",
    "publish_rate_burst": "burst for connections allowed to publish",
    "max_subscriptions": "patterns per connection",
    "max_resume_positions": "positions ('since' entries) per resume request",
    "max_connections": "open connections in total",
    "max_connections_per_ip": "open connections per client address",
    "max_handshakes_per_ip": "open sockets per address that are not WebSockets (above: 429)",
    "max_handshakes": "open sockets in total that are not WebSockets (above: 503)",
    "handshake_timeout": "seconds a new socket has to send its request line and headers (408)",
    "keepalive_timeout": "seconds an idle plain-HTTP keep-alive socket stays open",
    "max_errors": "invalid messages tolerated per connection (then close 1008)",
    "ping_interval": "seconds between server pings; a silent peer is closed within two",
    "stale_after": "seconds without an event before a source is reported stale",
    "upstream_linger": "seconds a bus subscription no client needs is kept (resume history)",
    "max_lingering": "lingering bus subscriptions in all (per client: max_subscriptions)",
    "max_topics": "topics whose history and latest event the bridge keeps",
    "max_sources": "sources known at once; events of further sources are dropped (counted)",
    "forget_sources_after": "seconds after which a stale source is forgotten",
    "snapshot_timeout": "seconds to wait for the proxy's snapshot service",
    "write_buffer_high": "socket buffer bytes above which a client counts as behind",
    "close_timeout": "seconds to wait for a client's close reply",
    "track_sources": "subscribe to system_status to report source liveness",
    "static_dir": "directory served at / and /static/",
    "keys": "CURVE key directory for a proxy started with --keys: the bridge's "
    "NAME.key_secret and the proxy's proxy.key (see `tradebus keys --help`)",
    "key_name": "which key pair in --keys the bridge uses",
}
# field -> TRADEBUS__BRIDGE_<FIELD> and --<field>; tokens also --token
SETTINGS: Final = tuple(
    dataclasses.replace(setting, aliases=("--token",)) if setting.field == "tokens" else setting
    for setting in settings.fields_of(
        BridgeConfig, ENV_PREFIX, field_form, secret=SECRET_FIELDS, help=HELP
    )
)
SETTING: Final = {setting.field: setting for setting in SETTINGS}
