"""Worst-day fault injection: crash safety of the daemon and misbehaving plugins.

* Crash safety: ``nexo_poller.py run`` is SIGKILLed at seeded random moments
  while jobs of both lifecycles tick; after each kill the state must open, be
  intact, keep every job, and hold only cursors a plugin really returned,
  never older than the last one the daemon reported committed.
* Plugin faults, both lifecycles: hangs, crashes mid-tick, floods, partial
  lines, 100 MB without a newline, grandchildren, SIGTERM ignored, exit at
  start in a loop.  Each ends in ``PollerError.Transient`` (or, where the
  plugin did answer properly, in a TickAck) on time, with bounded memory,
  and leaves no process, zombie or file descriptor behind.
* The runner: a long-lived plugin killed mid-tick fails that tick at once and
  is restarted with backoff; a crash-looping plugin does not starve others.

NEXO_TEST_FULL=1 runs more kill rounds and loops, and watches the healthy
plugin beside a crash-looping one for 10 s instead of 2 s.  Every failure message
carries the seed; NEXO_TEST_SEED=N replays one.
"""

import base64
import os
import random
import shutil
import signal
import sqlite3
import sys
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures"))

import worstday as wd  # noqa: E402
import nexo_poller as nx  # noqa: E402
from nexo_poller import Lifecycle, PollerError  # noqa: E402

NOW = datetime(2026, 5, 17, 10, 0, 0, tzinfo=timezone.utc)

KILL_ROUNDS = wd.scale(3, 20)
LEAVE_TIMEOUT = 10.0



def counter_of(cursor):
    """A stored counter cursor as an int, or raise ValueError when it is torn."""
    if cursor is None:
        return 0
    text = bytes(cursor).decode("ascii")
    if not text.isdigit() or not text.isascii():
        raise ValueError("not a counter: %r" % (cursor,))
    return int(text)


class WorstCase(unittest.TestCase):
    """Per test: a seed, a scratch dir, a token on every process started, and
    the checks that nothing outlives the test's plugins."""

    def setUp(self):
        self.seed = wd.seed_for(self.id())
        self.rng = random.Random(self.seed)
        self.token = "%s-%d-%d" % (self.id().rsplit(".", 1)[-1][:40], os.getpid(),
                                   time.monotonic_ns())
        self.tmp = wd.TempDir()
        self.addCleanup(self.tmp.cleanup)
        self.addCleanup(wd.kill_tagged, self.token)
        self.fds_before = wd.fd_count()
        self.tree_before = {p for p, _ in wd.descendants()}

    def m(self, text):
        return "%s [seed=%d; replay with NEXO_TEST_SEED=%d]" % (text, self.seed, self.seed)

    def env(self, **extra):
        env = {wd.TOKEN_VAR: self.token}
        env.update(extra)
        return env

    def assert_nothing_left(self, fds_before=None, what=""):
        """No live process of ours, no zombie child, no extra file descriptor."""
        fds_before = self.fds_before if fds_before is None else fds_before
        left = wd.wait_until(lambda: not wd.tagged(self.token), LEAVE_TIMEOUT)
        self.assertTrue(left, self.m("%s: processes left behind: %s" % (
            what, [(p, wd.proc_stat(p)) for p in wd.tagged(self.token)])))
        extra = lambda: {p for p, _ in wd.descendants()} - self.tree_before  # noqa: E731
        self.assertTrue(wd.wait_until(lambda: not extra(), 5), self.m(
            "%s: process tree grew: %s" % (what, [(p, wd.proc_stat(p)) for p in extra()])))
        no_zombie = wd.wait_until(lambda: not wd.my_zombies(), 5)
        self.assertTrue(no_zombie, self.m("%s: unreaped children: %s" % (what, wd.my_zombies())))
        back = wd.wait_until(lambda: wd.fd_count() <= fds_before, 5)
        self.assertTrue(back, self.m("%s: file descriptors leaked: %d before, %d after: %s" % (
            what, fds_before, wd.fd_count(), wd.fd_table())))


# ============================================================================
# Crash safety: SIGKILL the daemon at random moments
# ============================================================================

class TestCrashSafety(WorstCase):
    EPH_JOBS = ("e1", "e2", "e3")
    LIVED_JOBS = ("l1", "l2", "l3", "l4")

    def _project(self):
        root = self.tmp.path
        self.cursor_log = self.tmp.join("cursors.log")
        self.lived_pidlog = self.tmp.join("lived-pids.log")
        common = {wd.TOKEN_VAR: self.token, "WORST_CURSOR_LOG": self.cursor_log}
        wd.write_manifest(self.tmp.join("plugins", "eph"), "cs_eph", ["cs_eph"],
                          lifecycle="ephemeral", args=[wd.WORST], env=common,
                          max_concurrent=3, timeout_secs=10)
        wd.write_manifest(self.tmp.join("plugins", "lived"), "cs_lived", ["cs_lived"],
                          lifecycle="long_lived", args=[wd.WORST, "--sdk=cs_lived"],
                          env=dict(common, WORST_PIDLOG=self.lived_pidlog),
                          max_concurrent=4, timeout_secs=10)
        jobs = [wd.every_job(j, "cs_eph", 0.4) for j in self.EPH_JOBS]
        jobs += [wd.every_job(j, "cs_lived", 0.1, {"ok_sleep": 0.01}) for j in self.LIVED_JOBS]
        doc = {"state_db": "state/poller.db", "broker": "unix://run/broker.sock",
               "default_jitter_ms": 0, "backoff_initial_secs": 0.2, "backoff_max_secs": 1,
               "shutdown_grace_secs": 3, "plugins": ["plugins/eph", "plugins/lived"],
               "jobs": jobs}
        self.config = wd.write_config(os.path.join(root, "pollers.json"), doc)
        self.db_path = self.tmp.join("state", "poller.db")

    def _returned(self):
        """job -> set of counters any plugin process returned (or was about to)."""
        out = {}
        try:
            with open(self.cursor_log, encoding="utf-8") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 3 and line.endswith("\n"):
                        out.setdefault(parts[0], set()).add(int(parts[1]))
        except FileNotFoundError:
            pass
        return out

    def _lived_pids(self):
        try:
            with open(self.lived_pidlog) as f:
                return {int(line.split()[0]) for line in f if " start " in line}
        except FileNotFoundError:
            return set()

    def _read_state(self):
        """integrity_check and the jobs' cursors, read from a copy of the files so
        that the next daemon, not this check, recovers the crashed database."""
        copy = self.tmp.join("check")
        shutil.rmtree(copy, ignore_errors=True)
        os.mkdir(copy)
        for suffix in ("", "-wal"):
            if os.path.exists(self.db_path + suffix):
                shutil.copyfile(self.db_path + suffix, os.path.join(copy, "poller.db" + suffix))
        db = sqlite3.connect(os.path.join(copy, "poller.db"), timeout=30)
        try:
            check = db.execute("PRAGMA integrity_check").fetchall()
            rows = dict(db.execute("SELECT id, cursor FROM jobs").fetchall())
        finally:
            db.close()
        return check, rows

    def test_sigkill_at_random_moments_keeps_state_consistent(self):
        self._project()
        all_jobs = set(self.EPH_JOBS + self.LIVED_JOBS)
        floor = {}              # job -> counter the state must not go below
        known_jobs = set()
        stats = {"rounds": 0, "killed_before_start": 0, "commits_seen": 0}
        env = wd.daemon_env(self.token)
        for rnd in range(KILL_ROUNDS):
            lived_before = self._lived_pids()
            # Some kills land while the daemon is still starting (state creation,
            # broker bind, plugin spawn), most while ticks run and commit: those
            # wait for a commit to be reported (a logged ok tick), however long a
            # loaded machine takes, then kill at a random moment after it.
            # Round 0 is always of the second kind, so a commit is always seen.
            early = rnd > 0 and self.rng.random() < 0.2
            delay = self.rng.uniform(0.02, 0.5) if early else self.rng.uniform(0.0, 2.0)
            d = wd.Daemon(self.config, cwd=self.tmp.path, env=env)
            try:
                if early:
                    deadline = d.started_at + delay
                else:
                    committed_once = wd.wait_until(
                        lambda: d.proc.poll() is not None or d.ticks(outcome="ok"), 60)
                    self.assertTrue(committed_once and d.ticks(outcome="ok"), self.m(
                        "round %d: no tick committed within 60 s:\n%s" % (rnd, d.tail())))
                    deadline = time.monotonic() + delay
                while time.monotonic() < deadline and d.proc.poll() is None:
                    time.sleep(0.005)
                self.assertIsNone(d.proc.poll(), self.m(
                    "round %d: daemon exited by itself:\n%s" % (rnd, d.tail())))
                d.signal(signal.SIGKILL)
                self.assertEqual(d.wait(10), -signal.SIGKILL, self.m("round %d" % rnd))
                started = d.started()
                committed = {}
                for rec in d.ticks(outcome="ok"):
                    if rec.get("next_cursor") is not None:
                        n = counter_of(base64.urlsafe_b64decode(
                            rec["next_cursor"] + "=" * (-len(rec["next_cursor"]) % 4)))
                        committed[rec["job"]] = max(committed.get(rec["job"], 0), n)
                log_tail = d.tail()
            finally:
                d.cleanup()
            stats["rounds"] += 1
            stats["killed_before_start"] += not started
            stats["commits_seen"] += len(committed)

            # The long-lived plugins of the dead daemon leave by themselves.
            orphans = self._lived_pids() - lived_before
            gone = wd.wait_until(lambda: not [p for p in orphans if wd.alive(p)], 5.0)
            self.assertTrue(gone, self.m(
                "round %d: long-lived plugin %s still running 5 s after its daemon died"
                % (rnd, [p for p in orphans if wd.alive(p)])))

            if not os.path.exists(self.db_path):
                self.assertFalse(started, self.m("round %d: state file missing" % rnd))
                continue
            check, rows = self._read_state()
            self.assertEqual(check, [("ok",)], self.m("round %d: integrity_check" % rnd))
            self.assertLessEqual(known_jobs, set(rows), self.m(
                "round %d: jobs disappeared from state: %s" % (rnd, known_jobs - set(rows))))
            if started:
                self.assertLessEqual(all_jobs, set(rows), self.m("round %d: missing jobs" % rnd))
            known_jobs |= set(rows)
            returned = self._returned()
            for job, cursor in rows.items():
                try:
                    n = counter_of(cursor)
                except (ValueError, UnicodeDecodeError):
                    self.fail(self.m("round %d: job %s: torn cursor %r" % (rnd, job, cursor)))
                if cursor is not None:
                    self.assertIn(n, returned.get(job, set()), self.m(
                        "round %d: job %s: stored cursor %d was never returned by a plugin"
                        % (rnd, job, n)))
                low = max(floor.get(job, 0), committed.get(job, 0))
                self.assertGreaterEqual(n, low, self.m(
                    "round %d: job %s: stored cursor %d is older than committed %d\n%s"
                    % (rnd, job, n, low, log_tail)))
                floor[job] = n

        # Every process of every round is gone (ephemeral ticks included).
        self.assertTrue(wd.wait_until(lambda: not wd.tagged(self.token), LEAVE_TIMEOUT),
                        self.m("processes left: %s" % wd.tagged(self.token)))

        # A last, clean run resumes from the stored cursors and keeps going.
        with open(self.cursor_log, "ab"):
            pass
        mark = os.path.getsize(self.cursor_log)
        d = wd.Daemon(self.config, cwd=self.tmp.path, env=env)
        try:
            d.wait_started(30)
            progressed = wd.wait_until(
                lambda: all_jobs <= {r["job"] for r in d.ticks(outcome="ok")}, 30)
            self.assertTrue(progressed, self.m("no progress after the crashes:\n" + d.tail()))
            d.signal(signal.SIGTERM)
            self.assertEqual(d.wait(20), 0, self.m("clean stop:\n" + d.tail()))
        finally:
            d.cleanup()
        first = {}
        with open(self.cursor_log, encoding="utf-8") as f:
            f.seek(mark)
            for line in f:
                job, n, _ = line.split()
                first.setdefault(job, int(n))
        for job in all_jobs:
            self.assertEqual(first.get(job), floor.get(job, 0) + 1, self.m(
                "job %s: first tick after the crashes did not continue from the stored "
                "cursor %d" % (job, floor.get(job, 0))))
        _, rows = self._read_state()
        for job in all_jobs:
            self.assertGreater(counter_of(rows[job]), floor.get(job, 0), self.m(job))
        self.assertGreater(stats["commits_seen"] + sum(floor.values()), 0,
                           self.m("no tick was ever committed: the test proved nothing"))
        print("\n[crash-safety] seed=%d rounds survived=%d (killed before start: %d), "
              "final cursors=%s" % (self.seed, stats["rounds"], stats["killed_before_start"],
                                    dict(sorted(floor.items()))), file=sys.stderr)


# ============================================================================
# Ephemeral plugin faults
# ============================================================================

def eph_request(config=None, job="j1", cursor=None):
    return nx.build_tick_request("worst", job, "agent", cursor,
                                 {} if config is None else config, NOW, 60)


class TestEphemeralFaults(WorstCase):

    def run_tick(self, args, timeout, *, config=None, env=None, command=wd.PY):
        env = self.env(**(env or {}))
        started = time.monotonic()
        try:
            result = nx.spawn_ephemeral_tick(command, "worst_eph", eph_request(config),
                                             timeout, args=args, env=env, cwd=self.tmp.path)
        except PollerError as exc:
            result = exc
        except BaseException as exc:      # anything else is a bug: report it as such
            self.fail(self.m("spawn_ephemeral_tick raised %s: %s (not a PollerError)"
                             % (type(exc).__name__, exc)))
        return result, time.monotonic() - started

    def check(self, name, args, *, timeout, expect="transient", min_s=0.0, max_s=None,
              config=None, env=None, mem_mib=48, pidfile=None):
        with self.subTest(fault=name):
            fds = wd.fd_count()
            with wd.PeakRSS() as mem:
                result, took = self.run_tick(args, timeout, config=config, env=env)
            if expect == "transient":
                self.assertIsInstance(result, PollerError.Transient, self.m(
                    "%s: expected PollerError.Transient, got %r" % (name, result)))
            else:
                self.assertIsInstance(result, nx.TickAck, self.m(
                    "%s: expected a TickAck, got %r" % (name, result)))
            max_s = timeout + 3.0 if max_s is None else max_s
            self.assertGreaterEqual(took, min_s, self.m("%s: returned too early" % name))
            self.assertLessEqual(took, max_s, self.m("%s: took %.2fs (bound %.1fs)"
                                                     % (name, took, max_s)))
            self.assertLess(mem.growth, mem_mib, self.m(
                "%s: memory grew by %.1f MiB" % (name, mem.growth)))
            if pidfile:
                with open(pidfile) as f:
                    gpid = int(f.read())
                self.assertTrue(wd.wait_until(lambda: not wd.alive(gpid), 3), self.m(
                    "%s: grandchild %d survived the tick" % (name, gpid)))
            self.assert_nothing_left(fds, name)

    def test_hang_times_out(self):
        self.check("hang", [wd.MISBEHAVE, "sleep"], timeout=1.0, min_s=0.9,
                   env={"FIXTURE_SLEEP": "60"})

    def test_never_reads_a_request_bigger_than_the_pipe(self):
        self.check("noread", [wd.MISBEHAVE, "noread"], timeout=1.0, min_s=0.9,
                   config={"pad": "p" * (2 * wd.MIB)})

    def test_crash_mid_tick(self):
        self.check("crash", [wd.MISBEHAVE, "exit_early"], timeout=20, max_s=8)
        self.check("crash_worst", [wd.WORST], config={"fault": "crash"}, timeout=20, max_s=8)

    def test_partial_line_then_dies(self):
        self.check("partial", [wd.MISBEHAVE, "partial_line"], timeout=20, max_s=8)

    def test_100_mb_without_a_newline(self):
        self.check("100MB", [wd.MISBEHAVE, "flood_stdout"], timeout=30, max_s=15, mem_mib=40)
        self.check("3MB_then_hang", [wd.MISBEHAVE, "huge_reply"], timeout=30, max_s=15,
                   mem_mib=40)

    def test_stderr_flood(self):
        self.check("stderr_forever", [wd.WORST], config={"fault": "flood_stderr_forever"},
                   timeout=1.5, min_s=1.4, mem_mib=40)
        # A plugin that logs a lot and then answers properly is not a failure.
        self.check("stderr_then_reply", [wd.MISBEHAVE, "chatty_stderr"], timeout=20,
                   expect="ack", max_s=10)

    def test_grandchildren(self):
        pidfile = self.tmp.join("grandchild.pid")
        self.check("grandchild_holds_stdout", [wd.MISBEHAVE, "grandchild"], timeout=20,
                   expect="ack", max_s=10, env={"FIXTURE_PIDFILE": pidfile}, pidfile=pidfile)
        os.unlink(pidfile)
        self.check("grandchild_hang", [wd.MISBEHAVE, "grandchild_hang"], timeout=1.0,
                   min_s=0.9, env={"FIXTURE_PIDFILE": pidfile}, pidfile=pidfile)

    def test_ignores_sigterm(self):
        self.check("ignore_term", [wd.MISBEHAVE, "ignore_term"], timeout=1.0, min_s=0.9)

    def test_exits_right_after_start_in_a_loop(self):
        fds = wd.fd_count()
        n = wd.scale(20, 200)
        with wd.PeakRSS() as mem:
            for i in range(n):
                result, took = self.run_tick([wd.MISBEHAVE, "exit_early"], 20,
                                             env={"FIXTURE_SKIP_READ": "1"})
                self.assertIsInstance(result, PollerError.Transient, self.m("iteration %d" % i))
                self.assertLess(took, 10, self.m("iteration %d" % i))
        self.assertLess(mem.growth, 32, self.m("memory grew %.1f MiB over %d spawns"
                                               % (mem.growth, n)))
        self.assert_nothing_left(fds, "exit loop")

    def test_missing_program_and_shell_syntax_are_config(self):
        # issue 15: ENOENT cannot heal by retrying; the job pauses (Config).
        for command in (self.tmp.join("no-such-program"), "true; touch x"):
            fds = wd.fd_count()
            result, _ = self.run_tick([], 5, command=command)
            self.assertIsInstance(result, PollerError.Config, self.m(command))
            self.assert_nothing_left(fds, command)

    def test_entrypoint_with_a_nul_byte_is_a_poller_error(self):
        # A manifest can carry "\u0000" in entrypoint.command or args (TOML
        # allows it); the tick must still end in the documented PollerError.
        for command, args in ((wd.PY + "\x00x", [wd.WORST]), (wd.PY, [wd.WORST + "\x00x"])):
            with self.subTest(command=command, args=args):
                result, _ = self.run_tick(args, 5, command=command)
                self.assertIsInstance(result, PollerError, self.m(repr(result)))


# ============================================================================
# Long-lived plugin faults (supervisor + broker + proxy, in process)
# ============================================================================

class LivedRig:
    """A broker, a supervised worst_plugin and a proxy to tick it."""

    def __init__(self, case, *, startup="", timeout=20.0, backoff=0.3, stop_grace=2.0,
                 max_concurrent=2):
        self.case = case
        self.pidlog = case.tmp.join("pids-%d.log" % time.monotonic_ns())
        self.marks = case.tmp.join("marks-%d.log" % time.monotonic_ns())
        self.server = nx.BrokerServer().start()
        args = [wd.WORST] + (["--startup=" + startup] if startup else [])
        self.handle = nx.PluginPollerHandle(
            plugin_id="worst_lived", kinds=("worst_lived",),
            broker_topic_prefix="plugin.poller.worst_lived", lifecycle=Lifecycle.LONG_LIVED,
            max_concurrent_ticks=max_concurrent, tick_timeout=timedelta(seconds=timeout),
            entrypoint_command=wd.PY, entrypoint_args=tuple(args),
            entrypoint_env=case.env(WORST_PIDLOG=self.pidlog, WORST_MARKS=self.marks,
                                    WORST_CURSOR_LOG=case.tmp.join("cursors.log")),
            working_dir=case.tmp.path)
        self.sup = nx.PluginSupervisor(self.handle, self.server.url, backoff_initial=backoff,
                                       backoff_max=5.0, stable_after=30.0,
                                       stop_grace=stop_grace).start()
        self.client = self.server.client()
        self.proxy = nx.PluginPollerProxy("worst_lived", self.handle, self.client)
        self.closed = False

    def starts(self):
        """[(pid, unix time)] of every plugin process start so far."""
        try:
            with open(self.pidlog) as f:
                return [(int(p[0]), float(p[2])) for p in (line.split() for line in f)
                        if len(p) == 3 and p[1] == "start"]
        except FileNotFoundError:
            return []

    def grandchildren(self):
        try:
            with open(self.pidlog) as f:
                return [int(p[2]) for p in (line.split() for line in f)
                        if len(p) == 3 and p[1] == "grandchild"]
        except FileNotFoundError:
            return []

    def marked(self, job, event="start"):
        try:
            with open(self.marks) as f:
                return [line for line in f if line.split()[:2] == [job, event]]
        except FileNotFoundError:
            return []

    def subscribed(self, timeout=15):
        return wd.wait_until(lambda: self.server.has_subscriber(self.handle.tick_topic()),
                             timeout)

    def tick(self, config, job="j1", cursor=None):
        ctx = nx.PollContext(job, "agent", "worst_lived", cursor, config, NOW,
                             timedelta(seconds=60))
        started = time.monotonic()
        try:
            result = self.proxy.tick(ctx)
        except PollerError as exc:
            result = exc
        except BaseException as exc:
            self.case.fail(self.case.m("proxy.tick raised %s: %s (not a PollerError)"
                                       % (type(exc).__name__, exc)))
        return result, time.monotonic() - started

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.sup.stop()
        self.client.close()
        self.server.close()


class TestLongLivedFaults(WorstCase):

    def rig(self, **kw):
        fds = wd.fd_count()
        rig = LivedRig(self, **kw)
        self.addCleanup(rig.close)
        self.assertTrue(rig.subscribed(), self.m("plugin never subscribed"))
        return rig, fds

    def finish(self, rig, fds, what):
        if not rig.closed:
            self.assertTrue(rig.server._thread.is_alive(),
                            self.m("%s: broker thread died" % what))
        rig.close()
        self.assertEqual(rig.server.stats()["connections"], 0, self.m(what))
        self.assert_nothing_left(fds, what)

    def assert_transient(self, result, took, bound, what):
        self.assertIsInstance(result, PollerError.Transient, self.m(
            "%s: expected PollerError.Transient, got %r" % (what, result)))
        self.assertLess(took, bound, self.m("%s: took %.2fs (bound %.1fs)" % (what, took, bound)))

    def assert_ok(self, rig, counter=1, what="", cursor=None):
        result, took = rig.tick({"fault": "ok"}, cursor=cursor)
        self.assertIsInstance(result, nx.TickAck, self.m("%s: next tick: %r" % (what, result)))
        self.assertEqual(result.next_cursor, str(counter).encode(), self.m(what))

    def test_hang_times_out_on_time(self):
        rig, fds = self.rig(timeout=1.5)
        result, took = rig.tick({"fault": "hang"})
        self.assert_transient(result, took, 4.5, "hang")
        self.assertGreaterEqual(took, 1.4, self.m("hang: returned before the timeout"))
        self.assert_ok(rig, what="after a hung tick")
        self.finish(rig, fds, "hang")

    def test_crash_mid_tick_fails_at_once_then_restarts(self):
        rig, fds = self.rig(timeout=30)
        result, took = rig.tick({"fault": "crash"})
        self.assert_transient(result, took, 3.0, "crash")
        self.assertTrue(rig.subscribed(15), self.m("not restarted"))
        self.assert_ok(rig, what="after the crash")
        self.assertGreaterEqual(rig.sup.restarts, 1)
        self.finish(rig, fds, "crash")

    def test_killed_mid_tick_fails_at_once_restarts_with_backoff(self):
        backoff = 0.4
        rig, fds = self.rig(timeout=30, backoff=backoff)
        once = self.tmp.join("once")
        deaths = []
        for round_ in range(2):
            if os.path.exists(once):
                os.unlink(once)
            box = {}
            t = threading.Thread(target=lambda: box.update(
                r=rig.tick({"fault": "sleep", "sleep": 60, "once_file": once}, job="k")))
            t.start()
            self.assertTrue(wd.wait_until(lambda: len(rig.marked("k")) > round_, 15),
                            self.m("tick never reached the plugin"))
            pid = rig.starts()[-1][0]
            os.kill(pid, signal.SIGKILL)
            killed = time.time()
            deaths.append(killed)
            t.join(10)
            self.assertFalse(t.is_alive(), self.m("tick still waiting 10 s after the kill"))
            result, took = box["r"]
            self.assertIsInstance(result, PollerError.Transient, self.m(repr(result)))
            self.assertLess(time.time() - killed, 3.0, self.m(
                "round %d: the tick failed %.1fs after the kill, not at once"
                % (round_, time.time() - killed)))
            self.assertTrue(wd.wait_until(lambda: len(rig.starts()) > round_ + 1, 15),
                            self.m("round %d: plugin not restarted" % round_))
            self.assert_ok(rig, what="round %d after the kill" % round_)
        starts = rig.starts()
        self.assertEqual(len(starts), 3, self.m("starts: %s" % starts))
        delays = [starts[i + 1][1] - deaths[i] for i in range(2)]
        # Restarted after the backoff, and the backoff grew (the plugin never ran stably).
        self.assertGreaterEqual(delays[0], backoff * 0.9, self.m("restart delays %s" % delays))
        self.assertGreaterEqual(delays[1], 2 * backoff * 0.9, self.m("restart delays %s" % delays))
        self.finish(rig, fds, "killed mid-tick")

    def test_partial_line_then_dies(self):
        rig, fds = self.rig(timeout=30)
        result, took = rig.tick({"fault": "partial"})
        self.assert_transient(result, took, 3.0, "partial")
        self.assertTrue(rig.subscribed(15))
        self.assert_ok(rig, what="after a partial line")
        self.finish(rig, fds, "partial")

    def test_100_mb_without_a_newline_on_the_socket(self):
        rig, fds = self.rig(timeout=60)
        with wd.PeakRSS() as mem:
            result, took = rig.tick({"fault": "huge", "mb": 100})
        self.assert_transient(result, took, 15.0, "huge")
        self.assertLess(mem.growth, 48, self.m("memory grew %.1f MiB" % mem.growth))
        self.assertTrue(rig.subscribed(15))
        self.assert_ok(rig, what="after 100 MB")
        self.finish(rig, fds, "huge")

    def test_floods_stdout_and_stderr(self):
        rig, fds = self.rig(timeout=30, startup="flood_stdout:%d" % wd.scale(30, 100))
        with wd.PeakRSS() as mem:
            for i, fault in enumerate(("flood_stderr", "flood_stdout")):
                result, took = rig.tick({"fault": fault, "mb": 20}, job="f%d" % i)
                self.assertIsInstance(result, nx.TickAck, self.m("%s: %r" % (fault, result)))
                self.assertLess(took, 20, self.m(fault))
        self.assertLess(mem.growth, 48, self.m("memory grew %.1f MiB" % mem.growth))
        self.finish(rig, fds, "floods")

    def test_grandchild_then_exit_mid_tick(self):
        rig, fds = self.rig(timeout=30)
        result, took = rig.tick({"fault": "grandchild_exit"})
        self.assert_transient(result, took, 3.0, "grandchild_exit")
        grand = rig.grandchildren()
        self.assertEqual(len(grand), 1)
        self.assertTrue(wd.wait_until(lambda: not wd.alive(grand[0]), 5), self.m(
            "grandchild %d survived its plugin" % grand[0]))
        self.assertTrue(rig.subscribed(15))
        self.assert_ok(rig, what="after the grandchild")
        self.finish(rig, fds, "grandchild")

    def test_grandchild_at_start_and_ignored_sigterm_die_on_stop(self):
        for startup in ("grandchild", "ignore_term"):
            with self.subTest(startup=startup):
                rig, fds = self.rig(startup=startup, stop_grace=1.0)
                self.assert_ok(rig, what=startup)
                started = time.monotonic()
                rig.close()
                self.assertLess(time.monotonic() - started, 1.0 + 5.0, self.m(
                    "%s: stop took %.1fs" % (startup, time.monotonic() - started)))
                self.finish(rig, fds, startup)

    def test_exit_right_after_start_backs_off(self):
        fds = wd.fd_count()
        backoff = 0.1
        rig = LivedRig(self, startup="exit", timeout=1.0, backoff=backoff)
        self.addCleanup(rig.close)
        result, took = rig.tick({"fault": "ok"})
        self.assert_transient(result, took, 4.0, "tick during a crash loop")
        time.sleep(max(0.0, 3.0 - took))
        rig.close()
        starts = [t for _, t in rig.starts()]
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 > 3 s: about 5 starts, never a tight loop.
        self.assertGreaterEqual(len(starts), 3, self.m("starts %s" % starts))
        self.assertLessEqual(len(starts), 8, self.m("restarted %d times in ~3 s: %s"
                                                    % (len(starts), gaps)))
        for i, gap in enumerate(gaps):
            self.assertGreaterEqual(gap, backoff * 2 ** i * 0.9, self.m(
                "restart %d came %.2fs after the previous start (gaps %s)" % (i, gap, gaps)))
        self.assert_nothing_left(fds, "crash loop")


# ============================================================================
# The runner around faulty plugins
# ============================================================================

def lived_handle(case, plugin_id, args, *, timeout=30, max_concurrent=1, env=None,
                 command=wd.PY, lifecycle=Lifecycle.LONG_LIVED):
    return nx.PluginPollerHandle(
        plugin_id=plugin_id, kinds=(plugin_id,), broker_topic_prefix="plugin.poller." + plugin_id,
        lifecycle=lifecycle, max_concurrent_ticks=max_concurrent,
        tick_timeout=timedelta(seconds=timeout), entrypoint_command=command,
        entrypoint_args=tuple(args), entrypoint_env=case.env(**(env or {})),
        working_dir=case.tmp.path)


def job_cfg(job_id, kind, every, config=None):
    return nx.JobConfig.every(job_id, kind, every, config or {})


class TestRunnerFaults(WorstCase):

    def runner(self, plugins, jobs, **top):
        cfg = nx.DaemonConfig(state_db=self.tmp.join("state", "poller.db"), default_jitter_ms=0,
                              plugins=plugins, jobs=jobs, **top)
        runner = nx.Runner(cfg, rng=random.Random(self.seed))
        self.addCleanup(runner.stop)
        return runner

    def status(self, runner, job):
        return {s["id"]: s for s in runner.status()}[job]

    def test_long_lived_killed_mid_tick_in_the_runner(self):
        fds = wd.fd_count()
        pidlog, marks = self.tmp.join("pids.log"), self.tmp.join("marks.log")
        once = self.tmp.join("once")
        handle = lived_handle(self, "rk", [wd.WORST], timeout=30,
                              env={"WORST_PIDLOG": pidlog, "WORST_MARKS": marks})
        runner = self.runner([handle], [job_cfg("slow", "rk", 0.2, {
            "fault": "sleep", "sleep": 60, "once_file": once})], backoff_initial_secs=0.2,
            backoff_max_secs=1.0)
        runner.start()
        # The plugin marks the tick's start, then creates ``once`` and sleeps:
        # killed between the two, its next tick would sleep 60 s again.
        self.assertTrue(wd.wait_until(lambda: os.path.exists(once), 20),
                        self.m("the tick never reached the plugin"))
        with open(pidlog) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        failed = wd.wait_until(lambda: self.status(runner, "slow")["last_status"], 10)
        took = time.monotonic() - killed
        self.assertEqual(failed, "transient", self.m(str(self.status(runner, "slow"))))
        self.assertLess(took, 3.0, self.m("the killed tick failed after %.1fs, not at once"
                                          % took))
        ok = wd.wait_until(lambda: self.status(runner, "slow")["last_status"] == "ok", 20)
        self.assertTrue(ok, self.m("no successful tick after the restart: %s"
                                   % self.status(runner, "slow")))
        cursor = self.status(runner, "slow")["cursor"]
        self.assertGreaterEqual(counter_of(base64.urlsafe_b64decode(cursor + "==")), 1)
        self.assertGreaterEqual(runner.supervisors()["rk"].restarts, 1)
        runner.stop()
        self.assert_nothing_left(fds, "runner kill")

    def test_crash_looping_plugin_does_not_starve_others(self):
        for lifecycle in (Lifecycle.LONG_LIVED, Lifecycle.EPHEMERAL):
            with self.subTest(crash_looper=lifecycle.value):
                self._starvation(lifecycle)

    def _starvation(self, lifecycle):
        fds = wd.fd_count()
        marks = self.tmp.join("marks-%s.log" % lifecycle.value)
        if lifecycle is Lifecycle.LONG_LIVED:
            bad = lived_handle(self, "looper", [wd.WORST, "--startup=exit"], timeout=1,
                               max_concurrent=4)
        else:
            bad = lived_handle(self, "looper", [], command="/bin/false", timeout=1,
                               max_concurrent=4, lifecycle=Lifecycle.EPHEMERAL)
        good = lived_handle(self, "healthy", [wd.WORST], timeout=10, max_concurrent=2,
                            env={"WORST_MARKS": marks})
        every, window = 0.2, wd.scale(2.0, 10.0)
        jobs = [job_cfg("bad%d" % i, "looper", 0.05) for i in range(8)]
        jobs += [job_cfg("good%d" % i, "healthy", every) for i in range(2)]
        runner = self.runner([bad, good], jobs, backoff_initial_secs=0.05,
                             backoff_max_secs=0.2, max_workers=6)
        runner.start()
        self.assertTrue(wd.wait_until(lambda: os.path.exists(marks), 20),
                        self.m("healthy plugin never ticked"))
        first = time.time()
        time.sleep(window)
        end = time.time()
        bad_status = [self.status(runner, "bad%d" % i) for i in range(8)]
        runner.stop()
        times = {}
        with open(marks) as f:
            for line in f:
                job, event, _, at = line.split()
                if event == "start" and first <= float(at) <= end:
                    times.setdefault(job, []).append(float(at))
        for i in range(2):
            job = "good%d" % i
            seen = sorted(times.get(job, []))
            expected = window / every
            self.assertGreaterEqual(len(seen), expected * 0.5, self.m(
                "%s ticked %d times in %.0fs (every %.1fs) beside a crash-looping %s plugin"
                % (job, len(seen), window, every, lifecycle.value)))
            gaps = [b - a for a, b in zip(seen, seen[1:])]
            self.assertLess(max(gaps, default=0), 1.5, self.m("%s: longest gap %.2fs"
                                                              % (job, max(gaps, default=0))))
        self.assertTrue(any(s["consecutive_errors"] > 0 for s in bad_status),
                        self.m("the crash-looping plugin's jobs never failed: %s" % bad_status))
        self.assert_nothing_left(fds, "starvation %s" % lifecycle.value)


if __name__ == "__main__":
    unittest.main()
