"""Sending and receiving three-frame bus messages at the cost of libzmq, not of pyzmq's sugar.

pyzmq's ``send_multipart``/``recv_multipart`` cost several microseconds per frame in Python:
the sugar layer's keyword handling, and above all one ``getsockopt(RCVMORE)`` per frame,
which builds a ``SocketOption`` enum on every call (about 2 us, measured with pyzmq 27).

The bus always sends exactly three frames and each starts with a byte that tells what it
is: a topic starts with an ASCII letter, a meta frame with its version byte ``\x01``, a
payload with ``{``. So these helpers call the Cython backend directly and read three frames
without asking RCVMORE; when a first byte is not what its position needs, the frames are
misaligned (a publisher sent fewer or more than three) and RCVMORE is asked then, to discard
the rest of the message being read:

* fewer than three frames: the missing ones are taken from the next message, whose topic
  or meta then sits where a meta or payload belongs; that message is discarded too (its
  loss shows as a sequence gap), or nothing is queued (``zmq.Again``);
* more than three: the extra frame is read as the next topic and fails the same checks.

A malformed message never corrupts the messages after it.
"""

from __future__ import annotations

import string
from typing import Final

import zmq
import zmq.backend

from bus.envelope import WIRE_VERSION

SNDMORE: Final = int(zmq.SNDMORE)
NOBLOCK: Final = int(zmq.NOBLOCK)
RCVMORE: Final = int(zmq.RCVMORE)
TOPIC_FIRST_BYTES: Final = frozenset(bytes([c]) for c in string.ascii_letters.encode())
META_FIRST_BYTE: Final = bytes([WIRE_VERSION])
PAYLOAD_FIRST_BYTE: Final = b"{"

_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get

AnySocket = zmq.Socket[bytes] | zmq.backend.Socket


def send_event(socket: AnySocket, topic: bytes, meta: bytes, payload: bytes) -> None:
    """Send one bus message (PUB sockets never block; a full queue drops it, see HWMs)."""
    _send(socket, topic, SNDMORE)
    _send(socket, meta, SNDMORE)
    _send(socket, payload)


def recv_event(socket: AnySocket) -> tuple[bytes, bytes, bytes] | None:
    """The next queued three-frame message without blocking, or None if it was malformed.

    Raises ``zmq.Again`` when nothing is queued. The frames' contents are not validated
    beyond their first byte: decode them with bus.envelope.
    """
    topic: bytes = _recv(socket, NOBLOCK)
    if topic[:1] not in TOPIC_FIRST_BYTES:
        if has_more(socket):
            drain_message(socket)
        return None
    try:
        meta: bytes = _recv(socket, NOBLOCK)
        payload: bytes = _recv(socket, NOBLOCK)
    except zmq.Again:
        return None
    if meta[:1] != META_FIRST_BYTE or payload[:1] != PAYLOAD_FIRST_BYTE:
        if has_more(socket):
            drain_message(socket)
        return None
    return topic, meta, payload


def has_more(socket: AnySocket) -> bool:
    """Whether the last frame received has more frames after it."""
    return bool(_get(socket, RCVMORE))


def drain_message(socket: AnySocket) -> None:
    """Receive and discard the rest of the current message."""
    while True:
        _recv(socket, NOBLOCK)
        if not _get(socket, RCVMORE):
            return
