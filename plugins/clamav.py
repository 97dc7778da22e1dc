"""ClamAV scanner: ask a running clamd about each file, through the event's file descriptor.

On a local Unix socket the event fd itself is handed to clamd (`zFILDES`, the descriptor riding
SCM_RIGHTS), so clamd reads the very file the kernel reported and never opens a path: an open by
path from clamd would raise a new permission event and wait on vetd, which waits on clamd. Over
TCP (a remote clamd) the content is streamed with `zINSTREAM`, read through the fd by extent.

Connections are persistent clamd sessions (`zIDSESSION`), pooled up to `connections`, one request
in flight per connection, so scans from vetd's worker threads run side by side. Every socket
operation of a scan runs under one deadline (`timeout_s`): a frozen clamd makes scan() raise
TimeoutError, never hang. A connection that breaks, times out or gets an ERROR reply is dropped;
the next scan connects afresh, so a restarted clamd is picked up without a vetd reload. clamd
being down when the plugin is built only logs a warning: scans raise (and the host answers by its
degraded policy) until clamd is back. A malformed table raises PluginConfigError.

Replies are parsed strictly: `fd[N]: OK` / `stream: OK` allow, `... NAME FOUND` denies with the
reason `clamav:NAME`, `... ERROR` raises ClamdError, and anything else (garbage, a wrong session
id, a short read, EOF) raises ClamdProtocolError.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Mapping
from typing import Any

from vetd.sdk import API_VERSION, check_keys, number_option, Opener, Plugin, PluginConfigError, ScanFile, Verdict

log = logging.getLogger("vetd.plugins.clamav")

DEFAULT_SOCKET = "/run/clamav/clamd.ctl"
DEFAULT_TIMEOUT_S = 4.0  # below the default event deadline (5 s), so a frozen clamd frees the worker first
DEFAULT_CONNECTIONS = 4
KEYS = frozenset({"socket", "address", "timeout_s", "connections"})

MAX_REPLY = 64 * 1024        # a scan reply is a line; more than this without a terminator is garbage
STREAM_CHUNK = 256 * 1024    # INSTREAM chunk size (clamd accepts any size up to StreamMaxLength)
PROBE_TIMEOUT_S = 3.0        # the start-up PING: never delays vetd's start by more than this
_SUN_PATH_MAX = 107          # sockaddr_un.sun_path holds 108 bytes, NUL included
_SEND = getattr(socket, "MSG_NOSIGNAL", 0)
_STALE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN})

_SESSION_REPLY = re.compile(rb"(\d+): (.*)", re.DOTALL)
_SCAN_REPLY = re.compile(r"(?:fd\[\d+\]|stream): (.+)", re.DOTALL)


class ClamdError(RuntimeError):
    """clamd could not be reached, or answered ERROR; the host applies the degraded policy."""


class ClamdProtocolError(ClamdError):
    """clamd (or whatever listens there) answered something this plugin does not understand."""


class ClamdUnavailable(ClamdError):
    """No connection to clamd (not running, wrong socket, refused)."""


class _Stale(Exception):
    """A pooled connection turned out to be closed before it answered (safe to retry once)."""


# --- configuration ---------------------------------------------------------------------------------
def parse_address(text: Any) -> tuple[str, int]:
    """'host:port' or '[v6addr]:port' -> (host, port); PluginConfigError otherwise."""
    if not isinstance(text, str) or not text:
        raise PluginConfigError(f"address: expected \"host:port\", got {text!r}")
    host, sep, port_s = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise PluginConfigError(f"address: {text!r}: write an IPv6 address as [addr]:port")
    if not sep or not host or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise PluginConfigError(f"address: expected \"host:port\" with a port in 1-65535, got {text!r}")
    return host, int(port_s)


# --- one connection to clamd ------------------------------------------------------------------------
class _Deadline:
    __slots__ = ("at", "seconds")

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"clamd did not answer within {self.seconds:g}s")
        return left


class _Conn:
    """One socket to clamd, optionally in an IDSESSION; used by one thread at a time."""

    def __init__(self, sock: socket.socket, session: bool):
        self.sock = sock
        self.session = session
        self.next_id = 1
        self.requests = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def usable(self) -> bool:
        """An idle connection clamd has not closed (or written to: that would be out of turn)."""
        try:
            p = select.poll()
            p.register(self.sock, select.POLLIN | select.POLLPRI)
            return not p.poll(0)
        except (OSError, ValueError):
            return False

    def readable_now(self) -> bool:
        p = select.poll()
        p.register(self.sock, select.POLLIN)
        return bool(p.poll(0))

    def send(self, data: bytes, deadline: _Deadline) -> None:
        self.sock.settimeout(deadline.left())
        self.sock.sendall(data, _SEND)

    def send_fd(self, fd: int, deadline: _Deadline) -> None:
        self.sock.settimeout(deadline.left())
        fds = array.array("i", [fd])
        n = self.sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())], _SEND)
        if n != 1:
            raise ClamdError("could not pass the file descriptor to clamd")

    def read_reply(self, deadline: _Deadline) -> bytes:
        """One NUL-terminated reply; raises on EOF, overlong or trailing data."""
        buf = bytearray()
        while True:
            self.sock.settimeout(deadline.left())
            chunk = self.sock.recv(4096)
            if not chunk:
                if not buf:
                    raise _Stale("clamd closed the connection without answering")
                raise ClamdProtocolError(f"clamd closed the connection mid-reply after {bytes(buf[:200])!r}")
            buf += chunk
            end = buf.find(b"\0")
            if end >= 0:
                if end != len(buf) - 1:
                    # clamd answers one request with one reply; a second is out of protocol (it
                    # sends two only on errors, which the first one already says)
                    first = bytes(buf[:end])
                    if first.endswith(b" ERROR"):
                        return first
                    raise ClamdProtocolError(f"unexpected data after the reply {first[:200]!r}")
                return bytes(buf[:end])
            if len(buf) > MAX_REPLY:
                raise ClamdProtocolError(f"reply longer than {MAX_REPLY} bytes without a terminator")

    def unwrap(self, reply: bytes) -> bytes:
        """Strip and check the session's request id."""
        if not self.session:
            return reply
        m = _SESSION_REPLY.fullmatch(reply)
        if m is None:
            raise ClamdProtocolError(f"reply without a session id: {reply[:200]!r}")
        if int(m.group(1)) != self.next_id:
            raise ClamdProtocolError(f"reply for request {int(m.group(1))}, expected {self.next_id}")
        self.next_id += 1
        return m.group(2)


def parse_scan_reply(body: bytes) -> Verdict:
    """A clamd scan reply (session id already stripped) -> Verdict, or raise."""
    text = body.decode("utf-8", "backslashreplace")
    if text.endswith(" ERROR"):
        raise ClamdError(f"clamd: {text[:-6].strip()[:300]}")
    m = _SCAN_REPLY.fullmatch(text)
    if m is not None:
        rest = m.group(1)
        if rest == "OK":
            return Verdict.allow()
        if rest.endswith(" FOUND"):
            name = rest[:-6].strip()
            if name and name.isprintable() and len(name) <= 512:
                return Verdict.deny(f"clamav:{name}")
    raise ClamdProtocolError(f"unexpected reply from clamd: {text[:300]!r}")


# --- the plugin ---------------------------------------------------------------------------------------
class ClamAV(Plugin):
    name = "clamav"
    api_version = API_VERSION

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        check_keys(config, KEYS)
        if "socket" in config and "address" in config:
            raise PluginConfigError("set either socket (local clamd) or address (remote clamd), not both")
        self.address: tuple[str, int] | None = None
        self.socket_path: str | None = None
        if "address" in config:
            self.address = parse_address(config["address"])
            self.target = f"tcp:{config['address']}"
        else:
            path = config.get("socket", DEFAULT_SOCKET)
            if not isinstance(path, str) or not path.startswith("/"):
                raise PluginConfigError(f"socket: expected an absolute path, got {path!r}")
            if len(os.fsencode(path)) > _SUN_PATH_MAX:
                raise PluginConfigError(f"socket: {path!r} is longer than a Unix socket path may be "
                                        f"({_SUN_PATH_MAX} bytes)")
            self.socket_path = path
            self.target = path
        self.timeout_s = number_option(config, "timeout_s", DEFAULT_TIMEOUT_S, low=0.0, high=3600.0,
                                       what="a number of seconds")
        self.connections = int(number_option(config, "connections", DEFAULT_CONNECTIONS, low=1,
                                             high=256, integer=True))
        self._persistent = True  # keep sessions open between scans (see docs/plugins/clamav.md)
        self._slots = threading.BoundedSemaphore(self.connections)
        self._lock = threading.Lock()
        self._idle: list[_Conn] = []
        self._closed = False
        self._reachable: bool | None = None
        self.counters = {"scans": 0, "connects": 0, "reused": 0, "retries": 0, "dropped": 0}
        try:
            version = self.version(timeout=min(self.timeout_s, PROBE_TIMEOUT_S))
        except Exception as e:  # clamd down at start is not a configuration error
            self._reachable = False
            log.warning("clamd at %s is not answering (%s: %s); scans fail until it is back",
                        self.target, type(e).__name__, e)
        else:
            self._reachable = True
            log.info("clamd at %s: %s", self.target, version)

    # -- connections ------------------------------------------------------------------------------
    def _connect(self, deadline: _Deadline, session: bool) -> _Conn:
        try:
            if self.address is not None:
                sock = self._connect_tcp(deadline)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    sock.settimeout(deadline.left())
                    sock.connect(self.socket_path)
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            raise
        except OSError as e:
            raise ClamdUnavailable(f"cannot connect to clamd at {self.target}: {e.strerror or e}") from e
        conn = _Conn(sock, session)
        with self._lock:
            self.counters["connects"] += 1
        if session:
            try:
                conn.send(b"zIDSESSION\0", deadline)
            except TimeoutError:
                conn.close()
                raise
            except OSError as e:
                conn.close()
                raise ClamdUnavailable(f"clamd at {self.target} hung up: {e.strerror or e}") from e
        return conn

    def _connect_tcp(self, deadline: _Deadline) -> socket.socket:
        assert self.address is not None
        host, port = self.address
        infos = _resolve(host, port, deadline)
        last: OSError | None = None
        for family, type_, proto, _, sockaddr in infos:
            sock = socket.socket(family, type_ | socket.SOCK_CLOEXEC, proto)
            try:
                sock.settimeout(deadline.left())
                sock.connect(sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except TimeoutError:
                sock.close()
                raise
            except OSError as e:
                sock.close()
                last = e
        raise last or OSError(errno.EHOSTUNREACH, f"no address for {host}")

    def _checkout(self, deadline: _Deadline) -> tuple[_Conn, bool]:
        while True:
            with self._lock:
                if self._closed:
                    raise ClamdError("the clamav plugin was closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(deadline, self._persistent), False
            if conn.usable():
                return conn, True
            conn.close()  # clamd closed it while idle (restarted, or its ReadTimeout)
            with self._lock:
                self.counters["dropped"] += 1

    def _checkin(self, conn: _Conn) -> None:
        if self._persistent:
            with self._lock:
                if not self._closed and len(self._idle) < self.connections:
                    self._idle.append(conn)
                    return
        conn.close()

    # -- requests -------------------------------------------------------------------------------
    def _request(self, conn: _Conn, file: ScanFile, deadline: _Deadline) -> bytes:
        """Send one scan request on `conn` and return its (unwrapped) reply."""
        conn.requests += 1
        try:
            if self.address is None:
                conn.send(b"zFILDES\0", deadline)
                conn.send_fd(file.fileno(), deadline)
            else:
                reply = self._instream(conn, file, deadline)
                if reply is not None:
                    return conn.unwrap(reply)
            return conn.unwrap(conn.read_reply(deadline))
        except TimeoutError:
            raise
        except OSError as e:
            if e.errno in _STALE_ERRNOS:
                raise _Stale(f"connection to clamd broke: {e.strerror}") from e
            raise ClamdError(f"talking to clamd at {self.target}: {e.strerror or e}") from e

    def _instream(self, conn: _Conn, file: ScanFile, deadline: _Deadline) -> bytes | None:
        """Stream the content; returns clamd's reply early if it answers before the end (it does
        when StreamMaxLength is exceeded), else None and the caller reads the reply."""
        conn.send(b"zINSTREAM\0", deadline)
        try:
            for chunk in file.chunks(STREAM_CHUNK):
                if conn.readable_now():
                    return conn.read_reply(deadline)
                conn.send(struct.pack(">I", len(chunk)) + chunk, deadline)
            conn.send(b"\0\0\0\0", deadline)
        except OSError as e:
            if isinstance(e, TimeoutError) or e.errno not in _STALE_ERRNOS:
                raise
            # clamd stopped reading mid-stream: it usually said why before closing
            try:
                return conn.read_reply(deadline)
            except (_Stale, OSError):
                raise e from None
        return None

    def scan(self, file: ScanFile, opener: Opener) -> Verdict:
        # timeout_s, or less if vetd answers the open by policy sooner: waiting on clamd after
        # that only holds a worker and a connection
        deadline = _Deadline(file.time_left(self.timeout_s))
        with self._lock:
            self.counters["scans"] += 1
        if not self._slots.acquire(timeout=deadline.left()):
            raise TimeoutError(f"all {self.connections} connections to clamd stayed busy for "
                               f"{deadline.seconds:.3g}s")
        try:
            return self._scan(file, deadline)
        except TimeoutError:
            raise TimeoutError(f"clamd at {self.target} did not answer within {deadline.seconds:.3g}s") from None
        except ClamdUnavailable as e:
            self._note_down(str(e))
            raise
        finally:
            self._slots.release()

    def _scan(self, file: ScanFile, deadline: _Deadline) -> Verdict:
        for attempt in (1, 2):
            conn, reused = self._checkout(deadline)
            try:
                verdict = parse_scan_reply(self._request(conn, file, deadline))
            except _Stale as e:
                conn.close()
                if reused and attempt == 1:  # clamd closed an idle session under us: once more
                    with self._lock:
                        self.counters["retries"] += 1
                    continue
                raise ClamdUnavailable(f"clamd at {self.target}: {e}") from None
            except BaseException:
                # clamd ends a session after an ERROR reply; after a timeout or a reply we did not
                # understand, the connection is in an unknown state: never reuse it
                conn.close()
                raise
            if reused:
                with self._lock:
                    self.counters["reused"] += 1
            self._checkin(conn)
            self._note_up()
            return verdict
        raise AssertionError("unreachable")

    def _note_down(self, why: str) -> None:
        if self._reachable is not False:
            self._reachable = False
            log.warning("clamd at %s is unreachable: %s", self.target, why)

    def _note_up(self) -> None:
        if self._reachable is False:
            log.info("clamd at %s answers again", self.target)
        self._reachable = True

    # -- control commands ------------------------------------------------------------------------
    def _command(self, command: bytes, timeout: float | None) -> bytes:
        deadline = _Deadline(self.timeout_s if timeout is None else timeout)
        conn = self._connect(deadline, session=False)
        try:
            conn.send(b"z" + command + b"\0", deadline)
            return conn.read_reply(deadline)
        except _Stale as e:
            raise ClamdError(f"clamd at {self.target}: {e}") from None
        finally:
            conn.close()

    def ping(self, timeout: float | None = None) -> None:
        """PING on a fresh connection; raises unless clamd answers PONG."""
        reply = self._command(b"PING", timeout)
        if reply != b"PONG":
            raise ClamdProtocolError(f"PING answered {reply[:200]!r}")

    def version(self, timeout: float | None = None) -> str:
        """clamd's VERSION line (engine/signature version/date)."""
        reply = self._command(b"VERSION", timeout)
        text = reply.decode("utf-8", "backslashreplace")
        if not text.startswith("ClamAV "):
            raise ClamdProtocolError(f"VERSION answered {reply[:200]!r}")
        return text

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.sock.settimeout(0.5)
                conn.sock.send(b"zEND\0", _SEND)
            except OSError:
                pass
            conn.close()


def _resolve(host: str, port: int, deadline: _Deadline) -> list[tuple]:
    """getaddrinfo bounded by the deadline (it has no timeout of its own)."""
    try:  # a numeric address needs no lookup
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except socket.gaierror:
        pass
    result: list[Any] = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=lookup, name="vetd-clamav-resolve", daemon=True)
    t.start()
    t.join(deadline.left())
    if not result:
        raise TimeoutError(f"resolving {host} took longer than {deadline.seconds:g}s")
    if isinstance(result[0], OSError):
        raise OSError(errno.EHOSTUNREACH, f"cannot resolve {host}: {result[0]}")
    return result[0]
