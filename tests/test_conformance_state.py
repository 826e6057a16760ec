"""The state-store contract (issue 21 items 1-3, 6; the run history: issue 25
item 7): one suite, written once, run against every backend.

``StateContract`` is the suite: every member of ``StateStore`` a backend
must implement, each optional capability it declares (and the one-line
error when a capability it lacks is asked for), and every CLI verb and
admin route that reaches the store.  A backend joins by a subclass that
says how to make its store and its config (``SqliteConformance``,
``JetStreamConformance`` on a real nats-server from tests/nats_support.py).
CLI verbs run in-process through ``main`` (no interpreter start per verb).
"""

import http.client
import json
import os
import shutil
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from nats_support import NatsServer, require_nats  # noqa: E402
from support import (FakePoller, TempDirCase, b64, count_ticks, main_in_process,  # noqa: E402
                     wait_until, write_counter_plugin)

import nexo_poller as nx  # noqa: E402
from nexo_poller import (JetStreamStateStore, JobState, OutboxItem, Runner,  # noqa: E402
                         SqliteStateStore, StateError, StateStore, config_from_dict)

WAIT = 20.0
TOKEN = "t0ken-for-tests-only"


class _ContractCase:
    """What the suite stands on: a backend's subclass sets ``backend`` and
    implements ``store``, ``location`` and ``broker``; ``replace_storage``
    when it declares ``file_identity``."""

    backend = ""

    # -- what a backend's subclass provides --------------------------------------------

    def store(self, **kw) -> StateStore:
        raise NotImplementedError

    def location(self) -> str:
        raise NotImplementedError

    def broker(self) -> str | None:
        return None

    def replace_storage(self) -> None:
        raise NotImplementedError

    # -- shared set-up ----------------------------------------------------------------

    def setUp(self):
        self.tmp_prefix = f"nexo-contract-{self.backend}-"
        super().setUp()
        self.config = os.path.join(self.dir, "pollers.json")
        self.plugin = write_counter_plugin(self.dir, "feed", "e2e_feed", "ephemeral",
                                           os.path.join(self.dir, "pids"), 2)
        self.write_config(self.location(), plugins=[self.plugin])

    def write_config(self, state_db, path=None, **top) -> str:
        doc = {"state_db": state_db, "default_jitter_ms": 0, "shutdown_grace_secs": 3,
               "jobs": [{"id": "j", "kind": "e2e_feed", "schedule": {"every_secs": 3600}},
                        {"id": "k", "kind": "e2e_feed", "schedule": {"every_secs": 3600},
                         "paused_on_boot": True}]}
        if self.broker():
            doc["broker"] = self.broker()
        doc.update(top)
        path = path or self.config
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        return path

    def open(self, **kw) -> StateStore:
        s = self.store(**kw)
        self.addCleanup(s.close)
        return s

    def cli(self, *argv, config=None):
        """``main`` in this process: (exit code, stdout, stderr)."""
        code, out, err = main_in_process(["--config", config or self.config,
                                          "--log-level", "error", *argv])
        self.assertNotIn("Traceback", err + out)
        return code, out, err

    def cli_error(self, code, *argv, needle=""):
        """A user error: the code and one ``nexo-poller:`` line naming ``needle``."""
        got, out, err = self.cli(*argv)
        self.assertEqual(got, code, f"{argv}: stdout={out!r} stderr={err!r}")
        lines = [x for x in err.splitlines() if x.startswith("nexo-poller: ")]
        self.assertEqual(len(lines), 1, err)
        self.assertIn(needle, lines[0])
        return lines[0]

    def supports(self, capability) -> bool:
        """What the backend of ``location()`` declares, asked without opening it."""
        return capability in nx._state_backend(self.location()).capabilities

    def seeded(self) -> StateStore:
        """A store whose job ``j`` has committed cursor b"one" then b"two"."""
        s = self.open()
        now = time.time()
        got = s.claim({"j": now + 60}, now)
        self.assertTrue(s.commit_now(got["j"].replace(cursor=b"one")))
        self.assertTrue(s.commit_now(got["j"].replace(cursor=b"two")))
        s.release()
        return s


    def migrate_to(self, target: str, broker: str | None):
        s = self.open()
        now = time.time()
        got = s.claim({"j": now + 60}, now)
        s.commit_now(got["j"].replace(cursor=b"moved", items_seen_total=4),
                     outbox=[OutboxItem("e1", "j", "delivery", "t", "{}", now)])
        s.command("k", "pause")
        s.release()
        argv = ["migrate-state", "--to", target] + (["--broker", broker] if broker else [])
        code, out, err = self.cli(*argv)
        self.assertEqual(code, 0, err)
        self.assertIn("copied 2 jobs", out)
        dst = nx.open_state(target, broker_url=broker)
        self.addCleanup(dst.close)
        loaded = dst.load()
        self.assertEqual((loaded["j"].cursor, loaded["j"].items_seen_total), (b"moved", 4))
        self.assertIsNone(loaded["j"].lease_owner)
        self.assertTrue(loaded["k"].paused)
        self.assertEqual([i.id for i in dst.outbox()], ["e1"])
        code, out, err = self.cli(*argv)         # again: every job is there already
        self.assertEqual(code, 0, err)
        self.assertIn("copied 0 jobs", out)
        self.assertIn("left alone", out)


class StateContract(_ContractCase):
    """The suite: every member, capability, CLI verb and admin route."""

    # -- the members ------------------------------------------------------------------

    def test_declares_only_known_capabilities(self):
        s = self.open()
        self.assertLessEqual(set(s.capabilities), set(StateStore.CAPABILITIES))
        for cap in StateStore.CAPABILITIES:
            self.assertEqual(s.supports(cap), cap in s.capabilities)
        with self.assertRaises(ValueError):
            s.supports("teleport")

    def test_load_claim_commit_and_release(self):
        a, b = self.open(), self.open()
        now = time.time()
        self.assertEqual(a.load(), {})
        got = a.claim({"j": now + 60, "k": now + 60}, now, paused_on_boot=["k"])
        self.assertEqual(set(got), {"j", "k"})
        self.assertTrue(got["k"].paused)
        self.assertEqual(b.claim({"j": now + 60}, now), {}, "a live lease is not granted twice")
        self.assertTrue(a.commit_now(got["j"].replace(cursor=b"\x00\xff", items_seen_total=3)))
        self.assertFalse(b.commit_now(got["j"].replace(cursor=b"stolen")),
                         "a commit without the lease is refused")
        loaded = b.load(["j"])["j"]
        self.assertEqual((loaded.cursor, loaded.items_seen_total), (b"\x00\xff", 3))
        self.assertEqual(loaded.lease_owner, a.owner)
        a.release(["j"])
        self.assertIsNone(b.load(["j"])["j"].lease_owner)
        self.assertEqual(set(b.claim({"j": now + 60}, now)), {"j"}, "released: b takes it")
        self.assertFalse(a.commit_now(got["j"].replace(cursor=b"late")),
                         "a commit after losing the lease is refused")
        self.assertEqual(b.load(["j"])["j"].cursor, b"\x00\xff")

    def test_commands_apply_at_once_or_queue_for_the_holder(self):
        a, cli = self.open(), self.open()
        now = time.time()
        self.assertEqual(cli.command("j", "pause"), (None, None), "no daemon: applied now")
        self.assertTrue(cli.load(["j"])["j"].paused)
        a.register_daemon(now)
        a.claim({"j": now + 60}, now)
        owner, seq = cli.command("j", "resume")
        self.assertEqual(owner, a.owner)
        pending = a.pending_commands()
        self.assertEqual([(c.seq, c.job, c.verb) for c in pending], [(seq, "j", "resume")])
        self.assertEqual(cli.command_result(seq), (False, None))
        a.finish_command(seq, "resumed")
        self.assertTrue(wait_until(lambda: cli.command_result(seq)[0], WAIT))
        self.assertEqual(cli.command_result(seq), (True, "resumed"))
        self.assertEqual(a.pending_commands(), [])
        with self.assertRaisesRegex(ValueError, "unknown command"):
            cli.command("j", "explode")

    def test_outbox_and_dead_letters(self):
        a = self.open()
        now = time.time()
        got = a.claim({"j": now + 60}, now)
        items = [OutboxItem(f"e{i}", "j", "delivery", "t", "{}", now + i) for i in range(3)]
        self.assertTrue(a.commit_now(got["j"].replace(cursor=b"c"), outbox=items))
        self.assertEqual([i.id for i in a.outbox_pending()], ["e0", "e1", "e2"])
        self.assertEqual(a.outbox_counts(), {"j": (3, now)})
        a.outbox_settle(delivered=[items[0]], retry=[("e1", now + 999, "later")],
                        dead=[(items[2], "gone")], now=now)
        self.assertEqual([i.id for i in a.outbox()], ["e1"])
        self.assertEqual([(i.id, i.last_error) for i in a.outbox(dead=True)], [("e2", "gone")])
        self.assertEqual(a.load(["j"])["j"].delivered_total, 1)
        self.assertEqual(a.outbox_retry(["e2"]), 1)
        self.assertEqual(sorted(i.id for i in a.outbox()), ["e1", "e2"])
        self.assertEqual(a.outbox(dead=True), [])
        self.assertEqual(a.outbox_drop(), 2)
        self.assertEqual(a.outbox(), [])

    def test_a_job_with_a_long_stuck_queue_leaves_room_for_the_others(self):
        # Follow-up item 1: outbox_pending gave the 500 oldest items whatever
        # their retry time; job "stuck" (600 items behind a failing head)
        # filled it, and job j's deliveries were never seen.
        a = self.open()
        now = time.time()
        got = a.claim({"stuck": now + 60, "j": now + 60}, now)
        stuck = [OutboxItem(f"s{i}", "stuck", "delivery", "t", "{}", now - 1000 + i)
                 for i in range(600)]
        self.assertTrue(a.commit_now(got["stuck"], outbox=stuck))
        mine = [OutboxItem(f"e{i}", "j", "delivery", "t", "{}", now + i) for i in range(3)]
        self.assertTrue(a.commit_now(got["j"], outbox=mine))
        a.outbox_pending()                       # listed, as the publisher does
        a.outbox_settle(retry=[("s0", now + 999, "HTTP 500")], now=now)
        pending = a.outbox_pending()
        self.assertLessEqual(len(pending), 500)
        by_job = {}
        for item in pending:
            by_job.setdefault(item.job, []).append(item.id)
        self.assertEqual(by_job.get("j"), ["e0", "e1", "e2"], "the other job's due items")
        self.assertEqual(by_job["stuck"], ["s0"], "the stuck head, nothing behind it")
        # due again: each job's head in order, the window shared between them
        a.outbox_retry()
        pending = a.outbox_pending(limit=10)
        self.assertLessEqual(len(pending), 10)
        self.assertEqual([i.id for i in pending if i.job == "j"], ["e0", "e1", "e2"])
        head = [i.id for i in pending if i.job == "stuck"]
        self.assertEqual(head, [f"s{i}" for i in range(len(head))])
        self.assertTrue(head)

    def test_daemons_register_run_and_unregister(self):
        a, b = self.open(), self.open()
        now = time.time()
        self.assertEqual(a.register_daemon(now), [])
        self.assertEqual(b.register_daemon(now), [a.owner])
        a.set_running(["j"])
        self.assertTrue(wait_until(lambda: b.daemons().get(a.owner) == ["j"], WAIT))
        a.unregister_daemon()
        self.assertTrue(wait_until(lambda: a.owner not in b.daemons(), WAIT))

    def test_changed_sees_a_queued_command_and_close_stores_what_is_queued(self):
        a, cli = self.open(), self.open()
        now = time.time()
        a.register_daemon(now)
        a.claim({"j": now + 60}, now)
        a.changed()                              # from here on
        self.assertEqual(cli.command("j", "pause")[0], a.owner)
        self.assertTrue(wait_until(a.changed, WAIT), "a queued command is a change")
        self.assertFalse(a.handed_over("j"))
        b = self.store()
        b.claim({"k": now + 60}, now)
        results, done = [], threading.Event()
        b.commit(b.load(["k"])["k"].replace(cursor=b"last"),
                 lambda r: (results.append(r), done.set()))
        b.set_deadline(time.monotonic() + WAIT)
        b.close(time.monotonic() + WAIT)         # stores what is queued, then closes
        self.assertTrue(done.wait(WAIT))
        self.assertEqual(results, [True])
        self.assertEqual(a.load(["k"])["k"].cursor, b"last")

    def test_import_states_copies_and_leaves_existing_jobs_alone(self):
        a = self.open()
        a.command("k", "pause")                  # k exists already
        now = time.time()
        item = OutboxItem("e1", "j", "delivery", "t", '{"x": 1}', now)
        copied, skipped = a.import_states(
            [JobState("j", cursor=b"imported", items_seen_total=9, lease_owner="x:1:y",
                      lease_until=now + 60),
             JobState("k", cursor=b"not me")], [item])
        self.assertEqual((copied, skipped), (["j"], ["k"]))
        loaded = a.load()
        self.assertEqual((loaded["j"].cursor, loaded["j"].items_seen_total), (b"imported", 9))
        self.assertIsNone(loaded["j"].lease_owner, "an import holds no lease")
        self.assertIsNone(loaded["k"].cursor)
        self.assertEqual([(i.id, i.body) for i in a.outbox()], [("e1", '{"x": 1}')])

    def test_cursor_history_where_declared_else_a_one_line_refusal(self):
        s = self.seeded()
        if s.supports("cursor_history"):
            self.assertEqual([(c.cursor, c.source) for c in s.cursor_history("j")][:2],
                             [(b"two", "tick"), (b"one", "tick")])
        else:
            with self.assertRaisesRegex(StateError, "keeps no cursor history"):
                s.cursor_history("j")

    def test_file_identity_where_declared(self):
        s = self.open()
        s.check_file()                           # untouched storage: nothing to say
        if s.supports("file_identity"):
            self.replace_storage()
            with self.assertRaises(StateError):
                s.check_file()

    def test_command_watch_where_declared(self):
        a, cli = self.open(), self.open()
        woken = threading.Event()
        a.watch_commands(woken.set)              # a backend without it accepts and ignores
        if a.supports("command_watch"):
            now = time.time()
            a.register_daemon(now)
            a.claim({"j": now + 60}, now)
            cli.command("j", "pause")
            self.assertTrue(woken.wait(WAIT), "a queued command wakes the holder")

    # -- the CLI verbs ---------------------------------------------------------------

    def test_status_of_a_fresh_config(self):
        code, out, err = self.cli("status")
        self.assertEqual(code, 0, err)
        self.assertIn("no state yet", out)
        code, out, err = self.cli("status", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual({r["id"]: r["paused"] for r in json.loads(out)}, {"j": False, "k": True})

    def test_pause_resume_reset_and_status(self):
        for verb in ("pause", "resume", "pause", "reset"):
            code, out, err = self.cli(verb, "j")
            self.assertEqual((code, out.strip()), (0, f"{verb} j: done"), err)
        code, out, err = self.cli("status", "--json")
        rows = {r["id"]: r for r in json.loads(out)}
        self.assertTrue(rows["j"]["paused"], "reset keeps the pause")

    def test_pause_note_is_kept_shown_and_cleared_on_resume(self):
        before = time.time()
        note = "disk full on the feed host (INC-42)\nback after the fix"
        code, out, err = self.cli("pause", "j", "--note", note)
        self.assertEqual((code, out.strip()), (0, "pause j: done"), err)
        s = self.open()                         # persisted, as the backend stores it
        state = s.load(["j"])["j"]
        self.assertTrue(state.paused)
        self.assertEqual((state.pause_note, state.paused_by), (note, nx._operator_name()))
        self.assertLessEqual(before, state.paused_at)
        self.assertLessEqual(state.paused_at, time.time())
        row = json.loads(self.cli("status", "j", "--json")[1])
        self.assertEqual(row["pause"], {"by": nx._operator_name(), "at": nx._iso(state.paused_at),
                                        "note": note})
        for argv in (("status",), ("status", "j")):
            code, out, err = self.cli(*argv)
            self.assertEqual(code, 0, err)
            self.assertIn(f"paused by {nx._operator_name()} at {nx._iso(state.paused_at)}", out)
            self.assertIn("disk full on the feed host (INC-42)\\x0aback after the fix", out)
        self.assertIsNone(json.loads(self.cli("status", "--json")[1])[1]["pause"],
                          "k: paused on boot, by no operator")
        self.assertEqual(self.cli("resume", "j")[0], 0)
        state = s.load(["j"])["j"]
        self.assertEqual((state.paused, state.pause_note, state.paused_by, state.paused_at),
                         (False, None, None, None))
        self.assertIsNone(json.loads(self.cli("status", "j", "--json")[1])["pause"])
        self.assertEqual(self.cli("pause", "j")[0], 0)      # no note: who and when still
        state = s.load(["j"])["j"]
        self.assertEqual((state.pause_note, state.paused_by), (None, nx._operator_name()))

    def test_an_over_long_pause_note_is_refused(self):
        limit = nx.PAUSE_NOTE_MAX_CHARS
        self.cli_error(nx.EXIT_USAGE, "pause", "j", "--note", "x" * (limit + 1),
                       needle=f"at most {limit} characters")
        self.assertFalse(json.loads(self.cli("status", "j", "--json")[1])["paused"])
        code, out, err = self.cli("pause", "j", "--note", "é" * limit)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.open().load(["j"])["j"].pause_note, "é" * limit)

    def test_cursor_show_and_set(self):
        self.seeded().close()
        rows = {r["id"]: r for r in json.loads(self.cli("status", "--json")[1])}
        self.assertEqual((rows["j"]["cursor"], rows["j"]["cursor_text"]), (b64(b"two"), "two"))
        code, out, err = self.cli("cursor", "j")
        self.assertEqual((code, out.strip()), (0, f'j: "two"  base64 {b64(b"two")}  3 bytes'), err)
        self.assertEqual(self.cli("cursor", "j", "--set-text", "3", "--yes")[0], 0)
        code, out, err = self.cli("cursor", "j", "--json")
        self.assertEqual((json.loads(out)["text"], json.loads(out)["cursor"]), ("3", b64(b"3")))
        self.assertEqual(self.cli("cursor", "j", "--set", b64(b"\xff"), "--yes")[0], 0)
        self.assertIsNone(json.loads(self.cli("cursor", "j", "--json")[1])["text"])

    def test_cursor_history_and_rollback_where_supported(self):
        self.seeded().close()
        if self.supports("cursor_history"):
            code, out, err = self.cli("cursor", "j", "--history", "--json")
            self.assertEqual([h["text"] for h in json.loads(out)], ["two", "one"], err)
            self.assertEqual(self.cli("cursor", "j", "--rollback", "1", "--yes")[0], 0)
            self.assertEqual(json.loads(self.cli("cursor", "j", "--json")[1])["text"], "one")
        else:
            for argv in (("--history",), ("--rollback", "1", "--yes")):
                self.cli_error(nx.EXIT_USAGE, "cursor", "j", *argv,
                               needle="keeps no cursor history")
            self.assertEqual(json.loads(self.cli("cursor", "j", "--json")[1])["text"], "two")

    def test_invalid_base64_cursor_is_a_usage_error(self):
        # issue 26 item 19: it exited 6, "broker: invalid cursor"
        self.cli_error(nx.EXIT_USAGE, "cursor", "j", "--set", "!!!", "--yes", needle="--set")

    def test_invalid_base64_dry_run_cursor_is_a_usage_error(self):
        self.cli_error(nx.EXIT_USAGE, "tick", "j", "--dry-run", "--cursor", "%%%",
                       needle="--cursor")

    def test_tick_dry_run_from_the_stored_cursor(self):
        s = self.open()
        now = time.time()
        got = s.claim({"j": now + 60}, now)
        self.assertTrue(s.commit_now(got["j"].replace(cursor=b"41")))
        s.release()
        code, out, err = self.cli("tick", "j", "--dry-run")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual((doc["from_cursor"]["text"], doc["next_cursor"]["text"]), ("41", "42"))
        self.assertEqual(s.load(["j"])["j"].cursor, b"41", "a dry run stores nothing")

    def test_tick_stores_the_outcome(self):
        for expected in ("1", "2"):
            code, out, err = self.cli("tick", "j")
            self.assertEqual((code, json.loads(out)["outcome"]), (0, "ok"), err)
            rows = {r["id"]: r for r in json.loads(self.cli("status", "--json")[1])}
            self.assertEqual((rows["j"]["cursor_text"], rows["j"]["last_status"]),
                             (expected, "ok"))

    def test_tick_dry_run_of_a_fresh_config(self):
        code, out, err = self.cli("tick", "j", "--dry-run")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["next_cursor"]["text"], "1")

    def test_outbox_list_retry_drop(self):
        s = self.open()
        now = time.time()
        got = s.claim({"j": now + 60}, now)
        s.commit_now(got["j"], outbox=[OutboxItem("e1", "j", "delivery", "t", "{}", now)])
        s.release()
        code, out, err = self.cli("outbox", "--json")
        self.assertEqual([i["id"] for i in json.loads(out)], ["e1"], err)
        self.assertEqual(self.cli("outbox", "retry", "--yes")[1].strip(), "outbox retry: 1 item")
        self.assertEqual(self.cli("outbox", "drop", "--yes")[1].strip(), "outbox drop: 1 item")
        self.assertEqual(json.loads(self.cli("outbox", "--json")[1]), [])

    def test_migrate_state_to_a_sqlite_file(self):
        self.migrate_to(os.path.join(self.dir, "copy", "x.db"), None)

    def test_migrate_state_to_its_own_state_is_refused(self):
        self.open().close()
        self.cli_error(nx.EXIT_USAGE, "migrate-state", "--to", self.location(),
                       *(["--broker", self.broker()] if self.broker() else []),
                       needle="already")

    def test_migrate_state_without_state_is_one_line(self):
        self.cli_error(nx.EXIT_USAGE, "migrate-state", "--to",
                       os.path.join(self.dir, "y.db"), needle="no state")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "y.db")))

    # -- the run history (issue 25 item 7) ---------------------------------------------

    def run_record(self, n, **kw):
        """Run ``n`` of job j as a tick would record it."""
        return nx.RunRecord("j", 1000.0 + n, 1000.5 + n, 0.25, kw.pop("outcome", "ok"),
                            items_seen=n, items_dispatched=n // 2,
                            cursor_before=None if n == 0 else {"bytes": 1, "text": str(n - 1)},
                            cursor_after={"bytes": 1, "text": str(n)}, **kw)

    def test_run_history_is_stored_with_the_commit_and_bounded_per_job(self):
        a, b = self.open(), self.open()
        now = time.time()
        got = a.claim({"j": now + 60}, now)["j"]
        for n in range(5):
            self.assertTrue(a.commit_now(got.replace(cursor=str(n).encode()),
                                         run=self.run_record(n), run_keep=3))
        self.assertEqual(b.run_history("j"), [self.run_record(n) for n in (4, 3, 2)],
                         "the newest first, bounded by run_keep, read back whole")
        self.assertEqual([r.items_seen for r in b.run_history("j", limit=2)], [4, 3])
        failed = self.run_record(9, outcome="transient", error="boom",
                                 stderr="last line", trigger="operator")
        self.assertTrue(a.commit_now(got, run=failed, run_keep=3))
        self.assertEqual(b.run_history("j", limit=1), [failed])
        self.assertFalse(b.commit_now(got, run=self.run_record(7)),
                         "a commit without the lease is refused")
        self.assertEqual([r.items_seen for r in b.run_history("j")], [9, 4, 3],
                         "a refused commit records no run")
        self.assertEqual(b.run_history("nosuch"), [])
        self.assertEqual(b.run_histories(["j", "nosuch"], 2),
                         {"j": b.run_history("j", 2), "nosuch": []}, "several jobs at once")
        self.assertTrue(a.commit_now(got, run=self.run_record(10), run_keep=1))
        self.assertEqual([r.items_seen for r in b.run_history("j")], [10], "pruned at once")
        self.assertTrue(a.commit_now(got, run=self.run_record(11), run_keep=0))
        self.assertEqual(b.run_history("j"), [], "run_history 0 keeps none")
        self.assertTrue(a.commit_now(got, run=self.run_record(12)))
        self.assertEqual([r.items_seen for r in b.run_history("j")], [12])
        self.assertTrue(a.commit_now(got))
        self.assertEqual(len(b.run_history("j")), 1, "a commit without a run adds none")

    def test_history_across_restarts_and_a_dry_run_is_not_recorded(self):
        for _ in range(2):
            code, out, err = self.cli("tick", "j")      # each one a daemon start and stop
            self.assertEqual(code, 0, err)
        code, out, err = self.cli("tick", "j", "--dry-run")
        self.assertEqual(code, 0, err)
        code, out, err = self.cli("history", "j", "--json")
        self.assertEqual(code, 0, err)
        runs = json.loads(out)
        self.assertEqual([(r["outcome"], r["trigger"], r["cursor_before"], r["cursor_after"])
                          for r in runs],
                         [("ok", "operator", {"bytes": 1, "text": "1"},
                           {"bytes": 1, "text": "2"}),
                          ("ok", "operator", None, {"bytes": 1, "text": "1"})])
        self.assertEqual(set(runs[0]), {"job", "scheduled_at", "started_at", "duration_ms",
                                        "outcome", "error", "items_seen", "items_dispatched",
                                        "cursor_before", "cursor_after", "stderr", "trigger"})
        code, out, err = self.cli("history", "j", "--limit", "1")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out.strip().splitlines()), 2, out)     # a heading and one run
        self.assertIn("ok", out)
        self.cli_error(nx.EXIT_UNKNOWN_JOB, "history", "nosuch", needle="nosuch")
        self.cli_error(nx.EXIT_USAGE, "history", "j", "--limit", "0", needle="--limit")

    def test_run_history_is_kept_as_configured_per_job(self):
        self.write_config(self.location(), run_history=5, jobs=[
            {"id": "j", "kind": "e2e_feed", "schedule": {"every_secs": 3600},
             "run_history": 1}], plugins=[self.plugin])
        for _ in range(2):
            self.assertEqual(self.cli("tick", "j")[0], 0)
        runs = json.loads(self.cli("history", "j", "--json")[1])
        self.assertEqual([r["cursor_after"]["text"] for r in runs], ["2"])

    # -- the admin routes and the page ------------------------------------------------

    def runner(self) -> Runner:
        token = os.path.join(self.dir, "token")
        with open(token, "w", encoding="utf-8") as f:
            f.write(TOKEN)
        doc = {"state_db": self.location(), "default_jitter_ms": 0, "shutdown_grace_secs": 3,
               "admin_addr": "127.0.0.1:0", "admin_token_file": token,
               "jobs": [{"id": "j", "kind": "e2e_feed", "schedule": {"every_secs": 3600}}]}
        if self.broker():
            doc["broker"] = self.broker()
        cfg = config_from_dict(doc, base_dir=self.dir, extra_kinds=["e2e_feed"])
        r = Runner(cfg, state=self.store())
        r.register(FakePoller("e2e_feed", default=count_ticks))   # for the admin routes
        r.start(True)
        self.addCleanup(r.stop)
        self.assertTrue(r.wait_idle(WAIT), "the first tick did not finish")
        return r

    def get(self, r, path, body=None):
        """GET ``path``, or POST ``body`` with the token: (status, raw body)."""
        conn = http.client.HTTPConnection("127.0.0.1", r.admin_address[1],
                                          timeout=WAIT)
        try:
            conn.request("GET" if body is None else "POST", path, body=body,
                         headers={} if body is None else {"Authorization": f"Bearer {TOKEN}"})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, raw
        finally:
            conn.close()

    def test_admin_cursor_route_and_page_show_text(self):
        r = self.runner()
        code, raw = self.get(r, "/admin/pollers/j/cursor")
        doc = json.loads(raw)
        self.assertEqual(code, 200, doc)
        self.assertEqual((doc["cursor"], doc["text"]), (b64(b"1"), "1"))
        self.assertEqual(doc["history_kept"], r.state.supports("cursor_history"))
        if doc["history_kept"]:
            self.assertEqual([h["text"] for h in doc["history"]], ["1"])
        code, raw = self.get(r, "/admin/pollers")
        self.assertEqual(json.loads(raw)[0]["cursor_text"], "1")
        code, raw = self.get(r, "/")
        self.assertIn('<code title="base64 MQ">1</code>', raw.decode())
        url = f"http://127.0.0.1:{r.admin_address[1]}"
        code, out, err = self.cli("--admin", url, "status", "--json")
        self.assertEqual((code, json.loads(out)[0]["cursor_text"]), (0, "1"), err)
        code, out, err = self.cli("--admin", url, "cursor", "j")
        self.assertEqual((code, out.strip()), (0, f'j: "1"  base64 {b64(b"1")}  1 bytes'), err)
        code, out, err = self.cli("--admin", url, "cursor", "j", "--history")
        if doc["history_kept"]:
            self.assertEqual(code, 0, err)
            self.assertIn('"1"  base64', out)
        else:
            self.assertEqual(code, nx.EXIT_USAGE, out + err)
            self.assertIn("keeps no cursor history", err)
        code, out, err = self.cli("--admin", url, "cursor", "j", "--set", "!!!", "--yes")
        self.assertEqual(code, nx.EXIT_USAGE, out + err)

    def test_runs_route_history_verb_remote_and_the_page(self):
        r = self.runner()                         # its first tick: a scheduled run
        self.assertEqual(r.run_once("j").status, "ok")
        code, raw = self.get(r, "/admin/pollers/j/runs")
        doc = json.loads(raw)
        self.assertEqual(code, 200, doc)
        self.assertEqual((doc["job"], doc["keep"]), ("j", nx.RUN_HISTORY_KEEP))
        self.assertEqual([(x["outcome"], x["trigger"], x["cursor_after"]["text"])
                          for x in doc["runs"]], [("ok", "operator", "2"),
                                                  ("ok", "schedule", "1")])
        self.assertIsNotNone(doc["runs"][1]["scheduled_at"])
        self.assertEqual(json.loads(self.get(r, "/admin/pollers/j/runs?limit=1")[1])["runs"],
                         doc["runs"][:1])
        self.assertEqual(self.get(r, "/admin/pollers/j/runs?limit=x")[0], 400)
        self.assertEqual(self.get(r, "/admin/pollers/nosuch/runs")[0], 404)
        self.assertEqual(self.get(r, "/admin/pollers/j/runs", b"")[0], 405)
        url = f"http://127.0.0.1:{r.admin_address[1]}"
        code, out, err = self.cli("--admin", url, "history", "j", "--json")
        self.assertEqual((code, json.loads(out)), (0, doc["runs"]), err)
        code, out, err = self.cli("--admin", url, "history", "nosuch")
        self.assertEqual(code, nx.EXIT_UNKNOWN_JOB, out + err)
        page = self.get(r, "/")[1].decode()
        self.assertIn('<details class="runs">', page)
        self.assertEqual(page.count('class="run st-ok"'), 2, "one mark per run in the bar")

    def test_admin_routes_that_write_the_store(self):
        r = self.runner()
        for verb, paused in (("pause", True), ("resume", False)):
            code, raw = self.get(r, f"/admin/pollers/j/{verb}", b"")
            self.assertEqual(code, 200, raw)
            self.assertEqual(r.state.load(["j"])["j"].paused, paused)
        code, raw = self.get(r, "/admin/pollers/j/run", b"")
        self.assertEqual((code, json.loads(raw)["ok"]), (200, True), raw)
        self.assertEqual(r.state.load(["j"])["j"].cursor, b"2")
        code, raw = self.get(r, "/admin/pollers/j/cursor", b'{"set_text": "from-api"}')
        self.assertEqual((code, json.loads(raw)["text"]), (200, "from-api"), raw)
        self.assertEqual(r.state.load(["j"])["j"].cursor, b"from-api")
        code, raw = self.get(r, "/admin/pollers/j/reset", b"")
        self.assertEqual(code, 200, raw)
        self.assertIsNone(r.state.load(["j"])["j"].cursor)


    def test_admin_pause_note_by_caller_shown_and_cleared(self):
        r = self.runner()
        body = json.dumps({"note": "vendor API down <b>"}).encode()
        code, raw = self.get(r, "/admin/pollers/j/pause", body)
        self.assertEqual((code, json.loads(raw)), (200, {"ok": True, "paused": True}))
        state = r.state.load(["j"])["j"]
        self.assertEqual((state.pause_note, state.paused_by),
                         ("vendor API down <b>", "admin API from 127.0.0.1"))
        code, raw = self.get(r, "/admin/pollers/j")
        self.assertEqual(json.loads(raw)["pause"], {"by": "admin API from 127.0.0.1",
                                                    "at": nx._iso(state.paused_at),
                                                    "note": "vendor API down <b>"})
        page = self.get(r, "/")[1].decode()
        self.assertIn("paused by admin API from 127.0.0.1", page)
        self.assertIn("vendor API down &lt;b&gt;", page)
        code, raw = self.get(r, "/admin/pollers/j/pause",
                             json.dumps({"note": "x" * (nx.PAUSE_NOTE_MAX_CHARS + 1)}).encode())
        self.assertEqual(code, 400, raw)
        self.assertIn(f"at most {nx.PAUSE_NOTE_MAX_CHARS} characters", json.loads(raw)["error"])
        self.assertEqual(r.state.load(["j"])["j"].pause_note, "vendor API down <b>")
        for bad in (b"[1]", b'{"note": 5}', b'{"colour": "red"}', b"{"):
            code, raw = self.get(r, "/admin/pollers/j/pause", bad)
            self.assertEqual(code, 400, (bad, raw))
        self.assertEqual(self.get(r, "/admin/pollers/j/resume", b"")[0], 200)
        self.assertIsNone(json.loads(self.get(r, "/admin/pollers/j")[1])["pause"])
        self.assertIsNone(r.state.load(["j"])["j"].pause_note)
        url = f"http://127.0.0.1:{r.admin_address[1]}"        # the CLI through the API
        code, out, err = self.cli("--admin", url, "--admin-token-file",
                                  os.path.join(self.dir, "token"), "pause", "j", "--note",
                                  "from afar")
        self.assertEqual(code, 0, err)
        state = r.state.load(["j"])["j"]
        self.assertEqual((state.pause_note, state.paused_by),
                         ("from afar", f"{nx._operator_name()} (admin API from 127.0.0.1)"))
        code, out, err = self.cli("--admin", url, "status", "j")
        self.assertIn(f"paused by {nx._operator_name()} (admin API from 127.0.0.1)", out)


class OnePlacePerChoice(unittest.TestCase):
    """Issue 21 item 6: one function maps a state URL to a backend."""

    def test_only_state_backend_tests_the_scheme(self):
        import ast
        import inspect
        tree = ast.parse(inspect.getsource(nx))
        places = []
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                        node.func.attr == "startswith" and node.args and any(
                            (isinstance(a, ast.Constant) and "jetstream" in str(a.value))
                            or (isinstance(a, ast.Name) and a.id == "_JETSTREAM")
                            for a in ast.walk(node.args[0])):
                    places.append(fn.name)
        self.assertEqual(places, ["_state_backend"])
        self.assertIs(nx._state_backend("jetstream://b"), JetStreamStateStore)
        self.assertIs(nx._state_backend("state/x.db"), SqliteStateStore)


class _Sqlite:
    backend = "sqlite"

    def location(self) -> str:
        return os.path.join(self.dir, "state", "s.db")

    def store(self, **kw) -> StateStore:
        return SqliteStateStore(self.location(), **kw)

    def replace_storage(self) -> None:
        os.replace(self.location(), self.location() + ".old")
        shutil.copy(self.location() + ".old", self.location())


class SqliteConformance(_Sqlite, StateContract, TempDirCase):
    pass


class JetStreamConformance(StateContract, TempDirCase):
    """The suite on a real nats-server (one per class, a bucket per test)."""
    backend = "jetstream"

    @classmethod
    def setUpClass(cls):
        require_nats()
        cls.server = NatsServer().start()
        cls.buckets = iter(range(10 ** 6))

    @classmethod
    def tearDownClass(cls):
        cls.server.cleanup()

    def setUp(self):
        self.bucket = f"b{next(self.buckets)}"   # a bucket per test: one server per class
        super().setUp()

    def location(self) -> str:
        return f"jetstream://{self.bucket}"

    def broker(self) -> str:
        return self.server.url

    def store(self, **kw) -> StateStore:
        return JetStreamStateStore(self.bucket, self.server.url, **kw)

    def test_a_run_whose_record_did_not_land_is_never_shown(self):
        # The run keys go beside the record (KV has no multi-key write): a
        # run written by a commit whose record lost its compare-and-set, or
        # by another writer, is not one the record names.
        a = self.open()
        now = time.time()
        got = a.claim({"j": now + 60}, now)["j"]
        for n in range(2):
            self.assertTrue(a.commit_now(got, run=self.run_record(n), run_keep=3))
        orphan = {**self.run_record(7).stored(), "span": "f00d"}
        a.kv.put_many([(nx._run_key("j", 2), {**orphan, "seq": 2}, None),   # not committed
                       (nx._run_key("j", 1), {**orphan, "seq": 1}, None)])  # another writer's
        self.assertEqual(a.run_history("j"), [self.run_record(0)])
        self.assertTrue(a.commit_now(got, run=self.run_record(2), run_keep=3))
        self.assertEqual([r.items_seen for r in a.run_history("j")], [2, 0])


class SqliteToJetStream(_Sqlite, _ContractCase, TempDirCase):
    """The sqlite suite's migrate test, to a bucket."""

    @classmethod
    def setUpClass(cls):
        require_nats()
        cls.server = NatsServer().start()

    @classmethod
    def tearDownClass(cls):
        cls.server.cleanup()

    def test_migrate_state_to_a_bucket(self):
        self.migrate_to("jetstream://copied", self.server.url)


if __name__ == "__main__":
    unittest.main()
