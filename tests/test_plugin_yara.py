"""The YARA plugin: built directly and fed real fds (unit), then inside vetd on the kernel."""

from __future__ import annotations

import builtins
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import yara

from conftest import EICAR, ROOT, open_as_child
from vetd import plugins as plugin_loader
from vetd.sdk import Opener, PluginConfigError, ScanFile, Verdict
from vetd_plugins import yara_rules
from vetd_plugins.yara_rules import YaraRules

BUNDLED = ROOT / "conf" / "yara"
OPENER = Opener(None)
MiB = 1 << 20


def scan_path(plugin: YaraRules, path: Path) -> Verdict:
    """Scan a file the way vetd does: through an O_RDONLY fd and its fstat, never by path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return plugin.scan(ScanFile(fd, os.fstat(fd), str(path)), OPENER)
    finally:
        os.close(fd)


def rules_dir(tmp_path: Path, **files: str) -> Path:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_yar", ".yar")).write_text(textwrap.dedent(text))
    return d


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def bundled() -> YaraRules:
    return YaraRules({"rules": [str(BUNDLED)]})


# --- verdicts ------------------------------------------------------------------------------------
def test_eicar_is_denied_and_a_clean_file_is_allowed(bundled, tmp_path):
    v = scan_path(bundled, write(tmp_path / "eicar.com", EICAR))
    assert v.denied and v.reason == "yara:EICAR_Test_File" and v.cacheable
    v = scan_path(bundled, write(tmp_path / "ok.txt", b"hello, world\n"))
    assert not v.denied and v.cacheable


@pytest.mark.parametrize("tail,denied", [
    (b"", True), (b"\n", True), (b"\r\n", True), (b"\x1a", True), (b" \t" * 30, True),
    (b" " * 61, False),        # 129 bytes: over the standard's 128
    (b"x", False), (b"  \nrest", False),
])
def test_eicar_rule_follows_the_standard_on_trailing_bytes(bundled, tmp_path, tail, denied):
    assert scan_path(bundled, write(tmp_path / "f", EICAR + tail)).denied is denied


def test_eicar_string_not_at_offset_zero_is_not_the_test_file(bundled, tmp_path):
    assert not scan_path(bundled, write(tmp_path / "f", b" " + EICAR)).denied
    assert not scan_path(bundled, write(tmp_path / "f", EICAR[:-1])).denied
    # the rule file itself holds the string, and must not be taken for the test file
    assert not scan_path(bundled, BUNDLED / "eicar.yar").denied


def test_rule_count_and_files_are_exposed(bundled):
    assert bundled.rule_count == 1
    assert bundled.rule_files == (str(BUNDLED / "eicar.yar"),)
    assert bundled.namespaces == ("default",)
    assert (bundled.timeout_s, bundled.max_size) == (10, 64 * MiB)


def test_first_match_names_the_rule_and_a_namespace_other_than_default(tmp_path):
    d = rules_dir(tmp_path, a_yar='rule first { strings: $m = "MARK" condition: $m }\n'
                                   'rule second { strings: $m = "MARK" condition: $m }\n')
    vendor = tmp_path / "vendor.yara"
    vendor.write_text('rule first { strings: $m = "VENDOR" condition: $m }\n')
    p = YaraRules({"rules": [str(d), {"path": str(vendor), "namespace": "acme"}]})
    assert p.rule_count == 3 and p.namespaces == ("default", "acme")
    assert scan_path(p, write(tmp_path / "f", b"..MARK..")).reason == "yara:first"
    assert scan_path(p, write(tmp_path / "g", b"..VENDOR..")).reason == "yara:acme:first"


# --- configuration -------------------------------------------------------------------------------
def test_a_directory_gives_its_yar_and_yara_files_in_name_order(tmp_path):
    d = rules_dir(tmp_path, b_yar="rule b { condition: false }\n")
    (d / "a.yara").write_text("rule a { condition: false }\n")
    (d / "c.txt").write_text("not a rule file {{{\n")
    (d / ".hidden.yar").write_text("broken {{{\n")
    (d / "sub.yar").mkdir()
    p = YaraRules({"rules": [str(d), str(d / "b.yar")]})  # b.yar twice: compiled once
    assert p.rule_files == (str(d / "a.yara"), str(d / "b.yar"))
    assert p.rule_count == 2


def test_broken_rule_is_a_config_error_naming_file_and_line(tmp_path):
    d = rules_dir(tmp_path, good_yar="rule good { condition: true }\n", zbroken_yar="""\
        rule broken
        {
            strings:
                $a = "x"
            condition:
                $a and
        }
        """)
    with pytest.raises(PluginConfigError) as e:
        YaraRules({"rules": [str(d)]})
    assert f"{d / 'zbroken.yar'}:7:" in str(e.value) and "syntax error" in str(e.value)


def test_a_rule_name_used_twice_in_one_namespace_names_the_second_file(tmp_path):
    d = rules_dir(tmp_path, a_yar="rule same { condition: true }\n",
                  b_yar="\n\nrule same { condition: false }\n")
    with pytest.raises(PluginConfigError, match=rf"{d / 'b.yar'}:3: duplicated identifier"):
        YaraRules({"rules": [str(d)]})
    p = YaraRules({"rules": [str(d / "a.yar"), {"path": str(d / "b.yar"), "namespace": "other"}]})
    assert p.rule_count == 2


def test_the_plugin_loads_through_the_entry_point_with_host_keys_stripped():
    p = plugin_loader.load("yara", {"rules": [str(BUNDLED)], "deadline_ms": 500,
                                    "on_failure": "deny"})
    assert isinstance(p, YaraRules) and p.name == "yara" and p.rule_count == 1
    with pytest.raises(plugin_loader.PluginError, match=r"\[plugins.yara\] unknown key"):
        plugin_loader.load("yara", {"rules": [str(BUNDLED)], "timeout": 3})


@pytest.mark.parametrize("table,needle", [
    ({}, "rules: expected a non-empty list"),
    ({"rules": []}, "rules: expected a non-empty list"),
    ({"rules": "conf/yara"}, "rules: expected a non-empty list"),
    ({"rules": ["/nonexistent/rules"]}, "cannot read /nonexistent/rules"),
    ({"rules": ["/dev/null"]}, "neither a file nor a directory"),
    ({"rules": [{"path": str(BUNDLED), "namespace": "bad name"}]}, "namespace 'bad name'"),
    ({"rules": [{"file": str(BUNDLED)}]}, "a table entry is"),
    ({"rules": [str(BUNDLED)], "extra": 1}, "unknown key(s): extra"),
    ({"rules": [str(BUNDLED)], "timeout_s": 0}, "timeout_s: expected a positive"),
    ({"rules": [str(BUNDLED)], "timeout_s": 1.5}, "timeout_s: expected a positive"),
    ({"rules": [str(BUNDLED)], "timeout_s": True}, "timeout_s: expected a positive"),
    ({"rules": [str(BUNDLED)], "max_size": "lots"}, "max_size: expected a positive size"),
    ({"rules": [str(BUNDLED)], "max_size": 0}, "max_size: expected a positive size"),
    ({"rules": [str(BUNDLED)], "externals": ["x"]}, "externals: expected a table"),
    ({"rules": [str(BUNDLED)], "externals": {"a-b": 1}}, "not a YARA identifier"),
    ({"rules": [str(BUNDLED)], "externals": {"x": [1]}}, "externals.x: expected a string"),
])
def test_bad_tables_are_refused_with_the_key_and_reason(table, needle):
    with pytest.raises(PluginConfigError) as e:
        YaraRules(table)
    assert needle in str(e.value)


def test_a_directory_without_rule_files_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PluginConfigError, match="no \\*.yar or \\*.yara files"):
        YaraRules({"rules": [str(empty)]})


def test_sizes_take_the_hosts_syntax():
    assert YaraRules({"rules": [str(BUNDLED)], "max_size": "2MiB"}).max_size == 2 * MiB
    assert YaraRules({"rules": [str(BUNDLED)], "max_size": 4096}).max_size == 4096


def _anon_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Anonymous:"))


def test_the_rules_held_are_compact_not_the_compilers_arena(bundled, tmp_path):
    """Every reader process holds the rules: compiled, the bundled one rule kept 8.2 MiB of
    anonymous memory (the compiler's arena, slack included); saved and loaded again, 0.1 MiB."""
    before = _anon_kib()
    held = [YaraRules({"rules": [str(BUNDLED)]}) for _ in range(4)]
    grown = _anon_kib() - before
    assert grown < 4 * 1024, f"{grown} KiB for four builds of the bundled rules"
    eicar = write(tmp_path / "e.com", EICAR)
    assert all(scan_path(p, eicar).denied for p in held)       # the loaded rules still match


def test_externals_are_fixed_at_compile_time(tmp_path):
    d = rules_dir(tmp_path, e_yar='rule tagged { condition: site == "prod" and level > 2 }\n')
    on = YaraRules({"rules": [str(d)], "externals": {"site": "prod", "level": 3}})
    off = YaraRules({"rules": [str(d)], "externals": {"site": "prod", "level": 1}})
    f = write(tmp_path / "f", b"anything")
    assert scan_path(on, f).reason == "yara:tagged"
    assert not scan_path(off, f).denied
    with pytest.raises(PluginConfigError, match=r"e.yar:1: undefined identifier"):
        YaraRules({"rules": [str(d)]})


def test_compiler_warnings_and_writable_rule_files_are_logged_with_file_and_line(tmp_path, caplog):
    d = rules_dir(tmp_path, w_yar='\nrule w { strings: $a = { 00 ?? } condition: $a }\n')
    os.chmod(d / "w.yar", 0o666)
    with caplog.at_level("WARNING", logger="vetd.plugins.yara"):
        YaraRules({"rules": [str(d)]})
    assert f"{d / 'w.yar'}:2: string \"$a\" may slow down scanning" in caplog.text
    assert f"{d / 'w.yar'} is writable by group or others" in caplog.text


# --- reading the file ----------------------------------------------------------------------------
def test_empty_file_is_scanned_as_empty_data(tmp_path):
    d = rules_dir(tmp_path, z_yar="rule empty { condition: filesize == 0 }\n")
    assert scan_path(YaraRules({"rules": [str(d)]}), write(tmp_path / "e", b"")).reason == "yara:empty"


def test_scan_goes_through_the_fd_and_never_opens_the_path(bundled, tmp_path, monkeypatch):
    f = write(tmp_path / "eicar.com", EICAR + b" " * 10)
    big = write(tmp_path / "big", b"\0" * (3 * MiB))
    fds = [os.open(p, os.O_RDONLY) for p in (f, big)]

    def refuse(*a, **kw):
        raise AssertionError(f"scan opened a path: {a!r}")

    try:
        files = [ScanFile(fd, os.fstat(fd), "/nonexistent/by-path") for fd in fds]
        monkeypatch.setattr(os, "open", refuse)
        monkeypatch.setattr(builtins, "open", refuse)
        assert bundled.scan(files[0], OPENER).denied
        assert not bundled.scan(files[1], OPENER).denied
    finally:
        monkeypatch.undo()
        for fd in fds:
            os.close(fd)


def test_sparse_file_is_read_by_extent_and_matched_whole(tmp_path, monkeypatch):
    d = rules_dir(tmp_path, s_yar="""\
        rule tail_marker {
            strings: $m = "TAIL-MARKER"
            condition: $m at 48 * 1024 * 1024 - 11 and uint32(1024 * 1024) == 0
                       and filesize == 48 * 1024 * 1024
        }
        """)
    f = tmp_path / "sparse"
    with open(f, "wb") as fh:
        fh.truncate(48 * MiB)
        fh.seek(48 * MiB - 11)
        fh.write(b"TAIL-MARKER")
    read = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: read.append(r := real_preadv(fd, bufs, off)) or r)
    p = YaraRules({"rules": [str(d)]})
    assert scan_path(p, f).reason == "yara:tail_marker"
    assert 0 < sum(read) <= 1 * MiB, "the holes of a sparse file were read"


def test_file_over_max_size_is_skipped_with_a_cacheable_allow(tmp_path):
    p = YaraRules({"rules": [str(BUNDLED)], "max_size": 64})
    v = scan_path(p, write(tmp_path / "eicar.com", EICAR))  # 68 bytes
    assert not v.denied and v.cacheable and v.reason == "yara: skipped, too big"


@pytest.mark.parametrize("size", [4096, 8 * MiB])  # the pread path and the extent path
@pytest.mark.parametrize("left", [0, 100])
def test_file_truncated_after_open_is_scanned_as_read_not_a_crash(tmp_path, size, left):
    d = rules_dir(tmp_path, t_yar='rule size { condition: filesize == %d }\n' % left)
    p = YaraRules({"rules": [str(d)]})
    f = write(tmp_path / "shrinks", b"A" * size)
    fd = os.open(f, os.O_RDONLY)
    try:
        st = os.fstat(fd)              # vetd's stat, taken at the event
        os.truncate(f, left)           # then the file shrinks before the scan reads it
        v = p.scan(ScanFile(fd, st, str(f)), OPENER)
    finally:
        os.close(fd)
    assert v.reason == "yara:size", "the scan should see the file as it was read"


def test_a_file_mapping_of_a_truncated_file_kills_the_process_which_is_why_the_plugin_reads(tmp_path):
    """Pins the trap behind the pread decision: touching a mapping past a truncated end is
    SIGBUS, and a SIGBUS kills vetd. (A child process takes the signal, not this test run.)"""
    f = write(tmp_path / "mapped", b"A" * (4 * MiB))
    probe = textwrap.dedent(f"""
        import mmap, os
        fd = os.open({str(f)!r}, os.O_RDONLY)
        mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        os.truncate({str(f)!r}, 4096)
        print(len(bytes(mm)))
    """)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
    assert r.returncode == -signal.SIGBUS


def test_timeout_is_raised_for_the_degraded_policy(tmp_path):
    d = rules_dir(tmp_path, slow_yar="""\
        rule slow {
            condition: for all i in (0 .. filesize - 1) : (
                for all j in (0 .. filesize - 1) : (uint8(i) == uint8(j)))
        }
        """)
    p = YaraRules({"rules": [str(d)], "timeout_s": 1})
    with pytest.raises(yara.TimeoutError, match="timeout_s = 1"):
        scan_path(p, write(tmp_path / "zeros", bytes(200_000)))


def test_the_event_deadline_cuts_the_yara_timeout(tmp_path):
    """SDK 1.1: with the open due to be answered by policy in 1.2 s, a slow rule set is given up
    on after 2 s (libyara counts whole seconds), not timeout_s = 30; past the deadline, at once."""
    import time

    from vetd.sdk import ScanFile
    d = rules_dir(tmp_path, slow_yar="""\
        rule slow {
            condition: for all i in (0 .. filesize - 1) : (
                for all j in (0 .. filesize - 1) : (uint8(i) == uint8(j)))
        }
        """)
    p = YaraRules({"rules": [str(d)], "timeout_s": 30})
    f = write(tmp_path / "zeros", bytes(200_000))
    fd = os.open(f, os.O_RDONLY)
    try:
        sf = ScanFile(fd, os.fstat(fd), str(f), time.monotonic() + 1.2)
        t0 = time.monotonic()
        with pytest.raises(yara.TimeoutError, match="within 2 s"):
            p.scan(sf, None)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 10
        sf.deadline = time.monotonic() - 1
        with pytest.raises(yara.TimeoutError, match="answered by policy"):
            p.scan(sf, None)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def test_other_yara_errors_are_raised_too(bundled, tmp_path, monkeypatch):
    class Broken:
        def match(self, **kw):
            raise yara.Error("internal error: 42")

    monkeypatch.setattr(bundled, "rules", Broken())
    with pytest.raises(yara.Error, match="internal error"):
        scan_path(bundled, write(tmp_path / "f", b"x"))


def test_concurrent_scans_on_one_rules_object_all_get_their_own_answer(tmp_path):
    # A heavier rule set keeps each match inside libyara (GIL released) long enough to overlap.
    many = "".join(f'rule r{i} {{ strings: $a = "needle-{i:04d}" condition: $a }}\n' for i in range(300))
    d = rules_dir(tmp_path, many_yar=many)
    shutil.copy(BUNDLED / "eicar.yar", d / "eicar.yar")
    p = YaraRules({"rules": [str(d)]})
    files = {
        write(tmp_path / "eicar.com", EICAR): "yara:EICAR_Test_File",
        write(tmp_path / "n17", os.urandom(512 * 1024) + b"needle-0017"): "yara:r17",
        write(tmp_path / "n250", b"needle-0250" + bytes(2 * MiB)): "yara:r250",
        write(tmp_path / "clean", os.urandom(2 * MiB).replace(b"needle", b"noodle")): "",
    }
    wrong: list[str] = []

    def worker(k: int) -> None:
        for i in range(40):
            path, want = list(files.items())[(i + k) % len(files)]
            got = scan_path(p, path).reason
            if got != want:
                wrong.append(f"{path.name}: {got!r} != {want!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []


# --- in vetd, on the kernel ----------------------------------------------------------------------
def yara_table(*rules: Path, extra: str = "") -> str:
    listed = ", ".join(f'"{r}"' for r in rules)
    return f"[plugins.yara]\nrules = [{listed}]\n{extra}"


def scans(v, plugin: str = "yara") -> int:
    return next(p["scans"] for p in v.status()["plugins"] if p["name"] == plugin)


@pytest.mark.kernel
def test_vetd_with_the_bundled_rules_denies_eicar_with_eperm_and_allows_a_clean_file(tmpfs, vetd_factory):
    (tmpfs / "ok.txt").write_text("hello\n")
    (tmpfs / "eicar.com").write_bytes(EICAR + b"\r\n")
    v = vetd_factory([tmpfs], plugins=yara_table(BUNDLED)).start()
    assert open_as_child(tmpfs / "ok.txt") == "OK"
    assert open_as_child(tmpfs / "eicar.com") == "EPERM"
    assert v.status()["answers"]["deny"] == 1
    assert scans(v) == 2
    v.wait_log("yara:EICAR_Test_File")


@pytest.mark.kernel
def test_reload_with_a_broken_rule_keeps_the_running_rules(tmpfs, vetd_factory, tmp_path):
    rules = tmp_path / "yara.d"
    rules.mkdir()
    shutil.copy(BUNDLED / "eicar.yar", rules / "eicar.yar")
    (tmpfs / "one.com").write_bytes(EICAR)
    v = vetd_factory([tmpfs], plugins=yara_table(rules)).start()
    assert open_as_child(tmpfs / "one.com") == "EPERM"

    n = len(v.messages)
    (rules / "zz-broken.yar").write_text('rule broken {\n  condition:\n    filesize >\n}\n')
    v.signal(signal.SIGHUP)
    v.wait_message("READY=1", after=n)
    log = v.log_text()
    assert "reload failed, keeping the running configuration" in log
    assert f"{rules / 'zz-broken.yar'}:4:" in log
    (tmpfs / "two.com").write_bytes(EICAR)   # a new file: scanned, not answered from the cache
    before = scans(v)
    assert open_as_child(tmpfs / "two.com") == "EPERM"
    assert scans(v) == before + 1
    assert v.proc.poll() is None

    n = len(v.messages)                      # a good rule set is then taken: reload itself works
    (rules / "zz-broken.yar").write_text('rule marker { strings: $m = "VETD-MARKER" condition: $m }\n')
    v.signal(signal.SIGHUP)
    v.wait_message("READY=1", after=n)
    (tmpfs / "marked.txt").write_text("a VETD-MARKER inside\n")
    assert open_as_child(tmpfs / "marked.txt") == "EPERM"
    assert open_as_child(tmpfs / "two.com") == "EPERM"
    v.wait_log("yara:marker")
