"""Helpers shared by the benchmark driver and its workers (standard library only).

Nothing here imports nexo_poller, so the peer workers that run in the
throwaway virtual environment can use it too.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


def pct(values, q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def summary(values) -> dict:
    """Median, p99, mean, min, max and count of a list of numbers."""
    values = list(values)
    if not values:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "mean": float("nan"),
                "min": float("nan"), "max": float("nan")}
    return {"n": len(values), "p50": statistics.median(values), "p99": pct(values, 99),
            "mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def proc_status(pid: int | str = "self") -> dict:
    """VmRSS / VmHWM (KiB) of a process from /proc/PID/status."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_secs(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_nats_server(*extra: str):
    """A local nats-server on a free loopback port (``extra`` arguments
    added), once it accepts connections: (process, port)."""
    import shutil
    import socket
    import subprocess
    exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-a", "127.0.0.1", "-p", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (read from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name may contain spaces: the fields after ')' are safe
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def floor_call(echo_path: str, envelope: dict):
    """One round trip of the floor: a JSON line to echo_floor.py and back,
    on a plain blocking socket, encoded and decoded like a tick."""
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(echo_path)
    rfile = sock.makefile("rb")
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def call():
        sock.sendall(dumps(envelope).encode() + b"\n")
        return json.loads(rfile.readline())
    call.close = lambda: (rfile.close(), sock.close())
    call.peer_pid = peer_pid(sock)
    return call


def peer_pid(sock) -> int:
    """The process at the other end of a connected Unix socket (SO_PEERCRED)."""
    import socket
    import struct
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def _traced(pids, tracer: int) -> bool:
    """Whether every thread of every process in ``pids`` is traced by ``tracer``."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return False
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as fh:
                    line = next(x for x in fh if x.startswith("TracerPid:"))
            except (OSError, StopIteration):
                continue                    # the thread ended meanwhile
            if int(line.split()[1]) != tracer:
                return False
    return True


def count_syscalls(pids, call, n: int) -> dict | None:
    """System calls per call of ``call()``, summed over every thread of the
    processes ``pids``: ``strace -c -f`` is attached to all of them, ``n``
    calls are made, strace is stopped and its summary divided by ``n``.
    Returns {"total": per call, "by_name": {syscall: per call}, "n": n},
    or None where strace is missing or may not attach (a note, not a crash).
    Counts, unlike times, do not suffer much from strace slowing the
    processes down; a thread blocked in a call when strace attaches or
    detaches adds at most one call each, which ``n`` makes negligible."""
    import shutil
    import signal
    import subprocess
    import tempfile
    exe = shutil.which("strace")
    if exe is None:
        return None
    fd, out = tempfile.mkstemp(prefix="nexo-bench-strace-")
    os.close(fd)
    cmd = [exe, "-c", "-f", "-q", "-o", out]
    for pid in pids:
        cmd += ["-p", str(pid)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _traced(pids, proc.pid):
            if proc.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        for _ in range(n):
            call()
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        with open(out) as fh:
            text = fh.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.unlink(out)
    by_name, total = {}, None
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 5 and f[3].isdigit():      # % time, seconds, usecs/call, calls, [errors,] name
            if f[-1] == "total":
                total = int(f[3])
            else:
                by_name[f[-1]] = int(f[3]) / n
    if total is None:
        return None
    return {"total": total / n, "by_name": by_name, "n": n}


def interleaved(calls: dict, warm: int, rounds: int, block: int) -> dict:
    """Round trips of several paths measured side by side: ``rounds`` blocks
    of ``block`` sequential calls each, the paths taking turns (the order
    flips every round), after ``warm`` untimed calls of each.  Summary in us."""
    pc = time.perf_counter
    for fn in calls.values():
        for _ in range(warm):
            fn()
    out = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, sink = calls[name], out[name]
            for _ in range(block):
                t0 = pc()
                fn()
                sink.append((pc() - t0) * 1e6)
    return {name: summary(v) for name, v in out.items()}


def start_echo(path: str):
    """Start echo_floor.py listening on ``path``; returns the Popen."""
    import subprocess
    proc = subprocess.Popen([sys.executable, os.path.join(BENCH_DIR, "echo_floor.py"), path],
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError("echo_floor.py did not start")
    return proc


def emit(result: dict) -> None:
    """A worker's one line of output: JSON, last on stdout."""
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_for(call, inflight: int, seconds: float) -> dict:
    """Keep ``inflight`` calls of ``call()`` going on as many threads for
    ``seconds``; returns completed calls, their rate and latency summary (us)."""
    lat: list[list[float]] = [[] for _ in range(inflight)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(inflight + 1)
    box = {}

    def loop(i: int) -> None:
        mine = lat[i]
        pc = time.perf_counter
        barrier.wait()
        stop = box["stop"]
        try:
            while True:
                t0 = pc()
                if t0 >= stop:
                    return
                call()
                mine.append(pc() - t0)
        except BaseException as exc:          # surfaced below: a crash, not a figure
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(inflight)]
    for t in threads:
        t.start()
    box["stop"] = time.perf_counter() + seconds
    start = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join(seconds + 60)
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    flat = [x * 1e6 for part in lat for x in part]
    return {"count": len(flat), "rate": len(flat) / elapsed, "lat_us": summary(flat)}


def lateness(fired: list, base: float, plan: list[float], ready: float, window: float,
             demand: float, *, startup: bool, index=int) -> dict:
    """Figure 4's firing lateness, the same for both schedulers: waits out
    the window, then reads ``fired``, (job, fire time[, dispatch time]);
    ``index(job)`` is the job's index in ``plan``.

    Slot i is intended at ``base + plan[i]``.  steady: the slots from the
    first one (or the load's end, whichever is later) for ``window`` seconds;
    a slot due before the load ended is left out and counted.  startup:
    every slot from the start of the load until ``window`` seconds after it
    ended, and when the last of those due during the load fired."""
    first = base + min(plan) if plan else ready
    lo = ready if startup else max(ready, first)
    hi = lo + window
    time.sleep(max(0.0, hi - time.time()) + 0.5)
    late, disp, excluded, in_window, caught_up = [], [], 0, 0, ready
    for entry in list(fired):
        i, t_fire = index(entry[0]), entry[1]
        intended = base + plan[i]
        if lo <= t_fire <= hi:
            in_window += 1
        if intended < ready:
            excluded += 1
            caught_up = max(caught_up, t_fire)
            if not startup:
                continue
        if intended <= hi:
            late.append((t_fire - intended) * 1e3)
            if len(entry) > 2:
                disp.append((entry[2] - intended) * 1e3)
    return {"window_s": window, "rate": in_window / window, "demand": demand,
            "lateness_ms": summary(late), "dispatch_lateness_ms": summary(disp),
            "due_during_load": excluded, "excluded_before_ready": 0 if startup else excluded,
            "caught_up_s": caught_up - ready, "first_slot_after_ready_s": first - ready}
