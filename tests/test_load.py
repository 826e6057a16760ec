"""Worst-day load: the broker under many and misbehaving clients, and the
daemon shut down while 100 ticks are in flight.

* 500 concurrent client connections (2,000 with NEXO_TEST_FULL=1), each
  subscribed, pinging and requesting; everything drains to zero after.
* Slow clients (one byte at a time, or never reading) do not block others;
  a subscriber that never reads is cut off once its output buffer passes
  BROKER_MAX_OUTBUF_BYTES, and memory stays bounded.
* Requests with random disconnects on both sides (~3,000 in CI, 100,000 in
  the full run): every request of a connected requester gets exactly one
  well-formed answer, the broker thread lives, and stats() returns to zero.
* SIGTERM to ``nexo_poller.py run`` with 100 ticks in flight exits within
  shutdown_grace_secs plus a few seconds, stores no cursor of a cancelled
  tick and leaves nothing running.
"""

import json
import os
import random
import selectors
import signal
import socket
import sqlite3
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures"))

import worstday as wd  # noqa: E402
import nexo_poller as nx  # noqa: E402

CONNECTIONS = wd.scale(500, 2000)
REQUESTS = wd.scale(3000, 100_000)
PINGS = b"".join(b'{"jsonrpc":"2.0","id":-1,"method":"ping"}\n' for _ in range(60000))
ANSWER_CODES = {nx.BROKER_NO_RESPONDERS, nx.BROKER_RESPONDER_GONE, nx.BROKER_TIMEOUT,
                nx.BROKER_RESPONDER_ERROR}


def line(obj):
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def raw_connect(server, rcvbuf=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(server.path)
    return s


class Lines:
    """Blocking line reader with deadlines."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def next(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no line within %.1fs" % timeout)
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(262144)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.buf += data
        out, self.buf = self.buf.split(b"\n", 1)
        return json.loads(out)


class LoadCase(unittest.TestCase):
    def setUp(self):
        self.seed = wd.seed_for(self.id())
        self.rng = random.Random(self.seed)
        self.tmp = wd.TempDir("worstload-")
        self.addCleanup(self.tmp.cleanup)

    def m(self, text):
        return "%s [seed=%d; replay with NEXO_TEST_SEED=%d]" % (text, self.seed, self.seed)

    def server(self):
        server = nx.BrokerServer().start()
        self.addCleanup(server.close)
        return server

    def assert_drained(self, server, what):
        zero = {"connections": 0, "pending": 0, "parked": 0, "subscriptions": 0, "topics": 0}
        ok = wd.wait_until(lambda: {k: server.stats()[k] for k in zero} == zero, 15)
        self.assertTrue(ok, self.m("%s: stats did not return to zero: %s"
                                   % (what, server.stats())))
        self.assertTrue(server._thread.is_alive(), self.m("%s: broker thread died" % what))


# ============================================================================
# Many connections
# ============================================================================

class TestManyConnections(LoadCase):

    def test_concurrent_connections(self):
        limit = wd.raise_nofile(2 * CONNECTIONS + 200)
        self.assertGreaterEqual(limit, CONNECTIONS + 100, "RLIMIT_NOFILE too low")
        server = self.server()
        echo = nx.BrokerClient.connect(server.url)
        echo.subscribe("load.echo", lambda p: p, queue="echo")
        echo2 = nx.BrokerClient.connect(server.url)
        echo2.subscribe("load.echo", lambda p: p, queue="echo")
        socks = []
        with wd.PeakRSS() as mem:
            for i in range(CONNECTIONS):
                s = raw_connect(server)
                socks.append(s)
            for i, s in enumerate(socks):
                s.sendall(line({"jsonrpc": "2.0", "id": 1, "method": "subscribe",
                                "params": {"topic": "load.fan", "sid": 1}})
                          + line({"jsonrpc": "2.0", "id": 2, "method": "ping"})
                          + line({"jsonrpc": "2.0", "id": 3, "method": "request",
                                  "params": {"topic": "load.echo", "payload": {"c": i},
                                             "timeout_ms": 30000}}))
            want = {i: {1: True, 2: "pong", 3: {"c": i}} for i in range(CONNECTIONS)}
            got = self.collect(socks, want, timeout=60)
            self.assertEqual(got, want, self.m("replies differ"))
            held = server.stats()["connections"] - 2
            # Fan-out: one publish reaches every connection.
            publisher = server.client()
            publisher.publish("load.fan", {"hello": "all"})
            fan = self.collect(socks, {i: {"message": {"hello": "all"}}
                                       for i in range(CONNECTIONS)}, timeout=60)
            self.assertEqual(len(fan), CONNECTIONS)
            stats = server.stats()
            self.assertEqual(stats["connections"], CONNECTIONS + 2, stats)
            self.assertEqual(stats["subscriptions"], CONNECTIONS + 2, stats)
            publisher.close()
        for s in socks:
            s.close()
        echo.close()
        echo2.close()
        self.assertLess(mem.growth, 128, self.m("memory grew %.1f MiB" % mem.growth))
        self.assert_drained(server, "connections")
        print("\n[load] connections held at once: %d (+2 responders; RLIMIT_NOFILE %d)"
              % (held, limit), file=sys.stderr)

    def collect(self, socks, want, timeout):
        """Read until every connection has the replies ``want`` names; returns them."""
        got = {}
        index = {s.fileno(): i for i, s in enumerate(socks)}
        bufs = {i: b"" for i in range(len(socks))}
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while any(len(got.get(i, {})) < len(w) for i, w in want.items()):
                left = deadline - time.monotonic()
                self.assertGreater(left, 0, self.m("replies missing: %d connections short"
                                                   % sum(len(got.get(i, {})) < len(w)
                                                         for i, w in want.items())))
                for key, _ in sel.select(min(left, 1.0)):
                    i = index[key.fd]
                    data = key.fileobj.recv(65536)
                    self.assertTrue(data, self.m("connection %d closed by the broker" % i))
                    bufs[i] += data
                    *lines, bufs[i] = bufs[i].split(b"\n")
                    for raw in lines:
                        msg = json.loads(raw)
                        if msg.get("method") == "message":
                            got.setdefault(i, {})["message"] = msg["params"]["payload"]
                        else:
                            got.setdefault(i, {})[msg["id"]] = msg.get(
                                "result", msg.get("error"))
        finally:
            sel.close()
        return got


# ============================================================================
# Slow clients
# ============================================================================

class PingMeter:
    """A fast client pinging on a thread; records round-trip latencies."""

    def __init__(self, server):
        self.sock = raw_connect(server)
        self.lines = Lines(self.sock)
        self.latencies, self.errors = [], []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                self.sock.sendall(line({"jsonrpc": "2.0", "id": n, "method": "ping"}))
                msg = self.lines.next(10)
            except (OSError, TimeoutError) as exc:
                self.errors.append(repr(exc))
                return
            if msg is None or msg.get("id") != n:
                self.errors.append("bad reply %r" % (msg,))
                return
            self.latencies.append(time.monotonic() - started)
            time.sleep(0.002)

    def stop(self):
        self._stop.set()
        self.thread.join(15)
        self.sock.close()
        return self


class TestSlowClients(LoadCase):

    def test_one_byte_at_a_time_does_not_block_others(self):
        server = self.server()
        n_slow = wd.scale(20, 100)
        meter = PingMeter(server)
        results = [None] * n_slow

        def slow(k):
            s = raw_connect(server)
            try:
                data = line({"jsonrpc": "2.0", "id": "slow-%d" % k, "method": "ping"})
                for b in data:
                    s.sendall(bytes([b]))
                    time.sleep(0.003)
                results[k] = Lines(s).next(20)
            finally:
                s.close()
        threads = [threading.Thread(target=slow, args=(k,)) for k in range(n_slow)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        meter.stop()
        self.assertFalse(meter.errors, self.m(str(meter.errors)))
        for k, msg in enumerate(results):
            self.assertEqual(msg, {"jsonrpc": "2.0", "id": "slow-%d" % k, "result": "pong"})
        self.assertGreater(len(meter.latencies), 20)
        worst = max(meter.latencies)
        self.assertLess(worst, 1.0, self.m("a fast client waited %.2fs behind slow ones" % worst))
        self.assert_drained(server, "slow writers")

    def test_never_reading_subscriber_is_cut_off(self):
        server = self.server()
        lazy = raw_connect(server, rcvbuf=4096)
        lazy.sendall(line({"jsonrpc": "2.0", "id": 1, "method": "subscribe",
                           "params": {"topic": "load.flood", "sid": 1}}))
        self.assertTrue(wd.wait_until(lambda: server.has_subscriber("load.flood"), 5))
        # A healthy subscriber of the same topic keeps receiving throughout.
        healthy = nx.BrokerClient.connect(server.url)
        received = []
        healthy.subscribe("load.flood", lambda p: received.append(len(p)))
        meter = PingMeter(server)
        publisher = server.client()
        chunk = "x" * (256 * 1024)
        published = 0
        cut_at = None
        with wd.PeakRSS() as mem:
            while published < 64 * wd.MIB:
                publisher.publish("load.flood", chunk)
                published += len(chunk)
                # Pace the flood to the healthy reader: it is never far behind,
                # so only the subscriber that never reads can be a slow consumer.
                wd.wait_until(lambda: published - len(received) * len(chunk) < 4 * wd.MIB, 10)
                if server.stats()["subscriptions"] < 2:
                    cut_at = published
                    break
            if cut_at is None:
                cut_at = wd.wait_until(
                    lambda: server.stats()["subscriptions"] < 2 and published, 10)
        meter.stop()
        self.assertTrue(cut_at, self.m("a subscriber that never reads was never cut off "
                                       "(%d MiB published)" % (published >> 20)))
        self.assertGreaterEqual(cut_at, nx.BROKER_MAX_OUTBUF_BYTES, self.m(
            "cut off after only %d bytes" % cut_at))
        self.assertLess(mem.growth, 64, self.m("memory grew %.1f MiB" % mem.growth))
        self.assertFalse(meter.errors, self.m(str(meter.errors)))
        self.assertLess(max(meter.latencies), 1.0, self.m("pings stalled %.2fs"
                                                          % max(meter.latencies)))
        self.assertTrue(wd.wait_until(lambda: len(received) * len(chunk) >= cut_at, 20),
                        self.m("the healthy subscriber fell behind"))
        # The lazy one drains what was buffered, then sees the close.
        lazy.settimeout(10)
        while True:
            try:
                data = lazy.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            if not data:
                break
        lazy.close()
        publisher.close()
        healthy.close()
        self.assert_drained(server, "never-reading subscriber")

    def test_requester_leaving_with_unread_replies_does_not_kill_the_broker(self):
        # Pipelined requests whose replies are never read, then a disconnect:
        # the broker must drop that client, not die writing to it.
        server = self.server()
        rounds = wd.scale(3, 20)
        for r in range(rounds):
            s = raw_connect(server, rcvbuf=4096)
            s.setblocking(False)
            data = b"".join(line({"jsonrpc": "2.0", "id": i, "method": "ping"})
                            for i in range(60000))
            sent = 0
            deadline = time.monotonic() + 10
            while sent < len(data) and time.monotonic() < deadline:
                try:
                    sent += s.send(data[sent:sent + 65536])
                except BlockingIOError:
                    time.sleep(0.001)
                except OSError:
                    break
            s.close()
            time.sleep(0.2)
            self.assertTrue(server._thread.is_alive(), self.m(
                "round %d: the broker thread died after a requester left with %d bytes "
                "of unread replies" % (r, sent)))
        meter = PingMeter(server)
        time.sleep(0.2)
        meter.stop()
        self.assertTrue(meter.latencies and not meter.errors, self.m("broker not serving"))
        self.assert_drained(server, "never-reading requester")


    def test_never_reading_requester_is_cut_off(self):
        server = self.server()
        meter = PingMeter(server)
        s = raw_connect(server, rcvbuf=4096)
        # Both connections counted first: "fewer than 2" below means "cut off".
        self.assertTrue(wd.wait_until(lambda: server.stats()["connections"] >= 2, 30))
        s.setblocking(False)
        chunk = b"".join(line({"jsonrpc": "2.0", "id": i, "method": "ping"}) for i in range(2000))
        sent, cut = 0, False
        deadline = time.monotonic() + 120
        with wd.PeakRSS() as mem:
            while time.monotonic() < deadline:
                try:
                    n = s.send(chunk)
                    sent += n
                except BlockingIOError:
                    if server.stats()["connections"] < 2:
                        cut = True
                        break
                    time.sleep(0.005)
                except OSError:
                    cut = True
                    break
        s.close()
        meter.stop()
        self.assertTrue(server._thread.is_alive(), self.m("broker thread died"))
        self.assertTrue(cut, self.m("a requester that never reads was not cut off after "
                                    "%d MiB of requests" % (sent >> 20)))
        # Replies are ~36 bytes per ~40-byte ping: cut off only past the limit.
        self.assertGreater(sent, nx.BROKER_MAX_OUTBUF_BYTES, self.m("cut off early"))
        self.assertLess(mem.growth, 64, self.m("memory grew %.1f MiB" % mem.growth))
        self.assertFalse(meter.errors, self.m(str(meter.errors)))
        self.assertLess(max(meter.latencies), 1.0, self.m("pings stalled"))
        self.assert_drained(server, "never-reading requester")


# ============================================================================
# Random disconnects on both sides
# ============================================================================

class Responder(threading.Thread):
    """A raw-socket responder in queue group "g" that misbehaves at random."""

    def __init__(self, case, server, rng, stats):
        super().__init__(daemon=True)
        self.case, self.server, self.rng, self.stats = case, server, rng, stats
        self.stop = threading.Event()
        self.sock = None

    def connect(self):
        self.sock = raw_connect(self.server)
        self.lines = Lines(self.sock)
        self.sock.sendall(line({"jsonrpc": "2.0", "id": "sub", "method": "subscribe",
                                "params": {"topic": "load.rr", "sid": 1, "queue": "g"}}))

    def run(self):
        try:
            self._serve()
        except OSError as exc:                  # the broker is gone: say so and stop
            self.stats["responder_failed"] = repr(exc)
        finally:
            if self.sock is not None:
                self.sock.close()

    def _serve(self):
        self.connect()
        while not self.stop.is_set():
            try:
                msg = self.lines.next(0.2)
            except TimeoutError:
                continue
            except OSError:
                msg = None
            if msg is None:
                self.stats["responder_lost"] += 1
                self.sock.close()
                self.connect()
                continue
            if msg.get("method") != "message":
                continue
            inbox = msg["params"]["inbox"]
            payload = msg["params"]["payload"]
            pick = self.rng.random()
            try:
                if pick < 0.005:                    # vanish mid-request
                    self.stats["responder_dropped"] += 1
                    self.sock.close()
                    self.connect()
                    continue
                reply = line({"jsonrpc": "2.0", "method": "reply",
                              "params": {"inbox": inbox, "payload": payload}})
                if pick < 0.015:                    # answer twice
                    reply += reply
                elif pick < 0.025:                  # answer with an error
                    reply = line({"jsonrpc": "2.0", "method": "reply",
                                  "params": {"inbox": inbox, "error": {"message": "nope"}}})
                self.sock.sendall(reply)
            except OSError:
                self.sock.close()
                self.connect()


class TestRandomDisconnects(LoadCase):

    def test_requests_with_random_disconnects_on_both_sides(self):
        server = self.server()
        stats = {k: 0 for k in ("ok", "error", "requester_dropped", "abandoned",
                                "responder_dropped", "responder_lost", "greedy")}
        lock = threading.Lock()
        responders = [Responder(self, server, random.Random(self.seed + k), stats)
                      for k in range(4)]
        for r in responders:
            r.start()
        self.assertTrue(wd.wait_until(lambda: server.has_subscriber("load.rr"), 5))
        failures = []
        counter = iter(range(REQUESTS))
        n_workers = 8

        def take(n):
            with lock:
                return [i for _, i in zip(range(n), counter)]

        def requester(k):
            rng = random.Random(self.seed * 31 + k)
            try:
                sock = raw_connect(server)
            except OSError as exc:
                failures.append("requester %d: cannot connect: %r" % (k, exc))
                return
            lines = Lines(sock)
            try:
                while not failures:
                    batch = take(rng.randint(1, 40))
                    if not batch:
                        return
                    data = b"".join(line({"jsonrpc": "2.0", "id": i, "method": "request",
                                          "params": {"topic": "load.rr", "payload": {"n": i},
                                                     "timeout_ms": 20000}})
                                    for i in batch)
                    if rng.random() < 0.01:         # greedy: unread replies, then leave
                        greedy = raw_connect(server, rcvbuf=4096)
                        greedy.setblocking(False)
                        data += PINGS
                        sent, deadline = 0, time.monotonic() + 2
                        while sent < len(data) and time.monotonic() < deadline:
                            try:
                                sent += greedy.send(data[sent:sent + 65536])
                            except BlockingIOError:
                                time.sleep(0.001)
                            except OSError:
                                break
                        greedy.close()
                        with lock:
                            stats["greedy"] += 1
                            stats["abandoned"] += len(batch)
                        continue
                    sock.sendall(data)
                    pending = set(batch)
                    leave_after = len(batch) + 1
                    if rng.random() < 0.05:         # drop the connection mid-batch
                        leave_after = rng.randint(0, len(batch))
                    answered = 0
                    while pending and answered < leave_after:
                        msg = lines.next(30)
                        if msg is None:
                            failures.append("requester %d: broker closed the connection" % k)
                            return
                        rid = msg.get("id")
                        if rid not in pending:
                            failures.append("requester %d: unexpected or duplicate reply %r"
                                            % (k, msg))
                            return
                        pending.discard(rid)
                        answered += 1
                        if "result" in msg:
                            if msg["result"] != {"n": rid}:
                                failures.append("requester %d: wrong result %r" % (k, msg))
                                return
                            with lock:
                                stats["ok"] += 1
                        else:
                            code = msg.get("error", {}).get("code")
                            if code not in ANSWER_CODES:
                                failures.append("requester %d: unexpected error %r" % (k, msg))
                                return
                            with lock:
                                stats["error"] += 1
                                stats[code] = stats.get(code, 0) + 1
                    if pending:
                        with lock:
                            stats["requester_dropped"] += 1
                            stats["abandoned"] += len(pending)
                        sock.close()
                        sock = raw_connect(server)
                        lines = Lines(sock)
            except (OSError, TimeoutError) as exc:
                failures.append("requester %d: %r (broker alive: %s)"
                                % (k, exc, server._thread.is_alive()))
            finally:
                sock.close()

        started = time.monotonic()
        with wd.PeakRSS() as mem:
            workers = [threading.Thread(target=requester, args=(k,)) for k in range(n_workers)]
            for t in workers:
                t.start()
            for t in workers:
                t.join(wd.scale(300, 3600))
            hung = [t for t in workers if t.is_alive()]
        for r in responders:
            r.stop.set()
        for r in responders:
            r.join(10)
        took = time.monotonic() - started
        self.assertFalse(hung, self.m("requesters still running"))
        self.assertTrue(server._thread.is_alive(), self.m(
            "the broker thread died under random disconnects; stats=%s" % stats))
        self.assertFalse(failures, self.m("; ".join(failures[:5]) + " stats=%s" % stats))
        answered = stats["ok"] + stats["error"]
        self.assertEqual(answered + stats["abandoned"], REQUESTS, self.m(str(stats)))
        self.assertGreater(stats["ok"], REQUESTS // 4, self.m(str(stats)))
        self.assertLess(mem.growth, 96, self.m("memory grew %.1f MiB" % mem.growth))
        fresh = nx.BrokerClient.connect(server.url)
        fresh.subscribe("load.after", lambda p: p)
        self.assertEqual(fresh.request("load.after", [1], 5), [1])
        fresh.close()
        self.assert_drained(server, "random disconnects")
        print("\n[load] random disconnects: %d requests in %.1fs: %s"
              % (REQUESTS, took, stats), file=sys.stderr)


# ============================================================================
# Shutdown under load
# ============================================================================

class TestShutdownUnderLoad(LoadCase):

    def setUp(self):
        super().setUp()
        self.token = "shut-%d-%d" % (os.getpid(), time.monotonic_ns())
        self.addCleanup(wd.kill_tagged, self.token)

    def test_sigterm_with_100_ticks_in_flight(self):
        marks = self.tmp.join("marks.log")
        cursors = self.tmp.join("cursors.log")
        env = {wd.TOKEN_VAR: self.token, "WORST_MARKS": marks, "WORST_CURSOR_LOG": cursors}
        wd.write_manifest(self.tmp.join("p", "slow"), "slow", ["slow"], lifecycle="long_lived",
                          args=[wd.WORST, "--startup=ignore_term"], env=env,
                          max_concurrent=64, timeout_secs=120)
        wd.write_manifest(self.tmp.join("p", "sleepy"), "sleepy", ["sleepy"],
                          lifecycle="ephemeral", env=env, max_concurrent=64, timeout_secs=120)
        wd.write_manifest(self.tmp.join("p", "fast"), "fast", ["fast"], lifecycle="long_lived",
                          env=env, max_concurrent=4)
        nap = 10.0        # no slow tick can finish before the SIGTERM
        jobs = [wd.every_job("slow%02d" % i, "slow", 1, {"fault": "sleep", "sleep": nap})
                for i in range(64)]
        jobs += [wd.every_job("sleepy%02d" % i, "sleepy", 1, {"fault": "sleep", "sleep": nap})
                 for i in range(36)]
        jobs += [wd.every_job("fast%d" % i, "fast", 0.2) for i in range(2)]
        config = wd.write_config(self.tmp.join("pollers.json"), {
            "state_db": "state/poller.db", "default_jitter_ms": 0, "max_workers": 128,
            "plugins": ["p/slow", "p/sleepy", "p/fast"], "jobs": jobs})
        grace = 10.0              # the documented default of shutdown_grace_secs
        d = wd.Daemon(config, cwd=self.tmp.path, env=wd.daemon_env(self.token))
        try:
            d.wait_started(30)

            def starts():
                try:
                    with open(marks) as f:
                        return [ln.split() for ln in f if ln.split()[1:2] == ["start"]
                                and not ln.startswith("fast")]
                except FileNotFoundError:
                    return []
            in_flight = wd.wait_until(lambda: len(starts()) >= 100, 60)
            self.assertTrue(in_flight, self.m("only %d ticks started:\n%s"
                                              % (len(starts()), d.tail())))
            fast_ok = wd.wait_until(lambda: len(d.ticks(outcome="ok")) >= 2, 20)
            self.assertTrue(fast_ok, d.tail())
            signalled = time.time()
            first_start = min(float(s[3]) for s in starts())
            self.assertLess(signalled, first_start + nap, self.m(
                "a slow tick could have finished before SIGTERM; the test proves nothing"))
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            rc = d.wait(grace + 30)
            took = time.monotonic() - t0
            self.assertEqual(rc, 0, self.m("exit status %s:\n%s" % (rc, d.tail())))
            self.assertLess(took, grace + 7.0, self.m(
                "SIGTERM with 100 ticks in flight took %.1fs to exit (grace %.0fs)\n%s"
                % (took, grace, d.tail())))
        finally:
            d.cleanup()
        left = wd.wait_until(lambda: not wd.tagged(self.token), 5)
        self.assertTrue(left, self.m("still running after the daemon exited: %s"
                                     % wd.tagged(self.token)))
        db = sqlite3.connect(self.tmp.join("state", "poller.db"))
        try:
            rows = dict(db.execute("SELECT id, cursor FROM jobs").fetchall())
        finally:
            db.close()
        stored_slow = {j: c for j, c in rows.items() if not j.startswith("fast") and c}
        self.assertEqual(stored_slow, {}, self.m("cursors of cancelled ticks were stored"))
        self.assertTrue(all(rows["fast%d" % i] for i in range(2)), self.m(
            "completed ticks were not stored: %s" % rows))
        print("\n[load] shutdown: 100 ticks in flight, exited in %.1fs" % took, file=sys.stderr)

    def test_sigterm_with_several_plugins_ignoring_it(self):
        # Each long-lived plugin gets SIGTERM and a grace before SIGKILL; with
        # three that ignore it the daemon must still exit within the bound.
        env = {wd.TOKEN_VAR: self.token}
        plugins = []
        for i in range(3):
            wd.write_manifest(self.tmp.join("p", str(i)), "stub%d" % i, ["stub%d" % i],
                              lifecycle="long_lived", args=[wd.WORST, "--startup=ignore_term"],
                              env=env)
            plugins.append("p/%d" % i)
        config = wd.write_config(self.tmp.join("pollers.json"), {
            "state_db": "state/poller.db", "default_jitter_ms": 0, "shutdown_grace_secs": 2,
            "plugins": plugins,
            "jobs": [wd.every_job("j%d" % i, "stub%d" % i, 0.5) for i in range(3)]})
        d = wd.Daemon(config, cwd=self.tmp.path, env=wd.daemon_env(self.token))
        try:
            d.wait_started(30)
            self.assertTrue(wd.wait_until(
                lambda: {"j0", "j1", "j2"} <= {r["job"] for r in d.ticks(outcome="ok")}, 30),
                d.tail())
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            rc = d.wait(60)
            took = time.monotonic() - t0
        finally:
            d.cleanup()
        self.assertEqual(rc, 0)
        # README: "within shutdown_grace_secs + about 6 s".
        self.assertLess(took, 2.0 + 7.0, self.m(
            "three SIGTERM-ignoring plugins: exit took %.1fs with shutdown_grace_secs=2"
            % took))
        self.assertTrue(wd.wait_until(lambda: not wd.tagged(self.token), 5))


if __name__ == "__main__":
    unittest.main()
