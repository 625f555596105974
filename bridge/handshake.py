"""Admission of a WebSocket handshake: the checks before a connection becomes a client.

The adapter side of bridge/admission.py's pure rules: Origin, the connection caps (in all
and per address), the credential, the query's source, epoch and initial topics, and the
right to publish as a source no other live connection publishes as. A refusal is counted
by reason, logged, and raised as its HTTP status.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Final

from aiohttp import web

from bridge.admission import SourceRefused, origin_allowed, publish_rights
from bridge.auth import Authenticator, token_from_request
from bridge.client import Client
from bridge.config import BridgeConfig
from bridge.errors import AuthError
from bus.errors import TopicError
from bus.topics import Pattern, validate_source
from monitoring.logging import get_logger

# how far ahead of this host's clock a publisher's epoch (its start time) may be
EPOCH_SKEW_NS: Final = 60 * 1_000_000_000


class Admission:
    def __init__(self, config: BridgeConfig, auth: Authenticator) -> None:
        self.config = config
        self.auth = auth
        self.log = get_logger("bridge")
        # open connections by address
        self.connections: dict[str, int] = {}
        # sources named by live publishing connections: one connection per source
        self.publishing_sources: set[str] = set()
        self.rejected: dict[str, int] = {}
        self._client_ids = itertools.count(1)

    def reject(self, reason: str, **fields: Any) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.log.warning("websocket.connection_rejected", reason=reason, **fields)

    def admit(self, request: web.Request) -> tuple[Client, list[Pattern] | None]:
        """Handshake checks (raising the HTTP refusal) and the new client, not yet counted."""
        config = self.config
        ip = request.remote or ""
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, request.headers.get("Host"), request.secure, config.origins):
            self.reject("origin", ip=ip, origin=origin[:200] if origin else None)
            raise web.HTTPForbidden(text="origin not allowed\n")
        if sum(self.connections.values()) >= config.max_connections:
            self.reject("max_connections", ip=ip)
            raise web.HTTPServiceUnavailable(text="too many connections\n")
        if self.connections.get(ip, 0) >= config.max_connections_per_ip:
            self.reject("max_connections_per_ip", ip=ip)
            raise web.HTTPTooManyRequests(text="too many connections from this address\n")
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        token = token_from_request(
            request.headers.get("Authorization"), protocols, request.query.get("token")
        )
        try:
            grant = self.auth.authenticate(token, time.time())
        except AuthError as error:
            self.reject("auth", ip=ip, code=error.code)
            raise web.HTTPUnauthorized(text=f"{error.code}: {error}\n") from None
        query = request.query
        source = query.get("source", "")
        try:
            if source:
                validate_source(source)
            epoch = int(query.get("epoch", "0") or 0)
            if epoch < 0:
                raise ValueError("epoch must be >= 0")
            if epoch > time.time_ns() + EPOCH_SKEW_NS:
                # an epoch is its run's start time: one in the future would make every
                # receiver drop the real source's later runs as stale
                raise ValueError("epoch is in the future (it is the publisher's start time in ns)")
            # "?topics=" with no pattern: no event until the client subscribes (a resume
            # must be in force before the first event, or the client's positions move past
            # what the resume would replay); no "topics" at all: everything
            initial = (
                [Pattern(t) for t in query["topics"].split(",") if t.strip()]
                if "topics" in query
                else None
            )
        except (TopicError, ValueError) as error:
            self.reject("bad_query", ip=ip)
            raise web.HTTPBadRequest(text=f"{error}\n") from None
        rights = publish_rights(
            # a browser always sends Origin; its page may be any site's, so a trusted
            # network's token-less publishing is not for it
            browser=origin is not None,
            network_trusted=config.publish_trusted(ip),
            grant_publish=grant.publish,
            grant_sources=grant.sources,
        )
        try:
            source = rights.source_for(source)
        except SourceRefused:
            self.reject("source_forbidden", ip=ip, source=source, subject=grant.subject)
            raise web.HTTPForbidden(
                text=f"source_forbidden: your credentials may not publish as {source!r}\n"
            ) from None
        if source and source in self.publishing_sources:
            self.reject("source_in_use", ip=ip)
            raise web.HTTPConflict(
                text=f"source {source!r} is already publishing on another connection\n"
            )
        client = Client(
            next(self._client_ids),
            grant=grant,
            publisher=query.get("role") == "publisher",
            may_publish=rights.may_publish,
            ip=ip,
            source=source,
            epoch=epoch,
        )
        return client, initial

    def opened(self, client: Client) -> bool:
        """Count a connection being set up; True when it holds its publishing source."""
        self.connections[client.ip] = self.connections.get(client.ip, 0) + 1
        claims_source = bool(client.source) and client.may_publish
        if claims_source:
            self.publishing_sources.add(client.source)
        return claims_source

    def closed(self, client: Client, claims_source: bool) -> None:
        if claims_source:
            self.publishing_sources.discard(client.source)
        left = self.connections.get(client.ip, 1) - 1
        if left > 0:
            self.connections[client.ip] = left
        else:
            self.connections.pop(client.ip, None)
