"""`[daemon] readers = N` on the real kernel: N processes read the one group; each decides,
scans and answers what it reads; a write voids every reader's cached verdict; an exec's open is
paired with its exec whichever reader reads it; reloads reach every reader; status sums them;
and a reader that dies takes vetd down, so that nothing it held is left waiting."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import EICAR, _mount_tmpfs, _umount, exec_as_child, open_as_child, wait_for

pytestmark = pytest.mark.kernel

TWO = "readers = 2\n"


def reader_pids(v) -> list[int]:
    return [r["pid"] for r in v.status()["readers"]]


@contextmanager
def only(v, pid: int):
    """Every reader but `pid` stopped (SIGSTOP): what is opened meanwhile is that one's to read.
    The control socket is the first process's: ask for status only after this."""
    others = [p for p in reader_pids(v) if p != pid]
    for p in others:
        os.kill(p, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in others:
            os.kill(p, signal.SIGCONT)


def start(vetd_factory, tmpfs, extra: str = "", **kw):
    return vetd_factory([tmpfs], extra=TWO + extra, **kw).start()


def test_every_reader_decides_scans_and_answers_what_it_reads(tmpfs, vetd_factory, plugin_site):
    for name in ("bad1", "bad2"):
        (tmpfs / name).write_text("BAD content\n")
    (tmpfs / "ok").write_text("fine\n")
    v = start(vetd_factory, tmpfs, pythonpath=plugin_site, plugins="[plugins.whoami]\n")
    pids = reader_pids(v)
    assert len(pids) == 2 and pids[0] == v.proc.pid and pids[1] != v.proc.pid
    for pid, name in zip(pids, ("bad1", "bad2")):
        with only(v, pid):
            assert open_as_child(tmpfs / name) == "EPERM"
        v.wait_log(f"marker-in-pid-{pid}")              # judged in that reader
    with only(v, pids[1]):
        assert open_as_child(tmpfs / "ok") == "OK"
    st = v.status()
    assert st["answers"]["deny"] == 2 and st["answers"]["allow"] >= 1   # summed over readers
    assert [r["deny"] for r in st["readers"]] == [1, 1]
    assert next(p for p in st["plugins"] if p["name"] == "whoami")["scans"] == 3
    assert st["cache"]["kernel_marks"] == 1                # placed by the second reader


def test_the_shipped_plugins_deny_eicar_in_either_reader(tmpfs, vetd_factory):
    (tmpfs / "e1.com").write_bytes(EICAR)
    (tmpfs / "e2.com").write_bytes(EICAR)
    v = start(vetd_factory, tmpfs)
    pids = reader_pids(v)
    with only(v, pids[0]):
        assert open_as_child(tmpfs / "e1.com") == "EPERM"
    with only(v, pids[1]):
        assert open_as_child(tmpfs / "e2.com") == "EPERM"
        assert open_as_child(tmpfs / "e1.com") == "EPERM"  # its own scan: caches are per reader
    assert v.status()["answers"]["deny"] == 3


def test_a_write_voids_the_verdict_every_reader_cached(tmpfs, vetd_factory, plugin_site):
    """Each reader has its own change group: a close-write reaches all of them, not the one
    that happens to read it (kernel_cache off, so the verdicts live in the readers)."""
    f = tmpfs / "f"
    f.write_text("fine\n")
    v = start(vetd_factory, tmpfs, "kernel_cache = false\n", pythonpath=plugin_site,
              plugins="[plugins.whoami]\n")
    pids = reader_pids(v)
    for pid in pids:
        with only(v, pid):
            assert open_as_child(f) == "OK"
    st = v.status()
    assert st["cache"]["entries"] == 2 and st["events"]["notification"] == 0
    with open(f, "w") as fh:   # vetd's own? no: the test's pid; the open is vetted, then written
        fh.write("BAD now\n")
    wait_for(lambda: v.status()["events"]["notification"] == 2, what="the close-write in both readers")
    assert v.status()["cache"]["entries"] == 0
    for pid in pids:
        with only(v, pid):
            assert open_as_child(f) == "EPERM"
        v.wait_log(f"marker-in-pid-{pid}")


def test_an_exec_is_paired_with_its_open_whichever_reader_reads_each(tmpfs, vetd_factory):
    """The exec event and the open that completes it may reach different readers: the one
    that reads the exec tells the others before it answers. Run it often enough that both
    orders happen (the status shows who answered what)."""
    (tmpfs / "bin").mkdir()
    tool = tmpfs / "bin" / "tool"
    shutil.copy2("/bin/true", tool)
    v = vetd_factory([tmpfs])
    rules = v.dir / "rules.d"
    rules.mkdir()
    (rules / "10.rules").write_text(f"allow exec {tmpfs}/bin/**\ndeny open {tmpfs}/bin/**\n")
    v.write_config([tmpfs], f'{TWO}\n[rules]\ndir = "{rules}"\n',
                   f'[plugins.hashlist]\ndeny = ["{v.deny_list}"]\n')
    v.start()
    assert open_as_child(tool) == "EPERM"
    runs = 0
    while runs < 40 or (v.status()["exec_notes"]["paired"] < 3 and runs < 400):
        assert exec_as_child(tool) == "OK", f"exec {runs} refused: {v.status()['exec_notes']}"
        runs += 1
    assert open_as_child(tool) == "EPERM", "an exec's pairing leaked into a later open"
    st = v.status()
    assert st["exec_notes"]["sent"] == st["exec_notes"]["received"] == runs
    assert st["exec_notes"]["paired"] >= 3, "too few exec's opens were read by the other reader"
    assert st["answers"]["deny"] == 2


def test_a_reload_reaches_every_reader(tmpfs, vetd_factory):
    newbad = tmpfs / "newbad"
    newbad.write_text("fine until the list grows\n")
    v = start(vetd_factory, tmpfs, "kernel_cache = false\n")
    pids = reader_pids(v)
    before = [r["generation"] for r in v.status()["readers"]]
    for pid in pids:
        with only(v, pid):
            assert open_as_child(newbad) == "OK"
    with open(v.deny_list, "a") as fh:
        fh.write(f"{hashlib.sha256(newbad.read_bytes()).hexdigest()}  newly-bad\n")
    n = len(v.messages)
    v.signal(signal.SIGHUP)
    v.wait_message("READY=1", after=n)      # sent once every reader has reloaded
    assert [r["generation"] for r in v.status()["readers"]] == [g + 1 for g in before]
    for pid in pids:
        with only(v, pid):
            assert open_as_child(newbad) == "EPERM"


def test_a_broken_reload_keeps_every_reader_on_the_old_configuration(tmpfs, vetd_factory):
    (tmpfs / "e.com").write_bytes(EICAR)
    v = start(vetd_factory, tmpfs)
    before = [r["generation"] for r in v.status()["readers"]]
    good = v.config.read_text()
    v.config.write_text(good + "\n[scan]\nworkers = -3\n")
    from vetd.control import request
    with pytest.raises(Exception, match="keeping the running configuration"):
        request(str(v.socket), "reload", timeout=30)
    assert [r["generation"] for r in v.status()["readers"]] == before
    for pid in reader_pids(v):
        with only(v, pid):
            assert open_as_child(tmpfs / "e.com") == "EPERM"


def test_a_reader_that_dies_takes_vetd_down_and_nothing_is_left_waiting(tmpfs, vetd_factory, plugin_site):
    (tmpfs / "slow").write_text("x\n")
    (tmpfs / "a").write_text("a\n")
    v = start(vetd_factory, tmpfs, pythonpath=plugin_site,
              plugins='[plugins.sleepy]\nonly = "slow"\nseconds = 60\n')
    child = reader_pids(v)[1]
    with only(v, child):   # the child reads the open and holds it, scanning
        opener = subprocess.Popen([sys.executable, "-c", f"open({str(tmpfs / 'slow')!r}).close()"])
        time.sleep(1.0)
    assert opener.poll() is None
    os.kill(child, signal.SIGKILL)
    assert v.proc.wait(15) == 1
    assert opener.wait(15) == 0            # the kernel let it through once the group was gone
    assert "reader process %d died" % child in v.log_text()
    assert open_as_child(tmpfs / "a") == "OK"


def test_readers_do_not_outlive_vetd(tmpfs, vetd_factory):
    (tmpfs / "a").write_text("a\n")
    v = start(vetd_factory, tmpfs)
    child = reader_pids(v)[1]
    v.proc.kill()
    v.proc.wait(10)
    wait_for(lambda: not os.path.exists(f"/proc/{child}"), timeout=10, what="the reader to die with vetd")
    assert open_as_child(tmpfs / "a") == "OK"


def test_a_clean_stop_stops_every_reader(tmpfs, vetd_factory):
    v = start(vetd_factory, tmpfs)
    child = reader_pids(v)[1]
    assert v.stop() == 0
    assert not os.path.exists(f"/proc/{child}")


def test_each_reader_runs_its_own_isolated_plugin_processes(tmpfs, vetd_factory):
    """isolation = "process" under readers: each reader has its own agent children (their pids
    are every reader's own: a reader tells the others before the child runs)."""
    (tmpfs / "e1.com").write_bytes(EICAR)
    (tmpfs / "e2.com").write_bytes(EICAR)
    v = vetd_factory([tmpfs])
    v.write_config([tmpfs], TWO, f'[plugins.hashlist]\ndeny = ["{v.deny_list}"]\n'
                                 'isolation = "process"\nprocesses = 1\n')
    v.start()
    pids = reader_pids(v)
    for pid, name in zip(pids, ("e1.com", "e2.com")):
        with only(v, pid):
            assert open_as_child(tmpfs / name) == "EPERM"
    kids = {pid: [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()
                  if int(c) not in pids] for pid in pids}
    assert all(kids[pid] for pid in pids), kids   # an agent process under each reader
    assert v.status()["answers"]["deny"] == 2


def test_the_shipped_default_configuration_reads_in_two_processes(tmpfs, vetd_factory):
    root = Path(__file__).resolve().parent.parent
    (tmpfs / "e.com").write_bytes(EICAR)
    (tmpfs / "fine.txt").write_text("fine\n")
    v = vetd_factory([tmpfs])
    v.config.write_text((root / "conf" / "vetd.toml").read_text()
                        .replace("/etc/vetd/", f"{root}/conf/")
                        .replace('"/run/vetd/control.sock"', f'"{v.socket}"'))
    v.start("--watch", str(tmpfs))
    st = v.status()
    assert len(st["readers"]) == 2 and [p["name"] for p in st["plugins"]] == ["hashlist", "yara"]
    for pid in reader_pids(v):
        with only(v, pid):
            assert open_as_child(tmpfs / "e.com") == "EPERM"
            assert open_as_child(tmpfs / "fine.txt") == "OK"
    assert v.status()["answers"]["deny"] == 2


# --- degraded mode with readers: the fault tests of one process, per reader ---------------------
def test_a_hung_plugin_in_every_reader_is_answered_at_its_deadline_and_reading_goes_on(
        tmpfs, vetd_factory, plugin_site):
    for name in ("slow1", "slow2", "quick"):
        (tmpfs / name).write_text(name + "\n")
    v = start(vetd_factory, tmpfs, '[scan]\ndeadline_ms = 500\non_timeout = "deny"\n',
              pythonpath=plugin_site, plugins='[plugins.sleepy]\nonly = "slow"\nseconds = 60\n')
    for pid, name in zip(reader_pids(v), ("slow1", "slow2")):
        with only(v, pid):
            t0 = time.monotonic()
            assert open_as_child(tmpfs / name) == "EPERM"   # the policy, at the deadline
            assert time.monotonic() - t0 < 0.5 + 2
    # every reader's read thread is now inside the plugin for a minute: their standbys read
    t0 = time.monotonic()
    assert open_as_child(tmpfs / "quick") == "OK"
    assert time.monotonic() - t0 < 2
    st = v.status()
    assert st["degraded"]["timeout"] == 2 and st["backlog"]["read_takeovers"] >= 1
    assert v.proc.poll() is None


@pytest.mark.parametrize("policy,expected", [("deny", "EPERM"), ("allow", "OK")])
def test_a_failing_plugin_is_answered_by_policy_in_every_reader(tmpfs, vetd_factory, plugin_site,
                                                                policy, expected):
    for name in ("a", "b"):
        (tmpfs / name).write_text(name + "\n")
    v = start(vetd_factory, tmpfs, f'[scan]\non_error = "{policy}"\n', pythonpath=plugin_site,
              plugins="[plugins.raises]\n")
    for pid, name in zip(reader_pids(v), ("a", "b")):
        with only(v, pid):
            assert open_as_child(tmpfs / name) == expected
    st = v.status()
    assert st["degraded"]["error"] == 2
    assert next(p for p in st["plugins"] if p["name"] == "raises")["errors"] == 2


def test_a_flood_beyond_the_backlog_is_answered_by_policy_at_once(tmpfs, vetd_factory, plugin_site):
    """Each reader holds at most three opens here (one scanning inline, one on its worker, one
    queued); the rest are refused at once by on_backlog, and the held ones are allowed at the
    deadline."""
    n = 12
    for i in range(n):
        (tmpfs / f"f{i}").write_text(f"{i}\n")
    v = start(vetd_factory, tmpfs,
              '[scan]\nworkers = 1\nbacklog = 1\ndeadline_ms = 3000\non_backlog = "deny"\n'
              'on_timeout = "allow"\n', pythonpath=plugin_site, plugins="[plugins.sleepy]\nseconds = 30\n")
    one = ("import errno, os, sys\ntry:\n    os.close(os.open(sys.argv[1], os.O_RDONLY)); print('OK')\n"
           "except OSError as e:\n    print(errno.errorcode[e.errno])\n")
    t0 = time.monotonic()
    children = [subprocess.Popen([sys.executable, "-c", one, str(tmpfs / f"f{i}")],
                                 stdout=subprocess.PIPE) for i in range(n)]
    outs = [c.communicate(timeout=20)[0].decode().strip() for c in children]
    assert time.monotonic() - t0 < 3 + 5              # the deadline, and the openers' start-up
    assert outs.count("EPERM") >= n - 6 and outs.count("OK") >= 1, outs
    assert outs.count("EPERM") + outs.count("OK") == n, outs
    assert v.status()["degraded"]["backlog"] == outs.count("EPERM")
    assert v.proc.poll() is None


def test_a_stopped_reader_withholds_the_watchdog_until_it_answers_again(tmpfs, vetd_factory):
    """A reader that is stopped or stuck holds the opens it read, and nobody else can answer
    them: the first process stops telling systemd it is well, so systemd's watchdog ends the
    service (and the kernel lets the opens through)."""
    v = vetd_factory([tmpfs], extra=TWO, env={"WATCHDOG_USEC": "400000"}).start()
    v.wait_message("WATCHDOG=1")
    child = reader_pids(v)[1]
    os.kill(child, signal.SIGSTOP)
    try:
        v.wait_log("a reader process has not answered for", timeout=15)
        v.notify.setblocking(False)              # what was sent before that line: read it now
        try:
            while True:
                v.messages.append(v.notify.recv(65536).decode())
        except BlockingIOError:
            pass
        n = len(v.messages)
        # two status lines (0.5 s apart; they still come, from what the reader said last) and
        # no watchdog ping among what came with them (pings would come every 0.2 s)
        first = v.wait_message("STATUS=", after=n)
        v.wait_message("STATUS=", after=v.messages.index(first, n) + 1)
        assert not any("WATCHDOG=1" in m for m in v.messages[n:]), v.messages[n:]
        assert v.proc.poll() is None
    finally:
        os.kill(child, signal.SIGCONT)
    v.wait_message("WATCHDOG=1", after=len(v.messages), timeout=15)


def test_a_reader_that_cannot_start_stops_vetd_with_its_reason_and_no_mark_left(tmpfs, vetd_factory,
                                                                               plugin_site):
    (tmpfs / "a").write_text("a\n")
    v = vetd_factory([tmpfs], extra=TWO, pythonpath=plugin_site, plugins="[plugins.onlyundersystemd]\n")
    v.start(wait_ready=False)
    assert v.proc.wait(60) == 1
    assert "did not start: [plugins.onlyundersystemd] not under systemd" in v.log_text()
    assert "Traceback" not in v.log_text()
    assert open_as_child(tmpfs / "a") == "OK"


def _mark_devs(pid: int) -> set[int]:
    """The filesystems (kernel dev numbers) of every fanotify mark pid's fds hold."""
    devs = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = open(f"/proc/{pid}/fdinfo/{fd}").read()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("fanotify ") and "sdev:" in line:
                devs.add(int(line.split("sdev:")[1].split()[0], 16))
    return devs


def test_a_reload_keeps_every_reader_on_the_watch_override(tmpfs, vetd_factory, tmp_path):
    """--watch replaces the configured watch list; a reader's change group must stay on it
    across a reload, as the first process's marks do. The file names a second tmpfs of the
    test's own, which nothing may mark."""
    other = tmp_path / "other"
    _mount_tmpfs(other)
    try:
        st = os.stat(tmpfs)
        here = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
        v = vetd_factory([other], extra=TWO)
        v.start("--watch", str(tmpfs))
        child = reader_pids(v)[1]
        assert _mark_devs(child) == {here} and _mark_devs(v.proc.pid) == {here}
        n = len(v.messages)
        v.signal(signal.SIGHUP)
        v.wait_message("READY=1", after=n)
        assert _mark_devs(child) == {here} and _mark_devs(v.proc.pid) == {here}
        v.stop()
    finally:
        _umount(other)


def test_readers_refuse_to_combine_with_scan_processes(tmpfs, vetd_factory):
    v = vetd_factory([tmpfs], extra=TWO + "\n[scan]\nprocesses = 1\n")
    r = subprocess.run([sys.executable, "-m", "vetd", "--config", str(v.config)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0 and "cannot be combined" in r.stderr
