#!/usr/bin/env python3
"""Where a big Runner's firing lateness comes from (figure 4's steady case).

    python bench/profile_scheduler.py [JOBS] [LEAD_SECS]   # 100000 10

JOBS every-60-s jobs on a no-op in-process poller, sqlite state; the first
slots spread over 60 s from LEAD_SECS after start() (past the load).  Over a
20 s window from the first slot it prints the firing lateness (p50, p99,
max, and when the worst came), every garbage collection over 5 ms (gc
callbacks), the time the scheduler thread spent per call in each of its
steps (dispatching, carrying out effects, looking at the state) and the
writer's commit batches, and where the scheduler thread was, sampled every
2 ms (sys._current_frames).  Standard library only; not a timed test.
"""
import collections
import gc
import os
import random
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nexo_poller as nx  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
lead = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
window = 20.0
tmp = tempfile.mkdtemp(prefix="nexo-profile-sched-")
doc = {"state_db": os.path.join(tmp, "state.db"), "default_jitter_ms": 0,
       "jobs": [{"id": f"j{i}", "kind": "noop",
                 "schedule": {"every_secs": 60, "stagger_jitter_ms": int((lead + 60) * 1000)}}
                for i in range(n)]}
order = list(range(n))
random.Random(7).shuffle(order)
plan = [lead + order[i] * 60.0 / n for i in range(n)]
box = [0.0]


class Planned:
    """The Runner's rng: job i's jitter is plan[i] (drawn in config order at start())."""
    i, base, real = 0, None, random.Random(1)

    def uniform(self, low, high):
        if self.i < n:
            self.base = box[0] if self.base is None else self.base
            self.i += 1
            return plan[self.i - 1]
        return self.real.uniform(low, high)


def clock():
    box[0] = time.time()
    return box[0]


fired = []


class Noop:
    kind = "noop"

    def tick(self, ctx):
        fired.append((ctx.job_id, time.time()))


collections_seen, gc_started = [], [0.0]


def on_gc(phase, info):
    if phase == "start":
        gc_started[0] = time.perf_counter()
    else:
        collections_seen.append((time.time(), info["generation"],
                                 (time.perf_counter() - gc_started[0]) * 1e3))


gc.callbacks.append(on_gc)
rng = Planned()
runner = nx.Runner(nx.config_from_dict(doc, extra_kinds=["noop"]), clock=clock, rng=rng)
runner.register(Noop())
runner.open()
steps = collections.defaultdict(list)


def timed(obj, name):
    real = getattr(obj, name)

    def call(*a, **kw):
        t = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            steps[name].append(((time.perf_counter() - t) * 1e3, time.time()))
    setattr(obj, name, call)


timed(runner._scheduler, "_poll_state")
timed(runner._ticks, "drain_effects")
timed(runner._workers, "dispatch")
timed(runner.state.file, "write_batch")
t0 = time.perf_counter()
runner.start()
print(f"start() {time.perf_counter() - t0:.2f} s", file=sys.stderr)
where, stop = collections.Counter(), threading.Event()


def sample():
    ident = runner._scheduler.thread.ident
    while not stop.is_set():
        f, stack = sys._current_frames().get(ident), []
        while f is not None and len(stack) < 4:
            stack.append(f"{f.f_code.co_name}:{f.f_lineno}")
            f = f.f_back
        where[" < ".join(stack)] += 1
        time.sleep(0.002)


threading.Thread(target=sample, daemon=True).start()
lo = rng.base + lead
hi = lo + window
time.sleep(max(0.0, hi - time.time()) + 0.5)
stop.set()
late = sorted(((t - (rng.base + plan[int(j[1:])])) * 1e3, t - lo) for j, t in list(fired)
              if lo <= rng.base + plan[int(j[1:])] <= hi)
print(f"{len(late):,} slots: lateness p50 {late[len(late) // 2][0]:.2f} ms, p99 "
      f"{late[int(len(late) * 0.99)][0]:.2f} ms, max {late[-1][0]:.2f} ms at "
      f"{late[-1][1]:.2f} s into the window")
print("collections over 5 ms (s into the window, generation, ms):",
      [(round(t - lo, 2), g, round(ms, 1)) for t, g, ms in collections_seen
       if lo <= t <= hi and ms > 5])
for name, values in steps.items():
    w = sorted(ms for ms, t in values if lo <= t <= hi)
    if w:
        print(f"{name}: {len(w):,} calls, p50 {w[len(w) // 2]:.2f} ms, p99 "
              f"{w[int(len(w) * 0.99)]:.2f} ms, max {w[-1]:.1f} ms")
total = sum(where.values())
print("the scheduler thread was (share of samples):")
for stack, k in where.most_common(8):
    print(f"  {k / total * 100:5.1f}% {stack}")
runner.stop()
for name in os.listdir(tmp):
    os.unlink(os.path.join(tmp, name))
os.rmdir(tmp)
