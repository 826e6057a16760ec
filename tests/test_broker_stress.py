"""A stress test of the broker's reading roles: no client may lose its reader.

Each client keeps one thread reading its socket at every moment (the
Broker section's docstring says who, when).  A design that can lose that
reader does not fail fast: requests to the client just stop being answered.
So this test sends thousands of requests to a few busy plugin-side clients
(``BrokerClient``, what ``run_plugin`` serves with) while their
subscriptions come and go at random and handlers raise or take their time,
from the daemon's in-process client and from an external socket client at
once.  Every request must end in an answer (a reply, the handler's error,
or "no handler" for a subscription dropped while the message travelled) —
never in a timeout — and afterwards every client must still answer.

Real sockets, real threads.  NEXO_TEST_FULL=1 runs ten times as many.
"""
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nexo_poller as npl  # noqa: E402
from nexo_poller import BrokerClient, BrokerServer, PluginPollerForwardError  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import quiet_log  # noqa: E402

FULL = os.environ.get("NEXO_TEST_FULL") == "1"
REQUESTS = 30_000 if FULL else 3_000
PLUGINS = 3                 # plugin-side clients in one queue group
WORKERS = 6                 # each one's thread cap: a small one makes running out likelier
REQUESTERS = 12             # threads asking at once (half in-process, half over the socket)
ANSWER_SECS = 5.0           # a request with no answer by then lost its reader
TOPIC = "stress.tick"


class _Unprintable(Exception):
    def __str__(self):
        raise ValueError("no text for this one")


# What the error reply of each failing handler says.
_RAISED = {"raise": "RuntimeError: boom", "raise huge": "RuntimeError: boom",
           "raise unprintable": "_Unprintable", "raise exit": "SystemExit: 3"}


def _handler(tag):
    """A plugin handler: echoes, raises, or takes a while, as the payload says.
    Its failures include ones whose report cannot travel as they are: a
    message longer than a broker line, an exception that cannot be printed."""
    def handle(payload):
        op = payload["op"]
        if op == "raise":
            raise RuntimeError(f"boom {payload['n']}")
        if op == "raise huge":
            raise RuntimeError("boom " + "x" * npl.BROKER_MAX_LINE_BYTES)
        if op == "raise unprintable":
            raise _Unprintable()
        if op == "raise exit":
            raise SystemExit(3)                  # ends a thread, were it let through
        if op == "slow":
            time.sleep(payload["ms"] / 1000)     # a handler busy on I/O, not a wait of the test
        return {"n": payload["n"], "by": tag}
    return handle


class NoReaderLost(unittest.TestCase):
    def setUp(self):
        quiet_log(self)
        self.tmp = tempfile.mkdtemp(prefix="nexo-stress-")
        self.server = BrokerServer(os.path.join(self.tmp, "b.sock")).start()
        self.addCleanup(self.server.close)
        self.plugins = []
        for i in range(PLUGINS):
            client = BrokerClient.connect(self.server.url, max_workers=WORKERS)
            self.addCleanup(client.close)
            client.subscribe(TOPIC, _handler(f"p{i}"), queue="g")    # always one there
            self.plugins.append(client)
        self.external = BrokerClient.connect(self.server.url)
        self.addCleanup(self.external.close)
        self.local = self.server.client()
        self.addCleanup(self.local.close)
        self.stop = threading.Event()
        self.failures = []            # (request, what went wrong)
        self.outcomes = {"ok": 0, "raised": 0, "no handler": 0}
        self.lock = threading.Lock()

    def _churn(self, seed):
        """Subscribe and unsubscribe extra handlers on the plugins at random."""
        rng = random.Random(seed)
        extra = []                    # (client, sid)
        while not self.stop.is_set():
            try:
                if extra and (len(extra) > 6 or rng.random() < 0.5):
                    client, sid = extra.pop(rng.randrange(len(extra)))
                    client.unsubscribe(sid)
                else:
                    client = rng.choice(self.plugins)
                    extra.append((client, client.subscribe(
                        TOPIC, _handler("extra"), queue=rng.choice(["g", None]))))
            except PluginPollerForwardError as exc:
                with self.lock:
                    self.failures.append(("churn", str(exc)))
                return
            self.stop.wait(rng.uniform(0, 0.004))

    def _ask(self, client, seed, count):
        rng = random.Random(seed)
        for n in range(count):
            if self.stop.is_set():
                return
            roll = rng.random()
            op = "raise" if roll < 0.11 else "raise huge" if roll < 0.12 else \
                "raise unprintable" if roll < 0.13 else "raise exit" if roll < 0.14 else \
                "slow" if roll < 0.30 else "echo"
            payload = {"op": op, "n": n, "ms": rng.randint(1, 40)}
            try:
                reply = client.request(TOPIC, payload, ANSWER_SECS, wait=True)
            except PluginPollerForwardError as exc:
                code = getattr(exc, "code", None)
                if code == npl.BROKER_RESPONDER_ERROR and op in _RAISED and \
                        _RAISED[op] in str(exc):
                    what = "raised"
                elif code == npl.BROKER_RESPONDER_ERROR and "no handler" in str(exc):
                    what = "no handler"     # its subscription went while the message travelled
                else:
                    with self.lock:
                        self.failures.append((payload, f"{code}: {exc}"))
                    self.stop.set()         # a lost reader: no point waiting out the rest
                    return
            else:
                if op.startswith("raise") or reply.get("n") != n:
                    with self.lock:
                        self.failures.append((payload, f"wrong reply {reply!r}"))
                    continue
                what = "ok"
            with self.lock:
                self.outcomes[what] += 1

    def _run(self, threads):
        for t in threads:
            t.start()
        for t in threads:
            t.join(ANSWER_SECS * REQUESTS)  # each request ends by its own timeout
            self.assertFalse(t.is_alive(), "a stress thread is stuck")

    def test_every_request_is_answered_and_every_client_still_reads(self):
        per_thread = REQUESTS // REQUESTERS
        askers = [threading.Thread(target=self._ask, args=(
            self.local if i % 2 else self.external, i, per_thread)) for i in range(REQUESTERS)]
        churners = [threading.Thread(target=self._churn, args=(100 + i,)) for i in range(2)]
        for t in churners:
            t.start()
        try:
            self._run(askers)
        finally:
            self.stop.set()
            for t in churners:
                t.join(ANSWER_SECS * 4)
        self.assertEqual(self.failures[:5], [], f"{len(self.failures)} requests went wrong; "
                                               f"outcomes {self.outcomes}")
        self.assertEqual(sum(self.outcomes.values()), per_thread * REQUESTERS)
        self.assertGreater(self.outcomes["raised"], 0)
        # Afterwards each plugin still reads: it answers on a topic of its own.
        for i, client in enumerate(self.plugins):
            client.subscribe(f"probe.{i}", lambda payload: payload + 1)
            self.assertEqual(self.local.request(f"probe.{i}", i, ANSWER_SECS), i + 1)
            self.assertEqual(self.external.request(f"probe.{i}", i, ANSWER_SECS), i + 1)


class ReaderSurvivesTheUnexpected(unittest.TestCase):
    """A line the client cannot make sense of costs that line, and a thread
    the system will not start costs a pause, never the client's reader."""

    def setUp(self):
        """A client on one end of a socket pair; the test is its broker."""
        quiet_log(self)
        ours, self.broker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.broker.close)
        client = BrokerClient(ours, "unix:///socketpair")
        self.addCleanup(client.close)
        client._handlers[1] = lambda payload: payload * 2      # as subscribe leaves it
        self.broker.settimeout(ANSWER_SECS)
        self.replies = self.broker.makefile("rb")

    def test_a_message_with_params_not_an_object_is_skipped(self):
        self.broker.sendall(b'{"jsonrpc":"2.0","method":"message","params":[1,2]}\n'
                       b'{"jsonrpc":"2.0","method":"message","params":'
                       b'{"sid":1,"topic":"t","payload":21,"inbox":7}}\n')
        reply = json.loads(self.replies.readline())
        self.assertEqual(reply["params"], {"inbox": 7, "payload": 42})

    def test_no_thread_to_be_had_leaves_the_reader_reading(self):
        # The reading thread meets a handler's message and starts no successor,
        # as the system refuses threads: it must still read on after the handler.
        start = threading.Thread.start

        def refuse(thread):
            if thread.name == "nexo-broker-client":
                raise RuntimeError("can't start new thread")
            start(thread)
        with unittest.mock.patch.object(threading.Thread, "start", refuse):
            for inbox in (7, 8, 9):
                self.broker.sendall(b'{"jsonrpc":"2.0","method":"message","params":{"sid":1,'
                               b'"topic":"t","payload":21,"inbox":%d}}\n' % inbox)
                reply = json.loads(self.replies.readline())
                self.assertEqual(reply["params"], {"inbox": inbox, "payload": 42})


if __name__ == "__main__":
    unittest.main()
