"""End-to-end tests of the command line: every verb run as a subprocess.

Each test builds its own ``pollers.json`` and plugin manifests in a temporary
directory; the plugins run ``tests/fixtures/e2e_counter_plugin.py`` with this
interpreter (``sys.executable``), so any Python 3.11+ works.  The module
under test is never imported for behaviour, only run.
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import (LAUNCHER, NEXO, PY, ROOT, TempDirCase, b64, pid_gone,  # noqa: E402
                     unb64, write_config, write_counter_plugin)

TIMEOUT = 60          # for any one CLI run: a hang fails, a slow machine does not

STATUS_KEYS = {"id", "kind", "agent", "paused", "cursor", "last_status", "last_error",
               "consecutive_errors", "last_run_at", "next_run_at", "items_seen_total",
               "items_dispatched_total", "breaker_open", "running"}


class Project:
    """A config folder: plugin manifests, pollers.json and the state file."""

    def __init__(self, root: str):
        self.root = root
        self.config = os.path.join(root, "pollers.json")
        self.state = os.path.join(root, "state", "poller.db")
        self.pid_file = os.path.join(root, "plugin-pids.txt")

    def plugin(self, name: str, kind: str, lifecycle: str) -> str:
        return write_counter_plugin(self.root, name, kind, lifecycle, self.pid_file, 2)

    def write(self, doc) -> str:
        return write_config(self.config, doc)

    def standard(self, **top) -> dict:
        """Two plugins (one per lifecycle) and a few jobs that never run on their own."""
        doc = {
            "state_db": "state/poller.db",
            "default_jitter_ms": 0,
            "plugins": [self.plugin("feed", "e2e_feed", "ephemeral"),
                        self.plugin("clock", "e2e_clock", "long_lived")],
            "jobs": [
                {"id": "news", "kind": "e2e_feed", "agent": "reader",
                 "schedule": {"every_secs": 60}},
                {"id": "heartbeat", "kind": "e2e_clock", "agent": "ops",
                 "schedule": {"every_secs": 60}},
                {"id": "flaky", "kind": "e2e_feed", "agent": "reader",
                 "schedule": {"every_secs": 60}, "config": {"fail": "transient"}},
                {"id": "broken", "kind": "e2e_feed", "agent": "reader",
                 "schedule": {"every_secs": 60}, "config": {"fail": "permanent"}},
                {"id": "blob", "kind": "e2e_feed",
                 "schedule": {"cron": "0 0 1 1 *", "tz": "UTC"},
                 "config": {"cursor_hex": "fbfffe00ff"}},
                {"id": "sleepy", "kind": "e2e_feed", "agent": "reader",
                 "schedule": {"every_secs": 60}, "paused_on_boot": True},
            ],
        }
        doc.update(top)
        self.write(doc)
        return doc

    def pids(self) -> list[int]:
        try:
            with open(self.pid_file, encoding="ascii") as f:
                return [int(line.split()[0]) for line in f if line.strip()]
        except FileNotFoundError:
            return []


def nexo(*args, config=None, cwd=None, module=False, timeout=TIMEOUT, tmpdir=None):
    """Run the CLI; returns the CompletedProcess (text mode).

    ``tmpdir`` becomes the child's TMPDIR, where a private broker socket goes."""
    cmd = [PY, "-m", "nexo_poller"] if module else [PY, NEXO]
    if config is not None:
        cmd += ["--config", config]
    cmd += list(args)
    env = None
    if tmpdir is not None:
        env = dict(os.environ, TMPDIR=tmpdir)
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


class CliTestCase(TempDirCase):
    tmp_prefix, quiet = "nexo-cli-", False

    def setUp(self):
        super().setUp()
        self.p = Project(self.dir)
        self.tmpdir = os.path.join(self.dir, "tmp")
        os.mkdir(self.tmpdir)

    def run_ok(self, *args, **kw):
        r = nexo(*args, config=self.p.config, **kw)
        self.assertEqual(r.returncode, 0, f"{args}: stdout={r.stdout!r} stderr={r.stderr!r}")
        self.assertNotIn("Traceback", r.stderr)
        return r

    def assert_user_error(self, r, code, *needles):
        """A user error: the code, one ``nexo-poller:`` message, no traceback."""
        self.assertEqual(r.returncode, code, f"stdout={r.stdout!r} stderr={r.stderr!r}")
        self.assertNotIn("Traceback", r.stderr)
        self.assertNotIn("Traceback", r.stdout)
        messages = [line for line in r.stderr.splitlines() if line.startswith("nexo-poller: ")]
        self.assertEqual(len(messages), 1, f"want one 'nexo-poller: ' message: {r.stderr!r}")
        for needle in needles:
            self.assertIn(needle, r.stderr)

    def status(self) -> dict:
        r = self.run_ok("status", "--json")
        rows = json.loads(r.stdout)
        self.assertIsInstance(rows, list)
        return {row["id"]: row for row in rows}

    def tick(self, job, *extra):
        r = nexo(*extra, "tick", job, config=self.p.config, tmpdir=self.tmpdir)
        self.assertNotIn("Traceback", r.stderr)
        try:
            outcome = json.loads(r.stdout)
        except ValueError:
            self.fail(f"tick {job}: stdout is not one JSON document: {r.stdout!r} "
                      f"(stderr {r.stderr!r})")
        return r, outcome


class TestGeneral(CliTestCase):
    def test_help_exits_0_and_lists_verbs_and_exit_codes(self):
        r = nexo("--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        for verb in ("run", "validate", "status", "tick", "pause", "resume", "reset"):
            self.assertIn(verb, r.stdout)
        for word in ("--config", "--log-level", "--log-format", "exit codes"):
            self.assertIn(word, r.stdout)
        self.assertEqual(r.stderr, "")

    def test_verb_help_exits_0(self):
        for verb in ("status", "tick"):
            with self.subTest(verb=verb):
                r = nexo("--config", "x.json", verb, "--help")
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertIn("usage:", r.stdout)

    def test_version(self):
        r = nexo("--version")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout.strip(), r"^nexo-poller \d+\.\d+\.\d+\S*$")
        with open(NEXO, encoding="utf-8") as f:
            declared = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
        self.assertEqual(r.stdout.strip(), f"nexo-poller {declared}")

    def test_python_dash_m_from_the_repo_root(self):
        self.p.standard()
        r = nexo("--version", module=True, cwd=ROOT)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith("nexo-poller "), r.stdout)
        r = nexo("validate", config=self.p.config, module=True, cwd=ROOT)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(len(r.stdout.strip().splitlines()), 1, r.stdout)
        self.assertIn("ok", r.stdout)
        r = nexo("tick", "news", config=self.p.config, module=True, cwd=ROOT)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["next_cursor"], b64(b"1"))
        r = nexo("tick", "nope", config=self.p.config, module=True, cwd=ROOT)
        self.assert_user_error(r, 4, "nope")

    def test_the_launcher_behaves_as_the_script(self):
        # ./nexo-poller imports nexo_poller (its cached bytecode) instead of
        # running it as a script: the same output and exit code for each case.
        self.p.standard()
        cfg = self.p.config
        cases = [["--help"], ["--version"], ["validate"], ["--config", cfg, "validate"],
                 ["--config", cfg, "status", "--json"], ["--config", cfg, "tick", "nope"],
                 ["--config", cfg, "explode"]]
        codes = []
        for args in cases:
            with self.subTest(args=args):
                want, got = (subprocess.run([PY, script, *args], capture_output=True, text=True,
                                            timeout=TIMEOUT, stdin=subprocess.DEVNULL)
                             for script in (NEXO, LAUNCHER))
                self.assertEqual((got.returncode, got.stdout, got.stderr),
                                 (want.returncode, want.stdout, want.stderr))
                codes.append(want.returncode)
        self.assertEqual(codes, [0, 0, 2, 0, 0, 4, 2])

    def test_the_launcher_runs_its_own_module_through_a_symlink(self):
        # Run as a command from anywhere (a symlink in a bin folder, another
        # working directory, a decoy nexo_poller.py there): the module beside
        # the launcher's real file is the one that runs.
        self.p.standard()
        bin_dir = os.path.join(self.dir, "bin")
        os.mkdir(bin_dir)
        os.symlink(LAUNCHER, os.path.join(bin_dir, "nexo-poller"))
        with open(os.path.join(self.dir, "nexo_poller.py"), "w") as f:
            f.write("raise SystemExit('the decoy ran')\n")
        env = dict(os.environ, PATH=os.pathsep.join([bin_dir, os.path.dirname(PY),
                                                     os.environ.get("PATH", "")]))
        env.pop("PYTHONPATH", None)
        if not os.access(os.path.join(os.path.dirname(PY), "python3"), os.X_OK):
            self.skipTest("no python3 beside this interpreter for the launcher's #! line")
        r = subprocess.run(["nexo-poller", "--config", self.p.config, "tick", "news"],
                           capture_output=True, text=True, timeout=TIMEOUT, env=env,
                           cwd=self.dir, stdin=subprocess.DEVNULL)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["next_cursor"], b64(b"1"))

    def test_bad_arguments_exit_2(self):
        self.p.standard()
        cases = {
            "no --config": [PY, NEXO, "validate"],
            "unknown verb": [PY, NEXO, "--config", self.p.config, "explode"],
            "bad log level": [PY, NEXO, "--config", self.p.config, "--log-level", "loud",
                              "validate"],
            "tick without job": [PY, NEXO, "--config", self.p.config, "tick"],
        }
        for name, cmd in cases.items():
            with self.subTest(name):
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                                   stdin=subprocess.DEVNULL)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertIn("usage:", r.stderr)
                self.assertNotIn("Traceback", r.stderr)

    def test_disabled_config_run_exits_0_without_starting(self):
        self.p.standard(enabled=False)
        r = nexo("run", config=self.p.config, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("disabled", r.stderr)
        self.assertEqual(self.p.pids(), [], "a disabled daemon must not start plugins")


class TestValidate(CliTestCase):
    def test_good_config_prints_one_ok_line(self):
        self.p.standard()
        r = self.run_ok("validate")
        lines = r.stdout.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stdout)
        self.assertIn("ok", lines[0])
        self.assertIn("6 jobs", lines[0])
        self.assertIn("2 plugins", lines[0])
        self.assertEqual(r.stderr, "")
        self.assertFalse(os.path.exists(self.p.state), "validate must not create the state")
        self.assertEqual(self.p.pids(), [], "validate must not start plugins")

    def test_pollers_wrapper_object_is_accepted(self):
        doc = self.p.standard()
        self.p.write({"pollers": doc})
        self.run_ok("validate")

    def test_invalid_config_one_message_naming_the_json_path(self):
        good = self.p.standard()

        def with_job0(**changes):
            doc = json.loads(json.dumps(good))
            doc["jobs"][0].update(changes)
            return doc

        bad_manifest = os.path.join(self.p.root, "plugins", "bad")
        os.makedirs(bad_manifest)
        with open(os.path.join(bad_manifest, "nexo-plugin.toml"), "w") as f:
            f.write('[plugin]\nid = "bad"\n[plugin.poller]\nkinds = ["Bad-Kind"]\n'
                    'broker_topic_prefix = "x"\n')
        cases = [
            ("jobs[0].schedule.every_secs", with_job0(schedule={"every_secs": "soon"})),
            ("jobs[0].kind", with_job0(kind="nonexistent")),
            ("jobs[0].schedule", with_job0(schedule={"every_secs": 5, "cron": "* * * * *"})),
            ("jobs[0].colour", with_job0(colour="red")),
            ("jobs[1].id", dict(good, jobs=[good["jobs"][0], good["jobs"][0]])),
            ("default_jitter_ms", dict(good, default_jitter_ms=-1)),
            ("bogus", dict(good, bogus=True)),
            ("plugins[2]", dict(good, plugins=good["plugins"] + ["plugins/bad"])),
            ("plugins[2]", dict(good, plugins=good["plugins"] + ["plugins/missing"])),
            ("plugins[1]", dict(good, plugins=good["plugins"][:1] + [7] + good["plugins"][1:])),
        ]
        for path, doc in cases:
            with self.subTest(path=path):
                self.p.write(doc)
                r = nexo("validate", config=self.p.config)
                self.assert_user_error(r, 2, path, self.p.config)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertEqual(r.stdout, "")

    def test_every_problem_is_reported_at_once(self):
        doc = self.p.standard()
        doc["jobs"][0]["schedule"] = {"every_secs": "soon"}
        doc["jobs"][1]["kind"] = "nonexistent"
        self.p.write(doc)
        r = nexo("validate", config=self.p.config)
        self.assert_user_error(r, 2, "jobs[0].schedule.every_secs", "jobs[1].kind")

    def test_syntax_errors_and_non_objects(self):
        cases = {"not json": ('{"jobs": [', "line 1"),
                 "duplicate key": ('{"jobs": [], "jobs": []}', "duplicate key"),
                 "array": ("[]", "JSON object"),
                 "not utf-8": (b"{\"jobs\": \"\xff\"}", "UTF-8")}
        for name, (text, needle) in cases.items():
            with self.subTest(name):
                if isinstance(text, bytes):
                    with open(self.p.config, "wb") as f:
                        f.write(text)
                else:
                    self.p.write(text)
                r = nexo("validate", config=self.p.config)
                self.assert_user_error(r, 2, needle)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)

    def test_missing_config_file_exits_2(self):
        missing = os.path.join(self.p.root, "nope.json")
        for verb in (["validate"], ["status"], ["run"], ["tick", "x"]):
            with self.subTest(verb=verb):
                r = nexo(*verb, config=missing)
                self.assert_user_error(r, 2, missing)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)

    def test_invalid_config_rejected_by_every_verb(self):
        doc = self.p.standard()
        doc["jobs"][0]["schedule"] = {"every_secs": 0}
        self.p.write(doc)
        for verb in (["run"], ["status", "--json"], ["tick", "news"], ["pause", "news"]):
            with self.subTest(verb=verb):
                r = nexo(*verb, config=self.p.config)
                self.assert_user_error(r, 2, "jobs[0].schedule.every_secs")
        self.assertEqual(self.p.pids(), [])


class TestUnknownJobAndState(CliTestCase):
    def test_unknown_job_exits_4(self):
        self.p.standard()
        for verb in ("tick", "pause", "resume", "reset"):
            with self.subTest(verb=verb):
                r = nexo(verb, "no-such-job", config=self.p.config)
                self.assert_user_error(r, 4, "no-such-job")
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertEqual(self.p.pids(), [], "an unknown job must not start plugins")

    def test_corrupt_state_file_exits_3(self):
        self.p.standard()
        os.makedirs(os.path.dirname(self.p.state))
        with open(self.p.state, "wb") as f:
            f.write(b"this is not a sqlite database, just some bytes\n" * 200)
        for verb in (["status", "--json"], ["status"], ["tick", "news"], ["pause", "news"],
                     ["reset", "news"], ["run"]):
            with self.subTest(verb=verb):
                r = nexo(*verb, config=self.p.config, timeout=30)
                self.assert_user_error(r, 3, self.p.state)
        with open(self.p.state, "rb") as f:
            self.assertTrue(f.read().startswith(b"this is not"), "the file was overwritten")

    def test_foreign_sqlite_database_exits_3(self):
        self.p.standard()
        os.makedirs(os.path.dirname(self.p.state))
        with sqlite3.connect(self.p.state) as db:
            db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
        db.close()
        r = nexo("status", "--json", config=self.p.config)
        self.assert_user_error(r, 3, "invoices")

    def test_state_path_is_a_directory_exits_3(self):
        self.p.standard()
        os.makedirs(self.p.state)
        r = nexo("status", config=self.p.config)
        self.assert_user_error(r, 3, self.p.state)


class TestStatusAndTick(CliTestCase):
    def test_status_json_of_never_run_jobs(self):
        doc = self.p.standard()
        rows = self.status()
        self.assertEqual(list(rows), [j["id"] for j in doc["jobs"]])
        for job in doc["jobs"]:
            row = rows[job["id"]]
            with self.subTest(job=job["id"]):
                self.assertLessEqual(STATUS_KEYS, set(row), f"missing keys in {row}")
                self.assertEqual(row["kind"], job["kind"])
                self.assertEqual(row["agent"], job.get("agent", "default"))
                self.assertIs(row["paused"], bool(job.get("paused_on_boot")))
                self.assertIsNone(row["cursor"])
                self.assertIsNone(row["last_status"])
                self.assertIsNone(row["last_error"])
                self.assertEqual(row["consecutive_errors"], 0)
                self.assertIsNone(row["last_run_at"])
                self.assertIsNone(row["next_run_at"])
                self.assertEqual(row["items_seen_total"], 0)
                self.assertEqual(row["items_dispatched_total"], 0)
                self.assertIs(row["breaker_open"], False)
                self.assertIs(row["running"], False)
        self.assertEqual(self.p.pids(), [], "status must not start plugins")

    def test_status_table(self):
        self.p.standard()
        r = self.run_ok("status")
        lines = r.stdout.strip().splitlines()
        self.assertTrue(lines[0].startswith("no state yet at "), lines[0])
        self.assertEqual(lines[1], "daemon: none running")
        self.assertEqual(len(lines), 9, r.stdout)
        self.assertTrue(lines[2].startswith("JOB"), lines[2])
        self.assertIn("paused", next(line for line in lines if line.startswith("sleepy")))
        self.assertIn("active", next(line for line in lines if line.startswith("news")))

    def test_tick_ephemeral_prints_outcome_and_stores_cursor(self):
        self.p.standard()
        r, out = self.tick("news")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(out["job"], "news")
        self.assertEqual(out["kind"], "e2e_feed")
        self.assertEqual(out["outcome"], "ok")
        self.assertIsNone(out["error"])
        self.assertEqual(out["items_seen"], 1)
        self.assertEqual(out["next_cursor"], b64(b"1"))
        row = self.status()["news"]
        self.assertEqual(row["cursor"], b64(b"1"))
        self.assertEqual(row["last_status"], "ok")
        self.assertIsNone(row["last_error"])
        self.assertIsNotNone(row["last_run_at"])
        self.assertEqual(row["items_seen_total"], 1)
        self.assertEqual(row["items_dispatched_total"], 1)

        r, out = self.tick("news")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(out["next_cursor"], b64(b"2"))
        row = self.status()["news"]
        self.assertEqual(unb64(row["cursor"]), b"2")
        self.assertEqual(row["items_seen_total"], 2)
        # The other jobs are untouched.
        self.assertIsNone(self.status()["heartbeat"]["cursor"])
        for pid in self.p.pids():
            self.assertTrue(pid_gone(pid), f"ephemeral plugin {pid} outlived its tick")
        self.assertEqual(os.listdir(self.tmpdir), [], "`tick` left its broker folder behind")

    def test_cursor_in_status_is_unpadded_urlsafe_base64(self):
        self.p.standard()
        r, out = self.tick("blob")
        self.assertEqual(r.returncode, 0, r.stderr)
        raw = bytes.fromhex("fbfffe00ff")
        self.assertEqual(out["next_cursor"], b64(raw))
        cursor = self.status()["blob"]["cursor"]
        self.assertEqual(cursor, b64(raw))
        self.assertNotIn("=", cursor)
        self.assertNotIn("+", cursor)
        self.assertNotIn("/", cursor)
        self.assertEqual(unb64(cursor), raw)

    def test_tick_long_lived_plugin(self):
        self.p.standard()
        r, out = self.tick("heartbeat")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(out["outcome"], "ok")
        self.assertEqual(out["next_cursor"], b64(b"1"))
        self.assertEqual(self.status()["heartbeat"]["cursor"], b64(b"1"))
        pids = self.p.pids()
        self.assertTrue(pids, "the long-lived plugin did not start")
        deadline = time.monotonic() + 10
        while not all(pid_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertTrue(all(pid_gone(p) for p in pids),
                        f"plugin processes {pids} outlived `tick`")
        self.assertEqual(os.listdir(self.tmpdir), [], "`tick` left its broker folder behind")

    def test_failing_tick_exits_1(self):
        self.p.standard()
        r, out = self.tick("flaky")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(out["outcome"], "transient")
        self.assertIn("e2e fixture transient failure", out["error"])
        self.assertIsNone(out["next_cursor"])
        row = self.status()["flaky"]
        self.assertEqual(row["last_status"], "transient")
        self.assertIn("e2e fixture transient failure", row["last_error"])
        self.assertEqual(row["consecutive_errors"], 1)
        self.assertFalse(row["paused"])
        self.assertIsNone(row["cursor"])

        r, out = self.tick("broken")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(out["outcome"], "permanent")
        row = self.status()["broken"]
        self.assertEqual(row["last_status"], "permanent")
        self.assertTrue(row["paused"], "a permanent error pauses the job")

    def test_sigint_interrupts_a_tick_with_130_promptly(self):
        """Ctrl-C on `tick`: exit 130 (documented), no traceback, the plugin
        killed, nothing stored, and no wait for a tick that is already gone."""
        doc = self.p.standard()
        mark = os.path.join(self.p.root, "started.txt")
        for job in doc["jobs"][:2]:             # news (ephemeral), heartbeat (long-lived)
            job["config"] = {"sleep": 60, "mark": mark}
        self.p.write(doc)
        for job in ("news", "heartbeat"):
            with self.subTest(job=job):
                proc = subprocess.Popen([PY, NEXO, "--config", self.p.config, "tick", job],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True,
                                        env=dict(os.environ, TMPDIR=self.tmpdir))
                try:
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        if os.path.exists(mark):
                            with open(mark) as f:
                                if any(line.split()[0] == job for line in f):
                                    break
                        time.sleep(0.05)
                    else:
                        self.fail(f"the tick of {job} did not start")
                    started = time.monotonic()
                    proc.send_signal(signal.SIGINT)
                    out, err = proc.communicate(timeout=TIMEOUT)
                    took = time.monotonic() - started
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.communicate()
                self.assertEqual(proc.returncode, 130, err)
                self.assertNotIn("Traceback", err)
                self.assertLess(took, 5.0, f"`tick` took {took:.1f}s to exit after SIGINT; "
                                           f"stderr: {err!r}")
                self.assertEqual([p for p in self.p.pids() if not pid_gone(p)], [],
                                 "a plugin process outlived the interrupted tick")
                self.assertIsNone(self.status()[job]["cursor"])
                self.assertEqual(os.listdir(self.tmpdir), [], "broker folder left behind")

    def test_log_format_json_and_log_level(self):
        self.p.standard()
        r, out = self.tick("news", "--log-format", "json")
        self.assertEqual(r.returncode, 0, r.stderr)
        records = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]
        ticks = [rec for rec in records if rec.get("job") == "news" and "outcome" in rec]
        self.assertEqual(len(ticks), 1, records)
        self.assertEqual(ticks[0]["outcome"], "ok")
        self.assertEqual(ticks[0]["next_cursor"], b64(b"1"))
        for rec in records:
            self.assertLessEqual({"ts", "level", "msg"}, set(rec))

        r, out = self.tick("news", "--log-level", "error")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stderr, "")
        self.assertEqual(out["next_cursor"], b64(b"2"))


class TestOperatorVerbsWithoutDaemon(CliTestCase):
    def test_pause_resume_reset(self):
        self.p.standard()
        r = self.run_ok("pause", "news")
        self.assertEqual(r.stdout.strip(), "pause news: done")
        rows = self.status()
        self.assertTrue(rows["news"]["paused"])
        self.assertFalse(rows["heartbeat"]["paused"])

        r = self.run_ok("resume", "news")
        self.assertEqual(r.stdout.strip(), "resume news: done")
        self.assertFalse(self.status()["news"]["paused"])

        r = self.run_ok("resume", "sleepy")         # paused_on_boot, never run
        self.assertFalse(self.status()["sleepy"]["paused"])

        self.tick("news")
        self.tick("news")
        self.assertEqual(self.status()["news"]["cursor"], b64(b"2"))
        r = self.run_ok("reset", "news")
        self.assertEqual(r.stdout.strip(), "reset news: done")
        row = self.status()["news"]
        self.assertIsNone(row["cursor"])
        self.assertEqual(row["items_seen_total"], 2, "reset only forgets the cursor")
        r, out = self.tick("news")
        self.assertEqual(out["next_cursor"], b64(b"1"), "after reset the cursor starts over")

    def test_resume_clears_consecutive_errors_and_the_breaker(self):
        self.p.standard(breaker_threshold=2)
        self.tick("flaky")
        self.assertFalse(self.status()["flaky"]["breaker_open"])
        self.tick("flaky")
        row = self.status()["flaky"]
        self.assertEqual(row["consecutive_errors"], 2)
        self.assertTrue(row["breaker_open"])
        table = self.run_ok("status").stdout
        self.assertIn("breaker", next(line for line in table.splitlines()
                                      if line.startswith("flaky")))
        self.run_ok("pause", "flaky")
        self.run_ok("resume", "flaky")
        row = self.status()["flaky"]
        self.assertFalse(row["paused"])
        self.assertEqual(row["consecutive_errors"], 0)
        self.assertFalse(row["breaker_open"])

    def test_pause_is_kept_by_a_later_tick(self):
        self.p.standard()
        self.run_ok("pause", "news")
        r, out = self.tick("news")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(self.status()["news"]["paused"])


if __name__ == "__main__":
    unittest.main()
