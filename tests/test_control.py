"""The control socket and `vetctl`, over real Unix sockets: protocol, root-only access, lifecycle."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from vetd import control, ctl
from vetd.control import ControlError, ControlServer, ControlUnreachable

STATUS = {
    "version": "0.1.0", "mode": "enforcing", "pid": 1234, "uptime_s": 12.5,
    "config": {"path": "/etc/vetd/vetd.toml", "generation": 1, "loaded_at": "2026-12-01T20:00:00Z"},
    "features": {"pre_content": True, "report_pidfd": True, "deny_errno": True,
                 "evictable_ignore": True, "exec_perm": True, "audit": False},
    "marks": [{"path": "/srv", "fstype": "ext4", "kind": "filesystem"}],
    "events": {"seen": 10, "permission": 8, "notification": 2},
    "answers": {"allow": 7, "deny": 1,
                "by_reason": {"own": 1, "excluded": 2, "cache": 3, "scan": 1, "degraded": 1}},
    "cache": {"entries": 5, "hits": 3, "misses": 2, "hit_rate": 0.6, "kernel_marks": 4},
    "degraded": {"timeout": 1, "error": 0, "backlog": 0},
    "backlog": {"depth": 0, "limit": 4096},
    "plugins": [{"name": "hashlist", "scans": 2, "errors": 0}],
}

WAIT_S = 5.0  # upper bound for every wait in this file


def _boom(args: dict) -> None:
    raise RuntimeError("the scanner fell over")


def _mute(args: dict) -> None:
    raise KeyError()


def _handlers() -> dict:
    return {
        "status": lambda args: copy.deepcopy(STATUS),
        "reload": lambda args: {"message": "configuration reloaded (generation 2)"},
        "echo": lambda args: args,
        "boom": _boom,
        "mute": _mute,
    }


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "run" / "control.sock")


@pytest.fixture
def server(sock_path):
    srv = ControlServer(sock_path, _handlers())
    srv.start()
    yield srv
    srv.stop()


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT_S)
    s.connect(path)
    return s


def _exchange(s: socket.socket, raw: bytes) -> dict:
    """Send raw bytes and read exactly one answer line."""
    s.sendall(raw)
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"server closed the connection; got so far {buf!r}"
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    assert rest == b"", f"more than one answer line: {rest!r}"
    return json.loads(line)


def _wait_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by WAIT_S).

    A server closing with some of our bytes unread makes Linux report ECONNRESET after its data;
    that is a close too.
    """
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


BUSY = "too many control connections"


def _connect_holding_a_slot(path: str) -> socket.socket:
    """A connection the server has admitted and served once (slots free up asynchronously)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        s = _connect(path)
        try:
            if _exchange(s, b'{"cmd": "status"}\n')["ok"]:
                return s
        except (BrokenPipeError, ConnectionResetError, AssertionError):
            pass  # refused as busy before we could send
        s.close()
        assert time.monotonic() < deadline, "the server never admitted a connection"
        time.sleep(0.02)


def _request_once_admitted(path: str, cmd: str):
    """control.request, retried while the server is still releasing a previous client's slot."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return control.request(path, cmd)
        except ControlError as exc:
            if BUSY not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _wait_child(pid: int, timeout: float = WAIT_S * 2) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"child {pid} did not finish within {timeout}s")


# --- protocol ------------------------------------------------------------------------------------


def test_status_round_trip_returns_the_handlers_dict(server, sock_path):
    assert control.request(sock_path, "status") == STATUS


def test_args_reach_the_handler(server, sock_path):
    assert control.request(sock_path, "echo", {"path": "/srv/x", "n": 3}) == {"path": "/srv/x", "n": 3}


def test_several_requests_share_one_connection(server, sock_path):
    with _connect(sock_path) as s:
        for n in range(3):
            answer = _exchange(s, json.dumps({"cmd": "echo", "args": {"n": n}}).encode() + b"\n")
            assert answer == {"ok": True, "result": {"n": n}}


def test_unknown_command_is_an_error_listing_known_commands(server, sock_path):
    with pytest.raises(ControlError) as err:
        control.request(sock_path, "frobnicate")
    assert not isinstance(err.value, ControlUnreachable)
    message = str(err.value)
    assert "unknown command 'frobnicate'" in message
    for cmd in ("status", "reload", "echo", "boom", "mute"):
        assert cmd in message


def test_handler_exception_is_an_error_answer_and_the_server_keeps_serving(server, sock_path):
    with _connect(sock_path) as s:
        answer = _exchange(s, b'{"cmd": "boom", "args": {}}\n')
        assert answer["ok"] is False
        assert "the scanner fell over" in answer["error"]
        # same connection still served
        assert _exchange(s, b'{"cmd": "status"}\n') == {"ok": True, "result": STATUS}
    # and new connections too
    assert control.request(sock_path, "status") == STATUS


def test_exception_without_text_is_named_by_its_type(server, sock_path):
    with pytest.raises(ControlError, match="^mute failed: KeyError$"):
        control.request(sock_path, "mute")


def test_malformed_requests_are_answered_and_the_connection_survives(server, sock_path):
    with _connect(sock_path) as s:
        for raw, expected in [
            (b"this is not json\n", "not a JSON line"),
            (b"\xff\xfe\n", "not a JSON line"),
            (b'["status"]\n', "expected"),
            (b'{"cmd": "echo", "args": [1]}\n', "args must be a JSON object"),
        ]:
            answer = _exchange(s, raw)
            assert answer["ok"] is False and expected in answer["error"], (raw, answer)
        assert _exchange(s, b'{"cmd": "echo", "args": {"a": 1}}\n')["result"] == {"a": 1}


def test_request_line_over_64k_is_refused_and_the_connection_closed(server, sock_path):
    with _connect(sock_path) as s:
        s.sendall(b'{"cmd": "echo", "args": {"x": "' + b"a" * (control.MAX_REQUEST_BYTES + 10))
        data = _wait_closed(s)
    answer = json.loads(data.splitlines()[0])
    assert answer["ok"] is False and "longer than" in answer["error"]
    assert control.request(sock_path, "status") == STATUS


def test_non_serialisable_result_is_an_error_not_a_dead_connection(sock_path):
    with ControlServer(sock_path, {"odd": lambda args: {1, 2}, "status": lambda a: STATUS}):
        with pytest.raises(ControlError, match="not JSON"):
            control.request(sock_path, "odd")
        assert control.request(sock_path, "status") == STATUS


def test_final_request_without_newline_is_still_answered(server, sock_path):
    with _connect(sock_path) as s:
        s.sendall(b'{"cmd": "echo", "args": {"last": true}}')
        s.shutdown(socket.SHUT_WR)
        data = _wait_closed(s)
    assert json.loads(data) == {"ok": True, "result": {"last": True}}


def test_a_daemon_that_does_not_answer_in_time_is_unreachable(sock_path, capsys):
    release = threading.Event()
    with ControlServer(sock_path, {"status": lambda a: release.wait(WAIT_S)}):
        try:
            t0 = time.monotonic()
            with pytest.raises(ControlUnreachable, match=r"did not answer 'status' within 0.3s"):
                control.request(sock_path, "status", timeout=0.3)
            assert time.monotonic() - t0 < 2.0
        finally:
            release.set()


# --- access --------------------------------------------------------------------------------------


def test_socket_is_0600_in_a_new_0700_dir(server, sock_path):
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    assert stat.S_IMODE(os.stat(os.path.dirname(sock_path)).st_mode) == 0o700


def test_peer_uid_not_allowed_is_refused_with_the_permission_message(sock_path):
    with ControlServer(sock_path, _handlers(), allowed_uids=frozenset({12345})):
        with pytest.raises(ControlError) as err:
            control.request(sock_path, "status")
        assert str(err.value) == control.PERMISSION_DENIED
        with _connect(sock_path) as s:  # refused without reading anything from us
            data = _wait_closed(s)
        assert json.loads(data) == {"ok": False, "error": control.PERMISSION_DENIED}


def test_non_root_process_cannot_get_a_status():
    sock_dir = tempfile.mkdtemp(prefix="vetd-ctl-")
    try:
        os.chmod(sock_dir, 0o755)  # reachable by nobody: only the socket's own 0600 stands in the way
        path = os.path.join(sock_dir, "control.sock")
        with ControlServer(path, _handlers()):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: never return into pytest
                code = 99
                try:
                    os.close(read_fd)
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                    try:
                        control.request(path, "status", timeout=2.0)
                        code, message = 10, "got a status"
                    except ControlError as exc:
                        code, message = 0, str(exc)
                    os.write(write_fd, message.encode())
                finally:
                    os._exit(code)
            os.close(write_fd)
            code = _wait_child(pid)
            with os.fdopen(read_fd, "rb") as f:
                message = f.read().decode()
        assert code == 0, message
        # Either the kernel refused connect() (EACCES on the 0600 socket) or the server refused us.
        assert "permission denied" in message, message
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


# --- lifecycle -----------------------------------------------------------------------------------


def test_stale_socket_file_is_replaced(sock_path):
    os.makedirs(os.path.dirname(sock_path), mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # the file stays, nobody listens: what a crashed daemon leaves
    with pytest.raises(ControlUnreachable, match="connection refused"):
        control.request(sock_path, "status")
    with ControlServer(sock_path, _handlers()):  # bind() would fail with EADDRINUSE if kept
        assert control.request(sock_path, "status") == STATUS


def test_second_server_on_a_live_socket_raises_and_leaves_the_first_serving(server, sock_path):
    second = ControlServer(sock_path, _handlers())
    with pytest.raises(ControlError, match=f"another vetd is already serving {sock_path}"):
        second.start()
    assert control.request(sock_path, "status") == STATUS


def test_a_non_socket_file_at_the_path_is_left_alone(sock_path):
    os.makedirs(os.path.dirname(sock_path))
    with open(sock_path, "w") as f:
        f.write("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(sock_path, _handlers()).start()
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_stop_unlinks_the_socket_and_ends_its_threads(sock_path):
    srv = ControlServer(sock_path, _handlers())
    before = set(threading.enumerate())
    srv.start()
    idle = _connect(sock_path)  # an idle client must not hold stop() up
    assert control.request(sock_path, "status") == STATUS
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 3.0
    assert not os.path.exists(sock_path)
    assert _wait_closed(idle) == b""
    idle.close()
    leftover = [t for t in set(threading.enumerate()) - before if t.name.startswith("vetd-control")]
    assert leftover == []
    with pytest.raises(ControlUnreachable, match="no such file"):
        control.request(sock_path, "status")


def test_start_never_blocks_the_caller_and_handlers_run_off_its_thread(sock_path):
    seen = []
    srv = ControlServer(sock_path, {"where": lambda a: seen.append(threading.current_thread()) or "ok"})
    t0 = time.monotonic()
    srv.start()
    try:
        assert time.monotonic() - t0 < 1.0
        assert control.request(sock_path, "where") == "ok"
        assert seen and seen[0] is not threading.current_thread()
    finally:
        srv.stop()


def test_silent_client_is_dropped_after_the_timeout(sock_path):
    with ControlServer(sock_path, _handlers(), client_timeout=0.3, max_connections=1):
        with _connect(sock_path) as stuck:
            stuck.sendall(b'{"cmd": "sta')  # never finishes the line
            t0 = time.monotonic()
            assert _wait_closed(stuck) == b""
            assert time.monotonic() - t0 < 2.0
        # its one slot is free again
        assert _request_once_admitted(sock_path, "status") == STATUS


def test_client_dribbling_a_line_is_dropped_at_the_line_deadline(sock_path):
    with ControlServer(sock_path, _handlers(), client_timeout=0.5):
        with _connect(sock_path) as slow:
            t0 = time.monotonic()
            closed = False
            while time.monotonic() - t0 < 3.0:  # one byte per 0.1 s: never idle for 0.5 s
                try:
                    slow.sendall(b" ")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                time.sleep(0.1)
            assert closed, "a client sending a byte at a time kept its connection for 3 s"
            assert time.monotonic() - t0 < 2.0


def test_connections_beyond_the_cap_are_refused_with_an_error_line(sock_path):
    with ControlServer(sock_path, _handlers(), max_connections=1):
        with _connect_holding_a_slot(sock_path):  # holds the only slot
            with pytest.raises(ControlError, match=BUSY):
                control.request(sock_path, "status")
        # the slot is released once the server sees the first client's EOF
        assert _request_once_admitted(sock_path, "status") == STATUS


_NO_OPEN_SCRIPT = r"""
import json, logging, socket, sys, threading
from vetd import control

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
base = sys.argv[1]

def boom(args):
    raise RuntimeError("the scanner fell over")

handlers = {"status": lambda a: {"ok": 1}, "boom": boom, "odd": lambda a: {1, 2}}
main = control.ControlServer(base + "/main.sock", handlers, max_connections=1, client_timeout=0.3)
locked = control.ControlServer(base + "/locked.sock", handlers, allowed_uids=frozenset({12345}))
main.start()
locked.start()

events = []
def hook(event, args):
    if event in ("open", "import") and threading.current_thread().name.startswith("vetd-control"):
        events.append([event, str(args[0]) if args else None])
sys.addaudithook(hook)  # only now: from here on, the serving threads must not open anything

def raw(payload):
    for _ in range(250):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(base + "/main.sock")
            data = b""
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before we sent: the reason is still there to read
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except ConnectionResetError:  # closed with our bytes unread, after its answer
                pass
        if data and b"too many" not in data:
            return data
        threading.Event().wait(0.02)
    raise SystemExit("never admitted")

def attempt(cmd, path=base + "/main.sock"):
    for _ in range(250):  # a previous client's slot frees asynchronously
        try:
            return control.request(path, cmd)
        except control.ControlError as exc:
            if "too many" not in str(exc):
                return str(exc)
        threading.Event().wait(0.02)
    raise SystemExit("never admitted")

answers = [
    attempt("status"), attempt("boom"), attempt("nope"), attempt("odd"),
    attempt("status", base + "/locked.sock"),
    raw(b'\xff\xfe{\x00}\x00\n').decode(),               # UTF-16 BOM: must not load that codec
    raw(b"{" * (control.MAX_REQUEST_BYTES + 2)).decode(),  # too long
]
def admitted():
    for _ in range(250):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(base + "/main.sock")
        try:
            s.sendall(b'{"cmd": "status"}\n')
            if b'"ok": true' in s.recv(65536):
                return s
        except OSError:
            pass
        s.close()
        threading.Event().wait(0.02)
    raise SystemExit("never admitted")

with admitted() as held:                  # holds the only slot, then goes silent
    try:
        answers.append(control.request(base + "/main.sock", "status"))
    except control.ControlError as exc:
        answers.append(str(exc))          # busy
    assert held.recv(1) == b""            # dropped after client_timeout
main.stop()
locked.stop()
print(json.dumps({"events": events, "answers": answers}))
"""


def test_serving_threads_never_open_files_or_import(tmp_path):
    """In a fresh interpreter (so nothing is cached yet), every serving path runs with an audit hook
    watching the server's threads: none may open a file or import, as a fanotify daemon's helper
    thread opening a watched file can deadlock."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _NO_OPEN_SCRIPT, str(tmp_path)],
        cwd=repo, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    answers = report["answers"]
    assert answers[0] == {"ok": 1}
    assert "the scanner fell over" in answers[1]
    assert "unknown command" in answers[2]
    assert "not JSON" in answers[3]
    assert answers[4] == control.PERMISSION_DENIED
    assert "not a JSON line" in answers[5]
    assert "longer than" in answers[6]
    assert "too many" in answers[7]
    assert "control command boom failed: the scanner fell over" in proc.stderr  # logging ran there
    assert "no complete request" in proc.stderr                               # so did the timeout
    assert report["events"] == []


# --- vetctl --------------------------------------------------------------------------------------


def test_vetctl_status_json_prints_the_handlers_dict(server, sock_path, capsys):
    assert ctl.main(["--socket", sock_path, "status", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == STATUS
    assert out == json.dumps(STATUS, indent=2, sort_keys=True) + "\n"


def test_vetctl_status_human_table_shows_the_key_figures(server, sock_path, capsys):
    assert ctl.main(["--socket", sock_path, "status"]) == 0
    out = capsys.readouterr().out
    for figure in ("vetd 0.1.0", "enforcing", "1234", "12s", "/etc/vetd/vetd.toml", "generation 1",
                   "unavailable: audit", "/srv", "ext4", "10 seen", "7 allow", "1 deny",
                   "3 cache", "60% hit rate", "4 kernel marks", "1 timeout", "0 of 4096",
                   "hashlist", "2 scans"):
        assert figure in out, f"{figure!r} missing from:\n{out}"


def test_vetctl_status_renders_keys_it_does_not_know(sock_path, capsys):
    status = dict(STATUS, quarantine={"files": 3, "oldest_s": 7300}, cache="warming up")
    with ControlServer(sock_path, {"status": lambda a: status}):
        assert ctl.main(["--socket", sock_path, "status"]) == 0
    out = capsys.readouterr().out
    assert "Quarantine: 3 files, oldest 2h 1min" in out
    assert "Cache: warming up" in out


def test_vetctl_status_names_the_scan_processes_only_when_there_are_some(sock_path, capsys):
    procs = {"processes": 2, "pids": [41, 42], "in_flight": 1, "jobs": 9, "restarts": 1}
    for sp, shown in ((procs, True), ({"processes": 0}, False)):
        status = dict(STATUS, backlog={"depth": 0, "limit": 4096, "scan_processes": sp})
        with ControlServer(sock_path, {"status": lambda a, s=status: s}):
            assert ctl.main(["--socket", sock_path, "status"]) == 0
        out = capsys.readouterr().out
        assert ("scan processes: 2 (pids 41, 42), 1 in flight, 9 jobs, 1 restarts" in out) is shown, out
        assert "scan_processes" not in out and "Scan processes" not in out


def test_vetctl_status_shows_each_reader(sock_path, capsys):
    readers = [{"pid": 41, "allow": 10, "deny": 1, "generation": 3},
               {"pid": 42, "error": "reader 1 (pid 42) did not answer within 2s"}]
    status = dict(STATUS, readers=readers)
    with ControlServer(sock_path, {"status": lambda a: status}):
        assert ctl.main(["--socket", sock_path, "status"]) == 0
    out = capsys.readouterr().out
    assert "Readers: 2 processes read events; the counters above are their sums" in out
    assert "0: PID 41: 10 allowed, 1 denied, generation 3" in out
    assert "1: PID 42: reader 1 (pid 42) did not answer within 2s" in out


def test_vetctl_socket_defaults_to_the_environment(server, sock_path, capsys, monkeypatch):
    monkeypatch.setenv("VETD_SOCKET", sock_path)
    assert ctl.main(["reload"]) == 0
    assert capsys.readouterr().out == "configuration reloaded (generation 2)\n"


def test_vetctl_exit_1_when_vetd_answers_with_an_error(sock_path, capsys):
    with ControlServer(sock_path, {"reload": _boom}):
        assert ctl.main(["--socket", sock_path, "reload"]) == 1
        assert ctl.main(["--socket", sock_path, "status"]) == 1  # unknown command on this daemon
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "vetctl: reload failed: the scanner fell over"
    assert err[1].startswith("vetctl: unknown command 'status'")
    assert len(err) == 2


def test_vetctl_exit_1_when_vetd_refuses_the_peer(sock_path, capsys):
    with ControlServer(sock_path, _handlers(), allowed_uids=frozenset({12345})):
        assert ctl.main(["--socket", sock_path, "status"]) == 1
    assert capsys.readouterr().err == f"vetctl: {control.PERMISSION_DENIED}\n"


def test_vetctl_exit_2_when_vetd_is_not_running(sock_path, capsys):
    assert ctl.main(["--socket", sock_path, "status"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"vetctl: cannot reach vetd at {sock_path}: no such file (is vetd running?)\n"


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["status", "--bogus"]])
def test_vetctl_exit_2_on_usage_errors_with_one_line(argv, sock_path, capsys):
    assert ctl.main(["--socket", sock_path, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vetctl: ") and err.count("\n") == 1, err
