"""Per-job policy overrides (issue 25 item 1): ``timeout_secs``,
``backoff_initial_secs``/``backoff_max_secs``, ``breaker_threshold``,
``failure_alert_cooldown_secs`` and ``jitter_ms`` on a job of pollers.json
over the global values; ``validate --policy`` and ``status JOB`` show the
effective values and where each came from."""

import json
import os
import random
import sys
import threading
import unittest
from unittest import mock
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import (FakePoller, TempDirCase, main_in_process, write_config,  # noqa: E402
                     write_manifest)
import nexo_poller as nx  # noqa: E402
from nexo_poller import (ConfigError, DaemonConfig, JobState, PollerError, Schedule,  # noqa: E402
                         TickAck, TickOutcome, TickStatus, config_from_dict, plan_tick)

T0 = 1_900_000_000.0
WAIT = 15.0
GLOBAL = DaemonConfig(default_jitter_ms=0, backoff_initial_secs=30.0, backoff_max_secs=300.0,
                      breaker_threshold=5, failure_alert_cooldown_secs=3600)
EVERY = Schedule(every_secs=60)


class _Rng(random.Random):
    """uniform(a, b) gives ``a`` (no jitter) or, with ``high``, ``b`` (the bound)."""
    def __init__(self, high=False):
        super().__init__(0)
        self.high = high

    def uniform(self, a, b):
        return b if self.high else a


def job(job_id="a", **keys):
    return {"id": job_id, "kind": "mem", "schedule": {"every_secs": 60}, **keys}


def config(*jobs, **top):
    doc = {"state_db": "/nonexistent/s.db", "jobs": list(jobs), **top}
    return config_from_dict(doc, extra_kinds=["mem"])


def policy(cfg, job_id="a"):
    return nx.JobPolicy.of(cfg, next(j for j in cfg.jobs if j.id == job_id))


def plan(state, status, pol, *, cfg=GLOBAL, schedule=EVERY, started=T0, rng=None):
    outcome = TickOutcome(state.id, "mem", status, error="boom" if status != "ok" else None,
                          ack=TickAck() if status == "ok" else None)
    return plan_tick(state, outcome, schedule=schedule, slot=T0, started=started,
                     finished=started, config=cfg, rng=rng or _Rng(), schedule_key="k",
                     policy=pol)


class ConfigTests(unittest.TestCase):

    def test_job_keys_override_and_say_where_each_came_from(self):
        cfg = config(job("a", timeout_secs=2.5, backoff_initial_secs=5, backoff_max_secs=50,
                         breaker_threshold=2, failure_alert_cooldown_secs=60, jitter_ms=700,
                         catchup="all", catchup_window_secs=600, run_history=7),
                     job("b"), breaker_threshold=7)
        a, b = policy(cfg, "a"), policy(cfg, "b")
        self.assertEqual((a.timeout_secs, a.backoff_initial_secs, a.backoff_max_secs,
                          a.breaker_threshold, a.failure_alert_cooldown_secs, a.jitter_ms),
                         (2.5, 5, 50, 2, 60, 700))
        self.assertEqual(a.run_history, 7)
        self.assertEqual(set(a.sources.values()), {"job"})
        self.assertEqual((b.timeout_secs, b.backoff_initial_secs, b.breaker_threshold,
                          b.failure_alert_cooldown_secs, b.jitter_ms), (None, 30.0, 7, 3600, 5000))
        self.assertEqual(b.sources, {"timeout_secs": "default",
                                     "backoff_initial_secs": "default",
                                     "backoff_max_secs": "default",
                                     "breaker_threshold": "config",
                                     "failure_alert_cooldown_secs": "default",
                                     "jitter_ms": "default", "catchup": "default",
                                     "catchup_window_secs": "default",
                                     "run_history": "default"})
        self.assertEqual(b.run_history, nx.RUN_HISTORY_KEEP)
        c = policy(config(job("a"), run_history=3))
        self.assertEqual((c.run_history, c.sources["run_history"]), (3, "config"))

    def test_alike_jobs_share_one_policy_which_follows_the_config(self):
        # Issue 27 item 1: JobPolicy.of worked its rule out at every tick.
        cfg = config(job("a"), job("b"), job("c", breaker_threshold=2))
        self.assertIs(policy(cfg, "a"), policy(cfg, "b"))
        self.assertIsNot(policy(cfg, "a"), policy(cfg, "c"))
        cfg.breaker_threshold = 9               # changed in place: never a stale policy
        self.assertEqual((policy(cfg, "a").breaker_threshold,
                          policy(cfg, "a").sources["breaker_threshold"]), (9, "config"))
        self.assertEqual(policy(cfg, "c").breaker_threshold, 2)
        with self.assertRaises(TypeError):      # shared, so read-only
            policy(cfg, "a").sources["breaker_threshold"] = "job"

    def test_jitter_ms_is_the_schedules_jitter_and_not_both(self):
        cfg = config(job("a", jitter_ms=700), job("b", schedule={"every_secs": 60,
                                                                 "stagger_jitter_ms": 90}))
        self.assertEqual(cfg.jobs[0].schedule.stagger_jitter_ms, 700)
        self.assertEqual((policy(cfg, "b").jitter_ms, policy(cfg, "b").sources["jitter_ms"]),
                         (90, "job"))
        with self.assertRaises(ConfigError) as cm:
            config(job("a", jitter_ms=1, schedule={"every_secs": 60, "stagger_jitter_ms": 2}))
        self.assertIn("jobs[0].jitter_ms", str(cm.exception))

    def test_bad_values_are_refused_naming_the_key(self):
        cases = [("timeout_secs", "10", "must be a number, got string"),
                 ("timeout_secs", 0, "0 is outside 0.001..3600"),
                 ("backoff_initial_secs", True, "must be a number, got boolean"),
                 ("backoff_max_secs", -1, "-1 is outside"),
                 ("breaker_threshold", 2.5, "must be an integer, got number"),
                 ("breaker_threshold", 0, "0 is outside 1..1000000"),
                 ("failure_alert_cooldown_secs", -5, "-5 is outside 0..1000000000"),
                 ("jitter_ms", 1.5, "must be an integer, got number"),
                 ("jitter_ms", None, "must be an integer, got null"),
                 ("run_history", -1, "-1 is outside 0..100000"),
                 ("run_history", 2.5, "must be an integer, got number")]
        for key, value, message in cases:
            with self.subTest(key=key, value=value):
                with self.assertRaises(ConfigError) as cm:
                    config(job("a", **{key: value}))
                text = str(cm.exception)
                self.assertIn(f"jobs[0].{key}", text)
                self.assertIn(message, text)

    def test_unknown_job_keys_are_still_refused(self):
        with self.assertRaises(ConfigError) as cm:
            config(job("a", timeout=3))
        self.assertIn("jobs[0].timeout: unknown key", str(cm.exception))
        self.assertIn("timeout_secs", str(cm.exception), "the allowed keys list the new ones")


class PlanTests(unittest.TestCase):

    def test_backoff_slot_follows_the_jobs_backoff(self):
        own = policy(config(job("a", backoff_initial_secs=5, backoff_max_secs=12)))
        s = JobState("a")
        delays = []
        for _ in range(4):
            p = plan(s, TickStatus.TRANSIENT, own)
            delays.append(p.run_at - T0)
            s = p.state
        self.assertEqual(delays, [5, 10, 12, 12])
        self.assertEqual(plan(JobState("a"), TickStatus.TRANSIENT, None).run_at, T0 + 30,
                         "without a policy the global backoff holds")

    def test_breaker_opens_at_the_jobs_threshold(self):
        own = policy(config(job("a", breaker_threshold=2)))
        first = plan(JobState("a"), TickStatus.TRANSIENT, own)
        self.assertIsNone(first.alert)
        self.assertIn("circuit breaker open after 2", plan(first.state, TickStatus.TRANSIENT,
                                                           own).alert)
        deflt = policy(config(job("a")))
        self.assertIsNone(plan(first.state, TickStatus.TRANSIENT, deflt).alert,
                          "the global threshold (5) is not reached at 2")

    def test_alert_cooldown_is_the_jobs(self):
        s = JobState("a", consecutive_errors=9, last_alert_at=T0 - 61)
        own = policy(config(job("a", failure_alert_cooldown_secs=60)))
        self.assertIsNotNone(plan(s, TickStatus.TRANSIENT, own).alert)
        self.assertIsNone(plan(s, TickStatus.TRANSIENT, policy(config(job("a")))).alert,
                          "the global cooldown (3600 s) still holds for a job without one")

    def test_jitter_is_bounded_by_the_jobs_jitter_ms(self):
        cfg = config(job("a", jitter_ms=800), job("b"), default_jitter_ms=0)
        for jc, bound in ((cfg.jobs[0], 0.8), (cfg.jobs[1], 0.0)):
            p = plan(JobState(jc.id), TickStatus.OK, nx.JobPolicy.of(cfg, jc), cfg=cfg,
                     schedule=jc.schedule, rng=_Rng(high=True))
            self.assertAlmostEqual(p.run_at - p.slot, bound)


class _Sleeper:
    """An in-process poller whose ticks, given a timeout, wait for their cancel."""
    kind = "mem"

    def __init__(self):
        self.timeouts = []

    def tick(self, ctx):
        self.timeouts.append(ctx.timeout)
        if ctx.timeout is not None:
            ctx.cancel.wait(WAIT)
        return TickAck(next_cursor=b"done")


class RunnerTests(TempDirCase):

    def setUp(self):
        super().setUp()
        self.t = [T0]

    def test_an_in_process_tick_times_out_at_the_jobs_timeout(self):
        cfg = self.runner_config([job("slow", timeout_secs=0.2), job("quick")])
        poller = _Sleeper()
        r = self.start_runner(cfg, poller, clock=lambda: self.t[0])
        out = r.run_once("slow")
        self.assertEqual(out.status, TickStatus.TRANSIENT)
        self.assertIn("timed out after 0.2s", out.error)
        self.assertIsNone(r.state.load(["slow"])["slow"].cursor, "a timed-out tick commits "
                                                                 "no cursor")
        self.assertEqual(r.run_once("quick").status, TickStatus.OK)
        self.assertEqual(poller.timeouts, [timedelta(seconds=0.2), None])

    def test_a_dry_run_keeps_the_jobs_timeout(self):
        cfg = self.runner_config([job("slow", timeout_secs=0.2)])
        r = self.start_runner(cfg, _Sleeper(), clock=lambda: self.t[0])
        out = r.dry_run("slow")
        self.assertEqual(out.status, TickStatus.TRANSIENT)
        self.assertIn("timed out after 0.2s", out.error)

    def test_the_lease_follows_the_jobs_timeout(self):
        cfg = self.runner_config([job("long", timeout_secs=600, schedule={"every_secs": 1}),
                                  job("plain", schedule={"every_secs": 1})])
        r = self.start_runner(cfg, FakePoller(), clock=lambda: self.t[0])
        for job_id in ("long", "plain"):
            self.assertEqual(r.run_once(job_id).status, TickStatus.OK)
        leases = {i: s.lease_until - T0 for i, s in r.state.load(["long", "plain"]).items()}
        self.assertEqual(leases, {"long": 630.0, "plain": 30.0})

    def test_status_rows_use_the_jobs_threshold_and_show_the_policy(self):
        cfg = self.runner_config([job("a", breaker_threshold=2), job("b")])
        fail = PollerError.Transient("down")
        r = self.start_runner(cfg, FakePoller(default=fail), clock=lambda: self.t[0])
        for _ in range(2):
            r.run_once("a")
            r.run_once("b")
        rows = {s["id"]: s for s in r.status()}
        self.assertEqual((rows["a"]["breaker_open"], rows["b"]["breaker_open"]), (True, False))
        self.assertEqual(rows["a"]["policy"]["breaker_threshold"],
                         {"value": 2, "source": "job"})
        self.assertEqual(rows["b"]["policy"]["timeout_secs"], {"value": 5.0, "source": "default"})

    def test_status_shares_the_work_of_alike_jobs_not_their_rows(self):
        # status() works a policy out once for the jobs it cannot tell apart
        # (same kind, own keys, jitter); each row still gets its own view.
        cfg = self.runner_config([job("a", breaker_threshold=2), job("b"), job("c"),
                                  job("d", jitter_ms=700), job("e", breaker_threshold=3)])
        r = self.start_runner(cfg, FakePoller(), clock=lambda: self.t[0])
        calls = []
        real = nx.JobPolicy.of
        with mock.patch.object(nx.JobPolicy, "of", side_effect=lambda c, j: (
                calls.append(j.id), real(c, j))[1]):
            rows = {s["id"]: s["policy"] for s in r.status()}
        self.assertEqual(sorted(calls), ["a", "b", "d", "e"], "c is b's twin")
        self.assertEqual([rows[i]["breaker_threshold"]["value"] for i in "abcde"],
                         [2, 5, 5, 5, 3])
        self.assertEqual([rows[i]["jitter_ms"] for i in "bd"],
                         [{"value": 0, "source": "config"}, {"value": 700, "source": "job"}])
        rows["b"]["breaker_threshold"]["value"] = 99
        self.assertEqual(rows["c"]["breaker_threshold"]["value"], 5, "rows are not shared")


class PluginTimeoutTests(TempDirCase):

    def test_an_ephemeral_plugins_tick_ends_at_the_jobs_timeout(self):
        write_manifest(self.dir, "sleepy", "zz", command=sys.executable,
                       args=("-c", "import time; time.sleep(30)"), tick_timeout_secs=60)
        handle = nx.load_manifest(os.path.join(self.dir, "plugins", "sleepy",
                                               "nexo-plugin.toml"))
        ctx = nx.PollContext("a", "default", "zz", None, {}, datetime.now(timezone.utc),
                             timedelta(seconds=60), threading.Event(),
                             timeout=timedelta(seconds=0.3))
        with self.assertRaises(PollerError) as cm:
            nx.EphemeralPollerProxy("zz", handle).tick(ctx)
        self.assertIs(cm.exception.classify(), nx.ErrorClass.TRANSIENT)


class CliTests(TempDirCase):

    def write(self):
        write_manifest(self.dir, "p", "zz", command=sys.executable, args=("-c", "pass"),
                       tick_timeout_secs=40)
        doc = {"state_db": os.path.join(self.dir, "s.db"), "plugins": ["plugins/p"],
               "backoff_max_secs": 100,
               "jobs": [{"id": "a", "kind": "zz", "schedule": {"every_secs": 60},
                         "breaker_threshold": 3, "timeout_secs": 9},
                        {"id": "b", "kind": "zz", "schedule": {"every_secs": 60}}]}
        return write_config(os.path.join(self.dir, "pollers.json"), doc)

    def test_validate_policy_prints_values_and_sources(self):
        path = self.write()
        code, out, err = main_in_process(["--config", path, "validate", "--policy"])
        self.assertEqual(code, 0, err)
        lines = [line.split() for line in out.splitlines()]
        b = lines[lines.index(["job", "b", "(kind", "zz):"]):]
        self.assertIn(["breaker_threshold", "3", "job"], lines)
        self.assertIn(["timeout_secs", "9", "job"], lines)
        self.assertIn(["timeout_secs", "40.0", "plugin"], b)
        self.assertIn(["backoff_max_secs", "100", "config"], b)
        self.assertIn(["breaker_threshold", "5", "default"], b)

    def test_status_job_shows_its_policy(self):
        path = self.write()
        code, out, err = main_in_process(["--config", path, "status", "a", "--json"])
        self.assertEqual(code, 0, err)
        row = json.loads(out)
        self.assertEqual(row["id"], "a")
        self.assertEqual(row["policy"]["timeout_secs"], {"value": 9, "source": "job"})
        self.assertEqual(row["policy"]["backoff_max_secs"], {"value": 100, "source": "config"})
        code, out, err = main_in_process(["--config", path, "status", "a"])
        self.assertEqual(code, 0, err)
        self.assertIn("policy of a:", out)
        self.assertNotIn("\nb ", out, "only the job asked for")
        self.assertIn(["breaker_threshold", "3", "job"], [x.split() for x in out.splitlines()])


if __name__ == "__main__":
    unittest.main()
