# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""bus._wire: a whole three-frame bus message per call, through pyzmq's Cython declarations.

pyzmq costs about 0.5 us of interpreter work per frame on top of libzmq's own, and a bus
message has three frames (docs/performance.md). These functions call libzmq directly,
non-blocking, on the libzmq socket of a pyzmq ``Socket`` (with the GIL held, except
``send_batch``'s sends, which run without it on frames already copied): both come from
the declarations pyzmq publishes for Cython (``zmq.backend.cython.libzmq`` and the
``Socket.handle`` of ``zmq.backend.cython._zmq``; see pyzmq's examples/cython). The module
is linked to the very libzmq that pyzmq loaded (setup.py says how and why), so it acts on
the same library instance and sockets as pyzmq. pyzmq sets a closed socket's handle to
NULL: that is ENOTSOCK here, as in pyzmq.
"""

from libc.errno cimport EAGAIN, ENOTSOCK, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, strlen
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


cdef int _copy_frame(libzmq.zmq_msg_t *message, object frame) except -1:
    """``frame`` (bytes) into a new zmq_msg_t: libzmq's zmq_send copies it the same way."""
    cdef bytes data = <bytes?>frame
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    if libzmq.zmq_msg_init_size(message, <size_t>size) < 0:
        _raise(errno)
    memcpy(libzmq.zmq_msg_data(message), PyBytes_AS_STRING(data), <size_t>size)
    return 0


def send_batch(Socket socket, list messages):
    """send_batch(socket, messages) -> int

    Send ``messages`` in order without blocking, each a tuple whose first three items are
    its frames (bytes), with the GIL released while libzmq sends them: how many went
    before the pipe filled (the rest were not sent, none in part). The frames are copied
    into zmq_msg_t under the GIL first, as zmq_send would copy them, so no Python object is
    touched without it. An error other than a full pipe raises zmq.ZMQError if it happens
    at the first message, else ends the batch (libzmq's errors stay: the next call raises).
    Only the thread that owns the socket may call it."""
    cdef void *handle = _handle(socket)
    cdef Py_ssize_t count = len(messages)
    cdef Py_ssize_t copied = 0, sent = 0, index
    cdef int frame, error = 0
    cdef tuple message
    if count == 0:
        return 0
    cdef libzmq.zmq_msg_t *frames = <libzmq.zmq_msg_t *>malloc(
        <size_t>count * 3 * sizeof(libzmq.zmq_msg_t)
    )
    if frames == NULL:
        raise MemoryError()
    try:
        while copied < count * 3:
            message = <tuple?>messages[copied // 3]
            _copy_frame(&frames[copied], message[copied % 3])
            copied += 1
        with nogil:
            while sent < count:
                for frame in range(3):
                    if libzmq.zmq_msg_send(&frames[sent * 3 + frame], handle,
                                           SNDMORE_DONTWAIT if frame < 2 else DONTWAIT) < 0:
                        # a full pipe refuses a message's first frame only
                        error = errno
                        break
                if error:
                    break
                sent += 1
    finally:
        # a sent zmq_msg_t is libzmq's and left empty; closing it again is harmless
        for index in range(copied):
            libzmq.zmq_msg_close(&frames[index])
        free(frames)
    if error and error != EAGAIN and sent == 0:
        _raise(error)
    return sent


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
