"""Logging to stderr, the systemd way, without ever opening a file from the read loop.

The standard formatter renders a traceback with source lines, which linecache reads from the
.py files by path: on the thread that answers permission events that open would wait for an
answer only that thread can give. So tracebacks here name file, line and function only.
"""

from __future__ import annotations

import logging
import sys
import traceback
from types import TracebackType

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def format_exception_safely(exc: BaseException) -> str:
    """A traceback that reads no source file."""
    frames = []
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f"  {code.co_filename}:{tb.tb_lineno} in {code.co_name}")
        tb = tb.tb_next
    return "Traceback (no source lines):\n" + "\n".join(frames) + \
        "\n" + "".join(traceback.format_exception_only(type(exc), exc)).rstrip()


class SafeFormatter(logging.Formatter):
    def formatException(self, ei) -> str:  # type: ignore[override]
        return format_exception_safely(ei[1]) if ei and ei[1] is not None else ""

    def formatStack(self, stack_info: str) -> str:
        return stack_info


def setup(level: str = "info", tag: str = "") -> None:
    """Log lines as systemd's journal likes them on stderr: a priority prefix, no timestamp.
    `tag` ends every line (a reader process names itself so: the journal gives every line of
    the stream the first process's pid)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s" + tag.replace("%", "%%")))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))


def set_level(level: str) -> None:
    logging.getLogger().setLevel(_LEVELS.get(level, logging.INFO))
