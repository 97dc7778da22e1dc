"""The `vetd` command: run the daemon in the foreground, or check a configuration and exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .config import ConfigError, load
from .logsetup import setup

DEFAULT_CONFIG = "/etc/vetd/vetd.toml"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vetd", description="Vet file opens and execs with fanotify "
                                 "permission events (runs in the foreground; logs to stderr).")
    ap.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"TOML file (default {DEFAULT_CONFIG})")
    ap.add_argument("--check-config", action="store_true",
                    help="validate the configuration and its plugins, then exit (0 valid, 1 not)")
    ap.add_argument("--watch", action="append", metavar="PATH",
                    help="watch PATH instead of the config's watch list (repeatable)")
    ap.add_argument("--version", action="version", version=f"vetd {__version__}")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load(args.config)
        if args.watch:
            for w in args.watch:
                if not w.startswith("/"):
                    raise ConfigError(f"--watch {w}: not an absolute path")
            config = config.with_watch(tuple(args.watch))
    except ConfigError as e:
        print(f"vetd: {e}", file=sys.stderr)
        return 1
    setup(config.daemon.log_level)
    if args.check_config:
        from .check import check
        report = check(args.config, tuple(args.watch) if args.watch else None)
        report.print()
        return 0 if report.ok else 1
    return run(config, tuple(args.watch) if args.watch else None)


def run(config, watch_override) -> int:  # type: ignore[no-untyped-def]
    from .control import ControlError
    from .daemon import Daemon
    from .fanotify import FanotifyError
    from .plugins import PluginError
    from .readers import ReaderError
    from .rules import RuleError
    log = logging.getLogger("vetd")
    if os.geteuid() != 0:
        print("vetd: needs CAP_SYS_ADMIN to hold fanotify permission events: run it as root",
              file=sys.stderr)
        return 1
    try:
        daemon = Daemon(config)
    except FanotifyError as e:
        print(f"vetd: {e.strerror}", file=sys.stderr)
        return 1
    except PluginError as e:
        print(f"vetd: {config.path}: {e}", file=sys.stderr)
        return 1
    except RuleError as e:
        print(f"vetd: {e}", file=sys.stderr)
        return 1
    try:
        return daemon.run(watch_override)
    except (ControlError, ReaderError) as e:
        log.error("%s", e)
        return 1
