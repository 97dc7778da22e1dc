"""Answers the compiled read loop may give without asking Python: allows already decided.

The read loop in Python works an event out once (exclusions, rules, the verdict cache) and,
where the answer is a plain allow that needs no log line and no kernel mark, records it here
under the key the event will have next time: (event mask, the opener's remembered facts, the
file's statx tuple). vetd._hotpath then answers an event with that key on its own, in C.

An entry stands on the same things as a remembered outcome (docs/rules.md, "Remembered
outcomes") plus, for a clean cache hit, on the cache entry; so it is dropped with them:
every clear of the memo (a move, a mount change, the table full) clears it, a cache entry
dropped or turned to a deny drops that file's entries, and a new state (a reload) starts
with a new table. A clear bumps `epoch`: an answer worked out before a clear is not added
after it (the read loop passes the epoch it decided under).

Only the read loop adds; clears and drops may come from any thread.
"""

from __future__ import annotations

import threading
from array import array

try:
    from . import _hotpath as hotpath
except ImportError:  # built without a C compiler: the pure-Python loop answers everything
    hotpath = None  # type: ignore[assignment]

# What an answer was, for the counters: a clean cache hit, an exclusion, or allow rule N
# (slot SLOT_RULE0 + N, N the rule's position in its RuleSet).
SLOT_CACHE = 0
SLOT_EXCLUDED = 1
SLOT_RULE0 = 2

LIMIT = 65536  # entries; at the limit the table starts again empty (a dict has no cheap LRU)


class FastAnswers:
    """One state's table of ready answers, the opener facts it is keyed on, and counters."""

    def __init__(self, rules: int, limit: int = LIMIT):
        self.table: dict[tuple[object, ...], int] = {}
        # pid -> the memo token of its remembered facts; valid for one procwatch epoch
        self.tokens: dict[int, tuple[object, ...]] = {}
        self.tokens_epoch = -1
        self.counts = array("q", bytes(8 * (SLOT_RULE0 + rules)))  # written by vetd._hotpath
        self._taken = [0] * len(self.counts)
        self._by_file: dict[int, list[tuple[object, ...]]] = {}
        self._lock = threading.Lock()
        self.epoch = 0
        self.limit = limit
        self.clears = 0

    def __len__(self) -> int:
        return len(self.table)

    def add(self, key: tuple[object, ...], slot: int, file_key: int | None, epoch: int) -> bool:
        """Record an answer decided under `epoch`; refused (False) if a clear came since.
        `file_key`: the cache entry a clean-hit answer stands on, so dropping it drops this."""
        with self._lock:
            if epoch != self.epoch:
                return False
            if len(self.table) >= self.limit:
                self.table.clear()
                self._by_file.clear()
            self.table[key] = slot
            if file_key is not None:
                self._by_file.setdefault(file_key, []).append(key)
        return True

    def drop_file(self, file_key: int) -> None:
        with self._lock:
            for key in self._by_file.pop(file_key, ()):
                self.table.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self.epoch += 1
            self.clears += 1
            self.table.clear()
            self._by_file.clear()

    def sync_tokens(self, procwatch_epoch: int) -> None:
        """Forget the openers' tokens if process events came since they were read."""
        if procwatch_epoch != self.tokens_epoch:
            self.tokens.clear()
            self.tokens_epoch = procwatch_epoch

    def take_counts(self) -> list[int]:
        """Answers given from the table since the last call, per slot."""
        with self._lock:
            now = self.counts.tolist()
            delta = [a - b for a, b in zip(now, self._taken)]
            self._taken = now
        return delta
