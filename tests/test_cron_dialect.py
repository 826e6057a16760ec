"""Cron dialects (section "Schedule", "Config"): Vixie cron, this project's
default, and nexo's, the ``cron`` crate nexo schedules with (issue 23 item 3).

nexo's dialect: 6 fields (seconds first) or 7 (a year last), day of week
1 = Sunday .. 7 = Saturday, and a day fires only when day of month AND day
of week both match.  The same text means other days in the two dialects,
so each row below gives both.
"""

import json
import os
import sys
import tempfile
import unittest
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import (FakePoller, TempDirCase, main_in_process, write_config,  # noqa: E402
                     write_manifest)
from nexo_poller import (ConfigError, CronExpr, InputError, JobState, config_from_dict,  # noqa: E402
                         next_run)
from nexo_poller import _schedule_key  # noqa: E402

UTC = timezone.utc
# Friday 2 January 2026, midnight UTC: every row counts from here.
FROM = datetime(2026, 1, 2, tzinfo=UTC)
ERR = "error"


def at(text):
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# expression, next fire in Vixie, next fire in nexo (ERR: refused)
TABLE = [
    # Monday-Friday in Vixie, Sunday-Thursday in nexo
    ("0 0 9 * * 1-5", at("2026-01-02T09:00"), at("2026-01-04T09:00")),
    # Vixie: every 13th OR every Saturday; nexo: Friday the 13th only
    ("0 0 9 13 * 6", at("2026-01-03T09:00"), at("2026-02-13T09:00")),
    # 7 in Vixie is Sunday, in nexo Saturday
    ("0 0 9 * * 7", at("2026-01-04T09:00"), at("2026-01-03T09:00")),
    # '?' is "any" in both; 2 is Tuesday in Vixie, Monday in nexo
    ("0 15 10 ? * 2", at("2026-01-06T10:15"), at("2026-01-05T10:15")),
    # names mean the same day in both, any case
    ("0 0 8 * JAN,Jul MON", at("2026-01-05T08:00"), at("2026-01-05T08:00")),
    ("0 0 8 ? * sun", at("2026-01-04T08:00"), at("2026-01-04T08:00")),
    ("0 0 8 ? * Mon-Wed", at("2026-01-05T08:00"), at("2026-01-05T08:00")),
    # nexo's long names
    ("0 0 0 * * Thursday", ERR, at("2026-01-08T00:00")),
    ("0 0 0 1 September *", ERR, at("2026-09-01T00:00")),
    # steps on the day of week: 1,3,5,7 = Mon,Wed,Fri,Sun vs Sun,Tue,Thu,Sat
    ("0 0 9 ? * 1/2", at("2026-01-02T09:00"), at("2026-01-03T09:00")),
    # both restricted, Friday the 13th again by name
    ("0 0 9 13 * FRI", at("2026-01-02T09:00"), at("2026-02-13T09:00")),
    # a 7-field year (nexo only)
    ("0 30 12 1 1 * 2030", ERR, at("2030-01-01T12:30")),
    ("0 0 0 1 1 ? 2027-2031/2", ERR, at("2027-01-01T00:00")),
    # 29 February on a Monday: next in 2044, beyond any 8-year look-ahead
    # (Vixie: a Monday of February, or the 29th)
    ("0 0 0 29 2 MON", at("2026-02-02T00:00"), at("2044-02-29T00:00")),
    # aliases
    ("@weekly", at("2026-01-04T00:00"), at("2026-01-04T00:00")),
    ("@hourly", at("2026-01-02T01:00"), at("2026-01-02T01:00")),
    # seconds
    ("*/20 * * * * *", at("2026-01-02T00:00:20"), at("2026-01-02T00:00:20")),
    # what one dialect refuses
    ("0 9 * * 1", at("2026-01-05T09:00"), ERR),          # nexo needs seconds
    ("0 0 9 * * 0", at("2026-01-04T09:00"), ERR),        # nexo's week is 1-7
    ("0 0 0 1 1 * 2101", ERR, ERR),                      # years end at 2100
    ("0 0 0 1 1 * 1969", ERR, ERR),
    ("0 0 9 ? * 1/8", at("2026-01-05T09:00"), ERR),      # a step beyond the field
    ("0 0 9 * ? *", at("2026-01-02T09:00"), ERR),       # nexo: '?' only in day fields
    ("@midnight", at("2026-01-03T00:00"), ERR),          # nexo has no @midnight
]


class CronDialectTableTest(unittest.TestCase):
    def test_next_fire_in_both_dialects(self):
        for text, vixie, nexo in TABLE:
            for dialect, expected in (("vixie", vixie), ("nexo", nexo)):
                with self.subTest(text=text, dialect=dialect):
                    if expected == ERR:
                        with self.assertRaises(InputError):
                            CronExpr(text, dialect=dialect)
                    else:
                        self.assertEqual(CronExpr(text, dialect=dialect).next_after(FROM),
                                         expected)

    def test_vixie_is_the_default(self):
        self.assertEqual(CronExpr("0 0 9 * * 1-5").next_after(FROM), at("2026-01-02T09:00"))
        self.assertEqual(CronExpr("0 0 9 * * 1-5").dialect, "vixie")

    def test_nexo_friday_13th_runs_on_fridays_the_13th_only(self):
        cron, t, seen = CronExpr("0 0 9 13 * 6", dialect="nexo"), FROM, []
        for _ in range(4):
            t = cron.next_after(t)
            seen.append(t.date().isoformat())
        self.assertEqual(seen, ["2026-02-13", "2026-03-13", "2026-11-13", "2027-08-13"])

    def test_nexo_years_run_out(self):
        cron = CronExpr("0 0 0 1 1 * 2020-2026", dialect="nexo")
        self.assertEqual(cron.next_after(at("2025-06-01")),
                         at("2026-01-01T00:00"))
        self.assertIsNone(cron.next_after(FROM))
        self.assertIsNone(CronExpr("0 0 0 * * *", dialect="nexo").next_after(
            at("2100-12-31T00:00")))

    def test_nexo_never_firing_is_refused(self):
        for text in ("0 0 0 30 2 *", "0 0 0 31 4,6 ?", "0 0 0 29 2 MON 2045-2047"):
            with self.subTest(text=text), self.assertRaisesRegex(InputError, "never fires"):
                CronExpr(text, dialect="nexo")

    def test_errors_name_the_dialect_and_field(self):
        with self.assertRaisesRegex(InputError, r"day of week.*0 is outside 1-7"):
            CronExpr("0 0 9 * * 0", dialect="nexo")
        with self.assertRaisesRegex(InputError, r"nexo.*6 .*or 7"):
            CronExpr("0 9 * * 1", dialect="nexo")
        with self.assertRaisesRegex(InputError, r"year.*2101 is outside 1970-2100"):
            CronExpr("0 0 0 1 1 * 2101", dialect="nexo")
        with self.assertRaisesRegex(InputError, "dialect"):
            CronExpr("* * * * *", dialect="quartz")


def _doc(cron, **top):
    return {"jobs": [{"id": "f13", "kind": "rss", "schedule": {"cron": cron}}], **top}


class CronDialectConfigTest(unittest.TestCase):
    def problems(self, doc):
        with self.assertRaises(ConfigError) as ctx:
            config_from_dict(doc, extra_kinds=["rss"])
        return ctx.exception.problems

    def test_nexo_dialect_reads_cron_as_nexo(self):
        cfg = config_from_dict(_doc("0 0 9 13 * 6", cron_dialect="nexo"), extra_kinds=["rss"])
        self.assertEqual(cfg.cron_dialect, "nexo")
        s = cfg.jobs[0].schedule
        first = s.first_after(FROM.timestamp())
        self.assertEqual(first, at("2026-02-13T09:00").timestamp())
        self.assertEqual(s.next_after(first, first), at("2026-03-13T09:00").timestamp())

    def test_pollers_json_keeps_vixie(self):
        for top in ({}, {"cron_dialect": "vixie"}):
            cfg = config_from_dict(_doc("0 0 9 13 * 6", **top), extra_kinds=["rss"])
            self.assertEqual(cfg.cron_dialect, "vixie")
            self.assertEqual(cfg.jobs[0].schedule.first_after(FROM.timestamp()),
                             at("2026-01-03T09:00").timestamp())

    def test_bad_dialect_names_the_key(self):
        for bad in ("quartz", "Nexo", 1, None):
            with self.subTest(bad=bad):
                probs = self.problems(_doc("0 0 9 * * 1", cron_dialect=bad))
                self.assertEqual([p for p, _ in probs], ["cron_dialect"], probs)
                self.assertIn('"vixie" or "nexo"', probs[0][1])

    def test_bad_nexo_expression_names_job_and_field(self):
        for cron in ("0 9 * * 1", "0 0 9 * * 0", "0 0 9 * * 1 2200"):
            with self.subTest(cron=cron):
                probs = self.problems(_doc(cron, cron_dialect="nexo"))
                self.assertEqual([p for p, _ in probs], ["jobs[0].schedule.cron"], probs)

    def test_bad_vixie_expression_names_job_and_field(self):
        probs = self.problems(_doc("0 0 9 * * 1 2030"))
        self.assertEqual([p for p, _ in probs], ["jobs[0].schedule.cron"], probs)

    def test_switching_dialect_voids_the_stored_slot(self):
        vixie = config_from_dict(_doc("0 0 9 13 * 6"), extra_kinds=["rss"]).jobs[0]
        nexo = config_from_dict(_doc("0 0 9 13 * 6", cron_dialect="nexo"),
                                extra_kinds=["rss"]).jobs[0]
        # a Vixie job keeps the key it had before dialects existed
        self.assertEqual(_schedule_key(vixie), _schedule_key(
            config_from_dict(_doc("0 0 9 13 * 6", cron_dialect="vixie"),
                             extra_kinds=["rss"]).jobs[0]))
        stored = JobState("f13", next_run_at=at("2026-01-03T09:00").timestamp(),
                          schedule_key=_schedule_key(vixie))
        slot, fresh = next_run(stored, nexo.schedule, _schedule_key(nexo), FROM.timestamp())
        self.assertEqual((slot, fresh), (at("2026-02-13T09:00").timestamp(), True))


class CronDialectStatusNextTest(unittest.TestCase):
    def test_status_next_shows_nexo_fire_times(self):
        with tempfile.TemporaryDirectory() as root:
            plugin = write_manifest(root, "rss_plugin", "rss", command=sys.executable)
            path = write_config(os.path.join(root, "pollers.json"), {
                "cron_dialect": "nexo", "state_db": "state.db", "plugins": [plugin],
                "jobs": [{"id": "weekdays", "kind": "rss",
                          "schedule": {"cron": "0 0 9 * * 1-5"}}]})
            code, out, err = main_in_process(["status", "weekdays", "--next", "6", "--json",
                                              "--config", path])
        self.assertEqual(code, 0, err)
        times = [datetime.fromisoformat(t) for t in json.loads(out)]
        self.assertEqual(len(times), 6)
        # nexo's 1-5 is Sunday..Thursday: never a Friday or a Saturday
        self.assertEqual({t.strftime("%a") for t in times}, {"Sun", "Mon", "Tue", "Wed", "Thu"})
        self.assertTrue(all((t.hour, t.minute, t.second) == (9, 0, 0) for t in times), times)


def _next_nine(now, zone):
    """The first 09:00:00 wall time in ``zone`` after ``now`` (a UTC datetime)."""
    local = now.astimezone(zone)
    nine = local.replace(hour=9, minute=0, second=0, microsecond=0)
    if nine <= local:
        nine = (nine.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=zone)
    return nine.astimezone(UTC)


class NexoTzWarningTest(unittest.TestCase):
    """nexo ignores ``tz`` (its cron-tz feature is off): ``validate`` says so
    per job of a nexo file, with how far the first fire moves here."""

    def validate(self, dialect):
        with tempfile.TemporaryDirectory() as root:
            plugin = write_manifest(root, "rss_plugin", "rss", command=sys.executable)
            path = write_config(os.path.join(root, "pollers.json"), {
                "cron_dialect": dialect, "state_db": "state.db", "plugins": [plugin],
                "jobs": [{"id": "ny", "kind": "rss",
                          "schedule": {"cron": "0 0 9 * * *", "tz": "America/New_York"}},
                         {"id": "utc", "kind": "rss",
                          "schedule": {"cron": "0 0 9 * * *", "tz": "UTC"}}]})
            before = datetime.now(UTC)
            code, out, err = main_in_process(["validate", "--config", path])
            after = datetime.now(UTC)
        self.assertEqual(code, 0, err)
        return out, before, after

    def test_validate_warns_per_nexo_job_with_a_tz_and_the_move(self):
        out, before, after = self.validate("nexo")
        ny = ZoneInfo("America/New_York")
        expected = set()
        for now in (before, after):         # the same unless 09:00 passed during the call
            moved = (_next_nine(now, ny) - _next_nine(now, UTC)).total_seconds()
            h, m = divmod(abs(int(moved)) // 60, 60)
            expected.add(("-" if moved < 0 else "+") + f"{h}h" + (f"{m}m" if m else ""))
        warnings = [line for line in out.splitlines() if "warning" in line]
        self.assertEqual(len(warnings), 1, out)     # the UTC job is not named
        self.assertIn("job ny: nexo ran its cron in UTC (it ignores tz)", warnings[0])
        self.assertIn("America/New_York", warnings[0])
        self.assertTrue(any(f"the first fire after now moves by {e} " in warnings[0]
                            for e in expected), (warnings[0], expected))

    def test_a_vixie_file_gets_no_warning(self):
        out, _, _ = self.validate("vixie")
        self.assertNotIn("warning", out)


class NexoPausedOnBootTest(TempDirCase):
    """nexo pauses a ``paused_on_boot`` job again at every start; a
    pollers.json (Vixie) job starts paused only when new."""

    def restarted_paused(self, dialect):
        jobs = [{"id": "p", "kind": "mem", "paused_on_boot": True,
                 "schedule": {"every_secs": 60}}]
        first = self.start_runner(self.runner_config(jobs, cron_dialect=dialect), FakePoller())
        self.assertTrue(first.state.load(["p"])["p"].paused)
        first.resume("p")
        self.assertFalse(first.state.load(["p"])["p"].paused)
        first.stop()
        second = self.start_runner(self.runner_config(jobs, cron_dialect=dialect), FakePoller())
        paused = second.state.load(["p"])["p"].paused
        self.assertEqual(paused, [s for s in second.status() if s["id"] == "p"][0]["paused"])
        return paused

    def test_nexo_job_is_paused_again_after_a_restart(self):
        self.assertTrue(self.restarted_paused("nexo"))

    def test_vixie_job_stays_resumed_after_a_restart(self):
        self.assertFalse(self.restarted_paused("vixie"))


if __name__ == "__main__":
    unittest.main()
