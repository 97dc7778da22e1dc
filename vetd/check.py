"""Checking a configuration without running it: `vetd --check-config` and `vetctl check`.

Loads the config, its rules and its plugins exactly as the daemon would, then lints what loads
but is unsafe or pointless (rules no watched filesystem covers, shadowed rules, exclusions a
non-root user could use as a drop-box, rules that keep hot paths out of the kernel cache).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from .config import ConfigError, load
from .plugins import PluginError, load_all
from .rulelint import Finding, check_writable_exclusions, lint
from .rules import RuleError, empty, load_dir


@dataclass
class Report:
    path: str
    errors: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not any(f.severity == "error" for f in self.findings)

    def diagnostics(self) -> list[str]:
        """One line per error and finding (for stderr, the compiler way)."""
        return [f"{self.path}: error: {e}" for e in self.errors] + [str(f) for f in self.findings]

    def summary(self) -> str:
        return (f"{self.path}: {'OK' if self.ok else 'NOT OK'}"
                + (f" ({len(self.findings)} finding(s))" if self.findings else ""))

    def print(self) -> None:
        for line in self.diagnostics():
            print(line, file=sys.stderr)
        print(self.summary())


def check(path: str, watch: tuple[str, ...] | None = None) -> Report:
    report = Report(path)
    try:
        config = load(path)
        if watch:
            config = config.with_watch(watch)
    except ConfigError as e:
        report.errors.append(str(e).removeprefix(f"{path}: "))
        return report
    try:
        ruleset = load_dir(config.rules_dir) if config.rules_dir else empty()
    except RuleError as e:
        report.errors.append(str(e))
        ruleset = empty()
    try:
        for plugin in load_all(config.plugins):
            plugin.close()
    except PluginError as e:
        report.errors.append(str(e))
    for w in config.daemon.watch:
        if not os.path.exists(w):
            report.findings.append(Finding("warning", "watch", f"watch path {w} does not exist "
                                           "(nothing to mark there yet)", key="[daemon] watch"))
    fail_open = "allow" in (config.scan.on_error, config.scan.on_timeout, config.scan.on_backlog)
    report.findings += lint(ruleset, watched=[os.fsencode(w) for w in config.daemon.watch],
                            exclusions=config.exclude, fail_open=fail_open,
                            events=config.daemon.events)
    report.findings += check_writable_exclusions(config.exclude.paths.patterns,
                                                 exes=config.exclude.exe)
    return report
