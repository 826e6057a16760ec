#!/usr/bin/env python3
"""Benchmark workers: each measurement runs in a fresh process of its own.

``python bench/workers.py NAME 'JSON-ARGS'`` runs one worker and prints its
result as the last line of stdout (``RESULT {...}``).  These workers import
nexo_poller and nothing else outside the standard library; the peers
(nats-py, APScheduler) live in ``peer_nats.py`` and ``peer_aps.py``, which run
in the suite's throwaway virtual environment.
"""
from __future__ import annotations

import gc
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (BENCH_DIR, REPO, children_of, count_syscalls, emit,  # noqa: E402
                     floor_call, interleaved, lateness, peer_pid, proc_status, run_for,
                     summary)

sys.path.insert(0, REPO)

PLUGIN = os.path.join(BENCH_DIR, "plugin_noop.py")

# The one tick request every round-trip figure sends (the floor and the
# peers send the same JSON envelope).
SAMPLE = {"kind": "bench", "job_id": "job-0001", "agent_id": "agent-1",
          "cursor": b"cursor-0000000001", "config": {"feed": "https://example.org/feed.xml",
                                                      "limit": 50},
          "now": datetime(2025, 1, 1, tzinfo=timezone.utc), "interval_hint": 60}


def sample_request():
    import nexo_poller as nx
    return nx.build_tick_request(**SAMPLE)


def sample_envelope() -> dict:
    """The JSON envelope of the sample tick, as forward_tick sends it."""
    return sample_request().envelope()


def call_worker(name: str, args: dict, timeout: float, python: str | None = None,
                script: str | None = None) -> dict:
    """Run a worker in a fresh process and return its RESULT."""
    cmd = [python or sys.executable, script or os.path.abspath(__file__), name, json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}{proc.stdout[-1000:]}")


def throughput(call, inflight: list[int], warm_secs: float, secs: float, rounds: int,
               pids: list[int] | None = None) -> dict:
    """Median rate over ``rounds`` runs of ``secs`` for each in-flight count;
    with ``pids``, also the CPU time per call over all rounds of this process
    (``cpu_us``) and of those processes (``peer_cpu_us``): a figure the
    machine's other load sways far less than a rate."""
    out = {}
    for k in inflight:
        run_for(call, k, warm_secs)
        cpu0, peer0 = _cpu_secs(), sum(map(_proc_cpu_secs, pids or ()))
        runs = [run_for(call, k, secs) for _ in range(rounds)]
        cpu, peer = _cpu_secs() - cpu0, sum(map(_proc_cpu_secs, pids or ())) - peer0
        calls = sum(r["count"] for r in runs) or 1
        runs.sort(key=lambda r: r["rate"])
        mid = runs[len(runs) // 2]
        out[str(k)] = {"rate": mid["rate"], "rates": [r["rate"] for r in runs],
                       "lat_us": mid["lat_us"]}
        if pids:
            out[str(k)].update(cpu_us=cpu / calls * 1e6, peer_cpu_us=peer / calls * 1e6)
    return out


def _cpu_secs() -> float:
    t = os.times()
    return t.user + t.system


def _proc_cpu_secs(pid: int) -> float:
    """utime + stime of another process, all its threads (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------- figures 1-2: the broker

def bench_handle(procs: int = 1):
    import nexo_poller as nx
    return nx.PluginPollerHandle(
        plugin_id="bench", kinds=("bench",), broker_topic_prefix="bench.noop",
        max_concurrent_ticks=64, tick_timeout=30, entrypoint_command=sys.executable,
        entrypoint_args=(PLUGIN, "bench"))


def wait_subscriptions(server, want: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.stats()["subscriptions"] < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {server.stats()['subscriptions']} of {want} plugin "
                               "processes subscribed")
        time.sleep(0.02)


def measure_path(call, a: dict, pids: list[int] | None = None) -> dict:
    """Round trips interleaved with the floor (when ``rounds``), then system
    calls per round trip of both (when ``syscalls``: strace attached to this
    process and ``pids``, the floor's to this process and its echo server),
    throughput (when ``inflight``)."""
    out = {}
    if a.get("rounds_rt"):
        floor = floor_call(a["echo"], sample_envelope())
        try:
            lat = interleaved({"floor": floor, "path": call}, a["warm"], a["rounds_rt"],
                              a["block"])
            if a.get("syscalls"):
                out["syscalls"] = count_syscalls([os.getpid(), *pids], call, a["syscalls"])
                out["floor_syscalls"] = count_syscalls([os.getpid(), floor.peer_pid], floor,
                                                       a["syscalls"])
        finally:
            floor.close()
        out["latency"], out["floor"] = lat["path"], lat["floor"]
    if a.get("inflight"):
        out["throughput"] = throughput(call, a["inflight"], a["warm_secs"], a["secs"],
                                       a["rounds"], pids)
    return out


def w_broker(a: dict) -> dict:
    """A BrokerServer with ``procs`` plugin processes (one queue group): the
    daemon's path measured here, the external path in a client process."""
    import nexo_poller as nx
    procs = a["procs"]
    server = nx.BrokerServer().start()
    handle = bench_handle(procs)
    sups = [nx.PluginSupervisor(handle, server.url, backoff_initial=0.2).start()
            for _ in range(procs)]
    client = None
    try:
        wait_subscriptions(server, procs)
        client = server.client()
        request = sample_request()

        def call():
            return nx.forward_tick(client, handle, request)
        assert call().to_dict() == {}, "the no-op plugin should answer an empty reply"
        plugin_pids = [s.proc.pid for s in sups if s.proc is not None]
        out = {"daemon": measure_path(call, a, plugin_pids)}
        if a.get("external"):
            out["external"] = call_worker("broker-client", dict(a, url=server.url,
                                                                plugin_pids=plugin_pids),
                                          timeout=a.get("timeout", 600))
        out["plugin_pids"] = plugin_pids
        return out
    finally:
        if client is not None:
            client.close()
        for s in sups:
            s.stop()
        server.close()


def w_stdio(a: dict) -> dict:
    """The stdio lifecycle's round trip (JSON-RPC lines on the plugin's
    stdin/stdout) side by side with the Unix-socket broker path and the
    floor; then its throughput with ``inflight`` ticks in flight."""
    import nexo_poller as nx
    server = nx.BrokerServer().start()
    broker_handle = bench_handle()
    stdio_handle = nx.PluginPollerHandle(
        plugin_id="bench-stdio", kinds=("bench",), broker_topic_prefix="bench.stdio",
        lifecycle="stdio", max_concurrent_ticks=64, tick_timeout=30,
        entrypoint_command=sys.executable, entrypoint_args=(PLUGIN, "bench"))
    sups = [nx.PluginSupervisor(broker_handle, server.url, backoff_initial=0.2).start(),
            nx.PluginSupervisor(stdio_handle, "", backoff_initial=0.2).start()]
    client = floor = None
    try:
        wait_subscriptions(server, 1)
        client = server.client()
        request = sample_request()
        params = request.to_dict()

        def stdio():
            return nx._parse_reply_envelope(
                nx._stdio_of(stdio_handle).call("poll_tick", params, 30.0, None),
                request.job_id)

        def broker():
            return nx.forward_tick(client, broker_handle, request)
        assert stdio().to_dict() == {} == broker().to_dict()
        floor = floor_call(a["echo"], sample_envelope())
        lat = interleaved({"floor": floor, "stdio": stdio, "broker": broker}, a["warm"],
                          a["rounds_rt"], a["block"])
        return {"latency": lat, "throughput": throughput(
            stdio, a["inflight"], a["warm_secs"], a["secs"], a["rounds"])}
    finally:
        if floor is not None:
            floor.close()
        if client is not None:
            client.close()
        for sup in sups:
            sup.stop()
        server.close()


def w_daemon_nats(a: dict) -> dict:
    """The daemon's tick path (forward_tick through its client to one
    supervised SDK plugin) over NATS and over the embedded Unix-socket
    broker, side by side with the floor; then both with 64 in flight."""
    import nexo_poller as nx
    server = nx.BrokerServer().start()
    unix_handle = bench_handle()
    nats_handle = nx.PluginPollerHandle(
        plugin_id="bench-nats", kinds=("bench",), broker_topic_prefix="bench.nats",
        max_concurrent_ticks=64, tick_timeout=30, entrypoint_command=sys.executable,
        entrypoint_args=(PLUGIN, "bench"))
    sups = [nx.PluginSupervisor(unix_handle, server.url, backoff_initial=0.2).start(),
            nx.PluginSupervisor(nats_handle, a["url"], backoff_initial=0.2).start()]
    local = nats = floor = None
    try:
        wait_subscriptions(server, 1)
        local = server.client()
        nats = nx.connect_broker(a["url"])
        request = sample_request()

        def over_unix():
            return nx.forward_tick(local, unix_handle, request)

        def over_nats():
            return nx.forward_tick(nats, nats_handle, request)
        assert over_unix().to_dict() == {} == over_nats().to_dict()
        floor = floor_call(a["echo"], sample_envelope())
        lat = interleaved({"floor": floor, "nats": over_nats, "unix": over_unix}, a["warm"],
                          a["rounds_rt"], a["block"])
        return {"latency": lat,
                "nats": throughput(over_nats, a["inflight"], a["warm_secs"], a["secs"],
                                   a["rounds"]),
                "unix": throughput(over_unix, a["inflight"], a["warm_secs"], a["secs"],
                                   a["rounds"])}
    finally:
        if floor is not None:
            floor.close()
        for client in (local, nats):
            if client is not None:
                client.close()
        for sup in sups:
            sup.stop()
        server.close()


def w_broker_client(a: dict) -> dict:
    """The external path: a BrokerClient in its own process, over the socket."""
    import nexo_poller as nx
    handle = bench_handle()
    request = sample_request()
    with nx.BrokerClient.connect(a["url"]) as bc:
        def call():
            return nx.forward_tick(bc, handle, request)
        return measure_path(call, a, [peer_pid(bc._sock), *a.get("plugin_pids", ())])


def w_nats_client(a: dict) -> dict:
    """Figure 8: this module's NatsClient asking nats-py responders (started
    with the peer's Python), as nats-py's own client does in peer_nats.py."""
    import nexo_poller as nx
    p = subprocess.Popen([a["peer_python"], a["peer_script"], "responder", a["url"],
                          a["subject"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("the nats-py responder did not start")
        with nx.NatsClient.connect(a["url"], nexo_envelopes=False) as nc:
            envelope = sample_envelope()

            def call():
                return nc.request(a["subject"], envelope, 10)
            assert "result" in call(), "the responder should answer a JSON-RPC result"
            return measure_path(call, a)
    finally:
        p.kill()
        p.wait()


# ------------------------------------------------------- figure 3: ephemeral ticks

def w_ephemeral(a: dict) -> dict:
    """spawn_ephemeral_tick vs subprocess.run of the same child, same input."""
    import nexo_poller as nx
    request = sample_request()
    payload = (json.dumps(request.envelope(1), separators=(",", ":")) + "\n").encode()
    env = dict(os.environ, NEXO_POLLER_PLUGIN_ID="bench", NEXO_POLLER_EPHEMERAL="1")
    reply = '{"jsonrpc":"2.0","id":1,"result":{}}'
    children = {
        "python": (sys.executable, [PLUGIN, "bench"]),
        "sh": ("/bin/sh", ["-c", f"read line; echo '{reply}'"]),
    }
    out = {}
    for name, (cmd, args) in children.items():
        n = a["n"][name]

        def eph():
            ack = nx.spawn_ephemeral_tick(cmd, "bench", request, 30, args=args)
            assert ack == nx.TickAck()

        def run():
            r = subprocess.run([cmd, *args], input=payload, capture_output=True, env=env,
                               timeout=30)
            env_ = json.loads(r.stdout.split(b"\n", 1)[0])
            assert env_["result"] == {}, env_

        for _ in range(a["warm"]):
            eph()
            run()
        te, tr = [], []
        pc = time.perf_counter
        for i in range(n):                  # interleaved, alternating which goes first
            for fn, sink in ((eph, te), (run, tr)) if i % 2 == 0 else ((run, tr), (eph, te)):
                t0 = pc()
                fn()
                sink.append((pc() - t0) * 1e3)
        out[name] = {"ephemeral_ms": summary(te), "subprocess_ms": summary(tr)}
    return out


# --------------------------------------------------------- figure 4: the scheduler

class _PlannedJitter:
    """The Runner's rng, planned: the first ``len(plan)`` jitters drawn (one per
    job, in config order, all at start()) come from ``plan``; the clock value
    in force at the first draw is start()'s ``now``.  Later draws are random.

    ``origin``: the plan counts from this wall time instead of start()'s
    ``now`` (the start-up case: slots from the moment the load began); a
    slot already past at start() is drawn as 0, which puts it at ``now``."""

    def __init__(self, plan: list[float], clock_box: list, origin: float | None = None) -> None:
        self.plan, self.i, self.box, self.origin = plan, 0, clock_box, origin
        self.real = random.Random(1)
        self.base: float | None = None

    def uniform(self, low: float, high: float) -> float:
        if self.i < len(self.plan):
            if self.base is None:
                self.base = self.box[0]
            v = self.plan[self.i]
            if self.origin is not None:
                v -= self.base - self.origin
            self.i += 1
            return min(max(v, low), high)
        return self.real.uniform(low, high)


def w_sched(a: dict) -> dict:
    """``n`` every-60-s jobs on a no-op in-process poller with sqlite state.

    steady: first runs are spread evenly over ``spread`` seconds, starting
    ``lead`` seconds after start()'s ``now`` (the jobs' stagger jitter, drawn
    by a planned rng so each job's intended slot is known): with a lead past
    the load, no slot falls due while start() runs, and ticks are observed
    for ``window`` seconds from the first slot.  startup: the same spread,
    counted from the moment the load begins (config_from_dict), so the slots
    of the first seconds fall due while the Runner loads; every slot due up
    to ``window`` seconds after start() returned is observed.  burst: every
    job is due at once; the figure is how fast the runner drains them.
    """
    import nexo_poller as nx
    n, mode = a["n"], a["mode"]
    spread = a.get("spread", 60.0) if mode != "burst" else 0.0
    lead = a.get("lead", 0.0) if mode == "steady" else 0.0
    tmp = tempfile.mkdtemp(prefix="nexo-bench-sched-")
    db = os.path.join(tmp, "state.db")
    jitter_ms = int((lead + spread) * 1000)
    doc = {"state_db": db, "default_jitter_ms": 0,
           "jobs": [{"id": f"j{i}", "kind": "noop",
                     "schedule": {"every_secs": 60, "stagger_jitter_ms": jitter_ms}}
                    for i in range(n)]}
    order = list(range(n))
    random.Random(7).shuffle(order)
    plan = [lead + order[i] * spread / n for i in range(n)]
    box = [0.0]

    def clock() -> float:
        t = time.time()
        box[0] = t
        return t
    fired: list = []
    done_evt = threading.Event()

    class Noop:
        kind = "noop"

        def tick(self, ctx):
            fired.append((ctx.job_id, time.time(), ctx.now.timestamp()))
            if mode == "burst" and len(fired) >= n:
                done_evt.set()
            return None

    gc.collect()
    origin = time.time()
    rng = _PlannedJitter(plan, box, origin if mode == "startup" else None)
    t0 = time.perf_counter()
    cfg = nx.config_from_dict(doc, extra_kinds=["noop"])
    del doc                             # as the daemon drops the file it has read
    t1 = time.perf_counter()
    runner = nx.Runner(cfg, clock=clock, rng=rng)
    runner.register(Noop())
    runner.open()
    t2 = time.perf_counter()
    runner.start()
    t3 = time.perf_counter()
    ready, cpu0 = time.time(), os.times()
    if mode != "burst" and rng.i != n:
        raise RuntimeError(f"Runner.start() drew {rng.i} jitters for {n} jobs; the bench "
                           "assumes one per job, in config order: update w_sched")
    base = rng.base if rng.base is not None else ready
    if mode == "startup":
        base = origin                   # the plan counts from the start of the load
    out = {"n": n, "mode": mode, "load_s": t3 - t0, "config_s": t1 - t0, "open_s": t2 - t1,
           "schedule_s": t3 - t2, "lead_s": lead}
    try:
        if mode == "burst":
            if not done_evt.wait(a.get("timeout", 300)):
                raise RuntimeError(f"only {len(fired)} of {n} ticks fired")
            if not runner.wait_idle(60):
                raise RuntimeError("ticks did not finish")
            end, cpu1 = time.time(), os.times()
            out["drain_s"] = end - base
            out["rate"] = n / (end - base)
            # the process's CPU over the drain, a tick (steadier than the rate for an A/B)
            out["cpu_us_per_tick"] = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / n * 1e6
        else:
            out.update(lateness(fired, base, plan, ready, a["window"], n / spread,
                                startup=mode == "startup", index=lambda j: int(j[1:])))
        out["vm"] = proc_status()
        if mode != "burst":
            out["slot_check"] = _check_slots(runner, base, plan, {f[0] for f in fired})
    finally:
        t_stop = time.time()
        runner.stop()
    total = len(fired)
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(*) FROM jobs WHERE last_status='ok' "
                              "AND last_run_at IS NOT NULL").fetchone()[0]
        sync = conn.execute("PRAGMA synchronous").fetchone()[0]
        rows = dict((r[0], r[1:]) for r in conn.execute(
            "SELECT id, last_status, last_error FROM jobs WHERE last_run_at IS NOT NULL"))
    # ticks whose poller ran but whose outcome is not in the state, and when
    lost = [(job_id, round(t_fire - t_stop, 4)) for job_id, t_fire, _ in fired
            if rows.get(job_id, (None,))[0] != "ok"]
    out.update(fired_total=total, distinct_jobs=len({f[0] for f in fired}), durable=stored,
               synchronous=sync, lost=lost[:20], lost_count=len(lost),
               lost_before_stop=sum(1 for _, dt in lost if dt < 0))
    for name in os.listdir(tmp):
        os.unlink(os.path.join(tmp, name))
    os.rmdir(tmp)
    return out


def _check_slots(runner, base: float, plan: list[float], fired: set) -> dict:
    """Cross-check the planned slots against the Runner's own view: a job that
    has not fired yet reports next_run_at == start's now + its jitter."""
    worst, checked = 0.0, 0
    for st in runner.status():
        if st["id"] in fired or st["next_run_at"] is None:
            continue
        want = base + plan[int(st["id"][1:])]
        got = datetime.fromisoformat(st["next_run_at"]).timestamp()
        worst = max(worst, abs(got - want))
        checked += 1
    if checked and worst > 0.001:
        raise RuntimeError(f"planned slots are off by up to {worst * 1e3:.1f} ms from the "
                           "Runner's next_run_at: the lateness figure would be wrong")
    return {"checked": checked, "worst_ms": worst * 1e3}


# ----------------------------------------------------------- figure 5: the router

def w_router(a: dict) -> dict:
    import nexo_poller as nx
    out = {}
    rng = random.Random(3)
    for n in a["sizes"]:
        router = nx.PluginPollerRouter()
        for i in range(n):
            router.register(nx.PluginPollerHandle(f"plugin{i}", (f"kind_{i}",), f"p.{i}"))
        kinds = [f"kind_{i}" for i in range(n)]
        probe = [rng.choice(kinds) for _ in range(a["probe"])]
        plain = {k: router.handle_for_kind(k) for k in kinds}
        lookup, get = router.handle_for_kind, plain.get

        def run_router():
            t0 = time.perf_counter_ns()
            for k in probe:
                lookup(k)
            return (time.perf_counter_ns() - t0) / len(probe)

        def run_dict():
            t0 = time.perf_counter_ns()
            for k in probe:
                get(k)
            return (time.perf_counter_ns() - t0) / len(probe)

        for _ in range(3):
            run_router()
            run_dict()
        r, d = [], []
        for _ in range(a["repeats"]):
            r.append(run_router())
            d.append(run_dict())
        assert router.handle_for_kind(kinds[-1]).plugin_id == f"plugin{n - 1}"
        out[str(n)] = {"router_ns": summary(r), "dict_ns": summary(d), "plugins": len(router)}
    return out


# ------------------------------------------------------------ figure 7: memory

MANIFEST = """[plugin]
id = "{id}"
version = "0.1.0"

[plugin.entrypoint]
command = "{python}"
args = ["{plugin}", "{kind}"]

[plugin.poller]
kinds = ["{kind}"]
broker_topic_prefix = "bench.{id}"
lifecycle = "long_lived"
max_concurrent_ticks = 4
tick_timeout_secs = 30
"""


def w_memory_idle(a: dict) -> dict:
    """RSS of a daemon with ``jobs`` jobs over ``plugins`` long-lived plugins,
    idle after every job's first tick."""
    import nexo_poller as nx
    base = proc_status()
    tmp = tempfile.mkdtemp(prefix="nexo-bench-mem-")
    plugins = []
    for i in range(a["plugins"]):
        folder = os.path.join(tmp, f"p{i}")
        os.makedirs(folder)
        with open(os.path.join(folder, "nexo-plugin.toml"), "w") as fh:
            fh.write(MANIFEST.format(id=f"p{i}", python=sys.executable, plugin=PLUGIN,
                                     kind=f"kind_{i}"))
        plugins.append(folder)
    doc = {"state_db": os.path.join(tmp, "state.db"), "default_jitter_ms": 0,
           "plugins": plugins, "metrics_addr": "127.0.0.1:0",
           "jobs": [{"id": f"j{i}", "kind": f"kind_{i % a['plugins']}",
                     "schedule": {"every_secs": 3600}} for i in range(a["jobs"])]}
    cfg = nx.config_from_dict(doc, base_dir=tmp)
    runner = nx.Runner(cfg).start()
    try:
        deadline = time.monotonic() + a.get("timeout", 120)
        while True:
            ok = sum(1 for s in runner.status() if s["last_status"] == "ok")
            if ok >= a["jobs"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {ok} of {a['jobs']} first ticks stored")
            time.sleep(0.1)
        runner.wait_idle(30)
        gc.collect()
        time.sleep(1.0)                 # the running set is published, then all sleep
        pids = [os.getpid(), *children_of(os.getpid())]
        me_tid = str(threading.get_native_id())     # this thread's own sleep is not the daemon's
        before = {pid: context_switches(pid, skip=me_tid) for pid in pids}
        idle = a.get("idle", 2.0)
        time.sleep(idle)
        after = {pid: context_switches(pid, skip=me_tid) for pid in pids}
        wakeups = {pid: (after[pid] - before[pid]) / idle for pid in pids}
        me = proc_status()
        kids = [proc_status(pid) for pid in children_of(os.getpid())]
        kids = [k for k in kids if k]
        threads = threading.active_count()
    finally:
        runner.stop()
    shutil.rmtree(tmp)
    return {"import_only": base, "daemon": me, "plugins": kids, "threads": threads,
            "wakeups_per_s": {"daemon": wakeups[os.getpid()],
                              "plugins": sum(v for k, v in wakeups.items() if k != os.getpid())}}


def context_switches(pid: int, skip: str = "", voluntary_only: bool = False) -> int:
    """Context switches so far of every thread of ``pid`` but ``skip`` (a
    thread asleep without a timeout adds none); ``voluntary_only``: only the
    waits, not the preemptions."""
    wanted = (("voluntary_ctxt_switches:",) if voluntary_only else
              ("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"))
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        if tid == skip:
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith(wanted))
        except FileNotFoundError:
            pass                                   # a thread that just ended
    return total


def w_memory_churn(a: dict) -> dict:
    """tracemalloc over steady-state ticks: the scheduler's own loop (in-process
    poller, sqlite commit), Runner.run_once, and the broker path (forward_tick
    from the daemon's client to a plugin process)."""
    import nexo_poller as nx
    import tracemalloc
    out = {}
    counter = [0]

    class Noop:
        kind = "noop"

        def tick(self, ctx):
            counter[0] += 1
            return nx.TickAck(next_cursor=b"c%d" % counter[0], metrics=nx.TickMetrics(1, 1))

    def runner_for(every: float, jobs: int):
        tmp = tempfile.mkdtemp(prefix="nexo-bench-churn-")
        doc = {"state_db": os.path.join(tmp, "state.db"), "default_jitter_ms": 0,
               "jobs": [{"id": f"j{i}", "kind": "noop", "schedule": {"every_secs": every}}
                        for i in range(jobs)]}
        runner = nx.Runner(nx.config_from_dict(doc, extra_kinds=["noop"]))
        runner.register(Noop())
        return runner, tmp

    def cleanup(tmp):
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)

    # 1. the scheduler, as it runs: jobs every `every` seconds, time-based
    runner, tmp = runner_for(a["every"], a["jobs"])
    try:
        runner.start()
        time.sleep(a["warm_secs"])
        tracemalloc.start(10)
        time.sleep(a["settle_secs"])
        samples = _Samples(int(a["secs"] / 0.01) + 10)
        gc.collect()
        s1, c1 = tracemalloc.take_snapshot(), counter[0]
        cur1, _ = tracemalloc.get_traced_memory()
        samples.add(c1, cur1)
        tracemalloc.reset_peak()
        end = time.monotonic() + a["secs"]
        while time.monotonic() < end:
            time.sleep(0.01)
            samples.add(counter[0], tracemalloc.get_traced_memory()[0])
        gc.collect()
        cur2, peak = tracemalloc.get_traced_memory()
        s2, c2 = tracemalloc.take_snapshot(), counter[0]
        tracemalloc.stop()
        out["scheduled"] = _diff(s1, s2, cur1, cur2, peak, c2 - c1, a["secs"], samples)
    finally:
        runner.stop()
        cleanup(tmp)

    # 2. Runner.run_once, count-based
    runner, tmp = runner_for(3600, a["jobs"])
    try:
        runner.open()
        ids = [f"j{i}" for i in range(a["jobs"])]
        it = [0]

        def tick_runner():
            it[0] += 1
            o = runner.run_once(ids[it[0] % len(ids)])
            assert o.status == "ok", o
        out["run_once"] = _churn(tick_runner, a["warm"], a["ticks"], lambda: counter[0])
    finally:
        runner.stop()
        cleanup(tmp)

    # 3. the broker path: forward_tick from the daemon's own client
    server = nx.BrokerServer().start()
    handle = bench_handle()
    sup = nx.PluginSupervisor(handle, server.url).start()
    client = server.client()
    request = sample_request()
    sent = [0]

    def tick_broker():
        nx.forward_tick(client, handle, request)
        sent[0] += 1
    try:
        wait_subscriptions(server, 1)
        out["broker"] = _churn(tick_broker, a["warm"], a["ticks"], lambda: sent[0])
    finally:
        client.close()
        sup.stop()
        server.close()
    return out


class _Samples:
    """(ticks done, traced bytes) pairs in arrays allocated before the window,
    so that taking samples allocates nothing the trace would count."""

    def __init__(self, cap: int) -> None:
        import array
        self.ticks, self.cur = array.array("q", [0]) * (cap + 1), array.array("q", [0]) * (cap + 1)
        self.n = 0

    def add(self, ticks: int, cur: int) -> None:
        if self.n < len(self.ticks):
            self.ticks[self.n], self.cur[self.n] = ticks, cur
            self.n += 1

    def pairs(self) -> list:
        return list(zip(self.ticks[:self.n], self.cur[:self.n]))


def _growth(samples: list) -> float | None:
    """Bytes per tick by which the traced high-water mark of the second half
    of the window exceeds the first half's.  ``samples`` are (ticks done,
    traced bytes) taken all through the window.  A leak raises the second
    half's peak by its rate times the ticks in between; a bounded structure
    that fills and is trimmed (the timer heap, compacted when stale entries
    reach 2 x jobs + 1,024) peaks as high in both halves, so it cancels out
    instead of counting at whatever phase the window happens to end on."""
    if len(samples) < 4:
        return None
    mid = len(samples) // 2
    first, second = samples[:mid], samples[mid:]
    ticks = second[-1][0] - first[-1][0]
    return (max(c for _, c in second) - max(c for _, c in first)) / max(1, ticks)


def _diff(s1, s2, cur1, cur2, peak, done, elapsed,
          samples: "_Samples | None" = None) -> dict:
    top = []
    for st in s2.compare_to(s1, "lineno")[:5]:
        frame = st.traceback[0]
        top.append({"where": f"{os.path.basename(frame.filename)}:{frame.lineno}",
                    "size_diff": st.size_diff, "count_diff": st.count_diff})
    endpoint = (cur2 - cur1) / max(1, done)
    pairs = samples.pairs() if samples is not None else []
    growth = _growth(pairs)
    return {"ticks": done, "retained_per_tick": endpoint if growth is None else growth,
            "endpoint_per_tick": endpoint, "high_water_growth_per_tick": growth,
            "samples": len(pairs),
            "retained_total": cur2 - cur1, "transient_peak": peak - cur1,
            "traced_rate": done / elapsed, "top": top}


def _churn(tick, warm_ticks: int, ticks: int, count) -> dict:
    """Growth per tick over ``ticks`` steady-state ticks (see _growth), and the
    bytes still allocated at the end over those at the start."""
    import tracemalloc
    for _ in range(warm_ticks):
        tick()
    tracemalloc.start(10)
    for _ in range(max(1, warm_ticks // 10)):
        tick()
    samples = _Samples(ticks // 10 + 1)
    gc.collect()
    s1, c1 = tracemalloc.take_snapshot(), count()
    cur1, _ = tracemalloc.get_traced_memory()
    samples.add(c1, cur1)
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    for i in range(1, ticks + 1):
        tick()
        if i % 10 == 0:
            samples.add(count(), tracemalloc.get_traced_memory()[0])
    elapsed = time.perf_counter() - t0
    gc.collect()
    cur2, peak = tracemalloc.get_traced_memory()
    s2, c2 = tracemalloc.take_snapshot(), count()
    tracemalloc.stop()
    return _diff(s1, s2, cur1, cur2, peak, c2 - c1, elapsed, samples)


# ------------------------------------------- figure 11: the Runner with one plugin

def w_runner_plugin(a: dict) -> dict:
    """A daemon (Runner, sqlite state, synchronous FULL) with ``jobs`` jobs on
    one supervised long-lived SDK plugin over the Unix-socket broker, at a
    demand of ``demand`` ticks/s (every job every ``jobs / demand`` s, slots
    spread evenly: each job's first slot is stored before start).

    Observed for ``secs`` after ``warm_secs``: ticks started and stored per
    second, firing lateness (a tick's start in the Runner minus its slot),
    every commit transaction's size and time, each commit's latency (queued
    to stored), and how long ``status()`` and a signal take to be answered
    meanwhile (a thread asks every second: status() of 10,000 jobs is not free)."""
    import signal
    import nexo_poller as nx
    demand, jobs = a["demand"], a["jobs"]
    every = jobs / demand
    tmp = tempfile.mkdtemp(prefix="nexo-bench-runner-")
    folder = os.path.join(tmp, "p0")
    os.makedirs(folder)
    with open(os.path.join(folder, "nexo-plugin.toml"), "w") as fh:
        fh.write(MANIFEST.replace("max_concurrent_ticks = 4",
                                  f"max_concurrent_ticks = {a['inflight']}").format(
            id="p0", python=sys.executable, plugin=PLUGIN, kind="bench"))
    doc = {"state_db": os.path.join(tmp, "state.db"), "default_jitter_ms": 0,
           "run_history": a.get("run_history", nx.RUN_HISTORY_KEEP),
           "plugins": [folder],
           "jobs": [{"id": f"j{i}", "kind": "bench", "schedule": {"every_secs": every}}
                    for i in range(jobs)]}
    cfg = nx.config_from_dict(doc, base_dir=tmp)
    pc = time.perf_counter
    window = {"on": False}
    late: list = []
    stored = [0]
    batches: list = []
    commit_lat: list = []

    runner = nx.Runner(cfg)
    # Observed from inside (a benchmark may): the workers' tick and the
    # store's done callback, wrapped where the Runner's collaborators call them.
    ticks, workers = runner._ticks, runner._workers
    real_tick, real_committed = workers._tick, ticks._committed

    def observed_tick(job, slot, **kw):
        if slot is not None and window["on"]:
            late.append(time.time() - job.next_run_at)
        return real_tick(job, slot, **kw)

    def observed_committed(*args):
        if window["on"]:
            stored[0] += 1
        return real_committed(*args)
    workers._tick, ticks._committed = observed_tick, observed_committed
    runner.open()
    st = runner.state
    # Every job's first slot, stored: spread evenly over one interval.
    key = {jc.id: nx._schedule_key(jc) for jc in cfg.jobs}
    base = time.time() + a.get("lead_secs", 2.0)
    granted = st.claim({f"j{i}": base + 3600 for i in range(jobs)}, time.time())
    left = [jobs]
    all_in = threading.Event()

    def one_in(result):
        left[0] -= 1
        if left[0] == 0:
            all_in.set()
    for i in range(jobs):
        s = granted[f"j{i}"]
        st.commit(s.replace(next_run_at=base + i * every / jobs, schedule_key=key[s.id]),
                  one_in)
    all_in.wait(120)

    write_batch, commit = st.file.write_batch, st.commit

    def timed_batch(batch, *args, **kw):
        t = pc()
        try:
            return write_batch(batch, *args, **kw)
        finally:
            if window["on"]:
                batches.append((len(batch), pc() - t))

    def timed_commit(state, done=None, **kw):
        t = pc()

        def done_timed(result):
            if window["on"]:
                commit_lat.append(pc() - t)
            if done is not None:
                done(result)
        return commit(state, done_timed, **kw)
    st.file.write_batch, st.commit = timed_batch, timed_commit

    status_s: list = []
    signal_s: list = []
    sent = [0.0]
    signal.signal(signal.SIGUSR1, lambda *_: signal_s.append(pc() - sent[0]))
    stop_probe = threading.Event()

    def probe():
        while not stop_probe.wait(1.0):
            t = pc()
            runner.status()
            status_s.append(pc() - t)
            sent[0] = pc()
            os.kill(os.getpid(), signal.SIGUSR1)    # answered in the main thread
    def switches() -> int:
        return context_switches(os.getpid(), voluntary_only=True)
    cpu0 = None
    try:
        runner.start()
        wait = base - time.time()
        if wait > 0:
            time.sleep(wait)
        time.sleep(a["warm_secs"])
        threading.Thread(target=probe, daemon=True).start()
        cpu0, sw0 = os.times(), switches()
        window["on"] = True
        t0 = pc()
        end = t0 + a["secs"]
        while pc() < end:
            time.sleep(0.05)                         # the main thread answers signals here
        window["on"] = False
        elapsed = pc() - t0
        cpu1, sw1 = os.times(), switches()
        stop_probe.set()
        backlog = sum(1 for s in runner.status() if s["running"])
    finally:
        t_stop = pc()
        runner.stop()
        stop_secs = pc() - t_stop
    shutil.rmtree(tmp)
    half = len(late) // 2
    ms = [x * 1e3 for x in late]
    return {"demand": demand, "jobs": jobs, "every_secs": every, "secs": elapsed,
            "started_rate": len(late) / elapsed, "done_rate": stored[0] / elapsed,
            "lateness_ms": summary(ms),
            "lateness_ms_first_half": summary(ms[:half]),
            "lateness_ms_second_half": summary(ms[half:]),
            "commit_batch": summary([b for b, _ in batches]),
            "commit_txn_ms": summary([t * 1e3 for _, t in batches]),
            "commit_latency_ms": summary([t * 1e3 for t in commit_lat]),
            "status_ms": summary([t * 1e3 for t in status_s]),
            "signal_ms": summary([t * 1e3 for t in signal_s]),
            "daemon_cpu_us_per_tick": ((cpu1.user + cpu1.system - cpu0.user - cpu0.system)
                                       / max(1, stored[0]) * 1e6),
            "switches_per_tick": (sw1 - sw0) / max(1, stored[0]),
            "running_at_end": backlog, "stop_secs": stop_secs}


WORKERS = {"broker": w_broker, "stdio": w_stdio, "daemon-nats": w_daemon_nats, "broker-client": w_broker_client, "nats-client": w_nats_client,
           "ephemeral": w_ephemeral, "sched": w_sched, "router": w_router,
           "memory-idle": w_memory_idle, "memory-churn": w_memory_churn,
           "runner-plugin": w_runner_plugin}

if __name__ == "__main__":
    emit(WORKERS[sys.argv[1]](json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}))
