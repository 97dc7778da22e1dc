"""The out-of-process agent wire protocol: message codecs (pure) and frame I/O on a Unix socket.

vetd (the client) talks to a scanning agent (the server) over a Unix stream socket. Every message
is a frame: a 4-byte big-endian length N (1 <= N <= MAX_FRAME) followed by N bytes of UTF-8
JSON holding one object with a string "type". A connection starts with a HELLO exchange (the
client offers the versions it speaks, the agent picks one or answers an ERROR and closes), then
carries SCAN requests, one at a time, each with the file as one fd passed by SCM_RIGHTS on the
same sendmsg as its frame, answered by a VERDICT or an ERROR with the request's id.

docs/agent-protocol.md is the specification; this module is its reference implementation. The
codecs are pure functions of bytes and values. Anything malformed raises ProtocolError; unknown
keys are ignored (a later minor revision may add optional ones), unknown types are not.
"""

from __future__ import annotations

import array
import json
import math
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
MAX_FRAME = 64 * 1024          # bytes of JSON after the length prefix
HEADER = struct.Struct(">I")
MAX_ID = (1 << 53) - 1          # ids stay exact in every JSON implementation
_MAX_U64 = (1 << 64) - 1
_MAX_VERSIONS = 32

__all__ = ["PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "MAX_FRAME", "MAX_ID", "ProtocolError",
           "ConnectionClosed", "ClientHello", "AgentHello", "ScanRequest", "VerdictReply",
           "ErrorReply", "Request", "Reply", "encode", "frame_length", "decode_request",
           "decode_reply", "negotiate", "send_frame", "recv_frame"]


class ProtocolError(ValueError):
    """A frame or message that breaks the protocol. The connection is out of step: close it."""


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (`mid_frame` says whether it did so inside a frame)."""

    def __init__(self, message: str, *, mid_frame: bool):
        super().__init__(message)
        self.mid_frame = mid_frame


# --- messages --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClientHello:
    """client -> agent, first frame: the protocol versions the client speaks."""

    type: ClassVar[str] = "hello"
    versions: tuple[int, ...]
    software: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "versions": list(self.versions), "software": self.software}


@dataclass(frozen=True, slots=True)
class AgentHello:
    """agent -> client, first frame: the version chosen from the client's offer."""

    type: ClassVar[str] = "hello"
    version: int
    software: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "version": self.version, "software": self.software}


@dataclass(frozen=True, slots=True)
class ScanRequest:
    """client -> agent: scan the file whose fd rides on this frame. `path` and `exe` are for
    display only (non-UTF-8 bytes come as backslash escapes); never open them."""

    type: ClassVar[str] = "scan"
    id: int
    size: int
    path: str = ""
    pid: int | None = None
    exe: str | None = None
    uid: int | None = None
    deadline_ms: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "size": self.size, "path": self.path,
                "pid": self.pid, "exe": self.exe, "uid": self.uid, "deadline_ms": self.deadline_ms}


@dataclass(frozen=True, slots=True)
class VerdictReply:
    """agent -> client: the answer to scan `id`."""

    type: ClassVar[str] = "verdict"
    id: int
    decision: str  # "allow" | "deny"
    reason: str = ""
    cacheable: bool = True
    ttl_s: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "decision": self.decision, "reason": self.reason,
                "cacheable": self.cacheable, "ttl_s": self.ttl_s}


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """agent -> client: scan `id` failed, or (id None) the connection is refused or broken."""

    type: ClassVar[str] = "error"
    id: int | None
    code: str
    message: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "code": self.code, "message": self.message}


Request = Union[ClientHello, ScanRequest]
Reply = Union[AgentHello, VerdictReply, ErrorReply]
Message = Union[ClientHello, AgentHello, ScanRequest, VerdictReply, ErrorReply]

# error codes an agent sends (others are allowed; a client shows them as they come)
E_UNSUPPORTED_VERSION = "unsupported_version"
E_BAD_REQUEST = "bad_request"
E_SCAN_FAILED = "scan_failed"
E_BUSY = "busy"


# --- encoding ---------------------------------------------------------------------------------------
def encode(msg: Message) -> bytes:
    """One frame (length prefix and JSON body) for a message, validated as it would be decoded."""
    wire = msg.to_wire()
    _VALIDATORS[(isinstance(msg, (ClientHello, ScanRequest)), wire["type"])](wire)
    try:
        body = json.dumps(wire, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except (ValueError, UnicodeEncodeError) as e:
        raise ProtocolError(f"cannot encode {wire['type']}: {e}") from None
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"{wire['type']} frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length announced by a 4-byte header."""
    if len(header) != HEADER.size:
        raise ProtocolError(f"frame header is {len(header)} bytes, expected {HEADER.size}")
    (n,) = HEADER.unpack(header)
    if n == 0 or n > MAX_FRAME:
        raise ProtocolError(f"frame length {n} outside 1..{MAX_FRAME}")
    return n


# --- decoding ---------------------------------------------------------------------------------------
def decode_request(body: bytes) -> Request:
    """A frame body an agent received: a ClientHello or a ScanRequest."""
    return _decode(body, True)  # type: ignore[return-value]


def decode_reply(body: bytes) -> Reply:
    """A frame body a client received: an AgentHello, a VerdictReply or an ErrorReply."""
    return _decode(body, False)  # type: ignore[return-value]


def negotiate(offered: Sequence[int], spoken: Sequence[int] = SUPPORTED_VERSIONS) -> int | None:
    """The highest version both sides speak, or None."""
    common = set(offered) & set(spoken)
    return max(common) if common else None


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ProtocolError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _decode(body: bytes, to_agent: bool) -> Message:
    if len(body) == 0 or len(body) > MAX_FRAME:
        raise ProtocolError(f"frame body of {len(body)} bytes outside 1..{MAX_FRAME}")
    try:
        text = bytes(body).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError(f"frame is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame holds a JSON {type(obj).__name__}, not an object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("frame has no string 'type'")
    validator = _VALIDATORS.get((to_agent, kind))
    if validator is None:
        side = "agent" if to_agent else "client"
        raise ProtocolError(f"unexpected message type {kind!r} for the {side}")
    return validator(obj)


def _field(obj: dict[str, Any], key: str, default: Any = ...) -> Any:
    if key in obj:
        return obj[key]
    if default is ...:
        raise ProtocolError(f"{obj.get('type')}: missing {key!r}")
    return default


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, *, default: Any = ...,
         nullable: bool = False) -> int | None:
    v = _field(obj, key, default)
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProtocolError(f"{obj.get('type')}: {key!r} must be an integer in {lo}..{hi}"
                            f"{' or null' if nullable else ''}, got {v!r:.60}")
    return v


def _text(obj: dict[str, Any], key: str, *, default: Any = ..., nullable: bool = False) -> str | None:
    v = _field(obj, key, default)
    if v is None and nullable:
        return None
    if not isinstance(v, str):
        raise ProtocolError(f"{obj.get('type')}: {key!r} must be a string, got {v!r:.60}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape (\ud800) is JSON but not text
        raise ProtocolError(f"{obj.get('type')}: {key!r} is not valid Unicode") from None
    return v


def _client_hello(obj: dict[str, Any]) -> ClientHello:
    versions = _field(obj, "versions")
    if not isinstance(versions, list) or not 1 <= len(versions) <= _MAX_VERSIONS:
        raise ProtocolError(f"hello: 'versions' must be a list of 1..{_MAX_VERSIONS} integers")
    for v in versions:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 0xFFFF:
            raise ProtocolError(f"hello: version {v!r:.60} is not an integer in 1..65535")
    return ClientHello(tuple(versions), _text(obj, "software", default=""))  # type: ignore[arg-type]


def _agent_hello(obj: dict[str, Any]) -> AgentHello:
    return AgentHello(_int(obj, "version", 1, 0xFFFF),  # type: ignore[arg-type]
                      _text(obj, "software", default=""))  # type: ignore[arg-type]


def _scan(obj: dict[str, Any]) -> ScanRequest:
    return ScanRequest(
        id=_int(obj, "id", 0, MAX_ID),  # type: ignore[arg-type]
        size=_int(obj, "size", 0, _MAX_U64),  # type: ignore[arg-type]
        path=_text(obj, "path", default=""),  # type: ignore[arg-type]
        pid=_int(obj, "pid", 0, 0x7FFFFFFF, default=None, nullable=True),
        exe=_text(obj, "exe", default=None, nullable=True),
        uid=_int(obj, "uid", 0, 0xFFFFFFFF, default=None, nullable=True),
        deadline_ms=_int(obj, "deadline_ms", 0, _MAX_U64, default=0),  # type: ignore[arg-type]
    )


def _verdict(obj: dict[str, Any]) -> VerdictReply:
    decision = _field(obj, "decision")
    if decision not in ("allow", "deny"):
        raise ProtocolError(f"verdict: 'decision' must be \"allow\" or \"deny\", got {decision!r:.60}")
    cacheable = _field(obj, "cacheable", True)
    if not isinstance(cacheable, bool):
        raise ProtocolError(f"verdict: 'cacheable' must be true or false, got {cacheable!r:.60}")
    ttl = _field(obj, "ttl_s", None)
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))
                            or not math.isfinite(ttl) or ttl < 0):
        raise ProtocolError(f"verdict: 'ttl_s' must be null or a number >= 0, got {ttl!r:.60}")
    return VerdictReply(_int(obj, "id", 0, MAX_ID), decision,  # type: ignore[arg-type]
                        _text(obj, "reason", default=""), cacheable,  # type: ignore[arg-type]
                        None if ttl is None else float(ttl))


def _error(obj: dict[str, Any]) -> ErrorReply:
    code = _text(obj, "code")
    if not code:
        raise ProtocolError("error: 'code' must be a non-empty string")
    return ErrorReply(_int(obj, "id", 0, MAX_ID, default=None, nullable=True), code,
                      _text(obj, "message", default=""))  # type: ignore[arg-type]


# (sent to the agent?, type) -> validator
_VALIDATORS = {
    (True, "hello"): _client_hello,
    (True, "scan"): _scan,
    (False, "hello"): _agent_hello,
    (False, "verdict"): _verdict,
    (False, "error"): _error,
}


# --- frame I/O on a connected AF_UNIX SOCK_STREAM socket -------------------------------------------
# The only I/O in this module. `deadline` is a time.monotonic() value bounding the whole call; None
# leaves the socket's own timeout in force for each system call.
_FD_ROOM = socket.CMSG_SPACE(16 * array.array("i").itemsize)  # room to receive (and close) strays


def _arm(sock: socket.socket, deadline: float | None) -> None:
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(left)


def send_frame(sock: socket.socket, frame: bytes, fd: int | None = None, *,
               deadline: float | None = None) -> None:
    """Send one encoded frame; `fd` rides on its first byte as SCM_RIGHTS."""
    _arm(sock, deadline)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    sent = sock.sendmsg([frame], anc, socket.MSG_NOSIGNAL)
    if sent < len(frame):
        _arm(sock, deadline)
        sock.sendall(memoryview(frame)[sent:], socket.MSG_NOSIGNAL)


def recv_frame(sock: socket.socket, *, deadline: float | None = None) -> tuple[bytes, list[int]]:
    """Read exactly one frame: its body and the fds that arrived with it (the caller owns them).
    Raises ConnectionClosed on EOF, ProtocolError on a bad length, TimeoutError past the deadline."""
    fds: list[int] = []
    try:
        header = _recv_exactly(sock, HEADER.size, fds, deadline, first=True)
        body = _recv_exactly(sock, frame_length(header), fds, deadline, first=False)
    except BaseException:
        _close_all(fds)
        raise
    return body, fds


def _recv_exactly(sock: socket.socket, n: int, fds: list[int], deadline: float | None,
                  first: bool) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        _arm(sock, deadline)
        data, anc, flags, _ = sock.recvmsg(n - len(buf), _FD_ROOM, socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % array.array("i").itemsize
                fds.extend(array.array("i", payload[:usable]))
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors on one frame")
        if not data:
            mid = not first or bool(buf)
            raise ConnectionClosed("peer closed the connection" + (" inside a frame" if mid else ""),
                                   mid_frame=mid)
        buf += data
    return bytes(buf)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
