"""WebSocket frames written by the server itself (RFC 6455 section 5.2). Pure.

The bridge writes event frames straight to the transport, so it builds each frame once per
event and shares the bytes between every client that receives it. Server-to-client frames
are never masked, so a frame is a 2-, 4- or 10-byte header followed by the payload.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import orjson

_FIN_TEXT: Final = 0x81
_FIN_CLOSE: Final = 0x88
_LEN16: Final = struct.Struct(">BBH").pack
_LEN64: Final = struct.Struct(">BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame carrying ``payload`` (UTF-8 JSON)."""
    size = len(payload)
    if size < 126:
        return bytes((_FIN_TEXT, size)) + payload
    if size < 65536:
        return _LEN16(_FIN_TEXT, 126, size) + payload
    return _LEN64(_FIN_TEXT, 127, size) + payload


def message_frame(message: dict[str, Any]) -> bytes:
    """A control message of the bridge's protocol (``{"type": ...}``) as a text frame."""
    return text_frame(orjson.dumps(message))


def close_frame(code: int, reason: str) -> bytes:
    """A close frame; the reason is cut to fit the 125-byte control frame limit."""
    body = struct.pack(">H", code) + reason.encode()[:123]
    return bytes((_FIN_CLOSE, len(body))) + body
