/*
 * bus._wire: one C call per three-frame bus message instead of three pyzmq calls.
 *
 * pyzmq costs about 0.5 us of interpreter work per frame on top of libzmq's own; a bus
 * message has three frames, so a publisher, the proxy's cache and every subscriber spend
 * most of their time in that wrapper (docs/performance.md). These functions call
 * libzmq directly, non-blocking, with the GIL held: send3 and recv_message take well
 * under a microsecond; cache_drain is bounded by the number of messages it is given.
 *
 * There is no link-time dependency on libzmq: bus/transport.py resolves libzmq's
 * functions through pyzmq's own extension module and passes their addresses to bind(),
 * so these calls act on the same library instance, and the same sockets, as pyzmq.
 * The socket argument is the pyzmq socket itself: its ``underlying`` address is read on
 * every call, and pyzmq sets it to 0 when the socket is closed (ENOTSOCK here), so a
 * closed socket is never used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

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
typedef const char *(*msg_gets_fn)(const zmq_msg *msg, const char *property);

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
static msg_gets_fn zmq_msg_gets_; /* optional: bind_metadata() */
/* the last User-Id seen, reused while consecutive messages carry the same one */
static PyObject *last_user_id;
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

static PyObject *underlying_name; /* "underlying", interned at import */

/* libzmq's socket behind a pyzmq socket (or its address as an int) */
static void *socket_handle(PyObject *socket_object) {
    void *socket;
    if (PyLong_Check(socket_object)) {
        socket = PyLong_AsVoidPtr(socket_object);
    } else {
        PyObject *address = PyObject_GetAttr(socket_object, underlying_name);
        if (address == NULL)
            return NULL;
        socket = PyLong_AsVoidPtr(address);
        Py_DECREF(address);
    }
    if (socket == NULL && !PyErr_Occurred())
        raise_errno(ENOTSOCK); /* pyzmq's address of a closed socket is 0 */
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
    "send3(socket, topic, meta, payload) -> bool\n"
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
    "recv_message(socket) -> tuple of frames\n"
    "Receive one whole message without blocking: its frames as bytes, at most four (a\n"
    "longer message is consumed whole and its first four returned, so that len() != 3\n"
    "tells a malformed bus message). Raises zmq.Again when nothing is queued.");

/* Receive one whole message, keeping at most MAX_FRAMES frames as new references in
 * frames[0..*kept). Returns 0, a zmq errno (no Python error set, nothing kept), or -1 with
 * a Python error set (out of memory; the message is consumed, nothing kept). */
/* The User-Id property of a received message as bytes (a new reference), Py_None when the
 * message has none, or NULL with a Python error set. */
static PyObject *user_id_of(const zmq_msg *message) {
    const char *value = zmq_msg_gets_(message, "User-Id");
    if (value == NULL)
        Py_RETURN_NONE;
    size_t length = strlen(value);
    if (last_user_id != NULL && (size_t)PyBytes_GET_SIZE(last_user_id) == length &&
        memcmp(PyBytes_AS_STRING(last_user_id), value, length) == 0)
        return Py_NewRef(last_user_id);
    PyObject *fresh = PyBytes_FromStringAndSize(value, (Py_ssize_t)length);
    if (fresh != NULL)
        Py_XSETREF(last_user_id, Py_NewRef(fresh));
    return fresh;
}

static int receive_frames_identified(void *socket, PyObject **frames, Py_ssize_t *kept,
                                     PyObject **user_id) {
    int more = 1;
    int first = 1;
    int failed = 0;
    zmq_msg message;
    *kept = 0;
    while (more) {
        zmq_msg_init_(&message);
        if (zmq_msg_recv_(&message, socket, ZMQ_DONTWAIT) < 0) {
            int error = errno;
            zmq_msg_close_(&message);
            for (Py_ssize_t i = 0; i < *kept; i++)
                Py_DECREF(frames[i]);
            *kept = 0;
            /* only possible at a first frame: libzmq queues whole messages */
            return error;
        }
        if (user_id != NULL && first) {
            /* metadata is the message's: read it from the first frame */
            *user_id = user_id_of(&message);
            if (*user_id == NULL)
                failed = 1;
        }
        first = 0;
        more = zmq_msg_more_(&message);
        if (*kept < MAX_FRAMES && !failed) {
            frames[*kept] = PyBytes_FromStringAndSize((const char *)zmq_msg_data_(&message),
                                                      (Py_ssize_t)zmq_msg_size_(&message));
            if (frames[*kept] == NULL)
                failed = 1; /* out of memory: consume the rest of the message, then raise */
            else
                (*kept)++;
        }
        zmq_msg_close_(&message);
    }
    if (failed) {
        for (Py_ssize_t i = 0; i < *kept; i++)
            Py_DECREF(frames[i]);
        *kept = 0;
        if (user_id != NULL)
            Py_CLEAR(*user_id);
        return -1;
    }
    return 0;
}

static int receive_frames(void *socket, PyObject **frames, Py_ssize_t *kept) {
    return receive_frames_identified(socket, frames, kept, NULL);
}

static void release_frames(PyObject **frames, Py_ssize_t kept) {
    for (Py_ssize_t i = 0; i < kept; i++)
        Py_DECREF(frames[i]);
}

static PyObject *recv_message(PyObject *module, PyObject *handle) {
    if (!bound())
        return NULL;
    void *socket = socket_handle(handle);
    if (socket == NULL)
        return NULL;
    PyObject *frames[MAX_FRAMES];
    Py_ssize_t kept;
    int status = receive_frames(socket, frames, &kept);
    if (status != 0)
        return status > 0 ? raise_errno(status) : NULL;
    PyObject *result = PyTuple_New(kept);
    if (result == NULL) {
        release_frames(frames, kept);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < kept; i++)
        PyTuple_SET_ITEM(result, i, frames[i]);
    return result;
}

PyDoc_STRVAR(bind_metadata_doc,
    "bind_metadata(msg_gets)\n"
    "The address of libzmq's zmq_msg_gets, for recv_identified.");

static PyObject *bind_metadata(PyObject *module, PyObject *address_object) {
    unsigned long long address = PyLong_AsUnsignedLongLong(address_object);
    if (address == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (address == 0) {
        PyErr_SetString(PyExc_ValueError, "the zmq_msg_gets address is 0");
        return NULL;
    }
    zmq_msg_gets_ = (msg_gets_fn)(uintptr_t)address;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(recv_identified_doc,
    "recv_identified(socket) -> (user_id, frames)\n"
    "recv_message, with the ZAP User-Id libzmq attached to the message as bytes (None when\n"
    "the peer was admitted without ZAP). Raises zmq.Again when nothing is queued.");

static PyObject *recv_identified(PyObject *module, PyObject *handle) {
    if (!bound())
        return NULL;
    if (zmq_msg_gets_ == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bus._wire.bind_metadata() was not called");
        return NULL;
    }
    void *socket = socket_handle(handle);
    if (socket == NULL)
        return NULL;
    PyObject *frames[MAX_FRAMES];
    Py_ssize_t kept;
    PyObject *user_id = NULL;
    int status = receive_frames_identified(socket, frames, &kept, &user_id);
    if (status != 0)
        return status > 0 ? raise_errno(status) : NULL;
    PyObject *tuple = PyTuple_New(kept);
    if (tuple == NULL) {
        release_frames(frames, kept);
        Py_DECREF(user_id);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < kept; i++)
        PyTuple_SET_ITEM(tuple, i, frames[i]);
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(tuple);
        Py_DECREF(user_id);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, user_id);
    PyTuple_SET_ITEM(result, 1, tuple);
    return result;
}

/* ---- the proxy's last-value cache: bus.proxy.LastValueCache.update, message by message.
 * bus/proxy.py holds the reference implementation in Python (drain_capture_python); the
 * tests feed both the same random streams and compare every entry, position and count. */

#define META_HEADER_SIZE 26
#define WIRE_VERSION 1
static const char SYNC_SUBSCRIPTION[] = "\x01\x00sync.";
#define SYNC_SUBSCRIPTION_SIZE 7

typedef struct {
    PyObject *entries;   /* topic -> (meta, payload, source, epoch, seq) */
    PyObject *positions; /* (source, topic) -> (epoch, seq) */
    PyObject *counts;    /* topic -> events since the last fold */
    PyObject *accepted;  /* a list that gets (topic, entry) of each event kept, or None */
    Py_ssize_t max_topics;
    unsigned long long events, invalid, gaps, missed, evictions;
} cache_state;

static uint64_t big_endian_u64(const unsigned char *bytes) {
    uint64_t value = 0;
    for (int i = 0; i < 8; i++)
        value = (value << 8) | bytes[i];
    return value;
}

static int add_stat(PyObject *stats, const char *name, unsigned long long delta) {
    if (delta == 0)
        return 0;
    PyObject *old = PyObject_GetAttrString(stats, name);
    if (old == NULL)
        return -1;
    PyObject *increment = PyLong_FromUnsignedLongLong(delta);
    PyObject *sum = increment == NULL ? NULL : PyNumber_Add(old, increment);
    Py_DECREF(old);
    Py_XDECREF(increment);
    if (sum == NULL)
        return -1;
    int status = PyObject_SetAttrString(stats, name, sum);
    Py_DECREF(sum);
    return status;
}

static int position_of(PyObject *pair, uint64_t *epoch, uint64_t *seq) {
    *epoch = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(pair, 0));
    *seq = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(pair, 1));
    return PyErr_Occurred() ? -1 : 0;
}

/* count one event of the topic: counts[topic] += 1 */
static int count_event(cache_state *state, PyObject *topic) {
    PyObject *count = PyDict_GetItemWithError(state->counts, topic);
    if (count == NULL && PyErr_Occurred())
        return -1;
    long long value = count == NULL ? 0 : PyLong_AsLongLong(count);
    if (value == -1 && PyErr_Occurred())
        return -1;
    PyObject *updated = PyLong_FromLongLong(value + 1);
    if (updated == NULL)
        return -1;
    int status = PyDict_SetItem(state->counts, topic, updated);
    Py_DECREF(updated);
    return status;
}

static int cache_update(cache_state *state, PyObject *stats, PyObject *topic, PyObject *meta,
                        PyObject *payload) {
    Py_ssize_t meta_size = PyBytes_GET_SIZE(meta);
    const unsigned char *header = (const unsigned char *)PyBytes_AS_STRING(meta);
    if (meta_size <= META_HEADER_SIZE || header[0] != WIRE_VERSION) {
        state->invalid++;
        return 0;
    }
    state->events++;
    if (count_event(state, topic) < 0)
        return -1;
    uint64_t epoch = big_endian_u64(header + 2);
    uint64_t seq = big_endian_u64(header + 10);
    int status = -1;
    PyObject *key = NULL, *epoch_object = NULL, *seq_object = NULL, *updated = NULL;
    PyObject *source = PyBytes_FromStringAndSize((const char *)header + META_HEADER_SIZE,
                                                 meta_size - META_HEADER_SIZE);
    if (source == NULL)
        return -1;
    PyObject *entry = PyDict_GetItemWithError(state->entries, topic);
    if (entry == NULL && PyErr_Occurred())
        goto done;
    Py_XINCREF(entry);
    int same_source = 0;
    if (entry != NULL) {
        same_source = PyObject_RichCompareBool(PyTuple_GET_ITEM(entry, 2), source, Py_EQ);
        if (same_source < 0)
            goto done;
    }
    int known = 0;
    uint64_t last_epoch = 0, last_seq = 0;
    if (same_source) {
        known = 1;
        last_epoch = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(entry, 3));
        last_seq = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(entry, 4));
        if (PyErr_Occurred())
            goto done;
    } else {
        /* a new topic, or another source than the one of its latest event */
        key = PyTuple_Pack(2, source, topic);
        if (key == NULL)
            goto done;
        PyObject *last = PyDict_GetItemWithError(state->positions, key);
        if (last == NULL && PyErr_Occurred())
            goto done;
        if (last != NULL) {
            known = 1;
            if (position_of(last, &last_epoch, &last_seq) < 0)
                goto done;
        }
    }
    if (known) {
        if (epoch == last_epoch) {
            if (seq <= last_seq) {
                status = 0; /* a duplicate or late event: the cache keeps the newer one */
                goto done;
            }
            if (seq - last_seq != 1) { /* not last_seq + 1, which wraps at 2**64 - 1 */
                uint64_t missed = seq - last_seq - 1;
                if (state->missed > ULLONG_MAX - missed) {
                    if (add_stat(stats, "missed", state->missed) < 0)
                        goto done;
                    state->missed = 0;
                }
                state->gaps++;
                state->missed += missed;
            }
        } else if (epoch < last_epoch) {
            status = 0; /* from an older run of that source */
            goto done;
        }
    }
    if (entry == NULL) {
        if (PyDict_GET_SIZE(state->entries) >= state->max_topics) {
            Py_ssize_t position = 0;
            PyObject *oldest, *value;
            if (PyDict_Next(state->entries, &position, &oldest, &value)) {
                Py_INCREF(oldest);
                int deleted = PyDict_DelItem(state->entries, oldest);
                Py_DECREF(oldest);
                if (deleted < 0)
                    goto done;
                state->evictions++;
            }
        }
    } else if (!same_source) {
        /* the entry's source keeps its position aside; this source's is now the entry */
        if (PyDict_GET_SIZE(state->positions) / 4 >= state->max_topics) /* 4x, no overflow */
            PyDict_Clear(state->positions);
        PyObject *aside_key = PyTuple_Pack(2, PyTuple_GET_ITEM(entry, 2), topic);
        PyObject *aside = PyTuple_Pack(2, PyTuple_GET_ITEM(entry, 3), PyTuple_GET_ITEM(entry, 4));
        int stored = aside_key != NULL && aside != NULL
                         ? PyDict_SetItem(state->positions, aside_key, aside)
                         : -1;
        Py_XDECREF(aside_key);
        Py_XDECREF(aside);
        if (stored < 0)
            goto done;
        if (PyDict_DelItem(state->positions, key) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError))
                goto done;
            PyErr_Clear();
        }
    }
    epoch_object = PyLong_FromUnsignedLongLong(epoch);
    seq_object = PyLong_FromUnsignedLongLong(seq);
    if (epoch_object == NULL || seq_object == NULL)
        goto done;
    updated = PyTuple_Pack(5, meta, payload, source, epoch_object, seq_object);
    if (updated == NULL || PyDict_SetItem(state->entries, topic, updated) < 0)
        goto done;
    if (state->accepted != NULL) { /* the proxy's history takes what the cache kept */
        PyObject *kept = PyTuple_Pack(2, topic, updated);
        int appended = kept == NULL ? -1 : PyList_Append(state->accepted, kept);
        Py_XDECREF(kept);
        if (appended < 0)
            goto done;
    }
    status = 0;
done:
    Py_XDECREF(entry);
    Py_XDECREF(key);
    Py_XDECREF(epoch_object);
    Py_XDECREF(seq_object);
    Py_XDECREF(updated);
    Py_DECREF(source);
    return status;
}

static int is_topic_start(PyObject *frame) {
    if (PyBytes_GET_SIZE(frame) < 1)
        return 0;
    unsigned char first = (unsigned char)PyBytes_AS_STRING(frame)[0];
    return (first >= 'a' && first <= 'z') || (first >= 'A' && first <= 'Z');
}

PyDoc_STRVAR(cache_drain_doc,
    "cache_drain(socket, cache, limit) -> (messages, sync_subscription | None)\n"
    "Feed up to ``limit`` captured messages to a bus.proxy.LastValueCache, without blocking.\n"
    "Stops after a snapshot sync subscription, which it returns: the caller answers the\n"
    "snapshots waiting for it before anything captured later reaches the cache.");

static PyObject *cache_drain(PyObject *module, PyObject *args) {
    PyObject *handle, *cache;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "OOn", &handle, &cache, &limit))
        return NULL;
    if (!bound())
        return NULL;
    void *socket = socket_handle(handle);
    if (socket == NULL)
        return NULL;
    cache_state state = {0};
    PyObject *stats = NULL, *max_topics = NULL, *sync = NULL, *result = NULL;
    state.entries = PyObject_GetAttrString(cache, "entries");
    state.positions = PyObject_GetAttrString(cache, "_positions");
    state.counts = PyObject_GetAttrString(cache, "_counts");
    stats = PyObject_GetAttrString(cache, "stats");
    max_topics = PyObject_GetAttrString(cache, "max_topics");
    state.accepted = PyObject_GetAttrString(cache, "accepted");
    if (state.entries == NULL || state.positions == NULL || state.counts == NULL ||
        stats == NULL || max_topics == NULL || state.accepted == NULL)
        goto finish;
    if (state.accepted == Py_None) {
        Py_CLEAR(state.accepted);
    } else if (!PyList_CheckExact(state.accepted)) {
        PyErr_SetString(PyExc_TypeError, "cache_drain needs a list or None as cache.accepted");
        goto finish;
    }
    if (!PyDict_CheckExact(state.entries) || !PyDict_CheckExact(state.positions) ||
        !PyDict_CheckExact(state.counts)) {
        PyErr_SetString(PyExc_TypeError, "cache_drain needs a LastValueCache");
        goto finish;
    }
    state.max_topics = PyLong_AsSsize_t(max_topics);
    if (state.max_topics == -1 && PyErr_Occurred())
        goto finish;
    Py_ssize_t messages = 0;
    int failed = 0;
    while (messages < limit) {
        PyObject *frames[MAX_FRAMES];
        Py_ssize_t kept;
        int status = receive_frames(socket, frames, &kept);
        if (status == EAGAIN)
            break;
        if (status != 0) {
            if (status > 0)
                raise_errno(status);
            failed = 1;
            break;
        }
        messages++;
        if (kept == 3 && is_topic_start(frames[0]) && PyBytes_GET_SIZE(frames[2]) > 0 &&
            PyBytes_AS_STRING(frames[2])[0] == '{') {
            if (cache_update(&state, stats, frames[0], frames[1], frames[2]) < 0)
                failed = 1;
        } else if (kept == 1 && PyBytes_GET_SIZE(frames[0]) > 0 &&
                   (unsigned char)PyBytes_AS_STRING(frames[0])[0] <= 1) {
            /* a (un)subscription on its way from a subscriber to the publishers */
            if (PyBytes_GET_SIZE(frames[0]) >= SYNC_SUBSCRIPTION_SIZE &&
                memcmp(PyBytes_AS_STRING(frames[0]), SYNC_SUBSCRIPTION,
                       SYNC_SUBSCRIPTION_SIZE) == 0) {
                sync = frames[0];
                kept = 0; /* the reference moved to sync */
                release_frames(frames, 0);
                break;
            }
        } else {
            state.invalid++;
        }
        release_frames(frames, kept);
        if (failed)
            break;
    }
    /* the counts so far are added even after an error, which is kept aside meanwhile:
     * they describe what was consumed */
    PyObject *error_type = NULL, *error_value = NULL, *error_traceback = NULL;
    if (failed)
        PyErr_Fetch(&error_type, &error_value, &error_traceback);
    PyObject *topics = PyLong_FromSsize_t(PyDict_GET_SIZE(state.entries));
    int stats_failed = topics == NULL || add_stat(stats, "events", state.events) < 0 ||
                       add_stat(stats, "invalid", state.invalid) < 0 ||
                       add_stat(stats, "gaps", state.gaps) < 0 ||
                       add_stat(stats, "missed", state.missed) < 0 ||
                       add_stat(stats, "evictions", state.evictions) < 0 ||
                       PyObject_SetAttrString(stats, "topics", topics) < 0;
    Py_XDECREF(topics);
    if (failed) {
        if (stats_failed)
            PyErr_Clear(); /* the first error is the one to report */
        PyErr_Restore(error_type, error_value, error_traceback);
    } else if (!stats_failed) {
        result = Py_BuildValue("(nO)", messages, sync == NULL ? Py_None : sync);
    }
finish:
    Py_XDECREF(sync);
    Py_XDECREF(state.entries);
    Py_XDECREF(state.positions);
    Py_XDECREF(state.counts);
    Py_XDECREF(state.accepted);
    Py_XDECREF(stats);
    Py_XDECREF(max_topics);
    return result;
}

static PyMethodDef wire_methods[] = {
    {"bind", bind, METH_VARARGS, bind_doc},
    {"send3", (PyCFunction)(void (*)(void))send3, METH_FASTCALL, send3_doc},
    {"recv_message", recv_message, METH_O, recv_message_doc},
    {"bind_metadata", bind_metadata, METH_O, bind_metadata_doc},
    {"recv_identified", recv_identified, METH_O, recv_identified_doc},
    {"cache_drain", cache_drain, METH_VARARGS, cache_drain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef wire_module = {
    PyModuleDef_HEAD_INIT, "bus._wire",
    "Three-frame bus messages sent and received with one call each (see bus/transport.py).",
    -1, wire_methods,
};

PyMODINIT_FUNC PyInit__wire(void) {
    underlying_name = PyUnicode_InternFromString("underlying");
    if (underlying_name == NULL)
        return NULL;
    return PyModule_Create(&wire_module);
}
