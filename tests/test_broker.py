"""Tests of the broker: BrokerServer, BrokerClient and the in-process client.

Real Unix sockets, real threads; raw sockets where the wire itself is tested.
"""
import json
import os
import socket
import stat
import sys
import tempfile
import threading
import time
import unittest
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nexo_poller as npl  # noqa: E402
from nexo_poller import BrokerClient, BrokerServer, PluginPollerForwardError  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import wait_until  # noqa: E402

WAIT = 10.0        # generous bound for anything that should happen "soon"


class RawConn:
    """A client that speaks the wire by hand."""

    def __init__(self, path, timeout=WAIT):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.ids = iter(range(1000, 10**9))
        self.skipped = []           # lines call() read past while waiting for its id

    def send(self, obj):
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("broker closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, method, params=None):
        """Send a request and return the response with its id (skipping messages)."""
        req_id = next(self.ids)
        msg = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        while True:
            reply = self.recv()
            if reply.get("id") == req_id:
                return reply
            self.skipped.append(reply)

    def read_until_closed(self):
        """Every line until the broker closes the connection."""
        lines = []
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            self.buf += chunk
        for line in self.buf.split(b"\n"):
            if line.strip():
                lines.append(json.loads(line))
        self.buf = b""
        return lines

    def close(self):
        self.sock.close()


def broker_code(exc):
    return getattr(exc, "code", None)


def burst(requester, topic, n):
    """``n`` requests 0..n-1 sent at once from as many threads; their answers."""
    results = [None] * n
    start = threading.Barrier(n)

    def ask(i):
        start.wait(WAIT)
        results[i] = requester.request(topic, i, WAIT)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    return results


class BrokerLifecycleTests(unittest.TestCase):

    def test_default_path_start_url_close(self):
        server = BrokerServer(path=None)
        folder = os.path.dirname(server.path)
        try:
            self.assertIs(server.start(), server)
            self.assertEqual(server.url, "unix://" + server.path)
            self.assertTrue(os.path.isabs(server.path))
            self.assertTrue(stat.S_ISSOCK(os.lstat(server.path).st_mode))
            with BrokerClient.connect(server.url) as c:
                self.assertEqual(c._call("ping", {}, WAIT), "pong")
        finally:
            server.close()
        self.assertFalse(os.path.lexists(server.path), "socket file left behind")
        self.assertFalse(os.path.lexists(folder), "broker's own directory left behind")
        server.close()      # idempotent

    def test_socket_mode_0600_and_private_dir(self):
        with BrokerServer() as server:
            mode = stat.S_IMODE(os.stat(server.path).st_mode)
            self.assertEqual(mode, 0o600, oct(mode))
            dmode = stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode)
            self.assertEqual(dmode & 0o077, 0, f"directory mode {oct(dmode)} lets others in")

    def test_given_path_socket_mode_0600(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sub", "b.sock")
            with BrokerServer(path) as server:
                self.assertEqual(server.path, path)
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
                dmode = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
                self.assertEqual(dmode & 0o077, 0, oct(dmode))
            self.assertFalse(os.path.lexists(path))

    def test_stale_socket_file_replaced(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "b.sock")
            dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dead.bind(path)
            dead.close()                 # leaves the file, nobody listening
            self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode))
            with BrokerServer(path) as server:
                with BrokerClient.connect(server.url) as c:
                    self.assertEqual(c._call("ping", {}, WAIT), "pong")

    def test_live_broker_at_same_path_is_an_error(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "b.sock")
            with BrokerServer(path) as first:
                second = BrokerServer(path)
                with self.assertRaises(PluginPollerForwardError.Broker) as cm:
                    second.start()
                self.assertIn(path, str(cm.exception))
                second.close()
                # The first broker is untouched and still serves.
                self.assertTrue(os.path.lexists(path))
                with BrokerClient.connect(first.url) as c:
                    self.assertEqual(c._call("ping", {}, WAIT), "pong")

    def test_regular_file_at_path_is_an_error(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "b.sock")
            with open(path, "w") as f:
                f.write("precious")
            server = BrokerServer(path)
            with self.assertRaises(PluginPollerForwardError.Broker) as cm:
                server.start()
            self.assertIn(path, str(cm.exception))
            server.close()
            with open(path) as f:
                self.assertEqual(f.read(), "precious")

    def test_close_fails_requests_in_flight(self):
        server = BrokerServer().start()
        self.addCleanup(server.close)
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def h(p):
            entered.set()
            release.wait(WAIT)
            return "late"
        responder = BrokerClient.connect(server.url)
        self.addCleanup(responder.close)
        responder.subscribe("stuck", h)
        local = server.client()
        self.addCleanup(local.close)
        remote = BrokerClient.connect(server.url)
        self.addCleanup(remote.close)
        outcomes = {}

        def ask(name, client):
            try:
                outcomes[name] = client.request("stuck", name, 30)
            except PluginPollerForwardError.Broker as exc:
                outcomes[name] = exc
            outcomes[name + "_at"] = time.monotonic()
        threads = [threading.Thread(target=ask, args=("local", local)),
                   threading.Thread(target=ask, args=("remote", remote))]
        for t in threads:
            t.start()
        self.assertTrue(entered.wait(WAIT))
        self.assertTrue(wait_until(lambda: server.stats()["pending"] == 2))
        closed_at = time.monotonic()
        server.close()
        for t in threads:
            t.join(WAIT)
            self.assertFalse(t.is_alive())
        for name in ("local", "remote"):
            self.assertIsInstance(outcomes[name], PluginPollerForwardError.Broker,
                                  outcomes)
            self.assertLess(outcomes[name + "_at"] - closed_at, 5.0)
        self.assertTrue(remote.wait_closed(WAIT))
        self.assertEqual(server.stats()["pending"], 0)

    def test_connect_to_missing_broker_fails(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(PluginPollerForwardError.Broker):
                BrokerClient.connect("unix://" + os.path.join(d, "none.sock"), timeout=2)


class _ServerCase(unittest.TestCase):
    """A running broker per test; every client is closed and the broker must
    forget every connection and subscription afterwards."""

    def setUp(self):
        self.server = BrokerServer().start()
        self._closers = []

    def tearDown(self):
        for close in reversed(self._closers):
            close()
        ok = wait_until(lambda: self._zero(self.server.stats()))
        stats = self.server.stats()
        self.server.close()
        self.assertTrue(ok, f"broker bookkeeping not back to zero: {stats}")

    @staticmethod
    def _zero(stats):
        return (stats["connections"] == 0 and stats["subscriptions"] == 0
                and stats["pending"] == 0 and stats["parked"] == 0 and stats["topics"] == 0)

    def connect(self):
        c = BrokerClient.connect(self.server.url)
        self._closers.append(c.close)
        return c

    def local(self):
        c = self.server.client()
        self._closers.append(c.close)
        return c

    def raw(self):
        r = RawConn(self.server.path)
        self._closers.append(r.close)
        return r

    def clients(self):
        """(name, factory) for both client flavours."""
        return (("socket", self.connect), ("local", self.local))


class RequestReplyTests(_ServerCase):

    def test_request_reply_every_client_combination(self):
        for rname, rmake in self.clients():
            for qname, qmake in self.clients():
                with self.subTest(responder=rname, requester=qname):
                    responder, requester = rmake(), qmake()
                    topic = f"svc.echo.{rname}.{qname}"
                    sid = responder.subscribe(topic, lambda p: {"echo": p, "by": rname})
                    out = requester.request(topic, {"n": 1, "s": "é"}, 10)
                    self.assertEqual(out, {"echo": {"n": 1, "s": "é"}, "by": rname})
                    responder.unsubscribe(sid)
                    self.assertFalse(self.server.has_subscriber(topic))

    def test_an_in_process_request_reaches_a_socket_as_the_wire_says(self):
        # The daemon's client reuses the JSON text it checked the payload
        # with; the line must be what encoding the whole message gives.
        raw = self.raw()
        raw.call("subscribe", {"topic": "svc.wire", "sid": "s-1"})
        payload = {"n": 1, "s": "é\u2028", "list": [1.5, None, True], "nested": {"a": "b"}}
        asker = threading.Thread(target=lambda: self._ask_quietly("svc.wire", payload))
        asker.start()
        line = raw.sock.recv(65536) if not raw.buf else raw.buf
        while not line.endswith(b"\n"):
            line += raw.sock.recv(65536)
        msg = json.loads(line)
        self.assertEqual(line, json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        self.assertEqual(msg["params"]["payload"], payload)
        self.assertEqual(msg["params"]["sid"], "s-1")
        raw.send({"jsonrpc": "2.0", "method": "reply",
                  "params": {"inbox": msg["params"]["inbox"], "payload": "done"}})
        asker.join(WAIT)
        self.assertEqual(self.asked, "done")

    def _ask_quietly(self, topic, payload):
        self.asked = self.local().request(topic, payload, WAIT)

    def test_publish_reaches_every_plain_subscriber(self):
        got = {}
        cond = threading.Condition()

        def handler(name):
            def h(event):
                with cond:
                    got.setdefault(name, []).append(event["payload"])
                    cond.notify_all()
            return h

        subs = [self.connect(), self.connect(), self.local()]
        for i, c in enumerate(subs):
            c.subscribe("news", handler(i))
        for publisher in (self.connect(), self.local()):
            for n in range(3):
                publisher.publish("news", n)
        with cond:
            self.assertTrue(cond.wait_for(
                lambda: all(len(got.get(i, [])) == 6 for i in range(3)), WAIT), got)
        for i in range(3):
            self.assertEqual(sorted(got[i]), [0, 0, 1, 1, 2, 2])

    def test_no_responders_fails_at_once(self):
        for name, make in self.clients():
            with self.subTest(client=name):
                c = make()
                t0 = time.monotonic()
                with self.assertRaises(PluginPollerForwardError.Broker) as cm:
                    c.request("nobody.home", {}, 30)
                self.assertLess(time.monotonic() - t0, 2.0)
                self.assertEqual(broker_code(cm.exception), npl.BROKER_NO_RESPONDERS)

    def test_wait_request_waits_for_late_subscriber(self):
        for name, make in self.clients():
            with self.subTest(client=name):
                topic = f"late.{name}"
                requester, responder = make(), self.connect()
                result = {}

                def ask():
                    try:
                        result["ok"] = requester.request(topic, 21, 20, wait=True)
                    except Exception as exc:     # reported below
                        result["err"] = exc
                t = threading.Thread(target=ask)
                t.start()
                self.assertTrue(wait_until(lambda: self.server.stats()["parked"] == 1))
                self.assertNotIn("err", result)
                responder.subscribe(topic, lambda p: p * 2)
                t.join(WAIT)
                self.assertFalse(t.is_alive())
                self.assertEqual(result, {"ok": 42})
                self.assertEqual(self.server.stats()["pending"], 0)

    def test_wait_request_times_out_without_subscriber(self):
        for name, make in self.clients():
            with self.subTest(client=name):
                c = make()
                with self.assertRaises(PluginPollerForwardError.Broker) as cm:
                    c.request(f"never.{name}", {}, 0.3, wait=True)
                self.assertEqual(broker_code(cm.exception), npl.BROKER_TIMEOUT)
                stats = self.server.stats()
                self.assertEqual((stats["pending"], stats["parked"]), (0, 0), stats)

    def test_timeout_clears_bookkeeping_and_late_reply_is_dropped(self):
        for name, make in self.clients():
            with self.subTest(client=name):
                topic = f"slow.{name}"
                responder = self.raw()
                self.assertEqual(responder.call("subscribe", {"topic": topic, "sid": "s"})
                                 ["result"], True)
                requester = make()
                outcome = {}

                def ask():
                    t0 = time.monotonic()
                    try:
                        outcome["ok"] = requester.request(topic, "q", 0.3)
                    except PluginPollerForwardError.Broker as exc:
                        outcome["err"] = exc
                    outcome["elapsed"] = time.monotonic() - t0
                t = threading.Thread(target=ask)
                t.start()
                msg = responder.recv()
                self.assertEqual(msg["method"], "message")
                self.assertEqual(msg["params"]["sid"], "s")
                self.assertEqual(msg["params"]["payload"], "q")
                inbox = msg["params"]["inbox"]
                t.join(WAIT)
                self.assertFalse(t.is_alive())
                self.assertIn("err", outcome, outcome)
                self.assertEqual(broker_code(outcome["err"]), npl.BROKER_TIMEOUT)
                self.assertLess(outcome["elapsed"], 5.0)
                self.assertEqual(self.server.stats()["pending"], 0)
                # The late reply finds nothing to answer: dropped, reported as False.
                late = responder.call("reply", {"inbox": inbox, "payload": "too late"})
                self.assertEqual(late.get("result"), False, late)
                # The requester's next request gets its own answer, not the late one.
                responder.call("unsubscribe", {"sid": "s"})
                other = self.connect()
                other.subscribe(topic, lambda p: "fresh:" + p)
                self.assertEqual(requester.request(topic, "again", 10), "fresh:again")
                self.assertEqual(self.server.stats()["pending"], 0)

    def test_queue_group_splits_requests(self):
        counts = [0, 0, 0]
        lock = threading.Lock()

        def member(i):
            def h(p):
                with lock:
                    counts[i] += 1
                return {"n": p, "by": i}
            return h

        for i in range(3):
            self.connect().subscribe("work", member(i), queue="workers")
        requester = self.connect()
        answers = [requester.request("work", n, 10) for n in range(30)]
        self.assertEqual([a["n"] for a in answers], list(range(30)))
        self.assertEqual(sum(counts), 30, counts)        # each request answered once
        self.assertTrue(all(c > 0 for c in counts), counts)
        self.assertEqual(self.server.stats()["subscriptions"], 3)

    def test_publish_to_queue_group_and_plain_subscribers(self):
        got = {"plain1": [], "plain2": [], "group": []}
        cond = threading.Condition()

        def rec(name):
            def h(event):
                with cond:
                    got[name].append(event["payload"])
                    cond.notify_all()
            return h

        self.connect().subscribe("evt", rec("plain1"))
        self.local().subscribe("evt", rec("plain2"))
        for _ in range(3):
            self.connect().subscribe("evt", rec("group"), queue="g")
        pub = self.connect()
        for n in range(9):
            pub.publish("evt", n)
        with cond:
            self.assertTrue(cond.wait_for(
                lambda: len(got["plain1"]) == 9 and len(got["plain2"]) == 9
                and len(got["group"]) == 9, WAIT), got)
        self.assertEqual(sorted(got["plain1"]), list(range(9)))
        self.assertEqual(sorted(got["plain2"]), list(range(9)))
        self.assertEqual(sorted(got["group"]), list(range(9)))   # once each, not 3 times

    def test_responder_disconnect_fails_request_at_once(self):
        for name, make in self.clients():
            with self.subTest(client=name):
                topic = f"flaky.{name}"
                responder = RawConn(self.server.path)
                try:
                    self.assertTrue(responder.call(
                        "subscribe", {"topic": topic, "sid": 1})["result"])
                    requester = make()
                    outcome = {}

                    def ask():
                        try:
                            outcome["ok"] = requester.request(topic, {}, 30)
                        except PluginPollerForwardError.Broker as exc:
                            outcome["err"] = exc
                        outcome["at"] = time.monotonic()
                    t = threading.Thread(target=ask)
                    t.start()
                    msg = responder.recv()
                    self.assertEqual(msg["method"], "message")
                    self.assertIn("inbox", msg["params"])
                finally:
                    closed_at = time.monotonic()
                    responder.close()
                t.join(WAIT)
                self.assertFalse(t.is_alive(), "request still waiting after responder left")
                self.assertIn("err", outcome, outcome)
                self.assertEqual(broker_code(outcome["err"]), npl.BROKER_RESPONDER_GONE)
                self.assertLess(outcome["at"] - closed_at, 5.0)
                self.assertTrue(wait_until(lambda: self.server.stats()["pending"] == 0))

    def test_local_responder_close_fails_request(self):
        responder = self.server.client()
        release = threading.Event()
        entered = threading.Event()

        def h(p):
            entered.set()
            release.wait(WAIT)
            return "late"
        responder.subscribe("svc.local", h)
        requester = self.connect()
        outcome = {}

        def ask():
            try:
                outcome["ok"] = requester.request("svc.local", {}, 30)
            except PluginPollerForwardError.Broker as exc:
                outcome["err"] = exc
        t = threading.Thread(target=ask)
        t.start()
        self.assertTrue(entered.wait(WAIT))
        responder.close()
        t.join(WAIT)
        release.set()
        self.assertFalse(t.is_alive())
        self.assertEqual(broker_code(outcome.get("err")), npl.BROKER_RESPONDER_GONE, outcome)

    def test_many_concurrent_requests_on_one_connection(self):
        responder = self.connect()
        responder.subscribe("math.double", lambda p: {"n": p["n"], "twice": p["n"] * 2})
        requester = self.connect()
        results = [None] * 64
        errors = []
        start = threading.Barrier(64)

        def ask(i):
            try:
                start.wait(WAIT)
                results[i] = requester.request("math.double", {"n": i}, 20)
            except Exception as exc:         # collected and asserted below
                errors.append((i, exc))
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertFalse(any(t.is_alive() for t in threads))
        self.assertEqual(errors, [])
        self.assertEqual(results, [{"n": i, "twice": 2 * i} for i in range(64)])

    def test_slow_handler_does_not_hold_up_the_messages_after_it(self):
        """A handler that blocks does not hold up reading: the requests read
        after it (one at a time, and a burst read together) are answered
        while it still runs."""
        responder = self.connect()
        release = threading.Event()

        def handle(p):
            if p == "slow":
                return release.wait(WAIT * 3)   # True once the others were answered
            return p
        responder.subscribe("svc.mixed", handle)
        requester = self.connect()
        slow = {}
        t = threading.Thread(target=lambda: slow.update(
            out=requester.request("svc.mixed", "slow", WAIT * 3)))
        t.start()
        try:
            self.assertEqual(requester.request("svc.mixed", 1, WAIT), 1)
            self.assertEqual(burst(requester, "svc.mixed", 16), list(range(16)))
        finally:
            release.set()
            t.join(WAIT)
        self.assertEqual(slow, {"out": True})
        self.assertEqual(requester.request("svc.mixed", 2, WAIT), 2)   # still served

    def test_a_lost_connection_fails_the_next_request(self):
        requester = self.connect()
        self.server.close()
        with self.assertRaises(PluginPollerForwardError.Broker) as cm:
            requester.request("svc.none", 1, WAIT)
        self.assertIn(broker_code(cm.exception), (npl.BROKER_CLOSED, npl.BROKER_NO_RESPONDERS))
        self.assertTrue(requester.wait_closed(WAIT))

    def test_handlers_that_wait_for_each_other_all_run(self):
        """Eight requests whose handlers each wait until all eight are
        running: none may wait behind another for good."""
        responder = self.connect()
        meet = threading.Barrier(8)
        responder.subscribe("svc.meet", lambda p: meet.wait(WAIT) >= 0)
        requester = self.connect()
        results = [None] * 8
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, requester.request("svc.meet", i, WAIT * 2))) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 3)
        self.assertEqual(results, [True] * 8)

    def test_handler_exception_becomes_broker_error(self):
        for rname, rmake in self.clients():
            for qname, qmake in self.clients():
                with self.subTest(responder=rname, requester=qname):
                    responder, requester = rmake(), qmake()
                    topic = f"boom.{rname}.{qname}"

                    def h(p):
                        if p == "fail":
                            raise RuntimeError("kaboom")
                        return "fine"
                    responder.subscribe(topic, h)
                    with self.assertRaises(PluginPollerForwardError.Broker) as cm:
                        requester.request(topic, "fail", 10)
                    self.assertEqual(broker_code(cm.exception), npl.BROKER_RESPONDER_ERROR)
                    self.assertIn("kaboom", str(cm.exception))
                    # The responder keeps serving.
                    self.assertEqual(requester.request(topic, "ok", 10), "fine")

    def test_unsubscribed_topic_has_no_responders(self):
        c = self.connect()
        sid = c.subscribe("gone.soon", lambda p: p)
        self.assertTrue(self.server.has_subscriber("gone.soon"))
        c.unsubscribe(sid)
        self.assertFalse(self.server.has_subscriber("gone.soon"))
        with self.assertRaises(PluginPollerForwardError.Broker) as cm:
            self.connect().request("gone.soon", {}, 10)
        self.assertEqual(broker_code(cm.exception), npl.BROKER_NO_RESPONDERS)

    def test_requester_leaving_clears_bookkeeping(self):
        # A parked request whose requester goes away is forgotten.
        r = self.raw()
        r.send({"jsonrpc": "2.0", "id": 1, "method": "request",
                "params": {"topic": "later", "payload": 1, "timeout_ms": 60000, "wait": True}})
        self.assertTrue(wait_until(lambda: self.server.stats()["parked"] == 1))
        r.close()
        self.assertTrue(wait_until(lambda: self.server.stats()["parked"] == 0
                                   and self.server.stats()["pending"] == 0),
                        self.server.stats())
        # A request being served whose requester goes away: the reply is dropped.
        entered, release = threading.Event(), threading.Event()

        def h(p):
            entered.set()
            release.wait(WAIT)
            return "done"
        self.connect().subscribe("served", h)
        r2 = RawConn(self.server.path)
        r2.send({"jsonrpc": "2.0", "id": 2, "method": "request",
                 "params": {"topic": "served", "payload": 1, "timeout_ms": 60000}})
        self.assertTrue(entered.wait(WAIT))
        r2.close()
        self.assertTrue(wait_until(lambda: self.server.stats()["pending"] == 0),
                        self.server.stats())
        release.set()
        other = self.connect()
        self.assertEqual(other.request("served", 2, 10), "done")

    def test_slow_consumer_is_dropped_and_broker_stays_responsive(self):
        slow = self.raw()                      # subscribes, then never reads
        self.assertTrue(slow.call("subscribe", {"topic": "firehose", "sid": 1})["result"])
        publisher = self.connect()
        blob = "x" * 100_000
        for _ in range(200):                   # ~20 MB, over BROKER_MAX_OUTBUF_BYTES
            publisher.publish("firehose", blob)
        responder, requester = self.connect(), self.connect()
        responder.subscribe("still.alive", lambda p: p)
        t0 = time.monotonic()
        self.assertEqual(requester.request("still.alive", "yes", 10), "yes")
        self.assertLess(time.monotonic() - t0, 5.0)
        self.assertTrue(wait_until(lambda: not self.server.has_subscriber("firehose")),
                        "slow consumer kept")

    def test_client_sees_broker_close(self):
        c = BrokerClient.connect(self.server.url)
        self._closers.append(c.close)
        self.server.close()
        self.assertTrue(c.wait_closed(WAIT))
        with self.assertRaises(PluginPollerForwardError.Broker):
            c.request("x", {}, 1)
        # tearDown still checks the (closed) broker's bookkeeping is empty.


class MixedLoadTests(_ServerCase):
    def test_slow_runs_among_quick_ones_never_wedge_reading(self):
        """Slow handler runs among quick ones from eight requesters at once:
        every request is answered (an experiment that ran quick handlers in
        the reading thread once stopped reading for good under this load)."""
        responder = self.connect()

        def handle(p):
            if p % 4 == 0:
                time.sleep(0.03)
            return p
        responder.subscribe("svc.mix", handle)
        requester = self.connect()
        errors, answers = [], []

        def ask(base):
            for i in range(base, base + 40):
                try:
                    answers.append(requester.request("svc.mix", i, WAIT))
                except Exception as exc:         # collected and asserted below
                    errors.append((i, exc))
                    return
        threads = [threading.Thread(target=ask, args=(k * 1000,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 4)
        self.assertEqual(errors, [])
        self.assertEqual(sorted(answers), [k * 1000 + i for k in range(8) for i in range(40)])


class WaiterTests(unittest.TestCase):
    def test_the_first_answer_wins(self):
        w = npl._Waiter()
        w.set("answer")
        w.set(None, {"code": npl.BROKER_CLOSED, "message": "connection to broker lost"})
        self.assertTrue(w.wait(0))
        self.assertEqual((w.result, w.error), ("answer", None))

    def test_a_reply_read_just_before_the_end_is_not_lost(self):
        """The broker answers, then the connection ends: the reader settles
        the call, then fails what is pending; the answer must stand."""
        for _ in range(20):
            ours, theirs = socket.socketpair()
            client = BrokerClient(ours, "unix:///scripted")
            try:
                got = {}
                t = threading.Thread(target=lambda: got.update(
                    out=client.request("svc.t", 1, WAIT)))
                t.start()
                call = json.loads(theirs.makefile("rb").readline())
                theirs.sendall(json.dumps({"jsonrpc": "2.0", "id": call["id"],
                                           "result": "yes"}).encode() + b"\n")
                theirs.shutdown(socket.SHUT_RDWR)
                t.join(WAIT)
                self.assertEqual(got, {"out": "yes"})
            finally:
                client.close()
                theirs.close()


class BadInputTests(_ServerCase):
    """Malformed traffic on a raw socket gets the right error and harms nobody."""

    def tearDown(self):
        # Another client still works after whatever the test sent.
        responder, requester = self.connect(), self.connect()
        responder.subscribe("after.check", lambda p: p + 1)
        self.assertEqual(requester.request("after.check", 1, 10), 2)
        super().tearDown()

    def assertError(self, reply, code, req_id=None):
        self.assertIn("error", reply, reply)
        self.assertEqual(reply["error"]["code"], code, reply)
        self.assertIsInstance(reply["error"].get("message"), str)
        self.assertEqual(reply.get("id"), req_id, reply)
        self.assertEqual(reply.get("jsonrpc"), "2.0")

    def assertUsable(self, conn):
        self.assertEqual(conn.call("ping")["result"], "pong")

    def test_malformed_json(self):
        r = self.raw()
        r.send_raw(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"\n')
        self.assertError(r.recv(), npl.BROKER_PARSE_ERROR)
        self.assertUsable(r)

    def test_non_object_json(self):
        r = self.raw()
        for line in (b"[1, 2]", b'"ping"', b"42", b"null"):
            with self.subTest(line=line):
                r.send_raw(line + b"\n")
                self.assertError(r.recv(), npl.BROKER_INVALID_REQUEST)
        self.assertUsable(r)

    def test_unknown_method(self):
        r = self.raw()
        self.assertError(r.call("frobnicate", {}), npl.BROKER_METHOD_NOT_FOUND, 1000)
        # Without an id it is a notification: no reply at all.
        r.send({"jsonrpc": "2.0", "method": "frobnicate"})
        self.assertEqual(r.call("ping"), {"jsonrpc": "2.0", "id": 1001, "result": "pong"})
        self.assertEqual(r.skipped, [], "a notification was answered")

    def test_wrong_param_types(self):
        r = self.raw()
        cases = [
            ("subscribe", {"topic": 5, "sid": 1}),
            ("subscribe", {"topic": "", "sid": 1}),
            ("subscribe", {"topic": "a b", "sid": 1}),
            ("subscribe", {"topic": "t", "sid": [1]}),
            ("subscribe", {"topic": "t", "sid": None}),
            ("subscribe", {"topic": "t", "sid": True}),
            ("subscribe", {"topic": "t", "sid": 1, "queue": 3}),
            ("publish", {"topic": 7}),
            ("request", {"topic": 5}),
            ("request", {"topic": "t", "timeout_ms": 0}),
            ("request", {"topic": "t", "timeout_ms": -5}),
            ("request", {"topic": "t", "timeout_ms": 10**12}),
            ("request", {"topic": "t", "timeout_ms": npl.BROKER_MAX_TIMEOUT_MS + 1}),
            ("request", {"topic": "t", "timeout_ms": 1.5}),
            ("request", {"topic": "t", "timeout_ms": "100"}),
            ("request", {"topic": "t", "wait": "yes"}),
            ("request", {"topic": "t", "wait": 1}),
            ("reply", {"inbox": "1"}),
            ("unsubscribe", {"sid": [1]}),
            ("ping", [1]),
        ]
        for method, params in cases:
            with self.subTest(method=method, params=params):
                reply = r.call(method, params)
                self.assertError(reply, npl.BROKER_INVALID_PARAMS, reply.get("id"))
                self.assertIsNotNone(reply.get("id"))
        self.assertUsable(r)
        stats = self.server.stats()
        self.assertEqual((stats["subscriptions"], stats["pending"]), (0, 0), stats)

    def test_duplicate_sid_rejected(self):
        r = self.raw()
        self.assertTrue(r.call("subscribe", {"topic": "a", "sid": "x"})["result"])
        reply = r.call("subscribe", {"topic": "b", "sid": "x"})
        self.assertError(reply, npl.BROKER_INVALID_PARAMS, reply["id"])
        self.assertEqual(self.server.stats()["subscriptions"], 1)

    def test_invalid_utf8(self):
        r = self.raw()
        r.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"ping","x":"\xff\xfe"}\n')
        self.assertError(r.recv(), npl.BROKER_PARSE_ERROR)
        self.assertUsable(r)

    def test_utf16_line_is_not_utf8(self):
        # Bytes starting with 0xFF 0xFE are never UTF-8: the line must be refused,
        # not decoded as UTF-16 behind the protocol's back.
        r = self.raw()
        line = b"\xff\xfe" + '{"jsonrpc":"2.0","id":7,"method":"ping"}'.encode("utf-16-le")
        self.assertNotIn(b"\n", line)
        r.send_raw(line + b"\n")
        self.assertError(r.recv(), npl.BROKER_PARSE_ERROR)
        self.assertUsable(r)

    def test_notification_with_bad_params_gets_no_reply(self):
        # JSON-RPC 2.0: a message without an id is a notification and is never
        # answered, even when its params are wrong.
        r = self.raw()
        r.send({"jsonrpc": "2.0", "method": "publish", "params": {"topic": 5}})
        r.send({"jsonrpc": "2.0", "method": "ping", "params": [1]})
        self.assertEqual(r.call("ping"), {"jsonrpc": "2.0", "id": 1000, "result": "pong"})
        self.assertEqual(r.skipped, [], "a notification was answered")

    def test_over_long_line_with_an_id_fails_that_call_alone(self):
        # The head of the line names its call: that call gets the error, the
        # rest of the line is dropped unread, and the connection goes on.
        r = self.raw()
        blob = b'{"jsonrpc":"2.0","id":1,"method":"ping","x":"' + \
            b"a" * (npl.BROKER_MAX_LINE_BYTES + 1024)
        t = threading.Thread(target=r.send_raw, args=(blob,), daemon=True)
        t.start()
        error = r.recv()
        self.assertEqual(error["id"], 1, error)
        self.assertEqual(error["error"]["code"], npl.BROKER_INVALID_REQUEST, error)
        self.assertIn(str(npl.BROKER_MAX_LINE_BYTES), error["error"]["message"])
        t.join(WAIT)
        r.send_raw(b'a"}\n')                # the end of the over-long line
        self.assertEqual(r.call("ping"), {"jsonrpc": "2.0", "id": 1000, "result": "pong"})
        self.assertEqual(self.server.stats()["connections"], 1)

    def test_over_long_line_with_newline_closes_connection(self):
        r = self.raw()
        blob = b'{"x":"' + b"a" * (npl.BROKER_MAX_LINE_BYTES + 10) + b'"}\n' + \
            b'{"jsonrpc":"2.0","id":5,"method":"ping"}\n'

        def flood():
            try:
                r.sock.sendall(blob)
            except OSError:
                pass
        t = threading.Thread(target=flood, daemon=True)
        t.start()
        lines = r.read_until_closed()
        t.join(WAIT)
        self.assertEqual([m.get("error", {}).get("code") for m in lines],
                         [npl.BROKER_INVALID_REQUEST], lines)

    def test_line_at_limit_is_accepted(self):
        r = self.raw()
        head = b'{"jsonrpc":"2.0","id":3,"method":"ping","x":"'
        tail = b'"}'
        line = head + b"a" * (npl.BROKER_MAX_LINE_BYTES - len(head) - len(tail)) + tail
        self.assertEqual(len(line), npl.BROKER_MAX_LINE_BYTES)
        t = threading.Thread(target=r.send_raw, args=(line + b"\n",), daemon=True)
        t.start()
        self.assertEqual(r.recv(), {"jsonrpc": "2.0", "id": 3, "result": "pong"})
        t.join(WAIT)


class PeerCredTests(unittest.TestCase):
    """Only the daemon's own uid may talk to the broker."""

    NOBODY = 65534

    def setUp(self):
        if os.getuid() != 0:
            self.skipTest("needs root to fork a child that switches to uid 65534")
        self.server = BrokerServer().start()
        self.addCleanup(self.server.close)

    def _child(self, expect):
        """Fork a child that becomes nobody and connects; returns its exit code.

        Exit codes: 0 as expected, 10 connect refused (EACCES), 11 connected and
        got EOF, 12 connected and got data, 13 connected and timed out,
        14 connect failed otherwise, 15 could not drop privileges.
        """
        with warnings.catch_warnings():
            # The broker's thread is running: 3.12+ warns about fork(); the child
            # only makes a few system calls and leaves with os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:                         # child: no unittest machinery here
            code = 99
            try:
                try:
                    os.setgroups([])
                    os.setgid(self.NOBODY)
                    os.setuid(self.NOBODY)
                except OSError:
                    os._exit(15)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                try:
                    s.connect(self.server.path)
                except PermissionError:
                    code = 10
                except OSError:
                    code = 14
                else:
                    try:
                        data = s.recv(1024)
                        code = 11 if not data else 12
                    except ConnectionResetError:
                        code = 11
                    except socket.timeout:
                        code = 13
            finally:
                os._exit(0 if code == expect else code)
        _, status = os.waitpid(pid, 0)
        self.assertTrue(os.WIFEXITED(status), status)
        return os.WEXITSTATUS(status)

    def test_other_uid_cannot_connect_to_default_socket(self):
        self.assertEqual(self._child(expect=10), 0)
        self.assertEqual(self.server.stats()["connections"], 0)

    def test_other_uid_is_dropped_by_peercred_check(self):
        os.chmod(self.server.path, 0o777)
        os.chmod(os.path.dirname(self.server.path), 0o755)
        with self.assertLogs("nexo_poller", "WARNING") as cm:
            self.assertEqual(self._child(expect=11), 0)
            # The refusal is logged by the broker thread; wait for it to land.
            self.assertTrue(wait_until(lambda: any("65534" in m for m in cm.output)))
        # The broker still serves its own uid, and kept no trace of the stranger.
        with BrokerClient.connect(self.server.url) as c:
            self.assertEqual(c._call("ping", {}, WAIT), "pong")
        self.assertTrue(wait_until(lambda: self.server.stats()["connections"] == 0))


if __name__ == "__main__":
    unittest.main()
