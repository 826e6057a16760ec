"""Plugin limits the runner enforces (section "Runner", issue 25 items 5
and 6): a plugin's rate limit (``max_ticks_per_minute``) and the end of a
crash loop.

Time is the injected clock: the rate limit counts on the runner's
monotonic clock, which the tests move; nothing sleeps and nothing is timed.
"""

import os
import sys
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import (PY, FakePoller, TempDirCase, main_in_process, wait_until,  # noqa: E402
                     write_config, write_manifest)
import nexo_poller as nx  # noqa: E402
from nexo_poller import ManifestError, TickAck, TickStatus, load_manifest  # noqa: E402

T0 = 1_900_000_000.0
WAIT = 10.0


def metric(runner, name, **labels):
    """The value of one series of ``runner``'s /metrics text (None: absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in runner.metrics.render(runner).splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


class Limited(FakePoller):
    """An in-process poller with a rate limit that records, per tick, the
    runner's clock when it started."""

    def __init__(self, kind, per_minute, clock, **kw):
        super().__init__(kind, **kw)
        if per_minute is not None:
            self.max_ticks_per_minute = per_minute
        self.clock = clock
        self.starts = []

    def tick(self, ctx):
        with self.lock:
            self.starts.append(self.clock())
        return super().tick(ctx)


class RateCase(TempDirCase):

    def setUp(self):
        super().setUp()
        self.t = [T0]

    def now(self):
        return self.t[0]

    def runner(self, jobs, *pollers, extra_kinds=("lim", "free"), **top):
        cfg = self.runner_config(jobs, extra_kinds=extra_kinds, **top)
        return self.start_runner(cfg, *pollers, clock=self.now)

    @staticmethod
    def job(job_id, kind, every=10):
        return {"id": job_id, "kind": kind, "schedule": {"every_secs": every}}

    def settle(self, r):
        """Wait until every tick that ran is committed and its effects carried
        out (``wait_idle(0)`` carries out those come so far), so the only
        jobs still running are those a rate limit holds in their lanes."""
        def settled():
            r.wait_idle(0)
            lanes = r.lanes().values()
            running = sum(1 for row in r.status() if row["running"])
            return all(v[0] == 0 for v in lanes) and running == sum(v[1] for v in lanes)
        self.assertTrue(wait_until(settled, WAIT), f"ticks did not finish: {r.lanes()}")

    def assert_within_limit(self, starts, limit):
        """No 60-second window [s, s + 60) holds more than ``limit`` starts."""
        starts = sorted(starts)
        for s in starts:
            inside = [x for x in starts if s <= x < s + 60]
            self.assertLessEqual(len(inside), limit, f"{len(inside)} starts in the minute "
                                 f"from {s - T0:g}s: {[x - T0 for x in inside]}")


class TestRateLimit(RateCase):

    def test_many_due_jobs_never_exceed_the_limit_and_other_kinds_go_on(self):
        lim = Limited("lim", 3, self.now)
        free = Limited("free", None, self.now)
        jobs = [self.job(f"l{i}", "lim") for i in range(10)] + \
            [self.job(f"f{i}", "free") for i in range(2)]
        r = self.runner(jobs, lim, free)
        self.assertEqual(r.fire_due(), 12)
        self.settle(r)
        self.assertEqual(len(lim.starts), 3, "only the limit starts at once")
        self.assertEqual(len(free.starts), 2, "another kind is not held by it")
        self.assertEqual(metric(r, "nexo_poller_ticks_waiting", lane="kind:lim"), 7)
        self.assertEqual(metric(r, "nexo_poller_ticks_rate_limited", lane="kind:lim"), 7)
        self.assertEqual(metric(r, "nexo_poller_ticks_rate_limited", lane="kind:free"), 0)
        for _ in range(60):                 # five minutes, in steps of 5 s
            self.t[0] += 5
            r.fire_due()
            self.settle(r)
        self.assert_within_limit(lim.starts, 3)
        self.assertGreaterEqual(len(lim.starts), 15, "the limited kind kept its pace")
        self.assertEqual({c.job_id for c in lim.calls}, {f"l{i}" for i in range(10)},
                         "every held job got its turn")
        self.assertGreaterEqual(len(free.starts), 2 * 28, "the free kind kept its schedule")

    def test_an_operator_tick_counts_and_is_refused_when_the_window_is_full(self):
        lim = Limited("lim", 2, self.now)
        r = self.runner([self.job("a", "lim"), self.job("b", "lim")], lim)
        self.assertEqual(r.run_once("a").status, TickStatus.OK)
        self.assertEqual(r.run_once("b").status, TickStatus.OK)
        busy = r.run_once("a")
        self.assertEqual(busy.status, TickStatus.BUSY)
        self.assertIn("rate limit of kind:lim (2 ticks a minute)", busy.error)
        self.assertEqual(len(lim.starts), 2)
        self.t[0] += 10
        self.assertEqual(r.fire_due(), 2, "both jobs are due")
        self.assertEqual(len(lim.starts), 2, "scheduled ticks wait: the operator's counted")
        self.t[0] += 50
        r.fire_due()
        self.settle(r)
        self.assertEqual(len(lim.starts), 4)
        self.assert_within_limit(lim.starts, 2)

    def test_a_held_job_renews_its_lease_before_it_polls(self):
        # A job held longer than its lease's TTL holds no lease meanwhile:
        # it claims anew when it starts, before its poller is asked.
        leases = []
        r = None

        def record(ctx):
            leases.append((self.t[0], r.state.load([ctx.job_id])[ctx.job_id].lease_until))
            return TickAck()
        lim = Limited("lim", 1, self.now, default=record)
        r = self.runner([self.job("a", "lim", every=1), self.job("b", "lim", every=1)], lim,
                        lease_min_secs=30)
        r.fire_due()
        self.settle(r)
        for _ in range(30):                 # "b" waits 60 s: twice its 30 s lease
            self.t[0] += 2
            r.fire_due()
            self.settle(r)
        self.assertEqual([c.job_id for c in lim.calls][:2], ["a", "b"])
        self.assert_within_limit(lim.starts, 1)
        for at, until in leases:
            self.assertGreater(until, at, "a tick polled on an expired lease")

    def test_the_scheduler_thread_starts_a_held_tick_when_the_window_lets_it(self):
        lim = Limited("lim", 1, self.now)
        cfg = self.runner_config([self.job("a", "lim", 3600), self.job("b", "lim", 3600)],
                                 extra_kinds=["lim"])
        r = self.start_runner(cfg, lim, start=False, clock=self.now)
        r.start()                           # the scheduler thread, not fire_due
        self.assertTrue(wait_until(lambda: len(lim.starts) == 1
                                   and r.lanes().get("kind:lim", (0, 0, 0))[2] == 1, WAIT),
                        f"one tick ran, one is held: {r.lanes()}")
        self.t[0] += 60                     # the window lets it go: the scheduler, woken, starts it
        r.poke()
        self.assertTrue(wait_until(lambda: len(lim.starts) == 2, WAIT), "the held tick never ran")
        self.assert_within_limit(lim.starts, 1)

    def test_stop_does_not_wait_for_ticks_the_rate_holds(self):
        lim = Limited("lim", 1, self.now)
        r = self.runner([self.job(f"j{i}", "lim") for i in range(3)], lim)
        self.assertEqual(r.fire_due(), 3)
        self.settle(r)
        with self.assertLogs("nexo_poller", "INFO") as logs:
            r.stop()
        self.assertNotIn("did not finish", "\n".join(logs.output))
        self.assertEqual(len(lim.calls), 1, "held ticks are cancelled, never polled")


class TestRateLimitManifest(RateCase):

    def manifest(self, extra, name="nexo-plugin.toml", body=None):
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(body or ('[plugin]\nid = "p"\n[plugin.poller]\nkinds = ["rss"]\n'
                              'broker_topic_prefix = "plugin.poller.rss"\n' + extra))
        return path

    def test_the_manifest_key_is_read_and_checked(self):
        self.assertIsNone(load_manifest(self.manifest("")).max_ticks_per_minute)
        self.assertEqual(load_manifest(self.manifest("max_ticks_per_minute = 30\n"))
                         .max_ticks_per_minute, 30)
        for bad, why in (("0", "outside 1..=60000"), ("60001", "outside 1..=60000"),
                         ('"30"', "must be an integer")):
            with self.assertRaises(ManifestError) as cm:
                load_manifest(self.manifest(f"max_ticks_per_minute = {bad}\n"))
            self.assertIn("plugin.poller.max_ticks_per_minute", str(cm.exception))
            self.assertIn(why, str(cm.exception))

    def test_nexo_plugin_toml_takes_it_in_transport_and_loads_without_it(self):
        nexo = ('[plugin]\nid = "x"\n[capabilities]\npollers = ["rss"]\n'
                '[transport]\nkind = "stdio"\ncommand = "python3"\n')
        self.assertIsNone(load_manifest(self.manifest("", "plugin.toml", nexo))
                          .max_ticks_per_minute)
        h = load_manifest(self.manifest("", "plugin.toml", nexo + "max_ticks_per_minute = 5\n"))
        self.assertEqual(h.max_ticks_per_minute, 5)

    def test_a_plugins_lane_takes_its_limit_and_validate_shows_it(self):
        folder = write_manifest(self.dir, "ratep", "rated", command=PY,
                                args=("-c", "import sys; sys.exit(3)"),
                                poller_extra="max_ticks_per_minute = 1")
        jobs = [self.job(f"j{i}", "rated") for i in range(3)]
        path = write_config(os.path.join(self.dir, "pollers.json"), {
            "state_db": self.db, "default_jitter_ms": 0, "plugins": [folder], "jobs": jobs})
        code, out, err = main_in_process(["validate", "--config", path])
        self.assertEqual(code, 0, err)
        self.assertIn("plugin ratep: at most 1 ticks a minute (max_ticks_per_minute)", out)
        r = self.runner(jobs, plugins=[folder], base_dir=self.dir)
        self.assertEqual(r.fire_due(), 3)
        self.settle(r)
        self.assertEqual(r.lanes()["ratep"][1:], (2, 2), "one started, two held by the rate")
        self.assertEqual(metric(r, "nexo_poller_ticks_rate_limited", lane="ratep"), 2)


# A plugin that counts its starts in ./spawns and, while ./crash exists,
# writes a line to stderr and exits at once; else it waits for its stdin's end.
CRASHY = """\
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "spawns"), "a") as f:
    f.write("x\\n")
if os.path.exists(os.path.join(here, "crash")):
    print("boom: the API refused our key", file=sys.stderr, flush=True)
    sys.exit(3)
sys.stdin.read()
"""


class TestCrashLoop(RateCase):

    def plugin(self, lifecycle, poller_extra=""):
        """plugins/crashy (kind "crashy"), crashing until ``self.calm()``."""
        self.folder = os.path.join(self.dir, "plugins", "crashy")
        os.makedirs(self.folder)
        script = os.path.join(self.folder, "crashy.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(CRASHY)
        open(os.path.join(self.folder, "crash"), "w").close()
        return write_manifest(self.dir, "crashy", "crashy", command=PY, args=(script,),
                              lifecycle=lifecycle, poller_extra=poller_extra)

    def calm(self):
        os.remove(os.path.join(self.folder, "crash"))

    def spawns(self):
        try:
            with open(os.path.join(self.folder, "spawns"), encoding="utf-8") as f:
                return len(f.read().splitlines())
        except FileNotFoundError:
            return 0

    def start(self, folder, **top):
        alerts = []
        real = nx._ClientBase.publish

        def publish(client, topic, payload, *args, **kw):
            if topic == "nexo.poller.alert":
                alerts.append(payload)
            return real(client, topic, payload, *args, **kw)
        patch = mock.patch.object(nx._ClientBase, "publish", publish)
        patch.start()
        self.addCleanup(patch.stop)
        jobs = [self.job("c1", "crashy", 3600), self.job("c2", "crashy", 3600),
                self.job("m1", "mem", 3600)]
        cfg = self.runner_config(jobs, plugins=[folder], base_dir=self.dir, **top)
        self.cfg_args = (jobs, folder, top)
        r = self.start_runner(cfg, FakePoller("mem"), clock=self.now)
        return r, alerts

    def rows(self, r):
        return {row["id"]: row for row in r.status()}

    def assert_given_up(self, r, alerts, crashes):
        sup = r.supervisors()["crashy"]
        self.assertTrue(wait_until(lambda: sup.failed, WAIT), "the crash loop never ended")
        self.assertTrue(wait_until(lambda: self.rows(r)["c2"]["paused"] and alerts, WAIT))
        self.assertEqual(self.spawns(), crashes, "no restart after the crash loop ended")
        self.assertEqual(sup.restarts, crashes - 1)
        self.assertEqual(len(alerts), 1, "exactly one alert")
        jobs, folder, top = self.cfg_args        # `status` (read from the state) says why
        path = write_config(os.path.join(self.dir, "pollers.json"), {
            "state_db": self.db, "plugins": [folder], "jobs": jobs[:2], **top})
        code, out, err = main_in_process(["status", "--config", path])
        self.assertEqual(code, 0, err)
        [line] = [ln for ln in out.splitlines() if ln.startswith("c1 ")]
        self.assertIn(" paused ", line)
        [note] = [ln for ln in out.splitlines() if ln.startswith("c1: paused by ")]
        self.assertIn("nexo-poller (plugin crashy)", note)
        self.assertIn("plugin crashy stays down until one of its jobs is resumed", note)
        self.assertEqual(alerts[0]["plugin"], "crashy")
        self.assertEqual(alerts[0]["jobs"], ["c1", "c2"])
        self.assertIn("boom: the API refused our key", "\n".join(alerts[0]["last_output"]))
        rows = self.rows(r)
        self.assertTrue(rows["c1"]["paused"])
        self.assertIn(f"plugin crashy failed: crashed {crashes} times within 60s",
                      rows["c1"]["pause"]["note"])
        self.assertEqual(rows["c1"]["pause"]["by"], "nexo-poller (plugin crashy)")
        self.assertFalse(rows["m1"]["paused"], "another kind's job is left alone")
        [view] = [p for p in nx._plugin_states(r) if p["id"] == "crashy"]
        self.assertEqual(view["state"], "failed")
        self.assertIn(f"crashed {crashes} times", view["failed"])
        self.assertEqual(self.spawns(), crashes)

    def test_a_long_lived_plugin_in_a_crash_loop_is_given_up_until_a_job_is_resumed(self):
        r, alerts = self.start(self.plugin("long_lived"), plugin_crash_limit=2,
                               plugin_crash_window_secs=60)
        self.assert_given_up(r, alerts, 2)
        self.calm()
        r.resume("c1")                      # one job's resume starts the plugin again ...
        sup = r.supervisors()["crashy"]
        self.assertTrue(wait_until(lambda: self.spawns() == 3 and sup.proc is not None
                                   and sup.proc.poll() is None, WAIT), "not restarted")
        self.assertIsNone(sup.failed)
        rows = self.rows(r)
        self.assertFalse(rows["c1"]["paused"] or rows["c2"]["paused"], "... and its jobs")
        self.assertEqual(len(alerts), 1)

    def test_a_stdio_plugin_takes_its_manifests_limit_and_a_reload_restarts_it(self):
        folder = self.plugin("stdio", "crash_limit = 2\ncrash_window_secs = 60")
        r, alerts = self.start(folder)      # the config's own limit: 5
        self.assert_given_up(r, alerts, 2)
        self.calm()
        jobs, folder, top = self.cfg_args
        diff = r.reload(self.runner_config(jobs, plugins=[folder], base_dir=self.dir, **top))
        self.assertEqual(diff["restarted"], ["crashy"])
        self.assertTrue(wait_until(lambda: self.spawns() == 3, WAIT), "not restarted")
        self.assertTrue(wait_until(lambda: not self.rows(r)["c2"]["paused"], WAIT))
        self.assertEqual(len(alerts), 1)

    def test_the_limits_are_checked_where_they_are_set(self):
        with self.assertRaises(nx.ConfigError) as cm:
            self.runner_config([], plugin_crash_limit=0, plugin_crash_window_secs="x")
        self.assertIn("plugin_crash_limit: 0 is outside 1..1000", str(cm.exception))
        self.assertIn("plugin_crash_window_secs", str(cm.exception))
        with self.assertRaises(ManifestError) as cm:
            load_manifest(os.path.join(self.dir, self.plugin("long_lived", "crash_limit = 0"),
                                       "nexo-plugin.toml"))
        self.assertIn("plugin.poller.crash_limit", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
