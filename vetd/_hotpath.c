/*
 * vetd._hotpath: the read loop's warm answers, compiled.
 *
 * Why C: on a slow 2-vCPU VM the interpreter's share of a warm answer (statx through ctypes,
 * a dozen attribute loads, three frames) was 25 us against a 16 us kernel round trip, more than
 * a userspace decision may cost (docs/performance.md). Nothing here decides anything: Python
 * fills a table of answers it has already worked out (`FastAnswers`, every entry an allow that
 * needs no log line), clears it whenever what it stood on changes, and this code only looks
 * events up in it. Whatever it does not find, or does not understand, goes back to Python
 * untouched and in order, so the pure-Python loop stays the reference behaviour.
 *
 * Layouts follow the kernel's UAPI: struct fanotify_event_metadata (version 3) and
 * struct statx. The statx tuple is built field for field as vetd.fileid's struct does, so the
 * two produce equal (and equally hashed) keys.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define META_LEN 24
#define METADATA_VERSION 3
#define FAN_OPEN_PERM 0x00010000ULL
#define FAN_ACCESS_PERM 0x00020000ULL
#define FAN_OPEN_EXEC_PERM 0x00040000ULL
#define PERM_EVENTS (FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM)
#define FAN_ALLOW 0x01
#define VETD_AT_EMPTY_PATH 0x1000
#define VETD_AT_STATX_DONT_SYNC 0x4000
#define VETD_FAN_MARK_ADD 0x1
#define VETD_FAN_MARK_REMOVE 0x2
#define VETD_FAN_MARK_EVICTABLE 0x200
#define VETD_FAN_MARK_IGNORE 0x400
#define VETD_STATX_SIZE_TIMES 0x2C0  /* STATX_SIZE | STATX_MTIME | STATX_CTIME */
#define STATX_BUF 256

struct response {
    int32_t fd;
    uint32_t response;
};

static PyObject *empty_tuple; /* the token of rules that read no opener facts */

/* One statx() of an open fd into buf (256 bytes); 0 or -1 with errno. */
static int
fd_statx(int fd, unsigned int want, unsigned char *buf)
{
    long r;
    Py_BEGIN_ALLOW_THREADS  /* statx may wait on a network filesystem: others may run */
    r = syscall(SYS_statx, fd, "", VETD_AT_EMPTY_PATH, want, buf);
    Py_END_ALLOW_THREADS
    return r == 0 ? 0 : -1;
}

#define U16(o) ({ uint16_t v_; memcpy(&v_, b + (o), 2); v_; })
#define U32(o) ({ uint32_t v_; memcpy(&v_, b + (o), 4); v_; })
#define U64(o) ({ uint64_t v_; memcpy(&v_, b + (o), 8); v_; })
#define I64(o) ({ int64_t v_; memcpy(&v_, b + (o), 8); v_; })

/* (mask, nlink, mode, ino, size, ctime_s, ctime_ns, mtime_s, mtime_ns, dev_major, dev_minor,
 * mnt_id): vetd.fileid's positions. A new reference, or NULL with an exception set. */
static PyObject *
statx_tuple(const unsigned char *b)
{
    PyObject *t = PyTuple_New(12);
    if (t == NULL)
        return NULL;
    PyObject *v[12] = {
        PyLong_FromUnsignedLong(U32(0)),
        PyLong_FromUnsignedLong(U32(16)),
        PyLong_FromUnsignedLong(U16(28)),
        PyLong_FromUnsignedLongLong(U64(32)),
        PyLong_FromUnsignedLongLong(U64(40)),
        PyLong_FromLongLong(I64(96)),
        PyLong_FromUnsignedLong(U32(104)),
        PyLong_FromLongLong(I64(112)),
        PyLong_FromUnsignedLong(U32(120)),
        PyLong_FromUnsignedLong(U32(136)),
        PyLong_FromUnsignedLong(U32(140)),
        PyLong_FromUnsignedLongLong(U64(144)),
    };
    for (int i = 0; i < 12; i++) {
        if (v[i] == NULL) {
            for (int j = i + 1; j < 12; j++)
                Py_XDECREF(v[j]);
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v[i]);
    }
    return t;
}

static PyObject *
hot_statx(PyObject *self, PyObject *args)
{
    int fd;
    unsigned int want;
    unsigned char buf[STATX_BUF];
    if (!PyArg_ParseTuple(args, "iI", &fd, &want))
        return NULL;
    if (fd_statx(fd, want, buf) != 0)
        Py_RETURN_NONE;
    return statx_tuple(buf);
}

/* What the caller hands in for one pass over a batch. */
struct pass {
    const unsigned char *buf;
    Py_ssize_t start, end;
    int gfd;
    PyObject *table;      /* dict: (mask, token, statx tuple) -> slot */
    PyObject *tokens;     /* dict pid -> token, or None: no opener facts in the key */
    PyObject *exec_opens; /* dict pid -> key of an exec awaiting its open, or None */
    unsigned int want;
    int64_t *counts;      /* answers per slot */
    Py_ssize_t ncounts;
};

/* Answer what the table knows, from pass->start, up to the first event that is not a
 * permission event (it goes to Python in order) or cannot be parsed (*stop). Returns the
 * leftovers, a list of (offset, statx tuple or None) of the permission events left to Python;
 * NULL on an exception (nothing answered is lost: the kernel took those answers). */
static PyObject *
run_pass(struct pass *ps, Py_ssize_t *stop, long *seen_out, long *answered_out)
{
    const unsigned char *buf = ps->buf;
    Py_ssize_t off = ps->start;
    long seen = 0, answered = 0;
    PyObject *left = PyList_New(0);
    *stop = off;
    *seen_out = *answered_out = 0;
    if (left == NULL)
        return NULL;  /* nothing done: the caller leaves the whole batch to Python */
    while (off + META_LEN <= ps->end) {
        const unsigned char *b = buf + off;
        uint32_t len = U32(0);
        uint8_t vers = b[4];
        uint16_t meta_len = U16(6);
        uint64_t mask = U64(8);
        int32_t fd, pid;
        memcpy(&fd, b + 16, 4);
        memcpy(&pid, b + 20, 4);
        if (vers != METADATA_VERSION || len < META_LEN || off + (Py_ssize_t)len > ps->end)
            break;
        if (!(mask & PERM_EVENTS))
            break;
        seen++;
        PyObject *t = NULL, *slot = NULL;
        /* want 0: the state has no table (nothing to look up), so make no statx either */
        int eligible = fd >= 0 && meta_len == len && !(mask & FAN_OPEN_EXEC_PERM) && ps->want;
        PyObject *pidobj = NULL;
        if (eligible && (ps->tokens != Py_None || ps->exec_opens != Py_None)) {
            pidobj = PyLong_FromLong(pid);
            if (pidobj == NULL)
                goto fail;
        }
        if (eligible && ps->exec_opens != Py_None && (mask & FAN_OPEN_PERM)) {
            int in = PyDict_Contains(ps->exec_opens, pidobj);
            if (in < 0)
                goto fail_pid;
            if (in)
                eligible = 0;  /* the second half of an exec: Python pairs it */
        }
        if (eligible) {
            unsigned char sx[STATX_BUF];
            if (fd_statx(fd, ps->want, sx) == 0) {
                t = statx_tuple(sx);
                if (t == NULL)
                    goto fail_pid;
            } else {
                eligible = 0;
            }
        }
        if (eligible) {
            PyObject *tok = empty_tuple;
            if (ps->tokens != Py_None) {
                tok = PyDict_GetItemWithError(ps->tokens, pidobj);  /* borrowed */
                if (tok == NULL && PyErr_Occurred())
                    goto fail_t;
            }
            if (tok != NULL) {
                PyObject *maskobj = PyLong_FromUnsignedLongLong(mask);
                if (maskobj == NULL)
                    goto fail_t;
                PyObject *key = PyTuple_Pack(3, maskobj, tok, t);
                Py_DECREF(maskobj);
                if (key == NULL)
                    goto fail_t;
                slot = PyDict_GetItemWithError(ps->table, key);  /* borrowed */
                Py_DECREF(key);
                if (slot == NULL && PyErr_Occurred())
                    goto fail_t;
            }
        }
        Py_XDECREF(pidobj);
        pidobj = NULL;
        if (slot != NULL) {
            long s = PyLong_AsLong(slot);
            if (s == -1 && PyErr_Occurred())
                goto fail_t;
            struct response r = {fd, FAN_ALLOW};
            /* ENOENT: the opener is gone (killed); the answer is moot, the fd still ours */
            if (write(ps->gfd, &r, sizeof r) == (ssize_t)sizeof r || errno == ENOENT) {
                close(fd);
                if (s >= 0 && s < ps->ncounts)
                    ps->counts[s]++;
                answered++;
                Py_XDECREF(t);
                off += len;
                continue;
            }
            /* any other failure: Python's path answers it, or its last resort does */
        }
        PyObject *item = Py_BuildValue("(nO)", off, t != NULL ? t : Py_None);
        Py_XDECREF(t);
        if (item == NULL || PyList_Append(left, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
        off += len;
        continue;
    fail_t:
        Py_XDECREF(t);
    fail_pid:
        Py_XDECREF(pidobj);
    fail:
        /* Nothing of this event was answered: stop here and leave it, and the rest of the
         * batch, to Python, whose own path (and last resort) answers every event. */
        PyErr_Clear();
        seen--;
        break;
    }
    *stop = off;
    *seen_out = seen;
    *answered_out = answered;
    return left;
}

static int
parse_pass(struct pass *ps, Py_buffer *buf, Py_buffer *counts, PyObject *table, PyObject *tokens,
           PyObject *exec_opens)
{
    if (!PyDict_Check(table) || (tokens != Py_None && !PyDict_Check(tokens))
        || (exec_opens != Py_None && !PyDict_Check(exec_opens))) {
        PyErr_SetString(PyExc_TypeError, "table must be a dict; tokens and exec_opens dicts or None");
        return -1;
    }
    if (counts->itemsize != 8 || counts->len % 8 != 0) {
        PyErr_SetString(PyExc_TypeError, "counts must be an array of 64-bit integers");
        return -1;
    }
    ps->buf = buf->buf;
    ps->table = table;
    ps->tokens = tokens;
    ps->exec_opens = exec_opens;
    ps->counts = counts->buf;
    ps->ncounts = counts->len / 8;
    return 0;
}

PyDoc_STRVAR(answer_doc,
"answer(buf, start, end, gfd, table, tokens, exec_opens, want, counts)\n"
"-> (stop, seen, answered, leftovers)\n\n"
"Answer the permission events of buf[start:end] that table knows, up to the first event\n"
"that is not one (stop). leftovers: (offset, statx tuple or None) of those left to Python.");

static PyObject *
hot_answer(PyObject *self, PyObject *args)
{
    Py_buffer buf, counts;
    struct pass ps;
    PyObject *table, *tokens, *exec_opens, *res = NULL;
    if (!PyArg_ParseTuple(args, "y*nniOOOIw*", &buf, &ps.start, &ps.end, &ps.gfd, &table, &tokens,
                          &exec_opens, &ps.want, &counts))
        return NULL;
    if (ps.start < 0 || ps.end > buf.len || ps.start > ps.end)
        PyErr_SetString(PyExc_ValueError, "start/end outside the buffer");
    else if (parse_pass(&ps, &buf, &counts, table, tokens, exec_opens) == 0) {
        Py_ssize_t stop;
        long seen, answered;
        PyObject *left = run_pass(&ps, &stop, &seen, &answered);
        if (left != NULL)
            res = Py_BuildValue("(nllN)", stop, seen, answered, left);
    }
    PyBuffer_Release(&buf);
    PyBuffer_Release(&counts);
    return res;
}

/* Slots of the flags array the loop shares with Python. */
enum {
    FLAG_SERIAL,   /* bumped by Python at every state swap */
    FLAG_MOVES,    /* set while the housekeeper drains a move and clears what it voids */
    FLAG_SEEN,     /* permission events this loop took (Python adds them to its counters) */
    FLAG_BUSY_NS,  /* CLOCK_MONOTONIC ns when the current batch was read; 0 while in read() */
    FLAG_STOP,     /* set by Python when vetd stops */
    FLAG_POLL_MAX_NS,   /* [daemon] busy_poll_us: the longest poll before read() sleeps; 0 off */
    FLAG_POLL_NS,       /* the poll window now (adapts within 0..max, see read_batch) */
    FLAG_POLL_CAUGHT,   /* batches that came while polling */
    FLAG_POLL_SPENT_NS, /* time spent polling, caught or not: what the polling costs in CPU */
    NFLAGS
};

static int64_t
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Wait for the next batch and read it, without the GIL. With busy polling on, poll() the fd
 * (never blocking) for up to the current window first: a thread asleep in read() is woken by
 * the event, and where an idle CPU halts (most VMs, where haltpoll is off) that wake-up costs
 * tens of microseconds on the opener's critical path; measured on a 2-vCPU Firecracker VM,
 * a bare C listener's round trip was 89 us sleeping and 29 us polling 50 us first.
 *
 * The window adapts as KVM's halt polling does, so polling is spent only where it pays: a wait
 * that ended within the maximum after it began, but after the window ran out, doubles the
 * window (from max/4); a wait longer than the maximum halves it, down to 0 (no polling). With
 * traffic sparser than the maximum the window therefore stays at 0 and costs nothing. Between
 * polls the thread yields: where the opener shares this CPU it runs at once instead of waiting
 * for the poll to end (one CPU, warm answers: 15.4 us with a bare spin, 13.7 us yielding). */
static ssize_t
read_batch(int gfd, void *buf, size_t len, int64_t *flags)
{
    int64_t max = flags[FLAG_POLL_MAX_NS], w = flags[FLAG_POLL_NS];
    int64_t t0 = 0, polled = 0;
    int caught = 0;
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    if (max > 0) {
        if (w > max)
            w = max;  /* a reload lowered the maximum */
        t0 = monotonic_ns();
        if (w > 0) {
            struct pollfd p = {.fd = gfd, .events = POLLIN};
            int64_t now = t0;
            while (now - t0 < w) {
                if (poll(&p, 1, 0) != 0) {  /* ready, or an error read() then reports */
                    caught = 1;
                    break;
                }
                sched_yield();
                now = monotonic_ns();
            }
            polled = now - t0;
        }
    }
    do {
        n = read(gfd, buf, len);
    } while (n < 0 && errno == EINTR);
    if (max > 0) {
        int64_t waited = monotonic_ns() - t0;
        if (caught)
            ;  /* the window was long enough */
        else if (waited <= max) {
            w = w > 0 ? 2 * w : max / 4;
            if (w > max)
                w = max;
        } else {
            w /= 2;
            if (w < max / 16)
                w = 0;
        }
        flags[FLAG_POLL_NS] = w;
        flags[FLAG_POLL_CAUGHT] += caught;
        flags[FLAG_POLL_SPENT_NS] += polled;
    }
    Py_END_ALLOW_THREADS
    return n;
}

PyDoc_STRVAR(run_doc,
"run(gfd, buf, side_epfd, flags, expected, table, tokens, exec_opens, want, counts)\n"
"-> (n, stop, answered, leftovers)\n\n"
"Read batches from gfd (blocking, without the GIL) and answer them from table, for as long\n"
"as each is answered whole. Returns the batch that was not: leftovers and stop as answer()\n"
"gives them (stop < n: the event there is Python's), or stop -1 and, in place of leftovers,\n"
"the fds side_epfd reported, when a side channel has news, flags[FLAG_SERIAL] != expected,\n"
"flags[FLAG_MOVES] or flags[FLAG_STOP] is set; then nothing of that batch was answered.");

static PyObject *
hot_run(PyObject *self, PyObject *args)
{
    Py_buffer buf, counts, fl;
    struct pass ps;
    PyObject *table, *tokens, *exec_opens, *res = NULL;
    int side_epfd;
    long long expected;
    if (!PyArg_ParseTuple(args, "iw*iw*LOOOIw*", &ps.gfd, &buf, &side_epfd, &fl, &expected,
                          &table, &tokens, &exec_opens, &ps.want, &counts))
        return NULL;
    if (fl.itemsize != 8 || fl.len < NFLAGS * 8) {
        PyErr_SetString(PyExc_TypeError, "flags must be an array of 64-bit integers, NFLAGS long");
        goto out;
    }
    if (parse_pass(&ps, &buf, &counts, table, tokens, exec_opens) != 0)
        goto out;
    int64_t *flags = fl.buf;
    for (;;) {
        ssize_t n;
        flags[FLAG_BUSY_NS] = 0;
        n = read_batch(ps.gfd, buf.buf, (size_t)buf.len, flags);
        flags[FLAG_BUSY_NS] = monotonic_ns();
        if (n < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
        int pending = flags[FLAG_SERIAL] != expected || flags[FLAG_MOVES] || flags[FLAG_STOP];
        struct epoll_event evs[8];
        int nready = 0;
        if (side_epfd >= 0) {
            /* Polled even when pending already: a mountinfo change is reported to one poll
             * only, so what this one saw is handed back. */
            nready = epoll_wait(side_epfd, evs, 8, 0);
            if (nready != 0)
                pending = 1;  /* an error too: Python's own poll reports it */
        }
        if (pending) {
            PyObject *ready = PyTuple_New(nready > 0 ? nready : 0);
            if (ready == NULL)
                goto out;
            for (int i = 0; i < nready; i++) {
                PyObject *fdobj = PyLong_FromLong(evs[i].data.fd);
                if (fdobj == NULL) {
                    Py_DECREF(ready);
                    goto out;
                }
                PyTuple_SET_ITEM(ready, i, fdobj);
            }
            res = Py_BuildValue("(nnlN)", (Py_ssize_t)n, (Py_ssize_t)-1, 0L, ready);
            goto out;
        }
        ps.start = 0;
        ps.end = n;
        Py_ssize_t stop;
        long seen, answered;
        PyObject *left = run_pass(&ps, &stop, &seen, &answered);
        if (left == NULL) {  /* out of memory before anything was done: all to Python */
            PyErr_Clear();
            res = Py_BuildValue("(nnlN)", (Py_ssize_t)n, (Py_ssize_t)0, 0L, PyList_New(0));
            goto out;
        }
        flags[FLAG_SEEN] += seen;
        if (PyList_GET_SIZE(left) == 0 && stop + META_LEN > n) {
            Py_DECREF(left);
            continue;  /* all answered: the next batch, without going back to Python */
        }
        res = Py_BuildValue("(nnlN)", (Py_ssize_t)n, stop, answered, left);
        goto out;
    }
out:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&fl);
    return res;
}

PyDoc_STRVAR(allow_marked_doc,
"allow_marked(gfd, fd, mask, mtime_ns, ctime_ns, size, close[, answer_fd]) -> (delivered, marked)\n\n"
"Allow a scanned clean file's event and let the kernel answer its later opens: put an\n"
"evictable ignore mark for mask on its inode, check the file is still the version that was\n"
"scanned (mtime, ctime, size) and take the mark off again if not, then write the answer and,\n"
"with close, close fd. All of it is one call without the GIL: made from Python it was four\n"
"calls, each giving the GIL up, and where another thread waits for it each of those is a\n"
"thread wake-up. marked: 1 kept, 0 withdrawn (the file changed), -1 refused by the kernel.\n"
"delivered is False if the event was gone (ENOENT: the opener was killed). Any other failed\n"
"write raises OSError and leaves fd open. answer_fd (default fd) is the number the answer names:\n"
"a scan process answers for the reading process, whose fd number the kernel knows the event by.");

static PyObject *
hot_allow_marked(PyObject *self, PyObject *args)
{
    int gfd, fd, close_it, answer_fd = -1;
    unsigned long long mask;
    long long mtime_ns, ctime_ns, size;
    if (!PyArg_ParseTuple(args, "iiKLLLp|i", &gfd, &fd, &mask, &mtime_ns, &ctime_ns, &size, &close_it,
                          &answer_fd))
        return NULL;
    if (answer_fd < 0)
        answer_fd = fd;
    int marked = -1, delivered = 1, err = 0;
    Py_BEGIN_ALLOW_THREADS
    if (syscall(SYS_fanotify_mark, gfd, VETD_FAN_MARK_ADD | VETD_FAN_MARK_IGNORE
                | VETD_FAN_MARK_EVICTABLE, mask, fd, NULL) == 0) {
        /* The mark comes first: a write after it clears it, one before it shows here. What
         * this kernel has cached is what counts (DONT_SYNC: a network filesystem is not asked
         * again; changes it does not see raise no fanotify events either). */
        unsigned char b[STATX_BUF];
        marked = 0;
        if (syscall(SYS_statx, fd, "", VETD_AT_EMPTY_PATH | VETD_AT_STATX_DONT_SYNC,
                    VETD_STATX_SIZE_TIMES, b) == 0
            && (long long)U64(40) == size
            && I64(112) * 1000000000LL + U32(120) == mtime_ns
            && I64(96) * 1000000000LL + U32(104) == ctime_ns)
            marked = 1;
        else
            syscall(SYS_fanotify_mark, gfd, VETD_FAN_MARK_REMOVE | VETD_FAN_MARK_IGNORE, mask, fd, NULL);
    }
    struct response r = {answer_fd, FAN_ALLOW};
    if (write(gfd, &r, sizeof r) != (ssize_t)sizeof r) {
        if (errno == ENOENT)
            delivered = 0;
        else
            err = errno;
    }
    if (close_it && !err)
        close(fd);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(Oi)", delivered ? Py_True : Py_False, marked);
}

static PyMethodDef methods[] = {
    {"allow_marked", hot_allow_marked, METH_VARARGS, allow_marked_doc},
    {"statx", hot_statx, METH_VARARGS,
     "statx(fd, want) -> vetd.fileid's 12-field tuple, or None if statx failed"},
    {"answer", hot_answer, METH_VARARGS, answer_doc},
    {"run", hot_run, METH_VARARGS, run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vetd._hotpath",
    "The read loop's warm answers, compiled (see the source's header).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__hotpath(void)
{
    empty_tuple = PyTuple_New(0);
    if (empty_tuple == NULL)
        return NULL;
    return PyModule_Create(&module);
}
