"""One place per rule (issue 22 item 2): where two parts of the module used
to answer one question each their own way, they now give the same answer."""

import ast
import io
import logging
import os
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nexo_poller as nx  # noqa: E402
from support import write_manifest  # noqa: E402


def in_process_config(root: str) -> nx.DaemonConfig:
    """A config whose one job's kind ("mem") is served in-process."""
    return nx.config_from_dict(
        {"state_db": os.path.join(root, "s.db"),
         "jobs": [{"id": "a", "kind": "mem", "schedule": {"every_secs": 10}}]},
        extra_kinds=["mem"])


class TickBudgetTests(unittest.TestCase):
    """How long a tick of a kind may take: one rule for the runner and the CLI."""

    def test_cli_waits_for_a_daemons_tick_by_the_runners_budget(self):
        class HeldByAnotherDaemon:
            def command(self, job, verb, **kw):
                return "other-daemon", 7         # queued for the daemon holding the job

            def close(self):
                pass

        waited = []

        def never_done(store, owner, seq, budget):
            waited.append(budget)
            return False, None

        with tempfile.TemporaryDirectory(prefix="nexo-rule-") as root:
            cfg = in_process_config(root)
            runner = nx.Runner(cfg)
            with mock.patch.object(nx, "_config_state", lambda c: HeldByAnotherDaemon()), \
                    mock.patch.object(nx, "_await_command", never_done), \
                    self.assertRaises(nx.NexoPollerError) as ctx:
                nx._tick_through_daemon(cfg, "a")
        # the CLI allows the daemon the tick's budget and 15 s more, and no
        # other budget than the runner's own (5 s in-process; it said 60)
        self.assertEqual(waited, [runner.budget("mem") + 15])
        self.assertIn(f"within {runner.budget('mem') + 15:g}s", str(ctx.exception))


class ConfigDefaultTests(unittest.TestCase):
    """A key left out of pollers.json takes DaemonConfig's default, and every
    field of DaemonConfig (but ``source``) is a key the file may set."""

    def test_an_empty_file_gives_the_dataclass_defaults(self):
        given = nx.config_from_dict({}, base_dir="/srv")
        default = nx.DaemonConfig()
        for field in nx.dataclasses.fields(nx.DaemonConfig):
            if field.name in ("source", "state_db"):
                continue
            with self.subTest(key=field.name):
                self.assertEqual(getattr(given, field.name), getattr(default, field.name))
        self.assertEqual(given.state_db, os.path.normpath(os.path.join("/srv", default.state_db)))

    def test_every_field_is_a_key_of_the_file(self):
        names = {f.name for f in nx.dataclasses.fields(nx.DaemonConfig)
                 if f.metadata.get("file", True)}       # source, secrets: not the file's
        for name in sorted(names):
            with self.subTest(key=name), self.assertRaises(nx.ConfigError) as ctx:
                nx.config_from_dict({name: object()})
            self.assertNotIn("unknown key", str(ctx.exception))


class RelativeTimeTests(unittest.TestCase):
    """The CLI's tables and the status page say relative times by one rule."""

    def test_both_spellings_break_a_span_the_same_way(self):
        now = 1_900_000_000.0
        for delta, short, spaced in ((4, "in 4s", "in 4 s"), (-190, "3m ago", "3 min ago"),
                                     (7200, "in 2h", "in 2 h"), (-0.4, "now", "now"),
                                     (-3 * 86400, "3d ago", "3 d ago")):
            with self.subTest(delta=delta):
                self.assertEqual(nx._relative(now + delta, now), short)
                self.assertEqual(nx._relative(now + delta, now, spaced=True), spaced)
                self.assertEqual(nx._relative(nx._iso(now + delta), now), short)
        self.assertEqual(nx._relative(None, now), "-")
        self.assertEqual(nx._relative(None, now, never="never"), "never")


class AdminTokenTests(unittest.TestCase):
    """The daemon and the CLI read an admin token file by one rule."""

    def test_a_blank_token_file_is_refused_by_both(self):
        with tempfile.TemporaryDirectory(prefix="nexo-rule-") as root:
            blank = os.path.join(root, "token")
            with open(blank, "w") as f:
                f.write("  \n")
            cfg = nx.config_from_dict({"admin_token_file": blank})
            with self.assertRaises(nx.ConfigError) as ctx:
                nx._read_admin_token(cfg)
            self.assertIn("must hold one token", str(ctx.exception))
            calls = []
            with mock.patch.object(nx, "_admin_call", lambda *a, **k: calls.append(a)), \
                    mock.patch("sys.stderr", new_callable=io.StringIO) as err:
                code = nx.main(["--admin", "http://127.0.0.1:1", "--admin-token-file", blank,
                                "status"])
            self.assertEqual((code, calls), (nx.EXIT_USAGE, []))   # it sent no request
            self.assertIn("must hold one token", err.getvalue())



class OneKindRegistryTests(unittest.TestCase):
    """ "A kind has one owner" is decided in one place, PluginPollerRouter:
    the Runner's routes and config validation both ask it (issue 22)."""

    def test_duplicate_kinds_are_raised_only_by_the_router(self):
        tree = ast.parse(Path(nx.__file__).read_text())
        raisers = []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Raise) and "DuplicateKind(" in ast.unparse(sub):
                    raisers.append(node.name)
        self.assertTrue(raisers)
        self.assertEqual(set(raisers) - {"PluginPollerRouter", "register",
                                         "claim_in_process"}, set())

    def test_a_config_refuses_a_kind_claimed_twice(self):
        with tempfile.TemporaryDirectory() as root:
            a = write_manifest(root, "a", "rss", command="true")
            b = write_manifest(root, "b", "rss", command="true")
            c = write_manifest(root, "c", "mem", command="true")
            with self.assertRaises(nx.ConfigError) as ctx:
                nx.config_from_dict({"plugins": [a, b, c], "jobs": []}, base_dir=root,
                                    extra_kinds=["mem"])
        text = str(ctx.exception)
        self.assertIn("kind 'rss' is claimed by plugin 'a' and by plugin 'b'", text)
        self.assertIn("kind 'mem' is claimed by (in-process) and by plugin 'c'", text)

    def test_a_runner_refuses_a_second_in_process_poller_for_a_kind(self):
        class Mem:
            kind = "mem"

            def tick(self, ctx):
                return nx.TickAck()
        runner = nx.Runner(nx.config_from_dict({"jobs": []}))
        runner.register(Mem())
        with self.assertRaises(nx.PollerRouteRegistrationError.DuplicateKind):
            runner.register(Mem())
        self.assertEqual(runner.in_process_kinds(), ["mem"])


class PluginOutputTests(unittest.TestCase):
    """A dry run collects its plugin's output lines by what a log record
    carries, not by matching the log's format strings (issue 22)."""

    def record(self, msg, args, extra=None):
        rec = logging.LogRecord("nexo_poller", logging.INFO, __file__, 1, msg, args, None)
        for key, value in (extra or {}).items():
            setattr(rec, key, value)
        return rec

    def test_lines_are_known_by_their_record_whatever_the_format(self):
        out = nx._PluginOutput("p1")
        out.emit(self.record("any wording %s", ("x",), {nx._PLUGIN_LINE: ("p1", "hello")}))
        out.emit(self.record("plugin %s: %s", ("p1", "not output")))     # no mark: not a line
        out.emit(self.record("w", (), {nx._PLUGIN_LINE: ("p2", "someone else")}))
        self.assertEqual(out.lines, ["hello"])

if __name__ == "__main__":
    unittest.main()
