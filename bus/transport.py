"""Sending and receiving three-frame bus messages at the cost of libzmq, not of pyzmq's calls.

pyzmq costs about 0.5 us of interpreter work per frame on this project's machines, and
``send_multipart``/``recv_multipart`` several microseconds per frame; a bus message has
three frames and every hop handles millions of them. ``bus._wire`` (bus/_wire.pyx, Cython)
sends or receives a whole message in one call: docs/performance.md has what it buys, with
the pure pyzmq path measured beside it in the same run.

``bus._wire`` calls libzmq through the declarations pyzmq documents for Cython and is
linked to the libzmq pyzmq loaded (setup.py). Where it was not built (no compiler, no
zmq.h), or the libzmq it calls is not the version pyzmq reports, or
``TRADEBUS_NO_ACCELERATOR`` is set, the same functions run on pyzmq's calls:
``ACCELERATED`` tells which, ``ACCELERATOR_PROBLEM`` why not, and the benchmarks print it.

``sender(socket)`` and ``receiver(socket)`` return callables bound to one socket for hot
loops. They hold the socket itself: on a closed socket they raise ``zmq.ZMQError``
(ENOTSOCK), as pyzmq does.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Final

import zmq
import zmq.backend

SNDMORE: Final = int(zmq.SNDMORE)
NOBLOCK: Final = int(zmq.NOBLOCK)
RCVMORE: Final = int(zmq.RCVMORE)
# receive_message returns at most this many frames (a longer message is consumed whole)
MAX_FRAMES: Final = 4
_SNDMORE_NOBLOCK: Final = SNDMORE | NOBLOCK
# set to any value: pyzmq's calls only, not bus._wire (to compare, or to rule it out)
ACCELERATOR_OFF_VARIABLE: Final = "TRADEBUS_NO_ACCELERATOR"

_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get

AnySocket = zmq.Socket[bytes] | zmq.backend.Socket
Sender = Callable[[bytes, bytes, bytes], bool]
Receiver = Callable[[], tuple[bytes, ...]]


def _accelerator_problem() -> str | None:
    """Why bus._wire is not used, or None when it is (and bound below)."""
    if os.environ.get(ACCELERATOR_OFF_VARIABLE):
        return f"{ACCELERATOR_OFF_VARIABLE} is set"
    try:
        from bus import _wire
    except ImportError as error:
        return f"bus._wire is not built or not loadable: {error}"
    if _wire.libzmq_version() != zmq.zmq_version_info():
        # linked to another libzmq than pyzmq's: never act on pyzmq's sockets through it
        return f"bus._wire calls libzmq {_wire.libzmq_version()}, pyzmq {zmq.zmq_version_info()}"
    global _send3, _recv_message, _recv_identified
    _send3 = _wire.send3
    _recv_message = _wire.recv_message
    _recv_identified = _wire.recv_identified
    return None


def _python_send3(socket: AnySocket, topic: bytes, meta: bytes, payload: bytes) -> bool:
    try:
        _send(socket, topic, _SNDMORE_NOBLOCK)
    except zmq.Again:
        return False
    # libzmq checks a full pipe at a message's first frame only
    _send(socket, meta, _SNDMORE_NOBLOCK)
    _send(socket, payload, NOBLOCK)
    return True


def _python_recv_identified(socket: zmq.Socket[bytes]) -> tuple[bytes | None, tuple[bytes, ...]]:
    first = socket.recv(NOBLOCK, copy=False)
    try:
        value = first.get("User-Id")
    except zmq.ZMQError:
        value = None  # the peer was admitted without ZAP
    user_id = value.encode() if isinstance(value, str) else None
    return user_id, _rest_of_message(socket, first.bytes)


def _python_recv_message(socket: AnySocket) -> tuple[bytes, ...]:
    return _rest_of_message(socket, _recv(socket, NOBLOCK))


def _rest_of_message(socket: AnySocket, first: bytes) -> tuple[bytes, ...]:
    """``first`` and the frames after it: the whole message read, at most MAX_FRAMES kept."""
    frames = [first]
    while _get(socket, RCVMORE):
        frame = _recv(socket, NOBLOCK)
        if len(frames) < MAX_FRAMES:
            frames.append(frame)
    return tuple(frames)


# bus._wire's functions once bound (their first argument is the pyzmq socket)
_send3: Callable[[AnySocket, bytes, bytes, bytes], bool] | None = None
_recv_message: Callable[[AnySocket], tuple[bytes, ...]] | None = None
_recv_identified: Callable[[AnySocket], tuple[bytes | None, tuple[bytes, ...]]] | None = None
ACCELERATOR_PROBLEM: Final = _accelerator_problem()
ACCELERATED: Final = ACCELERATOR_PROBLEM is None


def sender(socket: AnySocket) -> Sender:
    """``send(topic, meta, payload) -> bool`` for ``socket``, never blocking.

    False means the pipe is full (an XPUB with ZMQ_XPUB_NODROP) and nothing was sent; a
    PUB socket never refuses: at its HWM libzmq drops the message (see docs/protocol.md).
    """
    if _send3 is not None:
        return functools.partial(_send3, socket)
    return functools.partial(_python_send3, socket)


def receiver(socket: AnySocket) -> Receiver:
    """``receive() -> frames`` for ``socket``: one whole message, at most MAX_FRAMES of its
    frames, never blocking; raises ``zmq.Again`` when nothing is queued."""
    if _recv_message is not None:
        return functools.partial(_recv_message, socket)
    return functools.partial(_python_recv_message, socket)


IdentifiedReceiver = Callable[[], tuple[bytes | None, tuple[bytes, ...]]]


def identified_receiver(socket: zmq.Socket[bytes]) -> IdentifiedReceiver:
    """``receive() -> (user_id, frames)`` for ``socket``: like ``receiver``, with the ZAP
    User-Id libzmq attached to the message (None when the peer was admitted without ZAP)."""
    if _recv_identified is not None:
        return functools.partial(_recv_identified, socket)
    return functools.partial(_python_recv_identified, socket)


def send_event(socket: AnySocket, topic: bytes, meta: bytes, payload: bytes) -> None:
    """Send one bus message; waits only where the socket does (a full NODROP XPUB)."""
    if _send3 is not None and _send3(socket, topic, meta, payload):
        return
    _send(socket, topic, SNDMORE)
    _send(socket, meta, SNDMORE)
    _send(socket, payload)


def receive_message(socket: AnySocket) -> tuple[bytes, ...]:
    """One whole message's frames (at most MAX_FRAMES), or ``zmq.Again`` if none is queued."""
    if _recv_message is not None:
        return _recv_message(socket)
    return _python_recv_message(socket)


def recv_event(socket: AnySocket) -> tuple[bytes, bytes, bytes] | None:
    """The next queued bus message without blocking, or None if it had not three frames.

    Raises ``zmq.Again`` when nothing is queued. The frames' contents are not validated:
    decode them with bus.envelope.
    """
    frames = receive_message(socket)
    if len(frames) != 3:
        return None
    return frames
