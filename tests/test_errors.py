"""Exception hierarchies of nexo_poller (section "Errors")."""

import ast
import builtins
import os
import tempfile
import unittest

import nexo_poller as np
from nexo_poller import (ConfigError, ErrorClass, ManifestError, PluginPollerForwardError,
                         PollerError, PollerRouteRegistrationError)


class PollerErrorTests(unittest.TestCase):

    def test_variants_are_subclasses_of_poller_error(self):
        for variant in (PollerError.Transient, PollerError.Permanent, PollerError.Config):
            self.assertTrue(issubclass(variant, PollerError), variant)
            self.assertTrue(issubclass(variant, Exception), variant)

    def test_except_poller_error_catches_every_variant(self):
        raised = [PollerError.Transient("t"), PollerError.Permanent("p"),
                  PollerError.Config("job-1", "bad url")]
        caught = []
        for exc in raised:
            try:
                raise exc
            except PollerError as got:
                caught.append(got)
        self.assertEqual(caught, raised)

    def test_variants_are_distinct(self):
        with self.assertRaises(PollerError.Transient):
            raise PollerError.Transient("x")
        # A Permanent is not caught by `except Transient`.
        with self.assertRaises(PollerError.Permanent):
            try:
                raise PollerError.Permanent("gone")
            except PollerError.Transient:  # pragma: no cover - must not happen
                self.fail("Permanent caught as Transient")
        self.assertFalse(issubclass(PollerError.Config, PollerError.Transient))
        self.assertFalse(issubclass(PollerError.Config, PollerError.Permanent))
        self.assertFalse(issubclass(PollerError.Permanent, PollerError.Transient))

    def test_classify_returns_error_class_members(self):
        self.assertIs(PollerError.Transient("t").classify(), ErrorClass.TRANSIENT)
        self.assertIs(PollerError.Permanent("p").classify(), ErrorClass.PERMANENT)
        self.assertIs(PollerError.Config("j", "r").classify(), ErrorClass.CONFIG)
        for exc in (PollerError.Transient("t"), PollerError.Permanent("p"),
                    PollerError.Config("j", "r")):
            self.assertIsInstance(exc.classify(), ErrorClass)

    def test_error_class_has_exactly_three_members(self):
        self.assertEqual({m.name for m in ErrorClass}, {"TRANSIENT", "PERMANENT", "CONFIG"})

    def test_transient_and_permanent_keep_their_message(self):
        self.assertEqual(str(PollerError.Transient("feed timed out")), "feed timed out")
        self.assertEqual(str(PollerError.Permanent("token revoked")), "token revoked")

    def test_transient_retry_after(self):
        # Issue 25 item 4: Transient took no retry_after.
        self.assertIsNone(PollerError.Transient("t").retry_after)
        self.assertEqual(PollerError.Transient("t", retry_after=60).retry_after, 60)
        self.assertEqual(PollerError.Transient("t", retry_after=0.5).retry_after, 0.5)
        self.assertEqual(str(PollerError.Transient("t", retry_after=60)), "t")
        # Beyond a century means "a century" (as next_interval_secs does).
        for huge in (10 ** 400, float("inf")):
            self.assertEqual(PollerError.Transient("t", retry_after=huge).retry_after,
                             np._RETRY_AFTER_MAX_SECS)
        for bad in (-1, -0.5, float("nan")):
            with self.subTest(bad=bad), self.assertRaises(np.InputError) as cm:
                PollerError.Transient("t", retry_after=bad)
            self.assertIn("retry_after", str(cm.exception))
        for bad in ("60", True, [60]):
            with self.subTest(bad=bad), self.assertRaises(TypeError) as cm:
                PollerError.Transient("t", retry_after=bad)
            self.assertIn("retry_after", str(cm.exception))

    def test_config_attributes_and_message(self):
        exc = PollerError.Config("rss-news", "feed url is missing")
        self.assertEqual(exc.job, "rss-news")
        self.assertEqual(exc.reason, "feed url is missing")
        msg = str(exc)
        self.assertIn("rss-news", msg)
        self.assertIn("feed url is missing", msg)
        self.assertLess(msg.index("rss-news"), msg.index("feed url is missing"))

    def test_variant_qualnames_read_like_the_original(self):
        self.assertEqual(PollerError.Transient.__qualname__, "PollerError.Transient")
        self.assertEqual(PollerError.Permanent.__qualname__, "PollerError.Permanent")
        self.assertEqual(PollerError.Config.__qualname__, "PollerError.Config")


class ForwardErrorTests(unittest.TestCase):

    def test_variants_are_forward_errors(self):
        for variant in (PluginPollerForwardError.Broker, PluginPollerForwardError.ParseReply):
            self.assertTrue(issubclass(variant, PluginPollerForwardError))
        self.assertFalse(issubclass(PluginPollerForwardError.Broker,
                                    PluginPollerForwardError.ParseReply))
        self.assertFalse(issubclass(PluginPollerForwardError.ParseReply,
                                    PluginPollerForwardError.Broker))

    def test_except_forward_error_catches_both(self):
        for exc in (PluginPollerForwardError.Broker("no responders"),
                    PluginPollerForwardError.ParseReply("not json")):
            try:
                raise exc
            except PluginPollerForwardError as got:
                self.assertIs(got, exc)

    def test_forward_errors_are_not_poller_errors(self):
        # Only the proxies turn forward errors into PollerError.Transient.
        self.assertFalse(issubclass(PluginPollerForwardError, PollerError))
        self.assertFalse(issubclass(PluginPollerForwardError.ParseReply, PollerError))

    def test_messages(self):
        self.assertEqual(str(PluginPollerForwardError.Broker("no responders")), "no responders")
        self.assertEqual(str(PluginPollerForwardError.ParseReply("bad cursor")), "bad cursor")

    def test_decode_cursor_raises_parse_reply(self):
        with self.assertRaises(PluginPollerForwardError.ParseReply):
            np.decode_cursor("!!not_b64!!")


class DuplicateKindTests(unittest.TestCase):

    def test_message_matches_original(self):
        exc = PollerRouteRegistrationError.DuplicateKind("google_calendar", "gcal_a", "gcal_b")
        self.assertEqual(
            str(exc),
            "kind `google_calendar` already owned by plugin `gcal_a` — `gcal_b` cannot register")

    def test_attributes(self):
        exc = PollerRouteRegistrationError.DuplicateKind("rss", "feeds", "other")
        self.assertEqual((exc.kind, exc.existing_plugin, exc.new_plugin),
                         ("rss", "feeds", "other"))

    def test_hierarchy(self):
        self.assertTrue(issubclass(PollerRouteRegistrationError.DuplicateKind,
                                   PollerRouteRegistrationError))
        with self.assertRaises(PollerRouteRegistrationError):
            raise PollerRouteRegistrationError.DuplicateKind("rss", "a", "b")
        self.assertFalse(issubclass(PollerRouteRegistrationError, PollerError))


class ManifestErrorTests(unittest.TestCase):

    def test_message_with_key(self):
        exc = ManifestError("/etc/plugins/nexo-plugin.toml", "must list at least one kind",
                            "plugin.poller.kinds")
        msg = str(exc)
        self.assertTrue(msg.startswith("/etc/plugins/nexo-plugin.toml"), msg)
        self.assertIn("plugin.poller.kinds", msg)
        self.assertIn("must list at least one kind", msg)
        self.assertEqual(exc.path, "/etc/plugins/nexo-plugin.toml")
        self.assertEqual(exc.key, "plugin.poller.kinds")
        self.assertEqual(exc.detail, "must list at least one kind")

    def test_message_without_key(self):
        exc = ManifestError("/x/nexo-plugin.toml", "cannot read: No such file or directory")
        self.assertEqual(str(exc), "/x/nexo-plugin.toml: cannot read: No such file or directory")
        self.assertIsNone(exc.key)

    def test_path_like_is_stringified(self):
        import pathlib
        exc = ManifestError(pathlib.Path("/a/b.toml"), "oops")
        self.assertEqual(exc.path, "/a/b.toml")
        self.assertIn("/a/b.toml", str(exc))


class ConfigErrorTests(unittest.TestCase):

    def test_single_problem(self):
        exc = ConfigError("pollers.json", [("jobs[0].id", "must be unique")])
        self.assertEqual(str(exc), "pollers.json: jobs[0].id: must be unique")
        self.assertEqual(exc.source, "pollers.json")
        self.assertEqual(exc.problems, [("jobs[0].id", "must be unique")])

    def test_problem_without_path(self):
        exc = ConfigError("pollers.json", [("", "not a JSON object")])
        self.assertEqual(str(exc), "pollers.json: not a JSON object")

    def test_many_problems_are_all_listed(self):
        problems = [("jobs[0].kind", "unknown kind 'x'"), ("jobs[1].schedule", "missing")]
        exc = ConfigError("pollers.json", problems)
        msg = str(exc)
        self.assertIn("2 problems", msg)
        self.assertIn("jobs[0].kind: unknown kind 'x'", msg)
        self.assertIn("jobs[1].schedule: missing", msg)
        self.assertEqual(exc.problems, problems)

    def test_problems_list_is_copied(self):
        problems = [("a", "b")]
        exc = ConfigError("s", problems)
        problems.append(("c", "d"))
        self.assertEqual(exc.problems, [("a", "b")])


class PolicyTests(unittest.TestCase):
    """The policy of the Errors section: every error the module raises is a
    NexoPollerError subclass, except Python's own TypeError for a wrong
    argument type, NotImplementedError from StateStore's abstract methods and
    TimeoutError from the socket a webhook sink reads through."""

    ALLOWED = {"TypeError": None, "NotImplementedError": "StateStore.",
               "TimeoutError": "_DeadlineSocket."}

    def test_no_bare_builtin_raise(self):
        with open(np.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = []

        def walk(node, where):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    walk(child, where + [child.name])
                    continue
                if isinstance(child, ast.Raise) and child.exc is not None:
                    target = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                    name = getattr(target, "id", None)
                    if isinstance(getattr(builtins, name or "", None), type) and \
                            issubclass(getattr(builtins, name), BaseException):
                        scope = ".".join(where)
                        allowed = self.ALLOWED.get(name, False)
                        if allowed is False or (allowed and not scope.startswith(allowed)):
                            found.append(f"line {child.lineno}: raise {name} in {scope}")
                walk(child, where)

        walk(tree, [])
        self.assertEqual(found, [], "raise the module's own errors (see the Errors section)")

    def test_every_exception_class_is_a_nexo_poller_error(self):
        def classes(ns, seen):
            for value in list(vars(ns).values()):
                if isinstance(value, type) and value not in seen and \
                        value.__module__ == np.__name__:
                    seen.add(value)
                    yield value
                    yield from classes(value, seen)

        stray = [c.__qualname__ for c in classes(np, set())
                 if issubclass(c, BaseException) and not issubclass(c, np.NexoPollerError)]
        self.assertEqual(stray, [])


class InputErrorTests(unittest.TestCase):
    """A value refused at the API is an InputError, which stays a ValueError
    (and an unknown job a KeyError) for callers written before it."""

    def test_unknown_job_is_the_modules_error(self):
        with tempfile.TemporaryDirectory(prefix="nexo-errors-") as d:
            cfg = np.config_from_dict(
                {"state_db": os.path.join(d, "s.db"),
                 "jobs": [{"id": "a", "kind": "mem", "schedule": {"every_secs": 10}}]},
                extra_kinds=["mem"])
            r = np.Runner(cfg)
            try:
                r.open()
                for action in (r.pause, r.resume, r.reset, r.run_once):
                    with self.subTest(action=action.__name__):
                        with self.assertRaises(np.InputError.UnknownJob) as ctx:
                            action("nope")
                        self.assertIsInstance(ctx.exception, np.NexoPollerError)
                        self.assertIsInstance(ctx.exception, KeyError)
                        self.assertEqual(str(ctx.exception), "no job 'nope' (known: a)")
            finally:
                r.stop()

    def test_bad_operator_cursor_is_an_input_error(self):
        arg = '{"cursor": "!!not base64!!", "source": "set"}'
        with self.assertRaises(np.InputError) as ctx:
            np.apply_command(np.JobState("a"), "cursor", arg)
        self.assertIsInstance(ctx.exception, ValueError)
        self.assertNotIsInstance(ctx.exception, PluginPollerForwardError)
        self.assertIn("bad cursor command argument", str(ctx.exception))

    def test_refused_values_are_input_errors(self):
        cases = [lambda: np.apply_command(np.JobState("a"), "explode"),
                 lambda: np.CronExpr("not cron"),
                 lambda: np.SqliteStateStore.supports("teleport")]
        for call in cases:
            with self.subTest(call=call), self.assertRaises(np.InputError) as ctx:
                call()
            self.assertIsInstance(ctx.exception, ValueError)


if __name__ == "__main__":
    unittest.main()
