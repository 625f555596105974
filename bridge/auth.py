"""Token checks: static tokens and HS256 JWTs with expiry, topic patterns and a publish flag.

Pure: the clock is an argument (JWT expiry is checked here, not by PyJWT, so tests can move
time). Tokens are never logged or put into error messages.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import jwt

from bridge.errors import AuthError
from bus.errors import TopicError
from bus.topics import WILDCARD, Pattern

BEARER_PROTOCOL_PREFIX = "bearer."
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True, slots=True)
class Grant:
    """What a connection may do. ``topics`` None means every topic."""

    topics: tuple[Pattern, ...] | None = None
    publish: bool = False
    expires_at: float | None = None  # Unix seconds
    subject: str | None = None

    def allows_pattern(self, pattern: Pattern) -> bool:
        if self.topics is None:
            return True
        return any(covers(allowed, pattern) for allowed in self.topics)

    def allows_topic(self, topic: str) -> bool:
        if self.topics is None:
            return True
        return any(allowed.matches(topic) for allowed in self.topics)


OPEN_GRANT = Grant()


def covers(allowed: Pattern, requested: Pattern) -> bool:
    """Whether every topic ``requested`` can match is also matched by ``allowed``."""
    if len(requested.tokens) < len(allowed.tokens):
        return False
    return all(a in (WILDCARD, r) for a, r in zip(allowed.tokens, requested.tokens, strict=False))


class Authenticator:
    """Checks bearer tokens against static tokens and an HS256 secret."""

    def __init__(
        self,
        tokens: Iterable[str] = (),
        publish_tokens: Iterable[str] = (),
        jwt_secret: str | None = None,
    ) -> None:
        self._tokens = [t.encode() for t in tokens if t]
        self._publish_tokens = [t.encode() for t in publish_tokens if t]
        self._jwt_secret = jwt_secret or None

    @property
    def required(self) -> bool:
        """Whether connections must present a token at all."""
        return bool(self._tokens or self._publish_tokens or self._jwt_secret)

    def authenticate(self, token: str | None, now: float) -> Grant:
        """The grant of ``token`` at Unix time ``now``; raises AuthError when refused."""
        if not self.required:
            return OPEN_GRANT
        if not token:
            raise AuthError("token_required", "this bridge requires a token")
        raw = token.encode()
        # compare against every static token so timing does not reveal which one matched
        static = any([hmac.compare_digest(raw, t) for t in self._tokens])
        publisher = any([hmac.compare_digest(raw, t) for t in self._publish_tokens])
        if publisher:
            return Grant(publish=True)
        if static:
            return Grant()
        if self._jwt_secret is None:
            raise AuthError("token_invalid", "the token is not valid")
        return self._check_jwt(token, now)

    def _check_jwt(self, token: str, now: float) -> Grant:
        try:
            claims = jwt.decode(
                token,
                self._jwt_secret,
                algorithms=["HS256"],
                options={"verify_exp": False, "verify_aud": False, "verify_iat": False},
            )
        except jwt.PyJWTError:
            raise AuthError("token_invalid", "the token is not a valid HS256 JWT") from None
        return grant_from_claims(claims, now)


def grant_from_claims(claims: Mapping[str, object], now: float) -> Grant:
    """Validate JWT claims: ``exp`` (Unix s), ``nbf``, ``topics`` [patterns], ``publish``."""
    expires = claims.get("exp")
    if expires is not None:
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            raise AuthError("token_invalid", "the token's exp claim is not a number")
        if expires <= now:
            raise AuthError("token_expired", "the token has expired")
    not_before = claims.get("nbf")
    if isinstance(not_before, int | float) and not_before > now:
        raise AuthError("token_invalid", "the token is not valid yet (nbf)")
    topics_claim = claims.get("topics")
    topics: tuple[Pattern, ...] | None = None
    if topics_claim is not None:
        if not isinstance(topics_claim, Sequence) or isinstance(topics_claim, str):
            raise AuthError("token_invalid", "the token's topics claim is not a list")
        try:
            topics = tuple(Pattern(p) for p in topics_claim)
        except TopicError as error:
            raise AuthError("token_invalid", f"the token's topics claim: {error}") from None
    publish = claims.get("publish", False)
    if not isinstance(publish, bool):
        raise AuthError("token_invalid", "the token's publish claim is not true/false")
    subject = claims.get("sub")
    return Grant(
        topics=topics,
        publish=publish,
        expires_at=float(expires) if expires is not None else None,
        subject=subject if isinstance(subject, str) else None,
    )


def token_from_request(
    authorization: str | None, protocols: Sequence[str], query_token: str | None
) -> str | None:
    """The bearer token from the Authorization header, a subprotocol or ``?token=``."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for protocol in protocols:
        if protocol.startswith(BEARER_PROTOCOL_PREFIX) and len(protocol) > 7:
            return protocol[len(BEARER_PROTOCOL_PREFIX) :]
    return query_token or None


def origin_allowed(origin: str | None, host: str, allowed: Sequence[str]) -> bool:
    """The handshake's Origin check against cross-site WebSocket hijacking.

    Allowed: no Origin header (not a browser), the page's own host (any port), localhost,
    and the configured origins (exact ``scheme://host[:port]``, or ``*`` for any).
    """
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    try:
        hostname = urlsplit(origin).hostname
    except ValueError:
        return False
    if not hostname:
        return False
    if hostname in LOCAL_HOSTS:
        return True
    own = urlsplit(f"//{host}").hostname if host else None
    return own is not None and hostname == own
