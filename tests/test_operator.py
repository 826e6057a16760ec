"""Operator experience (issue 15): why a tick failed, entrypoint mistakes,
dry-run ticks, cursor inspection and editing, a CLI that can be trusted,
Python plugins anywhere.  Every verb runs as a subprocess, as an operator
would run it, except where a test repeats one verb many times: all but the
last of those run ``main`` in this process (the same code; a process each
only costs time).  Plugins are small scripts written into a temporary folder."""

import json
import logging
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from nats_support import NatsServer, require_nats  # noqa: E402
from support import (NEXO, PY, FakePoller, TempDirCase, b64, count_ticks,  # noqa: E402
                     main_in_process, wait_until, write_manifest)

import nexo_poller as nx  # noqa: E402

TIMEOUT = 60


def nexo(*args, config=None, timeout=TIMEOUT, env=None, input=None):
    cmd = [PY, NEXO] + (["--config", config] if config else []) + list(args)
    return subprocess.run(cmd, input=input, stdin=None if input is not None else
                          subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, env=env)


class OperatorCase(TempDirCase):
    tmp_prefix, quiet = "nexo-op-", False

    def setUp(self):
        super().setUp()
        self.root = self.dir
        self.config = os.path.join(self.root, "pollers.json")

    def script(self, name: str, body: str, *, shebang: bool = True, mode: int = 0o755) -> str:
        """A plugin script in the project folder (outside the repository)."""
        path = os.path.join(self.root, name)
        with open(path, "w", encoding="utf-8") as f:
            if shebang:
                f.write(f"#!{PY}\n")
            f.write(textwrap.dedent(body))
        os.chmod(path, mode)
        return path

    def manifest(self, name: str, kind: str, *, command: str, args=(), lifecycle="ephemeral",
                 extra: str = "") -> str:
        return write_manifest(self.root, name, kind, command=command, args=args,
                              lifecycle=lifecycle, entrypoint_extra=extra)

    def write(self, plugins, jobs, **top):
        doc = {"state_db": "state/poller.db", "default_jitter_ms": 0, "plugins": plugins,
               "jobs": jobs}
        doc.update(top)
        with open(self.config, "w", encoding="utf-8") as f:
            json.dump(doc, f)

    def run_cli(self, *args, traceback_ok=False, **kw):
        r = nexo(*args, config=self.config, **kw)
        if not traceback_ok:        # only a plugin's own traceback may show
            self.assertNotIn("Traceback", r.stderr + r.stdout)
        return r

    def status(self) -> dict:
        r = self.run_cli("status", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        return {row["id"]: row for row in json.loads(r.stdout)}


def job(job_id, kind, **more):
    return {"id": job_id, "kind": kind, "schedule": {"every_secs": 60}, **more}


GOOD_PLUGIN = """\
import nexo_poller as nx

def tick(ctx):
    n = 0 if ctx.cursor is None else int(ctx.cursor)
    import sys
    print("ticking from", n, file=sys.stderr)
    return nx.TickAck(next_cursor=str(n + 1).encode(), metrics=nx.TickMetrics(items_seen=2))

nx.run_plugin({"counter": tick})
"""


class TestWhyATickFailed(OperatorCase):
    def test_ephemeral_failure_carries_the_last_stderr_lines(self):
        plugin = self.script("crash.py", """\
            import sys
            for i in range(100):
                print(f"noise line {i}", file=sys.stderr)
            raise ValueError("the real reason: token expired")
            """)
        self.write([self.manifest("crash", "crashy", command=plugin)], [job("c", "crashy")])
        r = self.run_cli("tick", "c", traceback_ok=True)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertNotIn('File "' + NEXO, r.stderr, "the plugin's traceback, not ours")
        out = json.loads(r.stdout)
        self.assertEqual(out["outcome"], "transient")
        self.assertIn("closed stdout before replying", out["error"])
        self.assertIn("ValueError: the real reason: token expired", out["error"])
        self.assertNotIn("noise line 0 ", out["error"] + " ")      # bounded: the tail only
        self.assertLess(len(out["error"]), 3000)
        self.assertIn("the real reason", r.stderr, "the log line carries it too")
        self.assertIn("the real reason: token expired",
                      nexo("status", "--json", config=self.config).stdout)
        table = nexo("status", config=self.config).stdout
        self.assertIn("ERROR", table)
        self.assertIn("token expired", table, "the error column shows the end of the error")


class TestEntrypointMistakes(OperatorCase):
    def test_validate_names_every_entrypoint_mistake_and_its_fix(self):
        no_x = self.script("nox.py", "pass\n", mode=0o644)
        no_bang = self.script("nobang.py", "print('hi')\n", shebang=False)
        plugins = [self.manifest("missing", "k_missing", command="./nope.py"),
                   self.manifest("bare", "k_bare", command="surely-not-a-command-xyz"),
                   self.manifest("nox", "k_nox", command=no_x),
                   self.manifest("nobang", "k_nobang", command=no_bang),
                   self.manifest("fine", "k_fine", command="$NEXO_PYTHON", args=["x.py"])]
        self.write(plugins, [job("j", "k_fine")])
        r = self.run_cli("validate")
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        for needle in ("plugins[0]", "does not exist", "plugins[1]", "not found on PATH",
                       "plugins[2]", "chmod +x", "plugins[3]", "'#!' interpreter line"):
            self.assertIn(needle, r.stderr)
        self.assertNotIn("plugins[4]", r.stderr)

    def test_unknown_entrypoint_key_and_every_manifest_problem_at_once(self):
        path = self.manifest("typo", "k_typo", command="$NEXO_PYTHON",
                             extra='arg = ["x"]\n')
        self.write([path], [])
        r = self.run_cli("validate")
        self.assertEqual(r.returncode, 2)
        self.assertIn("unknown key 'arg'", r.stderr)
        self.assertIn("plugin.entrypoint", r.stderr)
        with open(os.path.join(self.root, path, "nexo-plugin.toml"), "w") as f:
            f.write('[plugin]\nid = 5\n[plugin.poller]\nkinds = ["k_two"]\n'
                    'broker_topic_prefix = "p.two"\ntick_timeout_secs = "60"\n')
        r = self.run_cli("validate")
        self.assertEqual(r.returncode, 2)
        self.assertIn("[plugin.id] must be a string", r.stderr)
        self.assertIn("[plugin.poller.tick_timeout_secs] must be an integer", r.stderr)

    def test_duplicate_job_id_is_reported_beside_a_bad_cron(self):
        self.write([self.manifest("ok", "k_ok", command="$NEXO_PYTHON")],
                   [job("a", "k_ok"), {"id": "a", "kind": "k_ok", "schedule": {"cron": "x"}}])
        r = self.run_cli("validate")
        self.assertEqual(r.returncode, 2)
        self.assertIn("duplicate job id 'a'", r.stderr)
        self.assertIn("jobs[1].schedule.cron", r.stderr)

    def test_a_command_that_cannot_start_is_a_config_error_that_pauses(self):
        no_x = self.script("nox.py", GOOD_PLUGIN, mode=0o644)
        self.write([self.manifest("nox", "k_nox", command=no_x)], [job("j", "k_nox")])
        r = self.run_cli("tick", "j")
        self.assertEqual(r.returncode, 1)
        out = json.loads(r.stdout)
        self.assertEqual(out["outcome"], "config", out)
        self.assertIn("Permission denied", out["error"])
        self.assertTrue(self.status()["j"]["paused"])


class TestPythonPlugins(OperatorCase):
    def test_nexo_python_and_import_from_anywhere(self):
        plugin = self.script("anywhere.py", GOOD_PLUGIN, shebang=False, mode=0o644)
        self.write([self.manifest("py", "counter", command="$NEXO_PYTHON", args=[plugin])],
                   [job("j", "counter")])
        self.assertEqual(self.run_cli("validate").returncode, 0)
        r = self.run_cli("tick", "j")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(json.loads(r.stdout)["next_cursor"], b64(b"1"))


class TestDryRun(OperatorCase):
    def test_dry_run_stores_nothing_and_prints_everything(self):
        plugin = self.script("good.py", GOOD_PLUGIN)
        self.write([self.manifest("py", "counter", command=plugin)], [job("j", "counter")])
        r = self.run_cli("tick", "j", "--dry-run", "--cursor-text", "41")
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual(out["outcome"], "ok")
        self.assertEqual(out["request"]["cursor"], b64(b"41"))
        self.assertEqual(out["next_cursor"]["text"], "42")
        self.assertEqual(out["metrics"]["items_seen"], 2)
        self.assertIn("ticking from 41", out["stderr"])
        self.assertIn("duration_ms", out)
        self.assertFalse(os.path.exists(os.path.join(self.root, "state")),
                         "a dry run creates no state")
        self.run_cli("tick", "j")                     # a real tick stores "1"
        r = self.run_cli("tick", "j", "--dry-run")    # from the stored cursor
        self.assertEqual(json.loads(r.stdout)["next_cursor"]["text"], "2")
        self.assertEqual(self.status()["j"]["cursor"], b64(b"1"), "the dry run stored nothing")

    def test_dry_run_exit_codes_say_the_outcome_class(self):
        fail = self.script("fail.py", """\
            import nexo_poller as nx
            def tick(ctx):
                what = ctx.config["fail"]
                raise getattr(nx.PollerError, what)(*(["j", "bad"] if what == "Config" else ["x"]))
            nx.run_plugin({"failing": tick})
            """)
        self.write([self.manifest("f", "failing", command=fail)],
                   [job("t", "failing", config={"fail": "Transient"}),
                    job("p", "failing", config={"fail": "Permanent"}),
                    job("c", "failing", config={"fail": "Config"})])
        import nexo_poller
        for job_id, code in (("t", 1), ("p", nexo_poller.EXIT_TICK_PERMANENT),
                             ("c", nexo_poller.EXIT_TICK_CONFIG)):
            r = self.run_cli("tick", job_id, "--dry-run")
            self.assertEqual(r.returncode, code, r.stdout + r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.root, "state")))

    def test_readme_gives_the_dry_run_exit_codes_the_cli_uses(self):
        import nexo_poller
        from support import ROOT
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        self.assertIn(f"1 transient (or another failure), {nexo_poller.EXIT_TICK_PERMANENT} "
                      f"permanent, {nexo_poller.EXIT_TICK_CONFIG} config", readme)

    def test_dry_run_of_a_long_lived_plugin_without_a_daemon(self):
        import socket
        plugin = self.script("good.py", GOOD_PLUGIN)
        os.mkdir(os.path.join(self.root, "run"))
        daemons = socket.socket(socket.AF_UNIX)      # a daemon's broker listens there
        self.addCleanup(daemons.close)
        daemons.bind(os.path.join(self.root, "run", "broker.sock"))
        daemons.listen()
        self.write([self.manifest("ll", "counter", command=plugin, lifecycle="long_lived")],
                   [job("j", "counter")], broker="unix://run/broker.sock")
        r = self.run_cli("tick", "j", "--dry-run", "--cursor", b64(b"7"))
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual(out["next_cursor"]["text"], "8")
        self.assertIn("ticking from 7", out["stderr"])


class TestCursor(OperatorCase):
    def setUp(self):
        super().setUp()
        plugin = self.script("good.py", GOOD_PLUGIN)
        self.write([self.manifest("py", "counter", command=plugin)], [job("j", "counter")])

    def test_show_history_set_and_rollback(self):
        r = self.run_cli("cursor", "j")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("(none)", r.stdout)
        for _ in range(3):
            self.assertEqual(self.run_cli("tick", "j").returncode, 0)
        shown = json.loads(self.run_cli("cursor", "j", "--json").stdout)
        self.assertEqual((shown["cursor"], shown["text"]), (b64(b"3"), "3"))
        hist = json.loads(self.run_cli("cursor", "j", "--history", "--json").stdout)
        self.assertEqual([h["text"] for h in hist], ["3", "2", "1"])
        self.assertTrue(all(h["at"] and h["source"] == "tick" for h in hist))
        r = self.run_cli("cursor", "j", "--set-text", "100")        # no tty, no --yes
        self.assertEqual(r.returncode, 2)
        self.assertIn("--yes", r.stderr)
        self.assertEqual(self.status()["j"]["cursor"], b64(b"3"))
        self.assertEqual(self.run_cli("cursor", "j", "--set", b64(b"\xff\x00"),
                                      "--yes").returncode, 0)
        self.assertEqual(self.status()["j"]["cursor"], b64(b"\xff\x00"))
        self.assertEqual(self.run_cli("cursor", "j", "--rollback", "2", "--yes").returncode, 0)
        self.assertEqual(self.status()["j"]["cursor"], b64(b"2"))
        hist = json.loads(self.run_cli("cursor", "j", "--history", "--json").stdout)
        self.assertEqual([h["source"] for h in hist][:3], ["rollback 2", "set", "tick"])
        self.assertIsNone(hist[1]["text"], "binary cursors show as base64 only")
        r = self.run_cli("cursor", "j", "--rollback", "99", "--yes")
        self.assertEqual(r.returncode, 2)

    def test_history_is_bounded(self):
        # 24 sets run the CLI's main in this process (a process each only
        # costs time); the last one and the listing run as an operator would.
        for i in range(24):
            code, out, err = main_in_process(["--config", self.config, "cursor", "j",
                                              "--set-text", str(i), "--yes"])
            self.assertEqual(code, 0, err)
        self.assertEqual(self.run_cli("cursor", "j", "--set-text", "24", "--yes").returncode, 0)
        hist = json.loads(self.run_cli("cursor", "j", "--history", "--json").stdout)
        self.assertEqual(len(hist), 20)
        self.assertEqual(hist[0]["text"], "24")

    def test_set_through_a_running_daemon(self):
        daemon = subprocess.Popen([PY, NEXO, "--config", self.config, "run"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        self.addCleanup(daemon.wait, 30)
        self.addCleanup(daemon.stderr.close)
        self.addCleanup(daemon.terminate)
        for line in daemon.stderr:                  # wait for the daemon's start line
            if "nexo-poller started" in line:
                break
        r = self.run_cli("cursor", "j", "--set-text", "500", "--yes")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("applied by daemon", r.stdout)
        hist = json.loads(self.run_cli("cursor", "j", "--history", "--json").stdout)
        self.assertEqual((hist[0]["text"], hist[0]["source"]), ("500", "set"))


class TestTrustingTheCli(OperatorCase):
    def setUp(self):
        super().setUp()
        plugin = self.script("good.py", GOOD_PLUGIN)
        self.write([self.manifest("py", "counter", command=plugin)],
                   [job("j", "counter"), {"id": "h", "kind": "counter",
                                          "schedule": {"cron": "@hourly"}}])

    def test_status_relative_times_and_next(self):
        self.assertEqual(self.run_cli("tick", "j").returncode, 0)
        table = self.run_cli("status").stdout
        self.assertRegex(table, r"\bin 59s\b|\bin 1m\b|\bin 58s\b")
        self.assertRegex(table, r"\b\d+s ago\b|\bnow\b")
        self.assertIn("ERROR", table.splitlines()[1])
        rows = json.loads(self.run_cli("status", "--json").stdout)
        self.assertRegex(rows[0]["last_run_at"], r"^\d{4}-\d\d-\d\dT")
        r = self.run_cli("status", "h", "--next", "3", "--json")
        times = json.loads(r.stdout)
        self.assertEqual(len(times), 3)
        self.assertTrue(all(t.endswith(":00:00+00:00") for t in times), times)

    def test_config_after_the_verb_any_case_level_version_help(self):
        r = nexo("status", "--config", self.config, "--log-level", "DEBUG")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = nexo("--version")
        self.assertIn("nexo-poller", r.stdout)
        for verb in ("run", "validate", "status", "tick", "pause", "resume", "reset",
                     "cursor", "outbox", "migrate-state"):     # migrate-state had none
            r = nexo(verb, "--help")
            self.assertEqual(r.returncode, 0, verb)
            self.assertRegex(r.stdout, r"\n\S.*\w+ .*\w+", verb)  # a description line
            self.assertNotIn("usage", r.stdout.split("\n\n")[1], verb)

    def test_vixie_cron_aliases(self):
        aliases = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually",
                   "@midnight")
        for alias in aliases:
            with open(self.config) as f:
                doc = json.load(f)
            doc["jobs"][1]["schedule"]["cron"] = alias
            with open(self.config, "w") as f:
                json.dump(doc, f)
            if alias == aliases[-1]:
                r = self.run_cli("validate")
                code, err = r.returncode, r.stderr
            else:
                code, _, err = main_in_process(["--config", self.config, "validate"])
            self.assertEqual(code, 0, alias + err)

    def test_busy_metrics_addr_before_any_plugin_starts(self):
        import socket
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        marker = os.path.join(self.root, "started")
        plugin = self.script("ll.py", f"open({marker!r}, 'w').close()\n" + GOOD_PLUGIN)
        self.write([self.manifest("ll", "counter", command=plugin, lifecycle="long_lived")],
                   [job("j", "counter")], metrics_addr=f"127.0.0.1:{sock.getsockname()[1]}")
        r = self.run_cli("run")
        self.assertEqual(r.returncode, 2)
        self.assertIn("metrics_addr", r.stderr)
        self.assertIn("in use", r.stderr)
        self.assertNotIn("invalid configuration", r.stderr)
        self.assertNotIn("stopped", r.stderr)
        self.assertFalse(os.path.exists(marker), "no plugin started")


class TestDeployment(OperatorCase):
    def test_sd_notify_ready_and_stopping(self):
        import signal
        import socket
        path = os.path.join(self.root, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(path)
        sock.settimeout(30)
        plugin = self.script("good.py", GOOD_PLUGIN)
        self.write([self.manifest("py", "counter", command=plugin)], [job("j", "counter")])
        daemon = subprocess.Popen([PY, NEXO, "--config", self.config, "run"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL,
                                  env=dict(os.environ, NOTIFY_SOCKET=path))
        self.addCleanup(daemon.wait, 30)
        self.addCleanup(daemon.kill)
        ready = sock.recv(4096).decode()
        self.assertIn("READY=1", ready.splitlines())
        self.assertIn(f"MAINPID={daemon.pid}", ready.splitlines())
        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(sock.recv(4096).decode(), "STOPPING=1")
        self.assertEqual(daemon.wait(30), 0)

    def test_examples_name_what_they_do(self):
        root = os.path.dirname(NEXO)
        with open(os.path.join(root, "examples", "pollers.json")) as f:
            jobs = json.load(f)["jobs"]
        self.assertNotIn("every_minute", [j["id"] for j in jobs], "it runs every 10 s")
        with open(os.path.join(root, "examples", "nexo-poller.service")) as f:
            self.assertIn("Type=notify", f.read())
        self.assertTrue(os.path.exists(os.path.join(root, "examples", "Containerfile")))


# ============================================================================
# Issue 26: operator commands lost or misapplied (both backends)
# ============================================================================

class _OnBothBackends:
    """A test class's tests against a sqlite file (``backend = "sqlite"``) or a
    JetStream bucket on a real nats-server (``backend = "jetstream"``)."""
    backend = "sqlite"

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory(prefix="nexo-cmd-")
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name
        logger = logging.getLogger("nexo_poller")
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.CRITICAL)
        self.url = None
        if self.backend == "jetstream":
            require_nats()
            server = NatsServer().start()
            self.addCleanup(server.cleanup)
            self.url = server.url

    def top(self) -> dict:
        """The config keys that choose the backend."""
        if self.backend == "sqlite":
            return {"state_db": os.path.join(self.root, "state.db")}
        return {"state_db": "jetstream://jobs", "broker": self.url}

    def store(self) -> "nx.StateStore":
        """Another process's view of the state (as the CLI opens it)."""
        if self.backend == "sqlite":
            s = nx.SqliteStateStore(os.path.join(self.root, "state.db"))
        else:
            s = nx.JetStreamStateStore("jobs", self.url)
        self.addCleanup(s.close)
        return s

    @staticmethod
    def written(store) -> None:
        """Wait until what ``store`` queued for its writer is stored (sqlite
        marks a command done in the background; JetStream at once)."""
        if isinstance(store, nx.SqliteStateStore):
            store.run(lambda db: None)


class Gate(FakePoller):
    """An in-process poller (kind ``gate``): the cursor counts ticks; ``seen``
    holds the cursors each job's ticks were given.  ``block()`` makes the next
    ticks wait for ``release()``; ``entered`` is set when a tick starts waiting."""

    def __init__(self):
        super().__init__("gate", default=self._through)
        self.entered, self.go = threading.Event(), threading.Event()
        self.go.set()

    @property
    def seen(self) -> dict[str, list]:
        with self.lock:
            calls = list(self.calls)
        seen: dict[str, list] = {}
        for ctx in calls:
            seen.setdefault(ctx.job_id, []).append(ctx.cursor)
        return seen

    def block(self):
        self.entered.clear()
        self.go.clear()

    def release(self):
        self.go.set()

    def _through(self, ctx):
        if not self.go.is_set():
            self.entered.set()
            self.go.wait(30)
        return count_ticks(ctx)


class CommandRaces(_OnBothBackends, unittest.TestCase):
    """Items 4 and 5: a command and a tick of one job are serialised, and a
    command is carried out once however often the daemon is woken for it."""

    def runner(self, jobs, clock=None) -> "nx.Runner":
        cfg = nx.config_from_dict({**self.top(), "default_jitter_ms": 0,
                                   "shutdown_grace_secs": 3, "jobs": jobs},
                                  base_dir=self.root, extra_kinds=["gate"])
        r = nx.Runner(cfg, **({} if clock is None else {"clock": clock}))
        self.gate = Gate()
        r.register(self.gate)
        self.addCleanup(r.stop)
        return r

    @staticmethod
    def hold_command_commit(runner):
        """Make an operator command's commit (one with a ``source``) stop
        right after it is stored, before the runner takes it in: (stored,
        go) events.  The test does what it races with, then sets ``go``."""
        real = runner.state.commit_now
        stored, go = threading.Event(), threading.Event()

        def commit_now(state, **kw):
            ok = real(state, **kw)
            if kw.get("source") is not None and not go.is_set():
                stored.set()
                go.wait(30)
            return ok
        runner.state.commit_now = commit_now
        return stored, go

    def race(self, runner, command, during):
        """Run ``command()`` in a thread; while its commit is held, ``during()``."""
        stored, go = self.hold_command_commit(runner)
        t = threading.Thread(target=command)
        t.start()
        try:
            self.assertTrue(stored.wait(10), "the command was not committed")
            during()
        finally:
            go.set()
            t.join(30)
        self.assertFalse(t.is_alive())

    def test_a_tick_that_starts_during_a_command_does_not_undo_it(self):
        # Admin API / Runner.pause|resume|reset|set_cursor answered, then a tick
        # that started while the command was being committed stored its own
        # state over it.  Each verb races an operator tick (run_once).
        r = self.runner([{"id": j, "kind": "gate", "schedule": {"every_secs": 3600},
                          "paused_on_boot": j == "u"} for j in ("p", "c", "u")])
        r.start(background=False)
        for j in ("p", "c"):
            self.assertEqual(r.run_once(j).status, "ok")        # cursor b"1"
        during = {}
        self.race(r, lambda: r.pause("p"), lambda: during.update(p=r.run_once("p")))
        self.race(r, lambda: r.set_cursor("c", b"100"),
                  lambda: during.update(c=r.run_once("c")))
        self.race(r, lambda: r.resume("u"), lambda: during.update(u=r.run_once("u")))
        stored = self.store().load()
        problems = []
        if not stored["p"].paused:
            problems.append(f"pause undone by a tick ({during['p'].status})")
        if stored["c"].cursor != b"100":
            problems.append(f"set_cursor undone by a tick ({during['c'].status}): "
                            f"cursor {stored['c'].cursor!r}")
        if stored["u"].paused:
            problems.append(f"resume undone by a tick ({during['u'].status})")
        self.assertEqual(problems, [])
        self.assertEqual({j: r.status()[i]["paused"] for i, j in enumerate("pcu")},
                         {"p": True, "c": False, "u": False})

    def test_a_slot_that_comes_during_a_command_runs_after_it(self):
        # The scheduler's own tick: its slot comes while reset is being
        # committed; it runs after the reset (from no cursor), and the job
        # stays on its schedule.
        shift = [0.0]
        r = self.runner([{"id": "r", "kind": "gate", "schedule": {"every_secs": 60}}],
                        clock=lambda: time.time() + shift[0])
        r.start(background=False)
        self.assertEqual(r.fire_due(), 1)                       # the first slot: now
        self.assertTrue(r.wait_idle(10))
        self.assertEqual(self.store().load()["r"].cursor, b"1")

        def slot_comes():
            shift[0] += 61
            if r.fire_due():                            # a tick started: let it commit
                self.assertTrue(r.wait_idle(10))
        self.race(r, lambda: r.reset("r"), slot_comes)
        r.fire_due()
        self.assertTrue(r.wait_idle(10))
        self.assertEqual(self.gate.seen["r"], [None, None],
                         "the slot that came during the reset ran once, after it")
        self.assertEqual(self.store().load()["r"].cursor, b"1")
        self.assertIsNotNone(r.status()[0]["next_run_at"], "the job left its schedule")

    def test_a_tick_command_seen_twice_runs_once_and_answers_its_outcome(self):
        # Two wake-ups for one queued `tick` (SIGUSR1 and the KV watch): the
        # second look must not mark the command, whose tick is running, busy.
        r = self.runner([{"id": "t", "kind": "gate", "schedule": {"every_secs": 3600}}])
        r.start()
        self.assertTrue(wait_until(lambda: self.gate.seen.get("t"), 10))
        self.assertTrue(r.wait_idle(10))
        self.gate.block()
        cli = self.store()
        owner, seq = cli.command("t", "tick")
        self.assertEqual(owner, r.state.owner)
        r.poke()                                    # the first wake-up
        self.assertTrue(self.gate.entered.wait(10), "the queued tick did not start")
        r.apply_commands()                          # the second look, the tick running
        self.written(r.state)
        try:
            self.assertEqual(cli.command_result(seq), (False, None),
                             "a second look answered the command before its tick ended")
        finally:
            self.gate.release()
        self.assertTrue(wait_until(lambda: cli.command_result(seq)[0], 10))
        self.assertEqual(json.loads(cli.command_result(seq)[1])["outcome"], "ok")
        self.assertEqual(len(self.gate.seen["t"]), 2, "the command ran one tick")

    def test_a_result_too_big_to_keep_is_still_json(self):
        # Item 6: a command result over the backend's limit (64 KiB on
        # JetStream, 1 MiB on sqlite) was cut mid-JSON with "…" appended.
        owner, cli = self.store(), self.store()
        now = time.time()
        owner.register_daemon(now)
        owner.claim({"j": now + 60, "k": now + 60}, now)
        big = json.dumps({"job": "j", "kind": "gate", "outcome": "ok", "error": None,
                          "next_cursor": "x" * (1 << 21)})
        _, seq = cli.command("j", "tick")
        _, seq2 = cli.command("k", "tick")
        self.assertTrue(owner.commit_now(owner.load(["j"])["j"], command=(seq, big)))
        owner.finish_command(seq2, big.replace('"j"', '"k"', 1))
        self.written(owner)
        for n in (seq, seq2):
            done, result = cli.command_result(n)
            self.assertTrue(done)
            out = json.loads(result)
            self.assertEqual(out["outcome"], "ok")
            self.assertIsNone(out["next_cursor"])
            self.assertIn("next_cursor", out["omitted"])
        owner.unregister_daemon()


class CommandRacesJetStream(CommandRaces):
    backend = "jetstream"


if __name__ == "__main__":
    unittest.main()
