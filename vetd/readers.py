"""Reader processes: `[daemon] readers = N` reads the one fanotify group in N processes.

Why: in one Python process two cold scans meet at the GIL at every system call either makes,
and where idle CPUs halt each meeting is a slow thread wake-up; two openers on a cold tree got
no more files per second than one (docs/architecture.md, "Using two cores"). With
N processes reading the same group fd, each event goes whole to one of them: it decides it,
scans it inline and answers it, with its own interpreter and no hand-off on the way.

What one process and one ordered queue gave for free must hold across processes:

- **Invalidation.** A close-write read by one process must void a verdict any process cached.
  So none relies on the permission group's close-write: each has a change group of its own
  (fanotify.ChangeGroup), drained after it reads a batch and before it decides it.
- **Exec pairing.** An execve raises an exec event and then, once that is answered, a plain
  open of the same file, which the rules judge as part of the exec. The two may reach
  different processes, so the one that reads the exec tells the others before it answers
  (a pipe per process, in the side channels its read loop drains before deciding a batch).
- **Moves, process events, mount changes**: each process has its own move group, connector
  socket and mountinfo poll, as one process does today.
- **One face**: the first process (the one systemd started) keeps the marks, the control
  socket and sd_notify; it sums the others' counters into its status, passes reloads on and
  waits for them, and tells each which pids are vetd's own.
- **Nothing left hanging.** An event a process has read but not answered is answered by no
  one else, and the kernel lets it through only when the last holder of the group fd is gone.
  So a reader that dies takes vetd down with it (the first process exits, the others get
  SIGKILL from PR_SET_PDEATHSIG), and the kernel then lets every pending open through, as it
  does when a single vetd dies; systemd starts vetd again.

Run as `python -m vetd.readers ...` (by vetd, not by hand).
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from .spawn import spawn_own

log = logging.getLogger("vetd.readers")

NOTE = struct.Struct("=biQQ")      # kind, pid, file key (high, low 64 bits; 0 but for exec)
EXEC, OWN, NOT_OWN = 0, 1, 2        # an exec event; a pid that became, or stopped being, vetd's
READY_TIMEOUT_S = 60.0             # a reader builds its plugins (YARA compiles) before it is ready
ASK_TIMEOUT_S = 2.0                # a status question; a reload waits as long as reloads take
RELOAD_TIMEOUT_S = 50.0           # within the control socket's 60 s for a reload


class ReaderError(RuntimeError):
    """A reader process did not start, or would not take what it was told."""


class Peers:
    """Notes between reader processes: one pipe per process, read by its owner, written by
    every other (a note is one atomic write of less than PIPE_BUF). Exec events (see above),
    and each process's own children (isolated plugins), whose opens every reader must take as
    vetd's: a note is written before the child runs, so it precedes the child's first event."""

    def __init__(self, inbox: int, outboxes: Sequence[int]):
        self.inbox = inbox
        self._out = list(outboxes)
        self.sent = 0
        self.dropped = 0

    def tell_exec(self, pid: int, key: int) -> None:
        self.sent += 1
        self._tell(NOTE.pack(EXEC, pid, key >> 64, key & 0xFFFF_FFFF_FFFF_FFFF))

    def tell_own(self, pid: int, own: bool) -> None:
        self._tell(NOTE.pack(OWN if own else NOT_OWN, pid, 0, 0))

    def _tell(self, note: bytes) -> None:
        for fd in self._out:
            try:
                os.write(fd, note)
            except (BlockingIOError, BrokenPipeError):
                self.dropped += 1  # a full pipe: that process judges the open as an open

    def drain(self) -> list[tuple[int, int, int]]:
        """(kind, pid, key) of every note waiting, in order."""
        notes: list[tuple[int, int, int]] = []
        while True:
            try:
                data = os.read(self.inbox, NOTE.size * 512)
            except BlockingIOError:
                return notes
            if not data:
                return notes
            for off in range(0, len(data) - len(data) % NOTE.size, NOTE.size):
                kind, pid, hi, lo = NOTE.unpack_from(data, off)
                notes.append((kind, pid, (hi << 64) | lo))


def peer_pipes(n: int) -> list[tuple[int, int]]:
    """n non-blocking pipes (read end, write end), close-on-exec until handed to a reader."""
    return [os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for _ in range(n)]


class _Child:
    __slots__ = ("index", "pid", "sock", "pidfd", "lock", "asked")

    def __init__(self, index: int, pid: int, sock: socket.socket):
        self.index = index
        self.pid = pid
        self.sock = sock
        self.pidfd = os.pidfd_open(pid)
        self.lock = threading.Lock()
        self.asked = 0  # request ids: a reply that came too late is not taken for the next one


class Readers:
    """The first process's side: the other readers, a control socket each."""

    def __init__(self, count: int, config_path: str, watch: Sequence[str] | None, gfd: int,
                 features: object, pipes: list[tuple[int, int]],
                 register_pid: Callable[[int, bool], None]):
        self.children: list[_Child] = []
        for index in range(1, count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            inbox = pipes[index][0]
            outs = [w for k, (_r, w) in enumerate(pipes) if k != index]
            argv = [sys.executable, "-m", "vetd.readers", "--config", config_path,
                    "--gfd", str(gfd), "--ctl", str(theirs.fileno()), "--index", str(index),
                    "--features", json.dumps(asdict(features)),  # type: ignore[call-overload]
                    "--inbox", str(inbox), "--outboxes", ",".join(map(str, outs))]
            for w in watch or ():
                argv += ["--watch", w]
            env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                                    "WATCHDOG_PID")}
            pid = spawn_own(argv, register_pid, keep_fds=(gfd, theirs.fileno(), inbox, *outs),
                            die_with_parent=True, env=env)
            theirs.close()
            self.children.append(_Child(index, pid, ours))
        for index, (r, w) in enumerate(pipes):  # the first process keeps its inbox, and the
            if index:                           # others' outboxes
                os.close(r)
            else:
                os.close(w)

        self.latest: list[dict[str, Any]] = [{"error": "no status yet"} for _ in self.children]
        self.heard = [time.monotonic() for _ in self.children]  # when each last answered
        self._reloading = 0
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def poll_status(self, interval_s: float) -> None:
        """Keep `latest` (each reader's last status) fresh on a thread of its own, for the
        status line: the housekeeper must not wait on a reader that is stopped or stuck."""
        def poll() -> None:
            while not self._stopping:
                try:
                    self.latest = self.ask_all("status")
                except (OSError, ValueError):  # a socket closed by stop()
                    return
                time.sleep(interval_s)
        threading.Thread(target=poll, name="vetd-readers-status", daemon=True).start()

    def wait_ready(self) -> None:
        """Each reader says it is ready (its plugins built, its groups marked) or why not."""
        for c in self.children:
            reply = self._recv(c, READY_TIMEOUT_S)
            if reply.get("ready") is not True:
                raise ReaderError(f"reader {c.index} (pid {c.pid}) did not start: "
                                   f"{reply.get('error', 'no word from it')}")

    def ask_all(self, op: str, timeout_s: float = ASK_TIMEOUT_S, **args: Any) -> list[dict[str, Any]]:
        """Send one request to every reader and collect the replies ({"error": ...} for one
        that did not answer in time)."""
        replies: list[dict[str, Any]] = []
        for k, c in enumerate(self.children):
            # A reader busy with a reload (which can take a while: its plugins are rebuilt)
            # answers no status question meanwhile: what it said last stands in.
            if not c.lock.acquire(timeout=0.2 if op == "status" else -1):
                replies.append(self.latest[k])
                continue
            try:
                if op == "reload":
                    self._reloading += 1
                c.asked += 1
                c.sock.send(json.dumps({"op": op, "id": c.asked, **args}).encode())
                replies.append(self._recv(c, timeout_s, c.asked))
                if "answers" in replies[-1] or op == "reload":
                    self.heard[k] = time.monotonic()  # it answered: it is alive
            except OSError as e:
                replies.append({"error": f"reader {c.index}: {e.strerror}"})
            finally:
                if op == "reload":
                    self._reloading -= 1
                c.lock.release()
        return replies

    @staticmethod
    def _recv(c: _Child, timeout_s: float, want: int = 0) -> dict[str, Any]:
        until = time.monotonic() + timeout_s
        while True:
            left = until - time.monotonic()
            if left <= 0 or not select.select([c.sock], [], [], left)[0]:
                return {"error": f"reader {c.index} (pid {c.pid}) did not answer within {timeout_s:g}s"}
            data = c.sock.recv(1 << 22)
            if not data:
                return {"error": f"reader {c.index} (pid {c.pid}) is gone"}
            try:
                reply = json.loads(data)
            except ValueError:
                return {"error": f"reader {c.index} sent a malformed reply"}
            if not isinstance(reply, dict):
                return {"error": f"reader {c.index}: odd reply"}
            if reply.get("id", 0) == want:
                return reply

    def silent_s(self, now: float) -> float:
        """How long the most silent reader has not answered a question (0 while a reload,
        which may be slow, is waited for)."""
        if self._reloading:
            return 0.0
        return max((now - t for t in self.heard), default=0.0)

    def dead(self) -> list[_Child]:
        """Readers that have exited (their pidfd is readable)."""
        if not self.children:
            return []
        ready = select.select([c.pidfd for c in self.children], [], [], 0)[0]
        return [c for c in self.children if c.pidfd in ready]

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM each reader (each answers what it holds) and reap it; SIGKILL the slow."""
        self._stopping = True
        for c in self.children:
            try:
                os.kill(c.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        until = time.monotonic() + timeout_s
        for c in self.children:
            while True:
                try:
                    done, _ = os.waitpid(c.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                if time.monotonic() > until:
                    os.kill(c.pid, signal.SIGKILL)
                    os.waitpid(c.pid, 0)
                    break
                time.sleep(0.01)
            os.close(c.pidfd)
            c.sock.close()


# --------------------------------------------------------------------- merging status ----------
# Counters add up across readers; these are settings or per-process facts, kept as the first
# process has them.
_NOT_SUMMED = frozenset({"pid", "uptime_s", "version", "mode", "config", "features", "marks",
                         "generation", "limit", "max_us", "window_us", "hit_rate", "workers",
                         "processes", "compiled", "enabled", "read_loop", "count", "files",
                         "name", "health", "failures_in_a_row", "readers", "pids", "rule"})


# Lists of rows, matched up by this key: plugins by name, rule hits by rule number.
_ROW_KEYS = {"plugins": "name", "hits": "rule"}
# A plugin's health across readers is the worst of theirs (degraded.Breaker's states).
_HEALTH_RANK = {"healthy": 0, "probing": 1, "unhealthy": 2}


def merge_status(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Add another reader's counters into `mine` (in place)."""
    for key, value in theirs.items():
        if key in _NOT_SUMMED or key not in mine:
            if key not in mine and key not in _NOT_SUMMED:
                mine[key] = value
            continue
        have = mine[key]
        if isinstance(have, bool) or isinstance(value, bool):
            continue
        if isinstance(have, (int, float)) and isinstance(value, (int, float)):
            mine[key] = round(have + value, 3) if isinstance(have, float) or isinstance(value, float) \
                else have + value
        elif isinstance(have, dict) and isinstance(value, dict):
            merge_status(have, value)
        elif isinstance(have, list) and isinstance(value, list) and key in _ROW_KEYS:
            _merge_rows(have, value, _ROW_KEYS[key])


def _merge_rows(have: list[Any], value: list[Any], ident: str) -> None:
    by_id = {row.get(ident): row for row in have if isinstance(row, dict)}
    for row in value:
        if not isinstance(row, dict):
            continue
        mine = by_id.get(row.get(ident))
        if mine is None:  # a rule only that reader has hit so far
            have.append(dict(row))
            by_id[row.get(ident)] = have[-1]
            continue
        merge_status(mine, row)
        if _HEALTH_RANK.get(row.get("health"), -1) > _HEALTH_RANK.get(mine.get("health"), -1):
            mine["health"] = row["health"]
        if "failures_in_a_row" in row:
            mine["failures_in_a_row"] = max(mine.get("failures_in_a_row", 0), row["failures_in_a_row"])
    if ident == "rule":
        have.sort(key=lambda r: r.get("rule", 0))


# --------------------------------------------------------------------- a reader ------------------
def serve(args: argparse.Namespace) -> int:
    from . import fanotify as fan
    from .config import load
    from .daemon import Daemon
    from .logsetup import setup

    ctl = socket.socket(fileno=args.ctl)
    try:
        config = load(args.config)
        if args.watch:
            config = config.with_watch(tuple(args.watch))
        setup(config.daemon.log_level, tag=f" (reader {args.index})")
        features = fan.Features(**json.loads(args.features))
        group = fan.Group(args.gfd, features)
        peers = Peers(args.inbox, [int(x) for x in args.outboxes.split(",") if x])
        daemon = Daemon(config, group=group, peers=peers)
    except Exception as e:  # whatever it was, the first process says it and stops
        ctl.send(json.dumps({"ready": False, "error": str(e)}).encode())
        return 2
    threading.Thread(target=_answer_parent, args=(daemon, ctl), name="vetd-reader-ctl",
                     daemon=True).start()
    return daemon.run_reader(lambda: ctl.send(json.dumps({"ready": True}).encode()),
                             tuple(args.watch) if args.watch else None)


def _answer_parent(daemon: Any, ctl: socket.socket) -> None:
    """The first process's questions: status, reload, vetd's own pids. Its end closing means
    it is gone: stop (PR_SET_PDEATHSIG kills this process too, this is the polite path)."""
    while True:
        try:
            data = ctl.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            daemon.stop()
            return
        req: dict[str, Any] = {}
        try:
            req = json.loads(data)
            op = req.get("op")
            if op == "status":
                reply: dict[str, Any] = daemon.status()
            elif op == "reload":
                reply = {"result": daemon.reload_and_wait(RELOAD_TIMEOUT_S)}
            elif op == "own":
                daemon.set_sibling_pids(req.get("pids", []))
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown request {op!r}"}
        except Exception as e:  # answer, whatever went wrong: the first process waits for it
            reply = {"error": f"{type(e).__name__}: {e}"}
        reply["id"] = req.get("id", 0) if isinstance(req, dict) else 0
        try:
            ctl.send(json.dumps(reply, default=str).encode())
        except OSError:
            daemon.stop()
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vetd.readers")
    ap.add_argument("--config", required=True)
    ap.add_argument("--gfd", type=int, required=True)
    ap.add_argument("--ctl", type=int, required=True)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--inbox", type=int, required=True)
    ap.add_argument("--outboxes", default="")
    ap.add_argument("--watch", action="append")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # vetd stops it, not a terminal's ^C
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
