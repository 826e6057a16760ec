"""The broker-client contract (sections "Broker" and "NATS"), written once and
run against every client in ``CLIENTS``: the Unix-socket ``BrokerClient``,
the daemon's in-process client, and ``NatsClient`` against a real
nats-server.  Adding a client is adding it to the list.

The contract (README "Broker protocol"): ``subscribe -> int``,
``unsubscribe -> None``, ``publish -> None`` (the payload travels in a fresh
nexo Event), ``publish_event -> None`` (a made Event, sent as it is),
``deliver -> None`` once a subscriber took the Event (or raises),
``request -> the reply payload``, ``wait_closed -> bool``, ``close -> None``;
a request's handler gets the request payload, a published message's handler
gets the Event it travels in, one at a time in the order published; errors
are ``PluginPollerForwardError.Broker`` with a code."""

import os
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nexo_poller as nx  # noqa: E402
from nats_support import NatsServer, require_nats  # noqa: E402
from support import wait_until  # noqa: E402

WAIT = 10.0
EVENT_KEYS = {"id", "timestamp", "topic", "source", "session_id", "payload"}


class _UnixSocket:
    """BrokerClient over the embedded broker's Unix socket."""
    name = "unix socket"

    def start(self):
        self.server = nx.BrokerServer().start()
        self.url = self.server.url

    def client(self):
        return nx.connect_broker(self.url)

    def stop(self):
        self.server.close()


class _InProcess(_UnixSocket):
    """The daemon's own client of its embedded broker."""
    name = "in-process"

    def client(self):
        return self.server.client()


class _Nats:
    """NatsClient against a real nats-server on loopback."""
    name = "nats"

    def start(self):
        require_nats()
        self.server = NatsServer().start()
        self.url = self.server.url

    def client(self):
        return nx.connect_broker(self.url)

    def stop(self):
        self.server.cleanup()


CLIENTS = [_UnixSocket, _InProcess, _Nats]


def code_of(exc):
    return getattr(exc, "code", None)


class BrokerContract:
    """Every member of the contract; ``broker`` is one of CLIENTS."""
    broker: type

    @classmethod
    def setUpClass(cls):
        cls.b = cls.broker()
        cls.b.start()

    @classmethod
    def tearDownClass(cls):
        cls.b.stop()

    def setUp(self):
        self.topics = (f"t{n}.{id(self)}" for n in range(100))

    def client(self):
        c = self.b.client()
        self.addCleanup(c.close)
        return c

    def subscribed(self, client, topic, handler, queue=None):
        sid = client.subscribe(topic, handler, queue)
        self.assertIsInstance(sid, int)
        return sid

    # -- request / reply ------------------------------------------------------------

    def test_request_gets_the_handlers_answer_to_the_payload_it_sent(self):
        a, b = self.client(), self.client()
        topic = next(self.topics)
        seen = []
        self.subscribed(b, topic, lambda p: (seen.append(p), {"echo": p})[1])
        self.assertEqual(a.request(topic, {"n": 1}, WAIT), {"echo": {"n": 1}})
        self.assertEqual(a.request(topic, None, WAIT), {"echo": None})
        self.assertEqual(seen, [{"n": 1}, None], "a request's handler gets the bare payload")

    def test_request_to_nobody_fails_at_once_with_no_responders(self):
        a = self.client()
        with self.assertRaises(nx.PluginPollerForwardError.Broker) as cm:
            a.request(next(self.topics), {}, 30)
        self.assertEqual(code_of(cm.exception), nx.BROKER_NO_RESPONDERS)

    def test_request_waits_for_a_late_subscriber_with_wait(self):
        a, b = self.client(), self.client()
        topic = next(self.topics)
        out = {}
        asking = threading.Thread(target=lambda: out.setdefault(
            "reply", a.request(topic, 2, WAIT, wait=True)))
        asking.start()
        self.subscribed(b, topic, lambda p: p * 21)
        asking.join(WAIT + 5)
        self.assertEqual(out.get("reply"), 42)

    def test_unanswered_request_times_out(self):
        a, b = self.client(), self.client()
        topic, release = next(self.topics), threading.Event()
        self.addCleanup(release.set)
        self.subscribed(b, topic, lambda p: release.wait(WAIT))
        with self.assertRaises(nx.PluginPollerForwardError.Broker) as cm:
            a.request(topic, 1, 0.3)
        self.assertEqual(code_of(cm.exception), nx.BROKER_TIMEOUT)

    def test_cancelled_request_ends_as_a_timeout_saying_so(self):
        a, b = self.client(), self.client()
        topic, release, cancel = next(self.topics), threading.Event(), threading.Event()
        self.addCleanup(release.set)
        self.subscribed(b, topic, lambda p: (cancel.set(), release.wait(WAIT)))
        with self.assertRaises(nx.PluginPollerForwardError.Broker) as cm:
            a.request(topic, 1, 30, cancel=cancel)
        self.assertEqual(code_of(cm.exception), nx.BROKER_TIMEOUT)
        self.assertIn("cancelled", str(cm.exception))

    def test_a_failing_handler_answers_a_responder_error(self):
        a, b = self.client(), self.client()
        topic = next(self.topics)
        self.subscribed(b, topic, lambda p: 1 / 0)
        with self.assertRaises(nx.PluginPollerForwardError.Broker) as cm:
            a.request(topic, 1, WAIT)
        self.assertEqual(code_of(cm.exception), nx.BROKER_RESPONDER_ERROR)
        self.assertIn("ZeroDivisionError", str(cm.exception))

    def test_a_queue_group_answers_each_request_once(self):
        a = self.client()
        topic, served = next(self.topics), []
        for name in ("m1", "m2", "m3"):
            self.subscribed(self.client(), topic,
                            lambda p, name=name: (served.append(name), p)[1], queue="g")
        self.assertEqual([a.request(topic, n, WAIT) for n in range(12)], list(range(12)))
        self.assertEqual(len(served), 12, "once each, not once per member")

    # -- publish / subscribe ---------------------------------------------------------

    def test_publish_returns_none_and_the_subscriber_gets_the_event(self):
        a, b = self.client(), self.client()
        topic, got = next(self.topics), []
        self.subscribed(b, topic, got.append)
        self.assertIsNone(a.publish(topic, {"text": "hi"}))
        self.assertTrue(wait_until(lambda: got, WAIT))
        event = got[0]
        self.assertEqual(set(event), EVENT_KEYS, event)
        self.assertEqual((event["topic"], event["payload"]), (topic, {"text": "hi"}))

    def test_publish_event_keeps_the_events_id(self):
        a, b = self.client(), self.client()
        topic, got = next(self.topics), []
        self.subscribed(b, topic, got.append)
        made = nx.nexo_event(topic, {"n": 1}, event_id="fixed-id")
        self.assertIsNone(a.publish_event(topic, made))
        self.assertTrue(wait_until(lambda: got, WAIT))
        self.assertEqual(got, [made], "the Event as sent, id and all, not wrapped again")

    def test_published_messages_reach_a_handler_in_order_one_at_a_time(self):
        a, b = self.client(), self.client()
        topic, order, second = next(self.topics), [], threading.Event()
        lock, inside, most = threading.Lock(), [0], [0]

        def handler(event):
            n = event["payload"]
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            if n == 0:                  # a slow first message must not be overtaken
                second.wait(0.5)
            elif n == 1:
                second.set()
            with lock:                  # the order handlers finish in, not start in
                order.append(n)
                inside[0] -= 1
        self.subscribed(b, topic, handler)
        for n in range(20):
            a.publish(topic, n)
        self.assertTrue(wait_until(lambda: len(order) == 20, WAIT), order)
        self.assertEqual(order, list(range(20)))
        self.assertEqual(most[0], 1, "handlers ran side by side")

    def test_unsubscribe_stops_delivery(self):
        a, b = self.client(), self.client()
        topic = next(self.topics)
        sid = self.subscribed(b, topic, lambda p: p)
        self.assertEqual(a.request(topic, 1, WAIT), 1)
        self.assertIsNone(b.unsubscribe(sid))
        with self.assertRaises(nx.PluginPollerForwardError.Broker) as cm:
            a.request(topic, 1, WAIT)
        self.assertEqual(code_of(cm.exception), nx.BROKER_NO_RESPONDERS)

    def test_deliver_returns_once_a_subscriber_took_the_event(self):
        a, b = self.client(), self.client()
        topic, got = next(self.topics), []
        self.subscribed(b, topic, got.append)
        made = nx.nexo_event(topic, {"n": 2})
        self.assertIsNone(a.deliver(topic, made))
        self.assertTrue(wait_until(lambda: got, WAIT))
        self.assertEqual(got, [made])

    def test_payload_that_is_not_json_is_refused_naming_it(self):
        a = self.client()
        for send in (lambda: a.publish(next(self.topics), {1, 2}),
                     lambda: a.request(next(self.topics), {1, 2}, WAIT)):
            with self.assertRaises(nx.PluginPollerForwardError.Broker) as cm:
                send()
            self.assertEqual(code_of(cm.exception), nx.BROKER_INVALID_PARAMS)
            self.assertIn("not JSON", str(cm.exception))

    # -- closing -----------------------------------------------------------------------

    def test_close_ends_the_client_and_later_calls_fail_closed(self):
        a = self.b.client()
        a.close()
        self.assertTrue(a.wait_closed(WAIT))
        for call in (lambda: a.publish("x", 1), lambda: a.request("x", 1, WAIT),
                     lambda: a.subscribe("x", lambda p: p)):
            with self.assertRaises(nx.PluginPollerForwardError.Broker) as cm:
                call()
            self.assertEqual(code_of(cm.exception), nx.BROKER_CLOSED)


for _broker in CLIENTS:
    _name = "Test" + "".join(w.capitalize() for w in _broker.name.replace("-", " ").split())
    globals()[_name] = type(_name, (BrokerContract, unittest.TestCase), {"broker": _broker})
del _broker, _name


class TestOneFactory(unittest.TestCase):
    """Issue 21 item 6: one function maps a broker URL to a client."""

    def test_connect_broker_refuses_an_unknown_scheme_naming_it(self):
        for url in ("http://x", "unix:/x", "", None):
            with self.assertRaises(nx.PluginPollerForwardError.Broker) as cm:
                nx.connect_broker(url)
            self.assertEqual(code_of(cm.exception), nx.BROKER_INVALID_PARAMS)

    def test_nothing_else_reads_a_scheme_or_tests_a_client_class(self):
        with open(nx.__file__, encoding="utf-8") as f:
            source = f.read()
        lines = [n for n, line in enumerate(source.splitlines(), 1)
                 if 'in ("nats", "tls")' in line]
        self.assertEqual(len(lines), 1, f"a NATS scheme is tested at lines {lines}; "
                                        "only the NATS URL parser may")
        self.assertNotIn("isinstance(broker, NatsClient)", source)


if __name__ == "__main__":
    unittest.main()
