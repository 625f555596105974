/*
 * bus._wire: one C call per three-frame bus message instead of three pyzmq calls.
 *
 * pyzmq costs about 0.5 us of interpreter work per frame on top of libzmq's own; a bus
 * message has three frames, so a publisher, the proxy's cache and every subscriber spend
 * most of their time in that wrapper (docs/performance.md). These functions call
 * libzmq directly, non-blocking, with the GIL held (each call takes well under a
 * microsecond and never waits).
 *
 * There is no link-time dependency on libzmq: bus/transport.py finds the libzmq that
 * pyzmq itself loaded and passes the addresses of its functions to bind(), so these
 * calls always act on the same library instance, and the same sockets, as pyzmq.
 * The socket argument is pyzmq's ``Socket.underlying`` (the address of libzmq's socket);
 * the caller must not pass the handle of a closed socket.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>

/* zmq_msg_t is 64 opaque bytes, aligned for pointers (zmq.h) */
typedef struct {
    unsigned char bytes[64];
} __attribute__((aligned(sizeof(void *)))) zmq_msg;

typedef int (*send_fn)(void *socket, const void *buffer, size_t length, int flags);
typedef int (*msg_init_fn)(zmq_msg *msg);
typedef int (*msg_recv_fn)(zmq_msg *msg, void *socket, int flags);
typedef void *(*msg_data_fn)(zmq_msg *msg);
typedef size_t (*msg_size_fn)(const zmq_msg *msg);
typedef int (*msg_more_fn)(const zmq_msg *msg);
typedef int (*msg_close_fn)(zmq_msg *msg);

#define ZMQ_DONTWAIT 1
#define ZMQ_SNDMORE 2
#define MAX_FRAMES 4

static send_fn zmq_send_;
static msg_init_fn zmq_msg_init_;
static msg_recv_fn zmq_msg_recv_;
static msg_data_fn zmq_msg_data_;
static msg_size_fn zmq_msg_size_;
static msg_more_fn zmq_msg_more_;
static msg_close_fn zmq_msg_close_;
/* zmq.ZMQError and zmq.Again, raised with errno like pyzmq raises them */
static PyObject *zmq_error;
static PyObject *zmq_again;

static PyObject *raise_errno(int error) {
    PyObject *kind = error == EAGAIN ? zmq_again : zmq_error;
    PyObject *instance = PyObject_CallFunction(kind, "i", error);
    if (instance != NULL) {
        PyErr_SetObject(kind, instance);
        Py_DECREF(instance);
    }
    return NULL;
}

static int bound(void) {
    if (zmq_send_ == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bus._wire.bind() was not called");
        return 0;
    }
    return 1;
}

static void *socket_handle(PyObject *handle) {
    void *socket = PyLong_AsVoidPtr(handle);
    if (socket == NULL && !PyErr_Occurred())
        raise_errno(ENOTSOCK); /* pyzmq's handle of a closed socket is 0 */
    return socket;
}

PyDoc_STRVAR(bind_doc,
    "bind(send, msg_init, msg_recv, msg_data, msg_size, msg_more, msg_close, error, again)\n"
    "Addresses of libzmq's functions, and zmq.ZMQError and zmq.Again.");

static PyObject *bind(PyObject *module, PyObject *args) {
    unsigned long long address[7];
    PyObject *error, *again;
    if (!PyArg_ParseTuple(args, "KKKKKKKOO", &address[0], &address[1], &address[2],
                          &address[3], &address[4], &address[5], &address[6], &error, &again))
        return NULL;
    for (int i = 0; i < 7; i++) {
        if (address[i] == 0) {
            PyErr_SetString(PyExc_ValueError, "a libzmq function address is 0");
            return NULL;
        }
    }
    Py_XSETREF(zmq_error, Py_NewRef(error));
    Py_XSETREF(zmq_again, Py_NewRef(again));
    zmq_send_ = (send_fn)(uintptr_t)address[0];
    zmq_msg_init_ = (msg_init_fn)(uintptr_t)address[1];
    zmq_msg_recv_ = (msg_recv_fn)(uintptr_t)address[2];
    zmq_msg_data_ = (msg_data_fn)(uintptr_t)address[3];
    zmq_msg_size_ = (msg_size_fn)(uintptr_t)address[4];
    zmq_msg_more_ = (msg_more_fn)(uintptr_t)address[5];
    zmq_msg_close_ = (msg_close_fn)(uintptr_t)address[6];
    Py_RETURN_NONE;
}

PyDoc_STRVAR(send3_doc,
    "send3(handle, topic, meta, payload) -> bool\n"
    "Send one three-frame message without blocking. False: the pipe is full and nothing\n"
    "was sent (libzmq checks at a message's first frame only). Raises zmq.ZMQError.");

static PyObject *send3(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "send3(handle, topic, meta, payload)");
        return NULL;
    }
    if (!bound())
        return NULL;
    for (int i = 1; i < 4; i++) {
        if (!PyBytes_Check(args[i])) {
            PyErr_Format(PyExc_TypeError, "send3 frames must be bytes, not %.100s",
                         Py_TYPE(args[i])->tp_name);
            return NULL;
        }
    }
    void *socket = socket_handle(args[0]);
    if (socket == NULL)
        return NULL;
    if (zmq_send_(socket, PyBytes_AS_STRING(args[1]), (size_t)PyBytes_GET_SIZE(args[1]),
                  ZMQ_DONTWAIT | ZMQ_SNDMORE) < 0) {
        if (errno == EAGAIN)
            Py_RETURN_FALSE;
        return raise_errno(errno);
    }
    if (zmq_send_(socket, PyBytes_AS_STRING(args[2]), (size_t)PyBytes_GET_SIZE(args[2]),
                  ZMQ_DONTWAIT | ZMQ_SNDMORE) < 0)
        return raise_errno(errno);
    if (zmq_send_(socket, PyBytes_AS_STRING(args[3]), (size_t)PyBytes_GET_SIZE(args[3]),
                  ZMQ_DONTWAIT) < 0)
        return raise_errno(errno);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(recv_message_doc,
    "recv_message(handle) -> tuple of frames\n"
    "Receive one whole message without blocking: its frames as bytes, at most four (a\n"
    "longer message is consumed whole and its first four returned, so that len() != 3\n"
    "tells a malformed bus message). Raises zmq.Again when nothing is queued.");

static PyObject *recv_message(PyObject *module, PyObject *handle) {
    if (!bound())
        return NULL;
    void *socket = socket_handle(handle);
    if (socket == NULL)
        return NULL;
    PyObject *frames[MAX_FRAMES];
    Py_ssize_t kept = 0;
    int more = 1;
    int failed = 0;
    zmq_msg message;
    while (more) {
        zmq_msg_init_(&message);
        if (zmq_msg_recv_(&message, socket, ZMQ_DONTWAIT) < 0) {
            int error = errno;
            zmq_msg_close_(&message);
            for (Py_ssize_t i = 0; i < kept; i++)
                Py_DECREF(frames[i]);
            /* only possible at a first frame: libzmq queues whole messages */
            return raise_errno(error);
        }
        more = zmq_msg_more_(&message);
        if (kept < MAX_FRAMES && !failed) {
            frames[kept] = PyBytes_FromStringAndSize((const char *)zmq_msg_data_(&message),
                                                     (Py_ssize_t)zmq_msg_size_(&message));
            if (frames[kept] == NULL)
                failed = 1; /* out of memory: consume the rest of the message, then raise */
            else
                kept++;
        }
        zmq_msg_close_(&message);
    }
    if (failed) {
        for (Py_ssize_t i = 0; i < kept; i++)
            Py_DECREF(frames[i]);
        return NULL;
    }
    PyObject *result = PyTuple_New(kept);
    if (result == NULL) {
        for (Py_ssize_t i = 0; i < kept; i++)
            Py_DECREF(frames[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < kept; i++)
        PyTuple_SET_ITEM(result, i, frames[i]);
    return result;
}

static PyMethodDef wire_methods[] = {
    {"bind", bind, METH_VARARGS, bind_doc},
    {"send3", (PyCFunction)(void (*)(void))send3, METH_FASTCALL, send3_doc},
    {"recv_message", recv_message, METH_O, recv_message_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef wire_module = {
    PyModuleDef_HEAD_INIT, "bus._wire",
    "Three-frame bus messages sent and received with one call each (see bus/transport.py).",
    -1, wire_methods,
};

PyMODINIT_FUNC PyInit__wire(void) { return PyModule_Create(&wire_module); }
