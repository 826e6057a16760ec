"""nexo's pollers file as nexo writes it (issue 23 item 2): ``schema_version``,
a job's ``extra`` map, and ``${...}`` placeholders resolved as nexo's
crates/config/src/env.rs does, with the resolved secrets never shown.

Files live in a TemporaryDirectory; only the dry-run test spawns (a plugin).
"""

import contextlib
import http.client
import io
import json
import logging
import os
import sys
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import FakePoller, TempDirCase  # noqa: E402
from test_operator import OperatorCase, job  # noqa: E402
import nexo_poller as nx  # noqa: E402
from nexo_poller import ConfigError, Runner, TickAck, load_config  # noqa: E402

SECRET = 'hunter2 "quoted" \\ back'     # a secret JSON must carry unchanged


def resolve(text, source="test.yaml", syntax="yaml"):
    return nx._resolve_placeholders(text, source, syntax=syntax)[0]


class EnvCase(TempDirCase):
    """os.environ restored after each test; CONFIG_SECRETS_DIR unset."""

    def setUp(self):
        super().setUp()
        env = mock.patch.dict(os.environ)
        env.start()
        self.addCleanup(env.stop)
        os.environ.pop("CONFIG_SECRETS_DIR", None)

    def chdir(self, path):
        old = os.getcwd()
        os.chdir(path)
        self.addCleanup(os.chdir, old)


class TestNexoEnvRsCases(EnvCase):
    """The tests of nexo's crates/config/src/env.rs, one for one."""

    def test_resolves_env_var(self):
        os.environ["TEST_CONFIG_VAR"] = "hello"
        self.assertEqual(resolve("key: ${TEST_CONFIG_VAR}"), "key: hello")

    def test_error_on_missing_var(self):
        os.environ.pop("DEFINITELY_NOT_SET_XYZ", None)
        with self.assertRaises(ConfigError) as cm:
            resolve("key: ${DEFINITELY_NOT_SET_XYZ}", "llm.yaml")
        self.assertIn("DEFINITELY_NOT_SET_XYZ", str(cm.exception))
        self.assertIn("llm.yaml", str(cm.exception))

    def test_resolves_file_secret(self):
        path = os.path.join(self.dir, "tok")
        with open(path, "w") as fh:
            fh.write("  secret_value  ")
        os.environ["CONFIG_SECRETS_DIR"] = self.dir      # whitelist the file's folder
        self.assertEqual(resolve("key: ${file:%s}" % path), "key: secret_value")

    def test_rejects_file_traversal(self):
        with self.assertRaises(ConfigError) as cm:
            resolve("key: ${file:../etc/passwd}", "t.yaml")
        self.assertIn("`..` not allowed", str(cm.exception))

    def test_rejects_absolute_outside_whitelist(self):
        with self.assertRaises(ConfigError) as cm:
            resolve("key: ${file:/etc/passwd}", "t.yaml")
        self.assertIn("absolute paths must be under", str(cm.exception))
        self.assertIn("${file:/etc/passwd}", str(cm.exception))

    def test_passthrough_no_placeholders(self):
        self.assertEqual(resolve("key: plain_value"), "key: plain_value")

    def test_multiple_vars_in_one_file(self):
        os.environ.update(TEST_A="foo", TEST_B="bar")
        self.assertEqual(resolve("a: ${TEST_A}\nb: ${TEST_B}"), "a: foo\nb: bar")


class TestPlaceholderRules(EnvCase):
    """What env.rs does beyond its own tests: defaults, roots, comments."""

    def test_defaults(self):
        os.environ.pop("UNSET_X", None)
        os.environ["EMPTY_X"] = ""
        os.environ["SET_X"] = "v"
        cases = {"${UNSET_X:-d}": "d", "${UNSET_X-d}": "d", "${EMPTY_X:-d}": "d",
                 "${EMPTY_X-d}": "", "${SET_X:-d}": "v", "${SET_X-d}": "v",
                 "${UNSET_X:-}": "", "${UNSET_X:-a-b}": "a-b", "${UNSET_X:-{x}}": "{x}",
                 "${ SET_X }": "v", "$${SET_X}": "$v", "$SET_X": "$SET_X"}
        for text, want in cases.items():
            with self.subTest(text):
                self.assertEqual(resolve(text), want)

    def test_yaml_comments_are_skipped_outside_quotes_only(self):
        os.environ.pop("UNSET_X", None)
        os.environ["SET_X"] = "v"
        self.assertEqual(resolve("a: 1  # see ${UNSET_X}\nb: ${SET_X}"),
                         "a: 1  # see ${UNSET_X}\nb: v")
        self.assertEqual(resolve("# ${UNSET_X}"), "# ${UNSET_X}")
        self.assertEqual(resolve('a: "#${SET_X}"'), 'a: "#v"')
        self.assertEqual(resolve("a: '#' ${SET_X}"), "a: '#' v")
        with self.assertRaises(ConfigError):        # the comment ended with its line
            resolve("# x\nb: ${UNSET_X}")

    def test_json_has_no_comments(self):
        os.environ["SET_X"] = "v"
        self.assertEqual(resolve('{"a": "# ${SET_X}"} # ${SET_X}', syntax="json"),
                         '{"a": "# v"} # v')

    def test_relative_file_from_the_working_directory_and_secrets_roots(self):
        os.makedirs(os.path.join(self.dir, "secrets"))
        with open(os.path.join(self.dir, "secrets", "k"), "w") as fh:
            fh.write("\nkey-1\n")
        self.chdir(self.dir)
        self.assertEqual(resolve("${file:secrets/k}"), "key-1")
        self.assertEqual(resolve("${file:./secrets/k}"), "key-1")
        absolute = os.path.join(self.dir, "secrets", "k")     # under ./secrets: a root
        self.assertEqual(resolve("${file:%s}" % absolute), "key-1")
        with self.assertRaises(ConfigError) as cm:
            resolve("${file:%s}" % os.path.join(self.dir, "secretsX", "k"))
        self.assertIn("absolute paths must be under", str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            resolve("${file:secrets/../secrets/k}")
        self.assertIn("`..` not allowed", str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            resolve("x: ${file:secrets/none}", "p.yaml")
        self.assertIn("${file:secrets/none}", str(cm.exception))
        self.assertIn("p.yaml", str(cm.exception))

    def test_unclosed_placeholder_is_an_error_not_a_hang(self):
        with self.assertRaises(ConfigError) as cm:
            resolve("a: 1\nb: ${X", "p.yaml")
        self.assertIn("line 2", str(cm.exception))


class FileCase(EnvCase):
    def write(self, text, name="pollers.json"):
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text if isinstance(text, str) else json.dumps(text))
        return path

    def load(self, text, name="pollers.json"):
        return load_config(self.write(text, name), extra_kinds=["mem"])


class TestPlaceholdersInPollersJson(FileCase):
    def test_resolved_before_parsing_and_a_secret_stays_itself(self):
        os.environ.update(TOKEN=SECRET, EVERY="30")
        cfg = self.load('{"jobs": [{"id": "j", "kind": "mem", "schedule": '
                        '{"every_secs": ${EVERY}}, "config": {"token": "${TOKEN}", '
                        '"note": "${NOTE:-none}"}}]}')
        self.assertEqual(cfg.jobs[0].config, {"token": SECRET, "note": "none"})
        self.assertEqual(cfg.jobs[0].schedule.every_secs, 30)

    def test_an_unset_variable_names_itself_and_the_file(self):
        os.environ.pop("NOT_SET_TOKEN", None)
        path = self.write('{"jobs": [\n{"id": "j", "kind": "mem", "schedule": '
                          '{"every_secs": 1}, "config": {"t": "${NOT_SET_TOKEN}"}}]}')
        with self.assertRaises(ConfigError) as cm:
            load_config(path, extra_kinds=["mem"])
        self.assertIn("NOT_SET_TOKEN", str(cm.exception))
        self.assertIn(path, str(cm.exception))
        self.assertIn("line 2", str(cm.exception))

    def test_a_problem_quoting_a_value_shows_the_placeholder_not_the_secret(self):
        os.environ["SINK"] = "ftp://user:s3cr3t-pw@example.com/"
        with self.assertRaises(ConfigError) as cm:
            self.load({"delivery_sink": "${SINK}"})
        self.assertNotIn("s3cr3t-pw", str(cm.exception))
        self.assertIn("${SINK}", str(cm.exception))


class TestSchemaVersionAndExtra(FileCase):
    def test_schema_version_with_the_pollers_wrapper(self):
        for version in (0, 11):
            cfg = self.load({"schema_version": version, "pollers": {"jobs": [
                {"id": "j", "kind": "mem", "agent": "a", "schedule": {"every_secs": 5}}]}})
            self.assertEqual([j.id for j in cfg.jobs], ["j"])
        cfg = self.load({"schema_version": 11, "default_jitter_ms": 0})    # flat form too
        self.assertEqual(cfg.default_jitter_ms, 0)

    def test_a_newer_or_odd_schema_version_is_refused_naming_it(self):
        for version, said in ((12, "12 is newer"), ("11", '"11"'), (-1, "-1"), (True, "true")):
            with self.subTest(version), self.assertRaises(ConfigError) as cm:
                self.load({"schema_version": version, "pollers": {}})
            self.assertIn("schema_version", str(cm.exception))
            self.assertIn(said, str(cm.exception))

    def test_a_jobs_extra_is_kept_and_passed_to_nothing(self):
        cfg = self.load({"jobs": [{"id": "j", "kind": "mem", "schedule": {"every_secs": 5},
                                   "config": {"a": 1}, "extra": {"flag": True}}]})
        self.assertEqual(cfg.jobs[0].extra, {"flag": True})
        seen = []
        runner = Runner(cfg)
        runner.register(FakePoller("mem", lambda ctx: seen.append(ctx.config) or TickAck()))
        self.addCleanup(runner.stop)
        self.assertEqual(runner.run_once("j").status, "ok")
        self.assertEqual(seen, [{"a": 1}], "the plugin gets config, not extra")
        with self.assertRaises(ConfigError) as cm:
            self.load({"jobs": [{"id": "j", "kind": "mem", "schedule": {"every_secs": 5},
                                 "extra": [1]}]})
        self.assertIn("jobs[0].extra: must be an object", str(cm.exception))


class TestSecretsNeverShown(OperatorCase):
    def setUp(self):
        super().setUp()
        env = mock.patch.dict(os.environ, {"API_TOKEN": SECRET})
        env.start()
        self.addCleanup(env.stop)

    def test_dry_run_shows_the_placeholder_and_the_plugin_gets_the_secret(self):
        plugin = self.script("echo.py", """\
            import sys, nexo_poller as nx
            def tick(ctx):
                print("token ok" if ctx.config["token"] == %r else "token wrong",
                      ctx.config["token"], file=sys.stderr)
                return nx.TickAck(next_cursor=b"1")
            nx.run_plugin({"echo": tick})
            """ % SECRET)
        self.write([self.manifest("e", "echo", command=plugin)],
                   [job("j", "echo", config={"token": "${API_TOKEN}"})])
        r = self.run_cli("tick", "j", "--dry-run")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        out = json.loads(r.stdout)
        self.assertIn("token ok", "\n".join(out["stderr"]))
        self.assertEqual(out["request"]["config"], {"token": "${API_TOKEN}"})
        self.assertNotIn("hunter2", r.stdout + r.stderr)
        r = self.run_cli("validate")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("hunter2", r.stdout + r.stderr)

    def test_admin_api_and_logs_never_carry_the_secret(self):
        token_file = os.path.join(self.root, "admin-token")
        with open(token_file, "w") as fh:
            fh.write("admin-token-123456\n")
        self.write([], [job("j", "mem", config={"token": "${API_TOKEN}"})],
                   admin_addr="127.0.0.1:0", admin_token_file=token_file)
        cfg = load_config(self.config, extra_kinds=["mem"])
        seen = []
        logger = logging.getLogger("nexo_poller")
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.DEBUG)
        self.addCleanup(logger.setLevel, level)
        self.addCleanup(logger.removeHandler, handler)
        runner = Runner(cfg)
        runner.register(FakePoller("mem", lambda ctx: seen.append(ctx.config["token"])
                                   or TickAck(b"c")))
        runner.start(True)
        self.addCleanup(runner.stop)
        self.assertTrue(runner.wait_idle(30), "the first tick did not finish")
        self.assertEqual(seen, [SECRET])
        bodies = []
        for path in ("/admin/pollers", "/admin/pollers/j", "/admin/plugins", "/"):
            conn = http.client.HTTPConnection("127.0.0.1", runner.admin_address[1], timeout=30)
            with contextlib.closing(conn):
                conn.request("GET", path,
                             headers={"Authorization": "Bearer admin-token-123456"})
                resp = conn.getresponse()
                bodies.append(resp.read().decode())
                self.assertEqual(resp.status, 200, (path, bodies[-1]))
        runner.stop()
        self.assertNotIn("hunter2", "".join(bodies) + stream.getvalue())


if __name__ == "__main__":
    unittest.main()
