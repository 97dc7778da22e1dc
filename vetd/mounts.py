"""Which filesystems to mark: read /proc/self/mountinfo and pick the mounts the watch list covers.

Marking is the cheapest exclusion of all: a filesystem that is not marked raises no event. So
excluded filesystem types are simply never marked, and mounts that appear later under a
watched path are marked when mountinfo changes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field)


@dataclass(frozen=True, slots=True)
class Mount:
    mount_id: int
    parent_id: int
    dev: int            # st_dev of the filesystem (makedev of major:minor)
    root: bytes         # the filesystem directory mounted here ("/" for a whole filesystem)
    mount_point: bytes
    fstype: str
    source: bytes


def parse_mountinfo(data: bytes) -> list[Mount]:
    """Parse mountinfo(5) text; lines that do not parse are skipped (the kernel's format is stable)."""
    mounts = []
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            left, right = line.split(b" - ", 1)
            f = left.split(b" ")
            r = right.split(b" ")
            major, minor = (int(x) for x in f[2].split(b":"))
            mounts.append(Mount(int(f[0]), int(f[1]), os.makedev(major, minor), _unescape(f[3]),
                                _unescape(f[4]), r[0].decode("ascii", "replace"), _unescape(r[1])))
        except (ValueError, IndexError):
            continue
    return mounts


def read_mountinfo() -> list[Mount]:
    with open("/proc/self/mountinfo", "rb") as fh:
        return parse_mountinfo(fh.read())


def is_under(path: bytes, top: bytes) -> bool:
    top = top.rstrip(b"/") or b"/"
    return top == b"/" or path == top or path.startswith(top + b"/")


def containing_mount(mounts: list[Mount], path: bytes) -> Mount | None:
    """The mount a path lives on: the last-mounted of the deepest mount points above it."""
    best: Mount | None = None
    for m in mounts:
        if is_under(path, m.mount_point) and (best is None or len(m.mount_point) >= len(best.mount_point)):
            best = m
    return best


@dataclass(frozen=True)
class MarkPlan:
    mounts: tuple[Mount, ...]       # one per filesystem (or per mount, for mount marks)
    skipped: tuple[Mount, ...]      # covered but of an excluded type
    scope: tuple[bytes, ...]        # directories limiting vetting to the watched trees (() when none needed)


def plan_marks(mounts: list[Mount], watch: Iterable[str], excluded_types: Iterable[str],
               per_mount: bool = False) -> MarkPlan:
    """Pick what to mark for the watch list: each watched path's own mount and every mount below.

    With filesystem marks a whole filesystem is seen even when only a directory of it is
    watched, so such watch paths also become a path scope for the exclusions.
    """
    excluded = set(excluded_types)
    chosen: dict[int, Mount] = {}
    skipped: dict[int, Mount] = {}
    scope: list[bytes] = []
    whole = True
    for w in watch:
        wb = os.fsencode(os.path.realpath(w))
        home = containing_mount(mounts, wb)
        covered = [m for m in mounts if is_under(m.mount_point, wb) and m.mount_point != wb]
        if home is not None:
            covered.insert(0, home)
            if home.mount_point != wb or home.root != b"/":
                whole = False
        for m in covered:
            key = m.mount_id if per_mount else m.dev
            if m.fstype in excluded:
                skipped.setdefault(key, m)
            else:
                chosen.setdefault(key, m)
        scope.append(wb)
    if whole:
        scope = []
    return MarkPlan(tuple(chosen.values()), tuple(skipped.values()), tuple(scope))
