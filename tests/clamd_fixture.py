"""A real clamd (Debian's clamav-daemon) for the ClamAV plugin's tests, with signatures the test
writes itself: no network, no freshclam, no official databases.

Import the fixtures from a test module (`from clamd_fixture import clamd  # noqa: F401`). clamd
runs in the foreground with a config of its own in a private directory (Unix socket, TCP on a free
loopback port, database, temp dir, log), as the user running the tests (no `User` line: as root it
stays root and reads the private directory), or as another user (`Clamd(dir, user="clamav")`). Readiness is a PING answered PONG; teardown is
SIGTERM (with SIGCONT, in case a test left it frozen), then SIGKILL. Every wait is bounded. If
clamd is missing, a test using it fails under CI=true and skips otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CLAMD = "/usr/sbin/clamd"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# clamd reports signatures from unofficial databases with a ".UNOFFICIAL" suffix
EICAR_SIG = "Vetd.Test.EICAR"
SIGNED = b"vetd clamav test: this exact file is on the .hdb list\n"
SIGNED_SIG = "Vetd.Test.Signed"
MARKER = b"VETD-CLAMAV-TEST-MARKER-5e1f9c0b"  # a body (.ndb) signature: matches anywhere in a file
MARKER_SIG = "Vetd.Test.Marker"
STREAM_MAX = 1024 * 1024  # StreamMaxLength, small so that the INSTREAM limit is cheap to hit


def require_clamd() -> None:
    if not os.access(CLAMD, os.X_OK):
        why = f"{CLAMD} is missing (Debian package clamav-daemon)"
        if IN_CI:
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signatures() -> dict[str, str]:
    """Database file name -> content: an MD5 list (.hdb: md5:size:name) and a body signature."""
    hdb = "".join(f"{hashlib.md5(data).hexdigest()}:{len(data)}:{name}\n"
                  for data, name in ((EICAR, EICAR_SIG), (SIGNED, SIGNED_SIG)))
    ndb = f"{MARKER_SIG}:0:*:{MARKER.hex()}\n"
    return {"vetd-test.hdb": hdb, "vetd-test.ndb": ndb}


class Clamd:
    """One clamd process on a private directory; start/stop/freeze/restart, always bounded."""

    def __init__(self, workdir: Path, user: str | None = None):
        """`user`: have clamd drop to that user (it must then reach its directory: made 0755,
        the socket directory and temp dir writable by it)."""
        self.dir = workdir
        self.user = user
        self.db = workdir / "db"
        self.tmp = workdir / "tmp"
        self.db.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        for name, text in signatures().items():
            (self.db / name).write_text(text)
            os.chmod(self.db / name, 0o644)
        if user is not None:
            import pwd
            pw = pwd.getpwnam(user)
            for d in (workdir, self.db, self.tmp):
                os.chmod(d, 0o755)
            for d in (workdir, self.tmp):  # clamd (as `user`) creates its socket and log here
                os.chown(d, pw.pw_uid, pw.pw_gid)
        self.socket = str(workdir / "clamd.sock")
        self.conf = workdir / "clamd.conf"
        self.log = workdir / "clamd.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.extra_conf = ""  # more clamd.conf lines, taken on the next start

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_conf(self, new_port: bool) -> None:
        if new_port or not self.port:
            self.port = _free_port()
        self.conf.write_text("\n".join([
            "Foreground yes",
            f"LocalSocket {self.socket}",
            "LocalSocketMode 600" if self.user is None else "LocalSocketMode 666",
            "FixStaleSocket yes",
            f"TCPSocket {self.port}",
            "TCPAddr 127.0.0.1",
            f"DatabaseDirectory {self.db}",
            f"TemporaryDirectory {self.tmp}",
            f"LogFile {self.log}",
            "LogTime yes",
            "LogClean yes",
            "Bytecode no",
            "SelfCheck 0",
            f"StreamMaxLength {STREAM_MAX}",
            "MaxThreads 8",
            f"User {self.user}" if self.user else "",
            self.extra_conf,
            "",
        ]))

    def start(self, timeout: float = 60.0) -> "Clamd":
        assert self.proc is None or self.proc.poll() is not None, "clamd is already running"
        for attempt in range(3):  # the free port may be taken between probe and bind
            self._write_conf(new_port=attempt > 0)  # a restart keeps its port
            out = open(self.dir / "clamd.out", "ab")
            try:
                self.proc = subprocess.Popen([CLAMD, "--foreground", f"--config-file={self.conf}"],
                                             stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            finally:
                out.close()
            self.frozen = False
            if self._wait_ready(timeout):
                return self
            if attempt == 2:
                break
        raise AssertionError(f"clamd did not answer PING within {timeout:g}s (rc={self.proc.poll()});"
                             f" output:\n{self.output()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # exited: bad port, bad config (the caller reports the output)
            if self.ping(timeout=1.0):
                return True
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"clamd did not answer PING within {timeout:g}s; output:\n{self.output()}")

    def command(self, cmd: bytes, timeout: float = 2.0) -> bytes:
        """A z-command on a fresh connection; the reply without its NUL."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.socket)
            s.sendall(b"z" + cmd + b"\0")
            buf = b""
            while not buf.endswith(b"\0"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            return buf.rstrip(b"\0")

    def ping(self, timeout: float = 1.0) -> bool:
        try:
            return self.command(b"PING", timeout) == b"PONG"
        except OSError:
            return False

    def output(self) -> str:
        parts = []
        for f in (self.dir / "clamd.out", self.log):
            with contextlib.suppress(OSError):
                parts.append(f.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def freeze(self) -> None:
        """SIGSTOP: alive, its sockets still accept connections, nobody answers."""
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    @contextlib.contextmanager
    def frozen_for_test(self) -> Iterator["Clamd"]:
        self.freeze()
        try:
            yield self
        finally:
            self.thaw()

    def kill(self) -> None:
        """SIGKILL: gone at once, sockets left behind (FixStaleSocket clears them on start)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.frozen = False

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM once continued
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.frozen = False

    def restart(self, timeout: float = 60.0) -> "Clamd":
        self.stop()
        return self.start(timeout)


@pytest.fixture
def clamd() -> Iterator[Clamd]:
    """A started clamd of the test's own (short private path: a Unix socket name is <108 bytes)."""
    require_clamd()
    top = Path(tempfile.mkdtemp(prefix="vetd-clamd-"))
    c = Clamd(top)
    try:
        c.start()
        yield c
    finally:
        try:
            c.stop()
        finally:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
            shutil.rmtree(top, ignore_errors=True)
