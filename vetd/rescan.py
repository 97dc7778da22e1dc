"""Scans after the fact: files that a degraded answer let through are scanned once scanners are
idle again, and a bad one is reported and denied from then on.

The opener cannot be stopped retroactively; what this buys is knowing, and closing the door
for every later open. Each queued file holds a duplicate of its event fd (never a path), so the
queue is bounded.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("vetd.rescan")


@dataclass
class Item:
    fd: int
    stat: os.stat_result
    path: str
    generation: int
    reason: str


class Rescanner:
    def __init__(self, limit: int, scan: Callable[[Item], None], idle: Callable[[], bool]):
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=limit)
        self._scan = scan
        self._idle = idle
        self.dropped = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def offer_fd(self, fd: int, st: os.stat_result, path: str, generation: int, reason: str) -> bool:
        try:
            dup = os.dup(fd)
        except OSError:
            return False
        try:
            self._queue.put_nowait(Item(dup, st, path, generation, reason))
        except queue.Full:
            os.close(dup)
            self.dropped += 1
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vetd-rescan", daemon=True)
            self._thread.start()
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                while not self._idle() and not self._stop.is_set():
                    self._stop.wait(0.05)   # scanners are busy with live opens: those come first
                self._scan(item)
            except Exception as e:
                log.error("rescan of %s: %s: %s", item.path, type(e).__name__, e)
            finally:
                os.close(item.fd)

    def stop(self) -> None:
        self._stop.set()
