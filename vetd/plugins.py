"""Finding and building scanner plugins: the one door every plugin, built-in or vendor, comes in by.

Plugins are named in the `vetd.plugins` entry-point group. A plugin's code runs as root inside
vetd, so its files must be root-owned and not writable by group or others; anything else is
refused before it is imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from .config import HOST_KEYS
from .sdk import API_VERSION, Plugin, PluginConfigError

log = logging.getLogger("vetd.plugins")
GROUP = "vetd.plugins"


class PluginError(Exception):
    """A plugin that cannot be loaded; str() names the plugin and the reason."""


def available() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def _check_file_safe(path: str) -> None:
    for p in (path, os.path.dirname(path)):
        st = os.stat(p)
        if st.st_uid != 0:
            raise PluginError(f"{p} is owned by uid {st.st_uid}, not root")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PluginError(f"{p} is writable by group or others (mode {stat.filemode(st.st_mode)})")


def _check_api(name: str, cls: type) -> None:
    want = getattr(cls, "api_version", None)
    try:
        major, minor = (int(x) for x in str(want).split("."))
    except ValueError:
        raise PluginError(f"plugin {name}: api_version {want!r} is not 'MAJOR.MINOR'") from None
    host_major, host_minor = (int(x) for x in API_VERSION.split("."))
    if major != host_major or minor > host_minor:
        raise PluginError(f"plugin {name}: written for SDK {want}, this vetd speaks {API_VERSION}")


def load(name: str, table: dict[str, Any]) -> Plugin:
    """Import, check and construct one plugin from its config table."""
    eps = available()
    use = table.get("use", name)
    ep = eps.get(use)
    if ep is None:
        known = ", ".join(sorted(eps)) or "none installed"
        raise PluginError(f"plugin {name}: {use!r} not found in entry-point group {GROUP} (known: {known})")
    module = ep.value.split(":", 1)[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        raise PluginError(f"plugin {name}: cannot find module {module}: {e}") from e
    if spec is None or spec.origin is None:
        raise PluginError(f"plugin {name}: cannot find module {module}")
    try:
        if spec.origin not in ("built-in", "frozen"):
            _check_file_safe(spec.origin)
    except PluginError as e:
        raise PluginError(f"plugin {name}: refused: {e}") from None
    try:
        cls = ep.load()
    except Exception as e:  # an import error in third-party code must not kill vetd
        raise PluginError(f"plugin {name}: import failed: {type(e).__name__}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginError(f"plugin {name}: {ep.value} is not a vetd.sdk.Plugin subclass")
    _check_api(name, cls)
    options = {k: v for k, v in table.items() if k not in HOST_KEYS}
    try:
        plugin = cls(options)
    except PluginConfigError as e:
        raise PluginError(f"[plugins.{name}] {e}") from e
    except Exception as e:
        raise PluginError(f"plugin {name}: failed to start: {type(e).__name__}: {e}") from e
    plugin.name = name  # type: ignore[misc]  # the instance is known by its table's name
    return plugin


def load_all(tables: dict[str, dict[str, Any]],
              isolate: Callable[[str, dict[str, Any]], Plugin] | None = None) -> list[Plugin]:
    """All enabled plugins, or PluginError for the first that fails (the others are closed).
    Tables with isolation = "process" are built by `isolate` when given (the daemon), after
    the plugin has loaded in-process once to prove its table is good; without it (a config
    check) they load in-process only."""
    loaded: list[Plugin] = []
    try:
        for name, table in tables.items():
            if not table.get("enabled", True):
                continue
            plugin = load(name, table)
            if isolate is not None and table.get("isolation", "thread") == "process":
                plugin.close()
                try:
                    plugin = isolate(name, table)
                except Exception as e:
                    raise PluginError(f"plugin {name}: cannot start its processes: {e}") from e
            loaded.append(plugin)
    except Exception:
        for p in loaded:
            p.close()
        raise
    return loaded
