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

from .cache import file_key, file_version

_UNSET = object()

# PIDFD_GET_INFO (6.13+): _IOWR(0xFF, 11, struct pidfd_info), version-0 size of 64 bytes.
_PIDFD_GET_INFO = (3 << 30) | (64 << 16) | (0xFF << 8) | 11
_PIDFD_INFO_CREDS = 2
_PIDFD_INFO = struct.Struct("=QQIIIIIIIIIIII")


class Subject:
    """The opening process. Attributes are None when they cannot be read (exited, kernel thread)."""

    __slots__ = ("pid", "pidfd", "_exe", "_comm", "_uid")

    def __init__(self, pid: int, pidfd: int = -1):
        self.pid = pid
        self.pidfd = pidfd
        self._exe: object = _UNSET
        self._comm: object = _UNSET
        self._uid: object = _UNSET

    @property
    def exe(self) -> bytes | None:
        """The executable's path as the kernel names it (bytes; may end in ' (deleted)')."""
        if self._exe is _UNSET:
            try:
                self._exe = os.readlink(b"/proc/%d/exe" % self.pid)
            except OSError:
                self._exe = None
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
        return self._comm  # type: ignore[return-value]

    @property
    def uid(self) -> int | None:
        """The real uid, read through the pidfd where the kernel allows (current, and race-free)."""
        if self._uid is _UNSET:
            self._uid = self._uid_from_pidfd() if self.pidfd >= 0 else None
            if self._uid is None:
                self._uid = self._uid_from_proc()
        return self._uid  # type: ignore[return-value]

    def _uid_from_pidfd(self) -> int | None:
        buf = bytearray(_PIDFD_INFO.pack(_PIDFD_INFO_CREDS, *([0] * 13)))
        try:
            fcntl.ioctl(self.pidfd, _PIDFD_GET_INFO, buf, True)
        except OSError:
            return None
        fields = _PIDFD_INFO.unpack(buf)
        if not fields[0] & _PIDFD_INFO_CREDS:
            return None
        return fields[5]  # ruid

    def _uid_from_proc(self) -> int | None:
        try:
            fd = os.open(b"/proc/%d/status" % self.pid, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, 4096)
            finally:
                os.close(fd)
        except OSError:
            return None
        for line in data.split(b"\n"):
            if line.startswith(b"Uid:"):
                return int(line.split()[1])
        return None

    def describe(self) -> str:
        exe = self.exe
        return f"pid {self.pid} ({exe.decode('utf-8', 'backslashreplace') if exe else '?'})"


class FileObject:
    """The file being opened, reached only through the event fd."""

    __slots__ = ("fd", "_stat", "_path")

    def __init__(self, fd: int):
        self.fd = fd
        self._stat: os.stat_result | None = None
        self._path: object = _UNSET

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
    def display_path(self) -> str:
        p = self.path
        return p.decode("utf-8", "backslashreplace") if p is not None else f"<fd {self.fd}>"
