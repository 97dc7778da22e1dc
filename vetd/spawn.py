"""Starting vetd's own child processes: fork, make the child's pid vetd's own, then exec.

A child that opens files while it starts (Python's imports, a plugin's rules) raises
permission events on the filesystems vetd watches; unless its pid is already one of vetd's
own, those events wait on scans that the child may itself be needed for. So the child waits on
a pipe between fork and exec until vetd has registered its pid. Used by isolated plugins
(isolate.py) and scan processes (scanproc.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable, Mapping, Sequence

_PR_SET_PDEATHSIG = 1


def spawn_own(argv: Sequence[str], register: Callable[[int, bool], None], *,
              keep_fds: Sequence[int] = (), die_with_parent: bool = False,
              env: Mapping[str, str] | None = None) -> int:
    """Fork, register the child's pid as vetd's own, let it exec argv; returns the pid.

    `keep_fds` stay open across the exec. `die_with_parent` asks the kernel to SIGKILL the child
    when the calling thread ends (PR_SET_PDEATHSIG): for a child holding the fanotify group fd,
    which must not outlive vetd even when a plugin has it stuck in C, so call it from the main
    thread. `env`: the child's environment, if not this process's."""
    r, w = os.pipe()
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in it
    child_env = dict(env) if env is not None else None
    pid = os.fork()
    if pid == 0:
        try:
            if die_with_parent:
                prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
                if os.getppid() != parent:  # vetd died before the request took hold
                    os._exit(0)
            os.close(w)
            os.read(r, 1)
            for fd in keep_fds:
                os.set_inheritable(fd, True)
            if child_env is None:
                os.execv(argv[0], list(argv))
            os.execve(argv[0], list(argv), child_env)
        finally:
            os._exit(127)
    os.close(r)
    register(pid, True)
    os.write(w, b"g")
    os.close(w)
    return pid
