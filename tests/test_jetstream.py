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
from support import PY, FakePoller, wait_until, write_counter_plugin  # noqa: E402

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
        self.assertEqual(cli.kv.keys("daemon."), [])
        import nexo_poller
        self.addCleanup(setattr, nexo_poller, "_KV_COMMAND_KEEP_SECS",
                        nexo_poller._KV_COMMAND_KEEP_SECS)
        nexo_poller._KV_COMMAND_KEEP_SECS = 0.0
        owner.register_daemon(time.time())
        # the pause, and the resume applied at once (stored done: it woke the daemons)
        self.assertEqual(len(cli.kv.keys("cmd.")), 2)
        self.assertEqual(owner.pending_commands(), [])
        self.assertEqual(cli.kv.keys("cmd."), [])
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

    def test_a_commit_of_a_held_job_writes_without_reading_first(self):
        # issue 27 item 3: each commit read its record, then compare-and-set
        # it: two round trips per round where one does (the store wrote or
        # read that record at the revision it knows).
        a = self.store()
        now = time.time()
        states = a.claim({f"j{i}": now + 60 for i in range(5)}, now)
        reads = []
        real = a.client.request_many

        def request_many(requests, timeout):
            requests = list(requests)
            reads.extend(r for r in requests if ".MSG.GET." in r[0])
            return real(requests, timeout)
        a.client.request_many = request_many
        for n in range(3):
            for s in states.values():
                self.assertTrue(a.commit_now(s.replace(cursor=str(n).encode())))
        self.assertEqual(reads, [], "records read to commit jobs this store holds")
        self.assertEqual({s.cursor for s in a.load().values()}, {b"2"})

    def test_a_record_another_writer_changed_is_read_again_not_overwritten(self):
        # The revision a commit assumes is stale once anyone else wrote the
        # record: the write fails, the record is read, and what the other
        # writer kept (here a settled delivery's count) stays.
        a, b = self.store(), self.store()
        now = time.time()
        state = a.claim({"j": now + 60}, now)["j"]
        self.assertTrue(a.commit_now(state.replace(cursor=b"1")))
        b.kv.update("job.j", lambda rec: {**rec, "delivered_total": 7})
        self.assertTrue(a.commit_now(state.replace(cursor=b"2")))
        got = b.load()["j"]
        self.assertEqual((got.cursor, got.delivered_total, got.lease_owner),
                         (b"2", 7, a.owner))
        b.kv.update("job.j", lambda rec: {**rec, "lease_owner": b.owner})   # taken over
        self.assertFalse(a.commit_now(state.replace(cursor=b"3")))
        self.assertEqual(b.load()["j"].cursor, b"2")

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
        self.assertIn("left alone (already there): b", out.getvalue())
        loaded = self.store().load()
        self.assertEqual((loaded["a.1"].cursor, loaded["a.1"].items_seen_total), (b"\x01cur", 7))
        self.assertIsNone(loaded["a.1"].lease_owner)
        self.assertEqual(loaded["b"].cursor, b"bucket's own")
        self.assertEqual([i.id for i in self.store().outbox()], ["e1"])


def recording_tick(log, name):
    """A FakePoller step: the cursor counts ticks; every tick records who ran
    it, on which cursor, and checks no other tick of the job is running."""
    def tick(ctx):
        job = ctx.job_id
        with log["lock"]:
            if job in log["running"]:
                log["overlaps"].append((job, name, log["running"][job]))
            log["running"][job] = name
        time.sleep(0.01)                # a window another runner's tick would overlap
        n = int(ctx.cursor or b"0")
        with log["lock"]:
            del log["running"][job]
            log["ticks"].append((job, name, n))
        return TickAck(next_cursor=str(n + 1).encode())
    return tick


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
        r.register(FakePoller("mem", default=recording_tick(log, name)))
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

    def test_a_delivery_no_nats_message_can_hold_pauses_its_job_by_name(self):
        # item 8: such a commit failed every time, the tick re-ran forever and
        # status showed nothing wrong.
        from nexo_poller import Delivery

        def huge(ctx):
            return TickAck(next_cursor=b"1", deliver=[
                Delivery("c", "r", {"text": "x" * (1 << 20)})])
        r = Runner(self.config(1, every=3600), state=JetStreamStateStore("jobs", self.server.url))
        r.register(FakePoller("mem", default=huge))
        self.addCleanup(r.stop)
        outcome = r.run_once("job.0")
        self.assertEqual(outcome.status, "permanent")
        state = self.store(readonly=True).load(["job.0"])["job.0"]
        self.assertEqual((state.paused, state.cursor, state.last_status), (True, None, "permanent"))
        self.assertRegex(state.last_error, r"job job\.0: delivery \S+ is \d+ bytes.*max_payload")
        self.assertEqual(self.store(readonly=True).outbox(), [])

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
        skipped = lambda r: sum(r.metrics.elsewhere.values())  # noqa: E731
        self.assertGreater(skipped(a) + skipped(b), 0,
                           "no slot was skipped for a job held by the other daemon")
        metrics = a._metrics.render(a) + b._metrics.render(b)
        self.assertIn("nexo_poller_slots_held_elsewhere_total{job=", metrics)
        self.assertNotIn('outcome="leased"', metrics)
        # nexo counts such a slot as a tick skipped (lease busy): its dashboards see it
        self.assertRegex(metrics, r'poller_ticks_total\{agent="[^"]*",job_id="job\.\d",'
                                  r'kind="[^"]*",status="skipped"\} [1-9]')
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


class RecordTests(LiveCase):
    """Issue 26: the job record, its outbox and dead letters under faults."""

    def stalled_owner(self):
        """A daemon holding ``j`` whose heartbeat went stale (as if SIGSTOPped
        past daemon_ttl), and a CLI store that sees it as gone."""
        a, cli = self.store(daemon_ttl=0.5), self.store(daemon_ttl=0.5)
        now = time.time()
        a.register_daemon(now)
        state = a.claim({"j": now + 600}, now)["j"]
        self.assertTrue(a.commit_now(state.replace(cursor=b"1")))
        self.assertTrue(wait_until(lambda: a.owner not in cli.daemons(), 10))
        return a, cli, state

    def test_a_command_applied_past_a_stalled_owner_is_not_written_back(self):
        # item 1: pause finds no live holder and writes paused=true itself; the
        # stalled daemon's next commit must not rewrite it from memory.
        a, cli, state = self.stalled_owner()
        self.assertEqual(cli.command("j", "pause"), (None, None))
        self.assertFalse(a.commit_now(state.replace(cursor=b"2")))      # lease lost
        rec = cli.load(["j"])["j"]
        self.assertEqual((rec.paused, rec.cursor), (True, b"1"))
        # its runner claims again: the record as the operator left it
        got = a.claim({"j": time.time() + 600}, time.time())["j"]
        self.assertEqual((got.paused, got.cursor), (True, b"1"))

    def test_a_cursor_set_past_a_stalled_owner_is_not_written_back(self):
        from nexo_poller import cursor_command_arg
        a, cli, state = self.stalled_owner()
        self.assertEqual(cli.command("j", "cursor", arg=cursor_command_arg(b"set", "set")),
                         (None, None))
        self.assertFalse(a.commit_now(state.replace(cursor=b"2")))
        self.assertEqual(cli.load(["j"])["j"].cursor, b"set")


    def test_an_older_record_with_its_outbox_inside_moves_it_to_keys_when_claimed(self):
        a = self.store()
        old = [json.loads(json.dumps(i.__dict__)) for i in self.items("j", 3)]
        rec = {"id": "j", "cursor": None, "paused": False, "outbox": old, "commands": {}}
        a.kv.put_many([("job.j", rec, 0)])
        self.assertEqual([i.id for i in a.outbox()], ["e0", "e1", "e2"])
        self.assertEqual(a.outbox_counts(), {"j": (3, 1000.0)})
        now = time.time()
        a.claim({"j": now + 600}, now)
        self.assertNotIn("outbox", a.kv.get_many(["job.j"])["job.j"][0])
        got = a.outbox_pending()
        self.assertEqual([i.id for i in got], ["e0", "e1", "e2"])
        a.outbox_settle(delivered=got[:2])
        self.assertEqual([i.id for i in a.outbox()], ["e2"])
        self.assertEqual(a.load(["j"])["j"].delivered_total, 2)

    def test_key_listings_read_past_the_first_page(self):
        # item 12: STREAM.INFO lists 100,000 subjects a page; the dead letters
        # past it were invisible to outbox, retry and drop.
        a = self.store()
        n = 100_010
        for start in range(0, n, 10_000):
            for i in range(start, min(n, start + 10_000)):
                a.client.publish(f"$KV.jobs.dead.d{i:06d}", b"{}", raw=True)
            a.client.flush()
        last = OutboxItem("zz", "j", "delivery", "t", "{}", 1.0)
        a.kv.put_many([("dead.zz", json.loads(json.dumps(last.__dict__)), None)])
        self.assertTrue(wait_until(lambda: len(a.kv.keys("dead.")) == n + 1, 30),
                        f"{len(a.kv.keys('dead.'))} of {n + 1} dead letters listed")
        self.assertEqual(a.outbox_drop(["zz"], dead=True), 1)
        self.assertNotIn("dead.zz", a.kv.keys("dead."))


    def test_release_is_one_pipelined_round_however_many_leases(self):
        # item 15: each lease was released with its own read-modify-write, one
        # after another (1,000 jobs, NATS 10 ms away: ~23 s past the grace).
        a, other = self.store(), self.store()
        now = time.time()
        ids = [f"j{i}" for i in range(200)]
        self.assertEqual(len(a.claim({i: now + 600 for i in ids}, now)), 200)
        rounds = []
        for name in ("request", "request_many"):
            real = getattr(a.client, name)
            setattr(a.client, name, lambda *args, _real=real, **kw: (rounds.append(1),
                                                                   _real(*args, **kw))[1])
        a.set_deadline(time.monotonic() + 30)
        a.release()
        self.assertLessEqual(len(rounds), 3, "round trips to release 200 leases")
        self.assertTrue(all(s.lease_owner is None for s in other.load().values()))
        self.assertEqual(len(other.claim({i: now + 600 for i in ids}, now)), 200)


    @staticmethod
    def items(job, n, tag="", size=150):
        return [OutboxItem(f"{tag}e{i}", job, "delivery", "t",
                           json.dumps({"n": i, "pad": "x" * size}), 1000.0 + i)
                for i in range(n)]

    def test_a_tick_of_ten_thousand_deliveries_is_stored_and_kept_in_order(self):
        # item 8: the job's one record (cursor + outbox) passed max_payload
        # (1 MiB): every commit failed and the tick re-ran forever.
        a = self.store()
        now = time.time()
        state = a.claim({"j": now + 600}, now)["j"]
        items = self.items("j", 10_000)
        self.assertTrue(a.commit_now(state.replace(cursor=b"1"), outbox=items))
        self.assertEqual(a.load(["j"])["j"].cursor, b"1")
        got = a.outbox_pending(limit=600)
        self.assertEqual([i.id for i in got], [i.id for i in items[:600]])
        self.assertEqual(a.outbox_counts(), {"j": (10_000, 1000.0)})

    def test_a_sink_outage_never_stops_the_job_advancing(self):
        # item 9: undelivered items piled up in the job's record until it
        # passed max_payload; from then on the job stopped advancing.
        a = self.store()
        now = time.time()
        state = a.claim({"j": now + 600}, now)["j"]
        for n in range(12):                 # 12 ticks x 500 x ~200 bytes: past 1 MiB
            state = state.replace(cursor=str(n).encode())
            self.assertTrue(a.commit_now(state, outbox=self.items("j", 500, f"t{n}-")),
                            f"tick {n} not stored")
        self.assertEqual(a.load(["j"])["j"].cursor, b"11")
        self.assertEqual(a.outbox_counts()["j"][0], 6000)
        first = a.outbox_pending(limit=3)
        self.assertEqual([i.id for i in first], ["t0-e0", "t0-e1", "t0-e2"])
        a.outbox_settle(delivered=first)
        self.assertEqual([i.id for i in a.outbox_pending(limit=1)], ["t0-e3"])
        self.assertEqual(a.load(["j"])["j"].delivered_total, 3)

    def test_thirty_two_big_command_results_leave_the_job_committing(self):
        # Follow-up item 3: the record kept the last 32 results of up to
        # 64 KiB each, past max_payload (1 MiB): every commit of the job failed.
        a, cli = self.store(), self.store()
        now = time.time()
        a.register_daemon(now)
        state = a.claim({"j": now + 600}, now)["j"]
        for n in range(32):
            owner, seq = cli.command("j", "tick")
            self.assertEqual(owner, a.owner)
            result = json.dumps({"job": "j", "outcome": "ok", "error": f"{n}" + "x" * 65400})
            state = state.replace(cursor=str(n).encode())
            self.assertTrue(a.commit_now(state, command=(seq, result)), f"commit {n}")
        self.assertEqual(a.load(["j"])["j"].cursor, b"31")
        self.assertEqual(cli.command_result(seq)[0], True)
        rec = a.kv.get_many(["job.j"])["job.j"][0]
        self.assertIn(str(seq), rec["commands"], "the newest result is kept")
        self.assertLess(len(json.dumps(rec)), a.client.max_payload // 2)

    def test_a_single_delivery_over_max_payload_fails_its_commit_by_name(self):
        a = self.store()
        now = time.time()
        state = a.claim({"j": now + 600}, now)["j"]
        big = self.items("j", 1, size=a.client.max_payload)
        with self.assertRaisesRegex(StateError, r"job j: delivery e0 .*max_payload"):
            a.commit_now(state.replace(cursor=b"1"), outbox=big)
        self.assertIsNone(a.load(["j"])["j"].cursor)

    def failing(self, store, name, when):
        """Make ``store.<name>`` raise a NATS-outage StateError on the calls
        for which ``when(args)`` is true."""
        real = getattr(store, name)

        def call(*args, **kw):
            if when(args):
                raise StateError("injected: NATS went away")
            return real(*args, **kw)
        setattr(store, name, call)
        self.addCleanup(setattr, store, name, real)

    def holding(self, n):
        """A store holding job ``j`` with ``n`` committed outbox items."""
        a = self.store()
        now = time.time()
        state = a.claim({"j": now + 600}, now)["j"]
        items = self.items("j", n)
        self.assertTrue(a.commit_now(state, outbox=items))
        return a, items

    def outbox_and_dead(self, store):
        return ([i.id for i in store.outbox()], [i.id for i in store.outbox(dead=True)])

    def test_a_dead_letter_is_never_lost_between_its_two_writes(self):
        # item 10: the job record was rewritten (the item gone) before the
        # dead.<id> key was written; an outage in between lost the item.
        a, items = self.holding(2)
        now = time.time()
        # the dead letter's write fails (an outage): the item stays somewhere
        self.failing(a.kv, "put_many", lambda args: any(
            k.startswith("dead.") for k, _, _ in args[0]))
        with self.assertRaises(StateError):
            a.outbox_settle(dead=[(items[0], "HTTP 500")], now=now)
        box, dead = self.outbox_and_dead(a)
        self.assertIn("e0", box + dead)
        del a.kv.put_many                      # back to the real one
        a.outbox_settle(dead=[(items[0], "HTTP 500")], now=now)
        self.assertEqual(self.outbox_and_dead(a), (["e1"], ["e0"]))
        self.assertEqual(a.outbox(dead=True)[0].last_error, "HTTP 500")

    def test_an_interrupted_retry_loses_no_dead_letter(self):
        # item 11: outbox retry deleted every dead letter first and re-queued
        # after; an error in between lost the deleted ones.
        a, items = self.holding(3)
        a.outbox_settle(dead=[(i, "gone") for i in items[:2]], now=time.time())
        self.assertEqual(self.outbox_and_dead(a), (["e2"], ["e0", "e1"]))
        cli = self.store()
        self.failing(cli.kv, "put_many", lambda args: any(
            k.startswith(("job.", "out.")) for k, _, _ in args[0]))
        with self.assertRaises(StateError):
            cli.outbox_retry()
        box, dead = self.outbox_and_dead(cli)
        self.assertEqual(sorted(set(box + dead)), ["e0", "e1", "e2"])
        del cli.kv.put_many
        self.assertEqual(cli.outbox_retry(), 3)
        self.assertEqual(self.outbox_and_dead(cli), (["e2", "e0", "e1"], []))
        # the holder delivers them in that order, each once
        got = a.outbox_pending()
        self.assertEqual([i.id for i in got], ["e2", "e0", "e1"])
        self.assertEqual([i.attempts for i in got], [0, 0, 0])


# The end of every daemon script below: run the Runner ``r`` on the poller P
# until SIGTERM.
DAEMON_RUN = r'''
r.register(P())
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
r.start()
print("started", flush=True)
stop.wait()
r.stop()
'''


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
''' + DAEMON_RUN


class ProcessTests(LiveCase):
    def setUp(self):
        super().setUp()
        tmp = tempfile.mkdtemp(prefix="nexo-js-")
        self.addCleanup(__import__("shutil").rmtree, tmp, True)
        self.script, self.out = os.path.join(tmp, "daemon.py"), os.path.join(tmp, "ticks.jsonl")
        with open(self.script, "w") as f:
            f.write(DAEMON_SRC)

    def spawn(self, tag: str) -> subprocess.Popen:
        """A daemon process (DAEMON_SRC) named ``tag``, once it has started."""
        p = subprocess.Popen([PY, self.script, os.path.dirname(HERE), self.server.url, tag,
                              self.out], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.addCleanup(lambda p=p: (p.poll() is None and os.killpg(p.pid, signal.SIGKILL),
                                     p.wait(10), p.stdout.close()))
        self.assertEqual(p.stdout.readline().strip(), b"started")
        return p

    def ticks(self) -> list[dict]:
        try:
            with open(self.out) as f:
                return [json.loads(line) for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return []

    def test_sigkilled_daemon_jobs_are_taken_over_from_the_last_commit(self):
        procs = {tag: self.spawn(tag) for tag in ("a", "b")}
        ticks = self.ticks
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

    def test_commands_queued_for_a_dead_daemon_go_before_the_take_over_tick(self):
        # Issue 26 item 3: a pause (or reset) queued for a daemon that has just
        # died was applied by the daemon taking the job over after one more
        # tick of the job.
        a = self.spawn("a")
        self.assertTrue(wait_until(lambda: {"job.0", "job.1"} <= {
            t["job"] for t in self.ticks() if t["cursor"] >= 2}, 30))
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(10)
        cli = self.store()
        holder, paused = cli.command("job.0", "pause")     # a's heartbeat is still fresh:
        _, reset = cli.command("job.1", "reset")            # both are queued for a
        self.assertIsNotNone(holder)
        self.assertIsNotNone(paused)
        self.assertIsNotNone(reset)
        killed_at = len(self.ticks())
        self.spawn("b")
        self.assertTrue(wait_until(lambda: cli.command_result(paused)[0]
                                   and cli.command_result(reset)[0], 40),
                        "b did not apply the commands queued for a")
        self.assertTrue(wait_until(lambda: [t for t in self.ticks()[killed_at:]
                                            if t["job"] == "job.1"], 20))
        after = self.ticks()[killed_at:]
        self.assertEqual([t for t in after if t["job"] == "job.0"], [],
                         "the take-over ticked the job a pause was queued for")
        self.assertEqual([t["cursor"] for t in after if t["job"] == "job.1"][0], 0,
                         "the take-over's first tick did not start from the queued reset")
        self.assertTrue(cli.load(["job.0"])["job.0"].paused)


# A daemon whose every tick hands on one delivery {"job", "n"} (n: the cursor
# it ticked from) to a sink that appends it to a JSON-lines file, failing
# about one call in two; two attempts, then a dead letter.
CHAOS_SRC = r'''
import json, os, random, signal, sys, threading
sys.path.insert(0, sys.argv[1])
from nexo_poller import Delivery, JetStreamStateStore, Runner, TickAck, config_from_dict
url, out = sys.argv[2], sys.argv[3]

class P:
    kind = "mem"
    def tick(self, ctx):
        n = int(ctx.cursor or b"0")
        return TickAck(next_cursor=str(n + 1).encode(),
                       deliver=[Delivery("c", "r", {"job": ctx.job_id, "n": n, "k": k})
                                for k in range(3)])

def sink(topic, event):
    if random.random() < 0.5:
        raise ConnectionError("sink flaky")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (json.dumps(event["payload"]) + "\n").encode())
    os.close(fd)

cfg = config_from_dict({"state_db": "jetstream://jobs", "default_jitter_ms": 0,
                        "lease_ttl_factor": 1, "shutdown_grace_secs": 2, "broker": url,
                        "delivery_max_attempts": 2, "delivery_retry_initial_secs": 0.05,
                        "delivery_retry_max_secs": 0.1,
                        "jobs": [{"id": f"job.{i}", "kind": "mem",
                                  "schedule": {"every_secs": 0.1}} for i in range(12)]},
                       base_dir=os.path.dirname(out), extra_kinds=["mem"])
r = Runner(cfg, state=JetStreamStateStore("jobs", url, daemon_ttl=1.0), deliver=sink)
''' + DAEMON_RUN


@unittest.skipUnless(os.environ.get("NEXO_TEST_FULL") == "1",
                     "NEXO_TEST_FULL=1: daemon processes SIGSTOPped and SIGKILLed")
class ChaosTests(LiveCase):
    def daemon(self, src, *args):
        """A daemon process running ``src``; its cleanup kills and reaps it."""
        tmp = tempfile.mkdtemp(prefix="nexo-js-")
        self.addCleanup(__import__("shutil").rmtree, tmp, True)
        script = os.path.join(tmp, "daemon.py")
        with open(script, "w") as f:
            f.write(src)
        p = subprocess.Popen([PY, script, os.path.dirname(HERE), self.server.url, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.addCleanup(lambda: (p.poll() is None and os.killpg(p.pid, signal.SIGKILL),
                                 p.wait(10), p.stdout.close()))
        self.assertEqual(p.stdout.readline().strip(), b"started")
        return p

    def test_a_daemon_stopped_past_daemon_ttl_does_not_undo_a_pause(self):
        # item 1 end to end: SIGSTOP past daemon_ttl, `pause` applied to the
        # record, SIGCONT: the daemon's next commit rewrote paused=false and
        # the job kept ticking.
        tmp = tempfile.mkdtemp(prefix="nexo-js-")
        self.addCleanup(__import__("shutil").rmtree, tmp, True)
        out = os.path.join(tmp, "ticks.jsonl")
        p = self.daemon(DAEMON_SRC, "a", out)

        def ticks(job):
            with open(out) as f:
                return sum(1 for line in f
                           if line.endswith("\n") and json.loads(line)["job"] == job)
        self.assertTrue(wait_until(lambda: os.path.exists(out) and ticks("job.0") >= 3, 20))
        cli = self.store(daemon_ttl=2.0)
        os.killpg(p.pid, signal.SIGSTOP)
        try:
            self.assertTrue(wait_until(lambda: cli.daemons() == {}, 20))
            self.assertEqual(cli.command("job.0", "pause"), (None, None))
            before, others = ticks("job.0"), ticks("job.1")
        finally:
            os.killpg(p.pid, signal.SIGCONT)
        self.assertTrue(wait_until(lambda: ticks("job.1") >= others + 10, 30),
                        "the daemon should go on ticking its other jobs")
        # one tick of job.0 may have been running when the daemon stopped
        self.assertLessEqual(ticks("job.0"), before + 1)
        self.assertTrue(cli.load(["job.0"])["job.0"].paused)

    def test_sigkilled_daemons_lose_no_committed_delivery(self):
        # item 10's chaos run: two daemons killed every 0.5-3 s lost 40 and 21
        # deliveries in 2 of 3 runs.  Every delivery of a committed tick must
        # end delivered, dead-lettered or still queued.
        import random
        tmp = tempfile.mkdtemp(prefix="nexo-js-")
        self.addCleanup(__import__("shutil").rmtree, tmp, True)
        out = os.path.join(tmp, "sink.jsonl")

        def spawn():
            return self.daemon(CHAOS_SRC, out)
        live = [spawn(), spawn()]
        rng, kills = random.Random(), 0
        until = time.monotonic() + 20
        pause = threading.Event()
        while time.monotonic() < until:
            pause.wait(rng.uniform(0.5, 3.0))
            victim = live.pop(rng.randrange(len(live)))
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(10)
            kills += 1
            live.append(spawn())
        for p in live:
            os.kill(p.pid, signal.SIGTERM)
            self.assertEqual(p.wait(20), 0)
        cli = self.store(readonly=True)
        cursors = {j: int(s.cursor or b"0") for j, s in cli.load().items()}
        with open(out) as f:
            sunk = {(d["job"], d["n"], d["k"]) for d in map(json.loads, f)}
        dead = {(json.loads(i.body)["payload"]["job"], json.loads(i.body)["payload"]["n"],
                 json.loads(i.body)["payload"]["k"]) for i in cli.outbox(dead=True)}
        queued = {(json.loads(i.body)["payload"]["job"], json.loads(i.body)["payload"]["n"],
                   json.loads(i.body)["payload"]["k"]) for i in cli.outbox()}
        committed = {(j, n, k) for j, c in cursors.items() for n in range(c) for k in range(3)}
        lost = sorted(committed - sunk - dead - queued)
        print(f"\n[jetstream chaos] {kills} SIGKILLs, {len(committed)} committed deliveries: "
              f"{len(sunk & committed)} delivered, {len(dead)} dead letters, "
              f"{len(queued)} queued, {len(lost)} lost", file=sys.stderr)
        self.assertEqual(lost, [])
        self.assertGreater(len(dead), 0, "the flaky sink should have made dead letters")


def queued_item(store, item_id="X"):
    """Job j claimed by ``store``, with one outbox item, listed: the item."""
    now = time.time()
    st = store.claim({"j": now + 600}, now)["j"]
    store.commit_now(st, outbox=[OutboxItem(item_id, "j", "delivery", "t", "{}", now)])
    [item] = store.outbox_pending(10, now)
    return item


class ReviewRaceTests(LiveCase):
    """Races the review found (review findings 1, 4, 7)."""

    def dead_letter(self, store, item_id="X"):
        item = queued_item(store, item_id)
        store.outbox_settle(dead=[(item, "HTTP 410")], now=item.created_at)
        return item

    def test_a_letter_dead_again_during_a_retry_is_kept(self):
        # The CLI re-queues dead letter X; before it removes dead.X, the
        # daemon delivers X, which dies again onto dead.X: that new letter
        # must survive the CLI's removal of the one it read.
        daemon, cli = self.store(), self.store()
        self.dead_letter(daemon)
        real_purge = cli.kv.purge

        def purge(keys, *args, **kw):
            keys = list(keys)
            if any(k.startswith("dead.") for k in keys):
                [again] = daemon.outbox_pending(10, time.time())
                daemon.outbox_settle(dead=[(again, "HTTP 410 again")], now=time.time())
            return real_purge(keys, *args, **kw)
        cli.kv.purge = purge
        self.assertEqual(cli.outbox_retry(["X"]), 1)
        self.assertEqual([i.id for i in daemon.outbox()], [])
        [letter] = daemon.outbox(dead=True)
        self.assertEqual(letter.id, "X")
        self.assertEqual(letter.last_error, "HTTP 410 again")

    def test_a_retried_letter_leaves_the_dead_letters(self):
        cli = self.store()
        self.dead_letter(self.store())
        self.assertEqual(cli.outbox_retry(["X"]), 1)
        self.assertEqual([i.id for i in cli.outbox()], ["X"])
        self.assertEqual(cli.outbox(dead=True), [])
        self.assertEqual(cli.kv.keys("dead."), [])

    def test_a_daemon_renews_its_lease_when_its_own_settle_changed_the_record(self):
        a = self.store()
        x = queued_item(a)
        real_get, armed = a.kv.get_many, [True]

        def get_many(keys):
            got = real_get(keys)
            if armed and keys == ["job.j"] and armed.pop():
                a.outbox_settle(delivered=[x], now=time.time())    # its publisher, meanwhile
            return got
        a.kv.get_many = get_many
        granted = a.claim({"j": time.time() + 60}, time.time())
        a.kv.get_many = real_get
        self.assertIn("j", granted)
        rec = a.load(["j"])["j"]
        self.assertEqual(rec.lease_owner, a.owner)
        self.assertEqual(rec.revision, granted["j"].revision)

    def test_a_claim_does_not_retry_a_lease_another_daemon_took(self):
        a, b = self.store(), self.store()
        now = time.time()
        a.claim({"j": now + 60}, now)
        real_get, armed = b.kv.get_many, [True]

        def get_many(keys):
            got = real_get(keys)
            if armed and keys == ["job.j"] and armed.pop():
                a.claim({"j": time.time() + 120}, time.time())     # a renews meanwhile
            return got
        self.assertEqual(a.release(), None)
        b.kv.get_many = get_many
        self.assertEqual(b.claim({"j": time.time() + 60}, time.time()), {})
        b.kv.get_many = real_get
        self.assertEqual(b.load(["j"])["j"].lease_owner, a.owner)

    def test_importing_a_job_the_bucket_has_leaves_no_items_behind(self):
        a = self.store()
        now = time.time()
        a.claim({"j": now + 60}, now)
        m = self.store()
        copied, skipped = m.import_states(
            [JobState("j"), JobState("k")],
            [OutboxItem("Y", "j", "delivery", "t", "{}", now),
             OutboxItem("Z", "k", "delivery", "t", "{}", now)])
        self.assertEqual((copied, skipped), (["k"], ["j"]))
        self.assertEqual([i.id for i in a.outbox()], ["Z"])
        self.assertEqual(len(a.kv.keys("out.")), 1)


class ForgottenListingTests(LiveCase):
    """A retry settled after the store forgot its listing (past 100,000
    remembered items) keeps its backoff (review finding 8)."""

    def test_a_retry_is_recorded_after_the_listing_was_forgotten(self):
        a = self.store()
        now = queued_item(a).created_at
        a.kv_outbox.forget_listed()     # what a listing past 100,000 remembered items does
        a.outbox_settle(retry=[("X", now + 300, "HTTP 503")], now=now)
        [again] = a.outbox()
        self.assertEqual((again.attempts, again.next_attempt_at, again.last_error),
                         (1, now + 300, "HTTP 503"))


if __name__ == "__main__":
    unittest.main()
