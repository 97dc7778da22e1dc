"""Shared fixtures: a tmpfs of the test's own, a vetd process that marks only it, and openers.

Kernel tests never mark anything but a filesystem the fixture mounted. Every vetd started here
runs under a deadline and is killed on teardown, whatever the test did. Under CI=true a kernel
test that cannot run fails instead of skipping.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SHA256 = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _kernel_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root (CAP_SYS_ADMIN) for fanotify permission events"
    try:
        from vetd import fanotify
        fanotify.Group.open().close()
    except OSError as e:
        return f"fanotify permission events unavailable: {e}"
    if shutil.which("mount") is None:
        return "mount(8) is missing"
    return None


_KERNEL_REASON = _kernel_unavailable()


def require_kernel() -> None:
    if _KERNEL_REASON is not None:
        if IN_CI:
            pytest.fail(f"CI=true and {_KERNEL_REASON}")
        pytest.skip(_KERNEL_REASON)


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    for item in items:
        if item.get_closest_marker("kernel") is not None:
            item.add_marker(pytest.mark.usefixtures("_kernel_required"))


@pytest.fixture
def _kernel_required() -> None:
    require_kernel()


def _mount_tmpfs(where: Path, size: str = "64m") -> None:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                   check=True, timeout=10)


def _umount(where: Path) -> None:
    r = subprocess.run(["umount", str(where)], capture_output=True, timeout=10)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


@pytest.fixture
def tmpfs():
    """A fresh tmpfs mounted for this test alone, reachable by other users (for uid tests)."""
    require_kernel()
    top = Path(tempfile.mkdtemp(prefix="vetd-test-"))
    os.chmod(top, 0o755)
    mnt = top / "mnt"
    _mount_tmpfs(mnt)
    try:
        yield mnt
    finally:
        _umount(mnt)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def ext4_image(tmp_path: Path):
    """A loop-mounted ext4 image; returns a function that mounts it at a given path."""
    require_kernel()
    if shutil.which("mkfs.ext4") is None:
        (pytest.fail if IN_CI else pytest.skip)("mkfs.ext4 (e2fsprogs) is missing")
    img = tmp_path / "fs.img"
    with open(img, "wb") as fh:
        fh.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, timeout=30,
                   capture_output=True)
    mounted: list[Path] = []

    def mount_at(where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(where)], check=True, timeout=20)
        mounted.append(where)
        return where

    try:
        yield mount_at
    finally:
        for m in reversed(mounted):
            _umount(m)


# --- test plugins, installed through the real entry-point door ----------------------------------
TEST_PLUGINS = textwrap.dedent('''
    """Misbehaving scanners for vetd's tests."""
    import os, time
    from vetd.sdk import API_VERSION, Plugin, PluginConfigError, Verdict

    class Sleepy(Plugin):
        name = "sleepy"
        api_version = API_VERSION
        def scan(self, file, opener):
            if self.config.get("only", "") in file.path:
                time.sleep(float(self.config.get("seconds", 30)))
            return Verdict.allow()

    class Lagging(Plugin):
        """Reads the file, then takes its time for one command name only, then judges what it read."""
        name = "lagging"
        api_version = API_VERSION
        def scan(self, file, opener):
            data = b"".join(file.chunks())
            if opener.comm == self.config.get("slow_comm"):
                time.sleep(float(self.config.get("seconds", 1)))
            return Verdict.deny("marker") if b"BAD" in data else Verdict.allow()

    class WhoAmI(Plugin):
        """Pure Python, holds the GIL: denies files holding the marker, naming its own pid."""
        name = "whoami"
        api_version = API_VERSION
        def scan(self, file, opener):
            data = b"".join(file.chunks())
            n = 0
            for _ in range(int(self.config.get("spin", 0))):
                n += 1
            if b"BAD" in data:
                return Verdict.deny(f"marker-in-pid-{os.getpid()}")
            return Verdict.allow()

    class Garbage(Plugin):
        """Answers with something that is not a Verdict."""
        name = "garbage"
        api_version = API_VERSION
        def scan(self, file, opener):
            return self.config.get("answer", "allow")

    class Flaky(Plugin):
        """Fails while its flag file exists (the flag is outside any watched filesystem)."""
        name = "flaky"
        api_version = API_VERSION
        def scan(self, file, opener):
            if os.path.exists(self.config["flag"]):
                raise OSError("engine unavailable")
            return Verdict.allow()

    class SlowDeny(Plugin):
        """Takes its time, then denies content holding the marker."""
        name = "slowdeny"
        api_version = API_VERSION
        def scan(self, file, opener):
            time.sleep(float(self.config.get("seconds", 1)))
            if b"BAD" in b"".join(file.chunks()):
                return Verdict.deny("marker")
            return Verdict.allow()

    class OnlyUnderSystemd(Plugin):
        """Refuses to start without NOTIFY_SOCKET: the first process has it, a reader not."""
        name = "onlyundersystemd"
        api_version = API_VERSION
        def __init__(self, config):
            super().__init__(config)
            if not os.environ.get("NOTIFY_SOCKET"):
                raise PluginConfigError("not under systemd")
        def scan(self, file, opener):
            return Verdict.allow()

    class Raises(Plugin):
        name = "raises"
        api_version = API_VERSION
        def scan(self, file, opener):
            raise RuntimeError("scanner exploded")

    class ExeReader(Plugin):
        """Looks the opener up only after a pause, so a test can kill it first."""
        name = "exereader"
        api_version = API_VERSION
        def scan(self, file, opener):
            time.sleep(float(self.config.get("seconds", 1)))
            with open(self.config["log"], "a") as fh:
                fh.write(f"{opener.pid} {opener.exe!r} {opener.comm!r} {opener.uid!r}\\n")
            return Verdict.allow()

    class DeadlineProbe(Plugin):
        """Logs how long vetd said it would wait for it (ScanFile.deadline, SDK 1.1)."""
        name = "deadlineprobe"
        api_version = API_VERSION
        def scan(self, file, opener):
            left = None if file.deadline is None else file.deadline - time.monotonic()
            with open(self.config["log"], "a") as fh:
                fh.write(f"{left!r} {file.time_left(60.0)!r}\\n")
            return Verdict.allow()

    class Counter(Plugin):
        """Denies files containing a marker; appends each scanned path to a log (not watched)."""
        name = "counter"
        api_version = API_VERSION
        def scan(self, file, opener):
            with open(self.config["log"], "a") as fh:
                fh.write(file.path + "\\n")
            data = b"".join(file.chunks())
            if self.config.get("marker", "BAD").encode() in data:
                return Verdict.deny("marker")
            return Verdict.allow()
''')


@pytest.fixture
def plugin_site(tmp_path: Path) -> Path:
    """A site dir holding test plugins and a dist-info that registers them as vetd.plugins."""
    site = tmp_path / "site"
    site.mkdir(mode=0o755)
    (site / "vetd_testplugins.py").write_text(TEST_PLUGINS)
    dist = site / "vetd_testplugins-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vetd-testplugins\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "[vetd.plugins]\nsleepy = vetd_testplugins:Sleepy\nraises = vetd_testplugins:Raises\n"
        "counter = vetd_testplugins:Counter\nexereader = vetd_testplugins:ExeReader\n"
        "flaky = vetd_testplugins:Flaky\nslowdeny = vetd_testplugins:SlowDeny\n"
        "garbage = vetd_testplugins:Garbage\nlagging = vetd_testplugins:Lagging\n"
        "whoami = vetd_testplugins:WhoAmI\ndeadlineprobe = vetd_testplugins:DeadlineProbe\n"
        "onlyundersystemd = vetd_testplugins:OnlyUnderSystemd\n")
    return site


# --- the daemon under test -----------------------------------------------------------------------
class Vetd:
    """One vetd process with its own config, notify socket and log; always killed at the end."""

    def __init__(self, workdir: Path, watch: list[Path], *, extra: str = "",
                 plugins: str | None = None, env: dict[str, str] | None = None,
                 pythonpath: Path | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "vetd.toml"
        self.socket = self.dir / "control.sock"
        self.log = self.dir / "vetd.log"
        self.deny_list = self.dir / "deny.sha256"
        self.deny_list.write_text(f"{EICAR_SHA256}  EICAR-Test-File\n")
        if plugins is None:
            plugins = f'[plugins.hashlist]\ndeny = ["{self.deny_list}"]\n'
        self.write_config(watch, extra, plugins)
        self.env = dict(os.environ)
        self.env.update(env or {})
        if pythonpath is not None:
            self.env["PYTHONPATH"] = f"{pythonpath}:{self.env.get('PYTHONPATH', '')}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        self.messages: list[str] = []

    def write_config(self, watch: list[Path], extra: str, plugins: str) -> None:
        watch_list = ", ".join(f'"{w}"' for w in watch)
        self.config.write_text(
            f'[daemon]\nwatch = [{watch_list}]\nsocket = "{self.socket}"\nlog_level = "debug"\n'
            f'status_interval_s = 0.5\n{extra}\n{plugins}')

    def start(self, *args: str, wait_ready: bool = True, timeout: float = 20.0) -> "Vetd":
        path = str(self.dir / "notify.sock")
        if os.path.exists(path):
            os.unlink(path)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(path)
        self.env["NOTIFY_SOCKET"] = path
        self._logfh = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "vetd", "--config", str(self.config), *args],
                                     stdout=self._logfh, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(ROOT))
        if wait_ready:
            self.wait_message("READY=1", timeout)
        return self

    def wait_message(self, needle: str, timeout: float = 20.0, *, after: int = 0) -> str:
        """Wait for an sd_notify datagram containing `needle` (among those after index `after`)."""
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        seen = after
        while True:
            for msg in self.messages[seen:]:
                if needle in msg:
                    return msg
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"no {needle!r} from vetd (rc={self.proc.poll()}); log:\n"
                                     + self.log_text())
            self.notify.settimeout(min(left, 0.5))
            try:
                self.messages.append(self.notify.recv(65536).decode())
            except TimeoutError:
                pass

    def wait_log(self, needle: str, timeout: float = 10.0) -> None:
        """Wait for `needle` in the log: vetd answers first and logs after, so an opener can
        see its EPERM before the line that explains it is written."""
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the log within {timeout}s:\n"
                                     + self.log_text())
            time.sleep(0.02)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def status(self) -> dict:
        from vetd.control import request
        return request(str(self.socket), "status", timeout=10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        self._logfh.close()
        return self.proc.returncode


@pytest.fixture
def vetd_factory(tmp_path: Path):
    started: list[Vetd] = []

    def make(watch: list[Path], **kw) -> Vetd:
        v = Vetd(tmp_path / f"vetd{len(started)}", watch, **kw)
        started.append(v)
        return v

    try:
        yield make
    finally:
        for v in started:
            try:
                v.stop()
            except Exception:
                if v.proc is not None and v.proc.poll() is None:
                    v.proc.kill()


# --- openers: child processes, the answer read off errno -----------------------------------------
OPENER = textwrap.dedent('''
    import errno, os, sys
    try:
        fd = os.open(os.fsencode(sys.argv[1]), os.O_RDONLY | os.O_NONBLOCK)
        try:
            os.read(fd, 65536)
        except OSError:
            pass
        os.close(fd)
        print("OK")
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)))
''')


def open_as_child(path: Path | bytes, *, exe: str | None = None, user: int | None = None,
                  timeout: float = 15.0) -> str:
    """Open `path` in a child process; "OK" or the errno name (EPERM, EACCES, ...)."""
    if exe is None:
        # root's pyenv Python is not reachable for other users: they get the system Python
        exe = sys.executable if user is None else (shutil.which("python3", path="/usr/bin") or "")
    argv = [exe, "-c", OPENER, os.fsdecode(path)]
    preexec = None
    if user is not None:
        def preexec() -> None:  # noqa: E306
            os.setgid(user)
            os.setuid(user)
    r = subprocess.run(argv, capture_output=True, timeout=timeout, preexec_fn=preexec)
    out = r.stdout.decode().strip()
    assert out, f"opener printed nothing; stderr: {r.stderr.decode()}"
    return out


def exec_as_child(path: Path, timeout: float = 15.0) -> str:
    """Execute `path`; "OK" if it ran, else the errno name from execve."""
    try:
        r = subprocess.run([str(path)], capture_output=True, timeout=timeout)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "OK" if r.returncode == 0 else f"exit {r.returncode}"


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
