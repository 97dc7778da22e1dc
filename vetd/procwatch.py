"""What vetd remembers about processes between events, and the kernel's word on when to forget.

Rules that name the opener (exe, uid, ...) would read /proc on every open: four syscalls, most
of the cost of a decision in userspace. A process's exe changes only by execve, its ids only by
the set*id calls, its comm by exec or prctl, and a pid only gets a new owner after an exit and
a fork. The kernel's process-events connector (netlink, NETLINK_CONNECTOR / CN_IDX_PROC)
reports each of those, and it queues the report on our socket during the call itself, before
the process runs on. So: read a batch of fanotify events, then drain the connector, and every
change that happened before any event of the batch has been applied. If the socket overflowed
(ENOBUFS), everything is forgotten. Without the connector (no CAP_NET_ADMIN, no
CONFIG_PROC_EVENTS) nothing is remembered and /proc is read per event, as before.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct

log = logging.getLogger("vetd.procwatch")

_NETLINK_CONNECTOR = 11
_CN_IDX_PROC = 1
_CN_VAL_PROC = 1
_PROC_CN_MCAST_LISTEN = 1
_NLMSG_DONE = 3
_PROC_EVENT_FORK = 0x1
_PROC_EVENT_EXIT = 0x80000000
_HDR = 16 + 20          # nlmsghdr + cn_msg
_EVENT_DATA = _HDR + 16  # proc_event: what, cpu, timestamp_ns, then the union
_U32x2 = struct.Struct("=II")
_U32 = struct.Struct("=I")
MAX_PROCS = 65536


class Proc:
    """The remembered facts of one process; each slot is filled by the first event that asks."""

    __slots__ = ("exe", "comm", "uid", "gid")
    UNSET = object()

    def __init__(self) -> None:
        self.exe: object = Proc.UNSET
        self.comm: object = Proc.UNSET
        self.uid: object = Proc.UNSET
        self.gid: object = Proc.UNSET


class ProcWatch:
    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.procs: dict[int, Proc] = {}
        self.overruns = 0
        self.forgotten = 0
        self.epoch = 0  # bumped whenever process events were applied (see Subject._remember)
        # tgid -> the epoch its exit was applied in; exits before `unsure_before` are unknown
        # (an overrun, or the table was cleared). For kills without a per-event pidfd.
        self.exited: dict[int, int] = {}
        self.unsure_before = 0

    @classmethod
    def open(cls) -> "ProcWatch | None":
        """Subscribe to process events; None (and a log line) when the kernel will not."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_CONNECTOR)
        except OSError as e:
            log.warning("process events unavailable (%s): subject facts are read from /proc per "
                        "event", e.strerror)
            return None
        try:
            sock.bind((0, _CN_IDX_PROC))
            try:  # a burst of forks must not overflow it; root may exceed rmem_max
                sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            op = _U32.pack(_PROC_CN_MCAST_LISTEN)
            cn = struct.pack("=IIIIHH", _CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(op), 0) + op
            sock.send(struct.pack("=IHHII", 16 + len(cn), _NLMSG_DONE, 0, 0, 0) + cn)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            log.warning("process events unavailable (%s): subject facts are read from /proc per "
                        "event", e.strerror)
            return None
        return cls(sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def maybe_exited(self, pid: int, since_epoch: int) -> bool:
        """Whether process `pid` may have exited since `since_epoch` (the epoch an event was
        read under). False proves that a pidfd opened before this call names the same process
        as the event did: the kernel reports an exit before the pid can be used again."""
        self.drain()
        if since_epoch < self.unsure_before:
            return True
        return self.exited.get(pid, -1) >= since_epoch

    def entry(self, pid: int) -> Proc:
        p = self.procs.get(pid)
        if p is None:
            if len(self.procs) >= MAX_PROCS:
                self.procs.clear()
            p = self.procs[pid] = Proc()
        return p

    def drain(self) -> None:
        """Apply every queued process event. Called by the read loop after each batch is read
        and before any of it is decided."""
        procs = self.procs
        recv = self._sock.recv
        while True:
            try:
                data = recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # reports were lost: nothing remembered is safe
                    self.overruns += 1
                    self.epoch += 1
                    self.unsure_before = self.epoch + 1
                    procs.clear()
                    continue
                raise
            self.epoch += 1
            self._apply(data, procs)

    def _apply(self, data: bytes, procs: dict[int, Proc]) -> None:
        off = 0
        while off + _EVENT_DATA + 16 <= len(data):
            (length,) = _U32.unpack_from(data, off)
            if length < _EVENT_DATA:
                return
            (what,) = _U32.unpack_from(data, off + _HDR)
            if what == _PROC_EVENT_FORK:
                child_pid, child_tgid = _U32x2.unpack_from(data, off + _EVENT_DATA + 8)
                if child_pid == child_tgid:  # a new process (a new thread changes nothing)
                    self.forgotten += procs.pop(child_tgid, None) is not None
            elif what:  # exec, uid, gid, sid, comm, exit, ptrace, coredump: forget it
                pid, tgid = _U32x2.unpack_from(data, off + _EVENT_DATA)
                if what != _PROC_EVENT_EXIT or pid == tgid:
                    self.forgotten += procs.pop(tgid, None) is not None
                if what == _PROC_EVENT_EXIT:
                    exited = self.exited
                    if len(exited) >= MAX_PROCS:
                        exited.clear()
                        self.unsure_before = self.epoch + 1
                    exited[tgid] = self.epoch
            off += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
