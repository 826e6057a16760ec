"""The pure planning step of nexo_poller (section "Runner"): ``plan_tick``,
``next_run`` and ``apply_command``, called without threads or sqlite."""

import random
import unittest
from datetime import datetime, timedelta, timezone

from nexo_poller import (CronExpr, DaemonConfig, JobState, Schedule, TickAck, TickMetrics,
                         TickOutcome, TickStatus, apply_command, next_run, plan_tick)

T0 = 1_900_000_000.0
CFG = DaemonConfig(default_jitter_ms=0, backoff_initial_secs=30.0, backoff_max_secs=300.0,
                   breaker_threshold=3, failure_alert_cooldown_secs=3600)
EVERY = Schedule(every_secs=60, stagger_jitter_ms=0)


class _NoJitter(random.Random):
    def uniform(self, a, b):
        return a


def plan(state, status, *, ack=None, error=None, schedule=EVERY, slot=T0, started=T0,
         finished=None, key="k", retry_after=None):
    outcome = TickOutcome(state.id, "mem", status, error=error, ack=ack,
                          retry_after=retry_after)
    return plan_tick(state, outcome, schedule=schedule, slot=slot, started=started,
                     finished=started if finished is None else finished, config=CFG,
                     rng=_NoJitter(), schedule_key=key)


class PlanTickTests(unittest.TestCase):

    def test_ok_takes_cursor_totals_and_next_slot(self):
        s = JobState("a", cursor=b"old", items_seen_total=2, items_dispatched_total=1,
                     consecutive_errors=2)
        p = plan(s, TickStatus.OK, ack=TickAck(next_cursor=b"new", metrics=TickMetrics(5, 3)))
        self.assertEqual(p.state.cursor, b"new")
        self.assertEqual((p.state.items_seen_total, p.state.items_dispatched_total), (7, 4))
        self.assertEqual(p.state.consecutive_errors, 0)
        self.assertEqual((p.slot, p.run_at, p.state.next_run_at), (T0 + 60,) * 3)
        self.assertEqual((p.state.last_status, p.state.last_run_at), ("ok", T0))
        self.assertEqual(p.state.schedule_key, "k")
        self.assertIsNone(p.alert)
        self.assertEqual(s.cursor, b"old", "the input state is not changed")

    def test_ok_without_cursor_keeps_the_old_one(self):
        p = plan(JobState("a", cursor=b"keep"), TickStatus.OK, ack=TickAck())
        self.assertEqual(p.state.cursor, b"keep")

    def test_ok_hint_replaces_one_interval(self):
        p = plan(JobState("a"), TickStatus.OK, finished=T0 + 2,
                 ack=TickAck(next_interval_hint=timedelta(seconds=5)))
        self.assertEqual(p.run_at, T0 + 7)

    def test_missed_slots_collapse_into_one_and_keep_the_phase(self):
        p = plan(JobState("a"), TickStatus.OK, ack=TickAck(), slot=T0, started=T0 + 250)
        self.assertEqual(p.slot, T0 + 300)

    def test_off_schedule_tick_keeps_the_planned_slot(self):
        s = JobState("a", next_run_at=T0 + 40)
        p = plan(s, TickStatus.OK, ack=TickAck(), slot=None)
        self.assertEqual(p.run_at, T0 + 40)
        p = plan(JobState("a"), TickStatus.OK, ack=TickAck(), slot=None)
        self.assertEqual(p.run_at, T0 + 60)

    def test_at_job_fires_once_then_pauses(self):
        at = Schedule(at=datetime.fromtimestamp(T0, timezone.utc))
        p = plan(JobState("a"), TickStatus.OK, ack=TickAck(), schedule=at)
        self.assertIs(p.state.paused, True)
        self.assertIsNone(p.run_at)

    def test_transient_backs_off_doubling_to_the_maximum(self):
        delays = []
        s = JobState("a")
        for _ in range(6):
            p = plan(s, TickStatus.TRANSIENT, error="boom")
            delays.append(p.run_at - T0)
            s = p.state
        self.assertEqual(delays, [30, 60, 120, 240, 300, 300])
        self.assertEqual(s.consecutive_errors, 6)
        self.assertEqual(s.last_error, "boom")
        self.assertIs(s.paused, False)

    def test_retry_after_later_than_the_backoff_wins(self):
        # Issue 25 item 4: the plugin's "not before" was not honoured.
        p = plan(JobState("a"), TickStatus.TRANSIENT, error="429", finished=T0 + 2,
                 retry_after=500)
        self.assertEqual((p.run_at, p.slot, p.state.next_run_at), (T0 + 502,) * 3)
        self.assertEqual(p.state.consecutive_errors, 1)

    def test_retry_after_earlier_than_the_backoff_keeps_the_backoff(self):
        s = JobState("a", consecutive_errors=3)            # the fourth error: 240 s
        p = plan(s, TickStatus.TRANSIENT, error="429", finished=T0 + 2, retry_after=5)
        self.assertEqual(p.run_at, T0 + 242)

    def test_retry_after_keeps_the_breaker_alert(self):
        s = JobState("a", consecutive_errors=2)
        p = plan(s, TickStatus.TRANSIENT, error="429", retry_after=1000)
        self.assertEqual(p.run_at, T0 + 1000)
        self.assertIn("circuit breaker open after 3", p.alert)

    def test_breaker_alert_fires_when_the_streak_reaches_the_threshold(self):
        s = JobState("a", consecutive_errors=1)
        self.assertIsNone(plan(s, TickStatus.TRANSIENT).alert)
        p = plan(s.replace(consecutive_errors=2), TickStatus.TRANSIENT)
        self.assertIn("circuit breaker open after 3", p.alert)
        self.assertEqual(p.state.last_alert_at, T0)
        self.assertIsNone(plan(p.state, TickStatus.TRANSIENT, started=T0 + 60).alert,
                          "not again within the cooldown")
        again = plan(p.state, TickStatus.TRANSIENT, started=T0 + 3600)
        self.assertIn("circuit breaker open after 4", again.alert,
                      "again after the cooldown while the job keeps failing")

    def test_permanent_and_config_pause_with_an_alert(self):
        for status in (TickStatus.PERMANENT, TickStatus.CONFIG):
            with self.subTest(status=status):
                p = plan(JobState("a", next_run_at=T0 + 60), status, error="gone")
                self.assertIs(p.state.paused, True)
                self.assertIsNone(p.run_at)
                self.assertEqual(p.state.consecutive_errors, 1)
                self.assertEqual(p.alert, f"job paused after a {status.value} error")

    def test_alert_cooldown(self):
        s = JobState("a", last_alert_at=T0 - 100)
        self.assertIsNone(plan(s, TickStatus.PERMANENT).alert)
        s = JobState("a", last_alert_at=T0 - 3600)
        self.assertIsNotNone(plan(s, TickStatus.PERMANENT).alert)

    def test_outcomes_that_ran_nothing_are_not_planned(self):
        for status in (TickStatus.LEASED, TickStatus.CANCELLED, TickStatus.BUSY,
                       TickStatus.UNSTORED):
            with self.subTest(status=status), self.assertRaises(ValueError):
                plan(JobState("a"), status)

    def test_jitter_is_added_to_ok_runs_only(self):
        class Half(random.Random):
            def uniform(self, a, b):
                return (a + b) / 2
        sched = Schedule(every_secs=60, stagger_jitter_ms=2000)
        ok = plan_tick(JobState("a"), TickOutcome("a", "m", "ok", ack=TickAck()), schedule=sched,
                       slot=T0, started=T0, finished=T0, config=CFG, rng=Half())
        self.assertEqual((ok.slot, ok.run_at), (T0 + 60, T0 + 61))
        bad = plan_tick(JobState("a"), TickOutcome("a", "m", "transient"), schedule=sched,
                        slot=T0, started=T0, finished=T0, config=CFG, rng=Half())
        self.assertEqual(bad.run_at, T0 + 30 * 1.05)

    def test_dispatched_counts_the_plugins_figure_only_without_deliveries(self):
        from nexo_poller import Delivery
        s = JobState("a", items_dispatched_total=10)
        p = plan(s, TickStatus.OK, ack=TickAck(metrics=TickMetrics(3, 2)))
        self.assertEqual(p.state.items_dispatched_total, 12)
        p = plan(s, TickStatus.OK, ack=TickAck(metrics=TickMetrics(3, 2), deliver=[
            Delivery("telegram", "u1", {"text": "hi"})]))
        self.assertEqual(p.state.items_dispatched_total, 10, "the outbox counts deliveries")

    def test_error_text_is_kept_verbatim_in_the_plan(self):
        p = plan(JobState("a"), TickStatus.PERMANENT, error="bad \udc80 text")
        self.assertEqual(p.state.last_error, "bad \udc80 text")


class NextRunTests(unittest.TestCase):
    """Where a job stands at start, take-over, resume or reload."""

    def test_paused_job_has_no_slot(self):
        self.assertEqual(next_run(JobState("a", paused=True, next_run_at=T0), EVERY, "k", T0),
                         (None, False))

    def test_stored_slot_holds_under_the_same_schedule(self):
        s = JobState("a", next_run_at=T0 + 3000, last_run_at=T0 - 600, schedule_key="k")
        self.assertEqual(next_run(s, EVERY, "k", T0), (T0 + 3000, False))

    def test_a_changed_schedule_voids_the_stored_slot(self):
        s = JobState("a", next_run_at=T0 + 3000, last_run_at=T0 - 600, schedule_key="old")
        fast = Schedule(every_secs=1)
        self.assertEqual(next_run(s, fast, "new", T0), (T0 - 599, True))

    def test_never_ran_starts_at_its_first_slot(self):
        self.assertEqual(next_run(JobState("a"), EVERY, "k", T0), (T0, True))
        at = Schedule(at=datetime.fromtimestamp(T0 + 3600, timezone.utc))
        self.assertEqual(next_run(JobState("a"), at, "k", T0), (T0 + 3600, True))
        cron = Schedule(cron=CronExpr("0 0 3 * * *"))
        slot, _ = next_run(JobState("a"), cron, "k", T0)
        self.assertEqual(datetime.fromtimestamp(slot, timezone.utc).strftime("%H:%M:%S"),
                         "03:00:00")
        self.assertGreater(slot, T0)

    def test_cron_after_a_run_waits_for_its_next_slot(self):
        cron = Schedule(cron=CronExpr("0 0 3 * * *"))
        s = JobState("a", last_run_at=T0 - 60)
        slot, _ = next_run(s, cron, "k", T0)
        self.assertGreater(slot, T0)


class ApplyCommandTests(unittest.TestCase):

    def test_verbs(self):
        s = JobState("a", cursor=b"c", paused=False, consecutive_errors=4, next_run_at=T0)
        self.assertIs(apply_command(s, "pause").paused, True)
        self.assertEqual(apply_command(s, "pause").next_run_at, T0, "pause keeps the slot")
        r = apply_command(s.replace(paused=True), "resume")
        self.assertEqual((r.paused, r.consecutive_errors), (False, 0))
        self.assertIsNone(apply_command(s, "reset").cursor)
        self.assertEqual(apply_command(s, "tick"), s)
        with self.assertRaises(ValueError):
            apply_command(s, "explode")


if __name__ == "__main__":
    unittest.main()
