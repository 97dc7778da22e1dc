"""The access-rule language: parse rule files into Rules and compile them into a RuleSet that names
the first rule deciding an event, reading only the subject and object facts that rule needs.

One rule a line (docs/rules.md has the whole language):

    only /usr/sbin/httpd open /var/www/html/**          # deny open there to every other exe
    deny exec /tmp/** /var/tmp/** /dev/shm/**
    deny(EIO) open /srv/secrets/** : !exe=/usr/bin/backup-agent
    kill exec /tmp/** : !uid=0
    audit any sha256=275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f

Grammar (a `\\` at the end of a line continues the rule on the next; `#` starting a word starts a
comment):

    rule     = action perms objects [ ":" subjects ]
             | "only" [ "(" ERRNO ")" ] subjects perms objects
    action   = "allow" | "deny" [ "(" ERRNO ")" ] | "audit" | "kill"
    perms    = perm { "," perm }          perm = "open" | "exec" | "access" | "any"
    objects  = "all" | term { term }      (object names: path dir fstype ftype sha256)
    subjects = term { term }              (subject names: exe comm uid gid loginuid unit cgroup pexe)
    term     = [ "!" ] values             a bare absolute path: path= among objects, exe= among subjects
             | [ "!" ] NAME "=" values | NAME "!=" values
    values   = value { "," value }        value = bare word | "quoted, with \\\\ \\" \\t \\n \\xNN"

Values of one name are alternatives (`exe=/a,/b`: either); negated values are all excluded
(`!exe=/a !exe=/b`: neither); different names must all hold. Rules are tried in order; the first
that matches decides; when none does, the event goes on to the scanners.

Unknown facts (a process that exited, a kernel thread without an exe, a hash that could not be
computed) never count as evidence for letting an access through: a positive condition on an unknown
value does not hold; a negated one holds in deny and kill rules (the opener is not proven to be the
exception) and fails in allow and audit rules; in an `only` rule an unknown value never proves that
the opener is one of the allowed subjects, so the access is denied.
"""

from __future__ import annotations

import errno as _errno
import fnmatch
import grp
import os
import pwd
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from .globs import GlobError, GlobSet

ACTIONS = ("allow", "deny", "audit", "kill")
RESTRICTIVE = frozenset({"deny", "kill"})      # actions that refuse the access
PERMS = ("open", "exec", "access")
ANY = frozenset(PERMS)
# The errnos the kernel takes in a FAN_DENY_ERRNO response (pre-content groups, 6.14+). EPERM is
# what a plain FAN_DENY gives in any class.
KERNEL_ERRNOS = ("EPERM", "EIO", "EBUSY", "ETXTBSY", "EAGAIN", "ENOSPC", "EDQUOT")
LOGINUID_UNSET = 4294967295                    # (uid_t)-1: a process no login session started
COMM_MAX = 15                                  # TASK_COMM_LEN - 1: the kernel truncates comm

# File types as FileObject.ftype reports them; aliases are accepted in rules and from objects.
FTYPES = ("regular", "dir", "symlink", "fifo", "socket", "char", "block")
FTYPE_ALIASES = {
    "regular": "regular", "file": "regular", "reg": "regular",
    "dir": "dir", "directory": "dir",
    "symlink": "symlink", "link": "symlink", "lnk": "symlink",
    "fifo": "fifo", "pipe": "fifo",
    "socket": "socket", "sock": "socket",
    "char": "char", "chr": "char", "chardev": "char",
    "block": "block", "blk": "block", "blockdev": "block",
}


@dataclass(frozen=True)
class _Attr:
    name: str
    side: str        # "subject" or "object"
    kind: str        # how values are read and matched (see _convert)
    model: str       # attribute of Subject/FileObject ("sha256" is a method)
    cost: int        # cheap facts are checked first
    semantic: str    # conditions on the same semantic attribute combine (path and dir: the path)


_ATTRS = {a.name: a for a in (
    _Attr("ftype", "object", "ftype", "ftype", 0, "ftype"),
    _Attr("fstype", "object", "fstype", "fstype", 1, "fstype"),
    _Attr("path", "object", "pathglob", "path", 2, "path"),
    _Attr("dir", "object", "dir", "path", 2, "path"),
    _Attr("uid", "subject", "uid", "uid", 3, "uid"),
    _Attr("gid", "subject", "gid", "gid", 4, "gid"),
    _Attr("loginuid", "subject", "loginuid", "loginuid", 5, "loginuid"),
    _Attr("comm", "subject", "text", "comm", 6, "comm"),
    _Attr("exe", "subject", "pathglob", "exe", 7, "exe"),
    _Attr("unit", "subject", "text", "unit", 8, "unit"),
    _Attr("cgroup", "subject", "cgroup", "cgroup", 9, "cgroup"),
    _Attr("pexe", "subject", "pathglob", "parent_exe", 10, "pexe"),
    _Attr("sha256", "object", "sha256", "sha256", 20, "sha256"),
)}
_ATTR_ORDER = {n: i for i, n in enumerate(("path", "dir", "fstype", "ftype", "sha256", "exe", "comm",
                                            "uid", "gid", "loginuid", "unit", "cgroup", "pexe"))}
# What procwatch remembers per process until the kernel reports a change (exec, set*id, comm).
REMEMBERED_SUBJECT_FACTS = frozenset({"exe", "comm", "uid", "gid"})
OBJECT_ATTRS = tuple(n for n in _ATTR_ORDER if _ATTRS[n].side == "object")
SUBJECT_ATTRS = tuple(n for n in _ATTR_ORDER if _ATTRS[n].side == "subject")
_META = re.compile(rb"[*?\[]")
_TEXT_META = re.compile(r"[*?\[]")


class RuleError(ValueError):
    """A rule file that must not be loaded. str() is "FILE:LINE:COL: expected ..., got ..."."""

    def __init__(self, file: str, line: int | None, col: int | None, message: str):
        self.file, self.line, self.col, self.message = file, line, col, message
        where = file if line is None else f"{file}:{line}:{col}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, order=True)
class Cond:
    """One condition: `attr` is (or, negated, is none of) one of `values`, kept sorted."""

    attr: str
    negated: bool
    values: tuple


@dataclass(frozen=True)
class Rule:
    """One parsed rule. Two rules compare equal when they mean the same (location aside)."""

    number: int = field(compare=False)      # 1-based over the whole rule set
    file: str = field(compare=False)
    line: int = field(compare=False)
    text: str = field(compare=False)        # the source, as written (comments dropped)
    action: str                             # allow | deny | audit | kill ("only" rules: deny)
    errno: str | None                       # deny/only: the errno asked for; None = daemon default
    perms: frozenset[str]                   # of "open", "exec", "access"
    objects: tuple[Cond, ...]               # () = all objects
    subjects: tuple[Cond, ...]              # () = every subject
    only: bool = False                      # deny unless the subject matches all of `subjects`

    @property
    def subject_dependent(self) -> bool:
        """Whether who opens matters: such a rule keeps the files it covers out of the kernel cache."""
        return bool(self.subjects)

    @property
    def restrictive(self) -> bool:
        return self.action in RESTRICTIVE

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def canonical(self) -> str:
        """The rule in the canonical spelling; parse(canonical()) gives an equal rule."""
        head = ("only" if self.only else self.action) + (f"({self.errno})" if self.errno else "")
        perms = render_perms(self.perms)
        objs = " ".join(_render_cond(c, True) for c in self.objects) or "all"
        subs = " ".join(_render_cond(c, self.only) for c in self.subjects)
        if self.only:
            return f"{head} {subs} {perms} {objs}"
        return f"{head} {perms} {objs}" + (f" : {subs}" if subs else "")

    def describe(self) -> str:
        return f"rule {self.number} ({self.where})"


def _globset(patterns: Iterable[str]) -> GlobSet:
    """GlobSet.compile, quiet about re's FutureWarning for a '[' inside a class ("[[]"), which
    is a literal '[' today and the only way a glob can name one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return GlobSet.compile(patterns)


# --- rendering -----------------------------------------------------------------------------------
def render_perms(perms: frozenset[str]) -> str:
    return "any" if perms == ANY else ",".join(p for p in PERMS if p in perms)


_BARE_BAD = set(' \t\r\n"\\,')


def render_value(attr: str, v: object) -> str:
    """One value as it must be written: bare when that reads back the same, else quoted."""
    if isinstance(v, int):
        return "unset" if attr == "loginuid" and v == LOGINUID_UNSET else str(v)
    if isinstance(v, bytes):
        text = v.decode("utf-8", "surrogateescape")
    else:
        text = str(v)
    if text and text[0] not in "!#" and all(ch.isprintable() and ch not in _BARE_BAD
                                            and not "\udc80" <= ch <= "\udcff" for ch in text):
        return text
    out = ['"']
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xdc00:02x}")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\n":
            out.append("\\n")
        elif not ch.isprintable():
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8"))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _render_cond(c: Cond, bare_paths: bool) -> str:
    vals = ",".join(render_value(c.attr, v) for v in c.values)
    neg = "!" if c.negated else ""
    if c.attr == "path" or (c.attr == "exe" and bare_paths):   # the bare-path spelling
        return neg + vals
    return f"{neg}{c.attr}={vals}"


# --- reading text --------------------------------------------------------------------------------
class _Line:
    """One logical line: its characters and, for each, the (line, column) it came from."""

    __slots__ = ("chars", "pos", "end", "text")

    def __init__(self, chars: str, pos: list[tuple[int, int]], end: tuple[int, int], text: str):
        self.chars, self.pos, self.end, self.text = chars, pos, end, text


def _logical_lines(text: str, file: str) -> Iterable[_Line]:
    """Split text into rules: drop comments, join `\\`-continued lines, track every position."""
    chars: list[str] = []
    pos: list[tuple[int, int]] = []
    line, col = 1, 0
    i, n = 0, len(text)
    quote_at: tuple[int, int] | None = None
    while i < n:
        ch = text[i]
        col += 1
        if quote_at is not None:
            if ch == "\n":
                raise RuleError(file, *quote_at, "expected a closing '\"' for the string opened "
                                                 "here, got end of line")
            chars.append(ch)
            pos.append((line, col))
            if ch == "\\" and i + 1 < n and text[i + 1] != "\n":
                chars.append(text[i + 1])
                pos.append((line, col + 1))
                i += 1
                col += 1
            elif ch == '"':
                quote_at = None
            i += 1
            continue
        if ch == "\n":
            if "".join(chars).strip():
                yield _line(chars, pos, (line, col))
            chars, pos = [], []
            line, col = line + 1, 0
            i += 1
            continue
        if ch == "#" and (not chars or chars[-1] in " \t\r"):
            j = text.find("\n", i)
            j = n if j < 0 else j
            col += j - i - 1
            i = j
            continue
        if ch == "\\":
            j = text.find("\n", i)
            if not text[i + 1:n if j < 0 else j].strip(" \t\r"):
                # a continuation: the rule goes on on the next line
                chars.append(" ")
                pos.append((line, col))
                if j < 0:
                    break
                i = j + 1
                line, col = line + 1, 0
                continue
        if ch == '"':
            quote_at = (line, col)
        chars.append(ch)
        pos.append((line, col))
        i += 1
    if quote_at is not None:
        raise RuleError(file, *quote_at, "expected a closing '\"' for the string opened here, "
                                         "got end of file")
    if "".join(chars).strip():
        yield _line(chars, pos, (line, col + 1))


def _line(chars: list[str], pos: list[tuple[int, int]], end: tuple[int, int]) -> _Line:
    s = "".join(chars)
    # Rule.text: the source with runs of blanks outside quotes (continuations) made one space
    text = "".join(part if k % 2 else re.sub(r"[ \t\r]+", " ", part)
                   for k, part in enumerate(re.split(r'("(?:[^"\\]|\\.)*")', s))).strip()
    return _Line(s, pos, end, text)


class _Parser:
    """Recursive descent over one logical line; every error names where it is and what was due."""

    def __init__(self, ln: _Line, file: str):
        self.s, self.ln, self.file, self.i = ln.chars, ln, file, 0

    # positions and errors
    def at(self, i: int) -> tuple[int, int]:
        return self.ln.pos[i] if i < len(self.s) else self.ln.end

    def got(self, i: int) -> str:
        if i >= len(self.s) or not self.s[i:].strip():
            return "end of line"
        j = i
        while j < len(self.s) and self.s[j] not in " \t\r":
            j += 1
        word = self.s[i:j]
        if not word:
            return f"{self.s[i]!r}"
        return repr(word) if len(word) <= 60 else repr(word[:57] + "...")

    def fail(self, i: int, expected: str, got: str | None = None) -> RuleError:
        return RuleError(self.file, *self.at(i), f"expected {expected}, got {got or self.got(i)}")

    # lexing helpers
    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r":
            self.i += 1

    def at_end(self) -> bool:
        self.skip_ws()
        return self.i >= len(self.s)

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def ident(self) -> str:
        j = self.i
        while j < len(self.s) and (self.s[j].isalnum() or self.s[j] == "_"):
            j += 1
        word, self.i = self.s[self.i:j], j
        return word

    def term_end(self) -> bool:
        return self.i >= len(self.s) or self.s[self.i] in " \t\r"

    def peek_perm(self) -> bool:
        """Whether a permission list starts here (it ends an `only` rule's subjects)."""
        j = self.i
        while j < len(self.s) and self.s[j].isalpha():
            j += 1
        return self.s[self.i:j] in PERMS + ("any",) and (j >= len(self.s) or self.s[j] in " \t\r,")

    # the rule
    def rule(self, number: int) -> Rule:
        self.skip_ws()
        start = self.i
        kw = self.ident()
        if kw not in ACTIONS and kw != "only":
            if kw.lower() in ACTIONS + ("only",):
                raise self.fail(start, f"an action in lower case ({kw.lower()})")
            raise self.fail(start, "an action (allow, deny, audit, kill) or 'only'")
        if not self.term_end() and self.peek() != "(":
            raise self.fail(start, "an action (allow, deny, audit, kill) or 'only'")
        only = kw == "only"
        action = "deny" if only else kw
        errno = self.errno(action)
        subjects: tuple[Cond, ...] = ()
        if only:
            if self.at_end() or self.peek_perm():
                raise self.fail(self.i, "the subjects allowed (an exe path such as /usr/sbin/httpd, "
                                        "or uid=, comm=, ...) after 'only'")
            subjects = self.terms("subject", stop_at_perm=True)
        self.skip_ws()
        perms = self.perms()
        objects = self.objects()
        if not self.at_end():
            if only:
                raise self.fail(self.i, "end of the rule ('only' rules name their subjects first "
                                        "and take no ':' part)")
            self.i += 1   # the ':' (objects end only there)
            if self.i < len(self.s) and self.s[self.i] not in " \t\r":
                raise self.fail(self.i, "a space after ':'")
            if self.at_end():
                raise self.fail(self.i, "a subject condition after ':' (an exe path, or exe=, "
                                        "comm=, uid=, gid=, loginuid=, unit=, cgroup=, pexe=)")
            subjects = self.terms("subject")
        line = self.ln.pos[start][0]
        return Rule(number, self.file, line, self.ln.text, action, errno, perms, objects, subjects,
                    only)

    def errno(self, action: str) -> str | None:
        save = self.i
        self.skip_ws()
        if self.peek() != "(":
            self.i = save
            return None
        if action != "deny":
            raise self.fail(self.i, f"a permission (open, exec, access, any) after '{action}' "
                                    "(only deny and only take an errno)")
        self.i += 1
        self.skip_ws()
        at = self.i
        name = self.ident()
        if not name:
            raise self.fail(at, "an errno name such as EIO")
        if name not in KERNEL_ERRNOS:
            allowed = ", ".join(KERNEL_ERRNOS)
            if name == "EACCES":
                raise self.fail(at, f"an errno the kernel accepts in a deny ({allowed})",
                                "EACCES (FAN_DENY_ERRNO refuses it; use EPERM)")
            if isinstance(getattr(_errno, name, None), int) and name.isupper():
                raise self.fail(at, f"an errno the kernel accepts in a deny ({allowed})",
                                f"{name} (the kernel refuses it)")
            raise self.fail(at, f"an errno name ({allowed})", repr(name))
        self.skip_ws()
        if self.peek() != ")":
            raise self.fail(self.i, "')' after the errno")
        self.i += 1
        if not self.term_end():
            raise self.fail(self.i, "a space after ')'")
        return name

    def perms(self) -> frozenset[str]:
        out: set[str] = set()
        while True:
            at = self.i
            word = self.ident()
            if word == "any":
                out |= ANY
            elif word in PERMS:
                out.add(word)
            else:
                raise self.fail(at, "a permission (open, exec, access, any)")
            if self.peek() == ",":
                self.i += 1
                continue
            if not self.term_end():
                raise self.fail(self.i, "a space or ',' after the permission")
            return frozenset(out)

    def objects(self) -> tuple[Cond, ...]:
        if self.at_end():
            raise self.fail(self.i, "an object (a path glob such as /var/www/**, 'all', or "
                                    "dir=, fstype=, ftype=, sha256=)")
        if self.s.startswith("all", self.i) and (self.i + 3 >= len(self.s)
                                                 or self.s[self.i + 3] in " \t\r"):
            self.i += 3
            if not self.at_end() and self.peek() != ":":
                raise self.fail(self.i, "':' or end of the rule after 'all' (it stands alone)")
            return ()
        return self.terms("object")

    def terms(self, side: str, stop_at_perm: bool = False) -> tuple[Cond, ...]:
        raw: list[tuple[str, bool, object, int]] = []   # attr, negated, value, position
        while not self.at_end():
            if side == "object" and self.peek() == ":":
                break
            if stop_at_perm and self.peek_perm():
                break
            raw.extend(self.term(side))
        if not raw:
            raise self.fail(self.i, f"a {side} condition")
        return self.normalize(raw)

    def term(self, side: str) -> list[tuple[str, bool, object, int]]:
        start = self.i
        neg = False
        if self.peek() == "!":
            neg = True
            self.i += 1
        c = self.peek()
        if c in ('/', '"'):
            attr = "path" if side == "object" else "exe"
        elif c.isalpha():
            name_at = self.i
            attr = self.ident()
            if self.peek() == "!" and self.peek(1) == "=":
                if neg:
                    raise self.fail(start, "one negation ('!name=' or 'name!='), not both")
                neg = True
                self.i += 2
            elif self.peek() == "=":
                self.i += 1
            else:
                if attr in _ATTRS:
                    raise self.fail(self.i, f"'=' after '{attr}'")
                raise self.fail(start, self.expected_term(side))
            self.check_attr(attr, side, name_at)
        elif side == "subject" and c == ":":
            raise self.fail(self.i, "a subject condition (only one ':' per rule)")
        else:
            raise self.fail(start, self.expected_term(side))
        out = []
        while True:
            at = self.i
            value = self.convert(attr, self.value(attr), at)
            out.append((attr, neg, value, at))
            if self.peek() == ",":
                self.i += 1
                continue
            if not self.term_end():
                raise self.fail(self.i, "a space or ',' after the value")
            return out

    @staticmethod
    def expected_term(side: str) -> str:
        if side == "object":
            return ("an object condition (a path glob starting with '/', 'all', or "
                    "path=, dir=, fstype=, ftype=, sha256=)")
        return ("a subject condition (an exe path starting with '/', or exe=, comm=, uid=, gid=, "
                "loginuid=, unit=, cgroup=, pexe=)")

    def check_attr(self, attr: str, side: str, at: int) -> None:
        a = _ATTRS.get(attr)
        if a is not None and a.side == side:
            return
        if a is not None:
            hint = ("object conditions go before the ':'" if a.side == "object"
                    else "subject conditions go after a ' : '")
            raise self.fail(at, self.expected_term(side), f"{a.side} attribute '{attr}' ({hint})")
        import difflib
        names = OBJECT_ATTRS if side == "object" else SUBJECT_ATTRS
        close = difflib.get_close_matches(attr, list(_ATTRS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise self.fail(at, f"a {side} attribute ({', '.join(names)})",
                        f"unknown attribute '{attr}'{hint}")

    def value(self, attr: str) -> bytes:
        """One value: quoted (with escapes) or bare. Returned as bytes (paths are bytes)."""
        s, start = self.s, self.i
        if self.peek() == '"':
            out = bytearray()
            self.i += 1
            while True:
                if self.i >= len(s):
                    raise self.fail(start, "a closing '\"'")
                ch = s[self.i]
                if ch == '"':
                    self.i += 1
                    return bytes(out)
                if ch == "\\":
                    esc = self.peek(1)
                    if esc in ('"', "\\"):
                        out += esc.encode()
                        self.i += 2
                    elif esc == "t":
                        out += b"\t"
                        self.i += 2
                    elif esc == "n":
                        out += b"\n"
                        self.i += 2
                    elif esc == "x":
                        hx = s[self.i + 2:self.i + 4]
                        if len(hx) != 2 or any(h not in "0123456789abcdefABCDEF" for h in hx):
                            raise self.fail(self.i, "two hex digits after '\\x'",
                                            repr(s[self.i:self.i + 4]))
                        out.append(int(hx, 16))
                        self.i += 4
                    else:
                        raise self.fail(self.i, "an escape (\\\\, \\\", \\t, \\n or \\xNN)",
                                        repr(s[self.i:self.i + 2]))
                    continue
                if not ch.isprintable() and ch != "\t":
                    raise self.fail(self.i, "a printable character (write others as \\xNN)",
                                    f"U+{ord(ch):04X}")
                out += ch.encode("utf-8")
                self.i += 1
        bracket = False
        while self.i < len(s):
            ch = s[self.i]
            if ch in " \t\r" or (ch == "," and not bracket):
                break
            if ch in '"\\':
                raise self.fail(self.i, "a value without quotes or backslashes, or a whole value "
                                        "in quotes (\"...\", with \\xNN escapes)", repr(ch))
            if not ch.isprintable():
                raise self.fail(self.i, "a printable character (write others as \\xNN inside "
                                        "quotes)", f"U+{ord(ch):04X}")
            if ch == "[":
                bracket = True
            elif ch == "]":
                bracket = False
            self.i += 1
        word = s[start:self.i]
        if not word:
            raise self.fail(start, f"a value for {attr}")
        if word[0] == "!":
            raise self.fail(start, f"a value (negate the condition, not the value: write "
                                   f"!{attr}={word[1:]} or {attr}!={word[1:]})")
        return word.encode("utf-8")

    def convert(self, attr: str, raw: bytes, at: int) -> object:
        """Check and convert one value for its attribute."""
        kind = _ATTRS[attr].kind
        shown = render_value(attr, raw)
        shown = shown if shown.startswith('"') else f"'{shown}'"
        if kind in ("pathglob", "dir", "cgroup"):
            if not raw.startswith(b"/"):
                raise self.fail(at, f"an absolute path (starting with '/') for {attr}", shown)
            if b"\0" in raw:
                raise self.fail(at, f"a path without NUL bytes for {attr}", shown)
        if kind == "pathglob":
            try:
                _globset([raw.decode("utf-8", "surrogateescape")])
            except GlobError as e:
                raise self.fail(at, f"a valid glob for {attr}", f"{shown}: {e}") from None
            return raw
        if kind == "dir":
            if _META.search(raw):
                raise self.fail(at, "a directory without wildcards for dir= (use a glob, e.g. "
                                    "/home/*/.ssh/**)", shown)
            return raw.rstrip(b"/") or b"/"
        if kind in ("uid", "gid", "loginuid"):
            text = raw.decode("utf-8", "replace")
            if text.isascii() and text.isdigit():
                v = int(text)
                if v > LOGINUID_UNSET:
                    raise self.fail(at, f"an id below 2^32 for {attr}", text)
                return v
            if kind == "loginuid" and text == "unset":
                return LOGINUID_UNSET
            try:
                return (grp.getgrnam(text).gr_gid if kind == "gid" else pwd.getpwnam(text).pw_uid)
            except KeyError:
                what = "group" if kind == "gid" else "user"
                raise self.fail(at, f"a {what} name or number for {attr}"
                                + (" (or 'unset')" if kind == "loginuid" else ""),
                                f"{shown} (no such {what})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(at, f"UTF-8 text for {attr}", shown) from None
        if kind == "text":
            if attr == "comm" and not _TEXT_META.search(text) and len(raw) > COMM_MAX:
                raise self.fail(at, f"a command name of at most {COMM_MAX} bytes (the kernel "
                                    "truncates comm; use the first 15 bytes or exe=)",
                                f"{shown} ({len(raw)} bytes)")
            return text
        if kind == "cgroup":
            try:
                _globset([text])
            except GlobError as e:
                raise self.fail(at, "a valid glob for cgroup", f"{shown}: {e}") from None
            return text
        if kind == "fstype":
            if not re.fullmatch(r"[a-z0-9][a-z0-9_.+-]*", text):
                raise self.fail(at, "a filesystem type name such as ext4, tmpfs or fuse.sshfs",
                                shown)
            return text
        if kind == "ftype":
            canon = FTYPE_ALIASES.get(text)
            if canon is None:
                raise self.fail(at, f"a file type ({', '.join(FTYPES)})", shown)
            return canon
        if kind == "sha256":
            if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
                raise self.fail(at, "64 hex digits (a SHA-256) for sha256",
                                f"{shown} ({len(text)} characters)")
            return text.lower()
        raise AssertionError(kind)

    def normalize(self, raw: list[tuple[str, bool, object, int]]) -> tuple[Cond, ...]:
        """Merge the values of each (attribute, negation) and refuse a value both required and
        excluded (a rule that could never match)."""
        groups: dict[tuple[str, bool], dict[object, int]] = {}
        for attr, neg, value, at in raw:
            groups.setdefault((attr, neg), {}).setdefault(value, at)
        for (attr, neg), vals in groups.items():
            if neg:
                continue
            for v, at in vals.items():
                other = groups.get((attr, True), {})
                if v in other:
                    shown = render_value(attr, v)
                    raise self.fail(other[v], "conditions that can match together",
                                    f"{attr}={shown} and !{attr}={shown} in the same rule")
        return tuple(sorted((Cond(a, n, tuple(sorted(v))) for (a, n), v in groups.items()),
                            key=lambda c: (_ATTR_ORDER[c.attr], c.negated)))


def parse(text: str, file: str = "<rules>", start_number: int = 1) -> list[Rule]:
    """Parse rule text into Rules numbered from start_number, or raise RuleError."""
    rules = []
    for ln in _logical_lines(text, file):
        rules.append(_Parser(ln, file).rule(start_number + len(rules)))
    return rules


def decode_rules_file(raw: bytes, file: str) -> str:
    """Rule files are UTF-8; a bad byte is an error naming its line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        col = len(raw[line_start:e.start].decode("utf-8", "replace")) + 1
        raise RuleError(file, line, col, "expected UTF-8 text (write other bytes as \\xNN inside "
                                         f"quotes), got byte 0x{raw[e.start]:02x}") from None


def load_dir(path: str) -> "RuleSet":
    """Load every *.rules file of a directory, in file-name order, as one RuleSet. A missing
    directory is an empty set; any error is a RuleError and loads nothing."""
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return empty()
    except NotADirectoryError:
        raise RuleError(path, None, None, "expected a directory of *.rules files, got a file") from None
    except OSError as e:
        raise RuleError(path, None, None, f"cannot read: {e.strerror}") from None
    rules: list[Rule] = []
    files: list[str] = []
    for name in names:
        if not name.endswith(".rules") or name.startswith("."):
            continue
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            continue
        try:
            with open(fp, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            raise RuleError(fp, None, None, f"cannot read: {e.strerror}") from None
        rules.extend(parse(decode_rules_file(raw, fp), fp, start_number=len(rules) + 1))
        files.append(fp)
    return RuleSet(rules, files=tuple(files))


def empty() -> "RuleSet":
    return RuleSet(())


# --- compiling -----------------------------------------------------------------------------------
Check = Callable[[object, object], bool]


def glob_head(pattern: bytes) -> bytes:
    """The directory every match of a glob lies in or under (its literal leading directories),
    or, for a pattern without wildcards, the literal path itself."""
    m = _META.search(pattern)
    if m is None:
        return pattern.rstrip(b"/") or b"/"
    head = pattern[:m.start()]
    return head[:head.rfind(b"/")] or b"/"


def _path_keys(cond_values: Iterable[tuple[str, bytes]]) -> set[bytes]:
    return {v if attr == "dir" else glob_head(v) for attr, v in cond_values}


def _bytes_matcher(globs: Sequence[bytes], lits: Iterable[bytes] = (),
                   dirs: Sequence[bytes] = ()) -> Callable[[bytes], bool]:
    """A test for bytes values (paths, exes): literal set, globs, directory trees."""
    lit = frozenset(lits) | frozenset(g for g in globs if not _META.search(g) and not g.endswith(b"/"))
    wild = [g for g in globs if _META.search(g) or g.endswith(b"/")]
    gs = _globset(g.decode("utf-8", "surrogateescape") for g in wild)
    if b"/" in dirs:
        return lambda v: v.startswith(b"/")
    under = tuple(d + b"/" for d in dirs)
    exact = lit | frozenset(dirs)
    if not under and not gs:
        return exact.__contains__
    if not under and not exact:
        return gs.matches
    if not gs:
        return lambda v: v in exact or v.startswith(under)
    return lambda v: v in exact or (under and v.startswith(under)) or gs.matches(v)


def _text_matcher(values: Sequence[str], path_globs: bool) -> Callable[[str], bool]:
    lits = frozenset(v for v in values if not _TEXT_META.search(v))
    wild = [v for v in values if _TEXT_META.search(v)]
    if not wild:
        return lits.__contains__
    if path_globs:   # cgroup paths: `*` stays within a component, `**` crosses them
        gs = _globset(wild)
        return lambda v: v in lits or gs.matches(v.encode("utf-8", "surrogateescape"))
    rx = re.compile("|".join(f"(?:{fnmatch.translate(w)})" for w in wild), re.DOTALL)
    return lambda v: v in lits or rx.match(v) is not None


def _value_matcher(semantic: str, conds: Sequence[Cond]) -> Callable[[object], bool] | None:
    """One test for the values of conditions on one semantic attribute (None: no values)."""
    if not conds:
        return None
    if semantic == "path":
        globs = [v for c in conds if c.attr == "path" for v in c.values]
        dirs = [v for c in conds if c.attr == "dir" for v in c.values]
        return _bytes_matcher(globs, (), dirs)
    values = [v for c in conds for v in c.values]
    kind = _ATTRS[conds[0].attr].kind
    if kind == "pathglob":
        return _bytes_matcher(values)
    if kind == "text":
        return _text_matcher(values, path_globs=False)
    if kind == "cgroup":
        return _text_matcher(values, path_globs=True)
    if kind == "ftype":
        s = frozenset(values)
        return lambda v: FTYPE_ALIASES.get(v, v) in s
    if kind == "sha256":
        s = frozenset(values)
        return lambda v: v.lower() in s
    return frozenset(values).__contains__


def _getter(attr: str) -> Callable[[object, object], object]:
    a = _ATTRS[attr]
    if a.model == "sha256":
        return lambda s, o: o.sha256()
    get = attrgetter(a.model)
    if a.side == "object":
        return lambda s, o: get(o)
    return lambda s, o: get(s)


def _attr_check(get: Callable[[object, object], object], pos: Callable[[object], bool] | None,
                neg: Callable[[object], bool] | None, on_unknown: bool) -> Check:
    """value in pos and value not in neg; an unknown (None) value gives on_unknown."""
    if neg is None:
        def check(s: object, o: object) -> bool:
            v = get(s, o)
            return on_unknown if v is None else pos(v)  # type: ignore[misc]
    elif pos is None:
        def check(s: object, o: object) -> bool:
            v = get(s, o)
            return on_unknown if v is None else not neg(v)
    else:
        def check(s: object, o: object) -> bool:
            v = get(s, o)
            return on_unknown if v is None else (pos(v) and not neg(v))
    return check


def _compile_conds(conds: Sequence[Cond], mode: str) -> list[tuple[int, Check]]:
    """(cost, check) per semantic attribute. mode: "permissive" (every condition on an unknown
    fact fails), "restrictive" (a negated-only condition on an unknown fact holds), "proof" (all
    fail: used for an `only` rule's allowed subjects), "may" (all hold: could it match?)."""
    by: dict[str, list[Cond]] = {}
    for c in conds:
        by.setdefault(_ATTRS[c.attr].semantic, []).append(c)
    out = []
    for semantic, cs in by.items():
        pos = _value_matcher(semantic, [c for c in cs if not c.negated])
        neg = _value_matcher(semantic, [c for c in cs if c.negated])
        if mode == "may":
            on_unknown = True
        elif mode == "restrictive":
            on_unknown = pos is None
        else:
            on_unknown = False
        cost = min(_ATTRS[c.attr].cost for c in cs)
        out.append((cost, _attr_check(_getter(cs[0].attr), pos, neg, on_unknown)))
    return out


def _not_all(checks: Sequence[Check]) -> Check:
    def not_excepted(s: object, o: object) -> bool:
        for c in checks:
            if not c(s, o):
                return True
        return False
    return not_excepted


class _Compiled:
    __slots__ = ("rule", "index", "checks", "may_checks", "path_keys")

    def __init__(self, rule: Rule, index: int):
        self.rule, self.index = rule, index
        mode = "restrictive" if rule.restrictive else "permissive"
        parts = _compile_conds(rule.objects, mode)
        if rule.only:
            allowed = [c for _, c in sorted(_compile_conds(rule.subjects, "proof"),
                                            key=lambda t: t[0])]
            cost = max(_ATTRS[c.attr].cost for c in rule.subjects)
            parts.append((cost, _not_all(allowed)))
        else:
            parts.extend(_compile_conds(rule.subjects, mode))
        parts.sort(key=lambda t: t[0])
        self.checks = tuple(c for _, c in parts)
        self.may_checks = tuple(c for _, c in sorted(_compile_conds(rule.objects, "may"),
                                                     key=lambda t: t[0]))
        pos_path = [(c.attr, v) for c in rule.objects if c.attr in ("path", "dir")
                    and not c.negated for v in c.values]
        self.path_keys = _path_keys(pos_path) if pos_path else None


class _PermIndex:
    """The rules of one perm, indexed by the literal leading directory of each positive path
    condition, so that a path no rule covers costs a dict lookup or two. A directory holding many
    rules also gets one combined matcher (a single regex) that must pass before its rules are
    tried one by one."""

    __slots__ = ("entries", "prefixes", "gates", "pathless", "decisive")
    GATE_AT = 3   # rules under one directory before it gets a combined matcher

    def __init__(self, entries: list[_Compiled]):
        self.entries = entries
        buckets: dict[bytes, list[int]] = {}
        pathless = []
        for p, e in enumerate(entries):
            if e.path_keys is None:
                pathless.append(p)
            else:
                for k in e.path_keys:
                    buckets.setdefault(k, []).append(p)
        prefixes: dict[bytes, tuple[int, ...]] = {}
        for k in buckets:
            prefixes.setdefault(b"/", ())
            j = k.find(b"/", 1)
            while j > 0:
                prefixes.setdefault(k[:j], ())
                j = k.find(b"/", j + 1)
        gates = {}
        for k, ps in buckets.items():
            prefixes[k] = tuple(ps)
            if len(ps) >= self.GATE_AT:
                conds = [c for p in ps for c in entries[p].rule.objects
                         if c.attr in ("path", "dir") and not c.negated]
                gates[k] = _value_matcher("path", conds)
        self.prefixes = prefixes
        self.gates = gates
        self.pathless = tuple(pathless)
        # the positions whose rule is not a plain allow (for may_match_object)
        self.decisive = frozenset(p for p, e in enumerate(entries) if e.rule.action != "allow")

    def candidates(self, path: bytes | None) -> Sequence[int]:
        """Positions, in rule order, of the rules that may match this path."""
        pre = self.prefixes
        if not pre or path is None:   # a positive path condition never holds for an unknown path
            return self.pathless
        get, gates = pre.get, self.gates
        found = []
        t = pre[b"/"]
        if t and (b"/" not in gates or gates[b"/"](path)):
            found.append(t)
        j = path.find(b"/", 1)
        while j > 0:
            k = path[:j]
            t = get(k)
            if t is None:
                break
            if t and (k not in gates or gates[k](path)):
                found.append(t)
            j = path.find(b"/", j + 1)
        else:
            t = get(path)
            if t and (path not in gates or gates[path](path)):
                found.append(t)
        if not found:
            return self.pathless
        if len(found) == 1 and not self.pathless:
            return found[0]
        return sorted(set(self.pathless).union(*found))


class RuleSet:
    """A compiled, ordered rule set. Immutable but for the hit counters."""

    def __init__(self, rules: Iterable[Rule], files: tuple[str, ...] = ()):
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.files = files
        self.hits: list[int] = [0] * len(self.rules)
        self._position = {id(r): i for i, r in enumerate(self.rules)}
        compiled = [_Compiled(r, i) for i, r in enumerate(self.rules)]
        self._index = {perm: _PermIndex([e for e in compiled if perm in e.rule.perms])
                       for perm in PERMS}
        self._index = {p: ix for p, ix in self._index.items() if ix.entries}
        attrs = {c.attr for r in self.rules for c in r.objects + r.subjects}
        self.needs_subject = any(r.subjects for r in self.rules)
        self.subject_attrs = frozenset(_ATTRS[c.attr].model for r in self.rules for c in r.subjects)
        self.needs_path = bool(attrs & {"path", "dir"})
        self.needs_hash = "sha256" in attrs

    def __len__(self) -> int:
        return len(self.rules)

    def position(self, rule: Rule) -> int:
        """The index of one of this set's rules in `rules`."""
        return self._position[id(rule)]

    def memo_attrs(self) -> tuple[str, ...] | None:
        """The opener facts (Subject attribute names) that, with the file's identity, version
        and mount, determine every rule's outcome; None if no such small set exists: a sha256
        condition (content can change within one timestamp tick) or a fact vetd cannot tell
        has changed without reading /proc (loginuid, cgroup, unit, parent exe)."""
        if self.needs_hash or not self.subject_attrs <= REMEMBERED_SUBJECT_FACTS:
            return None
        return tuple(sorted(self.subject_attrs))

    def evaluate(self, perm: str, subject: object, obj: object) -> Rule | None:
        """The first rule that matches this event, or None (the scanners decide)."""
        ix = self._index.get(perm)
        if ix is None:
            return None
        entries = ix.entries
        for p in ix.candidates(obj.path if ix.prefixes else None):  # type: ignore[attr-defined]
            e = entries[p]
            for check in e.checks:
                if not check(subject, obj):
                    break
            else:
                self.hits[e.index] += 1
                return e.rule
        return None

    def may_match_object(self, perm: str, obj: object) -> bool:
        """Whether some rule other than a plain allow could match this object for some opener:
        then the file must not be cached in the kernel (a later opener could be denied, killed or
        audited). perm "any" asks for every perm. Unknown facts count as "could match"."""
        for p in (PERMS if perm == "any" else (perm,)):
            ix = self._index.get(p)
            if ix is None or not ix.decisive:
                continue
            path = obj.path if ix.prefixes else None  # type: ignore[attr-defined]
            if path is None and ix.prefixes and any(
                    ix.entries[q].path_keys is not None for q in ix.decisive):
                return True
            for q in ix.candidates(path):
                if q not in ix.decisive:
                    continue
                for check in ix.entries[q].may_checks:
                    if not check(None, obj):
                        break
                else:
                    return True
        return False

    def hit_table(self) -> list[dict[str, object]]:
        """Per-rule hit counts for status output."""
        return [{"rule": r.number, "where": r.where, "text": r.text, "hits": self.hits[i]}
                for i, r in enumerate(self.rules)]
