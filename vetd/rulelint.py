"""The rule linter: what in a rule set is unsafe or pointless, said before it runs.

`lint` is pure: it reads the rules, the watch list and the exclusions, and decides what it can
syntactically (a glob such as /var/** covers /var/www/*.php; an exe list covers a smaller one).
What it cannot decide it does not report, so a finding is always worth reading. The one check
that must look at the filesystem, exclusions that cover directories writable by non-root users,
is `check_writable_exclusions`.

Severities: "error" when rules do not do what they say in a way that lets an access through that
the rule set means to refuse (a deny that can never fire, a contradiction, an unvetted drop-box);
"warning" when something is pointless or costly.
"""

from __future__ import annotations

import fnmatch
import glob as globmod
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .config import ExcludeConfig
from .globs import glob_match
from .mounts import is_under
from .rules import _ATTRS, _META, _TEXT_META, Cond, Rule, RuleSet, glob_head, render_perms

# Trees whose files are opened all the time; a rule that keeps them out of the kernel cache
# costs every process on the machine a userspace round trip per open.
HOT_TREES = (b"/usr", b"/lib", b"/lib32", b"/lib64", b"/libx32", b"/bin", b"/sbin", b"/etc")
HOT_SUBTREES = (b"/usr/lib", b"/usr/lib32", b"/usr/lib64", b"/usr/libexec", b"/usr/bin",
                b"/usr/sbin", b"/usr/share", b"/usr/local", b"/usr/local/lib", b"/usr/local/bin")


@dataclass(frozen=True)
class Finding:
    severity: str                   # "warning" or "error"
    check: str                      # short name of the check, e.g. "shadowed"
    message: str
    rule: int | None = None         # rule number
    file: str | None = None
    line: int | None = None
    key: str | None = None          # the configuration key, for findings about the config

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file else (self.key or "rules")
        what = f" (rule {self.rule})" if self.rule is not None else ""
        return f"{where}: {self.severity}: {self.message}{what}"


def _finding(rule: Rule, severity: str, check: str, message: str) -> Finding:
    return Finding(severity, check, message, rule.number, rule.file, rule.line)


def _show(v: object) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    return str(v)


# --- syntactic set relations between values ----------------------------------------------------
def _tree_root(g: bytes) -> bytes | None:
    """D for a glob "D/**" (or "D/") with D literal: the glob matches everything beneath D."""
    if g.endswith(b"/**"):
        d = g[:-3]
    elif g.endswith(b"/"):
        d = g[:-1]
    else:
        return None
    return None if _META.search(d) else d


def _literal_head(g: bytes) -> bytes:
    """The literal text every match of g starts with."""
    m = _META.search(g)
    return g if m is None else g[:m.start()]


def _is_literal(g: bytes) -> bool:
    return _META.search(g) is None and not g.endswith(b"/")


def _gmatch(pattern: bytes, path: bytes) -> bool:
    return glob_match(pattern.decode("utf-8", "surrogateescape"), path)


def glob_covers(a: bytes, b: bytes) -> bool:
    """Whether every path glob b matches, glob a matches too (True only when decidable)."""
    if a == b:
        return True
    if _is_literal(b):
        return _gmatch(a, b)
    d = _tree_root(a)
    if d is not None:
        return _literal_head(b).startswith(d + b"/")
    return False


def glob_disjoint(a: bytes, b: bytes) -> bool:
    """Whether no path matches both globs (True only when decidable)."""
    if _is_literal(a) and _is_literal(b):
        return a != b
    if _is_literal(a):
        return not _gmatch(b, a)
    if _is_literal(b):
        return not _gmatch(a, b)
    ha, hb = glob_head(a), glob_head(b)
    return not (is_under(ha, hb) or is_under(hb, ha))


def _path_globs(attr: str, v: bytes) -> tuple[bytes, ...]:
    """A path condition's value as globs: dir=D is D itself and everything beneath."""
    if attr == "dir":
        return (b"/**",) if v == b"/" else (v, v + b"/**")
    return (v,)


def _text_covers(a: str, b: str) -> bool:
    return a == b or (not _TEXT_META.search(b) and fnmatch.fnmatchcase(b, a))


def _text_disjoint(a: str, b: str) -> bool:
    la, lb = not _TEXT_META.search(a), not _TEXT_META.search(b)
    if la and lb:
        return a != b
    if la:
        return not fnmatch.fnmatchcase(a, b)
    if lb:
        return not fnmatch.fnmatchcase(b, a)
    return False


def _kind(semantic: str) -> str:
    return "path" if semantic == "path" else _ATTRS[semantic].kind


def value_covers(semantic: str, a: tuple[str, object], b: tuple[str, object]) -> bool:
    """Whether value a (attr, value) admits everything value b admits."""
    kind = _kind(semantic)
    if kind == "path":
        ga, gb = _path_globs(*a), _path_globs(*b)   # type: ignore[arg-type]
        return all(any(glob_covers(x, y) for x in ga) for y in gb)
    av, bv = a[1], b[1]
    if kind == "pathglob":
        return glob_covers(av, bv)                  # type: ignore[arg-type]
    if kind == "cgroup":
        return glob_covers(av.encode(), bv.encode())  # type: ignore[union-attr]
    if kind == "text":
        return _text_covers(av, bv)                 # type: ignore[arg-type]
    return av == bv


def value_disjoint(semantic: str, a: tuple[str, object], b: tuple[str, object]) -> bool:
    kind = _kind(semantic)
    if kind == "path":
        return all(glob_disjoint(x, y) for x in _path_globs(*a)   # type: ignore[arg-type]
                   for y in _path_globs(*b))                      # type: ignore[arg-type]
    av, bv = a[1], b[1]
    if kind == "pathglob":
        return glob_disjoint(av, bv)                # type: ignore[arg-type]
    if kind == "cgroup":
        return glob_disjoint(av.encode(), bv.encode())  # type: ignore[union-attr]
    if kind == "text":
        return _text_disjoint(av, bv)               # type: ignore[arg-type]
    return av != bv


# --- a rule as per-attribute sets ----------------------------------------------------------------
Values = list[tuple[str, object]]


class _Shape:
    """A rule's conditions per semantic attribute: (positive values or None, negated values).
    An `only` rule whose allowed subjects are one positive condition is the deny it means
    (`only exe=/a` is `deny ... : !exe=/a`, unknown facts included); other `only` rules keep
    their subjects opaque and are compared only for equality."""

    def __init__(self, rule: Rule):
        self.rule = rule
        self.restrictive = rule.restrictive
        conds: list[Cond] = list(rule.objects)
        self.opaque = False
        subs = list(rule.subjects)
        if rule.only:
            sems = {_ATTRS[c.attr].semantic for c in subs}
            if len(sems) == 1 and not any(c.negated for c in subs):
                subs = [Cond(c.attr, True, c.values) for c in subs]
            else:
                self.opaque = True
                subs = []
        conds += subs
        self.conds: dict[str, tuple[Values | None, Values]] = {}
        for c in conds:
            sem = _ATTRS[c.attr].semantic
            pos, neg = self.conds.get(sem, (None, []))
            vals = [(c.attr, v) for v in c.values]
            if c.negated:
                neg = neg + vals
            else:
                pos = (pos or []) + vals
            self.conds[sem] = (pos, neg)

    def objects_and_subjects_equal(self, other: "_Shape") -> bool:
        return (self.rule.objects == other.rule.objects and self.rule.subjects == other.rule.subjects
                and self.rule.only == other.rule.only)


def _covers(a: _Shape, b: _Shape) -> bool:
    """Whether rule a matches every event rule b matches (perms aside), when decidable."""
    if a.opaque or b.opaque:
        if a.opaque and b.opaque and a.rule.subjects != b.rule.subjects:
            return False
        if a.opaque and not b.opaque:
            return False
        if b.opaque and not a.opaque and any(_ATTRS[s].side == "subject" for s in a.conds):
            return False
    for sem, (a_pos, a_neg) in a.conds.items():
        b_pos, b_neg = b.conds.get(sem, (None, []))
        if a_pos is not None:
            if b_pos is None:
                return False
            if not all(any(value_covers(sem, x, y) for x in a_pos) for y in b_pos):
                return False
        for x in a_neg:
            if any(value_covers(sem, y, x) for y in b_neg):
                continue
            if b_pos is not None and all(value_disjoint(sem, x, y) for y in b_pos):
                continue
            return False
        # an unknown value fails a permissive rule's condition but satisfies a restrictive
        # rule's negated-only one
        if not a.restrictive and b.restrictive and b_pos is None:
            return False
    return True


def _never_matches(shape: _Shape) -> str | None:
    for sem, (pos, neg) in shape.conds.items():
        if pos and neg and all(any(value_covers(sem, n, p) for n in neg) for p in pos):
            return (f"every value of {sem} it requires is also excluded "
                    f"({', '.join(_show(v) for _, v in neg)})")
    return None


# --- the checks ----------------------------------------------------------------------------------
def _positive_paths(rule: Rule) -> list[tuple[str, bytes]]:
    return [(c.attr, v) for c in rule.objects if c.attr in ("path", "dir") and not c.negated
            for v in c.values]


def _head(attr: str, v: bytes) -> bytes:
    return v if attr == "dir" else glob_head(v)


def _shadowing(shapes: list[_Shape], i: int) -> list[Finding]:
    b = shapes[i]
    rule = b.rule
    remaining = set(rule.perms)
    coverers: list[tuple[_Shape, frozenset[str]]] = []
    for a in shapes[:i]:
        ov = a.rule.perms & remaining
        if ov and _covers(a, b):
            remaining -= ov
            coverers.append((a, frozenset(ov)))
            if not remaining:
                break
    if not coverers:
        return []
    for a, _ in coverers:
        if a.rule == rule:
            return [_finding(rule, "warning", "duplicate",
                             f"duplicates {a.rule.describe()}: it can never match")]
    for a, ov in coverers:
        if a.objects_and_subjects_equal(b) and (a.rule.action, a.rule.errno) != (rule.action,
                                                                                  rule.errno):
            sev = "error" if a.restrictive != b.restrictive else "warning"
            return [_finding(rule, sev, "contradiction",
                             f"contradicts {a.rule.describe()}: same conditions, but that rule "
                             f"says {a.rule.action} for {render_perms(ov)} and matches first, so "
                             f"this {rule.action} never applies")]
    names = ", ".join(a.rule.describe() for a, _ in coverers)
    differ = [a for a, _ in coverers if a.restrictive != b.restrictive]
    severity = "error" if differ else "warning"
    if remaining:
        covered = render_perms(frozenset(rule.perms - remaining))
        return [_finding(rule, severity, "shadowed",
                         f"never applies to {covered}: {names} matches every such event first")]
    if differ:
        return [_finding(rule, "error", "shadowed",
                         f"never applies: {names} matches every event it does first and says "
                         f"{differ[0].rule.action}")]
    return [_finding(rule, "warning", "shadowed",
                     f"never matches: {names} matches every event it does first")]


def _unwatched(rule: Rule, watched: list[bytes]) -> list[Finding]:
    paths = _positive_paths(rule)
    if not paths or not watched:
        return []
    outside = [(a, v) for a, v in paths
               if not any(is_under(_head(a, v), w) or is_under(w, _head(a, v)) for w in watched)]
    if not outside:
        return []
    sev = "error" if rule.restrictive else "warning"
    shown = ", ".join(_show(v) for _, v in outside)
    tops = ", ".join(_show(w) for w in watched)
    if len(outside) == len(paths):
        return [_finding(rule, sev, "unwatched", f"never matches: {shown} lies outside every "
                                                 f"watched tree ({tops})")]
    return [_finding(rule, "warning", "unwatched",
                     f"{shown} lies outside every watched tree ({tops}); that part never matches")]


def _excluded(rule: Rule, ex: ExcludeConfig) -> list[Finding]:
    out = []
    sev = "error" if rule.restrictive else "warning"

    def never(why: str, key: str) -> None:
        out.append(Finding(sev, "excluded", f"never matches: {why}", rule.number, rule.file,
                           rule.line, key))

    if ex.ops and rule.perms <= ex.ops:
        never(f"[exclude] ops lets {render_perms(rule.perms)} through before the rules",
              "exclude.ops")
    for c in rule.objects:
        if c.negated:
            continue
        if c.attr == "fstype" and set(c.values) <= set(ex.fs_types):
            never(f"fs type {', '.join(c.values)} is in [exclude] fs_types, never marked",
                  "exclude.fs_types")
        if c.attr == "ftype" and "regular" not in c.values:
            never(f"vetd lets files other than regular ones ({', '.join(c.values)}) through "
                  "before the rules", "exclude")
    paths = _positive_paths(rule)
    if paths and ex.paths:
        pats = [p.encode("utf-8", "surrogateescape") for p in ex.paths.patterns]
        if all(any(value_covers("path", ("path", x), pv) for x in pats) for pv in paths):
            never("[exclude] paths lets all of its paths through before the rules",
                  "exclude.paths")
    if paths and ex.only_paths:
        pats = [p.encode("utf-8", "surrogateescape") for p in ex.only_paths.patterns]
        if all(all(value_disjoint("path", ("path", x), pv) for x in pats) for pv in paths):
            never("none of its paths is in [exclude] only_paths, so none is vetted",
                  "exclude.only_paths")
    if not rule.only:
        for c in rule.subjects:
            if c.negated:
                continue
            if c.attr == "exe" and ex.exe and all(v in ex.exe for v in c.values):
                never("[exclude] exe lets these processes through before the rules",
                      "exclude.exe")
            if c.attr == "comm" and ex.comm and all(v in ex.comm for v in c.values):
                never("[exclude] comm lets these processes through before the rules",
                      "exclude.comm")
            if c.attr == "uid" and ex.uids and all(v in ex.uids for v in c.values):
                never("[exclude] uids lets these users through before the rules",
                      "exclude.uids")
    return out


def _broad(rule: Rule) -> str | None:
    """What hot tree a rule covers, or None."""
    paths = _positive_paths(rule)
    if not paths:
        narrowing = {c.attr for c in rule.objects if not c.negated} & {"fstype", "sha256"}
        return None if narrowing else "every watched file"
    for a, v in paths:
        h = _head(a, v)
        if any(is_under(t, h) for t in HOT_TREES) or h in HOT_SUBTREES:
            return f"every file under {_show(h)}"
    return None


def _uncacheable(rule: Rule) -> list[Finding]:
    if rule.action == "allow" or not (rule.subjects or rule.action == "audit"):
        return []
    where = _broad(rule)
    if where is None:
        return []
    why = ("who opens decides" if rule.subjects else "every open must be logged")
    return [_finding(rule, "warning", "uncacheable",
                     f"keeps {where} out of the kernel cache ({why}), so each open there is a "
                     "round trip to vetd (~20 µs instead of ~3 µs); narrow its paths"
                     + (" or drop its subject conditions" if rule.subjects else ""))]


def _fail_open(rules: tuple[Rule, ...]) -> list[Finding]:
    """Deny and kill rules under a fail-open degraded policy: one finding for the set, and one per
    rule that a fact vetd may fail to learn (the hash) turns into an allow."""
    restrictive = [r for r in rules if r.restrictive]
    if not restrictive:
        return []
    numbers = ", ".join(str(r.number) for r in restrictive[:20]) + (
        ", ..." if len(restrictive) > 20 else "")
    out = [Finding("warning", "fail-open",
                   f"{len(restrictive)} deny/kill rule(s) ({numbers}) under a fail-open degraded "
                   "policy: they hold only while vetd runs and answers in time; what the degraded "
                   "policy answers (overload, a restart) is allowed", key="scan")]
    for r in restrictive:
        if any(c.attr == "sha256" and not c.negated for c in r.objects):
            out.append(_finding(r, "warning", "fail-open",
                                "when the file's hash cannot be computed (too big, unreadable) "
                                "this rule does not match and the file falls to the fail-open "
                                "degraded policy"))
    return out


def _spoofable(rule: Rule) -> list[Finding]:
    trusting = [c for c in rule.subjects if c.attr == "comm" and (
        rule.only or c.negated == rule.restrictive)]
    if not trusting:
        return []
    return [_finding(rule, "warning", "spoofable",
                     "lets a process through on its comm, which any process can set (prctl "
                     "PR_SET_NAME, or the name of a file it runs); use exe=")]


def _events(rule: Rule, events: Iterable[str] | None) -> list[Finding]:
    if events is None:
        return []
    held = set(events)
    if rule.perms & held:
        return []
    sev = "error" if rule.restrictive else "warning"
    return [Finding(sev, "events", f"never matches: vetd holds no {render_perms(rule.perms)} "
                                   f"events ([daemon] events = {sorted(held)})", rule.number,
                    rule.file, rule.line, "daemon.events")]


def _self(shape: _Shape) -> list[Finding]:
    why = _never_matches(shape)
    if why is None:
        return []
    sev = "error" if shape.restrictive else "warning"
    return [_finding(shape.rule, sev, "never-matches", f"never matches: {why}")]


def lint(ruleset: RuleSet, *, watched: list[bytes], exclusions: ExcludeConfig, fail_open: bool,
         events: Iterable[str] | None = None) -> list[Finding]:
    """Everything unsafe or pointless in a rule set, in rule order."""
    shapes = [_Shape(r) for r in ruleset.rules]
    out: list[Finding] = []
    for i, rule in enumerate(ruleset.rules):
        out += _self(shapes[i])
        out += _shadowing(shapes, i)
        out += _unwatched(rule, watched)
        out += _excluded(rule, exclusions)
        out += _events(rule, events)
        out += _uncacheable(rule)
        out += _spoofable(rule)
    if fail_open:
        out += _fail_open(ruleset.rules)
    return out


# --- the filesystem check ------------------------------------------------------------------------
_GLOB_LIMIT = 1000


def _writable_by_non_root(st: os.stat_result) -> str | None:
    if st.st_mode & stat.S_IWOTH:
        return "world-writable"
    if st.st_uid != 0 and st.st_mode & stat.S_IWUSR:
        return f"owned by uid {st.st_uid}"
    if st.st_gid != 0 and st.st_mode & stat.S_IWGRP:
        return f"group-writable (gid {st.st_gid})"
    return None


def _targets_of(pattern: str) -> list[str]:
    """Where files the pattern covers come from: the file itself for a literal pattern, else the
    existing directories in which matching files are created."""
    if pattern.endswith("/"):
        pattern += "**"
    if not _TEXT_META.search(pattern):
        return [pattern]
    parts = pattern.split("/")
    cut = parts.index("**") if "**" in parts else len(parts) - 1
    base = "/".join(parts[:cut]) or "/"
    if not _TEXT_META.search(base):
        return [base]
    found = []
    for k, d in enumerate(globmod.iglob(base)):
        if k >= _GLOB_LIMIT:
            break
        if os.path.isdir(d):
            found.append(d)
    return found


def _why_writable(target: str) -> str | None:
    """Why a non-root user could put a file at or under target (or make target), or None."""
    probe = target
    while True:
        try:
            st = os.stat(probe)
            break
        except FileNotFoundError:
            parent = os.path.dirname(probe)
            if parent == probe:
                return None
            probe = parent
        except OSError:
            return None
    why = _writable_by_non_root(st)
    if why is not None:
        if probe != target:
            return f"{target} does not exist and {probe} is {why}, so a user can create it"
        return f"{target} is {why}"
    # whoever may rename entries of an ancestor can swap what lies beneath it for their own
    child, parent = probe, os.path.dirname(probe)
    while parent != child:
        try:
            pst, cst = os.stat(parent), os.lstat(child)
        except OSError:
            return None
        pwhy = _writable_by_non_root(pst)
        if pwhy is not None and not (pst.st_mode & stat.S_ISVTX and cst.st_uid == 0):
            return f"{parent} is {pwhy}, so a user can replace {child}"
        child, parent = parent, os.path.dirname(parent)
    return None


def check_writable_exclusions(paths: Iterable[str], *, exes: Iterable[bytes] = ()) -> list[Finding]:
    """Exclusions that make an unvetted drop-box: an [exclude] paths glob that covers a directory
    a non-root user can write to (they put a file there and vetd never looks at it), and an
    [exclude] exe whose binary a non-root user can replace. Reads the filesystem (stat only)."""
    out = []
    for pattern in paths:
        for d in _targets_of(pattern):
            why = _why_writable(d)
            if why is not None:
                out.append(Finding("error", "writable-exclusion",
                                   f"exclusion {pattern!r} covers what non-root users can write: "
                                   f"{why}; files put there are never vetted",
                                   key="exclude.paths"))
                break
    for exe in exes:
        p = os.fsdecode(exe)
        why = _why_writable(p)
        if why is not None:
            out.append(Finding("error", "writable-exclusion",
                               f"excluded exe {p!r} can be replaced by a non-root user: {why}; "
                               "whatever runs as it is never vetted", key="exclude.exe"))
    return out


__all__ = ["Finding", "lint", "check_writable_exclusions", "glob_covers", "glob_disjoint",
           "value_covers", "value_disjoint", "HOT_TREES"]
