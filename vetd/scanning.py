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
from dataclasses import dataclass, field

from .sdk import Decision, Opener, Plugin, ScanFile, Verdict

log = logging.getLogger("vetd.scan")


@dataclass
class PluginStats:
    scans: int = 0
    denies: int = 0
    errors: int = 0


@dataclass
class ScanResult:
    verdict: Verdict
    failures: list[tuple[str, str]] = field(default_factory=list)  # (plugin, error text)


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """Deny wins; the answer is cacheable only if every part was, for the shortest ttl."""
    if not verdicts:
        return Verdict.allow("no scanner")
    denies = [v for v in verdicts if v.decision is Decision.DENY]
    chosen = denies[0] if denies else verdicts[0]
    cacheable = all(v.cacheable for v in verdicts)
    ttls = [v.ttl_s for v in verdicts if v.ttl_s is not None]
    reason = chosen.reason if denies else ""
    return Verdict(chosen.decision, reason, chosen.plugin, cacheable, min(ttls) if ttls else None)


def run_plugins(plugins: Sequence[Plugin], file: ScanFile, opener: Opener,
                stats: dict[str, PluginStats]) -> ScanResult:
    """Ask every plugin. A plugin that raises or answers something that is not a Verdict is a
    failure; the others' answers still count."""
    verdicts: list[Verdict] = []
    failures: list[tuple[str, str]] = []
    for plugin in plugins:
        st = stats.setdefault(plugin.name, PluginStats())
        st.scans += 1
        try:
            v = plugin.scan(file, opener)
            if not isinstance(v, Verdict):
                raise TypeError(f"scan() returned {type(v).__name__}, not a Verdict")
            if not isinstance(v.decision, Decision):
                raise TypeError(f"scan() returned a Verdict with decision {v.decision!r}")
        except Exception as e:  # third-party code: anything may come out of it
            st.errors += 1
            failures.append((plugin.name, f"{type(e).__name__}: {e}"))
            continue
        if v.denied:
            st.denies += 1
        if not v.plugin:
            v = Verdict(v.decision, v.reason, plugin.name, v.cacheable, v.ttl_s)
        verdicts.append(v)
    return ScanResult(combine(verdicts), failures)


class ScanPool:
    """Worker threads fed from a bounded queue. `run` is called with each job on a worker."""

    def __init__(self, workers: int, backlog: int, run: Callable[[object], None]):
        self._queue: queue.Queue[object] = queue.Queue(maxsize=backlog)
        self._run = run
        self._threads: list[threading.Thread] = []
        self.backlog = backlog
        self.busy = 0
        self._lock = threading.Lock()
        self.resize(workers)

    def resize(self, workers: int) -> None:
        """Grow the pool (a reload may ask for more workers; fewer takes effect at restart)."""
        while len(self._threads) < workers:
            t = threading.Thread(target=self._work, name=f"vetd-scan-{len(self._threads)}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def workers(self) -> int:
        return len(self._threads)

    def submit(self, job: object) -> bool:
        """Queue a job; False at once if the backlog is full."""
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self.busy += 1
            try:
                self._run(job)
            except BaseException as e:  # a worker must outlive any job
                log.error("scan worker: unexpected %s: %s", type(e).__name__, e)
            finally:
                with self._lock:
                    self.busy -= 1

    def stop(self) -> None:
        for _ in self._threads:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break
