"""Worst-day fuzzing: bad input never crashes anything.

Seeded mutation fuzzing (truncation, byte flips, type swaps, huge and negative
numbers, deep nesting, invalid UTF-8, lone surrogates, duplicate keys) of:

* broker lines on a raw socket: every case gets well-formed JSON-RPC replies
  (an error for what does not parse) or a close, and the broker thread lives;
* plugin replies, ephemeral (a shell fixture prints the fuzzed bytes) and
  long-lived (a subscriber answers the fuzzed payload): a TickAck or the
  documented PollerError, matching a reference reading of the wire rules;
* manifests (``load_manifest``: a valid handle or ManifestError),
  ``pollers.json`` (``load_config``: a config or ConfigError), cron
  expressions (``CronExpr``: ValueError only; ``next_after`` a matching
  datetime or None) and cursors (``decode_cursor``: bytes or ParseReply).

CI runs a few hundred cases per target; NEXO_TEST_FULL=1 at least 10,000.
Failures print the seed, the case number and the case; NEXO_TEST_SEED=N
replays a run.
"""

import base64
import json
import os
import random
import re
import socket
import sys
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures"))

import worstday as wd  # noqa: E402
import nexo_poller as nx  # noqa: E402
from nexo_poller import Lifecycle, PollerError, PluginPollerForwardError  # noqa: E402


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def _finite(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("%s is out of range" % text)
    return value


def strict_loads(data):
    """JSON as the protocol defines it: NaN and Infinity (1e999 too) are not JSON."""
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8")       # strict: the protocol is UTF-8, no surrogates
    return json.loads(data, parse_constant=_no_constant, parse_float=_finite)

CASES = wd.scale(300, 10_000)
NOW = datetime(2026, 5, 17, 10, 0, 0, tzinfo=timezone.utc)
FIGURES = {}          # target -> cases run (printed at the end of the module)


# ============================================================================
# The mutation engine
# ============================================================================

class Raw:
    """Text put verbatim into a serialized document (deep nesting, odd tokens)."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return "Raw(%r)" % (self.text[:40],)


class Pairs:
    """A JSON object that may repeat keys."""

    def __init__(self, pairs):
        self.pairs = list(pairs)


STRINGS = ["", " ", "a", "é", "\u0000", "\n", "\t", "\ud800", "\udfff", "\U0001F600",
           "\u202e", "\ufeff", "\\", '"', "=", "!!not_b64!!", "aGVsbG8", "aGVsbG8=", "MQ",
           "-32001", "null", "true", "9" * 30, "x" * 5000, "\xff", "0", "NaN"]
NUMBERS = [0, 1, -1, 2, 59, 60, 61, 64, 65, 3600, 3601, 2 ** 31, -2 ** 31, 2 ** 63 - 1,
           2 ** 63, -2 ** 63, 2 ** 64, 10 ** 30, -10 ** 30, -32001, -32002, -32602,
           -32603, -32700, 1.5, -0.0, 1e308, -1e308, 5e-324, float("inf"),
           float("-inf"), float("nan")]


class Mutator:
    """Structural and byte-level mutations of JSON-ish documents."""

    def __init__(self, rng, *, surrogates=True, max_depth_raw=True):
        self.rng = rng
        self.surrogates = surrogates
        self.max_depth_raw = max_depth_raw

    # -- values ---------------------------------------------------------------

    def string(self):
        r = self.rng
        pick = r.random()
        if pick < 0.5:
            s = r.choice(STRINGS)
        elif pick < 0.8:
            s = "".join(chr(r.choice([r.randint(32, 126), r.randint(0, 0x2FF),
                                      r.randint(0, 0x10FFFF)])) for _ in range(r.randint(0, 12)))
        else:
            s = base64.urlsafe_b64encode(os.urandom(r.randint(0, 20))).decode().rstrip(
                "=" * r.randint(0, 1))
        if not self.surrogates:
            s = s.encode("utf-8", "replace").decode("utf-8", "replace")
            s = "".join(c for c in s if not 0xD800 <= ord(c) <= 0xDFFF)
        return s

    def number(self):
        r = self.rng
        pick = r.random()
        if pick < 0.6:
            return r.choice(NUMBERS)
        if pick < 0.8:
            return r.randint(-10 ** r.randint(1, 25), 10 ** r.randint(1, 25))
        if pick < 0.95:
            return r.uniform(-1e6, 1e6)
        return Raw(("-" if r.random() < 0.5 else "") + "9" * r.choice([400, 4301, 5000]))

    def deep(self):
        r = self.rng
        depth = r.choice([20, 200, 900, 1000, 3000, 100_000])
        if not self.max_depth_raw:
            depth = min(depth, 200)
            value = []
            for _ in range(depth):
                value = [value] if r.random() < 0.5 else {"a": value}
            return value
        opener, closer = r.choice([("[", "]"), ('{"a":', "}")])
        return Raw(opener * depth + "1" + closer * depth)

    def value(self, depth=0):
        r = self.rng
        pick = r.random()
        if depth > 3 or pick < 0.15:
            return r.choice([None, True, False])
        if pick < 0.4:
            return self.number()
        if pick < 0.7:
            return self.string()
        if pick < 0.8:
            return [self.value(depth + 1) for _ in range(r.randint(0, 3))]
        if pick < 0.9:
            return {self.string(): self.value(depth + 1) for _ in range(r.randint(0, 3))}
        return self.deep()

    # -- trees ------------------------------------------------------------------

    def _paths(self, node, path=()):
        yield path
        if isinstance(node, dict):
            for k, v in node.items():
                yield from self._paths(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from self._paths(v, path + (i,))

    def mutate_tree(self, doc):
        """A mutated deep copy of ``doc`` (1-3 edits)."""
        doc = json.loads(json.dumps(doc))
        for _ in range(self.rng.randint(1, 3)):
            doc = self._edit(doc)
        return doc

    def _edit(self, doc):
        r = self.rng
        paths = list(self._paths(doc))
        path = r.choice(paths)
        parent, key = None, None
        node = doc
        for step in path:
            parent, key, node = node, step, node[step]
        op = r.random()
        if op < 0.45:                                   # type swap / new value
            new = self.value()
        elif op < 0.55 and isinstance(node, (int, float)) and not isinstance(node, bool):
            new = r.choice([-node, node * 10 ** r.randint(1, 30), node + 1, node - 1,
                            float(node), Raw(repr(node) + "e400")])
        elif op < 0.65:                                 # deep nesting
            new = self.deep()
        elif op < 0.75 and isinstance(node, dict) and node:     # drop / duplicate a key
            k = r.choice(list(node))
            if r.random() < 0.5:
                del node[k]
                return doc
            pairs = list(node.items()) + [(k, self.value())]
            r.shuffle(pairs)
            new = Pairs(pairs)
        elif op < 0.85 and isinstance(node, dict):      # unknown key
            node[self.string()] = self.value()
            return doc
        elif op < 0.92:                                 # wrap
            new = r.choice([[node], {"x": node}, {"result": node}])
        else:
            new = None
        if parent is None:
            return new
        parent[key] = new
        return doc

    # -- text -------------------------------------------------------------------

    def dump(self, obj, ascii_only=None):
        if ascii_only is None:
            ascii_only = self.rng.random() < 0.5
        return self._dump(obj, ascii_only)

    def _dump(self, o, a):
        if isinstance(o, Raw):
            return o.text
        if isinstance(o, Pairs):
            return "{" + ",".join(json.dumps(str(k), ensure_ascii=a) + ":" + self._dump(v, a)
                                  for k, v in o.pairs) + "}"
        if isinstance(o, dict):
            return "{" + ",".join(json.dumps(str(k), ensure_ascii=a) + ":" + self._dump(v, a)
                                  for k, v in o.items()) + "}"
        if isinstance(o, list):
            return "[" + ",".join(self._dump(v, a) for v in o) + "]"
        return json.dumps(o, ensure_ascii=a)

    @staticmethod
    def encode(text):
        return text.encode("utf-8", "surrogatepass")

    BYTES = [b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\x00", b"\r",
             b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"\\u", b"\\ud800", b"NaN",
             b"-", b"1e999", b" ", b"\t", b"\xef\xbb\xbf"]

    def mutate_bytes(self, data, newlines=False):
        r = self.rng
        data = bytearray(data)
        for _ in range(r.randint(1, 4)):
            op = r.random()
            pos = r.randint(0, len(data))
            if op < 0.2:
                del data[pos:]
            elif op < 0.45 and data:
                i = r.randrange(len(data))
                data[i] ^= 1 << r.randrange(8)
            elif op < 0.7:
                data[pos:pos] = r.choice(self.BYTES)
            elif op < 0.8:
                del data[pos:pos + r.randint(1, 8)]
            elif op < 0.9 and data:
                a = r.randrange(len(data))
                b = min(len(data), a + r.randint(1, 16))
                data[pos:pos] = data[a:b]
            else:
                data[pos:pos] = bytes(r.randrange(256) for _ in range(r.randint(1, 4)))
        if not newlines:
            data = data.replace(b"\n", b" ")
        return bytes(data)

    def case(self, seed_doc, newlines=False):
        """One fuzz case from a valid document: structural, textual or both."""
        r = self.rng
        pick = r.random()
        if pick < 0.05:
            return self.encode(self.dump(seed_doc))                 # the valid seed itself
        doc = self.mutate_tree(seed_doc) if pick < 0.75 or pick >= 0.9 else seed_doc
        data = self.encode(self.dump(doc))
        if pick >= 0.75:
            data = self.mutate_bytes(data, newlines)
        return data


def short(data, n=300):
    text = repr(data)
    return text if len(text) <= n else text[:n] + "...(%d bytes)" % len(data)


class FuzzCase(unittest.TestCase):
    target = "?"

    def setUp(self):
        self.seed = wd.seed_for(self.id())
        self.rng = random.Random(self.seed)
        self.outcomes = {}
        self.tmp = wd.TempDir("worstfuzz-")
        self.addCleanup(self.tmp.cleanup)

    def m(self, i, case, text):
        return "%s: case %d/%d: %s\n  case: %s\n  [seed=%d; replay with NEXO_TEST_SEED=%d]" % (
            self.target, i, CASES, text, short(case), self.seed, self.seed)

    def count(self, result):
        name = type(result).__qualname__.replace("PollerError.", "")
        self.outcomes[name] = self.outcomes.get(name, 0) + 1

    def run_cases(self, one, budget):
        """Run ``one(i)`` for every case on a worker thread; fail on a hang.

        ``one`` returns nothing and raises AssertionError on a bad outcome.
        """
        state = {"i": -1}

        def loop():
            for i in range(CASES):
                state["i"] = i
                one(i)
        self.run_all(loop, budget, state)

    def run_all(self, fn, budget, state=None):
        """Run ``fn()`` on a worker thread with a deadline; re-raise what it raised."""
        state = {"i": "?"} if state is None else state
        state["error"] = None

        def guarded():
            try:
                fn()
            except BaseException as exc:          # reported by the test thread
                state["error"] = exc
        t = threading.Thread(target=guarded, daemon=True, name="fuzz-" + self.target)
        started = time.monotonic()
        t.start()
        t.join(budget)
        if t.is_alive():
            self.fail("%s: hang: case %s still running after %.0fs [seed=%d]"
                      % (self.target, state["i"], budget, self.seed))
        if state["error"] is not None:
            raise state["error"]
        FIGURES[self.target] = (CASES, time.monotonic() - started, getattr(self, "outcomes", {}))


# ============================================================================
# Reference reading of a plugin reply (ANCHOR.md "Wire shapes")
# ============================================================================

B64_ALPHABET = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def ref_decode_cursor(text):
    """bytes, or None when the cursor is invalid (the module raises ParseReply)."""
    if not isinstance(text, str):
        return None
    body = text.rstrip("=")
    if len(body) % 4 == 1 or not set(body) <= B64_ALPHABET:
        return None
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def ref_outcome(envelope):
    """("ack", cursor) or ("error", PollerError subclass) for a reply envelope."""
    T = PollerError.Transient
    if not isinstance(envelope, dict):
        return "error", T
    error = envelope.get("error")
    if error is not None:
        code = nx.ERROR_INTERNAL
        if isinstance(error, dict) and is_int(error.get("code")):
            code = error["code"]
        return "error", {nx.ERROR_CONFIG: PollerError.Config,
                         nx.ERROR_PERMANENT: PollerError.Permanent}.get(code, T)
    if "result" not in envelope:
        return "error", T
    result = envelope["result"]
    result = {} if result is None else result
    if not isinstance(result, dict):
        return "error", T
    cursor = result.get("next_cursor")
    if cursor is not None:
        cursor = ref_decode_cursor(cursor)
        if cursor is None:
            return "error", T
    interval = result.get("next_interval_secs")
    if interval is not None and not (is_int(interval) and 0 <= interval < 2 ** 63):
        return "error", T
    metrics = result.get("metrics")
    if metrics is None and ("items_seen" in result or "items_dispatched" in result):
        metrics = result
    if metrics is not None:
        if not isinstance(metrics, dict):
            return "error", T
        for name in ("items_seen", "items_dispatched"):
            v = metrics.get(name, 0)
            v = 0 if v is None else v
            if not (is_int(v) and 0 <= v < 2 ** 63):
                return "error", T
    deliver = result.get("deliver")
    if deliver is not None:
        if not isinstance(deliver, list):
            return "error", T
        for entry in deliver:
            if not isinstance(entry, dict):
                return "error", T
            channel, recipient = entry.get("channel"), entry.get("recipient")
            if not (isinstance(recipient, str) and recipient and isinstance(channel, str)
                    and re.fullmatch(r"[A-Za-z0-9_\-]{1,128}", channel)):
                return "error", T
    return "ack", cursor


REPLY_SEEDS = [
    {"jsonrpc": "2.0", "id": 1, "result": {"next_cursor": "MQ", "next_interval_secs": 60,
                                           "metrics": {"items_seen": 1, "items_dispatched": 0}}},
    {"jsonrpc": "2.0", "id": 1, "result": {"items_seen": 1, "items_dispatched": 1,
                                           "deliver": [], "next_cursor": "Mg",
                                           "next_interval_secs": 60}},
    {"result": {"next_cursor": "aGVsbG8="}},
    {"result": None},
    {"jsonrpc": "2.0", "id": 1, "error": {"code": -32001, "message": "try later"}},
    {"jsonrpc": "2.0", "id": 1, "error": {"code": -32002, "message": "gone"}},
    {"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "bad config"}},
    {"error": {"message": "no code"}},
]


def check_reply_outcome(case, data, result, line):
    """Assert ``result`` (TickAck or exception) is right for reply bytes ``line``."""
    if not isinstance(result, (nx.TickAck, PollerError)):
        case.fail("not a TickAck or PollerError: %s: %r" % (type(result).__name__, result))
    try:
        envelope = strict_loads(line)     # serde_json, like the original, refuses NaN
    except (ValueError, RecursionError):
        case.assertIsInstance(result, PollerError.Transient, "unparsable reply line")
        return
    kind, want = ref_outcome(envelope)
    if kind == "ack":
        case.assertIsInstance(result, nx.TickAck, "expected an ack (cursor %r)" % (want,))
        case.assertEqual(result.next_cursor, want)
    else:
        case.assertIsInstance(result, PollerError, "expected %s" % want.__qualname__)
        case.assertIs(type(result), want, "expected %s, got %s: %s"
                      % (want.__qualname__, type(result).__qualname__, result))


# ============================================================================
# Targets
# ============================================================================

BROKER_SEEDS = [
    {"jsonrpc": "2.0", "id": 1, "method": "ping"},
    {"jsonrpc": "2.0", "id": 2, "method": "subscribe",
     "params": {"topic": "fuzz.t", "sid": 7, "queue": "g"}},
    {"jsonrpc": "2.0", "id": 3, "method": "unsubscribe", "params": {"sid": 7}},
    {"jsonrpc": "2.0", "method": "publish", "params": {"topic": "fuzz.t", "payload": {"a": [1]}}},
    {"jsonrpc": "2.0", "id": 4, "method": "publish", "params": {"topic": "fuzz.t", "payload": 1}},
    {"jsonrpc": "2.0", "id": 5, "method": "request",
     "params": {"topic": "fuzz.none", "payload": {"q": 1}, "timeout_ms": 50, "wait": False}},
    {"jsonrpc": "2.0", "id": 6, "method": "request",
     "params": {"topic": "fuzz.echo", "payload": {"q": 1}, "timeout_ms": 2000}},
    {"jsonrpc": "2.0", "method": "reply",
     "params": {"inbox": 1, "payload": {"r": 1}, "error": None}},
    {"jsonrpc": "2.0", "id": 8, "method": "reply",
     "params": {"inbox": 99, "error": {"message": "no"}}},
]


class LineReader:
    """Line reads with a deadline from a blocking socket."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def line(self, deadline):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply line")
            self.sock.settimeout(left)
            data = self.sock.recv(262144)
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def check_broker_line(case, line):
    """A line the broker sent must be a JSON-RPC response or a message notification."""
    try:
        msg = json.loads(line)
    except ValueError:
        case.fail("broker sent a line that is not JSON: %s" % short(line))
    case.assertIsInstance(msg, dict, short(line))
    case.assertEqual(msg.get("jsonrpc"), "2.0", short(line))
    if msg.get("method") == "message":
        case.assertIsInstance(msg.get("params"), dict, short(line))
        return msg
    case.assertIn("id", msg, short(line))
    case.assertEqual(("result" in msg) + ("error" in msg), 1, short(line))
    if "error" in msg:
        err = msg["error"]
        case.assertIsInstance(err, dict, short(line))
        case.assertTrue(is_int(err.get("code")), short(line))
        case.assertIsInstance(err.get("message"), str, short(line))
    return msg


class TestFuzzBrokerLines(FuzzCase):
    target = "broker lines"

    def test_mutated_lines(self):
        server = nx.BrokerServer().start()
        self.addCleanup(server.close)
        echo = nx.BrokerClient.connect(server.url)
        self.addCleanup(echo.close)
        echo.subscribe("fuzz.echo", lambda payload: payload)
        mut = Mutator(self.rng)
        state = {"conn": None, "closes": 0, "errors": 0}

        def connect():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(server.path)
            state["conn"], state["reader"] = s, LineReader(s)

        connect()

        def one(i):
            case = mut.case(self.rng.choice(BROKER_SEEDS))
            sentinel = "sentinel-%d" % i
            closes_before = state["closes"]
            try:
                state["conn"].sendall(case + b"\n" + json.dumps(
                    {"jsonrpc": "2.0", "id": sentinel, "method": "ping"}).encode() + b"\n")
            except OSError:
                pass
            lines = []
            deadline = time.monotonic() + 10
            while True:
                try:
                    line = state["reader"].line(deadline)
                except TimeoutError:
                    self.fail(self.m(i, case, "no answer to the sentinel ping within 10 s "
                                     "(broker thread alive: %s)" % server._thread.is_alive()))
                except OSError:
                    line = None
                if line is None:                  # the broker closed this connection
                    state["closes"] += 1
                    state["conn"].close()
                    try:
                        connect()
                    except OSError as exc:
                        self.fail(self.m(i, case, "broker stopped accepting: %r (broker thread "
                                         "alive: %s)" % (exc, server._thread.is_alive())))
                    break
                msg = check_broker_line(self, line)
                if msg.get("id") == sentinel:
                    break
                lines.append(msg)
            try:                 # the protocol: one UTF-8 JSON object per line
                parsed = strict_loads(case.decode("utf-8"))
            except (ValueError, RecursionError):
                parsed = ValueError
            if len(case) > nx.BROKER_MAX_LINE_BYTES:
                codes = [m["error"]["code"] for m in lines if "error" in m]
                self.assertIn(nx.BROKER_INVALID_REQUEST, codes,
                              self.m(i, case, "over-long line not refused"))
                # Closed, unless the line's head named its request (an id, or
                # a reply's inbox): then only that request failed.
                named = re.search(rb'"(id|inbox)"\s*:\s*(-?[0-9]|")', case[:4096])
                self.assertTrue(state["closes"] > closes_before or named,
                                self.m(i, case, "over-long line: connection not closed"))
            elif not case.strip():
                pass                              # a blank line is skipped, not an error
            elif parsed is ValueError:
                codes = [m["error"]["code"] for m in lines if "error" in m and m["id"] is None]
                self.assertIn(nx.BROKER_PARSE_ERROR, codes, self.m(i, case, "no parse error"))
            elif not isinstance(parsed, dict):
                codes = [m["error"]["code"] for m in lines if "error" in m and m["id"] is None]
                self.assertIn(nx.BROKER_INVALID_REQUEST, codes,
                              self.m(i, case, "no invalid-request error"))
            elif ("id" in parsed and not isinstance(parsed["id"], (dict, list))
                  and parsed["id"] == parsed["id"]                    # NaN never matches
                  and isinstance(parsed.get("method"), str) and parsed["method"] != "request"):
                # A request (it has an id) gets its response at once.
                self.assertTrue(any(m.get("id") == parsed["id"] and "method" not in m
                                    for m in lines),
                                self.m(i, case, "no response with id %r" % (parsed["id"],)))
            state["errors"] += sum("error" in m for m in lines)
            self.assertTrue(server._thread.is_alive(), self.m(i, case, "broker thread died"))

        self.run_cases(one, budget=wd.scale(120, 1800))
        # A fresh client still works, then everything drains to zero.
        fresh = nx.BrokerClient.connect(server.url)
        self.assertEqual(fresh.request("fuzz.echo", {"ok": 1}, 5), {"ok": 1})
        fresh.close()
        state["conn"].close()
        echo.close()
        drained = wd.wait_until(lambda: server.stats()["connections"] == 0, 10)
        self.assertTrue(drained, "connections left: %s" % server.stats())
        stats = server.stats()
        for key in ("connections", "pending", "parked", "subscriptions", "topics"):
            self.assertEqual(stats[key], 0, "%s [seed=%d]" % (stats, self.seed))

    def test_lone_surrogate_escapes_do_not_kill_the_broker(self):
        # Found by the fuzzer; kept as a direct case.  Valid JSON with a "\ud800"
        # escape parses into a str the broker cannot encode back to UTF-8.
        for line in (b'{"jsonrpc":"2.0","id":"\\udc00","method":"ping"}',
                     b'{"jsonrpc":"2.0","id":2,"method":"publish",'
                     b'"params":{"topic":"t","payload":"\\ud800"}}'):
            with self.subTest(line=line):
                server = nx.BrokerServer().start()
                self.addCleanup(server.close)
                sub = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sub.connect(server.path)
                self.addCleanup(sub.close)
                sub.sendall(b'{"jsonrpc":"2.0","id":1,"method":"subscribe",'
                            b'"params":{"topic":"t","sid":1}}\n')
                LineReader(sub).line(time.monotonic() + 5)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(server.path)
                s.sendall(line + b"\n")
                s.settimeout(3)
                try:
                    s.recv(4096)
                except OSError:
                    pass
                s.close()
                time.sleep(0.2)
                self.assertTrue(server._thread.is_alive(), "broker thread died on %r" % line)

    def test_over_long_lines_get_an_error_then_a_close(self):
        server = nx.BrokerServer().start()
        self.addCleanup(server.close)
        for data in (b"[" * (nx.BROKER_MAX_LINE_BYTES + 10),
                     b'{"jsonrpc":"2.0","pad":"'
                     + b"p" * (nx.BROKER_MAX_LINE_BYTES + 10) + b'"}\n'):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(server.path)
            try:
                s.sendall(data)
            except OSError:
                pass
            reader = LineReader(s)
            line = reader.line(time.monotonic() + 10)
            if line is not None:
                msg = check_broker_line(self, line)
                self.assertEqual(msg["error"]["code"], nx.BROKER_INVALID_REQUEST)
                self.assertIsNone(reader.line(time.monotonic() + 10), "not closed")
            s.close()
            self.assertTrue(server._thread.is_alive())
        self.assertTrue(wd.wait_until(lambda: server.stats()["connections"] == 0, 5))


class TestFuzzEphemeralReplies(FuzzCase):
    target = "ephemeral replies"

    def test_mutated_reply_lines(self):
        mut = Mutator(self.rng)
        workers = 4
        per = [self.tmp.join("reply-%d" % w) for w in range(workers)]
        request = nx.build_tick_request("fz", "job", "agent", b"0", {}, NOW, 60)
        fds = wd.fd_count()
        cases = [None] * CASES
        for i in range(CASES):
            data = mut.case(self.rng.choice(REPLY_SEEDS))
            tail = self.rng.random()
            if tail < 0.85:
                data += b"\n"
            elif tail < 0.95:
                data += b"\n" + mut.case(self.rng.choice(REPLY_SEEDS)) + b"\n"
            cases[i] = data
        lock = threading.Lock()
        nxt = {"i": 0, "fail": None}

        def worker(w):
            while True:
                with lock:
                    i = nxt["i"]
                    nxt["i"] += 1
                if i >= CASES or nxt["fail"]:
                    return
                data = cases[i]
                with open(per[w], "wb") as f:
                    f.write(data)
                started = time.monotonic()
                try:
                    result = nx.spawn_ephemeral_tick(
                        "/bin/sh", "fuzz", request, 10, args=[wd.FUZZ_REPLY],
                        env={"NEXO_FUZZ_REPLY": per[w]})
                except BaseException as exc:       # PollerError expected; others are bugs
                    result = exc
                took = time.monotonic() - started
                try:
                    self.assertLess(took, 8, "took %.1fs" % took)
                    line = data.split(b"\n", 1)[0] if b"\n" in data else None
                    if line is None or len(line) > nx.DEFAULT_MAX_REPLY_BYTES:
                        self.assertIsInstance(result, PollerError.Transient)
                    else:
                        check_reply_outcome(self, data, result, line)
                    with lock:
                        self.count(result)
                except AssertionError as exc:
                    nxt["fail"] = AssertionError(self.m(i, data, str(exc)))
                    return

        def all_cases():
            threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if nxt["fail"]:
                raise nxt["fail"]

        self.run_all(all_cases, budget=wd.scale(120, 1800))
        self.assertTrue(wd.wait_until(lambda: wd.fd_count() <= fds, 5), "fds leaked")
        self.assertFalse(wd.my_zombies())


class TestFuzzLongLivedReplies(FuzzCase):
    target = "long-lived replies"

    def test_mutated_reply_payloads(self):
        server = nx.BrokerServer().start()
        self.addCleanup(server.close)
        current = {"payload": None, "raw": None}
        subs = {}

        # A BrokerClient subscriber answers whatever payload the case holds ...
        def obj_subscriber():
            client = nx.BrokerClient.connect(server.url)
            self.addCleanup(client.close)
            client.subscribe("fz.obj.tick", lambda _req: current["payload"], queue="fz")
            subs["obj"] = client

        # ... and a raw-socket one answers with the payload's exact JSON text, for
        # what a Python client cannot send (lone surrogates, NaN, huge numbers).
        def raw_subscriber():
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect(server.path)
            self.addCleanup(raw.close)
            raw.sendall(b'{"jsonrpc":"2.0","id":1,"method":"subscribe",'
                        b'"params":{"topic":"fz.raw.tick","sid":1,"queue":"fz"}}\n')
            closed = threading.Event()
            subs["raw"], subs["raw_closed"] = raw, closed

            def loop():
                reader = LineReader(raw)
                try:
                    while True:
                        line = reader.line(time.monotonic() + 3600)
                        if line is None:
                            return
                        msg = json.loads(line)
                        if msg.get("method") == "message":
                            inbox = msg["params"]["inbox"]
                            raw.sendall(b'{"jsonrpc":"2.0","method":"reply","params":'
                                        b'{"inbox":%d,"payload":%s}}\n' % (inbox, current["raw"]))
                except OSError:
                    return
                finally:
                    closed.set()
            threading.Thread(target=loop, daemon=True).start()

        def ensure_subscribers():
            # A reply line over BROKER_MAX_LINE_BYTES gets its sender disconnected
            # (documented); a real plugin would reconnect, and so do these.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if "obj" not in subs or subs["obj"].closed.is_set():
                    obj_subscriber()
                if "raw" not in subs or subs["raw_closed"].is_set():
                    raw_subscriber()
                if server.has_subscriber("fz.raw.tick") and server.has_subscriber("fz.obj.tick"):
                    return
                time.sleep(0.01)
            self.fail("subscribers gone: %s (broker thread alive: %s)"
                      % (server.stats(), server._thread.is_alive()))
        ensure_subscribers()

        local = server.client()
        self.addCleanup(local.close)

        def handle(prefix):
            return nx.PluginPollerHandle(
                plugin_id="fz", kinds=("fz",), broker_topic_prefix=prefix,
                lifecycle=Lifecycle.LONG_LIVED, max_concurrent_ticks=1,
                tick_timeout=timedelta(seconds=5))
        proxies = {"obj": nx.PluginPollerProxy("fz", handle("fz.obj"), local),
                   "raw": nx.PluginPollerProxy("fz", handle("fz.raw"), local)}
        mut = Mutator(self.rng)
        sent = {"obj": 0, "raw": 0}

        def one(i):
            data = mut.case(self.rng.choice(REPLY_SEEDS))
            try:
                payload = strict_loads(data)
            except (ValueError, RecursionError):
                # Not JSON: as a payload it can only travel as a string.
                payload = data.decode("utf-8", "replace")
                data = json.dumps(payload).encode()
            try:
                json.dumps(payload, ensure_ascii=False).encode()
                path = "obj"
            except (UnicodeEncodeError, ValueError, RecursionError):
                path = "raw"
            if path == "raw":
                try:        # ASCII-only JSON text: lone surrogates travel as escapes
                    data = json.dumps(payload).encode()
                except (ValueError, RecursionError):
                    return
            current["payload"], current["raw"] = payload, data
            sent[path] += 1
            ensure_subscribers()
            over_long = len(data) > nx.BROKER_MAX_LINE_BYTES - 100
            ctx = nx.PollContext("job", "agent", "fz", b"0", {}, NOW, timedelta(seconds=60))
            started = time.monotonic()
            try:
                result = proxies[path].tick(ctx)
            except BaseException as exc:
                result = exc
            took = time.monotonic() - started
            try:
                self.assertTrue(server._thread.is_alive(), "broker thread died")
                self.assertLess(took, 7.0, "took %.1fs" % took)
                if not isinstance(result, (nx.TickAck, PollerError)):
                    self.fail("%s: %r" % (type(result).__name__, result))
                kind, want = ref_outcome(payload)
                if over_long:       # the broker refuses the reply line: a failed tick
                    kind, want = "error", PollerError.Transient
                if kind == "ack":
                    self.assertIsInstance(result, nx.TickAck, "expected an ack: %r" % result)
                    self.assertEqual(result.next_cursor, want)
                else:
                    self.assertIs(type(result), want, "expected %s, got %r"
                                  % (want.__qualname__, result))
                self.count(result)
            except AssertionError as exc:
                raise AssertionError(self.m(i, data, "%s (via %s subscriber)" % (exc, path)))

        self.run_cases(one, budget=wd.scale(120, 1800))
        print("\n[fuzz] long-lived replies: %d via BrokerClient, %d via raw socket"
              % (sent["obj"], sent["raw"]), file=sys.stderr)


# -- manifests ------------------------------------------------------------------

MANIFEST_SEED = {
    "plugin": {
        "id": "fuzz_plugin", "version": "0.1.0", "name": "Fuzz",
        "entrypoint": {"command": "python3", "args": ["plugin.py", "--mode", "stdio"],
                       "env": {"LOG_LEVEL": "info"}},
        "poller": {"kinds": ["fuzz_kind", "other_kind"],
                   "broker_topic_prefix": "plugin.poller.fuzz", "lifecycle": "ephemeral",
                   "max_concurrent_ticks": 4, "tick_timeout_secs": 60},
    }
}


def toml_value(mut, v):
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=mut.rng.random() < 0.5)
    if v is None:
        return '""' if mut.rng.random() < 0.5 else "null"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(mut, x) for x in v) + "]"
    if isinstance(v, Pairs):
        return "{" + ", ".join("%s = %s" % (json.dumps(str(k)), toml_value(mut, x))
                               for k, x in v.pairs) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join("%s = %s" % (json.dumps(str(k)), toml_value(mut, x))
                               for k, x in v.items()) + "}"
    return json.dumps(str(v))


def to_toml(mut, doc, path=()):
    """A TOML text for a nested dict; sub-dicts become [dotted.tables] (or inline)."""
    out, tables = [], []
    items = doc.pairs if isinstance(doc, Pairs) else list(doc.items())
    for k, v in items:
        if isinstance(v, dict) and mut.rng.random() < 0.9:
            tables.append((k, v))
        else:
            out.append("%s = %s" % (json.dumps(str(k)), toml_value(mut, v)))
    text = ""
    if path:
        text += "[%s]\n" % ".".join(json.dumps(str(p)) for p in path)
    text += "".join(line + "\n" for line in out)
    for k, v in tables:
        text += "\n" + to_toml(mut, v, path + (k,))
    return text


def check_handle(case, h):
    """What load_manifest promises about a handle it returned."""
    case.assertIsInstance(h, nx.PluginPollerHandle)
    case.assertTrue(h.kinds)
    for k in h.kinds:
        case.assertRegex(k, r"\A[a-z][a-z0-9_]+\Z")
    case.assertEqual(len(set(h.kinds)), len(h.kinds))
    case.assertTrue(h.broker_topic_prefix and not h.broker_topic_prefix.endswith("."))
    case.assertFalse(any(c.isspace() for c in h.broker_topic_prefix))
    case.assertTrue(1 <= h.max_concurrent_ticks <= 64)
    case.assertTrue(1 <= h.tick_timeout.total_seconds() <= 3600)
    case.assertIn(h.lifecycle, (Lifecycle.EPHEMERAL, Lifecycle.LONG_LIVED))
    case.assertTrue(h.plugin_id.strip())
    # Whatever it accepts must be runnable: no NUL in what becomes argv/env.
    for text in (h.entrypoint_command or "",) + h.entrypoint_args:
        case.assertNotIn("\x00", text, "a NUL byte in the entrypoint passed validation")
    for k, v in h.entrypoint_env.items():
        case.assertNotIn("\x00", k + v)
        case.assertNotIn("=", k)


class TestFuzzManifests(FuzzCase):
    target = "manifests"

    def test_mutated_manifests(self):
        mut = Mutator(self.rng)
        path = self.tmp.join("nexo-plugin.toml")
        accepted = {"n": 0}

        def one(i):
            pick = self.rng.random()
            doc = MANIFEST_SEED if pick < 0.05 else mut.mutate_tree(MANIFEST_SEED)
            if not isinstance(doc, dict):
                doc = {"plugin": doc}
            data = mut.encode(to_toml(mut, doc))
            if pick > 0.7:
                data = mut.mutate_bytes(data, newlines=True)
            with open(path, "wb") as f:
                f.write(data)
            try:
                handle = nx.load_manifest(path)
            except nx.ManifestError:
                return
            except BaseException as exc:
                self.fail(self.m(i, data, "load_manifest raised %s: %s (not ManifestError)"
                                 % (type(exc).__name__, exc)))
            accepted["n"] += 1
            self.outcomes["accepted"] = accepted["n"]
            try:
                check_handle(self, handle)
            except AssertionError as exc:
                raise AssertionError(self.m(i, data, "accepted an invalid manifest: %s" % exc))

        self.run_cases(one, budget=wd.scale(120, 1800))
        self.assertGreater(accepted["n"], 0, "no case was valid: the seed is broken")


# -- pollers.json -----------------------------------------------------------------

CONFIG_SEED = {
    "enabled": True, "state_db": "./data/poller.db", "default_jitter_ms": 5000,
    "lease_ttl_factor": 2.0, "failure_alert_cooldown_secs": 3600, "breaker_threshold": 5,
    "backoff_initial_secs": 30, "backoff_max_secs": 300, "max_workers": 64,
    "shutdown_grace_secs": 10, "alert_topic": "nexo.poller.alert",
    "broker": "unix://./run/broker.sock", "metrics_addr": "127.0.0.1:9464",
    "plugins": ["plugins/a"],
    "jobs": [
        {"id": "news", "kind": "fuzz_kind", "agent": "reader",
         "schedule": {"every_secs": 60, "stagger_jitter_ms": 500}, "config": {"feed": "x"},
         "failure_to": {"channel": "slack", "to": "#ops"}, "paused_on_boot": False},
        {"id": "cron-job", "kind": "other_kind",
         "schedule": {"cron": "0 */5 * * * *", "tz": "Europe/Berlin"}},
        {"id": "once", "kind": "fuzz_kind", "schedule": {"at": "2026-04-26T15:00:00Z"}},
    ],
}


class TestFuzzConfigs(FuzzCase):
    target = "pollers.json"

    def test_mutated_configs(self):
        mut = Mutator(self.rng)
        wd.write_manifest(self.tmp.join("plugins", "a"), "fuzz_plugin",
                          ["fuzz_kind", "other_kind"], command="/bin/true", args=[])
        path = self.tmp.join("pollers.json")
        accepted = {"n": 0}

        def one(i):
            data = mut.case(CONFIG_SEED, newlines=True)
            if self.rng.random() < 0.1:
                data = b'{"pollers": ' + data + b"}"      # the wrapped form
            with open(path, "wb") as f:
                f.write(data)
            try:
                cfg = nx.load_config(path)
            except nx.ConfigError:
                return
            except BaseException as exc:
                self.fail(self.m(i, data, "load_config raised %s: %s (not ConfigError)"
                                 % (type(exc).__name__, exc)))
            accepted["n"] += 1
            self.outcomes["accepted"] = accepted["n"]
            try:
                self.assertIsInstance(cfg, nx.DaemonConfig)
                ids = [j.id for j in cfg.jobs]
                self.assertEqual(len(ids), len(set(ids)))
                for j in cfg.jobs:
                    s = j.schedule
                    self.assertEqual((s.every_secs is not None) + (s.cron is not None)
                                     + (s.at is not None), 1)
                    if s.every_secs is not None:
                        self.assertTrue(0.001 <= s.every_secs <= 366 * 86400)
                self.assertTrue(1 <= cfg.max_workers <= 4096)
            except AssertionError as exc:
                raise AssertionError(self.m(i, data, "accepted an invalid config: %s" % exc))

        self.run_cases(one, budget=wd.scale(120, 1800))
        self.assertGreater(accepted["n"], 0, "no case was valid: the seed is broken")


# -- cron ----------------------------------------------------------------------------

def cron_token(rng, low, high, names, valid=None):
    """One cron field: mostly valid (so next_after gets exercised), some broken."""
    if valid is None:
        valid = rng.random() < 0.93
    if valid:
        pick = rng.random()
        if pick < 0.3:
            return rng.choice(["*", "?", "*/%d" % rng.randint(1, high + 3)])
        if pick < 0.55:
            return str(rng.randint(low, high))
        if pick < 0.75:
            a = rng.randint(low, high)
            b = rng.randint(a, high)
            return "%d-%d" % (a, b) + ("/%d" % rng.randint(1, 20) if rng.random() < 0.4 else "")
        if pick < 0.85 and names:
            name = rng.choice(list(names))
            return rng.choice([name, name.upper(), name.title()])
        if pick < 0.95:
            return ",".join(cron_token(rng, low, high, names, True)
                            for _ in range(rng.randint(2, 4)))
        return "%d/%d" % (rng.randint(low, high), rng.randint(1, 30))
    pick = rng.random()
    if pick < 0.3:
        return str(rng.choice([low - 1, high + 1, 10 ** rng.randint(3, 30)]))
    if pick < 0.5:
        a, b = rng.randint(low, high), rng.randint(low, high)
        return "%d-%d" % (max(a, b) + 1, min(a, b)) + rng.choice(["", "/0", "/x"])
    if pick < 0.6 and names:
        return rng.choice(list(names)) + "x"
    return rng.choice(["", "-", "/", ",", "**", "1-", "-5", "٣", "²", "9" * 30, "1e3",
                       "0x1", "L", "W", "#", "?/2", "*/0", "1,,2", "1-2-3", "*/-1"])


CRON_FIELDS = [(0, 59, None), (0, 59, None), (0, 23, None), (1, 31, None),
               (1, 12, {"jan": 1, "feb": 2, "dec": 12}),
               (0, 7, {"sun": 0, "mon": 1, "sat": 6})]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu",
         "Pacific/Apia"]


def cron_text(rng):
    fields = [cron_token(rng, lo, hi, names) for lo, hi, names in CRON_FIELDS]
    if rng.random() < 0.3:
        fields = fields[1:]                       # the 5-field form
    if rng.random() < 0.05:
        fields = fields[:rng.randint(0, 6)] + [cron_token(rng, 0, 9, None)] * rng.randint(0, 2)
    text = rng.choice([" ", "  ", "\t", " \u00a0", "\u2003"]).join(fields)
    if rng.random() < 0.05:
        m = Mutator(rng)
        text = m.mutate_bytes(text.encode()).decode("utf-8", "replace")
    return text


def cron_matches(expr, local):
    """Does the wall time ``local`` match ``expr`` (independent of CronExpr's search)?"""
    if local.second not in expr.seconds or local.minute not in expr.minutes \
            or local.hour not in expr.hours or local.month not in expr.months:
        return False
    dom = local.day in expr.days
    dow = (local.weekday() + 1) % 7 in expr.dows
    if expr.dom_any and expr.dow_any:
        return True
    if expr.dom_any:
        return dow
    if expr.dow_any:
        return dom
    return dom or dow


class TestFuzzCron(FuzzCase):
    target = "cron"

    def test_mutated_expressions(self):
        from zoneinfo import ZoneInfo
        zones = [ZoneInfo(z) for z in ZONES]
        valid = {"n": 0}

        def one(i):
            if self.rng.random() < 0.03:
                text = self.rng.choice([None, 5, 1.5, b"* * * * *", ["*"] * 6, {"cron": 1}])
            else:
                text = cron_text(self.rng)
            try:
                expr = nx.CronExpr(text)
            except ValueError:
                return
            except BaseException as exc:
                self.fail(self.m(i, text, "CronExpr raised %s: %s (not ValueError)"
                                 % (type(exc).__name__, exc)))
            valid["n"] += 1
            self.outcomes["valid"] = valid["n"]
            for _ in range(2):
                after = datetime(1971, 1, 1, tzinfo=timezone.utc) + timedelta(
                    seconds=self.rng.uniform(0, 130 * 365 * 86400))
                tz = self.rng.choice(zones)
                try:
                    found = expr.next_after(after, tz)
                except BaseException as exc:
                    self.fail(self.m(i, text, "next_after(%s, %s) raised %s: %s"
                                     % (after, tz, type(exc).__name__, exc)))
                if found is None:
                    continue
                try:
                    self.assertIsInstance(found, datetime)
                    self.assertIsNotNone(found.tzinfo)
                    self.assertGreater(found, after)
                    self.assertTrue(cron_matches(expr, found.astimezone(tz).replace(
                        tzinfo=None)), "fires at a time it does not match: %s" % found)
                except AssertionError as exc:
                    raise AssertionError(self.m(i, text, "next_after(%s, %s): %s"
                                                % (after, tz, exc)))

        self.run_cases(one, budget=wd.scale(120, 1800))
        self.assertGreater(valid["n"], CASES // 20, "too few valid expressions generated")


# -- cursors -------------------------------------------------------------------------

class TestFuzzCursors(FuzzCase):
    target = "cursors"

    def test_mutated_cursors(self):
        mut = Mutator(self.rng)

        def one(i):
            r = self.rng
            raw = os.urandom(r.randint(0, 64)) if r.random() < 0.8 else b""
            text = nx.encode_cursor(raw)
            self.assertEqual(nx.decode_cursor(text), raw)
            self.assertEqual(nx.decode_cursor(base64.urlsafe_b64encode(raw).decode()), raw)
            pick = r.random()
            if pick < 0.05:
                case = r.choice([None, 1, 1.5, b"aGVsbG8", ["aGVsbG8"], {"c": 1}, True])
            elif pick < 0.5:
                case = mut.mutate_bytes(text.encode()).decode("utf-8", r.choice(
                    ["replace", "surrogateescape", "ignore"]))
            elif pick < 0.7:
                case = text + "=" * r.randint(1, 5)
            elif pick < 0.85:
                i2 = r.randint(0, len(text))
                case = text[:i2] + r.choice(mut.string() or "+") + text[i2:]
            else:
                case = mut.string()
            try:
                got = nx.decode_cursor(case)
            except PluginPollerForwardError.ParseReply:
                got = None
            except BaseException as exc:
                self.fail(self.m(i, case, "decode_cursor raised %s: %s (not ParseReply)"
                                 % (type(exc).__name__, exc)))
            else:
                self.assertIsInstance(got, bytes, self.m(i, case, "not bytes"))
            self.assertEqual(got, ref_decode_cursor(case), self.m(
                i, case, "disagrees with the reference decoder"))

        self.run_cases(one, budget=wd.scale(60, 600))


# -- what the fuzzers found, as direct cases ---------------------------------------

class TestFuzzFindings(FuzzCase):
    """Minimal inputs the fuzzers tripped over; each must end in the documented error."""
    target = "findings"

    def test_configs(self):
        nul = json.dumps("plugins/a\x00b")
        surrogate = '"plugins/\\ud800"'
        for name, text in (
                ("superscript port", '{"metrics_addr": "127.0.0.1:\u00b2"}'),
                ("every_secs 10**400", '{"jobs": [{"id": "a", "kind": "k", "schedule": '
                                       '{"every_secs": 1%s}}]}' % ("0" * 400)),
                ("NUL in a plugin path", '{"plugins": [%s]}' % nul),
                ("lone surrogate in a plugin path", '{"plugins": [%s]}' % surrogate)):
            with self.subTest(name):
                path = self.tmp.join("pollers.json")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
                try:
                    nx.load_config(path)
                except nx.ConfigError:
                    pass
                except Exception as exc:      # noqa: BLE001 - the point of the test
                    self.fail("%s: load_config raised %s: %s (not ConfigError)"
                              % (name, type(exc).__name__, exc))
                else:
                    self.fail("%s: accepted" % name)

    def test_manifests(self):
        base = ('[plugin]\nid = "a"\n[plugin.poller]\nkinds = ["ab"]\n'
                'broker_topic_prefix = "x"\n')
        for name, extra in (("arrays nested 2000 deep", "z = " + "[" * 2000 + "]" * 2000),
                            ("inline tables nested 2000 deep", "z = " + "{a = " * 2000
                             + "1" + "}" * 2000),
                            ("a 5000-digit integer", "tick_timeout_secs = " + "9" * 5000)):
            with self.subTest(name):
                path = self.tmp.join("nexo-plugin.toml")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(base + extra + "\n")
                try:
                    nx.load_manifest(path)
                except nx.ManifestError:
                    pass
                except Exception as exc:      # noqa: BLE001
                    self.fail("%s: load_manifest raised %s (not ManifestError)"
                              % (name, type(exc).__name__))
                else:
                    self.fail("%s: accepted" % name)


def tearDownModule():
    if FIGURES:
        print("\n[fuzz] cases per target: " + ", ".join(
            "%s %d (%.1fs%s)" % (k, n, t, "".join("; %s %d" % kv for kv in sorted(o.items())))
            for k, (n, t, o) in sorted(FIGURES.items())), file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
