"""pollers.json: load_config / config_from_dict (section "Config").

Every file lives in a TemporaryDirectory; nothing is spawned.
"""

import json
import os
import sys
import time
import unittest
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import FakePoller, TempDirCase  # noqa: E402
from nexo_poller import (ConfigError, CronExpr, DaemonConfig, JobConfig, Lifecycle,  # noqa: E402
                         ManifestError, PluginPollerHandle, Runner, Schedule, TickAck,
                         config_from_dict, load_config, load_manifest)

UTC = timezone.utc


def manifest_text(plugin_id="rss_plugin", kinds=("rss",), extra=""):
    return (f'[plugin]\nid = "{plugin_id}"\nversion = "0.1.0"\n\n'
            f'[plugin.entrypoint]\ncommand = {json.dumps(sys.executable)}\n\n'
            f'[plugin.poller]\nkinds = {json.dumps(list(kinds))}\n'
            f'broker_topic_prefix = "plugin.poller.{plugin_id}"\n'
            f'lifecycle = "ephemeral"\n{extra}')


def job(id="j1", kind="rss", schedule=None, **more):
    d = {"id": id, "kind": kind,
         "schedule": {"every_secs": 60} if schedule is None else schedule}
    d.update(more)
    return d


class ConfigTestCase(TempDirCase):
    quiet = False

    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.dir, "pollers.json")

    def write_json(self, doc, name="pollers.json"):
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        return path

    def write_bytes(self, data, name="pollers.json"):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as fh:
            fh.write(data)
        return path

    def write_plugin(self, folder="plugins/rss", **kw):
        full = os.path.join(self.dir, folder)
        os.makedirs(full, exist_ok=True)
        path = os.path.join(full, "nexo-plugin.toml")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(manifest_text(**kw))
        return path

    def load(self, doc, **kw):
        self.write_json(doc)
        return load_config(self.path, **kw)

    def problems(self, doc, **kw):
        """The (path, message) problems of an invalid config."""
        self.write_json(doc)
        with self.assertRaises(ConfigError) as ctx:
            load_config(self.path, **kw)
        exc = ctx.exception
        self.assertTrue(exc.problems, "a ConfigError lists its problems")
        # Every problem shows up in the printed message too.
        for path, msg in exc.problems:
            self.assertIn(msg, str(exc))
            if path:
                self.assertIn(path, str(exc))
        return exc.problems

    def assertProblem(self, problems, path, *needles):
        """Exactly one problem at ``path`` whose message contains every needle."""
        at = [m for p, m in problems if p == path]
        self.assertEqual(len(at), 1, f"expected one problem at {path!r}, got {problems!r}")
        for needle in needles:
            self.assertIn(needle, at[0])
        return at[0]

    def assertOnlyProblem(self, doc, path, *needles, **kw):
        problems = self.problems(doc, **kw)
        self.assertEqual([p for p, _ in problems], [path], problems)
        return self.assertProblem(problems, path, *needles)


class DefaultsTest(ConfigTestCase):

    def test_empty_object_gives_anchor_defaults(self):
        cfg = self.load({})
        self.assertIsInstance(cfg, DaemonConfig)
        self.assertIs(cfg.enabled, True)
        self.assertEqual(cfg.state_db, os.path.join(self.dir, "data", "poller.db"))
        self.assertEqual(cfg.default_jitter_ms, 5000)
        self.assertEqual(cfg.lease_ttl_factor, 2.0)
        self.assertEqual(cfg.failure_alert_cooldown_secs, 3600)
        self.assertEqual(cfg.breaker_threshold, 5)
        self.assertEqual(cfg.backoff_initial_secs, 30)
        self.assertEqual(cfg.backoff_max_secs, 300)
        self.assertEqual(cfg.jobs, [])
        self.assertEqual(cfg.plugins, [])
        self.assertIsNone(cfg.broker)
        self.assertEqual(cfg.source, self.path)

    def test_explicit_values_kept(self):
        cfg = self.load({"enabled": False, "default_jitter_ms": 0, "lease_ttl_factor": 3,
                         "failure_alert_cooldown_secs": 60.5, "breaker_threshold": 2,
                         "backoff_initial_secs": 1, "backoff_max_secs": 10})
        self.assertIs(cfg.enabled, False)
        self.assertEqual(cfg.default_jitter_ms, 0)
        self.assertEqual(cfg.lease_ttl_factor, 3)
        self.assertEqual(cfg.failure_alert_cooldown_secs, 60.5)
        self.assertEqual(cfg.breaker_threshold, 2)
        self.assertEqual((cfg.backoff_initial_secs, cfg.backoff_max_secs), (1, 10))

    def test_pollers_wrapper_accepted(self):
        cfg = self.load({"pollers": {"breaker_threshold": 7,
                                     "jobs": [job()]}}, extra_kinds=["rss"])
        self.assertEqual(cfg.breaker_threshold, 7)
        self.assertEqual([j.id for j in cfg.jobs], ["j1"])

    def test_pollers_wrapper_errors_carry_prefix(self):
        problems = self.problems({"pollers": {"breaker_threshold": "5"}})
        self.assertProblem(problems, "pollers.breaker_threshold", "integer")

    def test_config_from_dict_directly(self):
        cfg = config_from_dict({"state_db": "x.db"}, base_dir=self.dir)
        self.assertEqual(cfg.state_db, os.path.join(self.dir, "x.db"))
        with self.assertRaises(ConfigError):
            config_from_dict({"bogus": 1}, base_dir=self.dir)

    def test_top_level_must_be_object(self):
        for doc in ([], "x", 5, None):
            with self.subTest(doc=doc):
                problems = self.problems(doc)
                self.assertIn("object", problems[0][1])


class PathsTest(ConfigTestCase):

    def test_relative_paths_resolve_against_config_folder(self):
        self.assertNotEqual(os.getcwd(), self.dir)
        self.write_plugin("plugins/rss")
        cfg = self.load({"state_db": "db/state.db", "broker": "unix://rel/b.sock",
                         "plugins": ["plugins/rss"]})
        self.assertEqual(cfg.state_db, os.path.join(self.dir, "db", "state.db"))
        self.assertEqual(cfg.broker, "unix://" + os.path.join(self.dir, "rel", "b.sock"))
        self.assertEqual(cfg.plugins[0].manifest_path,
                         os.path.join(self.dir, "plugins", "rss", "nexo-plugin.toml"))

    def test_config_in_subfolder(self):
        os.makedirs(os.path.join(self.dir, "etc"))
        path = self.write_json({"state_db": "../var/p.db"}, name="etc/pollers.json")
        cfg = load_config(path)
        self.assertEqual(cfg.state_db, os.path.join(self.dir, "var", "p.db"))

    def test_absolute_paths_kept(self):
        cfg = self.load({"state_db": "/srv/poller/state.db", "broker": "unix:///run/b.sock"})
        self.assertEqual(cfg.state_db, "/srv/poller/state.db")
        self.assertEqual(cfg.broker, "unix:///run/b.sock")

    def test_broker_must_be_unix_url(self):
        for bad in ("tcp://localhost:4222", "unix://", "/run/b.sock"):
            with self.subTest(bad=bad):
                self.assertOnlyProblem({"broker": bad}, "broker", "unix://")
        self.assertOnlyProblem({"broker": 5}, "broker")

    def test_empty_state_db_is_rejected(self):
        # "" would otherwise resolve to the config folder itself, a directory.
        self.assertOnlyProblem({"state_db": ""}, "state_db")

    def test_plugin_by_folder_and_by_file(self):
        self.write_plugin("plugins/rss", plugin_id="rss_plugin", kinds=("rss",))
        file2 = self.write_plugin("plugins/gcal", plugin_id="gcal", kinds=("google_calendar",))
        cfg = self.load({"plugins": ["plugins/rss", os.path.relpath(file2, self.dir)],
                         "jobs": [job("a", "rss"), job("b", "google_calendar")]})
        self.assertEqual([p.plugin_id for p in cfg.plugins], ["rss_plugin", "gcal"])
        self.assertIsInstance(cfg.plugins[0], PluginPollerHandle)
        self.assertEqual(cfg.plugins[0].lifecycle, Lifecycle.EPHEMERAL)
        self.assertEqual(cfg.plugins[0].entrypoint_command, sys.executable)
        self.assertEqual([(j.id, j.kind) for j in cfg.jobs], [("a", "rss"),
                                                              ("b", "google_calendar")])

    def test_plugin_by_absolute_file(self):
        path = self.write_plugin("elsewhere")
        cfg = self.load({"plugins": [path]})
        self.assertEqual(cfg.plugins[0].manifest_path, path)


class AllProblemsAtOnceTest(ConfigTestCase):

    def test_four_errors_reported_together(self):
        doc = {
            "breaker_threshold": "5",
            "jobs": [
                job("ok", "rss"),
                job("bad_kind", "nobody_serves_this"),
                job("bad_cron", "rss", {"cron": "0 0 * * * * *"}),
                job("bad_every", "rss", {"every_secs": 0}),
            ],
        }
        problems = self.problems(doc, extra_kinds=["rss"])
        paths = [p for p, _ in problems]
        self.assertEqual(len(problems), 4, problems)
        self.assertProblem(problems, "breaker_threshold", "integer")
        self.assertProblem(problems, "jobs[1].kind", "nobody_serves_this")
        self.assertProblem(problems, "jobs[2].schedule.cron", "7 fields")
        self.assertProblem(problems, "jobs[3].schedule.every_secs")
        self.assertNotIn("jobs[0]", " ".join(paths))

    def test_several_errors_in_one_job(self):
        problems = self.problems({"jobs": [{"id": "", "kind": 5, "agent": [],
                                             "paused_on_boot": "no",
                                             "schedule": {"every_secs": "60"}}]})
        for path in ("jobs[0].id", "jobs[0].kind", "jobs[0].agent",
                     "jobs[0].paused_on_boot", "jobs[0].schedule.every_secs"):
            self.assertProblem(problems, path)

    def test_message_names_source_and_count(self):
        self.write_json({"a": 1, "b": 2})
        with self.assertRaises(ConfigError) as ctx:
            load_config(self.path)
        self.assertEqual(ctx.exception.source, self.path)
        self.assertIn(self.path, str(ctx.exception))
        self.assertIn("2 problems", str(ctx.exception))


class TopLevelErrorsTest(ConfigTestCase):

    def test_unknown_top_level_key(self):
        msg = self.assertOnlyProblem({"breaker_treshold": 3}, "breaker_treshold", "unknown key")
        self.assertIn("breaker_threshold", msg)     # lists the allowed keys

    def test_wrong_types(self):
        self.assertOnlyProblem({"breaker_threshold": "5"}, "breaker_threshold",
                               "integer", "string")
        self.assertOnlyProblem({"enabled": "yes"}, "enabled", "true or false")
        self.assertOnlyProblem({"enabled": 1}, "enabled", "true or false")
        self.assertOnlyProblem({"jobs": {}}, "jobs", "array")
        self.assertOnlyProblem({"jobs": None}, "jobs", "array")
        self.assertOnlyProblem({"plugins": "plugins/rss"}, "plugins", "array")
        self.assertOnlyProblem({"state_db": 5}, "state_db")
        self.assertOnlyProblem({"lease_ttl_factor": "2"}, "lease_ttl_factor", "number")

    def test_bool_where_number_expected(self):
        for key in ("default_jitter_ms", "lease_ttl_factor", "failure_alert_cooldown_secs",
                    "breaker_threshold", "backoff_initial_secs", "backoff_max_secs"):
            with self.subTest(key=key):
                self.assertOnlyProblem({key: True}, key, "boolean")

    def test_float_where_integer_expected(self):
        self.assertOnlyProblem({"breaker_threshold": 5.5}, "breaker_threshold", "integer")
        self.assertOnlyProblem({"default_jitter_ms": 1.5}, "default_jitter_ms", "integer")

    def test_out_of_range(self):
        self.assertOnlyProblem({"breaker_threshold": 0}, "breaker_threshold", "0")
        self.assertOnlyProblem({"default_jitter_ms": -1}, "default_jitter_ms", "-1")
        self.assertOnlyProblem({"backoff_initial_secs": 0}, "backoff_initial_secs")
        self.assertOnlyProblem({"failure_alert_cooldown_secs": -5},
                               "failure_alert_cooldown_secs")


class SeveralDaemonsKeysTest(ConfigTestCase):
    """Issue 21 item 5: the take-over time and the lease settings are keys."""

    def test_defaults_and_explicit_values(self):
        cfg = self.load({})
        self.assertEqual((cfg.daemon_ttl_secs, cfg.lease_min_secs), (20.0, 30.0))
        cfg = self.load({"daemon_ttl_secs": 4, "lease_min_secs": 7.5})
        self.assertEqual((cfg.daemon_ttl_secs, cfg.lease_min_secs), (4, 7.5))

    def test_validated_with_their_paths(self):
        self.assertOnlyProblem({"daemon_ttl_secs": "20"}, "daemon_ttl_secs", "number")
        self.assertOnlyProblem({"daemon_ttl_secs": 0}, "daemon_ttl_secs", "outside 1..3600")
        self.assertOnlyProblem({"lease_min_secs": True}, "lease_min_secs", "boolean")
        self.assertOnlyProblem({"lease_min_secs": 1}, "lease_min_secs", "outside 5..86400")

    def test_lease_min_secs_sets_the_shortest_lease(self):
        cfg = self.load({"state_db": "s.db", "lease_min_secs": 6, "jobs": [
            {"id": "m", "kind": "mem", "schedule": {"every_secs": 1}}]}, extra_kinds=["mem"])
        r = Runner(cfg)
        r.register(FakePoller("mem", default=TickAck(b"1")))
        self.addCleanup(r.stop)
        before = time.time()
        self.assertEqual(r.run_once("m").status, "ok")
        lease = r.state.load(["m"])["m"].lease_until
        self.assertLessEqual(before + 6, lease)
        self.assertLess(lease, before + 30, "the old fixed 30 s minimum still applies")


class JobsTest(ConfigTestCase):

    def test_valid_jobs_parsed(self):
        cfg = self.load({"jobs": [
            job("every", "rss", {"every_secs": 300, "stagger_jitter_ms": 250},
                agent="ana", config={"url": "https://x/feed"},
                failure_to={"channel": "telegram", "to": "ops"}, paused_on_boot=True),
            job("cron", "rss", {"cron": "0 */5 * * * *", "tz": "Europe/Berlin"}),
            job("five", "rss", {"cron": "*/5 * * * *"}),
            job("once", "rss", {"at": "2026-04-26T15:00:00Z"}),
        ]}, extra_kinds=["rss"])
        every, cron, five, once = cfg.jobs
        self.assertEqual((every.id, every.kind, every.agent), ("every", "rss", "ana"))
        self.assertEqual(every.schedule.every_secs, 300)
        self.assertEqual(every.schedule.stagger_jitter_ms, 250)
        self.assertEqual(every.schedule.nominal_interval, 300)
        self.assertEqual(every.config, {"url": "https://x/feed"})
        self.assertEqual(every.failure_to, {"channel": "telegram", "to": "ops"})
        self.assertIs(every.paused_on_boot, True)
        self.assertIsInstance(cron.schedule.cron, CronExpr)
        self.assertEqual(cron.schedule.tz, ZoneInfo("Europe/Berlin"))
        self.assertEqual(cron.schedule.nominal_interval, 60)
        self.assertEqual(five.schedule.cron.seconds, [0])
        self.assertEqual(five.schedule.tz, UTC)
        self.assertEqual(once.schedule.at, datetime(2026, 4, 26, 15, tzinfo=UTC))
        self.assertEqual(once.schedule.nominal_interval, 0)

    def test_job_defaults(self):
        j = self.load({"jobs": [job()]}, extra_kinds=["rss"]).jobs[0]
        self.assertEqual(j.agent, "default")
        self.assertEqual(j.config, {})
        self.assertIsNone(j.failure_to)
        self.assertIs(j.paused_on_boot, False)
        self.assertIsNone(j.schedule.stagger_jitter_ms)

    def test_unknown_job_key(self):
        msg = self.assertOnlyProblem({"jobs": [job(colour="red")]}, "jobs[0].colour",
                                     "unknown key", extra_kinds=["rss"])
        self.assertIn("schedule", msg)

    def test_job_must_be_object(self):
        self.assertOnlyProblem({"jobs": ["j1"]}, "jobs[0]", "object")

    def test_missing_required_fields(self):
        problems = self.problems({"jobs": [{}]}, extra_kinds=["rss"])
        self.assertProblem(problems, "jobs[0].id")
        self.assertProblem(problems, "jobs[0].kind")
        self.assertProblem(problems, "jobs[0].schedule")

    def test_job_config_must_be_object(self):
        # ANCHOR: config is an object passed verbatim to the plugin.
        for bad in ("https://x/feed", [1, 2], 5, None):
            with self.subTest(config=bad):
                self.assertOnlyProblem({"jobs": [job(config=bad)]}, "jobs[0].config",
                                       extra_kinds=["rss"])

    def test_bad_job_id(self):
        self.assertOnlyProblem({"jobs": [job(id="has space")]}, "jobs[0].id",
                               extra_kinds=["rss"])
        self.assertOnlyProblem({"jobs": [job(id="")]}, "jobs[0].id", extra_kinds=["rss"])

    def test_duplicate_job_ids(self):
        problems = self.problems({"jobs": [job("same"), job("other"), job("same")]},
                                 extra_kinds=["rss"])
        self.assertEqual([p for p, _ in problems], ["jobs[2].id"])
        self.assertProblem(problems, "jobs[2].id", "duplicate", "same")

    def test_unknown_kind_lists_known_kinds(self):
        self.write_plugin("plugins/rss", plugin_id="rss_plugin", kinds=("rss", "atom"))
        msg = self.assertOnlyProblem({"plugins": ["plugins/rss"],
                                      "jobs": [job(kind="google_calendar")]},
                                     "jobs[0].kind", "google_calendar", extra_kinds=["crm"])
        for known in ("rss", "atom", "crm"):
            self.assertIn(known, msg)

    def test_unknown_kind_without_plugins_lists_the_built_in_kinds(self):
        self.assertOnlyProblem({"jobs": [job(kind="google_calendar")]}, "jobs[0].kind",
                               "google_calendar",
                               "known kinds: command, gmail, imap, rss, webhook_poll")

    def test_extra_kinds_make_in_process_kind_valid(self):
        cfg = self.load({"jobs": [job(kind="crm")]}, extra_kinds=["crm"])
        self.assertEqual(cfg.jobs[0].kind, "crm")
        cfg = self.load({"jobs": [job(kind="crm")]}, extra_kinds=iter(["crm"]))
        self.assertEqual(cfg.jobs[0].kind, "crm")

    def test_failure_to_unknown_key(self):
        self.assertOnlyProblem(
            {"jobs": [job(failure_to={"channel": "tg", "to": "ops", "cc": "boss"})]},
            "jobs[0].failure_to.cc", "unknown key", extra_kinds=["rss"])

    def test_failure_to_shape(self):
        self.assertOnlyProblem({"jobs": [job(failure_to="ops")]}, "jobs[0].failure_to",
                               extra_kinds=["rss"])
        self.assertOnlyProblem({"jobs": [job(failure_to={"channel": "tg"})]},
                               "jobs[0].failure_to.to", extra_kinds=["rss"])
        self.assertOnlyProblem({"jobs": [job(failure_to={"channel": 1, "to": "x"})]},
                               "jobs[0].failure_to.channel", extra_kinds=["rss"])

    def test_paused_on_boot_must_be_bool(self):
        self.assertOnlyProblem({"jobs": [job(paused_on_boot=1)]}, "jobs[0].paused_on_boot",
                               extra_kinds=["rss"])


class ScheduleConfigTest(ConfigTestCase):

    def sched_problem(self, schedule, path, *needles):
        return self.assertOnlyProblem({"jobs": [job(schedule=schedule)]},
                                      "jobs[0].schedule" + path, *needles, extra_kinds=["rss"])

    def test_none_of_every_cron_at(self):
        self.sched_problem({}, "", "every_secs", "cron", "at")
        self.sched_problem({"stagger_jitter_ms": 5}, "", "exactly one")

    def test_two_of_them(self):
        self.sched_problem({"every_secs": 60, "cron": "* * * * *"}, "", "every_secs", "cron")
        self.sched_problem({"every_secs": 60, "at": "2026-04-26T15:00:00Z"}, "", "exactly one")

    def test_schedule_must_be_object(self):
        self.sched_problem("every 60s", "")
        self.sched_problem(60, "")

    def test_every_secs_bounds_and_type(self):
        self.sched_problem({"every_secs": 0}, ".every_secs", "0")
        self.sched_problem({"every_secs": -1}, ".every_secs")
        self.sched_problem({"every_secs": "60"}, ".every_secs", "number")
        self.sched_problem({"every_secs": True}, ".every_secs", "boolean")

    def test_cron_errors(self):
        self.sched_problem({"cron": "0 0 0 * * * *"}, ".cron", "7 fields")
        self.sched_problem({"cron": "0 0 31 2 *"}, ".cron", "never fires")
        self.sched_problem({"cron": "61 * * * *"}, ".cron", "minute")
        self.sched_problem({"cron": 5}, ".cron")

    def test_bad_tz(self):
        self.sched_problem({"cron": "* * * * *", "tz": "Mars/Olympus"}, ".tz", "Mars/Olympus")
        self.sched_problem({"cron": "* * * * *", "tz": "../../etc/passwd"}, ".tz")
        self.sched_problem({"cron": "* * * * *", "tz": ""}, ".tz")
        self.sched_problem({"cron": "* * * * *", "tz": 5}, ".tz")

    def test_tz_on_non_cron_schedule(self):
        self.sched_problem({"every_secs": 60, "tz": "Europe/Berlin"}, ".tz", "cron")
        self.sched_problem({"at": "2026-04-26T15:00:00Z", "tz": "UTC"}, ".tz", "cron")

    def test_at_needs_offset(self):
        self.sched_problem({"at": "2026-04-26T15:00:00"}, ".at", "offset")
        self.sched_problem({"at": "not a time"}, ".at")
        self.sched_problem({"at": 1777215600}, ".at")

    def test_at_with_offset_is_utc(self):
        j = self.load({"jobs": [job(schedule={"at": "2026-04-26T17:00:00+02:00"})]},
                      extra_kinds=["rss"]).jobs[0]
        self.assertEqual(j.schedule.at, datetime(2026, 4, 26, 15, tzinfo=UTC))

    def test_unknown_schedule_key(self):
        msg = self.sched_problem({"every_secs": 60, "timezone": "UTC"}, ".timezone",
                                 "unknown key")
        self.assertIn("every_secs", msg)

    def test_stagger_jitter(self):
        self.sched_problem({"every_secs": 60, "stagger_jitter_ms": -1}, ".stagger_jitter_ms")
        self.sched_problem({"every_secs": 60, "stagger_jitter_ms": 1.5}, ".stagger_jitter_ms")
        self.sched_problem({"every_secs": 60, "stagger_jitter_ms": True}, ".stagger_jitter_ms")


class PluginsTest(ConfigTestCase):

    def test_two_plugins_claiming_one_kind(self):
        self.write_plugin("plugins/a", plugin_id="rss_a", kinds=("rss",))
        self.write_plugin("plugins/b", plugin_id="rss_b", kinds=("atom", "rss"))
        msg = self.assertOnlyProblem({"plugins": ["plugins/a", "plugins/b"]}, "plugins[1]",
                                     "rss")
        self.assertIn("rss_a", msg)
        self.assertIn("rss_b", msg)

    def test_long_lived_plugin_without_command_is_refused(self):
        folder = os.path.join(self.dir, "plugins/bare")
        os.makedirs(folder)
        with open(os.path.join(folder, "nexo-plugin.toml"), "w", encoding="utf-8") as fh:
            fh.write('[plugin]\nid = "bare"\n[plugin.poller]\nkinds = ["bare"]\n'
                     'broker_topic_prefix = "plugin.poller.bare"\n')
        msg = self.assertOnlyProblem({"plugins": ["plugins/bare"]}, "plugins[0]", "command")
        self.assertIn("long-lived", msg)

    def test_ephemeral_plugin_without_command_loads(self):
        # As in the original: the missing command is the tick's Config error.
        folder = os.path.join(self.dir, "plugins/bare")
        os.makedirs(folder)
        with open(os.path.join(folder, "nexo-plugin.toml"), "w", encoding="utf-8") as fh:
            fh.write('[plugin]\nid = "bare"\n[plugin.poller]\nkinds = ["bare"]\n'
                     'broker_topic_prefix = "plugin.poller.bare"\nlifecycle = "ephemeral"\n')
        cfg = self.load({"plugins": ["plugins/bare"]})
        self.assertIsNone(cfg.plugins[0].entrypoint_command)

    def test_plugin_kind_clashing_with_in_process_kind(self):
        self.write_plugin("plugins/a", plugin_id="rss_a", kinds=("rss",))
        self.assertOnlyProblem({"plugins": ["plugins/a"]}, "plugins[0]", "rss",
                               extra_kinds=["rss"])

    def test_plugin_listed_twice(self):
        path = self.write_plugin("plugins/rss", plugin_id="rss_plugin")
        self.assertOnlyProblem({"plugins": ["plugins/rss", path]}, "plugins[1]",
                               "rss_plugin", "twice")
        self.assertOnlyProblem({"plugins": ["plugins/rss", "plugins/rss/"]}, "plugins[1]",
                               "twice")

    def test_broken_manifest_reported_with_its_own_message(self):
        path = self.write_plugin("plugins/bad", extra="max_concurrent_ticks = 0\n")
        with self.assertRaises(ManifestError) as ctx:
            load_manifest(path)
        own = ctx.exception.detail
        self.assertIn("1..=64", own)
        self.write_plugin("plugins/good", plugin_id="good")
        msg = self.assertOnlyProblem({"plugins": ["plugins/good", "plugins/bad"]},
                                     "plugins[1]", own, "max_concurrent_ticks")
        self.assertIn(path, msg)

    def test_broken_manifest_does_not_hide_other_problems(self):
        self.write_plugin("plugins/bad", extra="tick_timeout_secs = 0\n")
        problems = self.problems({"plugins": ["plugins/bad"], "breaker_threshold": 0,
                                  "jobs": [job(schedule={})]})
        self.assertProblem(problems, "plugins[0]", "tick_timeout_secs")
        self.assertProblem(problems, "breaker_threshold")
        self.assertProblem(problems, "jobs[0].schedule")

    def test_missing_plugin_folder(self):
        self.assertOnlyProblem({"plugins": ["plugins/nope"]}, "plugins[0]", "cannot read")

    def test_plugin_entry_must_be_string(self):
        self.assertOnlyProblem({"plugins": [5]}, "plugins[0]", "path")


class FileErrorsTest(ConfigTestCase):

    def only_problem(self, path_arg=None):
        with self.assertRaises(ConfigError) as ctx:
            load_config(path_arg or self.path)
        self.assertEqual(len(ctx.exception.problems), 1, ctx.exception.problems)
        return ctx.exception.problems[0][1], str(ctx.exception)

    def test_invalid_json_names_line_and_column(self):
        self.write_bytes(b'{\n  "enabled": true,\n  "jobs": [,]\n}\n')
        msg, full = self.only_problem()
        self.assertIn("line 3", msg)
        self.assertIn("column 12", msg)
        self.assertIn(self.path, full)

    def test_trailing_comma(self):
        self.write_bytes(b'{"enabled": true,}')
        msg, _ = self.only_problem()
        self.assertIn("line 1", msg)

    def test_duplicate_json_keys(self):
        self.write_bytes(b'{"enabled": true, "enabled": false}')
        msg, _ = self.only_problem()
        self.assertIn("duplicate", msg)
        self.assertIn("enabled", msg)

    def test_duplicate_keys_nested(self):
        self.write_bytes(b'{"jobs": [{"id": "a", "id": "b", "kind": "rss",'
                         b' "schedule": {"every_secs": 1}}]}')
        msg, _ = self.only_problem()
        self.assertIn("duplicate", msg)

    def test_missing_file(self):
        missing = os.path.join(self.dir, "nope.json")
        msg, full = self.only_problem(missing)
        self.assertIn("cannot read", msg)
        self.assertIn(missing, full)

    def test_directory_instead_of_file(self):
        msg, _ = self.only_problem(self.dir)
        self.assertIn("cannot read", msg)

    def test_non_utf8(self):
        self.write_bytes(b'{"alert_topic": "caf\xe9"}')
        msg, _ = self.only_problem()
        self.assertIn("UTF-8", msg)

    def test_empty_file(self):
        self.write_bytes(b"")
        msg, _ = self.only_problem()
        self.assertIn("JSON", msg)

    def test_path_like_accepted(self):
        import pathlib
        self.write_json({})
        self.assertEqual(load_config(pathlib.Path(self.path)).source, self.path)


class JobConfigEveryTest(unittest.TestCase):

    def test_every_convenience(self):
        j = JobConfig.every("feed", "rss", 300, {"url": "u"})
        self.assertEqual((j.id, j.kind, j.agent), ("feed", "rss", "default"))
        self.assertIsInstance(j.schedule, Schedule)
        self.assertEqual(j.schedule.every_secs, 300)
        self.assertEqual(j.schedule.nominal_interval, 300)
        self.assertEqual(j.schedule.stagger_jitter_ms, 0)
        self.assertIsNone(j.schedule.cron)
        self.assertIsNone(j.schedule.at)
        self.assertEqual(j.config, {"url": "u"})
        self.assertIsNone(j.failure_to)
        self.assertIs(j.paused_on_boot, False)
        self.assertEqual(j.raw["schedule"], {"every_secs": 300, "stagger_jitter_ms": 0})

    def test_every_options(self):
        j = JobConfig.every("feed", "rss", 5, agent="ana", jitter_ms=100)
        self.assertEqual(j.agent, "ana")
        self.assertEqual(j.config, {})
        self.assertEqual(j.schedule.stagger_jitter_ms, 100)
        self.assertEqual(j.schedule.first_after(1000.0), 1000.0)
        self.assertEqual(j.schedule.next_after(1000.0, 1001.0), 1005.0)

    def test_jobs_written_with_one_schedule_share_one(self):
        # Issue 27 item 1: 100,000 jobs held 100,000 equal Schedules (and
        # parsed the same cron 100,000 times).
        every = {"every_secs": 60, "stagger_jitter_ms": 500}
        cron = {"cron": "*/5 * * * *", "tz": "Europe/Madrid"}
        jobs = config_from_dict({"jobs": [
            job("a", schedule=dict(every)), job("b", schedule=dict(every)),
            job("c", schedule=dict(cron)), job("d", schedule=dict(cron)),
            job("e", schedule={"every_secs": 60}, jitter_ms=500),
            job("f", schedule={"every_secs": 60.0, "stagger_jitter_ms": 500})]},
            extra_kinds=["rss"]).jobs
        a, b, c, d, e, f = jobs
        self.assertIs(a.schedule, b.schedule)
        self.assertIs(c.schedule, d.schedule)
        self.assertEqual(c.schedule.tz, ZoneInfo("Europe/Madrid"))
        self.assertIsNot(a.schedule, e.schedule)     # written otherwise: its own key
        self.assertEqual(e.schedule.stagger_jitter_ms, 500)
        self.assertIsNot(a.schedule, f.schedule)     # 60.0 is not 60 in a stored key
        self.assertEqual(a.schedule, f.schedule)     # though it fires the same
        with self.assertRaises(AttributeError):       # shared, so immutable
            a.schedule.every_secs = 1

    def test_a_shared_bad_schedule_is_reported_at_every_job(self):
        bad = {"every_secs": 0, "stagger_jitter_ms": 5}
        with self.assertRaises(ConfigError) as cm:
            config_from_dict({"jobs": [job("a", schedule=dict(bad)),
                                       job("b", schedule=dict(bad))]}, extra_kinds=["rss"])
        where = [w for w, _ in cm.exception.problems]
        self.assertIn("jobs[0].schedule.every_secs", where)
        self.assertIn("jobs[1].schedule.every_secs", where)

    def test_the_entry_as_written_is_kept_compact_and_read_back_whole(self):
        entry = job("a", config={"url": "u", "n": [1, 2]}, extra={"owner": "ana"})
        j = config_from_dict({"jobs": [entry]}, extra_kinds=["rss"]).jobs[0]
        self.assertEqual(j.raw, entry)
        self.assertIsNot(j.raw, j.raw)               # a copy each time: nothing shared to mutate
        self.assertNotIn(" ", j.raw_json)
        self.assertEqual(dict(j.extra), {"owner": "ana"})
        self.assertFalse(hasattr(j, "__dict__"))      # slots: held once per job for the daemon's life

    def test_every_matches_loaded_config(self):
        a = JobConfig.every("feed", "rss", 60, {"u": 1})
        b = config_from_dict({"jobs": [a.raw]}, extra_kinds=["rss"]).jobs[0]
        self.assertEqual((a.id, a.kind, a.agent, a.config), (b.id, b.kind, b.agent, b.config))
        self.assertEqual(a.schedule.every_secs, b.schedule.every_secs)
        self.assertEqual(a.schedule.stagger_jitter_ms, b.schedule.stagger_jitter_ms)


if __name__ == "__main__":
    unittest.main()
