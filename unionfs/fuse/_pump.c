/* unionfs.fuse._pump: the request loop's hot path, compiled (built at install time; see pyproject.toml).
 *
 * Pump.next(buf, spin_ns) reads the kernel's requests from the FUSE device into buf and
 * answers, without entering Python code, those whose answer the union keeps on a node and
 * has declared fixed (see unionfs.union.inodes.Node: a lower-only, linked entry of the
 * union, whose image layers do not change while mounted):
 *
 *   GETATTR    of a node with a kept reply (Node.attrs_reply, with Node.attrs set),
 *   LISTXATTR  of a node with kept xattr names (Node.lower_xattrs, the union's realm 0),
 *   GETXATTR   of a name such a node does not have (ENODATA).
 *
 * The conditions are the ones unionfs.union.super.UnionFS.kept_attrs and
 * unionfs.union.inode.InodeOps._lower_xattrs apply: the node is in the inode table, not
 * in the upper layer and has a link (an unlinked, open file's attributes come from its
 * open file). Any other request, or one of these the pump cannot answer, is left in buf
 * and its length returned: the Python session serves it. The root (nodeid 1) is never
 * answered here: its xattrs include the daemon's control channel.
 *
 * Guarantees: every request read is either answered here (exactly once) or returned; no
 * Python code runs inside next(); the GIL is released while the device is polled.
 * Only public CPython API and the kernel's wire format (include/uapi/linux/fuse.h).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { OP_GETATTR = 3, OP_GETXATTR = 22, OP_LISTXATTR = 23 };
enum { ROOT_ID = 1, IN_HEADER = 40, OUT_HEADER = 16, XATTR_IN = 8, MAX_NAMES = 65536 };
enum { K_GETATTR, K_GETXATTR, K_LISTXATTR, KINDS };
static const char *const KIND_NAMES[KINDS] = {"getattr", "getxattr", "listxattr"};
/* fast answers in a row before next() returns PUMP_YIELD, so that the event loop runs (FAIRNESS) */
enum { BURST = 64, PUMP_NONE = -1, PUMP_YIELD = -2 };

struct in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

static PyObject *s_realm, *s_in_upper, *s_links, *s_attrs, *s_attrs_reply, *s_lower_xattrs;

typedef struct {
    PyObject_HEAD
    int fd;
    PyObject *nodes; /* dict: inode number -> Node (the union's inode table, same object for its life) */
    unsigned long long count[KINDS][3]; /* requests, nanoseconds, errors */
} Pump;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Send a reply; 0, or -1 with a Python exception set. ENOENT: the request was interrupted meanwhile. */
static int send_reply(Pump *p, struct iovec *iov, int n) {
    ssize_t r = writev(p->fd, iov, n);
    if (r < 0 && errno != ENOENT) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static int reply(Pump *p, uint64_t unique, int err, const void *body, size_t len) {
    struct out_header h = {(uint32_t)(OUT_HEADER + len), -err, unique};
    struct iovec iov[2] = {{&h, OUT_HEADER}, {(void *)body, len}};
    return send_reply(p, iov, len ? 2 : 1);
}

/* The attribute `name` of `node` (a new reference), or NULL with no exception set. */
static PyObject *field(PyObject *node, PyObject *name) {
    PyObject *v = PyObject_GetAttr(node, name);
    if (v == NULL)
        PyErr_Clear();
    return v;
}

/* The node of `nodeid` if it is fixed: in the table, not in the upper layer, linked. New reference or NULL. */
static PyObject *fixed_node(Pump *p, uint64_t nodeid) {
    if (nodeid == ROOT_ID)
        return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(nodeid);
    if (key == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *node = PyDict_GetItemWithError(p->nodes, key); /* borrowed */
    Py_DECREF(key);
    if (node == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_INCREF(node);
    PyObject *in_upper = field(node, s_in_upper), *links = field(node, s_links);
    int fixed = in_upper == Py_False && links != NULL && PyList_Check(links) && PyList_GET_SIZE(links) > 0;
    Py_XDECREF(in_upper);
    Py_XDECREF(links);
    if (!fixed) {
        Py_DECREF(node);
        return NULL;
    }
    return node;
}

/* The kept xattr names of a fixed node of the union's realm 0 (a new reference to a tuple of bytes), or NULL. */
static PyObject *kept_names(PyObject *node) {
    PyObject *realm = field(node, s_realm);
    int in_union = realm != NULL && PyLong_CheckExact(realm) && PyLong_AsLong(realm) == 0;
    Py_XDECREF(realm);
    if (!in_union)
        return NULL;
    PyObject *names = field(node, s_lower_xattrs);
    if (names != NULL && !PyTuple_Check(names)) {
        Py_DECREF(names);
        return NULL;
    }
    return names;
}

/* GETXATTR of `node`'s kept `names`: ENODATA for a name it does not have; -1 (not answered) for one it has. */
static int absent_name(Pump *p, const struct in_header *in, const char *want, size_t room, PyObject *names) {
    size_t len = strnlen(want, room);
    if (len == room) /* a name without its NUL: Python's to refuse */
        return -1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        if (!PyBytes_CheckExact(name))
            return -1;
        if ((size_t)PyBytes_GET_SIZE(name) == len && memcmp(PyBytes_AS_STRING(name), want, len) == 0)
            return -1; /* present: its value is read by Python */
    }
    return reply(p, in->unique, ENODATA, NULL, 0) < 0 ? -2 : ENODATA;
}

/* LISTXATTR of `node`'s kept `names` with a buffer of `size` bytes: 0 or ERANGE answered, -1 not, -2 error. */
static int list_names(Pump *p, const struct in_header *in, uint32_t size, PyObject *names) {
    char joined[MAX_NAMES];
    size_t total = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        if (!PyBytes_CheckExact(name) || total + (size_t)PyBytes_GET_SIZE(name) + 1 > MAX_NAMES)
            return -1;
        memcpy(joined + total, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name));
        total += (size_t)PyBytes_GET_SIZE(name);
        joined[total++] = '\0';
    }
    int rc;
    if (size == 0) {
        uint32_t out[2] = {(uint32_t)total, 0}; /* struct fuse_getxattr_out: the size it needs */
        rc = reply(p, in->unique, 0, out, sizeof out);
    } else if (total > size) {
        rc = reply(p, in->unique, ERANGE, NULL, 0);
        if (rc == 0)
            return ERANGE;
    } else {
        rc = reply(p, in->unique, 0, joined, total);
    }
    return rc < 0 ? -2 : 0;
}

/* Answer the request in `buf` if it is one of ours: 1 answered, 0 left to Python, -1 error (exception set). */
static int answer(Pump *p, const char *buf, Py_ssize_t n) {
    const struct in_header *in = (const struct in_header *)buf;
    uint32_t op = in->opcode;
    if ((op != OP_GETATTR && op != OP_GETXATTR && op != OP_LISTXATTR) || (Py_ssize_t)in->len != n)
        return 0;
    if (op != OP_GETATTR && n < IN_HEADER + XATTR_IN)
        return 0;
    uint64_t t0 = now_ns();
    PyObject *node = fixed_node(p, in->nodeid);
    if (node == NULL)
        return 0;
    int kind = -1, r = -1; /* r: -1 not answered, -2 error, else the errno answered (0: a reply) */
    if (op == OP_GETATTR) {
        PyObject *attrs = field(node, s_attrs), *body = field(node, s_attrs_reply);
        if (attrs != NULL && attrs != Py_None && body != NULL && PyBytes_CheckExact(body)) {
            kind = K_GETATTR;
            r = reply(p, in->unique, 0, PyBytes_AS_STRING(body), (size_t)PyBytes_GET_SIZE(body)) < 0 ? -2 : 0;
        }
        Py_XDECREF(attrs);
        Py_XDECREF(body);
    } else {
        PyObject *names = kept_names(node);
        if (names != NULL) {
            if (op == OP_GETXATTR) {
                kind = K_GETXATTR;
                r = absent_name(p, in, buf + IN_HEADER + XATTR_IN, (size_t)(n - IN_HEADER - XATTR_IN), names);
            } else {
                uint32_t size;
                memcpy(&size, buf + IN_HEADER, sizeof size);
                kind = K_LISTXATTR;
                r = list_names(p, in, size, names);
            }
            Py_DECREF(names);
        }
    }
    Py_DECREF(node);
    if (r == -1)
        return 0;
    if (r == -2)
        return -1;
    p->count[kind][0] += 1;
    p->count[kind][1] += now_ns() - t0;
    p->count[kind][2] += r != 0;
    return 1;
}

/* One read of the device: its length, PUMP_NONE if nothing is waiting, 0 once the connection has ended, -3 error. */
static Py_ssize_t read_one(int fd, char *buf, Py_ssize_t size) {
    for (;;) {
        ssize_t r = read(fd, buf, (size_t)size);
        if (r >= 0)
            return r;
        if (errno == EINTR || errno == ENOENT) /* (ENOENT: interrupted before we read it) */
            continue;
        if (errno == EAGAIN)
            return PUMP_NONE;
        if (errno == ENODEV) /* unmounted */
            return 0;
        return -3;
    }
}

static PyObject *Pump_next(Pump *p, PyObject *args) {
    Py_buffer view;
    long long spin_ns;
    if (!PyArg_ParseTuple(args, "w*L", &view, &spin_ns))
        return NULL;
    char *buf = view.buf;
    Py_ssize_t n = 0;
    for (int served = 0;; served++) {
        if (served == BURST) {
            n = PUMP_YIELD;
            break;
        }
        n = read_one(p->fd, buf, view.len);
        if (n == PUMP_NONE && spin_ns > 0) {
            uint64_t deadline = now_ns() + (uint64_t)spin_ns;
            Py_BEGIN_ALLOW_THREADS
            while (n == PUMP_NONE && now_ns() < deadline) {
                sched_yield(); /* a client sharing this core gets it while we wait for its next request */
                n = read_one(p->fd, buf, view.len);
            }
            Py_END_ALLOW_THREADS
        }
        if (n == -3) {
            PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
        if (n < IN_HEADER) /* none waiting, the end, or (never) a short request: Python's */
            break;
        if (answer(p, buf, n) != 1) /* left for Python, or an error (set) */
            break;
    }
    PyBuffer_Release(&view);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromSsize_t(n);
}

static PyObject *Pump_counts(Pump *p, PyObject *Py_UNUSED(ignored)) {
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (int k = 0; k < KINDS; k++) {
        if (p->count[k][0] == 0)
            continue;
        PyObject *t = Py_BuildValue("(KKK)", p->count[k][0], p->count[k][1], p->count[k][2]);
        if (t == NULL || PyDict_SetItemString(d, KIND_NAMES[k], t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(t);
    }
    return d;
}

static int Pump_init(Pump *p, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "nodes", NULL};
    PyObject *nodes;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO!", kwlist, &p->fd, &PyDict_Type, &nodes))
        return -1;
    Py_INCREF(nodes);
    Py_XSETREF(p->nodes, nodes);
    memset(p->count, 0, sizeof p->count);
    return 0;
}

static void Pump_dealloc(Pump *p) {
    Py_XDECREF(p->nodes);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Pump_methods[] = {
    {"next", (PyCFunction)Pump_next, METH_VARARGS,
     "next(buf, spin_ns) -> int: read requests into buf, answering the ones whose answer is kept; the length "
     "of one left for Python, -1 if none is waiting (after polling up to spin_ns), -2 after a burst of answers "
     "(let the event loop run), 0 once the connection has ended."},
    {"counts", (PyCFunction)Pump_counts, METH_NOARGS,
     "counts() -> {operation: (requests, nanoseconds, errors)} of the requests answered here."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "unionfs.fuse._pump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pump(fd, nodes): the request loop's hot path on FUSE device fd, answering from the nodes of a "
              "dict {inode number: Node}.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "unionfs.fuse._pump",
    .m_doc = "The FUSE request loop's hot path, compiled.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__pump(void) {
    if ((s_realm = PyUnicode_InternFromString("realm")) == NULL ||
        (s_in_upper = PyUnicode_InternFromString("in_upper")) == NULL ||
        (s_links = PyUnicode_InternFromString("links")) == NULL ||
        (s_attrs = PyUnicode_InternFromString("attrs")) == NULL ||
        (s_attrs_reply = PyUnicode_InternFromString("attrs_reply")) == NULL ||
        (s_lower_xattrs = PyUnicode_InternFromString("lower_xattrs")) == NULL)
        return NULL;
    if (PyType_Ready(&PumpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PumpType);
    if (PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0) {
        Py_DECREF(&PumpType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
