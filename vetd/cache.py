"""The userspace verdict cache: what a scan decided about one version of one file.

Keyed on the file's identity (st_dev, st_ino) and checked against its version (mtime_ns,
ctime_ns, size) and the scanner generation, so an entry goes stale by itself when the file
changes or the signatures are reloaded; close-write events drop entries early. Bounded, so
memory stays flat whatever the tree size.

Memory per entry is what bounds it, and every reader process holds its share: an entry is one
plain dict slot whose value is one int packing the version, the generation, the verdict (an
index into the few distinct verdicts) and the kernel-cache flag, and one slot of an eviction
ring. Measured at 100,000 entries: 318 bytes each with an OrderedDict of (version, generation,
verdict, expires, kernel) tuples, 171 this way (vetd_rss_100k in docs/performance.md).

Eviction is CLOCK (second chance), an approximation of LRU: a hit marks its key in a set, and
the ring passes over a marked key once before evicting it. Lookups take no lock (one dict get,
one set add, each atomic under the GIL); cachetools' LRUCache did the same job in four Python
frames and a lock: 0.78 us per hit against 0.07 us, measured on the read loop's fast path,
where a warm answer has a budget of a few microseconds in all.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

from .sdk import Verdict

# Identity and version are packed into single ints: at 100,000 entries that is half the memory
# of tuples of ints (measured: 31 MB against 52 MB), and comparing one int is as exact.
FileKey = int
FileVersion = int

_M64 = (1 << 64) - 1


def file_key(st: os.stat_result) -> FileKey:
    return (st.st_dev << 64) | st.st_ino


def file_version(st: os.stat_result) -> FileVersion:
    # Times as unsigned 64-bit fields: a time before 1970 is negative, and OR-ing a negative
    # int would set every bit above it, so the version would ignore ctime and size.
    return (st.st_mtime_ns & _M64) | ((st.st_ctime_ns & _M64) << 64) | (st.st_size << 128)


# A packed entry: version (192 bits) | generation (32) | verdict index (12) | kernel flag.
_VERSION_BITS = 192
_VERSION_MASK = (1 << _VERSION_BITS) - 1
_GEN_SHIFT = _VERSION_BITS
_GEN_MASK = (1 << 32) - 1
_VID_SHIFT = _GEN_SHIFT + 32
_VIDS = 1 << 12                 # distinct verdicts held by index; the last index means "see _odd"
_KERNEL = 1 << (_VID_SHIFT + 12)


class Entry(NamedTuple):
    version: FileVersion
    generation: int
    verdict: Verdict
    expires: float | None  # monotonic seconds, from the verdict's ttl
    kernel: bool = True    # False once the rules said this file may not be cached in the kernel
    raw: int = 0           # the packed form it was read from (still() compares it)


K = TypeVar("K")
V = TypeVar("V")


class Clock(Generic[K, V]):
    """A bounded map that evicts by CLOCK (second chance). Lookups take no lock; writers
    serialise on a lock so a store and its eviction are not interleaved with another's."""

    __slots__ = ("maxsize", "_d", "_ring", "_hot", "_lock")

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._d: dict[K, V] = {}
        self._ring: deque[K] = deque()   # keys, oldest first (a key dropped early may linger)
        self._hot: set[K] = set()        # keys read since the ring last passed them
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: K) -> V | None:
        v = self._d.get(key)
        if v is not None:
            self._hot.add(key)
        return v

    def peek(self, key: K) -> V | None:
        return self._d.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            d = self._d
            if key not in d:
                self._ring.append(key)
            d[key] = value
            while len(d) > self.maxsize:
                self._evict_one()
            if len(self._ring) > 2 * self.maxsize + 64:  # keys dropped early, re-stored
                self._ring = deque(k for k in dict.fromkeys(self._ring) if k in d)
            if len(self._hot) > self.maxsize + 64:       # marks of keys gone meanwhile
                self._hot.intersection_update(d)

    def _evict_one(self) -> None:
        ring, d, hot = self._ring, self._d, self._hot
        while ring:
            k = ring.popleft()
            if k not in d:
                continue          # dropped since, or a second copy of a re-stored key
            if k in hot:          # read since the last pass: one more round
                hot.discard(k)
                ring.append(k)
                continue
            del d[k]
            return

    def replace_if_present(self, key: K, value: V) -> None:
        """Set an existing entry without marking it read; nothing if it is gone."""
        with self._lock:
            if key in self._d:
                self._d[key] = value

    def pop(self, key: K) -> None:
        with self._lock:
            self._d.pop(key, None)
            self._hot.discard(key)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._ring.clear()
            self._hot.clear()

    def items(self) -> list[tuple[K, V]]:
        """Oldest first (in the ring's order)."""
        with self._lock:
            d = self._d
            return [(k, d[k]) for k in dict.fromkeys(self._ring) if k in d]


class VerdictCache:
    """Thread-safe: workers store, the read loop looks up (without a lock, see Clock)."""

    def __init__(self, entries: int):
        # A value is a packed int (see above), or, for the rare entry that will not pack (a
        # ttl, a verdict beyond the index space), an Entry.
        self._map: Clock[FileKey, int | Entry] | None = Clock(entries) if entries else None
        self._lock = threading.Lock()   # generation bumps, resizes, new verdict indexes
        self.generation = 1
        self._verdicts: list[Verdict] = []      # index -> verdict; equal verdicts share one
        self._vid: dict[Verdict, int] = {}
        self.hits = 0
        self.misses = 0
        # Told when an entry is dropped or turns to a deny (its key), or all are (None): the
        # read loop's table answers (vetd.fastanswers) stand on clean entries.
        self.on_drop: Callable[[FileKey | None], None] | None = None

    def _dropped(self, key: FileKey | None) -> None:
        if self.on_drop is not None:
            self.on_drop(key)

    def __len__(self) -> int:
        return len(self._map) if self._map is not None else 0

    def lookup(self, key: FileKey, version: FileVersion) -> Verdict | None:
        entry = self.entry(key, version)
        return entry.verdict if entry is not None else None

    def _current(self, key: FileKey, version: FileVersion) -> Entry | None:
        """The entry if it stands for this version under this generation and has not expired."""
        m = self._map
        if m is None:
            return None
        v = m.get(key)
        if v is None:
            return None
        gen = self.generation
        if v.__class__ is int:
            raw: int = v  # type: ignore[assignment]
            if raw & _VERSION_MASK != version or (raw >> _GEN_SHIFT) & _GEN_MASK != gen & _GEN_MASK:
                return None
            return Entry(version, gen, self._verdicts[(raw >> _VID_SHIFT) & (_VIDS - 1)], None,
                         bool(raw & _KERNEL), raw)
        e: Entry = v  # type: ignore[assignment]
        if (e.version != version or e.generation != gen
                or (e.expires is not None and e.expires < time.monotonic())):
            return None
        return e

    def entry(self, key: FileKey, version: FileVersion) -> Entry | None:
        """The current entry for this version of the file, or None (counted as a miss)."""
        e = self._current(key, version)
        if e is None:
            self.misses += 1
        else:
            self.hits += 1
        return e

    def not_for_kernel(self, key: FileKey) -> None:
        """Remember that this file may not get a kernel ignore mark (so hits skip the question)."""
        m = self._map
        if m is None:
            return
        v = m.peek(key)
        if v.__class__ is int:
            if v & _KERNEL:  # type: ignore[operator]
                m.replace_if_present(key, v & ~_KERNEL)  # type: ignore[operator]
        elif v is not None and v.kernel:  # type: ignore[union-attr]
            m.replace_if_present(key, v._replace(kernel=False))  # type: ignore[union-attr]

    def still(self, key: FileKey, version: FileVersion, entry: Entry) -> bool:
        """Whether `entry` is still the current one for this version (not counted)."""
        cur = self._current(key, version)
        return cur is not None and (cur is entry or (entry.raw != 0 and cur.raw == entry.raw))

    def clean_entry(self, key: FileKey, version: FileVersion) -> Entry | None:
        """The read loop's fast path: the entry only for a cached, current, unexpiring allow.
        Anything else (a miss, a deny, a ttl) goes the full way through entry(), which counts
        it; so this counts only its hits."""
        e = self._current(key, version)
        if e is None or e.expires is not None or e.verdict.denied:
            return None
        self.hits += 1
        return e

    def _index(self, verdict: Verdict) -> int | None:
        """The verdict's index, given it one if there is room; None when there is not."""
        vid = self._vid.get(verdict)
        if vid is not None:
            return vid
        with self._lock:
            vid = self._vid.get(verdict)
            if vid is None and len(self._verdicts) < _VIDS - 1:
                vid = len(self._verdicts)
                self._verdicts.append(verdict)  # before the index is published
                self._vid[verdict] = vid
            return vid

    def store(self, key: FileKey, version: FileVersion, verdict: Verdict, generation: int) -> None:
        """Store a verdict computed under `generation`; a result from before a reload is dropped."""
        m = self._map
        if m is None or not verdict.cacheable or generation != self.generation:
            return
        vid = self._index(verdict) if verdict.ttl_s is None else None
        if vid is not None and 0 <= version <= _VERSION_MASK:
            m.put(key, version | ((generation & _GEN_MASK) << _GEN_SHIFT) | (vid << _VID_SHIFT)
                  | _KERNEL)
        else:
            expires = time.monotonic() + verdict.ttl_s if verdict.ttl_s is not None else None
            m.put(key, Entry(version, generation, verdict, expires))
        if verdict.denied:
            self._dropped(key)

    def invalidate(self, key: FileKey) -> None:
        m = self._map
        if m is not None:
            m.pop(key)
        self._dropped(key)

    def bump_generation(self) -> int:
        """Signatures or policy changed: every entry is stale from now on."""
        with self._lock:
            self.generation += 1
            if self._map is not None:
                self._map.clear()
        self._dropped(None)
        return self.generation

    def resize(self, entries: int) -> None:
        with self._lock:
            old = self._map
            new: Clock[FileKey, int | Entry] | None = Clock(entries) if entries else None
            if old is not None and new is not None:
                for k, v in old.items()[-entries:]:
                    new.put(k, v)
            self._map = new
        self._dropped(None)

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
