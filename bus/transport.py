"""Sending and receiving three-frame bus messages at the cost of libzmq, not of pyzmq's calls.

pyzmq costs about 0.5 us of interpreter work per frame on this project's machines, and
``send_multipart``/``recv_multipart`` several microseconds per frame; a bus message has
three frames and every hop handles millions of them. ``bus._wire`` (bus/_wire.c) sends or
receives a whole message in one C call: measured 0.35 us for the three frames of a send
against 1.5 us for three of pyzmq's Cython sends (docs/performance.md).

The C module calls libzmq's functions as resolved through pyzmq's own extension module
(and only if that libzmq reports pyzmq's version), so it acts on the same library instance
and sockets as pyzmq. Where it cannot be built (no C compiler) or bound, the same
functions run on pyzmq's Cython calls: ``ACCELERATED`` tells which, and the benchmarks
print it.

``sender(socket)`` and ``receiver(socket)`` return callables bound to one socket for hot
loops. They hold the socket itself and read its address on every call: on a closed socket
they raise ``zmq.ZMQError`` (ENOTSOCK), as pyzmq does.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any, Final

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

_LIBZMQ_FUNCTIONS: Final = (
    "zmq_send",
    "zmq_msg_init",
    "zmq_msg_recv",
    "zmq_msg_data",
    "zmq_msg_size",
    "zmq_msg_more",
    "zmq_msg_close",
)


def _pyzmq_libzmq() -> ctypes.CDLL | None:
    """libzmq as pyzmq's own extension module sees it.

    Symbols looked up through that module resolve the way the module's own calls do (its
    bundled libzmq, a system one, or libzmq linked into it), so they belong to the library
    instance that owns pyzmq's sockets, whatever else the process has loaded.
    """
    try:
        from zmq.backend.cython import _zmq

        library = ctypes.CDLL(_zmq.__file__)
        version = library.zmq_version
    except (ImportError, OSError, AttributeError):
        return None
    major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    if (major.value, minor.value, patch.value) != zmq.zmq_version_info():
        return None  # not the libzmq pyzmq reports: do not guess
    return library


def _bind_accelerator() -> bool:
    if os.environ.get(ACCELERATOR_OFF_VARIABLE):
        return False
    try:
        from bus import _wire
    except ImportError:
        return False
    library = _pyzmq_libzmq()
    if library is None:
        return False
    try:
        functions = [getattr(library, name) for name in _LIBZMQ_FUNCTIONS]
    except AttributeError:
        return False
    found = [ctypes.cast(function, ctypes.c_void_p).value for function in functions]
    addresses = [address for address in found if address]
    if len(addresses) != len(_LIBZMQ_FUNCTIONS):
        return False
    send, msg_init, msg_recv, msg_data, msg_size, msg_more, msg_close = addresses
    _wire.bind(
        send, msg_init, msg_recv, msg_data, msg_size, msg_more, msg_close, zmq.ZMQError, zmq.Again
    )
    global _send3, _recv_message, _recv_identified, _cache_drain, _send_address
    _send_address = send
    _send3 = _wire.send3
    _recv_message = _wire.recv_message
    _cache_drain = _wire.cache_drain
    gets = getattr(library, "zmq_msg_gets", None)
    msg_gets = ctypes.cast(gets, ctypes.c_void_p).value if gets is not None else None
    if msg_gets:
        _wire.bind_metadata(msg_gets)
        _recv_identified = _wire.recv_identified
    return True


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


# the C functions once bound (their first argument is the pyzmq socket)
_send3: Callable[[AnySocket, bytes, bytes, bytes], bool] | None = None
_recv_message: Callable[[AnySocket], tuple[bytes, ...]] | None = None
_recv_identified: Callable[[AnySocket], tuple[bytes | None, tuple[bytes, ...]]] | None = None
_cache_drain: Callable[[AnySocket, Any, int], tuple[int, bytes | None]] | None = None
_send_address: int | None = None
ACCELERATED: Final = _bind_accelerator()


def libzmq_send_address() -> int | None:
    """The address of the zmq_send the accelerator calls, for other C code; None when off."""
    return _send_address


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


def cache_drainer(socket: AnySocket) -> Callable[[Any, int], tuple[int, bytes | None]] | None:
    """The C version of bus.proxy.drain_capture_python bound to ``socket``, if accelerated."""
    if _cache_drain is not None:
        return functools.partial(_cache_drain, socket)
    return None


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
