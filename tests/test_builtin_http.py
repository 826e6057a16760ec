"""The built-in HTTP kinds ``rss`` and ``webhook_poll`` (issue 24 items 1
and 2; section "Built-in kinds"): each against a real ``http.server`` on
127.0.0.1 in a thread, nothing mocked but, in one test, which address
counts as public."""

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import tracemalloc
import unittest
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import TempDirCase, write_config  # noqa: E402
from test_deliveries import Sink  # noqa: E402

import nexo_poller as nx  # noqa: E402
from nexo_poller import (ConfigError, Delivery, ErrorClass, PollContext,  # noqa: E402
                         PollerError, RssPoller, WebhookPoller, load_config)

WAIT = 15.0
DELIVER = {"channel": "telegram", "to": "42"}


class Server:
    """An HTTP server on ``host`` (a thread per connection): ``routes`` maps
    a path (query included) to ``answer(handler)``, which writes the whole
    answer.  Records each request (method, path, headers, body) and counts
    the connections it accepted."""

    def __init__(self, test, routes=None, host="127.0.0.1", tls=None):
        self.routes = dict(routes or {})
        self.requests, self.connections = [], 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                with server.lock:
                    server.connections += 1
                super().setup()

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def answer(self):
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else b""
                with server.lock:
                    server.requests.append((self.command, self.path, dict(self.headers), body))
                route = server.routes.get(self.path)
                if route is None:
                    reply(self, 404, b"no route")
                else:
                    route(self)
                self.close_connection = True
            do_GET = do_POST = answer

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:         # (certificate, key) files
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.base = "%s://%s:%d" % ("https" if tls else "http", host,
                                    self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()
        test.addCleanup(self.close)

    def url(self, path):
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def headers_of(self, i):
        return {k.lower(): v for k, v in self.requests[i][2].items()}


def reply(h, status, body=b"", headers=()):
    """Write a whole answer on handler ``h``."""
    h.send_response(status)
    for k, v in headers:
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(body)


def fixed(status, body=b"", headers=()):
    body = body.encode() if isinstance(body, str) else body
    return lambda h: reply(h, status, body, headers)


def rss2(*items, extra=""):
    """An RSS 2.0 feed of ``items``: (title, link, guid or None) each."""
    out = []
    for title, link, guid in items:
        g = f"<guid>{guid}</guid>" if guid else ""
        out.append(f"<item><title>{title}</title><link>{link}</link>{g}"
                   f"<description>about {title}</description>"
                   f"<pubDate>Mon, 01 Jun 2026 10:00:00 GMT</pubDate></item>")
    return (f'<?xml version="1.0"?>{extra}<rss version="2.0"><channel><title>T</title>'
            f'{"".join(out)}</channel></rss>')


def trickle(test, *headers):
    """A route answering 200 with ``headers``, then a byte every 50 ms until the test ends."""
    stop = threading.Event()
    test.addCleanup(stop.set)

    def answer(h):
        h.send_response(200)
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        while not stop.wait(0.05):
            h.wfile.write(b" ")
            h.wfile.flush()
    return answer


class HttpCase(TempDirCase):

    def daemon(self, path):
        """A started Runner on the config at ``path``, delivering to a Sink: (runner, sink)."""
        sink = Sink()
        return self.start_runner(load_config(path), deliver=sink), sink

    def tick(self, poller, config, cursor=None, timeout=None, cancel=None):
        ctx = PollContext("job1", "default", poller.kind, cursor, config,
                          datetime.now(timezone.utc), timedelta(seconds=60),
                          cancel or threading.Event(),
                          None if timeout is None else timedelta(seconds=timeout))
        return poller.tick(ctx)

    def failing(self, poller, config, cursor=None, timeout=None) -> PollerError:
        with self.assertRaises(PollerError) as caught:
            self.tick(poller, config, cursor, timeout)
        return caught.exception

    def rss(self, url, **more):
        return {"feed_url": url, "deliver": DELIVER, "allow_private_networks": True, **more}

    def assertConfigErrors(self, poller, cases):
        """Each (config, text) of ``cases`` is a Config error of ``poller`` saying ``text``."""
        for config, key in cases:
            with self.subTest(config=config):
                exc = self.failing(poller, config)
                self.assertEqual(exc.classify(), ErrorClass.CONFIG)
                self.assertIn(key, str(exc))

    @staticmethod
    def texts(ack):
        return [d.payload["text"] for d in ack.deliver]


class RssFeedTest(HttpCase):

    def test_rss2_items_with_and_without_guid(self):
        srv = Server(self)
        srv.routes["/feed"] = fixed(200, rss2(("Two", "http://x.test/2", None),
                                              ("One", "http://x.test/1", "g-1")))
        ack = self.tick(RssPoller(), self.rss(srv.url("/feed")))
        self.assertEqual(self.texts(ack), ["Two\nhttp://x.test/2", "One\nhttp://x.test/1"])
        self.assertEqual(ack.deliver[0], Delivery("telegram", "42",
                                                  {"text": "Two\nhttp://x.test/2"}))
        cursor = json.loads(ack.next_cursor)
        self.assertEqual(sorted(cursor["seen_ids"]), ["g-1", "http://x.test/2"],
                         "the guid, else the link")
        self.assertEqual((ack.metrics.items_seen, ack.metrics.items_dispatched), (2, 2))
        again = self.tick(RssPoller(), self.rss(srv.url("/feed")), ack.next_cursor)
        self.assertEqual(again.deliver, (), "nothing new")
        nexo = self.tick(RssPoller(), self.rss(srv.url("/feed"), deliver={
            "channel": "telegram", "recipient": "7"}))        # nexo's alias of "to"
        self.assertEqual(nexo.deliver[0].recipient, "7")
        srv.routes["/feed"] = fixed(200, rss2(("Three", "http://x.test/3", "g-3"),
                                              ("Two", "http://x.test/2", None),
                                              ("One", "http://x.test/1", "g-1")))
        ack = self.tick(RssPoller(), self.rss(
            srv.url("/feed"), message_template="{id}|{title}|{summary}|{published}|{x}"),
            again.next_cursor)
        self.assertEqual(self.texts(ack),
                         ["g-3|Three|about Three|Mon, 01 Jun 2026 10:00:00 GMT|{x}"])

    def test_atom_links_resolve_against_the_feed_url_and_xml_base(self):
        srv = Server(self)
        srv.routes["/blog/atom.xml"] = fixed(200, """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>B</title><author><name>Feed Author</name></author>
  <entry><id>tag:b,2026:1</id><title type="html">First &amp; best</title>
    <link rel="edit" href="/edit/1"/><link href="posts/1"/>
    <updated>2026-06-01T10:00:00Z</updated><summary>s1</summary></entry>
  <entry xml:base="https://other.test/x/"><id>tag:b,2026:2</id><title>Second</title>
    <link rel="alternate" href="two"/><published>2026-06-02T10:00:00Z</published>
    <author><name>Ana</name></author><content>c2</content></entry>
</feed>""")
        ack = self.tick(RssPoller(), self.rss(
            srv.url("/blog/atom.xml"),
            message_template="{id} {title} {link} {summary} {published} {author}"))
        self.assertEqual(self.texts(ack), [
            f"tag:b,2026:1 First & best {srv.url('/blog/posts/1')} s1 "
            "2026-06-01T10:00:00Z Feed Author",
            "tag:b,2026:2 Second https://other.test/x/two c2 2026-06-02T10:00:00Z Ana"])

    def test_rss1_rdf(self):
        srv = Server(self)
        srv.routes["/rdf"] = fixed(200, """<?xml version="1.0"?>
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
         xmlns="http://purl.org/rss/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/">
  <channel rdf:about="http://r.test/"><title>R</title></channel>
  <item rdf:about="http://r.test/a"><title>A</title><link>http://r.test/a</link>
    <description>da</description><dc:creator>Bo</dc:creator><dc:date>2026-06-01</dc:date></item>
  <item rdf:about="http://r.test/b"><title>B</title><link>http://r.test/b</link></item>
</rdf:RDF>""")
        ack = self.tick(RssPoller(), self.rss(
            srv.url("/rdf"), message_template="{id}|{title}|{summary}|{author}|{published}"))
        self.assertEqual(self.texts(ack), ["http://r.test/a|A|da|Bo|2026-06-01",
                                           "http://r.test/b|B|||"])

    def test_a_malformed_feed_or_not_a_feed_fails_the_tick(self):
        srv = Server(self)
        srv.routes["/bad"] = fixed(200, "<rss><channel><item><title>x</channel></rss>")
        srv.routes["/html"] = fixed(200, "<html><body>hi</body></html>")
        exc = self.failing(RssPoller(), self.rss(srv.url("/bad")))
        self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
        self.assertIn("not a well-formed feed", str(exc))
        exc = self.failing(RssPoller(), self.rss(srv.url("/html")))
        self.assertIn("not an RSS or Atom feed (its root element is <html>)", str(exc))

    def test_entity_declarations_are_refused_before_parsing(self):
        laughs = ('<!DOCTYPE rss [<!ENTITY lol "lol">'
                  + "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 or "")) * 10}">'
                            for i in range(1, 10))
                  + "]>")
        srv = Server(self)
        srv.routes["/laughs"] = fixed(200, rss2(("&lol9;", "http://x.test/1", "g"),
                                                extra=laughs))
        srv.routes["/external"] = fixed(200, rss2(
            ("&xxe;", "http://x.test/1", "g"),
            extra='<!DOCTYPE rss [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'))
        srv.routes["/dtd"] = fixed(200, rss2(
            ("ok", "http://x.test/1", "g"), extra='<!DOCTYPE rss PUBLIC "-//Netscape '
            'Communications//DTD RSS 0.91//EN" "http://my.netscape.com/publish/rss-0.91.dtd">'))
        for path in ("/laughs", "/external"):
            with self.subTest(path=path):
                exc = self.failing(RssPoller(), self.rss(srv.url(path)))
                self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
                self.assertIn("DOCTYPE declares entities: refused", str(exc))
        ack = self.tick(RssPoller(), self.rss(srv.url("/dtd")))
        self.assertEqual(self.texts(ack), ["ok\nhttp://x.test/1"], "a DOCTYPE alone is fine")

    def test_a_50_mib_feed_fails_on_the_size_limit_with_memory_bounded(self):
        chunk = b"<item><title>" + b"x" * 65000 + b"</title></item>"
        total = 50 << 20

        def stream(h):
            h.send_response(200)
            h.send_header("Connection", "close")       # no length: read to the end
            h.end_headers()
            sent = 0
            while sent < total:
                h.wfile.write(chunk)
                sent += len(chunk)
        srv = Server(self, {"/big": stream, "/said": fixed(200, "x" * 2000)})
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        exc = self.failing(RssPoller(), self.rss(srv.url("/big")), timeout=30)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
        self.assertIn("larger than max_response_bytes (10485760 bytes)", str(exc))
        self.assertLess(peak, 30 << 20, "read up to the limit, not the 50 MiB")
        exc = self.failing(RssPoller(), self.rss(srv.url("/said"), max_response_bytes=1000))
        self.assertIn("larger than max_response_bytes (1000 bytes)", str(exc))

    def test_etag_and_last_modified_go_back_and_a_304_is_nothing_new(self):
        feed = rss2(("One", "http://x.test/1", "g-1"))

        def conditional(h):
            if h.headers.get("If-None-Match") == '"v1"':
                reply(h, 304)
            else:
                reply(h, 200, feed.encode(), [("ETag", '"v1"'),
                                              ("Last-Modified", "Mon, 01 Jun 2026 10:00:00 GMT")])
        srv = Server(self, {"/feed": conditional})
        ack = self.tick(RssPoller(), self.rss(srv.url("/feed")))
        self.assertEqual(json.loads(ack.next_cursor), {
            "seen_ids": ["g-1"], "etag": '"v1"',
            "last_modified": "Mon, 01 Jun 2026 10:00:00 GMT"})
        again = self.tick(RssPoller(), self.rss(srv.url("/feed")), ack.next_cursor)
        self.assertEqual((again.deliver, again.next_cursor, again.metrics.items_seen),
                         ((), None, 0), "a 304 keeps the cursor")
        sent = srv.headers_of(1)
        self.assertEqual(sent["if-none-match"], '"v1"')
        self.assertEqual(sent["if-modified-since"], "Mon, 01 Jun 2026 10:00:00 GMT")
        nexo = json.dumps({"seen_ids": ["g-1"], "etag": '"v1"'}).encode()   # nexo's cursor
        self.assertEqual(self.tick(RssPoller(), self.rss(srv.url("/feed")), nexo).deliver, ())

    def test_items_beyond_max_per_tick_wait_for_the_next_tick(self):
        items = [(f"T{n}", f"http://x.test/{n}", f"g{n}") for n in range(10, 0, -1)]
        srv = Server(self, {"/feed": fixed(200, rss2(*items[4:]))})      # g6 .. g1
        ack = self.tick(RssPoller(), self.rss(srv.url("/feed"), max_per_tick=2))
        self.assertEqual(self.texts(ack), ["T6\nhttp://x.test/6", "T5\nhttp://x.test/5"],
                         "a first run starts from now: the newest, the rest marked seen")
        srv.routes["/feed"] = fixed(200, rss2(*items))                  # four new: g10 .. g7
        ack = self.tick(RssPoller(), self.rss(srv.url("/feed"), max_per_tick=2),
                        ack.next_cursor)
        self.assertEqual([t.split("\n")[0] for t in self.texts(ack)], ["T10", "T9"])
        ack = self.tick(RssPoller(), self.rss(srv.url("/feed"), max_per_tick=2),
                        ack.next_cursor)
        self.assertEqual([t.split("\n")[0] for t in self.texts(ack)], ["T8", "T7"],
                         "not lost for being beyond the first max_per_tick")
        ack = self.tick(RssPoller(), self.rss(srv.url("/feed"), max_per_tick=2),
                        ack.next_cursor)
        self.assertEqual(ack.deliver, ())
        self.assertEqual(json.loads(ack.next_cursor)["seen_ids"],
                         [f"g{n}" for n in range(1, 11)], "oldest first, as nexo")


class HttpBoundsTest(HttpCase):
    """What both kinds share (``_http_fetch``), through the rss kind."""

    def test_status_codes_classify(self):
        srv = Server(self, {"/404": fixed(404), "/500": fixed(500), "/408": fixed(408),
                            "/429": fixed(429, headers=[("Retry-After", "120")]),
                            "/401": fixed(401)})
        for path, cls, retry in (("/404", ErrorClass.PERMANENT, None),
                                 ("/401", ErrorClass.PERMANENT, None),
                                 ("/500", ErrorClass.TRANSIENT, None),
                                 ("/408", ErrorClass.TRANSIENT, None),
                                 ("/429", ErrorClass.TRANSIENT, 120.0)):
            with self.subTest(path=path):
                exc = self.failing(RssPoller(), self.rss(srv.url(path)))
                self.assertEqual(exc.classify(), cls)
                self.assertIn(f"HTTP {path[1:]}", str(exc))
                self.assertEqual(getattr(exc, "retry_after", None), retry)

    def test_redirects_are_followed_up_to_five_and_only_to_http(self):
        srv = Server(self, {"/feed": fixed(200, rss2(("One", "http://x.test/1", "g")))})
        for n in range(6):
            srv.routes[f"/r{n}"] = fixed(302, headers=[("Location", f"/r{n + 1}")])
        srv.routes["/r5"] = fixed(301, headers=[("Location", srv.url("/feed"))])
        srv.routes["/r6"] = fixed(307, headers=[("Location", "/r0")])
        srv.routes["/file"] = fixed(302, headers=[("Location", "file:///etc/passwd")])
        ack = self.tick(RssPoller(), self.rss(srv.url("/r1")))          # 5 redirects
        self.assertEqual(self.texts(ack), ["One\nhttp://x.test/1"])
        exc = self.failing(RssPoller(), self.rss(srv.url("/r0")))       # 6
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
        self.assertIn("more than 5 redirects", str(exc))
        exc = self.failing(RssPoller(), self.rss(srv.url("/file")))
        self.assertIn("redirect to file:///etc/passwd refused", str(exc))

    def test_a_trickle_cannot_hold_a_tick_past_its_timeout(self):
        srv = Server(self, {"/slow": trickle(self, ("Connection", "close")),
                            "/sized": trickle(self, ("Content-Length", "1000000"))})
        for poller, key, path in ((RssPoller(), "feed_url", "/slow"),
                                  (WebhookPoller(), "url", "/sized")):
            with self.subTest(kind=poller.kind):
                exc = self.failing(poller, {key: srv.url(path), "allow_private_networks": True},
                                   timeout=0.5)
                self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
                self.assertIn("no complete answer within 0.5s (the job's timeout_secs)",
                              str(exc))
        with mock.patch.object(nx, "_IN_PROCESS_BUDGET_SECS", 0.3):     # no timeout_secs
            exc = self.failing(RssPoller(), self.rss(srv.url("/slow")))
        self.assertIn("within 0.3s (the in-process tick budget: set the job's timeout_secs)",
                      str(exc))

    def test_https_is_verified_and_a_stalled_handshake_is_bounded(self):
        cert, key = os.path.join(self.dir, "cert.pem"), os.path.join(self.dir, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
                        "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        srv = Server(self, {"/feed": fixed(200, rss2(("One", "http://x.test/1", "g")))},
                     tls=(cert, key))
        with mock.patch.dict(os.environ, {"SSL_CERT_FILE": cert}):     # trust it
            ack = self.tick(RssPoller(), self.rss(srv.url("/feed")))
        self.assertEqual(self.texts(ack), ["One\nhttp://x.test/1"])
        with mock.patch.dict(os.environ, {"SSL_CERT_FILE": os.devnull}):
            exc = self.failing(RssPoller(), self.rss(srv.url("/feed")))
        self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", str(exc))
        mute = socket.create_server(("127.0.0.1", 0))       # accepts, never says a word
        self.addCleanup(mute.close)
        exc = self.failing(RssPoller(), self.rss("https://127.0.0.1:%d/" % mute.getsockname()[1]),
                           timeout=0.5)
        self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
        self.assertIn("no complete answer within 0.5s", str(exc))

    def test_a_cancel_ends_a_tick_waiting_on_a_silent_server(self):
        srv = Server(self)
        started = threading.Event()
        srv.routes["/silent"] = lambda h: (started.set(), stop.wait(WAIT))
        stop = threading.Event()
        self.addCleanup(stop.set)
        cancel = threading.Event()
        threading.Thread(target=lambda: started.wait(WAIT) and cancel.set(),
                         daemon=True).start()
        with self.assertRaises(PollerError) as caught:
            self.tick(RssPoller(), self.rss(srv.url("/silent")), timeout=60, cancel=cancel)
        self.assertIn("tick cancelled", str(caught.exception))

    def test_private_addresses_are_refused_after_resolution_before_connecting(self):
        srv = Server(self, {"/feed": fixed(200, rss2(("One", "http://x.test/1", "g")))})
        port = srv.httpd.server_address[1]
        for url in (srv.url("/feed"), f"http://localhost:{port}/feed",
                    f"http://[::1]:{port}/feed", f"http://169.254.169.254:{port}/",
                    f"http://127.1:{port}/feed"):
            with self.subTest(url=url):             # literal: refused by the config check
                exc = self.failing(RssPoller(), {"feed_url": url})
                self.assertEqual(exc.classify(), ErrorClass.CONFIG)
                self.assertIn("set allow_private_networks: true", str(exc))
        # A name (here a hex form inet_aton reads) that resolves to 127.0.0.1:
        exc = self.failing(RssPoller(), {"feed_url": f"http://0x7f000001:{port}/feed"})
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
        self.assertIn("resolves to 127.0.0.1: loopback/private/link-local, refused", str(exc))
        self.assertEqual(srv.connections, 0, "never connected to")

    def test_a_redirect_to_127_0_0_1_is_refused_before_connecting(self):
        target = Server(self, {"/": fixed(200, "secret")})
        public = Server(self, {"/feed": fixed(302, headers=[("Location", target.url("/"))])},
                        host="127.0.0.2")
        real = nx._refused_address
        # 127.0.0.2 stands in for a public address (a test may reach only loopback).
        with mock.patch.object(nx, "_refused_address", lambda a: a != "127.0.0.2" and real(a)):
            exc = self.failing(RssPoller(), {"feed_url": public.url("/feed")})
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
        self.assertIn("127.0.0.1 is loopback/private/link-local", str(exc))
        # A name resolving to it: refused once resolved, before connecting.
        public.routes["/named"] = fixed(302, headers=[
            ("Location", f"http://0x7f000001:{target.httpd.server_address[1]}/")])
        with mock.patch.object(nx, "_refused_address", lambda a: a != "127.0.0.2" and real(a)):
            exc = self.failing(RssPoller(), {"feed_url": public.url("/named")})
        self.assertIn("resolves to 127.0.0.1: loopback/private/link-local, refused", str(exc))
        self.assertEqual(len(public.requests), 2)
        self.assertEqual((target.connections, target.requests), (0, []),
                         "the metadata service stand-in saw nothing")

    def test_a_bad_config_names_the_key(self):
        url = "http://x.test/"
        self.assertConfigErrors(RssPoller(), (
            ({}, "config.feed_url"), ({"feed_url": "ftp://x.test/"}, "config.feed_url"),
            ({"feed_url": url, "max_per_tick": 0}, "config.max_per_tick"),
            ({"feed_url": url, "url": url}, "config.url: unknown key"),
            ({"feed_url": url, "allow_private_networks": 1}, "config.allow_private_networks"),
            ({"feed_url": url, "deliver": {"channel": "t"}}, "config.deliver")))


class RssDaemonTest(HttpCase):

    def pollers_json(self, srv):
        return write_config(os.path.join(self.dir, "pollers.json"), {
            "state_db": self.db, "default_jitter_ms": 0, "shutdown_grace_secs": 3,
            "jobs": [{"id": "news", "kind": "rss", "schedule": {"every_secs": 3600},
                      "config": self.rss(srv.url("/feed"), message_template="{title}")},
                     {"id": "gone", "kind": "rss", "schedule": {"every_secs": 3600},
                      "config": self.rss(srv.url("/gone"))}]})

    def test_a_daemon_delivers_and_the_cursor_survives_a_restart(self):
        srv = Server(self, {"/feed": fixed(200, rss2(("One", "http://x.test/1", "g1")))})
        path = self.pollers_json(srv)
        r, sink = self.daemon(path)
        dry = r.dry_run("news", None)
        self.assertEqual([d.payload for d in dry.ack.deliver], [{"text": "One"}])
        self.assertEqual(r.fire_due(), 2)
        self.assertTrue(r.wait_idle(WAIT))
        self.assertTrue(sink.wait_for(1))
        self.assertEqual([(t, e["payload"]) for t, e in sink.got],
                         [("plugin.outbound.telegram", {"text": "One", "to": "42"})])
        states = r.state.load(["news", "gone"])
        self.assertEqual((states["gone"].last_status, states["gone"].paused),
                         ("permanent", True), "the 404 job pauses; the other went on")
        r.stop()
        srv.routes["/feed"] = fixed(200, rss2(("Two", "http://x.test/2", "g2"),
                                              ("One", "http://x.test/1", "g1")))
        r2, sink2 = self.daemon(path)
        self.assertEqual(r2.run_once("news").status, nx.TickStatus.OK)
        self.assertTrue(sink2.wait_for(1))
        self.assertEqual([e["payload"]["text"] for _, e in sink2.got], ["Two"])
        cursor = json.loads(r2.state.load(["news"])["news"].cursor)
        self.assertEqual(cursor["seen_ids"], ["g1", "g2"])

    def test_validate_checks_an_rss_job_config(self):
        path = write_config(os.path.join(self.dir, "p.json"), {
            "state_db": self.db,
            "jobs": [{"id": "a", "kind": "rss", "schedule": {"every_secs": 60},
                      "config": {"feed_url": "http://x.test/", "etag": "x"}}]})
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn("config.etag: unknown key", str(caught.exception))

    def test_the_job_timeout_bounds_a_daemon_tick(self):
        stop = threading.Event()
        self.addCleanup(stop.set)
        srv = Server(self, {"/slow": lambda h: stop.wait(WAIT)})
        path = write_config(os.path.join(self.dir, "p.json"), {
            "state_db": self.db, "default_jitter_ms": 0,
            "jobs": [{"id": "slow", "kind": "rss", "schedule": {"every_secs": 3600},
                      "timeout_secs": 0.5, "config": self.rss(srv.url("/slow"))}]})
        outcome = self.daemon(path)[0].run_once("slow")
        self.assertEqual(outcome.status, nx.TickStatus.TRANSIENT)
        self.assertIn("0.5s", outcome.error)


def json_answer(doc, status=200, headers=()):
    return fixed(status, json.dumps(doc), [("Content-Type", "application/json"), *headers])


class WebhookPollTest(HttpCase):

    def hook(self, url, **more):
        return {"url": url, "deliver": DELIVER, "allow_private_networks": True, **more}

    def test_items_at_items_path_fill_the_template(self):
        srv = Server(self, {"/api": json_answer({"data": {"items": [
            {"id": 1, "name": "A", "n": {"x": 1}}, {"id": "b", "name": "B"},
            {"name": "no id"}, "not an object", {"id": True, "name": "bool id"}]}})})
        ack = self.tick(WebhookPoller(), self.hook(
            srv.url("/api"), items_path="data.items", headers={"X-Token": "t0k"},
            message_template="{name} {n} {missing}|{json}"))
        self.assertEqual(self.texts(ack), ['A {"x":1} {missing}|{"id":1,"name":"A","n":{"x":1}}',
                                           'B {n} {missing}|{"id":"b","name":"B"}'])
        self.assertEqual(json.loads(ack.next_cursor), {"seen_ids": ["b", "1"]})
        self.assertEqual((ack.metrics.items_seen, ack.metrics.items_dispatched), (5, 2))
        self.assertEqual(srv.headers_of(0)["x-token"], "t0k")
        again = self.tick(WebhookPoller(), self.hook(srv.url("/api"), items_path="data.items"),
                          ack.next_cursor)
        self.assertEqual(again.deliver, (), "seen")

    def test_post_sends_the_body_as_json(self):
        srv = Server(self, {"/q": json_answer([{"id": "x", "t": "hi"}])})
        ack = self.tick(WebhookPoller(), self.hook(srv.url("/q"), method="POST",
                                                   body={"since": 5}, message_template="{t}"))
        self.assertEqual(self.texts(ack), ["hi"])
        method, _, headers, body = srv.requests[0]
        self.assertEqual((method, json.loads(body)), ("POST", {"since": 5}))
        self.assertEqual(headers["Content-Type"], "application/json")

    def test_pages_by_link_header_bounded_by_max_pages(self):
        srv = Server(self)
        for n in (1, 2, 3):
            link = [("Link", f'<{srv.url(f"/p{n + 1}")}>; rel="next", </p1>; rel="first"')]
            srv.routes[f"/p{n}"] = json_answer([{"id": n}], headers=link if n < 3 else ())
        ack = self.tick(WebhookPoller(), self.hook(srv.url("/p1"), message_template="{id}"))
        self.assertEqual(self.texts(ack), ["1", "2", "3"])
        ack = self.tick(WebhookPoller(), self.hook(srv.url("/p1"), message_template="{id}",
                                                   max_pages=2))
        self.assertEqual(self.texts(ack), ["1", "2"], "two pages at most")
        self.assertEqual([r[1] for r in srv.requests], ["/p1", "/p2", "/p3", "/p1", "/p2"])

    def test_pages_by_next_path(self):
        srv = Server(self, {
            "/a": json_answer({"items": [{"id": "1"}], "links": {"next": "/a?page=2"}}),
            "/a?page=2": json_answer({"items": [{"id": "2"}], "links": {"next": None}})})
        ack = self.tick(WebhookPoller(), self.hook(srv.url("/a"), items_path="items",
                                                   next_path="links.next",
                                                   message_template="{id}"))
        self.assertEqual(self.texts(ack), ["1", "2"])

    def test_429_and_503_carry_retry_after_and_500_is_transient(self):
        srv = Server(self, {"/429": json_answer({}, 429, [("Retry-After", "120")]),
                            "/503": json_answer({}, 503, [("Retry-After",
                                                           "Fri, 01 Jan 2100 00:00:00 GMT")]),
                            "/500": json_answer({}, 500), "/403": json_answer({}, 403)})
        exc = self.failing(WebhookPoller(), self.hook(srv.url("/429")))
        self.assertEqual((exc.classify(), exc.retry_after), (ErrorClass.TRANSIENT, 120.0))
        exc = self.failing(WebhookPoller(), self.hook(srv.url("/503")))
        self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
        self.assertGreater(exc.retry_after, 365 * 86400)
        exc = self.failing(WebhookPoller(), self.hook(srv.url("/500")))
        self.assertEqual((exc.classify(), exc.retry_after), (ErrorClass.TRANSIENT, None))
        exc = self.failing(WebhookPoller(), self.hook(srv.url("/403")))
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)

    def test_if_none_match_and_304(self):
        def conditional(h):
            if h.headers.get("If-None-Match") == 'W/"7"':
                reply(h, 304)
            else:
                reply(h, 200, b'[{"id": 1}]', [("ETag", 'W/"7"')])
        srv = Server(self, {"/api": conditional})
        ack = self.tick(WebhookPoller(), self.hook(srv.url("/api")))
        self.assertEqual(json.loads(ack.next_cursor), {"seen_ids": ["1"], "etag": 'W/"7"'})
        again = self.tick(WebhookPoller(), self.hook(srv.url("/api")), ack.next_cursor)
        self.assertEqual((again.deliver, again.next_cursor), ((), None))

    def test_a_bad_answer_fails_the_tick(self):
        srv = Server(self, {"/text": fixed(200, "<html>"),
                            "/obj": json_answer({"items": {"id": 1}})})
        exc = self.failing(WebhookPoller(), self.hook(srv.url("/text")))
        self.assertEqual(exc.classify(), ErrorClass.TRANSIENT)
        self.assertIn("the answer is not JSON", str(exc))
        exc = self.failing(WebhookPoller(), self.hook(srv.url("/obj"), items_path="items"))
        self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
        self.assertIn("items_path 'items' is not an array (it is object)", str(exc))

    def test_a_next_page_on_127_0_0_1_is_refused_before_connecting(self):
        target = Server(self, {"/": json_answer([{"id": "secret"}])})
        public = Server(self, {"/api": json_answer([{"id": 1}], headers=[
            ("Link", f'<{target.url("/")}>; rel="next"')])}, host="127.0.0.2")
        public.routes["/moved"] = fixed(307, headers=[("Location", target.url("/"))])
        real = nx._refused_address
        # 127.0.0.2 stands in for a public address (a test may reach only loopback).
        with mock.patch.object(nx, "_refused_address", lambda a: a != "127.0.0.2" and real(a)):
            for path in ("/api", "/moved"):
                with self.subTest(path=path):
                    exc = self.failing(WebhookPoller(), {"url": public.url(path)})
                    self.assertEqual(exc.classify(), ErrorClass.PERMANENT)
                    self.assertIn("127.0.0.1 is loopback/private/link-local", str(exc))
        self.assertEqual((target.connections, target.requests), (0, []))

    def test_a_bad_config_names_the_key(self):
        url = "http://x.test/"
        self.assertConfigErrors(WebhookPoller(), (
            ({"url": url, "method": "PUT"}, "config.method"),
            ({"url": url, "headers": {"X": "a\r\nB: c"}}, "config.headers"),
            ({"url": url, "headers": {"bad name": "v"}}, "config.headers"),
            ({"url": url, "id_field": ""}, "config.id_field"),
            ({"url": url, "max_pages": 0}, "config.max_pages"),
            ({"url": url, "items_path": 3}, "config.items_path"),
            ({"url": url, "feed_url": url}, "config.feed_url: unknown key"),
            ({"url": "http://169.254.169.254/latest/meta-data/"}, "config.url")))


class WebhookPollDaemonTest(HttpCase):

    def test_a_daemon_delivers_the_cursor_survives_and_retry_after_holds(self):
        srv = Server(self, {"/api": json_answer({"items": [{"id": 1, "t": "one"}]}),
                            "/busy": json_answer({}, 429, [("Retry-After", "600")])})
        path = write_config(os.path.join(self.dir, "pollers.json"), {
            "state_db": self.db, "default_jitter_ms": 0, "shutdown_grace_secs": 3,
            "jobs": [{"id": "api", "kind": "webhook_poll", "schedule": {"every_secs": 3600},
                      "config": {"url": srv.url("/api"), "items_path": "items",
                                 "message_template": "{t}", "deliver": DELIVER,
                                 "allow_private_networks": True}},
                     {"id": "busy", "kind": "webhook_poll", "schedule": {"every_secs": 5},
                      "config": {"url": srv.url("/busy"), "allow_private_networks": True}}]})
        r, sink = self.daemon(path)
        self.assertEqual(r.run_once("api").status, nx.TickStatus.OK)
        self.assertTrue(sink.wait_for(1))
        self.assertEqual(sink.got[0][1]["payload"], {"text": "one", "to": "42"})
        busy = r.run_once("busy")
        self.assertEqual(busy.status, nx.TickStatus.TRANSIENT)
        self.assertGreaterEqual(busy.next_run_at, r.clock() + 590, "not before Retry-After")
        r.stop()
        srv.routes["/api"] = json_answer({"items": [{"id": 2, "t": "two"}, {"id": 1, "t": "one"}]})
        r2, sink2 = self.daemon(path)
        self.assertEqual(r2.run_once("api").status, nx.TickStatus.OK)
        self.assertTrue(sink2.wait_for(1))
        self.assertEqual([e["payload"]["text"] for _, e in sink2.got], ["two"])
        self.assertEqual(json.loads(r2.state.load(["api"])["api"].cursor),
                         {"seen_ids": ["1", "2"]})

    def test_validate_checks_a_webhook_poll_job_config(self):
        path = write_config(os.path.join(self.dir, "p.json"), {
            "state_db": self.db,
            "jobs": [{"id": "a", "kind": "webhook_poll", "schedule": {"every_secs": 60},
                      "config": {"url": "http://localhost/x"}}]})
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn("localhost is loopback/private/link-local", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
