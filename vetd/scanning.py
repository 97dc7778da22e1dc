"""The scanner host: a bounded queue of scan jobs, a pool of workers, and verdict combination.

The read loop hands a job over and goes on; it never waits for a scan. A full queue is refused
at once (the caller answers by the backlog policy), so a slow scanner can delay nobody beyond
the deadline. Verdicts combine deny-wins; a plugin failure is reported to the caller, which
applies the degraded policy.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .sdk import Decision, Verdict

log = logging.getLogger("vetd.scan")


@dataclass
class PluginStats:
    scans: int = 0
    denies: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: int = 0


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """Deny wins; the answer is cacheable only if every part was, for the shortest ttl."""
    if not verdicts:
        return Verdict.allow("no scanner")
    first = verdicts[0]
    if not first.reason and first.cacheable and first.ttl_s is None:
        for v in verdicts:  # a loop: a generator in all() cost 5 us a scan on a slow VM
            if v.decision is not Decision.ALLOW or not v.cacheable or v.ttl_s is not None:
                break
        else:
            return first  # what the general case below would build, without building it
    denies = [v for v in verdicts if v.decision is Decision.DENY]
    chosen = denies[0] if denies else verdicts[0]
    cacheable = all(v.cacheable for v in verdicts)
    ttls = [v.ttl_s for v in verdicts if v.ttl_s is not None]
    reason = chosen.reason if denies else ""
    return Verdict(chosen.decision, reason, chosen.plugin, cacheable, min(ttls) if ttls else None)


def checked(v: object, plugin: str) -> Verdict:
    """A plugin's return value as a Verdict, or TypeError: third-party code may return anything."""
    if not isinstance(v, Verdict):
        raise TypeError(f"scan() returned {type(v).__name__}, not a Verdict")
    if not isinstance(v.decision, Decision):
        raise TypeError(f"scan() returned a Verdict with decision {v.decision!r}")
    if v.ttl_s is not None and not (isinstance(v.ttl_s, (int, float)) and v.ttl_s >= 0):
        raise TypeError(f"scan() returned a Verdict with ttl_s {v.ttl_s!r}")
    if not v.plugin:
        key = (v, plugin)
        named = _NAMED.get(key)
        if named is None:
            named = Verdict(v.decision, str(v.reason), plugin, bool(v.cacheable), v.ttl_s)
            if len(_NAMED) < 4096:  # the common answers (a plain allow, a signature's deny)
                _NAMED[key] = named
        v = named
    return v


_NAMED: dict[tuple[Verdict, str], Verdict] = {}  # (verdict, plugin) -> it, with the plugin named


class ScanPool:
    """Worker threads fed from a bounded queue. `run` is called with each job on a worker."""

    def __init__(self, workers: int, backlog: int, run: Callable[[object], None]):
        # SimpleQueue is C code end to end: a hand-off costs a few µs, queue.Queue's
        # Condition-based one several tens. The bound is kept by a counter instead.
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._depth = 0
        self._run = run
        self._threads: list[threading.Thread] = []
        self.backlog = backlog
        self.busy = 0
        self.running: set[object] = set()   # jobs on a worker now (the loop watches their deadlines)
        self._lock = threading.Lock()
        self.resize(workers)

    def running_jobs(self) -> list[object]:
        with self._lock:
            return list(self.running)

    def resize(self, workers: int) -> None:
        """Grow the pool: a reload may ask for more workers, and a worker stuck in a hung plugin
        is replaced (a thread cannot be killed; fewer workers take effect at restart)."""
        while len(self._threads) < workers:
            t = threading.Thread(target=self._work, name=f"vetd-scan-{len(self._threads)}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def workers(self) -> int:
        return len(self._threads)

    def submit(self, job: object) -> bool:
        """Queue a job; False at once if the backlog is full."""
        with self._lock:
            if self._depth >= self.backlog:
                return False
            self._depth += 1
        self._queue.put(job)
        return True

    def run_here(self, job: object) -> None:
        """Run a job on the calling thread (the read loop's inline scan), counted and watched
        as a worker's job is."""
        with self._lock:
            self.busy += 1
            self.running.add(job)
        try:
            self._run(job)
        except BaseException as e:  # the caller must outlive any job
            log.error("scan: unexpected %s: %s", type(e).__name__, e)
        finally:
            with self._lock:
                self.busy -= 1
                self.running.discard(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._depth -= 1
            self.run_here(job)

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
