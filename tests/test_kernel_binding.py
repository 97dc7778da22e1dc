"""vetd's fanotify binding against the real kernel: the facts the daemon stands on.

The listener here is a thread of the test process; openers are child processes. The thread
only reads, answers and closes: it never opens a file, so it cannot wait on itself.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import exec_as_child, open_as_child, wait_for
from vetd import fanotify as fan

pytestmark = pytest.mark.kernel


class Listener:
    """Answers every permission event with `decide(event) -> response`; records what it saw."""

    def __init__(self, group: fan.Group, decide):
        self.group, self.decide = group, decide
        self.events: list[tuple[int, int, int, str]] = []  # (mask, pid, pidfd pid, fdinfo)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import select
        poller = select.poll()
        poller.register(self.group.fd, select.POLLIN)
        while not self.stop:
            if not poller.poll(50):
                continue
            for ev in self.group.read():
                pidfd_pid = -1
                if ev.pidfd >= 0:
                    with open(f"/proc/self/fdinfo/{ev.pidfd}") as fh:  # procfs: never marked
                        for line in fh:
                            if line.startswith("Pid:"):
                                pidfd_pid = int(line.split()[1])
                    os.close(ev.pidfd)
                self.events.append((ev.mask, ev.pid, pidfd_pid, ""))
                if ev.is_permission:
                    self.group.respond(ev.fd, self.decide(ev))
                os.close(ev.fd)

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)


@pytest.fixture
def group():
    g = fan.Group.open(want_audit=True)
    try:
        yield g
    finally:
        g.close()


def perm_count(listener: Listener) -> int:
    return sum(1 for m, *_ in listener.events if m & fan.PERM_EVENTS)


def test_this_kernel_offers_what_vetd_uses(group):
    f = group.features
    assert f.report_pidfd and f.exec_perm and f.evictable_ignore and f.pre_content


def test_allow_and_deny_reach_the_opener(tmpfs, group):
    (tmpfs / "yes").write_text("y")
    (tmpfs / "no").write_text("n")
    group.mark(tmpfs, fan.FAN_OPEN_PERM)
    lis = Listener(group, lambda ev: fan.FAN_DENY if os.readlink(f"/proc/self/fd/{ev.fd}").endswith("/no")
                   else fan.FAN_ALLOW)
    try:
        assert open_as_child(tmpfs / "yes") == "OK"
        assert open_as_child(tmpfs / "no") == "EPERM"
    finally:
        lis.close()


def test_deny_errno_and_audit_flags_are_accepted(tmpfs, group):
    (tmpfs / "f").write_text("x")
    group.mark(tmpfs, fan.FAN_OPEN_PERM)
    answers = iter([fan.deny_errno_response(errno.EIO), fan.FAN_ALLOW | fan.FAN_AUDIT
                    if group.features.audit else fan.FAN_ALLOW, fan.deny_errno_response(errno.EACCES)])
    lis = Listener(group, lambda ev: next(answers))
    try:
        assert open_as_child(tmpfs / "f") == "EIO"
        assert open_as_child(tmpfs / "f") == "OK"
        # EACCES is refused by the kernel: the binding falls back to a plain deny, never no answer
        assert open_as_child(tmpfs / "f") == "EPERM"
    finally:
        lis.close()


def test_each_event_carries_a_pidfd_of_the_opener(tmpfs, group):
    (tmpfs / "f").write_text("x")
    group.mark(tmpfs, fan.FAN_OPEN_PERM)
    lis = Listener(group, lambda ev: fan.FAN_ALLOW)
    try:
        child = subprocess.run([sys.executable, "-c", f"import os; open({str(tmpfs / 'f')!r}).read(); "
                                "print(os.getpid())"], capture_output=True, text=True, timeout=15)
        pid = int(child.stdout)
        wait_for(lambda: any(p == pid for _, p, _, _ in lis.events), what="the event")
        (_, _, pidfd_pid, _), = [e for e in lis.events if e[1] == pid]
        assert pidfd_pid == pid
    finally:
        lis.close()


def test_an_ignore_mark_answers_in_the_kernel_until_the_file_is_written(tmpfs, group):
    f = tmpfs / "f"
    f.write_text("x")
    group.mark(tmpfs, fan.FAN_OPEN_PERM)

    def allow_and_ignore(ev):
        assert group.ignore_inode(ev.fd, fan.FAN_OPEN_PERM)
        return fan.FAN_ALLOW
    lis = Listener(group, allow_and_ignore)
    try:
        assert open_as_child(f) == "OK"
        assert open_as_child(f) == "OK"
        assert open_as_child(f) == "OK"
        assert perm_count(lis) == 1
        # the write-open is still answered by the mark; the write itself clears it
        subprocess.run(["sh", "-c", f"echo more >> {f}"], check=True, timeout=10)
        assert perm_count(lis) == 1
        assert open_as_child(f) == "OK"
        assert perm_count(lis) == 2, "the write did not clear the ignore mark"
    finally:
        lis.close()


def test_exec_permission_events_cover_execve(tmpfs, group):
    tool = tmpfs / "tool"
    shutil.copy2("/bin/true", tool)
    group.mark(tmpfs, fan.FAN_OPEN_EXEC_PERM)
    lis = Listener(group, lambda ev: fan.FAN_DENY)
    try:
        assert exec_as_child(tool) == "EPERM"
        assert open_as_child(tool) == "OK", "a plain open is not an exec"
        assert all(m & fan.FAN_OPEN_EXEC_PERM for m, *_ in lis.events)
    finally:
        lis.close()


def test_closing_the_group_lets_pending_opens_through(tmpfs):
    (tmpfs / "f").write_text("x")
    g = fan.Group.open()
    g.mark(tmpfs, fan.FAN_OPEN_PERM)
    child = subprocess.Popen([sys.executable, "-c", f"open({str(tmpfs / 'f')!r}).read(); print('OK')"],
                             stdout=subprocess.PIPE)
    time.sleep(0.5)
    assert child.poll() is None, "the open was not held"
    g.close()  # never answered
    out, _ = child.communicate(timeout=10)
    assert out.decode().strip() == "OK"


def test_a_filesystem_that_is_not_marked_raises_nothing(tmpfs, tmp_path, group):
    (tmpfs / "f").write_text("x")
    group.mark(tmpfs, fan.FAN_OPEN_PERM)
    lis = Listener(group, lambda ev: fan.FAN_ALLOW)
    other = tmp_path / "elsewhere"
    other.write_text("y")
    try:
        assert open_as_child(other) == "OK"
        assert perm_count(lis) == 0
    finally:
        lis.close()
