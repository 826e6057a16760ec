"""Worst-day faults of issue 10, each proven failing before its fix.

* A long-lived plugin that redirects its own output keeps running.
* One oversize reply fails its own request, not the plugin's connection.
* Out of file descriptors, the broker backs off instead of spinning.
* Grandchildren that call setsid() die with their tick, plugin and daemon.
* The broker's memory follows what is in flight, not rate x timeout.
* The metrics endpoint bounds idle connections, threads and request lines.
* A plugin cannot write a line into the daemon's log.
* A crash-looping long-lived plugin fails a tick at once, with its output.

NEXO_TEST_FULL=1 runs the long variants.
"""

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import unittest
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures"))
sys.path.insert(0, HERE)

import worstday as wd  # noqa: E402
import nexo_poller as nx  # noqa: E402
from nexo_poller import Lifecycle, PollerError  # noqa: E402
from test_faults import NOW, WorstCase  # noqa: E402

# One plugin for every scenario here; what it does comes from argv[1] (at
# start) and the job's config (per tick).  SDK-based, like real plugins.
PLUGIN = textwrap.dedent("""\
    import os, subprocess, sys, time
    sys.path.insert(0, %(root)r)
    import nexo_poller as nx

    def note(key, text):
        path = os.environ.get(key)
        if path:
            with open(path, "a") as f:
                f.write(text + "\\n")

    def escape():
        # A grandchild in its own session: killing the plugin's group misses it.
        child = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(120)"],
                                 start_new_session=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        note("ESCAPED_LOG", str(child.pid))

    mode = sys.argv[1] if len(sys.argv) > 1 else "serve"
    note("STARTS_LOG", str(os.getpid()))
    if mode == "redirect":                       # exec >>log 2>&1, then serve
        fd = os.open(os.environ["REDIRECT_TO"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        print("redirected", os.getpid(), flush=True)
    elif mode == "crash":
        print("boom: the token file is missing", file=sys.stderr, flush=True)
        sys.exit(3)
    elif mode == "forge":
        sys.stdout.write("hello\\rFORGED\\x1b[31m\\u2028fake line\\n")
        sys.stdout.flush()
    elif mode == "escape":
        escape()

    def tick(ctx):
        cfg = ctx.config if isinstance(ctx.config, dict) else {}
        if cfg.get("escape"):
            escape()
        if cfg.get("big"):
            return nx.TickAck(next_cursor=b"b" * int(cfg["big"]))
        return nx.TickAck(next_cursor=str(int(ctx.cursor or b"0") + 1).encode())

    sys.exit(nx.run_plugin({k: tick for k in os.environ["KINDS"].split(",")}))
    """) % {"root": wd.ROOT}


class Case(WorstCase):
    """WorstCase plus a plugin script and a supervised long-lived rig."""

    def setUp(self):
        super().setUp()
        self.script = self.tmp.join("plugin.py")
        with open(self.script, "w") as f:
            f.write(PLUGIN)
        self.starts_log = self.tmp.join("starts.log")
        self.escaped_log = self.tmp.join("escaped.log")

    def lines(self, path):
        try:
            with open(path) as f:
                return [line.rstrip("\n") for line in f]
        except FileNotFoundError:
            return []

    def handle(self, plugin_id, mode="serve", *, kind="wd", timeout=30, lifecycle="long_lived",
               max_concurrent=4, env=None):
        return nx.PluginPollerHandle(
            plugin_id=plugin_id, kinds=(kind,), broker_topic_prefix="plugin.poller.wd",
            lifecycle=Lifecycle(lifecycle), max_concurrent_ticks=max_concurrent,
            tick_timeout=timedelta(seconds=timeout), entrypoint_command=wd.PY,
            entrypoint_args=(self.script, mode), working_dir=self.tmp.path,
            entrypoint_env=self.env(KINDS=kind, STARTS_LOG=self.starts_log,
                                    ESCAPED_LOG=self.escaped_log, **(env or {})))

    def lived(self, handle, *, backoff=0.5):
        """Broker + supervisor + proxy for ``handle``; torn down at cleanup."""
        fds = wd.fd_count()
        server = nx.BrokerServer().start()
        sup = nx.PluginSupervisor(handle, server.url, backoff_initial=backoff,
                                  backoff_max=5.0, stop_grace=2.0).start()
        client = server.client()
        proxy = nx.PluginPollerProxy(handle.kinds[0], handle, client)

        def close():
            sup.stop()
            client.close()
            server.close()
        self.addCleanup(close)
        return server, sup, proxy, close, fds

    def tick(self, proxy, config=None, job="j1", cursor=None):
        ctx = nx.PollContext(job, "agent", proxy.kind, cursor, config or {}, NOW,
                             timedelta(seconds=60))
        started = time.monotonic()
        try:
            result = proxy.tick(ctx)
        except PollerError as exc:
            result = exc
        return result, time.monotonic() - started


# ============================================================================
# 1. Closing stdout is not dying
# ============================================================================

class TestRedirectedOutput(Case):

    def test_plugin_that_redirects_its_output_keeps_running(self):
        out = self.tmp.join("plugin-own.log")
        handle = self.handle("redirector", "redirect", timeout=10, env={"REDIRECT_TO": out})
        server, sup, proxy, close, fds = self.lived(handle, backoff=0.2)
        self.assertTrue(wd.wait_until(lambda: self.lines(out), 15), "plugin never started")
        for n in range(1, wd.scale(4, 40)):
            result, _ = self.tick(proxy, cursor=str(n - 1).encode() if n > 1 else None)
            self.assertIsInstance(result, nx.TickAck, self.m("tick %d: %r" % (n, result)))
            self.assertEqual(result.next_cursor, str(n).encode())
        starts = self.lines(self.starts_log)
        self.assertEqual(len(starts), 1, self.m("plugin was restarted: starts %s" % starts))
        self.assertEqual(sup.restarts, 0)
        self.assertIsNone(sup.proc.poll(), "the plugin was killed")
        self.assertTrue(wd.alive(int(starts[0])))
        close()
        self.assert_nothing_left(fds, "redirect")


# ============================================================================
# Also: a crash-looping long-lived plugin fails a tick at once
# ============================================================================

class TestCrashLoopFailsFast(Case):

    def test_tick_fails_at_once_with_the_plugins_last_output(self):
        handle = self.handle("looper", "crash", timeout=60)
        server, sup, proxy, close, fds = self.lived(handle, backoff=0.3)
        slowest = 0.0
        for i in range(3):
            result, took = self.tick(proxy)
            slowest = max(slowest, took)
            self.assertIsInstance(result, PollerError.Transient, self.m(repr(result)))
            text = str(result)
            self.assertLess(took, 30, self.m("tick %d waited %.1fs of its 60 s timeout "
                                             "for a plugin that keeps crashing" % (i, took)))
            self.assertIn("is down", text)
            self.assertIn("exited (exit status 3)", text)
            self.assertIn("boom: the token file is missing", text)
        print("\n[worst-day] crash-looping plugin: a tick with a 60 s timeout failed after "
              "at most %.2fs" % slowest, file=sys.stderr)
        self.assertLessEqual(len(str(result)), 4000, "the error carries a bounded tail")
        close()
        self.assert_nothing_left(fds, "crash loop")


# ============================================================================
# 9. Nothing a plugin controls writes a line into the log
# ============================================================================

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


class TestLogInjection(Case):

    def manifest(self, plugin_id):
        folder = self.tmp.join("plugins", "p%d" % time.monotonic_ns())
        wd.write_manifest(folder, plugin_id, ["wd"], lifecycle="ephemeral",
                          prefix="plugin.poller.wd")
        return os.path.join(folder, "nexo-plugin.toml")

    def test_plugin_id_follows_the_documented_pattern(self):
        forged = "rss\n2026-05-17 10:00:00,000 ERROR tick job=payroll outcome=permanent"
        for bad in (forged, "a b", "-lead", "x" * 129, "caf\u00e9", "tab\there"):
            with self.subTest(plugin_id=bad):
                with self.assertRaises(nx.ManifestError) as cm:
                    nx.load_manifest(self.manifest(bad))
                self.assertEqual(cm.exception.key, "plugin.id")
                self.assertNotIn("\n", str(cm.exception))
        for good in ("rss", "rss_plugin", "acme.rss:v2", "A-1", "x" * 128):
            self.assertEqual(nx.load_manifest(self.manifest(good)).plugin_id, good)
        # ... and `validate` refuses the forged one.
        folder = os.path.dirname(self.manifest(forged))
        config = wd.write_config(self.tmp.join("pollers.json"), {
            "state_db": "state.db", "plugins": [folder], "jobs": []})
        run = subprocess.run([wd.PY, wd.MODULE, "--config", config, "validate"],
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(run.returncode, 2, run.stdout + run.stderr)
        self.assertNotIn("\n2026-05-17", run.stderr)

    def test_relayed_output_and_plugin_id_are_escaped(self):
        records = _Records()
        logger = logging.getLogger("nexo_poller")
        logger.addHandler(records)
        old_level = logger.level
        logger.setLevel(logging.DEBUG)
        self.addCleanup(logger.setLevel, old_level)
        self.addCleanup(logger.removeHandler, records)
        # A handle built in code may carry any id; the log still gets one line.
        handle = self.handle("forge\nFORGED-ID", "forge", timeout=10)
        server, sup, proxy, close, fds = self.lived(handle)
        got = wd.wait_until(lambda: [r for r in list(records.records) if "hello" in r], 15)
        self.assertTrue(got, "the plugin's output line never reached the log")
        result, _ = self.tick(proxy)
        self.assertIsInstance(result, nx.TickAck, repr(result))
        close()
        mine = [r for r in records.records if "FORGED" in r]
        self.assertTrue(mine)
        for message in mine:
            for bad in ("\n", "\r", "\x1b", "\u2028"):
                self.assertNotIn(bad, message, "raw %r in a log line: %r" % (bad, message))
        self.assertTrue(any("hello\\x0dFORGED\\x1b[31m\\u2028fake line" in r for r in mine),
                        mine)
        self.assert_nothing_left(fds, "forge")

    def test_error_message_from_a_plugin_is_escaped(self):
        with self.assertRaises(PollerError.Transient) as cm:
            nx._reply_to_ack({"error": {"code": -32001, "message": "x\nERROR forged\r"}}, "j")
        self.assertNotIn("\n", str(cm.exception))
        self.assertNotIn("\r", str(cm.exception))


# ============================================================================
# 6. Grandchildren that call setsid() do not outlive their tick or the daemon
# ============================================================================

class TestEscapedGrandchildren(Case):

    def escaped(self):
        return [int(p) for p in self.lines(self.escaped_log) if p]

    def test_daemon_kills_setsid_grandchildren_of_ticks_and_plugins(self):
        env = {"KINDS": "esc_eph", "STARTS_LOG": self.starts_log, "ESCAPED_LOG": self.escaped_log}
        wd.write_manifest(self.tmp.join("plugins", "eph"), "esc_eph", ["esc_eph"],
                          lifecycle="ephemeral", args=[self.script], env=env, max_concurrent=2)
        lived_log = self.tmp.join("lived-escaped.log")
        wd.write_manifest(self.tmp.join("plugins", "lived"), "esc_lived", ["esc_lived"],
                          lifecycle="long_lived", args=[self.script, "escape"],
                          env=dict(env, KINDS="esc_lived", ESCAPED_LOG=lived_log))
        config = wd.write_config(self.tmp.join("pollers.json"), {
            "state_db": "state/poller.db", "broker": "unix://run/broker.sock",
            "default_jitter_ms": 0, "shutdown_grace_secs": 3,
            "plugins": ["plugins/eph", "plugins/lived"],
            "jobs": [wd.every_job("e", "esc_eph", 0.2, {"escape": True}),
                     wd.every_job("l", "esc_lived", 0.5)]})
        ticks = wd.scale(7, 40)
        d = wd.Daemon(config, cwd=self.tmp.path, env=wd.daemon_env(self.token))
        self.addCleanup(d.cleanup)
        d.wait_started()
        done = wd.wait_until(lambda: len(d.ticks("e", "ok")) >= ticks
                             and len(self.escaped()) >= ticks, 60)
        self.assertTrue(done, "ephemeral ticks did not run:\n" + d.tail())
        self.assertTrue(wd.wait_until(lambda: self.lines(lived_log), 30),
                        "the long-lived plugin never spawned its grandchild")
        # Every tick that has ended took its escaped grandchild with it.
        ended = self.escaped()[:ticks - 2]
        gone = wd.wait_until(lambda: not [p for p in ended if wd.alive(p)], 10)
        self.assertTrue(gone, "%d of %d setsid() grandchildren outlived their tick: %s" % (
            len([p for p in ended if wd.alive(p)]), len(ended),
            [(p, wd.proc_stat(p)) for p in ended if wd.alive(p)]))
        d.signal(signal.SIGTERM)
        self.assertEqual(d.wait(30), 0, d.tail())
        everyone = self.escaped() + [int(p) for p in self.lines(lived_log)]
        gone = wd.wait_until(lambda: not [p for p in everyone if wd.alive(p)], 10)
        self.assertTrue(gone, "grandchildren outlived the daemon: %s" % [
            (p, wd.proc_stat(p)) for p in everyone if wd.alive(p)])
        self.assertTrue(wd.wait_until(lambda: not wd.tagged(self.token), 10),
                        "processes left: %s" % wd.tagged(self.token))

    def test_subreaper_never_steals_a_popen_exit_status(self):
        # In a process of its own (a subreaper changes the whole process):
        # ephemeral ticks whose plugin exits 3 before replying run on four
        # threads while another thread sweeps without pause.  Every tick must
        # still see "exit status 3": a sweep that reaped a Popen's child would
        # make it read 0.  A tick's setsid() grandchild dies with the tick.
        script = textwrap.dedent("""\
            import os, sys, threading, time
            sys.path.insert(0, %(root)r)
            import nexo_poller as nx
            from datetime import datetime
            NOW = datetime.fromisoformat(%(now)r)
            assert nx._become_subreaper(), "prctl failed"
            stop, errors, statuses = threading.Event(), [], []
            def sweeper():
                while not stop.is_set():
                    nx._sweep_orphans()
            req = nx.build_tick_request("wd", "j", "a", None, {}, NOW, 60)
            def ticker(n):
                for _ in range(n):
                    try:
                        nx.spawn_ephemeral_tick(sys.executable, "exiter", req, 20,
                                                args=["-S", "-c", "import sys; sys.exit(3)"])
                        errors.append("no error")
                    except nx.PollerError as exc:
                        statuses.append(str(exc))
            sw = threading.Thread(target=sweeper); sw.start()
            ts = [threading.Thread(target=ticker, args=(%(n)d,)) for _ in range(4)]
            [t.start() for t in ts]; [t.join() for t in ts]
            stop.set(); sw.join()
            bad = [s for s in statuses if "exit status 3" not in s] + errors
            assert not bad, bad[:5]
            ack = nx.spawn_ephemeral_tick(sys.executable, "esc", nx.build_tick_request(
                "wd", "j", "a", None, {"escape": True}, NOW, 60), 20,
                args=[%(script)r], env=dict(os.environ, KINDS="wd", ESCAPED_LOG=%(log)r))
            pid = int(open(%(log)r).read().split()[-1])
            state = open("/proc/%%d/stat" %% pid).read().split(") ")[1][0] \\
                if os.path.exists("/proc/%%d" %% pid) else "gone"
            print("OK", len(statuses), state)
            """) % {"root": wd.ROOT, "now": NOW.isoformat(), "n": wd.scale(15, 100), "script": self.script,
                    "log": self.escaped_log}
        run = subprocess.run([wd.PY, "-c", script], capture_output=True, text=True, timeout=300,
                             env=wd.daemon_env(self.token))
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        words = run.stdout.split()
        self.assertEqual(words[0], "OK", run.stdout)
        self.assertEqual(int(words[1]), 4 * wd.scale(15, 100))
        self.assertEqual(words[2], "gone", "a tick's setsid() grandchild outlived the tick")
        self.assertTrue(wd.wait_until(lambda: not wd.tagged(self.token), 10))



# ============================================================================
# 3. One oversize reply fails its own request, not the plugin's connection
# ============================================================================

class TestOversizeReply(Case):

    def test_big_reply_fails_alone_and_other_jobs_go_on(self):
        handle = self.handle("bigsmall", timeout=30)
        server, sup, proxy, close, fds = self.lived(handle)
        self.assertTrue(wd.wait_until(lambda: server.has_subscriber(handle.tick_topic()), 15))
        conns = server.stats()["connections"]
        for round_ in range(wd.scale(3, 20)):
            result, took = self.tick(proxy, {"big": 900 * 1024}, job="big")
            self.assertIsInstance(result, PollerError.Transient, repr(result))
            self.assertIn(str(nx.BROKER_MAX_LINE_BYTES), str(result))
            self.assertLess(took, 20, "the big tick waited out its timeout")
            result, _ = self.tick(proxy, job="small", cursor=str(round_).encode())
            self.assertIsInstance(result, nx.TickAck, "round %d: small: %r" % (round_, result))
            self.assertEqual(result.next_cursor, str(round_ + 1).encode())
        self.assertEqual(len(self.lines(self.starts_log)), 1, "the plugin was restarted")
        self.assertEqual(sup.restarts, 0)
        self.assertEqual(server.stats()["connections"], conns)
        self.assertEqual(server.stats()["pending"], 0)
        close()
        self.assert_nothing_left(fds, "oversize")

    def test_broker_fails_only_the_request_an_oversize_reply_line_answers(self):
        # A plugin in another language, no SDK refusal: the broker itself
        # drops the line, fails the one request, and keeps the connection.
        server = nx.BrokerServer().start()
        self.addCleanup(server.close)
        local = server.client()
        self.addCleanup(local.close)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(server.path)
        self.addCleanup(raw.close)
        reader = raw.makefile("rb")
        self.addCleanup(reader.close)

        def send(obj):
            raw.sendall(json.dumps(obj).encode() + b"\n")
        send({"jsonrpc": "2.0", "id": 1, "method": "subscribe",
              "params": {"topic": "t", "sid": 1}})
        self.assertEqual(json.loads(reader.readline())["result"], True)
        for n in range(2):
            box = {}
            t = threading.Thread(target=lambda: box.update(r=self._request(local)))
            t.start()
            msg = json.loads(reader.readline())
            inbox = msg["params"]["inbox"]
            if n == 0:           # over the limit, sent in pieces
                raw.sendall(b'{"jsonrpc":"2.0","method":"reply","params":{"inbox":%d,'
                            b'"payload":"' % inbox)
                for _ in range(3):
                    raw.sendall(b"x" * (nx.BROKER_MAX_LINE_BYTES // 2))
                raw.sendall(b'"}}\n')
                error = json.loads(reader.readline())
                self.assertEqual(error["error"]["code"], nx.BROKER_INVALID_REQUEST)
            else:
                send({"jsonrpc": "2.0", "method": "reply",
                      "params": {"inbox": inbox, "payload": "fine"}})
            t.join(30)
            self.assertFalse(t.is_alive())
            if n == 0:
                self.assertIsInstance(box["r"], nx.PluginPollerForwardError, box)
                self.assertIn(str(nx.BROKER_MAX_LINE_BYTES), str(box["r"]))
            else:
                self.assertEqual(box["r"], "fine")
        send({"jsonrpc": "2.0", "id": 9, "method": "ping"})
        self.assertEqual(json.loads(reader.readline()), {"jsonrpc": "2.0", "id": 9,
                                                         "result": "pong"})
        self.assertEqual(server.stats()["connections"], 1)

    def _request(self, client):
        try:
            return client.request("t", {"q": 1}, 30)
        except nx.PluginPollerForwardError as exc:
            return exc


# ============================================================================
# 7. The broker's memory follows what is in flight
# ============================================================================

class TestAnsweredRequestsAreForgotten(Case):

    def test_answered_requests_leave_no_deadline_behind(self):
        server = nx.BrokerServer().start()
        self.addCleanup(server.close)
        responder = nx.BrokerClient.connect(server.url)
        self.addCleanup(responder.close)
        responder.subscribe("echo", lambda payload: payload)
        n, threads = wd.scale(5_000, 200_000), 4     # the heap is compacted past 64
        peak = {"heap": 0}

        def requester():
            with nx.BrokerClient.connect(server.url) as client:
                for i in range(n // threads):
                    self.assertEqual(client.request("echo", i, 3600), i)
                    if i % 1000 == 0:
                        peak["heap"] = max(peak["heap"], server.stats()["deadlines"])
        ts = [threading.Thread(target=requester) for _ in range(threads)]
        [t.start() for t in ts]
        [t.join(600) for t in ts]
        self.assertEqual(server.stats()["pending"], 0)
        left = server.stats()["deadlines"]
        print("\n[worst-day] %d answered requests with a 3600 s timeout: %d deadlines "
              "left, peak %d" % (n, left, peak["heap"]), file=sys.stderr)
        self.assertLessEqual(left, 200, "%d answered requests left %d deadlines" % (n, left))
        self.assertLessEqual(peak["heap"], 1000)


# ============================================================================
# 8. The metrics endpoint is bounded
# ============================================================================

class _FakeRunner:
    """What the metrics page reads of a Runner: no jobs, no state, no outbox."""

    def __init__(self):
        self.metrics = nx._Metrics()
        self.publisher = None
        self.state = None
        self.state_error = None
        self.clock = time.time
        self.config = nx.DaemonConfig(state_db=":memory:")

    def status(self):
        return []

    def supervisors(self):
        return {}

    def lanes(self):
        return {}

    def outbox_counts(self):
        return {}


class TestMetricsBounds(Case):

    def test_idle_connections_cost_no_thread_and_are_cut_off(self):
        cap, timeout = 4, 1.0
        threads_before = threading.active_count()
        server = nx._serve_metrics(_FakeRunner(), ("127.0.0.1", 0), read_timeout=timeout,
                                   max_connections=cap, max_request_bytes=2048)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        port = server.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(wd.scale(60, 600))]
        for s in idle:
            self.addCleanup(s.close)
        # Every idle connection is closed by the server once its request's
        # deadline (the read timeout) passes, no thread each: no more than
        # the cap of handler threads ever ran.
        peak = threads_before
        closed = set()
        deadline = time.monotonic() + 30
        while len(closed) < len(idle) and time.monotonic() < deadline:
            peak = max(peak, threading.active_count())
            for i, s in enumerate(idle):
                if i not in closed:
                    s.settimeout(0.001)
                    try:
                        if s.recv(1) == b"":
                            closed.add(i)
                    except (socket.timeout, BlockingIOError):
                        pass
                    except OSError:
                        closed.add(i)
        print("\n[worst-day] %d idle metrics connections: peak %d extra threads, all closed "
              "within %.1fs" % (len(idle), peak - threads_before,
                                30 - (deadline - time.monotonic())), file=sys.stderr)
        self.assertEqual(len(closed), len(idle), "%d idle connections still held"
                         % (len(idle) - len(closed)))
        self.assertLessEqual(peak - threads_before, cap + 1,
                             "%d threads for %d idle connections" % (peak - threads_before,
                                                                     len(idle)))
        # A request line over the limit is refused; a scrape still works.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics?" + "x" * 4096)
        self.assertEqual(conn.getresponse().status, 414)
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertIn(b"nexo_poller_ticks_total", response.read())
        conn.close()


    def test_trickling_and_idle_clients_do_not_starve_probes(self):
        # The default bounds (16 handlers, 10 s for a request): more clients
        # than handlers each send a header byte well within the read timeout
        # (reconnecting when cut off), and hundreds of partial requests idle;
        # every probe is still answered.
        server = nx._serve_metrics(_FakeRunner(), ("127.0.0.1", 0))
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        addr = ("127.0.0.1", server.server_address[1])

        def connect(first):
            s = socket.create_connection(addr, timeout=30)
            self.addCleanup(s.close)
            s.sendall(first)
            return s
        idle = [connect(b"GET /metr") for _ in range(wd.scale(60, 600))]
        slow = [connect(b"GET /metrics HTTP/1.1\r\nX-Slow: ") for _ in range(wd.scale(20, 40))]
        probes, answered, reconnected = wd.scale(10, 40), 0, 0
        for _ in range(probes):
            for i, s in enumerate(slow):
                try:
                    s.sendall(b"z")
                except OSError:
                    slow[i] = connect(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
                    reconnected += 1
            conn = http.client.HTTPConnection(*addr, timeout=30)
            try:
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                answered += response.status == 200 and \
                    b"nexo_poller_ticks_total" in response.read()
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
        print("\n[worst-day] %d trickling and %d idle clients: %d of %d probes answered "
              "(%d trickling reconnects)" % (len(slow), len(idle), answered, probes,
                                             reconnected), file=sys.stderr)
        self.assertEqual(answered, probes)

# ============================================================================
# 4. Out of file descriptors, the broker backs off instead of spinning
# ============================================================================

BROKER_CHILD = textwrap.dedent("""    import logging, resource, sys
    sys.path.insert(0, %(root)r)
    import nexo_poller as nx
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (%(fds)d, hard))
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%%(message)s")
    server = nx.BrokerServer(%(path)r).start()
    print("ready", flush=True)
    sys.stdin.read()                  # until the test closes our stdin
    server.close()
    print("closed", flush=True)
    """)


class TestOutOfFileDescriptors(Case):

    def cpu_secs(self, pid):
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def test_broker_backs_off_logs_once_and_recovers(self):
        path = self.tmp.join("broker.sock")
        log_path = self.tmp.join("broker.log")
        with open(log_path, "wb") as log_file:
            child = subprocess.Popen(
                [wd.PY, "-c", BROKER_CHILD % {"root": wd.ROOT, "fds": 64, "path": path}],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                env=wd.daemon_env(self.token))
        self.addCleanup(lambda: child.poll() is None and (child.kill(), child.wait()))
        self.assertEqual(child.stdout.readline().strip(), b"ready")

        def log_lines():
            with open(log_path, "rb") as f:
                return [line for line in f.read().decode("utf-8", "replace").splitlines()
                        if "accept" in line]
        held = []
        for _ in range(wd.scale(150, 400)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(path)
            held.append(s)
        self.assertTrue(wd.wait_until(log_lines, 15), "the broker never ran out of fds")
        # A measuring window: the broker must sit idle in it, not spin.
        cpu0, lines0, t0 = self.cpu_secs(child.pid), len(log_lines()), time.monotonic()
        time.sleep(2.0)
        cpu = self.cpu_secs(child.pid) - cpu0
        window = time.monotonic() - t0
        lines = len(log_lines()) - lines0
        print("\n[worst-day] out of fds for %.1fs: %.2fs CPU, %d accept log lines"
              % (window, cpu, lines), file=sys.stderr)
        self.assertLess(cpu, window * 0.5, "the broker spun: %.2fs CPU in %.1fs" % (cpu, window))
        self.assertLessEqual(lines, 2, "%d accept log lines in %.1fs" % (lines, window))
        for s in held:
            s.close()
        # Descriptors free up: the broker accepts and serves again.
        client = wd.wait_until(lambda: self._connect(path), 30)
        self.assertTrue(client, "the broker did not recover")
        self.assertEqual(client._call("ping", {}, 30), "pong")
        client.close()
        self.assertTrue(any("again" in line for line in log_lines()), log_lines())
        child.stdin.close()
        self.assertEqual(child.stdout.readline().strip(), b"closed")
        self.assertEqual(child.wait(30), 0)
        child.stdout.close()

    def _connect(self, path):
        client = None
        try:
            client = nx.BrokerClient.connect("unix://" + path, timeout=2)
            client._call("ping", {}, 2)
            return client
        except nx.PluginPollerForwardError:
            if client is not None:
                client.close()
            return None


if __name__ == "__main__":
    unittest.main()
