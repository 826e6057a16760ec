"""Issue 12: job state in a JetStream key-value bucket (JetStreamStateStore).

Against a real nats-server with JetStream in a temporary store dir
(tests/nats_support.py): skipped with a visible reason when the binary is
missing, failed instead under NEXO_REQUIRE_NATS=1.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nats_support import NatsServer, require_nats  # noqa: E402
from support import PY, wait_until, write_counter_plugin  # noqa: E402

from nexo_poller import (JetStreamStateStore, JobState, OutboxItem,  # noqa: E402
                         Runner, StateError, TickAck, config_from_dict, encode_cursor,
                         open_state, _kv_token, _kv_untoken)

WAIT = 20.0
HERE = os.path.dirname(os.path.abspath(__file__))


class OfflineTests(unittest.TestCase):
    def test_key_tokens_round_trip_and_are_subject_tokens(self):
        for job_id in ("a", "rss.news:1", "x_y-z", "A.B.C", "9:.:_"):
            token = _kv_token(job_id)
            self.assertRegex(token, r"^[A-Za-z0-9_-]+$")
            self.assertEqual(_kv_untoken(token), job_id)
        self.assertNotEqual(_kv_token("a.b"), _kv_token("a_b"))

    def test_jetstream_needs_a_nats_broker(self):
        for url in (None, "unix:///tmp/x.sock"):
            with self.assertRaisesRegex(StateError, "needs a NATS broker"):
                open_state("jetstream://jobs", broker_url=url)

    def test_config_keeps_a_bucket_as_is(self):
        cfg = config_from_dict({"state_db": "jetstream://jobs", "broker": "nats://127.0.0.1:4222",
                                "jobs": []}, base_dir="/x")
        self.assertEqual(cfg.state_db, "jetstream://jobs")
        from nexo_poller import ConfigError
        with self.assertRaisesRegex(ConfigError, "bucket"):
            config_from_dict({"state_db": "jetstream://a.b", "broker": "nats://127.0.0.1:4222",
                              "jobs": []})


class LiveCase(unittest.TestCase):
    def setUp(self):
        require_nats()
        logger = logging.getLogger("nexo_poller")
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.CRITICAL)
        self.threads0 = threading.active_count()
        self.server = NatsServer().start()
        self.addCleanup(self.server.cleanup)
        self.addCleanup(self.check_threads)

    def check_threads(self):
        self.assertTrue(wait_until(lambda: threading.active_count() <= self.threads0, 10),
                        f"threads left: {threading.enumerate()}")

    def store(self, bucket="jobs", **kw) -> JetStreamStateStore:
        s = JetStreamStateStore(bucket, self.server.url, **kw)
        self.addCleanup(s.close)
        return s


class BackendTests(LiveCase):
    def test_round_trip_and_bucket_conventions(self):
        a = self.store()
        self.assertEqual(a.load(), {})
        got = a.claim({"j.1": time.time() + 60, "k:2": time.time() + 60}, time.time(),
                      paused_on_boot=["k:2"])
        self.assertEqual(set(got), {"j.1", "k:2"})
        self.assertTrue(got["k:2"].paused)
        s = got["j.1"].replace(cursor=b"\x00\xffcur", items_seen_total=3, last_status="ok")
        item = OutboxItem("e1", "j.1", "delivery", "t", "{}", time.time())
        self.assertTrue(a.commit_now(s, outbox=[item]))
        loaded = a.load()
        self.assertEqual(loaded["j.1"].cursor, b"\x00\xffcur")
        self.assertEqual(loaded["j.1"].lease_owner, a.owner)
        self.assertEqual([i.id for i in a.outbox_pending()], ["e1"])
        self.assertEqual(a.outbox_counts(), {"j.1": (1, item.created_at)})
        a.outbox_settle(delivered=[item])
        self.assertEqual(a.outbox(), [])
        self.assertEqual(a.load(["j.1"])["j.1"].delivered_total, 1)
        a.release()
        self.assertIsNone(a.load()["j.1"].lease_owner)
        info = a.client.request("$JS.API.STREAM.INFO.KV_jobs", b"", 5, raw=True)[0]
        for conv in (b'"max_msgs_per_subject":5', b'"allow_rollup_hdrs":true',
                     b'"deny_delete":true', b'"allow_direct":true', b'"discard":"new"'):
            self.assertIn(conv, info)
        ro = self.store(readonly=True)
        self.assertEqual(ro.load()["j.1"].cursor, b"\x00\xffcur")
        with self.assertRaisesRegex(StateError, "no state yet"):
            JetStreamStateStore("other", self.server.url, readonly=True)

    def test_claim_race_grants_each_job_once(self):
        stores = [self.store() for _ in range(4)]
        ids = [f"job{i}" for i in range(10)]
        now, results = time.time(), {}
        barrier = threading.Barrier(len(stores))

        def run(s):
            barrier.wait()
            results[s.owner] = s.claim({i: now + 60 for i in ids}, now)
        threads = [threading.Thread(target=run, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        granted = [i for r in results.values() for i in r]
        self.assertEqual(sorted(granted), sorted(ids))     # each once, none lost
        owners = {j: s.lease_owner for j, s in stores[0].load().items()}
        for owner, got in results.items():
            for j in got:
                self.assertEqual(owners[j], owner)

    def test_commit_after_lost_lease_is_dropped_not_written(self):
        a, b = self.store(), self.store()
        now = time.time()
        a.claim({"j": now + 1}, now)
        self.assertTrue(a.commit_now(JobState("j", cursor=b"1", lease_until=now + 1)))
        self.assertEqual(b.claim({"j": now + 100}, now + 0.5), {})        # held by a
        got = b.claim({"j": now + 100}, now + 2)                            # expired: b's
        self.assertEqual(got["j"].cursor, b"1")     # read in the claim: a's last commit
        self.assertTrue(b.commit_now(got["j"].replace(cursor=b"2")))
        self.assertFalse(a.commit_now(JobState("j", cursor=b"0", lease_until=now + 60)))
        state = b.load()["j"]
        self.assertEqual((state.cursor, state.lease_owner), (b"2", b.owner))
        # a's claim is refused while b holds it, and a release hands it back
        self.assertEqual(a.claim({"j": now + 100}, now + 3), {})
        b.release(["j"])
        self.assertEqual(a.claim({"j": now + 100}, now + 3)["j"].cursor, b"2")

    def test_stale_heartbeat_frees_a_lease(self):
        a, b = self.store(daemon_ttl=0.5), self.store(daemon_ttl=0.5)
        now = time.time()
        a.register_daemon(now)
        a.claim({"j": now + 600}, now)
        self.assertEqual(b.claim({"j": now + 600}, now), {})
        time.sleep(0.8)                      # a stops beating (as if SIGKILLed)
        self.assertIn("j", b.claim({"j": now + 600}, time.time()))
        self.assertEqual(b.register_daemon(time.time()), [])

    def test_commands_reach_the_owner(self):
        owner, cli = self.store(), self.store()
        now = time.time()
        owner.register_daemon(now)
        owner.claim({"j": now + 60}, now)
        self.assertTrue(owner.changed() or True)
        self.assertFalse(owner.changed())
        holder, seq = cli.command("j", "pause")
        self.assertEqual(holder, owner.owner)
        self.assertTrue(owner.changed())
        cmds = owner.pending_commands()
        self.assertEqual([(c.seq, c.job, c.verb) for c in cmds], [(seq, "j", "pause")])
        self.assertEqual(cli.command_result(seq), (False, None))
        state = owner.load(["j"])["j"].replace(paused=True)
        self.assertTrue(owner.commit_now(state, command=(seq, "paused")))
        self.assertEqual(cli.command_result(seq), (True, "paused"))
        self.assertEqual(owner.pending_commands(), [])
        self.assertTrue(cli.load()["j"].paused)
        # no live daemon holds it: applied at once
        owner.unregister_daemon()
        owner.release()
        self.assertEqual(cli.command("j", "resume"), (None, None))
        self.assertFalse(cli.load()["j"].paused)
        self.assertEqual(cli.daemons(), {})
        # a stopped daemon's key and a command done long ago are removed, not just marked
        self.assertEqual(cli._keys("daemon."), [])
        import nexo_poller
        self.addCleanup(setattr, nexo_poller, "_KV_COMMAND_KEEP_SECS",
                        nexo_poller._KV_COMMAND_KEEP_SECS)
        nexo_poller._KV_COMMAND_KEEP_SECS = 0.0
        owner.register_daemon(time.time())
        self.assertEqual(len(cli._keys("cmd.")), 1)
        self.assertEqual(owner.pending_commands(), [])
        self.assertEqual(cli._keys("cmd."), [])
        self.assertEqual(cli.command_result(seq), (True, "command lost"))

    def test_group_commit_pipelines_many_jobs(self):
        a = self.store()
        now = time.time()
        ids = [f"j{i}" for i in range(100)]
        states = a.claim({i: now + 60 for i in ids}, now)
        done = []
        ready = threading.Event()

        def cb(result):
            done.append(result)
            if len(done) == len(ids):
                ready.set()
        for s in states.values():
            a.commit(s.replace(cursor=b"x"), cb)
        self.assertTrue(ready.wait(20))
        self.assertEqual(done, [True] * len(ids))
        self.assertTrue(all(s.cursor == b"x" for s in a.load().values()))

    def test_server_restart_loses_no_committed_cursor(self):
        a = self.store()
        now = time.time()
        a.claim({"j": now + 600}, now)
        for n in range(1, 6):
            self.assertTrue(a.commit_now(JobState("j", cursor=str(n).encode(),
                                                  lease_until=now + 600)))
        self.server.stop()
        restarter = threading.Timer(0.5, self.server.start)
        restarter.start()
        self.addCleanup(restarter.join)
        # a commit during the outage waits for the server, then lands
        self.assertTrue(a.commit_now(JobState("j", cursor=b"6", lease_until=now + 600)))
        self.assertEqual(a.load()["j"].cursor, b"6")
        self.assertTrue(a.commit_now(JobState("j", cursor=b"7", lease_until=now + 600)))
        self.assertEqual(a.load()["j"].cursor, b"7")


class MigrateTests(LiveCase):
    def test_migrate_state_copies_cursors_and_pause_states(self):
        from nexo_poller import SqliteStateStore, main
        tmp = tempfile.mkdtemp(prefix="nexo-js-")
        self.addCleanup(__import__("shutil").rmtree, tmp, True)
        db, conf = os.path.join(tmp, "s.db"), os.path.join(tmp, "pollers.json")
        plugin = write_counter_plugin(tmp, "feed", "mem", "ephemeral",
                                      os.path.join(tmp, "pids"), 1)
        with open(conf, "w") as f:
            json.dump({"state_db": db, "plugins": [plugin], "jobs": [
                {"id": i, "kind": "mem", "schedule": {"every_secs": 60}}
                for i in ("a.1", "b", "c")]}, f)
        src = SqliteStateStore(db)
        now = time.time()
        got = src.claim({"a.1": now + 60, "b": now + 60}, now, paused_on_boot=["b"])
        src.commit_now(got["a.1"].replace(cursor=b"\x01cur", items_seen_total=7),
                       outbox=[OutboxItem("e1", "a.1", "delivery", "t", "{}", now)])
        src.close()
        first = self.store()
        first.import_states([JobState("b", cursor=b"bucket's own")])
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["--config", conf, "--log-level", "error", "migrate-state", "--to",
                         "jetstream://jobs", "--broker", self.server.url])
        self.assertEqual(code, 0)
        self.assertIn("copied 1 jobs", out.getvalue())
        self.assertIn("left alone (already in the bucket): b", out.getvalue())
        loaded = self.store().load()
        self.assertEqual((loaded["a.1"].cursor, loaded["a.1"].items_seen_total), (b"\x01cur", 7))
        self.assertIsNone(loaded["a.1"].lease_owner)
        self.assertEqual(loaded["b"].cursor, b"bucket's own")
        self.assertEqual([i.id for i in self.store().outbox()], ["e1"])


class Recorder:
    """An in-process poller: its cursor counts ticks; every tick records who
    ran it, on which cursor, and checks no other tick of the job is running."""
    kind = "mem"

    def __init__(self, log, name):
        self.log, self.name = log, name

    def tick(self, ctx):
        job = ctx.job_id
        with self.log["lock"]:
            if job in self.log["running"]:
                self.log["overlaps"].append((job, self.name, self.log["running"][job]))
            self.log["running"][job] = self.name
        time.sleep(0.01)
        n = int(ctx.cursor or b"0")
        with self.log["lock"]:
            del self.log["running"][job]
            self.log["ticks"].append((job, self.name, n))
        return TickAck(next_cursor=str(n + 1).encode())


class RunnerTests(LiveCase):
    def config(self, n, every=0.1):
        tmp = tempfile.mkdtemp(prefix="nexo-js-")
        self.addCleanup(__import__("shutil").rmtree, tmp, True)
        return config_from_dict({"state_db": "jetstream://jobs", "default_jitter_ms": 0,
                                 "shutdown_grace_secs": 3, "broker": self.server.url,
                                 "jobs": [{"id": f"job.{i}", "kind": "mem",
                                           "schedule": {"every_secs": every}}
                                          for i in range(n)]},
                                base_dir=tmp, extra_kinds=["mem"])

    def runner(self, cfg, log, name, **kw):
        r = Runner(cfg, state=JetStreamStateStore("jobs", self.server.url, **kw))
        r.register(Recorder(log, name))
        self.addCleanup(r.stop)
        return r

    @staticmethod
    def new_log():
        return {"lock": threading.Lock(), "running": {}, "overlaps": [], "ticks": []}

    def test_runner_ticks_and_commits_through_the_bucket(self):
        log = self.new_log()
        r = self.runner(self.config(3), log, "a").start()
        self.assertTrue(wait_until(lambda: len(log["ticks"]) >= 15))
        r.stop()
        cursors = {j: int(s.cursor) for j, s in self.store(readonly=True).load().items()}
        self.assertEqual(set(cursors), {"job.0", "job.1", "job.2"})
        for job, c in cursors.items():
            self.assertEqual(c, sum(1 for t in log["ticks"] if t[0] == job))
            self.assertIsNone(self.store(readonly=True).load()[job].lease_owner)

    def test_an_idle_daemon_hears_a_queued_command_without_polling(self):
        # Issue 17: the daemon no longer polls its commands every 0.5 s; the
        # KV put of a command wakes it.  Its heartbeat (daemon_ttl / 4 =
        # 150 s here) is the only timer left, far beyond this wait.
        log = self.new_log()
        r = self.runner(self.config(1, every=3600), log, "a", daemon_ttl=600.0).start()
        self.assertTrue(wait_until(lambda: len(log["ticks"]) == 1))
        cli = self.store()
        owner, seq = cli.command("job.0", "pause")
        self.assertEqual(owner, r.state.owner)
        self.assertTrue(wait_until(lambda: cli.command_result(seq)[0], 10),
                        "the idle daemon did not apply the queued command")
        self.assertTrue(cli.load(["job.0"])["job.0"].paused)

    def test_two_runners_share_ten_jobs_one_tick_at_a_time(self):
        log = self.new_log()
        cfg = self.config(10)
        a = self.runner(cfg, log, "a", daemon_ttl=2.0).start()
        b = self.runner(cfg, log, "b", daemon_ttl=2.0).start()
        # b joined after a took everything: a hands a share over as slots come
        self.assertTrue(wait_until(lambda: len({t[0] for t in log["ticks"][-40:]
                                                if t[1] == "b"}) >= 3, 30),
                        "the second daemon got no share")
        a.stop()                                 # a clean stop hands a's jobs over
        mark = len(log["ticks"])
        self.assertTrue(wait_until(lambda: len({t[0] for t in log["ticks"][mark:]
                                                if t[1] == "b"}) == 10, 30))
        b.stop()
        self.assertEqual(log["overlaps"], [])
        last: dict = {}
        for i, (job, tag, n) in enumerate(log["ticks"]):
            prev = last.get(job, (-1, None))
            # Cursors never go backwards nor skip; one repeats only where a's
            # stop cancelled a tick that had run (at-least-once) and b took over.
            allowed = (prev[0] + 1, prev[0]) if i >= mark - 2 and prev[1] == "a" and \
                tag == "b" else (prev[0] + 1,)
            self.assertIn(n, allowed, f"{job}: cursor {n} after {prev}: "
                          f"{[t for t in log['ticks'] if t[0] == job]}")
            last[job] = (n, tag)


    def test_slots_another_daemon_holds_are_no_outcome_lines(self):
        # Issue 21 item 5: on main every slot of every job the other daemon
        # held logged "tick job=... outcome=leased" at INFO.
        records = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = records.append
        logger = logging.getLogger("nexo_poller")
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        logger.setLevel(logging.DEBUG)
        log = self.new_log()
        cfg = self.config(4)
        a = self.runner(cfg, log, "a", daemon_ttl=2.0).start()
        self.assertTrue(wait_until(lambda: len({t[0] for t in log["ticks"]}) == 4))
        b = self.runner(cfg, log, "b", daemon_ttl=2.0).start()
        mark = len(log["ticks"])
        self.assertTrue(wait_until(lambda: len(log["ticks"]) >= mark + 40, 30))
        lines = [r.getMessage() for r in list(records) if r.levelno >= logging.INFO]
        self.assertEqual([m for m in lines if "outcome=leased" in m], [])
        skipped = lambda r: sum(r._metrics.elsewhere.values())  # noqa: E731
        self.assertGreater(skipped(a) + skipped(b), 0,
                           "no slot was skipped for a job held by the other daemon")
        metrics = a._metrics.render(a) + b._metrics.render(b)
        self.assertIn("nexo_poller_slots_held_elsewhere_total{job=", metrics)
        self.assertNotIn('outcome="leased"', metrics)
        # Each daemon reads who holds which job, and sees both daemons.
        holders = wait_until(lambda: (lambda h: h if set(h) == {f"job.{i}" for i in range(4)}
                                      else None)(b.holders()), 15)
        self.assertTrue(holders, "every job has a live holder")
        self.assertLessEqual(set(holders.values()), {a.state.owner, b.state.owner})
        self.assertEqual({s["id"]: s["holder"] for s in a.status()}.keys(), holders.keys())
        self.assertEqual(set(b.state.daemons()), {a.state.owner, b.state.owner})

    def test_daemon_ttl_secs_reaches_the_bucket_store(self):
        cfg = config_from_dict({"state_db": "jetstream://jobs", "broker": self.server.url,
                                "daemon_ttl_secs": 3, "jobs": []})
        r = Runner(cfg)
        self.addCleanup(r.stop)
        r.open()
        self.assertEqual(r.state.daemon_ttl, 3)
        self.assertEqual(r.state.heartbeat_secs, None)      # not registered: no beat yet


# A daemon in its own process: a Runner on the bucket whose in-process poller
# appends {"job", "tag", "cursor"} to a JSON-lines file for every tick.
DAEMON_SRC = r'''
import json, os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from nexo_poller import JetStreamStateStore, Runner, TickAck, config_from_dict
url, tag, out = sys.argv[2], sys.argv[3], sys.argv[4]
lock = threading.Lock()

class P:
    kind = "mem"
    def tick(self, ctx):
        n = int(ctx.cursor or b"0")
        with lock, open(out, "a") as f:
            f.write(json.dumps({"job": ctx.job_id, "tag": tag, "cursor": n}) + "\n")
        return TickAck(next_cursor=str(n + 1).encode())

cfg = config_from_dict({"state_db": "jetstream://jobs", "default_jitter_ms": 0,
                        "lease_ttl_factor": 1, "shutdown_grace_secs": 2, "broker": url,
                        "jobs": [{"id": f"job.{i}", "kind": "mem",
                                  "schedule": {"every_secs": 0.2}} for i in range(10)]},
                       base_dir=os.path.dirname(out), extra_kinds=["mem"])
r = Runner(cfg, state=JetStreamStateStore("jobs", url, daemon_ttl=2.0))
r.register(P())
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
r.start()
print("started", flush=True)
stop.wait()
r.stop()
'''


class ProcessTests(LiveCase):
    def test_sigkilled_daemon_jobs_are_taken_over_from_the_last_commit(self):
        tmp = tempfile.mkdtemp(prefix="nexo-js-")
        self.addCleanup(__import__("shutil").rmtree, tmp, True)
        script, out = os.path.join(tmp, "daemon.py"), os.path.join(tmp, "ticks.jsonl")
        with open(script, "w") as f:
            f.write(DAEMON_SRC)
        procs = {}
        for tag in ("a", "b"):
            p = subprocess.Popen([PY, script, os.path.dirname(HERE), self.server.url, tag, out],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            self.addCleanup(lambda p=p: (p.poll() is None and os.killpg(p.pid, signal.SIGKILL),
                                         p.wait(10), p.stdout.close()))
            self.assertEqual(p.stdout.readline().strip(), b"started")
            procs[tag] = p

        def ticks():
            try:
                with open(out) as f:
                    return [json.loads(line) for line in f if line.endswith("\n")]
            except FileNotFoundError:
                return []
        self.assertTrue(wait_until(lambda: {"a", "b"} <= {t["tag"] for t in ticks()[-40:]}, 30),
                        "both daemons should tick a share")
        latest = {t["job"]: t["tag"] for t in ticks()}       # who ticked each job last
        a_jobs = {job for job, tag in latest.items() if tag == "a"}
        os.killpg(procs["a"].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs["a"].wait(10)
        killed_at = len(ticks())
        first = []

        def taken_over():
            b_jobs = {t["job"] for t in ticks()[killed_at:] if t["tag"] == "b"}
            if not first and b_jobs & a_jobs:
                first.append(time.monotonic() - killed)
            return len(b_jobs) == 10
        self.assertTrue(wait_until(taken_over, 40), "b should take all ten jobs over")
        print(f"\n[jetstream] SIGKILL of a daemon holding {len(a_jobs)} jobs: the first of "
              f"them ticked elsewhere after {first[0] if first else float('nan'):.1f}s, all "
              f"ten by {time.monotonic() - killed:.1f}s (daemon_ttl 2 s, lease_ttl_factor 1)",
              file=sys.stderr)
        os.kill(procs["b"].pid, signal.SIGTERM)
        self.assertEqual(procs["b"].wait(20), 0)
        last: dict = {}
        for t in ticks():
            prev = last.get(t["job"], -1)
            # at-least-once: a tick a dies in before its commit lands runs again
            self.assertIn(t["cursor"], (prev, prev + 1) if t["tag"] == "b" and prev >= 0
                          else (prev + 1,), f"{t} after cursor {prev}")
            last[t["job"]] = max(prev, t["cursor"])


if __name__ == "__main__":
    unittest.main()
