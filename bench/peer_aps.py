#!/usr/bin/env python3
"""Peer for figure 4: APScheduler 3.x with the same jobs as the Runner.

Runs only in the suite's throwaway virtual environment (bench/.venv).
``peer_aps.py sched 'JSON'`` mirrors workers.w_sched: ``n`` interval jobs of
60 s on a no-op function, a BackgroundScheduler with a 64-thread pool (the
Runner's default max_workers), the default in-memory job store (APScheduler
keeps no per-tick state on disk), misfire_grace_time=None so no run is
dropped.  steady: each job's first run is ``base + lead + offset``, offsets
spread evenly over ``spread`` seconds, base the moment the load begins and
``lead`` past the load (given, as for the Runner, from the start-up run's
load time; without one, calibrated on 2,000 jobs).  startup: the same with
no lead, so the first seconds' slots fall due while it loads.  burst: every
job is due at once.
"""
import gc
import json
import os
import random
import sys
import threading
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, lateness, proc_status  # noqa: E402

from apscheduler.executors.pool import ThreadPoolExecutor  # noqa: E402
from apscheduler.schedulers.background import BackgroundScheduler  # noqa: E402


def make_scheduler():
    return BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(64)},
        job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
        timezone=timezone.utc)


def load(sched, n, first_run, fn):
    for i in range(n):
        sched.add_job(fn, "interval", seconds=60, id=f"j{i}", args=(i,),
                      next_run_time=datetime.fromtimestamp(first_run(i), timezone.utc))
    started = time.time()
    sched.start()
    return started


def calibrate(n_probe: int = 2000) -> float:
    """Seconds per job to add and start (throwaway scheduler, far-future runs)."""
    s = make_scheduler()
    far = time.time() + 3600
    t0 = time.perf_counter()
    load(s, n_probe, lambda i: far, lambda i: None)
    dt = time.perf_counter() - t0
    s.shutdown(wait=False)
    return dt / n_probe


def sched(a: dict) -> dict:
    n, mode = a["n"], a["mode"]
    spread = a.get("spread", 60.0)
    order = list(range(n))
    random.Random(7).shuffle(order)
    plan = [order[i] * spread / n for i in range(n)] if mode != "burst" else [0.0] * n
    lead = 0.0
    if mode == "steady":
        lead = a["lead"] if a.get("lead") is not None else calibrate() * n * 1.5 + 0.5
        plan = [lead + p for p in plan]
    fired: list = []
    done_evt = threading.Event()

    def noop(i):
        fired.append((i, time.time()))
        if mode == "burst" and len(fired) >= n:
            done_evt.set()

    gc.collect()
    s = make_scheduler()
    t0 = time.perf_counter()
    base = time.time()
    started = load(s, n, lambda i: base + plan[i], noop)
    t1 = time.perf_counter()
    ready = time.time()
    out = {"n": n, "mode": mode, "load_s": t1 - t0, "lead_s": lead}
    try:
        if mode == "burst":
            if not done_evt.wait(a.get("timeout", 300)):
                raise RuntimeError(f"only {len(fired)} of {n} runs fired")
            end = time.time()
            out["drain_s"] = end - started
            out["rate"] = n / (end - started)
        else:
            out.update(lateness(fired, base, plan, ready, a["window"], n / spread,
                                startup=mode == "startup"))
        out["vm"] = proc_status()
    finally:
        s.shutdown(wait=False)
    out["fired_total"] = len(fired)
    return out


if __name__ == "__main__":
    emit(sched(json.loads(sys.argv[2])))
