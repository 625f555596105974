"""The bot_client package's exception tree (below common.errors.TradebusError).

PublisherError
├── SettingsError        a setting (environment variable or keyword) has a bad value
├── InvalidEventError    a publish call got a bad type name, key or data (also a ValueError)
└── AuthRefusedError     the bus refused this publisher's CURVE key (only from wait_admitted)

Nothing here is raised because the bus or the bridge is down: delivery problems are
counted and reported through ``status()`` and the log, never raised into the trading loop.
"""

from __future__ import annotations

from common.errors import TradebusError


class PublisherError(TradebusError):
    """Root of every error raised by the bot_client package."""


class SettingsError(PublisherError, ValueError):
    """A setting has a bad value; the message is one line naming variable, value and form."""


class InvalidEventError(PublisherError, ValueError):
    """An event cannot be published as given (bad type name or key, data not a JSON object)."""


class AuthRefusedError(PublisherError):
    """The bus refused the publisher's CURVE key; raised only by ``wait_admitted()``."""
