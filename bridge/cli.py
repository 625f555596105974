"""``tradebus bridge``: the WebSocket edge between the bus and browsers (and WS publishers).

Every flag has a TRADEBUS__BRIDGE_<NAME> environment variable; a flag given on the command
line wins over the variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from dataclasses import fields
from typing import Any

from bridge.config import ENV_PREFIX, BridgeConfig, flag_name
from monitoring.logging import configure_logging, get_logger

HELP = "run the WebSocket bridge: bus -> browsers at ws://HOST:PORT/ws, plus WS publishers"

_HELP_TEXT = {
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


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = BridgeConfig()
    for field in fields(BridgeConfig):
        name = field.name
        annotation = str(field.type)
        default = getattr(defaults, name)
        variable = ENV_PREFIX + name.upper()
        text = _HELP_TEXT.get(name, name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f"{text} [{variable}; default {shown!s}]"
        if name in ("tokens", "publish_tokens", "jwt_secret"):
            help_text = f"{text} [{variable}]"
        # values stay text: BridgeConfig.from_env parses them, naming the flag in its errors
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if annotation == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        flags = [flag_name(name)]
        if name == "tokens":
            flags.append("--token")
        parser.add_argument(*flags, **kwargs)


def config_from_args(args: argparse.Namespace) -> BridgeConfig:
    texts: dict[str, str | None] = {}
    switches: dict[str, Any] = {}
    for field in fields(BridgeConfig):
        value = getattr(args, field.name, None)
        if isinstance(value, bool):
            switches[field.name] = value
        else:
            texts[field.name] = value
    return BridgeConfig.from_env(flags=texts, **switches)


async def _serve_until_signalled(config: BridgeConfig) -> None:
    from bridge.app import run_bridge

    serving = asyncio.create_task(run_bridge(config))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, serving.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serving


def run(args: argparse.Namespace) -> int:
    configure_logging()
    config = config_from_args(args)
    log = get_logger("bridge")
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_until_signalled(config))
    else:
        # uvloop's transports cost about half of asyncio's per write and per wakeup
        uvloop.run(_serve_until_signalled(config))
    log.info("bridge.exited")
    return 0
