"""The daemon: the read loop that holds permission events and answers every one, on time.

The loop thread reads batches from the fanotify group, decides what it can at once (own
processes, exclusions, cached verdicts) and hands the rest to scan workers with a deadline. The
loop never waits for a worker: an expired deadline, a full backlog or an exception is answered
by the configured policy from here. The loop thread must never open a watched file: reloads,
plugin loading and the control socket live on other threads, whose opens the loop allows
because they come from vetd's own pid.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import select
import signal
import threading
import time
from array import array
from collections.abc import Callable
from operator import attrgetter
from stat import S_ISREG
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from . import __version__, failpoints, fanotify as fan, mounts, plugins as plugin_loader, rules as rules_mod
from .cache import VerdictCache, file_key, file_version
from .fileid import CTIME_NS, CTIME_S, MODE, MTIME_NS, MTIME_S, NLINK, SIZE, Statx, key_and_version
from .config import Config, load as load_config
from .control import ControlServer
from .exclusions import Exclusions
from .fastanswers import SLOT_CACHE, SLOT_EXCLUDED, SLOT_RULE0, FastAnswers, hotpath
from .logsetup import format_exception_safely, set_level
from .memtrim import release_free_memory
from .model import FileObject, Subject
from .isolate import IsolatedPlugin
from .procwatch import Proc, ProcWatch
from .readers import (EXEC, OWN, RELOAD_TIMEOUT_S, Peers, ReaderError, Readers, merge_status,
                      peer_pipes)
from .relay import ReadRelay
from .notify import Notifier
from .degraded import Breaker, Policy
from .rescan import Item as RescanItem, Rescanner
from .scanning import PluginStats, ScanPool, checked, combine
from .scanproc import ScanProcesses
from .sdk import Decision, Opener, Plugin, ScanFile, Verdict

log = logging.getLogger("vetd")

FAILPOINTS = failpoints.active()
OPS = ((fan.FAN_OPEN_EXEC_PERM, "exec"), (fan.FAN_OPEN_PERM, "open"), (fan.FAN_ACCESS_PERM, "access"))
EVENT_BITS = {"open": fan.FAN_OPEN_PERM, "exec": fan.FAN_OPEN_EXEC_PERM, "access": fan.FAN_ACCESS_PERM}
# What a remembered decision (the memo) says before the verdict cache is asked; a rule's index
# into RuleSet.rules otherwise.
MEMO_NO_RULE = -1
MEMO_EXCLUDED = -2
MEMO_ENTRIES = 65536
READ_THREADS = 2  # the reader, and one standing by while it scans (see _reader_main)
# The flags array shared with vetd._hotpath's loop (its FLAG_* enum).
(FLAG_SERIAL, FLAG_MOVES, FLAG_SEEN, FLAG_BUSY_NS, FLAG_STOP, FLAG_POLL_MAX_NS, FLAG_POLL_NS,
 FLAG_POLL_CAUGHT, FLAG_POLL_SPENT_NS, N_FLAGS) = range(10)
_NO_TABLE: dict[tuple[object, ...], int] = {}  # what hot.run looks events up in without a table
_NO_COUNTS = array("q")
_UNSET = Proc.UNSET
_pack_response = fan.RESPONSE.pack


def _op_of(mask: int) -> str:
    for bit, name in OPS:
        if mask & bit:
            return name
    return "other"


_OP_BY_MASK: dict[int, str] = {}


def op_of(mask: int) -> str:
    """The op an event's mask stands for (exec before open: an execve's own event has both)."""
    op = _OP_BY_MASK.get(mask)
    if op is None:
        op = _op_of(mask)
        if len(_OP_BY_MASK) < 256:
            _OP_BY_MASK[mask] = op
    return op


@dataclass(frozen=True)
class State:
    """Everything a decision reads, swapped whole on reload."""

    config: Config
    exclusions: Exclusions
    plugins: tuple[Plugin, ...]
    generation: int
    perm_mask: int
    deny_response: int
    deadline_s: float
    policy: Policy
    breakers: dict[str, Breaker]
    rules: rules_mod.RuleSet
    rule_responses: dict[int, int]   # rule number -> deny response, for rules with their own errno
    loaded_at: float = field(default_factory=time.time)
    # Remembered exclusion and rule outcomes, keyed on (mask, op, opener facts, statx of the
    # file); None when this state's decisions cannot be remembered safely (see _with_memo).
    memo: dict[tuple[object, ...], tuple[int, int, int]] | None = None
    memo_token: Callable[[object], tuple[object, ...]] | None = None
    # The allows vetd._hotpath may give by itself (None: no compiled loop, or nothing to give)
    answers: FastAnswers | None = None

    @property
    def fast(self) -> bool:
        return self._fast  # type: ignore[attr-defined,no-any-return]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fast", self.exclusions.trivial and not self.rules.rules
                           and not failpoints.active())


def _close_quietly(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


_CLOSED_OBJ = FileObject(-1)
_CLOSED_SUBJECT = Subject(0)


class Pending:
    """One permission event between intake and answer."""

    __slots__ = ("fd", "pidfd", "mask", "op", "obj", "subject", "state", "deadline", "answered",
                 "handed_off", "current", "plugin_deadline", "delivered", "memo_base", "watcher",
                 "timing_out", "degraded")

    def __init__(self, ev: fan.Event, state: State, fstypes: dict[int, str] | None = None,
                 procs: ProcWatch | None = None, op: str | None = None):
        self.fd = ev.fd
        self.pidfd = ev.pidfd
        self.mask = ev.mask
        self.op = op or op_of(ev.mask)
        self.delivered = False   # the kernel took the answer (False: the event was already gone)
        # (mask, op, statx tuple) of an event whose decision may be remembered, else None
        self.memo_base: tuple[object, ...] | None = None
        self.obj = FileObject(ev.fd, fstypes)
        self.subject = Subject(ev.pid, ev.pidfd, procs)
        self.state = state
        self.deadline = 0.0
        self.answered = False
        self.handed_off = False
        self.current: str | None = None     # the plugin a worker is running for this event
        self.plugin_deadline = 0.0
        self.watcher = 0  # the thread scanning it inline, until it ends the relay's watch
        self.timing_out = False  # claimed by the first to answer its expired deadline
        self.degraded: tuple[str, str, str] | None = None  # a plugin skipped (scan processes)

    def close(self) -> None:
        """Close the fds and let go of the file and process facts: an answered event may sit
        in the deadline heap until the housekeeper next wakes, and thousands of them carrying
        stat results and scan buffers were most of vetd's memory after a cold burst."""
        _close_quietly(self.fd, self.pidfd)
        self.fd = self.pidfd = -1
        self.obj = _CLOSED_OBJ
        self.subject = _CLOSED_SUBJECT


class Stats:
    """Counters shown by `vetctl status` and the service status line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen = 0
        self.permission = 0
        self.notification = 0
        self.allow = 0
        self.deny = 0
        self.by_reason: dict[str, int] = {}
        self.degraded: dict[str, int] = {"timeout": 0, "error": 0, "backlog": 0, "too_big": 0,
                                         "unhealthy": 0}
        self.late_detections = 0
        self.kernel_marks = 0
        self.fast_hits = 0              # clean cache hits answered by the read loop's fast path
        self.kernel_marks_withdrawn = 0  # the file changed between its scan and its mark
        self.uncacheable_by_rules = 0
        self.kills = 0
        self.inline_scans = 0           # scans done by the read-loop thread that read the event
        self.read_takeovers = 0         # the standby read thread took over from a scanning one
        self.overflows = 0
        self.memo_clears = 0            # remembered outcomes dropped (a move, a mount change)
        self.ignore_flushes = 0         # kernel ignore marks dropped because a path rule may care
        self.exec_notes_in = 0          # exec events other readers read ([daemon] readers)
        self.exec_paired_from_notes = 0  # opens judged as part of an exec another reader read
        # answered by vetd._hotpath from FastAnswers tables, folded in by fold_table()
        self.table_answers = 0
        self.table_by_reason: dict[str, int] = {}

    def fold_table(self, counts: list[int], rule_hits: list[int]) -> None:
        """Add what a FastAnswers table answered since it was last folded."""
        with self._lock:
            for slot, n in enumerate(counts):
                if not n:
                    continue
                self.table_answers += n
                reason = ("cache" if slot == SLOT_CACHE else "excluded" if slot == SLOT_EXCLUDED
                          else "rule")
                self.table_by_reason[reason] = self.table_by_reason.get(reason, 0) + n
                if slot >= SLOT_RULE0 and slot - SLOT_RULE0 < len(rule_hits):
                    rule_hits[slot - SLOT_RULE0] += n

    def answered(self, allow: bool, reason: str, degraded: str | None) -> None:
        with self._lock:
            if allow:
                self.allow += 1
            else:
                self.deny += 1
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            if degraded is not None:
                self.degraded[degraded] = self.degraded.get(degraded, 0) + 1


def load_rules(config: Config) -> rules_mod.RuleSet:
    """The access rules of a config (RuleError names file, line and column)."""
    return rules_mod.load_dir(config.rules_dir) if config.rules_dir else rules_mod.empty()


def build_state(config: Config, features: fan.Features, accepts_errno: Callable[[int], bool],
                generation: int, scope: tuple[bytes, ...], plugins: tuple[Plugin, ...],
                ruleset: rules_mod.RuleSet | None = None) -> State:
    perm = 0
    for name in config.daemon.events:
        if name == "exec" and not features.exec_perm:
            continue
        perm |= EVENT_BITS[name]
    deny = fan.FAN_DENY
    err = getattr(errno, config.daemon.deny_errno)
    if err != errno.EPERM and features.deny_errno and accepts_errno(err):
        deny = fan.deny_errno_response(err)
    policy = config.policy()
    breakers = {}
    for p in plugins:
        pp = policy.plugins.get(p.name)
        breakers[p.name] = Breaker(pp.failure_threshold if pp else 5, pp.retry_after_s if pp else 30.0)
    ruleset = ruleset if ruleset is not None else rules_mod.empty()
    responses = {}
    for r in ruleset.rules:
        if r.errno and r.errno != "EPERM":
            e = getattr(errno, r.errno)
            responses[r.number] = fan.deny_errno_response(e) if features.deny_errno and accepts_errno(e) \
                else fan.FAN_DENY
    return State(config, Exclusions(config.exclude, scope), plugins, generation, perm, deny,
                 config.scan.deadline_ms / 1000.0, policy, breakers, ruleset, responses)


class Daemon:
    def __init__(self, config: Config, *, reload_source: Callable[[], Config] | None = None,
                 group: fan.Group | None = None, peers: Peers | None = None):
        """`group` and `peers` are given to a reader process ([daemon] readers, vetd/readers.py):
        it reads the first process's group and leaves its marks, control socket and sd_notify
        to it."""
        self.started = time.monotonic()
        self._child = group is not None
        # Fixed for the life of the process: a reload that changes it says it needs a restart.
        self.readers_n = config.daemon.readers
        self.readers: Readers | None = None   # the other reader processes (the first one's)
        self.exit_code = 0
        self.config_path = config.path
        self._reload_source = reload_source or (lambda: load_config(self.config_path))
        self._watch_override: tuple[str, ...] | None = None
        self.stats = Stats()
        self.plugin_stats: dict[str, PluginStats] = {}
        self.cache = VerdictCache(self._cache_share(config))
        self.own_pids = frozenset({os.getpid(), os.getppid()} if self._child else {os.getpid()})
        self._pids_lock = threading.Lock()
        self._socket_path = config.daemon.socket
        self.notifier = Notifier()
        self.stopping = False
        self._answer_lock = threading.Lock()
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._deadline_lock = threading.Lock()
        self._reader_busy_since = 0.0   # 0 while the read loop waits in read(); else when it woke
        # The housekeeper never sleeps longer than a tenth of the shortest deadline, so a new
        # deadline rarely needs to wake it: a wake-up per cold scan cost a pipe write and a
        # thread switch. It publishes when it will next look.
        self._housekeeper_wakes_at = 0.0
        self._reader_alive = True
        self._seq = 0
        self._reload_flag = False
        self._reload_results: list[tuple[State | None, str, Future[str] | None]] = []
        self._reload_lock = threading.Lock()
        self._reloading = False
        self.marked: dict[int, mounts.Mount] = {}
        self.fstypes: dict[int, str] = {}   # st_dev -> filesystem type, of what is marked
        self._exec_opens: dict[int, int] = {}  # pid -> file key of its exec event (read loop only)
        self._noted_execs: dict[int, int] = {}  # those of them another reader read
        self._inline: Pending | None = None  # the scan the baton holder will do itself
        ruleset = load_rules(config)
        # No pidfd per event: it cost about 2 us of the opener's time per open here (a kernel
        # allocation and a close), a third of a warm answer. The opener is blocked while its
        # event is pending, so its pid cannot be reused unless it is SIGKILLed, and then the
        # kernel drops the event: /proc/PID is safe to read without one. A kill opens a pidfd
        # itself and proves it names the opener (see _kill_and_deny).
        self.group = group if group is not None else fan.Group.open(want_audit=True, want_pidfd=False)
        self._gfd = self.group.fd
        # Several readers: each has its own close-write group and exec notes (vetd/readers.py).
        self.changes: fan.ChangeGroup | None = None
        self._change_marked: dict[int, mounts.Mount] = {}
        self.peers = peers
        self._peer_pipes: list[tuple[int, int]] = []
        if self.readers_n > 1:
            self.changes = fan.ChangeGroup.open()
            if peers is None:
                self._peer_pipes = peer_pipes(self.readers_n)
                self.peers = Peers(self._peer_pipes[0][0], [w for _r, w in self._peer_pipes[1:]])
        # Whoever holds the relay's baton reads and decides (see _reader_main); the rest of
        # the read loop's state is its holder's alone.
        # With other readers the standby takes over only from a scan that seems stuck (they
        # read meanwhile): watching for waiting events would wake it at most scans.
        self._relay = ReadRelay(self.group.fd, READ_THREADS, watch=self.readers_n == 1)
        log.info("fanotify %s", self.group.features.describe())
        for note in self.group.features.notes:
            log.warning("%s", note)
        plugins = tuple(plugin_loader.load_all(config.plugins, self._isolate))
        self.state = self._build_state(config, self.cache.generation, plugins, ruleset)
        self.procwatch: ProcWatch | None = None
        self._watch_processes_if_needed()
        self.statx = Statx()
        self.moves: fan.MoveGroup | None = None
        try:
            self.moves = fan.MoveGroup.open()
        except OSError as e:
            log.warning("directory moves cannot be watched (%s): rule and exclusion outcomes "
                        "are worked out on every open", e.strerror)
        self.move_devs: frozenset[int] = frozenset()  # st_dev of filesystems whose moves we see
        self._move_marked: dict[int, mounts.Mount] = {}
        # The compiled read loop (vetd._hotpath), unless it is not built or VETD_HOTPATH=python
        # asks for the pure-Python one (the reference behaviour; the tests run both).
        self.hot = hotpath if os.environ.get("VETD_HOTPATH", "c") != "python" else None
        # Shared with the C loop (vetd._hotpath, FLAG_* there): the state serial, bumped at
        # every swap; set while the housekeeper is between draining a move and clearing what
        # it voids; permission events C took; when its batch was read; stop; busy polling.
        self._flags = array("q", [0] * N_FLAGS)
        self._answer_sets: list[tuple[FastAnswers, list[int]]] = []  # live tables, their rule hits
        self._answers_lock = threading.Lock()
        self._batch_epoch = 0   # the FastAnswers epoch the current batch is decided under
        self._memo_epoch = 0    # bumped by every clear of remembered outcomes
        self._batch_memo_epoch = 0
        # A move drained and the memo it voids cleared are one step for the read loop: the
        # housekeeper sets flags[FLAG_MOVES] before it drains, and the read loop, seeing it,
        # waits on this lock (see _side_channels).
        self._moves_lock = threading.Lock()
        self.cache.on_drop = self._cache_dropped
        self._install_state(self.state)
        self.pool = ScanPool(config.scan.workers, config.scan.backlog, self._scan_job)
        self.scanprocs: ScanProcesses | None = None  # [scan] processes (started by run())
        self.rescans = Rescanner(config.degraded.rescan_queue, self._rescan,
                                 lambda: self.pool.depth == 0 and self.pool.busy == 0)
        self.control = (ControlServer(config.daemon.socket, {"status": self._status_cmd,
                                                             "reload": self._reload_cmd})
                        if not self._child else None)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._mountinfo = open("/proc/self/mountinfo", "rb")  # noqa: SIM115 (kept for poll)
        # The read loop's own: poll() on mountinfo reports a change once per open file.
        self._reader_mountinfo = open("/proc/self/mountinfo", "rb")  # noqa: SIM115
        self._side_ep: select.epoll | None = None
        self._side_procs: ProcWatch | None = None
        self._side_memo = False

    def _cache_share(self, config: Config) -> int:
        """This process's part of [cache] entries: the bound is on vetd's memory, so with
        several readers each holds its share (rounded up)."""
        n = config.cache.entries
        return -(-n // self.readers_n) if n else 0

    def _isolate(self, name: str, table: dict[str, Any]) -> Plugin:
        """Build a plugin that runs in processes of its own (isolation = "process")."""
        runtime = os.path.dirname(self._socket_path) or "/run/vetd"
        return IsolatedPlugin(name, self.config_path, runtime, int(table.get("processes", 2)),
                              self._own_pid)

    def _own_pid(self, pid: int, add: bool, tell: bool = True) -> None:
        """vetd's own processes are allowed at intake; the set is replaced whole (no lock).
        Other readers are told (before the child runs: spawn_own registers it first)."""
        with self._pids_lock:
            self.own_pids = self.own_pids | {pid} if add else self.own_pids - {pid}
        if tell and self.peers is not None:
            self.peers.tell_own(pid, add)

    def _watch_processes_if_needed(self) -> None:
        """Remember openers' facts between events (procwatch) once a decision reads them."""
        st = self.state
        kills = any(r.action == "kill" for r in st.rules.rules)
        if self.procwatch is None and (st.rules.needs_subject or st.exclusions.needs_subject
                                       or kills):
            self.procwatch = ProcWatch.open()
            if self.procwatch is not None:
                log.info("process events in use: openers' exe, comm, uid and gid are remembered "
                         "until the kernel reports an exec, set*id, comm change or exit")

    def _with_memo(self, st: State) -> State:
        """The state with a memo of exclusion and rule outcomes, where one is safe.

        An outcome is a function of the op, the opener's exe/comm/uid/gid (what procwatch keeps
        current) and the file: its identity, version, type and link count, the mount it was
        opened through (all one statx), and its path, which only a move of a directory above it
        or a mount change can alter without changing the rest; moves and mount changes clear
        the memo (see _side_channels). Left out where any of that cannot be known: no statx
        mount ids, no move events, rules on sha256 or on facts not kept current."""
        wanted = bool(st.rules.rules) or not st.exclusions.trivial
        attrs = st.rules.memo_attrs()
        why = None
        if not wanted or FAILPOINTS:
            return replace(st, memo=None, memo_token=None)
        if attrs is None:
            why = "rules name sha256, loginuid, cgroup, unit or pexe"
        elif not self.statx.available:
            why = "statx reports no mount ids here"
        elif self.moves is None:
            why = "directory moves cannot be watched"
        attrs = tuple(sorted(set(attrs or ()) | st.exclusions.subject_attrs))
        if why is None and attrs and self.procwatch is None:
            why = "process events are unavailable"
        if why is not None:
            log.info("rule and exclusion outcomes are not remembered (%s): they are worked out "
                     "on every open", why)
            return replace(st, memo=None, memo_token=None)
        token: Callable[[object], tuple[object, ...]] | None = None  # None: no opener facts
        if len(attrs) == 1:
            one = attrgetter(attrs[0])
            token = lambda p: (one(p),)  # noqa: E731 (attrgetter of one name is not a tuple)
        elif attrs:
            token = attrgetter(*attrs)
        return replace(st, memo={}, memo_token=token)

    def _install_state(self, st: State) -> None:
        """Make `st` the state decisions read, with a fresh memo and FastAnswers table where
        they are safe. The serial bump tells a C read already blocked in read() that the
        tables it was handed are no longer the current ones."""
        st = self._with_memo(st)
        answers = None
        if self.hot is not None and (st.memo is not None
                                     or (st.fast and not st.config.daemon.kernel_cache)):
            answers = FastAnswers(len(st.rules.rules))
            st = replace(st, answers=answers)
        old = getattr(self, "state", None)
        with self._answers_lock:
            if answers is not None:
                self._answer_sets.append((answers, st.rules.hits))
        self.state = st
        self._flags[FLAG_POLL_MAX_NS] = st.config.daemon.busy_poll_us * 1000
        self._relay.takeover_s = max(0.005, min(0.05, st.deadline_s / 10))
        self._flags[FLAG_SERIAL] += 1
        if old is not None and old.answers is not None and old.answers is not answers:
            # Cleared, nothing more can be answered from it (the C loop looks entries up holding
            # the GIL), so its counts are final: fold them in now.
            old.answers.clear()
            self._retire_answers(old.answers)

    def _retire_answers(self, answers: FastAnswers) -> None:
        """Fold a replaced table's last counts in and stop tracking it."""
        self._fold_answers()
        with self._answers_lock:
            self._answer_sets = [a for a in self._answer_sets if a[0] is not answers]

    def _fold_answers(self) -> None:
        with self._answers_lock:
            sets = list(self._answer_sets)
        for answers, hits in sets:
            self.stats.fold_table(answers.take_counts(), hits)

    def _cache_dropped(self, key: int | None) -> None:
        """The verdict cache dropped one file's entry (key) or all of them (None): the
        table answers standing on them go too."""
        with self._answers_lock:
            sets = list(self._answer_sets)
        for answers, _hits in sets:
            if key is None:
                answers.clear()
            else:
                answers.drop_file(key)

    def _forget_outcomes(self, st: State) -> None:
        """Remembered outcomes may be wrong now (a move, a mount change): drop them all."""
        self._memo_epoch += 1
        if st.memo is not None:
            st.memo.clear()
        if st.answers is not None:
            st.answers.clear()
        self.stats.memo_clears += 1

    def _build_state(self, config: Config, generation: int, plugins: tuple[Plugin, ...],
                     ruleset: rules_mod.RuleSet) -> State:
        st = build_state(config, self.group.features, self.group.accepts_deny_errno, generation, (),
                         plugins, ruleset)
        for number, resp in st.rule_responses.items():
            if resp == fan.FAN_DENY:
                log.warning("rule %d: its errno is not accepted by this kernel; it denies with EPERM",
                            number)
        if config.daemon.deny_errno != "EPERM" and st.deny_response == fan.FAN_DENY:
            log.warning("deny_errno = %s is not accepted by this kernel (it needs a pre-content "
                        "group, 6.14+, and one of the errnos fanotify allows): openers will see EPERM",
                        config.daemon.deny_errno)
        return st

    # ------------------------------------------------------------------ marks -------------------
    def _sync_marks(self) -> None:
        """Mark what the watch list covers now; drop marks no longer wanted. Runs on the loop
        thread: fanotify_mark looks paths up but opens nothing."""
        st = self.state
        cfg = st.config.daemon
        per_mount = cfg.mark == "mount"
        kind = fan.FAN_MARK_MOUNT if per_mount else fan.FAN_MARK_FILESYSTEM
        plan = mounts.plan_marks(mounts.read_mountinfo(), cfg.watch, st.config.exclude.fs_types, per_mount)
        # With several readers close-writes come through each one's own change group instead.
        mask = st.perm_mask | (fan.FAN_CLOSE_WRITE if self.changes is None else 0)
        wanted = {(m.mount_id if per_mount else m.dev): m for m in plan.mounts}
        self._sync_change_marks(wanted, kind)  # before new permission marks: no write unseen
        for key, m in list(self.marked.items()):
            if key not in wanted:
                try:
                    if not self._child:  # a reader process follows the first one's marks
                        self.group.unmark(m.mount_point, mask, kind=kind)
                except OSError:
                    pass  # gone with its mount
                del self.marked[key]
        for key, m in wanted.items():
            if key in self.marked:
                continue
            if self._child:
                self.marked[key] = m
                continue
            try:
                self.group.mark(m.mount_point, mask, kind=kind)
            except OSError as e:
                log.warning("cannot mark %s (%s): %s", os.fsdecode(m.mount_point), m.fstype, e.strerror)
                continue
            self.marked[key] = m
            log.info("marked %s %s (%s)", "mount" if per_mount else "filesystem",
                     os.fsdecode(m.mount_point), m.fstype)
        self.fstypes = {m.dev: m.fstype for m in self.marked.values()}
        self._sync_move_marks()
        if plan.scope != st.exclusions.scope:
            self._install_state(replace(st, exclusions=Exclusions(st.config.exclude, plan.scope)))

    def _sync_change_marks(self, wanted: dict[int, mounts.Mount], kind: int) -> None:
        """This process's change group covers what the permission group covers."""
        changes = self.changes
        if changes is None:
            return
        for key in list(self._change_marked):
            if key not in wanted:
                try:
                    changes.unmark(self._change_marked.pop(key).mount_point, kind=kind)
                except OSError:
                    pass
        for key, m in wanted.items():
            if key in self._change_marked:
                continue
            try:
                changes.mark(m.mount_point, kind=kind)
            except OSError as e:
                log.warning("cannot watch writes on %s (%s): %s; its verdicts are checked against "
                            "the file's version only", os.fsdecode(m.mount_point), m.fstype, e.strerror)
                continue
            self._change_marked[key] = m

    def _changes_seen(self) -> None:
        """Drop the verdicts of files closed after writing (this process's change group).
        Called by the read loop before each batch, and by the housekeeper when no batch comes
        (so the kernel's queue does not hold the files); both under the moves lock, with the
        flag the C loop checks, as for moves."""
        changes = self.changes
        if changes is None:
            return
        with self._moves_lock:
            changed, overflow = changes.drain()
            for st in changed:
                self.cache.invalidate(file_key(st))
        self.stats.notification += len(changed)
        if overflow:
            self.stats.overflows += 1
            log.error("change queue overflow: writes were not seen; cache flushed")
            self.cache.bump_generation()

    def _peers_seen(self) -> None:
        """Exec events other readers read: the open that completes each is part of the exec."""
        peers = self.peers
        if peers is None:
            return
        with self._moves_lock:
            for kind, pid, key in peers.drain():
                if kind != EXEC:  # another reader's own child (an isolated plugin's process)
                    self._own_pid(pid, kind == OWN, tell=False)
                    continue
                self._expect_exec_open(pid, key)
                if len(self._noted_execs) > 4096:
                    self._noted_execs.clear()
                self._noted_execs[pid] = key
                self.stats.exec_notes_in += 1

    def _sync_move_marks(self) -> None:
        """Watch directory moves on every filesystem with permission marks (for the memo).
        `move_devs` is published whole for the read loop, after the marks it names are on
        and before those taken off go."""
        moves = self.moves
        if moves is None:
            return
        st = self.state
        # Only where something reads them: without a memo and without path rules over kernel
        # marks, a move changes no answer, and each mark is one more the kernel walks per open.
        needed = st.memo is not None or (st.rules.needs_path and st.config.daemon.kernel_cache)
        wanted = {m.dev: m for m in self.marked.values()} if needed else {}
        gone = self._move_marked.keys() - wanted.keys()
        if gone:
            with self._moves_lock:  # outcomes remembered for these filesystems lapse now
                self._forget_outcomes(self.state)
            self.move_devs = frozenset(self._move_marked.keys() - gone)
            for dev in gone:
                moves.unmark(self._move_marked.pop(dev).mount_point)
        for dev, m in wanted.items():
            if dev in self._move_marked:
                continue
            try:
                moves.mark(m.mount_point)
            except OSError as e:
                log.info("directory moves on %s (%s) cannot be watched (%s): rule outcomes there "
                         "are worked out on every open", os.fsdecode(m.mount_point), m.fstype,
                         e.strerror)
                continue
            self._move_marked[dev] = m
        self.move_devs = frozenset(self._move_marked)

    # ------------------------------------------------------------------ answers -----------------
    def _answer(self, p: Pending, allow: bool, reason: str, degraded: str | None = None,
                why: str = "", rule: rules_mod.Rule | None = None, mark: bool = False) -> bool:
        """Answer an event exactly once; False if it was answered already. An answer decided
        by a rule asks the kernel for an audit record carrying the rule's number. `mark`: an
        allow of a clean file the kernel may answer for from now on (see _kernel_cache); the
        event fd is closed with the answer."""
        with self._answer_lock:
            if p.answered:
                return False
            p.answered = True
        if p.watcher and p.watcher == threading.get_ident():
            # The inline scan is over (its plugins returned): stop watching before the answer
            # wakes the opener, whose next event is then read by this thread, not a standby.
            p.watcher = 0
            self._relay.end_scan()
        if mark:  # a clean allow, never logged: the fd may close with it
            fd, st = p.fd, p.obj.stat
            p.delivered = self._allow_marked(fd, p.state.perm_mask, st.st_mtime_ns, st.st_ctime_ns,
                                             st.st_size)
            p.fd = p.obj.fd = -1  # closed: nothing may read through that number again
        elif rule is not None:
            response = (fan.FAN_ALLOW if allow
                        else p.state.rule_responses.get(rule.number, p.state.deny_response))
            p.delivered = self.group.respond(p.fd, response, audit=True, rule_number=rule.number)
        else:
            p.delivered = self.group.respond(p.fd, fan.FAN_ALLOW if allow else p.state.deny_response)
        self.stats.answered(allow, reason, degraded)
        if not allow:
            log.warning("deny %s %s by %s: %s", p.op, p.obj.display_path, p.subject.describe(),
                        why or reason)
        elif degraded is not None:
            log.warning("allow %s %s by %s (degraded: %s) %s", p.op, p.obj.display_path,
                        p.subject.describe(), degraded, why)
        return True

    def _answer_by_policy(self, p: Pending, kind: str, why: str, plugin: str | None = None) -> bool:
        """The degraded answer: path class, then plugin, then [scan] defaults decide."""
        pol = p.state.policy
        allow = pol.answer(kind, p.obj.path if pol.needs_path() else None, plugin)
        if plugin is not None:
            why = f"{plugin}: {why}"
        answered = self._answer(p, allow, "degraded", kind, why)
        if answered and allow and kind != "too_big" and p.state.config.degraded.rescan:
            self.rescans.offer_fd(p.fd, p.obj.stat, p.obj.display_path, p.state.generation,
                                  f"{kind}: {why}")
        return allow

    def _kernel_cache(self, p: Pending, book: bool = True) -> bool:
        """Whether the kernel may answer later opens of this clean file (the answer then marks
        it: _answer's `mark`): not if a rule could decide differently for another opener (a
        rule that depends on who opens, or an audit). `book`: the file is known clean, so a
        rule's refusal is counted and remembered (not yet so when a scan is only being sent)."""
        st = p.state
        if not st.config.daemon.kernel_cache or not self.group.features.evictable_ignore:
            return False
        if st.rules.rules and st.rules.may_match_object("any", p.obj):
            if book:
                self.stats.uncacheable_by_rules += 1
                self.cache.not_for_kernel(p.obj.key)
            return False
        return True

    def _allow_marked(self, fd: int, mask: int, mtime_ns: int, ctime_ns: int, size: int) -> bool:
        """Allow a clean file's event, letting the kernel answer its later opens, and close fd;
        False if the kernel no longer wanted the answer. Raises, leaving fd open, only if the
        answer was refused.

        The ignore mark goes on first, then the file is checked to be still the version that
        was judged (the mark comes off if not), then the answer: once answered, the opener may
        write, and a mark placed after that write would outlive it (the write's modify event,
        which clears marks, came first). A write that updates the times after the check comes
        after the mark too, so the kernel clears it. vetd._hotpath does all of it in one call:
        four calls from Python each gave the GIL up, and each of those is a thread wake-up
        when another thread is waiting for it."""
        if self.hot is not None:
            delivered, marked = self.hot.allow_marked(self._gfd, fd, mask, mtime_ns, ctime_ns,
                                                      size, True)
            if marked > 0:
                self.stats.kernel_marks += 1
            elif marked == 0:
                self.stats.kernel_marks_withdrawn += 1
            return bool(delivered)
        if self.group.ignore_inode(fd, mask):
            try:
                now = os.fstat(fd)
                same = (now.st_mtime_ns, now.st_ctime_ns, now.st_size) == (mtime_ns, ctime_ns, size)
            except OSError:
                same = False
            if same:
                self.stats.kernel_marks += 1
            else:
                self.group.unignore_inode(fd, mask)
                self.stats.kernel_marks_withdrawn += 1
        delivered = self.group.respond(fd, fan.FAN_ALLOW)
        _close_quietly(fd)
        return delivered

    def _apply_rule(self, p: Pending, rule: rules_mod.Rule) -> None:
        why = f"rule {rule.number} ({rule.where}): {rule.text}"
        if rule.action == "allow":
            self._answer(p, True, "rule")
        elif rule.action == "audit":
            if self._answer(p, True, "rule", rule=rule):
                log.warning("audit %s %s by %s: %s", p.op, p.obj.display_path, p.subject.describe(), why)
        elif rule.action == "kill":
            self._kill_and_deny(p, rule, why)
        else:
            self._answer(p, False, "rule", why=why, rule=rule)

    def _kill_and_deny(self, p: Pending, rule: rules_mod.Rule, why: str) -> None:
        """SIGKILL the opener through a pidfd, then deny; never signal a process that only
        inherited the opener's pid.

        The pidfd is opened now, while the opener should still be blocked in its open. It is
        the opener's if the opener did not exit between the event's read and this pidfd_open:
        procwatch proves that (the kernel reports an exit before the pid can be reused), and
        then the kill lands before the deny. Without that proof the deny goes first: the
        kernel taking the answer proves the event was still pending, so the opener was alive
        throughout and the pidfd is its own; the kill follows a few microseconds later, and
        the denied open or exec has failed either way."""
        desc = p.subject.describe()  # before the kill: /proc/PID goes with the process
        pid = p.subject.pid
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            log.warning("kill %s (%s %s): %s; denied", desc, p.op, p.obj.display_path, e.strerror)
            self._answer(p, False, "rule", why=why, rule=rule)
            return
        try:
            procs = self.procwatch
            proven = procs is not None and not procs.maybe_exited(pid, p.subject.epoch)
            if not proven:
                self._answer(p, False, "rule", why=why, rule=rule)
                if not p.delivered:
                    log.warning("kill %s: it was gone before the answer; not signalled", desc)
                    return
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                self.stats.kills += 1
                log.warning("kill %s (%s %s): %s", desc, p.op, p.obj.display_path, why)
            except OSError as e:
                log.warning("kill %s: %s", desc, e.strerror)
            if proven:
                self._answer(p, False, "rule", why=why, rule=rule)
        finally:
            os.close(pidfd)

    # ------------------------------------------------------------------ the hot path ------------
    def _expect_exec_open(self, pid: int, key: int) -> None:
        """pid's next open of file `key` completes its exec (bounded: an exec that never opens)."""
        if len(self._exec_opens) > 4096:
            self._exec_opens.clear()
        self._exec_opens[pid] = key

    def _pair_exec(self, mask: int, pid: int, key: int) -> str | None:
        """The op for the rules when an event belongs to an exec, else None.

        An execve raises an exec event and then, for the same open, a plain open event: that
        second one is part of the exec, not a read, so rules see it as "exec"."""
        if mask & fan.FAN_OPEN_EXEC_PERM and not mask & fan.FAN_OPEN_PERM:
            self._expect_exec_open(pid, key)
            if self.peers is not None:  # before it is answered: the open comes after that
                self.peers.tell_exec(pid, key)
            return "exec"
        if mask & fan.FAN_OPEN_PERM and self._exec_opens.pop(pid, None) == key:
            if self._noted_execs and self._noted_execs.pop(pid, None) == key:
                self.stats.exec_paired_from_notes += 1
            return "exec"
        return None

    def _handle(self, ev: fan.Event, op: str | None = None,
                memo_base: tuple[object, ...] | None = None) -> None:
        """The full decision for one event (the read loop's fast paths took what they could).
        `op` is the exec-paired op if the fast path already worked it out, `memo_base` the
        fast path's key material for remembering this event's outcome."""
        if not ev.mask & fan.PERM_EVENTS:
            self._notification(ev)
            return
        if ev.fd < 0:
            log.error("permission event without a file descriptor (mask %#x)", ev.mask)
            return
        if FAILPOINTS:
            failpoints.hit("handle")
        if ev.pid in self.own_pids:
            self.group.respond(ev.fd, fan.FAN_ALLOW)
            self.stats.answered(True, "own", None)
            self._release(ev)
            return
        p = Pending(ev, self.state, self.fstypes, self.procwatch, op)
        ev.fd = ev.pidfd = -1  # the Pending owns them now
        p.memo_base = memo_base
        try:
            self._decide(p, op is not None)
        except Exception as e:
            if not p.answered:
                self._answer_by_policy(p, "error", f"{type(e).__name__}: {e}")
            log.error("handling event: %s", format_exception_safely(e))
        finally:
            if not p.handed_off:
                p.close()

    def _remember(self, p: Pending, outcome: int) -> None:
        """Store an exclusion or rule outcome in the memo, if this event's may be remembered:
        a regular file with one link (a second name could match other rules), on a filesystem
        whose moves are watched, unchanged since the fast path's statx."""
        base, memo, token = p.memo_base, p.state.memo, p.state.memo_token
        if base is None or memo is None:
            return
        t = base[2]
        obj = p.obj
        if t[NLINK] != 1 or not S_ISREG(t[MODE]) or obj.stat.st_dev not in self.move_devs:  # type: ignore[index]
            return
        key, version = key_and_version(t)  # type: ignore[arg-type]
        if key != obj.key or version != obj.version:
            return
        tok = token(p.subject) if token is not None else ()
        if _UNSET in tok:
            return
        with self._moves_lock:  # not after a clear that came since this batch was read
            if self._memo_epoch != self._batch_memo_epoch:
                return
            if len(memo) >= MEMO_ENTRIES:  # a plain dict: a lookup is one C call, an LRU's is not
                memo.clear()
            memo[(base[0], base[1], tok, t)] = (outcome, key, version)
        answers = p.state.answers
        if answers is not None and base[1] == op_of(base[0]):  # not an exec-paired op
            if outcome == MEMO_EXCLUDED:
                answers.add((base[0], tok, t), SLOT_EXCLUDED, None, self._batch_epoch)
            elif outcome >= 0 and p.state.rules.rules[outcome].action == "allow":
                answers.add((base[0], tok, t), SLOT_RULE0 + outcome, None, self._batch_epoch)

    def _decide(self, p: Pending, paired: bool = False) -> None:
        failpoints.hit("decide")
        st = p.state
        obj = p.obj
        if st.exclusions.trivial:  # only the file-type layer: skip the call
            if not obj.is_regular:
                self._answer(p, True, "excluded")
                return
        elif st.exclusions.check(op_of(p.mask), p.subject, obj) is not None:
            self._remember(p, MEMO_EXCLUDED)
            self._answer(p, True, "excluded")
            return
        if st.rules.rules:
            if not paired:
                p.op = self._pair_exec(p.mask, p.subject.pid, obj.key) or p.op
            rule = st.rules.evaluate(p.op, p.subject, obj)
            if rule is not None:
                self._remember(p, st.rules.position(rule))
                self._apply_rule(p, rule)
                return
        self._remember(p, MEMO_NO_RULE)
        entry = self.cache.entry(obj.key, obj.version)
        if entry is not None:
            verdict = entry.verdict
            # a clean file here: the kernel evicted its mark, or the rules forbid one
            mark = not verdict.denied and entry.kernel and self._kernel_cache(p)
            self._answer(p, not verdict.denied, "cache", why=verdict.reason, mark=mark)
            return
        if obj.stat.st_size > st.config.scan.max_size:
            self._answer_by_policy(p, "too_big", f"{obj.stat.st_size} bytes > max_size")
            return
        if not st.plugins:
            self.cache.store(obj.key, obj.version, Verdict.allow("no scanner"), st.generation)
            self._answer(p, True, "scan", mark=self._kernel_cache(p))
            return
        p.deadline = time.monotonic() + st.deadline_s
        p.handed_off = True
        if self.scanprocs is not None:
            if not self._send_to_scan_process(p):
                return  # answered already (by policy)
        elif self._inline is None and self._relay.may_scan_inline():
            self._inline = p  # scanned by this thread once the batch is done (see _reader_main)
        elif not self.pool.submit(p):
            p.handed_off = False
            self._answer_by_policy(p, "backlog", f"{self.pool.depth} scans queued")
            return
        with self._deadline_lock:
            self._seq += 1
            heapq.heappush(self._deadlines, (p.deadline, self._seq, p))
        if p.deadline < self._housekeeper_wakes_at:
            self._wake()  # it would sleep past this deadline (a reload shortened deadline_ms)

    # ------------------------------------------------------------------ scan processes ----------
    def _send_to_scan_process(self, p: Pending) -> bool:
        """Hand a scan to a scan process (vetd/scanproc.py); False if it was answered here
        instead (an unhealthy plugin whose policy denies, a full backlog, no live process).
        The plan skips unhealthy plugins as _scan does; the scan process may answer a clean
        file itself only when nothing was skipped (else the answer is the degraded one)."""
        st = p.state
        sp = self.scanprocs
        assert sp is not None
        if sp.in_flight() >= st.config.scan.backlog:
            p.handed_off = False
            self._answer_by_policy(p, "backlog", f"{sp.in_flight()} scans in flight")
            return False
        now = time.monotonic()
        plan: list[list[Any]] = []
        degraded = None
        for plugin in st.plugins:
            name = plugin.name
            if not st.breakers[name].allow(now):
                if not self._skip_unhealthy(p, name, self._plugin_stats(name)):
                    p.handed_off = False
                    return False
                degraded = ("unhealthy", name, "skipped while unhealthy")
                continue
            pp = st.policy.plugins.get(name)
            plan.append([name, now + pp.deadline_s if pp is not None and pp.deadline_s else 0])
        p.degraded = degraded
        mark_ok = self._kernel_cache(p, book=False)
        if sp.submit(p, p.fd, mark_ok, st.perm_mask, p.deadline, plan, degraded is None,
                     p.subject.pid):
            return True
        p.handed_off = False
        self._answer_by_policy(p, "error", "no scan process is running")
        return False

    def _skip_unhealthy(self, p: Pending, name: str, stats: PluginStats) -> bool:
        """A plugin whose breaker is open is skipped: True to go on without it (the answer will
        be the degraded one), False if its policy denied the event here and now."""
        stats.skipped += 1
        pol = p.state.policy
        if pol.answer("unhealthy", p.obj.path if pol.needs_path() else None, name):
            return True
        self._answer_by_policy(p, "unhealthy", "skipped while unhealthy", name)
        return False

    def _plugin_stats(self, name: str) -> PluginStats:
        return self.plugin_stats.get(name) or self.plugin_stats.setdefault(name, PluginStats())

    def _scanned(self, job: object, report: dict[str, Any]) -> None:
        """A scan process's report (on its reader thread): what _scan does with the verdicts,
        for a scan run elsewhere. A clean file it answered itself only needs remembering."""
        p = job
        assert isinstance(p, Pending)
        try:
            self._apply_report(p, report)
        except Exception as e:
            if not p.answered:
                self._answer_by_policy(p, "error", f"{type(e).__name__}: {e}")
            log.error("scan report: %s", format_exception_safely(e))
        finally:
            p.close()

    def _apply_report(self, p: Pending, report: dict[str, Any]) -> None:
        st, obj = p.state, p.obj
        verdicts: list[Verdict] = []
        for entry in report.get("results", []):
            name, kind = entry[0], entry[1]
            if not name:  # the file itself failed (fstat in the scan process)
                if not p.answered:
                    self._answer_by_policy(p, "error", str(entry[2]))
                return
            stats = self._plugin_stats(name)
            stats.scans += 1
            breaker = st.breakers.get(name)
            if kind == "error":
                if p.answered:
                    return
                if entry[3]:  # it gave up at the deadline it was told: a timeout
                    p.current = name
                    self._timeout(p, time.monotonic(), "over its deadline (in a scan process)")
                    p.current = None
                    return
                self._plugin_failed(p, name, stats, breaker, str(entry[2]))
                self._answer_by_policy(p, "error", str(entry[2]), name)
                return
            if breaker is not None:
                breaker.success()
            v = Verdict(Decision(kind), entry[2], name, bool(entry[3]), entry[4])
            if v.denied:
                self._denied_by(p, name, stats, v)
                return
            verdicts.append(v)
        if p.answered:
            return  # its deadline came first
        verdict = combine(verdicts)
        self.cache.store(obj.key, obj.version, verdict, st.generation)
        if report.get("answered"):
            with self._answer_lock:
                if p.answered:
                    return
                p.answered = True
            p.delivered = bool(report.get("delivered"))
            marked = report.get("marked", -1)
            if marked > 0:
                self.stats.kernel_marks += 1
            elif marked == 0:
                self.stats.kernel_marks_withdrawn += 1
            else:
                self._kernel_cache(p)  # unmarked: if the rules forbade it, count and remember that
            self.stats.answered(True, "scan", None)
            return
        if p.degraded is not None:
            kind, name, why = p.degraded
            self._answer_by_policy(p, kind, why, name)
            return
        mark = verdict.cacheable and verdict.ttl_s is None and self._kernel_cache(p)
        self._answer(p, True, "scan", mark=mark)

    def _plugin_failed(self, p: Pending, name: str, stats: PluginStats, breaker: Breaker | None,
                       why: str) -> None:
        """Count and log a plugin's failure on this event (the caller answers by policy)."""
        stats.errors += 1
        if breaker is not None and breaker.failure(time.monotonic()):
            log.error("plugin %s is unhealthy after %d failures in a row: skipped by "
                      "policy, probed again in %gs", name, breaker.failures, breaker.retry_after_s)
        log.error("plugin %s failed on %s: %s", name, p.obj.display_path, why)

    def _denied_by(self, p: Pending, name: str, stats: PluginStats, v: Verdict) -> None:
        stats.denies += 1
        self.cache.store(p.obj.key, p.obj.version, v, p.state.generation)
        self._answer(p, False, "scan", why=f"{name}: {v.reason}")

    def _scan_lost(self, job: object, why: str) -> None:
        p = job
        assert isinstance(p, Pending)
        try:
            if not p.answered:
                self._answer_by_policy(p, "error", why)
        finally:
            p.close()

    def _notification(self, ev: fan.Event) -> None:
        self.stats.notification += 1
        try:
            if ev.mask & fan.FAN_Q_OVERFLOW:
                self.stats.overflows += 1
                log.error("fanotify queue overflow: notification events were lost; cache flushed")
                self.cache.bump_generation()
            elif ev.fd >= 0 and ev.mask & (fan.FAN_CLOSE_WRITE | fan.FAN_MODIFY):
                st = os.fstat(ev.fd)
                self.cache.invalidate(file_key(st))
        finally:
            self._release(ev)

    @staticmethod
    def _release(ev: fan.Event) -> None:
        """Close an event's fds and forget them, so nothing can close a reused number later."""
        fd, pidfd = ev.fd, ev.pidfd
        ev.fd = ev.pidfd = -1
        _close_quietly(fd, pidfd)

    # ------------------------------------------------------------------ workers -----------------
    def _scan_job(self, job: object) -> None:
        p = job  # type: ignore[assignment]
        assert isinstance(p, Pending)
        try:
            if not p.answered:  # else it expired while queued
                self._scan(p)
        except Exception as e:
            if not p.answered:
                self._answer_by_policy(p, "error", f"{type(e).__name__}: {e}")
            log.error("scan job: %s", format_exception_safely(e))
        finally:
            p.current = None
            p.close()

    def _scan(self, p: Pending) -> None:
        """Ask each plugin in turn (deny wins and stops); failures go through the breaker and
        the degraded policy. The loop may answer meanwhile (a deadline): then stop quietly."""
        st, obj = p.state, p.obj
        sf = obj.scan_file
        opener = Opener(p.subject)
        verdicts: list[Verdict] = []
        degraded: tuple[str, str, str] | None = None  # (kind, plugin, why) of an allowed failure
        for plugin in st.plugins:
            name = plugin.name
            stats = self._plugin_stats(name)
            breaker = st.breakers[name]
            now = time.monotonic()
            if not breaker.allow(now):
                if not self._skip_unhealthy(p, name, stats):
                    return
                degraded = ("unhealthy", name, "skipped while unhealthy")
                continue
            pp = st.policy.plugins.get(name)
            p.plugin_deadline = now + pp.deadline_s if pp is not None and pp.deadline_s else 0.0
            sf.deadline = min(p.deadline, p.plugin_deadline) if p.plugin_deadline else p.deadline
            p.current = name
            if p.plugin_deadline and p.plugin_deadline < self._housekeeper_wakes_at:
                self._wake()
            stats.scans += 1
            try:
                v = checked(plugin.scan(sf, opener), name)
            except Exception as e:
                if p.answered:
                    p.current = None
                    return  # timed out meanwhile; the loop recorded it
                now = time.monotonic()
                if now >= sf.deadline:  # type: ignore[operator]
                    # It gave up at the deadline it was told (ScanFile.deadline): a timeout,
                    # whichever of it and the housekeeper noticed first.
                    self._timeout(p, now, "over its own deadline" if sf.deadline == p.plugin_deadline
                                  else f"no verdict within {st.deadline_s:g}s")
                    p.current = None
                    return
                p.current = None
                why = f"{type(e).__name__}: {e}"
                self._plugin_failed(p, name, stats, breaker, why)
                if not self._answer_by_policy(p, "error", why, name):
                    return
                degraded = ("error", name, why)
                continue
            p.current = None
            if p.answered:
                return
            breaker.success()
            if v.denied:
                self._denied_by(p, name, stats, v)
                return
            verdicts.append(v)
        if degraded is not None:
            if not p.answered:
                self._answer_by_policy(p, degraded[0], degraded[2], degraded[1])
            return
        verdict = combine(verdicts)
        self.cache.store(obj.key, obj.version, verdict, st.generation)
        mark = verdict.cacheable and verdict.ttl_s is None and not p.answered and self._kernel_cache(p)
        self._answer(p, True, "scan", mark=mark)

    def _rescan(self, item: RescanItem) -> None:
        """Scan a file a degraded answer let through; a deny is cached, so later opens fail."""
        st = self.state
        sf = ScanFile(item.fd, item.stat, item.path)
        opener = Opener(Subject(0))
        for plugin in st.plugins:
            if not st.breakers[plugin.name].allow(time.monotonic()):
                continue
            v = checked(plugin.scan(sf, opener), plugin.name)
            if v.denied:
                self.stats.late_detections += 1
                self.cache.store(file_key(item.stat), file_version(item.stat), v, st.generation)
                log.error("late detection: %s was allowed by degraded policy (%s) and is bad: "
                          "%s: %s; later opens are denied", item.path, item.reason, plugin.name, v.reason)
                return

    def _expire(self, now: float) -> None:
        dl = self._deadlines
        expired = []
        with self._deadline_lock:
            while dl and (dl[0][2].answered or dl[0][0] <= now):
                expired.append(heapq.heappop(dl)[2])
            if len(dl) > 1024:  # answered events wait behind older ones: drop them all at once
                dl[:] = [d for d in dl if not d[2].answered]
                heapq.heapify(dl)
        for p in expired:
            if not p.answered:
                self._timeout(p, now, f"no verdict within {p.state.deadline_s:g}s")
        if self.scanprocs is not None:
            self.scanprocs.tend(now)
        stuck = 0
        for job in self.pool.running_jobs():
            p = job  # type: ignore[assignment]
            if p.answered:
                stuck += p.current is not None
            elif p.current is not None and 0 < p.plugin_deadline <= now:
                self._timeout(p, now, "over its own deadline")
        # A thread stuck in a hung plugin cannot be killed: keep enough free workers beside it.
        want = p_workers = self.state.config.scan.workers
        if stuck and self.pool.workers < min(p_workers + stuck, 2 * p_workers + 4):
            want = p_workers + stuck
            log.error("%d scan worker(s) stuck in a plugin past the deadline; starting "
                      "replacements (%d workers)", stuck, min(want, 2 * p_workers + 4))
            self.pool.resize(min(want, 2 * p_workers + 4))

    def _timeout(self, p: Pending, now: float, why: str) -> None:
        """The one place an expired deadline is answered; the plugin running, if any, is blamed.
        Called by the housekeeper and by the scanning thread (a plugin that gave up at its
        ScanFile.deadline): only the first of them counts it."""
        with self._answer_lock:
            if p.answered or p.timing_out:
                return
            p.timing_out = True
        plugin = p.current
        if plugin is not None:
            self.plugin_stats.setdefault(plugin, PluginStats()).timeouts += 1
            breaker = p.state.breakers.get(plugin)
            if breaker is not None and breaker.failure(now):
                log.error("plugin %s is unhealthy after %d failures in a row (timeouts)", plugin,
                          breaker.failures)
        self._answer_by_policy(p, "timeout", why, plugin)

    def _tick(self) -> float:
        st = self.state
        shortest = min([st.deadline_s] + [pp.deadline_s for pp in st.policy.plugins.values()
                                          if pp.deadline_s])
        return max(0.005, shortest / 10)

    def _next_deadline(self) -> float:
        with self._deadline_lock:
            nxt = self._deadlines[0][0] if self._deadlines else float("inf")
        for job in self.pool.running_jobs():
            pd = job.plugin_deadline  # type: ignore[attr-defined]
            if pd and not job.answered:  # type: ignore[attr-defined]
                nxt = min(nxt, pd)
        return nxt

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass  # already full of wake-ups

    # ------------------------------------------------------------------ reload ------------------
    def request_reload(self, done: Future[str] | None = None) -> None:
        """Build the new state on a thread of its own (it opens files), then hand it to the loop."""
        with self._reload_lock:
            if self._reloading:
                if done is not None:
                    done.set_exception(RuntimeError("a reload is already running"))
                return
            self._reloading = True
        self.notifier.reloading()
        threading.Thread(target=self._reload_worker, args=(done,), name="vetd-reload", daemon=True).start()

    def _reload_worker(self, done: Future[str] | None) -> None:
        new: State | None = None
        try:
            cfg = self._reload_source()
            if self._watch_override is not None:
                cfg = cfg.with_watch(self._watch_override)
            ruleset = load_rules(cfg)
            plugins = tuple(plugin_loader.load_all(cfg.plugins, self._isolate))
            new = self._build_state(cfg, 0, plugins, ruleset)
            msg = f"reloaded {cfg.path}"
            if cfg.daemon.readers != self.readers_n:
                msg += (f" ([daemon] readers = {cfg.daemon.readers} takes effect at the next start; "
                        f"reading in {self.readers_n} now)")
        except Exception as e:
            msg = f"reload failed, keeping the running configuration: {e}"
        if new is not None and self.readers is not None:
            # The others load the same file themselves; one that cannot keeps its old state.
            for k, reply in enumerate(self.readers.ask_all("reload", RELOAD_TIMEOUT_S), start=1):
                result = str(reply.get("result", reply.get("error", "no answer")))
                if not result.startswith("reloaded"):
                    msg += f"; reader {k}: {result}"
        with self._reload_lock:
            self._reload_results.append((new, msg, done))
        self._wake()

    def _apply_reloads(self) -> None:
        with self._reload_lock:
            results, self._reload_results = self._reload_results, []
        for new, msg, done in results:
            if new is None:
                log.error("%s", msg)
            else:
                old = self.state
                gen = self.cache.bump_generation()
                if new.config.cache.entries != old.config.cache.entries:
                    self.cache.resize(self._cache_share(new.config))
                self._install_state(replace(new, generation=gen, exclusions=Exclusions(
                    new.config.exclude, old.exclusions.scope)))
                set_level(new.config.daemon.log_level)
                self._watch_processes_if_needed()
                self.pool.resize(new.config.scan.workers)
                self._start_scan_processes(new.config)
                self.group.flush_ignores()
                self._sync_marks()
                self.config_path = new.config.path
                threading.Thread(target=self._retire, args=([old],), daemon=True).start()
                del old
                log.info("%s (generation %d)", msg, gen)
            with self._reload_lock:
                self._reloading = False
            self.notifier.ready(self.status_line())
            if done is not None:
                if new is None:
                    done.set_exception(RuntimeError(msg))
                else:
                    done.set_result(msg)

    def _retire(self, holder: list[State]) -> None:
        """Close replaced plugins once scans that may still use them have had their deadline,
        then let their memory go (the state comes in a list so that nothing else holds it)."""
        old = holder.pop()
        time.sleep(old.deadline_s + 1.0)
        for plugin in old.plugins:
            try:
                plugin.close()
            except Exception as e:
                log.error("closing plugin %s: %s", plugin.name, e)
        del old
        release_free_memory()  # the replaced plugins' memory (rules, lists), now free

    # ------------------------------------------------------------------ control -----------------
    def _reload_cmd(self, args: dict[str, Any]) -> str:
        done: Future[str] = Future()
        self.request_reload(done)
        return done.result(timeout=60)

    def status(self) -> dict[str, Any]:
        self._fold_answers()
        st, s = self.state, self.stats
        f = self.group.features
        table_cache = s.table_by_reason.get("cache", 0)
        c_seen = self._flags[FLAG_SEEN]
        return {
            "version": __version__,
            "mode": "enforcing",
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "config": {"path": st.config.path, "generation": st.generation,
                       "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.loaded_at))},
            "features": {k: getattr(f, k) for k in ("pre_content", "report_pidfd", "deny_errno",
                                                      "evictable_ignore", "exec_perm", "audit")},
            "marks": [{"path": os.fsdecode(m.mount_point), "fstype": m.fstype,
                       "kind": st.config.daemon.mark} for m in self.marked.values()],
            "events": {"seen": s.seen + c_seen, "permission": s.permission + c_seen,
                       "notification": s.notification,
                       "overflows": s.overflows},
            "answers": {"allow": s.allow + s.fast_hits + s.table_answers, "deny": s.deny,
                        "by_reason": self._by_reason()},
            "cache": {"entries": len(self.cache), "hits": self.cache.hits + table_cache,
                      "misses": self.cache.misses,
                      "hit_rate": round(self._hit_rate(table_cache), 4), "kernel_marks": s.kernel_marks,
                      "kernel_marks_withdrawn": s.kernel_marks_withdrawn,
                      "ignore_flushes": s.ignore_flushes,
                      "generation": self.cache.generation},
            "degraded": dict(s.degraded),
            "backlog": {"depth": self.pool.depth, "limit": self.pool.backlog,
                        "in_flight": sum(1 for d in list(self._deadlines) if not d[2].answered),
                        "read_loop": "waiting" if not self._reader_busy() else "working",
                        "workers": self.pool.workers, "inline_scans": s.inline_scans,
                        "read_takeovers": s.read_takeovers,
                        "scan_processes": (self.scanprocs.status() if self.scanprocs is not None
                                           else {"processes": 0})},
            "plugins": [self._plugin_status(p.name, st) for p in st.plugins],
            "late_detections": s.late_detections,
            "process_cache": ({"entries": len(self.procwatch.procs), "forgotten": self.procwatch.forgotten,
                               "overruns": self.procwatch.overruns}
                              if self.procwatch is not None else {"enabled": False}),
            "rules": {"count": len(st.rules), "files": list(st.rules.files), "kills": s.kills,
                      "uncacheable_in_kernel": s.uncacheable_by_rules,
                      "hits": [h for h in st.rules.hit_table() if h["hits"]],
                      "memo": {"enabled": st.memo is not None,
                               "entries": len(st.memo) if st.memo is not None else 0,
                               "clears": s.memo_clears}},
            "hot_path": {"compiled": self.hot is not None,
                         "table_entries": len(st.answers) if st.answers is not None else 0,
                         "answered": s.table_answers,
                         "by_reason": dict(s.table_by_reason),
                         "busy_poll": self._busy_poll_status()},
            "rescan": {"queued": self.rescans.depth, "limit": st.config.degraded.rescan_queue,
                       "enabled": st.config.degraded.rescan},
            "exec_notes": {"sent": self.peers.sent if self.peers is not None else 0,
                           "dropped": self.peers.dropped if self.peers is not None else 0,
                           "received": s.exec_notes_in, "paired": s.exec_paired_from_notes},
        }

    def _busy_poll_status(self) -> dict[str, Any]:
        fl = self._flags
        return {"max_us": fl[FLAG_POLL_MAX_NS] // 1000 if self.hot is not None else 0,
                "window_us": round(fl[FLAG_POLL_NS] / 1000, 1),
                "caught": fl[FLAG_POLL_CAUGHT],
                "spent_s": round(fl[FLAG_POLL_SPENT_NS] / 1e9, 3)}

    def _by_reason(self) -> dict[str, int]:
        reasons = dict(self.stats.by_reason)
        if self.stats.fast_hits:
            reasons["cache"] = reasons.get("cache", 0) + self.stats.fast_hits
        for reason, n in self.stats.table_by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + n
        return reasons

    def _hit_rate(self, table_hits: int) -> float:
        hits = self.cache.hits + table_hits
        total = hits + self.cache.misses
        return hits / total if total else 0.0

    def _plugin_status(self, name: str, st: State) -> dict[str, Any]:
        ps = self.plugin_stats.get(name, PluginStats())
        br = st.breakers[name]
        return {"name": name, "health": br.state, "scans": ps.scans, "denies": ps.denies,
                "errors": ps.errors, "timeouts": ps.timeouts, "skipped": ps.skipped,
                "failures_in_a_row": br.failures, "trips": br.trips}

    def _status_cmd(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._all_status()

    def _all_status(self, replies: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """status(), with the other readers' counters added in (and a word on each): asked now,
        or `replies` they gave before."""
        mine = self.status()
        if self.readers is None:
            return mine
        def word(pid: int, st: dict[str, Any]) -> dict[str, Any]:
            if "answers" not in st:
                return {"pid": pid, "error": st.get("error", "no status")}
            return {"pid": pid, "allow": st["answers"]["allow"], "deny": st["answers"]["deny"],
                    "generation": st["config"]["generation"]}

        each = [word(os.getpid(), mine)]  # before the others' counters are added in
        if replies is None:
            replies = self.readers.ask_all("status")
        for c, theirs in zip(self.readers.children, replies):
            each.append(word(c.pid, theirs))
            if "answers" in theirs:
                merge_status(mine, theirs)
        cache = mine["cache"]
        total = cache["hits"] + cache["misses"]
        cache["hit_rate"] = round(cache["hits"] / total, 4) if total else 0.0
        mine["readers"] = each
        return mine

    def status_line(self) -> str:
        """The service status line, from the (summed) status. The housekeeper's: it never waits
        on a reader (one stopped or stuck would hold the deadlines up), it uses what they said
        last (vetd/readers.py polls them)."""
        s = self._all_status(self.readers.latest if self.readers is not None else None)
        sick = [p["name"] for p in s["plugins"] if p["health"] != Breaker.CLOSED]
        health = f"; UNHEALTHY: {', '.join(sick)}" if sick else ""
        readers = f"; {len(s['readers'])} readers" if "readers" in s else ""
        return (f"{s['events']['permission']} events: {s['answers']['allow']} allowed, "
                f"{s['answers']['deny']} denied, {sum(s['degraded'].values())} degraded; "
                f"cache {s['cache']['hit_rate']:.0%} hits, {s['cache']['kernel_marks']} kernel marks; "
                f"backlog {s['backlog']['depth']}{health}{readers}")

    # ------------------------------------------------------------------ the loop ----------------
    def _reader_busy(self) -> float:
        """When the batch the read loop is on was read (monotonic seconds), 0.0 while it waits
        in read(). The C loop keeps its own clock in the flags (CLOCK_MONOTONIC, as here)."""
        ns = self._flags[FLAG_BUSY_NS]
        return self._reader_busy_since or (ns / 1e9 if ns else 0.0)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload_flag = True
        else:
            self.stopping = True
            self._flags[FLAG_STOP] = 1

    def run(self, watch_override: tuple[str, ...] | None = None) -> int:
        self._watch_override = watch_override
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.control.start()  # type: ignore[union-attr]
        self._start_scan_processes(self.state.config)
        try:
            self._start_readers()
        except Exception:
            self._shutdown()
            raise
        self._sync_marks()
        release_free_memory()  # start-up's freed heap, before it is carried for vetd's life
        if not self.marked:
            log.warning("no filesystem is marked: nothing will be vetted (check [daemon] watch)")
        self.notifier.ready(self.status_line())
        log.info("vetd %s ready: %d filesystem(s) marked, %d plugin(s): %s", __version__,
                 len(self.marked), len(self.state.plugins),
                 ", ".join(p.name for p in self.state.plugins) or "none")
        try:
            self._loop()
        finally:
            self.notifier.stopping()
            log.info("stopping: removing the marks, answering what is pending; the kernel allows "
                     "whatever is left when the process exits")
            self._shutdown()
        return self.exit_code

    def run_reader(self, ready: Callable[[], None],
                   watch_override: tuple[str, ...] | None = None) -> int:
        """A reader process's life (vetd/readers.py): follow the marks, say ready, read until
        told to stop. SIGHUP is the first process's: it passes reloads on. `watch_override`
        is the first process's --watch, kept across reloads as there."""
        self._watch_override = watch_override
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._sync_marks()
        release_free_memory()
        ready()
        log.info("reading with %d plugin(s): %s", len(self.state.plugins),
                 ", ".join(p.name for p in self.state.plugins) or "none")
        try:
            self._loop()
        finally:
            self._shutdown()
        return self.exit_code

    def _start_readers(self) -> None:
        """[daemon] readers: start the other reader processes (from the main thread: they die
        with it), wait until each is ready, and tell each which pids are vetd's own."""
        if self.readers_n < 2 or self._child:
            return
        self.readers = Readers(self.readers_n, self.config_path, self._watch_override, self._gfd,
                               self.group.features, self._peer_pipes, self._own_pid)
        self._peer_pipes = []
        self.readers.wait_ready()
        self.readers.poll_status(self.state.config.daemon.status_interval_s)
        pids = sorted(self.own_pids)
        for reply in self.readers.ask_all("own", pids=pids):
            if reply.get("ok") is not True:
                raise ReaderError(f"a reader did not take vetd's pids: {reply.get('error')}")
        log.info("reading in %d processes: %s", self.readers_n,
                 ", ".join(str(p) for p in [os.getpid(), *self.readers.pids]))

    def _reader_died(self, child: object) -> None:
        """A reader is gone, with whatever events it had read and not answered: nobody else can
        answer them, and the kernel lets them through only once every holder of the group fd
        is gone. So vetd stops (the others die with this process), and systemd starts it again."""
        pid = getattr(child, "pid", 0)
        log.critical("reader process %d died: stopping vetd so the kernel lets the opens it held "
                     "through", pid)
        self.exit_code = 1
        self.stopping = True
        self._flags[FLAG_STOP] = 1

    def stop(self) -> None:
        self.stopping = True
        self._flags[FLAG_STOP] = 1
        self._wake()

    def reload_and_wait(self, timeout_s: float) -> str:
        """A reload asked for by the first process: this one's result, or why it failed."""
        done: Future[str] = Future()
        self.request_reload(done)
        try:
            return done.result(timeout=timeout_s)
        except Exception as e:
            return f"reload failed: {e}"

    def set_sibling_pids(self, pids: list[int]) -> None:
        with self._pids_lock:
            self.own_pids = self.own_pids | {int(p) for p in pids}

    def _start_scan_processes(self, config: Config) -> None:
        """Start, resize or stop the scan processes for `config` (on the main thread: their
        death signal is tied to the thread that forks them)."""
        n = config.scan.processes
        if self.scanprocs is not None and n == 0:
            self.scanprocs.close()
            self.scanprocs = None
        elif self.scanprocs is not None:
            self.scanprocs.restart(config.path, n)
        elif n:
            self.scanprocs = ScanProcesses(n, config.path, self._gfd, self._own_pid, self._scanned,
                                           self._scan_lost)
            log.info("scans run in %d scan process(es): %s", n,
                     ", ".join(str(pid) for pid in self.scanprocs.status()["pids"]))

    def _read_loop(self, buf: bytearray) -> None:
        """The read loop: blocks in read() on the group fd and handles each batch, until this
        thread has a scan to do (see _reader_main) or vetd stops.

        A blocking read is one wake-up per event; poll() and then read() measured about 10 us
        more per event for a sequential opener. Everything that must happen on a clock
        (deadlines, the watchdog, reloads, mount changes) is the housekeeper's, on the main
        thread; it sends WATCHDOG=1 only while this loop is waiting or working on a fresh batch.

        Where vetd._hotpath is built, hot.run() reads the batches instead, without the GIL
        (busy polling first, where [daemon] busy_poll_us asks for it), and answers those the
        state's FastAnswers table knows whole, in C, without coming back here. A batch with
        events it does not know, or any event that is not a permission event, comes back with
        those left, in order, for _event. run() returns without answering anything when a
        side channel has news or the state changed while it waited in read(): those are
        applied first and the batch is then answered from the tables as they are after them.
        A state without a table gets an empty one. Without the compiled module every batch
        is read here and every event goes through _event."""
        hot = self.hot
        gfd = self.group.fd
        meta_size = fan.METADATA.size
        flags = self._flags
        event = self._event
        want = self.statx.want
        while not self.stopping:
            st = self.state
            expected = flags[FLAG_SERIAL]
            answers = st.answers
            ready: tuple[int, ...] = ()
            try:
                if hot is None:
                    n = os.readv(gfd, [buf])
                    left = None
                else:
                    side = self._side_fd(st)
                    tables = self._tables(st, answers, want)
                    n, stop, _done, left = hot.run(gfd, buf, side, flags, expected,  # type: ignore[union-attr]
                                                   *tables)
                    if stop < 0:  # news: `left` is the side fds its epoll_wait reported
                        ready, left = left, None
            except OSError as e:  # not EINTR (retried): say so, and do not spin on it
                if self.stopping:
                    return
                if e.errno == errno.EINVAL and len(buf) < fan.READ_SIZE:
                    # an event longer than the buffer: read batches after all
                    log.warning("an event did not fit a one-event read: reading batches")
                    buf.extend(bytes(fan.READ_SIZE - len(buf)))
                    continue
                log.error("read loop: read: %s", e.strerror)
                time.sleep(0.01)
                continue
            self._reader_busy_since = time.monotonic()
            if left is None:  # news first, then the batch as the tables are after it
                st = self.state
                self._side_channels(st, ready)
                answers = st.answers
                stop = 0
                if hot is not None:
                    tables = self._tables(st, answers, want)
                    stop, seen, _done, left = hot.answer(buf, 0, n, gfd, *tables)  # type: ignore[union-attr]
                    flags[FLAG_SEEN] += seen
            self._begin_batch(st)
            while True:
                if left:
                    for loff, t in left:
                        event(st, buf, loff, n, t)
                if stop + meta_size > n:
                    break
                stop = event(st, buf, stop, n)  # what C stopped at: a notification, or malformed
                if hot is None:
                    while stop + meta_size <= n:
                        stop = event(st, buf, stop, n)
                    break
                if stop + meta_size > n:
                    break
                stop, seen, _done, left = hot.answer(buf, stop, n, gfd, *tables)  # type: ignore[union-attr]
                flags[FLAG_SEEN] += seen
            self._reader_busy_since = 0.0
            if self._inline is not None:
                return  # a scan for this thread: _reader_main passes the baton on first

    def _tables(self, st: State, answers: FastAnswers | None, want: int) -> tuple[object, ...]:
        """What hot.run/answer look events up in, for this state. Without a table, nothing:
        a statx only where _event's fast path reuses it (st.fast), every event left to it."""
        if answers is None:
            return (_NO_TABLE, None, None, want if st.fast and self.statx.available else 0,
                    _NO_COUNTS)
        procs = self.procwatch
        if st.memo_token is not None and procs is not None:
            answers.sync_tokens(procs.epoch)  # process events since: no token is sure
        return (answers.table, answers.tokens if st.memo_token is not None else None,
                self._exec_opens if st.rules.rules else None, want, answers.counts)

    def _begin_batch(self, st: State) -> None:
        """What this batch is decided under: answers worked out now may be remembered only if
        nothing cleared the memo or the table since (see _remember)."""
        self._batch_memo_epoch = self._memo_epoch
        if st.answers is not None:
            self._batch_epoch = st.answers.epoch

    def _event(self, st: State, buf: bytearray, off: int, n: int,
               t: tuple[int, ...] | None | bool = False) -> int:
        """Handle the event at buf[off]; returns the offset of the next one (n if the rest
        cannot be parsed). `t` is set for an event vetd._hotpath already counted and left
        here: its statx tuple, or None if it made none.

        Two fast paths answer the warm cases without building a Pending: a clean cache hit
        when nothing excludes or rules (`_fast_clean`), and a remembered exclusion or rule
        outcome (`_fast_memo`). Every microsecond here is one the opener waits."""
        ln, vers, _res, meta_len, mask, efd, pid = fan.METADATA.unpack_from(buf, off)
        if vers != fan.FANOTIFY_METADATA_VERSION or ln < fan.METADATA.size or off + ln > n:
            # nothing after this can be parsed, so nothing in it can be answered
            log.error("read loop: malformed batch (metadata version %d, length %d at "
                      "%d of %d)", vers, ln, off, n)
            return n
        pidfd = fan.pidfd_of(buf, off + meta_len, off + ln) if meta_len < ln else -1
        counted = t is not False
        sx = t if counted else None
        stats = self.stats
        if not counted:
            stats.seen += 1
        ev = None  # the Event, once _handle may own its fds
        try:
            if mask & fan.PERM_EVENTS:
                if not counted:
                    stats.permission += 1
                if efd >= 0 and pidfd < 0 and pid not in self.own_pids:
                    if st.fast:
                        if self._fast_clean(st, efd, mask, sx):  # type: ignore[arg-type]
                            return off + ln
                    elif st.memo is not None:
                        done = self._fast_memo(st, efd, mask, pid, sx)  # type: ignore[arg-type]
                        if done is True:
                            return off + ln
                        ev = fan.Event(mask, efd, pid)
                        self._handle(ev, *done)  # type: ignore[misc]
                        return off + ln
            ev = fan.Event(mask, efd, pid, pidfd)
            self._handle(ev)
        except Exception as e:  # one event's failure must not strand the rest
            log.error("read loop: %s", format_exception_safely(e))
            self._last_resort(ev if ev is not None else fan.Event(mask, efd, pid, pidfd))
        return off + ln

    def _fast_clean(self, st: State, efd: int, mask: int, t: tuple[int, ...] | None = None) -> bool:
        """A clean cache hit when nothing excludes and there are no rules: answered and closed
        here (True), else nothing done (False). Raises only before the answer. `t`: the
        compiled loop's statx of the fd, if it made one; the hit then also becomes a table
        answer for next time (the state has a table only where no kernel mark is wanted)."""
        if t is None:
            try:
                pre: os.stat_result | None = os.fstat(efd)
            except OSError:
                return False
            if not S_ISREG(pre.st_mode):
                return False
            key, version = file_key(pre), file_version(pre)
        else:
            if not S_ISREG(t[MODE]):
                return False
            pre = None
            key, version = key_and_version(t)
        e = self.cache.clean_entry(key, version)
        if e is None:
            return False
        if st.config.daemon.kernel_cache and self.group.features.evictable_ignore:
            # the kernel had evicted its mark: put it back
            if pre is not None:
                self._allow_marked(efd, st.perm_mask, pre.st_mtime_ns, pre.st_ctime_ns, pre.st_size)
            else:
                self._allow_marked(efd, st.perm_mask, t[MTIME_S] * 1_000_000_000 + t[MTIME_NS],  # type: ignore[index]
                                   t[CTIME_S] * 1_000_000_000 + t[CTIME_NS], t[SIZE])  # type: ignore[index]
        else:
            self._allow_and_close(efd)
        self.stats.fast_hits += 1
        if t is not None and st.answers is not None:
            self._add_clean_answer(st.answers, (mask, (), t), key, version, e)
        return True

    def _add_clean_answer(self, answers: FastAnswers, table_key: tuple[object, ...], key: int,
                          version: int, entry: object) -> None:
        """Record a clean cache hit as a table answer, standing on `entry`: if the cache
        dropped it between the look-up and the add, the drop came first, so undo the add."""
        answers.add(table_key, SLOT_CACHE, key, self._batch_epoch)
        if not self.cache.still(key, version, entry):  # type: ignore[arg-type]
            answers.drop_file(key)

    def _fast_memo(self, st: State, efd: int, mask: int, pid: int,
                   t: tuple[int, ...] | None = None) -> bool | tuple[str | None, tuple[object, ...] | None]:
        """A remembered outcome: True if answered and closed here; else the (op, memo_base)
        for _handle, which works it out and remembers it. Raises only before the answer.
        `t`: the event fd's statx if the compiled loop made it already. A plain allow it
        finds becomes a table answer (st.answers) for the compiled loop next time."""
        if t is None:
            t = self.statx.raw(efd)
            if t is None:
                return (None, None)
        op = _OP_BY_MASK.get(mask) or op_of(mask)
        if st.rules.rules and (mask & fan.FAN_OPEN_EXEC_PERM or self._exec_opens):
            op = self._pair_exec(mask, pid, key_and_version(t)[0]) or op
        token = st.memo_token
        answers = st.answers
        if token is not None:
            procs = self.procwatch
            known = procs.procs.get(pid) if procs is not None else None
            if known is None:
                return (op, (mask, op, t))
            tok = token(known)
            if _UNSET in tok:
                return (op, (mask, op, t))
            if answers is not None and procs.epoch == answers.tokens_epoch:  # type: ignore[union-attr]
                answers.tokens[pid] = tok
        else:
            tok = ()
        r = st.memo.get((mask, op, tok, t))  # type: ignore[union-attr]
        if r is None:
            return (op, (mask, op, t))
        outcome = r[0]
        slot = -1
        if outcome == MEMO_NO_RULE:
            e = self.cache.clean_entry(r[1], r[2])
            if e is None or (e.kernel and st.config.daemon.kernel_cache):
                return (op, None)
            self._allow_and_close(efd)
            self.stats.fast_hits += 1
            slot = SLOT_CACHE
        elif outcome == MEMO_EXCLUDED:
            self._allow_and_close(efd)
            self.stats.answered(True, "excluded", None)
            slot = SLOT_EXCLUDED
        elif st.rules.rules[outcome].action == "allow":
            st.rules.hits[outcome] += 1
            self._allow_and_close(efd)
            self.stats.answered(True, "rule", None)
            slot = SLOT_RULE0 + outcome
        else:
            return (op, None)  # deny, audit, kill: the full path logs and answers them
        if answers is not None and op == op_of(mask):
            if slot == SLOT_CACHE:
                self._add_clean_answer(answers, (mask, tok, t), r[1], r[2], e)
            else:
                answers.add((mask, tok, t), slot, None, self._batch_epoch)
        return True

    def _allow_and_close(self, efd: int) -> None:
        """Allow and free an event fd. A response the kernel no longer wants (ENOENT: the
        opener was killed) is fine; any other error leaves the fd to the caller's last resort."""
        try:
            os.write(self._gfd, _pack_response(efd, fan.FAN_ALLOW))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        try:
            os.close(efd)
        except OSError:
            pass

    def _side_fd(self, st: State) -> int:
        """The side channels' epoll fd for this state (set up if need be), or -1."""
        procs = self.procwatch
        memo_on = st.memo is not None
        if procs is not self._side_procs or memo_on != self._side_memo:
            self._side_setup(procs, memo_on)
        return self._side_ep.fileno() if self._side_ep is not None else -1

    def _side_channels(self, st: State, ready: tuple[int, ...] = ()) -> None:
        """What must be applied after a batch is read and before any of it is decided, at the
        cost of one epoll_wait() when nothing happened: process events (procwatch), directory
        moves and mount-table changes (both void remembered outcomes). `ready`: fds the C
        loop's own epoll_wait reported (mountinfo reports a change to one poll only)."""
        procs = self.procwatch
        if self._side_fd(st) < 0:
            return
        fds = {fd for fd, _ev in self._side_ep.poll(0)}  # type: ignore[union-attr]
        fds.update(ready)
        for fd in fds:
            if procs is not None and fd == procs.fileno():
                try:
                    procs.drain()  # every exec/set*id/exit before these events is now applied
                except Exception as e:  # never lose a batch over it: stop remembering instead
                    log.error("process events: %s; openers' facts are read per event from now on", e)
                    self.procwatch = None
                continue
            if self.moves is not None and fd == self.moves.fd:
                self._moves_seen(st)
            elif self.changes is not None and fd == self.changes.fd:
                self._changes_seen()
            elif self.peers is not None and fd == self.peers.inbox:
                self._peers_seen()
            elif st.memo is not None:  # mountinfo: a mount came, went or moved (a poll re-arms it)
                self._forget_outcomes(st)
        if self._flags[FLAG_MOVES]:  # the housekeeper drained a move, may not have cleared yet
            with self._moves_lock:
                pass

    def _moves_seen(self, st: State) -> None:
        """Directory entries moved: what was decided by path may no longer hold.

        Called by the read loop before each batch (so no remembered outcome outlives a move
        that finished before the batch's opens began) and by the housekeeper when no batch
        comes (the kernel answers marked files itself, so no batch may come): a file with a
        kernel ignore mark that moves under a path rule would otherwise stay allowed for
        every opener. That second call is asynchronous: an open in the moments between a
        rename and the flush is still answered by the old mark (see docs/rules.md)."""
        moves = self.moves
        if moves is None:
            return
        with self._moves_lock:
            if not moves.drain():
                return
            if st.memo is not None:
                self._forget_outcomes(st)
        if st.rules.needs_path and st.config.daemon.kernel_cache:
            self.group.flush_ignores()
            self.stats.ignore_flushes += 1

    def _side_setup(self, procs: ProcWatch | None, memo_on: bool) -> None:
        """The read loop's epoll set: process events if they are watched; moves and mount
        changes only while a memo exists (else the housekeeper alone reads moves, for the
        kernel-mark flush, and a warm answer saves the epoll_wait)."""
        if self._side_ep is not None:
            self._side_ep.close()
        ep = select.epoll()
        n = 0
        if procs is not None:
            ep.register(procs.fileno(), select.EPOLLIN)
            n += 1
        if self.moves is not None and memo_on:
            ep.register(self.moves.fd, select.EPOLLIN)
            ep.register(self._reader_mountinfo.fileno(), select.EPOLLPRI)
            n += 2
        for fd in (self.changes.fd if self.changes is not None else -1,
                   self.peers.inbox if self.peers is not None else -1):
            if fd >= 0:  # other readers: writes and exec events before this batch
                ep.register(fd, select.EPOLLIN)
                n += 1
        self._side_ep = ep if n else None
        if not n:
            ep.close()
        self._side_procs = procs
        self._side_memo = memo_on

    def _last_resort(self, ev: fan.Event) -> None:
        """An event whose handling blew up outside the decision's own guard: answer it by the
        error policy with a plain response if it may still be pending, and free the fds it still
        owns. An answer to an event already answered gets ENOENT, which is fine here."""
        if ev.mask & fan.PERM_EVENTS and ev.fd >= 0:
            allow = self.state.config.scan.on_error == "allow"
            try:
                self.group.respond(ev.fd, fan.FAN_ALLOW if allow else fan.FAN_DENY)
                self.stats.answered(allow, "degraded", "error")
            except OSError:
                pass
        self._release(ev)  # only fds the event still owns: handled ones were set to -1

    def _reader_main(self) -> None:
        """One of the read loop's threads: read and decide batches while it holds the baton;
        when a batch leaves a scan to do, put the baton down and do the scan here; stand by
        while another thread reads (vetd.relay says when to take over).

        A cold event is scanned on the thread that read it, without waking anyone: handing the
        scan to a worker, or the reading to another thread, each put a thread wake-up on the
        opener's critical path. While the scan runs a standby thread takes over the reading
        as soon as events wait. Only while a thread stands by is a scan kept inline;
        otherwise (two scans running, or one stuck in a hung plugin) it goes to the worker
        pool as before. Deadlines and the stuck-plugin watch cover an inline scan as they
        cover a worker's (ScanPool.run_here).
        """
        relay = self._relay
        # Once per thread: 256 KiB per batch cost a memset and faults. With other readers, one
        # event per read(): a batch of two cold events would be scanned in one process (the
        # second on a worker, meeting the first at the GIL) while another reader idles; one at
        # a time, two openers got 14,600-14,900 files/s against 12,100-13,400 (scratch harness).
        # The group reports no info records (no pidfd), so every event is one metadata long.
        buf = bytearray(fan.METADATA.size if self.readers_n > 1 else fan.READ_SIZE)
        woken = False
        try:
            while not self.stopping:
                if not relay.take():
                    woken = relay.standby()
                    continue
                if woken:  # events waited while another thread scanned: this one reads them
                    self.stats.read_takeovers += 1
                    woken = False
                try:
                    self._read_loop(buf)
                    job, self._inline = self._inline, None
                finally:
                    relay.release()
                if job is not None:
                    self.stats.inline_scans += 1
                    relay.begin_scan()
                    job.watcher = threading.get_ident()
                    try:
                        self.pool.run_here(job)
                    finally:
                        if job.watcher:  # not answered here (a timeout did, or an error)
                            job.watcher = 0
                            relay.end_scan()
        finally:
            self._reader_alive = False
            if not self.stopping:
                log.critical("the read loop ended: openers would wait; stopping so the kernel "
                             "lets them through")
                self.stopping = True
                self._wake()

    def _loop(self) -> None:
        """The housekeeper: deadlines, reloads, mount changes, watchdog and status."""
        os.set_blocking(self.group.fd, True)
        for k in range(READ_THREADS):
            threading.Thread(target=self._reader_main, name=f"vetd-read-{k}", daemon=True).start()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(self._mountinfo.fileno(), select.POLLPRI | select.POLLERR)
        # What the read loop applies before each batch, drained here when no batch comes. Each
        # is flagged for the read loop while it runs: it may find a queue drained by this
        # thread before what it voids is cleared, and then waits for the lock.
        side: dict[int, Callable[[], None]] = {}
        if self.moves is not None:
            side[self.moves.fd] = lambda: self._moves_seen(self.state)
        if self.changes is not None:
            side[self.changes.fd] = self._changes_seen
        if self.peers is not None:
            side[self.peers.inbox] = self._peers_seen
        for fd in side:
            poller.register(fd, select.POLLIN)
        exits = {c.pidfd: c for c in self.readers.children} if self.readers is not None else {}
        for fd in exits:
            poller.register(fd, select.POLLIN)
        watchdog_s = self.notifier.watchdog_interval()
        status_s = self.state.config.daemon.status_interval_s
        next_watchdog = next_status = time.monotonic()
        while not self.stopping:
            try:
                now = time.monotonic()
                wake_at = min(next_watchdog, next_status, self._next_deadline(),
                              now + self._tick())
                self._housekeeper_wakes_at = wake_at
                timeout_ms = max(0, int((wake_at - now) * 1000) + 1)
                for fd, _mask in poller.poll(timeout_ms):
                    if fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    elif fd in side:
                        self._flags[FLAG_MOVES] = 1
                        try:
                            side[fd]()
                        finally:
                            self._flags[FLAG_MOVES] = 0
                    elif fd in exits:
                        poller.unregister(fd)
                        self._reader_died(exits[fd])
                    else:
                        self._sync_marks()  # mount table changed
                now = time.monotonic()
                self._expire(now)
                if self._reload_flag:
                    self._reload_flag = False
                    self.request_reload()
                if self._reload_results:
                    self._apply_reloads()
                if now >= next_watchdog:
                    busy = self._reader_busy()
                    silent = self.readers.silent_s(now) if self.readers is not None else 0.0
                    if silent > 2 * watchdog_s:
                        # Stopped or stuck: the opens it holds wait for it, and only the whole
                        # service going (systemd's watchdog kills it) lets them through.
                        log.error("a reader process has not answered for %.1fs: withholding "
                                  "WATCHDOG=1", silent)
                    elif self._reader_alive and (not busy or now - busy < 2 * watchdog_s):
                        self.notifier.watchdog()
                    else:
                        log.error("read loop stuck on one batch for %.1fs: withholding WATCHDOG=1",
                                  now - busy)
                    next_watchdog = now + watchdog_s
                if now >= next_status:
                    self.notifier.status(self.status_line())
                    next_status = now + status_s
            except Exception as e:  # the housekeeper must outlive anything one round does
                log.error("housekeeping: %s", format_exception_safely(e))
                time.sleep(0.01)

    def _shutdown(self) -> None:
        # No new events from here on: interpreter shutdown may open files on this thread while
        # the read loop can no longer run, and such an open would wait for ever. (A reader
        # process leaves the marks to the first one, which may be reading on.)
        if not self._child:
            self.group.flush_marks()
        # Answer what the workers still hold by the timeout policy: the kernel would allow them
        # when the group closes anyway, but an answer says so in the log and the counters.
        with self._deadline_lock:
            pending = [d[2] for d in self._deadlines]
            self._deadlines.clear()
        for p in pending:
            if not p.answered:
                self._answer_by_policy(p, "timeout", "vetd is stopping")
        self.pool.stop()
        if self.scanprocs is not None:
            self.scanprocs.close()
        self.rescans.stop()
        if self.readers is not None:
            self.readers.stop()  # each answers what it holds, as this one just did
        if self.control is not None:
            self.control.stop()
        # The group fd is not closed here: the read loop may still be writing an answer to it,
        # and a closed fd number reused by the next open() would take that answer. Process
        # exit closes it, and the kernel then lets everything through.
        for plugin in self.state.plugins:
            try:
                plugin.close()
            except Exception as e:
                log.error("closing plugin %s: %s", plugin.name, e)
