"""The built-in ``imap`` and ``gmail`` kinds (issue 24 item 3; section
"Built-in kinds") against a real Dovecot on loopback (tests/imap_support.py):
mails appended through imaplib, delivered once; a recreated mailbox; mark
as read only after the commit; STARTTLS and implicit TLS with a test CA;
nexo's gmail keys over IMAP; a daemon end to end."""

import itertools
import json
import os
import socket
import ssl
import sys
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imap_support import PASSWORD, USER, Dovecot, require_imap  # noqa: E402
from support import TempDirCase, write_config  # noqa: E402
from test_deliveries import Sink  # noqa: E402

import nexo_poller as nx  # noqa: E402
from nexo_poller import (ConfigError, Delivery, ErrorClass, GmailPoller,  # noqa: E402
                         MailPoller, PollContext, PollerError, Runner, load_config)

DELIVER = {"channel": "telegram", "to": "42"}
_names = itertools.count(1)


_shared: list[Dovecot] = []


class MailCase(TempDirCase):
    """One Dovecot for the module (a class with ``own_server`` gets its own)."""
    dovecot: Dovecot
    own_server = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        require_imap()
        if cls.own_server:
            cls.dovecot = Dovecot().start()
            cls.addClassCleanup(cls.dovecot.cleanup)
            return
        if not _shared:
            _shared.append(Dovecot().start())
            unittest.addModuleCleanup(_shared[0].cleanup)
            unittest.addModuleCleanup(_shared.clear)
        cls.dovecot = _shared[0]

    def setUp(self):
        super().setUp()
        self.mailbox = f"Box{next(_names)}"     # each test its own mailbox
        with self.dovecot.client() as conn:
            conn.create(self.mailbox)

    def append(self, subject, body="hello", **kw):
        return self.dovecot.append(subject, body, mailbox=self.mailbox, **kw)

    def seen(self, uid):
        return self.dovecot.seen(uid, self.mailbox)

    def config(self, **over):
        cfg = {"host": "127.0.0.1", "port": self.dovecot.tls_port,
               "ca_file": self.dovecot.ca_file, "username": USER, "password": PASSWORD,
               "mailbox": self.mailbox, "deliver": DELIVER,
               "message_template": "{subject}|{from}"}
        cfg.update(over)
        return {k: v for k, v in cfg.items() if v is not None}

    def tick(self, config, cursor=None, kind="imap", timeout=None, cancel=None):
        ctx = PollContext("job1", "default", kind, cursor, config,
                          datetime.now(timezone.utc), timedelta(seconds=60),
                          cancel or threading.Event(), timeout)
        return (GmailPoller if kind == "gmail" else MailPoller)().tick(ctx)

    def failing(self, config, kind="imap", **kw) -> PollerError:
        with self.assertRaises(PollerError) as caught:
            self.tick(config, kind=kind, **kw)
        return caught.exception

    @staticmethod
    def texts(ack):
        return [d.payload["text"] for d in ack.deliver]


class DeliveredOnceTest(MailCase):

    def test_new_mails_are_delivered_once(self):
        self.append("one")
        self.append("two", sender="bob@example.com")
        ack = self.tick(self.config())
        self.assertEqual(ack.deliver, (
            Delivery("telegram", "42", {"text": "one|alice@example.com"}),
            Delivery("telegram", "42", {"text": "two|bob@example.com"})))
        cursor = json.loads(ack.next_cursor)
        self.assertEqual(cursor, {"uidvalidity": self.dovecot.uidvalidity(self.mailbox),
                                  "last_uid": 2, "to_mark": []})
        again = self.tick(self.config(), ack.next_cursor)
        self.assertEqual(again.deliver, ())
        self.append("three")
        third = self.tick(self.config(), again.next_cursor)
        self.assertEqual(self.texts(third), ["three|alice@example.com"])
        self.assertEqual(json.loads(third.next_cursor)["last_uid"], 3)

    def test_max_per_tick_leaves_the_rest_for_the_next_tick(self):
        for n in range(3):
            self.append(f"m{n}")
        first = self.tick(self.config(max_per_tick=2, message_template="{subject}"))
        self.assertEqual(self.texts(first), ["m0", "m1"])
        self.assertEqual(json.loads(first.next_cursor)["last_uid"], 2)
        second = self.tick(self.config(max_per_tick=2, message_template="{subject}"),
                           first.next_cursor)
        self.assertEqual(self.texts(second), ["m2"])

    def test_search_and_template_fields(self):
        self.append("a", "body text", sender="bob@example.com")
        self.append("b", sender="carol@example.com")
        ack = self.tick(self.config(search='FROM "carol"',
                                    message_template="{uid} {subject} {snippet} {to} {x}"))
        self.assertEqual(self.texts(ack), [f"2 b hello {USER}@example.com {{x}}"])
        self.assertEqual(json.loads(ack.next_cursor)["last_uid"], 2,
                         "mail the search skips is behind the cursor too")

    def test_a_recreated_mailbox_starts_over_without_redelivering(self):
        self.append("old1")
        self.append("old2")
        ack = self.tick(self.config())
        before = json.loads(ack.next_cursor)["uidvalidity"]
        self.dovecot.recreate(self.mailbox)
        self.append("there before the tick")
        restart = self.tick(self.config(), ack.next_cursor)
        self.assertEqual(restart.deliver, ())
        cursor = json.loads(restart.next_cursor)
        self.assertNotEqual(cursor["uidvalidity"], before)
        self.assertEqual(cursor["last_uid"], 1)
        self.append("new")
        after = self.tick(self.config(), restart.next_cursor)
        self.assertEqual(self.texts(after), ["new|alice@example.com"])


class MarkReadTest(MailCase):

    def test_mail_is_marked_read_only_once_the_cursor_naming_it_is_committed(self):
        uid = self.append("mark me")
        cfg = self.config(mark_read_on_dispatch=True)
        ack = self.tick(cfg)
        self.assertEqual(len(ack.deliver), 1)
        self.assertEqual(json.loads(ack.next_cursor)["to_mark"], [uid])
        self.assertFalse(self.seen(uid), "not read before its delivery is stored")
        # The commit failed (a lost lease, a crash): the next tick gets the
        # old cursor, delivers the mail again and marks nothing.
        retry = self.tick(cfg, None)
        self.assertEqual(len(retry.deliver), 1)
        self.assertFalse(self.seen(uid))
        # The commit went through: the next tick marks it, delivers nothing.
        after = self.tick(cfg, ack.next_cursor)
        self.assertTrue(self.seen(uid))
        self.assertEqual(after.deliver, ())
        self.assertEqual(json.loads(after.next_cursor)["to_mark"], [])

    def test_imap_leaves_flags_alone_by_default(self):
        uid = self.append("keep unread")
        ack = self.tick(self.config())
        self.tick(self.config(), ack.next_cursor)
        self.assertFalse(self.seen(uid))


class TlsAndErrorsTest(MailCase):

    def test_starttls_with_the_test_ca(self):
        self.append("over starttls")
        ack = self.tick(self.config(tls="starttls", port=self.dovecot.port))
        self.assertEqual(self.texts(ack), ["over starttls|alice@example.com"])

    def test_an_unknown_ca_is_a_clear_permanent_error(self):
        for tls, port in (("implicit", self.dovecot.tls_port), ("starttls", self.dovecot.port)):
            with self.subTest(tls=tls):
                exc = self.failing(self.config(tls=tls, port=port, ca_file=None))
                self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
                self.assertIn("TLS certificate verification failed", str(exc))
                self.assertIn("config.ca_file", str(exc))

    def test_password_file(self):
        path = os.path.join(self.dir, "pw")
        with open(path, "w") as f:
            f.write(PASSWORD + "\n")
        self.append("via file")
        ack = self.tick(self.config(password=None, password_file=path))
        self.assertEqual(len(ack.deliver), 1)

    def test_a_message_over_the_size_limit_fails_the_tick(self):
        self.append("big", "x" * 5000)
        exc = self.failing(self.config(max_message_bytes=2048))
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
        self.assertIn("message UID 1 is", str(exc))
        self.assertIn("over config.max_message_bytes=2048", str(exc))

    def test_a_missing_mailbox_and_a_refused_search(self):
        exc = self.failing(self.config(mailbox="NoSuchBox"))
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
        self.assertIn("select 'NoSuchBox'", str(exc))
        exc = self.failing(self.config(search="NOSUCHKEY x"))
        self.assertEqual(exc.classify(), ErrorClass.CONFIG)
        self.assertIn("config.search: the server refused the search", str(exc))

    def test_a_trickling_server_cannot_hold_a_tick_past_its_deadline(self):
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        done = threading.Event()
        self.addCleanup(done.set)

        def trickle():                          # the two ticks' connections
            for _ in range(2):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return                      # the test ended early
                with conn:
                    while not done.wait(0.1):   # a byte every 0.1 s, never a newline
                        try:
                            conn.sendall(b"*")
                        except OSError:
                            break               # the tick gave up and hung up
        threading.Thread(target=trickle, daemon=True).start()
        cfg = self.config(tls="starttls", port=listener.getsockname()[1], timeout_secs=0.5)
        exc = self.failing(cfg)
        self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
        self.assertIn("deadline passed (timeout_secs=0.5)", str(exc))
        exc = self.failing(self.config(tls="starttls", port=listener.getsockname()[1]),
                           timeout=timedelta(seconds=0.5))
        self.assertIn("deadline passed", str(exc), "the job's own timeout is the deadline")
        cancel = threading.Event()
        cancel.set()                            # a stop or reload cancelled the tick
        exc = self.failing(self.config(), cancel=cancel)
        self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
        self.assertIn("tick cancelled", str(exc))

    def fake_server(self, greeting: bytes) -> int:
        """A loopback server that sends ``greeting`` to one client and hangs up."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)

        def serve():
            conn, _ = listener.accept()
            with conn:
                try:
                    conn.sendall(greeting)
                except OSError:
                    pass                        # the client had heard enough
        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]

    def test_a_server_that_hangs_up_is_transient(self):
        exc = self.failing(self.config(tls="starttls", port=self.fake_server(b"")))
        self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
        self.assertIn("closed the connection", str(exc))

    def test_a_response_line_over_the_size_limit_fails_the_tick(self):
        port = self.fake_server(b"* OK " + b"x" * 300_000)
        exc = self.failing(self.config(tls="starttls", port=port, max_message_bytes=100_000))
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
        self.assertIn("a response line is", str(exc))
        self.assertIn("over config.max_message_bytes=100000", str(exc))

    def test_a_foreign_cursor_is_refused(self):
        with self.assertRaises(PollerError) as caught:
            self.tick(self.config(), b"not json")
        self.assertIn("its cursor is not a mail cursor", str(caught.exception))


class WrongPasswordTest(MailCase):
    """Its own server: Dovecot slows the next logins from an address that
    failed one."""
    own_server = True

    def test_a_wrong_password_is_permanent(self):
        exc = self.failing(self.config(password="wrong"))
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
        self.assertIn(f"login as {USER!r} refused", str(exc))
        self.assertIn("AUTHENTICATIONFAILED", str(exc))


class ConfigTest(TempDirCase):

    def problem(self, kind, config):
        path = write_config(os.path.join(self.dir, "p.json"), {
            "state_db": self.db,
            "jobs": [{"id": "a", "kind": kind, "schedule": {"every_secs": 60},
                      "config": config}]})
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual([p for p, _ in caught.exception.problems], ["jobs[0].config"])
        return str(caught.exception)

    def test_validate_refuses_unknown_and_wrong_keys(self):
        base = {"host": "imap.example.com", "username": "u", "password": "p"}
        self.assertIn("config.serach: unknown key", self.problem("imap", {**base, "serach": 1}))
        self.assertIn("config.query: unknown key", self.problem("imap", {**base, "query": "x"}))
        self.assertIn("config needs one of password",
                      self.problem("imap", {"host": "h", "username": "u"}))
        self.assertIn("config.tls must be", self.problem("imap", {**base, "tls": "none"}))
        self.assertIn("config.extract.n must be a valid regular expression",
                      self.problem("gmail", {**base, "query": "x", "extract": {"n": "("}}))
        self.assertIn("config.query must be", self.problem("gmail", base))
        self.assertIn("config.host is required: the built-in gmail kind reads the mail over "
                      "IMAP", self.problem("gmail", {"query": "is:unread",
                                                     "message_template": "{subject}",
                                                     "deliver": DELIVER}))
        self.assertIn("config.newer_than must be",
                      self.problem("gmail", {**base, "query": "x", "newer_than": "1 day"}))
        self.assertIn("config.search: unknown key",
                      self.problem("gmail", {**base, "query": "x", "search": "ALL"}))

    def test_nexos_gmail_job_config_is_accepted(self):
        path = write_config(os.path.join(self.dir, "p.json"), {
            "state_db": self.db,
            "jobs": [{"id": "a", "kind": "gmail", "schedule": {"every_secs": 60},
                      "config": {"host": "imap.gmail.com", "username": "u",
                                 "password_file": "/run/secrets/gmail",
                                 "query": "is:unread subject:lead", "newer_than": "1d",
                                 "max_per_tick": 20, "dispatch_delay_ms": 1000,
                                 "sender_allowlist": ["@acme.com"],
                                 "extract": {"name": "Name: (.+)"},
                                 "require_fields": ["name"],
                                 "message_template": "Lead {name}",
                                 "mark_read_on_dispatch": True, "deliver": DELIVER}}]})
        self.assertEqual(load_config(path).jobs[0].kind, "gmail")


class GmailTest(MailCase):

    def gmail(self, **over):
        return self.config(**{"query": "is:unread subject:lead", **over})

    def test_sender_allowlist_extract_and_require_fields(self):
        self.append("Lead 1", "Name: Ann\nPhone: 555-1234", sender="Bob <bob@ACME.com>")
        self.append("Lead 2", "Name: Eve\nPhone: 1", sender="eve@evil.example")
        self.append("Lead 3", "Name: Ned, no phone", sender="ned@acme.com")
        self.append("Invoice", "Name: Inv\nPhone: 2", sender="bob@acme.com")
        cfg = self.gmail(sender_allowlist=["@acme.com"],
                         extract={"name": r"Name: (\w+)", "phone": r"Phone: ([\d-]+)"},
                         require_fields=["phone"],
                         message_template="{name} {phone} ({subject})")
        ack = self.tick(cfg, kind="gmail")
        self.assertEqual(self.texts(ack), ["Ann 555-1234 (Lead 1)"])
        self.assertEqual(json.loads(ack.next_cursor)["to_mark"], [1],
                         "gmail marks read by default (nexo's default)")
        self.tick(cfg, ack.next_cursor, kind="gmail")
        self.assertTrue(self.seen(1))
        self.assertFalse(self.seen(3), "only delivered mail is marked read")

    def test_is_unread_and_newer_than_become_an_imap_search(self):
        old = time.time() - 10 * 86400
        self.append("lead old", internaldate=old)
        self.append("lead new")
        seen = self.append("lead seen")
        with self.dovecot.client(self.mailbox) as conn:
            conn.uid("STORE", str(seen), "+FLAGS", "(\\Seen)")
        ack = self.tick(self.gmail(newer_than="2d", message_template="{subject}"),
                        kind="gmail")
        self.assertEqual(self.texts(ack), ["lead new"])
        ack = self.tick(self.gmail(query="subject:lead newer_than:2h",
                                   message_template="{subject}"), kind="gmail")
        self.assertEqual(self.texts(ack), ["lead new", "lead seen"])

    def test_on_gmail_the_query_goes_as_x_gm_raw(self):
        """Gmail's side is a scripted server here (Dovecot has no X-GM-RAW):
        what matters is the command the kind sends."""
        got = []
        port = self.gmail_like_server(got)
        ack = self.tick(self.config(port=port, query="is:unread subject:año",
                                    newer_than="1d", message_template="{subject}"),
                        kind="gmail")
        self.assertEqual(self.texts(ack), ["Lead"])
        query = "is:unread subject:año newer_than:1d".encode()
        self.assertEqual(got, [f"UID SEARCH CHARSET UTF-8 UID 1:* X-GM-RAW "
                               f"{{{len(query)}}}".encode(), query])

    def gmail_like_server(self, got):
        """An implicit-TLS IMAP server (the test CA's certificate) that says
        X-GM-EXT-1 and answers one session's commands; the SEARCH command
        and its literal go into ``got``."""
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(os.path.join(self.dovecot.dir, "server.pem"),
                            os.path.join(self.dovecot.dir, "server.key"))
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        mail = b"From: bob@acme.com\r\nSubject: Lead\r\n\r\nhi\r\n"

        def session(f):
            f.write(b"* OK Gimap ready\r\n")
            f.flush()
            while line := f.readline():
                tag, command = line.split(b" ", 1)
                command, say = command.rstrip(b"\r\n"), []
                if command == b"CAPABILITY":
                    say = [b"* CAPABILITY IMAP4rev1 AUTH=PLAIN X-GM-EXT-1"]
                elif command.startswith(b"AUTHENTICATE"):
                    f.write(b"+ \r\n")
                    f.flush()
                    f.readline()
                elif command.startswith(b"SELECT"):
                    say = [b"* 1 EXISTS", b"* OK [UIDVALIDITY 7] ok", b"* OK [UIDNEXT 3] ok"]
                elif command.startswith(b"UID SEARCH"):
                    f.write(b"+ go\r\n")
                    f.flush()
                    size = int(command.rsplit(b"{", 1)[1].rstrip(b"}"))
                    got.extend([command, f.read(size)])
                    f.readline()
                    say = [b"* SEARCH 2"]
                elif command.startswith(b"UID FETCH"):
                    say = [b'* 1 FETCH (UID 2 INTERNALDATE "05-Dec-2026 10:00:00 +0000" '
                           b"BODY[] {%d}\r\n%s)" % (len(mail), mail)]
                elif command == b"LOGOUT":
                    say = [b"* BYE"]
                f.write(b"".join(x + b"\r\n" for x in say) + tag + b" OK done\r\n")
                f.flush()

        def serve():
            try:
                conn, _ = listener.accept()
                with tls.wrap_socket(conn, server_side=True) as conn, \
                        conn.makefile("rwb") as f:
                    session(f)
            except OSError:
                pass                            # the test ended or the client left
        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]

    def test_nexos_gmail_cursor_counts_as_none(self):
        self.append("lead a")
        ack = self.tick(self.gmail(message_template="{subject}"), b'["18c2f0a1b2c3d4e5"]',
                        kind="gmail")
        self.assertEqual(self.texts(ack), ["lead a"])
        with self.assertRaises(PollerError):
            self.tick(self.config(), b'["18c2f0a1b2c3d4e5"]')     # imap: no such cursor

    def test_a_gmail_only_operator_is_a_config_error_over_plain_imap(self):
        exc = self.failing(self.gmail(query="label:work"), kind="gmail")
        self.assertEqual(exc.classify(), ErrorClass.CONFIG)
        self.assertIn("config.query: label:work needs Gmail's X-GM-RAW", str(exc))


class DaemonTest(MailCase):

    def pollers_json(self):
        return write_config(os.path.join(self.dir, "pollers.json"), {
            "state_db": self.db, "default_jitter_ms": 0, "shutdown_grace_secs": 3,
            "jobs": [{"id": "mail", "kind": "imap", "schedule": {"every_secs": 3600},
                      "config": self.config(mark_read_on_dispatch=True,
                                            message_template="new: {subject}")}]})

    def tick_daemon(self, path):
        """A fresh daemon on ``path`` runs the job once; what reached its sink."""
        sink = Sink()
        r = Runner(load_config(path), deliver=sink)
        self.addCleanup(r.stop)
        r.start(background=False)
        self.assertEqual(r.run_once("mail").status, nx.TickStatus.OK)
        self.assertTrue(sink.wait_for(1))
        r.stop()
        return [(t, e["payload"]) for t, e in sink.got]

    def test_deliveries_reach_the_sink_and_the_cursor_survives_a_restart(self):
        path = self.pollers_json()
        self.append("first")
        self.assertEqual(self.tick_daemon(path),
                         [("plugin.outbound.telegram", {"text": "new: first", "to": "42"})])
        self.assertFalse(self.seen(1))
        self.append("second")                   # the next daemon carries on
        self.assertEqual([p["text"] for _, p in self.tick_daemon(path)], ["new: second"])
        self.assertTrue(self.seen(1), "marked read by the tick after its commit")
        state = nx.open_state(self.db, readonly=True)
        self.addCleanup(state.close)
        cursor = json.loads(state.load(["mail"])["mail"].cursor)
        self.assertEqual((cursor["last_uid"], cursor["to_mark"]), (2, [2]))

if __name__ == "__main__":
    unittest.main()
