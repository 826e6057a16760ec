"""load_manifest: nexo-plugin.toml into a PluginPollerHandle (section "Manifest")."""

import os
import pathlib
import sys
import textwrap
import unittest
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import TempDirCase  # noqa: E402
from nexo_poller import Lifecycle, ManifestError, PluginPollerHandle, load_manifest  # noqa: E402

FULL_EXAMPLE = """\
[plugin]
id = "gcal"
version = "0.1.0"
name = "Google Calendar"
description = "..."

[plugin.entrypoint]
command = "/usr/local/bin/gcal-plugin"   # program the daemon spawns
args = ["--mode", "stdio"]                 # optional
[plugin.entrypoint.env]                    # optional
LOG_LEVEL = "info"

[plugin.poller]
kinds                = ["google_calendar"]
broker_topic_prefix  = "plugin.poller.google_calendar"
lifecycle            = "long_lived"   # default; or "ephemeral"
max_concurrent_ticks = 1              # default 1, allowed 1..=64
tick_timeout_secs    = 60             # default 60, allowed 1..=3600
"""


def manifest(poller_lines, *, plugin='id = "rss_plugin"', entrypoint=None):
    """A minimal manifest with the given [plugin.poller] body."""
    text = f"[plugin]\n{plugin}\n\n"
    if entrypoint is not None:
        text += f"[plugin.entrypoint]\n{entrypoint}\n\n"
    text += "[plugin.poller]\n" + textwrap.dedent(poller_lines)
    return text


BASE_POLLER = """\
kinds = ["rss"]
broker_topic_prefix = "plugin.poller.rss"
"""


class ManifestTestCase(TempDirCase):
    quiet = False

    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.dir, "nexo-plugin.toml")

    def write(self, text, name="nexo-plugin.toml"):
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path

    def load(self, text):
        return load_manifest(self.write(text))

    def assertManifestError(self, text, key, *needles):
        """Loading ``text`` fails naming the file, ``key`` and every needle."""
        path = self.write(text)
        with self.assertRaises(ManifestError) as cm:
            load_manifest(path)
        exc = cm.exception
        msg = str(exc)
        self.assertIn(path, msg)
        self.assertEqual(exc.path, path)
        if key is not None:
            self.assertIn(key, msg)
            self.assertEqual(exc.key, key)
        for needle in needles:
            self.assertIn(needle, msg)
        return exc


class FullExampleTests(ManifestTestCase):

    def test_full_example(self):
        path = self.write(FULL_EXAMPLE)
        h = load_manifest(path)
        self.assertIsInstance(h, PluginPollerHandle)
        self.assertEqual(h.plugin_id, "gcal")
        self.assertEqual(h.kinds, ("google_calendar",))
        self.assertEqual(h.broker_topic_prefix, "plugin.poller.google_calendar")
        self.assertEqual(h.tick_topic(), "plugin.poller.google_calendar.tick")
        self.assertIs(h.lifecycle, Lifecycle.LONG_LIVED)
        self.assertEqual(h.max_concurrent_ticks, 1)
        self.assertEqual(h.tick_timeout, timedelta(seconds=60))
        self.assertEqual(h.entrypoint_command, "/usr/local/bin/gcal-plugin")
        self.assertEqual(h.entrypoint_args, ("--mode", "stdio"))
        self.assertEqual(dict(h.entrypoint_env), {"LOG_LEVEL": "info"})
        self.assertEqual(h.working_dir, self.dir)
        self.assertEqual(h.manifest_path, path)

    def test_defaults(self):
        h = self.load(manifest(BASE_POLLER))
        self.assertEqual(h.plugin_id, "rss_plugin")
        self.assertIs(h.lifecycle, Lifecycle.LONG_LIVED)
        self.assertEqual(h.max_concurrent_ticks, 1)
        self.assertEqual(h.tick_timeout, timedelta(seconds=60))
        self.assertIsNone(h.entrypoint_command)
        self.assertEqual(h.entrypoint_args, ())
        self.assertEqual(dict(h.entrypoint_env), {})
        self.assertEqual(h.working_dir, self.dir)

    def test_tick_topic_vector(self):
        self.assertEqual(self.load(manifest(BASE_POLLER)).tick_topic(), "plugin.poller.rss.tick")

    def test_ephemeral_and_explicit_limits(self):
        h = self.load(manifest(BASE_POLLER + 'lifecycle = "ephemeral"\n'
                               "max_concurrent_ticks = 4\ntick_timeout_secs = 15\n"))
        self.assertIs(h.lifecycle, Lifecycle.EPHEMERAL)
        self.assertEqual(h.max_concurrent_ticks, 4)
        self.assertEqual(h.tick_timeout, timedelta(seconds=15))

    def test_several_kinds(self):
        h = self.load(manifest('kinds = ["rss", "atom_feed", "k9"]\n'
                               'broker_topic_prefix = "p.feeds"\n'))
        self.assertEqual(h.kinds, ("rss", "atom_feed", "k9"))

    def test_upper_bounds_allowed(self):
        h = self.load(manifest(BASE_POLLER + "max_concurrent_ticks = 64\n"
                               "tick_timeout_secs = 3600\n"))
        self.assertEqual(h.max_concurrent_ticks, 64)
        self.assertEqual(h.tick_timeout, timedelta(seconds=3600))

    def test_lower_bounds_allowed(self):
        h = self.load(manifest(BASE_POLLER + "max_concurrent_ticks = 1\n"
                               "tick_timeout_secs = 1\n"))
        self.assertEqual(h.max_concurrent_ticks, 1)
        self.assertEqual(h.tick_timeout, timedelta(seconds=1))

    def test_relative_command_with_slash_resolves_against_folder(self):
        h = self.load(manifest(BASE_POLLER, entrypoint='command = "./bin/rss-plugin"'))
        self.assertEqual(h.entrypoint_command, os.path.join(self.dir, "bin", "rss-plugin"))
        h = self.load(manifest(BASE_POLLER, entrypoint='command = "bin/rss-plugin"'))
        self.assertEqual(h.entrypoint_command, os.path.join(self.dir, "bin", "rss-plugin"))

    def test_bare_command_is_left_for_path_lookup(self):
        h = self.load(manifest(BASE_POLLER, entrypoint='command = "python3"'))
        self.assertEqual(h.entrypoint_command, "python3")

    def test_absolute_command_unchanged(self):
        h = self.load(manifest(BASE_POLLER, entrypoint='command = "/opt/x/plugin"'))
        self.assertEqual(h.entrypoint_command, "/opt/x/plugin")

    def test_working_dir_is_manifest_folder_in_subdir(self):
        sub = os.path.join(self.dir, "plugins", "rss")
        os.makedirs(sub)
        path = os.path.join(sub, "nexo-plugin.toml")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(manifest(BASE_POLLER, entrypoint='command = "./run.sh"'))
        h = load_manifest(path)
        self.assertEqual(h.working_dir, sub)
        self.assertEqual(h.entrypoint_command, os.path.join(sub, "run.sh"))

    def test_accepts_pathlike_and_relative_path(self):
        path = self.write(manifest(BASE_POLLER))
        self.assertEqual(load_manifest(pathlib.Path(path)).plugin_id, "rss_plugin")
        old = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, old)
        h = load_manifest("nexo-plugin.toml")
        self.assertEqual(h.manifest_path, path)
        self.assertEqual(h.working_dir, self.dir)


class KindsRuleTests(ManifestTestCase):

    def test_empty_kinds(self):
        self.assertManifestError(manifest('kinds = []\nbroker_topic_prefix = "p.x"\n'),
                                 "plugin.poller.kinds", "at least one kind")

    def test_missing_kinds(self):
        self.assertManifestError(manifest('broker_topic_prefix = "p.x"\n'),
                                 "plugin.poller.kinds")

    def test_uppercase_kind(self):
        self.assertManifestError(manifest('kinds = ["A"]\nbroker_topic_prefix = "p.x"\n'),
                                 "plugin.poller.kinds[0]", "'A'", "^[a-z][a-z0-9_]+$")

    def test_single_char_kind(self):
        self.assertManifestError(manifest('kinds = ["a"]\nbroker_topic_prefix = "p.x"\n'),
                                 "plugin.poller.kinds[0]", "'a'", "^[a-z][a-z0-9_]+$")

    def test_dash_in_kind_second_position(self):
        self.assertManifestError(
            manifest('kinds = ["rss", "rss-feed"]\nbroker_topic_prefix = "p.x"\n'),
            "plugin.poller.kinds[1]", "'rss-feed'", "^[a-z][a-z0-9_]+$")

    def test_kind_starting_with_digit_or_underscore(self):
        for bad in ("1rss", "_rss"):
            with self.subTest(bad=bad):
                self.assertManifestError(
                    manifest(f'kinds = ["{bad}"]\nbroker_topic_prefix = "p.x"\n'),
                    "plugin.poller.kinds[0]")

    def test_kind_with_trailing_newline_rejected(self):
        self.assertManifestError(
            manifest('kinds = ["rss\\n"]\nbroker_topic_prefix = "p.x"\n'),
            "plugin.poller.kinds[0]")

    def test_duplicate_kind(self):
        self.assertManifestError(
            manifest('kinds = ["rss", "atom", "rss"]\nbroker_topic_prefix = "p.x"\n'),
            "plugin.poller.kinds[2]", "duplicate", "'rss'")

    def test_kinds_not_array(self):
        self.assertManifestError(manifest('kinds = "rss"\nbroker_topic_prefix = "p.x"\n'),
                                 "plugin.poller.kinds", "must be an array", "a string")

    def test_kind_not_string(self):
        self.assertManifestError(manifest('kinds = ["rss", 5]\nbroker_topic_prefix = "p.x"\n'),
                                 "plugin.poller.kinds[1]")


class PrefixRuleTests(ManifestTestCase):

    def test_empty_prefix(self):
        self.assertManifestError(manifest('kinds = ["rss"]\nbroker_topic_prefix = ""\n'),
                                 "plugin.poller.broker_topic_prefix", "must not be empty")

    def test_missing_prefix(self):
        self.assertManifestError(manifest('kinds = ["rss"]\n'),
                                 "plugin.poller.broker_topic_prefix", "must be a string")

    def test_prefix_trailing_dot(self):
        self.assertManifestError(
            manifest('kinds = ["rss"]\nbroker_topic_prefix = "plugin.poller."\n'),
            "plugin.poller.broker_topic_prefix", "must not end with '.'")

    def test_prefix_with_space(self):
        self.assertManifestError(
            manifest('kinds = ["rss"]\nbroker_topic_prefix = "plugin.poller rss"\n'),
            "plugin.poller.broker_topic_prefix", "spaces")

    def test_prefix_not_string(self):
        self.assertManifestError(manifest('kinds = ["rss"]\nbroker_topic_prefix = 3\n'),
                                 "plugin.poller.broker_topic_prefix", "must be a string",
                                 "an integer")


class RangeRuleTests(ManifestTestCase):

    def test_max_concurrent_ticks_zero(self):
        self.assertManifestError(manifest(BASE_POLLER + "max_concurrent_ticks = 0\n"),
                                 "plugin.poller.max_concurrent_ticks", "1..=64")

    def test_max_concurrent_ticks_65(self):
        self.assertManifestError(manifest(BASE_POLLER + "max_concurrent_ticks = 65\n"),
                                 "plugin.poller.max_concurrent_ticks", "65", "1..=64")

    def test_max_concurrent_ticks_negative(self):
        self.assertManifestError(manifest(BASE_POLLER + "max_concurrent_ticks = -1\n"),
                                 "plugin.poller.max_concurrent_ticks", "1..=64")

    def test_tick_timeout_zero(self):
        self.assertManifestError(manifest(BASE_POLLER + "tick_timeout_secs = 0\n"),
                                 "plugin.poller.tick_timeout_secs", "1..=3600")

    def test_tick_timeout_3601(self):
        self.assertManifestError(manifest(BASE_POLLER + "tick_timeout_secs = 3601\n"),
                                 "plugin.poller.tick_timeout_secs", "3601", "1..=3600")

    def test_lifecycle_forever(self):
        self.assertManifestError(manifest(BASE_POLLER + 'lifecycle = "forever"\n'),
                                 "plugin.poller.lifecycle", "'forever'", "long_lived",
                                 "ephemeral")


class StructureRuleTests(ManifestTestCase):

    def test_unknown_key_in_poller(self):
        self.assertManifestError(manifest(BASE_POLLER + "max_concurrency = 2\n"),
                                 "plugin.poller", "unknown key", "max_concurrency")

    def test_max_concurrent_ticks_string(self):
        self.assertManifestError(manifest(BASE_POLLER + 'max_concurrent_ticks = "2"\n'),
                                 "plugin.poller.max_concurrent_ticks", "must be an integer",
                                 "a string")

    def test_max_concurrent_ticks_bool(self):
        self.assertManifestError(manifest(BASE_POLLER + "max_concurrent_ticks = true\n"),
                                 "plugin.poller.max_concurrent_ticks", "must be an integer",
                                 "a boolean")

    def test_tick_timeout_float(self):
        self.assertManifestError(manifest(BASE_POLLER + "tick_timeout_secs = 1.5\n"),
                                 "plugin.poller.tick_timeout_secs", "must be an integer",
                                 "a float")

    def test_args_not_strings(self):
        self.assertManifestError(
            manifest(BASE_POLLER, entrypoint='command = "/bin/true"\nargs = [1]'),
            "plugin.entrypoint.args[0]", "must be a string", "an integer")

    def test_args_not_array(self):
        self.assertManifestError(
            manifest(BASE_POLLER, entrypoint='command = "/bin/true"\nargs = "--x"'),
            "plugin.entrypoint.args", "must be an array")

    def test_env_value_not_string(self):
        text = manifest(BASE_POLLER, entrypoint='command = "/bin/true"\n'
                        "[plugin.entrypoint.env]\nRETRIES = 3")
        self.assertManifestError(text, "plugin.entrypoint.env.RETRIES")

    def test_missing_poller_table(self):
        self.assertManifestError('[plugin]\nid = "x"\n', "plugin.poller", "missing table")

    def test_poller_not_a_table(self):
        self.assertManifestError('[plugin]\nid = "x"\npoller = "yes"\n', "plugin.poller",
                                 "must be a table")

    def test_missing_plugin_table(self):
        self.assertManifestError('[other]\nid = "x"\n', "plugin", "missing table")

    def test_missing_plugin_id(self):
        self.assertManifestError(manifest(BASE_POLLER, plugin='name = "RSS"'),
                                 "plugin.id", "must be a string")

    def test_empty_plugin_id(self):
        self.assertManifestError(manifest(BASE_POLLER, plugin='id = "  "'),
                                 "plugin.id", "must not be empty")

    def test_plugin_id_not_string(self):
        self.assertManifestError(manifest(BASE_POLLER, plugin="id = 7"), "plugin.id",
                                 "must be a string", "an integer")

    def test_empty_command(self):
        self.assertManifestError(manifest(BASE_POLLER, entrypoint='command = ""'),
                                 "plugin.entrypoint.command", "must not be empty")


class FileProblemTests(ManifestTestCase):

    def test_broken_toml_names_file_and_line(self):
        text = '[plugin]\nid = "x"\n\n[plugin.poller]\nkinds = ["rss"\nbroker_topic_prefix "p"\n'
        exc = self.assertManifestError(text, None, "invalid TOML")
        self.assertIsNone(exc.key)
        self.assertRegex(str(exc), r"line \d+")

    def test_broken_toml_reports_right_line(self):
        text = '[plugin]\nid = "x"\nthis is not toml\n'
        exc = self.assertManifestError(text, None, "invalid TOML")
        self.assertIn("line 3", str(exc))

    def test_missing_file(self):
        path = os.path.join(self.dir, "does-not-exist", "nexo-plugin.toml")
        with self.assertRaises(ManifestError) as cm:
            load_manifest(path)
        self.assertIn(path, str(cm.exception))
        self.assertIn("cannot read", str(cm.exception))
        self.assertEqual(cm.exception.path, path)

    def test_directory_instead_of_file(self):
        with self.assertRaises(ManifestError) as cm:
            load_manifest(self.dir)
        self.assertIn(self.dir, str(cm.exception))

    def test_non_utf8_bytes(self):
        with open(self.path, "wb") as fh:
            fh.write(b'[plugin]\nid = "caf\xe9"\n')
        with self.assertRaises(ManifestError) as cm:
            load_manifest(self.path)
        self.assertIn(self.path, str(cm.exception))
        self.assertIn("UTF-8", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
