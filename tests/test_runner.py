"""Runner of nexo_poller (section "Runner"): scheduling, error policy, state.

Time is driven through the injected clock and ``fire_due()``; nothing sleeps.
"""

import os
import sqlite3
import sys
import threading
import unittest
from unittest import mock
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import FakePoller as Scripted  # noqa: E402  (its name in these tests)
from support import TempDirCase, wait_until, write_manifest  # noqa: E402
from nexo_poller import PollerRouteRegistrationError as nx_errors
from nexo_poller import (PollerError, Runner, SqliteStateStore, TickAck, TickMetrics, TickOutcome,
                         config_from_dict, encode_cursor)

SDK_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                           "sdk_plugin.py")
T0 = 1_900_000_000.0            # 2030-03-17T17:46:40Z, a whole second
WAIT = 5.0
STATUS_KEYS = {"id", "kind", "agent", "paused", "cursor", "last_status", "last_error",
               "consecutive_errors", "last_run_at", "next_run_at", "items_seen_total",
               "items_dispatched_total"}


def ts(iso):
    return None if iso is None else datetime.fromisoformat(iso).timestamp()


def iso_z(t):
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunnerCase(TempDirCase):
    tmp_prefix = "nexo-runner-"

    def setUp(self):
        super().setUp()
        self.t = [T0]

    # -- helpers ---------------------------------------------------------------

    def config(self, jobs, **top):
        return self.runner_config(jobs, base_dir=".", **top)

    @staticmethod
    def job(id="a", every=10, **kw):
        raw = {"id": id, "kind": "mem", "schedule": {"every_secs": every}}
        raw.update(kw)
        return raw

    def runner(self, cfg, *pollers, start=True):
        return self.start_runner(cfg, *pollers, start=start, clock=lambda: self.t[0])

    def fire(self, r):
        n = r.fire_due()
        self.assertTrue(r.wait_idle(WAIT), "ticks did not finish")
        return n

    def status(self, r, job_id="a"):
        for s in r.status():
            if s["id"] == job_id:
                return s
        self.fail(f"no status for {job_id}")

    def next_at(self, r, job_id="a"):
        return ts(self.status(r, job_id)["next_run_at"])

    def go_to_next(self, r, job_id="a"):
        nxt = self.next_at(r, job_id)
        self.assertIsNotNone(nxt, "job has no next run")
        self.t[0] = nxt + 0.001

    def row(self, job_id="a"):
        db = sqlite3.connect(self.db, timeout=10)
        try:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return None if row is None else dict(row)
        finally:
            db.close()

    def spy_alerts(self, r):
        """Record (synchronously) every alert the runner publishes."""
        sent = []
        real = r.broker.publish

        def publish(topic, payload):
            if topic == r.config.alert_topic:
                sent.append(payload)
            return real(topic, payload)
        r.broker.publish = publish
        return sent

    def subscribe_alerts(self, r):
        got, event = [], threading.Event()

        def handler(published):               # the nexo Event the alert travels in
            got.append(published["payload"])
            event.set()
        r.broker.subscribe(r.config.alert_topic, handler)
        return got, event

    def gate(self):
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def step(ctx, ack=None):
            entered.set()
            release.wait(WAIT)
            return ack or TickAck()
        return entered, release, step


# ============================================================================
# Cursors, totals, restart
# ============================================================================

class CursorTests(RunnerCase):

    def test_cursor_round_trips_and_is_stored_only_after_success(self):
        seen_in_db = []

        def second(ctx):
            seen_in_db.append(self.row()["cursor"])   # the tick in flight has not stored yet
            return TickAck(metrics=TickMetrics(4, 1))
        p = Scripted(script={"a": [
            TickAck(next_cursor=b"c1", metrics=TickMetrics(3, 2)),
            second,                                       # no next_cursor: keep c1
            PollerError.Transient("blip"),                # failure: keep c1
            TickAck(next_cursor=b"c2", metrics=TickMetrics(1, 1)),
        ]})
        r = self.runner(self.config([self.job()]), p)
        self.assertEqual(self.fire(r), 1)
        self.assertIsNone(p.calls[0].cursor)
        self.assertEqual(self.status(r)["cursor"], encode_cursor(b"c1"))
        self.assertEqual(self.row()["cursor"], b"c1")

        self.go_to_next(r)
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(p.calls[1].cursor, b"c1")
        self.assertEqual(seen_in_db, [b"c1"])
        self.assertEqual(self.status(r)["cursor"], encode_cursor(b"c1"))
        self.assertEqual(self.row()["cursor"], b"c1")

        self.go_to_next(r)
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(p.calls[2].cursor, b"c1")
        self.assertEqual(self.status(r)["last_status"], "transient")
        self.assertEqual(self.row()["cursor"], b"c1")

        self.go_to_next(r)
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(p.calls[3].cursor, b"c1")
        self.assertEqual(self.row()["cursor"], b"c2")
        st = self.status(r)
        self.assertEqual(st["cursor"], encode_cursor(b"c2"))
        self.assertEqual((st["items_seen_total"], st["items_dispatched_total"]), (8, 4))
        row = self.row()
        self.assertEqual((row["items_seen_total"], row["items_dispatched_total"]), (8, 4))

    def test_ctx_carries_job_fields(self):
        p = Scripted()
        r = self.runner(self.config([self.job(every=300, agent="ana", config={"url": "u"})]), p)
        self.fire(r)
        ctx = p.calls[0]
        self.assertEqual((ctx.job_id, ctx.agent_id, ctx.kind), ("a", "ana", "mem"))
        self.assertEqual(ctx.config, {"url": "u"})
        self.assertEqual(ctx.interval_hint, timedelta(seconds=300))
        self.assertEqual(ctx.now, datetime.fromtimestamp(T0, timezone.utc))
        self.assertFalse(ctx.cancel.is_set())

    def test_restart_resumes_stored_cursor_and_totals(self):
        cfg = self.config([self.job()])
        p1 = Scripted(script={"a": [TickAck(next_cursor=b"keep", metrics=TickMetrics(2, 1))]})
        r1 = self.runner(cfg, p1)
        self.fire(r1)
        r1.stop()
        p2 = Scripted()
        r2 = self.runner(cfg, p2)
        st = self.status(r2)
        self.assertEqual(st["cursor"], encode_cursor(b"keep"))
        self.assertEqual((st["items_seen_total"], st["items_dispatched_total"]), (2, 1))
        self.assertEqual(st["last_status"], "ok")
        self.t[0] = T0 + 10
        self.assertEqual(self.fire(r2), 1)
        self.assertEqual(p2.calls[0].cursor, b"keep")

    def test_status_has_documented_keys(self):
        r = self.runner(self.config([self.job("a"), self.job("b", agent="x")]), Scripted())
        self.fire(r)
        sts = r.status()
        self.assertEqual({s["id"] for s in sts}, {"a", "b"})
        for s in sts:
            self.assertLessEqual(STATUS_KEYS, set(s), STATUS_KEYS - set(s))
        b = self.status(r, "b")
        self.assertEqual((b["kind"], b["agent"], b["paused"]), ("mem", "x", False))
        self.assertEqual(ts(b["last_run_at"]), T0)
        self.assertEqual(ts(b["next_run_at"]), T0 + 10)
        self.assertEqual(b["consecutive_errors"], 0)
        self.assertIsNone(b["last_error"])


# ============================================================================
# Error policy
# ============================================================================

class ErrorPolicyTests(RunnerCase):

    def test_transient_backoff_breaker_alert_then_success_resets(self):
        cfg = self.config([self.job(every=1000, failure_to={"channel": "slack", "to": "#ops"})],
                          backoff_initial_secs=10, backoff_max_secs=40, breaker_threshold=3,
                          alert_topic="test.alerts")
        p = Scripted(default=PollerError.Transient("feed timed out"))
        r = self.runner(cfg, p)
        got, alerted = self.subscribe_alerts(r)
        sent = self.spy_alerts(r)
        for n, base in enumerate([10, 20, 40, 40, 40], start=1):
            if n > 1:
                self.go_to_next(r)
            self.assertEqual(self.fire(r), 1)
            st = self.status(r)
            self.assertEqual(st["consecutive_errors"], n)
            self.assertEqual(st["last_status"], "transient")
            self.assertIn("feed timed out", st["last_error"])
            self.assertFalse(st["paused"])
            delay = self.next_at(r) - self.t[0]
            self.assertGreaterEqual(delay, base - 0.01, f"error {n}")
            self.assertLessEqual(delay, base * 1.1 + 0.01, f"error {n}")
            self.assertEqual(st["breaker_open"], n >= 3, f"error {n}")
            self.assertEqual(len(sent), 0 if n < 3 else 1, f"error {n}")
            if n == 3:
                self.assertTrue(alerted.wait(WAIT), "no alert on the broker")
                alert = got[0]
                self.assertEqual(alert["job"], "a")
                self.assertEqual(alert["failure_to"], {"channel": "slack", "to": "#ops"})
                self.assertEqual(alert["consecutive_errors"], 3)
                self.assertIn("feed timed out", alert["error"])
        self.assertEqual(self.row()["consecutive_errors"], 5)
        # a success closes the breaker and returns to the schedule
        p.default = TickAck()
        self.go_to_next(r)
        self.assertEqual(self.fire(r), 1)
        st = self.status(r)
        self.assertEqual(st["consecutive_errors"], 0)
        self.assertFalse(st["breaker_open"])
        self.assertEqual(st["last_status"], "ok")
        self.assertIsNone(st["last_error"])
        self.assertAlmostEqual(self.next_at(r) - self.t[0], 1000, delta=0.01)
        self.assertEqual(self.row()["consecutive_errors"], 0)

    def test_breaker_state_survives_restart(self):
        cfg = self.config([self.job(every=1000)], breaker_threshold=2,
                          backoff_initial_secs=10, backoff_max_secs=40)
        p = Scripted(default=PollerError.Transient("down"))
        r1 = self.runner(cfg, p)
        self.fire(r1)
        self.go_to_next(r1)
        self.fire(r1)
        self.assertTrue(self.status(r1)["breaker_open"])
        r1.stop()
        r2 = self.runner(cfg, Scripted(default=PollerError.Transient("down")))
        st = self.status(r2)
        self.assertEqual(st["consecutive_errors"], 2)
        self.assertTrue(st["breaker_open"], "breaker closed by a restart without a success")

    def test_retry_after_delays_the_next_attempt_and_survives_restart(self):
        # Issue 25 item 4: the next attempt came at the backoff (10 s), not
        # at the poller's "not before 500 s".
        cfg = self.config([self.job(every=1000)], backoff_initial_secs=10,
                          backoff_max_secs=40)
        p = Scripted(default=PollerError.Transient("429 too many requests", retry_after=500))
        r1 = self.runner(cfg, p)
        self.assertEqual(self.fire(r1), 1)
        self.assertEqual(self.next_at(r1), T0 + 500)
        self.assertEqual(self.status(r1)["last_status"], "transient")
        self.t[0] = T0 + 100                    # the backoff slot is long past
        self.assertEqual(self.fire(r1), 0)
        r1.stop()
        r2 = self.runner(cfg, p)                # the stored next_run_at holds
        self.assertEqual(self.next_at(r2), T0 + 500)
        self.t[0] = T0 + 499
        self.assertEqual(self.fire(r2), 0)
        self.t[0] = T0 + 500.001
        self.assertEqual(self.fire(r2), 1)
        self.assertEqual(len(p.calls), 2)

    def test_a_plugin_replies_retry_after_secs_delays_the_next_attempt(self):
        # Issue 25 item 4: an ephemeral plugin's data.retry_after_secs reached
        # no one; the job came back after its 10 s backoff.
        folder = os.path.join(self.dir, write_manifest(
            self.dir, "limited", "counter", command=sys.executable, args=(SDK_FIXTURE,)))
        cfg = self.runner_config(
            [{"id": "a", "kind": "counter", "schedule": {"every_secs": 1000},
              "config": {"error_code": -32001, "error_data": {"retry_after_secs": 300}}}],
            extra_kinds=(), plugins=[folder], backoff_initial_secs=10, backoff_max_secs=40)
        r = self.runner(cfg)
        self.assertEqual(self.fire(r), 1)
        st = self.status(r)
        self.assertEqual(st["last_status"], "transient")
        self.assertIn("fixture error", st["last_error"])
        self.assertAlmostEqual(self.next_at(r), T0 + 300, delta=0.001)

    def _pausing_error(self, exc, status):
        cfg = self.config([self.job(failure_to={"channel": "mail", "to": "ops@x"})],
                          alert_topic="test.alerts")
        p = Scripted(default=exc)
        r = self.runner(cfg, p)
        got, alerted = self.subscribe_alerts(r)
        self.assertEqual(self.fire(r), 1)
        st = self.status(r)
        self.assertTrue(st["paused"])
        self.assertEqual(st["last_status"], status)
        self.assertIsNone(st["next_run_at"])
        self.assertEqual(self.row()["paused"], 1)
        self.assertTrue(alerted.wait(WAIT), "no alert")
        self.assertEqual(got[0]["job"], "a")
        self.assertEqual(got[0]["failure_to"], {"channel": "mail", "to": "ops@x"})
        for dt in (10, 100, 10_000):
            self.t[0] = T0 + dt
            self.assertEqual(self.fire(r), 0)
        self.assertEqual(len(p.calls), 1)
        return r, p

    def test_permanent_error_pauses_and_alerts(self):
        self._pausing_error(PollerError.Permanent("token revoked"), "permanent")

    def test_config_error_pauses_and_alerts(self):
        self._pausing_error(PollerError.Config("a", "feed url missing"), "config")

    def test_resume_unpauses_and_job_ticks_again(self):
        r, p = self._pausing_error(PollerError.Permanent("gone"), "permanent")
        p.default = TickAck(next_cursor=b"back")
        r.resume("a")
        st = self.status(r)
        self.assertFalse(st["paused"])
        self.assertEqual(st["consecutive_errors"], 0)
        self.assertEqual(self.row()["paused"], 0)
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(len(p.calls), 2)
        self.assertEqual(self.status(r)["cursor"], encode_cursor(b"back"))

    def test_alert_cooldown_suppresses_repeat_and_survives_restart(self):
        cfg = self.config([self.job()], failure_alert_cooldown_secs=3600)
        r1 = self.runner(cfg, Scripted(default=PollerError.Permanent("gone")))
        sent1 = self.spy_alerts(r1)
        self.fire(r1)
        self.assertEqual(len(sent1), 1)
        self.assertEqual(self.row()["last_alert_at"], T0)
        self.t[0] = T0 + 60
        r1.resume("a")
        self.fire(r1)
        self.assertTrue(self.status(r1)["paused"])
        self.assertEqual(len(sent1), 1, "second alert within the cooldown")
        self.assertEqual(self.row()["last_alert_at"], T0)
        r1.stop()

        r2 = self.runner(cfg, Scripted(default=PollerError.Permanent("gone")))
        sent2 = self.spy_alerts(r2)
        self.t[0] = T0 + 120
        r2.resume("a")
        self.assertEqual(self.fire(r2), 1)
        self.assertEqual(len(sent2), 0, "cooldown forgotten across a restart")
        self.t[0] = T0 + 3600 + 1
        r2.resume("a")
        self.assertEqual(self.fire(r2), 1)
        self.assertEqual(len(sent2), 1, "no alert after the cooldown")
        self.assertEqual(self.row()["last_alert_at"], T0 + 3601)

    def test_non_poller_exception_is_transient(self):
        p = Scripted(default=RuntimeError("bug in poller"))
        r = self.runner(self.config([self.job(every=1000)], backoff_initial_secs=10), p)
        self.fire(r)
        st = self.status(r)
        self.assertEqual(st["last_status"], "transient")
        self.assertIn("RuntimeError", st["last_error"])
        self.assertIn("bug in poller", st["last_error"])
        self.assertEqual(st["consecutive_errors"], 1)
        self.assertFalse(st["paused"])
        delay = self.next_at(r) - self.t[0]
        self.assertTrue(10 - 0.01 <= delay <= 11.01, delay)

    def test_returning_a_non_ack_is_transient(self):
        p = Scripted(default=lambda ctx: {"next_cursor": "x"})
        r = self.runner(self.config([self.job()]), p)
        self.fire(r)
        st = self.status(r)
        self.assertEqual(st["last_status"], "transient")
        self.assertIsNone(st["cursor"])


# ============================================================================
# Operator actions
# ============================================================================

class OperatorTests(RunnerCase):

    def test_pause_stops_ticks(self):
        p = Scripted()
        r = self.runner(self.config([self.job()]), p)
        self.fire(r)
        r.pause("a")
        self.assertTrue(self.status(r)["paused"])
        self.assertEqual(self.row()["paused"], 1)
        for dt in (10, 20, 1000):
            self.t[0] = T0 + dt
            self.assertEqual(self.fire(r), 0)
        self.assertEqual(len(p.calls), 1)
        r.resume("a")
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(len(p.calls), 2)

    def test_reset_clears_cursor(self):
        p = Scripted(script={"a": [TickAck(next_cursor=b"old")]})
        r = self.runner(self.config([self.job()]), p)
        self.fire(r)
        self.assertEqual(self.row()["cursor"], b"old")
        r.reset("a")
        self.assertIsNone(self.status(r)["cursor"])
        self.assertIsNone(self.row()["cursor"])
        self.go_to_next(r)
        self.fire(r)
        self.assertIsNone(p.calls[1].cursor)
        self.assertIsNone(self.row()["cursor"])

    def test_run_once_returns_and_stores_outcome(self):
        p = Scripted(script={"a": [TickAck(next_cursor=b"now", metrics=TickMetrics(5, 4))]})
        r = self.runner(self.config([self.job()]), p)
        out = r.run_once("a")
        self.assertIsInstance(out, TickOutcome)
        self.assertEqual((out.job_id, out.kind, out.status), ("a", "mem", "ok"))
        self.assertEqual(out.ack.next_cursor, b"now")
        self.assertEqual(out.to_dict()["next_cursor"], encode_cursor(b"now"))
        self.assertEqual(self.row()["cursor"], b"now")
        self.assertEqual(self.row()["items_seen_total"], 5)
        st = self.status(r)
        self.assertEqual((st["last_status"], st["cursor"]), ("ok", encode_cursor(b"now")))
        self.assertEqual(len(p.calls), 1)
        self.assertTrue(r.wait_idle(WAIT))
        # the failed run is stored too
        p.default = PollerError.Permanent("nope")
        out = r.run_once("a")
        self.assertEqual(out.status, "permanent")
        self.assertEqual(self.row()["last_status"], "permanent")
        self.assertEqual(self.row()["paused"], 1)
        with self.assertRaises(KeyError):
            r.run_once("no-such-job")

    def test_commands_table_is_applied(self):
        p = Scripted(default=TickAck(next_cursor=b"c"))
        r = self.runner(self.config([self.job(), self.job("b")]), p)
        self.fire(r)
        other = SqliteStateStore(self.db)          # the CLI's view: the job has a live owner
        self.addCleanup(other.close)
        owner, seq = other.command("a", "pause")
        self.assertEqual(owner, r.state.owner)
        self.assertEqual(r.apply_commands(), 1)
        self.assertTrue(self.status(r, "a")["paused"])
        self.assertFalse(self.status(r, "b")["paused"])
        self.assertEqual(r.state.pending_commands(), [])
        self.assertEqual(other.command_result(seq)[0], True)
        self.t[0] = T0 + 10
        self.fire(r)
        self.assertEqual(len(p.calls_for("a")), 1)
        self.assertEqual(len(p.calls_for("b")), 2)
        for verb in ("resume", "reset"):
            other.command("a", verb)
        self.assertEqual(r.apply_commands(), 2)
        self.assertFalse(self.status(r, "a")["paused"])
        self.assertIsNone(self.row("a")["cursor"])
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(len(p.calls_for("a")), 2)
        self.assertIsNone(p.calls_for("a")[1].cursor)


# ============================================================================
# Schedules
# ============================================================================

class ScheduleTests(RunnerCase):

    def test_next_interval_hint_replaces_next_interval_once(self):
        p = Scripted(script={"a": [TickAck(next_interval_hint=timedelta(seconds=5))]})
        r = self.runner(self.config([self.job(every=100)]), p)
        self.fire(r)
        self.assertAlmostEqual(self.next_at(r), T0 + 5, delta=0.01)
        self.t[0] = T0 + 5
        self.assertEqual(self.fire(r), 1)
        self.assertAlmostEqual(self.next_at(r), T0 + 105, delta=0.01)

    def test_at_schedule_fires_once_then_stays_paused(self):
        at = T0 + 50
        cfg = self.config([{"id": "once", "kind": "mem", "schedule": {"at": iso_z(at)}}])
        p = Scripted()
        r = self.runner(cfg, p)
        self.assertEqual(self.next_at(r, "once"), at)
        self.assertEqual(self.fire(r), 0)
        self.t[0] = at
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(p.calls[0].interval_hint, timedelta(0))
        st = self.status(r, "once")
        self.assertTrue(st["paused"])
        self.assertEqual(st["last_status"], "ok")
        self.assertIsNone(st["next_run_at"])
        for dt in (1, 1000, 10 ** 6):
            self.t[0] = at + dt
            self.assertEqual(self.fire(r), 0)
        r.stop()
        r2 = self.runner(cfg, Scripted())
        self.assertTrue(self.status(r2, "once")["paused"])
        self.assertEqual(self.fire(r2), 0)

    def test_cron_job_next_run(self):
        first = (int(T0) // 300 + 1) * 300            # next 5-minute boundary in UTC
        cfg = self.config([{"id": "c", "kind": "mem", "schedule": {"cron": "0 */5 * * * *"}}])
        p = Scripted()
        r = self.runner(cfg, p)
        self.assertEqual(self.next_at(r, "c"), first)
        self.assertEqual(self.fire(r), 0)
        self.t[0] = first
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(p.calls[0].interval_hint, timedelta(seconds=60))
        self.assertEqual(self.next_at(r, "c"), first + 300)

    def test_cron_job_in_a_time_zone(self):
        # 09:00 in Asia/Kolkata (UTC+05:30, no DST) is 03:30 UTC
        cfg = self.config([{"id": "c", "kind": "mem",
                            "schedule": {"cron": "0 0 9 * * *", "tz": "Asia/Kolkata"}}])
        r = self.runner(cfg, Scripted())
        expected = datetime(2030, 3, 18, 3, 30, tzinfo=timezone.utc).timestamp()
        self.assertEqual(self.next_at(r, "c"), expected)

    def test_missed_slots_coalesce_into_one_tick(self):
        p = Scripted()
        r = self.runner(self.config([self.job(every=10)]), p)
        self.fire(r)
        self.t[0] = T0 + 100
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(len(p.calls), 2)

    def test_missed_slots_do_not_run_again_right_after_catching_up(self):
        # After the coalesced tick at T0+100 the next run belongs in the future;
        # firing again at the same instant must not tick a second time.
        p = Scripted()
        r = self.runner(self.config([self.job(every=10)]), p)
        self.fire(r)
        self.t[0] = T0 + 100
        self.assertEqual(self.fire(r), 1)
        self.assertGreater(self.next_at(r), self.t[0])
        self.assertEqual(self.fire(r), 0)
        self.assertEqual(len(p.calls), 2)


# ============================================================================
# Concurrency: overlap, lanes, leases, stop
# ============================================================================

class ConcurrencyTests(RunnerCase):

    def test_a_job_never_runs_two_ticks_at_once(self):
        entered, release, slow = self.gate()
        p = Scripted(script={"a": [slow]})
        r = self.runner(self.config([self.job(every=10)]), p)
        self.assertEqual(r.fire_due(), 1)
        self.assertTrue(entered.wait(WAIT))
        self.assertTrue(self.status(r)["running"])
        for dt in (10, 25, 100):
            self.t[0] = T0 + dt
            self.assertEqual(r.fire_due(), 0)
        self.assertEqual(r.run_once("a").status, "busy")
        release.set()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertEqual(len(p.calls), 1)

    def test_lane_limits_concurrent_ticks_of_one_kind(self):
        lock = threading.Lock()
        state = {"active": 0, "max": 0, "done": 0}
        entered = threading.Semaphore(0)
        gate = threading.Semaphore(0)
        self.addCleanup(lambda: [gate.release() for _ in range(5)])

        def slow(ctx):
            with lock:
                state["active"] += 1
                state["max"] = max(state["max"], state["active"])
            entered.release()
            gate.acquire(timeout=WAIT)
            with lock:
                state["active"] -= 1
                state["done"] += 1
            return TickAck()
        p = Scripted(default=slow, max_concurrent_ticks=2)
        ids = [f"j{i}" for i in range(5)]
        r = self.runner(self.config([self.job(i) for i in ids]), p)
        self.assertEqual(r.fire_due(), 5)
        for _ in range(2):
            self.assertTrue(entered.acquire(timeout=WAIT))
        with lock:
            self.assertEqual(state["active"], 2)
        for n in range(3):                   # free one slot at a time
            gate.release()
            self.assertTrue(entered.acquire(timeout=WAIT), f"tick {n + 3} never started")
            with lock:
                self.assertLessEqual(state["active"], 2)
        gate.release()
        gate.release()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertEqual(state["done"], 5)
        self.assertLessEqual(state["max"], 2)
        self.assertEqual(sorted(c.job_id for c in p.calls), ids)
        for i in ids:
            self.assertEqual(self.status(r, i)["last_status"], "ok")

    def test_a_finished_tick_starts_the_next_waiting_one_on_its_own_thread(self):
        # Under load a lane always has a tick waiting: the worker that frees a
        # slot runs it itself instead of waking another thread for it.
        entered, release, slow = self.gate()
        threads = []
        p = Scripted(default=lambda ctx: threads.append(threading.get_ident()) or TickAck(),
                     script={"j0": [slow]}, max_concurrent_ticks=1)
        ids = [f"j{i}" for i in range(4)]
        r = self.runner(self.config([self.job(i) for i in ids]), p)
        self.assertEqual(r.fire_due(), 4)
        self.assertTrue(entered.wait(WAIT))         # j0 holds the lane; j1..j3 wait
        first = {t.ident for t in threading.enumerate() if t.name == "nexo-tick"}
        release.set()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertEqual(sorted(c.job_id for c in p.calls), ids)
        self.assertEqual(len(set(threads)), 1, "the waiting ticks ran on other threads")
        started = {t.ident for t in threading.enumerate() if t.name == "nexo-tick"} - first
        self.assertEqual(started, set(), "a thread was started for a waiting tick")

    def test_two_runners_on_one_state_never_tick_the_same_job(self):
        cfg = self.config([self.job(every=10)])
        entered, release, slow = self.gate()
        p1 = Scripted(script={"a": [slow]})
        p2 = Scripted()
        r1 = self.runner(cfg, p1)
        r2 = self.runner(cfg, p2)
        self.assertNotEqual(r1.state.owner, r2.state.owner)
        self.assertEqual(r1.fire_due(), 1)
        self.assertTrue(entered.wait(WAIT))
        self.assertEqual(self.fire(r2), 1)       # r2's own slot: dispatched, but leased
        self.assertEqual(self.status(r2)["last_status"], None)
        out = r2.run_once("a")
        self.assertEqual(out.status, "leased")
        self.assertEqual(p2.calls, [])
        release.set()
        self.assertTrue(r1.wait_idle(WAIT))
        self.assertEqual(len(p1.calls), 1)
        # r1 still holds the lease after its tick
        self.assertEqual(r2.run_once("a").status, "leased")
        self.assertEqual(p2.calls, [])
        self.assertEqual(self.row()["lease_owner"], r1.state.owner)
        # once r1 stops its leases are released and r2 may tick
        r1.stop()
        self.assertEqual(r2.run_once("a").status, "ok")
        self.assertEqual(len(p2.calls), 1)
        self.assertEqual(self.row()["lease_owner"], r2.state.owner)

    def test_an_operator_tick_that_finds_the_job_leased_keeps_its_schedule(self):
        # Follow-up item 2: an off-schedule tick (``tick JOB``) that ended
        # leased took the job off the heap: it never ran on schedule again.
        cfg = self.config([self.job(every=10)])
        p1, p2 = Scripted(), Scripted()
        r1 = self.runner(cfg, p1)
        r2 = self.runner(cfg, p2)
        self.t[0] = T0 + 5
        next_run = lambda: r2.status()[0]["next_run_at"]    # noqa: E731
        planned = next_run()
        self.assertIsNotNone(planned)
        self.assertEqual(r2.run_once("a").status, "leased")
        self.assertEqual(next_run(), planned, "the planned slot is kept")
        r1.stop()                                # its lease is free from here on
        self.t[0] = T0 + 31
        self.assertEqual(self.fire(r2), 1, "the job is still on r2's schedule")
        self.assertEqual((len(p1.calls), len(p2.calls)), (0, 1))
        self.go_to_next(r2)
        self.assertEqual(self.fire(r2), 1)

    def test_a_slot_passing_during_a_leased_operator_tick_leaves_the_next_one(self):
        cfg = self.config([self.job(every=10)])
        r1 = self.runner(cfg, Scripted())
        r2 = self.runner(cfg, Scripted())
        real = r2.state.claim

        def claim(*args, **kw):             # the slot comes while the tick asks for the lease
            self.t[0] = T0 + 12
            self.assertEqual(r2.fire_due(), 0, "skipped: the job is running")
            return real(*args, **kw)
        r2.state.claim = claim
        self.assertEqual(r2.run_once("a").status, "leased")
        r2.state.claim = real
        r1.stop()
        self.t[0] = T0 + 40
        self.assertEqual(self.fire(r2), 1, "the job is still on r2's schedule")

    def test_steady_ticks_renew_the_lease_without_a_separate_claim(self):
        r = self.runner(self.config([self.job(every=60)]), Scripted())
        claims = []
        real = r.state.claim
        r.state.claim = lambda *a: claims.append(a) or real(*a)
        for _ in range(4):                      # a little late each time, as jitter makes it
            self.go_to_next(r)
            self.t[0] += 0.7
            self.assertEqual(self.fire(r), 1)
        self.assertEqual(claims, [])            # start() leased it; each commit renewed it
        self.assertGreater(self.row()["lease_until"], self.t[0] + 60)

    def test_expired_lease_passes_to_the_other_runner(self):
        cfg = self.config([self.job(every=10)])
        p1, p2 = Scripted(), Scripted()
        r1 = self.runner(cfg, p1)
        r2 = self.runner(cfg, p2)
        self.assertEqual(r1.run_once("a").status, "ok")
        self.assertEqual(r2.run_once("a").status, "leased")
        self.t[0] = T0 + 31                      # lease: max(30 s, 2 x 10 s)
        self.assertEqual(r2.run_once("a").status, "ok")
        self.assertEqual(r1.run_once("a").status, "leased")
        self.assertEqual((len(p1.calls), len(p2.calls)), (1, 1))

    def test_stop_cancels_tick_in_flight_and_drops_its_cursor(self):
        entered = threading.Event()
        saw_cancel = []

        def slow(ctx):
            entered.set()
            saw_cancel.append(ctx.cancel.wait(WAIT))
            return TickAck(next_cursor=b"c2", metrics=TickMetrics(9, 9))
        p = Scripted(script={"a": [TickAck(next_cursor=b"c1", metrics=TickMetrics(1, 1)),
                                   slow]})
        r = self.runner(self.config([self.job(every=10)]), p)
        self.fire(r)
        self.t[0] = T0 + 10
        self.assertEqual(r.fire_due(), 1)
        self.assertTrue(entered.wait(WAIT))
        r.stop()
        self.assertEqual(saw_cancel, [True])
        row = self.row()
        self.assertEqual(row["cursor"], b"c1")
        self.assertEqual(row["items_seen_total"], 1)
        self.assertIsNone(row["lease_owner"])
        store = SqliteStateStore(self.db, owner="check")
        self.addCleanup(store.close)
        self.assertEqual(store.load()["a"].cursor, b"c1")


class CapacityTests(RunnerCase):

    def test_a_hung_plugin_at_its_limit_does_not_starve_another(self):
        release = threading.Event()
        self.addCleanup(release.set)
        hung = Scripted("hung", default=lambda ctx: release.wait(WAIT) and TickAck(),
                        max_concurrent_ticks=64)
        healthy_ran = threading.Event()
        healthy = Scripted("ok", default=lambda ctx: healthy_ran.set() or TickAck())
        jobs = [self.job(f"h{i}", kind="hung") for i in range(64)] + [self.job("b", kind="ok")]
        cfg = config_from_dict({"state_db": self.db, "default_jitter_ms": 0, "max_workers": 8,
                                "shutdown_grace_secs": 3, "jobs": jobs},
                               extra_kinds=["hung", "ok"])
        r = Runner(cfg, clock=lambda: self.t[0])
        r.register(hung)
        r.register(healthy)
        self.addCleanup(r.stop)
        self.addCleanup(release.set)
        r.start(background=False)
        self.assertEqual(r.fire_due(), 65)
        self.assertTrue(healthy_ran.wait(WAIT), "the healthy plugin never got a thread")
        self.assertLessEqual(len(hung.calls), 7, "one worker stays reserved for the idle lane")
        release.set()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertEqual(len(hung.calls), 64, "queued ticks of the hung plugin ran later")


class StateHealthTests(RunnerCase):

    def test_scheduler_survives_an_unreadable_state_and_reports_it(self):
        from nexo_poller import StateError
        store = SqliteStateStore(self.db)
        # Two failures: a repeated one and the backoff between them (0.5 s, 1 s,
        # 2 s, ... fixed in the module) are seen without waiting out a third.
        fails, seen = [2], []
        real = store.changed

        def changed():
            if fails[0]:
                fails[0] -= 1
                raise StateError("locking protocol")
            return real()
        store.changed = changed
        p = Scripted()
        r = Runner(self.config([self.job(every=0.05)]), state=store)
        r.register(p)
        self.addCleanup(r.stop)
        with self.assertLogs("nexo_poller", "ERROR") as logs:
            r.start()
            self.assertTrue(wait_until(lambda: r.state_error or seen, WAIT))
            seen.append(r.metrics.render(r))
            self.assertTrue(wait_until(lambda: not fails[0] and r.state_error is None, 30))
        self.assertIn("nexo_poller_state_ok 0", seen[0])
        self.assertIn("locking protocol", "\n".join(logs.output))
        self.assertEqual(r.metrics.state_errors, 2)
        calls = len(p.calls)
        self.assertTrue(wait_until(lambda: len(p.calls) > calls + 2, WAIT), "ticking goes on")
        self.assertTrue(r.scheduler_alive)


class RouteTests(RunnerCase):

    def test_one_route_per_kind_and_the_lane_is_the_only_limit(self):
        p = Scripted(max_concurrent_ticks=3)
        r = self.runner(self.config([self.job()]), p, start=False)
        route = r.route_for("mem")
        self.assertIs(route.poller, p)
        self.assertEqual((route.lane.limit, route.plugin_id), (3, None))
        with self.assertRaises(nx_errors.DuplicateKind):
            r.register(Scripted())


class QuietLibraryTests(unittest.TestCase):

    def test_an_embedded_runner_prints_nothing_until_logging_is_configured(self):
        import subprocess
        import sys
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        script = """
import sys, tempfile, os
sys.path.insert(0, sys.argv[1])
import nexo_poller as nx
class Broken:
    kind = "mem"
    def tick(self, ctx):
        raise nx.PollerError.Permanent("gone")
with tempfile.TemporaryDirectory() as d:
    cfg = nx.config_from_dict({"state_db": os.path.join(d, "s.db"), "jobs": [
        {"id": "a", "kind": "mem", "schedule": {"every_secs": 60}}]}, extra_kinds=["mem"])
    r = nx.Runner(cfg)
    r.register(Broken())
    print(str(r.run_once("a").status))
    r.stop()
"""
        out = subprocess.run([sys.executable, "-c", script, root], capture_output=True,
                             text=True, timeout=60)
        self.assertEqual(out.stdout.strip(), "permanent", out.stderr)
        self.assertEqual(out.stderr, "", "a library must not write to stderr by itself")


class ClockStepTests(RunnerCase):
    """Intervals are measured on the monotonic clock; wall time is for cron and at."""

    def runner_with_clocks(self, cfg, poller):
        self.mono = [1000.0]
        r = Runner(cfg, clock=lambda: self.t[0], monotonic=lambda: self.mono[0])
        r.register(poller)
        self.addCleanup(r.stop)
        r.start(background=False)
        return r

    def advance(self, secs, step=0.0):
        self.mono[0] += secs
        self.t[0] += secs + step

    def test_interval_job_keeps_its_pace_when_the_wall_clock_steps_back(self):
        p = Scripted()
        r = self.runner_with_clocks(self.config([self.job(every=1)]), p)
        self.assertEqual(self.fire(r), 1)
        with self.assertLogs("nexo_poller", "WARNING") as logs:
            self.advance(1.0, step=-3600)
            self.assertEqual(self.fire(r), 1, "a step back must not stall the job")
        self.assertIn("wall clock stepped by -3600.0s", "\n".join(logs.output))
        for _ in range(3):
            self.advance(1.0)
            self.assertEqual(self.fire(r), 1)
        self.assertEqual(len(p.calls), 5)
        self.assertEqual(p.calls[-1].now.timestamp(), self.t[0], "plugins get wall time")

    def test_interval_job_does_not_burst_when_the_wall_clock_steps_forward(self):
        p = Scripted()
        r = self.runner_with_clocks(self.config([self.job(every=10)]), p)
        self.assertEqual(self.fire(r), 1)
        self.advance(1.0, step=+3600)
        self.assertEqual(self.fire(r), 0, "an hour of wall time is not an hour of waiting")
        self.advance(9.0)
        self.assertEqual(self.fire(r), 1)
        self.advance(10.0)
        self.assertEqual(self.fire(r), 1)

    def test_cron_job_follows_the_wall_clock_after_a_step(self):
        p = Scripted()
        self.t[0] = T0 - (T0 % 60) + 30                   # half past a minute
        r = self.runner_with_clocks(self.config([self.job("c", every=None) | {
            "schedule": {"cron": "0 * * * * *"}}]), p)
        self.assertEqual(self.fire(r), 0)
        self.advance(1.0, step=+29.5)                     # the wall is now past the minute
        self.assertEqual(self.fire(r), 1, "cron fires at its wall-clock slot")


# ============================================================================
# Reload
# ============================================================================

    def test_tick_queued_when_stop_comes_never_calls_its_poller(self):
        gate, started = threading.Event(), threading.Event()

        def slow(ctx):
            started.set()
            gate.wait(WAIT)
            return TickAck(next_cursor=b"1")

        poller = Scripted(script={"a": [slow]}, max_concurrent_ticks=1)
        r = self.runner(self.config([self.job("a"), self.job("b")]), poller)
        self.assertEqual(r.fire_due(), 2)       # "b" waits in the lane behind "a"
        self.assertTrue(started.wait(WAIT))
        stopper = threading.Thread(target=r.stop)
        stopper.start()
        self.assertTrue(r.stopped.wait(0) is False)
        gate.set()
        stopper.join(WAIT * 2)
        self.assertFalse(stopper.is_alive())
        self.assertEqual([c.job_id for c in poller.calls], ["a"])
        self.assertIsNone(self.row("b")["cursor"])


class HeapTests(RunnerCase):

    def test_rescheduling_does_not_grow_the_heap_without_bound(self):
        r = self.runner(self.config([self.job("a", every=10)]), Scripted())
        for _ in range(3000):                    # each run_once supersedes the live entry
            self.assertEqual(r.run_once("a").status, "ok")
        self.assertLessEqual(r.timer_entries(), 2 * 1 + 1024)
        self.go_to_next(r)
        self.assertEqual(self.fire(r), 1)        # and the live entry still fires


class SchedulerAtScaleTests(RunnerCase):
    """Issue 27 item 1: what made slots late with 100,000 jobs."""

    def test_a_due_slot_is_dispatched_before_a_backlog_of_effects(self):
        # The scheduler thread carried out every committed outcome's effects
        # before it dispatched the slots it had popped: behind a big commit
        # batch, a due slot waited for all of them.
        r = self.runner(self.config([self.job("a", every=10)]), Scripted())
        order, book = [], r._book
        settle, dispatch = r._ticks._settle_one, r._workers.dispatch

        def settle_one(*item):
            if item[0] is None:             # one of the backlog's stand-ins
                order.append("effect")
            else:
                settle(*item)

        def dispatch_one(*args, **kw):
            order.append("dispatch")
            return dispatch(*args, **kw)
        r._ticks._settle_one, r._workers.dispatch = settle_one, dispatch_one
        backlog = 600
        with book.cond:
            book.effects.extend([(None,) * 7] * backlog)
        self.go_to_next(r)                  # "a" is due when the thread first looks
        r._scheduler.start()
        self.assertTrue(wait_until(lambda: len(order) > backlog), order[-3:])
        self.assertTrue(r.wait_idle(WAIT), "the tick did not finish")
        self.assertLess(order.index("dispatch"), backlog)

    def test_the_jobs_leave_the_garbage_collectors_view_while_the_daemon_runs(self):
        # A full collection walked every job's objects: hundreds of ms at
        # 100,000 jobs, with every thread stopped.  Frozen at start, they
        # come back at stop.
        import gc
        cfg = self.config([self.job("a", every=10)])
        r = self.start_runner(cfg, Scripted(), start=False)
        r.start()
        self.assertGreater(gc.get_freeze_count(), 0)
        r.stop()
        self.assertEqual(gc.get_freeze_count(), 0)


    def test_outcomes_waiting_for_the_writer_are_bounded(self):
        # Issue 27 item 1: in a burst the writer is the slowest step, and the
        # workers queued every outcome for it (tens of thousands, each
        # walked again by every full garbage collection).  Now a worker
        # waits while _OUTCOMES_IN_FLIGHT outcomes are between their commit
        # and their effects.
        import nexo_poller as nx
        bound, n = 4, 20
        patch = mock.patch.object(nx, "_OUTCOMES_IN_FLIGHT", bound, create=True)
        patch.start()
        self.addCleanup(patch.stop)
        cfg = self.config([self.job(f"j{i}", every=3600) for i in range(n)],
                          max_workers=3, default_jitter_ms=0)
        r = self.start_runner(cfg, Scripted(), start=False)
        r.open()
        cv, held, seen = threading.Condition(), [], {"submitted": 0, "open": 0, "most": 0}
        commit = r.state.commit

        def holding_commit(state, done=None, **kw):
            def acked(result):
                with cv:
                    seen["open"] -= 1
                done(result)
            with cv:
                seen["submitted"] += 1
                seen["open"] += 1
                seen["most"] = max(seen["most"], seen["open"])
                held.append(lambda: commit(state, acked, **kw))
                cv.notify_all()
        r.state.commit = holding_commit

        def writer():                       # lets commits through 4 at a time, the rest at the end
            while True:
                with cv:
                    if not cv.wait_for(lambda: len(held) >= bound or seen["submitted"] == n,
                                       timeout=WAIT * 4):
                        return
                    batch, held[:] = list(held), []
                    last = seen["submitted"] == n
                for go in batch:
                    go()
                if last and not batch:
                    return
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        r.start()
        self.assertTrue(wait_until(lambda: sum(1 for s in r.status()
                                               if s["last_status"] == "ok") == n, timeout=WAIT * 4),
                        f"{seen}")
        t.join(WAIT)
        self.assertEqual(seen["submitted"], n)
        self.assertLessEqual(seen["most"], bound)

    def test_a_commit_that_fails_unexpectedly_gives_its_room_back(self):
        # The room an outcome takes is given back when it is carried out; a
        # commit raising something unforeseen never gets there, and with its
        # room kept the next tick would wait for it forever.
        import nexo_poller as nx
        patch = mock.patch.object(nx, "_OUTCOMES_IN_FLIGHT", 1)
        patch.start()
        self.addCleanup(patch.stop)
        r = self.runner(self.config([self.job("a")]), Scripted())
        commit_now = r.state.commit_now
        r.state.commit_now = mock.Mock(side_effect=RuntimeError("a bug in a backend"))
        with self.assertRaises(RuntimeError):
            r.run_once("a")
        r.state.commit_now = commit_now
        done = []
        t = threading.Thread(target=lambda: done.append(r.run_once("a").status), daemon=True)
        t.start()
        t.join(WAIT)
        self.assertEqual(done, ["ok"])

    def test_looking_at_the_state_walks_the_running_jobs_not_all(self):
        # Issue 27 item 1: twice a second the scheduler thread built the
        # running set from every job (~3 ms with 100,000, due slots waiting).
        r = self.runner(self.config([self.job(f"j{i}") for i in range(3)]), Scripted())
        book, walks = r._book, []

        class Jobs(dict):
            def values(self):
                walks.append(1)
                return super().values()
        book.jobs = Jobs(book.jobs)
        with book.cond:
            book.mark_running(book.jobs["j1"])
        r._scheduler._poll_state()
        self.assertEqual(r._scheduler._published_running, frozenset({"j1"}))
        with book.cond:
            book.not_running(book.jobs["j1"])
        r._scheduler._poll_state()
        self.assertEqual(r._scheduler._published_running, frozenset())
        self.assertEqual(walks, [])

    def test_a_job_holds_under_1300_bytes_once_scheduled(self):
        # Issue 27 item 1: 100,000 jobs took 2x APScheduler's memory.  Each
        # job held ~1,700 bytes after start (traced): a Schedule, three
        # dicts and the whole entry as written per job, two dict-backed
        # states, the writer still holding the claim's table.
        import gc
        import tracemalloc
        n = 5000
        doc = {"state_db": self.db, "jobs": [
            {"id": f"job-{i}", "kind": "mem",
             "schedule": {"every_secs": 60, "stagger_jitter_ms": 60000}} for i in range(n)]}
        gc.collect()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        cfg = config_from_dict(doc, extra_kinds=["mem"], base_dir=".")
        del doc                              # as the daemon drops the file it read
        r = self.start_runner(cfg, Scripted(), start=False)
        r.start(background=False)
        self.assertTrue(wait_until(lambda: (tracemalloc.get_traced_memory()[0] - before) / n
                                   < 1300, timeout=WAIT),
                        f"{(tracemalloc.get_traced_memory()[0] - before) / n:.0f} bytes a job")


class ReloadTests(RunnerCase):

    def test_reload_diffs_and_applies(self):
        old = self.config([self.job("keep"), self.job("change", config={"v": 1}),
                           self.job("drop")])
        p = Scripted()
        r = self.runner(old, p)
        self.assertEqual(self.fire(r), 3)
        self.t[0] = T0 + 5
        new = self.config([self.job("keep"), self.job("change", config={"v": 2}),
                           self.job("add")])
        diff = r.reload(new)
        self.assertEqual(diff["kept"], ["keep"])
        self.assertEqual(diff["replaced"], ["change"])
        self.assertEqual(diff["removed"], ["drop"])
        self.assertEqual(diff["added"], ["add"])
        self.assertEqual({s["id"] for s in r.status()}, {"keep", "change", "add"})
        self.assertEqual(self.fire(r), 1)                    # the new job, at once
        self.assertEqual(len(p.calls_for("add")), 1)
        self.t[0] = T0 + 10
        self.fire(r)
        self.t[0] = T0 + 1000
        self.fire(r)
        self.assertEqual(len(p.calls_for("drop")), 1, "removed job ticked again")
        self.assertGreaterEqual(len(p.calls_for("keep")), 2)
        self.assertEqual(p.calls_for("change")[-1].config, {"v": 2})
        self.assertGreaterEqual(len(p.calls_for("add")), 2)

    def test_reload_schedule_change_reschedules(self):
        p = Scripted()
        r = self.runner(self.config([self.job("a", every=1000)]), p)
        self.fire(r)
        self.assertEqual(self.next_at(r), T0 + 1000)
        self.t[0] = T0 + 1
        diff = r.reload(self.config([self.job("a", every=10)]))
        self.assertEqual(diff["replaced"], ["a"])
        self.t[0] = T0 + 20
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(p.calls[-1].interval_hint, timedelta(seconds=10))

    def test_removed_then_re_added_job_ignores_stale_heap_entries(self):
        # The removed job's old timer entry must not fire the re-added job.
        p = Scripted()
        r = self.runner(self.config([self.job("x", every=100)]), p)
        self.fire(r)                                     # next slot T0+100 on the heap
        self.t[0] = T0 + 1
        self.assertEqual(r.reload(self.config([]))["removed"], ["x"])
        self.t[0] = T0 + 2
        self.assertEqual(r.reload(self.config([self.job("x", every=10)]))["added"], ["x"])
        self.t[0] = T0 + 3
        self.assertEqual(r.run_once("x").status, "ok")
        nxt = self.next_at(r, "x")
        self.assertEqual(nxt, T0 + 10, "the new schedule counts from the last run; "
                         "an extra tick keeps the planned slot")
        self.t[0] = T0 + 10
        self.assertEqual(self.fire(r), 1)
        self.t[0] = T0 + 100                             # the old entry's time: one tick, not two
        self.assertEqual(self.fire(r), 1)
        self.assertEqual(len(p.calls), 4)


if __name__ == "__main__":
    unittest.main()
