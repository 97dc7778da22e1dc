"""`[scan] processes = N` on the real kernel: scans run, and clean files are answered, in scan
processes of their own; what they cannot answer the daemon answers by its usual path; a scan
process that dies or hangs is replaced, and none outlives vetd."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import EICAR, open_as_child, wait_for

pytestmark = pytest.mark.kernel

ONE = "[scan]\nprocesses = 1\n"


def procs(v) -> dict:
    return v.status()["backlog"]["scan_processes"]


def plugin(v, name):
    return next(p for p in v.status()["plugins"] if p["name"] == name)


def test_scans_run_in_a_scan_process_which_answers_clean_files_itself(tmpfs, vetd_factory, plugin_site):
    (tmpfs / "bad").write_text("BAD content\n")
    (tmpfs / "ok").write_text("fine\n")
    v = vetd_factory([tmpfs], pythonpath=plugin_site, extra=ONE, plugins="[plugins.whoami]\n").start()
    sp = procs(v)
    assert sp["processes"] == 1 and len(sp["pids"]) == 1 and sp["pids"][0] != v.proc.pid
    assert open_as_child(tmpfs / "bad") == "EPERM"
    v.wait_log(f"marker-in-pid-{sp['pids'][0]}")          # judged in the scan process
    assert open_as_child(tmpfs / "ok") == "OK"
    # the scan process answered before it reported; the report is applied just after
    wait_for(lambda: procs(v)["in_flight"] == 0, what="the clean file's report")
    assert v.status()["cache"]["kernel_marks"] == 1         # placed by the scan process
    jobs = procs(v)["jobs"]
    assert open_as_child(tmpfs / "ok") == "OK"              # the kernel answers it now
    assert open_as_child(tmpfs / "bad") == "EPERM"          # the daemon's cache answers it
    assert procs(v)["jobs"] == jobs
    assert plugin(v, "whoami")["scans"] == 2 and plugin(v, "whoami")["denies"] == 1


def test_the_shipped_plugins_deny_eicar_from_a_scan_process(tmpfs, vetd_factory):
    (tmpfs / "e.com").write_bytes(EICAR)
    (tmpfs / "fine.txt").write_text("fine\n")
    v = vetd_factory([tmpfs], extra=ONE).start()
    assert open_as_child(tmpfs / "e.com") == "EPERM"
    assert open_as_child(tmpfs / "fine.txt") == "OK"
    assert procs(v)["jobs"] == 2
    wait_for(lambda: procs(v)["in_flight"] == 0, what="the reports")
    assert v.status()["answers"]["by_reason"] == {"scan": 2}


@pytest.mark.parametrize("policy,expected", [("deny", "EPERM"), ("allow", "OK")])
def test_a_failing_plugin_in_a_scan_process_is_answered_by_policy(tmpfs, vetd_factory, plugin_site,
                                                                   policy, expected):
    (tmpfs / "f").write_text("x\n")
    v = vetd_factory([tmpfs], pythonpath=plugin_site, extra=ONE + f'on_error = "{policy}"\n',
                     plugins="[plugins.raises]\n").start()
    assert open_as_child(tmpfs / "f") == expected
    assert plugin(v, "raises")["errors"] == 1
    assert v.status()["degraded"]["error"] == 1
    v.wait_log("scanner exploded")


def test_a_killed_scan_process_is_replaced(tmpfs, vetd_factory):
    (tmpfs / "e.com").write_bytes(EICAR)
    (tmpfs / "a").write_text("a\n")
    v = vetd_factory([tmpfs], extra=ONE).start()
    first = procs(v)["pids"][0]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: procs(v)["restarts"] >= 1 and procs(v)["pids"] and procs(v)["pids"][0] != first,
             what="a new scan process")
    assert open_as_child(tmpfs / "a") == "OK"
    assert open_as_child(tmpfs / "e.com") == "EPERM"
    assert v.proc.poll() is None


def test_a_hung_scan_process_is_answered_by_the_deadline_then_killed_and_replaced(
        tmpfs, vetd_factory, plugin_site):
    (tmpfs / "slow").write_text("x\n")
    (tmpfs / "quick").write_text("y\n")
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     extra=ONE + 'deadline_ms = 500\non_timeout = "deny"\n',
                     plugins='[plugins.sleepy]\nonly = "slow"\nseconds = 60\n').start()
    first = procs(v)["pids"][0]
    t0 = time.monotonic()
    assert open_as_child(tmpfs / "slow") == "EPERM"         # the policy, at the deadline
    assert time.monotonic() - t0 < 0.5 + 5
    wait_for(lambda: procs(v)["restarts"] >= 1, timeout=20, what="the stuck scan process replaced")
    assert first not in procs(v)["pids"]
    assert not os.path.exists(f"/proc/{first}")
    assert open_as_child(tmpfs / "quick") == "OK"


def test_scan_processes_do_not_outlive_vetd(tmpfs, vetd_factory):
    (tmpfs / "a").write_text("a\n")
    v = vetd_factory([tmpfs], extra="[scan]\nprocesses = 2\n").start()
    pids = procs(v)["pids"]
    assert len(pids) == 2
    v.proc.kill()
    v.proc.wait(10)
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout=10,
             what="the scan processes to die with vetd")
    assert open_as_child(tmpfs / "a") == "OK"               # nothing holds the group any more


def test_a_reload_starts_new_scan_processes_with_the_new_configuration(tmpfs, vetd_factory):
    import hashlib
    newbad = tmpfs / "newbad"
    newbad.write_text("fine until the list grows\n")
    v = vetd_factory([tmpfs], extra=ONE).start()
    old = procs(v)["pids"]
    with open(v.deny_list, "a") as fh:
        fh.write(f"{hashlib.sha256(newbad.read_bytes()).hexdigest()}  newly-bad\n")
    n = len(v.messages)
    v.signal(signal.SIGHUP)
    v.wait_message("READY=1", after=n)
    wait_for(lambda: procs(v)["pids"] and procs(v)["pids"] != old, what="new scan processes")
    assert open_as_child(newbad) == "EPERM"
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in old), timeout=15,
             what="the old scan processes to go")
