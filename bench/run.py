#!/usr/bin/env python3
"""nexo-poller benchmark suite: the hot paths against their floors and peers.

    python bench/run.py                 # everything (several minutes)
    python bench/run.py --smoke         # tiny sizes, no peers, < 60 s (CI)
    python bench/run.py --only 1,2      # some figures
    python bench/run.py --json out.json # where the figures go (bench/results.json)

Every row is one figure, the floor or peer it is compared with (measured in
the same run), their ratio, the target and whether it is met.  Each
measurement runs in a fresh process (bench/workers.py), after a warm-up.
Latencies are medians (p50) and nearest-rank p99s.

Peers (APScheduler 3.x, nats-py, nats-server) are benchmark-only: they are
installed into a throwaway virtual environment, bench/.venv, and nats-server
from the system's package manager when it is missing; a peer that cannot be
had is skipped with a note.  Nothing here or in the workers that import
nexo_poller uses anything outside the standard library.

Exit status: 0 when every figure ran (met or missed), 1 when one crashed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import py_compile
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BENCH_DIR, REPO, start_echo, summary  # noqa: E402
import workers  # noqa: E402

VENV = os.path.join(BENCH_DIR, ".venv")
VENV_PY = os.path.join(VENV, "bin", "python")
PEER_NATS = os.path.join(BENCH_DIR, "peer_nats.py")
PEER_APS = os.path.join(BENCH_DIR, "peer_aps.py")

# Sizes: the full run, and the smoke run CI uses to check the suite still works.
FULL = {
    "rt": {"warm": 1000, "rounds_rt": 10, "block": 1000},
    "sys": 2000,                 # round trips counted under strace per path
    "tp": {"inflight": [1, 8, 64], "warm_secs": 0.5, "secs": 2.0, "rounds": 3,
           "procs": [1, 4]},
    "eph": {"n": {"python": 40, "sh": 300}, "warm": 3},
    "sched": {"sizes": [10_000, 100_000], "window": 20.0, "spread": 60.0},
    "router": {"sizes": [10, 10_000], "probe": 100_000, "repeats": 31},
    "startup": {"n": 30, "warm": 3, "compiles": 7},
    "mem": {"jobs": 1000, "plugins": 10, "idle": 2.0,
            "churn": {"jobs": 20, "every": 0.02, "warm_secs": 3.0, "settle_secs": 1.0,
                      "secs": 6.0, "warm": 1000, "ticks": 5000}},
    # Warm-up: under 2x overload the queue takes a few intervals to settle.
    "runner": {"demands": [1000, 2000, 2500, 3000, 5000], "interval": 2.0, "inflight": 8,
               "warm_secs": 10.0, "secs": 6.0},
}
SMOKE = {
    "rt": {"warm": 20, "rounds_rt": 2, "block": 100},
    "sys": 100,
    "tp": {"inflight": [1, 8], "warm_secs": 0.05, "secs": 0.2, "rounds": 1, "procs": [1, 2]},
    "eph": {"n": {"python": 2, "sh": 5}, "warm": 1},
    "sched": {"sizes": [500], "window": 2.0, "spread": 60.0},
    "router": {"sizes": [10, 1000], "probe": 10_000, "repeats": 5},
    "startup": {"n": 3, "warm": 1, "compiles": 2},
    "mem": {"jobs": 40, "plugins": 2, "idle": 0.2,
            "churn": {"jobs": 5, "every": 0.05, "warm_secs": 0.5, "settle_secs": 0.2,
                      "secs": 0.5, "warm": 50, "ticks": 200}},
    "runner": {"demands": [200, 400], "interval": 1.0, "inflight": 8,
               "warm_secs": 0.5, "secs": 1.0},
}


# ------------------------------------------------------------------------ rows

def row(figure: str, name: str, value, unit: str, baseline_name: str | None = None,
        baseline_value=None, *, target: str = "-", met: bool | None = None,
        ratio: float | None = None, p99=None, baseline_p99=None, notes: str = "") -> dict:
    num = (int, float)
    if ratio is None and isinstance(value, num) and isinstance(baseline_value, num) \
            and baseline_value:
        ratio = value / baseline_value
    return {"figure": figure, "name": name, "value": value, "p99": p99, "unit": unit,
            "baseline_name": baseline_name, "baseline_value": baseline_value,
            "baseline_p99": baseline_p99, "ratio": ratio, "target": target, "met": met,
            "notes": notes}


# ----------------------------------------------------------------------- peers

class Peers:
    """The benchmark-only peers, set up on first use; each may be missing."""

    def __init__(self, enabled: bool, log) -> None:
        self.enabled, self.log = enabled, log
        self._venv: tuple[bool, bool, str] | None = None
        self._nats_url: str | None = None
        self._nats_note: str | None = None
        self._nats_proc: subprocess.Popen | None = None
        self.versions: dict = {}

    def venv(self) -> tuple[bool, bool, str]:
        """(apscheduler ok, nats-py ok, note)."""
        if self._venv is not None:
            return self._venv
        if not self.enabled:
            self._venv = (False, False, "peers disabled (--smoke or --no-peers)")
            return self._venv
        probe = ("import importlib.metadata as m\nfor d in ('apscheduler', 'nats-py'):\n"
                 "    try: print(d, m.version(d))\n    except Exception: print(d, '-')")

        def versions() -> dict:
            try:
                out = subprocess.run([VENV_PY, "-c", probe], capture_output=True, text=True,
                                     timeout=60).stdout
            except (OSError, subprocess.SubprocessError):
                return {}
            return {k: v for k, v in (line.split() for line in out.splitlines()) if v != "-"}
        have = versions() if os.path.exists(VENV_PY) else {}
        note = ""
        if not {"apscheduler", "nats-py"} <= set(have):
            self.log("peers: creating bench/.venv and installing apscheduler<4, nats-py ...")
            try:
                if not os.path.exists(VENV_PY):
                    subprocess.run([sys.executable, "-m", "venv", VENV], check=True,
                                   capture_output=True, timeout=300)
                r = subprocess.run([VENV_PY, "-m", "pip", "install", "-q", "apscheduler<4",
                                    "nats-py"], capture_output=True, text=True, timeout=600)
                if r.returncode:
                    note = "pip install failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
            except (OSError, subprocess.SubprocessError) as exc:
                note = f"cannot create bench/.venv: {exc}"
            have = versions()
        self.versions.update(have)
        aps, nats = "apscheduler" in have, "nats-py" in have
        if not (aps and nats) and not note:
            note = "missing in bench/.venv: " + ", ".join(
                d for d, ok in (("apscheduler", aps), ("nats-py", nats)) if not ok)
        self._venv = (aps, nats, note)
        return self._venv

    def aps(self) -> tuple[bool, str]:
        aps, _, note = self.venv()
        return aps, "" if aps else f"APScheduler peer skipped: {note}"

    def nats(self) -> tuple[str | None, str]:
        """The URL of a running local nats-server with nats-py usable, or a note."""
        if self._nats_url or self._nats_note:
            return self._nats_url, self._nats_note or ""
        _, nats_py, note = self.venv()
        if not nats_py:
            self._nats_note = f"nats-py peer skipped: {note}"
            return None, self._nats_note
        exe = shutil.which("nats-server")
        if exe is None and shutil.which("apt-get") and os.geteuid() == 0:
            self.log("peers: nats-server missing; apt-get install -y nats-server ...")
            try:
                subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
                subprocess.run(["apt-get", "install", "-y", "nats-server"], capture_output=True,
                               timeout=600, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            except (OSError, subprocess.SubprocessError):
                pass
            exe = shutil.which("nats-server")
        if exe is None:
            self._nats_note = ("nats-py peer skipped: nats-server is not installed and "
                               "could not be installed with apt-get")
            return None, self._nats_note
        try:
            v = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
            self.versions["nats-server"] = v.stdout.strip().split()[-1]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._nats_proc = subprocess.Popen([exe, "-a", "127.0.0.1", "-p", str(port)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                self._nats_url = f"nats://127.0.0.1:{port}"
                return self._nats_url, ""
            except OSError:
                time.sleep(0.05)
        self._nats_note = "nats-py peer skipped: nats-server did not start"
        return None, self._nats_note

    def close(self) -> None:
        if self._nats_proc is not None:
            self._nats_proc.terminate()
            try:
                self._nats_proc.wait(10)
            except subprocess.TimeoutExpired:
                self._nats_proc.kill()
                self._nats_proc.wait()


class Ctx:
    def __init__(self, sizes: dict, smoke: bool, peers: Peers, log) -> None:
        self.sizes, self.smoke, self.peers, self.log = sizes, smoke, peers, log
        self.raw: dict = {}          # every worker's full result, for the JSON file

    def timeout(self, full: float) -> float:
        """A worker's time limit: a hang in the smoke run fails fast."""
        return min(full, 45.0) if self.smoke else full


def _envelope_json() -> str:
    return json.dumps(workers.sample_envelope())


def _fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


# ------------------------------------------------------------ figure 1: latency

@contextlib.contextmanager
def echo_floor():
    """The floor's echo server for the length of a figure; yields its socket path."""
    tmp = tempfile.mkdtemp(prefix="nexo-bench-echo-")
    echo_path = os.path.join(tmp, "echo.sock")
    echo = start_echo(echo_path)
    try:
        yield echo_path
    finally:
        echo.kill()
        echo.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def fig1_round_trip(ctx: Ctx) -> list[dict]:
    """Long-lived tick round trip vs a bare JSON-line echo, both paths, and nats-py.

    Every measuring process times its own path and the floor side by side
    (blocks of round trips taking turns), so each ratio compares figures
    taken under the same conditions."""
    s = ctx.sizes["rt"]
    with echo_floor() as echo_path:
        args = dict(s, echo=echo_path)
        ctx.log("fig 1: daemon and external paths, each with the floor side by side ...")
        nx = workers.call_worker("broker", dict(args, procs=1, external=True,
                                                syscalls=ctx.sizes["sys"]),
                                 timeout=ctx.timeout(600))
        url, note = ctx.peers.nats()
        nats = None
        if url:
            ctx.log("fig 1: nats-py request/reply, with the floor side by side ...")
            nats = workers.call_worker("rt", dict(args, url=url, subject="bench.rt", procs=1,
                                                  envelope=_envelope_json()),
                                       timeout=ctx.timeout(600), python=VENV_PY,
                                       script=PEER_NATS)
    ctx.raw["fig1"] = {"broker": nx, "nats": nats}
    d, fd = nx["daemon"]["latency"], nx["daemon"]["floor"]
    e, fe = nx["external"]["latency"], nx["external"]["floor"]
    n_rt = (f"{d['n']:,} round trips per path, in {s['rounds_rt']} blocks taking turns "
            "with the floor")
    rows = [
        row("1", "floor: JSON-line echo between 2 processes, Unix socket", fd["p50"], "us",
            p99=fd["p99"], notes=n_rt),
        row("1", "daemon path: server.client() -> forward_tick -> plugin", d["p50"], "us",
            "floor", fd["p50"], p99=d["p99"], baseline_p99=fd["p99"], target="<= 1.5x floor",
            met=d["p50"] <= 1.5 * fd["p50"]),
        row("1", "external path: BrokerClient over the socket -> plugin", e["p50"], "us",
            "floor", fe["p50"], p99=e["p99"], baseline_p99=fe["p99"], target="<= 3x floor",
            met=e["p50"] <= 3 * fe["p50"], notes="floor timed by the client process"),
    ]
    if nats:
        n, fn = nats["latency"], nats["floor"]
        rows += [
            row("1", "peer: nats-py request/reply via local nats-server", n["p50"], "us",
                "floor", fn["p50"], p99=n["p99"], baseline_p99=fn["p99"],
                notes="floor timed by the nats-py process"),
            row("1", "daemon path vs nats-py request/reply", d["p50"], "us", "nats-py",
                n["p50"], p99=d["p99"], baseline_p99=n["p99"], target="<= 0.3x nats-py",
                met=d["p50"] <= 0.3 * n["p50"],
                notes=f"each over its own floor: {d['p50'] / fd['p50']:.2f}x vs "
                      f"{n['p50'] / fn['p50']:.2f}x"),
        ]
    else:
        rows.append(row("1", "daemon path vs nats-py request/reply", d["p50"], "us",
                        "nats-py", None, p99=d["p99"], target="<= 0.3x nats-py", notes=note))
    return rows + syscall_rows(nx)


# The fewest system calls a round trip can take: the floor's client and echo
# server each send and receive one line; the daemon path is the same two
# processes (the requester writes to the plugin's socket and reads its reply);
# through a broker process the broker also receives and sends both lines and
# waits for its socket to be readable once each way.
_MIN_SYSCALLS = {"floor": 4, "daemon": 4, "external": 10}


def syscall_rows(nx: dict) -> list[dict]:
    """Figure 1's system calls per round trip, counted with strace -c -f over
    every thread of the processes a path involves."""
    floor = nx["daemon"].get("floor_syscalls")
    if floor is None:
        return [row("1", "syscalls per round trip", None, "calls",
                    notes="not counted: strace is missing or may not attach")]
    rows = []
    for key, label, counts in (
            ("floor", "floor (client + echo server)", floor),
            ("daemon", "daemon path (daemon + plugin)", nx["daemon"].get("syscalls")),
            ("external", "external path (client + daemon + plugin)",
             nx.get("external", {}).get("syscalls"))):
        if counts is None:
            continue
        least = _MIN_SYSCALLS[key]
        top = sorted(counts["by_name"].items(), key=lambda kv: -kv[1])[:4]
        rows.append(row("1", f"syscalls per round trip, {label}", counts["total"], "calls",
                        "minimum", least, target="<= 1.5x minimum",
                        met=counts["total"] <= 1.5 * least,
                        notes=f"strace -c -f over {counts['n']:,} round trips: "
                              + ", ".join(f"{name} {v:.2f}" for name, v in top)))
    return rows


# --------------------------------------------------------- figure 2: throughput

def _cpu_note(t: dict) -> str:
    """CPU time per tick of the daemon process and of its plugin processes."""
    if "cpu_us" not in t:
        return ""
    return (f"CPU per tick: daemon {t['cpu_us']:.0f} us, plugin processes "
            f"{t['peer_cpu_us']:.0f} us")


def fig2_throughput(ctx: Ctx) -> list[dict]:
    """Ticks/s with 1, 8, 64 in flight, 1 plugin process and a queue group."""
    s = ctx.sizes["tp"]
    args = {k: s[k] for k in ("inflight", "warm_secs", "secs", "rounds")}
    url, note = ctx.peers.nats()
    rows = []
    raw = {}
    for procs in s["procs"]:
        ctx.log(f"fig 2: {procs} plugin process(es), daemon and external paths ...")
        nx = workers.call_worker("broker", dict(args, procs=procs, external=True),
                                 timeout=ctx.timeout(900))
        nats = None
        if url:
            ctx.log(f"fig 2: {procs} nats-py responder(s) ...")
            nats = workers.call_worker("rt", dict(args, url=url, subject=f"bench.tp{procs}",
                                                  procs=procs, envelope=_envelope_json()),
                                       timeout=ctx.timeout(900), python=VENV_PY, script=PEER_NATS)
        raw[procs] = {"broker": nx, "nats": nats}
        topo = "1 plugin process" if procs == 1 else f"{procs} processes, queue group"
        for path, label in (("daemon", "daemon path"), ("external", "external path")):
            for k in s["inflight"]:
                t = nx[path]["throughput"][str(k)]
                b = nats["throughput"][str(k)] if nats else None
                target, met = "-", None
                if path == "daemon" and k == 64:
                    least = 20_000 if procs == 1 else 10_000
                    target = f">= {least:,}/s and >= 1x nats-py"
                    met = t["rate"] >= least and (b is None or t["rate"] >= b["rate"])
                rows.append(row(
                    "2", f"{label}, {topo}, {k} in flight", t["rate"], "ticks/s",
                    "nats-py, same shape" if url else "nats-py", b["rate"] if b else None,
                    target=target, met=met, p99=t["lat_us"]["p99"],
                    baseline_p99=b["lat_us"]["p99"] if b else None,
                    notes=("p99 columns: per-tick latency in us under load"
                           + ("" if b else f"; {note}")) if k == s["inflight"][0]
                    and path == "daemon" else _cpu_note(t) if path == "daemon" else ""))
    ctx.raw["fig2"] = raw
    return rows


# ---------------------------------------------------------- figure 3: ephemeral

def fig3_ephemeral(ctx: Ctx) -> list[dict]:
    """spawn_ephemeral_tick vs subprocess.run of the same child with the same input."""
    ctx.log("fig 3: ephemeral ticks ...")
    r = workers.call_worker("ephemeral", ctx.sizes["eph"], timeout=ctx.timeout(600))
    ctx.raw["fig3"] = r
    rows = []
    for child, label in (("python", "python plugin (run_plugin, stdio)"),
                         ("sh", "minimal /bin/sh child (overhead magnified)")):
        e, s = r[child]["ephemeral_ms"], r[child]["subprocess_ms"]
        rows.append(row("3", f"ephemeral tick, {label}", e["p50"], "ms", "subprocess.run",
                        s["p50"], p99=e["p99"], baseline_p99=s["p99"],
                        target="median <= 1.10x", met=e["p50"] <= 1.10 * s["p50"],
                        notes=f"{e['n']} of each, interleaved"))
    return rows


# ---------------------------------------------------------- figure 4: scheduler

def fig4_scheduler(ctx: Ctx) -> list[dict]:
    """Runner at 10,000 and 100,000 every-60-s jobs vs APScheduler 3.x.

    Each side first loads with slots falling due during its load (the
    start-up case); then again with its first slots past its own load (the
    steady state: a lead of 1.5x its start-up load + 1 s); then with every
    job due at once (the burst)."""
    s = ctx.sizes["sched"]
    aps_ok, aps_note = ctx.peers.aps()
    rows, raw = [], {}
    for n in s["sizes"]:
        args = {"n": n, "window": s["window"], "spread": s["spread"]}

        def run(mode: str, peer: bool, **extra):
            who = "APScheduler" if peer else "Runner"
            ctx.log(f"fig 4: {who}, {n:,} jobs, {mode} ...")
            kw = dict(python=VENV_PY, script=PEER_APS) if peer else {}
            return workers.call_worker("sched", dict(args, mode=mode, **extra),
                                       timeout=ctx.timeout(900), **kw)
        ours_s = run("startup", False)
        ours = run("steady", False, lead=ours_s["load_s"] * 1.5 + 1.0)
        ours_b = run("burst", False)
        aps_s = aps = aps_b = None
        if aps_ok:
            aps_s = run("startup", True)
            aps = run("steady", True, lead=aps_s["load_s"] * 1.5 + 1.0)
            aps_b = run("burst", True)
        raw[n] = {"runner_startup": ours_s, "runner": ours, "runner_burst": ours_b,
                  "aps_startup": aps_s, "aps": aps, "aps_burst": aps_b}
        rows += _fig4_rows(n, s, ours_s, ours, ours_b, aps_s, aps, aps_b,
                           "" if aps else aps_note)
    ctx.raw["fig4"] = raw
    return rows


def _fig4_rows(n, s, ours_s, ours, ours_b, aps_s, aps, aps_b, note) -> list[dict]:
    big = n >= 100_000
    tag = f"{n:,} jobs"
    peer = "APScheduler 3.x" if aps else "APScheduler"
    g = (lambda d, *k: None if d is None else _dig(d, *k))
    hwm = ours["vm"]["VmHWM"] / 1024
    aps_hwm = None if aps is None else aps["vm"]["VmHWM"] / 1024
    late, disp = ours["lateness_ms"], ours["dispatch_lateness_ms"]
    late_s = ours_s["lateness_ms"]
    aps_late = g(aps, "lateness_ms")

    def vs(ratio: float, mine, theirs, more_is_better: bool = False):
        """A target of ``ratio`` x APScheduler's (met None without the peer)."""
        if theirs is None or mine is None:
            return None
        return mine >= ratio * theirs if more_is_better else mine <= ratio * theirs
    return [
        row("4", f"load, {tag} (config -> all scheduled)", ours_s["load_s"], "s", peer,
            g(aps_s, "load_s"), target="<= 5 s" if big else "-",
            met=ours_s["load_s"] <= 5 if big else None,
            notes=f"config {ours_s['config_s']:.2f} s, sqlite open {ours_s['open_s']:.2f} s, "
                  f"schedule {ours_s['schedule_s']:.2f} s" + (f"; {note}" if note else "")),
        row("4", f"peak RSS (VmHWM), {tag}", hwm, "MiB", peer, aps_hwm,
            target="<= 1.2x APScheduler" if big else "-",
            met=vs(1.2, hwm, aps_hwm) if big else None,
            notes="whole process; the job list the caller built is dropped after "
                  "config_from_dict, as the daemon drops the file it read"),
        row("4", f"ticks/s sustained, {tag}, every 60 s", ours["rate"], "ticks/s", peer,
            g(aps, "rate"), target=f">= demand ({n / s['spread']:,.0f}/s) -5%",
            met=ours["rate"] >= 0.95 * n / s["spread"],
            notes=f"{s['window']:.0f} s window from the first slot"),
        row("4", f"firing lateness p50 / p99, {tag}, first slots after the load", late["p50"],
            "ms", peer, g(aps_late, "p50"), p99=late["p99"], baseline_p99=g(aps_late, "p99"),
            ratio=None if aps_late is None else late["p99"] / aps_late["p99"],
            target="p99 <= 1.0x APScheduler" if big else "-",
            met=vs(1.0, late["p99"], g(aps_late, "p99")) if big else None,
            notes=f"ratio of p99s; {late['n']:,} ticks; dispatch lateness (ctx.now) p99 "
                  f"{disp['p99']:.2f} ms; lead {ours['lead_s']:.1f} s (APScheduler "
                  f"{g(aps, 'lead_s') or 0:.1f} s); slots due during the load, left out: "
                  f"{ours['excluded_before_ready']} (APScheduler "
                  f"{g(aps, 'excluded_before_ready') or 0})"),
        row("4", f"firing lateness max, {tag}, first slots after the load", late["max"], "ms",
            peer, g(aps_late, "max"), target="<= 3x APScheduler" if big else "-",
            met=vs(3.0, late["max"], g(aps_late, "max")) if big else None),
        row("4", f"start-up: lateness p50 / p99, {tag}, slots due from the load's start",
            late_s["p50"], "ms", peer, g(aps_s, "lateness_ms", "p50"), p99=late_s["p99"],
            baseline_p99=g(aps_s, "lateness_ms", "p99"),
            ratio=None if aps_s is None else late_s["p99"] / aps_s["lateness_ms"]["p99"],
            notes=f"ratio of p99s; {late_s['n']:,} slots up to {s['window']:.0f} s after the load, "
                  f"{ours_s['due_during_load']:,} of them due during it, all fired "
                  f"{ours_s['caught_up_s']:.2f} s after it (APScheduler: "
                  f"{g(aps_s, 'due_during_load') or 0:,}, "
                  f"{g(aps_s, 'caught_up_s') or 0:.2f} s); max {late_s['max']:.0f} ms "
                  f"(APScheduler {g(aps_s, 'lateness_ms', 'max') or 0:.0f} ms)"),
        row("4", f"ticks durable after stop, {tag}",
            100.0 * ours["durable"] / max(1, ours["fired_total"]), "%",
            target="100%", met=ours["durable"] == ours["fired_total"],
            notes=f"{ours['durable']:,}/{ours['fired_total']:,} ticks stored with "
                  f"synchronous={ours['synchronous']} (2 = FULL)" + (
                      f"; {ours['lost_count']} lost, {ours['lost_before_stop']} of them "
                      "fired before stop() was called" if ours["lost_count"] else "")
                  + "; APScheduler's memory store keeps none"),
        row("4", f"burst: all {tag} due at once, drain rate", ours_b["rate"], "ticks/s",
            peer, g(aps_b, "rate"), target=">= 1.0x APScheduler" if big else "-",
            met=vs(1.0, ours_b["rate"], g(aps_b, "rate"), True) if big else None,
            notes=f"drained in {ours_b['drain_s']:.2f} s"),
    ]


def _dig(d, *keys):
    for k in keys:
        d = d[k]
    return d


# ------------------------------------------------------------- figure 5: router

def fig5_router(ctx: Ctx) -> list[dict]:
    """handle_for_kind with 10 and 10,000 registered plugins."""
    ctx.log("fig 5: router lookups ...")
    s = ctx.sizes["router"]
    r = workers.call_worker("router", s, timeout=ctx.timeout(300))
    ctx.raw["fig5"] = r
    small, large = (str(n) for n in s["sizes"])
    a, b = r[small]["router_ns"], r[large]["router_ns"]
    return [
        row("5", f"router lookup, {int(small):,} plugins", a["p50"], "ns", "dict.get, same size",
            r[small]["dict_ns"]["p50"], p99=a["p99"]),
        row("5", f"router lookup, {int(large):,} plugins", b["p50"], "ns",
            f"router, {int(small):,} plugins", a["p50"], p99=b["p99"], baseline_p99=a["p99"],
            target="<= 1.5x (flat)", met=b["p50"] <= 1.5 * a["p50"],
            notes=f"dict.get at {int(large):,}: {r[large]['dict_ns']['p50']:.1f} ns"),
    ]


# ------------------------------------------------------------ figure 6: start-up

def fig6_startup(ctx: Ctx) -> list[dict]:
    """import nexo_poller, and --help through each way to run the CLI, vs python -c pass."""
    ctx.log("fig 6: start-up ...")
    s = ctx.sizes["startup"]
    py = sys.executable
    script = os.path.join(REPO, "nexo_poller.py")
    cmds = {"pass": [py, "-c", "pass"],
            "import": [py, "-c", "import nexo_poller"],
            "help": [py, script, "--help"],
            "launcher": [py, os.path.join(REPO, "nexo-poller"), "--help"],
            "module": [py, "-m", "nexo_poller", "--help"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    times = {k: [] for k in cmds}
    cpu = {k: [] for k in cmds}     # the child's user + system CPU: less swayed by other load

    def once(cmd) -> tuple[float, float]:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, check=True)
        wall = (time.perf_counter() - t0) * 1e3
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1e3
    for _ in range(s["warm"]):
        for cmd in cmds.values():
            once(cmd)
    for _ in range(s["n"]):
        for k, cmd in cmds.items():
            wall, used = once(cmd)
            times[k].append(wall)
            cpu[k].append(used)
    st = {k: summary(v) for k, v in times.items()}
    cst = {k: summary(v) for k, v in cpu.items()}
    # in-process import time, from -X importtime (cumulative us of nexo_poller)
    imp = subprocess.run([py, "-X", "importtime", "-c", "import nexo_poller"], cwd=REPO,
                         env=env, capture_output=True, text=True).stderr
    cum = next((int(line.split("|")[1]) for line in imp.splitlines()
                if line.rstrip().endswith("| nexo_poller")), None)
    # What running the file as a script adds: compiling its source, every start.
    with open(script, encoding="utf-8") as fh:
        source = fh.read()
    compiles = []
    for _ in range(s["compiles"]):
        t0 = time.perf_counter()
        compile(source, script, "exec")
        compiles.append((time.perf_counter() - t0) * 1e3)
    comp = summary(compiles)
    lines = source.count("\n")
    ctx.raw["fig6"] = {"times_ms": st, "cpu_ms": cst, "importtime_us": cum,
                       "compile_ms": comp, "source_lines": lines}
    base = st["pass"]["p50"]
    i = st["import"]["p50"]

    def added(key: str) -> str:
        return (f"+{st[key]['p50'] - base:.1f} ms over pass (CPU: +"
                f"{cst[key]['p50'] - cst['pass']['p50']:.1f} ms)")

    def cli_row(key: str, name: str, notes: str = "") -> dict:
        v = st[key]["p50"]
        return row("6", name, v, "ms", "python -c pass", base, p99=st[key]["p99"],
                   baseline_p99=st["pass"]["p99"], target="<= 100 ms over pass",
                   met=v - base <= 100, notes=added(key) + notes)
    return [
        row("6", "python -c 'pass' (interpreter start)", base, "ms", p99=st["pass"]["p99"],
            notes=f"CPU: {cst['pass']['p50']:.1f} ms"),
        row("6", "python -c 'import nexo_poller'", i, "ms", "python -c pass", base,
            p99=st["import"]["p99"], baseline_p99=st["pass"]["p99"],
            target="<= 50 ms over pass", met=i - base <= 50,
            notes=added("import") + (
                f"; -X importtime: {cum / 1000:.1f} ms cumulative" if cum else "")),
        cli_row("launcher", "./nexo-poller --help (the launcher: cached bytecode)"),
        cli_row("module", "python -m nexo_poller --help (cached bytecode)"),
        cli_row("help", "python nexo_poller.py --help (compiled from source)",
                f"; compile() of its {lines:,} lines alone: "
                f"{comp['p50']:.1f} ms (median of {comp['n']}, in-process)"),
    ]


# -------------------------------------------------------------- figure 7: memory

def fig7_memory(ctx: Ctx) -> list[dict]:
    """Idle RSS with 1,000 jobs and 10 long-lived plugins; per-tick churn."""
    s = ctx.sizes["mem"]
    ctx.log("fig 7: idle daemon RSS ...")
    idle = workers.call_worker("memory-idle", {k: s[k] for k in ("jobs", "plugins", "idle")},
                               timeout=ctx.timeout(300))
    ctx.log("fig 7: per-tick churn (tracemalloc) ...")
    churn = workers.call_worker("memory-churn", s["churn"], timeout=ctx.timeout(600))
    ctx.raw["fig7"] = {"idle": idle, "churn": churn}
    d = idle["daemon"]["VmRSS"] / 1024
    base = idle["import_only"]["VmRSS"] / 1024
    plug = [p["VmRSS"] / 1024 for p in idle["plugins"]]
    rows = [
        row("7", f"daemon RSS idle, {s['jobs']:,} jobs + {s['plugins']} long-lived plugins",
            d, "MiB", "same process, nexo_poller imported", base,
            notes=f"{idle['threads']} threads, every job ticked once then idle"),
        row("7", f"daemon wake-ups idle, {s['jobs']:,} jobs + {s['plugins']} long-lived "
                 "plugins + metrics endpoint", idle["wakeups_per_s"]["daemon"], "/s",
            target="0 /s", met=idle["wakeups_per_s"]["daemon"] == 0,
            notes=f"context switches of every daemon thread over {s['idle']:g} s idle; "
                  f"its plugins together: {idle['wakeups_per_s']['plugins']:.1f}/s"),
        row("7", "long-lived plugin process RSS (median of plugins)",
            summary(plug)["p50"] if plug else None, "MiB",
            notes=f"{len(plug)} processes, {sum(plug):.1f} MiB together"),
    ]
    labels = {"scheduled": "scheduler steady state (in-process poller, sqlite)",
              "run_once": "Runner.run_once, same job set",
              "broker": "forward_tick, daemon path to a plugin"}
    for key, label in labels.items():
        c = churn[key]
        top = ", ".join(f"{t['where']} {t['size_diff']:+d} B" for t in c["top"][:2])
        rows.append(row("7", f"retained per tick: {label}", c["retained_per_tick"], "B/tick",
                        target="no growth (< 16 B/tick)", met=c["retained_per_tick"] < 16,
                        notes=f"{c['ticks']:,} ticks traced; high-water growth, 2nd half over "
                              f"1st; end over start {c['endpoint_per_tick']:.2f} B/tick; "
                              f"transient peak {c['transient_peak'] / 1024:.0f} KiB; top: {top}"))
    return rows


# ------------------------------------------------------------ figure 8: NATS client

def fig8_nats_client(ctx: Ctx) -> list[dict]:
    """NatsClient vs nats-py as the requesting client: one nats-server, the
    same nats-py responder, the same envelope, each with the floor beside it."""
    url, note = ctx.peers.nats()
    name_rt = "NatsClient request/reply p50 vs nats-py"
    name_tp = "NatsClient, 64 in flight, vs nats-py"
    if not url:
        return [row("8", name_rt, None, "us", "nats-py", None, target="<= 1.2x nats-py",
                    notes=note),
                row("8", name_tp, None, "req/s", "nats-py", None, target=">= 1x nats-py",
                    notes=note)]
    s = dict(ctx.sizes["rt"], **{k: ctx.sizes["tp"][k] for k in ("warm_secs", "secs",
                                                                 "rounds")}, inflight=[64])
    with echo_floor() as echo_path:
        args = dict(s, echo=echo_path, url=url, subject="bench.nc", procs=1,
                    envelope=_envelope_json())
        ctx.log("fig 8: NatsClient against a nats-py responder ...")
        ours = workers.call_worker("nats-client", dict(args, peer_python=VENV_PY,
                                                       peer_script=PEER_NATS),
                                   timeout=ctx.timeout(600))
        ctx.log("fig 8: nats-py against a nats-py responder ...")
        peer = workers.call_worker("rt", args, timeout=ctx.timeout(600), python=VENV_PY,
                                   script=PEER_NATS)
    ctx.raw["fig8"] = {"nexo": ours, "nats-py": peer}
    o, n = ours["latency"], peer["latency"]
    ot, nt = ours["throughput"]["64"], peer["throughput"]["64"]
    return [
        row("8", name_rt, o["p50"], "us", "nats-py", n["p50"], p99=o["p99"],
            baseline_p99=n["p99"], target="<= 1.2x nats-py", met=o["p50"] <= 1.2 * n["p50"],
            notes=f"each over its own floor: {o['p50'] / ours['floor']['p50']:.2f}x vs "
                  f"{n['p50'] / peer['floor']['p50']:.2f}x"),
        row("8", name_tp, ot["rate"], "req/s", "nats-py", nt["rate"],
            p99=ot["lat_us"]["p99"], baseline_p99=nt["lat_us"]["p99"],
            target=">= 1x nats-py", met=ot["rate"] >= nt["rate"],
            notes="p99 columns: per-request latency in us under load"),
    ]


def fig9_stdio(ctx: Ctx) -> list[dict]:
    """The stdio lifecycle: round trip vs the Unix-socket broker path vs the
    floor (side by side in one process), and throughput with 64 in flight."""
    s, tp = ctx.sizes["rt"], ctx.sizes["tp"]
    with echo_floor() as echo_path:
        ctx.log("fig 9: stdio lifecycle, broker path and floor side by side ...")
        r = workers.call_worker("stdio", dict(s, echo=echo_path, inflight=[1, 64] if not ctx.smoke
                                              else [1, 8], warm_secs=tp["warm_secs"],
                                              secs=tp["secs"], rounds=tp["rounds"]),
                                timeout=ctx.timeout(600))
    ctx.raw["fig9"] = r
    lat = r["latency"]
    f, st, b = lat["floor"], lat["stdio"], lat["broker"]
    rows = [
        row("9", "stdio tick round trip: JSON-RPC lines on the plugin's stdin/stdout",
            st["p50"], "us", "floor", f["p50"], p99=st["p99"], baseline_p99=f["p99"],
            notes=f"{st['n']:,} round trips per path, in blocks taking turns"),
        row("9", "stdio vs the Unix-socket broker path (forward_tick)", st["p50"], "us",
            "broker path", b["p50"], p99=st["p99"], baseline_p99=b["p99"]),
    ]
    for k, t in r["throughput"].items():
        rows.append(row("9", f"stdio throughput, 1 plugin process, {k} in flight", t["rate"],
                        "ticks/s", p99=t["lat_us"]["p99"],
                        notes="p99: per-tick latency in us under load"))
    return rows


def fig10_daemon_nats(ctx: Ctx) -> list[dict]:
    """A daemon tick over NATS vs over the embedded Unix-socket broker: the
    same forward_tick, one supervised SDK plugin on each, taking turns."""
    url, note = ctx.peers.nats()
    name = "daemon tick over NATS vs over the Unix socket"
    if not url:
        return [row("10", name, None, "us", "unix path", None, notes=note)]
    s, tp = ctx.sizes["rt"], ctx.sizes["tp"]
    with echo_floor() as echo_path:
        ctx.log("fig 10: the daemon's tick over NATS and over the Unix socket ...")
        r = workers.call_worker("daemon-nats", dict(s, echo=echo_path, url=url,
                                                    inflight=[64] if not ctx.smoke else [8],
                                                    warm_secs=tp["warm_secs"], secs=tp["secs"],
                                                    rounds=tp["rounds"]),
                                timeout=ctx.timeout(600))
    ctx.raw["fig10"] = r
    lat = r["latency"]
    f, n, u = lat["floor"], lat["nats"], lat["unix"]
    k = next(iter(r["nats"]))
    nt, ut = r["nats"][k], r["unix"][k]
    return [
        row("10", name, n["p50"], "us", "unix path", u["p50"], p99=n["p99"],
            baseline_p99=u["p99"], notes=f"floor {f['p50']:.0f} us; {n['n']:,} round trips "
            "per path, in blocks taking turns"),
        row("10", f"daemon ticks/s over NATS, {k} in flight, vs the Unix socket", nt["rate"],
            "ticks/s", "unix path", ut["rate"], p99=nt["lat_us"]["p99"],
            baseline_p99=ut["lat_us"]["p99"], notes="p99: per-tick latency in us under load"),
    ]


# ------------------------------------------- figure 11: the Runner with one plugin

SUSTAINED = 2500            # ticks/s the daemon must keep up with (issue 17)
LATE_P99_MS = 100.0


def fig11_runner_plugin(ctx: Ctx) -> list[dict]:
    """The daemon (Runner, sqlite state, synchronous FULL) with one supervised
    long-lived plugin over the Unix socket, at rising demands up to 2x the
    sustained target: done vs demanded ticks/s, firing lateness, commit
    batches and latency, and ``status``/a signal answered meanwhile."""
    s = ctx.sizes["runner"]
    rows = []
    ctx.raw["fig11"] = []
    for demand in s["demands"]:
        jobs = int(demand * s["interval"])
        ctx.log(f"fig 11: Runner, one plugin, {demand:,} ticks/s demanded ({jobs:,} jobs) ...")
        r = workers.call_worker("runner-plugin", {"demand": demand, "jobs": jobs,
                                                  "inflight": s["inflight"],
                                                  "warm_secs": s["warm_secs"],
                                                  "secs": s["secs"]},
                                timeout=ctx.timeout(300))
        ctx.raw["fig11"].append(r)
        late, b, c = r["lateness_ms"], r["commit_batch"], r["commit_latency_ms"]
        answered = max(r["status_ms"]["max"], r["signal_ms"]["max"])
        done = r["done_rate"]
        # At capacity every job waits its turn: one round of all jobs at the
        # rate done is what the overload demands, no more.
        round_ms = jobs / max(done, 1e-9) * 1e3
        overload = demand > SUSTAINED and not ctx.smoke
        if overload:
            target = ("bounded: lateness p99 <= one round of all jobs at the done rate "
                      "+ 100 ms, not growing; status and a signal answered < 1 s")
            met = (late["p99"] <= round_ms + 100
                   and r["lateness_ms_second_half"]["p99"]
                   <= r["lateness_ms_first_half"]["p99"] * 1.25 + 100
                   and answered < 1000)
        else:
            target = f"done >= 99% of demand, lateness p99 <= {LATE_P99_MS:g} ms"
            met = done >= 0.99 * demand and late["p99"] <= LATE_P99_MS
        rows.append(row(
            "11", f"Runner + one long-lived plugin, {demand:,} ticks/s demanded: done",
            done, "ticks/s", "demand", demand, p99=late["p99"], target=target, met=met,
            notes=f"p99 is lateness in ms (p50 {late['p50']:.1f}; 1st/2nd half p99 "
                  f"{r['lateness_ms_first_half']['p99']:.0f}/"
                  f"{r['lateness_ms_second_half']['p99']:.0f}); {jobs:,} jobs every "
                  f"{r['every_secs']:g} s, {s['inflight']} ticks in flight; commit batch "
                  f"max {b['max']}, commit latency p99 {c['p99']:.0f} ms max {c['max']:.0f} "
                  f"ms; status max {r['status_ms']['max']:.0f} ms, signal max "
                  f"{r['signal_ms']['max']:.0f} ms; daemon CPU "
                  f"{r['daemon_cpu_us_per_tick']:.0f} us/tick"))
    rows.append(_fig11_history_cost(ctx, s))
    return rows


def _fig11_history_cost(ctx: Ctx, s: dict) -> dict:
    """What the run history costs the daemon: CPU per tick at the sustained
    demand with the default history (100 runs a job) against none
    (``run_history: 0``), run back to back.  The done rate is pinned to the
    demand below capacity, so CPU per tick is what capacity divides by."""
    demand = s["demands"][0] if ctx.smoke else SUSTAINED
    jobs = int(demand * s["interval"])
    cpu = {}
    for keep in (0, 100):
        ctx.log(f"fig 11: history cost, run_history {keep}, {demand:,} ticks/s ...")
        r = workers.call_worker("runner-plugin", {
            "demand": demand, "jobs": jobs, "inflight": s["inflight"],
            "warm_secs": s["warm_secs"], "secs": s["secs"], "run_history": keep},
            timeout=ctx.timeout(300))
        ctx.raw["fig11"].append({"run_history": keep, **r})
        cpu[keep] = r["daemon_cpu_us_per_tick"]
    return row("11", f"run history (100 runs a job) vs none, {demand:,} ticks/s: daemon CPU "
                     "per tick", cpu[100], "us", "run_history 0", cpu[0],
               target="<= 1.10x none (issue 25)", met=cpu[100] <= 1.10 * cpu[0],
               notes="history's added cost per tick; done rate pinned to the demand")


FIGURES = {1: fig1_round_trip, 2: fig2_throughput, 3: fig3_ephemeral, 4: fig4_scheduler,
           5: fig5_router, 6: fig6_startup, 7: fig7_memory, 8: fig8_nats_client,
           9: fig9_stdio, 10: fig10_daemon_nats, 11: fig11_runner_plugin}


# ------------------------------------------------------------------- the table

def _num(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(rows: list[dict]) -> str:
    head = ["fig", "figure", "value", "p99", "unit", "baseline", "baseline value",
            "baseline p99", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        met = {True: "yes", False: "**NO**", None: "-"}[r["met"]]
        lines.append("| " + " | ".join([
            r["figure"], r["name"], _num(r["value"]), _num(r["p99"]), r["unit"],
            r["baseline_name"] or "-", _num(r["baseline_value"]), _num(r["baseline_p99"]),
            _fmt_ratio(r["ratio"]), r["target"], met]) + " |")
    return "\n".join(lines)


def notes_block(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r["notes"]:
            out.append(f"- fig {r['figure']}, {r['name']}: {r['notes']}")
    return "\n".join(out)


def _stat() -> tuple[int, int]:
    """(all, idle) jiffies of every CPU, from /proc/stat."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v[:8]), v[3] + v[4]


def cpu_busy(secs: float = 0.5) -> float | None:
    """Percent of all CPUs busy over ``secs``."""
    try:
        t1, i1 = _stat()
        time.sleep(secs)
        t2, i2 = _stat()
    except (OSError, ValueError):
        return None
    return 100.0 * (1 - (i2 - i1) / max(1, t2 - t1))


class ForeignLoad:
    """CPU used by processes other than this suite's during a span, as a
    percent of the machine: another job on a shared machine shows up here."""

    def __init__(self, peers: Peers) -> None:
        self.peers = peers
        self.hz = os.sysconf("SC_CLK_TCK")
        try:
            self.start = (_stat(), self._own(), time.monotonic())
        except (OSError, ValueError):
            self.start = None

    def _own(self) -> float:
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        proc = self.peers._nats_proc        # not reaped until the end: count it by hand
        if proc is not None and proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
                own += (int(f[11]) + int(f[12])) / self.hz
            except (OSError, ValueError, IndexError):
                pass
        return own

    def percent(self) -> float | None:
        if self.start is None:
            return None
        (t1, i1), own1, w1 = self.start
        try:
            (t2, i2), own2, w2 = _stat(), self._own(), time.monotonic()
        except (OSError, ValueError):
            return None
        busy = ((t2 - t1) - (i2 - i1)) / self.hz
        return max(0.0, busy - (own2 - own1)) / max(1e-9, (w2 - w1) * (os.cpu_count() or 1)) \
            * 100


def source_id() -> dict:
    """Which nexo_poller.py a figure measured: its hash, the git commit, and
    whether the file differs from that commit."""
    import hashlib
    path = os.path.join(REPO, "nexo_poller.py")
    with open(path, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()[:12]
    out = {"sha256": sha}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                       capture_output=True, text=True, timeout=10
                                       ).stdout.strip() or None
        out["dirty"] = subprocess.run(["git", "diff", "--quiet", "HEAD", "--",
                                       "nexo_poller.py"], cwd=REPO, timeout=10
                                      ).returncode != 0
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def machine() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as fh:
            mem = f"{int(fh.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem,
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "kernel": platform.release(), "platform": platform.platform()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, no peers, no installs (CI); < 60 s")
    p.add_argument("--only", metavar="N[,N]", help="run only these figures (1-11)")
    p.add_argument("--json", metavar="PATH", default=os.path.join(BENCH_DIR, "results.json"),
                   help="write the figures here (default: bench/results.json)")
    p.add_argument("--no-peers", action="store_true",
                   help="skip APScheduler / nats-py / nats-server (no installs)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECS",
                   help="before each figure, wait up to SECS for the machine to be idle "
                        "(< 15%% busy); for shared machines")
    args = p.parse_args(argv)
    try:
        only = sorted({int(x) for x in args.only.split(",")}) if args.only else sorted(FIGURES)
    except ValueError:
        p.error("--only takes figure numbers like 1,4")
    if not set(only) <= set(FIGURES):
        p.error(f"--only: figures are {', '.join(map(str, FIGURES))}")
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # Children import nexo_poller from its cached bytecode, as an installed copy
    # would, even where PYTHONDONTWRITEBYTECODE keeps them from writing it.
    py_compile.compile(os.path.join(REPO, "nexo_poller.py"), doraise=True)
    source = source_id()
    peers = Peers(enabled=not (args.smoke or args.no_peers), log=log)
    ctx = Ctx(SMOKE if args.smoke else FULL, args.smoke, peers, log)
    rows: list[dict] = []
    crashed: list[str] = []
    conditions: dict = {}
    try:
        for n in only:
            busy = cpu_busy()
            if args.wait_quiet and busy is not None and busy > 15:
                log(f"the machine is {busy:.0f}% busy; waiting up to {args.wait_quiet:g} s "
                    "for it to settle ...")
                deadline = time.monotonic() + args.wait_quiet
                while busy is not None and busy > 15 and time.monotonic() < deadline:
                    busy = cpu_busy(2.0)
            foreign = ForeignLoad(peers)
            try:
                rows += FIGURES[n](ctx)
            except Exception:
                crashed.append(f"figure {n}")
                print(f"figure {n} CRASHED:\n{traceback.format_exc()}", file=sys.stderr)
            pct = foreign.percent()
            conditions[n] = {"busy_pct_before": busy, "foreign_cpu_pct": pct,
                             "loadavg_after": os.getloadavg(),
                             "nexo_poller": source_id()["sha256"]}
            if pct is not None and pct > 10 and not args.smoke:
                log(f"warning: other processes used {pct:.0f}% of the CPUs during figure "
                    f"{n}; its figures may be noisy")
    finally:
        peers.close()
    elapsed = time.monotonic() - started
    command = " ".join(["python bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    shas = {source["sha256"], *(c["nexo_poller"] for c in conditions.values())}
    doc = {"command": command, "smoke": args.smoke, "machine": machine(), "source": source,
           "peers": peers.versions, "elapsed_s": elapsed, "rows": rows, "crashed": crashed,
           "conditions": conditions,
           "raw": ctx.raw}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    m = doc["machine"]
    print(f"\nnexo-poller benchmarks ({'smoke' if args.smoke else 'full'}), "
          f"{m['nproc']} cores {m['cpu']}, Python {m['python']}, {elapsed:.0f} s; "
          f"nexo_poller.py {source['sha256']} (commit {source.get('commit')}"
          f"{', modified' if source.get('dirty') else ''})")
    if len(shas) > 1:
        print("warning: nexo_poller.py changed during the run; figures mix versions "
              f"({', '.join(sorted(shas))})")
    print("\n" + table(rows))
    notes = notes_block(rows)
    if notes:
        print("\nnotes:\n" + notes)
    load = ", ".join(f"{n}: {c['foreign_cpu_pct']:.0f}%" for n, c in conditions.items()
                     if c.get("foreign_cpu_pct") is not None)
    if load:
        print(f"\nCPU used by other processes during each figure: {load}")
    missed = [r for r in rows if r["met"] is False]
    print(f"\n{len(rows)} figures, {sum(r['met'] is True for r in rows)} targets met, "
          f"{len(missed)} missed, {len(crashed)} crashed; JSON: {args.json}")
    if crashed:
        print("crashed: " + ", ".join(crashed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
