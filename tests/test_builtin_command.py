"""The built-in ``command`` kind (issue 24 item 4; section "Built-in kinds"):
any executable on a schedule, served with no plugin.  Scripts in sh and
Python are written to a temporary folder and run for real."""

import json
import os
import sys
import threading
import unittest
from unittest import mock
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import PY, TempDirCase, pid_gone, wait_until, write_config  # noqa: E402
from test_deliveries import Sink  # noqa: E402

import nexo_poller as nx  # noqa: E402
from nexo_poller import (CommandPoller, ConfigError, Delivery, ErrorClass,  # noqa: E402
                         PollContext, PollerError, Runner, load_config)

WAIT = 15.0
DELIVER = {"channel": "telegram", "to": "42"}


class CommandCase(TempDirCase):

    def script(self, name, text, python=False):
        """An executable script in the test's folder; its path."""
        path = os.path.join(self.dir, name)
        head = f"#!{PY}\n" if python else "#!/bin/sh\n"
        with open(path, "w") as f:
            f.write(head + text)
        os.chmod(path, 0o755)
        return path

    def tick(self, config, cursor=None, cancel=None):
        ctx = PollContext("job1", "default", "command", cursor, config,
                          datetime.now(timezone.utc), timedelta(seconds=60),
                          cancel or threading.Event())
        return CommandPoller().tick(ctx)

    def failing(self, config, cursor=None, cancel=None) -> PollerError:
        with self.assertRaises(PollerError) as caught:
            self.tick(config, cursor, cancel)
        return caught.exception


class OutputTest(CommandCase):

    def test_each_non_empty_line_is_a_delivery(self):
        sh = self.script("lines.sh", "echo one\necho\necho '  '\necho 'two {x}'\n")
        ack = self.tick({"argv": [sh], "deliver": DELIVER,
                         "message_template": "new: {line}"})
        self.assertEqual(ack.deliver, (Delivery("telegram", "42", {"text": "new: one"}),
                                       Delivery("telegram", "42", {"text": "new: two {x}"})))
        self.assertIsNone(ack.next_cursor, "no cursor line: the cursor stays")
        self.assertEqual((ack.metrics.items_seen, ack.metrics.items_dispatched), (2, 2))

    def test_the_last_line_cursor_is_the_next_cursor(self):
        sh = self.script("c.sh", "echo 'cursor: not last'\necho item\necho 'cursor: 41 2'\n")
        ack = self.tick({"argv": [sh], "deliver": DELIVER})
        self.assertEqual(ack.next_cursor, b"41 2")
        self.assertEqual([d.payload["text"] for d in ack.deliver], ["cursor: not last", "item"])

    def test_the_json_form(self):
        py = self.script("j.py", "import json\nprint(json.dumps({'cursor': {'seen': [1]}, "
                                 "'items': ['plain', {'title': 'T', 'n': 2}]}))\n", python=True)
        ack = self.tick({"argv": [py], "deliver": DELIVER,
                         "message_template": "{title}|{line}"})
        self.assertEqual(json.loads(ack.next_cursor), {"seen": [1]})
        self.assertEqual([d.payload["text"] for d in ack.deliver],
                         ["{title}|plain", 'T|{"title":"T","n":2}'])
        py = self.script("s.py", "print('{\"cursor\": \"abc\"}')\n", python=True)
        ack = self.tick({"argv": [py], "deliver": DELIVER})
        self.assertEqual((ack.next_cursor, ack.deliver), (b"abc", ()))

    def test_the_cursor_goes_in_as_NEXO_CURSOR(self):
        sh = self.script("in.sh", 'echo "got:$NEXO_CURSOR"\n')
        ack = self.tick({"argv": [sh], "deliver": DELIVER}, cursor=b"7 days")
        self.assertEqual(ack.deliver[0].payload, {"text": "got:7 days"})
        ack = self.tick({"argv": [sh], "deliver": DELIVER})
        self.assertEqual(ack.deliver[0].payload, {"text": "got:"}, "empty at first")

    def test_env_cwd_and_argv_without_a_shell(self):
        os.mkdir(os.path.join(self.dir, "work"))
        sh = self.script("e.sh", 'echo "$FOO"\npwd\necho "$1"\n')
        ack = self.tick({"argv": [sh, "a b; echo no"], "env": {"FOO": "bar baz"},
                         "cwd": os.path.join(self.dir, "work"), "deliver": DELIVER})
        self.assertEqual([d.payload["text"] for d in ack.deliver],
                         ["bar baz", os.path.join(self.dir, "work"), "a b; echo no"])

    def test_without_deliver_lines_are_counted_not_delivered(self):
        sh = self.script("n.sh", "echo a\necho b\n")
        ack = self.tick({"argv": [sh]})
        self.assertEqual((ack.deliver, ack.metrics.items_seen), ((), 2))

    def test_output_over_the_limit_fails_the_tick(self):
        py = self.script("big.py", "import sys\nsys.stdout.write('x' * 5000)\n", python=True)
        exc = self.failing({"argv": [py], "max_output_bytes": 1000})
        self.assertIn("more than 1000 bytes", str(exc))


class ExitTest(CommandCase):

    def test_exit_codes_classify_and_stderr_is_in_the_error(self):
        sh = self.script("x.sh", 'echo "cursor: 9"\necho "disk full" >&2\nexit "$CODE"\n')
        self.assertEqual(self.tick({"argv": [sh], "env": {"CODE": "0"}}).next_cursor, b"9")
        exc = self.failing({"argv": [sh], "env": {"CODE": "75"}})
        self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
        self.assertIn("exit status 75", str(exc))
        self.assertIn("stderr: disk full", str(exc))
        exc = self.failing({"argv": [sh], "env": {"CODE": "3"}})
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
        self.assertIn("exit status 3", str(exc))
        self.assertIn("stderr: disk full", str(exc))

    def test_timeout_kills_the_whole_group(self):
        pids = os.path.join(self.dir, "pids")
        sh = self.script("slow.sh", f'sleep 300 &\necho "$$ $!" > {pids}\nsleep 300\n')
        fds = set(os.listdir("/proc/self/fd"))
        exc = self.failing({"argv": [sh], "timeout_secs": 0.5})
        self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
        self.assertIn("timed out after 0.5s", str(exc))
        with open(pids) as f:
            for pid in map(int, f.read().split()):
                self.assertTrue(wait_until(lambda: pid_gone(pid), WAIT), f"pid {pid} left")
        self.assertLessEqual(set(os.listdir("/proc/self/fd")), fds, "no descriptor left")

    def test_a_trickle_cannot_hold_a_tick_past_its_timeout(self):
        py = self.script("drip.py", "import sys, time\nwhile True:\n"
                                    "    sys.stdout.write('x'); sys.stdout.flush()\n"
                                    "    time.sleep(0.05)\n", python=True)
        exc = self.failing({"argv": [py], "timeout_secs": 0.5})
        self.assertIn("timed out after 0.5s", str(exc))

    def test_cancel_kills_the_whole_group(self):
        pids = os.path.join(self.dir, "pids")
        sh = self.script("slow.sh", f'sleep 300 &\necho "$$ $!" > {pids}.tmp\n'
                                    f'mv {pids}.tmp {pids}\nsleep 300\n')
        cancel = threading.Event()
        threading.Thread(target=lambda: wait_until(lambda: os.path.exists(pids), WAIT)
                         and cancel.set(), daemon=True).start()
        exc = self.failing({"argv": [sh], "timeout_secs": 60}, cancel=cancel)
        self.assertIn("cancelled", str(exc))
        with open(pids) as f:
            for pid in map(int, f.read().split()):
                self.assertTrue(wait_until(lambda: pid_gone(pid), WAIT), f"pid {pid} left")

    def test_without_pidfd_the_exit_is_polled(self):
        sh = self.script("p.sh", "echo a\nexit 75\n")
        with mock.patch.object(nx, "_pidfd", return_value=None):
            self.assertEqual(self.tick({"argv": ["/bin/echo", "b"]}).metrics.items_seen, 1)
            self.assertIn("exit status 75", str(self.failing({"argv": [sh]})))

    def test_a_leader_gone_ends_the_tick_though_a_child_holds_stdout(self):
        sh = self.script("bg.sh", "sleep 300 &\necho done\n")
        ack = self.tick({"argv": [sh], "deliver": DELIVER, "timeout_secs": 30})
        self.assertEqual(ack.deliver[0].payload, {"text": "done"})


class ConfigTest(CommandCase):

    def test_a_bad_job_config_names_the_key(self):
        for config, key in (({"argv": "ls"}, "config.argv"), ({}, "config.argv"),
                            ({"argv": ["ls", 1]}, "config.argv"),
                            ({"argv": ["ls"], "env": {"A": 1}}, "config.env"),
                            ({"argv": ["ls"], "timeout_secs": 0}, "config.timeout_secs"),
                            ({"argv": ["ls"], "shell": True}, "config.shell"),
                            ({"argv": ["ls"], "deliver": {"channel": "a.b", "to": "1"}},
                             "config.deliver.channel")):
            with self.subTest(config=config):
                exc = self.failing(config)
                self.assertEqual(exc.classify(), ErrorClass.CONFIG)
                self.assertIn(key, str(exc))

    def test_a_missing_executable_or_folder_is_a_config_error(self):
        exc = self.failing({"argv": [os.path.join(self.dir, "nope")]})
        self.assertEqual(exc.classify(), ErrorClass.CONFIG)
        self.assertIn("config.argv[0]: cannot start", str(exc))
        exc = self.failing({"argv": ["/bin/true"], "cwd": os.path.join(self.dir, "gone")})
        self.assertEqual(exc.classify(), ErrorClass.CONFIG)
        self.assertIn("config.cwd: cannot start", str(exc))


class DaemonTest(CommandCase):

    def pollers_json(self, plugins=()):
        counter = self.script("count.py", (
            "import os\n"
            "n = int(os.environ['NEXO_CURSOR'] or 0)\n"
            "print(f'item {n}')\nprint(f'cursor: {n + 1}')\n"), python=True)
        return write_config(os.path.join(self.dir, "pollers.json"), {
            "state_db": self.db, "default_jitter_ms": 0, "shutdown_grace_secs": 3,
            "plugins": list(plugins),
            "jobs": [{"id": "count", "kind": "command", "schedule": {"every_secs": 3600},
                      "config": {"argv": [PY, counter], "deliver": DELIVER,
                                 "message_template": "#{line}"}}]})

    def test_a_config_without_plugins_validates_and_a_daemon_ticks_it(self):
        path = self.pollers_json()
        cfg = load_config(path)
        self.assertEqual(cfg.plugins, [])
        sink = Sink()
        r = Runner(cfg, deliver=sink)
        self.addCleanup(r.stop)
        r.start(background=False)
        self.assertEqual(r.fire_due(), 1)
        self.assertTrue(r.wait_idle(WAIT))
        self.assertEqual(r.run_once("count").status, nx.TickStatus.OK)
        self.assertTrue(sink.wait_for(2))
        self.assertEqual([(t, e["payload"]) for t, e in sink.got],
                         [("plugin.outbound.telegram", {"text": "#item 0", "to": "42"}),
                          ("plugin.outbound.telegram", {"text": "#item 1", "to": "42"})])
        r.stop()
        sink2 = Sink()                          # a restart carries on from the stored cursor
        r2 = Runner(load_config(path), deliver=sink2)
        self.addCleanup(r2.stop)
        r2.start(background=False)
        self.assertEqual(r2.run_once("count").status, nx.TickStatus.OK)
        self.assertTrue(sink2.wait_for(1))
        self.assertEqual(sink2.got[0][1]["payload"], {"text": "#item 2", "to": "42"})
        self.assertEqual(r2.state.load(["count"])["count"].cursor, b"3")

    def test_a_plugin_serving_command_wins(self):
        from support import write_plugin_manifest
        manifest = write_plugin_manifest(self.dir, "mycmd", ["command"], command=PY)
        cfg = load_config(self.pollers_json([manifest]))
        r = Runner(cfg)
        self.addCleanup(r.stop)
        r.open()
        self.assertEqual(r.route_for("command").plugin_id, "mycmd")
        self.assertEqual(r.router.owner("command"), "mycmd")
        r.reload(load_config(self.pollers_json()))      # the plugin dropped: built in again
        self.assertEqual(r.router.owner("command"), nx.PluginPollerRouter.BUILT_IN)
        self.assertIsInstance(r.route_for("command").poller, CommandPoller)
        r.reload(load_config(self.pollers_json([manifest])))
        self.assertEqual(r.route_for("command").plugin_id, "mycmd")

    def test_validate_says_when_a_plugin_replaces_a_built_in_kind(self):
        from support import main_in_process, write_plugin_manifest
        code, out, _ = main_in_process(["--config", self.pollers_json(), "validate"])
        self.assertEqual(code, 0)
        self.assertNotIn("built-in", out)
        manifest = write_plugin_manifest(self.dir, "mycmd", ["command"], command=PY)
        code, out, err = main_in_process(["--config", self.pollers_json([manifest]),
                                          "validate"])
        self.assertEqual(code, 0, err)
        self.assertIn("kind 'command' is served by plugin 'mycmd', not the built-in", out)

    def test_a_dry_run_ticks_the_built_in_and_stores_nothing(self):
        r = Runner(load_config(self.pollers_json()))
        self.addCleanup(r.stop)
        outcome = r.dry_run("count", b"5")
        self.assertEqual(outcome.status, nx.TickStatus.OK)
        self.assertEqual([d.payload for d in outcome.ack.deliver], [{"text": "#item 5"}])
        self.assertEqual(outcome.ack.next_cursor, b"6")
        stored = r.state.load(["count"]).get("count")
        self.assertTrue(stored is None or stored.cursor is None, stored)

    def test_validate_checks_a_built_in_job_config_unless_a_plugin_serves_the_kind(self):
        from support import write_plugin_manifest
        doc = {"state_db": self.db,
               "jobs": [{"id": "a", "kind": "command", "schedule": {"every_secs": 60},
                         "config": {"argv": "ls -l", "shel": True}}]}
        path = write_config(os.path.join(self.dir, "p.json"), doc)
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual([p for p, _ in caught.exception.problems], ["jobs[0].config"])
        self.assertIn("config.shel: unknown key", str(caught.exception))
        doc["jobs"][0]["config"] = {"argv": "ls -l"}
        with self.assertRaises(ConfigError) as caught:
            load_config(write_config(path, doc))
        self.assertIn("config.argv must be a non-empty array", str(caught.exception))
        doc["plugins"] = [write_plugin_manifest(self.dir, "mycmd", ["command"], command=PY)]
        self.assertEqual(load_config(write_config(path, doc)).jobs[0].config, {"argv": "ls -l"})

    def test_an_unknown_kind_still_lists_the_built_in_ones(self):
        path = write_config(os.path.join(self.dir, "p.json"), {
            "state_db": self.db,
            "jobs": [{"id": "a", "kind": "google_calendar", "schedule": {"every_secs": 60}}]})
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn("known kinds: command", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
