"""vetd on the real kernel: openers are child processes, answers are read off errno."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import EICAR, exec_as_child, open_as_child, wait_for

pytestmark = pytest.mark.kernel


def perm_events(v) -> int:
    return v.status()["events"]["permission"]


def scans(v, plugin: str = "hashlist") -> int:
    return next(p["scans"] for p in v.status()["plugins"] if p["name"] == plugin)


# --- allow, deny, cache ---------------------------------------------------------------------------
def test_clean_file_is_allowed_and_eicar_is_denied_with_eperm(tmpfs, vetd_factory):
    (tmpfs / "ok.txt").write_text("hello\n")
    (tmpfs / "eicar.com").write_bytes(EICAR)
    v = vetd_factory([tmpfs]).start()
    assert open_as_child(tmpfs / "ok.txt") == "OK"
    assert open_as_child(tmpfs / "eicar.com") == "EPERM"
    st = v.status()
    assert st["answers"]["deny"] == 1
    v.wait_log("EICAR-Test-File")
    assert "deny open" in v.log_text()


def test_deny_errno_is_what_the_opener_sees(tmpfs, vetd_factory):
    (tmpfs / "eicar.com").write_bytes(EICAR)
    v = vetd_factory([tmpfs], extra='deny_errno = "EIO"').start()
    expected = "EIO" if v.status()["features"]["deny_errno"] else "EPERM"
    assert open_as_child(tmpfs / "eicar.com") == expected


def test_an_errno_the_kernel_refuses_falls_back_to_eperm_never_a_hang(tmpfs, vetd_factory):
    (tmpfs / "eicar.com").write_bytes(EICAR)
    v = vetd_factory([tmpfs], extra='deny_errno = "EACCES"').start()
    assert open_as_child(tmpfs / "eicar.com") == "EPERM"
    v.wait_log("deny_errno = EACCES is not accepted")


def test_second_open_of_a_denied_file_is_a_cache_hit_not_a_second_scan(tmpfs, vetd_factory):
    (tmpfs / "eicar.com").write_bytes(EICAR)
    v = vetd_factory([tmpfs]).start()
    assert open_as_child(tmpfs / "eicar.com") == "EPERM"
    assert open_as_child(tmpfs / "eicar.com") == "EPERM"
    st = v.status()
    assert scans(v) == 1
    assert st["cache"]["hits"] == 1
    assert st["answers"]["by_reason"].get("cache") == 1


def test_second_open_of_a_clean_file_is_answered_by_the_kernel_cache(tmpfs, vetd_factory):
    (tmpfs / "ok.txt").write_text("clean\n")
    v = vetd_factory([tmpfs]).start()
    assert open_as_child(tmpfs / "ok.txt") == "OK"
    first = perm_events(v)
    for _ in range(3):
        assert open_as_child(tmpfs / "ok.txt") == "OK"
    assert perm_events(v) == first, "repeat opens of a clean file reached userspace"
    assert v.status()["cache"]["kernel_marks"] == 1


def test_userspace_cache_answers_when_kernel_cache_is_off(tmpfs, vetd_factory):
    (tmpfs / "ok.txt").write_text("clean\n")
    v = vetd_factory([tmpfs], extra="kernel_cache = false").start()
    for _ in range(3):
        assert open_as_child(tmpfs / "ok.txt") == "OK"
    st = v.status()
    assert scans(v) == 1
    assert st["cache"]["hits"] == 2
    assert st["cache"]["kernel_marks"] == 0


def test_a_write_invalidates_both_caches(tmpfs, vetd_factory):
    f = tmpfs / "file.bin"
    f.write_text("clean at first\n")
    v = vetd_factory([tmpfs]).start()
    assert open_as_child(f) == "OK"          # scanned, cached, kernel-marked
    with open(f, "wb") as fh:                # vetd's own tests write: the opener is pytest
        fh.write(EICAR)
    assert open_as_child(f) == "EPERM"
    os.truncate(f, 0)                        # a denied file cannot be opened, even to clean it
    assert open_as_child(f) == "OK"
    assert scans(v) == 3


def test_in_place_change_without_close_is_caught_by_the_stat_check(tmpfs, vetd_factory):
    f = tmpfs / "f"
    f.write_text("x" * 68)
    v = vetd_factory([tmpfs], extra="kernel_cache = false").start()
    assert open_as_child(f) == "OK"
    fd = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(fd, EICAR, 0)              # still open: no close-write event yet
        assert open_as_child(f) == "EPERM"
    finally:
        os.close(fd)
    assert scans(v) == 2


# --- exec -----------------------------------------------------------------------------------------
def test_exec_of_a_denied_binary_fails_and_a_clean_one_runs(tmpfs, vetd_factory):
    good = tmpfs / "good"
    bad = tmpfs / "bad"
    shutil.copy2("/bin/true", good)
    shutil.copy2("/bin/false", bad)          # a different hash: put it on the deny list
    import hashlib
    v = vetd_factory([tmpfs])
    v.deny_list.write_text(f"{hashlib.sha256(bad.read_bytes()).hexdigest()}  test-bad-binary\n")
    v.start()
    assert exec_as_child(good) == "OK"
    assert exec_as_child(bad) == "EPERM"
    wait_for(lambda: "deny exec" in v.log_text() or "deny open" in v.log_text(), what="the deny line")


def test_the_pure_python_loop_gives_the_same_answers(tmpfs, vetd_factory):
    """VETD_HOTPATH=python: the loop vetd falls back to when vetd._hotpath is not built."""
    (tmpfs / "e.com").write_bytes(EICAR)
    (tmpfs / "ok.txt").write_text("fine")
    v = vetd_factory([tmpfs], env={"VETD_HOTPATH": "python"}).start()
    for _ in range(3):
        assert open_as_child(tmpfs / "e.com") == "EPERM"
        assert open_as_child(tmpfs / "ok.txt") == "OK"
    assert v.status()["hot_path"]["compiled"] is False


def test_exec_events_can_be_excluded_by_operation(tmpfs, vetd_factory):
    import hashlib
    tool = tmpfs / "tool"
    shutil.copy2("/bin/true", tool)
    v = vetd_factory([tmpfs], extra='[exclude]\nops = ["exec", "open"]')
    v.deny_list.write_text(f"{hashlib.sha256(tool.read_bytes()).hexdigest()}  x\n")
    v.start()
    assert exec_as_child(tool) == "OK"


# --- exclusions -----------------------------------------------------------------------------------
def test_path_exclusion_and_only_paths(tmpfs, vetd_factory):
    (tmpfs / "skip").mkdir()
    (tmpfs / "skip" / "e.com").write_bytes(EICAR)
    (tmpfs / "e.com").write_bytes(EICAR)
    (tmpfs / "other").mkdir()
    (tmpfs / "other" / "e.com").write_bytes(EICAR)
    v = vetd_factory([tmpfs], extra=f'[exclude]\npaths = ["{tmpfs}/skip/**"]').start()
    assert open_as_child(tmpfs / "skip" / "e.com") == "OK"
    assert open_as_child(tmpfs / "e.com") == "EPERM"
    v.stop()
    v2 = vetd_factory([tmpfs], extra=f'[exclude]\nonly_paths = ["{tmpfs}/other/*"]').start()
    assert open_as_child(tmpfs / "e.com") == "OK"
    assert open_as_child(tmpfs / "other" / "e.com") == "EPERM"
    assert v2.status()["answers"]["by_reason"]["excluded"] >= 1


def test_watching_a_directory_vets_only_that_tree(tmpfs, vetd_factory):
    (tmpfs / "watched").mkdir()
    (tmpfs / "watched" / "e.com").write_bytes(EICAR)
    (tmpfs / "e.com").write_bytes(EICAR)
    vetd_factory([tmpfs]).start("--watch", str(tmpfs / "watched"))
    assert open_as_child(tmpfs / "watched" / "e.com") == "EPERM"
    assert open_as_child(tmpfs / "e.com") == "OK"


def test_process_exclusion_by_exe(tmpfs, vetd_factory, tmp_path):
    (tmpfs / "e.com").write_bytes(EICAR)
    trusted = tmp_path / "trusted-python"
    shutil.copy2(os.path.realpath(sys.executable), trusted)
    v = vetd_factory([tmpfs], extra=f'[exclude]\nexe = ["{trusted}"]').start()
    assert open_as_child(tmpfs / "e.com", exe=str(trusted)) == "OK"
    assert open_as_child(tmpfs / "e.com") == "EPERM"
    # a process exclusion depends on who opens: it must not be cached for everyone
    assert open_as_child(tmpfs / "e.com") == "EPERM"
    assert v.status()["cache"]["kernel_marks"] == 0


def test_process_exclusion_by_comm_and_by_uid(tmpfs, vetd_factory):
    (tmpfs / "e.com").write_bytes(EICAR)
    os.chmod(tmpfs / "e.com", 0o644)
    comm = os.path.basename(sys.executable)[:15]  # comm is the name execve was given
    v = vetd_factory([tmpfs], extra=f'[exclude]\ncomm = ["{comm}"]').start()
    assert open_as_child(tmpfs / "e.com") == "OK"
    v.stop()
    vetd_factory([tmpfs], extra="[exclude]\nuids = [65534]").start()
    assert open_as_child(tmpfs / "e.com", user=65534) == "OK"
    assert open_as_child(tmpfs / "e.com") == "EPERM"


def test_excluded_filesystem_type_is_not_marked(tmpfs, vetd_factory, ext4_image):
    ext = ext4_image(tmpfs / "ext")
    (ext / "e.com").write_bytes(EICAR)
    (tmpfs / "e.com").write_bytes(EICAR)
    v = vetd_factory([tmpfs], extra='[exclude]\nfs_types = ["ext4", "proc"]').start()
    assert open_as_child(ext / "e.com") == "OK"
    assert open_as_child(tmpfs / "e.com") == "EPERM"
    assert [m["fstype"] for m in v.status()["marks"]] == ["tmpfs"]
    v.stop()
    v2 = vetd_factory([tmpfs]).start()
    assert sorted(m["fstype"] for m in v2.status()["marks"]) == ["ext4", "tmpfs"]
    assert open_as_child(ext / "e.com") == "EPERM"


def test_a_filesystem_mounted_later_is_marked(tmpfs, vetd_factory):
    v = vetd_factory([tmpfs]).start()
    late = tmpfs / "late"
    late.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(late)], check=True, timeout=10)
    try:
        wait_for(lambda: len(v.status()["marks"]) == 2, what="the new mount to be marked")
        (late / "e.com").write_bytes(EICAR)
        assert open_as_child(late / "e.com") == "EPERM"
    finally:
        subprocess.run(["umount", "-l", str(late)], timeout=10)


# --- odd files ------------------------------------------------------------------------------------
def test_odd_files_never_stop_the_loop(tmpfs, vetd_factory):
    os.mkfifo(tmpfs / "fifo")
    (tmpfs / "empty").write_bytes(b"")
    weird = os.fsencode(tmpfs) + b"/bad-\xff\xfe-name\nwith newline"
    with open(weird, "wb") as fh:
        fh.write(EICAR)
    with open(tmpfs / "sparse", "wb") as fh:
        fh.truncate(1 << 30)                 # 1 GiB of hole, over max_size
        fh.seek(1 << 20)
        fh.write(b"data in the middle")
    with open(tmpfs / "sparse-small", "wb") as fh:
        fh.truncate(8 << 20)
        fh.seek(4 << 20)
        fh.write(EICAR)
    v = vetd_factory([tmpfs], extra='[scan]\nmax_size = "64MiB"\non_too_big = "deny"').start()
    assert open_as_child(tmpfs / "fifo") == "OK"
    assert open_as_child(tmpfs / "empty") == "OK"
    assert open_as_child(weird) == "EPERM"
    assert open_as_child(tmpfs / "sparse") == "EPERM"       # too big: the configured policy
    assert open_as_child(tmpfs / "sparse-small") == "OK"    # EICAR must be the whole file
    st = v.status()
    assert st["degraded"]["too_big"] == 1
    v.wait_log("\\xff\\xfe")
    assert v.proc.poll() is None


def test_file_deleted_during_its_scan_is_answered(tmpfs, vetd_factory, plugin_site):
    f = tmpfs / "doomed"
    f.write_text("soon gone\n")
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     plugins='[plugins.sleepy]\nseconds = 1.0\n').start()
    child = subprocess.Popen([sys.executable, "-c", f"open({str(f)!r}).read(); print('OK')"],
                             stdout=subprocess.PIPE)
    time.sleep(0.3)
    f.unlink()
    out, _ = child.communicate(timeout=15)
    assert out.decode().strip() == "OK"
    assert v.proc.poll() is None


def test_an_opener_that_dies_before_it_is_looked_up_gets_a_defined_answer(tmpfs, vetd_factory,
                                                                          plugin_site, tmp_path):
    (tmpfs / "f").write_text("x\n")
    log = tmp_path / "exereader.log"
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     plugins=f'[plugins.exereader]\nseconds = 1.0\nlog = "{log}"\n').start()
    child = subprocess.Popen([sys.executable, "-c", OPEN_ONE, str(tmpfs / "f")], stdout=subprocess.PIPE)
    wait_for(lambda: v.status()["backlog"]["in_flight"] == 1, what="the open to be held")
    child.kill()
    child.wait(10)
    line = wait_for(lambda: log.exists() and log.read_text().strip(), what="the late look-up")
    assert line.split(" ", 1)[1] == "None None None", line
    wait_for(lambda: v.status()["backlog"]["in_flight"] == 0, what="the dead opener's event to settle")
    (tmpfs / "g").write_text("y\n")
    assert open_as_child(tmpfs / "g") == "OK"
    assert v.proc.poll() is None


# --- degraded answers -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy,expected", [("deny", "EPERM"), ("allow", "OK")])
def test_deadline_expiry_is_answered_by_policy(tmpfs, vetd_factory, plugin_site, policy, expected):
    (tmpfs / "f").write_text("x\n")
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     extra=f"[scan]\ndeadline_ms = 300\non_timeout = \"{policy}\"",
                     plugins="[plugins.sleepy]\nseconds = 30\n").start()
    t0 = time.monotonic()
    assert open_as_child(tmpfs / "f") == expected
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"open took {elapsed:.1f}s with a 0.3s deadline"
    assert v.status()["degraded"]["timeout"] == 1


@pytest.mark.parametrize("policy,expected", [("deny", "EPERM"), ("allow", "OK")])
def test_a_scanner_exception_is_answered_by_policy(tmpfs, vetd_factory, plugin_site, policy, expected):
    (tmpfs / "f").write_text("x\n")
    v = vetd_factory([tmpfs], pythonpath=plugin_site, extra=f"[scan]\non_error = \"{policy}\"",
                     plugins="[plugins.raises]\n").start()
    assert open_as_child(tmpfs / "f") == expected
    assert open_as_child(tmpfs / "f") == expected   # a failure is never cached as clean
    assert v.status()["degraded"]["error"] == 2
    v.wait_log("scanner exploded")


@pytest.mark.parametrize("policy,expected", [("deny", "EPERM"), ("allow", "OK")])
def test_an_exception_in_handling_is_answered_by_policy(tmpfs, vetd_factory, policy, expected):
    (tmpfs / "f").write_text("x\n")
    v = vetd_factory([tmpfs], extra=f"[scan]\non_error = \"{policy}\"",
                     env={"VETD_FAILPOINTS": "decide"}).start()
    assert open_as_child(tmpfs / "f") == expected
    assert open_as_child(tmpfs / "f") == expected
    assert v.status()["degraded"]["error"] == 2
    assert v.proc.poll() is None


@pytest.mark.parametrize("policy,expected", [("deny", "EPERM"), ("allow", "OK")])
def test_an_exception_outside_the_decision_still_gets_the_event_answered(tmpfs, vetd_factory,
                                                                        policy, expected):
    (tmpfs / "f").write_text("x\n")
    v = vetd_factory([tmpfs], extra=f"[scan]\non_error = \"{policy}\"",
                     env={"VETD_FAILPOINTS": "handle"}).start()
    assert open_as_child(tmpfs / "f") == expected
    assert open_as_child(tmpfs / "f") == expected
    assert v.status()["degraded"]["error"] == 2
    assert v.proc.poll() is None


def test_a_full_backlog_is_answered_by_policy_at_once(tmpfs, vetd_factory, plugin_site):
    for i in range(6):
        (tmpfs / f"f{i}").write_text(f"{i}\n")
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     extra='[scan]\nworkers = 1\nbacklog = 1\ndeadline_ms = 3000\non_backlog = "deny"\n'
                           'on_timeout = "allow"',
                     plugins="[plugins.sleepy]\nseconds = 30\n").start()
    children = [subprocess.Popen([sys.executable, "-c", OPEN_ONE, str(tmpfs / f"f{i}")],
                                 stdout=subprocess.PIPE) for i in range(6)]
    outs = [c.communicate(timeout=20)[0].decode().strip() for c in children]
    # one on the worker, one queued: both time out and are allowed; the rest are refused at once
    assert outs.count("EPERM") >= 3, outs
    assert outs.count("OK") >= 1, outs
    assert v.status()["degraded"]["backlog"] == outs.count("EPERM")


OPEN_ONE = ("import errno, os, sys\ntry:\n    os.close(os.open(sys.argv[1], os.O_RDONLY)); print('OK')\n"
            "except OSError as e:\n    print(errno.errorcode[e.errno])\n")


def test_killing_vetd_with_events_pending_releases_the_openers(tmpfs, vetd_factory, plugin_site):
    (tmpfs / "f").write_text("x\n")
    v = vetd_factory([tmpfs], pythonpath=plugin_site, extra="[scan]\ndeadline_ms = 60000",
                     plugins="[plugins.sleepy]\nseconds = 120\n").start()
    child = subprocess.Popen([sys.executable, "-c", OPEN_ONE, str(tmpfs / "f")], stdout=subprocess.PIPE)
    wait_for(lambda: v.status()["backlog"]["in_flight"] == 1, what="the open to be held")
    assert child.poll() is None, "the open was not held"
    v.proc.kill()
    out, _ = child.communicate(timeout=10)
    assert out.decode().strip() == "OK"


# --- reload, config, notify -----------------------------------------------------------------------
def test_sighup_reload_applies_a_good_config_and_keeps_the_old_on_a_bad_one(tmpfs, vetd_factory):
    import hashlib
    (tmpfs / "e.com").write_bytes(EICAR)
    newbad = tmpfs / "newbad"
    newbad.write_text("fine until the list grows\n")
    v = vetd_factory([tmpfs]).start()
    assert open_as_child(newbad) == "OK"
    assert open_as_child(tmpfs / "e.com") == "EPERM"
    gen = v.status()["config"]["generation"]
    n = len(v.messages)
    with open(v.deny_list, "a") as fh:
        fh.write(f"{hashlib.sha256(newbad.read_bytes()).hexdigest()}  newly-bad\n")
    v.signal(signal.SIGHUP)
    v.wait_message("RELOADING=1", after=n)
    v.wait_message("READY=1", after=n)
    assert v.status()["config"]["generation"] > gen
    assert open_as_child(newbad) == "EPERM", "the kernel cache kept a verdict from before the reload"
    n = len(v.messages)
    v.config.write_text(v.config.read_text() + "\n[daemon\nbroken")
    v.signal(signal.SIGHUP)
    v.wait_message("READY=1", after=n)
    v.wait_log("reload failed, keeping the running configuration")
    assert open_as_child(tmpfs / "e.com") == "EPERM"
    assert v.proc.poll() is None


def test_busy_polling_changes_when_the_loop_waits_never_what_it_answers(tmpfs, vetd_factory):
    """busy_poll_us = 0 never polls; a reload turns polling on; the answers are the same."""
    (tmpfs / "e.com").write_bytes(EICAR)
    for i in range(4):
        (tmpfs / f"f{i}").write_text(f"clean {i}\n")
    v = vetd_factory([tmpfs], extra="busy_poll_us = 0").start()
    assert [open_as_child(tmpfs / f"f{i}") for i in range(2)] == ["OK", "OK"]
    assert open_as_child(tmpfs / "e.com") == "EPERM"
    st = v.status()["hot_path"]
    if os.environ.get("CI") == "true":
        assert st["compiled"], "the compiled read loop must be built under CI"
    assert st["busy_poll"] == {"max_us": 0, "window_us": 0.0, "caught": 0, "spent_s": 0.0}
    n = len(v.messages)
    v.config.write_text(v.config.read_text().replace("busy_poll_us = 0", "busy_poll_us = 1000"))
    v.signal(signal.SIGHUP)
    v.wait_message("READY=1", after=n)
    assert [open_as_child(tmpfs / f"f{i}") for i in range(2, 4)] == ["OK", "OK"]
    assert open_as_child(tmpfs / "e.com") == "EPERM"
    bp = v.status()["hot_path"]["busy_poll"]
    assert bp["max_us"] == (1000 if st["compiled"] else 0) and 0 <= bp["window_us"] <= 1000


def test_notify_protocol_ready_status_watchdog_stopping(tmpfs, vetd_factory):
    v = vetd_factory([tmpfs], env={"WATCHDOG_USEC": "200000"}).start()
    v.wait_message("WATCHDOG=1")
    v.wait_message("STATUS=")
    n = len(v.messages)
    v.signal(signal.SIGTERM)
    v.wait_message("STOPPING=1", after=n)
    assert v.proc.wait(10) == 0


def test_bad_config_refuses_to_start_with_file_key_and_reason(tmpfs, vetd_factory):
    v = vetd_factory([tmpfs], extra="[scan]\nworkers = \"many\"")
    r = subprocess.run([sys.executable, "-m", "vetd", "--config", str(v.config)], capture_output=True,
                       timeout=20)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert str(v.config) in err and "[scan] workers" in err and "integer" in err
    r = subprocess.run([sys.executable, "-m", "vetd", "--check-config", "--config", str(v.config)],
                       capture_output=True, timeout=20)
    assert r.returncode == 1


def test_check_config_accepts_the_shipped_default(tmp_path):
    from conftest import ROOT
    # as installed: /etc/vetd/ holds what conf/ holds
    shipped = (ROOT / "conf" / "vetd.toml").read_text().replace("/etc/vetd/", f"{ROOT}/conf/")
    (tmp_path / "vetd.toml").write_text(shipped)
    r = subprocess.run([sys.executable, "-m", "vetd", "--check-config", "--config",
                        str(tmp_path / "vetd.toml")], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()


def test_without_cap_sys_admin_vetd_exits_with_one_line_saying_what_is_missing(tmpfs, vetd_factory):
    v = vetd_factory([tmpfs])
    r = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
                        sys.executable, "-m", "vetd", "--config", str(v.config)],
                       capture_output=True, timeout=20)
    assert r.returncode == 1
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "CAP_SYS_ADMIN" in lines[0], lines


def test_sigterm_with_an_event_held_answers_it_and_exits_cleanly(tmpfs, vetd_factory, plugin_site):
    (tmpfs / "f").write_text("x\n")
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     extra='[scan]\ndeadline_ms = 60000\non_timeout = "deny"',
                     plugins="[plugins.sleepy]\nseconds = 120\n").start()
    child = subprocess.Popen([sys.executable, "-c", OPEN_ONE, str(tmpfs / "f")], stdout=subprocess.PIPE)
    wait_for(lambda: v.status()["backlog"]["in_flight"] == 1, what="the open to be held")
    v.signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=15)
    assert out.decode().strip() == "EPERM"      # answered by the policy, not by the exit
    assert v.proc.wait(15) == 0
    assert open_as_child(tmpfs / "f") == "OK"   # nothing is marked any more


@pytest.mark.parametrize("hot_path", ["c", "python"])  # vetd._hotpath.allow_marked, or Python's
def test_a_write_during_the_scan_keeps_the_file_out_of_the_kernel_cache(tmpfs, vetd_factory, plugin_site,
                                                                        hot_path):
    """The scan read clean content; someone wrote bad content before the verdict came back. The
    clean verdict must not become a kernel ignore mark, or the bad content would never be seen."""
    f = tmpfs / "f"
    f.write_text("clean\n")
    slow = os.path.basename(sys.executable)[:15]
    v = vetd_factory([tmpfs], pythonpath=plugin_site, extra="[scan]\nworkers = 2",
                     plugins=f'[plugins.lagging]\nslow_comm = "{slow}"\nseconds = 1.0\n',
                     env={"VETD_HOTPATH": hot_path}).start()
    reader = subprocess.Popen([sys.executable, "-c", OPEN_ONE, str(f)], stdout=subprocess.PIPE)
    wait_for(lambda: v.status()["backlog"]["in_flight"] == 1, what="the slow scan")
    subprocess.run(["sh", "-c", f"printf BAD > {f}"], check=True, timeout=10)  # scanned quickly
    assert reader.communicate(timeout=15)[0].decode().strip() == "OK"         # judged what it read
    assert open_as_child(f, exe="/usr/bin/python3") == "EPERM"
    assert v.status()["cache"]["kernel_marks_withdrawn"] >= 1
