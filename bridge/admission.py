"""Who may reach the bridge: Host names, Origins, and which sources a connection may publish.

Pure: every decision takes the request's values as arguments (headers, the connection's
local address, the bridge's settings) and touches no socket. The adapter (bridge/app.py)
turns a refusal into its HTTP status.

DNS rebinding is why the Host is checked at all: a page on evil.example whose name the
attacker re-points at 127.0.0.1 talks to a loopback bridge as its *own* origin, so its
requests carry ``Host: evil.example:8000`` and ``Origin: http://evil.example:8000``. Only
the Host tells such a request apart, so every route (``/metrics`` and ``/ready`` too) is
refused unless the Host is a name the bridge serves.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

# names that always mean this machine (RFC 6761 6.3: localhost never resolves elsewhere)
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS: Final = frozenset({"", "0.0.0.0", "::"})
DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}

Origin = tuple[str, str, int]  # (scheme, host, port), lower case, default port filled in


def _host_and_port(authority: str) -> tuple[str, int | None] | None:
    """``host[:port]`` split, host lower-cased without brackets or a trailing dot."""
    try:
        parts = urlsplit(f"//{authority}")
        hostname = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not hostname or parts.username is not None or parts.path or parts.query:
        return None
    return hostname.rstrip("."), port


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback_bind(bind_host: str) -> bool:
    """Whether a bridge bound to ``bind_host`` is reachable only from this machine."""
    name = bind_host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ServerName:
    """A ``--server-names`` entry: a host name, and the one port it is served on (or any)."""

    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> ServerName | None:
        split = _host_and_port(text.strip())
        if split is None:
            return None
        return cls(*split)


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """The Host names a bridge serves: its bind address, loopback names for a loopback or
    wildcard bind, any IP literal for a wildcard bind, and the configured server names.

    A wildcard bind (0.0.0.0) serves every address of the machine, including those a
    container's port mapping forwards from (so ``localhost`` on the Docker host): it takes
    any IP literal and the loopback names. An IP literal cannot be re-pointed by DNS, so it
    is no rebinding risk; a DNS name must be listed in ``--server-names``.
    """

    bind_host: str
    server_names: tuple[ServerName, ...] = ()

    @classmethod
    def from_settings(cls, bind_host: str, server_names: Iterable[str]) -> HostPolicy:
        parsed = tuple(ServerName.parse(n) for n in server_names)
        return cls(bind_host.strip("[]").lower(), tuple(n for n in parsed if n is not None))

    def allows(self, host_header: str | None, local_port: int | None) -> bool:
        """Whether a request with ``Host: host_header``, reaching this bridge on
        ``local_port``, is addressed to it. A built-in name with an explicit port must name
        the port the connection arrived on."""
        if not host_header:
            return False
        split = _host_and_port(host_header)
        if split is None:
            return False
        name, port = split
        for entry in self.server_names:
            if entry.host == name and (entry.port is None or entry.port == port):
                return True
        if port is not None and local_port is not None and port != local_port:
            return False
        bind = self.bind_host
        if bind in WILDCARD_BINDS:
            return name in LOOPBACK_NAMES or is_ip_literal(name)
        if name == bind:
            return True
        return is_loopback_bind(bind) and name in LOOPBACK_NAMES


def parse_origin(text: str) -> Origin | None:
    """``scheme://host[:port]`` as a comparable triple; None for anything else (``null``)."""
    try:
        parts = urlsplit(text.strip())
        hostname = parts.hostname
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not hostname or parts.path not in ("", "/"):
        return None
    if parts.username is not None or parts.query or parts.fragment:
        return None
    return scheme, hostname.rstrip("."), DEFAULT_PORTS[scheme] if port is None else port


def own_origin(host_header: str, secure: bool) -> Origin | None:
    """The origin of a page served by this bridge under ``Host: host_header``."""
    return parse_origin(("https://" if secure else "http://") + host_header)


def origin_allowed(
    origin: str | None, host_header: str | None, secure: bool, allowed: Sequence[str]
) -> bool:
    """The handshake's Origin check against cross-site WebSocket hijacking.

    Allowed: no Origin header (not a browser), the bridge's own origin (scheme, host and
    port of the Host it was reached under), or one listed in ``--origins`` (``*``: any).
    """
    if origin is None:
        return True
    if "*" in allowed:
        return True
    given = parse_origin(origin)
    if given is None:
        return False
    if host_header and given == own_origin(host_header, secure):
        return True
    return any(given == parse_origin(entry) for entry in allowed)


class SourceRefused(Exception):  # noqa: N818 - a verdict, caught at once by the adapter
    """A publisher names a source its credentials do not cover."""


@dataclass(frozen=True, slots=True)
class PublishRights:
    """Whether a connection may publish, and the sources it may claim (None: any)."""

    may_publish: bool
    sources: tuple[str, ...] | None

    def source_for(self, requested: str) -> str:
        """``requested``, when this connection may publish as it; raises SourceRefused.

        Without a requested source the hub names it at its first event (the credential's
        first source, else ``ws-<n>``): a connection that only reads never holds a name.
        """
        if not requested or self.sources is None:
            return requested
        if requested not in self.sources:
            raise SourceRefused(requested)
        return requested


def publish_rights(
    *,
    browser: bool,
    network_trusted: bool,
    grant_publish: bool,
    grant_sources: tuple[str, ...] | None,
) -> PublishRights:
    """What a connection may publish.

    A trusted network publishes any source without a token, but only for connections that
    send no Origin: a browser on a trusted machine may be running any site's script.
    Credentials publish only the sources they name; a publish credential naming none
    publishes nothing, and claiming a source with it is refused like any other claim.
    Other connections may name a source, and have each event refused.
    """
    if network_trusted and not browser:
        return PublishRights(True, None)
    if grant_publish:
        if grant_sources is None or grant_sources:
            return PublishRights(True, grant_sources)
        return PublishRights(False, ())
    return PublishRights(False, None)


def exposure_warning(bind_host: str, auth_required: bool) -> str | None:
    """The risk of this set-up, when it has one worth a start-up warning."""
    if auth_required or is_loopback_bind(bind_host):
        return None
    return (
        f"listening on {bind_host or 'every address'} without any token or JWT secret: "
        "anyone who can reach this port can read every event"
    )
