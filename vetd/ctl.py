"""`vetctl`: the operator's command line for a running vetd, spoken over the control socket.

Exit codes scripts can trust: 0 success, 1 vetd answered with an error, 2 vetd could not be asked
(not running, no access, timed out) or the command line was wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from vetd.control import DEFAULT_SOCKET, ControlError, ControlUnreachable, request

__all__ = ["main", "format_status"]

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1
EXIT_UNREACHABLE = 2
EXIT_USAGE = 2


# --- rendering `status` ----------------------------------------------------------------------------
#
# The daemon's status dict grows over time. Sections with a better human form than the generic one
# have a renderer below; everything else, including keys added later, is rendered generically by
# naming convention: `*_s` is a duration, `*_rate` a fraction, numbers read as "N things".

_ORDER = (
    "mode", "pid", "uptime_s", "config", "features", "marks", "events", "answers", "cache",
    "degraded", "backlog", "readers", "plugins",
)
_LABELS = {"pid": "PID"}


def format_status(status: Mapping[str, Any]) -> str:
    """The human `vetctl status` table for a daemon status dict, one section per top-level key."""
    rest = dict(status)
    version = rest.pop("version", None)
    header = f"vetd {version}" if version is not None else "vetd (version unknown)"
    keys = [k for k in _ORDER if k in rest] + [k for k in rest if k not in _ORDER]
    rows = [(_section_label(k), _section_lines(k, rest[k])) for k in keys]
    width = max((len(label) for label, _ in rows), default=0)
    out = [header]
    for label, lines in rows:
        out.append(f"{label:>{width + 2}}: {lines[0]}")
        out.extend(" " * (width + 4) + line for line in lines[1:])
    return "\n".join(out)


def _section_label(key: str) -> str:
    return _LABELS.get(key) or _words(key).capitalize()


def _section_lines(key: str, value: Any) -> list[str]:
    render = _RENDERERS.get(key)
    if render is not None:
        try:
            lines = render(value)
        except (TypeError, ValueError, AttributeError, KeyError):
            lines = []  # the daemon changed this section's shape: show it as it is
        if lines:
            return lines
    return _generic_lines(key, value)


def _words(key: str) -> str:
    if key.endswith("_s"):
        key = key[:-2]
    return key.replace("_", " ")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if _is_number(value) and key.endswith("_s"):
        return _duration(value)
    if _is_number(value) and key.endswith("_rate"):
        return f"{value:.0%}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _duration(seconds: float) -> str:
    """Like systemd: 12s, 3min 4s, 2h 5min, 3d 1h."""
    total = int(seconds)
    days, rem = divmod(total, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n]
    return " ".join(shown[:2]) or f"{seconds:.1f}s"


def _inline(mapping: Mapping[str, Any]) -> str:
    """Scalars of a dict on one line: '5 entries, 60% hit rate, oldest 2h 1min, path /x'."""
    parts = []
    for key, value in mapping.items():
        if isinstance(value, (dict, list)):
            continue
        if _is_number(value) and not key.endswith("_s"):
            parts.append(f"{_scalar(key, value)} {_words(key)}")
        else:
            parts.append(f"{_words(key)} {_scalar(key, value)}")
    return ", ".join(parts)


def _generic_lines(key: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        has_scalars = any(not isinstance(v, (dict, list)) for v in value.values())
        lines = [_inline(value)] if has_scalars else []
        for sub_key, sub in value.items():
            if isinstance(sub, dict):
                lines.append(f"{_words(sub_key)}: {_inline(sub) or '-'}")
            elif isinstance(sub, list):
                lines.append(f"{_words(sub_key)}: {', '.join(_item(i) for i in sub) or 'none'}")
        return lines or ["-"]
    if isinstance(value, list):
        return _list_lines(value)
    return [_scalar(key, value)]


def _item(value: Any) -> str:
    return _inline(value) if isinstance(value, dict) else _scalar("", value)


def _list_lines(items: list[Any]) -> list[str]:
    """One line per item; dict items lead with their name or path, aligned."""
    if not items:
        return ["none"]
    leads = []
    for item in items:
        lead = None
        if isinstance(item, dict):
            lead = next((str(item[k]) for k in ("name", "path") if k in item), None)
        leads.append(lead)
    width = max((len(lead) for lead in leads if lead is not None), default=0)
    lines = []
    for item, lead in zip(items, leads):
        if lead is None:
            lines.append(_item(item))
            continue
        rest = {k: v for k, v in item.items() if k not in ("name", "path")}
        body = _inline(rest)
        lines.append(f"{lead:<{width}}  {body}" if body else lead)
    return lines


def _render_config(config: Mapping[str, Any]) -> list[str]:
    rest = dict(config)
    path = rest.pop("path", None) or "(no file)"
    facts = []
    if "generation" in rest:
        facts.append(f"generation {rest.pop('generation')}")
    if "loaded_at" in rest:
        facts.append(f"loaded {rest.pop('loaded_at')}")
    facts.extend(p for p in [_inline(rest)] if p)
    return [f"{path} ({', '.join(facts)})" if facts else str(path)]


def _render_features(features: Mapping[str, Any]) -> list[str]:
    rest = dict(features)
    have = [name for name, on in features.items() if on is True]
    lack = [name for name, on in features.items() if on is False]
    for name in have + lack:
        del rest[name]
    lines = [f"available: {', '.join(have) or 'none'}"]
    if lack:
        lines.append(f"unavailable: {', '.join(lack)}")
    if rest:
        lines.append(_inline(rest))
    return lines


def _render_marks(marks: list[Mapping[str, Any]]) -> list[str]:
    if not marks:
        return ["none"]
    width = max(len(str(m["path"])) for m in marks)
    lines = []
    for mark in marks:
        rest = dict(mark)
        path = rest.pop("path")
        what = ", ".join(str(rest.pop(k)) for k in ("fstype", "kind") if k in rest)
        extra = _inline(rest)
        lines.append(f"{path!s:<{width}}  {what}{'; ' + extra if extra else ''}".rstrip())
    return lines


def _render_backlog(backlog: Mapping[str, Any]) -> list[str]:
    rest = dict(backlog)
    depth, limit = rest.pop("depth"), rest.pop("limit")
    procs = rest.pop("scan_processes", None)
    extra = _inline(rest)
    lines = [f"{depth} of {limit} queued" + (f", {extra}" if extra else "")]
    if procs and procs.get("processes"):
        pids = ", ".join(str(p) for p in procs.get("pids", [])) or "none running"
        lines.append(f"scan processes: {procs['processes']} (pids {pids}), {procs.get('in_flight', 0)} "
                     f"in flight, {procs.get('jobs', 0)} jobs, {procs.get('restarts', 0)} restarts")
    return lines


def _render_readers(readers: list[Mapping[str, Any]]) -> list[str]:
    """[daemon] readers: one line per reading process (the counters above are their sums)."""
    if not readers:
        return ["none"]
    lines = [f"{len(readers)} processes read events; the counters above are their sums"]
    for k, r in enumerate(readers):
        if "error" in r:
            lines.append(f"{k}: PID {r.get('pid')}: {r['error']}")
        else:
            lines.append(f"{k}: PID {r.get('pid')}: {r.get('allow', 0)} allowed, {r.get('deny', 0)} "
                         f"denied, generation {r.get('generation')}")
    return lines


_RENDERERS: dict[str, Callable[[Any], list[str]]] = {
    "config": _render_config,
    "features": _render_features,
    "marks": _render_marks,
    "backlog": _render_backlog,
    "readers": _render_readers,
}


# --- command line ----------------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one `vetctl: ...` line instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see vetctl --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vetctl", description="Control a running vetd.")
    parser.add_argument(
        "--socket", metavar="PATH",
        help=f"control socket (default: $VETD_SOCKET, else {DEFAULT_SOCKET})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    status = commands.add_parser("status", help="show what vetd is doing")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    commands.add_parser("reload", help="re-read the configuration")
    check = commands.add_parser("check", help="lint a configuration (needs no running vetd): "
                                "exit 0 if it would load and nothing is unsafe, 1 otherwise")
    check.add_argument("--config", default="/etc/vetd/vetd.toml", help="the file to check")
    check.add_argument("--json", action="store_true", help="findings as JSON")
    return parser


def _cmd_status(sock: str, args: argparse.Namespace) -> int:
    result = request(sock, "status")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif isinstance(result, Mapping):
        print(format_status(result))
    else:
        print(result)
    return EXIT_OK


def _cmd_reload(sock: str, args: argparse.Namespace) -> int:
    result = request(sock, "reload")
    if isinstance(result, Mapping) and "message" in result:
        print(result["message"])
    elif isinstance(result, str):
        print(result)
    else:
        print(json.dumps(result, sort_keys=True))
    return EXIT_OK


def _cmd_check(sock: str, args: argparse.Namespace) -> int:
    from .check import check  # loads plugins and rules: only this command pays for it
    report = check(args.config)
    if args.json:
        print(json.dumps({"ok": report.ok, "errors": report.errors,
                          "findings": [dataclasses.asdict(f) for f in report.findings]}, indent=2))
    else:
        report.print()
    return EXIT_OK if report.ok else EXIT_DAEMON_ERROR


_COMMANDS: dict[str, Callable[[str, argparse.Namespace], int]] = {
    "status": _cmd_status,
    "reload": _cmd_reload,
    "check": _cmd_check,
}


def _fail(message: str) -> None:
    print(f"vetctl: {' '.join(message.split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run vetctl with `argv` (default sys.argv[1:]); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    sock = args.socket or os.environ.get("VETD_SOCKET") or DEFAULT_SOCKET
    try:
        return _COMMANDS[args.command](sock, args)
    except ControlUnreachable as exc:
        _fail(str(exc))
        return EXIT_UNREACHABLE
    except ControlError as exc:
        _fail(str(exc))
        return EXIT_DAEMON_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
