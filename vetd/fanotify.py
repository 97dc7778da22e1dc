"""vetd's own fanotify binding: the only module that speaks to the kernel's fanotify API.

pyfanotify cannot answer permission events, so vetd carries this small ctypes binding. It knows
the structures of <linux/fanotify.h>, probes which features this kernel accepts, and offers
exactly what the daemon needs: a group, marks, batched reads parsed into events, responses, and
evictable ignore marks for the kernel-side cache.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

# --- event mask bits -------------------------------------------------------------------------
FAN_ACCESS = 0x00000001
FAN_MODIFY = 0x00000002
FAN_CLOSE_WRITE = 0x00000008
FAN_CLOSE_NOWRITE = 0x00000010
FAN_OPEN = 0x00000020
FAN_MOVED_FROM = 0x00000040
FAN_MOVED_TO = 0x00000080
FAN_MOVE = FAN_MOVED_FROM | FAN_MOVED_TO
FAN_OPEN_EXEC = 0x00001000
FAN_Q_OVERFLOW = 0x00004000
FAN_OPEN_PERM = 0x00010000
FAN_ACCESS_PERM = 0x00020000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_ONDIR = 0x40000000
PERM_EVENTS = FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM

# --- fanotify_init flags -----------------------------------------------------------------------
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_CLASS_CONTENT = 0x00000004
FAN_CLASS_PRE_CONTENT = 0x00000008
FAN_UNLIMITED_QUEUE = 0x00000010
FAN_UNLIMITED_MARKS = 0x00000020
FAN_ENABLE_AUDIT = 0x00000040
FAN_REPORT_PIDFD = 0x00000080
FAN_REPORT_FID = 0x00000200
FAN_REPORT_DIR_FID = 0x00000400
FAN_REPORT_NAME = 0x00000800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

# --- fanotify_mark flags -----------------------------------------------------------------------
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_DONT_FOLLOW = 0x00000004
FAN_MARK_FLUSH = 0x00000080
FAN_MARK_EVICTABLE = 0x00000200
FAN_MARK_IGNORE = 0x00000400
FAN_MARK_IGNORED_MASK = 0x00000020
FAN_MARK_INODE = 0x00000000
FAN_MARK_MOUNT = 0x00000010
FAN_MARK_FILESYSTEM = 0x00000100

# --- responses -----------------------------------------------------------------------------------
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_AUDIT = 0x10
FAN_INFO = 0x20
FAN_RESPONSE_INFO_AUDIT_RULE = 1

FAN_EVENT_INFO_TYPE_PIDFD = 4
FAN_NOFD = -1
FAN_NOPIDFD = -1
FAN_EPIDFD = -2
FANOTIFY_METADATA_VERSION = 3

_METADATA = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO_HDR = struct.Struct("=BBH")
_PIDFD_INFO = struct.Struct("=i")
_RESPONSE = struct.Struct("=iI")
_AUDIT_RULE = struct.Struct("=BBHIII")  # hdr type, pad, len, rule_number, subj_trust, obj_trust
# For a read loop that parses batches itself (vetd's does, to skip an object per event).
METADATA = _METADATA
RESPONSE = _RESPONSE

_libc = ctypes.CDLL(None, use_errno=True)
_fanotify_init = _libc.fanotify_init
_fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_fanotify_init.restype = ctypes.c_int
_fanotify_mark = _libc.fanotify_mark
_fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_fanotify_mark.restype = ctypes.c_int

AT_FDCWD = -100
READ_SIZE = 256 * 1024
# A read that returned at least this many events may have left more behind (the buffer filled:
# an event with a pidfd record is 32 bytes); fewer means the queue was drained.
FULL_BATCH = READ_SIZE // 32 - 64
# O_NONBLOCK: the kernel's open of a FIFO for the event fd must not wait for a writer.
EVENT_F_FLAGS = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC | os.O_NONBLOCK


class FanotifyError(OSError):
    """An fanotify call failed; the message names the call and what it was asked to do."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise FanotifyError(err, f"{what}: {os.strerror(err)}")
    return ret


def deny_errno_response(err: int) -> int:
    """FAN_DENY_ERRNO(e): a deny that makes open() fail with errno e (pre-content groups, 6.14+)."""
    return FAN_DENY | ((err & 0xFF) << 24)


@dataclass(slots=True)
class Event:
    """One event as the kernel reported it. `fd` and `pidfd` are owned by whoever answers it."""

    mask: int
    fd: int
    pid: int
    pidfd: int = FAN_NOPIDFD

    @property
    def is_permission(self) -> bool:
        return bool(self.mask & PERM_EVENTS)


def parse_events(buf: bytes | bytearray, end: int | None = None) -> list[Event]:
    """Split one read() of the group fd (the first `end` bytes of buf) into events, with their
    pidfd info records if present."""
    events: list[Event] = []
    off = 0
    if end is None:
        end = len(buf)
    meta_size = _METADATA.size
    while off + meta_size <= end:
        event_len, vers, _res, meta_len, mask, fd, pid = _METADATA.unpack_from(buf, off)
        if vers != FANOTIFY_METADATA_VERSION:
            raise FanotifyError(errno.EPROTO, f"fanotify metadata version {vers}, expected 3")
        if event_len < meta_size or off + event_len > end:
            break
        ev = Event(mask, fd, pid)
        if meta_len < event_len:
            ev.pidfd = pidfd_of(buf, off + meta_len, off + event_len)
        events.append(ev)
        off += event_len
    return events


def pidfd_of(buf: bytes | bytearray, info: int, stop: int) -> int:
    """The pidfd in an event's info records (buf[info:stop]), or FAN_NOPIDFD."""
    while info + _INFO_HDR.size <= stop:
        itype, _pad, ilen = _INFO_HDR.unpack_from(buf, info)
        if ilen == 0:
            break
        if itype == FAN_EVENT_INFO_TYPE_PIDFD:
            return _PIDFD_INFO.unpack_from(buf, info + _INFO_HDR.size)[0]  # type: ignore[no-any-return]
        info += ilen
    return FAN_NOPIDFD


@dataclass
class Features:
    """What this kernel accepted when probed; logged at start-up so operators know what is in use."""

    pre_content: bool = False
    report_pidfd: bool = False
    deny_errno: bool = False
    evictable_ignore: bool = False
    exec_perm: bool = False
    audit: bool = False
    filesystem_marks: bool = False
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        on = [k for k in ("pre_content", "report_pidfd", "deny_errno", "evictable_ignore",
                          "exec_perm", "audit", "filesystem_marks") if getattr(self, k)]
        off = [k for k in ("pre_content", "report_pidfd", "deny_errno", "evictable_ignore",
                           "exec_perm", "audit", "filesystem_marks") if not getattr(self, k)]
        return f"in use: {', '.join(on) or 'none'}; unavailable: {', '.join(off) or 'none'}"


class Group:
    """A fanotify group: the fd the kernel queues events on and takes answers from."""

    def __init__(self, fd: int, features: Features):
        self.fd = fd
        self.features = features

    # ---- creation ----------------------------------------------------------------------------
    @classmethod
    def open(cls, *, want_audit: bool = False, want_pidfd: bool = True) -> "Group":
        """Create the best group this kernel allows, falling back feature by feature.

        A pidfd per event costs the kernel an allocation and us a close(): ask for one only
        when decisions read the subject."""
        feats = Features()
        base = FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_QUEUE | FAN_UNLIMITED_MARKS
        attempts = []
        for klass in (FAN_CLASS_PRE_CONTENT, FAN_CLASS_CONTENT):
            for pidfd in ((FAN_REPORT_PIDFD, 0) if want_pidfd else (0,)):
                for audit in ((FAN_ENABLE_AUDIT, 0) if want_audit else (0,)):
                    attempts.append((klass, pidfd, audit))
        last_err: FanotifyError | None = None
        for klass, pidfd, audit in attempts:
            ret = _fanotify_init(base | klass | pidfd | audit, EVENT_F_FLAGS)
            if ret >= 0:
                feats.pre_content = klass == FAN_CLASS_PRE_CONTENT
                feats.report_pidfd = bool(pidfd)
                feats.audit = bool(audit)
                group = cls(ret, feats)
                group._probe_marks()
                return group
            err = ctypes.get_errno()
            last_err = FanotifyError(err, f"fanotify_init: {os.strerror(err)}")
            if err in (errno.EPERM, errno.ENOSYS):
                break
        assert last_err is not None
        if last_err.errno == errno.EPERM:
            raise FanotifyError(errno.EPERM, "fanotify_init refused: vetd needs CAP_SYS_ADMIN (run as root)")
        if last_err.errno == errno.ENOSYS:
            raise FanotifyError(errno.ENOSYS, "this kernel has no fanotify (CONFIG_FANOTIFY=y and "
                                "CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y are needed)")
        raise last_err

    def _probe_marks(self) -> None:
        """Probe mark features against a private anonymous inode-free target: our own pipe fd."""
        f = self.features
        r, w = os.pipe()
        try:
            # Exec permission events (5.0+): an inode mark on a pipe is accepted by the kernel.
            f.exec_perm = _fanotify_mark(self.fd, FAN_MARK_ADD, FAN_OPEN_EXEC_PERM, r, None) == 0
            if f.exec_perm:
                _fanotify_mark(self.fd, FAN_MARK_REMOVE, FAN_OPEN_EXEC_PERM, r, None)
            flags = FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_EVICTABLE
            f.evictable_ignore = _fanotify_mark(self.fd, flags, FAN_OPEN_PERM, r, None) == 0
            if not f.evictable_ignore:
                f.notes.append("kernel ignore marks unavailable (needs FAN_MARK_IGNORE, 6.0+): "
                               "repeat opens are answered from the userspace cache")
            else:
                _fanotify_mark(self.fd, FAN_MARK_REMOVE | FAN_MARK_IGNORE, FAN_OPEN_PERM, r, None)
        finally:
            os.close(r)
            os.close(w)
        f.deny_errno = f.pre_content and self.accepts_deny_errno(errno.EIO)
        # Filesystem marks are probed on the first real mark (they need a real filesystem).
        f.filesystem_marks = True

    def accepts_deny_errno(self, err: int) -> bool:
        """Whether FAN_DENY_ERRNO(err) is accepted (the kernel allows only a few errnos, and only
        in pre-content groups). Probed with an answer for an fd that has no event: EINVAL means
        refused, ENOENT means the response itself passed validation."""
        buf = _RESPONSE.pack(2147483000, deny_errno_response(err))
        try:
            os.write(self.fd, buf)
        except OSError as e:
            return e.errno == errno.ENOENT
        return True

    # ---- marks -------------------------------------------------------------------------------
    def mark(self, path: str | bytes, mask: int, *, kind: int = FAN_MARK_FILESYSTEM) -> None:
        """Add `mask` on the filesystem (or mount) holding `path`."""
        p = os.fsencode(path)
        _check(_fanotify_mark(self.fd, FAN_MARK_ADD | kind, mask, AT_FDCWD, p),
               f"fanotify_mark add {p.decode(errors='replace')}")

    def unmark(self, path: str | bytes, mask: int, *, kind: int = FAN_MARK_FILESYSTEM) -> None:
        p = os.fsencode(path)
        _check(_fanotify_mark(self.fd, FAN_MARK_REMOVE | kind, mask, AT_FDCWD, p),
               f"fanotify_mark remove {p.decode(errors='replace')}")

    def ignore_inode(self, event_fd: int, mask: int) -> bool:
        """Put an evictable ignore mark on the event's inode: the kernel answers later opens itself.

        Without SURV_MODIFY, so any write to the file clears it and the next open is vetted again.
        """
        if not self.features.evictable_ignore:
            return False
        flags = FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_EVICTABLE
        return _fanotify_mark(self.fd, flags, mask, event_fd, None) == 0

    def unignore_inode(self, event_fd: int, mask: int) -> None:
        """Take an inode's ignore mark off again (the file changed before it could count)."""
        _fanotify_mark(self.fd, FAN_MARK_REMOVE | FAN_MARK_IGNORE, mask, event_fd, None)

    def flush_marks(self) -> None:
        """Remove every mark of this group: no new event is raised from here on."""
        for kind in (FAN_MARK_FILESYSTEM, FAN_MARK_MOUNT, FAN_MARK_INODE):
            _fanotify_mark(self.fd, FAN_MARK_FLUSH | kind, 0, AT_FDCWD, None)

    def flush_ignores(self) -> None:
        """Drop all kernel-side cache entries (inode marks); filesystem and mount marks stay."""
        _fanotify_mark(self.fd, FAN_MARK_FLUSH | FAN_MARK_INODE, 0, AT_FDCWD, None)

    # ---- events and answers --------------------------------------------------------------------
    def read_into(self, buf: bytearray) -> list[Event]:
        """Read a batch into a buffer the caller keeps. os.read(fd, 256 KiB) allocates (and,
        past malloc's mmap threshold, maps and unmaps) a buffer on every call: about 10 us per
        event for a sequential opener, most of the cost of a warm answer."""
        n = os.readv(self.fd, [buf])
        return parse_events(buf, n)

    def read(self, size: int = READ_SIZE) -> list[Event]:
        try:
            buf = os.read(self.fd, size)
        except BlockingIOError:
            return []
        return parse_events(buf)

    def respond(self, event_fd: int, response: int, *, audit: bool = False,
                rule_number: int | None = None) -> bool:
        """Write one answer; False if the kernel had already dropped the event (ENOENT: the
        opener was killed while it waited), which is how a kill proves its target was alive.

        `audit` asks the kernel for an audit record of this answer, `rule_number` rides in it
        (both need a group made with FAN_ENABLE_AUDIT, else they are left out)."""
        if audit and self.features.audit:
            response |= FAN_AUDIT
            if rule_number is not None:
                response |= FAN_INFO
        if response & FAN_INFO:
            buf = _RESPONSE.pack(event_fd, response) + _AUDIT_RULE.pack(
                FAN_RESPONSE_INFO_AUDIT_RULE, 0, _AUDIT_RULE.size, rule_number or 0, 0, 0)
        else:
            buf = _RESPONSE.pack(event_fd, response)
        try:
            os.write(self.fd, buf)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            if e.errno != errno.EINVAL or buf == _RESPONSE.pack(event_fd, response & 0x3):
                raise
            # The extras (errno, audit info) were refused: the event must still get its answer.
            try:
                os.write(self.fd, _RESPONSE.pack(event_fd, response & 0x3))
            except OSError as e2:
                if e2.errno != errno.ENOENT:
                    raise
                return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _reads_until_empty(fd: int, buf: bytearray) -> Iterator[int]:
    """Read a non-blocking notification group into buf until it is empty: each read's length."""
    while True:
        try:
            n = os.readv(fd, [buf])
        except BlockingIOError:
            return
        if n <= 0:
            return
        yield n


class MoveGroup:
    """A notification group that reports directory-entry moves (renames) on whole filesystems.

    The read loop remembers rule decisions keyed on a file's identity and mount, not its path;
    a rename of any directory above the file changes the path without touching the file, so
    every move clears what was remembered. The kernel queues a move's event during rename()
    itself, so a non-blocking read after each permission batch sees every rename that finished
    before any open of the batch began. Dirent events need a group that reports file handles
    (FAN_REPORT_DFID_NAME, 5.9+) and filesystems that can encode them; where either is missing
    the loop simply does not remember path-dependent decisions there.
    """

    MASK = FAN_MOVE | FAN_ONDIR

    def __init__(self, fd: int):
        self.fd = fd
        self._buf = bytearray(64 * 1024)

    @classmethod
    def open(cls) -> "MoveGroup":
        fd = _fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME
                            | FAN_UNLIMITED_MARKS, os.O_RDONLY | os.O_CLOEXEC)
        return cls(_check(fd, "fanotify_init (moves)"))

    def mark(self, path: str | bytes) -> None:
        p = os.fsencode(path)
        _check(_fanotify_mark(self.fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, self.MASK, AT_FDCWD, p),
               f"fanotify_mark moves {p.decode(errors='replace')}")

    def unmark(self, path: str | bytes) -> None:
        _fanotify_mark(self.fd, FAN_MARK_REMOVE | FAN_MARK_FILESYSTEM, self.MASK, AT_FDCWD,
                       os.fsencode(path))

    def drain(self) -> int:
        """Read every queued event (their contents do not matter); the bytes read."""
        return sum(_reads_until_empty(self.fd, self._buf))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ChangeGroup:
    """A notification group of one process's own that reports files closed after writing.

    With several reading processes (`[daemon] readers`) the permission group's own close-write
    notifications would each reach one of them, and the others could answer a later open of
    the file from a verdict cached before the write. Each process therefore has its own group,
    marked like the permission group: the kernel queues the close-write in every one before
    close() returns, so a process that drains its own group after reading a batch of
    permission events, and before deciding them, has voided every verdict a write that
    finished before those opens made stale. Events carry an fd (the kernel opens the file for
    the reader); only its identity is read, and it is closed at once."""

    MASK = FAN_CLOSE_WRITE

    def __init__(self, fd: int):
        self.fd = fd
        self._buf = bytearray(64 * 1024)

    @classmethod
    def open(cls) -> "ChangeGroup":
        # The default queue bound: a process that falls behind gets an overflow event and
        # flushes its cache, rather than pinning an unbounded number of files.
        fd = _fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_MARKS,
                            EVENT_F_FLAGS)
        return cls(_check(fd, "fanotify_init (changes)"))

    def mark(self, path: str | bytes, *, kind: int = FAN_MARK_FILESYSTEM) -> None:
        p = os.fsencode(path)
        _check(_fanotify_mark(self.fd, FAN_MARK_ADD | kind, self.MASK, AT_FDCWD, p),
               f"fanotify_mark changes {p.decode(errors='replace')}")

    def unmark(self, path: str | bytes, *, kind: int = FAN_MARK_FILESYSTEM) -> None:
        _fanotify_mark(self.fd, FAN_MARK_REMOVE | kind, self.MASK, AT_FDCWD, os.fsencode(path))

    def drain(self) -> tuple[list[os.stat_result], bool]:
        """Every queued change: the stat of each changed file, and whether the queue overflowed
        (then what changed is unknown)."""
        changed: list[os.stat_result] = []
        overflow = False
        buf = self._buf
        for n in _reads_until_empty(self.fd, buf):
            for ev in parse_events(buf, n):
                if ev.mask & FAN_Q_OVERFLOW:
                    overflow = True
                if ev.fd >= 0:
                    try:
                        changed.append(os.fstat(ev.fd))
                    except OSError:
                        pass
                    finally:
                        os.close(ev.fd)
        return changed, overflow

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
