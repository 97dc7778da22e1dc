"""vetd's control socket: a root-only Unix socket that answers JSON-lines requests such as `status`.

The daemon that hosts this server holds fanotify permission events. A thread that opens a watched
file while the intake thread waits on it can deadlock the machine, so after start() this module
never opens a file by path. That is why everything is imported at the top, why text is decoded
only as UTF-8 (other codecs load lazily from disk), and why errors are logged as
`log.error("...: %s", exc)` and never with logging.exception (formatting a traceback reads source
files through linecache).

Protocol, one JSON object per line each way:
    request  {"cmd": "status", "args": {...}}
    answer   {"ok": true, "result": ...}   or   {"ok": false, "error": "message"}
A connection may carry any number of requests until EOF.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "ControlError",
    "ControlServer",
    "ControlUnreachable",
    "DEFAULT_SOCKET",
    "MAX_REQUEST_BYTES",
    "request",
]

log = logging.getLogger("vetd.control")

DEFAULT_SOCKET = "/run/vetd/control.sock"
MAX_REQUEST_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 64 * 1024 * 1024
PERMISSION_DENIED = "permission denied: vetd's control socket is for root"

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_LISTEN_BACKLOG = 64
_PROBE_TIMEOUT_S = 1.0
_JOIN_BUDGET_S = 2.0


class ControlError(Exception):
    """The control channel failed, or the daemon answered a request with an error."""


class ControlUnreachable(ControlError):
    """No answer could be had from the daemon at all (not running, no access, timed out).

    Kept apart from ControlError so `vetctl` can tell "vetd said no" (exit 1) from "could not ask
    vetd" (exit 2).
    """


Handler = Callable[[dict], Any]


class ControlServer:
    """Serves the control socket at `path` on daemon threads; start() and stop() never block long.

    Handlers are called as handler(args) on connection threads, possibly several at once, so they
    must be thread-safe; their return value must be JSON-serialisable. The handler table is copied
    at construction: the set of commands is fixed for the life of the server.
    """

    def __init__(
        self,
        path: str,
        handlers: Mapping[str, Handler],
        *,
        allowed_uids: frozenset[int] = frozenset({0}),
        max_connections: int = 16,
        client_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self._handlers: dict[str, Handler] = dict(handlers)
        self._allowed_uids = frozenset(allowed_uids)
        self._client_timeout = client_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._bound_ino: tuple[int, int] | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (0600, parent dir 0700 if created) and start accepting connections.

        Raises ControlError if another live server answers on `path`, or if `path` is something
        other than a socket; a stale socket left by a dead daemon is replaced.
        """
        if self._listener is not None:
            raise ControlError(f"control server for {self.path} is already started")
        self._make_parent_dir()
        self._clear_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # umask, not chmod: the socket must never exist with looser permissions, even briefly.
            # umask is process-wide, so the window is kept to this one bind() call.
            old_umask = os.umask(0o177)
            try:
                listener.bind(self.path)
            finally:
                os.umask(old_umask)
            listener.listen(_LISTEN_BACKLOG)
            listener.setblocking(False)
            st = os.stat(self.path)
        except OSError as exc:
            listener.close()
            why = exc.strerror or exc
            raise ControlError(f"cannot serve control socket {self.path}: {why}") from exc
        self._bound_ino = (st.st_dev, st.st_ino)
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe()
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="vetd-control-accept", daemon=True
        )
        self._accept_thread.start()
        log.info("control socket listening on %s", self.path)

    def stop(self) -> None:
        """Stop accepting, drop open connections, unlink the socket; waits at most ~2 s in all."""
        if self._listener is None:
            return
        deadline = time.monotonic() + _JOIN_BUDGET_S
        self._stopping.set()
        os.write(self._wake_w, b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._listener.close()
        self._unlink_own_socket()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv()
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
        self._listener = None
        self._accept_thread = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _make_parent_dir(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(parent):
            return  # an existing dir (e.g. systemd's RuntimeDirectory=) keeps its owner's mode
        old_umask = os.umask(0o077)
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ControlError(f"cannot create {parent}: {exc.strerror or exc}") from exc
        finally:
            os.umask(old_umask)

    def _clear_stale_socket(self) -> None:
        """Unlink a socket nobody answers on; refuse to touch a live one or a non-socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(_PROBE_TIMEOUT_S)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)
            log.info("removed stale control socket %s", self.path)
            return
        except FileNotFoundError:
            return
        except TimeoutError:
            pass  # a full accept queue: someone is there, just busy
        except OSError as exc:
            why = exc.strerror or exc
            raise ControlError(f"cannot probe existing socket {self.path}: {why}") from exc
        finally:
            probe.close()
        raise ControlError(f"another vetd is already serving {self.path}")

    def _unlink_own_socket(self) -> None:
        # Only our own inode: a successor daemon may already have bound a fresh socket here.
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove control socket %s: %s", self.path, exc)

    # --- accepting -------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping.is_set():
            try:
                poller.poll()
            except InterruptedError:
                continue
            if self._stopping.is_set():
                break
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                log.error("control socket accept failed: %s", exc)
                self._stopping.wait(0.1)  # e.g. EMFILE: do not spin
                continue
            try:
                self._admit(conn)
            except Exception as exc:  # the accept thread must outlive any one connection
                log.error("control connection setup failed: %s", exc)
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        """Check the peer and take a slot on the accept thread, then hand off to a worker thread."""
        conn.settimeout(self._client_timeout)
        pid, uid, _gid = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        if uid not in self._allowed_uids:
            log.warning("refused control connection from pid %d uid %d", pid, uid)
            _send_and_close(conn, _error(PERMISSION_DENIED))
            return
        if not self._slots.acquire(blocking=False):
            log.warning("refused control connection from pid %d: too many connections", pid)
            _send_and_close(conn, _error("busy: too many control connections, try again"))
            return
        thread = threading.Thread(
            target=self._serve, args=(conn,), name=f"vetd-control-conn-{pid}", daemon=True
        )
        with self._lock:
            self._conns.add(conn)
            self._threads.add(thread)
        try:
            thread.start()
        except Exception:
            self._forget(conn, thread)
            conn.close()
            raise

    def _forget(self, conn: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._threads.discard(thread)
        self._slots.release()

    # --- serving one connection ------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        reader = _LineReader(conn, MAX_REQUEST_BYTES)
        try:
            while not self._stopping.is_set():
                # Each line must arrive whole within client_timeout of when we began waiting for
                # it, so a client dribbling a byte at a time cannot keep a thread either.
                line = reader.next_line(time.monotonic() + self._client_timeout)
                if line is None:
                    return
                conn.sendall(self._answer(line))
        except TimeoutError:
            log.warning(
                "control client sent no complete request within %gs; closing", self._client_timeout
            )
        except _LineTooLong as exc:  # answered, then dropped: the stream cannot be resynchronised
            try:
                conn.sendall(_encode(_error(f"bad request: {exc}")))
            except OSError:
                pass
        except OSError as exc:
            if not self._stopping.is_set():
                log.warning("control connection lost: %s", exc)
        finally:
            conn.close()
            self._forget(conn, threading.current_thread())

    def _answer(self, line: bytes) -> bytes:
        """The encoded answer line for one request line; never raises."""
        try:
            # Explicit UTF-8: json.loads(bytes) would pick UTF-16/32 codecs, which load from disk.
            req = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return _encode(_error(f"bad request: not a JSON line: {exc}"))
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return _encode(_error('bad request: expected {"cmd": NAME, "args": {...}}'))
        cmd = req["cmd"]
        args = req.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return _encode(_error("bad request: args must be a JSON object"))
        handler = self._handlers.get(cmd)
        if handler is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            return _encode(_error(f"unknown command {cmd!r}; known commands: {known}"))
        try:
            result = handler(args)
        except Exception as exc:
            log.error("control command %s failed: %s", cmd, exc)
            return _encode(_error(f"{cmd} failed: {str(exc) or type(exc).__name__}"))
        try:
            return _encode({"ok": True, "result": result})
        except (TypeError, ValueError) as exc:
            log.error("control command %s returned a value that is not JSON: %s", cmd, exc)
            return _encode(_error(f"{cmd} failed: its result is not JSON-serialisable: {exc}"))


class _LineTooLong(Exception):
    pass


class _LineReader:
    """Splits a stream socket into non-blank lines, each bounded in size and by a deadline."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._sock = sock
        self._limit = limit
        self._buf = bytearray()

    def next_line(self, deadline: float | None = None) -> bytes | None:
        """The next non-blank line, without its newline; None at EOF (a last unterminated line counts)."""
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                if len(line) > self._limit:
                    raise _LineTooLong(f"line longer than {self._limit} bytes")
                if line.strip():
                    return line
                continue
            if len(self._buf) > self._limit:
                raise _LineTooLong(f"line longer than {self._limit} bytes")
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
            if not chunk:
                line, self._buf = bytes(self._buf), bytearray()
                if len(line) > self._limit:
                    raise _LineTooLong(f"line longer than {self._limit} bytes")
                return line if line.strip() else None
            self._buf += chunk


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _encode(answer: Mapping[str, Any]) -> bytes:
    return (json.dumps(answer) + "\n").encode("utf-8")


def _send_and_close(conn: socket.socket, answer: Mapping[str, Any]) -> None:
    try:
        conn.sendall(_encode(answer))
    except OSError:
        pass
    finally:
        conn.close()


# --- client side -----------------------------------------------------------------------------------


def request(path: str, cmd: str, args: dict | None = None, timeout: float = 5.0) -> Any:
    """Send one command to the daemon at `path` and return its result.

    Raises ControlUnreachable when no answer can be had (with a message an operator can act on),
    and ControlError carrying the daemon's own message when it answers `ok: false`.
    """
    payload = _encode({"cmd": cmd, "args": args or {}})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(path)
        except OSError as exc:
            why = _why_unreachable(exc, timeout)
            raise ControlUnreachable(f"cannot reach vetd at {path}: {why}") from None
        try:
            try:
                sock.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon may have refused us already; its reason is waiting to be read
            raw = _LineReader(sock, MAX_ANSWER_BYTES).next_line(time.monotonic() + timeout)
        except TimeoutError:
            why = f"did not answer {cmd!r} within {timeout:g}s"
            raise ControlUnreachable(f"vetd at {path} {why}") from None
        except _LineTooLong:
            why = f"sent an answer over {MAX_ANSWER_BYTES} bytes"
            raise ControlUnreachable(f"vetd at {path} {why}") from None
        except OSError as exc:
            why = exc.strerror or exc
            raise ControlUnreachable(f"lost connection to vetd at {path}: {why}") from None
    if raw is None:
        raise ControlUnreachable(f"vetd at {path} closed the connection without answering")
    try:
        answer = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        answer = None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlUnreachable(f"vetd at {path} sent an answer that is not vetd's protocol")
    if not answer["ok"]:
        raise ControlError(str(answer.get("error") or "unspecified error"))
    return answer.get("result")


def _why_unreachable(exc: OSError, timeout: float) -> str:
    """What a failed connect() means to an operator."""
    if isinstance(exc, FileNotFoundError):
        return "no such file (is vetd running?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (stale socket; is vetd running?)"
    if isinstance(exc, PermissionError):
        return "permission denied (run as root)"
    if isinstance(exc, TimeoutError):
        return f"no connection within {timeout:g}s"
    return exc.strerror or str(exc)
