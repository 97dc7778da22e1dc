"""Access rules enforced on the real kernel: errno read off child openers with their own exe."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import exec_as_child, open_as_child, wait_for

pytestmark = pytest.mark.kernel


@pytest.fixture
def programs(tmp_path: Path):
    """Two copies of the Python interpreter: one that is "httpd", one that is not."""
    real = os.path.realpath(sys.executable)
    (tmp_path / "usr" / "sbin").mkdir(parents=True)
    (tmp_path / "bin").mkdir()
    httpd = tmp_path / "usr" / "sbin" / "httpd"
    other = tmp_path / "bin" / "other"
    shutil.copy2(real, httpd)
    shutil.copy2(real, other)
    return httpd, other


def with_rules(v, text: str, name: str = "10-test.rules") -> Path:
    d = v.dir / "rules.d"
    d.mkdir(exist_ok=True)
    (d / name).write_text(text)
    return d


def start_with_rules(vetd_factory, tmpfs, text: str, extra: str = "", before: str = "", **kw):
    """vetd with these rules; `before` goes in [daemon] and may open tables of its own."""
    v = vetd_factory([tmpfs], **kw)
    d = with_rules(v, text)
    v.write_config([tmpfs], f'{before}\n[rules]\ndir = "{d}"\n{extra}',
                   f'[plugins.hashlist]\ndeny = ["{v.deny_list}"]\n')
    return v.start()


def test_only_httpd_opens_the_web_root(tmpfs, vetd_factory, programs):
    httpd, other = programs
    (tmpfs / "www").mkdir()
    (tmpfs / "www" / "index.html").write_text("<html>")
    (tmpfs / "elsewhere.txt").write_text("x")
    v = start_with_rules(vetd_factory, tmpfs, f"only {httpd} open {tmpfs}/www/**\n")
    assert open_as_child(tmpfs / "www" / "index.html", exe=str(httpd)) == "OK"
    assert open_as_child(tmpfs / "www" / "index.html", exe=str(other)) == "EPERM"
    assert open_as_child(tmpfs / "www" / "index.html") == "EPERM"
    assert open_as_child(tmpfs / "elsewhere.txt", exe=str(other)) == "OK"
    # httpd's allowed open must not have put the file in the kernel cache: others still refused
    assert open_as_child(tmpfs / "www" / "index.html", exe=str(httpd)) == "OK"
    assert open_as_child(tmpfs / "www" / "index.html", exe=str(other)) == "EPERM"
    st = v.status()
    assert st["rules"]["count"] == 1
    assert st["rules"]["hits"][0]["hits"] == 3
    assert st["rules"]["uncacheable_in_kernel"] >= 1
    v.wait_log("10-test.rules:1")
    assert "rule 1 (" in v.log_text()


@pytest.fixture
def tool(tmpfs) -> Path:
    """A copy of /bin/true in a bin/ directory of the test's tmpfs."""
    (tmpfs / "bin").mkdir()
    path = tmpfs / "bin" / "tool"
    shutil.copy2("/bin/true", path)
    return path


def test_exec_from_a_directory_is_denied_while_reading_it_is_allowed(tmpfs, vetd_factory, tool):
    start_with_rules(vetd_factory, tmpfs, f"deny exec {tmpfs}/bin/**\n")
    assert exec_as_child(tool) == "EPERM"
    assert open_as_child(tool) == "OK"


def test_kill_kills_the_opener(tmpfs, vetd_factory):
    (tmpfs / "trap").mkdir()
    (tmpfs / "trap" / "bait").write_text("x")
    v = start_with_rules(vetd_factory, tmpfs, f"kill open {tmpfs}/trap/**\n")
    r = subprocess.run([sys.executable, "-c", f"open({str(tmpfs / 'trap' / 'bait')!r}); print('survived')"],
                       capture_output=True, timeout=15)
    assert r.returncode == -signal.SIGKILL and b"survived" not in r.stdout
    assert v.status()["rules"]["kills"] == 1


def test_audit_allows_and_logs(tmpfs, vetd_factory):
    (tmpfs / "audited").mkdir()
    (tmpfs / "audited" / "f").write_text("x")
    v = start_with_rules(vetd_factory, tmpfs, f"audit open {tmpfs}/audited/**\n")
    assert open_as_child(tmpfs / "audited" / "f") == "OK"
    assert open_as_child(tmpfs / "audited" / "f") == "OK"      # audited every time: never cached
    wait_for(lambda: v.log_text().count("WARNING vetd: audit open") == 2, what="two audit lines")
    log = v.log_text()
    assert sum(1 for line in log.splitlines() if line.startswith("WARNING vetd: audit open")) == 2
    assert "10-test.rules:1" in log


def test_a_rule_errno_reaches_the_opener(tmpfs, vetd_factory):
    (tmpfs / "f").write_text("x")
    v = start_with_rules(vetd_factory, tmpfs, f"deny(EIO) open {tmpfs}/f\n")
    expected = "EIO" if v.status()["features"]["deny_errno"] else "EPERM"
    assert open_as_child(tmpfs / "f") == expected


def test_files_no_rule_covers_are_still_cached_in_the_kernel(tmpfs, vetd_factory, programs):
    httpd, _ = programs
    (tmpfs / "www").mkdir()
    (tmpfs / "free.txt").write_text("x")
    v = start_with_rules(vetd_factory, tmpfs, f"only {httpd} open {tmpfs}/www/**\n")
    assert open_as_child(tmpfs / "free.txt") == "OK"
    assert v.status()["cache"]["kernel_marks"] == 1


def test_bad_rules_refuse_to_start_and_a_bad_reload_keeps_the_old_set(tmpfs, vetd_factory):
    (tmpfs / "secret").write_text("x")
    v = vetd_factory([tmpfs])
    d = with_rules(v, "deny opne /x\n")
    v.write_config([tmpfs], f'[rules]\ndir = "{d}"\n', f'[plugins.hashlist]\ndeny = ["{v.deny_list}"]\n')
    r = subprocess.run([sys.executable, "-m", "vetd", "--config", str(v.config)], capture_output=True,
                       timeout=20)
    assert r.returncode == 1
    assert "10-test.rules:1:6" in r.stderr.decode(), r.stderr.decode()
    with_rules(v, f"deny open {tmpfs}/secret\n")
    v.start()
    assert open_as_child(tmpfs / "secret") == "EPERM"
    n = len(v.messages)
    with_rules(v, "deny open relative/path\n")
    v.signal(signal.SIGHUP)
    v.wait_message("READY=1", after=n)
    v.wait_log("reload failed, keeping the running configuration")
    v.wait_log("10-test.rules:1")
    assert open_as_child(tmpfs / "secret") == "EPERM"


def test_check_config_lints_rules(tmpfs, vetd_factory, tmp_path):
    v = vetd_factory([tmpfs])
    d = with_rules(v, f"deny open {tmpfs}/a/**\ndeny open {tmpfs}/a/b\ndeny open /nowhere-watched/**\n")
    v.write_config([tmpfs], f'[rules]\ndir = "{d}"\n', f'[plugins.hashlist]\ndeny = ["{v.deny_list}"]\n')
    r = subprocess.run([sys.executable, "-m", "vetd.ctl", "check", "--config", str(v.config)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "NOT OK" in r.stdout
    assert "10-test.rules:2: warning: never matches: rule 1" in r.stderr, r.stderr
    assert "10-test.rules:3: error" in r.stderr and "outside every watched tree" in r.stderr


def test_a_process_that_execs_is_judged_as_what_it_became(tmpfs, vetd_factory, programs):
    """vetd remembers openers' exe between events; the exec must make it forget."""
    httpd, other = programs
    (tmpfs / "www").mkdir()
    target = tmpfs / "www" / "index.html"
    target.write_text("<html>")
    v = start_with_rules(vetd_factory, tmpfs, f"only {httpd} open {tmpfs}/www/**\n")
    script = v.dir / "exec_then_open.py"
    script.write_text("import errno, os, sys\n"
                      "try:\n    os.close(os.open(sys.argv[1], os.O_RDONLY)); print('OK', flush=True)\n"
                      "except OSError as e:\n    print(errno.errorcode[e.errno], flush=True)\n"
                      "if len(sys.argv) > 2:  # same pid, another program: open again\n"
                      "    os.execv(sys.argv[2], [sys.argv[2], __file__, sys.argv[1]])\n")
    r = subprocess.run([str(httpd), str(script), str(target), str(other)], capture_output=True,
                       text=True, timeout=20)
    assert r.stdout.split() == ["OK", "EPERM"], (r.stdout, r.stderr)


def test_a_process_that_drops_privileges_is_judged_by_its_new_uid(tmpfs, vetd_factory):
    (tmpfs / "f").write_text("x")
    os.chmod(tmpfs / "f", 0o644)
    v = start_with_rules(vetd_factory, tmpfs, f"deny open {tmpfs}/f : uid=65534\n")
    code = ("import errno, os, sys\n"
            "def attempt():\n"
            "    try:\n        os.close(os.open(sys.argv[1], os.O_RDONLY)); return 'OK'\n"
            "    except OSError as e:\n        return errno.errorcode[e.errno]\n"
            "print(attempt(), attempt(), flush=True)\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "print(attempt(), flush=True)\n")
    py = shutil.which("python3", path="/usr/bin")
    r = subprocess.run([py, "-c", code, str(tmpfs / "f")], capture_output=True, text=True, timeout=20)
    assert r.stdout.split() == ["OK", "OK", "EPERM"], (r.stdout, r.stderr)
    assert v.status()["process_cache"]["forgotten"] >= 1


def test_reading_denied_but_running_allowed(tmpfs, vetd_factory, tool):
    start_with_rules(vetd_factory, tmpfs, f"allow exec {tmpfs}/bin/**\ndeny open {tmpfs}/bin/**\n")
    assert open_as_child(tool) == "EPERM"
    assert exec_as_child(tool) == "OK"
    assert open_as_child(tool) == "EPERM", "the exec's pairing leaked into a later open"


# --- remembered outcomes (the read loop's memo) and what must void them ------------------------
# Each runs with the compiled read loop (vetd._hotpath answers repeats from its table) and with
# the pure-Python one (the memo answers them): both must drop what a change voids.
@pytest.fixture(params=["c", "python"])
def hot_path(request) -> str:
    return request.param


def _start_uncached(vetd_factory, tmpfs, rules: str, hot_path: str, exclude: str = ""):
    """Rules with kernel_cache off, so every open reaches vetd and the memo answers repeats."""
    return start_with_rules(vetd_factory, tmpfs, rules, before=f"kernel_cache = false\n{exclude}",
                            env={"VETD_HOTPATH": hot_path})


def _memo(v) -> dict:
    return v.status()["rules"]["memo"]


def _repeats_answered_by(v, hot_path: str) -> None:
    """The warm opens so far were answered where this run says: by C, or not at all by it."""
    hp = v.status()["hot_path"]
    if hot_path == "c":
        assert hp["compiled"] and hp["answered"] >= 1, hp
    else:
        assert not hp["compiled"] and hp["answered"] == 0, hp


def test_a_directory_move_voids_remembered_outcomes_before_the_next_open(tmpfs, vetd_factory, hot_path):
    (tmpfs / "pub").mkdir()
    (tmpfs / "pub" / "f").write_text("x")
    v = _start_uncached(vetd_factory, tmpfs, f"deny open {tmpfs}/secret/**\n", hot_path)
    for _ in range(3):
        assert open_as_child(tmpfs / "pub" / "f") == "OK"
    assert _memo(v)["enabled"] and _memo(v)["entries"] >= 1
    _repeats_answered_by(v, hot_path)
    assert v.status()["cache"]["hits"] >= 1
    # the file itself does not change (same inode, times, size): only its path does
    os.rename(tmpfs / "pub", tmpfs / "secret")
    assert open_as_child(tmpfs / "secret" / "f") == "EPERM"
    assert _memo(v)["clears"] >= 1


def test_a_second_name_of_a_file_is_judged_by_its_own_path(tmpfs, vetd_factory, hot_path):
    (tmpfs / "pub").mkdir()
    (tmpfs / "secret").mkdir()
    (tmpfs / "pub" / "f").write_text("x")
    os.link(tmpfs / "pub" / "f", tmpfs / "secret" / "f")
    v = _start_uncached(vetd_factory, tmpfs, f"deny open {tmpfs}/secret/**\n", hot_path)
    for _ in range(3):
        assert open_as_child(tmpfs / "pub" / "f") == "OK"
    assert open_as_child(tmpfs / "secret" / "f") == "EPERM"
    assert open_as_child(tmpfs / "pub" / "f") == "OK"
    assert _memo(v)["entries"] == 0  # a file with two names is never remembered


def test_the_same_file_through_a_bind_mount_is_judged_by_that_path(tmpfs, vetd_factory, hot_path):
    (tmpfs / "pub").mkdir()
    (tmpfs / "secret").mkdir()
    (tmpfs / "pub" / "f").write_text("x")
    subprocess.run(["mount", "--bind", str(tmpfs / "pub"), str(tmpfs / "secret")], check=True)
    try:
        v = _start_uncached(vetd_factory, tmpfs, f"deny open {tmpfs}/secret/**\n", hot_path)
        for _ in range(3):
            assert open_as_child(tmpfs / "pub" / "f") == "OK"
        assert _memo(v)["entries"] >= 1
        _repeats_answered_by(v, hot_path)
        assert open_as_child(tmpfs / "secret" / "f") == "EPERM"
        assert open_as_child(tmpfs / "pub" / "f") == "OK"
        v.stop()
    finally:
        subprocess.run(["umount", str(tmpfs / "secret")], check=False)


def test_a_moved_excluded_directory_is_scanned_again(tmpfs, vetd_factory, hot_path):
    from conftest import EICAR
    (tmpfs / "skip").mkdir()
    (tmpfs / "skip" / "eicar.com").write_bytes(EICAR)
    v = _start_uncached(vetd_factory, tmpfs, f"deny open {tmpfs}/nothing-here/**\n", hot_path,
                        exclude=f'[exclude]\npaths = ["{tmpfs}/skip/**"]')
    for _ in range(3):
        assert open_as_child(tmpfs / "skip" / "eicar.com") == "OK"   # excluded: not scanned
    assert _memo(v)["entries"] >= 1
    _repeats_answered_by(v, hot_path)
    os.rename(tmpfs / "skip", tmpfs / "scanned")
    assert open_as_child(tmpfs / "scanned" / "eicar.com") == "EPERM"


def test_a_kernel_cached_file_moved_under_a_path_rule_loses_its_mark(tmpfs, vetd_factory):
    """With kernel caching on, a clean file's later opens never reach vetd; a move under a
    path rule must drop the kernel's mark (asynchronously: the test waits for the flush)."""
    from conftest import wait_for
    (tmpfs / "pub").mkdir()
    (tmpfs / "pub" / "f").write_text("x")
    v = start_with_rules(vetd_factory, tmpfs, f"deny open {tmpfs}/secret/**\n")
    assert open_as_child(tmpfs / "pub" / "f") == "OK"
    seen = v.status()["events"]["permission"]
    assert open_as_child(tmpfs / "pub" / "f") == "OK"
    assert v.status()["events"]["permission"] == seen  # answered by the kernel's mark
    os.rename(tmpfs / "pub", tmpfs / "secret")
    wait_for(lambda: v.status()["cache"]["ignore_flushes"] >= 1, what="kernel marks flushed")
    assert open_as_child(tmpfs / "secret" / "f") == "EPERM"


def test_a_signature_reload_voids_remembered_clean_answers(tmpfs, vetd_factory, hot_path):
    """A file answered from the table as clean is scanned again once the signatures change."""
    import hashlib
    f = tmpfs / "f"
    f.write_text("soon listed\n")
    v = _start_uncached(vetd_factory, tmpfs, f"deny open {tmpfs}/secret/**\n", hot_path)
    for _ in range(3):
        assert open_as_child(f) == "OK"
    _repeats_answered_by(v, hot_path)
    v.deny_list.write_text(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  now-listed\n")
    n = len(v.messages)
    v.signal(signal.SIGHUP)
    v.wait_message("READY=1", after=n)
    assert open_as_child(f) == "EPERM"


def test_rule_hits_count_answers_given_in_c(tmpfs, vetd_factory, programs):
    """One httpd process opening a file five times: the repeats are answered by the compiled
    loop (keyed on the opener's remembered exe), and the rule's hits count all five."""
    httpd, other = programs
    (tmpfs / "www").mkdir()
    page = tmpfs / "www" / "index.html"
    page.write_text("hi")
    v = _start_uncached(vetd_factory, tmpfs, f"allow open {tmpfs}/www/** : exe={httpd}\n"
                        f"deny open {tmpfs}/www/**\n", "c")
    loop = "import os, sys\nfor _ in range(5):\n    os.close(os.open(sys.argv[1], os.O_RDONLY))\n"
    subprocess.run([str(httpd), "-c", loop, str(page)], check=True, timeout=30)
    hp = v.status()["hot_path"]
    assert hp["by_reason"].get("rule", 0) >= 1, hp
    assert [h["hits"] for h in v.status()["rules"]["hits"]] == [5], v.status()["rules"]["hits"]
    # the answer is httpd's only: another program's open of the same file is not in the table
    assert open_as_child(page, exe=str(other)) == "EPERM"
    assert [h["hits"] for h in v.status()["rules"]["hits"]] == [5, 1]
