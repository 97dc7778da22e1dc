"""vetd._hotpath without the kernel's fanotify: batches built by hand, answers read off a pipe.

The compiled loop may only answer what its table says, exactly as the table says it, and must
hand everything else back untouched and in order. These tests feed it fanotify metadata
records by hand, with real files' fds as the event fds, and read its responses off a pipe (or
a socketpair, for run(), which reads its batches from the same fd it answers on).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from array import array
from pathlib import Path

import pytest

from vetd import fanotify as fan
from vetd.fileid import Statx

if os.environ.get("CI") == "true":
    from vetd import _hotpath as hot  # under CI the compiled loop must be built: fail, not skip
else:
    hot = pytest.importorskip("vetd._hotpath")

META = struct.Struct("=IBBHQii")
RESPONSE = struct.Struct("=iI")
# the flags array's slots (vetd.daemon's FLAG_*, the C enum)
SERIAL, MOVES, SEEN, BUSY_NS, STOP, POLL_MAX_NS, POLL_NS, POLL_CAUGHT, POLL_SPENT_NS, FLAGS = range(10)


def record(mask: int, fd: int, pid: int = 4242, *, extra: bytes = b"", vers: int = 3) -> bytes:
    return META.pack(META.size + len(extra), vers, 0, META.size, mask, fd, pid) + extra


@pytest.fixture
def files(tmp_path: Path):
    """Open read-only fds of small files; closed at the end unless the loop closed them."""
    fds: list[int] = []

    def make(name: str = "f") -> int:
        p = tmp_path / f"{name}{len(fds)}"
        p.write_text("x")
        fd = os.open(p, os.O_RDONLY)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def answers_pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)
    os.close(w)


def responses(r: int) -> list[tuple[int, int]]:
    try:
        data = os.read(r, 4096)
    except BlockingIOError:
        return []
    return [RESPONSE.unpack_from(data, i) for i in range(0, len(data), RESPONSE.size)]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


STX = Statx()
WANT = STX.want


def answer(buf: bytes, gfd: int, table: dict, *, start: int = 0, tokens=None, exec_opens=None,
           counts: array | None = None):
    counts = counts if counts is not None else array("q", [0] * 4)
    return hot.answer(bytearray(buf), start, len(buf), gfd, table, tokens, exec_opens, WANT, counts)


def test_statx_gives_the_tuple_the_ctypes_call_gives(files, monkeypatch):
    monkeypatch.setenv("VETD_HOTPATH", "python")
    fd = files()
    assert hot.statx(fd, WANT) == Statx().raw(fd)
    assert hot.statx(-1, WANT) is None


def test_a_known_event_is_allowed_closed_and_counted(files, answers_pipe):
    r, w = answers_pipe
    fd = files()
    t = hot.statx(fd, WANT)
    counts = array("q", [0] * 4)
    stop, seen, done, left = answer(record(fan.FAN_OPEN_PERM, fd), w,
                                    {(fan.FAN_OPEN_PERM, (), t): 3}, counts=counts)
    assert (stop, seen, done, left) == (META.size, 1, 1, [])
    assert responses(r) == [(fd, fan.FAN_ALLOW)]
    assert not is_open(fd)
    assert counts.tolist() == [0, 0, 0, 1]


def test_an_unknown_event_is_left_with_its_statx_and_untouched(files, answers_pipe):
    r, w = answers_pipe
    fd = files()
    other = files()
    table = {(fan.FAN_OPEN_PERM, (), hot.statx(other, WANT)): 0}
    stop, seen, done, left = answer(record(fan.FAN_ACCESS_PERM, fd) + record(fan.FAN_OPEN_PERM, fd),
                                    w, table)
    t = hot.statx(fd, WANT)
    assert (stop, seen, done) == (2 * META.size, 2, 0)
    assert left == [(0, t), (META.size, t)]
    assert responses(r) == [] and is_open(fd)


def test_a_notification_stops_the_pass_so_python_sees_it_in_order(files, answers_pipe):
    r, w = answers_pipe
    a, b = files(), files()
    table = {(fan.FAN_OPEN_PERM, (), hot.statx(a, WANT)): 0,
             (fan.FAN_OPEN_PERM, (), hot.statx(b, WANT)): 0}
    buf = record(fan.FAN_OPEN_PERM, a) + record(fan.FAN_CLOSE_WRITE, files()) + record(fan.FAN_OPEN_PERM, b)
    stop, seen, done, left = answer(buf, w, table)
    assert (stop, seen, done, left) == (META.size, 1, 1, [])
    assert responses(r) == [(a, fan.FAN_ALLOW)] and is_open(b)
    stop, seen, done, left = answer(buf, w, table, start=2 * META.size)
    assert (stop, done) == (3 * META.size, 1)
    assert responses(r) == [(b, fan.FAN_ALLOW)]


@pytest.mark.parametrize("make", [
    lambda fd: record(fan.FAN_OPEN_EXEC_PERM, fd),                       # exec: Python pairs it
    lambda fd: record(fan.FAN_OPEN_PERM, fd, extra=b"\x00" * 8),         # info records (pidfd)
    lambda fd: record(fan.FAN_OPEN_PERM, -1),                            # no fd
])
def test_events_c_does_not_look_up_are_left_without_statx(files, answers_pipe, make):
    r, w = answers_pipe
    fd = files()
    t = hot.statx(fd, WANT)
    table = {(m, (), t): 0 for m in (fan.FAN_OPEN_PERM, fan.FAN_OPEN_EXEC_PERM)}
    buf = make(fd)
    stop, seen, done, left = answer(buf, w, table)
    assert (stop, seen, done, left) == (len(buf), 1, 0, [(0, None)])
    assert responses(r) == []


def test_the_open_that_completes_an_exec_is_left_to_python(files, answers_pipe):
    r, w = answers_pipe
    fd = files()
    table = {(fan.FAN_OPEN_PERM, (), hot.statx(fd, WANT)): 0}
    _, _, done, left = answer(record(fan.FAN_OPEN_PERM, fd, pid=7), w, table, exec_opens={7: 1})
    assert done == 0 and left == [(0, None)]
    _, _, done, left = answer(record(fan.FAN_OPEN_PERM, fd, pid=8), w, table, exec_opens={7: 1})
    assert done == 1 and left == []


def test_the_key_holds_the_openers_token(files, answers_pipe):
    r, w = answers_pipe
    fd = files()
    t = hot.statx(fd, WANT)
    table = {(fan.FAN_OPEN_PERM, ("/usr/sbin/httpd",), t): 2}
    # no token for the pid: left; a token that is not the table's: left; the right one: answered
    assert answer(record(fan.FAN_OPEN_PERM, fd, pid=5), w, table, tokens={})[3] == [(0, t)]
    assert answer(record(fan.FAN_OPEN_PERM, fd, pid=5), w, table,
                  tokens={5: ("/bin/sh",)})[3] == [(0, t)]
    assert is_open(fd)
    assert answer(record(fan.FAN_OPEN_PERM, fd, pid=5), w, table,
                  tokens={5: ("/usr/sbin/httpd",)})[2] == 1
    assert responses(r) == [(fd, fan.FAN_ALLOW)]


def test_a_malformed_record_stops_the_pass_before_it(files, answers_pipe):
    r, w = answers_pipe
    fd = files()
    table = {(fan.FAN_OPEN_PERM, (), hot.statx(fd, WANT)): 0}
    buf = record(fan.FAN_OPEN_PERM, fd) + record(fan.FAN_OPEN_PERM, fd, vers=2)
    assert answer(buf, w, table)[:3] == (META.size, 1, 1)
    short = record(fan.FAN_OPEN_PERM, files())[:-1]           # cut: not even a whole header
    assert answer(short, w, table)[:3] == (0, 0, 0)


def test_a_refused_write_leaves_the_event_to_python(files):
    fd = files()
    table = {(fan.FAN_OPEN_PERM, (), hot.statx(fd, WANT)): 0}
    r, w = os.pipe()
    os.close(r)  # EPIPE on write (SIGPIPE is ignored by Python)
    try:
        _, seen, done, left = answer(record(fan.FAN_OPEN_PERM, fd), w, table)
    finally:
        os.close(w)
    assert (seen, done, left) == (1, 0, [(0, hot.statx(fd, WANT))])
    assert is_open(fd)


def test_bad_arguments_are_refused(answers_pipe):
    _r, w = answers_pipe
    with pytest.raises(TypeError):
        hot.answer(bytearray(24), 0, 24, w, [], None, None, WANT, array("q", [0]))
    with pytest.raises(TypeError):
        hot.answer(bytearray(24), 0, 24, w, {}, None, None, WANT, array("i", [0]))
    with pytest.raises(ValueError):
        hot.answer(bytearray(24), 0, 25, w, {}, None, None, WANT, array("q", [0]))


# --- run(): the loop that reads its own batches -------------------------------------------------
@pytest.fixture
def channel():
    """A socketpair standing in for the group fd: run() reads batches and writes answers on
    one end; the test sends batches and reads answers on the other."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def run(gfd: int, table: dict, *, side: int = -1, flags: array | None = None, expected: int = 0):
    flags = flags if flags is not None else array("q", [0] * FLAGS)
    return hot.run(gfd, bytearray(fan.READ_SIZE), side, flags, expected, table, None, None, WANT,
                   array("q", [0] * 4)), flags


def test_run_answers_whole_batches_in_c_and_returns_the_first_it_cannot(files, channel):
    ours, theirs = channel
    known, unknown = files(), files()
    table = {(fan.FAN_OPEN_PERM, (), hot.statx(known, WANT)): 0}
    theirs.send(record(fan.FAN_OPEN_PERM, known))
    theirs.send(record(fan.FAN_OPEN_PERM, unknown))
    (n, stop, done, left), flags = run(ours.fileno(), table)
    assert (n, stop, done) == (META.size, META.size, 0)
    assert left == [(0, hot.statx(unknown, WANT))]
    assert flags[SEEN] == 2 and flags[BUSY_NS] > 0  # both counted; the batch's read time kept
    assert RESPONSE.unpack(theirs.recv(64)) == (known, fan.FAN_ALLOW)


def test_run_hands_back_side_channel_news_before_answering(files, channel):
    ours, theirs = channel
    fd = files()
    table = {(fan.FAN_OPEN_PERM, (), hot.statx(fd, WANT)): 0}
    ep = select.epoll()
    pr, pw = os.pipe()
    try:
        ep.register(pr, select.EPOLLIN)
        os.write(pw, b"!")
        theirs.send(record(fan.FAN_OPEN_PERM, fd))
        (n, stop, done, ready), _ = run(ours.fileno(), table, side=ep.fileno())
        assert (n, stop, done, ready) == (META.size, -1, 0, (pr,))
        assert is_open(fd)                     # nothing answered: Python applies the news first
    finally:
        ep.close()
        os.close(pr)
        os.close(pw)


@pytest.mark.parametrize("slot", [SERIAL, MOVES, STOP])
def test_run_returns_when_the_state_changed_a_move_is_pending_or_vetd_stops(files, channel, slot):
    ours, theirs = channel
    fd = files()
    table = {(fan.FAN_OPEN_PERM, (), hot.statx(fd, WANT)): 0}
    flags = array("q", [0] * FLAGS)
    flags[slot] = 1
    theirs.send(record(fan.FAN_OPEN_PERM, fd))
    (n, stop, done, ready), _ = run(ours.fileno(), table, flags=flags, expected=0)
    assert (stop, done, ready) == (-1, 0, ())
    assert is_open(fd)


# --- busy polling: read_batch's adaptive window, through run() ---------------------------------
# Each case is decided by where the batch is when run() starts waiting, not by how fast this
# machine is: already there (a zero-length wait), or 50 ms away (far past any window here).
MAX = 100_000  # ns


def poll_once(channel, files, *, window: int, max_ns: int = MAX, delay_s: float = 0.0):
    """One run() over a batch that is not in the table, sent now or after delay_s."""
    ours, theirs = channel
    flags = array("q", [0] * FLAGS)
    flags[POLL_MAX_NS], flags[POLL_NS] = max_ns, window
    fd = files()
    if delay_s:
        timer = threading.Timer(delay_s, theirs.send, (record(fan.FAN_OPEN_PERM, fd),))
        timer.start()
    else:
        theirs.send(record(fan.FAN_OPEN_PERM, fd))
    (n, stop, done, left), _ = run(ours.fileno(), {}, flags=flags)
    assert (n, done, len(left)) == (META.size, 0, 1)  # polling changes when, never what
    return flags


def test_a_batch_waiting_already_is_caught_by_the_poll_and_the_window_kept(channel, files):
    flags = poll_once(channel, files, window=MAX // 4)
    assert (flags[POLL_CAUGHT], flags[POLL_NS]) == (1, MAX // 4)


def test_a_short_wait_without_polling_opens_the_window_at_a_quarter_of_the_maximum(channel, files):
    flags = poll_once(channel, files, window=0)
    assert (flags[POLL_CAUGHT], flags[POLL_SPENT_NS], flags[POLL_NS]) == (0, 0, MAX // 4)


def test_a_wait_that_outlasts_the_window_but_not_the_maximum_doubles_the_window(channel, files):
    """A 1 us window runs out long before the batch sent 20 ms later; with a 1 s maximum that
    wait still counts as short, so the window grows (and is never more than the maximum)."""
    flags = poll_once(channel, files, window=1_000, max_ns=1_000_000_000, delay_s=0.02)
    assert (flags[POLL_CAUGHT], flags[POLL_NS]) == (0, 2_000)
    flags = poll_once(channel, files, window=700_000_000, max_ns=1_000_000_000, delay_s=0.0)
    assert flags[POLL_NS] == 700_000_000  # caught at once: kept


def test_a_long_wait_halves_the_window_and_a_small_one_closes(channel, files):
    flags = poll_once(channel, files, window=MAX // 2, delay_s=0.05)
    assert (flags[POLL_CAUGHT], flags[POLL_NS]) == (0, MAX // 4)
    assert flags[POLL_SPENT_NS] >= MAX // 2  # it polled the whole window before it slept
    flags = poll_once(channel, files, window=MAX // 10, delay_s=0.05)
    assert flags[POLL_NS] == 0  # under max/16 after halving: no polling until waits shorten


def test_a_window_over_a_lowered_maximum_is_cut_to_it(channel, files):
    flags = poll_once(channel, files, window=10 * MAX, max_ns=MAX)
    assert flags[POLL_NS] == MAX


def test_busy_polling_off_touches_nothing(channel, files):
    flags = poll_once(channel, files, window=MAX, max_ns=0, delay_s=0.01)
    assert (flags[POLL_NS], flags[POLL_CAUGHT], flags[POLL_SPENT_NS]) == (MAX, 0, 0)


# --- allow_marked: a clean file's answer with its kernel mark ------------------------------------
# The mark itself needs a real fanotify group (tests/test_kernel_daemon.py); here the "group" is
# a pipe, on which fanotify_mark fails, so only the answer and the fd's fate are seen.
def test_allow_marked_answers_and_closes_even_when_no_mark_can_be_placed(files, answers_pipe):
    r, w = answers_pipe
    fd = files()
    st = os.fstat(fd)
    assert hot.allow_marked(w, fd, fan.FAN_OPEN_PERM, st.st_mtime_ns, st.st_ctime_ns, st.st_size,
                            True) == (True, -1)
    assert responses(r) == [(fd, fan.FAN_ALLOW)]
    assert not is_open(fd)
    kept = files()
    hot.allow_marked(w, kept, fan.FAN_OPEN_PERM, 0, 0, 0, False)
    assert responses(r) == [(kept, fan.FAN_ALLOW)] and is_open(kept)


def test_allow_marked_raises_and_keeps_the_fd_when_the_answer_is_refused(files):
    fd = files()
    r, w = os.pipe()
    os.close(r)  # EPIPE
    try:
        with pytest.raises(OSError):
            hot.allow_marked(w, fd, fan.FAN_OPEN_PERM, 0, 0, 0, True)
    finally:
        os.close(w)
    assert is_open(fd)  # the caller's last resort answers it
