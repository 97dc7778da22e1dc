"""sd_notify for Type=notify: readiness, reload, watchdog and a live status line (via sdnotify).

Without NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self._sd = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None

    def _send(self, msg: str) -> None:
        if self._sd is not None:
            self._sd.notify(msg)

    def ready(self, status: str = "") -> None:
        self._send("READY=1\nSTATUS=" + status if status else "READY=1")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (253+) match the reload to this notification.
        self._send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def status(self, text: str) -> None:
        self._send("STATUS=" + text)

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog_interval(self) -> float:
        """Half the watchdog period systemd asked for, or a long idle tick without one."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            return max(0.05, int(usec) / 2e6)
        return 5.0
