"""Tests of the plugin SDK (``run_plugin``) through every way a tick reaches it.

The fixture ``tests/fixtures/sdk_plugin.py`` is a real plugin written with
``nexo_poller.run_plugin``; it runs as a real process in each test.
"""
import os
import subprocess
import sys
import tempfile
import threading
import unittest
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nexo_poller as npl  # noqa: E402
from nexo_poller import (BrokerClient, BrokerServer, PluginPollerHandle,  # noqa: E402
                         PluginPollerProxy, PluginSupervisor, PollContext, PollerError,
                         TickAck, TickMetrics, build_tick_request, encode_cursor,
                         forward_tick, spawn_ephemeral_tick)
from nexo_poller import _plugin_dispatch  # noqa: E402
from support import wait_until  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sdk_plugin.py")
NOW = datetime(2026, 5, 17, 10, 0, 0, tzinfo=timezone.utc)
TICK_TIMEOUT = 30


def make_handle(plugin_id="sdk_test", max_concurrent=4, **kw):
    return PluginPollerHandle(
        plugin_id=plugin_id, kinds=("counter",),
        broker_topic_prefix=f"plugin.poller.{plugin_id}",
        lifecycle="long_lived", max_concurrent_ticks=max_concurrent,
        tick_timeout=timedelta(seconds=TICK_TIMEOUT),
        entrypoint_command=sys.executable, entrypoint_args=(FIXTURE,), **kw)


class _SdkBehaviour:
    """The same expectations, whatever path carries the tick.

    Subclasses implement ``tick(config, cursor, kind) -> TickAck`` and let
    every ``PollerError`` through.
    """

    JOB = "job-1"

    def tick(self, config, cursor=None, kind="counter"):
        raise NotImplementedError

    def test_first_tick_counts_from_zero(self):
        ack = self.tick({})
        self.assertEqual(ack, TickAck(b"1", None, TickMetrics(items_seen=1, items_dispatched=0)))

    def test_cursor_round_trip(self):
        ack = self.tick({}, cursor=b"41")
        self.assertEqual(ack.next_cursor, b"42")
        self.assertEqual(self.tick({}, cursor=ack.next_cursor).next_cursor, b"43")
        self.assertEqual(ack.metrics, TickMetrics(1, 0))

    def test_interval_hint(self):
        ack = self.tick({"interval": 120}, cursor=b"7")
        self.assertEqual(ack.next_cursor, b"8")
        self.assertEqual(ack.next_interval_hint, timedelta(seconds=120))

    def test_transient_error(self):
        with self.assertRaises(PollerError.Transient) as cm:
            self.tick({"raise": "transient"})
        self.assertIn("fixture transient failure", str(cm.exception))
        self.assertIs(cm.exception.classify(), npl.ErrorClass.TRANSIENT)

    def test_transient_error_carries_retry_after(self):
        # Issue 25 item 4: a handler's retry_after never reached the daemon.
        with self.assertRaises(PollerError.Transient) as cm:
            self.tick({"raise": "transient", "retry_after": 60})
        self.assertEqual(cm.exception.retry_after, 60)
        with self.assertRaises(PollerError.Transient) as cm:
            self.tick({"raise": "transient"})
        self.assertIsNone(cm.exception.retry_after)

    def test_reply_retry_after_secs_is_read_and_bad_values_ignored(self):
        # Issue 25 item 4: data.retry_after_secs of an error reply was dropped.
        for data, want in (({"retry_after_secs": 7}, 7), ({"retry_after_secs": 2.5}, 2.5),
                           ({"retry_after_secs": -5}, None), ({"retry_after_secs": "60"}, None),
                           ({"retry_after_secs": True}, None), ([1], None), ("x", None),
                           ({"retry_after_secs": 10 ** 30}, npl._RETRY_AFTER_MAX_SECS)):
            with self.subTest(data=data):
                with self.assertRaises(PollerError.Transient) as cm:
                    self.tick({"error_code": npl.ERROR_TRANSIENT, "error_data": data})
                self.assertEqual(cm.exception.retry_after, want)
        with self.assertRaises(PollerError.Permanent) as cm:      # only a Transient waits
            self.tick({"error_code": npl.ERROR_PERMANENT,
                       "error_data": {"retry_after_secs": 7}})
        self.assertIsNone(getattr(cm.exception, "retry_after", None))

    def test_permanent_error(self):
        with self.assertRaises(PollerError.Permanent) as cm:
            self.tick({"raise": "permanent"})
        self.assertIn("fixture permanent failure", str(cm.exception))
        self.assertIs(cm.exception.classify(), npl.ErrorClass.PERMANENT)

    def test_config_error(self):
        with self.assertRaises(PollerError.Config) as cm:
            self.tick({"raise": "config"})
        self.assertIn("fixture config failure", str(cm.exception))
        self.assertEqual(cm.exception.job, self.JOB)
        self.assertIs(cm.exception.classify(), npl.ErrorClass.CONFIG)

    def test_handler_bug_is_transient(self):
        with self.assertRaises(PollerError.Transient) as cm:
            self.tick({"raise": "other"})
        self.assertIn("fixture bug", str(cm.exception))
        self.assertNotIsInstance(cm.exception, (PollerError.Permanent, PollerError.Config))

    def test_unknown_kind_is_config(self):
        with self.assertRaises(PollerError.Config) as cm:
            self.tick({}, kind="no_such_kind")
        self.assertIn("no_such_kind", str(cm.exception))

    def test_plugin_keeps_serving_after_errors(self):
        for what in ("transient", "permanent", "config", "other"):
            with self.assertRaises(PollerError):
                self.tick({"raise": what})
        self.assertEqual(self.tick({}, cursor=b"99").next_cursor, b"100")


class EphemeralSdkTests(_SdkBehaviour, unittest.TestCase):
    """Each tick spawns the fixture; it serves over stdin/stdout."""

    def tick(self, config, cursor=None, kind="counter"):
        request = build_tick_request(kind, self.JOB, "agent-1", cursor, config, NOW, 60)
        return spawn_ephemeral_tick(sys.executable, "sdk_test", request, TICK_TIMEOUT,
                                    args=[FIXTURE])


    def test_handler_bug_leaves_its_traceback_in_the_stderr_tail(self):
        # Issue 26 item 20: the error used to carry "RuntimeError: fixture bug" alone.
        with self.assertRaises(PollerError.Transient) as cm:
            self.tick({"raise": "other"})
        error = str(cm.exception)
        self.assertIn("; stderr: Traceback (most recent call last):", error)
        self.assertIn("in counter", error)
        self.assertIn('raise RuntimeError("fixture bug")', error)
        self.assertTrue(error.endswith("| RuntimeError: fixture bug"), error)


class _LongLivedBase:
    """One broker and one supervised fixture plugin for the whole class."""

    @classmethod
    def setUpClass(cls):
        cls.server = BrokerServer().start()
        cls.handle = make_handle()
        cls.supervisor = PluginSupervisor(cls.handle, cls.server.url,
                                          backoff_initial=0.05).start()

    @classmethod
    def tearDownClass(cls):
        cls.supervisor.stop()
        cls.server.close()

    def ctx(self, config, cursor=None, kind="counter"):
        return PollContext(job_id=self.JOB, agent_id="agent-1", kind=kind, cursor=cursor,
                           config=config, now=NOW, interval_hint=timedelta(seconds=60))


class SupervisedProxySdkTests(_LongLivedBase, _SdkBehaviour, unittest.TestCase):
    """Long-lived: PluginSupervisor + PluginPollerProxy over the in-process client."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.local = cls.server.client()
        cls.proxy = PluginPollerProxy("counter", cls.handle, cls.local)

    @classmethod
    def tearDownClass(cls):
        cls.local.close()
        super().tearDownClass()

    def tick(self, config, cursor=None, kind="counter"):
        return self.proxy.tick(self.ctx(config, cursor, kind))

    def test_handler_bug_names_where_and_logs_its_traceback(self):
        # Issue 26 item 20: the traceback went nowhere.
        with self.assertRaises(PollerError.Transient) as cm:
            self.tick({"raise": "other"})
        self.assertRegex(str(cm.exception),
                         r"RuntimeError: fixture bug \(at sdk_plugin\.py:\d+ in counter\)")
        self.assertTrue(wait_until(
            lambda: "RuntimeError: fixture bug" in list(self.handle.health.tail)),
            "the traceback reaches the plugin's relayed output")
        self.assertIn("Traceback (most recent call last):", list(self.handle.health.tail))

    def test_plugin_subscribed_once_as_queue_group(self):
        self.tick({})
        self.assertTrue(self.server.has_subscriber(self.handle.tick_topic()))
        self.assertEqual(self.server.stats()["subscriptions"], 1)


class ExternalClientSdkTests(_LongLivedBase, _SdkBehaviour, unittest.TestCase):
    """Long-lived: an external BrokerClient and forward_tick."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.client = BrokerClient.connect(cls.server.url)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        super().tearDownClass()

    def tick(self, config, cursor=None, kind="counter"):
        request = build_tick_request(kind, self.JOB, "agent-1", cursor, config, NOW, 60)
        reply = forward_tick(self.client, self.handle, request)
        self.assertIsInstance(reply, npl.TickReply)
        return reply.into_tick_ack()

    def test_reply_wire_form(self):
        request = build_tick_request("counter", self.JOB, "agent-1", b"41", {"interval": 5},
                                     NOW, 60)
        reply = forward_tick(self.client, self.handle, request)
        self.assertEqual(reply.next_cursor, encode_cursor(b"42"))
        self.assertEqual(reply.next_interval_secs, 5)
        self.assertEqual(reply.metrics, TickMetrics(1, 0))


class EarlyTickTests(unittest.TestCase):
    """A tick sent right after the supervisor starts waits for the plugin."""

    def test_tick_before_subscription_waits(self):
        with BrokerServer() as server:
            handle = make_handle("sdk_early")
            local = server.client()
            sup = PluginSupervisor(handle, server.url, backoff_initial=0.05)
            try:
                sup.start()
                self.assertFalse(server.has_subscriber(handle.tick_topic()))
                ack = PluginPollerProxy("counter", handle, local).tick(PollContext(
                    job_id="j", agent_id="a", kind="counter", cursor=b"5", config={},
                    now=NOW, interval_hint=timedelta(seconds=60)))
                self.assertEqual(ack.next_cursor, b"6")
                self.assertEqual(sup.restarts, 0)
            finally:
                sup.stop()
                local.close()

    def test_forward_tick_before_subscription_waits(self):
        with BrokerServer() as server:
            handle = make_handle("sdk_early_ext")
            sup = PluginSupervisor(handle, server.url, backoff_initial=0.05)
            try:
                with BrokerClient.connect(server.url) as client:
                    sup.start()
                    request = build_tick_request("counter", "j", "a", None, {}, NOW, 60)
                    reply = forward_tick(client, handle, request)
                    self.assertEqual(reply.into_tick_ack().next_cursor, b"1")
            finally:
                sup.stop()


class LeavingTests(unittest.TestCase):
    """A long-lived SDK plugin stops serving once its daemon is gone (issue
    21 item 4): its stdin lifeline closes, or its output pipe breaks."""

    def start(self, server, plugin_id, **env):
        proc = subprocess.Popen(
            [sys.executable, FIXTURE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, NEXO_BROKER_URL=server.url, NEXO_POLLER_PLUGIN_ID=plugin_id,
                     NEXO_POLLER_TICK_TOPIC=make_handle(plugin_id).tick_topic(), **env))

        def cleanup():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                pipe.close()
        self.addCleanup(cleanup)
        self.assertTrue(wait_until(
            lambda: server.has_subscriber(make_handle(plugin_id).tick_topic()), 15))
        return proc

    def test_a_plugin_leaves_when_its_lifeline_closes_finishing_its_tick(self):
        with BrokerServer() as server, tempfile.TemporaryDirectory() as tmp:
            handle = make_handle("sdk_lifeline")
            proc = self.start(server, handle.plugin_id, NEXO_POLLER_LIFELINE="stdin")
            mark = os.path.join(tmp, "mark")
            replies = []
            with BrokerClient.connect(server.url) as client:
                request = build_tick_request("counter", "j", "a", b"1",
                                             {"sleep": 0.5, "mark": mark, "say": True}, NOW, 60)
                asking = threading.Thread(
                    target=lambda: replies.append(forward_tick(client, handle, request)))
                asking.start()
                self.assertTrue(wait_until(lambda: os.path.exists(mark), 15))
                proc.stdin.close()           # the daemon is gone
                asking.join(30)
            self.assertEqual(replies[0].into_tick_ack().next_cursor, b"2",
                             "the tick in flight is answered")
            self.assertEqual(proc.wait(10), 0)
            self.assertFalse(server.has_subscriber(handle.tick_topic()))

    def test_a_plugin_whose_output_pipe_broke_stops_serving(self):
        with BrokerServer() as server:
            handle = make_handle("sdk_broken_pipe")
            proc = self.start(server, handle.plugin_id)
            proc.stdout.close()
            proc.stderr.close()              # nobody reads its output any more
            with BrokerClient.connect(server.url) as client:
                request = build_tick_request("counter", "j", "a", None, {"say": True}, NOW, 60)
                with self.assertRaises(PollerError.Transient) as cm:
                    forward_tick(client, handle, request).into_tick_ack()
            self.assertIn("BrokenPipeError", str(cm.exception))
            self.assertEqual(proc.wait(10), 0, "it went on serving with a broken stderr")


class PluginDispatchTests(unittest.TestCase):
    """The SDK's dispatcher, called directly."""

    def setUp(self):
        self.calls = []

        def counter(ctx):
            self.calls.append(ctx)
            n = 0 if ctx.cursor is None else int(ctx.cursor)
            return TickAck(str(n + 1).encode(), timedelta(seconds=30), TickMetrics(1, 0))

        def failing(ctx):
            raise PollerError.Permanent("gone for good")

        def nothing(ctx):
            return None

        def wrong(ctx):
            return {"next_cursor": "x"}

        self.handlers = {"counter": counter, "failing": failing, "nothing": nothing,
                         "wrong": wrong}

    def envelope(self, req_id=7, **params):
        base = build_tick_request("counter", "job-9", "agent-2", b"41", {"k": "v"}, NOW, 300)
        p = base.to_dict()
        p.update(params)
        return base.envelope(req_id) | {"params": p}

    def test_result_and_id_echo(self):
        for req_id in (7, "abc", None):
            with self.subTest(id=req_id):
                out = _plugin_dispatch(self.handlers, self.envelope(req_id))
                self.assertEqual(out["jsonrpc"], "2.0")
                self.assertIn("id", out)
                self.assertEqual(out["id"], req_id)
                self.assertNotIn("error", out)
                self.assertEqual(out["result"], {"next_cursor": encode_cursor(b"42"),
                                                 "next_interval_secs": 30,
                                                 "metrics": {"items_seen": 1,
                                                             "items_dispatched": 0}})

    def test_context_passed_to_handler(self):
        _plugin_dispatch(self.handlers, self.envelope())
        (ctx,) = self.calls
        self.assertEqual((ctx.job_id, ctx.agent_id, ctx.kind), ("job-9", "agent-2", "counter"))
        self.assertEqual(ctx.cursor, b"41")
        self.assertEqual(ctx.config, {"k": "v"})
        self.assertEqual(ctx.now, NOW)
        self.assertEqual(ctx.interval_hint, timedelta(seconds=300))

    def test_null_cursor(self):
        out = _plugin_dispatch(self.handlers, self.envelope(cursor=None))
        self.assertEqual(out["result"]["next_cursor"], encode_cursor(b"1"))
        self.assertIsNone(self.calls[0].cursor)

    def test_handler_returning_none_is_empty_result(self):
        out = _plugin_dispatch(self.handlers, self.envelope(kind="nothing"))
        self.assertEqual(out["result"], {})

    def test_handler_returning_wrong_type_is_transient(self):
        out = _plugin_dispatch(self.handlers, self.envelope(kind="wrong"))
        self.assertEqual(out["error"]["code"], npl.ERROR_TRANSIENT)

    def test_poller_error_codes(self):
        out = _plugin_dispatch(self.handlers, self.envelope(3, kind="failing"))
        self.assertEqual(out["id"], 3)
        self.assertEqual(out["error"]["code"], npl.ERROR_PERMANENT)
        self.assertIn("gone for good", out["error"]["message"])

    def test_retry_after_is_sent_as_error_data(self):
        # Issue 25 item 4: the SDK had no way to say "not before N seconds".
        def limited(ctx):
            raise PollerError.Transient("rate limited", retry_after=90)
        self.handlers["limited"] = limited
        out = _plugin_dispatch(self.handlers, self.envelope(4, kind="limited"))
        self.assertEqual(out["error"], {"code": npl.ERROR_TRANSIENT, "message": "rate limited",
                                        "data": {"retry_after_secs": 90}})
        out = _plugin_dispatch(self.handlers, self.envelope(5, kind="failing"))
        self.assertNotIn("data", out["error"])

    def test_unknown_method(self):
        env = self.envelope(11)
        env["method"] = "shutdown_now"
        out = _plugin_dispatch(self.handlers, env)
        self.assertEqual(out["jsonrpc"], "2.0")
        self.assertEqual(out["id"], 11)
        self.assertEqual(out["error"]["code"], -32601)
        self.assertIn("shutdown_now", out["error"]["message"])
        self.assertEqual(self.calls, [])

    def test_missing_method(self):
        env = self.envelope(12)
        del env["method"]
        out = _plugin_dispatch(self.handlers, env)
        self.assertEqual(out["error"]["code"], -32601)
        self.assertEqual(out["id"], 12)

    def test_not_an_object(self):
        for env in ([1, 2], "poll_tick", None, 5):
            with self.subTest(envelope=env):
                out = _plugin_dispatch(self.handlers, env)
                self.assertEqual(out["jsonrpc"], "2.0")
                self.assertIsNone(out["id"])
                self.assertIn("error", out)
                self.assertIsInstance(out["error"]["code"], int)

    def test_bad_params(self):
        for params in ([1], "x", None, 5):
            with self.subTest(params=params):
                env = self.envelope(13)
                env["params"] = params
                out = _plugin_dispatch(self.handlers, env)
                self.assertEqual(out["id"], 13)
                self.assertEqual(out["error"]["code"], -32602)
        self.assertEqual(self.calls, [])

    def test_bad_fields(self):
        cases = [{"job_id": 5}, {"agent_id": None}, {"now": "yesterday"}, {"now": 17},
                 {"interval_hint_secs": -1}, {"interval_hint_secs": "60"}]
        for change in cases:
            with self.subTest(change=change):
                out = _plugin_dispatch(self.handlers, self.envelope(14, **change))
                self.assertEqual(out["id"], 14)
                self.assertEqual(out["error"]["code"], -32602, out)
        self.assertEqual(self.calls, [])

    def test_unknown_kind(self):
        out = _plugin_dispatch(self.handlers, self.envelope(15, kind="rss"))
        self.assertEqual(out["error"]["code"], -32602)
        self.assertIn("rss", out["error"]["message"])
        out = _plugin_dispatch(self.handlers, self.envelope(16, kind=None))
        self.assertEqual(out["error"]["code"], -32602)

    def test_bad_cursor(self):
        for cursor in ("!!not_b64!!", 12, ["a"], "a"):
            with self.subTest(cursor=cursor):
                out = _plugin_dispatch(self.handlers, self.envelope(17, cursor=cursor))
                self.assertEqual(out["id"], 17)
                self.assertEqual(out["error"]["code"], -32602, out)
        self.assertEqual(self.calls, [])

    def test_padded_cursor_accepted(self):
        out = _plugin_dispatch(self.handlers, self.envelope(cursor="NDE="))
        self.assertEqual(out["result"]["next_cursor"], encode_cursor(b"42"))

    def test_envelope_without_jsonrpc_members(self):
        env = {"method": "poll_tick", "params": self.envelope()["params"]}
        out = _plugin_dispatch(self.handlers, env)
        self.assertEqual(out["jsonrpc"], "2.0")
        self.assertIsNone(out["id"])
        self.assertEqual(out["result"]["next_cursor"], encode_cursor(b"42"))


if __name__ == "__main__":
    unittest.main()
