"""The stdio lifecycle (issue 14): one long-lived plugin process reached
through its stdin/stdout with JSON-RPC 2.0 lines, nexo's ``plugin.toml``
read as written, the SDK under the stdio lifecycle, and the stdio broker
bridge.  The plugin is tests/fixtures/nexo_stdio_template (an imitation of
nexo's Python template, not a copy)."""

import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nexo_poller as nx  # noqa: E402
from nexo_poller import (BrokerServer, Lifecycle, ManifestError, PluginPollerHandle,  # noqa: E402
                         PluginSupervisor, PollContext, PollerError, StdioPollerProxy,
                         config_from_dict, load_manifest)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import pid_gone, wait_until  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "fixtures", "nexo_stdio_template")
SDK_PLUGIN = os.path.join(HERE, "fixtures", "sdk_plugin.py")
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
WAIT = 30.0


class LogWatch(logging.Handler):
    """Collects the module's log lines and wakes whoever waits for one."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []
        self.cond = threading.Condition()

    def emit(self, record):
        with self.cond:
            self.lines.append(record.getMessage())
            self.cond.notify_all()

    def wait_for(self, text, timeout=WAIT):
        with self.cond:
            return self.cond.wait_for(lambda: self.has(text), timeout)

    def has(self, text):
        return any(text in line for line in self.lines)


def ctx(config=None, cursor=None, job="job-1", kind="template_poll"):
    return PollContext(job_id=job, agent_id="agent-1", kind=kind, cursor=cursor,
                       config=config if config is not None else {}, now=NOW,
                       interval_hint=timedelta(seconds=60))


class _StdioCase(unittest.TestCase):

    def setUp(self):
        self.fds = len(os.listdir("/proc/self/fd"))
        self.addCleanup(self.nothing_left)          # runs last
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.record = os.path.join(self.tmp.name, "record.txt")
        self.logs = LogWatch()
        logger = logging.getLogger("nexo_poller")
        level = logger.level
        logger.setLevel(logging.DEBUG)          # setLevel: it clears the logger's cache
        logger.addHandler(self.logs)
        self.addCleanup(logger.setLevel, level)
        self.addCleanup(logger.removeHandler, self.logs)

    def nothing_left(self):
        """No child process and no fd outlives a test."""
        self.assertEqual(nx._CHILDREN.pids, set())
        self.assertTrue(wait_until(lambda: len(os.listdir("/proc/self/fd")) <= self.fds, WAIT),
                        os.listdir("/proc/self/fd"))

    def template(self, **changes):
        """The template's handle from its plugin.toml, with test knobs."""
        handle = load_manifest(os.path.join(TEMPLATE, "plugin.toml"))
        env = {"TEMPLATE_RECORD": self.record, **changes.pop("env", {})}
        return dataclasses.replace(handle, entrypoint_env=env, **changes)

    def supervise(self, handle, broker=None):
        sup = PluginSupervisor(handle, "", backoff_initial=0.05)
        self.addCleanup(self.stopped, sup)
        sup.start()
        return sup, StdioPollerProxy(handle.kinds[0], handle, broker)

    def stopped(self, sup):
        sup.stop()
        pids = {sup.handle.stdio.pid}
        self.assertTrue(all(pid is None or pid_gone(pid) for pid in pids))
        self.assertFalse(sup._thread.is_alive())

    def recorded(self):
        try:
            with open(self.record) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    @staticmethod
    def count(ack):
        return int(ack.next_cursor)


class ManifestTests(unittest.TestCase):

    def write(self, text, name="plugin.toml"):
        tmp = tempfile.mkdtemp()
        self.addCleanup(lambda: [os.remove(os.path.join(tmp, n)) for n in os.listdir(tmp)]
                        and os.rmdir(tmp) or os.path.isdir(tmp) and os.rmdir(tmp))
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_plugin_toml_as_written(self):
        h = load_manifest(os.path.join(TEMPLATE, "plugin.toml"))
        self.assertEqual(h.plugin_id, "template-poller-python")
        self.assertEqual(h.kinds, ("template_poll",))
        self.assertIs(h.lifecycle, Lifecycle.STDIO)
        self.assertEqual((h.entrypoint_command, h.entrypoint_args), ("python3", ("main.py",)))
        self.assertEqual(h.working_dir, TEMPLATE)
        self.assertEqual(h.tick_topic(), "plugin.poller.template-poller-python.tick")

    def test_pollers_json_names_the_folder_or_the_file(self):
        for entry in (TEMPLATE, os.path.join(TEMPLATE, "plugin.toml")):
            cfg = config_from_dict({"plugins": [entry], "jobs": []}, base_dir=HERE)
            self.assertEqual([h.plugin_id for h in cfg.plugins], ["template-poller-python"])

    def test_rules_name_file_and_key(self):
        base = '[plugin]\nid = "p"\n[capabilities]\npollers = ["k1"]\n'
        cases = [
            (base + '[transport]\nkind = "http"\ncommand = "x"\n', "transport.kind"),
            (base + '[transport]\nkind = "stdio"\n', "transport.command"),
            ('[plugin]\nid = "p"\n[transport]\nkind = "stdio"\ncommand = "x"\n', "capabilities"),
            (base.replace('["k1"]', '["Bad"]') + '[transport]\nkind = "stdio"\ncommand = "x"\n',
             "capabilities.pollers[0]"),
            (base + '[transport]\nkind = "stdio"\ncommand = "x"\npublish_allow = [1]\n',
             "transport.publish_allow[0]"),
        ]
        for text, key in cases:
            path = self.write(text)
            with self.assertRaises(ManifestError) as cm:
                load_manifest(path)
            self.assertIn(path, str(cm.exception))
            self.assertIn(key, str(cm.exception))

    def test_nexo_plugin_toml_lifecycle_stdio(self):
        path = self.write('[plugin]\nid = "p"\n[plugin.entrypoint]\ncommand = "./run"\n'
                          '[plugin.poller]\nkinds = ["k1"]\nbroker_topic_prefix = "a.b"\n'
                          'lifecycle = "stdio"\nstdio_bridge = true\n'
                          'publish_allow = ["plugin.outbound.>"]\n', "nexo-plugin.toml")
        h = load_manifest(path)
        self.assertIs(h.lifecycle, Lifecycle.STDIO)
        self.assertTrue(h.stdio_bridge)
        self.assertEqual(h.publish_allow, ("plugin.outbound.>",))
        self.assertEqual(h.entrypoint_command, os.path.join(os.path.dirname(path), "run"))

    def test_topic_allowlist(self):
        allow = ("plugin.outbound.>", "a.*.c")
        self.assertTrue(nx._topic_allowed("plugin.outbound.telegram.bot", allow))
        self.assertTrue(nx._topic_allowed("a.b.c", allow))
        self.assertFalse(nx._topic_allowed("plugin.outbound", allow))
        self.assertFalse(nx._topic_allowed("a.b.c.d", allow))
        self.assertFalse(nx._topic_allowed("x.y", ()))


class StdioLifecycleTests(_StdioCase):

    def test_three_ticks_one_process(self):
        sup, proxy = self.supervise(self.template())
        cursor, pids = None, set()
        for expected in (1, 2, 3):
            ack = proxy.tick(ctx(cursor=cursor))
            self.assertEqual(self.count(nx.TickAck(next_cursor=ack.next_cursor)), expected)
            self.assertEqual(ack.metrics.items_seen, 1)
            (d,) = ack.deliver
            self.assertEqual((d.channel, d.recipient, d.payload["n"]),
                             ("telegram", "chat-1", expected))
            pids.add(d.payload["pid"])
            cursor = ack.next_cursor
        self.assertEqual(pids, {sup.handle.stdio.pid})
        self.assertEqual(sup.restarts, 0)
        self.assertTrue(self.logs.wait_for("initialized"))
        self.assertIn("initialize template-poller-python", self.recorded())

    def test_many_ticks_in_flight_answered_out_of_order(self):
        n = 8
        sup, proxy = self.supervise(self.template(max_concurrent_ticks=n))
        done, lock, results = [], threading.Lock(), {}

        def run(i):
            ack = proxy.tick(ctx({"delay": 0.15 * (n - i), "tag": i}, job=f"job-{i}"))
            with lock:
                done.append(i)
                results[i] = ack.deliver[0].payload["tag"]
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        self.assertEqual(results, {i: i for i in range(n)})     # each reply to its request
        self.assertNotEqual(done, sorted(done))                 # and not in sending order
        self.assertEqual(done[0], n - 1)

    def test_killed_mid_tick_fails_at_once_and_restarts(self):
        sup, proxy = self.supervise(self.template())
        proxy.tick(ctx())
        old = sup.handle.stdio.pid
        errors = []

        def hang():
            try:
                proxy.tick(ctx({"hang": True}))
            except PollerError as exc:
                errors.append(exc)
        t = threading.Thread(target=hang)
        started = time.monotonic()
        t.start()
        self.assertTrue(wait_until(lambda: "hang" in self.recorded(), WAIT))
        os.killpg(old, signal.SIGKILL)
        t.join(WAIT)
        self.assertLess(time.monotonic() - started, 20)          # not the 60 s timeout
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0].classify(), nx.ErrorClass.TRANSIENT)
        self.assertTrue(wait_until(lambda: sup.handle.stdio.pid not in (None, old)
                                   and sup.handle.health.down is None, WAIT))
        ack = proxy.tick(ctx())
        self.assertEqual(ack.deliver[0].payload["pid"], sup.handle.stdio.pid)
        self.assertGreaterEqual(sup.restarts, 1)
        self.assertTrue(pid_gone(old))

    def test_plugin_that_never_answers_initialize(self):
        saved = nx.STDIO_INIT_WAIT_SECS
        nx.STDIO_INIT_WAIT_SECS = 0.2
        self.addCleanup(setattr, nx, "STDIO_INIT_WAIT_SECS", saved)
        sup, proxy = self.supervise(self.template(env={"TEMPLATE_NO_INIT": "1"}))
        self.assertEqual(proxy.tick(ctx()).deliver[0].payload["n"], 1)
        self.assertTrue(self.logs.wait_for("no answer to initialize"))
        self.assertEqual(proxy.tick(ctx()).deliver[0].payload["n"], 1)

    def test_flood_on_stdout_is_bounded_and_dropped(self):
        sup, proxy = self.supervise(self.template())
        ack = proxy.tick(ctx({"flood": nx.DEFAULT_MAX_REPLY_BYTES * 3}))
        self.assertEqual(ack.deliver[0].payload["n"], 1)
        self.assertTrue(self.logs.has("longer than"))
        self.assertEqual(sup.restarts, 0)

    def test_oversize_reply_fails_its_tick_at_once(self):
        sup, proxy = self.supervise(self.template())
        started = time.monotonic()
        with self.assertRaises(PollerError) as cm:
            proxy.tick(ctx({"big": nx.DEFAULT_MAX_REPLY_BYTES}))
        self.assertIn("longer than", str(cm.exception))
        self.assertLess(time.monotonic() - started, 30)           # not the 60 s timeout
        self.assertEqual(proxy.tick(ctx()).deliver[0].payload["n"], 1)
        self.assertEqual(sup.restarts, 0)

    def test_reply_for_unknown_id_is_dropped(self):
        sup, proxy = self.supervise(self.template())
        ack = proxy.tick(ctx({"bogus": True}))
        self.assertEqual(ack.deliver[0].payload["n"], 1)
        self.assertTrue(self.logs.has("reply for unknown id 987654 dropped"))
        self.assertEqual(sup.handle.stdio.dropped, 1)

    def test_timed_out_request_is_forgotten_and_its_late_reply_dropped(self):
        sup, proxy = self.supervise(self.template(tick_timeout=timedelta(seconds=1)))
        with self.assertRaises(PollerError) as cm:
            proxy.tick(ctx({"delay": 2}))
        self.assertIn("timed out after 1s (no reply)", str(cm.exception))
        self.assertTrue(self.logs.wait_for("dropped (timed out or never sent)"))
        self.assertEqual(proxy.tick(ctx()).deliver[0].payload["n"], 1)

    def test_shutdown_request_comes_before_sigterm(self):
        sup, proxy = self.supervise(self.template(env={"TEMPLATE_LINGER": "1"}))
        proxy.tick(ctx())
        pid = sup.handle.stdio.pid
        sup.stop()
        self.assertTrue(pid_gone(pid))
        seen = self.recorded()
        self.assertIn("shutdown", seen, seen)
        self.assertIn("SIGTERM", seen, seen)
        self.assertLess(seen.index("shutdown"), seen.index("SIGTERM"))
        self.assertLess(seen.index("eof"), seen.index("SIGTERM"), seen)
        self.assertTrue(self.logs.has("acknowledged shutdown"))

    def test_sdk_plugin_under_the_stdio_lifecycle(self):
        handle = PluginPollerHandle(
            plugin_id="sdk-stdio", kinds=("counter",), broker_topic_prefix="plugin.sdk",
            lifecycle="stdio", max_concurrent_ticks=2, tick_timeout=timedelta(seconds=30),
            entrypoint_command=sys.executable, entrypoint_args=(SDK_PLUGIN,))
        sup, proxy = self.supervise(handle)
        cursor = None
        for expected in (b"1", b"2", b"3"):
            ack = proxy.tick(ctx(cursor=cursor, kind="counter"))
            self.assertEqual(ack.next_cursor, expected)
            cursor = ack.next_cursor
        self.assertTrue(self.logs.wait_for("initialized"))
        self.assertEqual(sup.restarts, 0)
        with self.assertRaises(PollerError) as cm:
            proxy.tick(ctx({"raise": "permanent"}, kind="counter"))
        self.assertEqual(cm.exception.classify(), nx.ErrorClass.PERMANENT)
        # Issue 25 item 4: the SDK's retry_after crosses the stdio lifecycle.
        with self.assertRaises(PollerError.Transient) as cm:
            proxy.tick(ctx({"raise": "transient", "retry_after": 30}, kind="counter"))
        self.assertEqual(cm.exception.retry_after, 30)

    def test_runner_serves_the_template_from_pollers_json(self):
        cfg = config_from_dict({
            "state_db": os.path.join(self.tmp.name, "state.db"), "default_jitter_ms": 0,
            "shutdown_grace_secs": 5, "plugins": [TEMPLATE],
            "jobs": [{"id": "t", "kind": "template_poll", "schedule": {"every_secs": 3600}}]},
            base_dir=self.tmp.name)
        runner = nx.Runner(cfg, deliver=lambda topic, event: None).open()
        try:
            outs = [runner.run_once("t") for _ in range(3)]
        finally:
            runner.stop()
        self.assertEqual([o.status.value for o in outs], ["ok"] * 3)
        self.assertEqual([o.ack.deliver[0].payload["n"] for o in outs], [1, 2, 3])
        self.assertEqual(len({o.ack.deliver[0].payload["pid"] for o in outs}), 1)
        self.assertTrue(pid_gone(outs[0].ack.deliver[0].payload["pid"]))


class BridgeTests(_StdioCase):

    def setUp(self):
        super().setUp()
        self.server = BrokerServer().start()
        self.addCleanup(self.server.close)
        self.broker = self.server.client()
        self.addCleanup(self.broker.close)

    def test_bridge_both_ways_with_allowlist(self):
        got, forbidden = threading.Event(), []
        received = []
        self.broker.subscribe("plugin.outbound.telegram", lambda ev: (received.append(ev),
                                                                      got.set()))
        self.broker.subscribe("forbidden.topic", forbidden.append)
        handle = self.template(stdio_bridge=True, publish_allow=("plugin.outbound.>",))
        sup, proxy = self.supervise(handle, self.broker)
        # the tick travels as broker.event on the tick topic, the reply as broker.publish
        ack = proxy.tick(ctx({"publish": ["forbidden.topic", "plugin.outbound.telegram"]}))
        self.assertEqual(ack.deliver[0].payload["n"], 1)
        self.assertIn(f"event {handle.tick_topic()}", self.recorded())
        self.assertTrue(got.wait(WAIT))
        self.assertEqual(received[0]["payload"], {"from": "tpl"})
        self.assertTrue(self.logs.has("publish to forbidden.topic refused"))
        self.assertEqual(forbidden, [])
        # any broker message for the plugin goes down as a broker.event
        handle.stdio.event("plugin.inbound.x", {"topic": "plugin.inbound.x", "payload": 1})
        self.assertTrue(wait_until(lambda: "event plugin.inbound.x" in self.recorded(), WAIT))

    def test_sdk_plugin_over_the_bridge(self):
        handle = PluginPollerHandle(
            plugin_id="sdk-bridge", kinds=("counter",), broker_topic_prefix="plugin.sdkb",
            lifecycle="stdio", tick_timeout=timedelta(seconds=30), stdio_bridge=True,
            entrypoint_command=sys.executable, entrypoint_args=(SDK_PLUGIN,))
        sup, proxy = self.supervise(handle, self.broker)
        self.assertEqual(proxy.tick(ctx(cursor=b"41", kind="counter")).next_cursor, b"42")
        # Issue 25 item 4: and the bridge (its reply is a nexo Event's payload).
        with self.assertRaises(PollerError.Transient) as cm:
            proxy.tick(ctx({"raise": "transient", "retry_after": 30}, kind="counter"))
        self.assertEqual(cm.exception.retry_after, 30)


if __name__ == "__main__":
    unittest.main()
