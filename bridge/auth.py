"""Token checks: static tokens and HS256 JWTs with expiry, topic patterns, publish rights.

Pure: the clock is an argument (JWT expiry is checked here, not by PyJWT, so tests can move
time). Tokens are never logged or put into error messages.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import jwt

from bridge.errors import AuthError
from bus.errors import TopicError
from bus.topics import WILDCARD, Pattern, validate_source

BEARER_PROTOCOL_PREFIX = "bearer."


@dataclass(frozen=True, slots=True)
class Grant:
    """What a connection may do. ``topics`` None means every topic, ``()`` none;
    ``sources`` are those it may publish as (None: any, for an open bridge)."""

    topics: tuple[Pattern, ...] | None = None
    publish: bool = False
    expires_at: float | None = None  # Unix seconds
    subject: str | None = None
    sources: tuple[str, ...] | None = None

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
    """Checks bearer tokens against static tokens and an HS256 secret.

    ``publish_tokens`` maps each publish token to the sources it may publish as.
    """

    def __init__(
        self,
        tokens: Iterable[str] = (),
        publish_tokens: Mapping[str, Sequence[str]] | None = None,
        jwt_secret: str | None = None,
        *,
        jwt_audience: str | None = None,
        jwt_issuer: str | None = None,
        jwt_max_lifetime: float = 86400.0,
    ) -> None:
        self._tokens = [t.encode() for t in tokens if t]
        self._publish_tokens = [
            (t.encode(), tuple(sources)) for t, sources in (publish_tokens or {}).items() if t
        ]
        self._jwt_secret = jwt_secret or None
        self._jwt_audience = jwt_audience or None
        self._jwt_issuer = jwt_issuer or None
        self._jwt_max_lifetime = jwt_max_lifetime

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
        publisher = [sources for t, sources in self._publish_tokens if hmac.compare_digest(raw, t)]
        if publisher:
            return Grant(publish=True, sources=publisher[0])
        if static:
            return Grant(sources=())
        if self._jwt_secret is None:
            raise AuthError("token_invalid", "the token is not valid")
        return self._check_jwt(token, now)

    def _check_jwt(self, token: str, now: float) -> Grant:
        try:
            claims = jwt.decode(
                token,
                self._jwt_secret,
                algorithms=["HS256"],
                audience=self._jwt_audience,
                issuer=self._jwt_issuer,
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": self._jwt_audience is not None,
                    "verify_iss": self._jwt_issuer is not None,
                },
            )
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError, jwt.MissingRequiredClaimError):
            raise AuthError(
                "token_invalid", "the token's aud or iss claim is not this bridge's"
            ) from None
        except jwt.PyJWTError:
            raise AuthError("token_invalid", "the token is not a valid HS256 JWT") from None
        return grant_from_claims(claims, now, self._jwt_max_lifetime)


def grant_from_claims(
    claims: Mapping[str, object], now: float, max_lifetime: float = 86400.0
) -> Grant:
    """Validate JWT claims: ``exp`` (Unix s, required, at most ``max_lifetime`` ahead),
    ``nbf``, ``topics`` [patterns], ``publish``, ``sources`` [source ids]."""
    expires = claims.get("exp")
    if expires is None:
        raise AuthError("token_invalid", "the token has no exp claim (every token must expire)")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise AuthError("token_invalid", "the token's exp claim is not a number")
    if expires <= now:
        raise AuthError("token_expired", "the token has expired")
    if expires - now > max_lifetime:
        # a leaked token is good until it expires: the bridge bounds how long that can be
        raise AuthError("token_invalid", f"the token expires more than {max_lifetime:g} s from now")
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
    sources_claim = claims.get("sources", [])
    if not isinstance(sources_claim, Sequence) or isinstance(sources_claim, str):
        raise AuthError("token_invalid", "the token's sources claim is not a list")
    try:
        sources = tuple(validate_source(s) for s in sources_claim)
    except (TopicError, TypeError):
        raise AuthError(
            "token_invalid", "the token's sources claim holds a bad source id"
        ) from None
    subject = claims.get("sub")
    return Grant(
        topics=topics,
        publish=publish,
        expires_at=float(expires),
        subject=subject if isinstance(subject, str) else None,
        sources=sources,
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
