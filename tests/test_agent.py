"""The out-of-process agent door: protocol codecs, the Python and C agents, the Agent plugin's
failure handling (killed, frozen, garbage, refused), and vetd denying through an agent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from conftest import EICAR, IN_CI, ROOT, open_as_child
from vetd import agent_protocol as ap
from vetd import plugins as plugin_loader
from vetd.agentkit import AgentServer
from vetd.sdk import Decision, Opener, PluginConfigError, ScanFile
from vetd_plugins.agent import Agent, AgentError

PY_AGENT = ROOT / "examples" / "agent_eicar.py"
C_AGENT_SRC = ROOT / "examples" / "c-agent" / "agent.c"


# --- codecs ---------------------------------------------------------------------------------------
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
_scans = st.builds(ap.ScanRequest, id=st.integers(0, ap.MAX_ID), size=st.integers(0, 2**64 - 1),
                   path=_text, pid=st.none() | st.integers(0, 2**31 - 1), exe=st.none() | _text,
                   uid=st.none() | st.integers(0, 2**32 - 1), deadline_ms=st.integers(0, 2**64 - 1))
_verdicts = st.builds(ap.VerdictReply, id=st.integers(0, ap.MAX_ID),
                      decision=st.sampled_from(["allow", "deny"]), reason=_text,
                      cacheable=st.booleans(),
                      ttl_s=st.none() | st.floats(0, 1e12, allow_nan=False, allow_infinity=False))
_errors = st.builds(ap.ErrorReply, id=st.none() | st.integers(0, ap.MAX_ID),
                    code=_text.filter(bool), message=_text)
_client_hellos = st.builds(ap.ClientHello, versions=st.lists(st.integers(1, 0xFFFF), min_size=1,
                                                             max_size=32).map(tuple), software=_text)
_agent_hellos = st.builds(ap.AgentHello, version=st.integers(1, 0xFFFF), software=_text)


def _body(frame: bytes) -> bytes:
    assert ap.frame_length(frame[:4]) == len(frame) - 4
    return frame[4:]


@given(st.one_of(_scans, _client_hellos))
def test_requests_round_trip(msg):
    assert ap.decode_request(_body(ap.encode(msg))) == msg


@given(st.one_of(_verdicts, _errors, _agent_hellos))
def test_replies_round_trip(msg):
    assert ap.decode_reply(_body(ap.encode(msg))) == msg


@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data):
    for decode in (ap.decode_request, ap.decode_reply):
        try:
            decode(data)
        except ap.ProtocolError:
            pass


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                            | _text, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(_text, inner, max_size=3), max_leaves=8)
_KEYS = ["type", "id", "size", "path", "pid", "exe", "uid", "deadline_ms", "versions", "version",
         "decision", "reason", "cacheable", "ttl_s", "code", "message", "software"]


@given(st.sampled_from(["hello", "scan", "verdict", "error", "other"]),
       st.dictionaries(st.sampled_from(_KEYS), _json_values, max_size=8))
def test_arbitrary_objects_decode_or_raise_protocol_error(kind, fields):
    body = json.dumps({"type": kind, **fields}).encode()
    for decode in (ap.decode_request, ap.decode_reply):
        try:
            msg = decode(body)
        except ap.ProtocolError:
            continue
        assert decode(_body(ap.encode(msg))) == msg  # whatever is accepted is well-formed


@given(st.sampled_from(["id", "size", "pid", "uid", "deadline_ms", "path", "exe"]),
       st.sampled_from([True, -1, 1.5, "7", [], {}, 2**64, None]))
def test_a_scan_field_of_the_wrong_kind_is_rejected(key, value):
    wire = ap.ScanRequest(1, 68, "/x", 10, "/bin/cat", 0, 100).to_wire()
    wire[key] = value
    if (value is None and key in ("pid", "uid", "exe")) or (isinstance(value, str)
                                                            and key in ("path", "exe")):
        return  # that one is allowed
    with pytest.raises(ap.ProtocolError):
        ap.decode_request(json.dumps(wire).encode())


@pytest.mark.parametrize("body", [
    b"", b"{", b"[]", b'"scan"', b"{}", b'{"type": 1}', b'{"type": "bogus"}',
    b"\xff\xfe{}",
    b'{"type": "scan", "size": 1}',                                  # no id
    b'{"type": "scan", "id": 1}',                                    # no size
    b'{"type": "scan", "id": 1, "size": 1, "id": 2}',                # duplicate key
    b'{"type": "scan", "id": 1, "size": NaN}',
    b'{"type": "scan", "id": 9007199254740992, "size": 1}',          # id beyond 2**53 - 1
    b'{"type": "scan", "id": 1, "size": 1, "path": "\\ud800"}',      # lone surrogate
    b'{"type": "hello", "versions": []}',
    b'{"type": "hello", "versions": [0]}',
    b'{"type": "hello", "versions": [true]}',
    b'{"type": "hello", "versions": "1"}',
    b'{"type": "verdict", "id": 1, "decision": "allow"}',            # a reply sent to the agent
    b"[" * 50000 + b"]" * 50000,                                     # deep nesting
])
def test_malformed_requests_are_protocol_errors(body):
    with pytest.raises(ap.ProtocolError):
        ap.decode_request(body[:ap.MAX_FRAME])


@pytest.mark.parametrize("body", [
    b'{"type": "verdict", "id": 1}',
    b'{"type": "verdict", "id": 1, "decision": "maybe"}',
    b'{"type": "verdict", "id": 1, "decision": "DENY"}',
    b'{"type": "verdict", "id": -1, "decision": "deny"}',
    b'{"type": "verdict", "id": 1.0, "decision": "deny"}',
    b'{"type": "verdict", "id": 1, "decision": "deny", "cacheable": 1}',
    b'{"type": "verdict", "id": 1, "decision": "deny", "ttl_s": -1}',
    b'{"type": "verdict", "id": 1, "decision": "deny", "ttl_s": "10"}',
    b'{"type": "verdict", "id": 1, "decision": "deny", "ttl_s": Infinity}',
    b'{"type": "verdict", "id": 1, "decision": "deny", "reason": 5}',
    b'{"type": "error", "id": 1}',
    b'{"type": "error", "id": 1, "code": ""}',
    b'{"type": "hello", "versions": [1]}',                           # a request sent to vetd
    b'{"type": "hello", "version": "1"}',
    b'{"type": "scan", "id": 1, "size": 1}',
])
def test_malformed_replies_are_protocol_errors(body):
    with pytest.raises(ap.ProtocolError):
        ap.decode_reply(body)


@pytest.mark.parametrize("header", [b"\0\0\0\0", (ap.MAX_FRAME + 1).to_bytes(4, "big"),
                                    b"\xff\xff\xff\xff", b"\0\0\1"])
def test_bad_frame_lengths_are_protocol_errors(header):
    with pytest.raises(ap.ProtocolError):
        ap.frame_length(header)


def test_an_oversized_message_is_refused_when_encoded():
    assert ap.frame_length(ap.encode(ap.ScanRequest(1, 0, "x" * 60000))[:4]) > 60000
    with pytest.raises(ap.ProtocolError, match="exceeds"):
        ap.encode(ap.ScanRequest(1, 0, "x" * ap.MAX_FRAME))


def test_unknown_keys_are_ignored_for_forward_compatibility():
    body = b'{"type": "verdict", "id": 3, "decision": "deny", "engine_build": "2025.1"}'
    assert ap.decode_reply(body) == ap.VerdictReply(3, "deny")


@pytest.mark.parametrize("offered,spoken,expected", [
    ((1,), (1,), 1), ((1, 2, 3), (2, 3, 4), 3), ((2,), (1,), None), ((5, 1), (1,), 1)])
def test_negotiation_picks_the_highest_common_version(offered, spoken, expected):
    assert ap.negotiate(offered, spoken) == expected


# --- agents as processes --------------------------------------------------------------------------
def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _task_state(pid: int, tid: str) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:  # the thread is gone
        return "?"


class AgentProcess:
    """An agent program on a socket of its own; restartable, always killed at teardown."""

    def __init__(self, argv: list[str], sock: str, log: Path):
        self.argv, self.socket, self.log = argv, sock, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> "AgentProcess":
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([*self.argv, self.socket], stdout=fh, stderr=fh,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not _connectable(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"agent {self.argv} did not listen (rc={self.proc.poll()}):\n"
                                     + self.log.read_text(errors="replace"))
            time.sleep(0.02)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)  # the C agent's per-connection children too

    def freeze(self, timeout: float = 10.0) -> None:
        """SIGSTOP, and wait until every thread is really stopped (delivery is asynchronous)."""
        assert self.proc is not None
        self.signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not all(_task_state(self.proc.pid, t) in ("T", "t", "?")
                      for t in os.listdir(f"/proc/{self.proc.pid}/task")):
            assert time.monotonic() < deadline, "the agent did not stop"
            time.sleep(0.01)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        elif self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # children of a parent that died
            except ProcessLookupError:
                pass


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="vetd-agent-", dir="/tmp")  # short: sun_path holds 108 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def c_agent_binary(tmp_path_factory) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        (pytest.fail if IN_CI else pytest.skip)("no C compiler to build examples/c-agent")
    out = tmp_path_factory.mktemp("c-agent") / "agent"
    r = subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(C_AGENT_SRC)],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return out


@pytest.fixture
def spawn(sockdir, tmp_path, request):
    """spawn("python"|"c") -> a started AgentProcess."""
    started: list[AgentProcess] = []

    def make(kind: str) -> AgentProcess:
        argv = ([sys.executable, str(PY_AGENT)] if kind == "python"
                else [str(request.getfixturevalue("c_agent_binary"))])
        a = AgentProcess(argv, os.path.join(sockdir, f"{kind}{len(started)}.sock"),
                         tmp_path / f"agent-{kind}{len(started)}.log")
        started.append(a)
        return a.start()

    try:
        yield make
    finally:
        for a in started:
            a.kill()


@pytest.fixture
def in_thread(sockdir):
    """in_thread(scan, **options) -> an AgentServer serving on a thread; shut down at teardown."""
    servers: list[tuple[AgentServer, threading.Thread]] = []

    def make(scan, **options) -> AgentServer:
        srv = AgentServer(os.path.join(sockdir, f"t{len(servers)}.sock"), scan, **options)
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        servers.append((srv, t))
        return srv

    try:
        yield make
    finally:
        for srv, t in servers:
            srv.shutdown()
            t.join(5)


@pytest.fixture
def files(tmp_path):
    """open_file(content, path=None) -> a ScanFile on an fd (closed at teardown)."""
    fds: list[int] = []

    def open_file(content: bytes, display: str | None = None) -> ScanFile:
        p = tmp_path / f"f{len(fds)}"
        p.write_bytes(content)
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        fds.append(fd)
        return ScanFile(fd, os.fstat(fd), display if display is not None else str(p))

    try:
        yield open_file
    finally:
        for fd in fds:
            os.close(fd)


OPENER = Opener(types.SimpleNamespace(pid=os.getpid(), exe=b"/usr/bin/\xffcat", comm="cat", uid=0))


@pytest.fixture
def plugin():
    made: list[Agent] = []

    def make(sock: str, **config) -> Agent:
        a = Agent({"socket": sock, **config})
        made.append(a)
        return a

    try:
        yield make
    finally:
        for a in made:
            a.close()


def eicar_scan(fd: int, request: dict):
    return ("deny", "EICAR-Test-File") if os.pread(fd, len(EICAR), 0) == EICAR else ("allow", "")


# --- the plugin against real agents ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["python", "c"])
def test_agent_denies_eicar_and_allows_a_clean_file(kind, spawn, plugin, files):
    agent = spawn(kind)
    p = plugin(agent.socket, timeout_s=5)
    v = p.scan(files(EICAR), OPENER)
    assert v.decision is Decision.DENY and v.reason == "EICAR-Test-File" and v.cacheable
    v = p.scan(files(b"hello, world\n"), OPENER)
    assert v.decision is Decision.ALLOW and v.cacheable and v.ttl_s is None
    assert p.scan(files(EICAR[:-1]), OPENER).decision is Decision.ALLOW
    assert p.scan(files(b""), OPENER).decision is Decision.ALLOW


@pytest.mark.parametrize("kind", ["python", "c"])
def test_the_file_reaches_the_agent_by_fd_never_by_path(kind, spawn, plugin, files):
    agent = spawn(kind)
    p = plugin(agent.socket)
    f = files(EICAR, display="/nonexistent/shown-only/\udcff.com")
    assert p.scan(f, OPENER).denied


@pytest.mark.parametrize("kind", ["python", "c"])
def test_concurrent_scans_from_many_threads_share_the_pool(kind, spawn, plugin, files):
    agent = spawn(kind)
    p = plugin(agent.socket, connections=3)
    bad, good = files(EICAR), files(b"clean\n")
    errors: list[str] = []

    def worker(n: int) -> None:
        for i in range(25):
            f = bad if (n + i) % 2 else good
            try:
                if p.scan(f, OPENER).denied is not (f is bad):
                    errors.append(f"wrong verdict on {f.path}")
            except Exception as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    assert len(p._idle) <= 3


def test_plugin_loads_through_the_entry_point_as_a_named_agent(sockdir):
    plugin = plugin_loader.load("vendor", {"use": "agent", "socket": f"{sockdir}/a.sock",
                                           "on_failure": "deny", "deadline_ms": 100,
                                           "connections": 3})
    try:
        assert isinstance(plugin, Agent) and plugin.name == "vendor" and plugin.connections == 3
    finally:
        plugin.close()


@pytest.mark.parametrize("table,message", [
    ({}, "socket: required"),
    ({"socket": ""}, "socket: required"),
    ({"socket": "/" + "x" * 200}, "longer than"),
    ({"socket": "/s", "timeout_s": 0}, "timeout_s"),
    ({"socket": "/s", "timeout_s": "5"}, "timeout_s"),
    ({"socket": "/s", "connections": 0}, "connections"),
    ({"socket": "/s", "connections": True}, "connections"),
    ({"socket": "/s", "sockets": "/t"}, "unknown key"),
])
def test_bad_config_is_refused_with_the_key_named(table, message):
    with pytest.raises(PluginConfigError, match=message):
        Agent(table)


# --- versions -------------------------------------------------------------------------------------
def _raw_hello(path: str, versions) -> tuple[socket.socket, ap.Reply]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    ap.send_frame(s, ap.encode(ap.ClientHello(tuple(versions), "test")))
    body, fds = ap.recv_frame(s)
    assert fds == []
    return s, ap.decode_reply(body)


@pytest.mark.parametrize("kind", ["python", "c"])
def test_agents_pick_version_1_and_refuse_versions_they_do_not_speak(kind, spawn):
    agent = spawn(kind)
    s, reply = _raw_hello(agent.socket, [1, 2])
    s.close()
    assert isinstance(reply, ap.AgentHello) and reply.version == 1
    s, reply = _raw_hello(agent.socket, [2, 7])
    try:
        assert isinstance(reply, ap.ErrorReply) and reply.code == "unsupported_version"
        assert reply.id is None and "1" in reply.message
        with pytest.raises(ap.ConnectionClosed):
            ap.recv_frame(s)  # and the agent hangs up
    finally:
        s.close()


def test_an_agent_that_speaks_another_version_gives_a_clear_error(in_thread, plugin, files):
    srv = in_thread(eicar_scan, versions=(2,))
    p = plugin(srv.socket_path, timeout_s=2)
    with pytest.raises(AgentError) as e:
        p.scan(files(EICAR), OPENER)
    text = str(e.value)
    assert "refused the handshake" in text and "unsupported_version" in text
    assert "protocol version 1" in text and srv.socket_path in text


@pytest.mark.parametrize("kind", ["python", "c"])
def test_agent_conformance_scan_without_fd_and_bad_frames(kind, spawn, files):
    agent = spawn(kind)
    s, reply = _raw_hello(agent.socket, [1])
    try:
        ap.send_frame(s, ap.encode(ap.ScanRequest(41, 68, "/nofd")))            # no fd
        reply = ap.decode_reply(ap.recv_frame(s)[0])
        assert isinstance(reply, ap.ErrorReply) and reply.id == 41 and reply.code == "bad_request"
        f = files(EICAR)
        ap.send_frame(s, ap.encode(ap.ScanRequest(42, 68, f.path)), f.fileno())  # same connection
        reply = ap.decode_reply(ap.recv_frame(s)[0])
        assert reply == ap.VerdictReply(42, "deny", "EICAR-Test-File", True, None)
        s.sendall(b"\xff\xff\xff\xff")                                       # a bad length
        reply = ap.decode_reply(ap.recv_frame(s)[0])
        assert isinstance(reply, ap.ErrorReply) and reply.code == "bad_request"
    finally:
        s.close()
    s, reply = _raw_hello(agent.socket, [1])                                 # still serving
    s.close()
    assert isinstance(reply, ap.AgentHello)


# --- failures: killed, frozen, garbage, busy ------------------------------------------------------
def test_killed_agent_fails_scans_and_a_restarted_one_is_picked_up_again(spawn, plugin, files):
    agent = spawn("python")
    p = plugin(agent.socket, timeout_s=2, connections=2)
    bad, good = files(EICAR), files(b"clean\n")
    assert p.scan(bad, OPENER).denied
    agent.kill()
    t0 = time.monotonic()
    for _ in range(3):
        with pytest.raises(AgentError):
            p.scan(bad, OPENER)
    assert time.monotonic() - t0 < 2, "a dead agent should fail fast, not wait for the timeout"
    agent.start()
    assert p.scan(bad, OPENER).denied    # the same plugin instance, no reload
    assert not p.scan(good, OPENER).denied


def test_frozen_agent_makes_scan_raise_within_the_timeout(spawn, plugin, files):
    agent = spawn("python")
    p = plugin(agent.socket, timeout_s=1)
    f = files(EICAR)
    assert p.scan(f, OPENER).denied      # a pooled connection now exists
    agent.freeze()
    try:
        for _ in range(2):               # first on the pooled connection, then on a fresh one
            t0 = time.monotonic()
            with pytest.raises(AgentError, match="no answer within 1s"):
                p.scan(f, OPENER)
            elapsed = time.monotonic() - t0
            assert 0.8 < elapsed < 2.0, elapsed
    finally:
        agent.signal(signal.SIGCONT)
    assert p.scan(f, OPENER).denied      # thawed: back in business


def test_the_event_deadline_bounds_the_scan_and_reaches_the_agent(spawn, in_thread, plugin, files):
    """SDK 1.1: a file whose open vetd answers by policy in 0.5 s is given up on then, not at
    the plugin's own 10 s, and the agent is told how long it has (deadline_ms)."""
    seen: list[int] = []

    def scan(fd: int, request: dict):
        seen.append(request["deadline_ms"])
        return ("allow", "")

    p = plugin(in_thread(scan).socket_path, timeout_s=10)
    f = files(b"fine")
    f.deadline = time.monotonic() + 3.0
    assert not p.scan(f, OPENER).denied
    assert 0 < seen[0] <= 3000
    agent = spawn("python")
    frozen = plugin(agent.socket, timeout_s=10)
    g = files(EICAR)
    assert frozen.scan(g, OPENER).denied
    agent.freeze()
    try:
        g.deadline = time.monotonic() + 0.5
        t0 = time.monotonic()
        with pytest.raises(AgentError, match="no answer within"):
            frozen.scan(g, OPENER)
        assert time.monotonic() - t0 < 0.5 + 1.0
        g.deadline = time.monotonic() - 1  # already answered by policy: do not even try
        with pytest.raises(AgentError):
            frozen.scan(g, OPENER)
    finally:
        agent.signal(signal.SIGCONT)


def _fake_agent(path: str, on_scan, on_hello=None) -> threading.Thread:
    """A hand-rolled agent: a correct handshake (unless on_hello replaces it), then
    on_scan(conn, request_id) for the scan."""
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(8)
    ls.settimeout(10)

    def run() -> None:
        with ls:
            while True:
                try:
                    conn, _ = ls.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(10)
                    try:
                        assert isinstance(ap.decode_request(ap.recv_frame(conn)[0]), ap.ClientHello)
                        (on_hello or (lambda c: ap.send_frame(c, ap.encode(ap.AgentHello(1, "fake")))))(conn)
                        body, fds = ap.recv_frame(conn)
                        for fd in fds:
                            os.close(fd)
                        on_scan(conn, ap.decode_request(body).id)
                        time.sleep(0.2)
                    except OSError:
                        pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _frame(body: bytes) -> bytes:
    return ap.HEADER.pack(len(body)) + body


GARBAGE = {
    "not json": lambda c, i: c.sendall(_frame(b"hello")),
    "huge length": lambda c, i: c.sendall(b"\xff\xff\xff\xff"),
    "half a frame then close": lambda c, i: c.sendall(b"\0\0\1\0{\"ty"),
    "close": lambda c, i: None,
    "wrong id": lambda c, i: ap.send_frame(c, ap.encode(ap.VerdictReply(i + 1, "allow"))),
    "bad decision": lambda c, i: c.sendall(
        _frame(b'{"type":"verdict","id":%d,"decision":"ok"}' % i)),
    "hello again": lambda c, i: ap.send_frame(c, ap.encode(ap.AgentHello(1))),
    "an fd back": lambda c, i: ap.send_frame(c, ap.encode(ap.VerdictReply(i, "allow")), 0),
    "an error for another id": lambda c, i: ap.send_frame(
        c, ap.encode(ap.ErrorReply(i + 7, "scan_failed"))),
}
BAD_HELLOS = {
    "wrong version chosen": lambda c: ap.send_frame(c, ap.encode(ap.AgentHello(9))),
    "verdict for a hello": lambda c: ap.send_frame(c, ap.encode(ap.VerdictReply(0, "allow"))),
    "silence": lambda c: time.sleep(5),
}


@pytest.mark.parametrize("kind", BAD_HELLOS)
def test_a_bad_handshake_makes_scan_raise(kind, sockdir, plugin, files):
    path = f"{sockdir}/fake.sock"
    _fake_agent(path, lambda c, i: None, BAD_HELLOS[kind])
    p = plugin(path, timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(AgentError):
        p.scan(files(EICAR), OPENER)
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("kind", GARBAGE)
def test_a_garbage_reply_makes_scan_raise(kind, sockdir, plugin, files):
    path = f"{sockdir}/fake.sock"
    _fake_agent(path, GARBAGE[kind])
    p = plugin(path, timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(AgentError):
        p.scan(files(EICAR), OPENER)
    assert time.monotonic() - t0 < 3
    assert p._idle == [], "a connection that went wrong must not be reused"


def test_a_vendor_function_that_raises_is_a_scan_failure_not_a_verdict(in_thread, plugin, files):
    def scan(fd, request):
        if request["size"] == 0:
            raise RuntimeError("engine exploded")
        return eicar_scan(fd, request)

    srv = in_thread(scan)
    p = plugin(srv.socket_path)
    with pytest.raises(AgentError, match="scan_failed: RuntimeError: engine exploded"):
        p.scan(files(b""), OPENER)
    assert p.scan(files(EICAR), OPENER).denied   # the agent and the connection carry on
    assert len(p._idle) == 1


def test_the_request_carries_the_opener_and_a_deadline(in_thread, plugin, files):
    seen: list[dict] = []

    def scan(fd, request):
        seen.append(request)
        return {"decision": Decision.ALLOW, "reason": "ok", "cacheable": False, "ttl_s": 30}

    srv = in_thread(scan)
    v = plugin(srv.socket_path, timeout_s=4).scan(files(b"abc", display="/shown"), OPENER)
    assert v.decision is Decision.ALLOW and not v.cacheable and v.ttl_s == 30.0
    (req,) = seen
    assert req["path"] == "/shown" and req["size"] == 3 and req["pid"] == os.getpid()
    assert req["exe"] == "/usr/bin/\\xffcat" and req["uid"] == 0
    assert 3000 < req["deadline_ms"] <= 4000


def test_all_connections_busy_raises_within_the_timeout(in_thread, plugin, files):
    release = threading.Event()

    def slow(fd, request):
        release.wait(10)
        return "allow", ""

    srv = in_thread(slow)
    p = plugin(srv.socket_path, timeout_s=1, connections=1)
    f = files(b"x")
    first = threading.Thread(target=lambda: pytest.raises(AgentError, p.scan, f, OPENER))
    first.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    with pytest.raises(AgentError, match="busy|no answer within 1s"):
        p.scan(f, OPENER)   # waited for the one connection, then for a verdict: 1 s in all
    assert time.monotonic() - t0 < 1.5
    release.set()
    first.join(5)


def test_agentkit_survives_clients_that_vanish_stall_or_send_garbage(in_thread, plugin, files):
    started = threading.Event()

    def scan(fd, request):
        if request["path"] == "slow":
            started.set()
            time.sleep(0.5)
        return eicar_scan(fd, request)

    srv = in_thread(scan, io_timeout_s=1.0)
    f = files(EICAR)
    s, _ = _raw_hello(srv.socket_path, [1])          # a client that leaves mid-scan
    ap.send_frame(s, ap.encode(ap.ScanRequest(1, 68, "slow")), f.fileno())
    assert started.wait(5)
    s.close()
    s, _ = _raw_hello(srv.socket_path, [1])          # one that stalls inside a frame
    s.sendall(b"\0\0\0\x50{")
    junk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    junk.connect(srv.socket_path)                     # one that sends garbage for a hello
    junk.sendall(b"\0\0\0\3abc")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(srv.socket_path)                   # one that never says anything
    try:
        p = plugin(srv.socket_path, timeout_s=3)
        assert p.scan(f, OPENER).denied
        assert not p.scan(files(b"fine"), OPENER).denied
    finally:
        for c in (s, junk, silent):
            c.close()


def test_agentkit_refuses_to_steal_a_live_socket(in_thread):
    srv = in_thread(eicar_scan)
    with pytest.raises(FileExistsError, match="another agent"):
        AgentServer(srv.socket_path, eicar_scan)


# --- vetd on the real kernel, denying through an agent --------------------------------------------
@pytest.mark.kernel
@pytest.mark.parametrize("readers", [1, 2])
@pytest.mark.parametrize("kind", ["python", "c"])
def test_vetd_denies_eicar_through_an_agent_and_allows_a_clean_file(kind, tmpfs, vetd_factory, spawn,
                                                                    readers):
    agent = spawn(kind)
    (tmpfs / "eicar.com").write_bytes(EICAR)
    (tmpfs / "ok.txt").write_text("hello\n")
    v = vetd_factory([tmpfs], extra=f"readers = {readers}\n", plugins=f'[plugins.vendor]\nuse = "agent"\nsocket = "{agent.socket}"\n'
                                      'timeout_s = 3\n').start()
    assert open_as_child(tmpfs / "eicar.com") == "EPERM"
    assert open_as_child(tmpfs / "ok.txt") == "OK"
    st = v.status()
    vendor = next(p for p in st["plugins"] if p["name"] == "vendor")
    assert vendor["scans"] == 2 and vendor["denies"] == 1 and vendor["errors"] == 0
    v.wait_log("EICAR-Test-File")


@pytest.mark.kernel
@pytest.mark.parametrize("readers", [1, 2])
def test_vetd_applies_the_failure_policy_when_the_agent_is_down(tmpfs, vetd_factory, spawn, readers):
    agent = spawn("python")
    (tmpfs / "ok.txt").write_text("hello\n")
    v = vetd_factory([tmpfs], extra=f'readers = {readers}\n[scan]\non_error = "deny"',
                     plugins=f'[plugins.vendor]\nuse = "agent"\nsocket = "{agent.socket}"\n').start()
    agent.kill()
    assert open_as_child(tmpfs / "ok.txt") == "EPERM"
    agent.start()
    assert open_as_child(tmpfs / "ok.txt") == "OK"
    assert v.proc.poll() is None
