"""Observability of nexo_poller: the Prometheus endpoint, the tick log lines
(text and ``--log-format json``), secrets kept out of logs, and plugin
reloads and restarts as the runner and ``/metrics`` report them.

In-process ticks are driven with ``run_once`` (synchronous commit) under an
injected clock; long-lived plugins are ``tests/fixtures/sdk_plugin.py`` and
``tests/fixtures/e2e_counter_plugin.py`` run by ``sys.executable`` from
manifests written at test time.  Nothing sleeps: waits poll a condition
with a generous deadline.
"""

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import unittest
import urllib.error
import urllib.request
from datetime import timedelta

import nexo_poller as nx
from nexo_poller import PollerError, TickAck, TickMetrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import FakePoller as Scripted  # noqa: E402  (its name in these tests)
from support import TempDirCase, wait_until, write_plugin_manifest  # noqa: E402
NEXO = os.path.join(ROOT, "nexo_poller.py")
SDK_PLUGIN = os.path.join(ROOT, "tests", "fixtures", "sdk_plugin.py")
E2E_PLUGIN = os.path.join(ROOT, "tests", "fixtures", "e2e_counter_plugin.py")

T0 = 1_900_000_000.0
WAIT = 15.0                     # generous: a slow machine must not fail a test
SECRET = "s3cr3t-token"
TICK_KEYS = {"job", "kind", "outcome", "duration_ms", "items_seen", "items_dispatched"}



def pid_gone(pid):
    """True once ``pid`` no longer exists (an unreaped zombie still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False



# -- the Prometheus text exposition format (0.0.4) ------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LNAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
_LVALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_LABEL = rf"{_LNAME}={_LVALUE}"
_VALUE = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?Inf|NaN"
SAMPLE_RE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?,?\}})? ({_VALUE})(?: -?\d+)?")
LABEL_RE = re.compile(rf"({_LNAME})=({_LVALUE})")
HELP_RE = re.compile(rf"# HELP ({_NAME}) (?:[^\\\n]|\\[\\n])*")
TYPE_RE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_exposition(case, text):
    """Check ``text`` line by line; returns ({family: type}, [(name, labels, value)])."""
    case.assertTrue(text.endswith("\n"), "the body must end with a newline")
    types, samples, seen, family = {}, [], set(), None
    for n, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {n}: {line!r}"
        if line.startswith("#"):
            if line.startswith("# HELP "):
                case.assertRegex(line, rf"^{HELP_RE.pattern}$", where)
            elif line.startswith("# TYPE "):
                m = TYPE_RE.fullmatch(line)
                case.assertIsNotNone(m, where)
                case.assertNotIn(m.group(1), types, f"{where}: a second TYPE line")
                types[m.group(1)] = m.group(2)
                family = m.group(1)
            continue
        m = SAMPLE_RE.fullmatch(line)
        case.assertIsNotNone(m, f"{where} is not `name{{labels}} value`")
        name, raw_labels, value = m.groups()
        case.assertIsNotNone(family, f"{where}: a sample before any TYPE line")
        allowed = {family}
        if types[family] == "histogram":
            allowed = {family + "_bucket", family + "_sum", family + "_count"}
        case.assertIn(name, allowed, f"{where}: not in the family of the TYPE above it")
        labels = {}
        for lname, lvalue in LABEL_RE.findall(raw_labels or ""):
            case.assertNotIn(lname, labels, f"{where}: label {lname} twice")
            labels[lname] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], lvalue[1:-1])
        key = (name, tuple(sorted(labels.items())))
        case.assertNotIn(key, seen, f"{where}: a duplicate series")
        seen.add(key)
        samples.append((name, labels, float(value)))
    return types, samples


def series(samples, name, **labels):
    """Every sample of ``name`` whose labels include ``labels``."""
    return [(lb, v) for n, lb, v in samples
            if n == name and all(lb.get(k) == str(v2) for k, v2 in labels.items())]


def fetch(addr, path="/metrics"):
    with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}{path}", timeout=WAIT) as resp:
        return resp.status, resp.headers, resp.read().decode("utf-8")


# -- the case --------------------------------------------------------------------------

class Case(TempDirCase):
    tmp_prefix = "nexo-obs-"

    def setUp(self):
        super().setUp()
        self.t = [T0]

    def config(self, jobs, plugins=(), extra_kinds=("mem",), **top):
        return self.runner_config(jobs, plugins=list(plugins), extra_kinds=extra_kinds, **top)

    @staticmethod
    def job(id, kind="mem", every=60, **kw):
        raw = {"id": id, "kind": kind, "schedule": {"every_secs": every}}
        raw.update(kw)
        return raw

    def runner(self, cfg, *pollers, start=True):
        return self.start_runner(cfg, *pollers, start=start, clock=lambda: self.t[0])

    def manifest(self, name, plugin_id, kind, script, *, args=(), env=None, timeout=30,
                 lifecycle="long_lived"):
        """Write ``<dir>/<name>/nexo-plugin.toml``; returns its path."""
        return write_plugin_manifest(os.path.join(self.dir, name), plugin_id, [kind],
                                     command=sys.executable, args=(script, *args), env=env,
                                     tick_timeout_secs=timeout, lifecycle=lifecycle,
                                     version=None)

    def plugin_pid(self, runner, plugin_id, not_pid=None):
        """The pid of a long-lived plugin's current process (waits for it)."""
        def current():
            sup = runner.supervisors().get(plugin_id)
            proc = sup.proc if sup is not None else None
            if proc is not None and proc.pid != not_pid and proc.poll() is None:
                return proc.pid
            return None
        pid = wait_until(current)
        self.assertIsNotNone(pid, f"plugin {plugin_id} has no running process")
        return pid

    def assert_ok(self, outcome):
        self.assertEqual(outcome.status, "ok", outcome.to_dict())
        return outcome


# ============================================================================
# 1. GET /metrics
# ============================================================================

class TestMetricsEndpoint(Case):

    def test_metrics_reflect_ticks_and_job_state(self):
        job_id = "a.b:c-d"                     # every character the id rule allows
        cfg = self.config([self.job(job_id), self.job("flaky"), self.job("doomed"),
                           self.job("idle")], breaker_threshold=2,
                          metrics_addr="127.0.0.1:0")
        poller = Scripted(script={
            job_id: [TickAck(b"1", metrics=TickMetrics(items_seen=3, items_dispatched=2)),
                     TickAck(b"2", metrics=TickMetrics(items_seen=4, items_dispatched=1)),
                     TickAck(b"3")],
            "flaky": [PollerError.Transient("upstream 503"), PollerError.Transient("again")],
            "doomed": [PollerError.Permanent("feed deleted")]})
        r = self.runner(cfg, poller)
        self.assertIsNotNone(r.metrics_address, "metrics_addr set but no server")
        addr = r.metrics_address
        self.assertEqual(addr[0], "127.0.0.1")
        self.assertNotEqual(addr[1], 0)

        outcomes = [r.run_once(job_id) for _ in range(3)]
        outcomes += [r.run_once("flaky"), r.run_once("flaky"), r.run_once("doomed")]
        self.assertEqual([o.status for o in outcomes],
                         ["ok", "ok", "ok", "transient", "transient", "permanent"])

        status, headers, body = fetch(addr)
        self.assertEqual(status, 200)
        ctype = headers["Content-Type"]
        self.assertTrue(ctype.startswith("text/plain"), ctype)
        self.assertIn("version=0.0.4", ctype)
        self.assertEqual(int(headers["Content-Length"]), len(body.encode("utf-8")))
        types, samples = parse_exposition(self, body)

        self.assertEqual(types, {
            "nexo_poller_ticks_total": "counter",
            "nexo_poller_tick_duration_seconds": "histogram",
            "nexo_poller_slots_held_elsewhere_total": "counter",
            "nexo_poller_consecutive_errors": "gauge",
            "nexo_poller_breaker_open": "gauge",
            "nexo_poller_paused": "gauge",
            "nexo_poller_items_seen_total": "counter",
            "nexo_poller_items_dispatched_total": "counter",
            "nexo_poller_last_success_timestamp_seconds": "gauge",
            "nexo_poller_deliveries_total": "counter",
            "nexo_poller_outbox_depth": "gauge",
            "nexo_poller_outbox_oldest_age_seconds": "gauge",
            "nexo_poller_state_errors_total": "counter",
            "nexo_poller_state_ok": "gauge",
            "nexo_poller_plugin_restarts_total": "counter",
            "nexo_poller_ticks_waiting": "gauge",
            "nexo_poller_ticks_rate_limited": "gauge",
            # nexo's own families, always alongside (TestNexoMetricNames)
            "poller_ticks_total": "counter", "poller_latency_ms": "histogram",
            "poller_items_seen_total": "counter", "poller_items_dispatched_total": "counter",
            "poller_consecutive_errors": "gauge", "poller_breaker_state": "gauge"})
        for name in types:
            self.assertIn(f"# HELP {name} ", body)

        # ticks_total{job,kind,outcome}: one series per (job, kind, outcome) seen
        ticks = {(lb["job"], lb["kind"], lb["outcome"]): v
                 for lb, v in series(samples, "nexo_poller_ticks_total")}
        self.assertEqual(ticks, {(job_id, "mem", "ok"): 3, ("flaky", "mem", "transient"): 2,
                                 ("doomed", "mem", "permanent"): 1})
        self.assertIn(f'nexo_poller_ticks_total{{job="{job_id}",kind="mem",outcome="ok"}} 3',
                      body.splitlines())

        # the duration histogram of kind "mem": cumulative buckets, +Inf == count
        buckets = series(samples, "nexo_poller_tick_duration_seconds_bucket", kind="mem")
        by_le = {lb["le"]: v for lb, v in buckets}
        self.assertEqual(by_le["+Inf"], 6)
        [(_, count)] = series(samples, "nexo_poller_tick_duration_seconds_count", kind="mem")
        [(_, total)] = series(samples, "nexo_poller_tick_duration_seconds_sum", kind="mem")
        self.assertEqual(count, 6)
        self.assertEqual(by_le["+Inf"], count)
        self.assertAlmostEqual(total, sum(o.duration for o in outcomes), delta=1e-5)
        finite = sorted((float(le), v) for le, v in by_le.items() if le != "+Inf")
        self.assertGreater(len(finite), 1)
        for (_, lo), (_, hi) in zip(finite, finite[1:]):
            self.assertLessEqual(lo, hi, "buckets are not cumulative")
        for le, v in finite:
            self.assertEqual(v, sum(1 for o in outcomes if o.duration <= le), f"le={le}")
        self.assertEqual(buckets[-1][0]["le"], "+Inf", "+Inf must be the last bucket")

        # per-job gauges and totals, for every configured job (ticked or not)
        def per_job(name):
            got = {lb["job"]: v for lb, v in series(samples, name)}
            for lb, _ in series(samples, name):
                self.assertEqual(lb["kind"], "mem")
            return got

        self.assertEqual(per_job("nexo_poller_consecutive_errors"),
                         {job_id: 0, "flaky": 2, "doomed": 1, "idle": 0})
        self.assertEqual(per_job("nexo_poller_breaker_open"),
                         {job_id: 0, "flaky": 1, "doomed": 0, "idle": 0})
        self.assertEqual(per_job("nexo_poller_paused"),
                         {job_id: 0, "flaky": 0, "doomed": 1, "idle": 0})
        seen = sum(o.ack.metrics.items_seen for o in outcomes if o.ack and o.ack.metrics)
        dispatched = sum(o.ack.metrics.items_dispatched
                         for o in outcomes if o.ack and o.ack.metrics)
        self.assertEqual((seen, dispatched), (7, 3))
        self.assertEqual(per_job("nexo_poller_items_seen_total"),
                         {job_id: seen, "flaky": 0, "doomed": 0, "idle": 0})
        self.assertEqual(per_job("nexo_poller_items_dispatched_total"),
                         {job_id: dispatched, "flaky": 0, "doomed": 0, "idle": 0})
        # the last successful tick, by job: only jobs that ever succeeded have one
        last_ok = per_job("nexo_poller_last_success_timestamp_seconds")
        self.assertEqual(set(last_ok), {job_id})
        self.assertAlmostEqual(last_ok[job_id], self.t[0], delta=1.0)
        # the same figures as status()
        st = {s["id"]: s for s in r.status()}
        self.assertEqual(st[job_id]["items_seen_total"], seen)
        self.assertTrue(st["doomed"]["paused"])
        self.assertTrue(st["flaky"]["breaker_open"])
        self.assertEqual(series(samples, "nexo_poller_plugin_restarts_total"), [])

        # a query string is still /metrics; any other path is a 404
        self.assertEqual(fetch(addr, "/metrics?x=1")[0], 200)
        for path in ("/other", "/", "/metrics/extra"):
            with self.subTest(path=path):
                with self.assertRaises(urllib.error.HTTPError) as cm:
                    fetch(addr, path)
                self.assertEqual(cm.exception.code, 404)
                cm.exception.close()

        r.stop()
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(addr, timeout=5).close()

    def test_metrics_follow_scheduler_ticks(self):
        """Ticks dispatched by the scheduler (fire_due) are counted as well."""
        cfg = self.config([self.job("s1", every=10)], metrics_addr="127.0.0.1:0")
        r = self.runner(cfg, Scripted(script={"s1": [
            TickAck(b"1", metrics=TickMetrics(items_seen=5, items_dispatched=5))]}))
        addr = r.metrics_address
        for _ in range(2):
            self.t[0] += 10.001
            self.assertEqual(r.fire_due(), 1)
            self.assertTrue(r.wait_idle(WAIT))
        _, samples = parse_exposition(self, fetch(addr)[2])
        self.assertEqual(series(samples, "nexo_poller_ticks_total", job="s1", outcome="ok"),
                         [({"job": "s1", "kind": "mem", "outcome": "ok"}, 2)])
        self.assertEqual(series(samples, "nexo_poller_items_seen_total", job="s1")[0][1], 5)

    def test_ipv6_metrics_addr(self):
        """The config accepts ``[host]:port`` (it strips the brackets), so the
        endpoint must serve on an IPv6 address too."""
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            self.skipTest("no IPv6 loopback here")
        cfg = self.config([self.job("v6")], metrics_addr="[::1]:0")
        self.assertEqual(cfg.metrics_addr, ("::1", 0))
        r = self.runner(cfg, Scripted(), start=False)
        r.start(background=False)
        port = r.metrics_address[1]
        self.assert_ok(r.run_once("v6"))
        status, _, body = fetch(("[::1]", port))
        self.assertEqual(status, 200)
        _, samples = parse_exposition(self, body)
        self.assertEqual(len(series(samples, "nexo_poller_ticks_total", job="v6")), 1)

    def test_busy_metrics_port_is_one_clear_error(self):
        """``run`` with ``metrics_addr`` on a port already taken: the README's
        CLI promise is one clear line per user error, never a traceback."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            addr = "127.0.0.1:%d" % taken.getsockname()[1]
            cfg_path = os.path.join(self.dir, "pollers.json")
            with open(cfg_path, "w", encoding="utf-8") as f:
                json.dump({"state_db": self.db, "metrics_addr": addr, "jobs": []}, f)
            proc = subprocess.run([sys.executable, NEXO, "--config", cfg_path, "run"],
                                  capture_output=True, text=True, timeout=60, cwd=self.dir,
                                  stdin=subprocess.DEVNULL)
        last = proc.stderr.strip().splitlines()[-1:] or [""]
        self.assertFalse("Traceback" in proc.stderr, f"a traceback, ending {last[0]!r}")
        self.assertNotIn(proc.returncode, (0, 1), proc.stderr)   # 1 means "a tick failed"
        self.assertIn(addr, proc.stderr)

    def test_busy_metrics_port_fails_an_embedded_runner_with_a_config_error(self):
        """The library's own answer, without the CLI's check beforehand: a
        ConfigError naming the address, not an AttributeError from the
        listener's cleanup of a pipe it never made."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            addr = "127.0.0.1:%d" % taken.getsockname()[1]
            r = self.runner(self.config([], metrics_addr=addr), start=False)
            with self.assertRaises(nx.ConfigError) as cm:
                r.start(background=False)
        self.assertIn(addr, str(cm.exception))

    def probe(self, addr, path="/metrics"):
        """A scrape's status, or what went wrong (a probe's view)."""
        try:
            return fetch(addr, path)[0]
        except (OSError, http.client.HTTPException) as exc:
            return repr(exc)

    def test_trickling_clients_do_not_starve_a_scrape(self):
        # More clients than the 16 connection slots, each sending a header
        # byte well within the 10 s read timeout: probes are still answered.
        r = self.runner(self.config([self.job("a")], metrics_addr="127.0.0.1:0"), Scripted())
        addr = r.metrics_address
        slow = []
        for _ in range(20):
            s = socket.create_connection(addr, timeout=WAIT)
            self.addCleanup(s.close)
            s.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            slow.append(s)
        for _ in range(5):
            for s in slow:
                try:
                    s.sendall(b"z")
                except OSError:             # cut off: fine, it is the server's choice
                    pass
            self.assertEqual(self.probe(addr), 200)

    def test_idle_partial_requests_do_not_starve_a_scrape(self):
        r = self.runner(self.config([self.job("a")], metrics_addr="127.0.0.1:0"), Scripted())
        addr = r.metrics_address
        for _ in range(100):
            s = socket.create_connection(addr, timeout=WAIT)
            self.addCleanup(s.close)
            s.sendall(b"GET /metr")
        for _ in range(3):
            self.assertEqual(self.probe(addr), 200)

    def test_ticks_waiting_for_a_busy_lane_are_counted(self):
        # Saturation as an operator sees it: due ticks queued behind a plugin
        # (here an in-process kind) that has no free slot.
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        class Held(Scripted):
            max_concurrent_ticks = 1

            def tick(self, ctx):
                entered.set()
                release.wait(WAIT)
                return TickAck()
        r = self.runner(self.config([self.job(f"j{i}") for i in range(3)]), Held())

        def waiting():
            _, samples = parse_exposition(self, r.metrics.render(r))
            return {lb["lane"]: v for lb, v in series(samples, "nexo_poller_ticks_waiting")}
        self.assertEqual(waiting(), {"kind:mem": 0})
        self.assertEqual(r.fire_due(), 3)
        self.assertTrue(entered.wait(WAIT))
        self.assertEqual(waiting(), {"kind:mem": 2})
        release.set()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertEqual(waiting(), {"kind:mem": 0})

    def test_label_values_are_escaped(self):
        kind = 'we"ird\\kind\nline'            # in-process kinds are free-form
        cfg = self.config([self.job("e.s:c-1", kind=kind)], extra_kinds=[kind],
                          metrics_addr="127.0.0.1:0")
        r = self.runner(cfg, Scripted(kind=kind))
        self.assert_ok(r.run_once("e.s:c-1"))
        body = fetch(r.metrics_address)[2]
        _, samples = parse_exposition(self, body)     # every line still well-formed
        self.assertIn('kind="we\\"ird\\\\kind\\nline"', body)
        self.assertEqual(series(samples, "nexo_poller_ticks_total", job="e.s:c-1"),
                         [({"job": "e.s:c-1", "kind": kind, "outcome": "ok"}, 1)])
        self.assertEqual(series(samples, "nexo_poller_tick_duration_seconds_count", kind=kind)
                         [0][1], 1)
        self.assertEqual(series(samples, "nexo_poller_paused", kind=kind)[0][1], 0)
        self.assertEqual(nx._prom_escape('a\\b"c\nd'), 'a\\\\b\\"c\\nd')


# ============================================================================
# 2. tick log lines
# ============================================================================

TICK_LINE = re.compile(r"tick job=(\S+) kind=(\S+) outcome=(\S+) duration_ms=(\d+\.\d) "
                       r"items_seen=(\d+) items_dispatched=(\d+)(?: error=(.*))?")


class TestNexoMetricNames(Case):
    """nexo's metric set (crates/poller telemetry) served beside this project's,
    so a dashboard built on nexo works: its names, types, labels (``agent``,
    ``job_id``, ``kind``, ``status``), status values and millisecond buckets."""

    NEXO_LE = ["50", "100", "250", "500", "1000", "2500", "5000", "10000", "+Inf"]

    def scrape(self, r):
        types, samples = parse_exposition(self, fetch(r.metrics_address)[2])
        return types, samples

    def test_ticks_items_errors_and_breaker_under_nexo_names(self):
        cfg = self.config([self.job("leads", agent="ana"), self.job("blog", agent="kate"),
                           self.job("gone", agent="kate"), self.job("idle")],
                          breaker_threshold=2, metrics_addr="127.0.0.1:0")
        r = self.runner(cfg, Scripted(script={
            "leads": [TickAck(b"1", metrics=TickMetrics(items_seen=3, items_dispatched=2)),
                      TickAck(b"2", metrics=TickMetrics(items_seen=1, items_dispatched=0))],
            "blog": [PollerError.Transient("503"), PollerError.Transient("503")],
            "gone": [PollerError.Permanent("feed deleted")]}))
        statuses = [r.run_once(j).status for j in ("leads", "leads", "blog", "blog", "gone")]
        self.assertEqual(statuses, ["ok", "ok", "transient", "transient", "permanent"])
        types, samples = self.scrape(r)
        for name, kind in (("poller_ticks_total", "counter"), ("poller_latency_ms", "histogram"),
                           ("poller_items_seen_total", "counter"),
                           ("poller_items_dispatched_total", "counter"),
                           ("poller_consecutive_errors", "gauge"),
                           ("poller_breaker_state", "gauge")):
            self.assertEqual(types.get(name), kind, name)

        ticks = {tuple(sorted(lb.items())): v for lb, v in series(samples, "poller_ticks_total")}
        def key(agent, job, status):
            return (("agent", agent), ("job_id", job), ("kind", "mem"), ("status", status))
        self.assertEqual(ticks, {key("ana", "leads", "ok"): 2,
                                 key("kate", "blog", "transient"): 2,
                                 key("kate", "gone", "permanent"): 1})
        self.assertIn('poller_ticks_total{agent="ana",job_id="leads",kind="mem",status="ok"} 2',
                      fetch(r.metrics_address)[2].splitlines())

        def per_job(name, *labels):
            return {tuple(lb[k] for k in labels): v for lb, v in series(samples, name)}
        self.assertEqual(per_job("poller_items_seen_total", "agent", "job_id", "kind"),
                         {("ana", "leads", "mem"): 4, ("kate", "blog", "mem"): 0,
                          ("kate", "gone", "mem"): 0, ("default", "idle", "mem"): 0})
        self.assertEqual(per_job("poller_items_dispatched_total", "job_id")[("leads",)], 2)
        self.assertEqual(per_job("poller_consecutive_errors", "job_id"),
                         {("leads",): 0, ("blog",): 2, ("gone",): 1, ("idle",): 0})
        # 0 = closed, 2 = open (nexo's values)
        self.assertEqual(per_job("poller_breaker_state", "job_id"),
                         {("leads",): 0, ("blog",): 2, ("gone",): 0, ("idle",): 0})
        for lb, _ in series(samples, "poller_breaker_state"):
            self.assertEqual(set(lb), {"job_id"})

    def test_every_outcome_maps_to_a_nexo_status_and_latency_is_in_ms(self):
        cfg = self.config([self.job("j", agent="ana")], metrics_addr="127.0.0.1:0")
        r = self.runner(cfg, Scripted())
        expected = {"ok": "ok", "transient": "transient", "permanent": "permanent",
                    "config": "permanent", "leased": "skipped", "cancelled": "skipped",
                    "busy": "skipped", "unstored": "transient"}
        self.assertEqual(set(expected), {s.value for s in nx.TickStatus})
        durations = {"ok": 0.07, "transient": 0.3, "permanent": 12.0, "config": 0.05,
                     "unstored": 2.0}
        for status in expected:
            r.metrics.observe(nx.TickOutcome("j", "mem", status,
                                             duration=durations.get(status, 0.0)),
                              agent="ana")
        _, samples = self.scrape(r)
        got = {lb["status"]: v for lb, v in series(samples, "poller_ticks_total", job_id="j")}
        self.assertEqual(got, {"ok": 1, "transient": 2, "permanent": 2, "skipped": 3})
        # only ticks that ran are timed, in milliseconds, in nexo's buckets
        buckets = series(samples, "poller_latency_ms_bucket", agent="ana", job_id="j",
                         kind="mem")
        self.assertEqual([lb["le"] for lb, _ in buckets], self.NEXO_LE)
        ms = [d * 1000 for d in durations.values()]
        for lb, v in buckets:
            le = float("inf") if lb["le"] == "+Inf" else float(lb["le"])
            self.assertEqual(v, sum(1 for m in ms if m <= le), lb["le"])
        [(_, count)] = series(samples, "poller_latency_ms_count", job_id="j")
        [(_, total)] = series(samples, "poller_latency_ms_sum", job_id="j")
        self.assertEqual(count, 5)
        self.assertAlmostEqual(total, sum(ms), places=2)


    def test_per_job_histograms_are_no_objects_for_the_garbage_collector(self):
        # Issue 27 item 1: nexo's latency histogram, one per job for the
        # daemon's life, was a list each: 100,000 more objects that every
        # full collection walked.  Their rows now live in one array.
        import gc
        metrics = nx._Metrics()
        outcomes = [nx.TickOutcome(f"job-{i}", "mem", "ok", duration=0.01) for i in range(2000)]
        gc.collect()
        before = len(gc.get_objects())
        for outcome in outcomes:
            metrics.observe(outcome, agent="a")
        gc.collect()
        self.assertLess(len(gc.get_objects()) - before, 500)

class TestTickLogs(Case):

    @staticmethod
    def tick_records(records):
        return [rec for rec in records if rec.getMessage().startswith("tick ")]

    def test_one_line_per_tick_with_its_fields(self):
        cfg = self.config([self.job("ok1"), self.job("flaky"), self.job("doomed")])
        r = self.runner(cfg, Scripted(script={
            "ok1": [TickAck(b"1", metrics=TickMetrics(items_seen=3, items_dispatched=2))] * 2,
            "flaky": [PollerError.Transient("upstream 503")],
            "doomed": [PollerError.Permanent("feed deleted")]}))
        with self.assertLogs("nexo_poller", "INFO") as cm:
            outcomes = [r.run_once("ok1"), r.run_once("ok1"), r.run_once("flaky"),
                        r.run_once("doomed")]
        self.assertEqual([o.status for o in outcomes], ["ok", "ok", "transient", "permanent"])
        ticks = self.tick_records(cm.records)
        self.assertEqual(len(ticks), 4, [rec.getMessage() for rec in ticks])
        fmt = nx._JsonFormatter()
        for rec, o in zip(ticks, outcomes):
            with self.subTest(job=o.job_id, outcome=o.status):
                msg = rec.getMessage()
                m = TICK_LINE.fullmatch(msg)
                self.assertIsNotNone(m, msg)
                job, kind, outcome, duration_ms, seen, dispatched, error = m.groups()
                self.assertEqual((job, kind, outcome), (o.job_id, "mem", o.status))
                self.assertAlmostEqual(float(duration_ms), o.duration * 1000, delta=0.051)
                if o.status == "ok":
                    self.assertEqual(rec.levelno, logging.INFO)
                    self.assertEqual((seen, dispatched), ("3", "2"))
                    self.assertIsNone(error)
                else:
                    self.assertEqual(rec.levelno, logging.WARNING)
                    self.assertEqual((seen, dispatched), ("0", "0"))
                    self.assertEqual(error, o.error)
                    self.assertIn({"transient": "upstream 503",
                                   "permanent": "feed deleted"}[o.status], error)
                # the structured copy on the record
                tick = getattr(rec, "tick", None)
                self.assertIsInstance(tick, dict)
                self.assertLessEqual(TICK_KEYS, set(tick))
                self.assertEqual((tick["job"], tick["kind"], tick["outcome"]),
                                 (o.job_id, "mem", o.status))
                self.assertEqual(tick["duration_ms"], round(o.duration * 1000, 3))
                self.assertEqual((tick["items_seen"], tick["items_dispatched"]),
                                 (3, 2) if o.status == "ok" else (0, 0))
                # --log-format json: one object on one line
                line = fmt.format(rec)
                self.assertNotIn("\n", line)
                doc = json.loads(line)
                self.assertIsInstance(doc, dict)
                self.assertEqual(doc["level"], rec.levelname.lower())
                self.assertEqual(doc["msg"], msg)
                for key in TICK_KEYS:
                    self.assertEqual(doc[key], tick[key], key)
        for rec in cm.records:                       # non-tick lines are JSON too
            doc = json.loads(fmt.format(rec))
            self.assertIn("level", doc)

    def test_json_formatter_keeps_a_traceback_on_one_line(self):
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            rec = logging.getLogger("nexo_poller").makeRecord(
                "nexo_poller", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
        line = nx._JsonFormatter().format(rec)
        self.assertNotIn("\n", line)
        doc = json.loads(line)
        self.assertEqual((doc["level"], doc["msg"]), ("error", "failed x"))
        self.assertIn("RuntimeError: boom", doc["exc"])

    def test_job_config_is_never_logged(self):
        """A secret in job config appears in no log record at DEBUG, whatever the
        tick's outcome and whichever way the kind is served."""
        conf = {"token": SECRET, "nested": {"headers": [f"Bearer {SECRET}"]}}
        eph = self.manifest("eph", "obs_eph", "counter", SDK_PLUGIN, lifecycle="ephemeral")
        lived = self.manifest("lived", "obs_lived", "lcounter", E2E_PLUGIN, args=["lcounter"])
        jobs = [self.job("m_ok", config=conf), self.job("m_tr", config=conf),
                self.job("m_pm", config=conf), self.job("m_bug", config=conf),
                self.job("e_ok", kind="counter", config=conf),
                self.job("e_tr", kind="counter", config=dict(conf, **{"raise": "transient"})),
                self.job("e_pm", kind="counter", config=dict(conf, **{"raise": "permanent"})),
                self.job("l_ok", kind="lcounter", config=conf),
                self.job("l_tr", kind="lcounter", config=dict(conf, fail="transient")),
                self.job("l_pm", kind="lcounter", config=dict(conf, fail="permanent"))]
        poller = Scripted(script={"m_ok": [TickAck(b"1", metrics=TickMetrics(items_seen=1))],
                                  "m_tr": [PollerError.Transient("upstream 503")],
                                  "m_pm": [PollerError.Permanent("feed deleted")],
                                  "m_bug": [RuntimeError("poller bug")]})
        with self.assertLogs("nexo_poller", "DEBUG") as cm:
            r = self.runner(self.config(jobs, plugins=[eph, lived]), poller)
            got = {j["id"]: r.run_once(j["id"]).status for j in jobs}
            r.stop()
        self.assertEqual(got, {"m_ok": "ok", "m_tr": "transient", "m_pm": "permanent",
                               "m_bug": "transient", "e_ok": "ok", "e_tr": "transient",
                               "e_pm": "permanent", "l_ok": "ok", "l_tr": "transient",
                               "l_pm": "permanent"})
        # not vacuous: every tick was logged, and DEBUG records were captured
        self.assertEqual(sorted(rec.tick["job"] for rec in self.tick_records(cm.records)),
                         sorted(got))
        self.assertTrue(any(rec.levelno == logging.DEBUG for rec in cm.records))
        text_fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        json_fmt = nx._JsonFormatter()
        for rec in cm.records:
            for out in (text_fmt.format(rec), json_fmt.format(rec), repr(vars(rec))):
                self.assertNotIn(SECRET, out, f"secret logged: {out[:300]!r}")

    def test_cli_json_logs_and_no_secret(self):
        """``--log-level debug --log-format json tick JOB``: every stderr line is
        one JSON object, the tick line carries its fields, the secret never shows."""
        eph = self.manifest("eph", "obs_eph", "e2e_counter", E2E_PLUGIN, lifecycle="ephemeral")
        conf = {"token": SECRET}
        cfg_path = os.path.join(self.dir, "pollers.json")
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump({"state_db": self.db, "default_jitter_ms": 0, "plugins": [eph],
                       "jobs": [self.job("c_ok", kind="e2e_counter", config=conf),
                                self.job("c_tr", kind="e2e_counter",
                                         config=dict(conf, fail="transient")),
                                self.job("c_pm", kind="e2e_counter",
                                         config=dict(conf, fail="permanent"))]}, f)
        for job, outcome, code in (("c_ok", "ok", 0), ("c_tr", "transient", 1),
                                   ("c_pm", "permanent", 1)):
            with self.subTest(job=job):
                proc = subprocess.run(
                    [sys.executable, NEXO, "--config", cfg_path, "--log-level", "debug",
                     "--log-format", "json", "tick", job],
                    capture_output=True, text=True, timeout=60, cwd=self.dir,
                    stdin=subprocess.DEVNULL)
                self.assertEqual(proc.returncode, code, proc.stderr)
                self.assertNotIn(SECRET, proc.stderr)
                docs = []
                for line in proc.stderr.splitlines():
                    doc = json.loads(line)          # every line, not only tick lines
                    self.assertIsInstance(doc, dict)
                    self.assertIn(doc.get("level"), {"debug", "info", "warning", "error"})
                    docs.append(doc)
                ticks = [d for d in docs if d.get("msg", "").startswith("tick ")]
                self.assertEqual(len(ticks), 1, proc.stderr)
                self.assertLessEqual(TICK_KEYS, set(ticks[0]))
                self.assertEqual((ticks[0]["job"], ticks[0]["kind"], ticks[0]["outcome"]),
                                 (job, "e2e_counter", outcome))
                self.assertEqual(ticks[0]["level"], "info" if outcome == "ok" else "warning")
                if outcome == "ok":
                    self.assertEqual((ticks[0]["items_seen"], ticks[0]["items_dispatched"]),
                                     (1, 1))


# ============================================================================
# 3. reload of long-lived plugins
# ============================================================================

class TestPluginReload(Case):

    def counter_manifest(self, gen, **kw):
        report = os.path.join(self.dir, f"report-{gen}.json")
        env = {"SDK_PLUGIN_REPORT": report, "FIXTURE_GEN": str(gen)}
        return self.manifest("counter", "obs_counter", "counter", SDK_PLUGIN, env=env, **kw), \
            report

    def read_report(self, path):
        def load():
            try:
                with open(path, encoding="utf-8") as f:
                    return json.load(f)
            except FileNotFoundError:
                return None
        doc = wait_until(load)
        self.assertIsNotNone(doc, f"the plugin never wrote {path}")
        return doc

    def test_changed_manifest_restarts_unchanged_keeps(self):
        path, report1 = self.counter_manifest(1)
        jobs = [self.job("c1", kind="counter")]
        r = self.runner(self.config(jobs, plugins=[path]))
        pid1 = self.plugin_pid(r, "obs_counter")
        self.assertEqual(self.read_report(report1)["pid"], pid1)
        self.assertEqual(self.assert_ok(r.run_once("c1")).ack.next_cursor, b"1")

        # the same manifest, read again: nothing restarts
        sup = r.supervisors()["obs_counter"]
        diff = r.reload(self.config(jobs, plugins=[path]))
        self.assertEqual(diff["restarted"], [])
        self.assertEqual(diff["kept"], ["c1"])
        self.assertIs(r.supervisors()["obs_counter"], sup)
        self.assertEqual(self.plugin_pid(r, "obs_counter"), pid1)
        self.assertFalse(pid_gone(pid1))
        self.assertEqual(self.assert_ok(r.run_once("c1")).ack.next_cursor, b"2")

        # a different entrypoint env: a new process, with the new env
        path, report2 = self.counter_manifest(2)
        diff = r.reload(self.config(jobs, plugins=[path]))
        self.assertEqual(diff["restarted"], ["obs_counter"])
        self.assertEqual(diff["kept"], ["c1"])
        self.assertTrue(wait_until(lambda: pid_gone(pid1)), f"old plugin {pid1} still there")
        pid2 = self.plugin_pid(r, "obs_counter", not_pid=pid1)
        rep = self.read_report(report2)
        self.assertEqual((rep["pid"], rep["env"].get("FIXTURE_GEN")), (pid2, "2"))
        self.assertEqual(self.assert_ok(r.run_once("c1")).ack.next_cursor, b"3")

        # a different tick timeout: restarted again, the router has the new handle
        path, report3 = self.counter_manifest(2, timeout=20)
        diff = r.reload(self.config(jobs, plugins=[path]))
        self.assertEqual(diff["restarted"], ["obs_counter"])
        self.assertTrue(wait_until(lambda: pid_gone(pid2)), f"old plugin {pid2} still there")
        pid3 = self.plugin_pid(r, "obs_counter", not_pid=pid2)
        self.assertNotIn(pid3, (pid1, pid2))
        self.assertEqual(r.router.handles_for_plugin("obs_counter").tick_timeout,
                         timedelta(seconds=20))
        self.assertEqual(self.assert_ok(r.run_once("c1")).ack.next_cursor, b"4")
        self.assertEqual(r.status()[0]["cursor"], nx.encode_cursor(b"4"))

    def test_remove_and_add_plugins(self):
        path, _ = self.counter_manifest(1)
        r = self.runner(self.config([self.job("c1", kind="counter")], plugins=[path]))
        pid_a = self.plugin_pid(r, "obs_counter")
        self.assert_ok(r.run_once("c1"))

        added = self.manifest("gauge", "obs_gauge", "gauge", E2E_PLUGIN, args=["gauge"])
        diff = r.reload(self.config([self.job("g1", kind="gauge")], plugins=[added]))
        self.assertEqual((diff["removed"], diff["added"], diff["restarted"]),
                         (["c1"], ["g1"], []))
        # the removed plugin: its process ends, nothing routes to it any more
        self.assertTrue(wait_until(lambda: pid_gone(pid_a)), f"removed plugin {pid_a} runs on")
        self.assertNotIn("obs_counter", r.supervisors())
        self.assertIsNone(r.router.handle_for_kind("counter"))
        with self.assertRaises(KeyError):
            r.run_once("c1")
        # the added plugin: started, and its job ticks
        pid_b = self.plugin_pid(r, "obs_gauge")
        self.assertNotEqual(pid_b, pid_a)
        o = self.assert_ok(r.run_once("g1"))
        self.assertEqual((o.ack.next_cursor, o.ack.metrics.items_seen), (b"1", 1))
        self.assertEqual([s["id"] for s in r.status()], ["g1"])

        r.stop()
        self.assertTrue(wait_until(lambda: pid_gone(pid_b)), f"plugin {pid_b} outlived stop()")


# ============================================================================
# 4. nexo_poller_plugin_restarts_total
# ============================================================================

class TestPluginRestartMetric(Case):

    def test_restart_after_sigkill_is_counted(self):
        path = self.manifest("counter", "obs_counter", "counter", SDK_PLUGIN)
        r = self.runner(self.config([self.job("c1", kind="counter")], plugins=[path],
                                    metrics_addr="127.0.0.1:0"))
        addr = r.metrics_address

        def restarts():
            _, samples = parse_exposition(self, fetch(addr)[2])
            got = series(samples, "nexo_poller_plugin_restarts_total")
            self.assertEqual([lb for lb, _ in got], [{"plugin": "obs_counter"}])
            return got[0][1]

        pid1 = self.plugin_pid(r, "obs_counter")
        self.assertEqual(restarts(), 0)
        self.assert_ok(r.run_once("c1"))
        sup = r.supervisors()["obs_counter"]

        os.kill(pid1, signal.SIGKILL)
        pid2 = self.plugin_pid(r, "obs_counter", not_pid=pid1)
        self.assertTrue(wait_until(lambda: sup.restarts >= 1))
        self.assertEqual(sup.restarts, 1)
        self.assertEqual(restarts(), 1)
        self.assertTrue(pid_gone(pid1))
        self.assertNotEqual(pid2, pid1)
        o = self.assert_ok(r.run_once("c1"))             # and it serves ticks again
        self.assertEqual(o.ack.next_cursor, b"2")


if __name__ == "__main__":
    unittest.main()
