"""The YAML reader (issue 23 item 1): what it reads, what it refuses (with
file:line:column and the reason), nexo's own YAML files against the JSON a
full YAML 1.2 parser gives for them, and ``--config x.yaml`` end to end.

The expected JSON in tests/fixtures/nexo-yaml was written by ruamel.yaml
(typ='safe', YAML 1.2) outside this repository; these tests need no YAML
package."""

import glob
import json
import os
import random
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import PLUGIN, PY, ROOT, TempDirCase, main_in_process, write_manifest  # noqa: E402

import nexo_poller  # noqa: E402
from nexo_poller import ConfigError, load_config  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "nexo-yaml")


def read(text: str):
    return nexo_poller._read_yaml(text, "f.yaml")[0]


class YamlCase(unittest.TestCase):
    def assertReads(self, cases):
        for text, expected in cases:
            with self.subTest(text=text):
                got = read(text)
                self.assertEqual(got, expected)
                self.assertEqual([type(v) for v in _leaves(got)],
                                 [type(v) for v in _leaves(expected)])

    def assertRefused(self, text: str, where: str, reason: str):
        with self.assertRaises(ConfigError) as cm:
            read(text)
        self.assertEqual(str(cm.exception), f"f.yaml:{where}: {reason}")


def _leaves(value):
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value]


class ScalarTest(YamlCase):
    def test_core_schema(self):
        # YAML 1.2 core schema; YAML 1.1's booleans and sexagesimals stay strings.
        table = {"~": None, "null": None, "Null": None, "NULL": None, "": None,
                 "true": True, "True": True, "FALSE": False, "false": False,
                 "on": "on", "yes": "yes", "No": "No", "off": "off", "y": "y",
                 "0": 0, "-3": -3, "+12": 12, "017": 17, "0o17": 15, "0x1F": 31,
                 "1.5": 1.5, ".5": 0.5, "1.": 1.0, "-2.5e-3": -0.0025, "1e3": 1000.0,
                 "1_000": "1_000", "0b101": "0b101", "1:30": "1:30",
                 "2001-12-14": "2001-12-14", "nulls": "nulls", "${VAR}": "${VAR}",
                 "${NEXO_DB:-./data/x.db}": "${NEXO_DB:-./data/x.db}",
                 "http://x.y/z#frag": "http://x.y/z#frag", "a -b": "a -b",
                 "-x": "-x", "?x": "?x", ":x": ":x", "a:b": "a:b"}
        self.assertReads([(f"k: {text}\n", {"k": value}) for text, value in table.items()])

    def test_non_finite_numbers_are_refused_json_has_none(self):
        self.assertRefused("a: 1\nb: .inf\n", "2:4",
                           "infinite and NaN numbers are not supported (JSON has none)")
        self.assertRefused("a: [.NaN]\n", "1:5",
                           "infinite and NaN numbers are not supported (JSON has none)")

    def test_plain_scalars_fold_over_lines_and_end_at_comments(self):
        self.assertReads([
            ("a: one\n  two\n\n  three\nb: x # note\n", {"a": "one two\nthree", "b": "x"}),
            ("- a\n  b\n- c\n", ["a b", "c"]),
            ("a: x#y\n", {"a": "x#y"}),
            ("# only a comment\n", None),
            ("", None),
            ("---\na: 1\n...\n", {"a": 1}),
            ("\ufeffa: 1\n", {"a": 1}),
        ])

    def test_quoting_and_escapes(self):
        self.assertReads([
            ("a: 'it''s # not a comment'\n", {"a": "it's # not a comment"}),
            ('a: "t\\tn\\nq\\"b\\\\s\\/e\\x41\\u00e9\\U0001F600\\0\\_"\n',
             {"a": 't\tn\nq"b\\s/eA\u00e9\U0001F600\0\xa0'}),
            ('a: "one\n  two\n\n  three"\n', {"a": "one two\nthree"}),
            ('a: "glued\\\n   on"\n', {"a": "gluedon"}),
            ("a: '  '\nb: \"\"\nc: 'true'\nd: \"1\"\n", {"a": "  ", "b": "", "c": "true", "d": "1"}),
            ("'a b': 1\n\"c\\td\": 2\n", {"a b": 1, "c\td": 2}),
        ])

    def test_bad_quoting_is_refused_at_its_place(self):
        self.assertRefused('a: 1\nb: "x\\qy"\n', "2:6", "unknown escape \\q")
        self.assertRefused('a: "\\x4"\n', "1:5", "\\x needs 2 hex digits")
        self.assertRefused("a: 1\nb: 'open\n", "2:4", "a quoted value is not closed")
        self.assertRefused('a: "x" y\n', "1:8", "unexpected 'y' after a value")


class BlockScalarTest(YamlCase):
    def test_literal_and_folded_with_chomping(self):
        self.assertReads([
            ("a: |\n  x\n   y\n\nb: 1\n", {"a": "x\n y\n", "b": 1}),
            ("a: |-\n  x\n\n", {"a": "x"}),
            ("a: |+\n  x\n\n\nb: 2\n", {"a": "x\n\n\n", "b": 2}),
            ("a: >\n  one\n  two\n\n  three\n    more\n  four\n",
             {"a": "one two\nthree\n  more\nfour\n"}),
            ("a: >-\n  one\n  two\n", {"a": "one two"}),
            ("a: >+\n  x\n", {"a": "x\n"}),
            ("a: >\n\n  x\n", {"a": "\nx\n"}),
            ("a: |\n  # kept\n  x\n# a comment\nb: |\nc: 1\n", {"a": "# kept\nx\n", "b": "", "c": 1}),
            ("- |\n x\n- >\n  a\n  b\n", ["x\n", "a b\n"]),
            ("a: |  # a comment on the header\n  x\n", {"a": "x\n"}),
            ("a: |\n  no final break", {"a": "no final break"}),
        ])

    def test_indentation_indicator_either_order(self):
        self.assertReads([
            ("a: |2\n    x\n   y\n", {"a": "  x\n y\n"}),
            ("a: |1-\n  x\n", {"a": " x"}),
            ("a: >-1\n  x\n", {"a": " x"}),
        ])
        self.assertRefused("a: |x\n  y\n", "1:5",
                           "a block scalar header is '|' or '>', then '-' or '+' and an "
                           "indentation digit 1-9")


class CollectionTest(YamlCase):
    def test_block_collections(self):
        self.assertReads([
            ("a:\n  b:\n    c: 1\n  d: [x]\ne: 2\n", {"a": {"b": {"c": 1}, "d": ["x"]}, "e": 2}),
            ("a:\n- 1\n- 2\nb: 3\n", {"a": [1, 2], "b": 3}),        # at the key's indent
            ("- a: 1\n  b:\n  - x\n  - y\n- - n1\n  - n2\n-\n- c\n",
             [{"a": 1, "b": ["x", "y"]}, ["n1", "n2"], None, "c"]),
            ("a:\nb:   # nothing\nc: ''\n", {"a": None, "b": None, "c": ""}),
            ("on: push\nyes: 1\n", {"on": "push", "yes": 1}),
        ])

    def test_flow_collections(self):
        self.assertReads([
            ("a: [1, 2.5, x, 'q', \"d\", {b: c}, [], {}]\n",
             {"a": [1, 2.5, "x", "q", "d", {"b": "c"}, [], {}]}),
            ("a: {x: 1, y: [a, b], z}\n", {"a": {"x": 1, "y": ["a", "b"], "z": None}}),
            ("a: [\n  1,   # one\n  2,\n]\n", {"a": [1, 2]}),
            ('a: {"x":1, "y": "z"}\n', {"a": {"x": 1, "y": "z"}}),
            ("a: [k: v, w]\n", {"a": [{"k": "v"}, "w"]}),
            ("[a, b]\n", ["a", "b"]),
        ])
        self.assertRefused("a: [1,\n  2\n", "1:4", "'[' is not closed")
        self.assertRefused("a: {x: 1]}\n", "1:9", "expected ',' or '}'")


class RefusedTest(YamlCase):
    def test_each_unsupported_construct_with_line_column_and_reason(self):
        cases = [
            ("a: 1\nb: &x 2\n", "2:4", "anchors are not supported"),
            ("a: 1\nb: *x\n", "2:4", "aliases are not supported"),
            ("a:\n  - !!str 1\n", "2:5", "tags are not supported"),
            ("a: [1, &x 2]\n", "1:8", "anchors are not supported"),
            ("a: 1\n---\nb: 2\n", "2:1", "several documents are not supported"),
            ("a: 1\n...\nb: 2\n", "3:1", "several documents are not supported"),
            ("%YAML 1.2\n---\na: 1\n", "1:1", "directives are not supported"),
            ("a: %x\n", "1:4", "'%' may not start a plain value (quote it)"),
            ("a: 1\n? b\n: 2\n", "2:1", "complex keys ('?') are not supported"),
            ("a: 1\n[x, y]: 2\n", "2:1", "complex keys (a collection as key) are not supported"),
            ("a: {[x]: 1}\n", "1:5", "complex keys (a collection as key) are not supported"),
            ("a: 1\nb: 2\na: 3\n", "3:1", "duplicate key 'a'"),
            ("x:\n  - {k: 1, k: 2}\n", "2:12", "duplicate key 'k'"),
            ("1: a\n", "1:1", "a key must be a string, got 1 (quote it)"),
            ("a:\n\tb: 1\n", "2:1", "a tab in indentation (YAML allows only spaces)"),
            ("a: b: c\n", "1:5", "a mapping may not start on its key's line"),
            ("a: - b\n", "1:4", "a block sequence may not start on its key's line"),
            ("a:\n  b: [1]\n   c: 2\n", "3:4", "this line is indented more than its mapping"),
            ("- a\nb: c\n", "2:1", "unexpected content (is it indented as its parent?)"),
        ]
        for text, where, reason in cases:
            with self.subTest(text=text):
                self.assertRefused(text, where, reason)


class NexoFilesTest(unittest.TestCase):
    """Every YAML file of lordmacu/nexo-rs reads as the same data as ruamel.yaml's."""

    def test_every_nexo_yaml_file_reads_as_a_full_yaml_1_2_parser_reads_it(self):
        files = sorted(glob.glob(os.path.join(FIXTURES, "*.yaml")) +
                       glob.glob(os.path.join(FIXTURES, "*.yml")))
        self.assertEqual(len(files), 42)
        for path in files:
            with self.subTest(file=os.path.basename(path)):
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                got = nexo_poller._read_yaml(text, path)[0]
                self.assertEqual(nexo_poller._read_yaml(text.replace("\n", "\r\n"), path)[0],
                                 got, "with CRLF line ends")
                with open(os.path.splitext(path)[0] + ".json", encoding="utf-8") as f:
                    expected = json.load(f)
                # Dumped, so 1 and 1.0 (or True and 1) are told apart.
                self.assertEqual(json.dumps(got, ensure_ascii=False),
                                 json.dumps(expected, ensure_ascii=False))

    def test_mutated_files_fail_only_with_config_error(self):
        rnd = random.Random(23)
        paths = sorted(glob.glob(os.path.join(FIXTURES, "*.y*ml")))
        for _ in range(400):
            with open(rnd.choice(paths), encoding="utf-8") as f:
                text = _mutated(rnd, f.read())
            try:
                nexo_poller._read_yaml(text, "m.yaml")
            except ConfigError as exc:
                self.assertRegex(str(exc), r"^m\.yaml(:\d+:\d+)?: \S")
            except Exception as exc:                          # noqa: BLE001 - the point
                self.fail(f"{type(exc).__name__}: {exc} on:\n{text}")

    def test_mutated_pollers_yaml_loads_or_fails_only_with_config_error(self):
        # Through validation too: whatever the reader lets through (a number
        # where a mapping was, an empty job...) is a ConfigError, not a crash.
        rnd = random.Random(11)
        with open(os.path.join(FIXTURES, "config__pollers.yaml"), encoding="utf-8") as f:
            base = f.read().replace("schema_version: 11\n", "")  # item 2's key
        path = os.path.join(FIXTURES, "m.yaml")                  # never written
        for _ in range(300):
            text = _mutated(rnd, base)
            try:
                nexo_poller._config_from_yaml(text, path, extra_kinds=["gmail"])
            except ConfigError as exc:
                self.assertTrue(str(exc).startswith(path + ":"), str(exc))
            except Exception as exc:                          # noqa: BLE001 - the point
                self.fail(f"{type(exc).__name__}: {exc} on:\n{text}")


def _mutated(rnd: random.Random, text: str) -> str:
    """``text`` with 1-4 characters inserted, deleted or replaced, mostly by
    characters that mean something in YAML."""
    alphabet = " \n\t-:#[]{},\"'|>&*!?%@`\\x1"
    for _ in range(rnd.randint(1, 4)):
        i, c = rnd.randrange(len(text) + 1), rnd.choice(alphabet)
        text = rnd.choice([text[:i] + c + text[i:], text[:i] + text[i + 1:],
                           text[:i] + c + text[i + 1:]])
    return text


class YamlConfigTest(TempDirCase):
    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    JOB = "jobs:\n- id: j\n  kind: mem\n  schedule:\n    cron: '0 0 9 * * 1-5'\n"

    def test_a_yaml_config_reads_cron_as_nexo_unless_it_says_otherwise(self):
        for name, text, dialect in [
                ("a.yaml", self.JOB, "nexo"),
                ("b.yml", "pollers:\n  " + self.JOB.replace("\n", "\n  "), "nexo"),
                ("c.yaml", "cron_dialect: vixie\njobs:\n- id: j\n  kind: mem\n"
                           "  schedule: {cron: '0 9 * * 1-5'}\n", "vixie")]:
            with self.subTest(name=name):
                cfg = load_config(self.write(name, text), extra_kinds=["mem"])
                self.assertEqual(cfg.cron_dialect, dialect)
                self.assertEqual(cfg.jobs[0].id, "j")

    def test_validation_problems_point_at_their_yaml_line(self):
        path = self.write("p.yaml", "# nexo\npollers:\n  jobs:\n  - id: ok\n    kind: mem\n"
                                    "    schedule:\n      cron: 'bad cron'\n")
        with self.assertRaises(ConfigError) as cm:
            load_config(path, extra_kinds=["mem"])
        self.assertRegex(str(cm.exception),
                         rf"^{path}:7:7: pollers\.jobs\[0\]\.schedule\.cron: nexo cron ")
        path = self.write("q.yaml", "jobs:\n- id: a\n  kind: nope\n  schedule: {every_secs: 1}\n"
                                    "- id: b\n  kind: mem\n")
        with self.assertRaises(ConfigError) as cm:
            load_config(path, extra_kinds=["mem"])
        lines = str(cm.exception).splitlines()
        self.assertEqual(lines[0], f"{path}: 2 problems:")
        self.assertTrue(lines[1].startswith("  3:3: jobs[0].kind: "), lines)
        self.assertTrue(lines[2].startswith("  5:1: jobs[1].schedule: "), lines)  # missing: its job

    def test_cli_validate_reads_nexo_pollers_yaml(self):
        with open(os.path.join(FIXTURES, "config__pollers.yaml"), encoding="utf-8") as f:
            text = f.read()
        # schema_version is issue 23 item 2's; a plugin serves nexo's gmail kind.
        text = text.replace("schema_version: 11\n", "").replace(
            "pollers:\n", "pollers:\n  plugins:\n  - plugins/gmail\n", 1)
        write_manifest(self.dir, "gmail", "gmail", command=PY, args=(PLUGIN, "gmail"))
        code, out, err = main_in_process(["--config", self.write("pollers.yaml", text),
                                          "validate"])
        self.assertEqual(code, 0, err)
        self.assertIn("ok", out)

    def test_cli_validate_names_the_yaml_line_of_a_syntax_error(self):
        path = self.write("bad.yml", "pollers:\n  jobs:\n  - id: a\n    kind: &k mem\n")
        code, out, err = main_in_process(["--config", path, "validate"])
        self.assertEqual(code, 2)
        self.assertIn(f"{path}:4:11: anchors are not supported", err)
        self.assertNotIn("Traceback", err)


if __name__ == "__main__":
    unittest.main()
