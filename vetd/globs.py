"""Path globs compiled to byte regexes, because kernel paths are bytes and `**` must cross `/`.

Syntax: `*` matches within one path component, `**` matches any number of components (including
none), `?` one byte other than `/`, `[...]` a byte class (`[!...]` negated). A pattern ending in
`/` or `/**` matches everything beneath that directory. Patterns must be absolute.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


class GlobError(ValueError):
    """A glob that cannot be compiled; the message says where and why."""


def _translate(pattern: str) -> bytes:
    if not pattern.startswith("/"):
        raise GlobError(f"glob {pattern!r} must be an absolute path")
    if pattern.endswith("/"):
        pattern += "**"
    raw = pattern.encode("utf-8", "surrogateescape")
    out = [b"\\A"]
    i, n = 0, len(raw)
    while i < n:
        c = raw[i:i + 1]
        if c == b"*":
            if raw[i:i + 2] == b"**":
                j = i + 2
                before_ok = i == 0 or raw[i - 1:i] == b"/"
                if before_ok and raw[j:j + 1] == b"/":
                    out.append(b"(?:[^/]*/)*")  # "**/" : zero or more whole components
                    i = j + 1
                    continue
                if before_ok and j == n:
                    out.append(b".*")  # trailing "/**": everything beneath
                    i = j
                    continue
                raise GlobError(f"glob {pattern!r}: '**' must be a whole path component")
            out.append(b"[^/]*")
            i += 1
        elif c == b"?":
            out.append(b"[^/]")
            i += 1
        elif c == b"[":
            j = raw.find(b"]", i + 2 if raw[i + 1:i + 2] in (b"!", b"^") else i + 1)
            if j < 0:
                raise GlobError(f"glob {pattern!r}: unclosed '[' at column {i + 1}")
            body = raw[i + 1:j]
            neg = body[:1] in (b"!", b"^")
            if neg:
                body = body[1:]
            body = body.replace(b"\\", b"\\\\").replace(b"[", b"\\[")  # no nested sets
            out.append(b"[" + (b"^/" if neg else b"") + body + b"]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    out.append(b"\\Z")
    return b"".join(out)


@dataclass(frozen=True)
class GlobSet:
    """Several globs matched as one regex: one C-level match per lookup, whatever their number."""

    patterns: tuple[str, ...]
    _regex: "re.Pattern[bytes] | None"

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> "GlobSet":
        pats = tuple(patterns)
        if not pats:
            return cls(pats, None)
        parts = [_translate(p) for p in pats]
        try:
            rx = re.compile(b"|".join(b"(?:" + p + b")" for p in parts), re.DOTALL)
        except re.error as e:  # a bad class such as [z-a]
            raise GlobError(f"glob set {list(pats)!r}: {e}") from e
        return cls(pats, rx)

    def __bool__(self) -> bool:
        return self._regex is not None

    def matches(self, path: bytes) -> bool:
        return self._regex is not None and self._regex.match(path) is not None


def glob_match(pattern: str, path: bytes) -> bool:
    """Match one glob against one path (convenience for tests and the linter)."""
    return GlobSet.compile([pattern]).matches(path)
