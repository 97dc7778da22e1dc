"""Write a vetd scanning agent in Python in a few lines: serve(socket_path, scan) does the rest.

    from vetd.agentkit import serve

    def scan(fd: int, request: dict) -> tuple[str, str]:
        head = os.pread(fd, 4096, 0)             # read through the fd; never open request["path"]
        return ("deny", "My-Signature") if b"evil" in head else ("allow", "")

    serve("/run/vendor/agent.sock", scan, workers=4)

The vendor function gets the received fd (closed for it afterwards) and the request as a dict
(id, size, path, pid, exe, uid, deadline_ms). It returns (decision, reason), or a dict with
"decision" and optionally "reason", "cacheable", "ttl_s". If it raises, vetd is told the scan
failed and applies its degraded policy; the agent goes on.

The server listens, handshakes (docs/agent-protocol.md), reads one request at a time per
connection, and runs at most `workers` vendor calls at once across all connections. A client
that disconnects, stalls or sends garbage costs only its own connection.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .agent_protocol import (E_BAD_REQUEST, E_BUSY, E_SCAN_FAILED, E_UNSUPPORTED_VERSION,
                             SUPPORTED_VERSIONS, AgentHello, ClientHello, ConnectionClosed,
                             ErrorReply, ProtocolError, ScanRequest, VerdictReply, decode_request,
                             encode, negotiate, recv_frame, send_frame)

__all__ = ["serve", "AgentServer", "ScanFunction"]

log = logging.getLogger("vetd.agentkit")
ScanFunction = Callable[[int, dict[str, Any]], "tuple[str, str] | Mapping[str, Any]"]


class AgentServer:
    """A listening agent. Bound on construction (so a bad path fails at once), serving from
    serve_forever() until shutdown()."""

    def __init__(self, socket_path: str, scan: ScanFunction, *, workers: int = 4,
                 max_connections: int = 64, software: str = "vetd-agentkit", mode: int = 0o600,
                 io_timeout_s: float = 10.0, versions: Sequence[int] = SUPPORTED_VERSIONS):
        if workers < 1 or max_connections < 1:
            raise ValueError("workers and max_connections must be at least 1")
        self.socket_path = socket_path
        self.software = software
        self.versions = tuple(versions)
        self.io_timeout_s = io_timeout_s
        self.max_connections = max_connections
        self._scan = scan
        self._workers = threading.BoundedSemaphore(workers)
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        _remove_stale_socket(socket_path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o777 & ~mode)
            try:
                self._listener.bind(socket_path)
            finally:
                os.umask(old)
            self._listener.listen(max(16, max_connections))
            self._listener.settimeout(0.5)  # wakes accept() to notice shutdown()
        except BaseException:
            self._listener.close()
            raise

    def serve_forever(self) -> None:
        log.info("agent %s listening on %s", self.software, self.socket_path)
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                with self._lock:
                    full = len(self._conns) >= self.max_connections
                    if not full:
                        self._conns.add(conn)
                if full:
                    self._refuse(conn)
                    continue
                threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                                 name="agent-conn").start()
        finally:
            self._listener.close()
            try:
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)
            except OSError:
                pass
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)  # wakes its thread, which closes it
                except OSError:
                    pass

    def shutdown(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ one connection ---------
    def _refuse(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0)
            try:
                send_frame(conn, encode(ErrorReply(None, E_BUSY, f"over {self.max_connections} connections")))
            except OSError:
                pass

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            if self._handshake(conn):
                while not self._stop.is_set() and self._wait_readable(conn):
                    if not self._serve_one(conn):
                        break
        except ConnectionClosed as e:
            if e.mid_frame:
                log.info("client closed the connection inside a frame")
        except TimeoutError:
            log.warning("client stalled for %gs inside a frame or reply; dropped", self.io_timeout_s)
        except OSError as e:  # EPIPE, ECONNRESET: the client went away
            log.info("connection dropped: %s", e)
        except Exception as e:  # never let one connection take the agent down
            log.error("connection failed: %s: %s", type(e).__name__, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _wait_readable(self, conn: socket.socket) -> bool:
        """Idle until the client sends (an idle pooled connection may wait for hours)."""
        p = select.poll()
        p.register(conn, select.POLLIN | select.POLLPRI)
        while not self._stop.is_set():
            if p.poll(500):
                return True
        return False

    def _handshake(self, conn: socket.socket) -> bool:
        deadline = time.monotonic() + self.io_timeout_s
        msg, fds = self._read(conn, deadline)
        if msg is None:
            return False
        _close_fds(fds)
        if not isinstance(msg, ClientHello):
            self._send(conn, ErrorReply(None, E_BAD_REQUEST, f"expected hello, got {msg.type}"), deadline)
            return False
        version = negotiate(msg.versions, self.versions)
        if version is None:
            speaks = ", ".join(map(str, self.versions))
            offered = ", ".join(map(str, msg.versions))
            self._send(conn, ErrorReply(None, E_UNSUPPORTED_VERSION,
                                        f"this agent speaks protocol version {speaks}; "
                                        f"the client offered {offered}"), deadline)
            return False
        self._send(conn, AgentHello(version, self.software), deadline)
        return True

    def _serve_one(self, conn: socket.socket) -> bool:
        """Read one request and answer it; False when the connection must end."""
        deadline = time.monotonic() + self.io_timeout_s
        msg, fds = self._read(conn, deadline)
        if msg is None:
            return False
        if not isinstance(msg, ScanRequest):
            _close_fds(fds)
            self._send(conn, ErrorReply(None, E_BAD_REQUEST, f"unexpected {msg.type} after hello"),
                       deadline)
            return False
        if len(fds) != 1:
            _close_fds(fds)
            self._send(conn, ErrorReply(msg.id, E_BAD_REQUEST,
                                        f"a scan carries exactly one fd, this one had {len(fds)}"),
                       deadline)
            return True
        reply = self._run_scan(fds[0], msg)
        self._send(conn, reply, time.monotonic() + self.io_timeout_s)
        return True

    def _run_scan(self, fd: int, req: ScanRequest) -> VerdictReply | ErrorReply:
        try:
            with self._workers:
                result = self._scan(fd, {"id": req.id, "size": req.size, "path": req.path,
                                         "pid": req.pid, "exe": req.exe, "uid": req.uid,
                                         "deadline_ms": req.deadline_ms})
            return _verdict_of(req.id, result)
        except Exception as e:
            log.warning("scan %d (%s) failed: %s: %s", req.id, req.path, type(e).__name__, e)
            return ErrorReply(req.id, E_SCAN_FAILED, f"{type(e).__name__}: {e}"[:4096])
        finally:
            os.close(fd)

    def _read(self, conn: socket.socket, deadline: float):
        """The next request and its fds, or (None, []) after answering a malformed frame."""
        fds: list[int] = []
        try:
            body, fds = recv_frame(conn, deadline=deadline)
            return decode_request(body), fds
        except ProtocolError as e:  # out of step now: say why, then the caller hangs up
            _close_fds(fds)
            self._send(conn, ErrorReply(None, E_BAD_REQUEST, str(e)[:4096]), deadline)
            return None, []

    @staticmethod
    def _send(conn: socket.socket, msg: Any, deadline: float) -> None:
        send_frame(conn, encode(msg), deadline=deadline)


def _verdict_of(req_id: int, result: Any) -> VerdictReply:
    """The vendor function's answer as a verdict frame; TypeError/ValueError if malformed."""
    if isinstance(result, tuple) and len(result) == 2:
        decision, reason = result
        fields: dict[str, Any] = {"decision": decision, "reason": reason}
    elif isinstance(result, Mapping):
        fields = dict(result)
    else:
        raise TypeError(f"scan function returned {type(result).__name__}, "
                        "expected (decision, reason) or a dict")
    unknown = set(fields) - {"decision", "reason", "cacheable", "ttl_s"}
    if unknown:
        raise ValueError(f"scan function returned unknown key(s) {sorted(unknown)}")
    decision = str(getattr(fields.get("decision"), "value", fields.get("decision")))
    reply = VerdictReply(req_id, decision, str(fields.get("reason") or ""),
                         fields.get("cacheable", True), fields.get("ttl_s"))
    encode(reply)  # validates: raises ProtocolError (a ValueError) for a bad decision or ttl
    return reply


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left by an agent that died; refuse to remove anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise FileExistsError(f"another agent is listening on {path}")


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def serve(socket_path: str, scan: ScanFunction, *, workers: int = 4, **options: Any) -> None:
    """Serve `scan` on `socket_path` until SIGTERM or SIGINT (options: see AgentServer)."""
    server = AgentServer(socket_path, scan, workers=workers, **options)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.shutdown())
    server.serve_forever()
