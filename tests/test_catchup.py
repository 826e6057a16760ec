"""Catch-up and backfill (issue 25 item 2): ``catchup`` ("one", "all",
"none") and ``catchup_window_secs`` per job and global; every tick carries
the scheduled time of its slot (``scheduled_at`` on the wire,
``PollContext.scheduled_at``); ``backfill JOB --from T1 --to T2 [--yes]``.

Time is driven through the injected clock and ``fire_due()``; nothing sleeps.
"""

import contextlib
import io
import json
import logging
import os
import random
import sys
import threading
import unittest
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import FakePoller, PY, main_in_process, wait_until, write_config  # noqa: E402
from support import write_manifest  # noqa: E402
from test_runner import T0, RunnerCase  # noqa: E402

import nexo_poller as nx  # noqa: E402
from nexo_poller import (ConfigError, CronExpr, DaemonConfig, JobState, PollContext,  # noqa: E402
                         Schedule, TickAck, TickOutcome, catch_up, config_from_dict, plan_tick)

SDK_PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sdk_plugin.py")
EVERY = Schedule(every_secs=10)
WAIT = 15.0


def utc(ts):
    return datetime.fromtimestamp(ts, timezone.utc)


class _NoJitter(random.Random):
    def uniform(self, a, b):
        return a


class CatchUpRuleTests(unittest.TestCase):
    """``catch_up``, the pure rule: (the slot to run, how many are skipped)."""

    def test_a_slot_not_in_the_past_stands_whatever_the_mode(self):
        for mode in ("one", "all", "none"):
            self.assertEqual(catch_up(EVERY, T0 + 10, T0 + 10, mode, 1), (T0 + 10, 0))
        self.assertEqual(catch_up(EVERY, None, T0, "none"), (None, 0))

    def test_one_and_all_run_the_missed_slot_none_skips_to_the_next_future_one(self):
        self.assertEqual(catch_up(EVERY, T0 + 10, T0 + 35, "one"), (T0 + 10, 0))
        self.assertEqual(catch_up(EVERY, T0 + 10, T0 + 35, "all"), (T0 + 10, 0))
        self.assertEqual(catch_up(EVERY, T0 + 10, T0 + 35, "none"), (T0 + 40, 3))

    def test_slots_older_than_the_window_are_skipped_and_counted(self):
        # window 15 s at T0+35: T0+10 and T0+20 are older than T0+20 -> T0+30 runs
        self.assertEqual(catch_up(EVERY, T0 + 10, T0 + 35, "one", 15), (T0 + 30, 2))
        self.assertEqual(catch_up(EVERY, T0 + 10, T0 + 35, "all", 15), (T0 + 30, 2))
        self.assertEqual(catch_up(EVERY, T0 + 10, T0 + 35, "one", 30), (T0 + 10, 0))
        # no slot within the window: the next future one
        self.assertEqual(catch_up(EVERY, T0 + 10, T0 + 35, "one", 2), (T0 + 40, 3))

    def test_cron_slots_are_counted_one_by_one(self):
        cron = Schedule(cron=CronExpr("*/5 * * * *"))
        s = (int(T0) // 300 + 1) * 300.0                 # a 5-minute boundary
        now = s + 17 * 60
        self.assertEqual(catch_up(cron, s, now, "none"), (s + 20 * 60, 4))
        self.assertEqual(catch_up(cron, s, now, "all", 6 * 60), (s + 15 * 60, 3))

    def test_a_missed_one_shot_is_skipped_by_none(self):
        at = Schedule(at=utc(T0))
        self.assertEqual(catch_up(at, T0, T0 + 5, "none"), (None, 1))
        self.assertEqual(catch_up(at, T0, T0 + 5, "one"), (T0, 0))


class PlanTests(unittest.TestCase):

    @staticmethod
    def plan(status="ok", catchup="all", window=None, slot=T0 + 10, at=T0 + 35):
        cfg = DaemonConfig(default_jitter_ms=0, catchup=catchup, catchup_window_secs=window)
        outcome = TickOutcome("a", "mem", status, ack=TickAck() if status == "ok" else None,
                              error=None if status == "ok" else "boom")
        return plan_tick(JobState("a"), outcome, schedule=EVERY, slot=slot, started=at,
                         finished=at, config=cfg, rng=_NoJitter())

    def test_all_goes_on_to_the_next_missed_slot_one_and_none_to_the_future(self):
        self.assertEqual((self.plan().slot, self.plan().run_at), (T0 + 20, T0 + 20))
        self.assertEqual(self.plan(catchup="one").slot, T0 + 40)
        self.assertEqual(self.plan(catchup="none").slot, T0 + 40)

    def test_all_skips_the_slots_older_than_the_window_and_counts_them(self):
        p = self.plan(window=10)            # T0+20 is older than T0+25: T0+30 is next
        self.assertEqual((p.slot, p.skipped), (T0 + 30, 1))
        self.assertEqual(self.plan().skipped, 0)

    def test_all_retries_the_failed_slot_after_the_backoff(self):
        p = self.plan("transient")
        self.assertEqual(p.slot, T0 + 10, "the retry stands for the slot that failed")
        self.assertEqual(p.run_at, T0 + 35 + 30, "after the backoff")
        self.assertEqual(self.plan("transient", catchup="one").slot, T0 + 65)


class ConfigTests(unittest.TestCase):

    @staticmethod
    def config(job_keys=None, **top):
        doc = {"state_db": "/nonexistent/s.db", "jobs": [
            {"id": "a", "kind": "mem", "schedule": {"every_secs": 10}, **(job_keys or {})},
            {"id": "b", "kind": "mem", "schedule": {"every_secs": 10}}], **top}
        return config_from_dict(doc, extra_kinds=["mem"])

    def test_defaults_globals_and_job_keys_with_their_sources(self):
        cfg = self.config()
        pol = nx.JobPolicy.of(cfg, cfg.jobs[0])
        self.assertEqual((pol.catchup, pol.catchup_window_secs), ("one", None))
        self.assertEqual((pol.sources["catchup"], pol.sources["catchup_window_secs"]),
                         ("default", "default"))
        cfg = self.config({"catchup": "all", "catchup_window_secs": 3600},
                          catchup="none", catchup_window_secs=60)
        a, b = (nx.JobPolicy.of(cfg, j) for j in cfg.jobs)
        self.assertEqual((a.catchup, a.catchup_window_secs, a.sources["catchup"]),
                         ("all", 3600, "job"))
        self.assertEqual((b.catchup, b.catchup_window_secs, b.sources["catchup_window_secs"]),
                         ("none", 60, "config"))
        cfg = self.config({"catchup_window_secs": None}, catchup_window_secs=60)
        self.assertIsNone(nx.JobPolicy.of(cfg, cfg.jobs[0]).catchup_window_secs,
                          "a job's null: no window, over the global one")

    def test_bad_values_are_refused_naming_the_key(self):
        cases = [({"catchup": "some"}, {}, "jobs[0].catchup",
                  '\'some\' must be one of "one", "all", "none"'),
                 ({"catchup": 1}, {}, "jobs[0].catchup", "must be one of"),
                 ({"catchup_window_secs": -1}, {}, "jobs[0].catchup_window_secs", "-1 is outside"),
                 ({"catchup_window_secs": "1h"}, {}, "jobs[0].catchup_window_secs",
                  "must be a number, got string"),
                 ({}, {"catchup": "every"}, "catchup", "must be one of"),
                 ({}, {"catchup_window_secs": True}, "catchup_window_secs",
                  "must be a number, got boolean")]
        for job_keys, top, where, message in cases:
            with self.subTest(job=job_keys, top=top):
                with self.assertRaises(ConfigError) as cm:
                    self.config(job_keys, **top)
                self.assertIn(f"{where}: ", str(cm.exception))
                self.assertIn(message, str(cm.exception))


class RunnerCatchUpTests(RunnerCase):
    """A job ticked at T0, its daemon down until ``down_until``, started again."""

    def restart(self, down_until, **keys):
        cfg = self.config([self.job(every=10, **keys)])
        r = self.runner(cfg, FakePoller())
        self.fire(r)                                    # slot T0; the next is T0+10
        r.stop()
        self.t[0] = down_until
        p = FakePoller()
        return self.runner(cfg, p), p

    def drain(self, r):
        """Fire until nothing is due now; how many ticks ran."""
        n = 0
        while True:
            fired = self.fire(r)
            if not fired:
                return n
            n += fired

    def slots(self, p):
        return [c.scheduled_at.timestamp() for c in p.calls]

    def test_one_runs_once_for_all_missed_slots_by_default(self):
        r, p = self.restart(T0 + 35)
        self.assertEqual(self.drain(r), 1)
        self.assertEqual(self.slots(p), [T0 + 10], "the tick stands for the first missed slot")
        self.assertEqual(p.calls[0].now, utc(T0 + 35))
        self.assertEqual(self.next_at(r), T0 + 40)

    def test_all_runs_each_missed_slot_in_order_then_the_schedule_goes_on(self):
        r, p = self.restart(T0 + 35, catchup="all")
        self.assertEqual(self.drain(r), 3)
        self.assertEqual(self.slots(p), [T0 + 10, T0 + 20, T0 + 30])
        self.assertEqual(self.next_at(r), T0 + 40)
        self.t[0] = T0 + 40
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(self.slots(p)[-1], T0 + 40)

    def test_none_skips_the_missed_slots_to_the_next_future_one_and_logs_them(self):
        with self.assertLogs("nexo_poller", logging.WARNING) as logs:
            r, p = self.restart(T0 + 35, catchup="none")
        self.assertEqual(self.drain(r), 0)
        self.assertEqual(self.next_at(r), T0 + 40)
        self.assertTrue(any("job a: 3 missed slot(s) skipped (catchup=none)" in line
                            for line in logs.output), logs.output)

    def test_the_window_skips_older_slots_for_one(self):
        with self.assertLogs("nexo_poller", logging.WARNING) as logs:
            r, p = self.restart(T0 + 35, catchup_window_secs=15)
        self.assertEqual(self.drain(r), 1)
        self.assertEqual(self.slots(p), [T0 + 30])
        self.assertTrue(any("2 missed slot(s) skipped (catchup=one, catchup_window_secs=15)"
                            in line for line in logs.output), logs.output)

    def test_the_window_bounds_all_too(self):
        r, p = self.restart(T0 + 65, catchup="all", catchup_window_secs=25)
        self.assertEqual(self.drain(r), 2)
        self.assertEqual(self.slots(p), [T0 + 50, T0 + 60])
        self.assertEqual(self.next_at(r), T0 + 70)

    def test_the_global_default_applies_and_a_job_key_wins(self):
        cfg = self.config([self.job("a", every=10), self.job("b", every=10, catchup="one")],
                          catchup="none")
        r = self.runner(cfg, FakePoller())
        self.fire(r)
        r.stop()
        self.t[0] = T0 + 35
        p = FakePoller()
        r = self.runner(cfg, p)
        self.assertEqual(self.drain(r), 1)
        self.assertEqual([c.job_id for c in p.calls], ["b"])

    def test_a_scheduled_tick_carries_its_slot_an_operator_tick_now(self):
        p = FakePoller()
        r = self.runner(self.config([self.job(every=10, jitter_ms=3000)]), p)
        for slot in (T0, T0 + 10):
            self.go_to_next(r)                  # at the slot plus its jitter
            self.assertGreater(self.t[0], slot + 0.001)
            self.assertEqual(self.fire(r), 1)
            self.assertEqual(p.calls[-1].scheduled_at, utc(slot), "the slot, without jitter")
        self.t[0] = T0 + 12.5
        r.run_once("a")
        self.assertEqual(p.calls[2].scheduled_at, utc(T0 + 12.5))
        r.run_once("a", scheduled_at=T0 - 3600)
        self.assertEqual(p.calls[3].scheduled_at, utc(T0 - 3600))
        runs = r.state.run_history("a")         # newest first: how each tick came to run
        self.assertEqual([(run.trigger, run.scheduled_at) for run in runs],
                         [("backfill", T0 - 3600), ("operator", None),
                          ("schedule", T0 + 10), ("schedule", T0)])


class WireTests(unittest.TestCase):

    def test_the_request_carries_scheduled_at_only_when_given(self):
        now = datetime(2026, 5, 17, 10, 0, tzinfo=timezone.utc)
        req = nx.build_tick_request("rss", "j", "ag", None, {}, now, 300,
                                    scheduled_at=now - timedelta(minutes=5))
        self.assertEqual(req.to_dict()["scheduled_at"], "2026-05-17T09:55:00+00:00")
        plain = nx.build_tick_request("rss", "j", "ag", None, {}, now, 300).to_dict()
        self.assertNotIn("scheduled_at", plain, "nexo's shape as it was")

    def test_the_sdk_reads_it_and_falls_back_to_now(self):
        params = {"kind": "k", "job_id": "j", "agent_id": "a", "cursor": None, "config": {},
                  "now": "2026-05-17T10:00:00+00:00", "interval_hint_secs": 60}
        ctx = nx._context_from_params(params)
        self.assertEqual(ctx.scheduled_at, ctx.now)
        ctx = nx._context_from_params({**params, "scheduled_at": "2026-05-17T09:00:00+00:00"})
        self.assertEqual(ctx.scheduled_at, datetime(2026, 5, 17, 9, tzinfo=timezone.utc))
        answer = nx._plugin_dispatch({"k": lambda c: TickAck()},
                                     {"jsonrpc": "2.0", "id": 1, "method": "poll_tick",
                                      "params": {**params, "scheduled_at": 5}})
        self.assertEqual(answer["error"]["code"], nx.ERROR_CONFIG)
        self.assertIn("scheduled_at must be a string", answer["error"]["message"])
        self.assertEqual(PollContext("j", "a", "k", None, {}, utc(T0), timedelta(0)).scheduled_at,
                         utc(T0))


class BackfillCliTests(RunnerCase):
    """``backfill`` on a job of an ephemeral SDK plugin that logs each tick's slot."""

    def setUp(self):
        super().setUp()
        self.log = os.path.join(self.dir, "slots.log")
        write_manifest(self.dir, "bf", "counter", command=PY, args=(SDK_PLUGIN,),
                       lifecycle="ephemeral")

    def write(self, **job_config):
        return write_config(os.path.join(self.dir, "pollers.json"), {
            "state_db": self.db, "default_jitter_ms": 0, "plugins": ["plugins/bf"],
            "jobs": [{"id": "a", "kind": "counter", "schedule": {"cron": "*/10 * * * *"},
                      "config": {"log_scheduled": self.log, **job_config}}]})

    def logged(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return f.read().split()

    def test_without_yes_it_lists_the_slots_and_runs_nothing(self):
        path = self.write()
        code, out, err = main_in_process(["--config", path, "backfill", "a", "--from",
                                          "2026-05-17T10:00:00Z", "--to", "1779013200"])
        self.assertEqual(code, 0, err)
        self.assertIn("3 slot(s)", out)
        for hhmm in ("10:00", "10:10", "10:20"):
            self.assertIn(f"2026-05-17T{hhmm}:00+00:00", out)
        self.assertIn("dry run", out)
        self.assertEqual(self.logged(), [])

    def test_yes_runs_each_slot_in_order_and_stops_at_a_permanent_error(self):
        path = self.write(permanent_at=["2026-05-17T10:20:00+00:00"])
        code, out, err = main_in_process(["--config", path, "backfill", "a", "--from",
                                          "2026-05-17T10:00:00", "--to",
                                          "2026-05-17T10:40:00Z", "--yes"])
        self.assertEqual(code, nx.EXIT_TICK_FAILED, out + err)
        self.assertEqual(self.logged(), ["2026-05-17T10:00:00+00:00",
                                         "2026-05-17T10:10:00+00:00",
                                         "2026-05-17T10:20:00+00:00"])
        self.assertIn("stopped at 2026-05-17T10:20:00+00:00 (permanent error); "
                      "2 later slot(s) not run", err)
        state = nx.SqliteStateStore(self.db)
        self.addCleanup(state.close)
        self.assertEqual(state.load(["a"])["a"].cursor, b"2", "two slots committed")

    def test_validate_policy_and_status_show_the_catchup_and_its_source(self):
        path = self.write()
        with open(path) as f:
            doc = json.load(f)
        doc["jobs"][0]["catchup"], doc["catchup_window_secs"] = "all", 600
        write_config(path, doc)
        code, out, err = main_in_process(["--config", path, "validate", "--policy"])
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"catchup +all +job\n")
        self.assertRegex(out, r"catchup_window_secs +600 +config\n")
        code, out, err = main_in_process(["--config", path, "status", "a", "--json"])
        self.assertEqual(code, 0, err)
        policy = json.loads(out)["policy"]
        self.assertEqual((policy["catchup"], policy["catchup_window_secs"]),
                         ({"value": "all", "source": "job"}, {"value": 600, "source": "config"}))

    def test_bad_ranges_are_one_line_usage_errors(self):
        path = self.write()
        for start, end, message in (("tomorrow", "1", "--from 'tomorrow' is neither"),
                                    ("2026-05-17T11:00:00Z", "2026-05-17T10:00:00Z",
                                     "the range ends"),
                                    ("0", "1779013200", "narrow the range")):
            with self.subTest(start=start):
                code, out, err = main_in_process(["--config", path, "backfill", "a",
                                                  "--from", start, "--to", end])
                self.assertEqual(code, nx.EXIT_USAGE)
                self.assertIn(message, err)
                self.assertNotIn("Traceback", err)


class BackfillThroughDaemonTests(RunnerCase):

    def test_each_slot_is_a_tick_of_the_daemon_holding_the_job(self):
        p = FakePoller(default=lambda ctx: TickAck(next_cursor=str(
            int(ctx.cursor or b"0") + 1).encode()))
        cfg = self.config([self.job(every=3600)])
        r = self.runner(cfg, p)
        self.fire(r)                                    # the daemon holds the job now
        planned = self.next_at(r)
        slots = [T0 - 7200, T0 - 3600]
        done, result = threading.Event(), []

        def backfill():
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    result.append(nx._run_backfill(cfg, cfg.jobs[0], slots))
            finally:
                done.set()
        t = threading.Thread(target=backfill, daemon=True)
        t.start()
        # the test plays the daemon's scheduler: commands, then the effects
        self.assertTrue(wait_until(lambda: (r.apply_commands(), r.fire_due(),
                                            done.is_set())[-1], WAIT))
        t.join(WAIT)
        self.assertEqual(result, [0])
        self.assertEqual([c.scheduled_at.timestamp() for c in p.calls[1:]], slots)
        self.assertTrue(r.wait_idle(WAIT))
        self.assertEqual(r.state.load(["a"])["a"].cursor, b"3", "each slot committed")
        self.assertEqual(self.next_at(r), planned, "the live schedule is untouched")


if __name__ == "__main__":
    unittest.main()
