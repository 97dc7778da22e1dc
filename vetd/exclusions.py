"""The layered skip lists (talpa's exclusions): which events vetd lets pass without a decision.

Pure: a function of the configuration, the operation and lazily known facts about the subject and
the object. Layers are ordered cheapest first so that an excluded event costs as little as can be.
Each layer says whether its answer depends on who opens, because only answers that depend on the
file alone may be cached in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .config import ExcludeConfig
from .mounts import is_under


class SubjectFacts(Protocol):
    @property
    def exe(self) -> bytes | None: ...
    @property
    def comm(self) -> str | None: ...
    @property
    def uid(self) -> int | None: ...


class ObjectFacts(Protocol):
    @property
    def is_regular(self) -> bool: ...
    @property
    def path(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Exclusion:
    layer: str          # "op", "filetype", "process", "path", "outside-watch"
    subject_dependent: bool


OP = Exclusion("op", False)
FILETYPE = Exclusion("filetype", False)
PROCESS = Exclusion("process", True)
PATH = Exclusion("path", False)
OUTSIDE_WATCH = Exclusion("outside-watch", False)


@dataclass(frozen=True)
class Exclusions:
    """Compiled exclusion layers. `scope` limits vetting to the watched trees when a watch path is
    a directory rather than a whole filesystem (a filesystem mark sees the whole filesystem)."""

    config: ExcludeConfig
    scope: tuple[bytes, ...] = ()

    @property
    def trivial(self) -> bool:
        """Nothing but the file-type layer: the read loop may take its fast path."""
        t = self.__dict__.get("_trivial")
        if t is None:
            c = self.config
            t = not (self.scope or c.ops or c.exe or c.comm or c.uids or c.paths or c.only_paths)
            object.__setattr__(self, "_trivial", t)
        return t

    @property
    def needs_subject(self) -> bool:
        c = self.config
        return bool(c.exe or c.comm or c.uids)

    @property
    def subject_attrs(self) -> frozenset[str]:
        """The opener facts the process layer reads (Subject attribute names)."""
        c = self.config
        return frozenset(n for n, used in (("exe", c.exe), ("comm", c.comm), ("uid", c.uids)) if used)

    def check(self, op: str, subject: SubjectFacts, obj: ObjectFacts) -> Exclusion | None:
        """The first layer that excludes this event, or None if it must be decided."""
        c = self.config
        if op in c.ops:
            return OP
        if not obj.is_regular:
            return FILETYPE
        if c.exe and subject.exe in c.exe:
            return PROCESS
        if c.comm and subject.comm in c.comm:
            return PROCESS
        if c.uids and subject.uid in c.uids:
            return PROCESS
        if self.scope or c.paths or c.only_paths:
            path = obj.path
            if path is None:
                return None  # unknown path: decide it, never skip it
            if self.scope and not any(is_under(path, top) for top in self.scope):
                return OUTSIDE_WATCH
            if c.only_paths and not c.only_paths.matches(path):
                return PATH
            if c.paths and c.paths.matches(path):
                return PATH
        return None
