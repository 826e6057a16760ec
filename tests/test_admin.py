"""The admin API, health endpoints and status page of nexo_poller (issue 16).

The API is driven with ``http.client`` against a started Runner with two
in-process jobs, one of which fails; the page is loaded in a real headless
Chromium (``--dump-dom`` and ``--screenshot``), with the API for the click
its button makes.  Without Chromium the page test skips with the reason, and
fails when ``CI`` is set (``.ci/run`` installs it).
"""

import contextlib
import http.client
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import nexo_poller as nx
from nexo_poller import PollerError, Runner, TickAck, TickMetrics, config_from_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import FakePoller, TempDirCase, no_threads_named  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "t0ken-for-tests-only"
WAIT = 15.0


def scripted_tick(ctx):
    """The in-process poller's step: the job "broken" always fails with an HTML-ish error."""
    if ctx.job_id == "broken":
        raise PollerError.Transient("upstream said <b>503</b> & \"gave up\"")
    return TickAck(b"cursor-1", metrics=TickMetrics(items_seen=2, items_dispatched=1))


class Case(TempDirCase):
    tmp_prefix = "nexo-admin-"

    def setUp(self):
        super().setUp()
        self.token_file = os.path.join(self.dir, "token")
        with open(self.token_file, "w") as f:
            f.write(TOKEN + "\n")
        env = mock.patch.dict(os.environ)
        env.start()
        self.addCleanup(env.stop)
        for key in ("NEXO_POLLER_ADMIN_TOKEN", "NEXO_POLLER_ADMIN_URL"):
            os.environ.pop(key, None)

    def doc(self, **top):
        doc = {"state_db": self.db, "default_jitter_ms": 0, "shutdown_grace_secs": 3,
               "admin_addr": "127.0.0.1:0", "admin_token_file": self.token_file,
               "jobs": [{"id": "healthy", "kind": "mem", "schedule": {"every_secs": 3600}},
                        {"id": "broken", "kind": "mem", "schedule": {"every_secs": 3600}}]}
        doc.update(top)
        return {k: v for k, v in doc.items() if v is not None}

    def runner(self, config_path=None, background=True, **top):
        cfg = config_from_dict(self.doc(**top), base_dir=self.dir, extra_kinds=["mem"])
        r = Runner(cfg)
        r.register(FakePoller(default=scripted_tick))
        r.config_path = config_path
        r.start(background)
        self.addCleanup(r.stop)
        self.assertTrue(r.wait_idle(WAIT), "the first ticks did not finish")
        return r

    def port(self, r):
        return r.admin_address[1]

    def call(self, r, method, path, token=None, headers=None, body=None, host="127.0.0.1"):
        conn = http.client.HTTPConnection(host, self.port(r), timeout=WAIT)
        try:
            h = dict(headers or {})
            if token:
                h["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("Content-Type") or ""
            doc = json.loads(raw) if ctype.startswith("application/json") else raw.decode()
            return resp.status, doc, resp
        finally:
            conn.close()


class TestRoutes(Case):

    def test_every_route_and_shape(self):
        r = self.runner()
        self.assertEqual(r.run_once("healthy").status, "ok")
        self.assertEqual(r.run_once("broken").status, "transient")

        code, jobs, resp = self.call(r, "GET", "/admin/pollers")
        self.assertEqual(code, 200)
        self.assertIsNone(resp.getheader("Access-Control-Allow-Origin"), "no CORS, ever")
        self.assertEqual([j["id"] for j in jobs], ["healthy", "broken"])
        nexo_keys = {"id", "kind", "agent", "paused", "last_run_at_ms", "next_run_at_ms",
                     "last_status", "last_error", "consecutive_errors", "items_seen_total",
                     "items_dispatched_total"}
        for j in jobs:
            self.assertLessEqual(nexo_keys, set(j))
            self.assertLessEqual({"cursor", "schedule", "undelivered", "breaker_open",
                                  "running", "plugin", "plugin_state"}, set(j))
        healthy, broken = jobs
        self.assertEqual((healthy["last_status"], healthy["cursor"]),
                         ("ok", nx.encode_cursor(b"cursor-1")))
        self.assertIsInstance(healthy["last_run_at_ms"], int)
        self.assertEqual(healthy["items_seen_total"], 4)     # the first tick and run_once
        self.assertEqual(broken["last_status"], "transient")
        self.assertIn("503", broken["last_error"])
        self.assertEqual(broken["consecutive_errors"], 2)
        self.assertEqual(healthy["schedule"], "every 3600s")

        code, one, _ = self.call(r, "GET", "/admin/pollers/broken")
        self.assertEqual((code, one), (200, broken))
        code, doc, _ = self.call(r, "GET", "/admin/pollers/nope")
        self.assertEqual((code, doc), (404, {"error": "job 'nope' not found"}))

        # mutations: token always
        code, doc, _ = self.call(r, "POST", "/admin/pollers/healthy/run", TOKEN)
        self.assertEqual(code, 200, doc)
        self.assertEqual((doc["ok"], doc["items_seen"], doc["items_dispatched"],
                          doc["deliveries"]), (True, 2, 1, 0))
        code, doc, _ = self.call(r, "POST", "/admin/pollers/broken/run", TOKEN)
        self.assertEqual(code, 400)
        self.assertFalse(doc["ok"])
        self.assertIn("503", doc["error"])
        self.assertEqual(self.call(r, "POST", "/admin/pollers/broken/pause", TOKEN)[:2],
                         (200, {"ok": True, "paused": True}))
        self.assertTrue(self.call(r, "GET", "/admin/pollers/broken")[1]["paused"])
        self.assertEqual(self.call(r, "POST", "/admin/pollers/broken/resume", TOKEN)[:2],
                         (200, {"ok": True, "paused": False}))
        self.assertFalse(self.call(r, "GET", "/admin/pollers/broken")[1]["paused"])
        self.assertEqual(self.call(r, "POST", "/admin/pollers/healthy/reset", TOKEN)[:2],
                         (200, {"ok": True, "reset": True}))
        self.assertIsNone(self.call(r, "GET", "/admin/pollers/healthy")[1]["cursor"])

        # errors
        self.assertEqual(self.call(r, "GET", "/admin/pollers/healthy/pause")[:2],
                         (405, {"error": "POST required"}))
        self.assertEqual(self.call(r, "GET", "/admin/pollers/reload")[:2],
                         (405, {"error": "POST required"}))
        self.assertEqual(self.call(r, "POST", "/admin/pollers/healthy/explode", TOKEN)[0], 404)
        self.assertEqual(self.call(r, "POST", "/admin/pollers/nope/pause", TOKEN)[:2],
                         (404, {"error": "job 'nope' not found"}))
        self.assertEqual(self.call(r, "POST", "/admin/pollers", TOKEN)[0], 405)
        self.assertEqual(self.call(r, "DELETE", "/admin/pollers/healthy", TOKEN)[0], 405)
        self.assertEqual(self.call(r, "GET", "/nowhere")[0], 404)
        # reload without a config file to read
        code, doc, _ = self.call(r, "POST", "/admin/pollers/reload", TOKEN)
        self.assertEqual((code, doc["ok"]), (400, False))

        # plugins (none here), health, readiness
        self.assertEqual(self.call(r, "GET", "/admin/plugins")[:2], (200, []))
        code, doc, _ = self.call(r, "GET", "/healthz")
        self.assertEqual((code, doc["ok"]), (200, True))
        code, doc, _ = self.call(r, "GET", "/readyz")
        self.assertEqual((code, doc["ok"]), (200, True), doc)

    def test_health_reports_state_and_scheduler(self):
        r = self.runner(background=False)      # no scheduler to clear state_error
        with mock.patch.object(nx.Runner, "state_error", property(lambda _: "disk full")):
            code, doc, _ = self.call(r, "GET", "/healthz")
            self.assertEqual(code, 503)
            self.assertIn("disk full", doc["reason"])
            self.assertEqual(self.call(r, "GET", "/readyz")[0], 503)
        with mock.patch.object(nx.Runner, "scheduler_alive", property(lambda _: False)):
            code, doc, _ = self.call(r, "GET", "/healthz")
        self.assertEqual(code, 503)
        self.assertIn("scheduler", doc["reason"])

    def test_reload_through_the_api(self):
        path = os.path.join(self.dir, "pollers.json")
        with open(path, "w") as f:
            json.dump(self.doc(), f)
        r = self.runner(config_path=path)
        doc = self.doc()
        doc["jobs"] = doc["jobs"][:1] + [{"id": "fresh", "kind": "mem",
                                          "schedule": {"every_secs": 60}}]
        with open(path, "w") as f:
            json.dump(doc, f)
        with mock.patch.object(r, "in_process_kinds", return_value=["mem"]):
            code, diff, _ = self.call(r, "POST", "/admin/pollers/reload", TOKEN)
        self.assertEqual(code, 200, diff)
        self.assertEqual((diff["ok"], diff["add"], diff["remove"], diff["keep"],
                          diff["replace"]), (True, ["fresh"], ["broken"], ["healthy"], []))
        with open(path, "w") as f:
            f.write("{not json")
        code, doc, _ = self.call(r, "POST", "/admin/pollers/reload", TOKEN)
        self.assertEqual((code, doc["ok"]), (400, False))
        self.assertEqual([j["id"] for j in self.call(r, "GET", "/admin/pollers")[1]],
                         ["healthy", "fresh"])

    def test_metrics_share_the_listener(self):
        r = self.runner(metrics_addr="127.0.0.1:0")
        self.assertEqual(r.metrics_address, r.admin_address)
        r.run_once("healthy")
        code, body, _ = self.call(r, "GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertRegex(body, r'nexo_poller_last_success_timestamp_seconds\{job="healthy",'
                               r'kind="mem"\} \d+\.\d+')
        self.assertNotIn('last_success_timestamp_seconds{job="broken"', body)


class TestCursorRoute(Case):

    def test_cursor_and_history_read_and_set_through_the_owner(self):
        r = self.runner()
        code, doc, _ = self.call(r, "GET", "/admin/pollers/healthy/cursor")
        self.assertEqual(code, 200, doc)
        self.assertEqual(doc["cursor"], nx.encode_cursor(b"cursor-1"))
        self.assertEqual(doc["history"][0]["source"], "tick")
        self.assertEqual(self.call(r, "POST", "/admin/pollers/healthy/cursor",
                                   body=b'{"set_text": "x"}')[0], 401, "a mutation needs the token")
        code, doc, _ = self.call(r, "POST", "/admin/pollers/healthy/cursor", TOKEN,
                                 body=b'{"set_text": "from-api"}',
                                 headers={"Content-Type": "application/json"})
        self.assertEqual(code, 200, doc)
        self.assertEqual(doc["cursor"], nx.encode_cursor(b"from-api"))
        self.assertEqual(doc["history"][0]["source"], "set (admin API)", doc["history"])
        self.assertEqual(r.status()[0]["cursor"], nx.encode_cursor(b"from-api"))
        for bad in (b'{"set": 7}', b'{"set": "***"}', b'{"other": 1}', b"[]", b"not json"):
            code, doc, _ = self.call(r, "POST", "/admin/pollers/healthy/cursor", TOKEN, body=bad)
            self.assertEqual(code, 400, (bad, doc))
        code, doc, _ = self.call(r, "POST", "/admin/pollers/healthy/cursor", TOKEN,
                                 body=b'{"set": null}')
        self.assertEqual((code, doc["cursor"]), (200, None))


class TestSecurity(Case):

    def test_mutations_need_the_token(self):
        r = self.runner()
        code, doc, resp = self.call(r, "POST", "/admin/pollers/healthy/pause")
        self.assertEqual(code, 401)
        self.assertIn("Bearer", resp.getheader("WWW-Authenticate"))
        self.assertEqual(self.call(r, "POST", "/admin/pollers/healthy/pause", "wrong")[0], 401)
        self.assertEqual(self.call(r, "POST", "/admin/pollers/healthy/pause", TOKEN + "x")[0],
                         401)
        self.assertFalse(self.call(r, "GET", "/admin/pollers/healthy")[1]["paused"])

    def test_no_token_configured_refuses_every_mutation(self):
        r = self.runner(admin_token_file=None)
        code, doc, _ = self.call(r, "POST", "/admin/pollers/healthy/pause", "anything")
        self.assertEqual(code, 403)
        self.assertIn("no admin token", doc["error"])
        self.assertEqual(self.call(r, "GET", "/admin/pollers")[0], 200)

    def test_token_from_the_environment(self):
        os.environ["NEXO_POLLER_ADMIN_TOKEN"] = "env-token"
        r = self.runner(admin_token_file=None)
        self.assertEqual(self.call(r, "POST", "/admin/pollers/healthy/pause", "env-token")[0],
                         200)

    def test_cross_site_mutations_are_refused(self):
        r = self.runner()
        port = self.port(r)
        for headers in ({"Origin": "http://evil.example"},
                        {"Origin": "null"},
                        {"Origin": f"http://127.0.0.1:{port + 1}"},
                        {"Sec-Fetch-Site": "cross-site"}):
            code, doc, _ = self.call(r, "POST", "/admin/pollers/healthy/pause", TOKEN, headers)
            self.assertEqual(code, 403, headers)
            self.assertIn("cross-site", doc["error"])
        self.assertFalse(self.call(r, "GET", "/admin/pollers/healthy")[1]["paused"])
        same = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
        self.assertEqual(self.call(r, "POST", "/admin/pollers/healthy/pause", TOKEN, same)[0],
                         200)

    def test_a_foreign_host_is_refused_on_loopback(self):
        # DNS rebinding: a page of evil.example, its name now resolving to
        # 127.0.0.1, reads through the operator's browser with its own Host.
        r = self.runner(metrics_addr="127.0.0.1:0")
        port = self.port(r)
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}",
                     f"localhost:{port + 1}", ""):
            for path in ("/admin/pollers", "/admin/pollers/healthy/cursor", "/admin/plugins",
                         "/", "/healthz"):
                code, doc, _ = self.call(r, "GET", path, headers={"Host": host})
                self.assertEqual(code, 421, (host, path))
                self.assertIn("Host", doc["error"])
        mport = r.metrics_address[1]
        conn = http.client.HTTPConnection("127.0.0.1", mport, timeout=WAIT)
        conn.request("GET", "/metrics", headers={"Host": f"evil.example:{mport}"})
        self.assertEqual(conn.getresponse().status, 421, "the metrics listener too")
        conn.close()
        # The listener's own names are served, with or without its port.
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}",
                     f"[::1]:{port}", "localhost"):
            self.assertEqual(self.call(r, "GET", "/admin/pollers",
                                       headers={"Host": host})[0], 200, host)

    def test_admin_allowed_hosts_names_a_reverse_proxy(self):
        r = self.runner(admin_allowed_hosts=["nexo.example.com"])
        for host in ("nexo.example.com", "Nexo.Example.com:443"):
            self.assertEqual(self.call(r, "GET", "/admin/pollers",
                                       headers={"Host": host})[0], 200, host)
        self.assertEqual(self.call(r, "GET", "/admin/pollers",
                                   headers={"Host": "evil.example"})[0], 421)
        for bad in ("", "a b", ["x/y"], [""], [3], "nexo.example.com"):
            with self.assertRaises(nx.ConfigError) as cm:
                config_from_dict(self.doc(admin_allowed_hosts=bad))
            self.assertIn("admin_allowed_hosts", str(cm.exception))

    def test_beyond_loopback_every_route_needs_the_token(self):
        r = self.runner(admin_addr="0.0.0.0:0")
        for path in ("/admin/pollers", "/admin/pollers/healthy", "/admin/plugins",
                     "/healthz", "/readyz"):
            self.assertEqual(self.call(r, "GET", path)[0], 401, path)
            self.assertEqual(self.call(r, "GET", path, TOKEN)[0], 200, path)
        code, page, _ = self.call(r, "GET", "/")
        self.assertEqual(code, 200)
        self.assertNotIn("<tr data-job=", page, "the page shows no job without the token")
        self.assertIn("enter the admin", page)
        self.assertIn('data-job="healthy"', self.call(r, "GET", "/", TOKEN)[1])

    def test_beyond_loopback_without_a_token_does_not_start(self):
        cfg = config_from_dict(self.doc(admin_addr="0.0.0.0:0", admin_token_file=None),
                               base_dir=self.dir, extra_kinds=["mem"])
        r = Runner(cfg)
        r.register(FakePoller(default=scripted_tick))
        with self.assertRaises(nx.ConfigError) as cm:
            r.start()
        self.assertIn("admin_addr", str(cm.exception))
        self.assertTrue(r.stopped.is_set())

    def test_unreadable_token_file(self):
        cfg = config_from_dict(self.doc(admin_token_file="missing"), base_dir=self.dir,
                               extra_kinds=["mem"])
        r = Runner(cfg)
        r.register(FakePoller(default=scripted_tick))
        with self.assertRaises(nx.ConfigError) as cm:
            r.start()
        self.assertIn("admin_token_file", str(cm.exception))

    def test_page_headers_forbid_framing_and_foreign_scripts(self):
        r = self.runner()
        code, page, resp = self.call(r, "GET", "/")
        self.assertEqual(code, 200)
        csp = resp.getheader("Content-Security-Policy")
        self.assertIn("default-src 'none'", csp)
        self.assertIn("frame-ancestors 'none'", csp)
        self.assertNotRegex(page, r'(src|href)="(https?:)?//', "no external asset")

    def test_oversize_requests(self):
        r = self.runner()
        conn = http.client.HTTPConnection("127.0.0.1", self.port(r), timeout=WAIT)
        conn.request("GET", "/admin/pollers?" + "x" * 9000)
        self.assertEqual(conn.getresponse().status, 414)
        conn.close()
        code, doc, _ = self.call(r, "POST", "/admin/pollers/healthy/pause", TOKEN,
                                 body=b"x" * 5000)
        self.assertEqual(code, 413)
        self.assertFalse(self.call(r, "GET", "/admin/pollers/healthy")[1]["paused"])
        with socket.create_connection(("127.0.0.1", self.port(r)), timeout=WAIT) as s:
            s.sendall(b"POST /admin/pollers/healthy/pause HTTP/1.1\r\nHost: localhost\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            self.assertIn(b" 411 ", s.recv(4096))
        # headers past the limit (8 KiB in all) are refused too
        with socket.create_connection(("127.0.0.1", self.port(r)), timeout=WAIT) as s:
            s.sendall(b"GET /admin/pollers HTTP/1.1\r\n" + b"X-Pad: " + b"y" * 9000 + b"\r\n\r\n")
            reply = s.recv(4096)
            self.assertEqual(reply.split(b" ")[1], b"431", reply[:80])
        self.assertEqual(self.call(r, "GET", "/healthz")[0], 200)

    def test_slow_requests_are_cut_off(self):
        class Fake:
            config = nx.DaemonConfig(state_db=":memory:")
        admin = nx._Admin(Fake(), TOKEN, True)
        server = nx._serve_http(Fake(), ("127.0.0.1", 0), metrics=False, admin=admin,
                                read_timeout=0.5, request_deadline=1.5, max_connections=4)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        port = server.server_address[1]
        # idle: cut after the read timeout
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            t0 = time.monotonic()
            self.assertEqual(s.recv(1), b"")
            self.assertLess(time.monotonic() - t0, 5)
        # trickling one byte at a time, each within the read timeout: cut at the deadline
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            t0 = time.monotonic()
            cut = False
            for ch in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"z" * 100:
                try:
                    s.sendall(bytes([ch]))
                except OSError:
                    cut = True
                    break
                time.sleep(0.2)
                if time.monotonic() - t0 > 6:
                    break
            if not cut:
                s.settimeout(WAIT)
                try:
                    cut = s.recv(4096) == b""
                except OSError:
                    cut = True
            self.assertTrue(cut, "a trickling request was not cut off")
            self.assertLess(time.monotonic() - t0, 6)


    def test_a_request_head_has_one_deadline_in_all(self):
        # One byte of the request line at a time, each well within the read
        # timeout: cut off once the head's deadline passes.
        class Fake:
            config = nx.DaemonConfig(state_db=":memory:")
        server = nx._serve_http(Fake(), ("127.0.0.1", 0), metrics=False,
                                admin=nx._Admin(Fake(), TOKEN, True), read_timeout=0.5)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        with socket.create_connection(("127.0.0.1", server.server_address[1]),
                                      timeout=WAIT) as s:
            s.sendall(b"GET /healthz?")
            cut, until = False, time.monotonic() + WAIT
            while not cut and time.monotonic() < until:
                try:
                    s.sendall(b"a")
                    s.settimeout(0.05)
                    cut = s.recv(1) == b""
                except socket.timeout:
                    pass
                except OSError:
                    cut = True
            self.assertTrue(cut, "a request line trickled for %gs was not cut off" % WAIT)

class TestConfig(unittest.TestCase):

    def problems(self, doc):
        with self.assertRaises(nx.ConfigError) as cm:
            config_from_dict(doc)
        return str(cm.exception)

    def test_new_keys_validated_with_their_paths(self):
        self.assertIn("admin_addr", self.problems({"admin_addr": "nope"}))
        self.assertIn("admin_addr", self.problems({"admin_addr": 9091}))
        self.assertIn("pollers.admin_addr", self.problems({"pollers": {"admin_addr": "x:y"}}))
        self.assertIn("admin_token_file", self.problems({"admin_token_file": ""}))
        self.assertIn("admin_token_file", self.problems({"admin_token_file": 3}))
        self.assertIn("admin_token", self.problems({"admin_token": "secret"}))
        cfg = config_from_dict({"admin_addr": "[::1]:9091", "admin_token_file": "tok"},
                               base_dir="/etc/nexo")
        self.assertEqual((cfg.admin_addr, cfg.admin_token_file), (("::1", 9091),
                                                                  "/etc/nexo/tok"))


class TestCli(Case):

    def cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = nx.main(list(argv))
        logging.getLogger().handlers[:] = []
        return code, out.getvalue(), err.getvalue()

    def test_status_and_verbs_through_the_api(self):
        r = self.runner()
        r.run_once("broken")
        url = f"http://127.0.0.1:{self.port(r)}"
        code, out, err = self.cli("--admin", url, "status", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual([j["id"] for j in json.loads(out)], ["healthy", "broken"])
        code, out, err = self.cli("--admin", url, "status")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"broken\s+mem\s+active\s+transient")
        # a mutation without a token is refused, with the API's reason
        code, out, err = self.cli("--admin", url, "pause", "broken")
        self.assertEqual(code, nx.EXIT_ADMIN)
        self.assertIn("token", err)
        code, out, err = self.cli("--admin", url, "--admin-token-file", self.token_file,
                                  "pause", "broken")
        self.assertEqual(code, 0, err)
        self.assertIn("pause broken: done", out)
        self.assertTrue(r.status()[1]["paused"])
        os.environ["NEXO_POLLER_ADMIN_URL"] = url
        os.environ["NEXO_POLLER_ADMIN_TOKEN"] = TOKEN
        code, out, err = self.cli("resume", "broken")
        self.assertEqual(code, 0, err)
        self.assertFalse(r.status()[1]["paused"])
        code, out, err = self.cli("tick", "healthy")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["outcome"], "ok")
        code, out, err = self.cli("tick", "broken")
        self.assertEqual(code, nx.EXIT_TICK_FAILED, err)
        self.assertEqual(self.cli("reset", "nope")[0], nx.EXIT_UNKNOWN_JOB)
        code, out, err = self.cli("cursor", "healthy", "--set-text", "remote", "--yes")
        self.assertEqual((code, out.strip()),       # text where printable, as the local CLI
                         (0, f'healthy: "remote"  base64 {nx.encode_cursor(b"remote")}  6 bytes '
                             '(set)'), err)
        code, out, err = self.cli("cursor", "healthy", "--history", "--json")
        self.assertEqual(json.loads(out)[0]["source"], "set (admin API)", err)
        self.assertEqual(self.cli("cursor", "healthy", "--rollback", "1")[0], nx.EXIT_USAGE)
        del os.environ["NEXO_POLLER_ADMIN_URL"]
        code, out, err = self.cli("--admin", "http://127.0.0.1:1", "status")
        self.assertEqual(code, nx.EXIT_ADMIN)
        self.assertIn("admin API", err)
        self.assertEqual(self.cli("--admin", "ftp://x", "status")[0], nx.EXIT_USAGE)


class TestTwoDaemons(Case):
    """Issue 21 item 5: which daemon holds which job, and the live daemons,
    on the page, in the API, in ``status`` and in ``--admin status``."""

    def test_holders_and_live_daemons_everywhere(self):
        a = self.runner()
        b = self.runner()
        owner_a, owner_b = a.state.owner, b.state.owner
        code, jobs, _ = self.call(b, "GET", "/admin/pollers")
        self.assertEqual({j["id"]: j["holder"] for j in jobs},
                         {"healthy": owner_a, "broken": owner_a})
        code, doc, _ = self.call(b, "GET", "/admin/daemons")
        self.assertEqual(code, 200)
        self.assertEqual(doc["self"], owner_b)
        self.assertEqual({d["owner"]: (sorted(d["holds"]), d["self"]) for d in doc["daemons"]},
                         {owner_a: (["broken", "healthy"], False), owner_b: ([], True)})
        code, page, _ = self.call(b, "GET", "/")
        self.assertIn('<td class="holder">%s</td>' % owner_a, page)
        daemons = page[page.index('<table id="daemons">'):]
        self.assertIn(f'<th scope="row">{owner_a}</th><td>2</td>', daemons)
        self.assertIn(f'<th scope="row">{owner_b} (this one)</th><td>0</td>', daemons)
        # `--admin status` names both daemons; local `status` the holders too
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(nx.main(["--admin", f"http://127.0.0.1:{self.port(b)}",
                                      "status"]), 0)
        logging.getLogger().handlers[:] = []
        first = out.getvalue().splitlines()[0]
        self.assertIn(f"{owner_a} (holds 2)", first)
        self.assertIn(f"{owner_b} (holds 0) (this one)", first)
        self.assertIn(owner_a, next(line for line in out.getvalue().splitlines()
                                    if line.startswith("broken")))
        cfg = config_from_dict(self.doc(), base_dir=self.dir, extra_kinds=["mem"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            nx._print_status(cfg, True)
        self.assertEqual({j["id"]: j["holder"] for j in json.loads(out.getvalue())},
                         {"healthy": owner_a, "broken": owner_a})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            nx._print_status(cfg, False)
        self.assertIn(f"{owner_a} (holds 2)", out.getvalue().splitlines()[0])


class TestOperatorRunsTakeASlot(Case):
    """Issue 21: an operator's run keeps the kind's max_concurrent_ticks."""

    def test_a_run_with_every_slot_busy_is_409_and_the_job_stays_scheduled(self):
        entered, release = threading.Event(), threading.Event()

        def held(ctx):
            entered.set()
            release.wait(WAIT)
            return TickAck(b"1")
        cfg = config_from_dict(self.doc(), base_dir=self.dir, extra_kinds=["mem"])
        with mock.patch.object(nx, "_IN_PROCESS_BUDGET_SECS", 0.3):   # the wait for a slot
            r = Runner(cfg)
            r.register(FakePoller("mem", default=held, max_concurrent_ticks=1))
        self.addCleanup(r.stop)
        r.start(background=False)
        first = threading.Thread(target=r.run_once, args=("healthy",))
        first.start()
        self.addCleanup(first.join, WAIT)
        self.addCleanup(release.set)
        self.assertTrue(entered.wait(WAIT))
        code, doc, _ = self.call(r, "POST", "/admin/pollers/broken/run", TOKEN)
        self.assertEqual(code, 409, doc)
        self.assertEqual(doc["outcome"]["outcome"], "busy")
        self.assertIn("all 1 tick slots of kind:mem stayed busy", doc["error"])
        self.assertIsNotNone({s["id"]: s for s in r.status()}["broken"]["next_run_at"],
                             "a refused run leaves the job on its schedule")
        release.set()
        first.join(WAIT)
        self.assertEqual(r.run_once("broken").status, "ok")   # a slot again


# ---------------------------------------------------------------------------- the page

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class TestStatusPage(Case):
    """The page in a real headless Chromium."""

    def browser(self, url, *extra, timeout=90):
        exe = _chromium()
        profile = tempfile.mkdtemp(prefix="chromium-", dir=self.dir)
        argv = [exe, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", *extra, url]
        proc = subprocess.run(argv, capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        return proc

    def dom(self, url):
        proc = self.browser(url, "--virtual-time-budget=2000", "--dump-dom")
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        return proc.stdout.decode()

    @staticmethod
    def row(dom, job):
        m = re.search(r'<tr data-job="%s".*?</tr>' % re.escape(job), dom, re.S)
        return m.group(0) if m else ""

    def test_page_in_a_real_browser(self):
        if _chromium() is None:
            if os.environ.get("CI") or os.environ.get("NEXO_REQUIRE_CHROMIUM"):
                self.fail("CI is set and chromium is missing: .ci/run installs it "
                          "(apt-get install -y chromium)")
            self.skipTest("chromium not installed (apt-get install -y chromium); "
                          "the status page is not checked in a browser")
        r = self.runner()
        r.run_once("healthy")
        r.run_once("broken")
        url = f"http://127.0.0.1:{self.port(r)}/"
        dom = self.dom(url)
        healthy, broken = self.row(dom, "healthy"), self.row(dom, "broken")
        self.assertIn("✓ ok", healthy)
        self.assertIn("✗ failing", broken)
        self.assertIn("upstream said &lt;b&gt;503&lt;/b&gt; &amp;", broken, "escaped error")
        self.assertNotIn("<b>503</b>", dom)
        self.assertIn('data-action="pause"', broken)
        self.assertRegex(healthy, r"every 3600s")
        self.assertIn("2 of 2 jobs", dom)
        # issue 25 item 7: each job's recent runs, a bar of outcomes with the
        # details (escaped) behind a click
        self.assertIn('<details class="runs">', healthy)
        self.assertEqual(healthy.count('class="run st-ok"'), 2, "the first tick and run_once")
        self.assertEqual(broken.count('class="run st-failing"'), 2)
        details = broken.split('<ol class="runlist">')[1]
        self.assertIn("operator: <b>transient</b>", details)
        self.assertIn("upstream said &lt;b&gt;503&lt;/b&gt;", details)

        # the page's pause button: the same POST, with the token as the page sends it
        port = self.port(r)
        code, doc, _ = self.call(r, "POST", "/admin/pollers/broken/pause", TOKEN,
                                 {"Origin": f"http://127.0.0.1:{port}",
                                  "Sec-Fetch-Site": "same-origin"})
        self.assertEqual((code, doc), (200, {"ok": True, "paused": True}))
        dom = self.dom(url)
        self.assertIn("‖ paused", self.row(dom, "broken"))
        self.assertIn('data-action="resume"', self.row(dom, "broken"))
        # ... and `status` says so too
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            nx.main(["--admin", url, "status", "--json"])
        logging.getLogger().handlers[:] = []
        self.assertTrue(next(j for j in json.loads(out.getvalue())
                             if j["id"] == "broken")["paused"])
        # the filter: only the paused job
        dom = self.dom(url + "?status=paused")
        self.assertTrue(self.row(dom, "broken"))
        self.assertFalse(self.row(dom, "healthy"))

        shot = os.path.join(self.dir, "status-page.png")
        proc = self.browser(url, "--virtual-time-budget=2000", f"--screenshot={shot}",
                            "--window-size=1200,800", "--hide-scrollbars")
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        with open(shot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        if os.environ.get("NEXO_SAVE_SCREENSHOT"):
            shutil.copy(shot, os.path.join(ROOT, "docs", "status-page.png"))


class ListenerSurvivesTests(unittest.TestCase):
    """The HTTP listener thread outlives a failed handler start or a bad
    connection, and shutdown() always returns (review finding 2)."""

    def serve(self):
        class Fake:
            config = nx.DaemonConfig(state_db=":memory:")
        server = nx._serve_http(Fake(), ("127.0.0.1", 0), metrics=False,
                                admin=nx._Admin(Fake(), TOKEN, True))
        self.addCleanup(server.server_close)
        return server

    def ask(self, server) -> bytes:
        with socket.create_connection(("127.0.0.1", server.server_address[1]),
                                      timeout=WAIT) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            try:
                return s.recv(4096)
            except ConnectionResetError:     # closed with the request unread
                return b""

    def stop(self, server) -> None:
        t = threading.Thread(target=server.shutdown, daemon=True)
        t.start()
        t.join(WAIT)
        self.assertFalse(t.is_alive(), "shutdown() hung: the listener thread died")

    def test_a_handler_thread_that_cannot_start_costs_one_request(self):
        server = self.serve()
        logger = logging.getLogger("nexo_poller")
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.CRITICAL)
        with no_threads_named("nexo-http-handler"):
            self.assertEqual(self.ask(server), b"")          # closed, not left hanging
        self.assertTrue(self.ask(server).startswith(b"HTTP/1.0 "))    # answered
        self.stop(server)

    def test_a_failing_connection_does_not_end_the_listener(self):
        server = self.serve()
        real_receive, failed = server._receive, threading.Event()

        def receive(sel, sock):
            if not failed.is_set():
                failed.set()
                raise ValueError("a bug handling one connection")
            return real_receive(sel, sock)
        server._receive = receive
        logger = logging.getLogger("nexo_poller")
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.CRITICAL)
        self.assertEqual(self.ask(server), b"")
        self.assertTrue(failed.is_set())
        self.assertTrue(self.ask(server).startswith(b"HTTP/1.0 "))    # answered
        self.stop(server)


if __name__ == "__main__":
    unittest.main()
