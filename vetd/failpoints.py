"""Failure injection for tests: `VETD_FAILPOINTS=decide,...` makes the named points raise.

Read once at start-up from the environment of the daemon process only; with the variable unset
(always, in production) `hit` is a single falsy check.
"""

from __future__ import annotations

import os

_ACTIVE = frozenset(x for x in os.environ.get("VETD_FAILPOINTS", "").split(",") if x)


class InjectedFailure(RuntimeError):
    """Raised at an enabled failpoint."""


def hit(name: str) -> None:
    if _ACTIVE and name in _ACTIVE:
        raise InjectedFailure(f"failpoint {name}")


def active() -> bool:
    return bool(_ACTIVE)
