"""Who reads the group fd: one thread at a time, and another as soon as that one is scanning
and events wait.

The read loop scans a cold event on the thread that read it: handing it to a worker costs a
thread wake-up on the opener's critical path, and so did handing the reading on to another
thread before every scan (measured here: a cold open 230 us with neither, 280-315 us with
either). So the reader keeps reading to itself and, while it scans, lets a standby thread
watch the group fd: the fd is in the standby's epoll set, edge-triggered, only while a scan
is running, so nothing wakes it in the common case. Events that wait during a scan (or were
already waiting when it began: adding a ready fd to an epoll set reports it at once) wake
the standby, which takes the baton and reads on. A scan stuck in a hung plugin therefore
never stops the reading, as long as a thread is free to stand by; with none (every other
thread scanning), the read loop hands scans to the worker pool instead (`may_scan_inline`).
A thread on its way to standby() misses nothing: an edge that comes first waits in the epoll
set's ready list.

With other reader processes ([daemon] readers, vetd/readers.py) they read while this one
scans, and waking the standby whenever events wait would wake it at most scans. There the
standby only looks, every `takeover_s`, for a scan that has run longer than that (stuck in a
plugin, or a huge file) and then takes over; so the reading never stops while every process
is stuck either.
"""

from __future__ import annotations

import select
import threading
import time


class ReadRelay:
    """The baton of the read loop's threads and the standby's watch on the group fd."""

    def __init__(self, gfd: int, threads: int, watch: bool = True):
        self._gfd = gfd
        self._threads = threads
        self._baton = threading.Lock()
        self._lock = threading.Lock()
        self._watch = select.epoll()
        self._watching = watch   # False: other processes read meanwhile (see above)
        self.takeover_s = 0.05   # without the watch: how long a scan runs before a takeover
        self._scanning = 0       # threads scanning inline (the fd is watched while > 0)
        self._scan_since = 0.0   # when the first of them began

    def take(self) -> bool:
        """Become the reader if nobody is (no wait)."""
        return self._baton.acquire(blocking=False)

    def release(self) -> None:
        self._baton.release()

    def may_scan_inline(self) -> bool:
        """For the baton's holder: whether a thread besides it is free to stand by while it
        scans (not itself scanning)."""
        return self._threads - 1 - self._scanning >= 1

    def standby(self, timeout_s: float = 1.0) -> bool:
        """Wait until events wait while a scan runs (True) or `timeout_s` passes (False); then
        try take() again. The timeout bounds how long vetd takes to notice it is stopping, and
        how long a missed wake-up could stall the reading (none is known)."""
        if not self._watching:
            until = time.monotonic() + timeout_s
            while True:
                time.sleep(self.takeover_s)
                now = time.monotonic()
                if self._scanning > 0 and now - self._scan_since >= self.takeover_s:
                    return True
                if now >= until:
                    return False
        return bool(self._watch.poll(timeout_s))

    def begin_scan(self) -> None:
        """Called after release(), before an inline scan: from now, waiting events wake a
        standby (including those already waiting)."""
        with self._lock:
            self._scanning += 1
            if self._scanning == 1:
                self._scan_since = time.monotonic()
                if self._watching:
                    self._watch.register(self._gfd, select.EPOLLIN | select.EPOLLET)

    def end_scan(self) -> None:
        with self._lock:
            self._scanning -= 1
            if self._scanning == 0 and self._watching:
                self._watch.unregister(self._gfd)

    def close(self) -> None:
        self._watch.close()
