"""``migrate-state --from-nexo PATH`` (issue 23 item 5): a stopped nexo
daemon's poller.db (built here from nexo's own migration,
tests/fixtures/nexo_poller_001_init.sql) imported into this poller's state.

Files live in a TemporaryDirectory; nothing spawns, no network.
"""

import json
import os
import sqlite3
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import FakePoller, TempDirCase, main_in_process, write_manifest  # noqa: E402
import nexo_poller as nx  # noqa: E402

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                      "nexo_poller_001_init.sql")
CURSOR = b"\x00\xffnexo-cursor\n"          # bytes no text decoding keeps


class NexoImportCase(TempDirCase):
    def setUp(self):
        super().setUp()
        self.nexo = os.path.join(self.dir, "data", "poller.db")
        os.makedirs(os.path.dirname(self.nexo))
        db = sqlite3.connect(self.nexo)
        with open(SCHEMA, encoding="utf-8") as f:
            db.executescript(f.read())
        now_ms = int(time.time() * 1000)
        self.alert_ms = now_ms - 30_000
        rows = [("a", CURSOR, now_ms - 60_000, now_ms + 60_000, "transient", "boom", 2,
                 17, 5, 0, self.alert_ms, now_ms),
                ("b", None, None, None, None, None, 0, 0, 0, 1, None, now_ms),
                ("gone", b"x", None, None, "ok", None, 0, 1, 1, 0, None, now_ms)]
        db.executemany("INSERT INTO poll_state (job_id, cursor, last_run_at, next_run_at, "
                       "last_status, last_error, consecutive_errors, items_seen_total, "
                       "items_dispatched_total, paused, last_failure_alert_at, updated_at) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        # An expired lease: nexo's daemon has stopped.
        db.execute("INSERT INTO poll_lease VALUES ('a', '123-nonce', ?)", (now_ms - 1000,))
        db.commit()
        db.execute("PRAGMA journal_mode=DELETE")      # one file, nothing left in a WAL
        db.close()
        jobs = [{"id": j, "kind": "mem", "schedule": {"every_secs": 60}} for j in "ab"]
        self.config = os.path.join(self.dir, "pollers.json")
        with open(self.config, "w", encoding="utf-8") as f:
            json.dump({"state_db": self.db, "default_jitter_ms": 0, "jobs": jobs,
                       "plugins": [write_manifest(self.dir, "mem", "mem",
                                                  command=sys.executable)]}, f)

    def cli(self, *argv):
        return main_in_process(["--config", self.config, "--log-level", "error",
                                "migrate-state", *argv])

    def imported(self, location=None):
        store = nx.open_state(location or self.db)
        self.addCleanup(store.close)
        return store.load()


class TestImportFromNexo(NexoImportCase):
    def test_imports_cursor_bytes_seconds_counters_and_pause(self):
        code, out, err = self.cli("--from-nexo", self.nexo)
        self.assertEqual(code, nx.EXIT_OK, err)
        states = self.imported()
        a, b = states["a"], states["b"]
        self.assertEqual(a.cursor, CURSOR)
        self.assertEqual((a.last_status, a.last_error, a.consecutive_errors), ("transient",
                                                                                "boom", 2))
        self.assertEqual((a.items_seen_total, a.items_dispatched_total), (17, 5))
        self.assertAlmostEqual(a.last_alert_at, self.alert_ms / 1000, places=3)
        self.assertLess(abs(a.last_run_at - time.time()), 3600)     # seconds, not ms
        self.assertFalse(a.paused)
        self.assertIsNone(a.lease_owner)
        self.assertTrue(b.paused)
        self.assertIsNone(b.cursor)

    def test_names_jobs_not_in_the_config_and_jobs_already_there(self):
        code, out, err = self.cli("--from-nexo", self.nexo)
        self.assertEqual(code, nx.EXIT_OK, err)
        self.assertIn("imported 2 jobs", out)
        self.assertIn("skipped (not in the config): gone", out)
        self.assertNotIn("gone", self.imported())
        code, out, err = self.cli("--from-nexo", self.nexo)     # again: both are there
        self.assertEqual(code, nx.EXIT_OK, err)
        self.assertIn("imported 0 jobs", out)
        self.assertIn("left alone (already there): a, b", out)

    def test_into_another_state_with_to(self):
        other = os.path.join(self.dir, "other.db")
        code, out, err = self.cli("--from-nexo", self.nexo, "--to", other)
        self.assertEqual(code, nx.EXIT_OK, err)
        self.assertEqual(self.imported(other)["a"].cursor, CURSOR)
        self.assertFalse(os.path.exists(self.db))

    def test_never_touches_the_nexo_file(self):
        before = os.stat(self.nexo)
        with open(self.nexo, "rb") as f:
            data = f.read()
        listing = sorted(os.listdir(os.path.dirname(self.nexo)))
        code, out, err = self.cli("--from-nexo", self.nexo)
        self.assertEqual(code, nx.EXIT_OK, err)
        with open(self.nexo, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(os.stat(self.nexo).st_mtime_ns, before.st_mtime_ns)
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.nexo))), listing)

    def test_reads_rows_still_in_nexos_wal(self):
        db = sqlite3.connect(self.nexo)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA wal_autocheckpoint=0")           # the row stays in the WAL
        db.execute("UPDATE poll_state SET cursor=? WHERE job_id='a'", (b"in-wal",))
        db.commit()
        self.addCleanup(db.close)
        code, out, err = self.cli("--from-nexo", self.nexo)
        self.assertEqual(code, nx.EXIT_OK, err)
        self.assertEqual(self.imported()["a"].cursor, b"in-wal")

    def test_a_runner_ticks_on_from_the_imported_cursor(self):
        code, out, err = self.cli("--from-nexo", self.nexo)
        self.assertEqual(code, nx.EXIT_OK, err)
        poller = FakePoller(default=nx.TickAck(next_cursor=b"after"))
        runner = self.start_runner(self.runner_config(
            [{"id": "a", "kind": "mem", "schedule": {"every_secs": 60}}]), poller)
        outcome = runner.run_once("a")
        self.assertEqual(outcome.status, "ok")
        self.assertEqual(poller.calls_for("a")[0].cursor, CURSOR)
        self.assertEqual(self.imported()["a"].cursor, b"after")


class TestImportRefusals(NexoImportCase):
    def test_a_live_nexo_lease_is_refused(self):
        db = sqlite3.connect(self.nexo)
        db.execute("UPDATE poll_lease SET running_until=? WHERE job_id='a'",
                   (int(time.time() * 1000) + 600_000,))
        db.commit()
        db.close()
        code, out, err = self.cli("--from-nexo", self.nexo)
        self.assertEqual(code, nx.EXIT_BUSY)
        self.assertIn("live lease on a (held by 123-nonce)", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertFalse(os.path.exists(self.db))              # nothing imported

    def test_a_missing_file_or_not_a_nexo_db_is_one_line(self):
        plain = os.path.join(self.dir, "plain.db")
        sqlite3.connect(plain).close()
        with open(os.path.join(self.dir, "text.db"), "w") as f:
            f.write("not sqlite at all, just enough text to be no database header\n" * 4)
        for path, words in ((os.path.join(self.dir, "nope.db"), "no such file"),
                            (plain, "not a nexo poller state database"),
                            (os.path.join(self.dir, "text.db"), "not a nexo poller")):
            with self.subTest(path=path):
                code, out, err = self.cli("--from-nexo", path)
                self.assertEqual(code, nx.EXIT_USAGE, err)
                self.assertIn(words, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertNotIn("Traceback", err)

    def test_a_value_nexo_never_writes_is_one_line_naming_job_and_column(self):
        db = sqlite3.connect(self.nexo)
        db.execute("UPDATE poll_state SET items_seen_total='many' WHERE job_id='b'")
        db.commit()
        db.close()
        code, out, err = self.cli("--from-nexo", self.nexo)
        self.assertEqual(code, nx.EXIT_USAGE, err)
        self.assertIn("job 'b'", err)
        self.assertIn("items_seen_total", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertFalse(os.path.exists(self.db))              # nothing imported

    def test_without_to_or_from_nexo_is_a_usage_error(self):
        code, out, err = self.cli()
        self.assertEqual(code, nx.EXIT_USAGE)
        self.assertIn("--to", err)


if __name__ == "__main__":
    unittest.main()
