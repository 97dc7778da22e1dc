"""Degraded mode (talpa's "operating when userspace is broken"): what to answer when a scanner
fails, hangs or falls behind, decided in one place.

Pure: a policy is a function of the failure kind, the plugin and the file's path class. The
circuit breaker per plugin is a small state machine with the clock passed in, so both are
unit-tested without threads or time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .globs import GlobSet

KINDS = ("timeout", "error", "backlog", "too_big", "unhealthy")


@dataclass(frozen=True)
class PathClass:
    """Paths whose failures are answered differently (deny under /srv/www, allow elsewhere)."""

    name: str
    paths: GlobSet
    on_failure: str | None = None   # overrides every plugin's on_failure (timeouts and errors)
    on_backlog: str | None = None
    on_too_big: str | None = None


@dataclass(frozen=True)
class PluginPolicy:
    """The host-side settings of one plugin ([plugins.NAME] on_failure, deadline_ms, ...)."""

    on_failure: str | None = None   # None: the [scan] on_error / on_timeout defaults
    deadline_s: float | None = None
    failure_threshold: int = 5
    retry_after_s: float = 30.0


@dataclass(frozen=True)
class Policy:
    on_timeout: str
    on_error: str
    on_backlog: str
    on_too_big: str
    classes: tuple[PathClass, ...] = ()
    plugins: dict[str, PluginPolicy] = field(default_factory=dict)

    def path_class(self, path: bytes | None) -> PathClass | None:
        if path is None or not self.classes:
            return None
        for c in self.classes:
            if c.paths.matches(path):
                return c
        return None

    def needs_path(self) -> bool:
        return bool(self.classes)

    def answer(self, kind: str, path: bytes | None, plugin: str | None = None) -> bool:
        """True to allow, False to deny: path class first, then the plugin, then [scan]."""
        pc = self.path_class(path)
        if kind in ("timeout", "error", "unhealthy"):
            if pc is not None and pc.on_failure is not None:
                return pc.on_failure == "allow"
            pp = self.plugins.get(plugin or "")
            if pp is not None and pp.on_failure is not None:
                return pp.on_failure == "allow"
            return (self.on_timeout if kind == "timeout" else self.on_error) == "allow"
        if kind == "backlog":
            return (pc.on_backlog if pc is not None and pc.on_backlog else self.on_backlog) == "allow"
        if kind == "too_big":
            return (pc.on_too_big if pc is not None and pc.on_too_big else self.on_too_big) == "allow"
        raise ValueError(f"unknown failure kind {kind!r}")


class Breaker:
    """Circuit breaker for one plugin: `threshold` failures in a row open it (the plugin is
    skipped and its events answered by policy); after `retry_after_s` one scan is let through
    as a probe (half-open); its success closes the breaker, its failure opens it again."""

    CLOSED, OPEN, HALF_OPEN = "healthy", "unhealthy", "probing"

    def __init__(self, threshold: int, retry_after_s: float):
        self.threshold = max(1, threshold)
        self.retry_after_s = retry_after_s
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.trips = 0
        self._lock = threading.Lock()

    def allow(self, now: float) -> bool:
        """May this plugin be asked now? Lets exactly one probe through when the wait is over."""
        if self.state == self.CLOSED:  # the usual answer, read without the lock (one load)
            return True
        with self._lock:
            if self.state == self.CLOSED:
                return True
            if self.state == self.OPEN and now - self.opened_at >= self.retry_after_s:
                self.state = self.HALF_OPEN
                return True
            return False

    def success(self) -> None:
        if self.state == self.CLOSED and not self.failures:
            return  # nothing to reset (each field is one atomic load; a racing failure() wins)
        with self._lock:
            self.failures = 0
            self.state = self.CLOSED

    def failure(self, now: float) -> bool:
        """Record a failure; True if this one opened the breaker."""
        with self._lock:
            self.failures += 1
            if self.state == self.HALF_OPEN or (self.state == self.CLOSED and self.failures >= self.threshold):
                self.state = self.OPEN
                self.opened_at = now
                self.trips += 1
                return True
            return False
