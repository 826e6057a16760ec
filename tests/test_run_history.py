"""What a tick's run record holds (issue 25 item 7), on the Runner: the
error and the plugin's stderr tail apart, cursors as sizes or short text
with no resolved secret, a dry run not recorded; and a sqlite file from
before the run history.  The store's contract (the write in the tick's
commit, the bound, both backends, the CLI verb and the admin route) is in
tests/test_conformance_state.py."""

import dataclasses
import os
import sqlite3
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import FakePoller, TempDirCase  # noqa: E402

import nexo_poller as nx  # noqa: E402
from nexo_poller import (PollerError, Runner, SqliteStateStore, TickAck,  # noqa: E402
                         TickMetrics, config_from_dict)

SECRET = "s3cr3t-token"


class RecordTests(TempDirCase):

    def runner(self, script):
        cfg = config_from_dict({"state_db": self.db, "default_jitter_ms": 0,
                                "jobs": [{"id": "a", "kind": "mem",
                                          "schedule": {"every_secs": 3600}}]},
                               base_dir=self.dir, extra_kinds=["mem"])
        # as load_config leaves a file whose ${TOKEN} resolved to SECRET
        cfg = dataclasses.replace(cfg, secrets=((SECRET, "${TOKEN}"),))
        r = Runner(cfg)
        r.register(FakePoller(script={"a": script}))
        self.addCleanup(r.stop)
        return r

    def test_error_and_stderr_apart_cursors_shown_short_secrets_hidden(self):
        r = self.runner([TickAck(f"{SECRET}-1".encode(),
                                 metrics=TickMetrics(items_seen=5, items_dispatched=2)),
                         PollerError.Transient(f"auth {SECRET} refused; stderr: "
                                               f"Traceback | KeyError: {SECRET}"),
                         TickAck(b"x" * 65),
                         TickAck(b"\xff\x00")])
        for _ in range(4):
            r.run_once("a")
        binary, long, failed, first = r.state.run_history("a")
        self.assertEqual((first.outcome, first.items_seen, first.items_dispatched,
                          first.cursor_before, first.cursor_after, first.trigger,
                          first.scheduled_at, first.error, first.stderr),
                         ("ok", 5, 2, None, {"bytes": 14, "text": "${TOKEN}-1"}, "operator",
                          None, None, None))
        self.assertEqual((failed.outcome, failed.error, failed.stderr),
                         ("transient", "auth ${TOKEN} refused",
                          "Traceback | KeyError: ${TOKEN}"))
        self.assertEqual(failed.cursor_after, first.cursor_after, "a failed tick keeps it")
        self.assertEqual(long.cursor_after, {"bytes": 65}, "too long to show: its size")
        self.assertEqual(binary.cursor_after, {"bytes": 2}, "not text: its size")
        raw = sqlite3.connect(self.db)
        self.addCleanup(raw.close)
        records = " ".join(row[0] for row in raw.execute("SELECT record FROM runs"))
        self.assertNotIn(SECRET, records)

    def test_a_dry_run_is_not_recorded_a_scheduled_one_is(self):
        r = self.runner([TickAck(b"1"), TickAck(b"2")])
        self.assertEqual(r.dry_run("a").status, "ok")
        self.assertEqual(r.state.run_history("a"), [])
        r.start(True)                           # the first slot: now
        self.assertTrue(r.wait_idle(10))
        (run,) = r.state.run_history("a")
        self.assertEqual(run.trigger, "schedule")
        self.assertIsNotNone(run.scheduled_at)


class OlderFileTests(TempDirCase):

    def test_a_version_2_file_from_before_the_run_history_gets_its_table(self):
        SqliteStateStore(self.db).close()
        raw = sqlite3.connect(self.db)
        raw.execute("DROP TABLE runs")
        raw.execute("ALTER TABLE jobs DROP COLUMN runs_next")   # as main's files are
        raw.commit()
        raw.close()
        ro = SqliteStateStore(self.db, readonly=True)
        self.assertEqual(ro.run_history("a"), [], "read as it is: no runs yet")
        ro.close()
        store = SqliteStateStore(self.db)
        self.addCleanup(store.close)
        got = store.claim({"a": 60.0}, 0.0)["a"]
        run = nx.RunRecord("a", None, 1.0, 0.1, "ok")
        self.assertTrue(store.commit_now(got, run=run))
        self.assertEqual(store.run_history("a"), [run])


if __name__ == "__main__":
    unittest.main()
