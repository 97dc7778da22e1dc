#!/usr/bin/env python3
"""vetd benchmark: what does vetting cost an open?

Run it as root with ``bash bench/run.sh`` (which compiles the C parts first). It mounts its own
tmpfs, builds a tree of mixed files in it, and times open+read+close of every file with a small C
opener (bench/opener.c) under these scenarios, all in one run:

  baseline             no listener at all
  reference_listener   bench/reference_listener.c: a bare C fanotify loop that allows everything
  vetd_cold            vetd just started: every file goes through the scanner plugins
  vetd_warm_kernel     repeat passes: vetd's kernel ignore marks answer (no userspace round trip)
  vetd_warm_userspace  repeat passes with kernel_cache = false: vetd's userspace cache answers
  vetd_exec            fork+exec of copies of /bin/true in the tree, vetd watching exec events

Each is reported as p50/p99 microseconds per op, ops/s and the p50 ratio to the baseline, from one
opener and from two concurrent openers (two processes that split the list, every other file,
started at the same moment). The last line printed is a JSON object with the figures.

Safety: only the benchmark's own tmpfs is ever marked (the reference listener refuses anything but
a tmpfs root; vetd's marks are read back from /proc/PID/fdinfo and vetd is killed at once if it
marked any other filesystem); every child is killed and the tmpfs unmounted on every exit path;
every wait has a timeout, and on a timeout the listener is killed first, which lets the kernel
allow any open still waiting on it.
"""

from __future__ import annotations

import argparse
import array
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
    "vetd_exec",
]

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
        self.mount: str | None = None
        self.state_file = os.environ.get("BENCH_STATE_FILE")

    def _write_state(self) -> None:
        if not self.state_file:
            return
        lines = []
        if self.mount:
            lines.append(f"mount {self.mount}")
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

    def set_mount(self, path: str | None) -> None:
        self.mount = path
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


def mount_tmpfs(size: str) -> str:
    mnt = tempfile.mkdtemp(prefix="vetd-bench-mnt-")
    subprocess.run(["timeout", "20", "mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                    "vetd-bench", mnt], check=True)
    JAN.set_mount(mnt)
    info = mount_info(mnt)
    if not info or info["fstype"] != "tmpfs":
        raise BenchError(f"{mnt} did not come up as a tmpfs: {info}")
    if os.stat(mnt).st_dev == os.stat(os.path.dirname(mnt)).st_dev:
        raise BenchError(f"{mnt} is not a separate filesystem")
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
    JAN.set_mount(None)


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
    # known-bad files: EICAR (exactly 68 bytes) in three places, and a blob listed by hash
    bad_blob = b"vetd-bench known-bad blob " + rng.randbytes(4000)
    bad = {
        os.path.join(root, "quarantine", "eicar.com"): EICAR,
        os.path.join(root, "docs", "eicar.txt"): EICAR,
        os.path.join(root, "src/lib/deep", "eicar.bin"): EICAR,
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
        "deny_hashes": {hashlib.sha256(EICAR).hexdigest(): "EICAR-Test-File",
                        hashlib.sha256(bad_blob).hexdigest(): "vetd-bench-listed-bad"},
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
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
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
    # which of the listed paths failed on the first pass (one opener)
    if nproc == 1:
        a = results[0]["samples"]
        s["failed_paths"] = sorted({paths[i] for i in range(min(len(paths), len(a))) if a[i] < 0})
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
    def __init__(self, mnt: str, errfile: str) -> None:
        self.err = open(errfile, "w+")
        self.p = JAN.add(subprocess.Popen([os.path.join(BUILD, "reference_listener"), "-x", mnt],
                                          stdout=subprocess.PIPE, stderr=self.err, text=True))
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
                 deny_file: str, kernel_cache: bool, workers: int, ready_timeout: float) -> None:
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"{name}-", dir=work)
        self.config = os.path.join(self.dir, "vetd.toml")
        self.control = os.path.join(self.dir, "control.sock")
        with open(self.config, "w") as f:
            f.write(vetd_config(mnt, self.control, deny_file,
                                kernel_cache, workers))
        self.notify_path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.notify_path)
        self.errpath = os.path.join(self.dir, "stderr.log")
        self.err = open(self.errpath, "w+")
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path,
                   PYTHONPATH=REPO + (":" + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        env.pop("WATCHDOG_USEC", None)
        self.t_start = time.monotonic()
        self.p = JAN.add(subprocess.Popen(cmd + ["--config", self.config], cwd=REPO, env=env,
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
                "tree_hwm_kb": sum(status_kb(p, "VmHWM") for p in pids),
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
                                                      "error") if k in st}
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


def vetd_config(mnt: str, control: str, deny_file: str, kernel_cache: bool, workers: int) -> str:
    return f"""# written by bench/bench.py
[daemon]
watch = [{json.dumps(mnt)}]
mark = "filesystem"
events = ["open", "exec"]
socket = {json.dumps(control)}
kernel_cache = {"true" if kernel_cache else "false"}

[scan]
workers = {workers}

[cache]
entries = 100000

[plugins.hashlist]
enabled = true
deny = [{json.dumps(deny_file)}]
"""


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000, help="files in the tree (default 2000)")
    ap.add_argument("--min-kib", type=int, default=1)
    ap.add_argument("--max-kib", type=int, default=64)
    ap.add_argument("--passes", type=int, default=20, help="measured passes for baseline/reference/warm scenarios (default 20)")
    ap.add_argument("--exec-bins", type=int, default=20, help="copies of /bin/true to exec")
    ap.add_argument("--exec-passes", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="vetd [scan] workers")
    ap.add_argument("--vetd-cmd", default=f"{sys.executable} -m vetd",
                    help="how to start vetd (default: this python -m vetd, cwd = repo)")
    ap.add_argument("--no-vetd", action="store_true", help="baseline and reference listener only")
    ap.add_argument("--no-two", action="store_true", help="skip the two-opener runs")
    ap.add_argument("--ready-timeout", type=float, default=20)
    ap.add_argument("--run-timeout", type=float, default=90, help="seconds per opener run")
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

    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="vetd-bench-work-")
    mnt = None
    res: dict[str, dict] = {}       # scenario -> 1-opener summary
    two: dict[str, dict] = {}       # scenario -> 2-opener summary
    errors: dict[str, str] = {}
    vetd_runs: list[dict] = []
    extra: dict = {}
    try:
        mnt = mount_tmpfs("512m")
        st = os.stat(mnt)
        mnt_id = mount_info(mnt)["mnt_id"]
        log(f"tmpfs at {mnt} (dev {os.major(st.st_dev)}:{os.minor(st.st_dev)}, mnt_id {mnt_id})")
        tree = build_tree(mnt, args.files, args.min_kib, args.max_kib, args.exec_bins, args.seed)
        files, bins = tree["files"], tree["exec_bins"]
        extra["tree"] = {"files": len(files), "bad_files": len(tree["bad"]),
                         "exec_bins": len(bins), "mib": round(tree["bytes"] / 2**20, 1),
                         "kinds": tree["kinds"]}
        log(f"tree: {len(files)} files ({tree['kinds']}, {extra['tree']['mib']} MiB), "
            f"{len(tree['bad'])} known-bad, {len(bins)} exec copies")
        deny_file = os.path.join(work, "deny.sha256")
        with open(deny_file, "w") as f:
            for h, name in tree["deny_hashes"].items():
                f.write(f"{h}  {name}\n")

        def measure(label, paths, passes, mode, nproc, on_timeout=lambda: None):
            s = run_openers(work, paths, passes, mode, nproc, args.run_timeout, on_timeout)
            log(f"  {label:<28} {nproc} opener(s): p50 {s['p50_us']:>9} us  p99 {s['p99_us']:>9} us  "
                f"{s['opens_per_s']:>10} ops/s  failed {s['failed']}")
            return s

        # --- baseline: a warm-up pass, then measured passes
        log("baseline (no listener)")
        run_openers(work, files, 1, "read", 1, args.run_timeout, lambda: None)
        res["baseline"] = measure("baseline", files, args.passes, "read", 1)
        if not args.no_two:
            two["baseline"] = measure("baseline", files, args.passes, "read", 2)
        run_openers(work, bins, 1, "exec", 1, args.run_timeout, lambda: None)
        res["baseline_exec"] = measure("baseline_exec", bins, args.exec_passes, "exec", 1)

        # --- reference listener
        log("reference_listener (C, allow everything)")
        try:
            ref = RefListener(mnt, os.path.join(work, "ref.err"))
            try:
                extra["reference_listener_marks"] = check_marks([ref.p.pid], st.st_dev, mnt_id)
                run_openers(work, files, 1, "read", 1, args.run_timeout, ref.kill)
                res["reference_listener"] = measure("reference_listener", files, args.passes, "read", 1, ref.kill)
                if not args.no_two:
                    two["reference_listener"] = measure("reference_listener", files, args.passes, "read", 2, ref.kill)
                res["reference_listener_exec"] = measure("reference_listener_exec", bins, args.exec_passes,
                                                         "exec", 1, ref.kill)
            finally:
                extra["reference_listener_log"] = ref.stop()
        except BenchError as e:
            errors["reference_listener"] = str(e)
            log(f"reference_listener failed: {e}")

        # --- vetd
        vetd_scen = ["vetd_cold", "vetd_warm_kernel", "vetd_warm_userspace", "vetd_exec"]
        cmd = args.vetd_cmd.split()
        reason = "skipped (--no-vetd)" if args.no_vetd else vetd_available(cmd)
        if reason:
            for s in vetd_scen:
                errors[s] = reason
            log(f"vetd scenarios not measured: {reason}")
        else:
            def instance(name, kernel_cache, body, scen_names):
                """Start a vetd, run body(v), stop it; failures mark scen_names not measured."""
                v = None
                info = {"instance": name, "kernel_cache": kernel_cache}
                try:
                    v = Vetd(cmd, work, name, mnt, st.st_dev, mnt_id, deny_file, kernel_cache,
                             args.workers, args.ready_timeout)
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

            def vmeasure(v, info, label, paths, passes, mode, nproc):
                c0 = v.cpu_s()
                s = measure(label, paths, passes, mode, nproc, v.kill)
                v.check()
                s["vetd_cpu_us_per_op"] = round((v.cpu_s() - c0) * 1e6 / s["ops"], 1)
                return s

            def body_a(v, info):
                s = vmeasure(v, info, "vetd_cold", files, 1, "read", 1)
                res["vetd_cold"] = s
                info["marks_after_cold"] = v.check()
                res["vetd_warm_kernel"] = vmeasure(v, info, "vetd_warm_kernel", files, args.passes, "read", 1)
                if not args.no_two:
                    two["vetd_warm_kernel"] = vmeasure(v, info, "vetd_warm_kernel", files, args.passes, "read", 2)
                info["marks_after_warm"] = v.check()
                res["vetd_exec_first_pass"] = vmeasure(v, info, "vetd_exec (first pass)", bins, 1, "exec", 1)
                res["vetd_exec"] = vmeasure(v, info, "vetd_exec", bins, args.exec_passes, "exec", 1)

            def body_b(v, info):
                res["vetd_cold_no_kernel_cache"] = vmeasure(v, info, "vetd_cold (kernel_cache=false)",
                                                            files, 1, "read", 1)
                res["vetd_warm_userspace"] = vmeasure(v, info, "vetd_warm_userspace", files, args.passes, "read", 1)
                if not args.no_two:
                    two["vetd_warm_userspace"] = vmeasure(v, info, "vetd_warm_userspace", files,
                                                          args.passes, "read", 2)
                info["marks_after_warm"] = v.check()

            def body_c(v, info):
                two["vetd_cold"] = vmeasure(v, info, "vetd_cold", files, 1, "read", 2)

            log("vetd, kernel_cache = true: cold, warm (kernel), exec")
            instance("vetd-kernel-cache", True, body_a,
                     ["vetd_cold", "vetd_warm_kernel", "vetd_exec"])
            log("vetd, kernel_cache = false: warm (userspace)")
            instance("vetd-userspace-cache", False, body_b, ["vetd_warm_userspace"])
            if not args.no_two:
                log("vetd, kernel_cache = true, fresh: cold with two openers")
                instance("vetd-cold-2", True, body_c, [])

        # --- baseline again: how much did the machine drift during the run?
        log("baseline again (drift check)")
        res["baseline_end"] = measure("baseline_end", files, args.passes, "read", 1)
    except BenchError as e:
        log(f"benchmark failed: {e}")
        errors["_run"] = str(e)
    finally:
        JAN.kill_all()
        if mnt:
            unmount_tmpfs(mnt)
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


def report(res, two, errors, vetd_runs, extra, args, elapsed) -> None:
    base, base_x = res.get("baseline"), res.get("baseline_exec")

    def basis(name):
        return base_x if name.endswith("exec") or name == "vetd_exec_first_pass" else base

    rows = [
        ("baseline", "no listener"),
        ("reference_listener", "C fanotify loop, allow all"),
        ("vetd_cold", "vetd, first pass, every file scanned"),
        ("vetd_warm_kernel", "vetd, repeat passes, kernel ignore marks"),
        ("vetd_cold_no_kernel_cache", "vetd kernel_cache=false, first pass"),
        ("vetd_warm_userspace", "vetd kernel_cache=false, repeat passes"),
        ("baseline_end", "no listener, again at the end (drift check)"),
        ("baseline_exec", "exec /bin/true copies, no listener"),
        ("reference_listener_exec", "exec, C listener (+OPEN_EXEC_PERM)"),
        ("vetd_exec_first_pass", "exec, vetd, first exec of each copy"),
        ("vetd_exec", "exec, vetd, repeat passes"),
    ]
    m = machine()
    print()
    print(f"vetd benchmark - {m['nproc']} CPUs, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}")
    t = extra.get("tree", {})
    print(f"tree: {t.get('files')} files ({t.get('bad_files')} known-bad), {t.get('mib')} MiB on a fresh tmpfs; "
          f"{t.get('exec_bins')} exec copies; {args.passes} passes warm, {args.exec_passes} exec passes")
    print("ops: open+read-to-EOF+close (exec rows: fork+execve+wait); ratio = p50 / baseline p50 "
          "(exec rows: / baseline_exec p50; op=2 rows: / two-opener baseline p50)")
    print("two openers: 2 processes split the list (every other file), started together; "
          "ops/s is their sum")
    print()
    hdr = f"{'scenario':<27} {'op':>2} {'ops':>6} {'p50 us':>9} {'p99 us':>9} {'ops/s':>10} {'ratio':>7} {'fail':>5} {'vetd cpu us/op':>14}"
    print(hdr)
    print("-" * len(hdr))
    for name, _ in rows:
        for nproc, table in ((1, res), (2, two)):
            s = table.get(name)
            if s is None:
                if nproc == 1 and name in SCENARIOS:
                    print(f"{name:<27} {1:>2} {'not measured: ' + errors.get(name, 'no data')[:90]}")
                continue
            b = basis(name) if nproc == 1 else two.get("baseline")
            r = with_ratio(s, b)["ratio_to_baseline"]
            cpu = s.get("vetd_cpu_us_per_op")
            print(f"{name:<27} {nproc:>2} {s['ops']:>6} {s['p50_us']:>9.2f} {s['p99_us']:>9.2f} "
                  f"{s['opens_per_s']:>10.0f} {(f'{r:.2f}x' if r else '-'):>7} {s['failed']:>5} "
                  f"{(f'{cpu:.1f}' if cpu is not None else '-'):>14}")
    print()
    cpu_total = round(sum(v.get("cpu_s", 0) for v in vetd_runs), 2) if vetd_runs else None
    rss = max((v.get("main_hwm_kb", 0) for v in vetd_runs), default=0)
    rss_mb = round(rss / 1024, 1) if vetd_runs and rss else None
    for v in vetd_runs:
        print(f"vetd instance {v['instance']}: kernel_cache={v['kernel_cache']} "
              f"startup {v.get('startup_s', '-')} s, cpu {v.get('cpu_s', 0):.2f} s, "
              f"VmHWM {v.get('main_hwm_kb', 0) / 1024:.1f} MiB (tree {v.get('tree_hwm_kb', 0) / 1024:.1f} MiB, "
              f"{v.get('processes', '?')} proc, {v.get('threads', '?')} threads), {v.get('stop', '')}"
              + (f"; ERROR {v['error']}" if v.get("error") else ""))
        if v.get("marks_after_cold"):
            print(f"  fanotify marks after the cold pass: {v['marks_after_cold']}")
        st = v.get("status") or {}
        if st.get("answers") or st.get("cache"):
            a, c = st.get("answers", {}), st.get("cache", {})
            deg = {k: n for k, n in (st.get("degraded") or {}).items() if n}
            print(f"  vetd status: answers {a.get('by_reason')}, cache hits {c.get('hits')} misses {c.get('misses')}, "
                  f"kernel_marks {c.get('kernel_marks')}, degraded {deg or 'none'}")
        elif st.get("error"):
            print(f"  vetd status: {st['error']}")
    if base and res.get("reference_listener"):
        rl = res["reference_listener"]
        print(f"context: a bare C userspace round trip costs {rl['p50_us'] - base['p50_us']:.1f} us per open at p50 "
              f"({rl['p50_us'] / base['p50_us']:.2f}x baseline); vetd's warm scenarios should sit "
              f"near baseline (kernel cache) or near the reference listener (userspace cache)")
    bad_failed = {n: s.get("failed", 0) for n, s in res.items() if not n.endswith("exec") and "failed" in s}
    if "vetd_cold" in res:
        print(f"known-bad files refused on the cold pass: {len(res['vetd_cold'].get('failed_paths', []))} of "
              f"{t.get('bad_files')} ({', '.join(os.path.basename(p) for p in res['vetd_cold'].get('failed_paths', []))})")
    for k, e in errors.items():
        if k not in SCENARIOS:
            print(f"error ({k}): {e}")
    print(f"total bench time {elapsed:.1f} s")

    out = {name: with_ratio(res.get(name), basis(name)) for name in SCENARIOS}
    out["vetd_rss_mb"] = rss_mb
    out["vetd_cpu_s"] = cpu_total
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
    out["failed_ops"] = bad_failed
    out["vetd_instances"] = [{k: v for k, v in r.items() if k != "stderr_tail"} for r in vetd_runs]
    out["machine"] = m
    out["params"] = {"files": args.files, "passes": args.passes, "exec_bins": args.exec_bins,
                     "exec_passes": args.exec_passes, "min_kib": args.min_kib, "max_kib": args.max_kib,
                     "workers": args.workers, "two_openers": "2 processes, list split every other file"}
    out["elapsed_s"] = round(elapsed, 1)
    print(json.dumps(out, separators=(",", ":")))


if __name__ == "__main__":
    sys.exit(main())
