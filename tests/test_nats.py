"""Tests of the NATS transport: the protocol parser, nexo's envelopes, and
NatsClient / connect_broker against a real nats-server (tests/nats_support.py;
skipped with a note when the binary is missing, failed under
NEXO_REQUIRE_NATS=1)."""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nexo_poller as npl  # noqa: E402
from nexo_poller import NatsClient, PluginPollerForwardError, connect_broker  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nats_support import NatsServer, require_nats  # noqa: E402
from support import PLUGIN, PY, ROOT, wait_until  # noqa: E402

WAIT = 15.0


class Sink:
    """Collects what the parser reports."""

    def __init__(self):
        self.ops = []

    def on_msg(self, subject, sid, reply, headers, payload):
        self.ops.append(("msg", subject, sid, reply, headers, payload))

    def on_info(self, info):
        self.ops.append(("info", info))

    def on_ping(self):
        self.ops.append(("ping",))

    def on_pong(self):
        self.ops.append(("pong",))

    def on_err(self, text):
        self.ops.append(("err", text))


STREAM = (b'INFO {"server_id":"x","max_payload":1024}\r\n'
          b"MSG a.b 1 5\r\nhello\r\n"
          b"MSG a.b 2 _INBOX.x.7 0\r\n\r\n"
          b"PING\r\n+OK\r\n"
          b"HMSG _INBOX.x.3 9 reply.to 18 23\r\nNATS/1.0\r\nK: v\r\n\r\nbody!\r\n"
          b"HMSG _INBOX.x.4 9 30 30\r\nNATS/1.0 503 No Responders\r\n\r\n\r\n"
          b"-ERR 'Slow Consumer'\r\nPONG\r\n")
EXPECTED = [
    ("info", {"server_id": "x", "max_payload": 1024}),
    ("msg", "a.b", 1, None, None, b"hello"),
    ("msg", "a.b", 2, "_INBOX.x.7", None, b""),
    ("ping",),
    ("msg", "_INBOX.x.3", 9, "reply.to", b"NATS/1.0\r\nK: v\r\n\r\n", b"body!"),
    ("msg", "_INBOX.x.4", 9, None, b"NATS/1.0 503 No Responders\r\n\r\n", b""),
    ("err", "Slow Consumer"),
    ("pong",),
]


class ParserTest(unittest.TestCase):
    def test_whole_stream(self):
        sink = Sink()
        npl._NatsParser(sink).feed(STREAM)
        self.assertEqual(sink.ops, EXPECTED)

    def test_every_split_point_and_byte_by_byte(self):
        for cut in range(1, len(STREAM)):
            sink = Sink()
            p = npl._NatsParser(sink)
            p.feed(STREAM[:cut])
            p.feed(memoryview(STREAM[cut:]))
            self.assertEqual(sink.ops, EXPECTED, f"cut at {cut}")
            self.assertEqual(len(p.buf), 0)
        sink = Sink()
        p = npl._NatsParser(sink)
        for i in range(len(STREAM)):
            p.feed(STREAM[i:i + 1])
        self.assertEqual(sink.ops, EXPECTED)

    def test_payload_containing_crlf_and_op_names(self):
        body = b"MSG x 1 3\r\nPING\r\n"
        sink = Sink()
        npl._NatsParser(sink).feed(b"MSG s 4 %d\r\n%s\r\n" % (len(body), body))
        self.assertEqual(sink.ops, [("msg", "s", 4, None, None, body)])

    def test_protocol_errors(self):
        for bad in (b"BOGUS\r\n", b"MSG a b 3\r\nabc\r\n", b"MSG a 1 3\r\nabcXY",
                    b"HMSG a 1 9 3\r\n", b"INFO {nope\r\n", b"X" * (70 * 1024)):
            with self.subTest(bad=bad[:20]):
                with self.assertRaises(npl._NatsProtocolError):
                    npl._NatsParser(Sink()).feed(bad)

    def test_headers(self):
        self.assertEqual(npl._nats_parse_headers(b"NATS/1.0 503\r\n\r\n"), (503, "", {}))
        self.assertEqual(
            npl._nats_parse_headers(b"NATS/1.0 408 Request Timeout\r\nA: 1\r\nA: 2\r\nB:x\r\n\r\n"),
            (408, "Request Timeout", {"A": ["1", "2"], "B": ["x"]}))
        self.assertEqual(npl._nats_parse_headers(npl._nats_headers({"K": "v"})),
                         (None, "", {"K": ["v"]}))
        with self.assertRaises(npl._NatsProtocolError):
            npl._nats_parse_headers(b"HTTP/1.1 200\r\n\r\n")

    def test_urls(self):
        s = npl._nats_servers("nats://tok@h1:4333, tls://u:p%40ss@h2,h3")
        self.assertEqual([(x.host, x.port, x.tls, x.user, x.password, x.token) for x in s], [
            ("h1", 4333, False, None, None, "tok"), ("h2", 4222, True, "u", "p@ss", None),
            ("h3", 4222, False, None, None, None)])
        for bad in ("http://h", "nats://", "nats://h:99999"):
            with self.subTest(bad=bad):
                with self.assertRaises(PluginPollerForwardError.Broker) as cm:
                    npl._nats_servers(bad)
                self.assertEqual(cm.exception.code, npl.BROKER_INVALID_PARAMS)
        with self.assertRaises(PluginPollerForwardError.Broker):
            connect_broker("redis://h")


TICK = {"method": "poll_tick", "params": {"kind": "rss", "job_id": "j"}}


class EnvelopeTest(unittest.TestCase):
    def test_request_event_shape(self):
        ev = npl.nexo_request_event("p.tick", TICK, "_INBOX.a.1")
        self.assertEqual(set(ev), {"id", "timestamp", "topic", "source", "session_id", "payload"})
        self.assertEqual((ev["topic"], ev["source"], ev["session_id"]),
                         ("p.tick", "plugin.poller", None))
        msg = ev["payload"]
        self.assertEqual(set(msg), {"id", "topic", "reply_to", "payload"})
        self.assertEqual((msg["reply_to"], msg["payload"]), ("_INBOX.a.1", TICK))
        self.assertRegex(ev["id"], r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-")
        self.assertNotEqual(ev["id"], msg["id"])
        when = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00"))
        self.assertLess(abs(datetime.now(timezone.utc) - when), timedelta(minutes=1))

    def test_unwrap_table(self):
        ev = npl.nexo_request_event("t", TICK, "r.1")
        bare_msg = {"id": "m", "topic": "t", "reply_to": None, "payload": TICK}
        rpc = {"jsonrpc": "2.0", "method": "poll_tick", "params": {}}
        table = [
            (ev, (TICK, "r.1", "event")),
            (bare_msg, (TICK, None, "message")),
            (npl.nexo_event("t", {"result": {}}), ({"result": {}}, None, "event")),
            (rpc, (rpc, None, None)),
            ({"payload": 1}, ({"payload": 1}, None, None)),     # no topic: not an envelope
            ([1], ([1], None, None)),
            (None, (None, None, None)),
        ]
        for body, want in table:
            with self.subTest(body=body):
                self.assertEqual(npl.nexo_unwrap(body), want)

    def test_tick_reply_envelope_table(self):
        reply = {"next_cursor": "MQ"}
        err = {"error": {"code": -32002, "message": "gone"}}
        table = [
            ({"jsonrpc": "2.0", "id": 1, "result": reply}, {"jsonrpc": "2.0", "id": 1,
                                                           "result": reply}),
            (npl.nexo_event("r", {"result": reply}), {"result": reply}),
            (npl.nexo_event("r", err), err),
            ({"id": "m", "topic": "r", "reply_to": None, "payload": reply}, {"result": reply}),
            (npl.nexo_event("r", reply), {"result": reply}),
            (reply, {"result": reply}),
            ({"metrics": None}, {"result": {"metrics": None}}),
            ({}, {}),                                   # not a TickReply: left to fail
            ({"a": 1}, {"a": 1}),
        ]
        for body, want in table:
            with self.subTest(body=body):
                self.assertEqual(npl.tick_reply_envelope(body), want)

    def test_reply_payload_readable_by_both_readers(self):
        answer = {"jsonrpc": "2.0", "id": None, "result": {"next_cursor": "MQ",
                                                          "next_interval_secs": 5}}
        payload = npl.nexo_reply_payload(answer)
        # nexo's daemon decodes the payload directly as a TickReply ...
        self.assertEqual(npl.TickReply.from_dict(payload).next_cursor, "MQ")
        # ... this project's daemon reads `result`.
        self.assertEqual(npl._parse_reply_envelope(payload, "j").next_interval_secs, 5)
        err = {"jsonrpc": "2.0", "id": None, "error": {"code": -32002, "message": "x"}}
        self.assertEqual(npl.nexo_reply_payload(err), err)
        with self.assertRaises(npl.PollerError.Permanent):
            npl._parse_reply_envelope(npl.tick_reply_envelope(
                npl.nexo_event("r", npl.nexo_reply_payload(err))), "j")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class LiveTest(unittest.TestCase):
    """Against a real nats-server, one per test."""

    server_args: tuple = ()

    def setUp(self):
        require_nats()
        logger = logging.getLogger("nexo_poller")       # connection-lost warnings are expected
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.CRITICAL)
        self.threads0 = threading.active_count()
        self.fds0 = fd_count()
        self.server = NatsServer(*self.server_args).start()
        self.addCleanup(self.server.cleanup)
        self.clients = []
        self.procs = []

    def tearDown(self):
        for c in self.clients:
            c.close()
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
            if p.stdout:
                p.stdout.close()

    def client(self, **opts) -> NatsClient:
        c = connect_broker(self.server.url, **opts)
        self.clients.append(c)
        return c


class RequestReplyTest(LiveTest):
    def test_round_trip_and_factory(self):
        a, b = self.client(), self.client()
        self.assertIsInstance(a, NatsClient)
        self.assertEqual(a.max_payload, 1 << 20)
        seen = []
        b.subscribe("svc.echo", lambda p: (seen.append(p), {"echo": p})[1])
        self.assertEqual(a.request("svc.echo", {"n": 1}, WAIT), {"echo": {"n": 1}})
        self.assertEqual(seen, [{"n": 1}])       # the handler saw the payload, not the Event
        self.assertEqual(a.request("svc.echo", None, timedelta(seconds=WAIT)), {"echo": None})

    def test_publish_reaches_plain_subscriber_as_the_event_it_travels_in(self):
        a, b = self.client(), self.client()
        got, done = [], threading.Event()
        b.subscribe("alerts.x", lambda p: (got.append(p), done.set()))
        a.publish("alerts.x", {"text": "hi"})
        self.assertTrue(done.wait(WAIT))
        self.assertEqual(got[0]["payload"], {"text": "hi"})
        self.assertEqual(got[0]["topic"], "alerts.x")

    def test_many_in_flight(self):
        a, b = self.client(), self.client()
        gate = threading.Barrier(32, timeout=WAIT)

        def slow(p):
            gate.wait()                     # all 32 must be in flight at once
            return p * 2
        b.subscribe("svc.slow", slow)
        results = [None] * 32
        ts = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, a.request("svc.slow", i, WAIT))) for i in range(32)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(WAIT)
        self.assertEqual(results, [i * 2 for i in range(32)])
        self.assertEqual(a.requests_in_flight(), 0)

    def test_queue_group_shares_messages(self):
        a, b1, b2 = self.client(), self.client(), self.client()
        b1.subscribe("svc.q", lambda p: "b1", queue="workers")
        b2.subscribe("svc.q", lambda p: "b2", queue="workers")
        answers = [a.request("svc.q", i, WAIT) for i in range(200)]
        self.assertEqual(set(answers), {"b1", "b2"})
        self.assertEqual(len(answers), 200)

    def test_a_listener_never_answers_a_request_meant_for_another(self):
        # A JetStream daemon listens to the KV puts of commands; each put
        # awaits JetStream's ack on its reply subject, which a listener's
        # "null" must not pre-empt.
        a, listener, svc = self.client(), self.client(), self.client()
        seen = []
        listener.subscribe("svc.both", seen.append, answer=False)
        svc.subscribe("svc.both", lambda p: "the service")
        for i in range(20):
            self.assertEqual(a.request("svc.both", i, WAIT), "the service")
        self.assertTrue(wait_until(lambda: len(seen) == 20))
        self.assertEqual(seen, list(range(20)))

    def test_no_responders_fails_at_once(self):
        a = self.client()
        t0 = time.monotonic()
        with self.assertRaises(PluginPollerForwardError.Broker) as cm:
            a.request("nobody.home", {}, 30)
        self.assertEqual(cm.exception.code, npl.BROKER_NO_RESPONDERS)
        self.assertLess(time.monotonic() - t0, 15)      # far from the 30 s timeout
        self.assertEqual(a.requests_in_flight(), 0)

    def test_wait_retries_until_a_responder_subscribes(self):
        a, b = self.client(), self.client()
        threading.Timer(0.3, lambda: b.subscribe("late.svc", lambda p: "here")).start()
        self.assertEqual(a.request("late.svc", 1, WAIT, wait=True), "here")

    def test_timeout_forgets_request_and_cancel(self):
        a, b = self.client(), self.client()
        release = threading.Event()
        self.addCleanup(release.set)
        b.subscribe("svc.stuck", lambda p: release.wait(WAIT))
        with self.assertRaises(PluginPollerForwardError.Broker) as cm:
            a.request("svc.stuck", 1, 0.2)
        self.assertEqual(cm.exception.code, npl.BROKER_TIMEOUT)
        self.assertEqual(a.requests_in_flight(), 0)
        cancel = threading.Event()
        threading.Timer(0.1, cancel.set).start()
        with self.assertRaisesRegex(PluginPollerForwardError.Broker, "cancelled"):
            a.request("svc.stuck", 1, 30, cancel=cancel)

    def test_handler_error_and_non_json_result(self):
        a, b = self.client(), self.client()

        def boom(p):
            raise ValueError("no good")
        b.subscribe("svc.boom", boom)
        b.subscribe("svc.set", lambda p: {1, 2})
        with self.assertRaisesRegex(PluginPollerForwardError.Broker, "ValueError: no good") as cm:
            a.request("svc.boom", 1, WAIT)
        self.assertEqual(cm.exception.code, npl.BROKER_RESPONDER_ERROR)
        with self.assertRaisesRegex(PluginPollerForwardError.Broker, "not JSON"):
            a.request("svc.set", 1, WAIT)

    def test_oversize_payload_refused_before_sending(self):
        a, b = self.client(), self.client()
        b.subscribe("svc.echo", lambda p: "ok")
        with self.assertRaises(PluginPollerForwardError.Broker) as cm:
            a.request("svc.echo", "x" * (a.max_payload + 1), WAIT)
        self.assertEqual(cm.exception.code, npl.BROKER_PAYLOAD_TOO_LARGE)
        self.assertIn("max_payload", str(cm.exception))
        with self.assertRaises(PluginPollerForwardError.Broker):
            a.publish("svc.echo", "x" * (a.max_payload + 1))
        # the connection survived: nothing oversize reached the server
        self.assertEqual(a.request("svc.echo", "small", WAIT), "ok")
        self.assertEqual(a.reconnects, 0)

    def test_bad_subject_and_closed_client(self):
        a = self.client()
        with self.assertRaises(PluginPollerForwardError.Broker):
            a.subscribe("has space", lambda p: None)
        a.close()
        with self.assertRaises(PluginPollerForwardError.Broker) as cm:
            a.request("x", 1, 1)
        self.assertEqual(cm.exception.code, npl.BROKER_CLOSED)
        self.assertTrue(a.wait_closed(0))

    def test_unsubscribe(self):
        a, b = self.client(), self.client()
        sid = b.subscribe("svc.u", lambda p: 1)
        self.assertEqual(a.request("svc.u", 0, WAIT), 1)
        b.unsubscribe(sid)
        b.flush()
        with self.assertRaises(PluginPollerForwardError.Broker) as cm:
            a.request("svc.u", 0, WAIT)
        self.assertEqual(cm.exception.code, npl.BROKER_NO_RESPONDERS)

    def test_unreachable_server_is_a_clear_error(self):
        port = self.server.port
        self.server.stop()
        with self.assertRaisesRegex(PluginPollerForwardError.Broker,
                                    f"127.0.0.1:{port}: cannot connect") as cm:
            connect_broker(f"nats://127.0.0.1:{port}", connect_timeout=2)
        self.assertEqual(cm.exception.code, npl.BROKER_CLOSED)


class RestartTest(LiveTest):
    def test_server_restart_mid_run(self):
        a = self.client(reconnect_wait=0.05, reconnect_wait_max=0.5)
        b = self.client(reconnect_wait=0.05, reconnect_wait_max=0.5)
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def handler(p):
            if p == "hold":
                entered.set()
                release.wait(WAIT)
            return p
        b.subscribe("svc.r", handler, queue="g")
        self.assertEqual(a.request("svc.r", 1, WAIT), 1)
        outcome = {}

        def in_flight():
            try:
                outcome["value"] = a.request("svc.r", "hold", 60)
            except PluginPollerForwardError as exc:
                outcome["error"] = exc
        t = threading.Thread(target=in_flight)
        t.start()
        self.assertTrue(entered.wait(WAIT))
        self.server.stop()
        t.join(WAIT)
        self.assertFalse(t.is_alive())
        self.assertIsInstance(outcome.get("error"), PluginPollerForwardError.Broker)
        self.assertEqual(outcome["error"].code, npl.BROKER_CLOSED)
        release.set()
        # during the outage: a request fails at once; a publish is buffered
        with self.assertRaises(PluginPollerForwardError.Broker):
            a.request("svc.r", 2, WAIT)
        got = threading.Event()
        # its own subscription: resubscribing goes before the buffer on reconnect
        a.subscribe("note", lambda p: got.set())
        a.publish("note", {"during": "outage"})
        self.server.start()
        # later requests succeed (wait=True rides out the reconnect)
        self.assertEqual(a.request("svc.r", 3, WAIT, wait=True), 3)
        self.assertTrue(got.wait(WAIT))
        self.assertGreaterEqual(a.reconnects, 1)
        self.assertGreaterEqual(b.reconnects, 1)
        for c in self.clients:
            c.close()
        self.clients = []
        self.assertTrue(wait_until(lambda: threading.active_count() <= self.threads0, WAIT),
                        threading.enumerate())
        self.assertTrue(wait_until(lambda: fd_count() <= self.fds0 + 0, WAIT),
                        f"{fd_count()} fds, {self.fds0} before")

    def test_close_while_reconnecting_leaves_nothing(self):
        a = self.client(reconnect_wait=0.05, reconnect_wait_max=0.2)
        self.server.stop()
        self.assertTrue(wait_until(lambda: not a.connected.is_set(), WAIT))
        a.close()
        self.assertTrue(a.wait_closed(0))
        self.assertFalse(a._reader.is_alive())
        self.assertTrue(wait_until(lambda: threading.active_count() <= self.threads0, WAIT))
        self.assertTrue(wait_until(lambda: fd_count() <= self.fds0, WAIT))

    def test_outage_buffer_bound(self):
        a = self.client(outage_buffer=1000, reconnect_wait=5, reconnect_wait_max=5)
        self.server.stop()
        self.assertTrue(wait_until(lambda: not a.connected.is_set(), WAIT))
        a.publish("x", "y" * 500)
        with self.assertRaisesRegex(PluginPollerForwardError.Broker, "outage buffer"):
            a.publish("x", "y" * 500)


class AuthTest(LiveTest):
    server_args = ("--auth", "s3cret")

    def test_token(self):
        url = f"nats://s3cret@127.0.0.1:{self.server.port}"
        c = connect_broker(url)
        self.clients.append(c)
        c.subscribe("a", lambda p: "ok")
        self.assertEqual(c.request("a", 1, WAIT), "ok")

    def test_wrong_token_is_a_clear_error(self):
        for url in (f"nats://wrong@127.0.0.1:{self.server.port}", self.server.url):
            with self.subTest(url=url):
                with self.assertRaises(PluginPollerForwardError.Broker) as cm:
                    connect_broker(url)
                self.assertEqual(cm.exception.code, npl.BROKER_AUTH_FAILED)
                self.assertIn(f"127.0.0.1:{self.server.port}", str(cm.exception))
                self.assertIn("Authorization Violation", str(cm.exception))
        self.assertEqual(fd_count(), self.fds0)


class UserPassTest(LiveTest):
    server_args = ("--user", "ann", "--pass", "pw")

    def test_user_password(self):
        c = connect_broker(f"nats://ann:pw@127.0.0.1:{self.server.port}")
        self.clients.append(c)
        self.assertEqual(c.info.get("auth_required"), True)
        with self.assertRaises(PluginPollerForwardError.Broker) as cm:
            connect_broker(f"nats://ann:nope@127.0.0.1:{self.server.port}")
        self.assertEqual(cm.exception.code, npl.BROKER_AUTH_FAILED)


def make_certs(folder: str) -> dict:
    """A CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        raise unittest.SkipTest("openssl CLI missing: cannot make test certificates")
    f = {k: os.path.join(folder, k) for k in ("ca.key", "ca.pem", "srv.key", "srv.csr",
                                              "srv.pem", "ext")}
    # Extensions as Python 3.13's strict verification (VERIFY_X509_STRICT) wants
    # them: a CA with key usage, a server certificate naming its issuer's key.
    with open(f["ext"], "w") as out:
        out.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                  "basicConstraints=CA:FALSE\n"
                  "keyUsage=critical,digitalSignature,keyEncipherment\n"
                  "extendedKeyUsage=serverAuth\n"
                  "subjectKeyIdentifier=hash\n"
                  "authorityKeyIdentifier=keyid,issuer\n")
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f["ca.key"], "-out",
        f["ca.pem"], "-days", "2", "-subj", "/CN=nexo-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f["srv.key"], "-out", f["srv.csr"],
        "-subj", "/CN=localhost")
    run("x509", "-req", "-in", f["srv.csr"], "-CA", f["ca.pem"], "-CAkey", f["ca.key"],
        "-CAcreateserial", "-out", f["srv.pem"], "-days", "2", "-extfile", f["ext"])
    return f


class TlsTest(LiveTest):
    def setUp(self):
        require_nats()
        self.certs = make_certs(tempfile.mkdtemp(prefix="nexo-tls-"))
        self.addCleanup(shutil.rmtree, os.path.dirname(self.certs["ca.pem"]), True)
        self.server_args = ("--tls", "--tlscert", self.certs["srv.pem"],
                            "--tlskey", self.certs["srv.key"])
        super().setUp()

    def test_tls_with_ca_file(self):
        for scheme in ("tls", "nats"):          # nats:// too: INFO says tls_required
            with self.subTest(scheme=scheme):
                c = connect_broker(f"{scheme}://127.0.0.1:{self.server.port}",
                                   tls_ca_file=self.certs["ca.pem"])
                self.clients.append(c)
                c.subscribe(f"sec.{scheme}", lambda p: {"tls": p})
                self.assertEqual(c.request(f"sec.{scheme}", 1, WAIT), {"tls": 1})
                self.assertTrue(c.info.get("tls_required"))

    def test_untrusted_certificate_is_a_clear_error(self):
        with self.assertRaisesRegex(PluginPollerForwardError.Broker,
                                    f"127.0.0.1:{self.server.port}: TLS failed") as cm:
            connect_broker(f"tls://127.0.0.1:{self.server.port}")
        self.assertEqual(cm.exception.code, npl.BROKER_CLOSED)


class FakeServerTest(unittest.TestCase):
    """The client against a hand-written server: what it sends, and server PINGs."""

    def setUp(self):
        logger = logging.getLogger("nexo_poller")
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.CRITICAL)
        self.lst = socket.socket()
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen(4)
        self.addCleanup(self.lst.close)
        self.port = self.lst.getsockname()[1]
        self.conns = []

    def serve(self, fn) -> None:
        """Run ``fn()`` as the server, joined and its connections closed at cleanup."""
        t = threading.Thread(target=fn)
        t.start()

        def done():
            t.join(WAIT)
            for conn in self.conns:
                conn.close()
        self.addCleanup(done)

    def accept(self, info=b'{"server_id":"fake"}'):
        """Accept one client and send INFO; returns (connection, its reader)."""
        conn, _ = self.lst.accept()
        self.conns.append(conn)
        conn.sendall(b"INFO " + info + b"\r\n")
        return conn, conn.makefile("rb")

    def handshake(self):
        """Accept one client and answer its CONNECT + PING."""
        conn, f = self.accept()
        f.readline()
        f.readline()
        conn.sendall(b"PONG\r\n")
        return conn, f

    def test_connect_fields_and_answering_server_pings(self):
        got = {}

        def server():
            conn, f = self.accept(b'{"server_id":"fake","max_payload":4096}')
            got["connect"] = f.readline()
            got["ping"] = f.readline()
            conn.sendall(b"PONG\r\n")          # no inbox SUB before a first request
            conn.sendall(b"PING\r\n")
            got["pong"] = f.readline()
            conn.sendall(b'INFO {"server_id":"fake","max_payload":2048,'
                         b'"connect_urls":["127.0.0.1:1","10.0.0.9:4333"],"ldm":true}\r\n'
                         b"PING\r\n")
            got["pong2"] = f.readline()
        self.serve(server)
        c = connect_broker(f"nats://tok@127.0.0.1:{self.port}", name="tester")
        self.addCleanup(c.close)
        self.assertTrue(wait_until(lambda: "pong2" in got, WAIT))
        opts = json.loads(got["connect"][len(b"CONNECT "):])
        self.assertEqual({k: opts[k] for k in ("verbose", "pedantic", "headers",
                                               "no_responders", "name", "auth_token")},
                         {"verbose": False, "pedantic": False, "headers": True,
                          "no_responders": True, "name": "tester", "auth_token": "tok"})
        self.assertEqual(opts["version"], npl.__version__)
        self.assertIn("lang", opts)
        self.assertEqual(got["ping"], b"PING\r\n")
        self.assertEqual(got["pong"], b"PONG\r\n")
        self.assertEqual(got["pong2"], b"PONG\r\n")      # after the async INFO
        self.assertTrue(wait_until(lambda: c.lame_duck, WAIT))
        self.assertEqual(c.max_payload, 2048)
        self.assertEqual([s.name for s in c.servers],
                         [f"127.0.0.1:{self.port}", "127.0.0.1:1", "10.0.0.9:4333"])
        self.assertEqual(c.servers[2].token, "tok")          # learned servers keep auth

    def test_protocol_garbage_drops_the_connection_and_reconnects(self):
        def server():
            conn, f = self.handshake()
            conn.sendall(b"BOGUS STUFF\r\n")
            self.handshake()
        self.serve(server)
        c = connect_broker(f"nats://127.0.0.1:{self.port}", reconnect_wait=0.01)
        self.addCleanup(c.close)
        self.assertTrue(wait_until(lambda: c.reconnects == 1, WAIT))
        self.assertTrue(c.connected.is_set())

    def test_silent_server_is_dropped_after_unanswered_pings(self):
        self.serve(self.handshake)            # then it never answers again
        # The one retry connects to the listener nobody accepts from again and
        # waits connect_timeout for an INFO (5 s by default).
        c = connect_broker(f"nats://127.0.0.1:{self.port}", ping_interval=0.1,
                           max_reconnect_attempts=1, reconnect_wait=0.01, connect_timeout=1.0)
        self.addCleanup(c.close)
        self.assertTrue(c.wait_closed(WAIT))     # dropped, one failed retry, gave up
        self.assertFalse(c.connected.is_set())


class NkeyTest(unittest.TestCase):
    def test_nonce_without_credentials_fails_clearly(self):
        """A server that sends a nonce wants an Ed25519 signature."""
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        self.addCleanup(lst.close)

        def serve():
            conn, _ = lst.accept()
            with conn:
                conn.sendall(b'INFO {"server_id":"fake","nonce":"abc","auth_required":true}\r\n')
                conn.recv(100)
        t = threading.Thread(target=serve)
        t.start()
        with self.assertRaisesRegex(PluginPollerForwardError.Broker, "Ed25519") as cm:
            connect_broker(f"nats://127.0.0.1:{lst.getsockname()[1]}")
        self.assertEqual(cm.exception.code, npl.BROKER_AUTH_FAILED)
        t.join(WAIT)


def handle(prefix: str, timeout: float = WAIT) -> npl.PluginPollerHandle:
    return npl.PluginPollerHandle(plugin_id="counter", kinds=("count",),
                                  broker_topic_prefix=prefix, tick_timeout=timeout)


def tick_request(job="j1", cursor=None, config=None) -> npl.TickRequest:
    return npl.build_tick_request("count", job, "agent", cursor, config or {},
                                  datetime(2026, 5, 17, tzinfo=timezone.utc), 60)


class PluginTest(LiveTest):
    def start_plugin(self, prefix: str) -> subprocess.Popen:
        env = dict(os.environ, NEXO_BROKER_URL=self.server.url,
                   NEXO_POLLER_TICK_TOPIC=npl.tick_topic_for(prefix),
                   NEXO_POLLER_PLUGIN_ID="counter")
        env.pop("NEXO_POLLER_EPHEMERAL", None)
        p = subprocess.Popen([PY, PLUGIN, "count"], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def test_run_plugin_answers_forward_tick(self):
        self.start_plugin("plugin.poller.counter")
        daemon = self.client()
        h = handle("plugin.poller.counter")
        reply = npl.forward_tick(daemon, h, tick_request(cursor=b"41"))
        self.assertEqual(npl.decode_cursor(reply.next_cursor), b"42")
        self.assertEqual(reply.metrics, npl.TickMetrics(1, 0) if reply.metrics.items_dispatched
                         == 0 else reply.metrics)
        self.assertEqual(reply.metrics.items_seen, 1)
        with self.assertRaises(npl.PollerError.Permanent):
            npl.forward_tick(daemon, h, tick_request(config={"fail": "permanent"}))
        proxy = npl.PluginPollerProxy("count", h, daemon)
        ctx = npl.PollContext("j2", "agent", "count", b"7", {}, datetime.now(timezone.utc),
                              timedelta(seconds=60))
        self.assertEqual(proxy.tick(ctx).next_cursor, b"8")

    def test_two_plugin_processes_share_ticks(self):
        p1, p2 = self.start_plugin("pp.c"), self.start_plugin("pp.c")
        daemon = self.client()
        h = handle("pp.c")
        marks = os.path.join(self.server.store, "marks")
        npl.forward_tick(daemon, h, tick_request())
        # Tick until both processes have answered: the second may still be
        # starting (a loaded machine), so the bound is time, not a count.
        pids, i, deadline = set(), 0, time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            i += 1
            npl.forward_tick(daemon, h, tick_request(job=f"j{i}", config={"mark": marks}))
            with open(marks) as f:
                pids = {line.split()[1] for line in f}
        self.assertEqual(pids, {str(p1.pid), str(p2.pid)})

    def test_run_plugin_answers_nexo_shapes(self):
        """As nexo's own daemon sends on NATS: a bare Message (reply_to null,
        the NATS reply subject set), and the Event(Message) form."""
        self.start_plugin("nx.c")
        raw = self.client(nexo_envelopes=False)
        params = tick_request(cursor=b"9").to_dict()
        bare = {"id": "m1", "topic": "nx.c.tick", "reply_to": None,
                "payload": {"method": "poll_tick", "params": params}}
        event = npl.nexo_request_event("nx.c.tick", {"method": "poll_tick", "params": params},
                                       None)
        for body in (bare, event):
            with self.subTest(shape="message" if body is bare else "event"):
                reply = raw.request("nx.c.tick", body, WAIT, wait=True)
                # nexo's daemon reads the reply as a Message, its payload as a TickReply
                self.assertIn("payload", reply)
                self.assertEqual(npl.decode_cursor(reply["payload"]["next_cursor"]), b"10")
                self.assertEqual(reply["source"], "plugin.poller")
                # and the JSON-RPC reading still works
                self.assertEqual(npl.decode_cursor(
                    reply["payload"]["result"]["next_cursor"]), b"10")
        # errors keep their codes
        params["config"] = {"fail": "transient"}
        bare["payload"]["params"] = params
        reply = raw.request("nx.c.tick", bare, WAIT)
        self.assertEqual(reply["payload"]["error"]["code"], npl.ERROR_TRANSIENT)

    def test_plugin_speaking_only_nexo_envelope(self):
        """A nexo-style plugin on raw sockets: it reads Event(Message), answers
        an Event with {"result": ...} on Message.reply_to (not the NATS reply)."""
        sock = socket.create_connection(("127.0.0.1", self.server.port), WAIT)
        self.addCleanup(sock.close)
        f = sock.makefile("rb")
        self.assertTrue(f.readline().startswith(b"INFO "))
        sock.sendall(b'CONNECT {"verbose":false,"headers":true}\r\n'
                     b"SUB plugin.poller.raw.tick rawq 1\r\nPING\r\n")
        self.assertEqual(f.readline(), b"PONG\r\n")
        seen = {}

        def plugin():
            while True:
                line = f.readline()
                if not line:
                    return
                if line.startswith(b"PING"):
                    sock.sendall(b"PONG\r\n")
                    continue
                if not line.startswith(b"MSG "):
                    continue
                _, subject, sid, *rest = line.split()
                body = json.loads(f.read(int(rest[-1]) + 2))
                seen["event"] = body
                msg = body["payload"]
                cursor = msg["payload"]["params"]["cursor"]
                answer = {"id": "x", "timestamp": "2026-05-17T10:00:00Z",
                          "topic": msg["reply_to"], "source": "plugin.poller",
                          "session_id": None,
                          "payload": {"result": {"next_cursor": cursor + "Q",
                                                 "next_interval_secs": 7}}}
                data = json.dumps(answer).encode()
                sock.sendall(b"PUB %s %d\r\n%s\r\n" % (msg["reply_to"].encode(), len(data),
                                                       data))
                return
        t = threading.Thread(target=plugin)
        t.start()
        daemon = self.client()
        reply = npl.forward_tick(daemon, handle("plugin.poller.raw"), tick_request(cursor=b"1"))
        t.join(WAIT)
        self.assertEqual((reply.next_cursor, reply.next_interval_secs), ("MQQ", 7))
        ev = seen["event"]
        self.assertEqual(ev["topic"], "plugin.poller.raw.tick")
        self.assertEqual(ev["payload"]["payload"]["method"], "poll_tick")
        self.assertTrue(ev["payload"]["reply_to"].startswith("_INBOX."))


class RawRequestTest(LiveTest):
    def test_raw_request_with_headers_and_pipelined_requests(self):
        c = self.client()
        seen = []
        sub = self.client(nexo_envelopes=False)
        sub.subscribe("raw.echo", lambda p: seen.append(p) or {"got": p})
        payload, headers, status = c.request("raw.echo", b'{"a":1}', 5, raw=True,
                                             headers={"X-One": "1"})
        self.assertEqual(payload, b'{"got":{"a":1}}')
        self.assertEqual(seen, [{"a": 1}])          # no nexo envelope went out
        c.publish("raw.echo", {"b": 2}, raw=True, headers={"X-Two": "2"})
        self.assertTrue(wait_until(lambda: {"b": 2} in seen))
        replies = c.request_many([("raw.echo", str(i).encode(), None) for i in range(50)], 5)
        self.assertEqual([r[0] for r in replies], [b'{"got":%d}' % i for i in range(50)])
        # JetStream answers a compare-and-set through headers
        c.request("$JS.API.STREAM.CREATE.S", {"name": "S", "subjects": ["s.>"]}, 5, raw=True)
        ok = c.request("s.k", b"1", 5, raw=True,
                       headers={"Nats-Expected-Last-Subject-Sequence": "0"})[0]
        bad = c.request("s.k", b"2", 5, raw=True,
                        headers={"Nats-Expected-Last-Subject-Sequence": "0"})[0]
        self.assertIn(b'"seq":1', ok)
        self.assertIn(b"10071", bad)
        missing = c.request_many([("no.responder", b"", None)], 2)[0]
        self.assertIn("no responders", str(missing))


if __name__ == "__main__":
    unittest.main()
