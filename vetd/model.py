"""The event model: who opens (Subject) and what is opened (FileObject), each attribute fetched
only when a decision asks for it and remembered for the rest of that event.

Neither class opens a watched file by path: the file is reached only through the event's fd
(fstat, readlink of /proc/self/fd/N, pread), and the process through /proc and its pidfd. The
opener is blocked in the kernel while its permission event is pending, so the /proc entries read
here belong to it unless it was SIGKILLed, in which case the kernel drops the event and our
answer no longer matters; the pidfd, when the group reports one, also proves it is alive.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct

from collections.abc import Mapping

from .cache import file_key, file_version
from .procwatch import Proc, ProcWatch
from .sdk import ScanFile

_UNSET = Proc.UNSET

# PIDFD_GET_INFO (6.13+): _IOWR(0xFF, 11, struct pidfd_info), version-0 size of 64 bytes.
_PIDFD_GET_INFO = (3 << 30) | (64 << 16) | (0xFF << 8) | 11
_PIDFD_INFO_CREDS = 2
_PIDFD_INFO = struct.Struct("=QQIIIIIIIIIIII")


class Subject:
    """The opening process. Attributes are None when they cannot be read (exited, kernel thread)."""

    __slots__ = ("pid", "pidfd", "_exe", "_comm", "_uid", "_gid", "_loginuid", "_cgroup", "_ppid",
                 "_parent_exe", "_status", "_procs", "_epoch")

    def __init__(self, pid: int, pidfd: int = -1, procs: ProcWatch | None = None):
        self.pid = pid
        self.pidfd = pidfd
        # exe, comm, uid and gid may come from what vetd remembers of this process (see
        # procwatch: forgotten as soon as the kernel reports an exec, set*id, comm or exit)
        self._procs = procs
        self._epoch = procs.epoch if procs is not None else 0
        known = procs.procs.get(pid) if procs is not None else None
        if known is not None:
            self._exe, self._comm, self._uid, self._gid = known.exe, known.comm, known.uid, known.gid
        else:
            self._exe = self._comm = self._uid = self._gid = _UNSET
        self._loginuid: object = _UNSET
        self._cgroup: object = _UNSET
        self._ppid: object = _UNSET
        self._parent_exe: object = _UNSET
        self._status: bytes | None = None

    @property
    def epoch(self) -> int:
        """The process-events epoch this event was read under (see ProcWatch.maybe_exited)."""
        return self._epoch

    def _remember(self, name: str, value: object) -> None:
        """Keep a fact for this process's next events, unless process events were applied since
        this event began: the value read may predate an exec that was just forgotten."""
        procs = self._procs
        if procs is not None and procs.epoch == self._epoch:
            setattr(procs.entry(self.pid), name, value)

    @property
    def exe(self) -> bytes | None:
        """The executable's path as the kernel names it (bytes; may end in ' (deleted)')."""
        if self._exe is _UNSET:
            try:
                self._exe = os.readlink(b"/proc/%d/exe" % self.pid)
            except OSError:
                self._exe = None
            self._remember("exe", self._exe)
        return self._exe  # type: ignore[return-value]

    @property
    def comm(self) -> str | None:
        if self._comm is _UNSET:
            try:
                fd = os.open(b"/proc/%d/comm" % self.pid, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self._comm = os.read(fd, 64).rstrip(b"\n").decode("utf-8", "replace")
                finally:
                    os.close(fd)
            except OSError:
                self._comm = None
            self._remember("comm", self._comm)
        return self._comm  # type: ignore[return-value]

    @property
    def uid(self) -> int | None:
        """The real uid, read through the pidfd where the kernel allows (current, and race-free)."""
        if self._uid is _UNSET:
            self._uid = self._uid_from_pidfd() if self.pidfd >= 0 else None
            if self._uid is None:
                self._uid = self._uid_from_proc()
            self._remember("uid", self._uid)
        return self._uid  # type: ignore[return-value]

    @property
    def gid(self) -> int | None:
        """The real gid."""
        if self._gid is _UNSET:
            info = self._pidfd_info() if self.pidfd >= 0 else None
            self._gid = info[6] if info is not None else self._status_field(b"Gid:")
            self._remember("gid", self._gid)
        return self._gid  # type: ignore[return-value]

    @property
    def loginuid(self) -> int | None:
        """The audit login uid (who logged in, whatever su or sudo did since); 4294967295 when
        no login session started the process, None when it cannot be read."""
        if self._loginuid is _UNSET:
            raw = _read_proc(b"/proc/%d/loginuid" % self.pid)
            self._loginuid = int(raw) if raw and raw.strip().isdigit() else None
        return self._loginuid  # type: ignore[return-value]

    @property
    def cgroup(self) -> str | None:
        """The cgroup v2 path (`/system.slice/nginx.service`)."""
        if self._cgroup is _UNSET:
            raw = _read_proc(b"/proc/%d/cgroup" % self.pid)
            self._cgroup = None
            if raw:
                for line in raw.split(b"\n"):
                    if line.startswith(b"0::"):
                        self._cgroup = line[3:].decode("utf-8", "replace")
        return self._cgroup  # type: ignore[return-value]

    @property
    def unit(self) -> str | None:
        """The systemd unit the process runs in (`nginx.service`, `session-3.scope`)."""
        cg = self.cgroup
        if not cg:
            return None
        for part in reversed(cg.split("/")):
            if part.endswith((".service", ".scope", ".socket", ".mount", ".swap", ".timer")):
                return part
        return None

    @property
    def ppid(self) -> int | None:
        if self._ppid is _UNSET:
            info = self._pidfd_info() if self.pidfd >= 0 else None
            self._ppid = info[4] if info is not None else self._status_field(b"PPid:")
        return self._ppid  # type: ignore[return-value]

    @property
    def parent_exe(self) -> bytes | None:
        if self._parent_exe is _UNSET:
            ppid = self.ppid
            try:
                self._parent_exe = os.readlink(b"/proc/%d/exe" % ppid) if ppid else None
            except OSError:
                self._parent_exe = None
        return self._parent_exe  # type: ignore[return-value]

    def _pidfd_info(self) -> tuple[int, ...] | None:
        buf = bytearray(_PIDFD_INFO.pack(_PIDFD_INFO_CREDS, *([0] * 13)))
        try:
            fcntl.ioctl(self.pidfd, _PIDFD_GET_INFO, buf, True)
        except OSError:
            return None
        fields = _PIDFD_INFO.unpack(buf)
        return fields if fields[0] & _PIDFD_INFO_CREDS else None

    def _uid_from_pidfd(self) -> int | None:
        info = self._pidfd_info()
        return info[5] if info is not None else None  # ruid

    def _uid_from_proc(self) -> int | None:
        return self._status_field(b"Uid:")

    def _status_field(self, name: bytes) -> int | None:
        """One field of /proc/PID/status; the file is read once per event for all of them."""
        data = self._status
        if data is None:
            data = self._status = _read_proc(b"/proc/%d/status" % self.pid) or b""
        at = data.find(b"\n" + name)
        if at < 0:
            return None
        fields = data[at + len(name) + 1:data.find(b"\n", at + 1)].split()
        return int(fields[0]) if fields else None

    def describe(self) -> str:
        exe = self.exe
        return f"pid {self.pid} ({exe.decode('utf-8', 'backslashreplace') if exe else '?'})"


def _read_proc(path: bytes) -> bytes | None:
    """A small /proc file (procfs is never marked, so this open raises no event)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, 8192)
        finally:
            os.close(fd)
    except OSError:
        return None


_FTYPES = ((stat.S_ISREG, "regular"), (stat.S_ISDIR, "dir"), (stat.S_ISFIFO, "fifo"),
           (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"),
           (stat.S_ISLNK, "symlink"))


class FileObject:
    """The file being opened, reached only through the event fd."""

    __slots__ = ("fd", "_stat", "_path", "_fstypes", "_scan_file")

    def __init__(self, fd: int, fstypes: Mapping[int, str] | None = None):
        self.fd = fd
        self._stat: os.stat_result | None = None
        self._path: object = _UNSET
        self._fstypes = fstypes
        self._scan_file: ScanFile | None = None

    @property
    def stat(self) -> os.stat_result:
        st = self._stat
        if st is None:
            st = self._stat = os.fstat(self.fd)
        return st

    @property
    def key(self) -> int:
        """The file's identity (st_dev, st_ino), packed."""
        return file_key(self.stat)

    @property
    def version(self) -> int:
        """What must be unchanged for a cached verdict to stand: mtime, ctime, size, packed."""
        return file_version(self.stat)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.stat.st_mode)

    @property
    def path(self) -> bytes | None:
        """The path as seen from vetd's mount namespace (bytes). Paths lie; use for rules and logs."""
        if self._path is _UNSET:
            try:
                self._path = os.readlink(b"/proc/self/fd/%d" % self.fd)
            except OSError:
                self._path = None
        return self._path  # type: ignore[return-value]

    @property
    def ftype(self) -> str:
        mode = self.stat.st_mode
        for test, name in _FTYPES:
            if test(mode):
                return name
        return "other"

    @property
    def fstype(self) -> str | None:
        """The filesystem type, from the marks vetd placed (st_dev -> type)."""
        return self._fstypes.get(self.stat.st_dev) if self._fstypes is not None else None

    @property
    def scan_file(self) -> ScanFile:
        """The SDK view of this file, shared by rules (sha256) and scanners, hashes computed once."""
        sf = self._scan_file
        if sf is None:
            sf = self._scan_file = ScanFile(self.fd, self.stat, lambda: self.display_path)
        return sf

    def sha256(self) -> str | None:
        if not self.is_regular:
            return None
        try:
            return self.scan_file.sha256()
        except OSError:
            return None

    @property
    def display_path(self) -> str:
        p = self.path
        return p.decode("utf-8", "backslashreplace") if p is not None else f"<fd {self.fd}>"
