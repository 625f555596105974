"""The bridge's TCP edge: limits that apply before aiohttp sees a request, and RFC 6455
checks after the upgrade that aiohttp's reader does not make.

``EdgeProtocol`` sits between each accepted socket and aiohttp's request handler: the
listener is created with ``loop.create_server`` around ``AppRunner.server`` (aiohttp
documents its low-level ``web.Server`` as a protocol factory for exactly that call), so
only documented asyncio and aiohttp interfaces are used. Per socket it:

* counts the socket as a *handshake* until it becomes a WebSocket: at most
  ``max_handshakes_per_ip`` per address and ``max_handshakes`` in all, beyond which the
  socket is answered 429/503 and closed before any parsing;
* closes a socket whose first request line and headers have not arrived within
  ``handshake_timeout`` (408); idle keep-alive sockets are aiohttp's ``keepalive_timeout``;
* after the upgrade, follows the client's frame headers (bridge/rfc6455.py) and fails the
  connection with 1002 on an unmasked frame. The scanner starts when the handler does;
  bytes that came before (a client must wait for the 101, RFC 6455 4.1) refuse the
  upgrade with 400 when it is the socket's first request, as browsers and client
  libraries send it. Only an upgrade after earlier requests on the same socket can have
  such bytes reach aiohttp's reader unchecked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, cast

from bridge.frames import close_frame
from bridge.rfc6455 import CLOSE_PROTOCOL_ERROR, MaskScanner

# bytes of a first request's header block followed (aiohttp's own limits refuse bigger
# ones), and of what follows it before the upgrade (any of it refuses the upgrade)
HEAD_LIMIT: Final = 64 * 1024
EARLY_LIMIT: Final = 16

_REFUSALS: Final = {
    "handshakes_per_ip": b"429 Too Many Requests",
    "handshakes": b"503 Service Unavailable",
    "handshake_timeout": b"408 Request Timeout",
}


def _http_refusal(reason: str) -> bytes:
    body = reason.encode() + b"\n"
    return (
        b"HTTP/1.1 " + _REFUSALS[reason] + b"\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    ) + body


class EdgeGuard:
    """What every socket of one listener shares: the limits and the counts."""

    def __init__(
        self,
        *,
        handshake_timeout: float,
        max_handshakes_per_ip: int,
        max_handshakes: int,
        on_refused: Callable[[str, str], None],
    ) -> None:
        self.handshake_timeout = handshake_timeout
        self.max_handshakes_per_ip = max_handshakes_per_ip
        self.max_handshakes = max_handshakes
        self.on_refused = on_refused  # (reason, address): counted and logged by the bridge
        self.handshakes: dict[str, int] = {}  # open sockets not (yet) WebSockets, by address
        self.handshakes_total = 0
        self.protocol_errors = 0

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], EdgeProtocol]:
        return lambda: EdgeProtocol(self, inner())

    def _admit(self, address: str) -> str | None:
        if self.handshakes.get(address, 0) >= self.max_handshakes_per_ip:
            return "handshakes_per_ip"
        if self.handshakes_total >= self.max_handshakes:
            return "handshakes"
        self.handshakes[address] = self.handshakes.get(address, 0) + 1
        self.handshakes_total += 1
        return None

    def _release(self, address: str) -> None:
        left = self.handshakes.get(address, 1) - 1
        if left > 0:
            self.handshakes[address] = left
        else:
            self.handshakes.pop(address, None)
        self.handshakes_total -= 1


class EdgeProtocol(asyncio.Protocol):
    """One accepted socket, in front of aiohttp's handler for it (see the module doc)."""

    def __init__(self, guard: EdgeGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.address = ""
        self.transport: asyncio.Transport | None = None
        self.failure: tuple[int, str] | None = None  # the close sent by this edge
        self._counted = False
        self._started = False  # aiohttp's handler was given the connection
        self._forwarding = False
        self._deadline: asyncio.TimerHandle | None = None
        self._scanner: MaskScanner | None = None
        # The first request's bytes until its header block ends, then what follows it:
        # a WebSocket client must wait for the 101 before sending frames (RFC 6455 4.1),
        # and frames sent with the request would reach aiohttp's parser unchecked.
        self._following = True
        self._head: bytearray | None = bytearray()
        self._early = bytearray()

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        refused = self.guard._admit(self.address)
        if refused is not None:
            self.guard.on_refused(refused, self.address)
            transport.write(_http_refusal(refused))
            transport.close()
            return
        self._counted = True
        self._deadline = asyncio.get_running_loop().call_later(
            self.guard.handshake_timeout, self._handshake_expired
        )
        self._started = self._forwarding = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._forwarding:
            return
        scanner = self._scanner
        if scanner is None:
            if self._following:
                self._follow_first_request(data)
        else:
            bad = scanner.feed(data)
            if bad is not None:
                if bad:
                    self.inner.data_received(data[:bad])  # the good frames before it
                assert scanner.reason is not None
                self._fail(CLOSE_PROTOCOL_ERROR, scanner.reason)
                return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self._forwarding:
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_counting()
        self._forwarding = False
        self.transport = None
        if self._started:
            self._started = False
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._started:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._started:
            self.inner.resume_writing()

    # -- called by the bridge -----------------------------------------------------------
    def request_started(self) -> None:
        """A complete request line and headers arrived: the handshake deadline is met."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def websocket_started(self) -> str | None:
        """The request is a WebSocket upgrade: from here on its frames are checked.

        Returns why the upgrade must be refused: bytes sent after the first request
        before the handshake's answer (checked for the first request of a socket, which
        is how browsers and client libraries open WebSockets).
        """
        if self._scanner is None:
            self._scanner = MaskScanner()
        if self._following and self._early:
            return "data was sent before the handshake response (RFC 6455 4.1)"
        self._stop_following()
        return None

    def websocket_open(self) -> None:
        """The upgrade succeeded: the socket is counted by the bridge as a connection
        from now on, no longer as a handshake."""
        self._stop_counting()

    def websocket_refused(self) -> None:
        """The upgrade was refused with an HTTP status: the socket goes on as plain HTTP
        (still counted as a handshake, under the keep-alive timeout)."""
        self._scanner = None

    def request_done(self) -> None:
        """A request was answered: a later upgrade on this socket is not its first."""
        self._stop_following()

    def _stop_following(self) -> None:
        self._following = False
        self._head, self._early = None, bytearray()

    def _follow_first_request(self, data: bytes) -> None:
        head = self._head
        if head is None:
            if len(self._early) < EARLY_LIMIT:
                self._early += data[: EARLY_LIMIT - len(self._early)]
            return
        head += data
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            self._early += head[end + 4 : end + 4 + EARLY_LIMIT]
            self._head = None
        elif len(head) > HEAD_LIMIT:
            self._stop_following()  # aiohttp refuses such headers

    # -- internals ----------------------------------------------------------------------
    def _stop_counting(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._counted:
            self._counted = False
            self.guard._release(self.address)

    def _handshake_expired(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.guard.on_refused("handshake_timeout", self.address)
        transport.write(_http_refusal("handshake_timeout"))
        transport.close()

    def _fail(self, code: int, reason: str) -> None:
        """Fail the WebSocket connection (RFC 6455 7.1.7): a close frame, then close.

        Every writer of this connection writes whole frames synchronously, so the close
        frame cannot land inside another frame; nothing the client sends is read again.
        """
        self._forwarding = False
        self.failure = (code, reason)
        self.guard.protocol_errors += 1
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(close_frame(code, reason))
            transport.close()


def edge_of(transport: Any) -> EdgeProtocol | None:
    """The EdgeProtocol serving ``transport`` (None when the app runs without one)."""
    if transport is None:
        return None
    protocol = transport.get_protocol()
    return protocol if isinstance(protocol, EdgeProtocol) else None
