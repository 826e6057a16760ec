"""End-to-end tests of the daemon: ``nexo_poller.py run`` as a subprocess.

The daemon logs with ``--log-format json``; a reader thread parses its stderr
so the tests wait on conditions (a tick of a job, an operator line) with a
deadline instead of sleeping.  Plugins run ``tests/fixtures/e2e_counter_plugin.py``
with this interpreter; it appends "<pid> <ppid> <mode>" to a file when it
starts, so the tests can check that no plugin process outlives the daemon.
"""

import base64
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import (LAUNCHER, NEXO, PY, ROOT, TempDirCase, pid_gone,  # noqa: E402
                     write_config, write_counter_plugin)

CLI_TIMEOUT = 60
STOP_BOUND = 15.0       # a signalled daemon must have exited within this
WAIT = 20.0             # default deadline for "this should happen soon"
EVERY = 0.15            # every_secs of the test jobs (the waits count ticks)


def counter(cursor_b64):
    """A counter cursor (ASCII decimal on the wire as base64) as an int; None -> 0."""
    if cursor_b64 is None:
        return 0
    return int(base64.urlsafe_b64decode(cursor_b64 + "=" * (-len(cursor_b64) % 4)))


def wait_gone(pids, timeout: float) -> list[int]:
    """Poll until every pid is gone; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if not pid_gone(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


class Project:
    """A config folder with one ephemeral and one long-lived fixture plugin."""

    def __init__(self, root: str):
        self.root = root
        self.config = os.path.join(root, "pollers.json")
        self.state = os.path.join(root, "state", "poller.db")
        self.pid_file = os.path.join(root, "plugin-pids.txt")
        for name, kind, lifecycle in (("feed", "e2e_feed", "ephemeral"),
                                      ("clock", "e2e_clock", "long_lived")):
            write_counter_plugin(root, name, kind, lifecycle, self.pid_file, 4)

    def doc(self, jobs=None, **top) -> dict:
        doc = {"state_db": "state/poller.db", "default_jitter_ms": 0,
               "shutdown_grace_secs": 5, "plugins": ["plugins/feed", "plugins/clock"],
               "jobs": jobs if jobs is not None else [
                   {"id": "feed", "kind": "e2e_feed", "schedule": {"every_secs": EVERY}},
                   {"id": "clock", "kind": "e2e_clock", "schedule": {"every_secs": EVERY}}]}
        doc.update(top)
        return doc

    def write(self, doc) -> str:
        return write_config(self.config, doc)

    def plugin_procs(self) -> list[tuple[int, int, str]]:
        """(pid, ppid, mode) of every plugin process started so far."""
        try:
            with open(self.pid_file, encoding="ascii") as f:
                rows = [line.split() for line in f if line.strip()]
        except FileNotFoundError:
            return []
        return [(int(pid), int(ppid), mode) for pid, ppid, mode in rows]

    def cli(self, *args):
        return subprocess.run([PY, NEXO, "--config", self.config, *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=CLI_TIMEOUT)

    def db_cursors(self) -> dict[str, int]:
        """The cursors committed in the state file, read with sqlite3 directly."""
        db = sqlite3.connect(self.state, timeout=30)
        try:
            check = db.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise AssertionError(f"{self.state}: integrity_check says {check}")
            return {job: 0 if cur is None else int(bytes(cur))
                    for job, cur in db.execute("SELECT id, cursor FROM jobs")}
        finally:
            db.close()


class Daemon:
    """``nexo_poller.py --config FILE --log-format json run`` with its log parsed."""

    def __init__(self, config: str, *, script: str = NEXO, cwd: str | None = None,
                 env: dict | None = None, verb: tuple = ("run",)):
        self.proc = subprocess.Popen(
            [PY, script, "--config", config, "--log-format", "json", *verb],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=cwd, env=env, start_new_session=True)
        self.pid = self.proc.pid
        self.raw: list[str] = []
        self.records: list[dict] = []
        self.bad_lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            text = line.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.raw.append(text)
                try:
                    rec = json.loads(text)
                    if not isinstance(rec, dict):
                        raise ValueError("not an object")
                except ValueError:
                    self.bad_lines.append(text)
                else:
                    self.records.append(rec)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def log_tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.raw[-n:])

    def wait_for(self, predicate, timeout: float = WAIT, what: str = "condition"):
        """Wait until ``predicate(records)`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self.records)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    break
                self._cond.wait(min(left, 0.5))
        raise AssertionError(f"timed out waiting for {what} (daemon rc="
                             f"{self.proc.poll()}); log tail:\n{self.log_tail()}")

    def mark(self) -> int:
        with self._cond:
            return len(self.records)

    @staticmethod
    def ticks(records, job=None, since=0, outcome="ok"):
        return [r for r in records[since:] if "outcome" in r and "job" in r
                and (job is None or r["job"] == job)
                and (outcome is None or r["outcome"] == outcome)]

    def wait_ticks(self, job, n, since=0, timeout=WAIT):
        return self.wait_for(lambda recs: (lambda t: t if len(t) >= n else None)(
            self.ticks(recs, job, since)), timeout, f"{n} ok ticks of {job!r}")

    def wait_msg(self, text, since=0, timeout=WAIT, level=None):
        def find(recs):
            for i in range(since, len(recs)):
                msg = recs[i].get("msg", "")
                if text in msg and (level is None or recs[i].get("level") == level):
                    return i + 1
            return None
        return self.wait_for(find, timeout, f"a log line containing {text!r}")

    def signal_and_wait(self, sig, bound: float = STOP_BOUND) -> tuple[int, float]:
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon did not exit within {bound}s of signal {sig}; "
                                 f"log tail:\n{self.log_tail()}") from None
        self._reader.join(10)
        return rc, time.monotonic() - start

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        self._reader.join(10)
        self.proc.stderr.close()


class DaemonTestCase(TempDirCase):
    tmp_prefix, quiet = "nexo-daemon-", False

    def setUp(self):
        super().setUp()
        self.p = Project(self.dir)
        self.addCleanup(self._kill_plugins)

    def _kill_plugins(self):
        """Last resort, so a failing test leaves nothing behind (each plugin leads its group)."""
        for pid, _, _ in self.p.plugin_procs():
            if not pid_gone(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def start(self, config=None, **kw) -> Daemon:
        # A private broker socket goes under TMPDIR: keep it in the project.
        self.tmpdir = os.path.join(self.p.root, "tmp")
        os.makedirs(self.tmpdir, exist_ok=True)
        kw.setdefault("env", dict(os.environ, TMPDIR=self.tmpdir))
        d = Daemon(config or self.p.config, **kw)
        self.addCleanup(d.cleanup)
        # Signals are only safe once the handlers are in place (after "started").
        d.wait_msg("nexo-poller started")
        return d

    def long_lived_pid(self, daemon: Daemon) -> int:
        mine = [pid for pid, ppid, mode in self.p.plugin_procs()
                if ppid == daemon.pid and mode == "long_lived"]
        self.assertTrue(mine, "no long-lived plugin process of this daemon")
        return mine[-1]

    def assert_increasing(self, ticks, job, floor=0):
        values = [counter(t["next_cursor"]) for t in ticks if t["job"] == job]
        prev = floor
        for v in values:
            self.assertGreater(v, prev, f"cursor of {job} went backwards: {values} "
                                        f"(floor {floor})")
            prev = v
        return values

    def assert_stopped_cleanly(self, daemon: Daemon, sig):
        long_lived = self.long_lived_pid(daemon)
        rc, took = daemon.signal_and_wait(sig)
        self.assertEqual(rc, 0, f"exit status after signal {sig}; log:\n{daemon.log_tail()}")
        self.assertLess(took, STOP_BOUND)
        all_pids = [pid for pid, _, _ in self.p.plugin_procs()]
        # The daemon waits for its plugins, so they are gone when it has exited.
        self.assertEqual(wait_gone(all_pids, 2.0), [],
                         f"plugin processes left after the daemon exited (long-lived "
                         f"{long_lived})")
        self.assertEqual(daemon.bad_lines, [], "non-JSON lines on stderr with --log-format json")
        self.assertNotIn("Traceback", "\n".join(daemon.raw))
        daemon.wait_msg("nexo-poller stopped", timeout=1)
        self.assertEqual(os.listdir(self.tmpdir), [], "the broker folder was left behind")
        # A clean stop releases the leases and the daemon mark.
        db = sqlite3.connect(self.p.state, timeout=30)
        try:
            self.assertEqual(db.execute("SELECT COUNT(*) FROM jobs WHERE lease_owner IS NOT NULL"
                                        ).fetchone()[0], 0)
            self.assertIsNone(db.execute("SELECT value FROM meta WHERE key='daemon'").fetchone())
        finally:
            db.close()


class TestRunAndStop(DaemonTestCase):
    def _run_both_lifecycles(self, **kw) -> Daemon:
        self.p.write(self.p.doc())
        d = self.start(**kw)
        feed = d.wait_ticks("feed", 3)
        clock = d.wait_ticks("clock", 3)
        for ticks, job, kind in ((feed, "feed", "e2e_feed"), (clock, "clock", "e2e_clock")):
            self.assertEqual({t["kind"] for t in ticks}, {kind})
            self.assertEqual(self.assert_increasing(ticks, job)[:3], [1, 2, 3])
            self.assertTrue(all(t["items_seen"] == 1 for t in ticks))
        return d

    def test_ticks_both_lifecycles_then_sigterm_exits_0_and_leaves_no_plugin(self):
        d = self._run_both_lifecycles()
        # status --json while the daemon runs shows the committed cursors.
        r = self.p.cli("status", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        rows = {row["id"]: row for row in json.loads(r.stdout)}
        for job in ("feed", "clock"):
            self.assertGreaterEqual(counter(rows[job]["cursor"]), 3)
            self.assertEqual(rows[job]["last_status"], "ok")
            self.assertIsNotNone(rows[job]["next_run_at"])
            self.assertGreaterEqual(rows[job]["items_seen_total"], 3)
        # Exactly one long-lived plugin process served every tick.
        lived = [p for p in self.p.plugin_procs() if p[2] == "long_lived"]
        self.assertEqual(len(lived), 1, lived)
        self.assert_stopped_cleanly(d, signal.SIGTERM)

    def test_a_storm_of_signals_never_wedges_it(self):
        # Handlers that take locks can deadlock against the thread they
        # interrupt; hundreds of SIGHUPs then a SIGTERM and a second SIGINT
        # during shutdown must still end in a clean, prompt exit.
        d = self._run_both_lifecycles()
        for _ in range(300):
            d.proc.send_signal(signal.SIGHUP)
        d.wait_ticks("clock", 2, since=d.mark())
        start = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.send_signal(signal.SIGINT)
        self.assert_stopped_cleanly(d, signal.SIGTERM)
        self.assertLess(time.monotonic() - start, STOP_BOUND)

    def test_sigint_exits_0_and_leaves_no_plugin(self):
        d = self._run_both_lifecycles(verb=())        # `run` is the default verb
        self.assert_stopped_cleanly(d, signal.SIGINT)

    def test_through_the_launcher_signals_and_a_clean_stop_work(self):
        # ./nexo-poller imports the module and calls main() in the main thread:
        # the signal handlers, the subreaper (no "cannot become" warning) and the
        # clean stop are the script's.
        d = self._run_both_lifecycles(script=LAUNCHER)
        for _ in range(50):
            d.proc.send_signal(signal.SIGHUP)
        d.wait_ticks("clock", 2, since=d.mark())
        self.assertFalse([r for r in d.records if "subreaper" in r.get("msg", "")],
                         d.log_tail())
        self.assert_stopped_cleanly(d, signal.SIGTERM)


    def test_sigterm_cancels_ticks_in_flight_of_both_lifecycles(self):
        mark = os.path.join(self.p.root, "started.txt")
        slow = {"sleep": 60, "mark": mark}
        self.p.write(self.p.doc(jobs=[
            {"id": "slowfeed", "kind": "e2e_feed", "schedule": {"every_secs": 60},
             "config": slow},
            {"id": "slowclock", "kind": "e2e_clock", "schedule": {"every_secs": 60},
             "config": slow}]))
        d = self.start()
        deadline = time.monotonic() + WAIT
        started = set()
        while started != {"slowfeed", "slowclock"} and time.monotonic() < deadline:
            if os.path.exists(mark):
                with open(mark, encoding="ascii") as f:
                    started = {line.split()[0] for line in f if line.strip()}
            time.sleep(0.05)
        self.assertEqual(started, {"slowfeed", "slowclock"}, "the slow ticks did not start")
        self.assert_stopped_cleanly(d, signal.SIGTERM)
        cancelled = {t["job"] for t in d.ticks(d.records, outcome="cancelled")}
        self.assertEqual(cancelled, {"slowfeed", "slowclock"}, d.log_tail())
        r = self.p.cli("status", "--json")
        rows = {row["id"]: row for row in json.loads(r.stdout)}
        for job in ("slowfeed", "slowclock"):
            self.assertIsNone(rows[job]["cursor"], "a cancelled tick stored a cursor")
            self.assertEqual(rows[job]["items_seen_total"], 0)


class TestOperatorCommandsWhileRunning(DaemonTestCase):
    def test_pause_resume_reset_take_effect_in_the_daemon(self):
        self.p.write(self.p.doc())
        d = self.start()
        d.wait_ticks("feed", 2)
        d.wait_ticks("clock", 4)

        # pause: the job stops ticking while the other goes on.
        r = self.p.cli("pause", "feed")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("daemon", r.stdout, "the CLI should say it notified the running daemon")
        at = d.wait_msg("operator: pause feed")
        d.wait_ticks("clock", 5, since=at)
        late = d.ticks(d.records, "feed", since=at, outcome=None)
        self.assertLessEqual(len(late), 1, f"paused job kept ticking: {late}")
        r = self.p.cli("status", "--json")
        rows = {row["id"]: row for row in json.loads(r.stdout)}
        self.assertTrue(rows["feed"]["paused"])
        self.assertFalse(rows["clock"]["paused"])

        # `tick` while the daemon runs (and holds the lease): the daemon ticks
        # the job once, the CLI reports it, and the job stays paused.
        before = counter(rows["feed"]["cursor"])
        since = d.mark()
        r = self.p.cli("tick", "feed")
        self.assertEqual(r.returncode, 0, f"stdout={r.stdout!r} stderr={r.stderr!r}")
        out = json.loads(r.stdout)
        self.assertEqual((out["job"], out["outcome"]), ("feed", "ok"), out)
        self.assertEqual(counter(out["next_cursor"]), before + 1, out)
        # the same outcome fields as a tick without a daemon, plus where it ran
        self.assertLessEqual({"job", "kind", "outcome", "error", "duration_ms", "items_seen",
                              "items_dispatched", "next_cursor", "next_run_at", "via"}, set(out))
        self.assertGreater(out["duration_ms"], 0)
        at = d.wait_msg("operator: tick feed", since=since)
        d.wait_ticks("clock", 4, since=at)
        forced = d.ticks(d.records, "feed", since=since, outcome=None)
        self.assertEqual([counter(t["next_cursor"]) for t in forced], [before + 1],
                         "a paused job ticked more than the one forced tick")
        r = self.p.cli("status", "--json")
        rows = {row["id"]: row for row in json.loads(r.stdout)}
        self.assertTrue(rows["feed"]["paused"], "a forced tick resumed a paused job")
        self.assertEqual(counter(rows["feed"]["cursor"]), before + 1)

        # resume: it ticks again, carrying on from its cursor.
        before = counter(rows["feed"]["cursor"])
        r = self.p.cli("resume", "feed")
        self.assertEqual(r.returncode, 0, r.stderr)
        at = d.wait_msg("operator: resume feed")
        resumed = d.wait_ticks("feed", 2, since=at)
        self.assert_increasing(resumed, "feed", floor=before)

        # reset: the next cursor starts over at 1, then counts on from there.
        last = d.ticks(d.records, "clock")[-1]
        self.assertGreaterEqual(counter(last["next_cursor"]), 5)
        r = self.p.cli("reset", "clock")
        self.assertEqual(r.returncode, 0, r.stderr)
        at = d.wait_msg("operator: reset clock")

        def restarted(recs):
            ticks = d.ticks(recs, "clock", since=at)
            ones = [i for i, t in enumerate(ticks) if counter(t["next_cursor"]) == 1]
            return ticks[ones[0]:] if ones and len(ticks) - ones[0] >= 3 else None
        after = d.wait_for(restarted, what="clock to start over at cursor 1")
        self.assertEqual([counter(t["next_cursor"]) for t in after[:3]], [1, 2, 3])

        self.assert_stopped_cleanly(d, signal.SIGTERM)


def wake_ups(pid: int) -> int:
    """Context switches so far of every thread of ``pid``: a thread asleep
    on a wait without a timeout adds none."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
                total += sum(int(line.split()[1]) for line in f
                             if line.endswith("ctxt_switches\n") or "ctxt_switches:" in line)
        except FileNotFoundError:
            pass                         # a thread that just ended
    return total


@unittest.skipUnless(os.path.isdir("/proc/self/task"), "counts context switches in /proc")
class TestIdle(DaemonTestCase):
    def test_an_idle_daemon_does_not_wake_up_and_still_hears_commands(self):
        # Issue 17: with no job due and nothing happening, no thread of the
        # daemon wakes (it used to poll its commands, its plugin's output
        # and its HTTP listener twice a second each).
        self.p.write(self.p.doc(jobs=[
            {"id": "feed", "kind": "e2e_feed", "schedule": {"every_secs": 86400}},
            {"id": "clock", "kind": "e2e_clock", "schedule": {"every_secs": 86400}}],
            metrics_addr="127.0.0.1:0"))
        d = self.start()
        d.wait_ticks("feed", 1)
        d.wait_ticks("clock", 1)
        counts = []
        for _ in range(15):              # the running set settles within a second
            before = wake_ups(d.pid)
            time.sleep(1.0)              # a window in which nothing may happen
            counts.append(wake_ups(d.pid) - before)
            if counts[-1] == 0:
                break
        self.assertEqual(counts[-1], 0, f"context switches per 1 s window: {counts}")
        # Asleep, it still applies a command at once: the CLI's SIGUSR1 wakes it.
        r = self.p.cli("pause", "clock")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("applied by daemon", r.stdout)
        self.assert_stopped_cleanly(d, signal.SIGTERM)


class TestReload(DaemonTestCase):
    def test_sighup_with_a_new_job_starts_ticking_it(self):
        self.p.write(self.p.doc())
        d = self.start()
        d.wait_ticks("feed", 1)
        d.wait_ticks("clock", 1)
        doc = self.p.doc()
        doc["jobs"].append({"id": "extra", "kind": "e2e_clock",
                            "schedule": {"every_secs": EVERY}})
        doc["jobs"].append({"id": "extra2", "kind": "e2e_feed",
                            "schedule": {"every_secs": EVERY}})
        self.p.write(doc)
        since = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_msg("reloaded", since=since)
        extra = d.wait_ticks("extra", 2, since=since)
        self.assertEqual([counter(t["next_cursor"]) for t in extra[:2]], [1, 2])
        d.wait_ticks("extra2", 2, since=since)
        n = d.mark()
        d.wait_ticks("feed", 2, since=n)
        d.wait_ticks("clock", 2, since=n)
        self.assertIsNone(d.proc.poll())
        self.assert_stopped_cleanly(d, signal.SIGTERM)

    def test_sighup_with_an_invalid_config_keeps_the_old_jobs(self):
        self.p.write(self.p.doc())
        d = self.start()
        d.wait_ticks("feed", 1)
        d.wait_ticks("clock", 1)
        doc = self.p.doc()
        doc["jobs"][0]["schedule"] = {"every_secs": "often"}
        doc["jobs"].append({"id": "extra", "kind": "e2e_feed",
                            "schedule": {"every_secs": EVERY}})
        self.p.write(doc)
        since = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        at = d.wait_msg("jobs[0].schedule.every_secs", since=since, level="error")
        self.assertIsNone(d.proc.poll(), "an invalid reload must not stop the daemon")
        d.wait_ticks("feed", 3, since=at)
        d.wait_ticks("clock", 3, since=at)
        self.assertEqual(d.ticks(d.records, "extra", outcome=None), [],
                         "a job of the rejected config ran")
        # Garbage that is not even JSON is rejected the same way.
        self.p.write("{ this is not json")
        since = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        at = d.wait_msg("invalid JSON", since=since, level="error")
        d.wait_ticks("feed", 2, since=at)
        d.wait_ticks("clock", 2, since=at)
        self.assert_stopped_cleanly(d, signal.SIGTERM)


class TestCrashPersistence(DaemonTestCase):
    def test_cursors_survive_sigkill_and_never_go_backwards(self):
        # The broker socket lives in the project folder, so a killed daemon
        # leaves nothing in /tmp and the next one must replace the stale socket.
        self.p.write(self.p.doc(broker="unix://run/broker.sock"))
        floor = {"feed": 0, "clock": 0}
        for round_no in range(3):
            with self.subTest(round=round_no):
                d = self.start()
                feed = d.wait_ticks("feed", 3)
                clock = d.wait_ticks("clock", 3)
                plugin = self.long_lived_pid(d)
                os.killpg(d.pid, signal.SIGKILL)    # the daemon alone leads this group
                d.proc.wait(30)
                self.assertNotIn("Traceback", "\n".join(d.raw))
                logged = {"feed": self.assert_increasing(d.ticks(d.records, "feed"), "feed",
                                                         floor["feed"]),
                          "clock": self.assert_increasing(d.ticks(d.records, "clock"),
                                                          "clock", floor["clock"])}
                self.assertTrue(feed and clock)
                # The long-lived plugin notices its broker connection is gone.
                alive = wait_gone([plugin], 5.0)
                if alive:
                    os.killpg(plugin, signal.SIGKILL)
                self.assertEqual(alive, [], "the long-lived plugin outlived a SIGKILLed "
                                            "daemon by more than 5 s")
                children = [pid for pid, ppid, _ in self.p.plugin_procs() if ppid == d.pid]
                self.assertEqual(wait_gone(children, 5.0), [],
                                 "plugin processes outlived a SIGKILLed daemon")
                # Every acknowledged (logged) tick is on disk; the file opens.
                on_disk = self.p.db_cursors()
                r = self.p.cli("status", "--json")
                self.assertEqual(r.returncode, 0, r.stderr)
                shown = {row["id"]: counter(row["cursor"]) for row in json.loads(r.stdout)}
                self.assertEqual(shown, on_disk)
                for job in ("feed", "clock"):
                    self.assertGreaterEqual(on_disk[job], logged[job][-1],
                                            f"{job}: a logged tick is not on disk")
                    self.assertGreaterEqual(on_disk[job], floor[job])
                    floor[job] = on_disk[job]
        # One more start proves the file and the stale socket are usable, and
        # the first ticks carry on from the last committed cursors.
        d = self.start()
        first = {job: d.wait_ticks(job, 1)[0] for job in ("feed", "clock")}
        for job, tick in first.items():
            self.assertEqual(counter(tick["next_cursor"]), floor[job] + 1,
                             f"{job} did not resume from its committed cursor")
        self.assertGreaterEqual(floor["feed"], 9)
        self.assertGreaterEqual(floor["clock"], 9)
        self.assert_stopped_cleanly(d, signal.SIGTERM)


class TestExamples(unittest.TestCase):
    def test_examples_config_runs_from_a_fresh_copy(self):
        # README's first command: python nexo_poller.py --config examples/pollers.json
        with tempfile.TemporaryDirectory(prefix="nexo-examples-") as tmp:
            shutil.copy2(NEXO, os.path.join(tmp, "nexo_poller.py"))
            shutil.copytree(os.path.join(ROOT, "examples"), os.path.join(tmp, "examples"),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            env = dict(os.environ)
            # The manifests run "python3": make it this interpreter when it has one.
            here = os.path.dirname(PY)
            if os.access(os.path.join(here, "python3"), os.X_OK):
                env["PATH"] = here + os.pathsep + env.get("PATH", "")
            env.pop("PYTHONPATH", None)
            d = Daemon(os.path.join(tmp, "examples", "pollers.json"),
                       script=os.path.join(tmp, "nexo_poller.py"), cwd=tmp, env=env)
            self.addCleanup(d.cleanup)
            start = time.monotonic()

            def both(recs):
                kinds = {t["kind"] for t in Daemon.ticks(recs)}
                return {"demo_feed", "demo_clock"} <= kinds
            d.wait_for(both, timeout=10, what="ok ticks of demo_feed and demo_clock")
            self.assertLess(time.monotonic() - start, 10)
            self.assertTrue(os.path.exists(os.path.join(tmp, "data", "example-poller.db")))
            rc, took = d.signal_and_wait(signal.SIGINT)
            self.assertEqual(rc, 0, d.log_tail())
            self.assertEqual(d.bad_lines, [])
            self.assertNotIn("Traceback", "\n".join(d.raw))
            self.assertFalse(any(r.get("level") == "error" for r in d.records),
                             d.log_tail())


if __name__ == "__main__":
    unittest.main()
