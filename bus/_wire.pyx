# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""bus._wire: a whole three-frame bus message per call, through pyzmq's Cython declarations.

pyzmq costs about 0.5 us of interpreter work per frame on top of libzmq's own, and a bus
message has three frames (docs/performance.md). These functions call libzmq directly,
non-blocking, with the GIL held, on the libzmq socket of a pyzmq ``Socket``: both come from
the declarations pyzmq publishes for Cython (``zmq.backend.cython.libzmq`` and the
``Socket.handle`` of ``zmq.backend.cython._zmq``; see pyzmq's examples/cython). The module
is linked to the very libzmq that pyzmq loaded (setup.py says how and why), so it acts on
the same library instance and sockets as pyzmq. pyzmq sets a closed socket's handle to
NULL: that is ENOTSOCK here, as in pyzmq.
"""

from libc.errno cimport EAGAIN, ENOTSOCK, errno
from libc.string cimport memcmp, strlen
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from zmq.backend.cython cimport libzmq
from zmq.backend.cython._zmq cimport Socket

import zmq

DEF MAX_FRAMES = 4

cdef int DONTWAIT = libzmq.ZMQ_DONTWAIT
cdef int SNDMORE_DONTWAIT = libzmq.ZMQ_SNDMORE | libzmq.ZMQ_DONTWAIT
# the last User-Id seen, reused while consecutive messages carry the same one
cdef bytes last_user_id = b""


cdef int _raise(int error) except -1:
    if error == EAGAIN:
        raise zmq.Again(error)
    raise zmq.ZMQError(error)


cdef inline void *_handle(Socket socket) except NULL:
    if socket.handle == NULL:
        _raise(ENOTSOCK)
    return socket.handle


def libzmq_version():
    """(major, minor, patch) of the libzmq this module calls."""
    cdef int major = 0, minor = 0, patch = 0
    libzmq._zmq_version(&major, &minor, &patch)
    return major, minor, patch


def send3(Socket socket, bytes topic, bytes meta, bytes payload):
    """send3(socket, topic, meta, payload) -> bool

    Send one three-frame message without blocking. False: the pipe is full and nothing
    was sent (libzmq checks at a message's first frame only). Raises zmq.ZMQError."""
    cdef void *handle = _handle(socket)
    if libzmq.zmq_send(handle, PyBytes_AS_STRING(topic), PyBytes_GET_SIZE(topic),
                       SNDMORE_DONTWAIT) < 0:
        if errno == EAGAIN:
            return False
        _raise(errno)
    if libzmq.zmq_send(handle, PyBytes_AS_STRING(meta), PyBytes_GET_SIZE(meta),
                       SNDMORE_DONTWAIT) < 0:
        _raise(errno)
    if libzmq.zmq_send(handle, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                       DONTWAIT) < 0:
        _raise(errno)
    return True


cdef bytes _user_id(libzmq.zmq_msg_t *message):
    """The message's ZAP User-Id, None when it has none."""
    global last_user_id
    cdef const char *value = libzmq.zmq_msg_gets(message, b"User-Id")
    if value == NULL:
        return None
    cdef size_t length = strlen(value)
    if <size_t>PyBytes_GET_SIZE(last_user_id) == length and \
            memcmp(PyBytes_AS_STRING(last_user_id), value, length) == 0:
        return last_user_id
    last_user_id = PyBytes_FromStringAndSize(value, length)
    return last_user_id


# the User-Id of the message _receive(identified=True) read last
cdef object received_user_id = None


cdef tuple _receive(void *handle, bint identified):
    """One whole message's frames (at most MAX_FRAMES kept, the rest read and dropped);
    with ``identified`` the first frame's User-Id into ``received_user_id``."""
    global received_user_id
    cdef libzmq.zmq_msg_t message
    cdef int more = 1
    cdef int count = 0
    cdef int error
    cdef object frame
    cdef list frames = None
    cdef object first = None, second = None, third = None
    cdef object failure = None
    while more:
        libzmq.zmq_msg_init(&message)
        if libzmq.zmq_msg_recv(&message, handle, DONTWAIT) < 0:
            # only possible at a first frame: libzmq queues whole messages
            error = errno
            libzmq.zmq_msg_close(&message)
            _raise(error)
        more = libzmq.zmq_msg_more(&message)
        try:
            if identified and count == 0:
                # metadata is the message's: read it from the first frame
                received_user_id = _user_id(&message)
            if count < MAX_FRAMES and failure is None:
                frame = PyBytes_FromStringAndSize(
                    <char *>libzmq.zmq_msg_data(&message), libzmq.zmq_msg_size(&message)
                )
                if count == 0:
                    first = frame
                elif count == 1:
                    second = frame
                elif count == 2:
                    third = frame
                else:
                    frames = [first, second, third, frame]
        except BaseException as raised:
            failure = raised  # out of memory: consume the rest of the message, then raise
        libzmq.zmq_msg_close(&message)
        count += 1
    if failure is not None:
        raise failure
    if count == 3:
        return (first, second, third)
    if count == 1:
        return (first,)
    if count == 2:
        return (first, second)
    return tuple(frames)


def recv_message(Socket socket):
    """recv_message(socket) -> tuple of frames

    Receive one whole message without blocking: its frames as bytes, at most four (a
    longer message is consumed whole and its first four returned, so that len() != 3
    tells a malformed bus message). Raises zmq.Again when nothing is queued."""
    return _receive(_handle(socket), False)


def recv_identified(Socket socket):
    """recv_identified(socket) -> (user_id, frames)

    recv_message, with the ZAP User-Id libzmq attached to the message as bytes (None when
    the peer was admitted without ZAP). Raises zmq.Again when nothing is queued."""
    frames = _receive(_handle(socket), True)
    return received_user_id, frames
