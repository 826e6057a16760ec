"""Deliveries and channel alerts of nexo_poller (sections "Wire", "State",
"Runner"): read from replies, stored with the cursor, drained in order."""

import http.server
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import (NEXO, PY, b64, FakePoller, TempDirCase, count_ticks,  # noqa: E402
                     no_threads_named, quiet_log, wait_until)

import nexo_poller as nx  # noqa: E402
from nexo_poller import Delivery, PollerError, Runner, TickAck, TickMetrics  # noqa: E402

WAIT = 15.0
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def feed_poller(batches=None) -> FakePoller:
    """An in-process poller whose ticks hand on ``batches``, one per tick (then
    nothing); the cursor counts ticks."""
    batches = list(batches or [])

    def step(ctx):
        items = batches.pop(0) if batches else []
        return TickAck(next_cursor=count_ticks(ctx).next_cursor,
                       metrics=TickMetrics(len(items), len(items)), deliver=items)
    return FakePoller("feed", default=step)


class Sink:
    """A ``deliver`` hook that records, and fails while ``down`` is set."""

    def __init__(self):
        self.got = []
        self.down = threading.Event()
        self.changed = threading.Condition()

    def __call__(self, topic, event):
        if self.down.is_set():
            raise ConnectionError("channel down")
        with self.changed:
            self.got.append((topic, event))
            self.changed.notify_all()

    def wait_for(self, n, timeout=WAIT):
        with self.changed:
            return self.changed.wait_for(lambda: len(self.got) >= n, timeout)


class Receiver:
    """A webhook receiver on a raw loopback socket, so a test decides every
    byte of the answer: ``answer(conn, topic, event)`` writes it.  Records
    each request (method, path, topic, event) and each connection the client
    closed before the answer was complete."""

    def __init__(self, test, answer):
        self.answer = answer
        self.requests, self.cut = [], []
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d/hook" % self.sock.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()
        test.addCleanup(self.close)

    def close(self):
        self.stopping.set()
        self.sock.shutdown(socket.SHUT_RDWR)        # wakes the accept
        self.sock.close()
        for t in list(self.threads):
            t.join(WAIT)

    def wait_for(self, pred):
        with self.changed:
            return self.changed.wait_for(lambda: pred(self), WAIT)

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(WAIT)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:])}
            while len(body) < int(headers.get("content-length", 0)):
                chunk = conn.recv(4096)
                if not chunk:
                    return
                body += chunk
            event = json.loads(body) if body else None
            with self.changed:
                self.requests.append((method, path, headers.get("x-nexo-topic"), event))
                self.changed.notify_all()
            try:
                self.answer(self, conn, headers.get("x-nexo-topic"), event)
            except OSError:
                with self.changed:
                    self.cut.append(headers.get("x-nexo-topic"))
                    self.changed.notify_all()


class DeliveryCase(TempDirCase):
    tmp_prefix = "nexo-deliver-"

    def config(self, jobs, **top):
        top = {"delivery_retry_initial_secs": 0.02, "delivery_retry_max_secs": 0.1, **top}
        return self.runner_config(jobs, extra_kinds=["feed"], base_dir=".", **top)

    @staticmethod
    def job(id="a", every=3600, **kw):
        return {"id": id, "kind": "feed", "agent": "ana", "schedule": {"every_secs": every}, **kw}

    def runner(self, cfg, poller, **kw):
        return self.start_runner(cfg, poller, **kw)

    def outbox_rows(self, table="outbox"):
        db = sqlite3.connect(self.db, timeout=10)
        try:
            return db.execute(f"SELECT id, job, what, topic FROM {table} ORDER BY n").fetchall()
        finally:
            db.close()


class ReplyParsingTests(unittest.TestCase):

    def test_deliver_is_read_from_a_reply(self):
        reply = nx.TickReply.from_dict({"deliver": [
            {"channel": "telegram", "recipient": "42", "payload": {"text": "hi"}},
            {"channel": "email", "recipient": "a@b", "payload": "plain"}]})
        ack = reply.into_tick_ack()
        self.assertEqual(ack.deliver, (Delivery("telegram", "42", {"text": "hi"}),
                                       Delivery("email", "a@b", "plain")))
        self.assertEqual(nx.TickReply.from_ack(ack).to_dict()["deliver"][1],
                         {"channel": "email", "recipient": "a@b", "payload": "plain"})

    def test_a_malformed_entry_is_transient_and_named(self):
        for bad, words in (([{"channel": "telegram"}], "deliver[0].recipient"),
                           ([{"channel": "a.b", "recipient": "x"}], "deliver[0].channel"),
                           ({"channel": "x"}, "deliver must be an array"),
                           ([{"recipient": "x", "channel": "ok"}, 7], "deliver[1]")):
            with self.subTest(bad=bad), self.assertRaises(PollerError.Transient) as cm:
                nx._reply_to_ack({"result": {"deliver": bad}}, "job")
            self.assertIn(words, str(cm.exception))

    def test_tickack_deliver_takes_only_deliveries(self):
        self.assertEqual(TickAck(deliver=[Delivery("c", "r")]).deliver, (Delivery("c", "r"),))
        with self.assertRaises(TypeError):
            TickAck(deliver=[{"channel": "c"}])


class OutboxTests(DeliveryCase):

    def test_deliveries_reach_the_broker_as_nexo_events(self):
        feed = feed_poller([[Delivery("telegram", "42", {"text": "one"}),
                      Delivery("telegram", "42", "two")]])
        r = self.runner(self.config([self.job()], agents={"ana": {"telegram": "ana_bot"}}), feed)
        got, cond = [], threading.Condition()

        def on(msg):
            with cond:
                got.append(msg)
                cond.notify_all()
        r.broker.subscribe("plugin.outbound.telegram.ana_bot", on)
        self.assertEqual(r.fire_due(), 1)
        self.assertTrue(r.wait_idle(WAIT))
        with cond:
            self.assertTrue(cond.wait_for(lambda: len(got) == 2, WAIT), got)
        first, second = got
        self.assertEqual(set(first), {"id", "timestamp", "topic", "source", "session_id",
                                      "payload"})
        self.assertEqual(first["topic"], "plugin.outbound.telegram.ana_bot")
        self.assertEqual(first["source"], "plugin.poller")
        self.assertIsNone(first["session_id"])
        self.assertRegex(first["timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
        self.assertEqual(first["payload"], {"text": "one", "to": "42"})
        self.assertEqual(second["payload"], {"text": "two", "to": "42"})
        self.assertNotEqual(first["id"], second["id"])
        self.assertTrue(wait_until(lambda: self.outbox_rows() == [], WAIT))
        self.assertTrue(wait_until(
            lambda: r.status()[0]["items_dispatched_total"] == 2, WAIT))

    def test_without_an_agent_map_the_topic_has_no_instance(self):
        sink = Sink()
        r = self.runner(self.config([self.job()]), feed_poller([[Delivery("slack", "#ops", 1)]]),
                        deliver=sink)
        r.fire_due()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertTrue(sink.wait_for(1))
        self.assertEqual(sink.got[0][0], "plugin.outbound.slack")
        self.assertEqual(sink.got[0][1]["payload"], {"text": 1, "to": "#ops"})

    def test_no_subscriber_means_not_delivered_yet(self):
        feed = feed_poller([[Delivery("telegram", "42", {"n": 1})]])
        r = self.runner(self.config([self.job()]), feed)
        r.fire_due()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertTrue(wait_until(lambda: any(i.attempts >= 2 for i in r.state.outbox()), WAIT))
        self.assertEqual(r.status()[0]["items_dispatched_total"], 0)
        got = threading.Event()
        r.broker.subscribe("plugin.outbound.telegram", lambda msg: got.set())
        r.poke()
        self.assertTrue(got.wait(WAIT), "delivered once a subscriber listens")

    def test_an_outage_delays_deliveries_and_keeps_their_order_per_job(self):
        batches = [[Delivery("c", "r", {"n": n})] for n in range(5)]
        sink = Sink()
        sink.down.set()
        feed = feed_poller(batches)
        r = self.runner(self.config([self.job(every=0.01)]), feed, deliver=sink)
        while len(feed.calls) < 5:
            self.assertTrue(wait_until(r.fire_due, WAIT, 0.005))
            self.assertTrue(r.wait_idle(WAIT))
        self.assertTrue(wait_until(lambda: len(r.state.outbox()) >= 5, WAIT))
        self.assertEqual(sink.got, [])
        sink.down.clear()
        r.poke()
        self.assertTrue(sink.wait_for(5))
        self.assertEqual([e["payload"]["n"] for _, e in sink.got], [0, 1, 2, 3, 4])

    def test_a_lost_commit_delivers_nothing(self):
        sink = Sink()
        r = self.runner(self.config([self.job()]), feed_poller([[Delivery("c", "r", {"n": 1})]]),
                        deliver=sink)
        thief = nx.SqliteStateStore(self.db, owner="thief")
        self.addCleanup(thief.close)
        thief.run(lambda db: db.execute("UPDATE jobs SET lease_owner='thief'"))
        self.assertEqual(r.run_once("a").status, "unstored")
        self.assertEqual(self.outbox_rows(), [])
        r.poke()
        self.assertFalse(sink.wait_for(1, 0.3))

    def test_committed_deliveries_survive_a_restart(self):
        sink = Sink()
        sink.down.set()
        cfg = self.config([self.job()])
        r1 = self.runner(cfg, feed_poller([[Delivery("c", "r", {"n": 1}),
                                            Delivery("c", "r", {"n": 2})]]), deliver=sink)
        r1.fire_due()
        self.assertTrue(r1.wait_idle(WAIT))
        self.assertTrue(wait_until(lambda: any(i.attempts for i in r1.state.outbox()), WAIT))
        ids = [row[0] for row in self.outbox_rows()]
        self.assertEqual(len(ids), 2)
        r1.stop()
        sink2 = Sink()
        self.runner(cfg, feed_poller(), deliver=sink2)
        self.assertTrue(sink2.wait_for(2))
        self.assertEqual([e["id"] for _, e in sink2.got], ids, "the same stable event ids")

    def test_dead_letter_after_max_attempts_unblocks_the_job(self):
        sink = Sink()
        calls = []

        def flaky(topic, event):
            calls.append(event["payload"]["n"])
            if event["payload"]["n"] == 1:
                raise ConnectionError("recipient refuses")
            sink(topic, event)
        feed = feed_poller([[Delivery("c", "r", {"n": 1}), Delivery("c", "r", {"n": 2})]])
        r = self.runner(self.config([self.job()], delivery_max_attempts=3,
                                    alert_topic="test.alerts"), feed, deliver=flaky)
        alerts = []
        r.broker.subscribe("test.alerts", alerts.append)
        r.fire_due()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertTrue(sink.wait_for(1))
        self.assertEqual(calls[:3], [1, 1, 1], "retried in order before anything after it")
        self.assertEqual(sink.got[0][1]["payload"]["n"], 2)
        dead = wait_until(lambda: r.state.outbox(dead=True), WAIT)
        self.assertEqual([(d.attempts, d.last_error) for d in dead],
                         [(3, "ConnectionError: recipient refuses")])
        self.assertTrue(wait_until(lambda: alerts, WAIT))
        self.assertIn("dead letters", alerts[0]["payload"]["reason"])
        self.assertEqual(r.state.outbox_retry(), 1)
        self.assertEqual(self.outbox_rows("dead_letters"), [])

    def test_a_failing_receiver_with_a_long_queue_does_not_hold_other_jobs(self):
        # Follow-up item 1: the publisher saw only the 500 oldest items; job
        # a's 600, stuck behind a refused head, hid job b's delivery.
        sink = Sink()

        def refusing(topic, event):
            if topic.endswith(".down"):
                raise ConnectionError("receiver down")
            sink(topic, event)
        cfg = self.config([self.job("a"), self.job("b")], delivery_retry_initial_secs=600,
                          delivery_retry_max_secs=600)
        r = self.runner(cfg, feed_poller([[Delivery("down", "x", {"n": n}) for n in range(600)],
                                   [Delivery("up", "y", {"n": 0})]]), deliver=refusing)
        r.run_once("a")
        self.assertTrue(wait_until(lambda: any(i.attempts for i in r.state.outbox()), WAIT))
        r.run_once("b")
        self.assertTrue(sink.wait_for(1), "job b's delivery waited behind job a's queue")
        self.assertEqual(sink.got[0][0], "plugin.outbound.up")
        self.assertTrue(wait_until(lambda: len(self.outbox_rows()) == 600, WAIT),
                        "job a's items stay, job b's is settled")

    def test_failure_to_alert_goes_through_the_outbox_as_nexo_text(self):
        sink = Sink()

        def revoked(ctx):
            raise PollerError.Permanent("token revoked")
        job = self.job(failure_to={"channel": "telegram", "to": "ops-chat"})
        r = self.runner(self.config([job], agents={"ana": {"telegram": "ana_bot"}}),
                        FakePoller("feed", default=revoked), deliver=sink)
        r.fire_due()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertTrue(sink.wait_for(1))
        topic, event = sink.got[0]
        self.assertEqual(topic, "plugin.outbound.telegram.ana_bot")
        self.assertEqual(event["payload"]["to"], "ops-chat")
        self.assertTrue(event["payload"]["text"].startswith(
            "\u26a0 poller `a` (kind=feed) failing: token revoked"), event["payload"])


class TickOrderTests(DeliveryCase):
    """Issue 26 item 7: the deliveries of one tick reach the sink in the
    order the tick gave them, on either backend."""

    def check_order(self, **top):
        batch = [Delivery("c", "r", {"n": n}) for n in range(40)]
        sink = Sink()
        cfg = self.config([self.job()], **top)
        r = self.runner(cfg, feed_poller([batch, batch[:3]]), deliver=sink)
        self.assertTrue(wait_until(r.fire_due, WAIT, 0.005))
        self.assertTrue(r.wait_idle(WAIT))
        r.run_once("a")
        self.assertTrue(sink.wait_for(43))
        self.assertEqual([e["payload"]["n"] for _, e in sink.got], list(range(40)) + [0, 1, 2])

    def test_sqlite_keeps_the_order_of_a_tick(self):
        self.check_order()

    def test_jetstream_keeps_the_order_of_a_tick(self):
        from nats_support import NatsServer, require_nats
        require_nats()
        server = NatsServer().start()
        self.addCleanup(server.cleanup)
        self.check_order(state_db="jetstream://jobs", broker=server.url)


class WebhookTests(DeliveryCase):

    def test_webhook_sink_posts_events_and_retries_non_2xx(self):
        seen, lock = [], threading.Lock()
        status = [503]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    seen.append((self.headers["X-Nexo-Topic"], json.loads(body), status[0]))
                    code = status[0]
                    status[0] = 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addCleanup(server.server_close)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.shutdown)
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        r = self.runner(self.config([self.job()], delivery_sink=url),
                        feed_poller([[Delivery("telegram", "42", {"text": "hi"})]]))
        r.fire_due()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertTrue(wait_until(lambda: len(seen) >= 2, WAIT), seen)
        (topic, first, code1), (_, again, code2) = seen[:2]
        self.assertEqual((code1, code2), (503, 200))
        self.assertEqual(topic, "plugin.outbound.telegram")
        self.assertEqual(first["id"], again["id"], "a retry carries the same event id")
        self.assertEqual(again["payload"], {"text": "hi", "to": "42"})
        self.assertTrue(wait_until(lambda: self.outbox_rows() == [], WAIT))

    def test_a_redirect_is_not_a_delivery(self):
        moved = [True]

        def answer(rcv, conn, topic, event):
            if moved[0] or event is None:
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        rcv = Receiver(self, answer)
        r = self.runner(self.config([self.job()], delivery_sink=rcv.url),
                        feed_poller([[Delivery("telegram", "42", {"text": "hi"})]]))
        r.run_once("a")
        # Retried, never followed: no GET of the Location, the item stays.
        self.assertTrue(rcv.wait_for(lambda v: len(v.requests) >= 2), rcv.requests)
        self.assertEqual({(m, p) for m, p, _, _ in rcv.requests}, {("POST", "/hook")})
        self.assertEqual(len(self.outbox_rows()), 1, "a 302 counted as delivered")
        self.assertEqual(r.publisher.delivered, 0)
        moved[0] = False
        self.assertTrue(wait_until(lambda: self.outbox_rows() == [], WAIT))
        self.assertEqual(rcv.requests[-1][3]["payload"], {"text": "hi", "to": "42"})

    @staticmethod
    def trickle(rcv, conn, topic, event):
        """Answer 200, then one header byte at a time, never ending the headers."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not rcv.stopping.wait(0.2):
            conn.sendall(b"z")

    def test_a_trickling_receiver_is_cut_at_the_deadline(self):
        rcv = Receiver(self, self.trickle)
        with mock.patch.object(nx, "_WEBHOOK_TIMEOUT_SECS", 1.0):
            r = self.runner(self.config([self.job()], delivery_sink=rcv.url),
                            feed_poller([[Delivery("telegram", "42", {"text": "hi"})]]))
            r.run_once("a")
            self.assertTrue(rcv.wait_for(lambda v: v.cut and len(v.requests) >= 2),
                            "the trickled answer was not cut off and retried")
        rcv.stopping.set()
        self.assertEqual(len(self.outbox_rows()), 1)

    def test_one_slow_receiver_does_not_hold_other_jobs(self):
        def answer(rcv, conn, topic, event):
            if topic.endswith(".slow"):
                return self.trickle(rcv, conn, topic, event)
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        rcv = Receiver(self, answer)
        with mock.patch.object(nx, "_WEBHOOK_TIMEOUT_SECS", 4 * WAIT):
            r = self.runner(self.config([self.job("a"), self.job("b")], delivery_sink=rcv.url),
                            feed_poller([[Delivery("slow", "1", "x")],
                                         [Delivery("fast", "2", "y")]]))
            r.run_once("a")
            self.assertTrue(rcv.wait_for(lambda v: v.requests))
            r.run_once("b")
            self.assertTrue(wait_until(lambda: [j for _, j, _, _ in self.outbox_rows()] == ["a"],
                                       WAIT), "job b's delivery waited behind job a's")
            self.assertEqual([t for _, _, t, _ in rcv.requests],
                             ["plugin.outbound.slow", "plugin.outbound.fast"])
            self.assertEqual(rcv.cut, [], "job a's attempt is still under way")
        rcv.stopping.set()                  # the trickle ends: the runner stops at once

    def test_a_bad_sink_url_is_a_config_error(self):
        with self.assertRaises(nx.ConfigError) as cm:
            self.config([], delivery_sink="ftp://x")
        self.assertIn("delivery_sink", str(cm.exception))
        with self.assertRaises(nx.ConfigError) as cm:
            self.config([], agents={"ana": {"tele.gram": "x"}})
        self.assertIn("agents.ana.tele.gram", str(cm.exception))


class PluginDeliveryTests(DeliveryCase):
    """Deliveries from real plugins of each lifecycle reach a broker subscriber."""

    def plugin_config(self, lifecycle, script, args, kind):
        folder = os.path.join(self.dir, lifecycle)
        os.mkdir(folder)
        with open(os.path.join(folder, "nexo-plugin.toml"), "w") as fh:
            fh.write(f'[plugin]\nid = "{lifecycle}"\n[plugin.entrypoint]\n'
                     f'command = {json.dumps(PY)}\nargs = {json.dumps([script, *args])}\n'
                     f'[plugin.poller]\nkinds = ["{kind}"]\nlifecycle = "{lifecycle}"\n'
                     f'broker_topic_prefix = "plugin.poller.{lifecycle}"\n')
        deliver = [{"channel": "telegram", "recipient": "u1", "payload": {"text": lifecycle}}]
        return nx.config_from_dict({
            "state_db": self.db, "default_jitter_ms": 0, "shutdown_grace_secs": 3,
            "plugins": [folder], "jobs": [{"id": "j", "kind": kind, "agent": "ana",
                                           "schedule": {"every_secs": 3600},
                                           "config": {"deliver": deliver}}]})

    def check(self, cfg, text):
        r = Runner(cfg)
        self.addCleanup(r.stop)
        got = threading.Event()
        seen = []
        r.open()
        r.broker.subscribe("plugin.outbound.telegram",
                           lambda event: (seen.append(event), got.set()))
        r.start()
        self.assertTrue(got.wait(30), f"no delivery from the {text} plugin")
        self.assertEqual(seen[0]["payload"], {"text": text, "to": "u1"})

    def test_nexo_template_ephemeral_plugin(self):
        self.check(self.plugin_config("ephemeral", os.path.join(FIXTURES, "template_plugin.py"),
                                      [], "template_poll"), "ephemeral")

    def test_sdk_long_lived_plugin(self):
        self.check(self.plugin_config("long_lived", os.path.join(FIXTURES, "sdk_plugin.py"),
                                      [], "counter"), "long_lived")


class OutboxCliTests(DeliveryCase):

    def cli(self, config_path, *args):
        return subprocess.run([PY, NEXO, "--config", config_path, *args], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    def test_list_retry_and_drop_stuck_deliveries(self):
        sink = Sink()
        sink.down.set()
        path = os.path.join(self.dir, "pollers.json")
        with open(path, "w") as fh:
            json.dump({"state_db": self.db, "jobs": []}, fh)
        r = self.runner(self.config([self.job()], delivery_max_attempts=1),
                        feed_poller([[Delivery("c", "r", {"n": 1}), Delivery("c", "r", {"n": 2})]]),
                        deliver=sink)
        r.fire_due()
        self.assertTrue(r.wait_idle(WAIT))
        self.assertTrue(wait_until(lambda: len(r.state.outbox(dead=True)) == 2, WAIT))
        r.stop()
        out = self.cli(path, "outbox", "--dead", "--json")
        self.assertEqual(out.returncode, 0, out.stderr)
        listed = json.loads(out.stdout)
        self.assertEqual([d["body"]["payload"]["n"] for d in listed], [1, 2])
        self.assertEqual(listed[0]["last_error"], "ConnectionError: channel down")
        refused = self.cli(path, "outbox", "drop", "--dead", listed[0]["id"])
        self.assertEqual(refused.returncode, 2)
        self.assertIn("confirm with --yes", refused.stderr)
        dropped = self.cli(path, "outbox", "drop", "--dead", listed[0]["id"], "--yes")
        self.assertEqual(dropped.stdout.strip(), "outbox drop: 1 item")
        retried = self.cli(path, "outbox", "retry", "--yes")
        self.assertEqual(retried.stdout.strip(), "outbox retry: 1 item")
        self.assertEqual(self.cli(path, "outbox").stdout.splitlines()[0], "1 undelivered")
        sink.down.clear()
        self.runner(self.config([self.job()]), feed_poller(), deliver=sink)
        self.assertTrue(sink.wait_for(1))
        self.assertEqual(sink.got[0][1]["payload"]["n"], 2)


class DaemonTests(TempDirCase):
    """The real daemon, with nexo's Python template as an ephemeral plugin."""
    tmp_prefix, quiet = "nexo-deliver-e2e-", False

    def setUp(self):
        super().setUp()
        self.root = self.dir
        plugin = os.path.join(self.root, "tpl")
        os.mkdir(plugin)
        with open(os.path.join(plugin, "nexo-plugin.toml"), "w") as fh:
            fh.write(f'[plugin]\nid = "tpl"\n[plugin.entrypoint]\ncommand = {json.dumps(PY)}\n'
                     f'args = [{json.dumps(os.path.join(FIXTURES, "template_plugin.py"))}]\n'
                     '[plugin.poller]\nkinds = ["template_poll"]\n'
                     'broker_topic_prefix = "plugin.poller.template"\nlifecycle = "ephemeral"\n')
        self.port = None

    def write_config(self, sink_url):
        deliver = [{"channel": "telegram", "recipient": "u1", "payload": {"text": "new item"}}]
        cfg = {"state_db": "state.db", "default_jitter_ms": 0, "delivery_sink": sink_url,
               "delivery_retry_initial_secs": 0.05, "delivery_retry_max_secs": 0.2,
               "plugins": ["tpl"], "jobs": [{
                   "id": "tpl-job", "kind": "template_poll", "agent": "ana",
                   "schedule": {"every_secs": 0.2},
                   "config": {"deliver": deliver, "next_interval_secs": 0}}]}
        path = os.path.join(self.root, "pollers.json")
        with open(path, "w") as fh:
            json.dump(cfg, fh)
        return path

    def daemon(self, config):
        proc = subprocess.Popen([PY, NEXO, "--config", config, "--log-format", "json", "run"],
                                cwd=self.root, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

        def stop():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()
        self.addCleanup(stop)
        return proc

    def test_sigkill_between_commit_and_publish_delivers_after_restart(self):
        import socket
        with socket.socket() as s:                 # a port nobody listens on (yet)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = self.write_config(f"http://127.0.0.1:{port}/hook")
        db = os.path.join(self.root, "state.db")
        proc = self.daemon(config)

        def queued():
            try:
                c = sqlite3.connect(db, timeout=5)
                try:
                    return c.execute("SELECT count(*) FROM outbox").fetchone()[0] >= 3
                finally:
                    c.close()
            except sqlite3.Error:
                return False
        self.assertTrue(wait_until(queued, 30, 0.05), "the template's deliveries were queued")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        c = sqlite3.connect(db, timeout=5)
        cursor = c.execute("SELECT cursor FROM jobs WHERE id='tpl-job'").fetchone()[0]
        committed = int(cursor.decode())
        stored = [json.loads(b)["id"] for (b,) in c.execute("SELECT body FROM outbox")]
        c.close()
        self.assertGreaterEqual(len(stored), committed - 1)
        seen, lock = [], threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    seen.append(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.addCleanup(server.server_close)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.shutdown)
        proc2 = self.daemon(config)
        self.assertTrue(wait_until(lambda: {e["id"] for e in seen} >= set(stored), 30, 0.05),
                        "every delivery committed before the kill arrives after the restart")
        with lock:
            self.assertEqual(seen[0]["payload"], {"text": "new item", "to": "u1"})
            self.assertEqual(seen[0]["topic"], "plugin.outbound.telegram")
            ids = [e["id"] for e in seen]
        self.assertEqual(ids[:len(stored)], stored, "in commit order")
        proc2.send_signal(signal.SIGTERM)
        self.assertEqual(proc2.wait(30), 0)


class PublisherThreadTests(unittest.TestCase):
    """A job thread that cannot start leaves the job deliverable, and
    stop() joins only threads that started (review finding 3)."""

    def publisher(self, sink):
        """A publisher of one item (e1 of job j) through ``sink``, and the
        list its settles go to, each (delivered, retry, dead)."""
        item = nx.OutboxItem("e1", "j", "delivery", "t", '{"id": "e1"}', time.time())
        settled = []
        state = types.SimpleNamespace(
            outbox_pending=lambda limit, now: [] if settled else [item],
            outbox_settle=lambda d, r, dead, now: settled.append((d, r, dead)))
        runner = types.SimpleNamespace(clock=time.time, state=state, config=nx.DaemonConfig(),
                                       rng=random.Random(), note_delivered=lambda items: None,
                                       dead_letter=lambda item, error: None)
        return nx._Publisher(runner, sink), settled

    def test_a_job_thread_that_cannot_start_is_tried_again(self):
        sent = []

        def sink(topic, event):
            sent.append(event["id"])
        sink.parallel = 4
        pub, settled = self.publisher(sink)
        quiet_log(self)
        with no_threads_named("nexo-outbox-job"):
            try:
                pub._pass(background=True)
            except RuntimeError:
                pass                        # the old code let it out
        pub._pass(background=True)
        self.assertTrue(wait_until(lambda: settled, 10), "job j was left busy for ever")
        self.assertEqual(sent, ["e1"])
        # A thread marked busy but not started yet (the loop between the
        # two) is not joined: stop() returns instead of raising.
        pub._busy["k"] = threading.Thread(target=lambda: None)
        pub.stop(time.monotonic() + 10)

    def test_a_webhook_attempt_in_flight_ends_with_the_shutdown(self):
        # The receiver takes the request and never answers (the attempt's
        # own deadline is 10 s): stop() cuts it at its deadline, and its
        # retry is settled before stop() returns (the store closes next).
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        pub, settled = self.publisher(
            nx._webhook_sink(f"http://127.0.0.1:{listener.getsockname()[1]}/hook"))
        quiet_log(self)
        pub._pass(background=True)
        listener.settimeout(WAIT)
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        got = b""
        while b"\r\n\r\n" not in got:         # the request is in: the attempt waits
            got += conn.recv(4096)
        pub.stop(time.monotonic() + 0.2)
        self.assertEqual([t for t in threading.enumerate() if t.name == "nexo-outbox-job"], [])
        [(delivered, retry, dead)] = settled
        self.assertEqual((delivered, dead, [r[0] for r in retry]), ([], [], ["e1"]))


if __name__ == "__main__":
    unittest.main()
