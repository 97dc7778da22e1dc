"""Agent plugin: hands each file to an out-of-process scanning agent over a Unix socket.

The agent is a separate program (any language) speaking vetd/agent_protocol.py, documented in
docs/agent-protocol.md. vetd passes the event fd itself (SCM_RIGHTS), never the path, so the
agent reads exactly the file being opened and raises no permission event of its own.

    [plugins.vendor]
    use = "agent"
    socket = "/run/vendor/agent.sock"
    timeout_s = 5        # bounds each scan from start to verdict: waiting, connecting, answering
    connections = 2      # pool size: scans in flight at once on this agent

Connections are opened lazily, kept for reuse, and dropped after any failure; the next scan
opens a fresh one, so an agent that restarts is picked up again by itself. Every socket call is
bounded by the scan's deadline: a frozen agent costs at most timeout_s, then scan() raises and
the host applies the plugin's degraded policy.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from vetd import __version__
from vetd.agent_protocol import (SUPPORTED_VERSIONS, AgentHello, ClientHello, ConnectionClosed,
                                 ErrorReply, ProtocolError, Reply, ScanRequest, VerdictReply,
                                 decode_reply, encode, recv_frame, send_frame)
from vetd.sdk import API_VERSION, check_keys, number_option, Decision, Opener, Plugin, PluginConfigError, ScanFile, Verdict

_KEYS = frozenset({"socket", "timeout_s", "connections"})
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the NUL


class AgentError(RuntimeError):
    """A scan the agent did not answer with a verdict; str() names the agent and what went wrong."""


class Agent(Plugin):
    name = "agent"
    api_version = API_VERSION

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        check_keys(config, _KEYS)
        path = config.get("socket")
        if not isinstance(path, str) or not path:
            raise PluginConfigError("socket: required, the path of the agent's Unix socket")
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise PluginConfigError(f"socket: {path!r} is longer than {_UNIX_PATH_MAX} bytes")
        conns = config.get("connections", 2)
        if isinstance(conns, bool) or not isinstance(conns, int) or not 1 <= conns <= 256:
            raise PluginConfigError(f"connections: expected an integer in 1..256, got {conns!r}")
        self.socket_path = path
        self.timeout_s = number_option(config, "timeout_s", 5, low=0, high=3600, what="a number")
        self.connections = conns
        self.agent_software: str | None = None  # from the last handshake, for status and logs
        self._slots = threading.BoundedSemaphore(conns)
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False

    # ------------------------------------------------------------------ the scan ---------------
    def scan(self, file: ScanFile, opener: Opener) -> Verdict:
        # timeout_s, or less if vetd answers the open by policy sooner; the agent is told
        # what is left (deadline_ms), so it can stop when nobody waits any more
        budget = file.time_left(self.timeout_s)
        deadline = time.monotonic() + budget
        step = "waiting for a free connection"
        if budget <= 0 or not self._slots.acquire(timeout=budget):
            raise AgentError(f"agent at {self.socket_path}: all {self.connections} connection(s) "
                             f"busy for {budget:.3g}s")
        sock: socket.socket | None = None
        try:
            sock = self._idle_connection()
            if sock is None:
                step = "connecting"
                sock = self._connect(deadline)
            with self._lock:
                req_id = next(self._ids)
            request = ScanRequest(req_id, file.size, _text(file.path), *_who(opener),
                                  deadline_ms=max(0, int((deadline - time.monotonic()) * 1000)))
            step = "sending the request"
            send_frame(sock, encode(request), file.fileno(), deadline=deadline)
            step = "waiting for the verdict"
            reply = self._reply(sock, deadline)
            if isinstance(reply, ErrorReply) and reply.id == req_id:
                self._checkin(sock)  # a well-formed refusal: the connection is still in step
                sock = None
                raise AgentError(f"agent at {self.socket_path} could not scan {file.path}: "
                                 f"{reply.code}: {reply.message}")
            if isinstance(reply, ErrorReply):
                raise AgentError(f"agent at {self.socket_path}: {reply.code}: {reply.message}")
            if not isinstance(reply, VerdictReply):
                raise ProtocolError(f"expected a verdict, got {reply.type}")
            if reply.id != req_id:
                raise ProtocolError(f"verdict for request {reply.id}, expected {req_id}")
            self._checkin(sock)
            sock = None
            return Verdict(Decision(reply.decision), reply.reason, "", reply.cacheable, reply.ttl_s)
        except AgentError:
            raise
        except TimeoutError:
            raise AgentError(f"agent at {self.socket_path}: no answer within {budget:.3g}s "
                             f"({step})") from None
        except ProtocolError as e:
            raise AgentError(f"agent at {self.socket_path}: protocol error ({step}): {e}") from e
        except ConnectionClosed as e:
            raise AgentError(f"agent at {self.socket_path} closed the connection ({step})") from e
        except OSError as e:
            raise AgentError(f"agent at {self.socket_path}: {e.strerror or e} ({step})") from e
        finally:
            if sock is not None:
                sock.close()  # after any failure the connection may be out of step: never reuse it
            self._slots.release()

    def _reply(self, sock: socket.socket, deadline: float) -> Reply:
        body, fds = recv_frame(sock, deadline=deadline)
        if fds:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("the agent sent a file descriptor")
        return decode_reply(body)

    # ------------------------------------------------------------------ connections ------------
    def _connect(self, deadline: float) -> socket.socket:
        """A new connection, handshaken."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(self.socket_path)
            send_frame(sock, encode(ClientHello(SUPPORTED_VERSIONS, f"vetd {__version__}")),
                       deadline=deadline)
            reply = self._reply(sock, deadline)
            offered = ", ".join(map(str, SUPPORTED_VERSIONS))
            if isinstance(reply, ErrorReply):
                raise AgentError(f"agent at {self.socket_path} refused the handshake "
                                 f"(vetd speaks protocol version {offered}): "
                                 f"{reply.code}: {reply.message}")
            if not isinstance(reply, AgentHello):
                raise ProtocolError(f"expected hello, got {reply.type}")
            if reply.version not in SUPPORTED_VERSIONS:
                raise ProtocolError(f"agent chose protocol version {reply.version}, "
                                    f"vetd offered {offered}")
            self.agent_software = reply.software
            return sock
        except BaseException:
            sock.close()
            raise

    def _idle_connection(self) -> socket.socket | None:
        """A pooled connection that is still good: one the agent closed (it restarted) or wrote
        to unasked reads as ready, and is dropped."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()
            p = select.poll()
            p.register(sock, select.POLLIN | select.POLLPRI)
            if not p.poll(0):
                return sock
            sock.close()

    def _checkin(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


def _text(s: str) -> str:
    """`s` as valid Unicode for the wire (a stray surrogate becomes a visible escape)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _who(opener: Opener) -> tuple[int | None, str | None, int | None]:
    """(pid, exe, uid) of the opener, each None when it cannot be known (an exited process)."""
    def get(attr: str) -> Any:
        try:
            return getattr(opener, attr)
        except Exception:
            return None
    exe = get("exe")
    return get("pid"), exe.decode("utf-8", "backslashreplace") if isinstance(exe, bytes) else None, \
        get("uid")
