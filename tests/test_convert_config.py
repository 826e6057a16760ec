"""``convert-config pollers.yaml`` (issue 23 item 4): nexo's YAML config as
the pollers.json that fires at the same times, placeholders kept as written
and never a secret; what changed on stderr."""

import json
import os
import sys
import unittest
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import ROOT, TempDirCase, main_in_process  # noqa: E402

import nexo_poller as nx  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "nexo-yaml", "config__pollers.yaml")
START = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
END = datetime(2101, 1, 1, tzinfo=timezone.utc).timestamp()   # nexo's cron stops in 2100
FIRES = 40

# nexo cron -> the Vixie cron it becomes, or None: no Vixie twin (the file
# keeps cron_dialect "nexo")
CRONS = {
    "0 0 9 * * 1": "0 9 * * 0",                     # Sunday: nexo's 1
    "0 30 8 ? * sun": "30 8 * * sun",               # '?' and a name
    "0 0 12 ? * sunday,saturday": "0 12 * * 0,6",   # long names
    "0 0 9 * * 2-6": "0 9 * * 1-5",                 # Monday to Friday
    "0 15 10 ? * MON-FRI": "15 10 * * MON-FRI",     # names mean the same: kept
    "0 0 0 1 january,july ?": "0 0 1 1,7 *",        # long month names
    "0 0 0 29 2 *": "0 0 29 2 *",                   # a leap day
    "0 0 9 * * * *": "0 9 * * *",                   # year '*': dropped
    "*/20 * * * * *": "*/20 * * * * *",             # seconds: the 6-field form
    "0 0 9 1-31 * 2": "0 9 * * 1",                  # every dom AND Monday: Mondays
    "0 0 9 * * 1-7": "0 9 * * *",
    "0 0 0 * * */2": "0 0 * * */2",                 # 1,3,5,7 = Sun,Tue,Thu,Sat
    "@weekly": "@weekly",
    "0 0 9 13 * 6": None,                           # Friday the 13th: dom AND dow
    "0 0 9 * * * 2027": None,                       # a year
    "0 0 9 1 * 2 2026-2030": None,
}


class ConvertConfigTest(TempDirCase):
    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def convert(self, path):
        code, out, err = main_in_process(["convert-config", path])
        self.assertEqual(code, 0, err)
        self.assertNotIn("Traceback", err)
        return out, err

    def load_both(self, yaml_text, kinds=("mem",)):
        """(the YAML's config, the converted JSON's config, the JSON, stderr)."""
        yaml_path = self.write("pollers.yaml", yaml_text)
        out, err = self.convert(yaml_path)
        json_path = self.write("pollers.json", out)
        doc = None if "${" in out else json.loads(out)     # a placeholder may stand bare
        return (nx.load_config(yaml_path, extra_kinds=kinds),
                nx.load_config(json_path, extra_kinds=kinds), doc, err)

    def assert_same_fires(self, a, b):
        self.assertEqual([j.id for j in a.jobs], [j.id for j in b.jobs])
        for x, y in zip(a.jobs, b.jobs):
            for start in (START, START + 86400 * 400 + 3601):
                with self.subTest(job=x.id, start=start):
                    fires = [[t for t in nx._fire_times(j.schedule, start, FIRES) if t < END]
                             for j in (x, y)]
                    self.assertTrue(fires[0])
                    self.assertEqual(fires[0], fires[1])

    def test_nexo_pollers_yaml_converts(self):
        out, err = self.convert(FIXTURE)
        doc = json.loads(out)                      # stdout is JSON only
        self.assertNotIn("pollers", doc)
        self.assertNotIn("schema_version", doc)
        self.assertEqual(doc["jobs"][0]["id"], "kate_solicitud_llamada")
        self.assertIn("file: schema_version: 11 → (removed)", err)
        self.assertIn("kind 'gmail'", err)         # nexo built it in: say a plugin is needed
        for line in err.splitlines():
            self.assertTrue(line.startswith("convert-config: "), line)
        yaml_cfg = nx.load_config(FIXTURE, extra_kinds=["gmail"])
        json_cfg = nx.load_config(self.write("pollers.json", out), extra_kinds=["gmail"])
        self.assertEqual(json_cfg.cron_dialect, "vixie")
        for key in ("default_jitter_ms", "lease_ttl_factor", "failure_alert_cooldown_secs",
                    "breaker_threshold", "enabled"):
            self.assertEqual(getattr(yaml_cfg, key), getattr(json_cfg, key), key)
        self.assertEqual(yaml_cfg.jobs[0].config, json_cfg.jobs[0].config)
        self.assertEqual(yaml_cfg.jobs[0].failure_to, json_cfg.jobs[0].failure_to)
        self.assert_same_fires(yaml_cfg, json_cfg)

    def test_each_cron_fires_at_the_same_times_after_conversion(self):
        for cron, vixie in CRONS.items():
            with self.subTest(cron=cron):
                yaml_cfg, json_cfg, doc, err = self.load_both(
                    f"jobs:\n- id: j\n  kind: mem\n  schedule: {{cron: '{cron}'}}\n")
                self.assert_same_fires(yaml_cfg, json_cfg)
                if vixie is None:
                    self.assertEqual(doc["cron_dialect"], "nexo")
                    self.assertEqual(doc["jobs"][0]["schedule"]["cron"], cron)
                    self.assertIn("has no Vixie equivalent", err)
                else:
                    self.assertNotIn("cron_dialect", doc)
                    self.assertEqual(json_cfg.cron_dialect, "vixie")
                    self.assertEqual(doc["jobs"][0]["schedule"]["cron"], vixie)
                    if vixie != cron:
                        self.assertIn(f'job j: schedule.cron: "{cron}" → "{vixie}": ', err)

    def test_one_cron_without_a_vixie_twin_keeps_the_file_nexo(self):
        yaml_cfg, json_cfg, doc, err = self.load_both(
            "jobs:\n- id: a\n  kind: mem\n  schedule: {cron: '0 0 9 * * 2-6', tz: Europe/Madrid}\n"
            "- id: friday13\n  kind: mem\n  schedule: {cron: '0 0 9 13 * 6'}\n"
            "- id: e\n  kind: mem\n  schedule: {every_secs: 90}\n")
        self.assertEqual(list(doc), ["cron_dialect", "jobs"])
        self.assertEqual(doc["cron_dialect"], "nexo")
        self.assertEqual(doc["jobs"][0]["schedule"]["cron"], "0 0 9 * * 2-6")
        self.assertIn("friday13's cron '0 0 9 13 * 6' has no Vixie equivalent: day of month "
                      "AND day of week", err)
        self.assertIn("schedule.tz 'Europe/Madrid' kept", err)
        self.assert_same_fires(yaml_cfg, json_cfg)

    def test_paused_on_boot_keeps_nexos_repause_at_every_start(self):
        yaml_cfg, json_cfg, doc, err = self.load_both(
            "jobs:\n- id: p\n  kind: mem\n  schedule: {cron: '0 0 9 * * 1'}\n"
            "  paused_on_boot: true\n- id: q\n  kind: mem\n  schedule: {every_secs: 5}\n")
        self.assertEqual(json_cfg.cron_dialect, "vixie")
        self.assertEqual(list(doc["jobs"][0]), ["id", "kind", "schedule", "paused_on_boot",
                                                "repause_on_boot"])
        self.assertEqual([j.repause_on_boot for j in yaml_cfg.jobs], [True, False])
        self.assertEqual([j.repause_on_boot for j in json_cfg.jobs], [True, False])
        self.assertIn("job p: repause_on_boot: (none) → true: ", err)

    def test_placeholders_survive_and_a_secret_never_appears(self):
        secrets_dir = os.path.join(self.dir, "secrets")
        os.mkdir(secrets_dir)
        token_file = os.path.join(secrets_dir, "token")
        with open(token_file, "w") as f:
            f.write("file-secret-5e6f7a\n")
        env = {"NEXO_CONVERT_SECRET": "env-secret-1a2b3c", "CONFIG_SECRETS_DIR": secrets_dir,
               "NEXO_CONVERT_THRESHOLD": "3"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self.addCleanup(lambda: [os.environ.pop(k) if v is None else os.environ.update({k: v})
                                 for k, v in old.items()])
        yaml_cfg, json_cfg, doc, err = self.load_both(
            "pollers:\n  breaker_threshold: ${NEXO_CONVERT_THRESHOLD}\n"
            "  default_jitter_ms: ${NEXO_CONVERT_UNSET:-250}\n  jobs:\n  - id: s\n    kind: mem\n"
            "    schedule: {every_secs: 60}\n    config:\n"
            "      token: ${NEXO_CONVERT_SECRET}\n"
            "      header: \"Bearer ${file:" + token_file + "}\"\n"
            "      # a comment: ${NEXO_CONVERT_NOT_A_VAR}\n")
        with open(os.path.join(self.dir, "pollers.json"), encoding="utf-8") as f:
            text = f.read()
        for secret in ("env-secret-1a2b3c", "file-secret-5e6f7a"):
            self.assertNotIn(secret, text)
            self.assertNotIn(secret, err)
        self.assertIn('"token": "${NEXO_CONVERT_SECRET}"', text)
        self.assertIn('"header": "Bearer ${file:' + token_file + '}"', text)
        self.assertIn('"breaker_threshold": ${NEXO_CONVERT_THRESHOLD},', text)  # a number
        self.assertIn('"default_jitter_ms": ${NEXO_CONVERT_UNSET:-250},', text)
        self.assertEqual(json_cfg.breaker_threshold, 3)
        self.assertEqual(json_cfg.default_jitter_ms, 250)
        self.assertEqual(json_cfg.jobs[0].config, yaml_cfg.jobs[0].config)
        self.assertEqual(json_cfg.jobs[0].config["token"], "env-secret-1a2b3c")

    def test_bad_input_is_one_clear_line_with_exit_2(self):
        os.environ.pop("NEXO_CONVERT_MISSING", None)
        cases = [
            ("a.json", "{}", "convert-config reads a nexo YAML config (.yaml or .yml)"),
            ("b.yaml", "jobs:\n- id: a\n  kind: &k mem\n", "b.yaml:3:9: anchors are not "
                                                           "supported"),
            ("c.yaml", "jobs:\n- id: a\n  kind: mem\n  schedule: {cron: '0 9 * * *'}\n",
             "c.yaml:4:14: jobs[0].schedule.cron: nexo cron '0 9 * * *' has 5 fields"),
            ("d.yaml", "breaker_threshold: ${NEXO_CONVERT_MISSING}\n",
             "environment variable NEXO_CONVERT_MISSING is not set"),
            ("e.yaml", "jobs:\n- id: a\n  kind: mem\n  schedule:\n    every_secs: 5\n"
                       "  config:\n    ids: ${NEXO_CONVERT_LIST:-[1, 2]}\n",
             "jobs[0].config.ids: '${NEXO_CONVERT_LIST:-[1, 2]}' resolves to a YAML array: "
             "JSON cannot keep it as a placeholder"),
            ("f.yaml", "schema_version: 99\njobs: []\n", "schema_version: 99 is newer"),
            ("g.yaml", b"jobs: [\xff]\n", "not UTF-8 text (byte 7)"),
        ]
        for name, text, message in cases:
            with self.subTest(name=name):
                if isinstance(text, bytes):
                    with open(os.path.join(self.dir, name), "wb") as f:
                        f.write(text)
                path = self.write(name, text) if isinstance(text, str) else \
                    os.path.join(self.dir, name)
                code, out, err = main_in_process(["convert-config", path])
                self.assertEqual(code, 2, err)
                self.assertEqual(out, "")
                self.assertIn(message, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertNotIn("Traceback", err)
        code, out, err = main_in_process(["convert-config", os.path.join(self.dir, "no.yaml")])
        self.assertEqual((code, out), (2, ""))
        self.assertIn("no.yaml: cannot read", err)


class RepauseOnBootKeyTest(unittest.TestCase):
    """pollers.json's repause_on_boot: nexo's paused_on_boot (paused again at
    every start) in a Vixie file."""

    def job(self, **keys):
        return {"jobs": [{"id": "j", "kind": "mem", "schedule": {"every_secs": 5}, **keys}]}

    def test_repause_on_boot_key(self):
        cfg = nx.config_from_dict(self.job(paused_on_boot=True, repause_on_boot=True),
                                  extra_kinds=["mem"])
        self.assertTrue(cfg.jobs[0].repause_on_boot)
        cfg = nx.config_from_dict(self.job(paused_on_boot=True), extra_kinds=["mem"])
        self.assertFalse(cfg.jobs[0].repause_on_boot)       # pollers.json: a new job only
        cfg = nx.config_from_dict({"cron_dialect": "nexo", **self.job(
            paused_on_boot=True, repause_on_boot=False)}, extra_kinds=["mem"])
        self.assertFalse(cfg.jobs[0].repause_on_boot)       # a nexo file may opt out

    def test_repause_on_boot_needs_paused_on_boot_and_a_boolean(self):
        for keys, message in [({"repause_on_boot": True}, "needs paused_on_boot: true"),
                              ({"paused_on_boot": True, "repause_on_boot": "yes"},
                               "must be true or false")]:
            with self.subTest(keys=keys), self.assertRaises(nx.ConfigError) as ctx:
                nx.config_from_dict(self.job(**keys), extra_kinds=["mem"])
            self.assertIn(f"jobs[0].repause_on_boot: {message}", str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
