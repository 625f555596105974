"""The bus package's exception tree (below common.errors.TradebusError).

BusError
├── TopicError        a topic or pattern breaks the grammar (also a ValueError)
├── EnvelopeError     a multipart message is not a valid bus envelope
├── EndpointError     an endpoint cannot be bound or connected
├── SettingError      a setting (flag, variable, argument) has a bad value (also a ValueError)
├── SnapshotError     the snapshot service did not answer usefully
├── KeyFileError      a CURVE key file is missing, unreadable, malformed or too open
└── AuthError         the proxy refused this client's CURVE key at the handshake
"""

from __future__ import annotations

from common.errors import TradebusError


class BusError(TradebusError):
    """Root of every error raised by the bus package."""


class TopicError(BusError, ValueError):
    """A topic, pattern or source id does not follow the grammar in docs/protocol.md."""


class EnvelopeError(BusError, ValueError):
    """A received multipart message is not a well-formed bus envelope."""


class EndpointError(BusError):
    """A ZeroMQ endpoint could not be bound or connected (bad address, port in use)."""


class SettingError(BusError, ValueError):
    """A setting has a bad value; the message is one line naming it as given (bus.settings)."""


class SnapshotError(BusError):
    """The proxy's snapshot service refused a request or did not answer in time."""


class KeyFileError(BusError):
    """A CURVE key file or directory cannot be used; the message names the file and why."""


class AuthError(BusError):
    """The proxy refused the client's key, or the client holds the wrong proxy key."""
