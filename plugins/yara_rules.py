"""YARA scanner: deny files that match any of a set of YARA rules, read through the event fd.

Rules are compiled once per configuration, in the constructor (vetd builds a new instance at
start and on every reload, so a broken rule file fails the reload and the running rules stay).
Each scan reads the file's content through the event fd into private memory and matches it
with `Rules.match(data=...)`; the file is never opened or matched by path.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import mmap
import os
import re
import stat
from collections.abc import Mapping
from typing import Any

import yara

from vetd.sdk import API_VERSION, check_keys, Opener, Plugin, PluginConfigError, ScanFile, Verdict

log = logging.getLogger("vetd.plugins.yara")

DEFAULT_TIMEOUT_S = 10
DEFAULT_MAX_SIZE = 64 << 20
RULE_SUFFIXES = (".yar", ".yara")
KNOWN_KEYS = frozenset({"rules", "timeout_s", "max_size", "externals"})
# Files up to this size are read with one pread into bytes; larger ones into anonymous memory,
# extent by extent, so the holes of a sparse file are never read.
_SMALL = 1 << 20
_NAMESPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_YARA_WHERE = re.compile(r"^(?P<file>.*)\((?P<line>\d+)\): (?P<msg>.*)$", re.S)
_SIZE_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "K": 1 << 10, "M": 1 << 20,
               "G": 1 << 30, "B": 1}

# Thread safety. vetd calls scan() from several workers at once, all on one compiled Rules.
# - libyara shares one YR_RULES between threads: each yr_rules_scan_* call builds its own scan
#   context, and only yr_rules_define_*_variable changes the shared object (docs/capi.rst,
#   "Using a scanner": such changes affect "every worker using the YR_RULES"). The maintainer,
#   asked "Is Yara scanner supposed to be thread safe?" (VirusTotal/yara#976): "Yes, it's
#   supposed to be thread-safe."
# - yara-python's Rules.match releases the GIL around the libyara scan, so workers really scan
#   in parallel (measured: another thread ran freely through a 1 s match); yara.compile releases
#   it too (yara-python PR #183), which keeps a reload's compile off the read loop's back.
# - Two things on a shared Rules are NOT safe, so this plugin never does them after __init__:
#   match(externals=...) writes the values into the shared YR_RULES (process_match_externals in
#   yara-python.c calls yr_rules_define_*_variable), racing with the other workers, so externals
#   are fixed at compile time; and iter(rules) returns the Rules object itself, whose one cursor
#   all iterations share (measured), so the rule count is taken once, here.
# test_concurrent_scans_on_one_rules_object_all_get_their_own_answer checks this on this build.
#
# match(data=...) takes any bytes-like object without copying it (yara-python 4.5 parses it as a
# Py_buffer, format "s*"): bytes, a memoryview, an mmap. Why not then mmap the event fd
# (ScanFile.mmap)? A file mapping SIGBUSes when the file is truncated under it, and a SIGBUS
# kills vetd, which fails open (DESIGN.md section 3). Measured with yara-python 4.5.4: libyara
# wraps its own scan in YR_TRYCATCH (sigsetjmp and a SIGBUS handler, libyara/exception.h), so a
# truncation during the scan comes back as yara.Error ("could not map file") - but the same
# mapping touched from Python afterwards (bytes(mm), a slice, another plugin) killed the process
# with SIGBUS. And even the caught case is a scan *failure*: any user who can write a file could
# truncate it during scans to feed the degraded policy and trip the circuit breaker. So the
# content is copied with pread into private memory (bytes, or an anonymous mapping that no
# truncation can touch), bounded by max_size: one memcpy from the page cache, cheap next to the
# scan. A file that shrinks while it is read is scanned as read; the write that shrank it makes
# vetd vet it again.


class YaraRules(Plugin):
    """The built-in YARA plugin. Attributes for status and logs: `rule_count`, `rule_files`
    (the compiled files in order), `namespaces`, `timeout_s`, `max_size`, `externals`."""

    name = "yara"
    api_version = API_VERSION

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        check_keys(config, KNOWN_KEYS)
        self.timeout_s = _positive_int(config, "timeout_s", DEFAULT_TIMEOUT_S)
        self.max_size = _size(config, "max_size", DEFAULT_MAX_SIZE)
        self.externals = _externals(config.get("externals", {}))
        by_namespace = _rule_files(config.get("rules"))
        self.rule_files: tuple[str, ...] = tuple(p for files in by_namespace.values() for p in files)
        self.namespaces: tuple[str, ...] = tuple(by_namespace)
        self.rules = _compile(by_namespace, self.externals)
        self.rule_count = sum(1 for _ in self.rules)  # once: iteration is not thread-safe
        log.info("%d rule(s) compiled from %d file(s): %s", self.rule_count,
                 len(self.rule_files), ", ".join(self.rule_files))

    def scan(self, file: ScanFile, opener: Opener) -> Verdict:
        size = file.size
        if size > self.max_size:
            return Verdict.allow("yara: skipped, too big")
        left = file.time_left(self.timeout_s)
        if left <= 0:
            raise yara.TimeoutError("the open was answered by policy before the scan began")
        timeout = min(self.timeout_s, math.ceil(left))  # libyara counts whole seconds
        content, length = _read_content(file.fileno(), size)
        try:
            if isinstance(content, bytes):
                matches = self._match(content, timeout)
            else:
                with memoryview(content) as whole, whole[:length] as window:
                    matches = self._match(window, timeout)
        finally:
            if isinstance(content, mmap.mmap):
                content.close()
        if not matches:
            return Verdict.allow()
        first = matches[0]
        if first.namespace == "default":
            return Verdict.deny(f"yara:{first.rule}")
        return Verdict.deny(f"yara:{first.namespace}:{first.rule}")

    def _match(self, data: bytes | memoryview, timeout: int) -> list[Any]:
        """The matching rules, in rule order. A timeout or any other yara.Error is raised: the
        host answers it by this plugin's on_failure policy."""
        try:
            return self.rules.match(data=data, timeout=timeout)
        except yara.TimeoutError as e:
            raise yara.TimeoutError(f"no answer within {timeout} s (timeout_s = {self.timeout_s}, "
                                    f"{len(data)} bytes)") from e


# --- configuration ----------------------------------------------------------------------------
def _positive_int(config: Mapping[str, Any], key: str, default: int) -> int:
    v = config.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise PluginConfigError(f"{key}: expected a positive whole number of seconds, got {v!r}")
    return v


def _size(config: Mapping[str, Any], key: str, default: int) -> int:
    """Bytes, or a string such as "64MiB" (the host's [scan] max_size syntax)."""
    v = config.get(key, default)
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    if isinstance(v, str):
        for suffix, mult in sorted(_SIZE_UNITS.items(), key=lambda kv: -len(kv[0])):
            number = v[: -len(suffix)].strip()
            if v.endswith(suffix) and number.isdigit() and int(number) > 0:
                return int(number) * mult
    raise PluginConfigError(f"{key}: expected a positive size (bytes, or like \"64MiB\"), got {v!r}")


def _externals(table: Any) -> dict[str, str | int | float | bool]:
    if not isinstance(table, Mapping):
        raise PluginConfigError("externals: expected a table of name = value")
    out: dict[str, str | int | float | bool] = {}
    for name, value in table.items():
        if not _IDENTIFIER.fullmatch(name):
            raise PluginConfigError(f"externals: {name!r} is not a YARA identifier")
        if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < 1 << 63:
            raise PluginConfigError(f"externals.{name}: {value} does not fit in 64 bits")
        if not isinstance(value, (str, int, float, bool)):
            raise PluginConfigError(f"externals.{name}: expected a string, number or boolean, "
                                    f"got {type(value).__name__}")
        out[name] = value
    return out


def _rule_files(entries: Any) -> dict[str, list[str]]:
    """namespace -> rule files in order. An entry is a path (a rule file, or a directory whose
    *.yar and *.yara files are taken in name order), or a table {path = ..., namespace = ...}."""
    if not isinstance(entries, list) or not entries:
        raise PluginConfigError("rules: expected a non-empty list of rule files or directories")
    out: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        namespace = "default"
        if isinstance(entry, Mapping):
            extra = set(entry) - {"path", "namespace"}
            if extra or not isinstance(entry.get("path"), str):
                raise PluginConfigError("rules: a table entry is {path = \"...\", namespace = \"...\"}")
            namespace = entry.get("namespace", "default")
            if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
                raise PluginConfigError(f"rules: namespace {namespace!r} must be a name like "
                                        f"\"vendor_x\" (letters, digits, _ . -)")
            entry = entry["path"]
        if not isinstance(entry, str) or not entry:
            raise PluginConfigError(f"rules: expected a path, got {entry!r}")
        for path in _expand(os.path.abspath(entry)):
            key = (namespace, os.path.realpath(path))
            if key not in seen:  # listed twice, or by itself and through its directory
                seen.add(key)
                out.setdefault(namespace, []).append(path)
    if not out:
        raise PluginConfigError(f"rules: no *.yar or *.yara files in {', '.join(map(str, entries))}")
    return out


def _expand(path: str) -> list[str]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise PluginConfigError(f"rules: cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise PluginConfigError(f"rules: cannot list {path}: {e.strerror}") from None
        files = [os.path.join(path, n) for n in names
                 if n.endswith(RULE_SUFFIXES) and not n.startswith(".")
                 and os.path.isfile(os.path.join(path, n))]
    elif stat.S_ISREG(st.st_mode):
        files = [path]
    else:
        raise PluginConfigError(f"rules: {path} is neither a file nor a directory")
    for f in files:
        if '"' in f or "\n" in f:  # an include "..." path cannot hold these
            raise PluginConfigError(f"rules: {f!r}: a rule file's path may not contain '\"' or a newline")
        try:
            with open(f, "rb"):
                pass
            mode = os.stat(f).st_mode
        except OSError as e:
            raise PluginConfigError(f"rules: cannot read {f}: {e.strerror}") from None
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning("%s is writable by group or others: whoever can write it can turn "
                        "detection off", f)
    return files


def _compile(by_namespace: dict[str, list[str]], externals: dict[str, Any]) -> yara.Rules:
    # Every file of a namespace is compiled as one source, as the yara command line does with
    # several files: rule names are unique within a namespace, and rules may refer to each other.
    # yara-python takes one file per namespace, so each namespace is a list of includes; errors
    # still name the included file and line.
    sources = {ns: "".join(f'include "{p}"\n' for p in files) for ns, files in by_namespace.items()}
    try:
        rules = yara.compile(sources=sources, externals=externals, includes=True)
    except yara.SyntaxError as e:
        raise PluginConfigError(f"rules: {_where(str(e))}") from None
    except yara.Error as e:
        raise PluginConfigError(f"rules: cannot compile: {e}") from None
    for warning in rules.warnings:
        log.warning("%s", _where(warning))
    return _compact(rules)


def _compact(rules: yara.Rules) -> yara.Rules:
    """The same rules, saved and loaded again in memory. Compiled rules keep the compiler's
    arena, slack included: 8.2 MiB of anonymous memory for the one bundled EICAR rule here,
    which every reader process holds; loaded from their 5 KiB saved form they take 0.1 MiB.
    Externals' definitions travel with the saved rules."""
    buf = io.BytesIO()
    rules.save(file=buf)
    buf.seek(0)
    return yara.load(file=buf)


def _where(message: str) -> str:
    """yara's "FILE(LINE): message" as "FILE:LINE: message", the form editors jump to."""
    m = _YARA_WHERE.match(message)
    return f"{m['file']}:{m['line']}: {m['msg']}" if m else message


# --- reading the file -------------------------------------------------------------------------
def _read_content(fd: int, size: int) -> tuple[bytes | mmap.mmap, int]:
    """The first `size` bytes of the file, read through `fd` into private memory, and how many of
    them there are (fewer if the file shrank while it was read)."""
    if size <= _SMALL:
        parts: list[bytes] = []
        got = 0
        while got < size:
            chunk = os.pread(fd, size - got, got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return data, len(data)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled, lazily
    try:
        with memoryview(buf) as view:
            return buf, _read_extents(fd, view, size)
    except BaseException:
        buf.close()
        raise


def _read_extents(fd: int, view: memoryview, size: int) -> int:
    """Fill view[:size] from the data extents of the file; holes stay zero and are not read."""
    off = 0
    while off < size:
        try:
            data_at = os.lseek(fd, off, os.SEEK_DATA)
            hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
        except OSError as e:
            if e.errno != errno.ENXIO:  # no SEEK_DATA here: read it all
                data_at, hole_at = off, size
            else:  # only a hole is left, or the file shrank: zeros up to its end now
                return min(size, max(off, os.fstat(fd).st_size))
        if data_at >= size:
            return size
        off, end = data_at, min(hole_at, size)
        while off < end:
            n = os.preadv(fd, [view[off:end]], off)
            if n == 0:  # truncated under us
                return off
            off += n
    return size
