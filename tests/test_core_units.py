"""The pure decision core, without the kernel: globs, config, exclusions, cache, verdicts, mounts."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, strategies as st

from vetd import config as cfg, fanotify as fan
from vetd.cache import VerdictCache
from vetd.exclusions import FILETYPE, OP, OUTSIDE_WATCH, PATH, PROCESS, Exclusions
from vetd.globs import GlobError, GlobSet, glob_match
from vetd.mounts import containing_mount, parse_mountinfo, plan_marks
from vetd.scanning import combine
from vetd.sdk import Verdict
from vetd_plugins.hashlist import parse_list


# --- globs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,path,expected", [
    ("/var/www/**", b"/var/www/html/index.html", True),
    ("/var/www/**", b"/var/www", False),
    ("/var/www/", b"/var/www/a", True),
    ("/var/*/x", b"/var/www/x", True),
    ("/var/*/x", b"/var/a/b/x", False),
    ("/var/**/x", b"/var/x", True),
    ("/var/**/x", b"/var/a/b/x", True),
    ("/tmp/*.so", b"/tmp/lib.so", True),
    ("/tmp/*.so", b"/tmp/d/lib.so", False),
    ("/tmp/?", b"/tmp/a", True),
    ("/tmp/[!a]", b"/tmp/a", False),
    ("/tmp/[!a]", b"/tmp/b", True),
    ("/tmp/[!a]", b"/tmp//", False),
    ("/srv/**", b"/srv/\xff\xfe\n", True),
])
def test_glob_semantics(pattern, path, expected):
    assert glob_match(pattern, path) is expected


@pytest.mark.parametrize("bad", ["relative/*", "/a/**b", "/a/[bc", "/a/[z-a]"])
def test_bad_globs_are_refused(bad):
    with pytest.raises(GlobError):
        GlobSet.compile([bad])


@given(st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=5))
def test_double_star_matches_any_depth(parts):
    path = ("/top/" + "/".join(parts)).encode()
    assert glob_match("/top/**", path)
    assert glob_match("/top/**/" + parts[-1], path)
    assert not glob_match("/other/**", path)


# --- config ---------------------------------------------------------------------------------------
def test_defaults_parse():
    c = cfg.parse("")
    assert c.daemon.watch == ("/",) and c.scan.on_timeout == "allow" and "proc" in c.exclude.fs_types
    assert c.daemon.busy_poll_us == 100 and c.scan.processes == 0


@pytest.mark.parametrize("text,needle", [
    ("[daemon]\nwatchh = []", "[daemon] unknown key(s): watchh"),
    ("[scan]\nworkers = 'x'", "[scan] workers: expected an integer"),
    ("[scan]\nworkers = true", "[scan] workers: expected an integer, got a boolean"),
    ("[scan]\non_timeout = 'maybe'", "[scan] on_timeout: must be one of allow, deny"),
    ("[daemon]\nwatch = ['rel']", "not an absolute path"),
    ("[daemon]\ndeny_errno = 'ENOPE'", "not an errno name"),
    ("[exclude]\npaths = ['/a/**b']", "[exclude] paths"),
    ("[exclude]\nuids = ['no-such-user-here']", "no such user"),
    ("[nosuch]\n", "unknown section"),
    ("[daemon\n", "not valid TOML"),
    ("[scan]\nmax_size = '12 parsecs'", "[scan] max_size"),
    ("[daemon]\nbusy_poll_us = 5000", "[daemon] busy_poll_us: must be at least 0 and at most 1000"),
    ("[daemon]\nbusy_poll_us = -1", "[daemon] busy_poll_us: must be at least 0"),
    ("[scan]\nprocesses = 65", "[scan] processes: must be at least 0 and at most 64"),
    ("[daemon]\nreaders = 0", "[daemon] readers: must be at least 1"),
    ("[daemon]\nreaders = 2\n[scan]\nprocesses = 1", "cannot be combined with [daemon] readers = 2"),
])
def test_bad_config_names_file_key_and_reason(text, needle):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.parse(text, "/etc/vetd/x.toml")
    assert "/etc/vetd/x.toml" in str(e.value) and needle in str(e.value)


def test_readers_default_to_one():
    assert cfg.parse("").daemon.readers == 1
    assert cfg.parse("[daemon]\nreaders = 3").daemon.readers == 3


def test_sizes_and_uids():
    c = cfg.parse("[scan]\nmax_size = '64MiB'\n[exclude]\nuids = ['root', 7]")
    assert c.scan.max_size == 64 << 20 and c.exclude.uids == frozenset({0, 7})


def test_unreadable_config_is_a_clear_error(tmp_path):
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(str(tmp_path / "missing.toml"))
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(cfg.ConfigError, match="not UTF-8"):
        cfg.load(str(tmp_path / "bin.toml"))


# --- exclusions -----------------------------------------------------------------------------------
class Facts:
    def __init__(self, exe=b"/usr/bin/cat", comm="cat", uid=1000, regular=True, path=b"/srv/a"):
        self.exe, self.comm, self.uid, self.is_regular, self.path = exe, comm, uid, regular, path


def excl(text: str, scope=()) -> Exclusions:
    return Exclusions(cfg.parse(text).exclude, scope)


def test_exclusion_layers_in_order():
    e = excl("[exclude]\nops=['exec']\nexe=['/usr/sbin/backup']\ncomm=['rsync']\nuids=[33]\n"
             "paths=['/srv/cache/**']\n")
    f = Facts()
    assert e.check("exec", f, f) is OP
    assert e.check("open", f, Facts(regular=False)) is FILETYPE
    assert e.check("open", Facts(exe=b"/usr/sbin/backup"), f) is PROCESS
    assert e.check("open", Facts(comm="rsync"), f) is PROCESS
    assert e.check("open", Facts(uid=33), f) is PROCESS
    assert e.check("open", f, Facts(path=b"/srv/cache/x")) is PATH
    assert e.check("open", f, f) is None
    assert PROCESS.subject_dependent and not PATH.subject_dependent


def test_only_paths_scope_and_unknown_paths():
    e = excl("[exclude]\nonly_paths=['/srv/**']", scope=(b"/srv", b"/home"))
    assert e.check("open", Facts(), Facts(path=b"/srv/x")) is None
    assert e.check("open", Facts(), Facts(path=b"/home/x")) is PATH
    assert e.check("open", Facts(), Facts(path=b"/etc/x")) is OUTSIDE_WATCH
    assert e.check("open", Facts(), Facts(path=None)) is None  # unknown: decide, never skip


def test_subject_is_not_read_when_no_process_exclusion():
    class Boom:
        @property
        def exe(self):
            raise AssertionError("exe read")
        comm = uid = exe
    assert excl("").check("open", Boom(), Facts()) is None


# --- cache ----------------------------------------------------------------------------------------
def _ver(mtime_ns: int, ctime_ns: int, size: int) -> int:
    from vetd.cache import file_version
    return file_version(os.stat_result((0o100644, 1, 1, 1, 0, 0, size, 0, 0, 0, 0, 0, 0,
                                        mtime_ns, ctime_ns, 0)))


def test_cache_hits_only_the_same_version_and_generation():
    c = VerdictCache(10)
    k12, v = (1 << 64) | 2, _ver(10, 20, 30)
    c.store(k12, v, Verdict.allow(), c.generation)
    assert c.lookup(k12, v) is not None
    assert c.lookup(k12, _ver(10, 21, 30)) is None
    c.bump_generation()
    assert c.lookup(k12, v) is None
    c.store(k12, v, Verdict.allow(), c.generation - 1)  # a scan from before a reload
    assert c.lookup(k12, v) is None
    c.store(3, _ver(1, 1, 1), Verdict.deny("x", cacheable=False), c.generation)
    assert c.lookup(3, _ver(1, 1, 1)) is None
    assert c.hits == 1 and c.misses == 4


def test_a_version_keeps_ctime_and_size_for_times_before_1970():
    """A negative time OR-ed in whole would set every bit above it: the version would then
    ignore ctime and size, and a changed file keep its old verdict."""
    old = _ver(-1_000_000_000, 5, 10)
    assert old != _ver(-1_000_000_000, 6, 10) and old != _ver(-1_000_000_000, 5, 11)
    c = VerdictCache(4)
    c.store(1, old, Verdict.allow(), c.generation)
    assert c.lookup(1, old) is not None and c.lookup(1, _ver(-1_000_000_000, 6, 10)) is None


def test_cache_is_bounded_and_invalidates():
    c = VerdictCache(2)
    v = _ver(0, 0, 0)
    for i in range(3):
        c.store(i, v, Verdict.allow(), c.generation)
    assert len(c) == 2 and c.lookup(0, v) is None
    c.invalidate(2)
    assert c.lookup(2, v) is None


def test_cache_ttl_expires(monkeypatch):
    import vetd.cache as vc
    now = [100.0]
    monkeypatch.setattr(vc.time, "monotonic", lambda: now[0])
    c = VerdictCache(4)
    v = _ver(0, 0, 0)
    c.store(1, v, Verdict.allow(ttl_s=5), c.generation)
    assert c.lookup(1, v) is not None
    now[0] += 6
    assert c.lookup(1, v) is None


def test_cache_entries_keep_verdict_kernel_flag_and_identity():
    c = VerdictCache(8)
    v = _ver(7, 8, 9)
    deny = Verdict.deny("sig: Eicar")
    c.store(1, v, deny, c.generation)
    c.store(2, v, Verdict.allow("clean"), c.generation)
    e = c.entry(1, v)
    assert e.verdict == deny and e.kernel and e.version == v
    c.not_for_kernel(2)
    e2 = c.entry(2, v)
    assert e2.verdict.reason == "clean" and not e2.kernel
    assert c.still(2, v, e2)
    c.store(2, v, Verdict.allow("other"), c.generation)
    assert not c.still(2, v, e2)          # replaced by another verdict
    assert c.clean_entry(1, v) is None and c.clean_entry(2, v).verdict.reason == "other"


def test_a_cached_verdict_costs_little_memory():
    """Every reader holds its share of the cache: at 100,000 entries an OrderedDict of tuples
    cost 318 bytes an entry, the packed form 171."""
    def anon_kib() -> int:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(ln.split()[1]) for ln in f if ln.startswith("Anonymous:"))
    n = 100_000
    c = VerdictCache(n)
    clean = Verdict.allow("clean")
    before = anon_kib()
    for i in range(n):
        c.store((0x2D00000 << 64) | (1_000_000 + i), _ver(1_733_100_000_123_456_789 + i,
                1_733_100_000_123_456_789 + i, 4096), clean, c.generation)
    per_entry = (anon_kib() - before) * 1024 / n
    assert len(c) == n and per_entry < 220, f"{per_entry:.0f} bytes per entry"


# --- verdicts -------------------------------------------------------------------------------------
def test_deny_wins_and_cacheability_is_the_weakest():
    v = combine([Verdict.allow(), Verdict.deny("sig", ttl_s=9), Verdict.allow(cacheable=False)])
    assert v.denied and v.reason == "sig" and not v.cacheable and v.ttl_s == 9
    assert not combine([]).denied


# --- mounts ---------------------------------------------------------------------------------------
MOUNTINFO = b"""\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid - proc proc rw
24 22 0:30 / /srv/www rw - tmpfs tmpfs rw
25 24 0:31 / /srv/www/up\\040load rw - xfs /dev/sdb rw
26 22 8:1 /data /mnt/bind rw - ext4 /dev/sda1 rw
"""


def test_mountinfo_parsing_unescapes_names():
    ms = parse_mountinfo(MOUNTINFO + b"garbage line\n")
    assert [m.mount_point for m in ms][-2] == b"/srv/www/up load"
    assert ms[0].dev == os.makedev(8, 1) and ms[1].fstype == "proc"
    assert containing_mount(ms, b"/srv/www/a").mount_point == b"/srv/www"


def test_mark_plan_dedups_filesystems_skips_excluded_and_scopes_directories():
    ms = parse_mountinfo(MOUNTINFO)
    plan = plan_marks(ms, ["/"], ["proc"])
    assert sorted(m.fstype for m in plan.mounts) == ["ext4", "tmpfs", "xfs"]
    assert [m.fstype for m in plan.skipped] == ["proc"] and plan.scope == ()
    plan = plan_marks(ms, ["/srv/www"], ["xfs"])
    assert [m.fstype for m in plan.mounts] == ["tmpfs"] and plan.scope == ()
    plan = plan_marks(ms, ["/srv"], [])
    assert plan.scope == (b"/srv",)


# --- binding codecs -------------------------------------------------------------------------------
def test_event_parsing_reads_pidfd_info_records():
    meta = struct.pack("=IBBHQii", 24 + 8, 3, 0, 24, fan.FAN_OPEN_PERM, 7, 1234)
    info = struct.pack("=BBHi", fan.FAN_EVENT_INFO_TYPE_PIDFD, 0, 8, 9)
    plain = struct.pack("=IBBHQii", 24, 3, 0, 24, fan.FAN_CLOSE_WRITE, 8, 99)
    evs = fan.parse_events(meta + info + plain)
    assert [(e.fd, e.pid, e.pidfd, e.is_permission) for e in evs] == [(7, 1234, 9, True), (8, 99, -1, False)]
    assert fan.deny_errno_response(5) == (5 << 24) | fan.FAN_DENY


# --- hash lists -----------------------------------------------------------------------------------
def test_hash_list_format_and_errors():
    h = "a" * 64
    assert parse_list(f"# c\n{h}  *binary-name\n", "x") == {h: ("binary-name", None)}
    assert parse_list(f"{h.upper()}\n", "x") == {h: (h[:12], None)}
    assert parse_list(f"{h}:68:EICAR\n", "x") == {h: ("EICAR", 68)}
    from vetd.sdk import PluginConfigError
    with pytest.raises(PluginConfigError, match="x:2"):
        parse_list(f"{h}\nnot-a-hash\n", "x")
    with pytest.raises(PluginConfigError, match="x:1: expected HASH:SIZE:NAME"):
        parse_list(f"{h}:big:EICAR\n", "x")


def test_hash_list_with_sizes_hashes_only_files_of_listed_sizes(tmp_path):
    import hashlib
    from vetd.sdk import Opener, ScanFile
    from vetd_plugins.hashlist import HashList
    bad = b"bad content"
    (tmp_path / "list").write_text(f"{hashlib.sha256(bad).hexdigest()}:{len(bad)}:bad\n")
    plugin = HashList({"deny": [str(tmp_path / "list")]})
    for content, denied, hashed in ((bad, True, True), (b"x" * len(bad), False, True),
                                    (b"other size", False, False)):
        (tmp_path / "f").write_bytes(content)
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            sf = ScanFile(fd, os.fstat(fd), "f")
            assert plugin.scan(sf, Opener(None)).denied is denied
            assert bool(sf._hashes) is hashed
        finally:
            os.close(fd)


# --- degraded policy ------------------------------------------------------------------------------
def test_policy_precedence_path_class_then_plugin_then_scan_defaults():
    c = cfg.parse('[scan]\non_error = "allow"\non_timeout = "deny"\n'
                  '[[degraded.class]]\npaths = ["/srv/www/**"]\non_failure = "deny"\non_backlog = "deny"\n'
                  '[plugins.clam]\non_failure = "allow"\n[plugins.other]\n')
    pol = c.policy()
    assert pol.answer("error", b"/srv/www/x", "clam") is False      # the class wins
    assert pol.answer("timeout", b"/home/x", "clam") is True        # then the plugin
    assert pol.answer("timeout", b"/home/x", "other") is False      # then [scan]
    assert pol.answer("error", b"/home/x", "other") is True
    assert pol.answer("backlog", b"/srv/www/x") is False and pol.answer("backlog", b"/a") is True


def test_breaker_opens_after_threshold_and_lets_one_probe_through():
    from vetd.degraded import Breaker
    b = Breaker(threshold=2, retry_after_s=10)
    assert b.allow(0) and not b.failure(0) and b.failure(1)
    assert b.state == "unhealthy" and not b.allow(5)
    assert b.allow(11) and b.state == "probing" and not b.allow(11)   # exactly one probe
    assert b.failure(11) and b.state == "unhealthy"                 # a failed probe reopens
    assert b.allow(22)
    b.success()
    assert b.state == "healthy" and b.allow(22) and b.trips == 2


def test_plugin_host_keys_are_validated():
    with pytest.raises(cfg.ConfigError, match=r"\[plugins.x\] on_failure"):
        cfg.parse('[plugins.x]\non_failure = "maybe"')
    with pytest.raises(cfg.ConfigError, match=r"\[degraded.class #1\] paths"):
        cfg.parse('[[degraded.class]]\nname = "x"')


# --- plugin loading -------------------------------------------------------------------------------
def test_plugin_files_writable_by_others_are_refused(tmp_path, monkeypatch):
    import importlib
    import sys
    from vetd import plugins
    site = tmp_path / "site"
    site.mkdir(mode=0o755)
    (site / "vetd_unsafe_plugin.py").write_text(
        "from vetd.sdk import API_VERSION, Plugin, Verdict\n"
        "class P(Plugin):\n    name = 'unsafe'\n    api_version = API_VERSION\n"
        "    def scan(self, f, o):\n        return Verdict.allow()\n")
    dist = site / "vetd_unsafe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vetd-unsafe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[vetd.plugins]\nunsafe = vetd_unsafe_plugin:P\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    os.chmod(site / "vetd_unsafe_plugin.py", 0o664)
    with pytest.raises(plugins.PluginError, match="writable by group or others"):
        plugins.load("unsafe", {})
    assert "vetd_unsafe_plugin" not in sys.modules, "refused code was imported anyway"
    os.chmod(site / "vetd_unsafe_plugin.py", 0o644)
    assert plugins.load("unsafe", {}).name == "unsafe"


def test_plugins_for_another_sdk_major_are_refused():
    from vetd import plugins
    from vetd.sdk import Plugin

    class Future(Plugin):
        api_version = "2.0"
    with pytest.raises(plugins.PluginError, match="written for SDK 2.0"):
        plugins._check_api("future", Future)


# --- process events -------------------------------------------------------------------------------
def _proc_event(what: int, *words: int) -> bytes:
    body = struct.pack("=IIQ", what, 0, 0) + struct.pack(f"={len(words)}I", *words)
    body += bytes(24 - 4 * len(words)) if len(words) < 6 else b""
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(body), 0) + body
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


def test_process_events_forget_exactly_what_changed():
    import socket
    from vetd.procwatch import Proc, ProcWatch
    a, b = socket.socketpair()
    a.setblocking(False)
    pw = ProcWatch(a)
    for pid in (10, 20, 30, 40, 50):
        pw.procs[pid] = Proc()
    pw._apply(_proc_event(0x1, 1, 1, 11, 10), pw.procs)        # a new thread of 10: keep 10
    pw._apply(_proc_event(0x1, 1, 1, 20, 20), pw.procs)        # a new process with pid 20: forget
    pw._apply(_proc_event(0x2, 30, 30), pw.procs)              # exec: forget
    pw._apply(_proc_event(0x4, 41, 40, 0, 0), pw.procs)        # a thread's setuid: forget the group
    pw._apply(_proc_event(0x80000000, 51, 50, 0, 0, 1, 1), pw.procs)  # a thread exits: keep 50
    assert sorted(pw.procs) == [10, 50] and pw.forgotten == 3
    # ...but a kill must not trust pid 50 to be the process it was (its thread exited), nor
    # anything once exits went unrecorded; pid 10 has reported no exit
    assert pw.maybe_exited(50, 0) and not pw.maybe_exited(10, 0)
    assert pw.exited[50] == 0
    assert not pw.maybe_exited(50, 1)   # its exit was applied before epoch 1: an older process
    pw.unsure_before = 3
    assert pw.maybe_exited(10, 2) and not pw.maybe_exited(10, 3)
    a.close()
    b.close()


# --- the SDK's view of a file ---------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_scanfile_reads_holes_as_zeros_and_hashes_once(tmp_path, sparse):
    import hashlib
    from vetd.sdk import ScanFile
    f = tmp_path / "f"
    with open(f, "wb") as fh:
        if sparse:
            fh.truncate(5 << 20)
            fh.seek(3 << 20)
            fh.write(b"middle")
        else:
            fh.write(os.urandom(3 << 20))
    want = f.read_bytes()
    fd = os.open(f, os.O_RDONLY)
    try:
        sf = ScanFile(fd, os.fstat(fd), lambda: "display")
        assert b"".join(sf.chunks(size=1 << 20)) == want
        assert sf.read(limit=100) == want[:100]
        assert sf.sha256() == hashlib.sha256(want).hexdigest() and sf.path == "display"
        os.truncate(f, 1000)                      # a writer shrinks it under us: reads end early
        assert b"".join(sf.chunks()) == want[:1000]
    finally:
        os.close(fd)


def test_isolation_keys_are_validated():
    with pytest.raises(cfg.ConfigError, match=r"\[plugins.x\] isolation: must be one of thread, process"):
        cfg.parse('[plugins.x]\nisolation = "vm"')
    with pytest.raises(cfg.ConfigError, match=r"\[plugins.x\] processes"):
        cfg.parse('[plugins.x]\nisolation = "process"\nprocesses = 0')
    assert cfg.parse('[plugins.x]\nisolation = "process"\nprocesses = 3').plugins["x"]["processes"] == 3


def test_clock_evicts_what_was_not_read_and_reads_refresh():
    from vetd.cache import Clock
    lru: Clock[int, str] = Clock(2)
    lru.put(1, "a")
    lru.put(2, "b")
    assert lru.get(1) == "a"      # 1 was read: it gets a second chance
    lru.put(3, "c")               # so 2 goes
    assert lru.get(2) is None and lru.get(1) == "a" and lru.get(3) == "c"
    assert lru.peek(1) == "a" and len(lru) == 2
    lru.replace_if_present(9, "z")
    assert lru.get(9) is None
    lru.pop(1)
    assert [k for k, _ in lru.items()] == [3]


def test_clock_stays_bounded_when_keys_are_dropped_and_stored_again():
    from vetd.cache import Clock
    c: Clock[int, int] = Clock(4)
    for i in range(1000):
        c.put(i % 8, i)
        c.get(i % 8)
        if i % 3 == 0:
            c.pop(i % 8)
    assert len(c) <= 4
    assert len(c._ring) <= 2 * 4 + 64 + 1 and len(c._hot) <= 4 + 64 + 1
    assert {k for k, _ in c.items()} == set(c._d)


def test_rule_outcomes_are_remembered_only_on_facts_kept_current():
    from vetd import rules
    def attrs(text):
        return rules.RuleSet(rules.parse(text)).memo_attrs()
    assert attrs("deny open /srv/a/**\n") == ()
    assert attrs("only /usr/sbin/httpd open /srv/www/**\ndeny open /x/** : !uid=0\n") == ("exe", "uid")
    assert attrs("deny open /x/** : comm=sh gid=5\n") == ("comm", "gid")
    for text in ("deny open sha256=" + "a" * 64 + "\n", "deny open /x/** : pexe=/bin/sh\n",
                 "deny open /x/** : loginuid=1000\n", "deny open /x/** : cgroup=/system.slice/**\n"):
        assert attrs(text) is None, text


def test_statx_identity_matches_fstat_keys(tmp_path):
    from vetd.cache import file_key, file_version
    from vetd.fileid import MODE, MOUNT, NLINK, Statx, key_and_version
    sx = Statx()
    assert sx.available, "statx gives no mount id (needs 5.8+): the memo would be off"
    f = tmp_path / "f"
    f.write_bytes(b"x" * 1000)
    fd = os.open(f, os.O_RDONLY)
    try:
        t = sx.raw(fd)
        st = os.fstat(fd)
        assert t is not None and key_and_version(t) == (file_key(st), file_version(st))
        assert t[MODE] == st.st_mode and t[NLINK] == 1 and t[MOUNT] > 0
    finally:
        os.close(fd)
    assert sx.raw(-1) is None


# --- FastAnswers: the compiled loop's table -------------------------------------------------------
def test_fast_answers_refuse_what_was_decided_before_a_clear():
    from vetd.fastanswers import SLOT_CACHE, SLOT_RULE0, FastAnswers
    fa = FastAnswers(rules=2)
    epoch = fa.epoch
    assert fa.add(("k1",), SLOT_RULE0 + 1, None, epoch)
    fa.clear()                                   # a move came while "k2" was being decided
    assert not fa.add(("k2",), SLOT_CACHE, 7, epoch)
    assert fa.table == {}
    assert fa.add(("k3",), SLOT_CACHE, 7, fa.epoch)
    assert fa.table == {("k3",): SLOT_CACHE}


def test_fast_answers_drop_a_files_clean_hits_with_its_cache_entry():
    from vetd.fastanswers import SLOT_CACHE, SLOT_EXCLUDED, FastAnswers
    fa = FastAnswers(rules=0)
    fa.add(("a", 1), SLOT_CACHE, 1, fa.epoch)
    fa.add(("a", 2), SLOT_CACHE, 1, fa.epoch)    # the same file, another opener's token
    fa.add(("b",), SLOT_CACHE, 2, fa.epoch)
    fa.add(("c",), SLOT_EXCLUDED, None, fa.epoch)
    fa.drop_file(1)
    assert set(fa.table) == {("b",), ("c",)}


def test_fast_answers_start_again_empty_at_the_limit_and_count_per_slot():
    from vetd.fastanswers import FastAnswers
    fa = FastAnswers(rules=1, limit=2)
    for k in range(3):
        fa.add((k,), 0, None, fa.epoch)
    assert fa.table == {(2,): 0}
    fa.counts[0] += 2
    fa.counts[2] += 1
    assert fa.take_counts() == [2, 0, 1]
    fa.counts[2] += 1
    assert fa.take_counts() == [0, 0, 1]


def test_the_verdict_cache_reports_what_it_drops():
    from vetd.cache import VerdictCache
    from vetd.sdk import Verdict
    dropped = []
    c = VerdictCache(8)
    c.on_drop = dropped.append
    c.store(1, 10, Verdict.allow("ok"), c.generation)
    c.invalidate(1)
    c.store(2, 20, Verdict.deny("bad"), c.generation)   # a deny for a file: its allows go
    c.store(3, 30, Verdict.allow("ok"), c.generation)   # an allow drops nothing
    c.bump_generation()
    assert dropped == [1, 2, None]


# --- ReadRelay: who reads while the reader scans --------------------------------------------------
def _standby_returned(relay, timeout_s: float):
    """A thread running relay.standby(timeout_s), and the list its wait (seconds) goes into."""
    import threading
    import time
    out: list[float] = []

    def wait() -> None:
        t = time.monotonic()
        relay.standby(timeout_s)
        out.append(time.monotonic() - t)

    th = threading.Thread(target=wait)
    th.start()
    return th, out


def test_the_relay_wakes_a_standby_for_events_that_wait_during_a_scan():
    import os
    import time
    from vetd.relay import ReadRelay
    r, w = os.pipe()   # stands in for the group fd
    relay = ReadRelay(r, threads=2)
    try:
        assert relay.take() and not relay.take()          # one holder at a time
        assert relay.may_scan_inline()
        relay.release()
        th, out = _standby_returned(relay, 5.0)
        time.sleep(0.1)
        relay.begin_scan()                               # nothing waits yet: no wake-up
        assert not relay.may_scan_inline()               # the other thread is the only standby
        time.sleep(0.1)
        assert th.is_alive()
        os.write(w, b"e")                                # an event arrives during the scan
        th.join(2.0)
        assert not th.is_alive() and out[0] < 2.0
        relay.end_scan()
    finally:
        relay.close()
        os.close(r)
        os.close(w)


def test_the_relay_reports_events_already_waiting_when_a_scan_begins_and_none_after_it():
    import os
    from vetd.relay import ReadRelay
    r, w = os.pipe()
    relay = ReadRelay(r, threads=2)
    try:
        os.write(w, b"e")                                # waiting before the scan began
        th, out = _standby_returned(relay, 5.0)
        relay.begin_scan()
        th.join(2.0)
        assert not th.is_alive() and out[0] < 2.0
        relay.end_scan()
        os.read(r, 1)
        th, out = _standby_returned(relay, 0.3)
        os.write(w, b"e")                                # no scan: the reader reads it itself
        th.join(2.0)
        assert out[0] >= 0.25
    finally:
        relay.close()
        os.close(r)
        os.close(w)


# --- SDK 1.1: the deadline a plugin sees ---------------------------------------------------------
def test_time_left_is_the_cap_or_less_and_never_negative(tmp_path):
    import time as _time

    from vetd.sdk import ScanFile
    f = tmp_path / "f"
    f.write_text("x")
    fd = os.open(f, os.O_RDONLY)
    try:
        sf = ScanFile(fd, os.fstat(fd), str(f))
        assert sf.deadline is None and sf.time_left(4.0) == 4.0   # nobody waits: the plugin's own
        sf.deadline = _time.monotonic() + 100
        assert sf.time_left(4.0) == 4.0
        sf.deadline = _time.monotonic() + 1
        assert 0 < sf.time_left(4.0) <= 1
        sf.deadline = _time.monotonic() - 1
        assert sf.time_left(4.0) == 0.0
    finally:
        os.close(fd)


# --- reader processes: what crosses between them ---------------------------------------------------
def test_exec_notes_cross_between_readers_in_order():
    from vetd.readers import EXEC, NOT_OWN, OWN, Peers, peer_pipes
    pipes = peer_pipes(3)
    a = Peers(pipes[0][0], [pipes[1][1], pipes[2][1]])
    b = Peers(pipes[1][0], [pipes[0][1], pipes[2][1]])
    big = (2049 << 64) | 123456789
    a.tell_exec(41, big)
    a.tell_own(99, True)
    a.tell_exec(42, 7)
    a.tell_own(99, False)
    notes = [(EXEC, 41, big), (OWN, 99, 0), (EXEC, 42, 7), (NOT_OWN, 99, 0)]
    assert b.drain() == notes
    assert b.drain() == []
    assert Peers(pipes[2][0], []).drain() == notes
    assert a.drain() == [] and a.sent == 2 and a.dropped == 0
    for r, w in pipes:
        os.close(r)
        os.close(w)


def test_an_exec_note_to_a_full_pipe_is_counted_not_raised():
    from vetd.readers import Peers, peer_pipes
    (r, w), = peer_pipes(1)
    p = Peers(-1, [w])
    for n in range(5000):  # 20 bytes each: more than a 64 KiB pipe holds
        p.tell_exec(n, n)
    assert p.dropped > 0 and p.sent == 5000
    os.close(r)
    os.close(w)


def test_reader_status_sums_counters_and_keeps_settings():
    from vetd.readers import merge_status
    mine = {"pid": 1, "answers": {"allow": 3, "deny": 1, "by_reason": {"scan": 4}},
            "cache": {"entries": 2, "hit_rate": 0.5, "generation": 4},
            "backlog": {"limit": 10, "depth": 1, "read_loop": "waiting"},
            "hot_path": {"busy_poll": {"max_us": 100, "spent_s": 0.25}},
            "plugins": [{"name": "yara", "health": "healthy", "scans": 5, "failures_in_a_row": 0},
                        {"name": "clamav", "health": "unhealthy", "scans": 2, "failures_in_a_row": 5}]}
    theirs = {"pid": 2, "answers": {"allow": 4, "deny": 0, "by_reason": {"scan": 2, "cache": 2}},
              "cache": {"entries": 5, "hit_rate": 0.9, "generation": 4},
              "backlog": {"limit": 10, "depth": 2, "read_loop": "working"},
              "hot_path": {"busy_poll": {"max_us": 100, "spent_s": 0.5}},
              "plugins": [{"name": "yara", "health": "probing", "scans": 1, "failures_in_a_row": 6},
                          {"name": "clamav", "health": "healthy", "scans": 3, "failures_in_a_row": 0}],
              "rules": {"hits": [{"rule": 1, "hits": 2}, {"rule": 3, "hits": 1}]}}
    mine["rules"] = {"hits": [{"rule": 3, "hits": 4}]}
    merge_status(mine, theirs)
    assert mine["pid"] == 1
    assert mine["answers"] == {"allow": 7, "deny": 1, "by_reason": {"scan": 6, "cache": 2}}
    assert mine["cache"] == {"entries": 7, "hit_rate": 0.5, "generation": 4}
    assert mine["backlog"] == {"limit": 10, "depth": 3, "read_loop": "waiting"}
    assert mine["hot_path"]["busy_poll"] == {"max_us": 100, "spent_s": 0.75}
    assert mine["plugins"] == [  # counts add up; health and failures are the worst reader's
        {"name": "yara", "health": "probing", "scans": 6, "failures_in_a_row": 6},
        {"name": "clamav", "health": "unhealthy", "scans": 5, "failures_in_a_row": 5}]
    assert mine["rules"]["hits"] == [{"rule": 1, "hits": 2}, {"rule": 3, "hits": 5}]
