"""Plugins in processes of their own: `isolation = "process"` in a plugin's table.

A plugin written in pure Python holds the GIL while it scans, so on threads it serialises every
scan in the daemon; one that crashes takes the daemon with it. Isolated, vetd runs the plugin in
`processes` child processes, each serving the out-of-process agent protocol on a private socket
(the same door a vendor's agent uses), and asks them over it with the file passed as an fd.

Each child's pid is added to vetd's own pids before the child runs a line of Python (it waits
on a pipe between fork and exec), so the files its start-up opens are allowed at intake instead
of waiting on scans that it would itself have to answer. A child that dies is started again on
the next scan that needs it.

Run as `python -m vetd.isolate --config FILE --plugin NAME --socket PATH` (by vetd, not by hand).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .sdk import API_VERSION, Opener, Plugin, ScanFile, Verdict
from .spawn import spawn_own

log = logging.getLogger("vetd.isolate")

ISOLATION_KEYS = frozenset({"isolation", "processes"})


class IsolatedPlugin(Plugin):
    """The daemon's side: a pool of child processes, each reached through the agent plugin."""

    api_version = API_VERSION

    def __init__(self, name: str, config_path: str, runtime_dir: str, processes: int,
                 register_pid: Callable[[int, bool], None], timeout_s: float = 10.0):
        super().__init__({})
        from vetd_plugins.agent import Agent  # the built-in agent client
        self.name = name  # type: ignore[misc]
        self._config_path = config_path
        self._register = register_pid
        self._lock = threading.Lock()
        self._free = threading.Semaphore(processes)
        self._slots: list[dict[str, Any]] = []
        os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
        for i in range(processes):
            sock = os.path.join(runtime_dir, f"iso-{os.getpid()}-{name}-{i}.sock")
            slot = {"socket": sock, "pid": 0, "agent": Agent({"socket": sock, "timeout_s": timeout_s,
                                                               "connections": 1}),
                    "busy": False, "started": 0.0, "respawned": 0.0}
            self._slots.append(slot)
            self._spawn(slot)
        for slot in self._slots:
            self._wait_ready(slot)

    def pids(self) -> list[int]:
        return [s["pid"] for s in self._slots if s["pid"]]

    def _spawn(self, slot: dict[str, Any]) -> None:
        """A new plugin host (vetd.spawn: its pid is vetd's own before it runs)."""
        if os.path.exists(slot["socket"]):
            os.unlink(slot["socket"])
        # the child holds the read end of this one; vetd never writes it, so its end-of-file
        # tells the child vetd is gone (even by SIGKILL), and the child exits with it
        life_r, life_w = os.pipe2(os.O_CLOEXEC)
        argv = [sys.executable, "-m", "vetd.isolate", "--config", self._config_path,
                "--plugin", self.name, "--socket", slot["socket"], "--parent-fd", str(life_r)]
        pid = spawn_own(argv, self._register, keep_fds=(life_r,))
        os.close(life_r)
        if slot.get("life") is not None:
            os.close(slot["life"])
        slot["life"] = life_w
        slot["pid"] = pid
        slot["started"] = time.monotonic()

    def _wait_ready(self, slot: dict[str, Any], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(slot["socket"]):
            if self._reap(slot) or time.monotonic() > deadline:
                raise RuntimeError(f"isolated plugin {self.name}: its process did not start "
                                   f"(socket {slot['socket']})")
            time.sleep(0.02)

    def _reap(self, slot: dict[str, Any]) -> bool:
        """True (and the pid forgotten) if the slot's child has exited."""
        pid = slot["pid"]
        if not pid:
            return True
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            self._register(pid, False)
            slot["pid"] = 0
            return True
        return False

    def scan(self, file: ScanFile, opener: Opener) -> Verdict:
        self._free.acquire()
        try:
            with self._lock:
                slot = next(s for s in self._slots if not s["busy"])
                slot["busy"] = True
            try:
                if self._reap(slot):
                    if time.monotonic() - slot["respawned"] < 1.0:  # at most one restart a second
                        raise RuntimeError(f"isolated plugin {self.name}: its process keeps dying")
                    log.warning("isolated plugin %s: process exited; starting another", self.name)
                    slot["respawned"] = time.monotonic()
                    self._spawn(slot)
                    self._wait_ready(slot, timeout=10.0)
                return slot["agent"].scan(file, opener)
            finally:
                slot["busy"] = False
        finally:
            self._free.release()

    def close(self) -> None:
        for slot in self._slots:
            slot["agent"].close()
            if slot["pid"]:
                try:
                    os.kill(slot["pid"], 15)
                    os.waitpid(slot["pid"], 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                self._register(slot["pid"], False)
                slot["pid"] = 0
            try:
                os.unlink(slot["socket"])
            except OSError:
                pass
            if slot.get("life") is not None:
                os.close(slot["life"])
                slot["life"] = None


def _exit_with_parent(fd: int) -> None:
    def watch() -> None:
        try:
            while os.read(fd, 64):
                pass
        finally:
            os._exit(0)
    threading.Thread(target=watch, name="vetd-isolate-parent", daemon=True).start()


def _serve(config_path: str, name: str, socket_path: str, parent_fd: int | None = None) -> int:
    if parent_fd is not None:
        _exit_with_parent(parent_fd)
    from .agentkit import serve
    from .config import load
    from .logsetup import setup
    from .plugins import load as load_plugin
    config = load(config_path)
    setup(config.daemon.log_level)
    table = {k: v for k, v in config.plugins[name].items() if k not in ISOLATION_KEYS}
    plugin = load_plugin(name, table)

    class _Proc:
        def __init__(self, req: Mapping[str, Any]):
            self.pid = req.get("pid") or 0
            exe = req.get("exe")
            self.exe = os.fsencode(exe) if isinstance(exe, str) else None
            self.comm = None
            self.uid = req.get("uid")

    def scan(fd: int, req: dict[str, Any]) -> dict[str, Any]:
        left_ms = req.get("deadline_ms") or 0  # what vetd's side had left when it asked
        sf = ScanFile(fd, os.fstat(fd), str(req.get("path") or f"<fd {fd}>"),
                      time.monotonic() + left_ms / 1000 if left_ms else None)
        v = plugin.scan(sf, Opener(_Proc(req)))
        if not isinstance(v, Verdict):
            raise TypeError(f"scan() returned {type(v).__name__}, not a Verdict")
        return {"decision": v.decision.value, "reason": v.reason, "cacheable": v.cacheable,
                "ttl_s": v.ttl_s}

    serve(socket_path, scan, workers=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vetd.isolate")
    ap.add_argument("--config", required=True)
    ap.add_argument("--plugin", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--parent-fd", type=int, default=None)
    args = ap.parse_args(argv)
    return _serve(args.config, args.plugin, args.socket, args.parent_fd)


if __name__ == "__main__":
    raise SystemExit(main())
