"""TOML configuration: load, validate with errors that name file, key and reason, freeze.

A Config is an immutable value. A reload builds a whole new one or fails without touching the
running one, so the daemon never runs on a half-applied configuration.
"""

from __future__ import annotations

import errno
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .degraded import PathClass, PluginPolicy, Policy
from .globs import GlobError, GlobSet

POLICIES = ("allow", "deny")
# Keys of a [plugins.NAME] table that belong to the host, not to the plugin: enabled; use (the
# entry point, when it differs from NAME); on_failure; deadline_ms; failure_threshold and
# retry_after_s (the circuit breaker). They are stripped before the plugin sees its table.
HOST_KEYS = frozenset({"enabled", "use", "on_failure", "deadline_ms", "failure_threshold",
                       "retry_after_s", "isolation", "processes"})
EVENT_NAMES = ("open", "exec", "access")
MARK_KINDS = ("filesystem", "mount")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Pseudo filesystems whose files are not content anyone scans; they are not even marked.
DEFAULT_EXCLUDED_FS = (
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
    "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs", "autofs",
    "binfmt_misc", "efivarfs", "rpc_pipefs", "selinuxfs", "nsfs", "ramfs",
)


class ConfigError(ValueError):
    """A configuration that must not be loaded. str() is the one line an operator needs."""


@dataclass(frozen=True)
class DaemonConfig:
    watch: tuple[str, ...] = ("/",)
    mark: str = "filesystem"
    events: tuple[str, ...] = ("open", "exec")
    socket: str = "/run/vetd/control.sock"
    kernel_cache: bool = True
    deny_errno: str = "EPERM"
    log_level: str = "info"
    status_interval_s: float = 5.0
    busy_poll_us: int = 100
    readers: int = 1


@dataclass(frozen=True)
class ScanConfig:
    workers: int = 2
    processes: int = 0
    backlog: int = 4096
    deadline_ms: int = 5000
    max_size: int = 256 * 1024 * 1024
    on_timeout: str = "allow"
    on_error: str = "allow"
    on_backlog: str = "allow"
    on_too_big: str = "allow"


@dataclass(frozen=True)
class CacheConfig:
    entries: int = 100_000


@dataclass(frozen=True)
class ExcludeConfig:
    fs_types: tuple[str, ...] = DEFAULT_EXCLUDED_FS
    paths: GlobSet = field(default_factory=lambda: GlobSet.compile(()))
    only_paths: GlobSet = field(default_factory=lambda: GlobSet.compile(()))
    exe: frozenset[bytes] = frozenset()
    comm: frozenset[str] = frozenset()
    uids: frozenset[int] = frozenset()
    ops: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DegradedConfig:
    rescan: bool = False
    rescan_queue: int = 1024
    classes: tuple[PathClass, ...] = ()


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonConfig
    scan: ScanConfig
    cache: CacheConfig
    exclude: ExcludeConfig
    plugins: dict[str, dict[str, Any]]  # plugin name -> its own TOML table (validated by the plugin)
    plugin_policies: dict[str, PluginPolicy] = field(default_factory=dict)
    degraded: DegradedConfig = field(default_factory=DegradedConfig)
    rules_dir: str | None = None

    def policy(self) -> Policy:
        s = self.scan
        return Policy(s.on_timeout, s.on_error, s.on_backlog, s.on_too_big, self.degraded.classes,
                      self.plugin_policies)

    def with_watch(self, watch: tuple[str, ...]) -> "Config":
        """The `--watch` override: same config, another watch list."""
        from dataclasses import replace
        return replace(self, daemon=replace(self.daemon, watch=watch))


# --- validation helpers --------------------------------------------------------------------------
class _Section:
    """Pops keys from one TOML table so that whatever is left over is an unknown key."""

    def __init__(self, file: str, name: str, table: Any):
        self.file, self.name = file, name
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: [{name}] must be a table, not {type(table).__name__}")
        self.table = dict(table)

    def where(self, key: str) -> str:
        return f"{self.file}: [{self.name}] {key}"

    def _get(self, key: str, default: Any, types: type | tuple[type, ...], what: str) -> Any:
        if key not in self.table:
            return default
        value = self.table.pop(key)
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise ConfigError(f"{self.where(key)}: expected {what}, got a boolean")
        if not isinstance(value, types):
            raise ConfigError(f"{self.where(key)}: expected {what}, got {type(value).__name__} {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, default, bool, "true or false")

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        v = self._get(key, default, int, "an integer")
        if v < minimum or (maximum is not None and v > maximum):
            bound = f" and at most {maximum}" if maximum is not None else ""
            raise ConfigError(f"{self.where(key)}: must be at least {minimum}{bound}, got {v}")
        return v

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        v = float(self._get(key, default, (int, float), "a number"))
        if v < minimum:
            raise ConfigError(f"{self.where(key)}: must be at least {minimum}, got {v}")
        return v

    def string(self, key: str, default: str, *, choices: tuple[str, ...] | None = None) -> str:
        v = self._get(key, default, str, "a string")
        if choices is not None and v not in choices:
            raise ConfigError(f"{self.where(key)}: must be one of {', '.join(choices)}; got {v!r}")
        return v

    def strings(self, key: str, default: tuple[str, ...], *,
                choices: tuple[str, ...] | None = None) -> tuple[str, ...]:
        v = self._get(key, None, list, "a list of strings")
        if v is None:
            return default
        for item in v:
            if not isinstance(item, str):
                raise ConfigError(f"{self.where(key)}: expected a list of strings, found {item!r}")
            if choices is not None and item not in choices:
                raise ConfigError(f"{self.where(key)}: {item!r} is not one of {', '.join(choices)}")
        return tuple(v)

    def globs(self, key: str) -> GlobSet:
        pats = self.strings(key, ())
        try:
            return GlobSet.compile(pats)
        except GlobError as e:
            raise ConfigError(f"{self.where(key)}: {e}") from e

    def finish(self) -> None:
        if self.table:
            keys = ", ".join(sorted(self.table))
            raise ConfigError(f"{self.file}: [{self.name}] unknown key(s): {keys}")


def _size(sec: _Section, key: str, default: int) -> int:
    """Sizes as bytes or as strings such as "64MiB"."""
    if key not in sec.table:
        return default
    v = sec.table.pop(key)
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    if isinstance(v, str):
        units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "K": 1 << 10, "M": 1 << 20,
                 "G": 1 << 30, "B": 1}
        for suffix, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if v.endswith(suffix) and v[: -len(suffix)].strip().isdigit():
                return int(v[: -len(suffix)].strip()) * mult
    raise ConfigError(f"{sec.where(key)}: expected a positive size (bytes, or like \"64MiB\"), got {v!r}")


def _uid(sec: _Section, key: str, item: Any) -> int:
    import pwd
    if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
        return item
    if isinstance(item, str):
        try:
            return pwd.getpwnam(item).pw_uid
        except KeyError:
            raise ConfigError(f"{sec.where(key)}: no such user {item!r}") from None
    raise ConfigError(f"{sec.where(key)}: expected a user name or uid, got {item!r}")


def parse(text: str, file: str = "<config>") -> Config:
    """Validate TOML text into a Config, or raise ConfigError naming file, key and reason."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: not valid TOML: {e}") from e
    known = {"daemon", "scan", "cache", "exclude", "plugins", "degraded", "rules"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"{file}: unknown section(s): {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))})")

    d = _Section(file, "daemon", doc.get("daemon", {}))
    dd = DaemonConfig()
    watch = d.strings("watch", dd.watch)
    if not watch:
        raise ConfigError(f"{d.where('watch')}: must name at least one path")
    for w in watch:
        if not w.startswith("/"):
            raise ConfigError(f"{d.where('watch')}: {w!r} is not an absolute path")
    deny_errno = d.string("deny_errno", dd.deny_errno)
    if not (deny_errno.isupper() and isinstance(getattr(errno, deny_errno, None), int)):
        raise ConfigError(f"{d.where('deny_errno')}: {deny_errno!r} is not an errno name such as EPERM")
    daemon = DaemonConfig(
        watch=watch,
        mark=d.string("mark", dd.mark, choices=MARK_KINDS),
        events=d.strings("events", dd.events, choices=EVENT_NAMES) or dd.events,
        socket=d.string("socket", dd.socket),
        kernel_cache=d.boolean("kernel_cache", dd.kernel_cache),
        deny_errno=deny_errno,
        log_level=d.string("log_level", dd.log_level, choices=LOG_LEVELS),
        status_interval_s=d.number("status_interval_s", dd.status_interval_s, minimum=0.5),
        busy_poll_us=d.integer("busy_poll_us", dd.busy_poll_us, minimum=0, maximum=1000),
        readers=d.integer("readers", dd.readers, minimum=1, maximum=64),
    )
    if not daemon.socket.startswith("/"):
        raise ConfigError(f"{d.where('socket')}: {daemon.socket!r} is not an absolute path")
    d.finish()

    s = _Section(file, "scan", doc.get("scan", {}))
    sd = ScanConfig()
    scan = ScanConfig(
        workers=s.integer("workers", sd.workers, minimum=1, maximum=256),
        processes=s.integer("processes", sd.processes, minimum=0, maximum=64),
        backlog=s.integer("backlog", sd.backlog, minimum=1),
        deadline_ms=s.integer("deadline_ms", sd.deadline_ms, minimum=10, maximum=600_000),
        max_size=_size(s, "max_size", sd.max_size),
        on_timeout=s.string("on_timeout", sd.on_timeout, choices=POLICIES),
        on_error=s.string("on_error", sd.on_error, choices=POLICIES),
        on_backlog=s.string("on_backlog", sd.on_backlog, choices=POLICIES),
        on_too_big=s.string("on_too_big", sd.on_too_big, choices=POLICIES),
    )
    s.finish()

    c = _Section(file, "cache", doc.get("cache", {}))
    cache = CacheConfig(entries=c.integer("entries", CacheConfig.entries, minimum=0))
    c.finish()

    e = _Section(file, "exclude", doc.get("exclude", {}))
    uids_raw = e._get("uids", [], list, "a list of user names or uids")
    exclude = ExcludeConfig(
        fs_types=e.strings("fs_types", DEFAULT_EXCLUDED_FS),
        paths=e.globs("paths"),
        only_paths=e.globs("only_paths"),
        exe=frozenset(os.fsencode(x) for x in e.strings("exe", ())),
        comm=frozenset(e.strings("comm", ())),
        uids=frozenset(_uid(e, "uids", u) for u in uids_raw),
        ops=frozenset(e.strings("ops", (), choices=EVENT_NAMES)),
    )
    for x in exclude.exe:
        if not x.startswith(b"/"):
            raise ConfigError(f"{e.where('exe')}: {x!r} is not an absolute path")
    e.finish()

    g = _Section(file, "degraded", doc.get("degraded", {}))
    classes_raw = g._get("class", [], list, "an array of tables ([[degraded.class]])")
    classes = []
    for i, item in enumerate(classes_raw):
        pc = _Section(file, f"degraded.class #{i + 1}", item)
        name = pc.string("name", f"class{i + 1}")
        paths = pc.globs("paths")
        if not paths:
            raise ConfigError(f"{pc.where('paths')}: a path class needs at least one glob")
        classes.append(PathClass(
            name, paths,
            on_failure=pc.string("on_failure", None, choices=POLICIES) if "on_failure" in pc.table else None,
            on_backlog=pc.string("on_backlog", None, choices=POLICIES) if "on_backlog" in pc.table else None,
            on_too_big=pc.string("on_too_big", None, choices=POLICIES) if "on_too_big" in pc.table else None))
        pc.finish()
    degraded = DegradedConfig(rescan=g.boolean("rescan", False),
                              rescan_queue=g.integer("rescan_queue", 1024, minimum=1),
                              classes=tuple(classes))
    g.finish()

    r = _Section(file, "rules", doc.get("rules", {}))
    rules_dir = r.string("dir", "") or None
    if rules_dir is not None and not rules_dir.startswith("/"):
        raise ConfigError(f"{r.where('dir')}: {rules_dir!r} is not an absolute path")
    r.finish()

    plugins_raw = doc.get("plugins", {})
    if not isinstance(plugins_raw, dict):
        raise ConfigError(f"{file}: [plugins] must be a table of plugin tables")
    plugins: dict[str, dict[str, Any]] = {}
    policies: dict[str, PluginPolicy] = {}
    for name, table in plugins_raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: [plugins.{name}] must be a table")
        hp = _Section(file, f"plugins.{name}", {k: v for k, v in table.items() if k in HOST_KEYS})
        hp.boolean("enabled", True)
        hp.string("use", name)
        hp.string("isolation", "thread", choices=("thread", "process"))
        hp.integer("processes", 2, minimum=1, maximum=64)
        deadline = hp.integer("deadline_ms", 0, minimum=0, maximum=600_000)
        policies[name] = PluginPolicy(
            on_failure=hp.string("on_failure", None, choices=POLICIES) if "on_failure" in hp.table else None,
            deadline_s=deadline / 1000.0 if deadline else None,
            failure_threshold=hp.integer("failure_threshold", 5, minimum=1),
            retry_after_s=hp.number("retry_after_s", 30.0))
        plugins[name] = dict(table)
    if daemon.readers > 1 and scan.processes:
        raise ConfigError(f"{file}: [scan] processes = {scan.processes} cannot be combined with "
                          f"[daemon] readers = {daemon.readers}: both use the second core; choose one")
    return Config(file, daemon, scan, cache, exclude, plugins, policies, degraded, rules_dir)


def load(path: str) -> Config:
    """Read and validate a config file. Every failure is a ConfigError with a one-line reason."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 at byte {e.start}") from e
    return parse(text, path)
