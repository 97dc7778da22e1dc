"""An open file's identity, version and mount in one statx() call.

Rule decisions are remembered per (file, mount) rather than per path, because reading the
path (readlink of /proc/self/fd/N) on every open costs more than the whole rest of a warm
answer. The same inode reached through two mounts (a bind mount, a container's view) may
have two paths, so the mount is part of the key; fstat() does not report it, statx() does
(STATX_MNT_ID, 5.8+; the never-reused STATX_MNT_ID_UNIQUE, 6.8+, where the kernel has it).
The key and version are computed exactly as cache.file_key/file_version compute them from an
os.stat_result, so both paths agree on what a file is.
"""

from __future__ import annotations

import ctypes
import os
import struct

_AT_EMPTY_PATH = 0x1000
_STATX_BASIC_STATS = 0x7FF
_STATX_MNT_ID = 0x1000
_STATX_MNT_ID_UNIQUE = 0x4000

# struct statx, the fields used: mask, nlink, mode, ino, size, ctime, mtime, dev, mnt_id.
_STATX = struct.Struct("=I12xI8xH2xQQ48xqI4xqI4x8xIIQ")
_SIZE = 256

try:
    from . import _hotpath
except ImportError:  # not built: ctypes does the call
    _hotpath = None  # type: ignore[assignment]

try:
    # No argtypes: ints, bytes and the buffer object pass as they are, and their conversion
    # cost 0.36 us a call on the hot path.
    _statx = ctypes.CDLL(None, use_errno=True).statx
except AttributeError:  # a libc older than 2.28
    _statx = None


# Positions in the tuple Statx.raw returns.
MASK, NLINK, MODE, INO, SIZE, CTIME_S, CTIME_NS, MTIME_S, MTIME_NS, DEV_MAJOR, DEV_MINOR, MOUNT = range(12)


class Statx:
    """statx() of event fds into one kept buffer; for the read loop's thread only.

    raw() is the hot call: about 0.7 us here against 0.9 us for os.fstat() and the key
    arithmetic, because its tuple is itself a usable dictionary key."""

    def __init__(self) -> None:
        self._buf = ctypes.create_string_buffer(_SIZE)
        self.unique = False
        self.available = False
        self._want = _STATX_BASIC_STATS | _STATX_MNT_ID
        if _statx is None:
            return
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _statx(fd, b"", _AT_EMPTY_PATH, _STATX_BASIC_STATS | _STATX_MNT_ID_UNIQUE,
                      self._buf) == 0:
                mask = _STATX.unpack_from(self._buf, 0)[MASK]
                self.unique = bool(mask & _STATX_MNT_ID_UNIQUE)
                self.available = bool(mask & (_STATX_MNT_ID | _STATX_MNT_ID_UNIQUE))
        finally:
            os.close(fd)
        if self.unique:
            self._want = _STATX_BASIC_STATS | _STATX_MNT_ID_UNIQUE
        if _hotpath is not None and self.available and os.environ.get("VETD_HOTPATH") != "python":
            want = self._want
            hot = _hotpath.statx
            self.raw = lambda fd: hot(fd, want)  # type: ignore[method-assign]

    @property
    def want(self) -> int:
        """The statx mask raw() asks for (vetd._hotpath makes the same call)."""
        return self._want

    def raw(self, fd: int) -> tuple[int, ...] | None:
        """The fields above as a tuple (see the positions), or None if statx failed.
        vetd._hotpath's statx, where it is built, returns the same tuple for less."""
        if _statx(fd, b"", _AT_EMPTY_PATH, self._want, self._buf) != 0:  # type: ignore[misc]
            return None
        return _STATX.unpack_from(self._buf, 0)


def key_and_version(t: tuple[int, ...]) -> tuple[int, int]:
    """cache.file_key and cache.file_version of the same file, from a Statx.raw tuple."""
    dev = os.makedev(t[DEV_MAJOR], t[DEV_MINOR])
    m64 = 0xFFFF_FFFF_FFFF_FFFF  # times as unsigned fields, as file_version has them
    return ((dev << 64) | t[INO],
            ((t[MTIME_S] * 1_000_000_000 + t[MTIME_NS]) & m64)
            | (((t[CTIME_S] * 1_000_000_000 + t[CTIME_NS]) & m64) << 64) | (t[SIZE] << 128))
