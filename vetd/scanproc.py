"""Scan processes: `[scan] processes = N` runs the plugins in N processes of their own.

Why: in one Python process two scans meet at the GIL several times per file, and each meeting
is a thread wake-up; on a VM whose idle CPUs halt, that made two openers on a cold tree no
faster than one (docs/architecture.md, "scan processes"). Here the daemon still reads every
event and decides it (the one ordered queue, the verdict cache, rules and memo stay where they
are); a file that needs a scan goes, as an fd over SCM_RIGHTS, to a scan process with its own
interpreter, which runs the plugins and, when they all find it clean, answers the kernel itself
and places the kernel's ignore mark. Anything else (a deny, a failure, a verdict that may not be
cached) it only reports: the daemon answers those through its usual path, so the degraded
policy, breakers, logging and the cache are decided in one place.

The kernel knows an event by the fd number in the process that read it. The scan process
answers with that number, so the daemon keeps its own fd open until the scan process has
reported (or died): a closed number could be reused by the next event and a late answer would
then answer the wrong one. A scan process holds the group fd, so it must never outlive vetd:
it is started from vetd's main thread with PR_SET_PDEATHSIG = SIGKILL (the kernel kills it when
that thread ends, even if a plugin has it stuck in C) and its pid is vetd's own before it runs
a line of Python (isolate.py does the same for isolated plugins). One that hangs past its job's
deadline is killed and started again; the event was answered by policy at its deadline.

Run as `python -m vetd.scanproc --config FILE --gfd N --sock N` (by vetd, not by hand).
"""

from __future__ import annotations

import argparse
import array
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .spawn import spawn_own

log = logging.getLogger("vetd.scanproc")

# job header: id, the reading process's fd number, may the kernel cache it (0/1), the event's
# permission mask, the monotonic deadline of the event; then the plan as JSON: the plugins to
# run, in order, each with its own deadline (0: none), and whether the scan process may answer
HEADER = struct.Struct("=qiiQd")
STUCK_GRACE_S = 2.0      # a job this much past its deadline means a hung scan process


class _Slot:
    __slots__ = ("sock", "pid", "jobs", "dead")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pid = 0
        self.jobs: dict[int, tuple[object, float]] = {}  # job id -> (pending event, deadline)
        self.dead = True


class ScanProcesses:
    """The daemon's side: the processes, the jobs in flight, and a thread reading reports."""

    def __init__(self, count: int, config_path: str, gfd: int,
                 register_pid: Callable[[int, bool], None],
                 on_report: Callable[[object, dict[str, Any]], None],
                 on_lost: Callable[[object, str], None]):
        self._count = count
        self._config_path = config_path
        self._gfd = gfd
        self._register = register_pid
        self._on_report = on_report
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._draining: list[_Slot] = []
        self.restarts = 0
        self.jobs = 0  # sent so far; also each job's id
        self._ep = select.epoll()
        self._by_fd: dict[int, _Slot] = {}
        self._stopping = False
        for _ in range(count):
            slot = _Slot()
            self._spawn(slot)
            self._slots.append(slot)
        threading.Thread(target=self._reports, name="vetd-scanproc", daemon=True).start()

    # ---------------------------------------------------------------- processes (main thread) --
    def _spawn(self, slot: _Slot) -> None:
        """A new scan process on a socketpair of its own (vetd.spawn: vetd's pid before it runs,
        killed by the kernel with vetd's main thread)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        argv = [sys.executable, "-m", "vetd.scanproc", "--config", self._config_path,
                "--gfd", str(self._gfd), "--sock", str(theirs.fileno())]
        pid = spawn_own(argv, self._register, keep_fds=(self._gfd, theirs.fileno()),
                        die_with_parent=True)
        theirs.close()
        slot.sock, slot.pid, slot.dead, slot.jobs = ours, pid, False, {}
        with self._lock:
            self._by_fd[ours.fileno()] = slot
        self._ep.register(ours.fileno(), select.EPOLLIN)

    def restart(self, config_path: str, count: int) -> None:
        """A reload: new processes for new plugins; the old ones finish what they hold."""
        self._config_path = config_path
        self._count = count
        with self._lock:
            old, self._slots = self._slots, []
            self._draining.extend(old)
        for _ in range(self._count):
            slot = _Slot()
            self._spawn(slot)
            with self._lock:
                self._slots.append(slot)
        self.tend(time.monotonic())

    def tend(self, now: float) -> None:
        """Housekeeping, on the main thread: kill processes stuck past a job's deadline, start
        dead ones again, let drained old ones go."""
        with self._lock:
            slots = list(self._slots)
            draining = list(self._draining)
        for slot in slots + draining:
            if not slot.dead and any(now > dl + STUCK_GRACE_S for _, dl in list(slot.jobs.values())):
                log.error("scan process %d stuck past a deadline: killing it", slot.pid)
                self._kill(slot)
        for slot in draining:
            if not slot.jobs and not slot.dead:
                self._kill(slot)
            if slot.dead:
                with self._lock:
                    if slot in self._draining:
                        self._draining.remove(slot)
        for slot in slots:
            if slot.dead and not self._stopping:
                self.restarts += 1
                log.warning("scan process gone: starting another")
                self._spawn(slot)

    def _kill(self, slot: _Slot) -> None:
        try:
            os.kill(slot.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the report thread sees the socket close and cleans up

    # ---------------------------------------------------------------- jobs ---------------------
    def submit(self, p: object, fd: int, mark_ok: bool, mask: int, deadline: float,
               plan: list[list[Any]], may_answer: bool, pid: int) -> bool:
        """Send one job to the least busy live process; False if none is live."""
        with self._lock:
            live = [s for s in self._slots if not s.dead]
            if not live:
                return False
            slot = min(live, key=lambda s: len(s.jobs))
            self.jobs += 1
            jid = self.jobs
            slot.jobs[jid] = (p, deadline)
        body = HEADER.pack(jid, fd, int(mark_ok), mask, deadline) + json.dumps(
            {"plan": plan, "answer": may_answer, "pid": pid}).encode()
        try:
            slot.sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,  # type: ignore[union-attr]
                                        array.array("i", [fd]))])
        except OSError:
            with self._lock:
                slot.jobs.pop(jid, None)
            return False
        return True

    def _reports(self) -> None:
        """Read the scan processes' reports, every one waiting on a socket at each wake-up."""
        while not self._stopping:
            try:
                ready = self._ep.poll(1.0)
            except OSError:
                return
            for fd, events in ready:
                with self._lock:
                    slot = self._by_fd.get(fd)
                if slot is not None:
                    self._drain(slot, fd, events)

    def _drain(self, slot: _Slot, fd: int, events: int) -> None:
        while True:
            try:
                data = slot.sock.recv(1 << 16, socket.MSG_DONTWAIT)  # type: ignore[union-attr]
            except BlockingIOError:
                if events & (select.EPOLLHUP | select.EPOLLERR):
                    break
                return
            except OSError:
                data = b""
            if not data:
                break
            try:
                report = json.loads(data)
                with self._lock:
                    job = slot.jobs.get(report["id"])
            except (ValueError, KeyError, TypeError):
                log.error("scan process %d sent a malformed report", slot.pid)
                self._kill(slot)
                return
            if job is not None:
                try:
                    self._on_report(job[0], report)
                finally:  # in flight until applied: status then shows it done
                    with self._lock:
                        slot.jobs.pop(report["id"], None)
        self._lost(slot, fd)

    def _lost(self, slot: _Slot, fd: int) -> None:
        """The process closed its socket (it died): every job it held is answered by policy
        (unless its deadline did that already) and its fd closed."""
        try:
            self._ep.unregister(fd)
        except OSError:
            pass
        with self._lock:
            self._by_fd.pop(fd, None)
            jobs, slot.jobs = slot.jobs, {}
        pid = slot.pid
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        self._register(pid, False)
        slot.sock.close()  # type: ignore[union-attr]
        slot.dead = True
        for p, _ in jobs.values():
            self._on_lost(p, f"scan process {pid} died")

    def in_flight(self) -> int:
        with self._lock:
            return sum(len(s.jobs) for s in self._slots + self._draining)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"processes": self._count, "pids": [s.pid for s in self._slots if not s.dead],
                    "in_flight": sum(len(s.jobs) for s in self._slots + self._draining),
                    "jobs": self.jobs, "restarts": self.restarts}

    def close(self) -> None:
        self._stopping = True
        with self._lock:
            slots = self._slots + self._draining
        for slot in slots:
            if not slot.dead:
                self._kill(slot)
                try:
                    os.waitpid(slot.pid, 0)
                except ChildProcessError:
                    pass


# --------------------------------------------------------------------- the scan process ----------
def _wait_readable(poller: select.poll, poll_s: float) -> None:
    """Poll for the next job a little ([daemon] busy_poll_us) before sleeping in recvmsg:
    waking a process asleep on a halted CPU costs the daemon's sendmsg tens of microseconds."""
    until = time.monotonic() + poll_s
    while not poller.poll(0):
        if time.monotonic() >= until:
            return
        os.sched_yield()  # an opener or vetd itself may want this CPU more


def serve(config_path: str, gfd: int, sock_fd: int) -> int:
    from . import fanotify as fan
    from .config import load
    from .logsetup import setup
    from .model import Subject
    from .plugins import load_all
    from .scanning import checked, combine
    from .sdk import Opener, ScanFile
    try:
        from ._hotpath import allow_marked
    except ImportError:
        allow_marked = None  # the daemon answers clean files itself then
    config = load(config_path)
    setup(config.daemon.log_level)
    plugins = {p.name: p for p in load_all(config.plugins)}
    sock = socket.socket(fileno=sock_fd)
    poller = select.poll()
    poller.register(sock_fd, select.POLLIN)
    room = socket.CMSG_SPACE(4 * array.array("i").itemsize)
    poll_s = config.daemon.busy_poll_us / 1e6
    while True:
        if poll_s:
            _wait_readable(poller, poll_s)
        msg, anc, _flags, _ = sock.recvmsg(1 << 16, room)
        if not msg:
            return 0
        fds = [fd for level, kind, data in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in array.array("i", data[:len(data) - len(data) % 4])]
        jid, their_fd, mark_ok, mask, deadline = HEADER.unpack_from(msg)
        job = json.loads(msg[HEADER.size:])
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"id": jid, "results": [], "answered": False,
                                  "error": "no file descriptor"}).encode())
            continue
        fd = fds[0]
        report: dict[str, Any] = {"id": jid, "answered": False}
        results: list[list[Any]] = []
        try:
            st = os.fstat(fd)
            sf = ScanFile(fd, st, lambda: _display(fd))
            opener = Opener(Subject(job.get("pid", 0)))
            clean = []
            for name, own_deadline in job["plan"]:
                plugin = plugins.get(name)
                sf.deadline = min(deadline, own_deadline) if own_deadline else deadline
                try:
                    if plugin is None:
                        raise RuntimeError(f"plugin {name} is not loaded in the scan process")
                    v = checked(plugin.scan(sf, opener), name)
                except Exception as e:
                    results.append([name, "error", f"{type(e).__name__}: {e}",
                                    time.monotonic() >= sf.deadline])
                    break
                results.append([name, v.decision.value, v.reason, v.cacheable, v.ttl_s])
                if v.denied:
                    break
                clean.append(v)
            else:
                verdict = combine(clean)
                if (job["answer"] and verdict.cacheable and verdict.ttl_s is None
                        and allow_marked is not None and time.monotonic() < deadline):
                    if mark_ok:
                        delivered, marked = allow_marked(gfd, fd, mask, st.st_mtime_ns, st.st_ctime_ns,
                                                         st.st_size, False, their_fd)
                    else:
                        try:
                            os.write(gfd, fan.RESPONSE.pack(their_fd, fan.FAN_ALLOW))
                            delivered, marked = True, -1
                        except OSError:
                            delivered, marked = False, -1
                    report.update(answered=True, delivered=bool(delivered), marked=marked)
        except OSError as e:  # the file itself failed us (fstat): the daemon answers by policy
            results.append(["", "error", f"{type(e).__name__}: {e}", False])
        finally:
            os.close(fd)
        report["results"] = results
        sock.send(json.dumps(report).encode())


def _display(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vetd.scanproc")
    ap.add_argument("--config", required=True)
    ap.add_argument("--gfd", type=int, required=True)
    ap.add_argument("--sock", type=int, required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # vetd stops it, not a terminal's ^C
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return serve(args.config, args.gfd, args.sock)


if __name__ == "__main__":
    sys.exit(main())
