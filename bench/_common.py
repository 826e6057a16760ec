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
    return call


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
