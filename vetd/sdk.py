"""The vetd plugin SDK: the public, versioned contract between vetd and a scanner.

A plugin is a class found through the `vetd.plugins` entry-point group. vetd builds it once per
configuration with its own TOML table, then calls `scan(file, opener)` on worker threads for
files that no exclusion, rule or cached verdict already decided. The file is reachable only
through the event's file descriptor: a plugin must never open the path, which would raise a new
permission event (and, in the worst case, wait for itself).

Versioning: API_VERSION is "MAJOR.MINOR". A plugin declares the version it was written for;
vetd loads it when the majors match and the plugin's minor is not newer than vetd's.
1.1 added ScanFile.deadline and ScanFile.time_left (a 1.0 plugin runs unchanged).
"""

from __future__ import annotations

import enum
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

API_VERSION = "1.1"

__all__ = ["API_VERSION", "Decision", "Verdict", "ScanFile", "Opener", "Plugin", "PluginConfigError",
           "check_keys", "number_option"]


class Decision(str, enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A plugin's answer. `reason` names the signature or list that decided; `cacheable` False
    means ask again next time; `ttl_s` bounds how long a cached answer stands."""

    decision: Decision
    reason: str = ""
    plugin: str = ""
    cacheable: bool = True
    ttl_s: float | None = None

    @classmethod
    def allow(cls, reason: str = "", *, cacheable: bool = True, ttl_s: float | None = None) -> "Verdict":
        if not reason and cacheable and ttl_s is None and cls is Verdict:
            return _PLAIN_ALLOW  # verdicts are immutable: the commonest answer is built once
        return cls(Decision.ALLOW, reason, "", cacheable, ttl_s)

    @classmethod
    def deny(cls, reason: str, *, cacheable: bool = True, ttl_s: float | None = None) -> "Verdict":
        return cls(Decision.DENY, reason, "", cacheable, ttl_s)

    @property
    def denied(self) -> bool:
        return self.decision is Decision.DENY


_PLAIN_ALLOW = Verdict(Decision.ALLOW)


class PluginConfigError(ValueError):
    """Raised by a plugin's constructor for a bad configuration table; vetd refuses to load."""


def check_keys(config: Mapping[str, Any], known: Iterable[str]) -> None:
    """PluginConfigError naming every key of `config` that is not in `known` (a typo must not
    pass silently as a default)."""
    known = frozenset(known)
    unknown = set(config) - known
    if unknown:
        raise PluginConfigError(f"unknown key(s): {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(sorted(known))})")


def number_option(config: Mapping[str, Any], key: str, default: float, *, low: float, high: float,
                  integer: bool = False, what: str = "a number") -> float:
    """`config[key]` (or `default`) checked to lie in (low, high] (integers: [low, high])."""
    v = config.get(key, default)
    if integer:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise PluginConfigError(f"{key}: expected an integer in [{low:g}, {high:g}], got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v <= high:
        raise PluginConfigError(f"{key}: expected {what} in ({low:g}, {high:g}], got {v!r}")
    return float(v)


class ScanFile:
    """Read-only access to the file being opened, through the event fd. Shared by all plugins
    scanning one event, so hashes are computed once."""

    def __init__(self, fd: int, st: os.stat_result, path: str | Callable[[], str],
                 deadline: float | None = None):
        self._fd = fd
        self.stat = st
        self.size = st.st_size
        self._path = path
        self._hashes: dict[str, str] = {}
        self._lock = threading.Lock()
        # When vetd stops waiting for this plugin and answers the open by its degraded policy
        # (time.monotonic() seconds): the event's deadline or the plugin's own deadline_ms,
        # whichever comes first. None when nobody waits (a scan after the fact). Since 1.1.
        self.deadline = deadline

    def time_left(self, cap: float) -> float:
        """Seconds worth spending on this file: `cap` (the plugin's own timeout), or less when
        vetd answers the open by policy before then. 0.0 once that has happened: work past
        it is wasted, so give up at once (raise). Since 1.1."""
        deadline = self.deadline
        if deadline is None:
            return cap
        return max(0.0, min(cap, deadline - time.monotonic()))

    @property
    def path(self) -> str:
        """The path, for display and logs only; never open it. Looked up when first read."""
        p = self._path
        if not isinstance(p, str):
            p = self._path = p()
        return p

    def fileno(self) -> int:
        """The event fd, for passing to an engine (for example over SCM_RIGHTS). Do not close it."""
        return self._fd

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._fd, n, offset)

    def chunks(self, size: int = 1 << 20, limit: int | None = None) -> Iterator[bytes]:
        """The content in order, reading only data extents of a sparse file; holes come back as
        zeros without touching the disk. A file truncated under us ends early."""
        end = self.size if limit is None else min(self.size, limit)
        if self.stat.st_blocks * 512 >= end:  # no holes to skip: plain reads, no lseek probes
            yield from self._data(0, end, size)
            return
        off = 0
        while off < end:
            try:
                data_at = min(os.lseek(self._fd, off, os.SEEK_DATA), end)
            except OSError:  # ENXIO: only a hole is left, or the file shrank under us
                end = min(end, os.fstat(self._fd).st_size)
                data_at = end
            while off < data_at:  # a hole
                n = min(size, data_at - off)
                yield bytes(n)
                off += n
            if off >= end:
                break
            try:
                hole_at = min(os.lseek(self._fd, off, os.SEEK_HOLE), end)
            except OSError:
                hole_at = end
            for buf in self._data(off, hole_at, size):
                yield buf
                off += len(buf)
            if off < hole_at:  # truncated under us
                return

    def _data(self, off: int, stop: int, size: int) -> Iterator[bytes]:
        while off < stop:
            buf = os.pread(self._fd, min(size, stop - off), off)
            if not buf:
                return
            yield buf
            off += len(buf)

    def read(self, limit: int | None = None) -> bytes:
        """The content (up to `limit` bytes) as one bytes object, holes included as zeros.

        There is deliberately no mmap here: a file truncated by someone else while it is
        mapped turns the next touch of the mapping into SIGBUS, which would kill vetd. Reads
        into private memory cannot be hurt by a writer; a file that shrinks reads short."""
        return b"".join(self.chunks(limit=limit))

    def hexdigest(self, algorithm: str = "sha256") -> str:
        """A content hash, computed once per event whichever plugin asks first."""
        with self._lock:
            h = self._hashes.get(algorithm)
            if h is None:
                hasher = hashlib.new(algorithm)
                for chunk in self.chunks():
                    hasher.update(chunk)
                h = self._hashes[algorithm] = hasher.hexdigest()
            return h

    def sha256(self) -> str:
        return self.hexdigest("sha256")


class Opener:
    """What a plugin may know of the process opening the file. Attributes are looked up only
    when read, and may be None (an exited process, a kernel thread)."""

    __slots__ = ("_source",)

    def __init__(self, source: Any):
        self._source = source

    @property
    def pid(self) -> int:
        return self._source.pid

    @property
    def exe(self) -> bytes | None:
        return self._source.exe

    @property
    def comm(self) -> str | None:
        return self._source.comm

    @property
    def uid(self) -> int | None:
        return self._source.uid


class Plugin:
    """Base class for in-process scanner plugins.

    Subclasses set `name` and `api_version`, validate their TOML table in `__init__` (raising
    PluginConfigError), and implement `scan`. `scan` runs on worker threads concurrently and
    must be thread-safe. Return a Verdict; raising is allowed and is answered by the degraded
    policy. `close` is called when a reload replaces the plugin or vetd stops.
    """

    name: ClassVar[str] = ""
    api_version: ClassVar[str] = API_VERSION

    def __init__(self, config: Mapping[str, Any]):
        self.config = config

    def scan(self, file: ScanFile, opener: Opener) -> Verdict:
        raise NotImplementedError

    def close(self) -> None:
        pass
