"""The daemon on NATS (sections "Config", "Runner", "CLI"): ``"broker":
"nats://..."`` selects a real nats-server; long-lived plugins get its URL,
or run elsewhere; deliveries go out as nexo Events; boot failures are one
line and exit 6."""

import json
import os
import signal
import subprocess
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nats_support import NatsServer, free_port, require_nats  # noqa: E402
from support import (NEXO, PY, FakePoller, TempDirCase, pid_gone, wait_until,  # noqa: E402
                     write_manifest)

import nexo_poller as nx  # noqa: E402

SDK_PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sdk_plugin.py")


class NatsDaemonCase(TempDirCase):
    tmp_prefix, quiet = "nexo-nats-daemon-", False

    def setUp(self):
        require_nats()
        super().setUp()
        self.root = self.dir

    def server(self, *args):
        server = NatsServer(*args).start()
        self.addCleanup(server.cleanup)
        return server

    def plugin(self, name, kind, with_entrypoint=True, root=None):
        folder = os.path.join(root or self.root, name)
        os.mkdir(folder)
        entry = (f'[plugin.entrypoint]\ncommand = {json.dumps(PY)}\n'
                 f'args = [{json.dumps(SDK_PLUGIN)}]\n') if with_entrypoint else ""
        with open(os.path.join(folder, "nexo-plugin.toml"), "w") as fh:
            fh.write(f'[plugin]\nid = "{name}"\n{entry}[plugin.poller]\nkinds = ["{kind}"]\n'
                     f'broker_topic_prefix = "plugin.poller.{name}"\nlifecycle = "long_lived"\n'
                     'tick_timeout_secs = 10\n')
        return name

    def config(self, broker, plugins, jobs, root=None, **top):
        doc = {"state_db": "state.db", "default_jitter_ms": 0, "broker": broker,
               "plugins": plugins, "jobs": jobs, **top}
        path = os.path.join(root or self.root, "pollers.json")
        with open(path, "w") as fh:
            json.dump(doc, fh)
        return path

    def cli(self, config, *args, timeout=60):
        return subprocess.run([PY, NEXO, "--config", config, *args], capture_output=True,
                              text=True, timeout=timeout, cwd=self.root,
                              stdin=subprocess.DEVNULL)

    def daemon(self, config):
        proc = subprocess.Popen([PY, NEXO, "--config", config, "run"],
                                cwd=os.path.dirname(config),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

        def stop():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stderr.close()
        self.addCleanup(stop)
        return proc

    def feed_runner(self, url, *deliveries, **top):
        """A started Runner on NATS whose one job hands on ``deliveries`` each tick."""
        cfg = nx.config_from_dict({"state_db": os.path.join(self.root, "s.db"), "broker": url,
                                   "default_jitter_ms": 0, **top,
                                   "jobs": [{"id": "f", "kind": "feed", "agent": "ana",
                                             "schedule": {"every_secs": 3600}}]},
                                  extra_kinds=["feed"])
        r = nx.Runner(cfg)
        r.register(FakePoller("feed", default=lambda ctx: nx.TickAck(deliver=list(deliveries))))
        self.addCleanup(r.stop)
        r.start()
        return r

    def status(self, config):
        out = self.cli(config, "status", "--json")
        return {j["id"]: j for j in json.loads(out.stdout)} if out.returncode == 0 else {}


class TestDaemonOnNats(NatsDaemonCase):

    def test_supervised_long_lived_plugin_ticks_over_nats(self):
        srv = self.server()
        config = self.config(srv.url, [self.plugin("sdk", "counter")], [
            {"id": "c", "kind": "counter", "schedule": {"every_secs": 0.2}}])
        proc = self.daemon(config)
        self.assertTrue(wait_until(
            lambda: (self.status(config).get("c") or {}).get("items_seen_total", 0) >= 3, 30,
            0.1), "no ticks over NATS")
        proc.terminate()
        self.assertEqual(proc.wait(30), 0)
        self.assertNotIn("Traceback", proc.stderr.read())

    def test_plugin_started_elsewhere_needs_no_entrypoint(self):
        srv = self.server()
        config = self.config(srv.url, [self.plugin("remote", "counter", with_entrypoint=False)],
                             [{"id": "c", "kind": "counter", "schedule": {"every_secs": 0.2}}])
        self.assertEqual(self.cli(config, "validate").returncode, 0)
        env = dict(os.environ, NEXO_BROKER_URL=srv.url, NEXO_POLLER_PLUGIN_ID="remote",
                   NEXO_POLLER_TICK_TOPIC="plugin.poller.remote.tick")
        plugin = subprocess.Popen([PY, SDK_PLUGIN], env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (plugin.poll() is None and plugin.kill(), plugin.wait()))
        self.daemon(config)
        self.assertTrue(wait_until(
            lambda: (self.status(config).get("c") or {}).get("items_seen_total", 0) >= 2, 30,
            0.1), "the plugin on 'another host' got no ticks")

    def test_without_nats_a_long_lived_plugin_needs_an_entrypoint(self):
        config = self.config(None, [self.plugin("remote", "counter", with_entrypoint=False)], [])
        out = self.cli(config, "validate")
        self.assertEqual(out.returncode, 2)
        self.assertIn("only a long-lived plugin on a NATS broker may run elsewhere", out.stderr)

    def test_deliveries_go_out_as_nexo_events_with_their_ids(self):
        srv = self.server()
        got, ready = [], threading.Event()
        sub = nx.NatsClient.connect(srv.url, nexo_envelopes=False)
        self.addCleanup(sub.close)
        sub.subscribe("plugin.outbound.telegram.ana_bot",
                      lambda event: (got.append(event), ready.set()))
        sub.flush()

        r = self.feed_runner(srv.url, nx.Delivery("telegram", "42", {"text": "hi"}),
                             agents={"ana": {"telegram": "ana_bot"}})
        self.assertTrue(ready.wait(30), "no delivery reached the NATS subscriber")
        event = got[0]
        self.assertEqual(event["payload"], {"text": "hi", "to": "42"})
        self.assertEqual(event["source"], "plugin.poller")
        stored = wait_until(lambda: r.state.outbox() == [], 15)
        self.assertTrue(stored, "delivered items leave the outbox")

    def test_the_readme_consumer_gets_each_delivery_event_with_its_id_in_order(self):
        # Issue 21 item 1: through connect_broker a NATS subscriber got only the
        # inner payload, without the id a receiver drops repeats by.
        srv = self.server()
        got, done = [], threading.Event()
        consumer = nx.connect_broker(srv.url)
        self.addCleanup(consumer.close)
        consumer.subscribe("plugin.outbound.telegram",
                           lambda event: (got.append(event), len(got) == 12 and done.set()))
        self.feed_runner(srv.url, *(nx.Delivery("telegram", "42", {"n": n}) for n in range(12)))
        self.assertTrue(done.wait(30), got)
        self.assertEqual([e["payload"] for e in got], [{"n": n, "to": "42"} for n in range(12)])
        self.assertEqual(len({e["id"] for e in got}), 12)


def _children(pid):
    """The processes whose parent is ``pid`` (from /proc)."""
    kids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except (OSError, ValueError):
            continue
        if entry.isdigit() and int(data[data.rindex(b")") + 2:].split()[1]) == pid:
            kids.add(int(entry))
    return kids


class TestKilledDaemonOnNats(NatsDaemonCase):
    """Issue 21 item 4: a SIGKILLed daemon leaves no plugin behind on NATS,
    where nothing closes the plugin's broker connection for it."""

    def test_sigkilled_daemon_leaves_no_plugin_and_the_survivor_keeps_ticking(self):
        srv = self.server()
        configs = []
        for name in ("a", "b"):
            root = os.path.join(self.root, name)
            os.mkdir(root)
            # One plugin id on both daemons: their instances share its queue group.
            configs.append(self.config(srv.url, [self.plugin("sdk", "counter", root=root)], [
                {"id": "c", "kind": "counter", "schedule": {"every_secs": 0.2},
                 "config": {"say": True}}], root=root))
        doomed, survivor = (self.daemon(c) for c in configs)
        for config in configs:
            self.assertTrue(wait_until(
                lambda: (self.status(config).get("c") or {}).get("items_seen_total", 0) >= 3,
                30, 0.1), "no ticks over NATS")
        plugins = wait_until(lambda: _children(doomed.pid), 10)
        self.assertTrue(plugins, "the daemon runs its plugin")
        doomed.kill()
        doomed.wait(10)
        wait_until(lambda: all(pid_gone(p) for p in plugins), 5.0, 0.05)
        stray = [p for p in plugins if not pid_gone(p)]
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
        self.assertEqual(stray, [], "a plugin outlived its SIGKILLed daemon by 5 s")
        seen = self.status(configs[1])["c"]["items_seen_total"]
        self.assertTrue(wait_until(
            lambda: self.status(configs[1])["c"]["items_seen_total"] >= seen + 5, 20, 0.1),
            "the surviving daemon's job stopped succeeding")
        job = self.status(configs[1])["c"]
        self.assertEqual((job["consecutive_errors"], job["last_status"]), (0, "ok"),
                         job["last_error"])
        self.assertIsNone(survivor.poll())


class TestPluginCredentials(NatsDaemonCase):
    """Issue 26 item 18: over NATS, each supervised plugin connects as its own
    user, whose permissions keep it off other plugins' tick topics."""

    USERS = """authorization {
  users = [
    {user: daemon, password: dpw}
    {user: victim, password: "v@w:1", permissions: {
      subscribe: {allow: ["plugin.poller.victim.tick"]},
      publish: {allow: ["plugin.outbound.>"]}, allow_responses: true}}
    {user: rogue, password: rpw, permissions: {
      subscribe: {allow: ["plugin.poller.rogue.tick"]},
      publish: {allow: ["plugin.outbound.>"]}, allow_responses: true}}
  ]
}
"""

    def test_a_plugin_gets_its_own_user_and_cannot_take_another_plugins_ticks(self):
        users = os.path.join(self.root, "nats.conf")
        with open(users, "w") as fh:
            fh.write(self.USERS)
        srv = self.server("-c", users)
        report = os.path.join(self.root, "victim.json")
        self.plugin("victim", "counter")
        with open(os.path.join(self.root, "victim", "nexo-plugin.toml"), "a") as fh:
            fh.write(f"\n[plugin.entrypoint.env]\nSDK_PLUGIN_REPORT = {json.dumps(report)}\n")
        config = self.config(
            f"nats://daemon:dpw@127.0.0.1:{srv.port}", ["victim"],
            [{"id": "c", "kind": "counter", "schedule": {"every_secs": 0.2}}],
            plugin_broker_auth={"victim": {"user": "victim", "password": "v@w:1"}})
        self.daemon(config)
        self.assertTrue(wait_until(lambda: os.path.exists(report), 30))
        with open(report) as fh:
            url = json.load(fh)["env"]["NEXO_BROKER_URL"]
        self.assertEqual(url, f"nats://victim:v%40w%3A1@127.0.0.1:{srv.port}")
        # A plugin connected as another user cannot join the victim's queue group.
        rogue = nx.connect_broker(f"nats://rogue:rpw@127.0.0.1:{srv.port}")
        self.addCleanup(rogue.close)
        stolen = []
        with self.assertRaises(nx.PluginPollerForwardError.Broker) as cm:
            rogue.subscribe("plugin.poller.victim.tick", stolen.append, queue="victim")
        self.assertEqual(cm.exception.code, -32015)
        self.assertIn("Permissions Violation", str(cm.exception))
        seen = (self.status(config).get("c") or {}).get("items_seen_total", 0)
        self.assertTrue(wait_until(
            lambda: (self.status(config).get("c") or {}).get("items_seen_total", 0) >= seen + 5,
            30, 0.1), "the victim's plugin stopped serving its ticks")
        job = self.status(config)["c"]
        self.assertEqual((job["consecutive_errors"], job["last_status"]), (0, "ok"))
        self.assertEqual(stolen, [])

    def test_a_reload_that_changes_a_plugins_credentials_restarts_it_with_them(self):
        srv = self.server()
        self.plugin("victim", "counter")

        def load(token):
            return nx.load_config(self.config(
                srv.url, ["victim"], [], state_db=os.path.join(self.root, "s.db"),
                plugin_broker_auth={"victim": {"token": token}}))
        r = nx.Runner(load("one"))
        self.addCleanup(r.stop)
        r.start()
        self.assertIn("nats://one@", r.supervisors()["victim"].broker_url)
        self.assertEqual(r.reload(load("one"))["restarted"], [])
        self.assertEqual(r.reload(load("two"))["restarted"], ["victim"])
        self.assertIn("nats://two@", r.supervisors()["victim"].broker_url)

    def test_credentials_name_a_known_plugin_and_need_a_nats_broker(self):
        self.plugin("victim", "counter")
        for broker, auth, want in (
                (None, {"victim": {"token": "t"}}, "only a nats:// or tls:// broker"),
                ("nats://127.0.0.1:4222", {"nobody": {"token": "t"}}, "no plugin 'nobody'"),
                ("nats://127.0.0.1:4222", {"victim": {"user": "u"}}, "must be {")):
            config = self.config(broker, ["victim"], [], plugin_broker_auth=auth)
            out = self.cli(config, "validate")
            self.assertEqual(out.returncode, 2, out.stderr)
            self.assertIn(f"plugin_broker_auth", out.stderr)
            self.assertIn(want, out.stderr)


class TestDaemonStateInJetStream(NatsDaemonCase):

    def test_the_cli_and_the_daemon_share_a_bucket(self):
        srv = self.server()
        config = self.config(srv.url, [self.plugin("sdk", "counter")], [
            {"id": "c", "kind": "counter", "schedule": {"every_secs": 0.2}}],
            state_db="jetstream://nexo_test")
        self.assertEqual(self.cli(config, "validate").returncode, 0)
        self.daemon(config)
        self.assertTrue(wait_until(
            lambda: (self.status(config).get("c") or {}).get("items_seen_total", 0) >= 3, 30,
            0.2), "no ticks committed to the bucket")
        out = self.cli(config, "pause", "c")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertTrue(wait_until(lambda: self.status(config)["c"]["paused"], 15, 0.2))
        self.assertFalse(os.path.exists(os.path.join(self.root, "jetstream:")),
                         "a bucket is not a path")

    def test_tick_through_the_daemon_with_a_result_over_64_kib(self):
        # Issue 26 item 6: the stored result was cut with "…" appended, and the
        # CLI died of a JSONDecodeError printing it.
        script = os.path.join(self.root, "big.py")
        with open(script, "w") as fh:
            fh.write("import json, sys\n"
                     "req = json.loads(sys.stdin.readline())\n"
                     "print(json.dumps({'jsonrpc': '2.0', 'id': req.get('id'),\n"
                     "                  'result': {'next_cursor': 'A' * 100000}}))\n")
        srv = self.server()
        config = self.config(srv.url, [write_manifest(self.root, "big", "big", command=PY,
                                                      args=[script])],
                             [{"id": "b", "kind": "big", "schedule": {"every_secs": 3600}}],
                             state_db="jetstream://nexo_test")
        proc = self.daemon(config)
        self.assertTrue(wait_until(lambda: (self.status(config).get("b") or {}).get("cursor"),
                                   30, 0.2), "the daemon's first tick was not stored")
        # Each `tick` also wakes the daemon twice (SIGUSR1 and its watch): it
        # used to answer `busy` (exit 5) to the second wake-up (item 5).
        for _ in range(10 if os.environ.get("NEXO_TEST_FULL") == "1" else 2):
            out = self.cli(config, "tick", "b")
            self.assertNotIn("Traceback", out.stderr)
            self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
            result = json.loads(out.stdout)
            self.assertEqual(result["outcome"], "ok")
            self.assertIn("daemon", result["via"])
            self.assertEqual(result["omitted"], {"next_cursor": 100000})
        self.assertIsNone(proc.poll())

    def test_a_bucket_needs_a_nats_broker(self):
        config = self.config(None, [], [], state_db="jetstream://b")
        out = self.cli(config, "validate")
        self.assertEqual(out.returncode, 2)
        self.assertIn("state_db: a jetstream:// state needs a NATS broker", out.stderr)


class TestDeliveriesToJetStream(NatsDaemonCase):

    def test_a_delivery_counts_only_once_the_capturing_stream_acked_it(self):
        srv = self.server()
        admin = nx.NatsClient.connect(srv.url, nexo_envelopes=False)
        self.addCleanup(admin.close)
        body, _, status = admin.request("$JS.API.STREAM.CREATE.OUTBOUND", {
            "name": "OUTBOUND", "subjects": ["plugin.outbound.>"], "storage": "file",
            "max_msgs": 1, "discard": "new"}, 10,
            raw=True)
        self.assertIsNone(status, body)

        r = self.feed_runner(srv.url, nx.Delivery("telegram", "42", {"n": 1}),
                             nx.Delivery("telegram", "42", {"n": 2}))

        def stored():
            info, _, _ = admin.request("$JS.API.STREAM.INFO.OUTBOUND", {}, 10, raw=True)
            return json.loads(info)["state"]["messages"]
        # The stream takes one message, then refuses (discard new): the second
        # delivery is not acked, so it stays in the outbox and is retried.
        self.assertTrue(wait_until(lambda: any(i.attempts >= 1 for i in r.state.outbox()),
                                   30, 0.1))
        self.assertEqual(stored(), 1)
        self.assertEqual(r.publisher.delivered, 1)
        self.assertEqual([json.loads(i.body)["payload"]["n"] for i in r.state.outbox()], [2])


class TestBootFailures(NatsDaemonCase):

    def assert_one_line(self, out, *words):
        self.assertEqual(out.returncode, 6, out.stderr)
        lines = out.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, out.stderr)
        self.assertTrue(lines[0].startswith("nexo-poller: broker: "), lines[0])
        for w in words:
            self.assertIn(w, lines[0])

    def test_unreachable_server_is_one_line_and_exit_6(self):
        port = free_port()
        config = self.config(f"nats://127.0.0.1:{port}", [], [])
        out = self.cli(config, "run")
        self.assert_one_line(out, f"127.0.0.1:{port}")

    def test_wrong_token_is_one_line_and_exit_6(self):
        srv = self.server("--auth", "s3cret")
        config = self.config(f"nats://wrong@127.0.0.1:{srv.port}", [], [])
        out = self.cli(config, "run")
        self.assert_one_line(out, f"127.0.0.1:{srv.port}")
        self.assertNotIn("wrong", out.stderr.replace("wrong token", ""),
                         "the credential itself is never printed")


if __name__ == "__main__":
    unittest.main()
