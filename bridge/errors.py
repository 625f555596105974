"""The root of every error raised by the bridge package (below common.errors.TradebusError).

BridgeError
├── ConfigError    a bridge setting (flag or environment variable) is invalid
└── AuthError      a token is missing, invalid, expired or not allowed to do something
"""

from __future__ import annotations

from common.errors import TradebusError


class BridgeError(TradebusError):
    """Root of every error raised by the bridge package."""


class ConfigError(BridgeError, ValueError):
    """A bridge setting is invalid; the message names the setting and the rule."""


class AuthError(BridgeError):
    """Authentication failed; ``code`` is the snake_case code sent to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
