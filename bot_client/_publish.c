/*
 * bot_client._publish: Publisher.publish()'s common path in one C call.
 *
 * The Python call path costs about 5 us per event on this project's machines (building
 * the payload, stamping, the meta frame, the lock, the send: docs/performance.md); the
 * issue's target is 4 us per call all in. FastPath.publish does what the Python
 * publish() does for an event whose topic is known, whose data is a dict and that is
 * not rate-limited: orjson-encode the data (orjson's own call), then, under the
 * publisher's lock, stamp it, assemble the payload from the topic's pre-encoded parts
 * (bus.envelope.payload_parts: head + data + timestamp + tail + seq + "}"), pack the
 * meta frame (bus.envelope.META_HEADER + source id) and send it with libzmq's zmq_send
 * (bus/transport.py resolves it) or hand it to the publisher's Python code.
 *
 * Everything else (a new topic, data that is not a dict, rate-limited market data, an
 * unencodable or oversized event: each raises or is decided in Python) goes to the
 * Python publish(), which is also the reference the tests compare this path with.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef int (*send_fn)(void *socket, const void *buffer, size_t length, int flags);

#define ZMQ_DONTWAIT 1
#define ZMQ_SNDMORE 2
#define WIRE_VERSION 1
#define META_HEADER_SIZE 26
/* "2024-01-20T10:30:00.123456Z" */
#define STAMP_SIZE 27
#define MAX_SEQ_DIGITS 20
/* references per HandOff entry: slot, meta, payload, topic */
#define ENTRY_SIZE 4

static const char TIMESTAMP_FIELD[] = ",\"timestamp\":\"";
#define TIMESTAMP_FIELD_SIZE (sizeof(TIMESTAMP_FIELD) - 1)
static const char DATA_TIMESTAMP_FIRST[] = "\"timestamp\":\"";
#define DATA_TIMESTAMP_FIRST_SIZE (sizeof(DATA_TIMESTAMP_FIRST) - 1)

static PyObject *name_underlying, *name_fast_ok, *name_io_sleeping, *name_timestamp, *name_symbol, *dumps_kwnames;

/* The _Slot fields this path reads, by their __slots__ offsets (read once from the class):
 * a getattr each would cost more than the rest of the stamping. */
enum { FIELD_SEQ, FIELD_HEAD, FIELD_TAIL, FIELD_TOPIC_BYTES, FIELD_GATED, FIELD_COUNT };
static const char *const FIELD_NAMES[FIELD_COUNT] = {"seq", "head", "tail", "topic_bytes",
                                                     "gated"};

/* A mutex like threading.Lock (acquire, release, with) that FastPath takes without a
 * Python call: threading.Lock's acquire parses keyword arguments on every call, which
 * cost more than the stamping it guards. */
typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    int locked;
} Lock;

static int lock_take(Lock *self) {
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    self->locked = 1;
    return 0;
}

static void lock_give(Lock *self) {
    self->locked = 0;
    PyThread_release_lock(self->lock);
}

static PyObject *Lock_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Lock() takes no arguments");
        return NULL;
    }
    Lock *self = (Lock *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void Lock_dealloc(Lock *self) {
    if (self->lock != NULL) {
        if (self->locked)
            PyThread_release_lock(self->lock);
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Lock_acquire(Lock *self, PyObject *unused) {
    lock_take(self);
    Py_RETURN_TRUE;
}

static PyObject *Lock_release(Lock *self, PyObject *unused) {
    if (!self->locked) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    lock_give(self);
    Py_RETURN_NONE;
}

static PyObject *Lock_exit(Lock *self, PyObject *const *args, Py_ssize_t nargs) {
    return Lock_release(self, NULL);
}

static PyObject *Lock_locked(Lock *self, PyObject *unused) { return PyBool_FromLong(self->locked); }

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)Lock_acquire, METH_NOARGS, "acquire() -> True: wait for the lock."},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "release()"},
    {"locked", (PyCFunction)Lock_locked, METH_NOARGS, "locked() -> bool"},
    {"__enter__", (PyCFunction)Lock_acquire, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Lock_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bot_client._publish.Lock",
    .tp_basicsize = sizeof(Lock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Lock(): a mutex like threading.Lock that FastPath takes directly.",
    .tp_new = Lock_new,
    .tp_dealloc = (destructor)Lock_dealloc,
    .tp_methods = Lock_methods,
};

/* the offset of a __slots__ field of slot_type holding any object */
static int field_offset_of(PyObject *slot_type, const char *name, Py_ssize_t *offset) {
    PyObject *descriptor = PyObject_GetAttrString(slot_type, name);
    if (descriptor == NULL)
        return -1;
    int usable = Py_IS_TYPE(descriptor, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)descriptor)->d_member->type == T_OBJECT_EX;
    if (usable)
        *offset = ((PyMemberDescrObject *)descriptor)->d_member->offset;
    Py_DECREF(descriptor);
    if (!usable)
        PyErr_Format(PyExc_TypeError, "FastPath: %s is not a __slots__ field", name);
    return usable ? 0 : -1;
}

static void *socket_handle(PyObject *socket_object) {
    PyObject *address = PyObject_GetAttr(socket_object, name_underlying);
    if (address == NULL)
        return NULL;
    void *socket = PyLong_AsVoidPtr(address);
    Py_DECREF(address);
    return socket;
}

/* One bus message (three frames) without blocking; touches no Python object's count, so it
 * runs with or without the GIL. 1 sent; 0 nothing sent (EAGAIN: the pipe is full, or
 * another error at the first frame, in *error); -1 failed within the message (*error). */
static int send_message(send_fn send, void *socket, PyObject *topic, PyObject *meta,
                        PyObject *payload, int *error) {
    if (send(socket, PyBytes_AS_STRING(topic), (size_t)PyBytes_GET_SIZE(topic),
             ZMQ_DONTWAIT | ZMQ_SNDMORE) < 0) {
        *error = errno == EAGAIN ? 0 : errno;
        return 0;
    }
    /* libzmq checks a full pipe at a message's first frame only: the rest fits */
    if (send(socket, PyBytes_AS_STRING(meta), (size_t)PyBytes_GET_SIZE(meta),
             ZMQ_DONTWAIT | ZMQ_SNDMORE) < 0 ||
        send(socket, PyBytes_AS_STRING(payload), (size_t)PyBytes_GET_SIZE(payload),
             ZMQ_DONTWAIT) < 0) {
        *error = errno;
        return -1;
    }
    return 1;
}

/* HandOff: the events callers hand to the publisher's I/O thread, in order.
 *
 * A ring of (slot, meta, payload) with one producer at a time (callers hold the publisher's
 * lock and the GIL) and one consumer (the I/O thread). The consumer sends with the GIL
 * released, so a caller never waits for a send and the sender never waits for the
 * interpreter between events; it only moves `tail`. Sent entries are released (their
 * references dropped) by whoever next holds the GIL here: a caller pushing, or the
 * consumer once it has the GIL back. */
typedef struct {
    PyObject_HEAD
    PyObject **entries; /* 4 per place in the ring: slot, meta, payload and the topic */
    size_t mask;        /* ring size - 1 (a power of two) */
    size_t limit;       /* at most this many entries wait */
    _Atomic size_t head; /* next to fill (callers) */
    _Atomic size_t tail; /* next to send (the I/O thread) */
    /* events sent, counted before `tail` moves past them: a reader that sees an event gone
     * from the ring (len) afterwards sees it counted here */
    _Atomic unsigned long long sent;
    size_t released;     /* entries before this have had their references dropped */
    /* While a drain logs what it sends (drain's `log`), entries from keep_from on are
     * kept, sent or not: a caller's push (under the GIL) would otherwise release them
     * before the drain, back under the GIL, has put them into the log. GIL-protected. */
    size_t keep_from;
    int keeping;
    _Atomic int draining;
    Py_ssize_t topic_offset; /* _Slot.topic_bytes */
    PyObject *slot_type;
    send_fn send;
} HandOff;

static void handoff_release_sent(HandOff *self) {
    size_t tail = self->keeping ? self->keep_from
                                : atomic_load_explicit(&self->tail, memory_order_acquire);
    while (self->released != tail) {
        PyObject **entry = &self->entries[ENTRY_SIZE * (self->released & self->mask)];
        Py_CLEAR(entry[0]);
        Py_CLEAR(entry[1]);
        Py_CLEAR(entry[2]);
        Py_CLEAR(entry[3]);
        self->released++;
    }
}

static size_t handoff_waiting(HandOff *self) {
    return atomic_load_explicit(&self->head, memory_order_relaxed) -
           atomic_load_explicit(&self->tail, memory_order_acquire);
}

/* 1 queued, 0 full; GIL held. The topic is held with the entry, so the sender, which reads
 * it without the GIL, does not depend on the slot keeping it. */
static int handoff_push(HandOff *self, PyObject *slot, PyObject *meta, PyObject *payload,
                        PyObject *topic) {
    handoff_release_sent(self);
    size_t head = atomic_load_explicit(&self->head, memory_order_relaxed);
    if (head - atomic_load_explicit(&self->tail, memory_order_acquire) >= self->limit)
        return 0;
    if (head - self->released > self->mask) /* cannot happen: the ring is 2 * limit */
        return 0;
    PyObject **entry = &self->entries[ENTRY_SIZE * (head & self->mask)];
    entry[0] = Py_NewRef(slot);
    entry[1] = Py_NewRef(meta);
    entry[2] = Py_NewRef(payload);
    entry[3] = Py_NewRef(topic);
    atomic_store_explicit(&self->head, head + 1, memory_order_release);
    return 1;
}

static PyObject *HandOff_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"limit", "slot_type", "send_address", NULL};
    Py_ssize_t limit;
    PyObject *slot_type;
    unsigned long long send_address;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nO!K:HandOff", keywords, &limit,
                                     &PyType_Type, &slot_type, &send_address))
        return NULL;
    if (limit < 1 || limit > (1 << 24) || send_address == 0) {
        PyErr_SetString(PyExc_ValueError, "HandOff: limit 1 to 2**24 and zmq_send's address");
        return NULL;
    }
    Py_ssize_t topic_offset;
    if (field_offset_of(slot_type, "topic_bytes", &topic_offset) < 0)
        return NULL;
    /* twice the limit: a drain that logs what it sends keeps up to `limit` sent entries
     * (see keeping) while callers fill up to `limit` more, so a push that len() allows
     * always finds room */
    size_t size = 1;
    while (size < 2 * (size_t)limit)
        size <<= 1;
    HandOff *self = (HandOff *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->entries = PyMem_Calloc(ENTRY_SIZE * size, sizeof(PyObject *));
    if (self->entries == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->mask = size - 1;
    self->limit = (size_t)limit;
    self->topic_offset = topic_offset;
    self->slot_type = Py_NewRef(slot_type);
    self->send = (send_fn)(uintptr_t)send_address;
    return (PyObject *)self;
}

static void handoff_drop_all(HandOff *self) {
    size_t head = atomic_load_explicit(&self->head, memory_order_relaxed);
    atomic_store_explicit(&self->tail, head, memory_order_release);
    handoff_release_sent(self);
}

static int HandOff_traverse(HandOff *self, visitproc visit, void *arg) {
    Py_VISIT(self->slot_type);
    if (self->entries != NULL) {
        size_t head = atomic_load_explicit(&self->head, memory_order_relaxed);
        for (size_t i = self->released; i != head; i++) {
            Py_VISIT(self->entries[ENTRY_SIZE * (i & self->mask)]);
        }
    }
    return 0;
}

static int HandOff_clear(HandOff *self) {
    if (self->entries != NULL && !atomic_load(&self->draining))
        handoff_drop_all(self);
    Py_CLEAR(self->slot_type);
    return 0;
}

static void HandOff_dealloc(HandOff *self) {
    PyObject_GC_UnTrack(self);
    HandOff_clear(self);
    PyMem_Free(self->entries);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t HandOff_length(HandOff *self) { return (Py_ssize_t)handoff_waiting(self); }

static PyObject *HandOff_append(HandOff *self, PyObject *item) {
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 3 ||
        Py_TYPE(PyTuple_GET_ITEM(item, 0)) != (PyTypeObject *)self->slot_type ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 1)) ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 2))) {
        PyErr_SetString(PyExc_TypeError, "HandOff.append((slot, meta, payload))");
        return NULL;
    }
    PyObject *topic = *(PyObject **)((char *)PyTuple_GET_ITEM(item, 0) + self->topic_offset);
    if (topic == NULL || !PyBytes_CheckExact(topic)) {
        PyErr_SetString(PyExc_TypeError, "HandOff.append: the slot has no topic_bytes");
        return NULL;
    }
    if (!handoff_push(self, PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1),
                      PyTuple_GET_ITEM(item, 2), topic)) {
        PyErr_SetString(PyExc_BufferError, "HandOff is full (check len() first)");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* the waiting entries as (slot, meta, payload) tuples, oldest first */
static PyObject *HandOff_iter(HandOff *self) {
    size_t tail = atomic_load_explicit(&self->tail, memory_order_acquire);
    size_t head = atomic_load_explicit(&self->head, memory_order_relaxed);
    PyObject *items = PyList_New((Py_ssize_t)(head - tail));
    if (items == NULL)
        return NULL;
    for (size_t i = tail; i != head; i++) {
        PyObject **entry = &self->entries[ENTRY_SIZE * (i & self->mask)];
        PyObject *item = PyTuple_Pack(3, entry[0], entry[1], entry[2]);
        if (item == NULL) {
            Py_DECREF(items);
            return NULL;
        }
        PyList_SET_ITEM(items, (Py_ssize_t)(i - tail), item);
    }
    PyObject *iterator = PyObject_GetIter(items);
    Py_DECREF(items);
    return iterator;
}

static PyObject *HandOff_clear_method(HandOff *self, PyObject *unused) {
    if (atomic_load(&self->draining)) {
        PyErr_SetString(PyExc_RuntimeError, "HandOff.clear() while it is being drained");
        return NULL;
    }
    handoff_drop_all(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(drain_doc,
    "drain(socket, limit, log=None) -> (sent, blocked)\n"
    "Send up to `limit` waiting events on the pyzmq `socket`, in order, with the GIL\n"
    "released; blocked: the pipe is full and the rest waits. One thread at a time.\n"
    "`log`, a list: the frames of each event sent are appended to it (topic, meta,\n"
    "payload, ...), for the publisher's resend window (bot_client/resend.py).");

/* the frames of entries first..first+count-1 onto `log`; 0, or -1 with an error set */
static int handoff_log_sent(HandOff *self, PyObject *log, size_t first, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject **entry = &self->entries[ENTRY_SIZE * ((first + (size_t)i) & self->mask)];
        if (PyList_Append(log, entry[3]) < 0 || PyList_Append(log, entry[1]) < 0 ||
            PyList_Append(log, entry[2]) < 0)
            return -1;
    }
    return 0;
}

static PyObject *HandOff_drain(HandOff *self, PyObject *args) {
    PyObject *socket_object, *log = Py_None;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "On|O:drain", &socket_object, &limit, &log))
        return NULL;
    if (log != Py_None && !PyList_CheckExact(log)) {
        PyErr_SetString(PyExc_TypeError, "HandOff.drain: log must be a list or None");
        return NULL;
    }
    void *socket = socket_handle(socket_object);
    if (socket == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return Py_BuildValue("(nO)", (Py_ssize_t)0, Py_True); /* closed: nothing goes */
    }
    int expected = 0;
    if (!atomic_compare_exchange_strong(&self->draining, &expected, 1)) {
        PyErr_SetString(PyExc_RuntimeError, "HandOff.drain() from two threads");
        return NULL;
    }
    Py_ssize_t sent = 0;
    int blocked = 0, failure = 0;
    size_t first = atomic_load_explicit(&self->tail, memory_order_relaxed);
    if (log != Py_None) {
        self->keep_from = first;
        self->keeping = 1;
    }
    Py_BEGIN_ALLOW_THREADS
    size_t tail = first;
    while (sent < limit) {
        if (tail == atomic_load_explicit(&self->head, memory_order_acquire))
            break;
        /* entries from tail to head are the callers' no more: read without the GIL */
        PyObject **entry = &self->entries[ENTRY_SIZE * (tail & self->mask)];
        int outcome = send_message(self->send, socket, entry[3], entry[1], entry[2], &failure);
        if (outcome < 0) { /* part of it went into the pipe: not seen in practice */
            tail++;
            atomic_store_explicit(&self->tail, tail, memory_order_release);
            break;
        }
        if (outcome == 0) {
            blocked = failure == 0;
            break;
        }
        atomic_fetch_add_explicit(&self->sent, 1, memory_order_release);
        tail++;
        atomic_store_explicit(&self->tail, tail, memory_order_release);
        sent++;
    }
    Py_END_ALLOW_THREADS
    atomic_store(&self->draining, 0);
    int logged = log == Py_None ? 0 : handoff_log_sent(self, log, first, sent);
    self->keeping = 0;
    handoff_release_sent(self);
    if (logged < 0)
        return NULL;
    if (failure) {
        PyErr_Format(PyExc_OSError, "HandOff.drain: zmq_send failed, errno %d (%s)", failure,
                     strerror(failure));
        return NULL;
    }
    return Py_BuildValue("(nO)", sent, blocked ? Py_True : Py_False);
}

static PyObject *HandOff_get_sent(HandOff *self, void *closure) {
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&self->sent, memory_order_acquire));
}

static PyGetSetDef HandOff_getset[] = {
    {"sent", (getter)HandOff_get_sent, NULL,
     "events drain() has sent (read len() first: an event leaves it after it is counted)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef HandOff_methods[] = {
    {"append", (PyCFunction)HandOff_append, METH_O,
     "append((slot, meta, payload)): queue an event (check len() against the limit first)."},
    {"clear", (PyCFunction)HandOff_clear_method, METH_NOARGS, "clear(): drop what waits."},
    {"drain", (PyCFunction)HandOff_drain, METH_VARARGS, drain_doc},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods HandOff_as_sequence = {.sq_length = (lenfunc)HandOff_length};

static PyTypeObject HandOffType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bot_client._publish.HandOff",
    .tp_basicsize = sizeof(HandOff),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "HandOff(limit, slot_type, send_address): events for the I/O thread to send.",
    .tp_new = HandOff_new,
    .tp_dealloc = (destructor)HandOff_dealloc,
    .tp_traverse = (traverseproc)HandOff_traverse,
    .tp_clear = (inquiry)HandOff_clear,
    .tp_iter = (getiterfunc)HandOff_iter,
    .tp_methods = HandOff_methods,
    .tp_getset = HandOff_getset,
    .tp_as_sequence = &HandOff_as_sequence,
};

typedef struct {
    PyObject_HEAD
    PyObject *owner;        /* the Publisher: its _fast_ok says whether the fast ways are open */
    PyObject *slots;        /* Publisher._slots: slot key -> _Slot */
    Lock *lock;             /* the publisher's lock */
    PyObject *keyed_slots;  /* type -> {key or symbol -> slot}: found without a tuple */
    uint64_t sent;          /* events this path sent on the socket */
    PyObject *socket;       /* the pyzmq XPUB this thread may send on, or None */
    PyObject *dumps;        /* orjson.dumps, its default= and option= */
    PyObject *dumps_default;
    PyObject *dumps_option;
    PyObject *symbol_keyed; /* SYMBOL_KEYED_TYPES */
    PyObject *fallback;     /* the Python publish(type, data, key) */
    PyObject *hand_over;    /* publisher method (slot, meta, payload), lock held */
    PyObject *slot_type;    /* _Slot: slots of another type go to Python */
    PyObject *handoff;      /* the I/O thread's HandOff (no socket), or None */
    PyObject *sent_log;     /* a list: frames of what this path sent go onto it, or None */
    Py_ssize_t field_offset[FIELD_COUNT];
    send_fn send;
    uint64_t epoch;
    Py_ssize_t max_payload;
    char *source;
    Py_ssize_t source_size;
    /* the timestamp text up to the millisecond, for the last millisecond seen */
    int64_t stamp_millisecond;
    char stamp_prefix[STAMP_SIZE];
} FastPath;

/* ISO-8601 UTC with microseconds and a Z, as bus.envelope.timestamp_bytes writes it (years
 * 1970 to 2262, as int64 nanoseconds reach). The text up to the millisecond is cached per path. */
static void format_stamp(int64_t *cached_millisecond, char *prefix, int64_t ns, char *out) {
    int64_t millisecond = ns / 1000000;
    if (millisecond != *cached_millisecond) {
        time_t seconds = (time_t)(millisecond / 1000);
        struct tm parts;
        gmtime_r(&seconds, &parts);
        char text[48];
        snprintf(text, sizeof text, "%04d-%02d-%02dT%02d:%02d:%02d.%03d", parts.tm_year + 1900,
                 parts.tm_mon + 1, parts.tm_mday, parts.tm_hour, parts.tm_min, parts.tm_sec,
                 (int)(millisecond % 1000));
        memcpy(prefix, text, 23);
        *cached_millisecond = millisecond;
    }
    int microseconds = (int)((ns / 1000) % 1000);
    memcpy(out, prefix, 23);
    out[23] = (char)('0' + microseconds / 100);
    out[24] = (char)('0' + microseconds / 10 % 10);
    out[25] = (char)('0' + microseconds % 10);
    out[26] = 'Z';
}

static void put_u64_big_endian(unsigned char *out, uint64_t value) {
    for (int i = 7; i >= 0; i--) {
        out[i] = (unsigned char)(value & 0xff);
        value >>= 8;
    }
}

static PyObject **field(FastPath *self, PyObject *slot, int which) {
    return (PyObject **)((char *)slot + self->field_offset[which]);
}

/* "<seq>}" into out (at least MAX_SEQ_DIGITS + 1 bytes); returns its length */
static int seq_digits(uint64_t seq, char *out) {
    char reversed[MAX_SEQ_DIGITS];
    int count = 0;
    do {
        reversed[count++] = (char)('0' + seq % 10);
        seq /= 10;
    } while (seq != 0);
    for (int i = 0; i < count; i++)
        out[i] = reversed[count - 1 - i];
    out[count] = '}';
    return count + 1;
}

static PyObject *call_fallback(FastPath *self, PyObject *type_name, PyObject *data,
                               PyObject *key) {
    PyObject *args[3] = {type_name, data, key};
    return PyObject_Vectorcall(self->fallback, args, 3, NULL);
}

/* The slot of (type, key), (type, data["symbol"]) or type, as Publisher.publish keys it;
 * a new reference, or NULL with no error set when Python must decide. Keyed slots are found
 * again through keyed_slots (type -> key -> slot), which costs no tuple. A lookup may run
 * the key's own __hash__ and __eq__, which may change `data`: the key is held meanwhile. */
static PyObject *find_slot(FastPath *self, PyObject *type_name, PyObject *data, PyObject *key) {
    PyObject *slot = NULL;
    if (key == Py_None) {
        int keyed = PySet_Contains(self->symbol_keyed, type_name);
        if (keyed < 0) {
            PyErr_Clear();
            return NULL;
        }
        if (!keyed) {
            slot = PyDict_GetItemWithError(self->slots, type_name);
            if (slot == NULL)
                PyErr_Clear();
            return Py_XNewRef(slot);
        }
        key = PyDict_GetItemWithError(data, name_symbol);
        if (key == NULL) {
            if (PyErr_Occurred()) {
                PyErr_Clear();
                return NULL;
            }
            key = Py_None;
        }
    }
    Py_INCREF(key);
    PyObject *by_type = PyDict_GetItemWithError(self->keyed_slots, type_name);
    if (by_type != NULL) {
        Py_INCREF(by_type);
        slot = Py_XNewRef(PyDict_GetItemWithError(by_type, key));
    }
    if (slot == NULL && !PyErr_Occurred()) {
        PyObject *slot_key = PyTuple_Pack(2, type_name, key);
        if (slot_key != NULL) {
            slot = Py_XNewRef(PyDict_GetItemWithError(self->slots, slot_key));
            Py_DECREF(slot_key);
        }
        if (slot != NULL && by_type == NULL) {
            by_type = PyDict_New();
            if (by_type != NULL && PyDict_SetItem(self->keyed_slots, type_name, by_type) < 0)
                Py_CLEAR(by_type);
        }
        if (slot != NULL && by_type != NULL && PyDict_SetItem(by_type, key, slot) < 0)
            PyErr_Clear(); /* only the cache misses it */
    }
    PyErr_Clear(); /* unhashable or failing key: Python says what is wrong */
    Py_XDECREF(by_type);
    Py_DECREF(key);
    return slot;
}

/* 1 sent; 0 nothing sent: the pipe is full, or the socket is closed or failing, and the
 * publisher's Python code holds the event (and finds out about the socket); -1 error set */
static int send_frames(FastPath *self, PyObject *topic, PyObject *meta, PyObject *payload) {
    void *socket = socket_handle(self->socket);
    if (socket == NULL)
        return PyErr_Occurred() ? -1 : 0;
    int error;
    int outcome = send_message(self->send, socket, topic, meta, payload, &error);
    if (outcome < 0) /* not seen in practice */
        PyErr_Format(PyExc_OSError, "zmq_send failed within a message: errno %d", error);
    return outcome;
}

/* Under the lock: stamp, build, send or hand over. NULL with an error set, Py_None when done,
 * or Py_NotImplemented (new reference each) when the Python path must take the event. */
static PyObject *stamp_and_send(FastPath *self, PyObject *slot, PyObject *data_json,
                                int has_timestamp, int empty) {
    PyObject *seq_object = *field(self, slot, FIELD_SEQ);
    PyObject *head = *field(self, slot, FIELD_HEAD);
    PyObject *tail = *field(self, slot, FIELD_TAIL);
    PyObject *topic = *field(self, slot, FIELD_TOPIC_BYTES);
    if (seq_object == NULL || head == NULL || tail == NULL || topic == NULL ||
        !PyLong_CheckExact(seq_object) || !PyBytes_CheckExact(head) ||
        !PyBytes_CheckExact(tail) || !PyBytes_CheckExact(topic))
        return Py_NewRef(Py_NotImplemented);
    uint64_t seq = PyLong_AsUnsignedLongLong(seq_object);
    if (seq == UINT64_MAX) { /* an error, or no seq after it: Python decides */
        PyErr_Clear();
        return Py_NewRef(Py_NotImplemented);
    }
    seq += 1;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    int64_t now_ns = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
    char stamp[STAMP_SIZE];
    format_stamp(&self->stamp_millisecond, self->stamp_prefix, now_ns, stamp);
    char digits[MAX_SEQ_DIGITS + 1];
    int digits_size = seq_digits(seq, digits);

    const char *data = PyBytes_AS_STRING(data_json);
    Py_ssize_t data_size = PyBytes_GET_SIZE(data_json);
    Py_ssize_t head_size = PyBytes_GET_SIZE(head), tail_size = PyBytes_GET_SIZE(tail);
    Py_ssize_t size = head_size + data_size + TIMESTAMP_FIELD_SIZE + STAMP_SIZE + tail_size +
                      digits_size;
    if (!has_timestamp) /* the data's own timestamp, then the envelope's */
        size += STAMP_SIZE + 2 + (empty ? DATA_TIMESTAMP_FIRST_SIZE : TIMESTAMP_FIELD_SIZE) - 1;
    if (size > self->max_payload) /* Python raises with the figures */
        return Py_NewRef(Py_NotImplemented);
    PyObject *payload = PyBytes_FromStringAndSize(NULL, size);
    if (payload == NULL)
        return NULL;
    PyObject *meta = PyBytes_FromStringAndSize(NULL, META_HEADER_SIZE + self->source_size);
    if (meta == NULL) {
        Py_DECREF(payload);
        return NULL;
    }
    PyObject *new_seq = PyLong_FromUnsignedLongLong(seq);
    if (new_seq == NULL) {
        Py_DECREF(payload);
        Py_DECREF(meta);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(payload);
    memcpy(out, PyBytes_AS_STRING(head), (size_t)head_size);
    out += head_size;
    if (has_timestamp) {
        memcpy(out, data, (size_t)data_size);
        out += data_size;
    } else {
        memcpy(out, data, (size_t)data_size - 1); /* all but its closing brace */
        out += data_size - 1;
        if (empty) {
            memcpy(out, DATA_TIMESTAMP_FIRST, DATA_TIMESTAMP_FIRST_SIZE);
            out += DATA_TIMESTAMP_FIRST_SIZE;
        } else {
            memcpy(out, TIMESTAMP_FIELD, TIMESTAMP_FIELD_SIZE);
            out += TIMESTAMP_FIELD_SIZE;
        }
        memcpy(out, stamp, STAMP_SIZE);
        out += STAMP_SIZE;
        *out++ = '"';
        *out++ = '}';
    }
    memcpy(out, TIMESTAMP_FIELD, TIMESTAMP_FIELD_SIZE);
    out += TIMESTAMP_FIELD_SIZE;
    memcpy(out, stamp, STAMP_SIZE);
    out += STAMP_SIZE;
    memcpy(out, PyBytes_AS_STRING(tail), (size_t)tail_size);
    out += tail_size;
    memcpy(out, digits, (size_t)digits_size);

    unsigned char *header = (unsigned char *)PyBytes_AS_STRING(meta);
    header[0] = WIRE_VERSION;
    header[1] = 0;
    put_u64_big_endian(header + 2, self->epoch);
    put_u64_big_endian(header + 10, seq);
    put_u64_big_endian(header + 18, (uint64_t)now_ns);
    memcpy(header + META_HEADER_SIZE, self->source, (size_t)self->source_size);

    /* seq also counts the topic's published events: from here on the event is published */
    Py_SETREF(*field(self, slot, FIELD_SEQ), new_seq);
    PyObject *result = NULL;
    int done = 0;
    if (self->socket != Py_None || self->handoff != Py_None) {
        PyObject *fast_ok = PyObject_GetAttr(self->owner, name_fast_ok);
        if (fast_ok == NULL)
            goto finish;
        int open = fast_ok == Py_True;
        Py_DECREF(fast_ok);
        if (open && self->socket != Py_None) {
            int sent = send_frames(self, topic, meta, payload);
            if (sent < 0)
                goto finish;
            if (sent) {
                self->sent += 1;
                done = 1;
                /* for the resend window, as HandOff.drain logs (bot_client/resend.py) */
                if (self->sent_log != Py_None &&
                    (PyList_Append(self->sent_log, topic) < 0 ||
                     PyList_Append(self->sent_log, meta) < 0 ||
                     PyList_Append(self->sent_log, payload) < 0))
                    goto finish;
            }
        } else if (open) {
            /* to the I/O thread, as Publisher._send_or_hold hands over; when that thread
             * sleeps, Python wakes it */
            PyObject *sleeping = PyObject_GetAttr(self->owner, name_io_sleeping);
            if (sleeping == NULL)
                goto finish;
            int awake = sleeping == Py_False;
            Py_DECREF(sleeping);
            if (awake && handoff_push((HandOff *)self->handoff, slot, meta, payload, topic))
                done = 1;
        }
    }
    if (done) {
        result = Py_NewRef(Py_None);
    } else {
        PyObject *args[3] = {slot, meta, payload};
        result = PyObject_Vectorcall(self->hand_over, args, 3, NULL);
    }
finish:
    Py_DECREF(meta);
    Py_DECREF(payload);
    return result;
}

PyDoc_STRVAR(publish_doc,
    "publish(type_name, data, key=None) -> None\n"
    "Publisher.publish: the common case here, everything else in Python.");

static PyObject *FastPath_publish(FastPath *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames) {
    PyObject *type_name, *data, *key = Py_None;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nkw != 0 || nargs < 2 || nargs > 3) /* Python's own argument handling and message */
        return PyObject_Vectorcall(self->fallback, args, (size_t)nargs, kwnames);
    type_name = args[0];
    data = args[1];
    if (nargs == 3)
        key = args[2];
    if (!PyDict_CheckExact(data) || !PyUnicode_CheckExact(type_name) ||
        (key != Py_None && !PyUnicode_CheckExact(key)))
        return call_fallback(self, type_name, data, key);
    if (self->owner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FastPath was not initialised");
        return NULL;
    }
    PyObject *slot = find_slot(self, type_name, data, key);
    if (slot == NULL)
        return call_fallback(self, type_name, data, key);
    if (Py_TYPE(slot) != (PyTypeObject *)self->slot_type ||
        *field(self, slot, FIELD_GATED) != Py_False) { /* rate-limited market data */
        Py_DECREF(slot);
        return call_fallback(self, type_name, data, key);
    }
    PyObject *dumps_args[3] = {data, self->dumps_default, self->dumps_option};
    PyObject *data_json = PyObject_Vectorcall(self->dumps, dumps_args, 1, dumps_kwnames);
    if (data_json == NULL || !PyBytes_Check(data_json) || PyBytes_GET_SIZE(data_json) < 2) {
        /* unencodable: Python raises InvalidEventError naming the type and the cause */
        PyErr_Clear();
        Py_XDECREF(data_json);
        Py_DECREF(slot);
        return call_fallback(self, type_name, data, key);
    }
    int has_timestamp = PyDict_Contains(data, name_timestamp);
    if (has_timestamp < 0) {
        Py_DECREF(data_json);
        Py_DECREF(slot);
        return NULL;
    }
    /* from the encoding, not the dict: a default= callback may have changed the dict */
    int empty = PyBytes_GET_SIZE(data_json) == 2;
    lock_take(self->lock);
    PyObject *result = stamp_and_send(self, slot, data_json, has_timestamp, empty);
    lock_give(self->lock);
    Py_DECREF(data_json);
    Py_DECREF(slot);
    if (result == Py_NotImplemented) {
        Py_DECREF(result);
        return call_fallback(self, type_name, data, key);
    }
    return result;
}

static PyObject *FastPath_timestamp(FastPath *self, PyObject *ns_object) {
    long long ns = PyLong_AsLongLong(ns_object);
    if (ns == -1 && PyErr_Occurred())
        return NULL;
    if (ns < 0) {
        PyErr_SetString(PyExc_ValueError, "timestamp: ns must be >= 0 (1970 or later)");
        return NULL;
    }
    char stamp[STAMP_SIZE];
    format_stamp(&self->stamp_millisecond, self->stamp_prefix, (int64_t)ns, stamp);
    return PyBytes_FromStringAndSize(stamp, STAMP_SIZE);
}

static int FastPath_traverse(FastPath *self, visitproc visit, void *arg) {
    Py_VISIT(self->owner);
    Py_VISIT(self->slots);
    Py_VISIT(self->lock);
    Py_VISIT(self->keyed_slots);
    Py_VISIT(self->socket);
    Py_VISIT(self->dumps);
    Py_VISIT(self->dumps_default);
    Py_VISIT(self->dumps_option);
    Py_VISIT(self->symbol_keyed);
    Py_VISIT(self->fallback);
    Py_VISIT(self->hand_over);
    Py_VISIT(self->slot_type);
    Py_VISIT(self->handoff);
    Py_VISIT(self->sent_log);
    return 0;
}

static int FastPath_clear(FastPath *self) {
    Py_CLEAR(self->owner);
    Py_CLEAR(self->slots);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->keyed_slots);
    Py_CLEAR(self->socket);
    Py_CLEAR(self->dumps);
    Py_CLEAR(self->dumps_default);
    Py_CLEAR(self->dumps_option);
    Py_CLEAR(self->symbol_keyed);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->hand_over);
    Py_CLEAR(self->slot_type);
    Py_CLEAR(self->handoff);
    Py_CLEAR(self->sent_log);
    return 0;
}

static void FastPath_dealloc(FastPath *self) {
    PyObject_GC_UnTrack(self);
    FastPath_clear(self);
    PyMem_Free(self->source);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int FastPath_init(FastPath *self, PyObject *args, PyObject *kwargs) {
    if (self->owner != NULL) { /* its lock may be held by a publish() in progress */
        PyErr_SetString(PyExc_TypeError, "FastPath is already initialised");
        return -1;
    }
    static char *keywords[] = {"owner",       "slots",     "slot_type",    "lock",
                               "socket",    "send_address", "handoff",
                               "dumps",   "default",      "option",
                               "symbol_keyed", "source",   "epoch",        "max_payload",
                               "fallback",    "hand_over", "sent_log", NULL};
    PyObject *owner, *slots, *slot_type, *lock, *socket, *handoff, *dumps,
        *dumps_default, *dumps_option, *symbol_keyed, *fallback, *hand_over;
    PyObject *sent_log = Py_None;
    unsigned long long send_address, epoch;
    const char *source;
    Py_ssize_t source_size, max_payload;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OO!O!O!OKOOOOO!y#KnOO|O:FastPath", keywords, &owner, &PyDict_Type,
            &slots, &PyType_Type, &slot_type, &LockType, &lock, &socket, &send_address,
            &handoff, &dumps, &dumps_default, &dumps_option, &PyFrozenSet_Type,
            &symbol_keyed, &source, &source_size, &epoch, &max_payload, &fallback, &hand_over,
            &sent_log))
        return -1;
    if (sent_log != Py_None && !PyList_CheckExact(sent_log)) {
        PyErr_SetString(PyExc_TypeError, "FastPath: sent_log must be a list or None");
        return -1;
    }
    if (socket != Py_None && send_address == 0) {
        PyErr_SetString(PyExc_ValueError, "FastPath: a socket needs zmq_send's address");
        return -1;
    }
    Py_ssize_t offsets[FIELD_COUNT];
    for (int i = 0; i < FIELD_COUNT; i++) {
        if (field_offset_of(slot_type, FIELD_NAMES[i], &offsets[i]) < 0)
            return -1;
    }
    if (handoff != Py_None && !Py_IS_TYPE(handoff, &HandOffType)) {
        PyErr_SetString(PyExc_TypeError, "FastPath: handoff must be a HandOff or None");
        return -1;
    }
    PyObject *keyed_slots = PyDict_New();
    char *source_copy = PyMem_Malloc((size_t)source_size + 1);
    if (keyed_slots == NULL || source_copy == NULL) {
        Py_XDECREF(keyed_slots);
        PyMem_Free(source_copy);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    memcpy(source_copy, source, (size_t)source_size);
    self->owner = Py_NewRef(owner);
    self->slots = Py_NewRef(slots);
    self->slot_type = Py_NewRef(slot_type);
    self->lock = (Lock *)Py_NewRef(lock);
    self->keyed_slots = keyed_slots;
    self->socket = Py_NewRef(socket);
    self->handoff = Py_NewRef(handoff);
    self->dumps = Py_NewRef(dumps);
    self->dumps_default = Py_NewRef(dumps_default);
    self->dumps_option = Py_NewRef(dumps_option);
    self->symbol_keyed = Py_NewRef(symbol_keyed);
    self->fallback = Py_NewRef(fallback);
    self->hand_over = Py_NewRef(hand_over);
    self->sent_log = Py_NewRef(sent_log);
    self->send = (send_fn)(uintptr_t)send_address;
    self->epoch = epoch;
    self->max_payload = max_payload;
    self->source = source_copy;
    self->source_size = source_size;
    memcpy(self->field_offset, offsets, sizeof offsets);
    self->stamp_millisecond = -1;
    return 0;
}

static PyMemberDef FastPath_members[] = {
    {"sent", T_ULONGLONG, offsetof(FastPath, sent), READONLY,
     "events this path sent on the socket (Publisher adds them to counters.sent)"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef FastPath_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))FastPath_publish, METH_FASTCALL | METH_KEYWORDS,
     publish_doc},
    {"timestamp", (PyCFunction)FastPath_timestamp, METH_O,
     "timestamp(ns) -> bytes: the stamp publish() writes for that time (for tests)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bot_client._publish.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "FastPath(*, owner, slots, slot_type, lock, socket, send_address, "
              "handoff, dumps, default, option, symbol_keyed, source, epoch, "
              "max_payload, fallback, hand_over, sent_log=None)\n"
              "Publisher.publish()'s common path (bot_client/_publish.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastPath_init,
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_traverse = (traverseproc)FastPath_traverse,
    .tp_clear = (inquiry)FastPath_clear,
    .tp_methods = FastPath_methods,
    .tp_members = FastPath_members,
};

static struct PyModuleDef publish_module = {
    PyModuleDef_HEAD_INIT, "bot_client._publish",
    "Publisher.publish()'s common path in C (see bot_client/_publish.c).", -1, NULL,
};

static PyObject *intern(const char *text) { return PyUnicode_InternFromString(text); }

PyMODINIT_FUNC PyInit__publish(void) {
    name_underlying = intern("underlying");
    name_fast_ok = intern("_fast_ok");
    name_io_sleeping = intern("_io_sleeping");
    name_timestamp = intern("timestamp");
    name_symbol = intern("symbol");
    PyObject *default_name = intern("default"), *option_name = intern("option");
    if (name_underlying == NULL || name_fast_ok == NULL || name_io_sleeping == NULL ||
        name_timestamp == NULL || name_symbol == NULL ||
        default_name == NULL || option_name == NULL)
        return NULL;
    dumps_kwnames = PyTuple_Pack(2, default_name, option_name);
    if (dumps_kwnames == NULL || PyType_Ready(&FastPathType) < 0 ||
        PyType_Ready(&LockType) < 0 || PyType_Ready(&HandOffType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&publish_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddObjectRef(module, "Lock", (PyObject *)&LockType) < 0 ||
        PyModule_AddObjectRef(module, "HandOff", (PyObject *)&HandOffType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
