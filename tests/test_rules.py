"""The access-rule language: parser, matcher, kernel-cache question, linter.

The matcher is checked against a reference written here from docs/rules.md alone (its own glob
matcher included), so the compiled index, the prefilter and the glob translation are all tested
against the documented meaning rather than against themselves.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import timeit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vetd import rules
from vetd.config import ExcludeConfig
from vetd.globs import GlobSet
from vetd.rulelint import check_writable_exclusions, glob_covers, glob_disjoint, lint
from vetd.rules import LOGINUID_UNSET, Cond, Rule, RuleError, RuleSet, parse

HASH_A = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
HASH_B = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ERROR_FORMAT = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): expected .+, got .+", re.S)


# --- fakes: lazily known facts, with a record of what was read -----------------------------------
class Facts:
    """Subject or object facts; reading one not given raises, so laziness is checked."""

    def __init__(self, _log: list | None = None, **facts):
        self._facts = facts
        self.read: list[str] = [] if _log is None else _log

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        self.read.append(name)
        if name not in self._facts:
            raise AssertionError(f"rule evaluation read {name!r}, which no rule needs")
        return self._facts[name]

    def sha256(self):
        self.read.append("sha256")
        if "sha256" not in self._facts:
            raise AssertionError("rule evaluation hashed the file, which no rule needs")
        return self._facts["sha256"]


SUBJECT_FIELDS = ("exe", "comm", "uid", "gid", "loginuid", "unit", "cgroup", "parent_exe")
OBJECT_FIELDS = ("path", "fstype", "ftype", "sha256")


def subject(_log=None, **kw):
    return Facts(_log, **{f: kw.get(f) for f in SUBJECT_FIELDS})


def obj(path=b"/x", _log=None, **kw):
    base = {"path": path, "fstype": "ext4", "ftype": "regular", "sha256": None}
    base.update(kw)
    return Facts(_log, **base)


def first(text: str, perm: str, subj, ob) -> int | None:
    r = RuleSet(parse(text)).evaluate(perm, subj, ob)
    return None if r is None else r.number


HTTPD = subject(exe=b"/usr/sbin/httpd", uid=48, comm="httpd")
PYTHON = subject(exe=b"/usr/bin/python3", uid=1000, comm="python3")
KTHREAD = subject(exe=None, uid=0, comm="kworker/0:1")
GONE = subject()   # an opener that exited: nothing can be read


# --- the language ---------------------------------------------------------------------------------
def test_only_httpd_opens_var_www_html_is_one_line():
    rs = RuleSet(parse("only /usr/sbin/httpd open /var/www/html/**"))
    page = obj(b"/var/www/html/index.html")
    assert rs.evaluate("open", HTTPD, page) is None          # httpd: on to the scanners
    denied = rs.evaluate("open", PYTHON, page)
    assert denied is not None and denied.action == "deny" and denied.only
    assert rs.evaluate("open", PYTHON, obj(b"/var/www/other")) is None
    assert rs.evaluate("exec", PYTHON, page) is None          # the rule says open only


def test_every_documented_example_parses():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "rules.md")).read()
    blocks = re.findall(r"```rules\n(.*?)```", text, re.S)
    assert len(blocks) >= 10
    for block in blocks:
        parse(block, "docs/rules.md")


def test_the_shipped_example_file_enforces_nothing_and_every_commented_rule_parses():
    path = os.path.join(os.path.dirname(__file__), "..", "conf", "rules.d", "00-example.rules")
    text = open(path).read()
    assert parse(text, path) == []
    uncommented, continued = [], False
    for line in text.splitlines():
        body = line[2:]
        word = body.split(" ", 1)[0].split("(")[0]
        if line.startswith("# ") and (continued or word in rules.ACTIONS + ("only",)):
            uncommented.append(body)
            continued = body.endswith("\\")
    assert len(parse("\n".join(uncommented), path)) >= 20


def test_rule_fields():
    [r] = parse("\n\ndeny(EIO) open,exec /srv/secrets/** : !exe=/usr/bin/backup-agent  # note",
                "a.rules", start_number=7)
    assert (r.number, r.file, r.line) == (7, "a.rules", 3)
    assert r.text == "deny(EIO) open,exec /srv/secrets/** : !exe=/usr/bin/backup-agent"
    assert (r.action, r.errno, r.perms, r.only) == ("deny", "EIO", frozenset({"open", "exec"}), False)
    assert r.objects == (Cond("path", False, (b"/srv/secrets/**",)),)
    assert r.subjects == (Cond("exe", True, (b"/usr/bin/backup-agent",)),)
    assert r.subject_dependent
    assert not parse("deny exec /tmp/**")[0].subject_dependent
    assert parse("deny open /a")[0].errno is None


def test_any_is_every_perm_and_perm_lists_combine():
    assert parse("audit any /a")[0].perms == frozenset({"open", "exec", "access"})
    assert parse("audit open,exec,access /a")[0] == parse("audit any /a")[0]


def test_values_of_one_name_are_alternatives_and_negations_all_exclude():
    assert parse("deny open /a : exe=/x,/y")[0] == parse("deny open /a : exe=/y exe=/x")[0]
    text = "deny open /s/** : !exe=/x !exe=/y"
    assert first(text, "open", subject(exe=b"/x"), obj(b"/s/f")) is None
    assert first(text, "open", subject(exe=b"/y"), obj(b"/s/f")) is None
    assert first(text, "open", subject(exe=b"/z"), obj(b"/s/f")) == 1
    assert parse("deny open /a : uid!=0")[0] == parse("deny open /a : !uid=0")[0]


def test_names_resolve_to_numbers():
    [r] = parse("allow open /a : uid=root gid=root loginuid=unset")
    assert r.subjects == (Cond("uid", False, (0,)), Cond("gid", False, (0,)),
                          Cond("loginuid", False, (LOGINUID_UNSET,)))


def test_quoted_values_carry_spaces_and_any_byte():
    [r] = parse(r'deny open "/srv/my files/**" "/data/\xff\x01odd" : comm="a b"')
    assert r.objects[0].values == (b"/data/\xff\x01odd", b"/srv/my files/**")
    rs = RuleSet([r])
    assert rs.evaluate("open", subject(comm="a b"), obj(b"/data/\xff\x01odd")) is r
    assert rs.evaluate("open", subject(comm="a b"), obj(b"/srv/my files/x y")) is r


def test_a_backslash_continues_a_rule_and_columns_stay_physical():
    [r] = parse("deny open /a/** \\\n    /b/**   # more\n", "c.rules")
    assert r.objects[0].values == (b"/a/**", b"/b/**") and r.line == 1
    with pytest.raises(RuleError) as e:
        parse("deny open /a/** \\\n    /b/** bogus=1\n", "c.rules")
    assert str(e.value).startswith("c.rules:2:11: ")


def test_a_hash_inside_a_word_is_not_a_comment():
    assert parse("deny open /a#b")[0].objects[0].values == (b"/a#b",)
    assert parse("deny open /a #b")[0].objects[0].values == (b"/a",)


def test_dir_means_the_directory_and_everything_beneath():
    text = "deny open dir=/srv/data/"
    assert parse(text)[0].objects == (Cond("dir", False, (b"/srv/data",)),)
    for p, hit in [(b"/srv/data", 1), (b"/srv/data/x", 1), (b"/srv/data/a/b/c", 1),
                   (b"/srv/database", None), (b"/srv", None)]:
        assert first(text, "open", PYTHON, obj(p)) == hit, p


def test_globs_cross_directories_only_with_double_star():
    text = "deny open /srv/*.db /home/**/.ssh/* /opt/?/bin/**"
    for p, hit in [(b"/srv/a.db", 1), (b"/srv/x/a.db", None), (b"/home/u/.ssh/id", 1),
                   (b"/home/.ssh/id", 1), (b"/home/a/b/c/.ssh/k", 1), (b"/home/u/.ssh/d/k", None),
                   (b"/opt/x/bin/a/b", 1), (b"/opt/xy/bin/a", None), (b"/opt/x/bin", None)]:
        assert first(text, "open", PYTHON, obj(p)) == hit, p


def test_object_and_subject_attributes_each_match():
    cases = [
        ("deny open fstype=tmpfs,nfs", obj(fstype="nfs"), PYTHON, 1),
        ("deny open fstype=tmpfs", obj(fstype="ext4"), PYTHON, None),
        ("deny open ftype=regular", obj(ftype="regular"), PYTHON, 1),
        ("deny open ftype=fifo", obj(ftype="pipe"), PYTHON, 1),     # aliases from the model too
        (f"deny open sha256={HASH_A.upper()}", obj(sha256=HASH_A), PYTHON, 1),
        (f"deny open sha256={HASH_A}", obj(sha256=HASH_B), PYTHON, None),
        ("deny open all : comm=py*", obj(), PYTHON, 1),
        ("deny open all : comm=python3", obj(), HTTPD, None),
        ("deny open all : gid=100", obj(), subject(gid=100), 1),
        ("deny open all : loginuid=1000", obj(), subject(loginuid=1000), 1),
        ("deny open all : loginuid=unset", obj(), subject(loginuid=LOGINUID_UNSET), 1),
        ("deny open all : unit=httpd.service", obj(), subject(unit="httpd.service"), 1),
        ("deny open all : unit=user@*.service", obj(), subject(unit="user@1000.service"), 1),
        ("deny open all : cgroup=/system.slice/**", obj(),
         subject(cgroup="/system.slice/httpd.service"), 1),
        ("deny open all : cgroup=/system.slice/*", obj(), subject(cgroup="/user.slice/x"), None),
        ("deny open all : pexe=/usr/bin/bash", obj(), subject(parent_exe=b"/usr/bin/bash"), 1),
        ("deny open all : exe=/usr/lib/jvm/**/bin/java", obj(),
         subject(exe=b"/usr/lib/jvm/java-17/bin/java"), 1),
        ("deny open all : /usr/bin/python3", obj(), PYTHON, 1),
    ]
    for text, ob, subj, hit in cases:
        assert first(text, "open", subj, ob) == hit, text


def test_first_match_wins_and_no_match_falls_through():
    text = "allow open /srv/public/**\ndeny open /srv/**\naudit open /srv/public/x"
    assert first(text, "open", PYTHON, obj(b"/srv/public/x")) == 1
    assert first(text, "open", PYTHON, obj(b"/srv/private")) == 2
    assert first(text, "open", PYTHON, obj(b"/etc/passwd")) is None


def test_perms_select_rules():
    text = "deny exec /tmp/**\naudit open /tmp/**"
    assert first(text, "exec", PYTHON, obj(b"/tmp/x")) == 1
    assert first(text, "open", PYTHON, obj(b"/tmp/x")) == 2
    assert first(text, "access", PYTHON, obj(b"/tmp/x")) is None


def test_hits_are_counted_per_rule():
    rs = RuleSet(parse("deny exec /tmp/**\naudit open /tmp/**"))
    for _ in range(3):
        rs.evaluate("open", PYTHON, obj(b"/tmp/x"))
    rs.evaluate("exec", PYTHON, obj(b"/tmp/x"))
    rs.evaluate("exec", PYTHON, obj(b"/srv/x"))
    assert rs.hits == [1, 3]
    assert [row["hits"] for row in rs.hit_table()] == [1, 3]


def test_only_with_several_conditions_allows_only_who_meets_them_all():
    text = "only exe=/usr/sbin/httpd uid=48 open /var/www/**"
    page = obj(b"/var/www/i")
    assert first(text, "open", HTTPD, page) is None
    assert first(text, "open", subject(exe=b"/usr/sbin/httpd", uid=0), page) == 1
    assert first(text, "open", subject(exe=b"/usr/bin/cat", uid=48), page) == 1
    assert first("only /usr/sbin/httpd,/usr/sbin/nginx open /var/www/**", "open",
                 subject(exe=b"/usr/sbin/nginx"), page) is None


# --- unknown facts: defined answers ----------------------------------------------------------------
@pytest.mark.parametrize("text, subj, ob, hit", [
    # a positive condition on an unknown value never holds
    ("deny open /x : exe=/a", KTHREAD, obj(), None),
    ("allow open /x : exe=/a", KTHREAD, obj(), None),
    ("deny open /x/**", PYTHON, obj(path=None), None),
    (f"deny open sha256={HASH_A}", PYTHON, obj(sha256=None), None),
    # a negated one holds in deny and kill rules: the opener is not proven to be the exception
    ("deny open /x : !exe=/usr/sbin/httpd", KTHREAD, obj(), 1),
    ("kill exec /tmp/** : !uid=0", GONE, obj(b"/tmp/t"), 1),
    ("deny open !/usr/**", PYTHON, obj(path=None), 1),
    # and fails in allow and audit rules: nothing is let through on an unknown
    ("allow open /x : !exe=/a", KTHREAD, obj(), None),
    ("audit open /x : !uid=0", GONE, obj(), None),
    (f"allow open !sha256={HASH_A}", PYTHON, obj(sha256=None), None),
    # only: an unknown value never proves the opener is one of the allowed
    ("only /usr/sbin/httpd open /x", KTHREAD, obj(), 1),
    ("only !uid=0 open /x", GONE, obj(), 1),
    ("only exe=/usr/sbin/httpd uid=48 open /x", subject(exe=b"/usr/sbin/httpd"), obj(), 1),
    # a deleted executable is named "... (deleted)" by the kernel: not the exe the rule names
    ("only /usr/sbin/httpd open /x", subject(exe=b"/usr/sbin/httpd (deleted)"), obj(), 1),
])
def test_unknown_facts_have_a_defined_answer(text, subj, ob, hit):
    assert first(text, "open" if "exec" not in text else "exec", subj, ob) == hit


# --- laziness and order of reading -------------------------------------------------------------------
def test_evaluation_reads_only_what_rules_need():
    rs = RuleSet(parse("deny exec /tmp/**"))
    s, o = Facts(), Facts(path=b"/tmp/x")      # no subject facts at all
    assert rs.evaluate("exec", s, o) is not None
    assert s.read == [] and set(o.read) == {"path"}
    assert rs.evaluate("open", Facts(), Facts()) is None   # no open rule: nothing read


def test_cheap_facts_first_and_the_hash_last():
    rs = RuleSet(parse(f"deny open /srv/** ftype=regular sha256={HASH_A} : uid=0 exe=/a"))
    o = obj(b"/srv/x", sha256=HASH_A)
    s = subject(uid=1000, exe=b"/a")
    assert rs.evaluate("open", s, o) is None
    assert "sha256" not in o.read and "exe" not in s.read   # uid failed first
    log: list[str] = []
    s2, o2 = subject(log, uid=0, exe=b"/a"), obj(b"/srv/x", log, sha256=HASH_A)
    assert rs.evaluate("open", s2, o2) is not None
    order = list(dict.fromkeys(log))
    assert order == ["path", "ftype", "uid", "exe", "sha256"]


def test_an_uncovered_path_reads_no_subject_fact():
    lines = [f"only /usr/sbin/d{i} open /srv/app{i}/**" for i in range(50)]
    rs = RuleSet(parse("\n".join(lines)))
    s = Facts()
    assert rs.evaluate("open", s, Facts(path=b"/usr/lib/libc.so.6")) is None
    assert s.read == []


# --- may_match_object: may the file go into the kernel cache? ------------------------------------------
def test_a_subject_dependent_rule_keeps_its_files_out_of_the_kernel_cache():
    rs = RuleSet(parse("only /usr/sbin/httpd open /var/www/**\ndeny exec /tmp/**\n"
                       "allow open /srv/** : uid=0\naudit open /log/**"))
    assert rs.may_match_object("open", obj(b"/var/www/index.html"))
    assert not rs.may_match_object("open", obj(b"/usr/lib/libc.so.6"))
    assert not rs.may_match_object("open", obj(b"/tmp/x"))           # exec rule, open asked
    assert rs.may_match_object("exec", obj(b"/tmp/x"))
    assert rs.may_match_object("any", obj(b"/tmp/x"))
    assert not rs.may_match_object("open", obj(b"/srv/x"))           # an allow only allows
    assert rs.may_match_object("open", obj(b"/log/x"))               # audits must keep seeing
    assert rs.may_match_object("open", obj(path=None))               # unknown: could be anything


def test_may_match_object_checks_object_conditions_and_reads_no_subject():
    rs = RuleSet(parse(f"deny open /srv/** sha256={HASH_A}"))
    o = obj(b"/srv/x", sha256=HASH_B)
    assert not rs.may_match_object("open", o)
    assert rs.may_match_object("open", obj(b"/srv/x", sha256=None))  # unknown hash: not cached
    assert not rs.may_match_object("open", obj(b"/etc/x", sha256=HASH_A))


# --- errors name file, line, column and what was expected ---------------------------------------------
@pytest.mark.parametrize("text, line, col, fragment", [
    ("Deny open /a", 1, 1, "an action in lower case (deny)"),
    ("permit open /a", 1, 1, "an action (allow, deny, audit, kill) or 'only'"),
    ("deny opne /a", 1, 6, "a permission (open, exec, access, any), got 'opne'"),
    ("deny open", 1, 10, "got end of line"),
    ("deny open relative/path", 1, 11, "an object condition"),
    ("deny open /a exe=/b", 1, 14, "subject conditions go after a ' : '"),
    ("deny open /a : path=/b", 1, 16, "object conditions go before the ':'"),
    ("deny open /a : exee=/x", 1, 16, "did you mean 'exe'?"),
    ("deny open /a : color=red", 1, 16, "unknown attribute 'color'"),
    ("deny(EACCES) open /a", 1, 6, "got EACCES (FAN_DENY_ERRNO refuses it; use EPERM)"),
    ("deny(ENOENT) open /a", 1, 6, "got ENOENT (the kernel refuses it)"),
    ("deny(EBOGUS) open /a", 1, 6, "an errno name"),
    ("deny(EIO open /a", 1, 10, "')' after the errno"),
    ("allow(EIO) open /a", 1, 6, "only deny and only take an errno"),
    ("deny open /a/**x", 1, 11, "a valid glob for path"),
    ("deny open /a[b", 1, 11, "a valid glob for path"),
    ("deny open /[z-a]", 1, 11, "a valid glob for path"),
    ('deny open "/a', 1, 11, "a closing '\"'"),
    (r'deny open "/a\q"', 1, 14, "an escape"),
    (r'deny open "/a\xZZ"', 1, 14, "two hex digits"),
    ("deny open /a\\b", 1, 13, "backslashes"),
    ("deny open /a : uid=nosuchuser-vetd", 1, 20, "no such user"),
    ("deny open /a : gid=nosuchgroup-vetd", 1, 20, "no such group"),
    ("deny open /a : uid=!0", 1, 20, "write !uid=0 or uid!=0"),
    ("deny open /a : !uid!=0", 1, 16, "one negation"),
    ("deny open sha256=abc", 1, 18, "64 hex digits"),
    ("deny open ftype=weird", 1, 17, "a file type"),
    ("deny open fstype=Ext4", 1, 18, "a filesystem type name"),
    ("deny open /a : comm=averyveryverylongname", 1, 21, "at most 15 bytes"),
    ("deny open /a : exe=usr/bin/x", 1, 20, "an absolute path"),
    ("deny open dir=/home/*", 1, 15, "without wildcards"),
    ("deny open /a !/a", 1, 15, "conditions that can match together"),
    ("deny open /a :exe=/b", 1, 15, "a space after ':'"),
    ("deny open /a : ", 1, 16, "a subject condition after ':'"),
    ("deny open /a : /b : /c", 1, 19, "only one ':' per rule"),
    ("deny open all /x", 1, 15, "it stands alone"),
    ("deny open /a,", 1, 14, "a value for path"),
    ("deny open /a, /b", 1, 14, "a value for path"),
    ("only open /a", 1, 6, "the subjects allowed"),
    ("only /usr/sbin/httpd open /a : uid=0", 1, 30, "take no ':' part"),
    ("deny open /a : exe", 1, 19, "'=' after 'exe'"),
    ("deny open /a : comm=\"\\xff\"", 1, 21, "UTF-8 text for comm"),
    ("deny open /a\n\n  deny exec /b/** : uid=x-no-such", 3, 25, "no such user"),
])
def test_each_error_names_file_line_column_and_what_was_expected(text, line, col, fragment):
    with pytest.raises(RuleError) as e:
        parse(text, "t.rules")
    msg = str(e.value)
    m = ERROR_FORMAT.match(msg)
    assert m, msg
    assert (m["file"], int(m["line"]), int(m["col"])) == ("t.rules", line, col), msg
    assert fragment in msg, msg
    assert (e.value.file, e.value.line, e.value.col) == ("t.rules", line, col)


def test_non_utf8_rule_file_is_an_error_with_its_position(tmp_path):
    d = tmp_path / "rules.d"
    d.mkdir()
    (d / "10-a.rules").write_bytes(b"deny open /a\ndeny open /b\xff/c\n")
    with pytest.raises(RuleError) as e:
        rules.load_dir(str(d))
    assert str(e.value).startswith(f"{d}/10-a.rules:2:13: expected UTF-8 text")


# --- loading a directory ----------------------------------------------------------------------------
def test_load_dir_orders_files_by_name_and_numbers_across_them(tmp_path):
    d = tmp_path / "rules.d"
    d.mkdir()
    (d / "20-b.rules").write_text("deny open /b\ndeny open /c\n")
    (d / "10-a.rules").write_text("# nothing but a comment\nallow open /a\n")
    (d / "README").write_text("not rules")
    (d / ".hidden.rules").write_text("deny open /hidden")
    (d / "30-c.rules~").write_text("deny open /backup")
    rs = rules.load_dir(str(d))
    assert [(r.number, os.path.basename(r.file), r.line) for r in rs.rules] == [
        (1, "10-a.rules", 2), (2, "20-b.rules", 1), (3, "20-b.rules", 2)]
    assert rs.hits == [0, 0, 0]
    assert [os.path.basename(f) for f in rs.files] == ["10-a.rules", "20-b.rules"]


def test_load_dir_missing_is_empty_and_one_bad_file_loads_nothing(tmp_path):
    assert len(rules.load_dir(str(tmp_path / "absent"))) == 0
    assert len(rules.empty()) == 0 and rules.empty().evaluate("open", Facts(), Facts()) is None
    d = tmp_path / "rules.d"
    d.mkdir()
    (d / "10-good.rules").write_text("deny open /a\n")
    (d / "20-bad.rules").write_text("deny open /a\ndeny sometimes /b\n")
    with pytest.raises(RuleError) as e:
        rules.load_dir(str(d))
    assert str(e.value).startswith(f"{d}/20-bad.rules:2:6: expected a permission")
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(RuleError):
        rules.load_dir(str(f))


def test_needs_flags():
    rs = RuleSet(parse("deny exec /tmp/**"))
    assert (rs.needs_subject, rs.needs_path, rs.needs_hash) == (False, True, False)
    rs = RuleSet(parse(f"audit any sha256={HASH_A}\nonly /a open fstype=nfs"))
    assert (rs.needs_subject, rs.needs_path, rs.needs_hash) == (True, False, True)


# --- property tests: the parser ---------------------------------------------------------------------
ODD_BYTES = st.sampled_from([b"a", b"b", b"z9", b" ", b",", b'"', b"\\", b"#", b"!", b"=", b":",
                             b"\xff", b"\xc3\xa9", b"\t", b"\n", b"(", b")", b".", b"-"])
_COMPONENT = st.lists(ODD_BYTES, min_size=1, max_size=4).map(b"".join)
_GLOB_PART = st.sampled_from([b"*", b"?", b"[ab]", b"[!a]", b"*.conf"])


@st.composite
def path_values(draw, globs=True):
    comps = draw(st.lists(st.one_of(_COMPONENT, _GLOB_PART) if globs else _COMPONENT,
                          min_size=1, max_size=4))
    if globs and draw(st.booleans()):
        comps.insert(draw(st.integers(0, len(comps))), b"**")
    p = b"/" + b"/".join(comps)
    if globs and draw(st.booleans()):
        p += b"/"
    return p


_TEXT = st.text(st.sampled_from(list("abz09 ,\"\\#!=:é\t\x01.-_@")), min_size=1, max_size=8)
_VALUES = {
    "path": path_values(),
    "dir": path_values(globs=False),
    "fstype": st.sampled_from(["ext4", "tmpfs", "fuse.sshfs", "nfs4"]),
    "ftype": st.sampled_from(list(rules.FTYPES)),
    "sha256": st.sampled_from([HASH_A, HASH_B]),
    "exe": path_values(),
    "pexe": path_values(),
    "comm": _TEXT.filter(lambda t: len(t.encode()) <= 15 and not re.search(r"[*?\[]", t)),
    "unit": _TEXT,
    "cgroup": path_values().map(lambda b: b.decode("utf-8", "replace")).filter(
        lambda t: "\ufffd" not in t),
    "uid": st.integers(0, 70000),
    "gid": st.integers(0, 70000),
    "loginuid": st.sampled_from([0, 1000, LOGINUID_UNSET]),
}


@st.composite
def conds(draw, side):
    names = rules.OBJECT_ATTRS if side == "object" else rules.SUBJECT_ATTRS
    raw: dict[tuple[str, bool], set] = {}
    for _ in range(draw(st.integers(1 if side == "subject" else 0, 3))):
        attr = draw(st.sampled_from(names))
        neg = draw(st.booleans())
        vals = set(draw(st.lists(_VALUES[attr], min_size=1, max_size=2)))
        if attr == "dir":
            vals = {v.rstrip(b"/") or b"/" for v in vals}
        raw.setdefault((attr, neg), set()).update(vals)
    for (attr, neg), vals in list(raw.items()):
        if neg and (attr, False) in raw:
            vals -= raw[(attr, False)]
            if not vals:
                del raw[(attr, neg)]
    return tuple(sorted((Cond(a, n, tuple(sorted(v))) for (a, n), v in raw.items()),
                        key=lambda c: (rules._ATTR_ORDER[c.attr], c.negated)))


@st.composite
def rule_asts(draw):
    only = draw(st.booleans())
    action = "deny" if only else draw(st.sampled_from(rules.ACTIONS))
    errno = draw(st.sampled_from((None,) + rules.KERNEL_ERRNOS)) if action == "deny" else None
    perms = frozenset(draw(st.lists(st.sampled_from(rules.PERMS), min_size=1, max_size=3)))
    objects = draw(conds("object"))
    subjects = draw(conds("subject")) if only or draw(st.booleans()) else ()
    return Rule(1, "<rules>", 1, "", action, errno, perms, objects, subjects, only)


@settings(max_examples=400, deadline=None)
@given(rule_asts())
def test_canonical_text_parses_back_to_the_same_rule(rule):
    text = rule.canonical()
    [back] = parse(text)
    assert back == rule, text
    assert back.canonical() == text


@settings(max_examples=300, deadline=None)
@given(st.lists(rule_asts(), min_size=1, max_size=5), st.sampled_from(["\n", "\n\n", "  # c\n"]))
def test_many_rules_in_one_file_keep_their_order_and_lines(rs, sep):
    text = sep.join(r.canonical() for r in rs)
    back = parse(text, "f.rules", start_number=5)
    assert back == rs
    assert [r.number for r in back] == list(range(5, 5 + len(rs)))
    lines = text.split("\n")
    for r in back:
        assert lines[r.line - 1].startswith(r.text)


_SOUP = st.text(st.sampled_from(list("deny allow only open exec any : ! = , / * ? [ ] ( ) \" \\ # "
                                     "\n\t x y 0 EIO uid exe path dir sha256 ftype é \x00")),
                max_size=60)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_SOUP)
def test_any_text_parses_or_fails_with_a_positioned_error(text):
    try:
        parse(text, "soup.rules")
    except RuleError as e:
        m = ERROR_FORMAT.match(str(e))
        assert m, str(e)
        assert 1 <= int(m["line"]) <= text.count("\n") + 1
        assert int(m["col"]) >= 1


@settings(max_examples=600, deadline=None)
@given(rule_asts(), st.data())
def test_a_damaged_rule_parses_or_fails_with_a_positioned_error(rule, data):
    text = rule.canonical()
    i = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.sampled_from(list(" :!=,\"\\#()*[]x/\n")))
    damaged = text[:i] + junk + text[i + 1:]
    try:
        parse(damaged, "d.rules")
    except RuleError as e:
        assert ERROR_FORMAT.match(str(e)), str(e)


# --- property tests: the matcher against a reference from the documentation ---------------------------
def ref_component(pat: bytes, name: bytes) -> bool:
    return fnmatch.fnmatchcase(name.decode("latin-1"), pat.decode("latin-1"))


def ref_glob(pattern: bytes, path: bytes) -> bool:
    """docs/rules.md: `*`, `?`, `[...]` within a component; `**` a run of whole components;
    a trailing `/` or `/**` everything beneath (not the directory itself)."""
    if pattern.endswith(b"/"):
        pattern += b"**"
    pc, xc = pattern.split(b"/"), path.split(b"/")

    def m(i: int, j: int) -> bool:
        if i == len(pc):
            return j == len(xc)
        if pc[i] == b"**":
            if i == len(pc) - 1:
                return j < len(xc)                     # at least one (possibly empty) component
            return any(m(i + 1, k) for k in range(j, len(xc) + 1))
        return j < len(xc) and ref_component(pc[i], xc[j]) and m(i + 1, j + 1)
    return path.startswith(b"/") and m(0, 0)


def ref_value(attr: str, pattern, v) -> bool:
    if attr in ("path", "exe", "pexe"):
        return ref_glob(pattern, v)
    if attr == "dir":
        return v == pattern or v.startswith(pattern.rstrip(b"/") + b"/")
    if attr == "cgroup":
        return ref_glob(pattern.encode(), v.encode())
    if attr in ("comm", "unit"):
        return fnmatch.fnmatchcase(v, pattern)
    if attr == "ftype":
        return rules.FTYPE_ALIASES.get(v, v) == pattern
    return v == pattern


MODEL = {"path": "path", "dir": "path", "fstype": "fstype", "ftype": "ftype", "sha256": "sha256",
         "exe": "exe", "comm": "comm", "uid": "uid", "gid": "gid", "loginuid": "loginuid",
         "unit": "unit", "cgroup": "cgroup", "pexe": "parent_exe"}


def ref_holds(conds_, facts: dict, mode: str) -> bool:
    """mode: restrictive (deny, kill), permissive (allow, audit), proof (only's subjects)."""
    by: dict[str, list[Cond]] = {}
    for c in conds_:
        by.setdefault(MODEL[c.attr], []).append(c)
    for model, cs in by.items():
        v = facts[model]
        pos = [c for c in cs if not c.negated]
        neg = [c for c in cs if c.negated]
        if v is None:
            if mode != "restrictive" or pos:
                return False
            continue
        if pos and not any(ref_value(c.attr, p, v) for c in pos for p in c.values):
            return False
        if any(ref_value(c.attr, p, v) for c in neg for p in c.values):
            return False
    return True


def ref_evaluate(rule_list, perm, sf: dict, of: dict):
    for r in rule_list:
        if perm not in r.perms:
            continue
        mode = "restrictive" if r.action in ("deny", "kill") else "permissive"
        if not ref_holds(r.objects, of, mode):
            continue
        if r.only:
            if ref_holds(r.subjects, sf, "proof"):
                continue
        elif not ref_holds(r.subjects, sf, mode):
            continue
        return r
    return None


SMALL_COMP = st.sampled_from([b"a", b"b", b"ab", b"x.conf", b"\xff"])
SMALL_PATTERN_COMP = st.sampled_from([b"a", b"b", b"ab", b"x.conf", b"\xff", b"*", b"a*", b"?",
                                      b"[ab]", b"[!a]*", b"*.conf", b"**"])


@st.composite
def small_paths(draw):
    return b"/" + b"/".join(draw(st.lists(SMALL_COMP, min_size=1, max_size=4)))


@st.composite
def small_globs(draw):
    comps = draw(st.lists(SMALL_PATTERN_COMP, min_size=1, max_size=4))
    return b"/" + b"/".join(comps) + (b"/" if draw(st.booleans()) else b"")


def small_value(attr):
    return {
        "path": small_globs(), "dir": small_paths(), "fstype": st.sampled_from(["ext4", "tmpfs"]),
        "ftype": st.sampled_from(["regular", "dir"]), "sha256": st.sampled_from([HASH_A, HASH_B]),
        "exe": st.sampled_from([b"/bin/a", b"/bin/b", b"/usr/bin/*", b"/opt/**"]),
        "pexe": st.sampled_from([b"/bin/a", b"/bin/b"]),
        "comm": st.sampled_from(["a", "b*", "ab"]), "unit": st.sampled_from(["x.service", "*"]),
        "cgroup": st.sampled_from(["/s/a", "/s/**"]), "uid": st.sampled_from([0, 1000]),
        "gid": st.sampled_from([0, 100]), "loginuid": st.sampled_from([1000, LOGINUID_UNSET]),
    }[attr]


@st.composite
def small_conds(draw, side, min_size=0):
    names = rules.OBJECT_ATTRS if side == "object" else rules.SUBJECT_ATTRS
    weights = ["path"] * 4 + list(names) if side == "object" else list(names)
    terms = []
    for _ in range(draw(st.integers(min_size, 3))):
        attr = draw(st.sampled_from(weights))
        terms.append((draw(st.booleans()), attr, draw(st.lists(small_value(attr), min_size=1,
                                                                max_size=2))))
    return terms


def render_terms(terms) -> str:
    return " ".join(("!" if neg else "") + f"{attr}=" + ",".join(rules.render_value(attr, v)
                                                               for v in vals)
                    for neg, attr, vals in terms)


@st.composite
def small_rule_texts(draw):
    only = draw(st.integers(0, 3)) == 0
    perms = ",".join(sorted(set(draw(st.lists(st.sampled_from(["open", "exec", "access"]),
                                              min_size=1, max_size=2)))))
    objects = render_terms(draw(small_conds("object"))) or "all"
    if only:
        return f"only {render_terms(draw(small_conds('subject', 1)))} {perms} {objects}"
    action = draw(st.sampled_from(rules.ACTIONS))
    subjects = render_terms(draw(small_conds("subject")))
    return f"{action} {perms} {objects}" + (f" : {subjects}" if subjects else "")


def parse_some(texts):
    out = []
    for t in texts:
        try:
            out.extend(parse(t, start_number=len(out) + 1))
        except RuleError:      # e.g. the same value both required and excluded
            pass
    return out


@st.composite
def events(draw):
    maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731
    sf = {"exe": draw(maybe(st.sampled_from([b"/bin/a", b"/bin/b", b"/usr/bin/c", b"/opt/x/y"]))),
          "comm": draw(maybe(st.sampled_from(["a", "bc", "ab"]))),
          "uid": draw(maybe(st.sampled_from([0, 1000]))), "gid": draw(maybe(st.sampled_from([0, 100]))),
          "loginuid": draw(maybe(st.sampled_from([1000, LOGINUID_UNSET]))),
          "unit": draw(maybe(st.sampled_from(["x.service", "y.service"]))),
          "cgroup": draw(maybe(st.sampled_from(["/s/a", "/s/b/c", "/t"]))),
          "parent_exe": draw(maybe(st.sampled_from([b"/bin/a", b"/bin/c"])))}
    of = {"path": draw(st.one_of(small_paths(), small_paths(), st.none())),
          "fstype": draw(maybe(st.sampled_from(["ext4", "tmpfs"]))),
          "ftype": draw(st.sampled_from(["regular", "dir"])),
          "sha256": draw(maybe(st.sampled_from([HASH_A, HASH_B])))}
    return draw(st.sampled_from(rules.PERMS)), sf, of


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(small_rule_texts(), min_size=1, max_size=12), st.lists(events(), min_size=1,
                                                                       max_size=6))
def test_the_compiled_matcher_agrees_with_the_documented_meaning(texts, evs):
    rule_list = parse_some(texts)
    rs = RuleSet(rule_list)
    for perm, sf, of in evs:
        assert rs.evaluate(perm, Facts(**sf), Facts(**of)) == ref_evaluate(rule_list, perm, sf, of)


@settings(max_examples=500, deadline=None)
@given(small_globs(), small_paths())
def test_globs_match_as_documented_and_negation_inverts(pattern, path):
    g = rules.render_value("path", pattern)
    expected = ref_glob(pattern, path)
    assert (first(f"deny open {g}", "open", PYTHON, obj(path)) == 1) == expected
    assert (first(f"deny open !{g}", "open", PYTHON, obj(path)) == 1) == (not expected)


@settings(max_examples=200, deadline=None)
@given(st.lists(small_rule_texts(), min_size=1, max_size=8), small_rule_texts(), events())
def test_first_match_wins(texts, extra, ev):
    perm, sf, of = ev
    base = parse_some(texts)
    before = RuleSet(base).evaluate(perm, Facts(**sf), Facts(**of))
    appended = parse_some(texts + [extra])
    after = RuleSet(appended).evaluate(perm, Facts(**sf), Facts(**of))
    if before is not None:
        assert after == before and after.number == before.number   # a later rule changes nothing
    front = parse_some([extra] + texts)
    got = RuleSet(front).evaluate(perm, Facts(**sf), Facts(**of))
    if front and len(front) > len(base) and ref_evaluate(front[:1], perm, sf, of) is not None:
        assert got is not None and got.number == 1                 # an earlier match wins


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(small_rule_texts(), min_size=1, max_size=10), events(),
       st.lists(events(), min_size=1, max_size=8))
def test_may_match_object_is_never_wrong_to_cache(texts, ev, others):
    """If may_match_object says the file can be cached, no opener gets a deny, kill or audit."""
    rs = RuleSet(parse_some(texts))
    perm, _, of = ev
    if rs.may_match_object(perm, Facts(**of)):
        return
    for _, sf, _ in others:
        r = rs.evaluate(perm, Facts(**sf), Facts(**of))
        assert r is None or r.action == "allow", r


# --- the linter ------------------------------------------------------------------------------------
def lint_text(text, *, watched=(b"/",), exclusions=None, fail_open=False, events=None):
    return lint(RuleSet(parse(text, "t.rules")), watched=list(watched),
                exclusions=exclusions or ExcludeConfig(), fail_open=fail_open, events=events)


def checks(findings):
    return [(f.rule, f.check, f.severity) for f in findings]


def test_lint_finds_shadowed_duplicate_and_contradictory_rules():
    text = "\n".join([
        "deny open /srv/**",                             # 1
        "deny open /srv/data/*.db : uid=1000",           # 2 shadowed by 1
        "allow open /srv/x",                             # 3 never applies: 1 denies first
        "deny open /srv/**",                             # 4 duplicate of 1
        "allow open /a/** : uid=0",                      # 5
        "deny open /a/** : uid=0",                       # 6 contradicts 5
        "deny open,exec /srv/y",                         # 7 shadowed for open only
        "deny open /var/www/** : !exe=/usr/sbin/httpd",  # 8
        "only /usr/sbin/httpd open /var/www/html/**",    # 9 shadowed by 8 (same meaning, narrower)
        "deny open /b/** : exe=/x",                      # 10
        "deny open /b/** : !exe=/x",                     # 11 not shadowed: different openers
    ])
    got = checks(lint_text(text))
    assert (2, "shadowed", "warning") in got
    assert (3, "shadowed", "error") in got
    assert (4, "duplicate", "warning") in got
    assert (6, "contradiction", "error") in got
    assert (7, "shadowed", "warning") in got
    assert (9, "shadowed", "warning") in got
    assert not [g for g in got if g[0] in (1, 5, 8, 10, 11)]


def test_lint_knows_unknown_facts_break_shadowing():
    # the allow needs a known uid; the deny also catches openers whose uid is unknown
    got = checks(lint_text("allow open /a/** : !uid=0\ndeny open /a/** : !uid=0 !uid=1"))
    assert not [g for g in got if g[1] == "shadowed"]


def test_lint_finds_rules_outside_the_watched_trees():
    got = lint_text("deny exec /mnt/usb/**\nallow open /srv/** /mnt/x\ndeny open fstype=nfs",
                    watched=[b"/srv", b"/home"])
    assert checks(got) == [(1, "unwatched", "error"), (2, "unwatched", "warning")]
    assert "/mnt/usb/**" in got[0].message and "/srv, /home" in got[0].message
    assert not lint_text("deny open /srv/a/**", watched=[b"/srv/a/b"])   # partly watched


def test_lint_finds_rules_the_exclusions_make_pointless():
    ex = ExcludeConfig(paths=GlobSet.compile(["/cache/**"]), ops=frozenset({"access"}),
                       exe=frozenset({b"/usr/bin/backup"}))
    got = lint_text("deny open /cache/x/**\ndeny access /a\ndeny open fstype=proc\n"
                    "deny open ftype=dir\nallow open /a : exe=/usr/bin/backup\n"
                    "deny open /cache/x/** /other/**", exclusions=ex)
    assert checks(got) == [(1, "excluded", "error"), (2, "excluded", "error"),
                           (3, "excluded", "error"), (4, "excluded", "error"),
                           (5, "excluded", "warning")]
    only = ExcludeConfig(only_paths=GlobSet.compile(["/srv/**"]))
    assert checks(lint_text("deny open /etc/**\ndeny open /srv/a/**", exclusions=only)) == [
        (1, "excluded", "error")]


def test_lint_flags_deny_rules_under_a_fail_open_policy():
    got = lint_text(f"deny open sha256={HASH_A}\nallow open /a\nkill exec /tmp/**",
                    fail_open=True)
    assert checks(got) == [(None, "fail-open", "warning"), (1, "fail-open", "warning")]
    assert got[0].key == "scan" and "2 deny/kill rule(s) (1, 3)" in got[0].message
    assert "hash cannot be computed" in got[1].message
    assert not lint_text("deny exec /tmp/**", fail_open=False)


def test_lint_flags_rules_that_make_a_hot_path_uncacheable():
    got = checks(lint_text("kill exec /usr/** : !uid=0\naudit open /lib/**\n"
                           "deny open all : uid=1000\ndeny exec /usr/**\n"
                           "allow open /usr/** : uid=0\ndeny open /srv/app/** : uid=1000\n"
                           "deny open /usr/lib/** : uid=1000\naudit open fstype=nfs"))
    assert [g for g in got if g[1] == "uncacheable"] == [
        (1, "uncacheable", "warning"), (2, "uncacheable", "warning"),
        (3, "uncacheable", "warning"), (7, "uncacheable", "warning")]


def test_lint_flags_trust_in_comm_and_unheld_events_and_impossible_rules():
    got = checks(lint_text("allow open /a : comm=backup\ndeny open /b : !comm=backup\n"
                           "deny open /c : comm=evil\ndeny access /d\n"
                           "deny open /p/** !/**", events=("open", "exec")))
    assert got == [(1, "spoofable", "warning"), (2, "spoofable", "warning"),
                   (4, "events", "error"), (5, "never-matches", "error")]


def test_a_clean_rule_set_lints_clean():
    text = ("only /usr/sbin/httpd open /var/www/html/**\ndeny exec /tmp/** /var/tmp/** /dev/shm/**\n"
            "deny(EIO) open /srv/secrets/** : !exe=/usr/bin/backup-agent\n"
            f"audit any sha256={HASH_A}")
    assert lint_text(text, events=("open", "exec")) == []


def test_glob_relations_used_by_the_linter():
    assert glob_covers(b"/var/**", b"/var/www/*.php")
    assert glob_covers(b"/var/*/x", b"/var/www/x")
    assert not glob_covers(b"/var/www/**", b"/var/**")
    assert glob_disjoint(b"/etc/**", b"/var/**")
    assert not glob_disjoint(b"/var/**", b"/var/www/x")
    assert glob_disjoint(b"/a/*.conf", b"/a/b.txt")


# --- exclusions over writable directories (reads the filesystem) ----------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown test directories")
def test_exclusions_over_directories_non_root_users_can_write(tmp_path):
    os.chmod(tmp_path, 0o755)
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    world = tmp_path / "world"
    world.mkdir()
    os.chmod(world, 0o777)
    owned = tmp_path / "owned"
    owned.mkdir(mode=0o755)
    os.chown(owned, 65534, 65534)
    group = tmp_path / "group"
    group.mkdir()
    os.chmod(group, 0o775)
    os.chown(group, 0, 100)
    swap = owned / "inner"           # root's directory inside a user's: the user can swap it
    swap.mkdir(mode=0o755)
    found = check_writable_exclusions([
        f"{safe}/**", f"{world}/**", f"{owned}/*.log", f"{group}/", f"{world}/not-yet/**",
        f"{swap}/**", f"{tmp_path}/s*/**"])
    msgs = [f.message for f in found]
    assert all(f.severity == "error" and f.key == "exclude.paths" for f in found)
    assert len(found) == 5, msgs
    assert "world-writable" in msgs[0] and "owned by uid 65534" in msgs[1]
    assert "group-writable (gid 100)" in msgs[2]
    assert "does not exist" in msgs[3] and "can create it" in msgs[3]
    assert "can replace" in msgs[4]
    exe = owned / "tool"
    exe.write_text("")
    os.chmod(exe, 0o755)
    [f] = check_writable_exclusions([], exes=[os.fsencode(exe)])
    assert f.key == "exclude.exe" and "owned by uid 65534" in f.message
    os.chmod(world, stat.S_IRWXU)


# --- speed: printed, never asserted ---------------------------------------------------------------------
def realistic_rules(n: int = 200) -> str:
    lines = []
    for i in range(n):
        tree = ["/var/www/site%d", "/srv/app%d/data", "/opt/vendor%d", "/home/*/proj%d",
                "/data/share%d"][i % 5] % i
        lines.append([f"only /usr/sbin/httpd{i} open {tree}/**",
                      f"deny exec {tree}/**/*.sh {tree}/bin/**",
                      f"deny(EIO) open {tree}/secret/** : !exe=/usr/bin/agent{i} !uid=0",
                      f"audit open,exec {tree}/*.conf : uid=1000",
                      f"kill exec {tree}/tmp/ : !uid=0"][(i // 5) % 5])
    return "\n".join(lines)


def test_timing_of_200_rules_is_reported():
    rs = RuleSet(parse(realistic_rules()))

    class S:
        exe, comm, uid, gid, loginuid, unit, cgroup, parent_exe = (b"/usr/bin/python3", "python3",
                                                                   1000, 1000, 1000, None, None,
                                                                   None)

    class O:
        def __init__(self, path):
            self.path, self.fstype, self.ftype = path, "ext4", "regular"

        def sha256(self):
            return None

    for path in (b"/usr/lib/x86_64-linux-gnu/libc.so.6", b"/home/u/.cache/x",
                 b"/var/www/site5/index.html"):
        o = O(path)
        n = 20000
        t = min(timeit.repeat(lambda: rs.evaluate("open", S, o), number=n, repeat=5)) / n * 1e6
        print(f"\n200 rules, evaluate(open, {path.decode()}): {t:.2f} µs")
