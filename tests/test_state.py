"""StateStore of nexo_poller (section "State"): schema, group commit, leases."""

import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import unittest

import nexo_poller as np
from nexo_poller import JobState, SqliteStateStore, StateError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import TempDirCase, wait_until  # noqa: E402

WAIT = 10.0


class _Tmp(TempDirCase):
    tmp_prefix, quiet = "nexo-state-", False

    def setUp(self):
        super().setUp()
        self.path = self.db

    def open_store(self, path=None, **kw):
        store = SqliteStateStore(path or self.path, **kw)
        self.addCleanup(_close_quietly, store)
        return store

    def meta(self, key):
        rows = dict(self.raw().execute("SELECT key, value FROM meta").fetchall())
        return rows.get(key)

    def raw(self, path=None):
        db = sqlite3.connect(path or self.path, timeout=10)
        self.addCleanup(db.close)
        return db


def _close_quietly(store):
    try:
        store.close()
    except Exception:
        pass


class SchemaTests(_Tmp):

    def test_new_file_is_created_with_mode_0600(self):
        store = self.open_store()
        self.assertTrue(os.path.isfile(self.path))
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        self.assertEqual(mode, 0o600, oct(mode))
        store.close()

    def test_missing_folder_is_created_private(self):
        path = os.path.join(self.dir, "sub", "dir", "s.db")
        self.open_store(path)
        self.assertTrue(os.path.isfile(path))
        mode = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
        self.assertEqual(mode & 0o077, 0, oct(mode))

    def test_schema_version_is_recorded(self):
        store = self.open_store()
        self.assertEqual(self.meta("schema_version"), str(np.STATE_SCHEMA_VERSION))
        store.close()
        rows = dict(self.raw().execute("SELECT key, value FROM meta").fetchall())
        self.assertEqual(rows.get("schema_version"), str(np.STATE_SCHEMA_VERSION))

    def test_reopening_keeps_data(self):
        store = self.open_store()
        store.claim({"a": 1.0, "b": 1.0}, 0.0, paused_on_boot=["b"])
        store.run(lambda db: db.execute("UPDATE jobs SET cursor=?, items_seen_total=7 "
                                        "WHERE id='a'", (b"cur",)))
        store.close()
        again = self.open_store()
        jobs = again.load()
        self.assertEqual(set(jobs), {"a", "b"})
        self.assertEqual(jobs["a"].cursor, b"cur")
        self.assertEqual(jobs["a"].items_seen_total, 7)
        self.assertIs(jobs["b"].paused, True)
        self.assertIs(jobs["a"].paused, False)
        self.assertEqual(self.meta("schema_version"), str(np.STATE_SCHEMA_VERSION))

    def test_claim_does_not_overwrite_existing_rows(self):
        store = self.open_store()
        store.claim({"a": 1.0}, 0.0)
        store.run(lambda db: db.execute("UPDATE jobs SET cursor=x'01' WHERE id='a'"))
        granted = store.claim({"a": 2.0}, 0.0, paused_on_boot=["a"])
        row = store.load()["a"]
        self.assertEqual(row.cursor, b"\x01")
        self.assertIs(row.paused, False)
        self.assertEqual(granted["a"], row, "the claim returns the state as committed")

    def test_a_version_1_file_is_migrated_in_place_and_keeps_its_data(self):
        db = self.raw()
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE jobs (id TEXT PRIMARY KEY, cursor BLOB, paused INTEGER NOT NULL
                DEFAULT 0, last_status TEXT, last_error TEXT, consecutive_errors INTEGER NOT
                NULL DEFAULT 0, last_run_at REAL, next_run_at REAL, items_seen_total INTEGER
                NOT NULL DEFAULT 0, items_dispatched_total INTEGER NOT NULL DEFAULT 0,
                last_alert_at REAL, lease_owner TEXT, lease_until REAL);
            CREATE TABLE commands (seq INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL,
                verb TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0);
            INSERT INTO meta VALUES ('schema_version', '1'), ('app', 'nexo-poller'),
                                    ('daemon', 'gone:1:x');
            INSERT INTO jobs (id, cursor, items_seen_total) VALUES ('a', x'2a', 9);
        """)
        db.commit()
        ro = self.open_store(readonly=True)          # status reads an old file as it is
        self.assertEqual(ro.load()["a"].cursor, b"*")
        self.assertEqual(ro.outbox(), [])
        ro.close()
        store = self.open_store()
        self.assertEqual(self.meta("schema_version"), "2")
        self.assertIsNone(self.meta("daemon"))
        a = store.load()["a"]
        self.assertEqual((a.cursor, a.items_seen_total, a.revision), (b"*", 9, 0))
        self.assertEqual(store.outbox(), [])
        self.assertIn("a", store.claim({"a": 1.0}, 0.0))
        store.release()
        store.command("a", "pause", arg=np.pause_command_arg("moved", "ops"))
        self.assertEqual(store.load()["a"].pause_note, "moved")

    def test_a_version_2_file_from_before_pause_notes_gets_their_columns(self):
        store = self.open_store()
        store.claim({"a": 1.0}, 0.0)
        store.close()
        db = self.raw()
        for column in ("paused_by", "paused_at", "pause_note"):
            db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        db.commit()
        ro = self.open_store(readonly=True)          # status reads it as it is
        self.assertIsNone(ro.load()["a"].pause_note)
        ro.close()
        store = self.open_store()
        store.command("a", "pause", arg=np.pause_command_arg("kept", "ops", at=5.0))
        a = store.load()["a"]
        self.assertEqual((a.paused, a.pause_note, a.paused_by, a.paused_at),
                         (True, "kept", "ops", 5.0))

    def test_garbage_file_is_refused_and_left_untouched(self):
        garbage = bytes(range(256)) * 16 + b"this is not a sqlite database\n" * 10
        with open(self.path, "wb") as fh:
            fh.write(garbage)
        with self.assertRaises(StateError) as cm:
            SqliteStateStore(self.path)
        self.assertIn(self.path, str(cm.exception))
        with open(self.path, "rb") as fh:
            self.assertEqual(fh.read(), garbage)

    def test_short_text_file_is_refused_and_left_untouched(self):
        garbage = b"hello, I am a config file\n"
        with open(self.path, "wb") as fh:
            fh.write(garbage)
        with self.assertRaises(StateError):
            SqliteStateStore(self.path)
        with open(self.path, "rb") as fh:
            self.assertEqual(fh.read(), garbage)

    def _foreign_db(self):
        db = sqlite3.connect(self.path)
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO customers (name) VALUES ('ada')")
        db.commit()
        db.close()

    def test_foreign_sqlite_database_is_refused(self):
        self._foreign_db()
        with self.assertRaises(StateError) as cm:
            SqliteStateStore(self.path)
        self.assertIn("not a nexo-poller state database", str(cm.exception))
        self.assertEqual(self.raw().execute("SELECT name FROM customers").fetchall(), [("ada",)])

    def test_refused_foreign_database_is_not_modified(self):
        # Refusing someone else's database must leave it as it was: no switch
        # to WAL journaling (which rewrites the header and leaves -wal/-shm).
        self._foreign_db()
        with open(self.path, "rb") as fh:
            before = fh.read()
        with self.assertRaises(StateError):
            SqliteStateStore(self.path)
        with open(self.path, "rb") as fh:
            self.assertEqual(fh.read(), before, "refused foreign database was modified")
        self.assertEqual(self.raw().execute("PRAGMA journal_mode").fetchone()[0], "delete")

    def test_unknown_schema_version_is_refused_naming_it(self):
        self.open_store().close()
        db = sqlite3.connect(self.path)
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
        db.commit()
        db.close()
        with self.assertRaises(StateError) as cm:
            SqliteStateStore(self.path)
        self.assertIn("99", str(cm.exception))
        self.assertIn("version", str(cm.exception))


class JobStateTests(unittest.TestCase):

    def test_replace_copies_changes_only_known_fields_and_leaves_the_original(self):
        s = JobState("j", cursor=b"c", revision=3)
        t = s.replace(paused=True, revision=4)
        self.assertEqual(t, JobState("j", cursor=b"c", paused=True, revision=4))
        self.assertEqual(s, JobState("j", cursor=b"c", revision=3))
        with self.assertRaises(TypeError):
            s.replace(no_such_field=1)

    def test_a_state_has_no_dict(self):
        # Issue 27 item 1: one per job (two at a claim) for the daemon's life.
        self.assertFalse(hasattr(JobState("j"), "__dict__"))
        self.assertFalse(hasattr(JobState("j").replace(revision=1), "__dict__"))


class GroupCommitTests(_Tmp):

    def test_many_submits_from_many_threads_all_commit_and_ack_once(self):
        store = self.open_store()
        observer = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        self.addCleanup(observer.close)
        threads_n, per_thread = 8, 125
        total = threads_n * per_thread
        calls: dict[str, int] = {}
        failures: list = []
        seen_by_other_conn: dict[str, bool] = {}
        lock = threading.Lock()
        all_done = threading.Event()

        def make_done(job_id):
            def done(result):
                if isinstance(result, BaseException):
                    failures.append((job_id, result))
                # the row is committed by the time `done` runs
                visible = observer.execute("SELECT count(*) FROM jobs WHERE id=?",
                                           (job_id,)).fetchone()[0] == 1
                with lock:
                    calls[job_id] = calls.get(job_id, 0) + 1
                    seen_by_other_conn[job_id] = visible
                    if len(calls) == total:
                        all_done.set()
            return done

        def worker(t):
            for i in range(per_thread):
                job_id = f"t{t}-{i}"
                store.submit(lambda db, j=job_id: db.execute(
                    "INSERT INTO jobs (id) VALUES (?)", (j,)), make_done(job_id))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(WAIT)
        self.assertTrue(all_done.wait(WAIT), f"{len(calls)} of {total} callbacks ran")
        self.assertEqual(len(calls), total)
        self.assertEqual(failures, [])
        self.assertTrue(all(n == 1 for n in calls.values()),
                        {k: n for k, n in calls.items() if n != 1})
        not_visible = [k for k, v in seen_by_other_conn.items() if not v]
        self.assertEqual(not_visible, [], "done fired before the row was committed")
        count = observer.execute("SELECT count(*) FROM jobs").fetchone()[0]
        self.assertEqual(count, total)
        # still exactly once after a quiet moment (writer drained)
        store.run(lambda db: None)
        self.assertTrue(all(n == 1 for n in calls.values()))

    def _block_writer(self, store):
        """Occupy the writer thread so that what is submitted next forms one batch."""
        entered, gate = threading.Event(), threading.Event()

        def blocker(db):
            entered.set()
            gate.wait(WAIT)
        store.submit(blocker)
        self.assertTrue(entered.wait(WAIT))
        return gate

    def test_bad_sql_fails_only_its_own_write(self):
        store = self.open_store()
        gate = self._block_writer(store)
        results: dict[str, object] = {}
        finished = threading.Event()

        def done_for(name):
            def done(result):
                results[name] = result
                if len(results) == 3:
                    finished.set()
            return done
        store.submit(lambda db: db.execute("INSERT INTO jobs (id) VALUES ('good1')"),
                     done_for("good1"))
        store.submit(lambda db: (db.execute("INSERT INTO jobs (id) VALUES ('bad')"),
                                 db.execute("INSERT INTO no_such_table VALUES (1)")),
                     done_for("bad"))
        store.submit(lambda db: db.execute("INSERT INTO jobs (id) VALUES ('good2')"),
                     done_for("good2"))
        gate.set()
        self.assertTrue(finished.wait(WAIT))
        self.assertIsInstance(results["bad"], StateError)
        self.assertIn("no_such_table", str(results["bad"]))
        self.assertNotIsInstance(results["good1"], BaseException)
        self.assertNotIsInstance(results["good2"], BaseException)
        ids = {r[0] for r in self.raw().execute("SELECT id FROM jobs")}
        # the failed write's partial effect was rolled back, the others committed
        self.assertEqual(ids, {"good1", "good2"})

    def test_run_raises_state_error_for_bad_sql(self):
        store = self.open_store()
        with self.assertRaises(StateError):
            store.run(lambda db: db.execute("SELECT * FROM nope"))
        self.assertEqual(store.run(lambda db: db.execute("SELECT 41 + 1").fetchone()[0]), 42)

    def test_the_writer_does_not_keep_a_result_while_it_waits(self):
        # Issue 27 item 1: the writer thread held its last batch (and the
        # results) until the next write came; after start() that was the
        # claim's table of every job's state.
        import weakref

        class Held:
            pass
        store = self.open_store()
        result = Held()
        ref = weakref.ref(result)
        self.assertIs(store.run(lambda db: result), result)
        del result
        self.assertTrue(wait_until(lambda: ref() is None), "the writer keeps the result")

    def test_python_exception_in_write_fails_only_its_own_write(self):
        # A write function that raises something other than sqlite3.Error must
        # not take the writer thread (and every later write) down with it.
        store = self.open_store()
        gate = self._block_writer(store)
        results: dict[str, object] = {}
        finished = threading.Event()

        def done_for(name):
            def done(result):
                results[name] = result
                if len(results) == 3:
                    finished.set()
            return done

        def boom(db):
            db.execute("INSERT INTO jobs (id) VALUES ('boom')")
            raise ValueError("bug in a write function")
        store.submit(lambda db: db.execute("INSERT INTO jobs (id) VALUES ('ok1')"),
                     done_for("ok1"))
        store.submit(boom, done_for("boom"))
        store.submit(lambda db: db.execute("INSERT INTO jobs (id) VALUES ('ok2')"),
                     done_for("ok2"))
        gate.set()
        self.assertTrue(finished.wait(2), f"callbacks that ran: {sorted(results)}")
        self.assertIsInstance(results["boom"], BaseException)
        self.assertNotIsInstance(results["ok1"], BaseException)
        self.assertNotIsInstance(results["ok2"], BaseException)
        # and the store keeps working afterwards
        later = threading.Event()
        store.submit(lambda db: db.execute("INSERT INTO jobs (id) VALUES ('later')"),
                     lambda r: later.set())
        self.assertTrue(later.wait(2), "writer thread died")
        ids = {r[0] for r in self.raw().execute("SELECT id FROM jobs")}
        self.assertEqual(ids, {"ok1", "ok2", "later"})

    def test_a_commit_stores_a_bounded_batch_and_keeps_the_queue_order(self):
        # However far the queue has grown, one transaction takes at most
        # _COMMIT_BATCH_MAX writes: its commit (and the lock it holds) stays short.
        store = self.open_store()
        sizes: list[int] = []
        write_batch = store.file.write_batch

        def recorded(batch):
            sizes.append(len(batch))
            return write_batch(batch)
        store.file.write_batch = recorded
        gate = self._block_writer(store)
        total = 2 * np._COMMIT_BATCH_MAX + 5
        order: list[int] = []
        finished = threading.Event()

        def done_for(i):
            def done(result):
                self.assertNotIsInstance(result, BaseException)
                order.append(i)
                if len(order) == total:
                    finished.set()
            return done
        for i in range(total):
            store.submit(lambda db, i=i: db.execute("INSERT INTO jobs (id) VALUES (?)",
                                                    (f"j{i}",)), done_for(i))
        gate.set()
        self.assertTrue(finished.wait(WAIT))
        self.assertEqual(order, list(range(total)))
        self.assertEqual(sum(sizes[1:]), total)          # sizes[0]: the blocker's batch
        self.assertEqual(max(sizes), np._COMMIT_BATCH_MAX)
        self.assertEqual(len(sizes[1:]), 3)
        count = self.raw().execute("SELECT count(*) FROM jobs").fetchone()[0]
        self.assertEqual(count, total)

    def test_writes_of_a_batch_run_without_a_savepoint_each_until_one_fails(self):
        # The fast path: one transaction, no SAVEPOINT/RELEASE per write; a
        # failing write sends the batch round again, each write isolated.
        store = self.open_store()
        statements: list[str] = []
        gate = self._block_writer(store)
        finished = threading.Event()
        results: list = []

        def trace(db):
            db.set_trace_callback(statements.append)
        store.submit(trace)
        for i in range(3):
            store.submit(lambda db, i=i: db.execute("INSERT INTO jobs (id) VALUES (?)",
                                                    (f"j{i}",)))
        store.submit(lambda db: None, lambda r: finished.set())
        gate.set()
        self.assertTrue(finished.wait(WAIT))
        self.assertFalse([s for s in statements if "SAVEPOINT" in s], statements)
        finished.clear()
        gate = self._block_writer(store)
        store.submit(lambda db: db.execute("INSERT INTO jobs (id) VALUES ('a')"),
                     results.append)
        store.submit(lambda db: db.execute("INSERT INTO jobs (id) VALUES ('a')"),
                     results.append)                      # the same key: fails
        store.submit(lambda db: db.execute("INSERT INTO jobs (id) VALUES ('b')"),
                     lambda r: (results.append(r), finished.set()))
        gate.set()
        self.assertTrue(finished.wait(WAIT))
        self.assertNotIsInstance(results[0], BaseException)
        self.assertIsInstance(results[1], StateError)
        self.assertNotIsInstance(results[2], BaseException)
        self.assertTrue([s for s in statements if "SAVEPOINT" in s])
        ids = {r[0] for r in self.raw().execute("SELECT id FROM jobs")}
        self.assertEqual(ids, {"j0", "j1", "j2", "a", "b"})

    def test_close_commits_queued_writes(self):
        store = SqliteStateStore(self.path)
        gate = self._block_writer(store)
        acked = []
        for i in range(20):
            store.submit(lambda db, i=i: db.execute("INSERT INTO jobs (id) VALUES (?)",
                                                    (f"q{i}",)),
                         lambda r, i=i: acked.append((i, r)))
        closer = threading.Thread(target=store.close)
        closer.start()
        gate.set()
        closer.join(WAIT)
        self.assertFalse(closer.is_alive())
        self.assertEqual(sorted(i for i, _ in acked), list(range(20)))
        self.assertFalse(any(isinstance(r, BaseException) for _, r in acked))
        count = self.raw().execute("SELECT count(*) FROM jobs").fetchone()[0]
        self.assertEqual(count, 20)
        with self.assertRaises(StateError):
            store.submit(lambda db: None)


class ChangedTests(_Tmp):

    def test_changed_does_not_wait_behind_a_commit_and_loses_no_change(self):
        # Issue 27 item 1: the scheduler thread asks changed() twice a second
        # while ticks run; it waited for the writer's whole commit batch
        # (hundreds of ms with 100,000 jobs) and no slot was dispatched meanwhile.
        store, cli = self.open_store(), self.open_store()
        store.changed()                     # the first look may wait
        cli.command("j", "pause")           # another process writes meanwhile
        got, done = [], threading.Event()
        with store.file._lock:              # as the writer holds it through a transaction
            threading.Thread(target=lambda: (got.append(store.changed()), done.set()),
                             daemon=True).start()
            answered = done.wait(WAIT)
        done.wait(WAIT)
        self.assertTrue(answered, "changed() waited for the commit in progress")
        self.assertEqual(got, [False])      # busy: not looked at this time
        self.assertTrue(store.changed(), "the change is seen the next time")
        self.assertFalse(store.changed())


class OutboxCountTests(_Tmp):
    def test_counts_per_job_match_the_items_without_reading_them(self):
        store = self.open_store(owner="o")
        got = store.claim({"a": 1e12, "b": 1e12}, 0.0)
        items = {"a": [np.OutboxItem("e1", "a", "delivery", "t", "{}", 30.0),
                       np.OutboxItem("e2", "a", "alert", "t", "{}", 10.0)],
                 "b": [np.OutboxItem("e3", "b", "delivery", "t", "{}", 20.0)]}
        for job, box in items.items():
            self.assertTrue(store.commit_now(got[job], outbox=box))
        self.assertEqual(store.outbox_counts(), {"a": (2, 10.0), "b": (1, 20.0)})
        # The interface's own answer (from the items) agrees with the SQL one.
        self.assertEqual(np.StateStore.outbox_counts(store), store.outbox_counts())
        store.outbox_settle(delivered=items["b"])
        self.assertEqual(store.outbox_counts(), {"a": (2, 10.0)})


class ClaimTests(_Tmp):

    def setUp(self):
        super().setUp()
        self.a = self.open_store(owner="owner-a")
        self.b = self.open_store(owner="owner-b")
        self.a.claim({"job": 0.0}, 0.0)

    @staticmethod
    def claim(store, job, until, now):
        return job in store.claim({job: until}, now)

    def lease(self):
        return self.raw().execute(
            "SELECT lease_owner, lease_until FROM jobs WHERE id='job'").fetchone()

    def test_first_claims_second_refused_until_lease_expires(self):
        now = 1_000_000.0
        self.assertTrue(self.claim(self.a, "job", now + 30, now))
        self.assertEqual(self.lease(), ("owner-a", now + 30))
        self.assertFalse(self.claim(self.b, "job", now + 30, now))
        self.assertFalse(self.claim(self.b, "job", now + 40, now + 10))
        self.assertEqual(self.lease(), ("owner-a", now + 30))
        # the holder may renew
        self.assertTrue(self.claim(self.a, "job", now + 35, now + 5))
        self.assertFalse(self.claim(self.b, "job", now + 60, now + 30))
        # once lease_until has passed the other owner takes it
        self.assertTrue(self.claim(self.b, "job", now + 70, now + 40))
        self.assertEqual(self.lease(), ("owner-b", now + 70))
        self.assertFalse(self.claim(self.a, "job", now + 70, now + 41))

    def test_claim_of_unknown_job_creates_it_paused_when_asked(self):
        granted = self.a.claim({"new": 100.0}, 0.0, paused_on_boot=["new"])
        self.assertEqual(granted["new"].lease_owner, "owner-a")
        self.assertIs(granted["new"].paused, True)
        self.assertIsNone(granted["new"].cursor)

    def test_lease_of_dead_process_on_this_host_is_taken_over_at_once(self):
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()                     # started and reaped: the pid is dead
        dead = self.open_store(owner=f"{socket.gethostname()}:{proc.pid}:x")
        now = 1_000_000.0
        self.assertTrue(self.claim(dead, "job", now + 3600, now))
        self.assertTrue(self.claim(self.a, "job", now + 30, now + 1))
        self.assertEqual(self.lease(), ("owner-a", now + 30))

    def test_lease_of_live_process_on_this_host_is_respected(self):
        live = self.open_store(owner=f"{socket.gethostname()}:{os.getpid()}:x")
        now = 1_000_000.0
        self.assertTrue(self.claim(live, "job", now + 3600, now))
        self.assertFalse(self.claim(self.a, "job", now + 30, now + 1))


if __name__ == "__main__":
    unittest.main()
