"""Issue 9: job state with one owner.  One test per failure 1-12 of the issue.

Every test drives the real program: ``nexo_poller.py --config FILE
--log-format json run`` as a subprocess, the CLI verbs (``status --json``,
``pause``, ``resume``, ``tick``), signals, and a sqlite lock or an
unwritable state held by the test itself.  The plugin is a tiny ephemeral
script written into the test's folder (raw wire protocol, no SDK): its
cursor is a decimal counter, and every request it receives is appended as a
JSON line to ``records.jsonl`` with the job id, the cursor it was sent, and
the tag of the process that ran it (``NEXO_TEST_TAG``: the daemon's name,
or ``cli`` for a tick the CLI ran itself).

All the glue a rewrite may have to adapt sits at the top of this file:
``Daemon`` (how a daemon is started and its JSON log read), ``cli()``,
``wait_applied()`` (how the test knows a daemon applied an operator
command: a log line naming the verb and the job), ``state_cursors()``
(reads the sqlite file directly), and the two ways of making the state
unusable (``SqliteWriteLock``, ``ShmReadLocks``, ``state_unwritable``).

Bounds are generous (15-30 s); the slower variants run with NEXO_TEST_FULL=1.
"""

import base64
import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from nats_support import NatsServer, require_nats  # noqa: E402
from support import NEXO, PY, TempDirCase, pid_gone, wait_until, write_manifest  # noqa: E402

FULL = os.environ.get("NEXO_TEST_FULL") == "1"
WAIT = 20.0          # "this should happen soon"
CLI_TIMEOUT = 90     # a CLI verb may wait out a locked state
GRACE = 5            # shutdown_grace_secs of the test configs

# ---------------------------------------------------------------------------
# The test plugin: ephemeral, raw wire protocol, records every request.
# Knobs in the job's config:
#   "sleep": seconds before answering
#   "hold_file": while this file exists, the tick waits (at most 120 s)
#   "fail_code": answer this JSON-RPC error code instead of a result
#   "fail_message": its message; "lone_surrogate": true appends the JSON
#                   escape \udc80 (valid JSON, not encodable as UTF-8)
# ---------------------------------------------------------------------------

PLUGIN_SRC = r'''
import base64, json, os, sys, time
try:                                    # undo a file-size limit the test put on the daemon
    import resource
    _soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (_hard, _hard))
except (ImportError, ValueError, OSError):
    pass
req = json.loads(sys.stdin.readline())
p = req["params"]
cfg = p.get("config") or {}
cur = p.get("cursor")
n = 0 if cur is None else int(base64.urlsafe_b64decode(cur + "=" * (-len(cur) % 4)))
rec = {"job": p["job_id"], "cursor": n, "tag": os.environ.get("NEXO_TEST_TAG", "?"),
       "pid": os.getpid(), "t": time.time()}
fd = os.open(os.environ["NEXO_TEST_RECORDS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, (json.dumps(rec) + "\n").encode())
os.close(fd)
if cfg.get("sleep"):
    time.sleep(float(cfg["sleep"]))
if cfg.get("hold_file"):
    t0 = time.time()
    while os.path.exists(cfg["hold_file"]) and time.time() - t0 < 120:
        time.sleep(0.05)
rid = json.dumps(req.get("id"))
if "fail_code" in cfg:
    text = json.dumps(cfg.get("fail_message", "test failure"))
    if cfg.get("lone_surrogate"):
        text = text[:-1] + "\\udc80\""
    out = '{"jsonrpc":"2.0","id":%s,"error":{"code":%d,"message":%s}}' % (
        rid, int(cfg["fail_code"]), text)
else:
    nxt = base64.urlsafe_b64encode(str(n + 1).encode()).rstrip(b"=").decode()
    out = '{"jsonrpc":"2.0","id":%s,"result":{"next_cursor":"%s","metrics":{"items_seen":1,"items_dispatched":1}}}' % (rid, nxt)
sys.stdout.write(out + "\n")
sys.stdout.flush()
'''


class Project:
    """A config folder: plugins written on demand, pollers.json, records, state."""

    def __init__(self, root: str):
        self.root = root
        self.config = os.path.join(root, "pollers.json")
        self.records_path = os.path.join(root, "records.jsonl")
        self.plugin_script = os.path.join(root, "rec_plugin.py")
        with open(self.plugin_script, "w", encoding="utf-8") as f:
            f.write(PLUGIN_SRC)
        self.tmpdir = os.path.join(root, "tmp")
        os.makedirs(self.tmpdir)

    def state(self, rel="state/poller.db") -> str:
        return os.path.join(self.root, rel)

    def plugin(self, name: str, kind: str | None = None, *, max_concurrent: int = 4,
               timeout_secs: int = 30) -> str:
        """plugins/<name>/nexo-plugin.toml serving ``kind`` (default: name)."""
        return write_manifest(self.root, name, kind or name, command=PY,
                              args=("-S", self.plugin_script),
                              env={"NEXO_TEST_RECORDS": self.records_path},
                              max_concurrent_ticks=max_concurrent, tick_timeout_secs=timeout_secs)

    def write(self, jobs, plugins=("plugins/rec",), **top) -> str:
        doc = {"state_db": "state/poller.db", "default_jitter_ms": 0,
               "shutdown_grace_secs": GRACE, "plugins": list(plugins), "jobs": jobs}
        doc.update(top)
        tmp = self.config + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, self.config)
        return self.config

    def records(self, job=None, tag=None, since_t=0.0) -> list[dict]:
        """The requests plugins received, in order (optionally filtered)."""
        try:
            with open(self.records_path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return []
        return [r for r in rows if (job is None or r["job"] == job)
                and (tag is None or r["tag"] == tag) and r["t"] >= since_t]

    def cli(self, *args, tag="cli"):
        return subprocess.run([PY, NEXO, "--config", self.config, *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=CLI_TIMEOUT,
                              env=dict(os.environ, TMPDIR=self.tmpdir, NEXO_TEST_TAG=tag))

    def status(self) -> dict[str, dict]:
        r = self.cli("status", "--json")
        if r.returncode != 0:
            raise AssertionError(f"status --json failed ({r.returncode}): {r.stderr}")
        return {row["id"]: row for row in json.loads(r.stdout)}


def every_job(job_id, kind="rec", every=0.3, **config) -> dict:
    return {"id": job_id, "kind": kind, "schedule": {"every_secs": every}, "config": config}


def state_cursors(path: str) -> dict[str, int]:
    """The committed cursors (counter ints, None -> 0), read with sqlite3 directly."""
    db = sqlite3.connect(path, timeout=30)
    try:
        return {job: 0 if cur is None else int(bytes(cur))
                for job, cur in db.execute("SELECT id, cursor FROM jobs")}
    finally:
        db.close()


class Daemon:
    """``nexo_poller.py --config FILE --log-format json run``; stderr (a pipe, so
    a file-size limit on the daemon cannot cut it) parsed by a reader thread."""

    def __init__(self, project: Project, tag: str, extra_env: dict | None = None):
        env = dict(os.environ, TMPDIR=project.tmpdir, NEXO_TEST_TAG=tag, **(extra_env or {}))
        self.tag = tag
        self.proc = subprocess.Popen(
            [PY, NEXO, "--config", project.config, "--log-format", "json", "run"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, start_new_session=True)
        self.pid = self.proc.pid
        self.raw: list[str] = []
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            text = line.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.raw.append(text)
                try:
                    rec = json.loads(text)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    rec["_t"] = time.time()
                    self.records.append(rec)

    def recs(self, since: int = 0) -> list[dict]:
        with self._lock:
            return list(self.records[since:])

    def mark(self) -> int:
        with self._lock:
            return len(self.records)

    def raw_text(self) -> str:
        with self._lock:
            return "\n".join(self.raw)

    def tail(self, n: int = 30) -> str:
        with self._lock:
            return "\n".join(self.raw[-n:])

    def find(self, pred, since: int = 0):
        for r in self.recs(since):
            if pred(r):
                return r
        return None

    def wait_log(self, pred, timeout=WAIT, since=0, what="a log line"):
        wait_until(lambda: self.find(pred, since) or self.proc.poll() is not None,
                   timeout, 0.02)
        rec = self.find(pred, since)
        if rec is None:
            raise AssertionError(f"[{self.tag}] timed out waiting for {what} (rc="
                                 f"{self.proc.poll()}); log tail:\n{self.tail()}")
        return rec

    def wait_started(self):
        return self.wait_log(lambda r: "nexo-poller started" in r.get("msg", ""),
                             what="'nexo-poller started'")

    def ticks(self, job=None, since=0, outcomes=None) -> list[dict]:
        return [r for r in self.recs(since) if "outcome" in r and "job" in r
                and (job is None or r["job"] == job)
                and (outcomes is None or r["outcome"] in outcomes)]

    def errors(self, since=0) -> list[dict]:
        return [r for r in self.recs(since) if r.get("level") in ("warning", "error", "critical")
                and "outcome" not in r]

    def stop(self, sig=signal.SIGTERM, bound=GRACE + 15.0) -> tuple[int | None, float]:
        """Signal, wait at most ``bound``; (exit status or None, seconds)."""
        start = time.monotonic()
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            rc = self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - start

    def drain(self) -> None:
        """After the process exited: wait until its whole log has been read."""
        self._reader.join(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)

    def cleanup(self) -> None:
        self.kill()
        self._reader.join(10)
        self.proc.stderr.close()


def wait_applied(d: Daemon, verb: str, job: str, since: int = 0, timeout: float = 5.0) -> bool:
    """Synchronisation only: True once the daemon logged that it applied
    ``verb`` to ``job`` (today: "operator: pause JOB").  Tests go on either way."""
    return bool(wait_until(lambda: d.find(
        lambda r: verb in r.get("msg", "") and job in r.get("msg", "")
        and "outcome" not in r, since), timeout, 0.02))


def is_reload_report(r: dict) -> bool:
    """A log record saying a reload (SIGHUP) was not applied, and why."""
    msg = r.get("msg", "").lower()
    return r.get("level") in ("warning", "error", "critical") and "outcome" not in r and any(
        word in msg for word in ("reload", "sighup", "config", "pollers.json"))


class SqliteWriteLock:
    """Another process's write transaction: BEGIN IMMEDIATE (or EXCLUSIVE) held
    on the state file until ``release()``."""

    def __init__(self, path: str, mode: str = "IMMEDIATE"):
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute(f"BEGIN {mode}")

    def release(self) -> None:
        if self.db is not None:
            try:
                self.db.execute("ROLLBACK")
            finally:
                self.db.close()
                self.db = None


class ShmReadLocks:
    """Hold every WAL read-mark lock of the state (bytes 123..127 of the -shm
    file, as sqlite's unix VFS lays them out) in write mode: a reader of
    another process retries for ~10 s, then gets SQLITE_PROTOCOL
    ("locking protocol").  No sqlite3 connection of this process may touch
    the file meanwhile (closing one would drop these POSIX locks)."""

    def __init__(self, db_path: str):
        self.fd = os.open(db_path + "-shm", os.O_RDWR)
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 5, 123, 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def state_unwritable(pid: int, on: bool) -> None:
    """Make every regular-file write of process ``pid`` fail at once with EFBIG
    (a full disk, as far as sqlite is concerned), or lift that.  Python
    ignores SIGXFSZ, so the daemon is not killed by it."""
    import resource
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0 if on else hard, hard))


class StateOwnerCase(TempDirCase):
    # A SIGKILLed daemon cannot kill its ephemeral children; one may still be
    # finishing its reply while the folder goes (they are killed just below).
    tmp_prefix, quiet, tmp_cleanup_errors_ok = "nexo-state9-", False, True

    def setUp(self):
        super().setUp()
        self.p = Project(self.dir)
        self.addCleanup(self._kill_plugins, self.p)

    @staticmethod
    def _kill_plugins(project):
        """Ephemeral plugins lead their own process group; a SIGKILLed daemon
        may leave one mid-tick.  They are not our children: nothing to reap."""
        for rec in project.records():
            if not pid_gone(rec["pid"]):
                try:
                    os.killpg(rec["pid"], signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def start(self, tag="A", wait=True, **kw) -> Daemon:
        d = Daemon(self.p, tag, **kw)
        self.addCleanup(d.cleanup)
        if wait:
            d.wait_started()
        return d

    def wait_records(self, n, job=None, tag=None, since_t=0.0, timeout=WAIT, what=None):
        got = wait_until(lambda: (lambda rs: rs if len(rs) >= n else None)(
            self.p.records(job, tag, since_t)), timeout, 0.02)
        if not got:
            self.fail(f"timed out waiting for {what or f'{n} requests of {job} by {tag}'}: "
                      f"have {self.p.records(job, tag, since_t)}")
        return got

    def check_all(self, problems: list[str]):
        if problems:
            self.fail(f"{len(problems)} problem(s):\n- " + "\n- ".join(problems))


# ===========================================================================
# 1. A take-over resumes from the last committed cursor
# ===========================================================================

class CursorSampler:
    """Reads a job's stored cursor every 50 ms in a thread: the sequence it saw."""

    def __init__(self, path: str, job: str):
        self.path, self.job, self.seen = path, job, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            try:
                value = state_cursors(self.path).get(self.job)
            except sqlite3.Error:
                continue
            if not self.seen or self.seen[-1] != value:
                self.seen.append(value)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(10)
        return self.seen


def committed_cursor(d: Daemon, job: str) -> int:
    """The last cursor ``d`` reported committed (a logged ok tick is on disk)."""
    values = [int(base64.urlsafe_b64decode(r["next_cursor"] + "=" * (-len(r["next_cursor"]) % 4)))
              for r in d.ticks(job, outcomes=("ok",)) if r.get("next_cursor")]
    return max(values, default=0)


class Test01TakeOverCursor(StateOwnerCase):
    def _take_over(self, how):
        self.p.plugin("rec")
        self.p.write([every_job("j", every=0.25)])
        a = self.start("A")
        self.wait_records(4, "j", "A")
        self.start("B")                           # waits on A's lease
        b_started = time.time()
        self.wait_records(3, "j", "A", since_t=b_started,
                          what="A ticking on after B started")
        sampler = CursorSampler(self.p.state(), "j")
        self.addCleanup(sampler.stop)
        if how == "sigkill":
            a.kill()
        else:
            rc, _ = a.stop(signal.SIGTERM)
            self.assertEqual(rc, 0, f"A did not stop cleanly; log:\n{a.tail()}")
        a.drain()
        # A's last commit: at least what A logged as committed, at most what
        # A's plugin returned (after SIGKILL, a commit may not have been logged).
        low = committed_cursor(a, "j")
        high = max(r["cursor"] for r in self.p.records("j", "A")) + 1
        if how != "sigkill":
            high = low                            # a clean stop logs every commit
        b_ticks = self.wait_records(3, "j", "B", timeout=30,
                                    what="B taking the job over")
        seen = sampler.stop()
        sent = [r["cursor"] for r in b_ticks]
        self.assertTrue(low <= sent[0] <= high,
                        f"B's first tick after A ({how}) must carry the last cursor A "
                        f"committed ({low}" + (f"..{high}" if high != low else "")
                        + f"); B sent {sent}")
        self.assertTrue(all(c >= low for c in sent),
                        f"B sent cursors lower than A's last commit {low}: {sent}")
        self.assertEqual(seen, sorted(seen), f"the stored cursor went backwards: {seen}")

    def test_after_sigkill_b_ticks_from_a_last_commit(self):
        self._take_over("sigkill")

    def test_after_clean_stop_b_ticks_from_a_last_commit(self):
        self._take_over("sigterm")


# ===========================================================================
# 2. A raw sqlite3 error in the scheduler's state read
# ===========================================================================

class Test02SchedulerSurvivesStateReadError(StateOwnerCase):
    """Both cases hold the state's WAL read locks, which a reader of another
    process waits out for ~10 s (sqlite's own retries; no setting shortens
    them).  So whichever test comes first runs both side by side, each with
    its own folder and daemon, and each test checks its own case."""
    _cases = None       # end_tick_under_lock -> (problems, reported)

    def _case(self, end_tick_under_lock):
        cls = type(self)
        if cls._cases is None:
            cases = {}

            def run(flag):
                try:
                    cases[flag] = self._lock_while_parked(flag)
                except BaseException as exc:        # a failed step of the case, reported below
                    cases[flag] = ([f"{type(exc).__name__}: {exc}"], [])
            threads = [threading.Thread(target=run, args=(flag,)) for flag in (False, True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            cls._cases = cases
        return cls._cases[end_tick_under_lock]

    def _lock_while_parked(self, end_tick_under_lock):
        root = os.path.join(self.dir, "under" if end_tick_under_lock else "parked")
        os.mkdir(root)
        p = Project(root)
        self.addCleanup(self._kill_plugins, p)
        hold = os.path.join(p.root, "hold-tick")
        p.plugin("rec", timeout_secs=90)
        p.write([every_job("j", every=0.3, hold_file=hold)])
        d = Daemon(p, "A")
        self.addCleanup(d.cleanup)
        d.wait_started()
        if not wait_until(lambda: len(p.records("j", "A")) >= 2, WAIT, 0.02):
            raise AssertionError(f"the job never ticked twice; log tail:\n{d.tail(15)}")
        # Park the job inside a tick (its previous commit is then done): the
        # only state access left is the scheduler's periodic change check.
        with open(hold, "w"):
            pass
        created = time.time()
        # Parked: a tick recorded after the hold file appeared found it there
        # (the plugin records first, then looks), and one tick runs at a time.
        self.assertTrue(wait_until(lambda: p.records("j", "A", since_t=created), WAIT, 0.02),
                        "the job never parked on the hold file")
        since = d.mark()
        locks = ShmReadLocks(p.state())
        try:
            if end_tick_under_lock:             # its commit must wait for the lock
                os.unlink(hold)
            # ~10 s of retries, then "locking protocol" in whatever read comes first.
            wait_until(lambda: "Exception in thread" in d.raw_text() or d.errors(since),
                       30 if end_tick_under_lock else 15, 0.05)
        finally:
            locks.release()
        reported = d.errors(since)
        died = "Exception in thread" in d.raw_text()
        if not end_tick_under_lock:
            os.unlink(hold)
        released = time.time()
        resumed = wait_until(lambda: len(p.records("j", "A", since_t=released)) >= 2,
                             WAIT, 0.05)
        problems = []
        if not resumed:
            problems.append("no tick after the state became readable again (daemon rc="
                            f"{d.proc.poll()}); stderr tail:\n{d.tail(15)}")
        if died:
            problems.append("a daemon thread died of a raw exception:\n" + "\n".join(
                line for line in d.raw if not line.startswith("{"))[:1500])
        if d.proc.poll() is not None:
            problems.append(f"the daemon exited ({d.proc.poll()})")
        return problems, reported

    def test_locking_protocol_in_change_detection_does_not_stop_ticking(self):
        problems, _ = self._case(end_tick_under_lock=False)
        self.check_all(problems)

    def test_a_commit_under_the_lock_is_reported_and_retried(self):
        problems, reported = self._case(end_tick_under_lock=True)
        if not reported:
            problems.append("the unusable state was not reported in the log")
        self.check_all(problems)


# ===========================================================================
# 3. SIGHUP while the state cannot be written
# ===========================================================================

class Test03ReloadWithUnwritableState(StateOwnerCase):
    def _reload_while(self, make_unwritable, undo, hold_max):
        self.p.plugin("rec")
        jobs = [every_job("j", every=0.3)]
        # A tick whose commit the unusable state refused is retried after
        # backoff_initial_secs (30 s by default; then the test waited it out).
        top = {"backoff_initial_secs": 0.5}
        self.p.write(jobs, **top)
        d = self.start()
        self.wait_records(2, "j", "A")
        self.p.write(jobs + [every_job("added", every=0.3)], **top)   # a reload that must write
        since = d.mark()
        token = make_unwritable(d)
        try:
            d.proc.send_signal(signal.SIGHUP)
            # The daemon either says the reload failed or dies; give it the lock's length.
            wait_until(lambda: d.proc.poll() is not None or d.find(is_reload_report, since),
                       hold_max, 0.05)
        finally:
            undo(d, token)
        back = time.time()
        # Once the state is usable again: the old config ticks on, or the daemon is gone.
        wait_until(lambda: d.proc.poll() is not None
                   or len(self.p.records("j", "A", since_t=back)) >= 2, WAIT, 0.05)
        self.assertIsNone(d.proc.poll(), f"a valid SIGHUP with an unusable state stopped "
                                         f"the daemon (exit {d.proc.poll()}); log:\n{d.tail()}")
        why = d.find(is_reload_report, since)
        self.assertIsNotNone(why, "no log line says why the reload was not applied:\n"
                             + d.tail())
        self.wait_records(2, "j", "A", since_t=back, what="the old config ticking on")

    def test_sighup_while_the_state_cannot_be_written_keeps_the_daemon(self):
        # "Disk full": every file write of the daemon fails at once (RLIMIT_FSIZE 0).
        import resource
        if not hasattr(resource, "prlimit"):
            self.skipTest("needs resource.prlimit (Linux)")
        self._reload_while(lambda d: state_unwritable(d.pid, True),
                           lambda d, _: state_unwritable(d.pid, False) if d.proc.poll() is None
                           else None, 15)

    @unittest.skipUnless(FULL, "NEXO_TEST_FULL=1: holds a lock past the 30 s busy timeout")
    def test_sighup_while_another_process_holds_begin_immediate_keeps_the_daemon(self):
        self._reload_while(lambda d: SqliteWriteLock(self.p.state()),
                           lambda d, lock: lock.release(), 45)


# ===========================================================================
# 4. A plugin error with a lone surrogate
# ===========================================================================

class Test04LoneSurrogateError(StateOwnerCase):
    def test_permanent_error_with_lone_surrogate_pauses_and_is_stored(self):
        self.p.plugin("rec")
        self.p.write([every_job("j", every=60, fail_code=-32002, fail_message="bad byte",
                                lone_surrogate=True)])
        self.start()
        first = self.wait_records(1, "j", "A")[0]
        # Paused (the policy held) or re-ticked (the tight loop): whichever comes first.
        wait_until(lambda: self.p.status()["j"]["paused"] or
                   len(self.p.records("j")) >= 3, 15, 0.2)
        row = self.p.status()["j"]
        ticks = self.p.records("j")
        problems = []
        if not row["paused"]:
            problems.append(f"a Permanent error did not pause the job: {row}")
        if not (row["last_error"] and "bad byte" in row["last_error"]):
            problems.append(f"the error was not stored: last_error={row['last_error']!r}")
        if len(ticks) > 1:
            problems.append(f"a job every 60 s was ticked {len(ticks)} times in "
                            f"{ticks[-1]['t'] - first['t']:.1f} s")
        self.check_all(problems)

    def test_transient_error_with_lone_surrogate_is_not_retried_every_second(self):
        self.p.plugin("rec")
        self.p.write([every_job("j", every=60, fail_code=-32001, fail_message="flaky",
                                lone_surrogate=True)], backoff_initial_secs=30)
        self.start()
        self.wait_records(1, "j", "A")
        again = wait_until(lambda: len(self.p.records("j")) >= 2, 4, 0.05)
        row = self.p.status()["j"]
        problems = []
        if again:
            ts = [r["t"] for r in self.p.records("j")]
            problems.append(f"re-ticked {ts[1] - ts[0]:.1f} s after a Transient error "
                            f"(backoff_initial_secs is 30)")
        if row["last_status"] != "transient" or not row["last_error"]:
            problems.append(f"the outcome was not stored: {row}")
        self.check_all(problems)


# ===========================================================================
# 5. resume puts at / paused_on_boot / cron jobs back on their schedule
# ===========================================================================

class Test05ResumeKeepsSchedule(StateOwnerCase):
    def test_resume_does_not_fire_at_or_cron_jobs_early(self):
        self.p.plugin("rec")
        now = datetime.now(timezone.utc)
        at = (now + timedelta(hours=1)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        far_hour = (now + timedelta(hours=12)).hour     # a cron slot hours away
        self.p.write([
            {"id": "at1", "kind": "rec", "schedule": {"at": at}},
            {"id": "boot1", "kind": "rec", "schedule": {"at": at}, "paused_on_boot": True},
            {"id": "cron1", "kind": "rec", "schedule": {"cron": f"0 0 {far_hour} * * *"}},
        ])
        d = self.start()
        for job in ("at1", "cron1"):
            since = d.mark()
            self.assertEqual(self.p.cli("pause", job).returncode, 0)
            wait_applied(d, "pause", job, since)
        resumed = time.time()
        for job in ("at1", "boot1", "cron1"):
            since = d.mark()
            self.assertEqual(self.p.cli("resume", job).returncode, 0)
            wait_applied(d, "resume", job, since)
        # A window for wrong ticks (cut short once all three have fired).
        wait_until(lambda: {r["job"] for r in self.p.records(since_t=resumed)}
                   >= {"at1", "boot1", "cron1"}, 4, 0.05)
        fired = sorted({r["job"] for r in self.p.records()})
        self.assertEqual(fired, [], f"resume fired jobs whose slot is hours away: {fired} "
                                    f"(at={at}, cron hour={far_hour})")
        rows = self.p.status()
        self.assertFalse(any(rows[j]["paused"] for j in rows), rows)


# ===========================================================================
# 6. A schedule changed while the daemon is down
# ===========================================================================

class Test06ScheduleChangedWhileDown(StateOwnerCase):
    def test_every_secs_3600_to_1_while_stopped_ticks_soon_after_restart(self):
        self.p.plugin("rec")
        self.p.write([every_job("j", every=3600)])
        a = self.start("A")
        self.wait_records(1, "j", "A")
        rc, _ = a.stop()
        self.assertEqual(rc, 0, a.tail())
        self.p.write([every_job("j", every=1)])
        self.start("B")
        restarted = time.time()
        got = wait_until(lambda: self.p.records("j", "B"), 10, 0.05)
        self.assertTrue(got, "every_secs changed 3600 -> 1 while stopped: no tick within "
                             f"10 s of the restart; status: {self.p.status()['j']}")
        self.assertLess(got[0]["t"] - restarted, 10)


# ===========================================================================
# 7. A reload that removes a plugin
# ===========================================================================

class Test07ReloadRemovingAPlugin(StateOwnerCase):
    def test_removed_plugins_queued_ticks_are_dropped_and_readded_jobs_start_clean(self):
        self.p.plugin("slow", max_concurrent=1)
        self.p.plugin("keep")
        slow_jobs = [every_job(f"s{i}", "slow", 0.3, sleep=0.8) for i in (1, 2, 3)]
        keep_job = every_job("k", "keep", 0.3)
        both = ["plugins/slow", "plugins/keep"]
        self.p.write(slow_jobs + [keep_job], plugins=both)
        d = self.start()
        # One slow tick runs (max_concurrent_ticks 1) while the other two queue.
        self.assertTrue(wait_until(lambda: [r for r in self.p.records()
                                            if r["job"].startswith("s")], WAIT, 0.02),
                        "no slow tick started")
        self.p.write([keep_job], plugins=["plugins/keep"])
        since = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        # Synchronisation only (today: "reloaded: ..."); the checks below do not need it.
        wait_until(lambda: d.find(lambda r: "reload" in r.get("msg", ""), since), 5, 0.02)
        removed = ("s1", "s2", "s3")

        def bad(r):
            return (r.get("job") in removed and r.get("outcome") not in (None, "ok", "cancelled")
                    ) or ("alert" in r.get("msg", "") and any(j in r["msg"] for j in removed))
        # Long enough for the cancelled tick to end and the queued ones to come
        # up: 8 ticks every 0.3 s, three times a slow tick's 0.8 s.
        wait_until(lambda: d.find(bad, since) or len(d.ticks("k", since, ("ok",))) >= 8,
                   WAIT, 0.05)
        problems = [f"after the reload removed them: {r.get('msg')}"
                    for r in d.recs(since) if bad(r)]
        # Adding them back: they tick again (nobody paused them).
        self.p.write(slow_jobs + [keep_job], plugins=both)
        back = time.time()
        since = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        ticked = wait_until(lambda: {r["job"] for r in self.p.records(since_t=back)}
                            >= set(removed), WAIT, 0.1)
        if not ticked:
            rows = self.p.status()
            problems.append("re-added jobs did not tick again; status: " + json.dumps(
                {j: {"paused": rows[j]["paused"], "last_status": rows[j]["last_status"],
                     "last_error": rows[j]["last_error"]} for j in removed}))
        self.check_all(problems)


# ===========================================================================
# 8. Two daemons on one state file: commands reach the owner
# ===========================================================================

def _stopped_ticking(p: Project, job: str, quiet: float = 0.6, within: float = 6.0) -> bool:
    """True once ``job`` has had no new request for ``quiet`` seconds (within
    ``within``); the tests' jobs tick every 0.1 s, so that is six missed slots."""
    def quiet_now():
        rs = p.records(job)
        return not rs or time.time() - rs[-1]["t"] >= quiet
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if quiet_now():
            return True
        time.sleep(0.05)
    return False


class Test08CommandsReachTheOwner(StateOwnerCase):
    def _two_daemons(self):
        self.p.plugin("rec")
        self.p.write([every_job("j", every=0.1)])
        a = self.start("A")
        self.wait_records(2, "j", "A")
        b = self.start("B")
        return a, b

    def test_pause_reaches_the_daemon_holding_the_lease_six_times_out_of_six(self):
        self._two_daemons()
        trials = []
        for n in range(6):
            self.assertEqual(self.p.cli("pause", "j").returncode, 0)
            if not _stopped_ticking(self.p, "j"):
                trials.append(f"trial {n}: pause had no effect (the job kept ticking)")
            t = time.time()
            self.assertEqual(self.p.cli("resume", "j").returncode, 0)
            if not wait_until(lambda: self.p.records("j", since_t=t), 10, 0.05):
                trials.append(f"trial {n}: resume had no effect (the job stayed stopped: "
                              f"the command reached the daemon that does not own it?); "
                              f"giving up")
                break
        self.check_all(trials)

    def test_pause_still_reaches_the_other_daemon_after_one_stops_cleanly(self):
        _, b = self._two_daemons()
        rc, _ = b.stop()                 # B never held the lease; A ticks on
        self.assertEqual(rc, 0, b.tail())
        t = time.time()
        self.wait_records(2, "j", "A", since_t=t, what="A ticking after B stopped")
        r = self.p.cli("pause", "j")
        self.assertEqual(r.returncode, 0, r.stderr)
        stopped = _stopped_ticking(self.p, "j")
        self.assertTrue(self.p.status()["j"]["paused"])
        self.assertTrue(stopped, f"`pause` said {r.stdout.strip()!r} and status shows paused, "
                                 f"but daemon A kept ticking the job")


# ===========================================================================
# 9. SIGTERM with the state database locked by another process
# ===========================================================================

class Test09ShutdownBoundWithLockedState(StateOwnerCase):
    def test_sigterm_exits_within_grace_while_another_process_holds_the_lock(self):
        grace = 1       # the bound scales with it; the default would only wait longer
        self.p.plugin("rec")
        self.p.write([every_job("j", every=0.3)], shutdown_grace_secs=grace)
        d = self.start()
        self.wait_records(2, "j", "A")
        lock = SqliteWriteLock(self.p.state())
        self.addCleanup(lock.release)
        since = d.mark()
        bound = grace + 15.0
        rc, secs = d.stop(signal.SIGTERM, bound)
        lock.release()
        print(f"\n[state] SIGTERM with the state locked by another process: exited in "
              f"{secs:.1f}s (shutdown_grace_secs {grace})", file=sys.stderr)
        self.assertIsNotNone(rc, f"SIGTERM with the state locked: still running after "
                                 f"{bound:.0f} s (shutdown_grace_secs {grace}); log:\n{d.tail()}")
        self.assertTrue(d.errors(since), "what could not be stored was not logged")


# ===========================================================================
# 10. A deleted state file; status never creates one
# ===========================================================================

class Test10DeletedStateFile(StateOwnerCase):
    def test_state_file_deleted_under_a_running_daemon_is_noticed(self):
        self.p.plugin("rec")
        self.p.write([every_job("j", every=0.3)])
        d = self.start()
        self.wait_records(2, "j", "A")
        since = d.mark()
        path = self.p.state()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass
        self.p.cli("status", "--json")
        problems = []
        if os.path.exists(path):
            problems.append("`status` created a new state file")
        name = os.path.basename(path)
        loud = wait_until(lambda: [r for r in d.errors(since)
                                   if name in r.get("msg", "") or "state" in r.get("msg", "")],
                          WAIT, 0.1)
        if not loud:
            problems.append(f"the daemon did not report that its state file vanished within "
                            f"{WAIT:.0f} s; log tail:\n{d.tail(8)}")
        self.check_all(problems)

    def test_status_never_creates_a_state_file(self):
        self.p.plugin("rec")
        self.p.write([every_job("j", every=60)])
        r = self.p.cli("status", "--json")
        self.assertFalse(os.path.exists(self.p.state()),
                         f"`status` created {self.p.state()} (exit {r.returncode})")
        r = self.p.cli("status")
        self.assertFalse(os.path.exists(self.p.state()), "`status` created the state file")


# ===========================================================================
# 11. SIGHUP with a changed state_db
# ===========================================================================

class Test11StateDbChangeOnReload(StateOwnerCase):
    def test_changed_state_db_is_refused_and_the_cli_does_not_tick_concurrently(self):
        self.p.plugin("rec")
        jobs = [every_job("j", every=0.3)]
        self.p.write(jobs, state_db="state/a.db")
        d = self.start()
        self.wait_records(2, "j", "A")
        self.p.write(jobs, state_db="state/b.db")
        since = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        problems = []
        refused = wait_until(lambda: [r for r in d.errors(since) if "state_db" in r.get("msg", "")],
                             10, 0.05)
        if not refused:
            problems.append("no log line refused the state_db change; log since SIGHUP:\n"
                            + "\n".join(r.get("msg", "") for r in d.recs(since)
                                        if "outcome" not in r))
        before = state_cursors(self.p.state("state/a.db"))["j"]
        self.p.cli("tick", "j")
        by_cli = self.p.records("j", "cli")
        if by_cli:
            problems.append(f"the CLI ticked the job itself while the daemon runs it: {by_cli}")
        t = time.time()
        self.wait_records(2, "j", "A", since_t=t, what="the daemon ticking on")
        after = wait_until(lambda: (lambda c: c if c > before else None)(
            state_cursors(self.p.state("state/a.db"))["j"]), 10, 0.1)
        if not after:
            problems.append("the daemon stopped committing to its old state file")
        self.assertIsNone(d.proc.poll())
        self.check_all(problems)


# ===========================================================================
# 12. status: running, and disabled
# ===========================================================================

class Test12StatusReportsRunningAndDisabled(StateOwnerCase):
    def test_status_json_shows_running_during_a_long_tick(self):
        self.p.plugin("rec")
        self.p.write([every_job("j", every=60, sleep=4)])
        self.start()
        self.wait_records(1, "j", "A")
        row = self.p.status()["j"]
        self.assertTrue(row["running"], f"status --json during a 4 s tick: {row}")

    def test_text_status_shows_disabled(self):
        self.p.plugin("rec")
        self.p.write([every_job("j", every=60)], enabled=False)
        r = self.p.cli("status")
        self.assertEqual(r.returncode, 0, r.stderr)
        line = next((ln for ln in r.stdout.splitlines() if ln.split()[:1] == ["j"]), "")
        self.assertIn("disabled", line, f'"enabled": false, but status says:\n{r.stdout}')


# ===========================================================================
# Issue 26, item 2: resume of a paused job no daemon holds
# ===========================================================================

class Test26ResumeOfAJobNoDaemonHolds(StateOwnerCase):
    """On both backends (``backend``): the CLI applies the command to the
    state itself, and the running daemon that has the job must tick it again."""
    backend = "sqlite"

    def state_top(self) -> dict:
        if self.backend == "sqlite":
            return {}
        require_nats()
        server = NatsServer().start()
        self.addCleanup(server.cleanup)
        return {"state_db": "jetstream://jobs", "broker": server.url}

    def test_the_daemon_that_has_the_job_ticks_it_again(self):
        self.p.plugin("rec")
        self.p.write([every_job("j", every=0.3)], **self.state_top())
        a = self.start("A")
        self.wait_records(2, "j", "A")
        r = self.p.cli("pause", "j")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("applied by daemon", r.stdout)
        b = self.start("B")                 # reads j paused; A holds its lease
        rc, _ = a.stop()                    # a clean stop releases it: nobody holds j
        self.assertEqual(rc, 0, a.tail())
        resumed = time.time()
        r = self.p.cli("resume", "j")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "resume j: done", "applied by the CLI itself")
        ticked = wait_until(lambda: self.p.records("j", "B", since_t=resumed), WAIT, 0.05)
        row = self.p.status()["j"]
        self.assertTrue(ticked, f"daemon B has j in its config but never ticked it after "
                                f"`resume`; status: paused={row['paused']}, next_run_at="
                                f"{row['next_run_at']}; B's log:\n{b.tail(10)}")
        self.assertFalse(row["paused"])


class Test26ResumeOfAJobNoDaemonHoldsJetStream(Test26ResumeOfAJobNoDaemonHolds):
    backend = "jetstream"


if __name__ == "__main__":
    unittest.main()
