"""Degraded mode on the real kernel: path classes, per-plugin deadlines, the circuit breaker,
stuck workers and scans after the fact. Every open must come back within its deadline plus a
margin, with the answer the policy names."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import open_as_child, wait_for

pytestmark = pytest.mark.kernel


def plugin(v, name):
    return next(p for p in v.status()["plugins"] if p["name"] == name)


def timed_open(path):
    t0 = time.monotonic()
    out = open_as_child(path)
    return out, time.monotonic() - t0


@pytest.mark.parametrize("readers", [1, 2])
def test_a_path_class_overrides_the_failure_policy(tmpfs, vetd_factory, plugin_site, readers):
    (tmpfs / "www").mkdir()
    (tmpfs / "www" / "index.html").write_text("<html>")
    (tmpfs / "notes.txt").write_text("notes")
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     extra=f'readers = {readers}\n[scan]\non_error = "allow"\n[[degraded.class]]\nname = "web"\n'
                           f'paths = ["{tmpfs}/www/**"]\non_failure = "deny"\n',
                     plugins="[plugins.raises]\n").start()
    assert open_as_child(tmpfs / "www" / "index.html") == "EPERM"
    assert open_as_child(tmpfs / "notes.txt") == "OK"
    assert v.status()["degraded"]["error"] == 2


@pytest.mark.parametrize("readers", [1, 2])
def test_a_plugin_deadline_shorter_than_the_event_deadline_is_kept(tmpfs, vetd_factory, plugin_site,
                                                                   readers):
    (tmpfs / "f").write_text("x")
    v = vetd_factory([tmpfs], pythonpath=plugin_site, extra=f"readers = {readers}\n[scan]\ndeadline_ms = 20000",
                     plugins='[plugins.sleepy]\nseconds = 30\ndeadline_ms = 200\non_failure = "deny"\n'
                     ).start()
    out, took = timed_open(tmpfs / "f")
    assert out == "EPERM"
    assert took < 5, f"{took:.1f}s: the plugin's 0.2s deadline was not kept"
    assert plugin(v, "sleepy")["timeouts"] == 1


def test_plugins_see_the_deadline_vetd_answers_by(tmpfs, vetd_factory, plugin_site, tmp_path):
    """SDK 1.1: ScanFile.deadline is the event's deadline, or the plugin's own deadline_ms when
    that comes first, so a plugin can stop when nobody waits for it any more."""
    import signal
    (tmpfs / "a").write_text("a")
    (tmpfs / "b").write_text("b")
    log = tmp_path / "deadlines.log"
    v = vetd_factory([tmpfs], pythonpath=plugin_site, extra="[scan]\ndeadline_ms = 3000",
                     plugins=f'[plugins.deadlineprobe]\nlog = "{log}"\n').start()
    assert open_as_child(tmpfs / "a") == "OK"
    left, capped = (float(x) for x in log.read_text().split())
    assert 2.0 < left <= 3.0 and 0 < capped <= left   # the event's 3 s, less what has passed
    n = len(v.messages)
    v.config.write_text(v.config.read_text().replace(f'log = "{log}"', f'log = "{log}"\ndeadline_ms = 700'))
    v.signal(signal.SIGHUP)
    v.wait_message("READY=1", after=n)
    assert open_as_child(tmpfs / "b") == "OK"
    left, capped = (float(x) for x in log.read_text().splitlines()[1].split())
    assert 0 < left <= 0.7 and 0 < capped <= left     # the plugin's own, shorter deadline


def test_repeated_failures_open_the_breaker_and_a_probe_closes_it(tmpfs, vetd_factory, plugin_site,
                                                                 tmp_path):
    flag = tmp_path / "engine-down"
    flag.write_text("")
    for i in range(4):
        (tmpfs / f"f{i}").write_text(str(i))
    v = vetd_factory([tmpfs], pythonpath=plugin_site, extra='[scan]\non_error = "allow"',
                     plugins=f'[plugins.flaky]\nflag = "{flag}"\nfailure_threshold = 2\n'
                             f'retry_after_s = 1.0\n').start()
    assert open_as_child(tmpfs / "f0") == "OK"
    assert open_as_child(tmpfs / "f1") == "OK"
    st = plugin(v, "flaky")
    assert st["health"] == "unhealthy" and st["errors"] == 2
    assert open_as_child(tmpfs / "f2") == "OK"
    st = plugin(v, "flaky")
    assert st["skipped"] == 1 and st["scans"] == 2, "an unhealthy plugin was asked anyway"
    assert v.status()["degraded"]["unhealthy"] == 1
    assert "UNHEALTHY: flaky" in v.wait_message("UNHEALTHY")
    flag.unlink()                                   # the engine is back
    time.sleep(1.2)
    assert open_as_child(tmpfs / "f3") == "OK"      # the probe
    st = plugin(v, "flaky")
    assert st["health"] == "healthy" and st["scans"] == 3


def test_a_worker_stuck_in_a_hung_plugin_is_replaced(tmpfs, vetd_factory, plugin_site):
    (tmpfs / "hang-me").write_text("x")
    (tmpfs / "fine").write_text("y")
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     extra='[scan]\nworkers = 1\ndeadline_ms = 300\non_timeout = "allow"',
                     plugins='[plugins.sleepy]\nseconds = 60\nonly = "hang"\n').start()
    out, took = timed_open(tmpfs / "hang-me")
    assert out == "OK" and took < 5
    out, took = timed_open(tmpfs / "fine")
    assert out == "OK" and took < 5
    st = v.status()
    assert st["answers"]["by_reason"].get("scan") == 1, "the second open was not scanned"
    assert st["backlog"]["workers"] == 2
    # The hung scan ran on the read-loop thread that read it; the other read thread took over
    # the reading (vetd/relay.py), and with that one then the only reader, the second scan
    # went to the pool.
    assert st["backlog"]["inline_scans"] == 1
    assert st["backlog"]["read_takeovers"] >= 1   # woken by the waiting event, not a timeout
    out, took = timed_open(tmpfs / "fine")   # and reading still goes on
    assert out == "OK" and took < 5


def test_a_file_let_through_by_policy_is_scanned_after_the_fact(tmpfs, vetd_factory, plugin_site):
    bad = tmpfs / "bad"
    bad.write_text("BAD content")
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     extra='[scan]\ndeadline_ms = 200\non_timeout = "allow"\n[degraded]\nrescan = true',
                     plugins="[plugins.slowdeny]\nseconds = 1.0\n").start()
    out, took = timed_open(bad)
    assert out == "OK" and took < 5                 # degraded: allowed on time
    wait_for(lambda: v.status()["late_detections"] == 1, timeout=20, what="the late detection")
    assert open_as_child(bad) == "EPERM"            # and denied from then on
    v.wait_log("late detection")


def test_a_flood_larger_than_the_backlog_is_answered_on_time(tmpfs, vetd_factory, plugin_site):
    n = 40
    for i in range(n):
        (tmpfs / f"f{i}").write_text(str(i))
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     extra='[scan]\nworkers = 1\nbacklog = 2\ndeadline_ms = 500\non_backlog = "deny"\n'
                           'on_timeout = "allow"',
                     plugins="[plugins.sleepy]\nseconds = 0.2\n").start()
    code = ("import errno, os, sys, time\nout = []\nfor p in sys.argv[1:]:\n    t = time.monotonic()\n"
            "    try:\n        os.close(os.open(p, os.O_RDONLY)); r = 'OK'\n"
            "    except OSError as e:\n        r = errno.errorcode[e.errno]\n"
            "    out.append(f'{r} {time.monotonic() - t:.3f}')\nprint('\\n'.join(out))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code] + [str(tmpfs / f"f{i}") for i in range(k, n, 8)],
                              stdout=subprocess.PIPE, text=True) for k in range(8)]
    results = [line.split() for p in procs for line in p.communicate(timeout=60)[0].splitlines()]
    assert len(results) == n
    assert max(float(t) for _, t in results) < 0.5 + 2.0, "an open waited past its deadline + margin"
    denied = sum(1 for r, _ in results if r == "EPERM")
    assert denied >= 1 and denied == v.status()["degraded"]["backlog"]
    assert v.proc.poll() is None


@pytest.mark.parametrize("readers", [1, 2])
@pytest.mark.parametrize("policy,expected", [("deny", "EPERM"), ("allow", "OK")])
def test_a_plugin_answering_garbage_is_a_failure_answered_by_policy(tmpfs, vetd_factory, plugin_site,
                                                                   policy, expected, readers):
    (tmpfs / "f").write_text("x")
    v = vetd_factory([tmpfs], pythonpath=plugin_site, extra=f"readers = {readers}\n",
                     plugins=f'[plugins.garbage]\nanswer = "allow"\non_failure = "{policy}"\n').start()
    assert open_as_child(tmpfs / "f") == expected
    assert plugin(v, "garbage")["errors"] == 1
    v.wait_log("not a Verdict")


def _isolated_pids(v) -> set[int]:
    import re
    return {int(m) for m in re.findall(r"marker-in-pid-(\d+)", v.log_text())}


def test_an_isolated_plugin_scans_in_processes_of_its_own_and_survives_their_death(
        tmpfs, vetd_factory, plugin_site):
    import signal as sig
    for i in range(6):
        (tmpfs / f"bad{i}").write_text("BAD")
    v = vetd_factory([tmpfs], pythonpath=plugin_site, extra='[scan]\non_error = "allow"',
                     plugins='[plugins.whoami]\nisolation = "process"\nprocesses = 2\n').start()
    assert open_as_child(tmpfs / "bad0") == "EPERM"
    assert open_as_child(tmpfs / "bad1") == "EPERM"
    pids = _isolated_pids(v)
    assert pids and v.proc.pid not in pids, "the scan ran inside vetd"
    for pid in pids:
        os.kill(pid, sig.SIGKILL)
    time.sleep(0.2)
    # the first scan after a death may fail (answered by policy); then a new process takes over
    outs = [open_as_child(tmpfs / f"bad{i}") for i in range(2, 6)]
    assert outs[-1] == "EPERM", outs
    assert _isolated_pids(v) - pids, "no new plugin process was started"
    assert v.proc.poll() is None


def test_isolated_plugin_processes_do_not_outlive_vetd(tmpfs, vetd_factory, plugin_site):
    import re
    (tmpfs / "bad").write_text("BAD")
    v = vetd_factory([tmpfs], pythonpath=plugin_site,
                     plugins='[plugins.whoami]\nisolation = "process"\nprocesses = 1\n').start()
    assert open_as_child(tmpfs / "bad") == "EPERM"
    (pid,) = {int(m) for m in re.findall(r"marker-in-pid-(\d+)", v.log_text())}
    v.proc.kill()                                    # no clean shutdown at all
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
             open(f"/proc/{pid}/stat").read().split()[2] == "Z", what="the plugin process to exit")
