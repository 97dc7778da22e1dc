#!/usr/bin/env python3
"""vetd benchmark: what does vetting cost an open?

Run it as root with ``bash bench/run.sh`` (which compiles the C parts first). It mounts its own
tmpfs, builds a tree of mixed files in it, and times open+read+close of every file with a small C
opener (bench/opener.c) under these scenarios, all in one run:

  baseline                     no listener at all
  reference_listener           bench/reference_listener.c: a bare C fanotify loop that allows all
  vetd_cold                    vetd just started: every file goes through the scanner plugins
  vetd_warm_kernel             repeat passes: vetd's kernel ignore marks answer
  vetd_warm_userspace          repeat passes with ~200 access rules loaded, two of which cover the
                               tree by subject (and match no bench process): nothing can be cached
                               in the kernel, every open is evaluated by the rules and answered
                               from vetd's userspace cache
  vetd_warm_userspace_norules  repeat passes with kernel_cache = false and no rules
  vetd_exec                    fork+exec of copies of /bin/true in the tree, vetd watching exec
  vetd_rss_100k                a tree of its own of 100,000 small files, one pass: vetd's VmRSS
                               and VmHWM holding 100,000 cached verdicts

Every vetd runs the shipped default configuration, conf/vetd.toml (its plugins: hashlist with
conf/hashes.d, yara with conf/yara), with /etc/vetd/ paths read from the repo's conf/, watch set to
the bench tmpfs only and the control socket in a temp dir; the bench adds one hash list of its own
(a blob that must be refused) and, for vetd_warm_userspace, its rules dir.

Each is reported as p50/p99 microseconds per op, ops/s and the p50 ratio to the baseline, from one
opener and from two concurrent openers (two processes that split the list, every other file,
started at the same moment); the cold two-opener run uses a fresh vetd, checked to be cold. The
last line printed is a JSON object with the figures and the issue's targets, computed.

Safety: only the benchmark's own tmpfs mounts are ever marked (the reference listener refuses
anything but a tmpfs root; vetd's marks are read back from /proc/PID/fdinfo and vetd is killed at
once if it marked any other filesystem); every child is killed and every tmpfs unmounted on every
exit path; every wait has a timeout, and on a timeout the listener is killed first, which lets the
kernel allow any open still waiting on it.
"""

from __future__ import annotations

import argparse
import array
import copy
import ctypes
import hashlib
import json
import math
import os
import platform
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
assert len(EICAR) == 68

CLK_TCK = os.sysconf("SC_CLK_TCK")
SCENARIOS = [
    "baseline",
    "reference_listener",
    "vetd_cold",
    "vetd_warm_kernel",
    "vetd_warm_userspace",
    "vetd_warm_userspace_norules",
    "vetd_exec",
]
ONE_CPU = ["baseline_1cpu", "reference_listener_1cpu", "vetd_warm_userspace_1cpu",
           "vetd_warm_userspace_norules_1cpu"]

WORDS = (
    "the quick brown fox jumps over a lazy dog while vetd reads every file that opens and decides "
    "allow or deny before the kernel lets the process go on lorem ipsum dolor sit amet config log"
).split()


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# bookkeeping for cleanup: children and the mount, also written to a state file that run.sh's
# trap reads if this process is killed outright


class Janitor:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.mounts: list[str] = []
        self.state_file = os.environ.get("BENCH_STATE_FILE")

    def _write_state(self) -> None:
        if not self.state_file:
            return
        lines = [f"bench {os.getpid()}"] + [f"mount {m}" for m in self.mounts]
        lines += [f"pid {p.pid}" for p in self.procs if p.poll() is None]
        try:
            with open(self.state_file, "w") as f:
                f.write("\n".join(lines) + "\n")
        except OSError:
            pass

    def add(self, p: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(p)
        self._write_state()
        return p

    def add_mount(self, path: str) -> None:
        self.mounts.append(path)
        self._write_state()

    def drop_mount(self, path: str) -> None:
        if path in self.mounts:
            self.mounts.remove(path)
        self._write_state()

    def kill_all(self) -> None:
        # listeners first: killing them releases any opener blocked on a permission event
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.kill()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = [p for p in self.procs if p.poll() is None]
        self._write_state()


JAN = Janitor()

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send sig to this process when its parent exits (prctl PR_SET_PDEATHSIG)."""
    _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


PIN_CPU: int | None = None  # set while the one-CPU scenarios run: openers start on this CPU


def _child_setup() -> None:
    # a child of the bench dies with it: a vetd or listener must not outlive the bench that
    # checks its marks, and an opener must not outlive its listener
    die_with_parent(signal.SIGKILL)
    if PIN_CPU is not None:
        os.sched_setaffinity(0, {PIN_CPU})


def pin_all_threads(pid: int, cpus: set[int]) -> None:
    """Move a running process, its child processes (vetd's readers, scan processes) and all
    their threads to `cpus`."""
    for proc in descendants(pid):
        try:
            tids = os.listdir(f"/proc/{proc}/task")
        except OSError:
            continue  # a process that just ended
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass  # a thread that just ended


class one_cpu:
    """The one-CPU variant of a scenario: the listener (every thread) and the openers on CPU 0.

    On a VM a wake-up of the other, idle vCPU can cost tens of microseconds (seen here: the C
    listener's round trip at 82 us across CPUs, 11 us on one), which hides what a decision
    costs. On one CPU the round trip is a plain context switch, so the ratio to the reference
    listener there is the cost of the decision path itself."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> "one_cpu":
        global PIN_CPU
        PIN_CPU = 0
        pin_all_threads(self.pid, {0})
        return self

    def __exit__(self, *exc) -> None:
        global PIN_CPU
        PIN_CPU = None
        pin_all_threads(self.pid, set(range(os.cpu_count() or 1)))


def ensure_bench_mount(mnt: str, dev: int, mnt_id: int) -> None:
    """Raise unless mnt is still the tmpfs the bench mounted: a listener is only ever started on it
    (were it unmounted, its path would lie on the filesystem beneath, and that must never be marked)."""
    info = mount_info(mnt)
    if (not info or info["fstype"] != "tmpfs" or info["mnt_id"] != mnt_id
            or os.stat(mnt).st_dev != dev or mnt not in JAN.mounts):
        raise BenchError(f"{mnt} is no longer the bench's tmpfs ({info}): not starting a listener on it")


# ------------------------------------------------------------------------------------------------
# the tmpfs


def kernel_dev(st_dev: int) -> int:
    """st_dev as the kernel prints it in fdinfo (MKDEV: major << 20 | minor)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def mount_info(path: str) -> dict | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            mnt = parts[4].encode().decode("unicode_escape")
            if mnt == path:
                return {"mnt_id": int(parts[0]), "fstype": parts[sep + 1], "majmin": parts[2]}
    return None


def mount_tmpfs(size: str, prefix: str = "vetd-bench-mnt-") -> str:
    mnt = tempfile.mkdtemp(prefix=prefix)
    JAN.add_mount(mnt)  # recorded first: run.sh's trap unmounts it if we are killed right here
    r = subprocess.run(["timeout", "20", "mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                        "vetd-bench", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(mnt)
        JAN.drop_mount(mnt)
        raise BenchError(f"mount -t tmpfs on {mnt} failed: {r.stderr.strip()}")
    info = mount_info(mnt)
    problem = None
    if not info or info["fstype"] != "tmpfs":
        problem = f"{mnt} did not come up as a tmpfs: {info}"
    elif os.stat(mnt).st_dev == os.stat(os.path.dirname(mnt)).st_dev:
        problem = f"{mnt} is not a separate filesystem"
    if problem:
        unmount_tmpfs(mnt)
        raise BenchError(problem)
    return mnt


def unmount_tmpfs(mnt: str) -> None:
    for args in (["umount", mnt], ["umount", "-l", mnt]):
        r = subprocess.run(["timeout", "20"] + args, capture_output=True, text=True)
        if r.returncode == 0:
            break
        log(f"{' '.join(args)} failed: {r.stderr.strip()}")
    try:
        os.rmdir(mnt)
    except OSError as e:
        log(f"rmdir {mnt}: {e}")
    JAN.drop_mount(mnt)


# ------------------------------------------------------------------------------------------------
# the tree


def build_tree(root: str, nfiles: int, min_kib: int, max_kib: int, nexec: int, seed: int) -> dict:
    rng = random.Random(seed)
    subdirs = ["docs", "data", "blobs", "cache/zeros", "src/lib/deep"]
    for d in subdirs + ["bin", "quarantine"]:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    corpus = " ".join(rng.choice(WORDS) for _ in range(64 * 1024)).encode()  # ~330 KiB of text
    files = []
    kinds = {"text": 0, "random": 0, "zeros": 0, "mixed": 0}
    total = 0
    for i in range(nfiles):
        size = rng.randint(min_kib * 1024, max_kib * 1024)
        kind = rng.choices(["text", "random", "zeros", "mixed"], weights=[45, 30, 10, 15])[0]
        if kind == "text":
            head = f"file {i} seed {seed}\n".encode()
            off = rng.randrange(len(corpus) - size)
            body = corpus[off:off + size]
            data = (head + body)[:size]
        elif kind == "random":
            data = rng.randbytes(size)
        elif kind == "zeros":
            data = bytes(size)
        else:
            data = (f"#!mixed {i}\n".encode() + rng.randbytes(size // 2) + bytes(size))[:size]
        kinds[kind] += 1
        total += len(data)
        d = subdirs[i % len(subdirs)] if kind != "zeros" else "cache/zeros"
        p = os.path.join(root, d, f"f{i:05d}.{ {'text': 'txt', 'random': 'bin', 'zeros': 'dat', 'mixed': 'mix'}[kind] }")
        with open(p, "wb") as f:
            f.write(data)
        files.append(p)
    # known-bad files: EICAR (exactly 68 bytes: on the shipped hash list and matched by the
    # shipped YARA rule) in three places; EICAR followed by CR LF (the YARA rule only: its hash
    # is on no list); and a blob listed by hash on the bench's own extra list
    bad_blob = b"vetd-bench known-bad blob " + rng.randbytes(4000)
    bad = {
        os.path.join(root, "quarantine", "eicar.com"): EICAR,
        os.path.join(root, "docs", "eicar.txt"): EICAR,
        os.path.join(root, "src/lib/deep", "eicar.bin"): EICAR,
        os.path.join(root, "blobs", "eicar-crlf.com"): EICAR + b"\r\n",
        os.path.join(root, "data", "listed-bad.bin"): bad_blob,
    }
    for p, data in bad.items():
        with open(p, "wb") as f:
            f.write(data)
    # splice the bad files into the list at spread-out positions
    for k, p in enumerate(bad):
        files.insert((k + 1) * len(files) // (len(bad) + 1), p)
    exec_bins = []
    src = shutil.which("true") or "/bin/true"
    for i in range(nexec):
        p = os.path.join(root, "bin", f"true{i:03d}")
        shutil.copyfile(src, p)
        os.chmod(p, 0o755)
        exec_bins.append(p)
    return {
        "files": files,
        "bad": list(bad),
        "exec_bins": exec_bins,
        # the bench's extra deny list, in the HASH:SIZE:NAME form of the shipped one
        "extra_deny": [(hashlib.sha256(bad_blob).hexdigest(), len(bad_blob), "vetd-bench-listed-bad")],
        "kinds": kinds,
        "bytes": total + sum(len(d) for d in bad.values()),
    }


# ------------------------------------------------------------------------------------------------
# openers


def pct(sorted_vals: list[int], p: float) -> int:
    k = max(0, math.ceil(p / 100.0 * len(sorted_vals)) - 1)
    return sorted_vals[k]


def summarize(samples: list[int], wall_ns: int) -> dict:
    vals = sorted(abs(v) for v in samples)
    n = len(vals)
    return {
        "p50_us": round(pct(vals, 50) / 1000, 2),
        "p99_us": round(pct(vals, 99) / 1000, 2),
        "opens_per_s": round(n / (wall_ns / 1e9), 1) if wall_ns > 0 else None,
        "ops": n,
        "failed": sum(1 for v in samples if v < 0),
        "mean_us": round(sum(vals) / n / 1000, 2),
        "max_us": round(vals[-1] / 1000, 2),
    }


def run_openers(work: str, paths: list[str], passes: int, mode: str, nproc: int,
                timeout: float, on_timeout) -> dict:
    """Run nproc openers over paths (split every other file when nproc > 1), started together."""
    tag = f"{mode}-{nproc}-{time.monotonic_ns()}"
    procs = []
    for k in range(nproc):
        part = paths[k::nproc]
        lst = os.path.join(work, f"list-{tag}-{k}")
        out = os.path.join(work, f"out-{tag}-{k}")
        with open(lst, "w") as f:
            f.write("\n".join(part) + "\n")
        p = JAN.add(subprocess.Popen(
            [os.path.join(BUILD, "opener"), lst, str(passes), mode, out, "--wait-stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_child_setup))
        procs.append((p, out))
    for p, _ in procs:  # release them together
        p.stdin.write("g")
        p.stdin.close()
        p.stdin = None
    deadline = time.monotonic() + timeout
    results = []
    for p, out in procs:
        try:
            so, se = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            on_timeout()  # kill the listener: the kernel then allows the blocked opens
            try:
                p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
            for q, _ in procs:
                if q.poll() is None:
                    q.kill()
            raise BenchError(f"opener ({mode}, {nproc} proc) did not finish in {timeout:.0f} s")
        if p.returncode != 0:
            raise BenchError(f"opener failed rc={p.returncode}: {se.strip()}")
        kv = dict(x.split("=") for x in so.split())
        a = array.array("q")
        with open(out, "rb") as f:
            a.frombytes(f.read())
        if sys.byteorder != "little":
            a.byteswap()
        results.append({"start": int(kv["start_ns"]), "end": int(kv["end_ns"]), "samples": a,
                        "first_errno": int(kv["first_errno"])})
        os.unlink(out)
    samples = []
    for r in results:
        samples.extend(r["samples"])
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    s = summarize(samples, wall)
    s["openers"] = nproc
    s["passes"] = passes
    s["first_errno"] = next((r["first_errno"] for r in results if r["first_errno"]), 0)
    # per-pass p50 (one opener only), to show warming
    if nproc == 1 and passes > 1:
        n = len(paths)
        a = results[0]["samples"]
        s["per_pass_p50_us"] = [round(pct(sorted(abs(v) for v in a[i * n:(i + 1) * n]), 50) / 1000, 2)
                                for i in range(passes)]
    # which of the listed paths failed, on any pass, by any opener
    failed = set()
    for k, r in enumerate(results):
        part = paths[k::nproc]
        failed.update(part[i % len(part)] for i, v in enumerate(r["samples"]) if v < 0)
    s["failed_paths"] = sorted(failed)
    return s


# ------------------------------------------------------------------------------------------------
# /proc readers


def children_of(pid: int) -> list[int]:
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def pss_kb(pid: int) -> int:
    """A process's proportional set size: shared pages (the interpreter, libyara) counted once
    across vetd's processes, where summed VmRSS/VmHWM would count them once per process."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children_of(p)
    return seen


def proc_cpu_s(pid: int, with_reaped: bool) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after ")" fields start at index 3 (state); utime=14 stime=15 cutime=16 cstime=17 (1-based)
    ticks = int(fields[11]) + int(fields[12])
    if with_reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def tree_cpu_s(pid: int) -> float:
    return proc_cpu_s(pid, True) + sum(proc_cpu_s(p, False) for p in descendants(pid)[1:])


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fanotify_marks(pid: int) -> list[dict]:
    """Every fanotify mark held by pid's fds, from /proc/PID/fdinfo."""
    marks = []
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return marks
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            if not line.startswith("fanotify "):
                continue
            kv = {}
            for tok in line.split()[1:]:
                if ":" in tok:
                    k, v = tok.split(":", 1)
                    kv[k] = v
            if "sdev" in kv or "mnt_id" in kv:
                kv["kind"] = "inode" if "ino" in kv else ("fs" if "sdev" in kv else "mount")
                marks.append(kv)
    return marks


def check_marks(pids: list[int], dev: int, mnt_id: int) -> dict:
    """Raise if any fanotify mark of these pids is on anything but the bench tmpfs."""
    kdev = kernel_dev(dev)
    n = {"fs": 0, "mount": 0, "inode": 0, "inode_ignore": 0}
    for pid in pids:
        for m in fanotify_marks(pid):
            if "sdev" in m and int(m["sdev"], 16) != kdev:
                raise BenchError(f"pid {pid} holds a fanotify mark on another filesystem: {m}")
            if m["kind"] == "mount" and int(m["mnt_id"], 16) != mnt_id:
                raise BenchError(f"pid {pid} holds a fanotify mark on another mount: {m}")
            n[m["kind"]] += 1
            if m["kind"] == "inode" and int(m.get("ignored_mask", "0"), 16):
                n["inode_ignore"] += 1
    return n


# ------------------------------------------------------------------------------------------------
# listeners


class RefListener:
    def __init__(self, mnt: str, dev: int, mnt_id: int, errfile: str) -> None:
        ensure_bench_mount(mnt, dev, mnt_id)
        self.err = open(errfile, "w+")
        self.p = JAN.add(subprocess.Popen([os.path.join(BUILD, "reference_listener"), "-x", mnt],
                                          stdout=subprocess.PIPE, stderr=self.err, text=True,
                                          preexec_fn=_child_setup))
        r, _, _ = select.select([self.p.stdout], [], [], 10)
        line = self.p.stdout.readline().strip() if r else ""
        if line != "ready":
            self.kill()
            self.err.seek(0)
            raise BenchError(f"reference_listener not ready: {line!r} {self.err.read().strip()}")

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()

    def stop(self) -> str:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.err.seek(0)
        return self.err.read().strip()


class Vetd:
    """One vetd process, started in the foreground with its own config and sd_notify socket."""

    def __init__(self, cmd: list[str], work: str, name: str, mnt: str, dev: int, mnt_id: int,
                 make_config, ready_timeout: float) -> None:
        """make_config(control_socket_path) -> the config file's text."""
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"{name}-", dir=work)
        self.config = os.path.join(self.dir, "vetd.toml")
        self.control = os.path.join(self.dir, "control.sock")
        with open(self.config, "w") as f:
            f.write(make_config(self.control))
        self.notify_path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.notify_path)
        self.errpath = os.path.join(self.dir, "stderr.log")
        self.err = open(self.errpath, "w+")
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path,
                   PYTHONPATH=REPO + (":" + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        env.pop("WATCHDOG_USEC", None)
        self.t_start = time.monotonic()
        ensure_bench_mount(mnt, dev, mnt_id)
        self.p = JAN.add(subprocess.Popen(cmd + ["--config", self.config], cwd=REPO, env=env,
                                          preexec_fn=_child_setup,
                                          stdin=subprocess.DEVNULL, stdout=self.err, stderr=self.err))
        self.pid = self.p.pid
        self.notifications: list[str] = []
        self.dev, self.mnt_id = dev, mnt_id
        try:
            self._wait_ready(ready_timeout)
            self.startup_s = time.monotonic() - self.t_start
            self.marks = self._check_marks_present()
        except BaseException:
            self.kill()
            raise

    def _drain(self, timeout: float) -> None:
        r, _, _ = select.select([self.sock], [], [], timeout)
        while r:
            self.notifications.append(self.sock.recv(65536).decode(errors="replace"))
            r, _, _ = select.select([self.sock], [], [], 0)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._drain(0.1)
            if any("READY=1" in n.split("\n") for n in self.notifications):
                return
            if self.p.poll() is not None:
                raise BenchError(f"vetd exited rc={self.p.returncode} before READY=1: {self.stderr_tail()}")
        raise BenchError(f"vetd sent no READY=1 within {timeout:.0f} s: {self.stderr_tail()}")

    def _check_marks_present(self) -> dict:
        deadline = time.monotonic() + 3
        while True:
            n = check_marks(descendants(self.pid), self.dev, self.mnt_id)  # raises if off-limits
            if n["fs"] or n["mount"]:
                return n
            if time.monotonic() > deadline:
                raise BenchError(f"vetd said READY=1 but holds no fanotify mark on the bench tmpfs: {n}")
            time.sleep(0.1)

    def check(self) -> dict:
        if self.p.poll() is not None:
            raise BenchError(f"vetd died rc={self.p.returncode}: {self.stderr_tail()}")
        return check_marks(descendants(self.pid), self.dev, self.mnt_id)

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid)

    def rss(self) -> dict:
        pids = descendants(self.pid)
        return {"main_hwm_kb": status_kb(self.pid, "VmHWM"),
                "main_rss_kb": status_kb(self.pid, "VmRSS"),
                "tree_hwm_kb": sum(status_kb(p, "VmHWM") for p in pids),
                "tree_pss_kb": sum(pss_kb(p) for p in pids),
                "processes": len(pids),
                "threads": int(os.listdir(f"/proc/{self.pid}/task").__len__()) if os.path.exists(f"/proc/{self.pid}") else 0}

    def status(self) -> dict | None:
        """vetd's own counters over its control socket (best effort, JSON lines)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(3)
                c.connect(self.control)
                c.sendall(b'{"cmd": "status", "args": {}}\n')
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            ans = json.loads(buf)
            return ans.get("result") if ans.get("ok") else {"error": ans.get("error")}
        except (OSError, ValueError) as e:
            return {"error": f"control socket: {e}"}

    def stderr_tail(self, n: int = 1500) -> str:
        self.err.flush()
        try:
            with open(self.errpath, errors="replace") as f:
                s = f.read()
        except OSError:
            return ""
        s = s.strip()
        return ("..." + s[-n:]) if len(s) > n else s

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()

    def stop(self) -> dict:
        """SIGTERM, SIGKILL after 5 s; returns cpu/rss read just before."""
        final = {"cpu_s": self.cpu_s(), **self.rss()}
        if self.p.poll() is None:
            st = self.status() or {}
            final["status"] = {k: st.get(k) for k in ("answers", "cache", "degraded", "backlog", "plugins",
                                                      "rules", "hot_path", "error") if k in st}
        self._drain(0)
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=5)
                final["stop"] = f"exited rc={self.p.returncode} after SIGTERM"
            except subprocess.TimeoutExpired:
                self.kill()
                final["stop"] = "SIGKILL (no exit within 5 s of SIGTERM)"
        else:
            final["stop"] = f"already dead rc={self.p.returncode}"
        self._drain(0)
        self.sock.close()
        return final


DEFAULT_CONFIG = os.path.join(REPO, "conf", "vetd.toml")


def _to_repo_paths(v):
    """The shipped config names installed paths (/etc/vetd/...); the bench uses the repo's conf/."""
    if isinstance(v, str) and v.startswith("/etc/vetd/"):
        return os.path.join(REPO, "conf", v[len("/etc/vetd/"):])
    if isinstance(v, list):
        return [_to_repo_paths(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_repo_paths(x) for k, x in v.items()}
    return v


def default_config() -> tuple[dict, list[str]]:
    """conf/vetd.toml as a dict with /etc/vetd/ paths rewritten to conf/, and the rewritten paths."""
    with open(DEFAULT_CONFIG, "rb") as f:
        doc = _to_repo_paths(tomllib.load(f))
    rewritten: list[str] = []

    def walk(v):
        if isinstance(v, str) and v.startswith(os.path.join(REPO, "conf") + os.sep):
            rewritten.append(v)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
    walk([t for t in doc.get("plugins", {}).values() if isinstance(t, dict) and t.get("enabled", True)])
    walk(doc.get("rules", {}))
    missing = [p for p in rewritten if not os.path.exists(p)]
    if missing:
        raise BenchError(f"conf/vetd.toml names {', '.join(missing)}, which the repo does not have")
    return doc, rewritten


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise BenchError(f"cannot write {type(v).__name__} {v!r} as TOML")


def toml_dump(doc: dict, prefix: tuple[str, ...] = ()) -> str:
    """Enough TOML for vetd.toml: tables, sub-tables, arrays of tables, scalars and lists."""
    def is_aot(v):
        return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
    plain = {k: v for k, v in doc.items() if not isinstance(v, dict) and not is_aot(v)}
    out = []
    if prefix and (plain or not doc):
        out.append(f"[{'.'.join(_toml_key(p) for p in prefix)}]")
    out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain.items()]
    if plain or (prefix and not doc):
        out.append("")
    for k, v in doc.items():
        if isinstance(v, dict):
            out.append(toml_dump(v, prefix + (k,)))
        elif is_aot(v):
            for item in v:
                out.append(f"[[{'.'.join(_toml_key(p) for p in prefix + (k,))}]]")
                out += [f"{_toml_key(ik)} = {_toml_value(iv)}" for ik, iv in item.items()]
                out.append("")
    return "\n".join(out)


def vetd_config(base: dict, mnt: str, control: str, kernel_cache: bool, rules_dir: str | None,
                workers: int | None, extra_deny: str | None, cache_entries: int | None,
                processes: int | None = None, readers: int | None = None) -> str:
    """The shipped default config with only what the bench must change: watch (the bench tmpfs
    only), socket (a temp dir), kernel_cache, the rules dir, and an extra hash list for the
    bench's own listed-bad blob. Everything else, the plugin tables first, is the default's."""
    doc = copy.deepcopy(base)
    daemon = doc.setdefault("daemon", {})
    daemon["watch"] = [mnt]
    daemon["socket"] = control
    daemon["kernel_cache"] = kernel_cache
    if workers:
        doc.setdefault("scan", {})["workers"] = workers
    if processes is not None:
        doc.setdefault("scan", {})["processes"] = processes
    if readers is not None:
        daemon["readers"] = readers
    if cache_entries:
        doc.setdefault("cache", {})["entries"] = cache_entries
    if rules_dir is not None:
        doc.setdefault("rules", {})["dir"] = rules_dir
    hl = doc.get("plugins", {}).get("hashlist")
    if extra_deny and isinstance(hl, dict):
        hl["deny"] = list(hl.get("deny", [])) + [extra_deny]
    text = ("# written by bench/bench.py: conf/vetd.toml with /etc/vetd/ -> conf/, watch, socket,\n"
            "# kernel_cache and rules dir set by the bench\n\n" + toml_dump(doc))
    if tomllib.loads(text) != doc:
        raise BenchError("bench's TOML writer did not round-trip the config")
    return text


# ------------------------------------------------------------------------------------------------
# access rules for vetd_warm_userspace


def write_rules(rules_dir: str, tree: str, n: int) -> dict:
    """About n rules of realistic shape, almost all over paths outside the bench tree, plus two
    subject-dependent rules over the tree that the bench opener never meets: every open in the
    tree is evaluated by the rules, matches none, and cannot be cached in the kernel."""
    os.makedirs(rules_dir, exist_ok=True)
    shapes = [
        ("10-web.rules", lambda i: f"only /usr/sbin/httpd,/usr/sbin/nginx open /srv/www{i}/**"),
        ("20-home.rules", lambda i: f"deny exec /home/*/tmp{i}/**"),
        ("30-secrets.rules", lambda i: f"deny open /srv/secret{i}/** : !exe=/usr/bin/backup"),
        ("40-audit.rules", lambda i: f"audit open /etc/shadow{i} /etc/gshadow{i}"),
        ("60-db.rules", lambda i: f"deny open /var/lib/db{i}/** : !uid=0,999"),
        ("70-drop.rules", lambda i: f"kill exec /var/spool/drop{i}/** : !uid=0"),
        ("80-quarantine.rules", lambda i: f"deny open dir=/srv/quarantine{i}"),
        ("90-vendor.rules", lambda i: f"allow open /opt/vendor{i}/**"),
    ]
    tree_rules = [
        f"deny open {tree}/** : exe=/usr/bin/no-such-program",
        f"deny open,exec {tree}/** : uid=65534 !exe=/usr/bin/backup",
    ]
    rest = max(0, n - len(tree_rules))
    files = {"50-bench-tree.rules": tree_rules}  # in the middle of the set, in file-name order
    for k, (fname, make) in enumerate(shapes):
        count = rest // len(shapes) + (1 if k < rest % len(shapes) else 0)
        files[fname] = [make(k * 1000 + i) for i in range(count)]
    for fname, lines in files.items():
        with open(os.path.join(rules_dir, fname), "w") as f:
            f.write("# generated by bench/bench.py\n" + "\n".join(lines) + "\n")
    return {"files": {f: len(v) for f, v in sorted(files.items())},
            "rules": sum(len(v) for v in files.values()), "tree_rules": tree_rules}


def vetd_available(cmd: list[str]) -> str | None:
    """None if `vetd --help` works, else the reason."""
    try:
        r = subprocess.run(["timeout", "20"] + cmd + ["--help"], cwd=REPO, capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=REPO))
    except OSError as e:
        return str(e)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        shown = " ".join(["python3" if c == sys.executable else c for c in cmd])
        return f"vetd not runnable yet (`{shown} --help` rc={r.returncode}): {tail[0].replace(sys.executable, 'python3')}"
    return None


# ------------------------------------------------------------------------------------------------
# the run


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu,
            "python": platform.python_version()}


def build_flat_tree(root: str, nfiles: int, ndirs: int, size: int) -> list[str]:
    """nfiles small files of `size` bytes, spread over ndirs directories, each one different."""
    per = max(1, math.ceil(nfiles / ndirs))
    for d in range(math.ceil(nfiles / per)):
        os.mkdir(os.path.join(root, f"d{d:03d}"))
    paths = []
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for i in range(nfiles):
        p = os.path.join(root, f"d{i // per:03d}", f"f{i:06d}")
        fd = os.open(p, flags, 0o644)
        try:
            os.write(fd, f"vetd-bench rss file {i:06d}\n".encode().ljust(size, b".")[:size])
        finally:
            os.close(fd)
        paths.append(p)
    return paths


def rss_scenario(args, work, extra, instance, config_for, vmeasure) -> None:
    """vetd_rss_100k: a tmpfs of its own with rss_files small files, one cold pass with a fresh
    default vetd ([cache] entries = rss_files, kernel_cache = true), then its VmRSS and VmHWM."""
    n = args.rss_files
    page = os.sysconf("SC_PAGE_SIZE")
    size_mib = math.ceil(n * max(page, args.rss_bytes) * 1.1 / 2**20) + 32  # a page per file
    log(f"vetd_rss_100k: {n} files of {args.rss_bytes} bytes in {args.rss_dirs} dirs "
        f"on a {size_mib} MiB tmpfs")
    rmnt = mount_tmpfs(f"{size_mib}m", prefix="vetd-bench-rss-")
    try:
        t1 = time.monotonic()
        rpaths = build_flat_tree(rmnt, n, args.rss_dirs, args.rss_bytes)
        build_s = time.monotonic() - t1
        rst = os.stat(rmnt)
        rtarget = (rmnt, rst.st_dev, mount_info(rmnt)["mnt_id"])
        log(f"  built in {build_s:.1f} s")

        def body(v, info):
            ready = v.rss()
            s = vmeasure(v, "vetd_rss_100k (one cold pass)", rpaths, 1, "read", 1,
                         timeout=4 * args.run_timeout)
            stt = v.status() or {}
            now = v.rss()
            r = {"files": n, "file_bytes": args.rss_bytes, "dirs": args.rss_dirs,
                 "cache_entries_config": n, "kernel_cache": True,
                 "cache_entries": (stt.get("cache") or {}).get("entries"),
                 "kernel_marks": (stt.get("cache") or {}).get("kernel_marks"),
                 "vmrss_mb": round(now["main_rss_kb"] / 1024, 1),
                 "vmhwm_mb": round(now["main_hwm_kb"] / 1024, 1),
                 # every vetd process (readers, scan processes): their peaks summed (an upper
                 # bound: shared pages count once per process) and their PSS now
                 "tree_vmhwm_mb": round(now["tree_hwm_kb"] / 1024, 1),
                 "tree_pss_mb": round(now["tree_pss_kb"] / 1024, 1),
                 "vmrss_at_ready_mb": round(ready["main_rss_kb"] / 1024, 1),
                 "processes": now["processes"], "threads": now["threads"],
                 "tree_build_s": round(build_s, 1), "pass_s": round(s["ops"] / s["opens_per_s"], 1),
                 "cold_64b": {k: s[k] for k in ("p50_us", "p99_us", "opens_per_s", "failed")},
                 "vetd_cpu_us_per_op": s["vetd_cpu_us_per_op"]}
            r["cache_full"] = bool(r["cache_entries"] and r["cache_entries"] >= 0.99 * n)
            extra["rss_100k"] = r
            log(f"  cache entries {r['cache_entries']}, VmRSS {r['vmrss_mb']} MiB, "
                f"VmHWM {r['vmhwm_mb']} MiB (at READY {r['vmrss_at_ready_mb']} MiB); "
                f"{r['processes']} process(es): VmHWM summed {r['tree_vmhwm_mb']} MiB, "
                f"PSS {r['tree_pss_mb']} MiB")
            if not r["cache_full"]:
                raise BenchError(f"the userspace cache holds {r['cache_entries']} entries, not ~{n}")

        log(f"vetd, default config, [cache] entries = {n}, kernel_cache = true")
        instance("vetd-rss-100k", config_for(rmnt, True, None, n), body, ["vetd_rss_100k"],
                 target=rtarget, role="rss", kernel_cache=True, rules=0)
    finally:
        JAN.kill_all()
        unmount_tmpfs(rmnt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000, help="files in the tree (default 2000)")
    ap.add_argument("--min-kib", type=int, default=1)
    ap.add_argument("--max-kib", type=int, default=64)
    ap.add_argument("--passes", type=int, default=20, help="measured passes for baseline/reference/warm scenarios (default 20)")
    ap.add_argument("--exec-bins", type=int, default=20, help="copies of /bin/true to exec")
    ap.add_argument("--exec-passes", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None,
                    help="vetd [scan] workers (default: conf/vetd.toml's)")
    ap.add_argument("--processes", type=int, default=None,
                    help="[scan] processes for every vetd instance (default: the shipped config's)")
    ap.add_argument("--readers", type=int, default=None,
                    help="[daemon] readers for every vetd instance (default: the shipped config's)")
    ap.add_argument("--rules", type=int, default=200,
                    help="access rules for vetd_warm_userspace (default 200)")
    ap.add_argument("--no-rss", action="store_true", help="skip vetd_rss_100k")
    ap.add_argument("--rss-files", type=int, default=100_000,
                    help="files (and [cache] entries) for vetd_rss_100k (default 100000)")
    ap.add_argument("--rss-dirs", type=int, default=100)
    ap.add_argument("--rss-bytes", type=int, default=64, help="size of each vetd_rss_100k file")
    ap.add_argument("--vetd-cmd", default=f"{sys.executable} -m vetd",
                    help="how to start vetd (default: this python -m vetd, cwd = repo)")
    ap.add_argument("--no-vetd", action="store_true", help="baseline and reference listener only")
    ap.add_argument("--no-two", action="store_true", help="skip the two-opener runs")
    ap.add_argument("--ready-timeout", type=float, default=20)
    ap.add_argument("--run-timeout", type=float, default=90,
                    help="seconds per opener run (the 100k-file run gets 4 times this)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    args = ap.parse_args()

    if os.geteuid() != 0:
        print("bench: must run as root (fanotify permission events, mount)", file=sys.stderr)
        return 2
    for exe in ("opener", "reference_listener"):
        if not os.access(os.path.join(BUILD, exe), os.X_OK):
            print(f"bench: {BUILD}/{exe} missing: run `bash bench/run.sh`", file=sys.stderr)
            return 2

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    # if whoever started us dies (timeout, run.sh), clean up at once rather than run on while
    # run.sh's trap unmounts the tmpfs under us
    die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:
        print("bench: parent already gone", file=sys.stderr)
        return 2

    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="vetd-bench-work-")
    res: dict[str, dict] = {}       # scenario -> 1-opener summary
    two: dict[str, dict] = {}       # scenario -> 2-opener summary
    errors: dict[str, str] = {}
    vetd_runs: list[dict] = []
    extra: dict = {"known_bad": {}, "cold_checks": {}}
    try:
        mnt = mount_tmpfs("512m")
        st = os.stat(mnt)
        mnt_id = mount_info(mnt)["mnt_id"]
        log(f"tmpfs at {mnt} (dev {os.major(st.st_dev)}:{os.minor(st.st_dev)}, mnt_id {mnt_id})")
        tree = build_tree(mnt, args.files, args.min_kib, args.max_kib, args.exec_bins, args.seed)
        files, bins, bad = tree["files"], tree["exec_bins"], set(tree["bad"])
        extra["tree"] = {"files": len(files), "bad_files": len(bad),
                         "exec_bins": len(bins), "mib": round(tree["bytes"] / 2**20, 1),
                         "kinds": tree["kinds"]}
        log(f"tree: {len(files)} files ({tree['kinds']}, {extra['tree']['mib']} MiB), "
            f"{len(bad)} known-bad, {len(bins)} exec copies")

        def check_refusals(label, s, expected):
            """Exactly the expected files refused, on every pass; recorded, and logged if not."""
            got = set(s.get("failed_paths", []))
            ok = got == expected and s["failed"] == len(expected) * s["passes"]
            extra["known_bad"][label + ("" if s["openers"] == 1 else f" ({s['openers']} openers)")] = {
                "refused": sorted(os.path.basename(p) for p in got), "expected": len(expected),
                "refusals": s["failed"], "ok": ok,
                "missed": sorted(os.path.basename(p) for p in expected - got),
                "wrongly_refused": sorted(os.path.basename(p) for p in got - expected)}
            if not ok:
                log(f"  !! {label}: refused {sorted(os.path.basename(p) for p in got)} "
                    f"({s['failed']} refusals), expected {len(expected)} known-bad on each pass")

        def measure(label, paths, passes, mode, nproc, on_timeout=lambda: None, expect=frozenset(),
                    timeout=None):
            s = run_openers(work, paths, passes, mode, nproc, timeout or args.run_timeout, on_timeout)
            log(f"  {label:<32} {nproc} opener(s): p50 {s['p50_us']:>9} us  p99 {s['p99_us']:>9} us  "
                f"{s['opens_per_s']:>10} ops/s  failed {s['failed']}")
            check_refusals(label, s, set(expect))
            return s

        # --- baseline: a warm-up pass, then measured passes
        log("baseline (no listener)")
        run_openers(work, files, 1, "read", 1, args.run_timeout, lambda: None)
        res["baseline"] = measure("baseline", files, args.passes, "read", 1)
        if not args.no_two:
            two["baseline"] = measure("baseline", files, args.passes, "read", 2)
        run_openers(work, bins, 1, "exec", 1, args.run_timeout, lambda: None)
        res["baseline_exec"] = measure("baseline_exec", bins, args.exec_passes, "exec", 1)
        with one_cpu(os.getpid()):
            res["baseline_1cpu"] = measure("baseline (1 CPU)", files, args.passes, "read", 1)

        # --- reference listener
        log("reference_listener (C, allow everything)")
        try:
            ref = RefListener(mnt, st.st_dev, mnt_id, os.path.join(work, "ref.err"))
            try:
                extra["reference_listener_marks"] = check_marks([ref.p.pid], st.st_dev, mnt_id)
                run_openers(work, files, 1, "read", 1, args.run_timeout, ref.kill)
                res["reference_listener"] = measure("reference_listener", files, args.passes, "read", 1, ref.kill)
                if not args.no_two:
                    two["reference_listener"] = measure("reference_listener", files, args.passes, "read", 2, ref.kill)
                res["reference_listener_exec"] = measure("reference_listener_exec", bins, args.exec_passes,
                                                         "exec", 1, ref.kill)
                with one_cpu(ref.p.pid):
                    res["reference_listener_1cpu"] = measure("reference_listener (1 CPU)", files,
                                                             args.passes, "read", 1, ref.kill)
            finally:
                extra["reference_listener_log"] = ref.stop()
        except BenchError as e:
            errors["reference_listener"] = str(e)
            log(f"reference_listener failed: {e}")

        # --- vetd
        vetd_scen = ["vetd_cold", "vetd_warm_kernel", "vetd_warm_userspace", "vetd_exec",
                     "vetd_warm_userspace_norules", "vetd_rss_100k"]
        cmd = args.vetd_cmd.split()
        reason = "skipped (--no-vetd)" if args.no_vetd else vetd_available(cmd)
        base = None
        if not reason:
            try:
                base, rewritten = default_config()
                extra["config"] = {"from": os.path.relpath(DEFAULT_CONFIG, REPO),
                                   "scan_workers": args.workers or base.get("scan", {}).get("workers"),
                                   "scan_processes": (args.processes if args.processes is not None
                                                      else base.get("scan", {}).get("processes", 0)),
                                   "readers": (args.readers if args.readers is not None
                                               else base.get("daemon", {}).get("readers", 1)),
                                   "plugins": [n for n, t in base.get("plugins", {}).items()
                                               if t.get("enabled", True)],
                                   "repo_paths": [os.path.relpath(p, REPO) for p in rewritten]}
            except (OSError, ValueError, BenchError) as e:
                reason = f"cannot build the config from conf/vetd.toml: {e}"
        if reason:
            for s in vetd_scen:
                errors[s] = reason
            log(f"vetd scenarios not measured: {reason}")
        else:
            log(f"vetd config: conf/vetd.toml's plugins {extra['config']['plugins']} "
                f"({', '.join(extra['config']['repo_paths'])})")
            extra_deny = os.path.join(work, "bench-extra.sha256")
            with open(extra_deny, "w") as f:
                f.write("# the bench's own listed-bad blob, HASH:SIZE:NAME\n")
                for h, size, name in tree["extra_deny"]:
                    f.write(f"{h}:{size}:{name}\n")
            empty_rules = os.path.join(work, "rules-none")
            os.makedirs(empty_rules)
            rules_dir = os.path.join(work, f"rules-{args.rules}")
            extra["rules"] = write_rules(rules_dir, mnt, args.rules)
            extra["rules"]["dir"] = "work dir, rules-%d/" % args.rules
            log(f"{extra['rules']['rules']} access rules in {len(extra['rules']['files'])} files for vetd_warm_userspace")

            def config_for(target, kernel_cache, rules, cache_entries=None):
                return lambda control: vetd_config(base, target, control, kernel_cache, rules,
                                                   args.workers, extra_deny, cache_entries,
                                                   args.processes, args.readers)

            def instance(name, make_config, body, scen_names, target=(mnt, st.st_dev, mnt_id),
                         role="latency", **facts):
                """Start a vetd, run body(v, info), stop it; failures mark scen_names not measured."""
                v = None
                info = {"instance": name, "role": role, **facts}
                try:
                    v = Vetd(cmd, work, name, *target, make_config, args.ready_timeout)
                    info["startup_s"] = round(v.startup_s, 2)
                    info["marks_at_ready"] = v.marks
                    log(f"{name}: pid {v.pid}, READY after {v.startup_s:.2f} s, marks {v.marks}")
                    body(v, info)
                except BenchError as e:
                    for s in scen_names:
                        if s not in res and s not in two and s not in errors:
                            errors[s] = f"{name}: {e}"
                    info["error"] = str(e)
                    log(f"{name} failed: {e}")
                finally:
                    if v is not None:
                        info.update(v.stop())
                        info["stderr_tail"] = v.stderr_tail(600)
                        log(f"{name}: stopped ({info['stop']}), cpu {info['cpu_s']:.2f} s, "
                            f"VmHWM {info['main_hwm_kb'] / 1024:.1f} MiB")
                    vetd_runs.append(info)

            def vmeasure(v, label, paths, passes, mode, nproc, expect=frozenset(), timeout=None):
                c0 = v.cpu_s()
                s = measure(label, paths, passes, mode, nproc, v.kill, expect, timeout)
                v.check()
                s["vetd_cpu_us_per_op"] = round((v.cpu_s() - c0) * 1e6 / s["ops"], 1)
                return s

            def cold_check(label, v, paths):
                """Before a cold measurement: no inode marks, nothing cached. Returns a function
                to call after it, which checks that the first plugin scanned every file."""
                marks = v.check()
                st0 = v.status() or {}
                entries0 = (st0.get("cache") or {}).get("entries")
                scans0 = sum(p.get("scans", 0) for p in (st0.get("plugins") or [])[:1])

                def after():
                    st1 = v.status() or {}
                    plugins = st1.get("plugins") or []
                    scans = sum(p.get("scans", 0) for p in plugins[:1]) - scans0
                    c = {"inode_marks_before": marks["inode"], "cache_entries_before": entries0,
                         "first_plugin": plugins[0]["name"] if plugins else None,
                         "files_scanned": scans, "files": len(paths)}
                    c["cold"] = (marks["inode"] == 0 and entries0 == 0 and scans == len(paths))
                    extra["cold_checks"][label] = c
                    if not c["cold"]:
                        log(f"  !! {label} was not fully cold: {c}")
                    return c
                return after

            def body_default(v, info):
                done = cold_check("vetd_cold", v, files)
                res["vetd_cold"] = vmeasure(v, "vetd_cold", files, 1, "read", 1, bad)
                done()
                info["marks_after_cold"] = v.check()
                res["vetd_warm_kernel"] = vmeasure(v, "vetd_warm_kernel", files, args.passes, "read", 1, bad)
                if not args.no_two:
                    two["vetd_warm_kernel"] = vmeasure(v, "vetd_warm_kernel", files, args.passes, "read", 2, bad)
                info["marks_after_warm"] = v.check()
                res["vetd_exec_first_pass"] = vmeasure(v, "vetd_exec (first pass)", bins, 1, "exec", 1)
                res["vetd_exec"] = vmeasure(v, "vetd_exec", bins, args.exec_passes, "exec", 1)

            def body_rules(v, info):
                st0 = v.status() or {}
                loaded = (st0.get("rules") or {}).get("count")
                info["rules_loaded"] = loaded
                if loaded != extra["rules"]["rules"]:
                    raise BenchError(f"vetd loaded {loaded} rules, the bench wrote {extra['rules']['rules']}")
                res["vetd_cold_rules"] = vmeasure(v, "vetd_cold (200 rules)", files, 1, "read", 1, bad)
                res["vetd_warm_userspace"] = vmeasure(v, "vetd_warm_userspace", files, args.passes,
                                                      "read", 1, bad)
                with one_cpu(v.pid):
                    res["vetd_warm_userspace_1cpu"] = vmeasure(v, "vetd_warm_userspace (1 CPU)", files,
                                                               args.passes, "read", 1, bad)
                if not args.no_two:
                    two["vetd_warm_userspace"] = vmeasure(v, "vetd_warm_userspace", files, args.passes,
                                                          "read", 2, bad)
                marks = info["marks_after_warm"] = v.check()
                st1 = v.status() or {}
                info["rules_status"] = {k: (st1.get("rules") or {}).get(k)
                                        for k in ("count", "uncacheable_in_kernel", "hits")}
                info["kernel_marks_placed"] = (st1.get("cache") or {}).get("kernel_marks")
                if marks["inode_ignore"] or info["kernel_marks_placed"]:
                    raise BenchError(f"the rules did not keep the tree out of the kernel cache: "
                                     f"{marks}, kernel_marks {info['kernel_marks_placed']}")

            def body_norules(v, info):
                res["vetd_cold_no_kernel_cache"] = vmeasure(v, "vetd_cold (kernel_cache=false)",
                                                            files, 1, "read", 1, bad)
                res["vetd_warm_userspace_norules"] = vmeasure(v, "vetd_warm_userspace_norules", files,
                                                              args.passes, "read", 1, bad)
                with one_cpu(v.pid):
                    res["vetd_warm_userspace_norules_1cpu"] = vmeasure(
                        v, "vetd_warm_userspace_norules (1 CPU)", files, args.passes, "read", 1, bad)
                if not args.no_two:
                    two["vetd_warm_userspace_norules"] = vmeasure(v, "vetd_warm_userspace_norules", files,
                                                                  args.passes, "read", 2, bad)
                info["marks_after_warm"] = v.check()

            def body_cold2(v, info):
                done = cold_check("vetd_cold (2 openers)", v, files)
                two["vetd_cold"] = vmeasure(v, "vetd_cold", files, 1, "read", 2, bad)
                done()

            log("vetd, shipped default config: cold, warm (kernel cache), exec")
            instance("vetd-default", config_for(mnt, True, None), body_default,
                     ["vetd_cold", "vetd_warm_kernel", "vetd_exec"], kernel_cache=True, rules=0)
            log(f"vetd, default config + {extra['rules']['rules']} access rules: warm (userspace cache)")
            instance("vetd-rules", config_for(mnt, True, rules_dir), body_rules,
                     ["vetd_warm_userspace"], kernel_cache=True, rules=extra["rules"]["rules"])
            log("vetd, kernel_cache = false, no rules: warm (userspace cache)")
            instance("vetd-norules-userspace", config_for(mnt, False, empty_rules), body_norules,
                     ["vetd_warm_userspace_norules"], kernel_cache=False, rules=0)
            if not args.no_two:
                log("vetd, default config, fresh (empty caches, no marks): cold with two openers")
                instance("vetd-cold-2", config_for(mnt, True, None), body_cold2, [],
                         kernel_cache=True, rules=0)

        # --- baseline again: how much did the machine drift during the run?
        log("baseline again (drift check)")
        res["baseline_end"] = measure("baseline_end", files, args.passes, "read", 1)

        # --- RSS with 100,000 cached verdicts, on a tmpfs of its own
        if base is not None and not args.no_rss:
            try:
                rss_scenario(args, work, extra, instance, config_for, vmeasure)
            except (BenchError, OSError) as e:
                errors["vetd_rss_100k"] = str(e)
                log(f"vetd_rss_100k not measured: {e}")
    except BenchError as e:
        log(f"benchmark failed: {e}")
        errors["_run"] = str(e)
    finally:
        JAN.kill_all()
        for m in list(reversed(JAN.mounts)):
            unmount_tmpfs(m)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work dir kept: {work}")

    report(res, two, errors, vetd_runs, extra, args, time.monotonic() - t0)
    return 0 if "_run" not in errors else 1


# ------------------------------------------------------------------------------------------------
# the report

KEYS = ("p50_us", "p99_us", "opens_per_s", "ratio_to_baseline")


def with_ratio(s: dict | None, base: dict | None) -> dict:
    if not s:
        return {k: None for k in KEYS}
    r = None
    if base and base.get("p50_us"):
        r = round(s["p50_us"] / base["p50_us"], 2)
    return {"p50_us": s["p50_us"], "p99_us": s["p99_us"], "opens_per_s": s["opens_per_s"],
            "ratio_to_baseline": r}


def target(desc: str, measured, limit: float, at_most: bool) -> dict:
    met = None if measured is None else (measured <= limit if at_most else measured >= limit)
    return {"target": desc, "limit": limit, "measured": measured, "met": met}


def targets(res: dict, two: dict, rss: dict | None) -> dict:
    """The issue's targets, each computed from this run's figures (met is None if not measured)."""
    def p50(d, k):
        return (d.get(k) or {}).get("p50_us")

    def rate(d, k):
        return (d.get(k) or {}).get("opens_per_s")

    ref, wu = p50(res, "reference_listener"), p50(res, "vetd_warm_userspace")
    ref1, wu1 = p50(res, "reference_listener_1cpu"), p50(res, "vetd_warm_userspace_1cpu")
    c1, c2 = rate(res, "vetd_cold"), rate(two, "vetd_cold")
    return {
        "vetd_warm_userspace_p50_vs_reference_listener": target(
            "vetd_warm_userspace p50 <= 1.5 x reference_listener p50",
            round(wu / ref, 2) if wu and ref else None, 1.5, True),
        "vetd_warm_userspace_1cpu_vs_reference_listener_1cpu": target(
            "the same with listener and opener on one CPU (no cross-CPU wake-up)",
            round(wu1 / ref1, 2) if wu1 and ref1 else None, 1.5, True),
        "vetd_cold_p50_us": target("vetd_cold p50 <= 150 us, default plugins", p50(res, "vetd_cold"),
                                   150, True),
        "vetd_cold_2_openers_speedup": target(
            "2 openers on a cold tree >= 1.4 x the opens/s of one",
            round(c2 / c1, 2) if c1 and c2 else None, 1.4, False),
        # All of vetd's processes: with readers or scan processes, their VmHWM summed (an upper
        # bound; the per-process peaks need not coincide and shared pages count per process).
        "vetd_rss_mb": target("vetd VmHWM <= 80 MiB with 100,000 cached verdicts (summed over "
                              "its processes)",
                              rss.get("tree_vmhwm_mb", rss.get("vmhwm_mb"))
                              if rss and rss["cache_entries"] >= 99_000 else None, 80, True),
    }


def report(res, two, errors, vetd_runs, extra, args, elapsed) -> None:
    base, base_x = res.get("baseline"), res.get("baseline_exec")

    def basis(name):
        if name.endswith("_1cpu"):
            return res.get("baseline_1cpu")
        return base_x if name.endswith("exec") or name == "vetd_exec_first_pass" else base

    rows = [
        ("baseline", "no listener"),
        ("reference_listener", "C fanotify loop, allow all"),
        ("vetd_cold", "vetd, first pass, every file scanned"),
        ("vetd_warm_kernel", "vetd, repeat passes, kernel ignore marks"),
        ("vetd_cold_rules", "vetd + 200 rules, first pass"),
        ("vetd_warm_userspace", "vetd + 200 rules, repeat passes, userspace cache"),
        ("vetd_cold_no_kernel_cache", "vetd kernel_cache=false, first pass"),
        ("vetd_warm_userspace_norules", "vetd kernel_cache=false, no rules, repeat passes"),
        ("baseline_end", "no listener, again at the end (drift check)"),
        ("baseline_1cpu", "no listener, opener on CPU 0"),
        ("reference_listener_1cpu", "C listener and opener both on CPU 0"),
        ("vetd_warm_userspace_1cpu", "as vetd_warm_userspace, all on CPU 0"),
        ("vetd_warm_userspace_norules_1cpu", "as vetd_warm_userspace_norules, all on CPU 0"),
        ("baseline_exec", "exec /bin/true copies, no listener"),
        ("reference_listener_exec", "exec, C listener (+OPEN_EXEC_PERM)"),
        ("vetd_exec_first_pass", "exec, vetd, first exec of each copy"),
        ("vetd_exec", "exec, vetd, repeat passes"),
    ]
    m = machine()
    rss = extra.get("rss_100k")
    lat_runs = [v for v in vetd_runs if v.get("role") != "rss"]
    print()
    print(f"vetd benchmark - {m['nproc']} CPUs, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}")
    t = extra.get("tree", {})
    print(f"tree: {t.get('files')} files ({t.get('bad_files')} known-bad), {t.get('mib')} MiB on a fresh tmpfs; "
          f"{t.get('exec_bins')} exec copies; {args.passes} passes warm, {args.exec_passes} exec passes")
    if extra.get("config"):
        c = extra["config"]
        print(f"vetd config: {c['from']} with /etc/vetd/ -> conf/ (plugins: {', '.join(c['plugins'])}); "
              f"watch = the bench tmpfs; + the bench's listed-bad hash; [scan] workers "
              f"{c.get('scan_workers')}, processes {c.get('scan_processes')}; [daemon] readers "
              f"{c.get('readers')}")
    if extra.get("rules"):
        r = extra["rules"]
        print(f"rules for vetd_warm_userspace: {r['rules']} in {len(r['files'])} files, "
              f"{len(r['tree_rules'])} of them over the tree (subject-dependent, matching no bench process)")
    print("ops: open+read-to-EOF+close (exec rows: fork+execve+wait); ratio = p50 / baseline p50 "
          "(exec rows: / baseline_exec p50; op=2 rows: / two-opener baseline p50)")
    print("two openers: 2 processes split the list (every other file), started together; "
          "ops/s is their sum")
    print()
    hdr = (f"{'scenario':<28} {'op':>2} {'ops':>6} {'p50 us':>9} {'p99 us':>9} {'ops/s':>10} {'ratio':>7} "
           f"{'fail':>5} {'vetd cpu us/op':>14}")
    print(hdr)
    print("-" * len(hdr))
    for name, _ in rows:
        for nproc, table in ((1, res), (2, two)):
            s = table.get(name)
            if s is None:
                if nproc == 1 and name in SCENARIOS:
                    print(f"{name:<28} {1:>2} {'not measured: ' + errors.get(name, 'no data')[:90]}")
                continue
            b = basis(name) if nproc == 1 else two.get("baseline")
            r = with_ratio(s, b)["ratio_to_baseline"]
            cpu = s.get("vetd_cpu_us_per_op")
            print(f"{name:<28} {nproc:>2} {s['ops']:>6} {s['p50_us']:>9.2f} {s['p99_us']:>9.2f} "
                  f"{s['opens_per_s']:>10.0f} {(f'{r:.2f}x' if r else '-'):>7} {s['failed']:>5} "
                  f"{(f'{cpu:.1f}' if cpu is not None else '-'):>14}")
    print()
    cpu_total = round(sum(v.get("cpu_s", 0) for v in lat_runs), 2) if lat_runs else None
    peak = max((v.get("main_hwm_kb", 0) for v in lat_runs), default=0)
    peak_mb = round(peak / 1024, 1) if peak else None
    for v in vetd_runs:
        print(f"vetd instance {v['instance']}: kernel_cache={v.get('kernel_cache')} rules={v.get('rules')} "
              f"startup {v.get('startup_s', '-')} s, cpu {v.get('cpu_s', 0):.2f} s, "
              f"VmHWM {v.get('main_hwm_kb', 0) / 1024:.1f} MiB, VmRSS {v.get('main_rss_kb', 0) / 1024:.1f} MiB "
              f"({v.get('processes', '?')} proc, {v.get('threads', '?')} threads), {v.get('stop', '')}"
              + (f"; ERROR {v['error']}" if v.get("error") else ""))
        if v.get("marks_after_cold"):
            print(f"  fanotify marks after the cold pass: {v['marks_after_cold']}")
        if v.get("rules_status"):
            print(f"  rules: {v['rules_status'].get('count')} loaded, kernel marks placed "
                  f"{v.get('kernel_marks_placed')}, kept out of the kernel cache by rules "
                  f"{v['rules_status'].get('uncacheable_in_kernel')}")
        st = v.get("status") or {}
        if st.get("answers") or st.get("cache"):
            a, c = st.get("answers", {}), st.get("cache", {})
            deg = {k: n for k, n in (st.get("degraded") or {}).items() if n}
            plug = ", ".join(f"{p['name']} {p['scans']} scans/{p['denies']} denies"
                             for p in st.get("plugins") or [])
            hp = st.get("hot_path") or {}
            inline = (st.get("backlog") or {}).get("inline_scans")
            print(f"  vetd status: answers {a.get('by_reason')}, cache entries {c.get('entries')} "
                  f"hits {c.get('hits')} misses {c.get('misses')}, kernel_marks {c.get('kernel_marks')}, "
                  f"degraded {deg or 'none'}; {plug}; compiled read loop "
                  f"{'yes' if hp.get('compiled') else 'NO (pure Python)'}, {hp.get('answered', 0)} "
                  f"answered in C; {inline} inline scans")
            bp = hp.get("busy_poll")
            if bp:
                print(f"  busy polling (max {bp.get('max_us')} us): {bp.get('caught')} batches caught "
                      f"while polling, {bp.get('spent_s')} s spent polling")
        elif st.get("error"):
            print(f"  vetd status: {st['error']}")
    if base and res.get("reference_listener"):
        rl = res["reference_listener"]
        print(f"context: a bare C userspace round trip costs {rl['p50_us'] - base['p50_us']:.1f} us per open at p50 "
              f"({rl['p50_us'] / base['p50_us']:.2f}x baseline)")
    cold = {}
    if res.get("vetd_cold"):
        cold["files_per_s_1_opener"] = res["vetd_cold"]["opens_per_s"]
    if two.get("vetd_cold"):
        cold["files_per_s_2_openers"] = two["vetd_cold"]["opens_per_s"]
    if len(cold) == 2:
        cold["speedup"] = round(cold["files_per_s_2_openers"] / cold["files_per_s_1_opener"], 2)
    cold["checks"] = extra.get("cold_checks", {})
    if len(cold) > 1:
        print(f"cold scan throughput: {cold.get('files_per_s_1_opener')} files/s with 1 opener, "
              f"{cold.get('files_per_s_2_openers')} with 2 (x{cold.get('speedup')}); really cold: "
              + ", ".join(f"{k} {'yes' if c['cold'] else 'NO'} ({c['files_scanned']}/{c['files']} scanned by "
                          f"{c['first_plugin']}, {c['inode_marks_before']} inode marks and "
                          f"{c['cache_entries_before']} cache entries before)"
                          for k, c in cold["checks"].items()))
    if rss:
        print(f"vetd_rss_100k: {rss['files']} files of {rss['file_bytes']} B, one cold pass in {rss['pass_s']} s "
              f"(p50 {rss['cold_64b']['p50_us']} us, {rss['cold_64b']['opens_per_s']:.0f} files/s), "
              f"kernel_cache=true; cache entries {rss['cache_entries']}; VmRSS {rss['vmrss_mb']} MiB, "
              f"VmHWM {rss['vmhwm_mb']} MiB (VmRSS at READY {rss['vmrss_at_ready_mb']} MiB); "
              f"{rss.get('processes', 1)} process(es): VmHWM summed {rss.get('tree_vmhwm_mb')} MiB, "
              f"PSS {rss.get('tree_pss_mb')} MiB")
    kb = extra.get("known_bad", {})
    bad_rows = {k: c for k, c in kb.items() if c["expected"]}
    if bad_rows:
        ok = all(c["ok"] for c in bad_rows.values())
        names = sorted({n for c in bad_rows.values() for n in c["refused"]})
        print(f"known-bad files refused on every pass of every vetd read scenario: {'yes' if ok else 'NO'} "
              f"({', '.join(names)})")
        for k, c in bad_rows.items():
            if not c["ok"]:
                print(f"  {k}: missed {c['missed']}, wrongly refused {c['wrongly_refused']}, "
                      f"{c['refusals']} refusals")
    others = {k: c for k, c in kb.items() if not c["expected"] and not c["ok"]}
    for k, c in others.items():
        print(f"  {k}: refused {c['wrongly_refused']} ({c['refusals']} refusals), expected none")
    tg = targets(res, two, rss)
    print("targets:")
    for k, g in tg.items():
        state = "not measured" if g["met"] is None else ("met" if g["met"] else "NOT met")
        print(f"  {g['target']:<58} measured {g['measured']}: {state}")
    for k, e in errors.items():
        if k not in SCENARIOS:
            print(f"error ({k}): {e}")
    print(f"total bench time {elapsed:.1f} s")

    out = {name: with_ratio(res.get(name), basis(name)) for name in SCENARIOS + ONE_CPU}
    for name in ("vetd_cold_rules", "vetd_cold_no_kernel_cache", "baseline_end"):
        if name in res:
            out[name] = with_ratio(res[name], base)
    out["vetd_rss_mb"] = rss.get("tree_vmhwm_mb", rss.get("vmhwm_mb")) if rss else None
    out["vetd_rss_100k"] = rss
    out["vetd_peak_hwm_mb"] = peak_mb
    out["vetd_cpu_s"] = cpu_total
    out["cold_scan"] = cold
    out["targets"] = tg
    out["two_openers"] = {name: with_ratio(s, two.get("baseline")) for name, s in two.items()}
    out["exec"] = {name: with_ratio(res.get(name), base_x)
                   for name in ("baseline_exec", "reference_listener_exec", "vetd_exec_first_pass", "vetd_exec")}
    out["not_measured"] = {k: v for k, v in errors.items()}
    details = {}
    for name, s in list(res.items()) + [("two_openers." + n, s) for n, s in two.items()]:
        d = {k: v for k, v in s.items() if k not in KEYS and k != "failed_paths"}
        if s.get("failed_paths"):
            d["failed_paths"] = [os.path.basename(p) for p in s["failed_paths"]]
        details[name] = d
    out["details"] = details
    out["known_bad"] = kb
    out["config"] = extra.get("config")
    out["rules"] = extra.get("rules")
    out["vetd_instances"] = [{k: v for k, v in r.items() if k != "stderr_tail"} for r in vetd_runs]
    out["machine"] = m
    out["params"] = {"files": args.files, "passes": args.passes, "exec_bins": args.exec_bins,
                     "exec_passes": args.exec_passes, "min_kib": args.min_kib, "max_kib": args.max_kib,
                     "workers": args.workers, "processes": args.processes, "rules": args.rules, "rss_files": None if args.no_rss else args.rss_files,
                     "two_openers": "2 processes, list split every other file"}
    out["elapsed_s"] = round(elapsed, 1)
    print(json.dumps(out, separators=(",", ":")))


if __name__ == "__main__":
    sys.exit(main())
