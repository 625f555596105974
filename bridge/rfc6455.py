"""RFC 6455 rules that aiohttp's reader does not enforce for a server. Pure.

aiohttp parses client frames (RSV bits, opcodes, control frame limits, UTF-8, sizes); it
does not require the client's masking bit (RFC 6455 5.1: a server MUST close on an
unmasked frame) and it accepts the close codes 1006 and 5000 and above, which no
endpoint may send (7.4). ``MaskScanner`` follows the client's byte stream frame header by
frame header, skipping payloads unread, so it costs a few operations per frame.
"""

from __future__ import annotations

from typing import Final

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003

# 7.4.1/7.4.2: codes an endpoint may put in a close frame (1012-1014 were registered later)
_SENDABLE_BELOW_3000: Final = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


def close_code_allowed(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (1005, 1006, 1015 never may)."""
    return code in _SENDABLE_BELOW_3000 or 3000 <= code <= 4999


class MaskScanner:
    """Follows client frame headers and finds the first frame that breaks a rule.

    Only the header of each frame is read: the mask bit, and the payload length so that
    the next header can be found. Once a violation is found (``reason``) it stays failed.
    """

    __slots__ = ("_header", "_skip", "reason")

    def __init__(self) -> None:
        self._header = bytearray()
        self._skip = 0  # payload bytes of the current frame still to pass over
        self.reason: str | None = None

    def feed(self, data: bytes) -> int | None:
        """Follow ``data``; the offset in it where a bad frame starts, or None if all is
        well (the bytes before that offset are frames to pass on; see ``reason``)."""
        if self.reason is not None:
            return 0
        position, size = 0, len(data)
        header = self._header
        while position < size:
            if self._skip:
                step = min(self._skip, size - position)
                self._skip -= step
                position += step
                continue
            start = position if not header else 0
            if len(header) < 2:
                take = 2 - len(header)
                header += data[position : position + take]
                position += take
                if len(header) < 2:
                    break
                if not header[1] & 0x80:
                    self.reason = "client frames must be masked"
                    return start
            length_flag = header[1] & 0x7F
            needed = 2 + (2 if length_flag == 126 else 8 if length_flag == 127 else 0) + 4
            if len(header) < needed:
                take = needed - len(header)
                header += data[position : position + take]
                position += take
                if len(header) < needed:
                    break
            if length_flag == 126:
                self._skip = int.from_bytes(header[2:4], "big")
            elif length_flag == 127:
                self._skip = int.from_bytes(header[2:10], "big")
            else:
                self._skip = length_flag
            header.clear()
        return None
