"""Commit throughput and latency of the two state backends on one machine.

    python bench/state_backends.py [--jobs 200] [--rounds 20] [--latency 300]

sqlite (a temp file, WAL, synchronous=FULL) next to a JetStream bucket on a
local nats-server started here with ``-js`` and a temp store (file storage,
one replica).  Throughput: every job commits ``rounds`` times through the
asynchronous ``commit`` (group commit), counted until the last ``done``.
Latency: ``commit_now`` of one job, one after another (p50/p99 in ms).
CPU: user + system time per commit of the throughput part, of this process
(the store's threads and the bench's) and of nats-server (from /proc).
Standard library only; needs ``nats-server`` on PATH or in /usr/sbin.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import cpu_secs, pct, start_nats_server  # noqa: E402
import nexo_poller as nx  # noqa: E402


def throughput(store, jobs: int, rounds: int) -> float:
    now = time.time()
    states = store.claim({f"job{i}": now + 600 for i in range(jobs)}, now)
    left = [jobs * rounds]
    finished = threading.Event()
    lock = threading.Lock()

    def done(result):
        assert result is True, result
        with lock:
            left[0] -= 1
            if not left[0]:
                finished.set()
    start = time.perf_counter()
    for r in range(rounds):
        for s in states.values():
            store.commit(s.replace(cursor=str(r).encode(), lease_until=now + 600), done)
    finished.wait(600)
    return jobs * rounds / (time.perf_counter() - start)


def latency(store, n: int) -> tuple[float, float]:
    now = time.time()
    state = store.claim({"lat": now + 600}, now)["lat"]
    times = []
    for i in range(n):
        t = time.perf_counter()
        assert store.commit_now(state.replace(cursor=str(i).encode(), lease_until=now + 600))
        times.append((time.perf_counter() - t) * 1000)
    return pct(times, 50), pct(times, 99)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--latency", type=int, default=300)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="nexo-bench-state-")
    proc, port = start_nats_server("-js", "-sd", tmp)
    try:
        rows = []
        for name, make in (
                ("sqlite", lambda: nx.SqliteStateStore(os.path.join(tmp, "s.db"))),
                ("jetstream", lambda: nx.JetStreamStateStore(
                    "bench", f"nats://127.0.0.1:{port}"))):
            store = make()
            try:
                before = (os.times(), cpu_secs(proc.pid))
                tps = throughput(store, a.jobs, a.rounds)
                after = (os.times(), cpu_secs(proc.pid))
                p50, p99 = latency(store, a.latency)
            finally:
                store.close()
            n = a.jobs * a.rounds
            ours = sum(after[0][:2]) - sum(before[0][:2])
            server = after[1] - before[1] if name == "jetstream" else 0.0
            rows.append((name, tps, p50, p99, ours / n * 1e6, server / n * 1e6))
        print(f"{'backend':<10} {'commits/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'CPU us/commit: ours':>20} {'nats-server':>12}")
        for name, tps, p50, p99, ours, server in rows:
            print(f"{name:<10} {tps:>10.0f} {p50:>8.2f} {p99:>8.2f} {ours:>20.0f} {server:>12.0f}")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
