"""The poller contract, one suite for every plugin lifecycle (issue 21 items 1/2/6).

``LifecycleContract`` is written once and run against every implementation
in ``IMPLEMENTATIONS``: ephemeral (a process per tick), long-lived over the
Unix-socket broker, long-lived over NATS (a real nats-server,
tests/nats_support.py), stdio, and stdio with nexo's bridge (ticks as
``broker.event``); the long-lived and stdio plugins run under the daemon's
PluginSupervisor.  Each is the same plugin
(tests/fixtures/sdk_plugin.py, through ``run_plugin``) behind a manifest of
that lifecycle, driven through the daemon's own wiring (a Runner built from
``pollers.json``), the CLI's ``tick --dry-run`` and the admin API's ``run``.
Adding a lifecycle is adding a line to ``IMPLEMENTATIONS``.

Where the lifecycles differ by nature the test says so explicitly (and the
README's "Plugin lifecycles: one contract" names it).
"""

import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nats_support import NatsServer, require_nats  # noqa: E402
from support import NEXO, PY, wait_until, write_manifest  # noqa: E402

import nexo_poller as nx  # noqa: E402

SDK_PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sdk_plugin.py")
TOKEN = "conformance-token"
TICK_TIMEOUT = 2            # seconds, the manifest's tick_timeout_secs
LIMIT = 2                   # the manifest's max_concurrent_ticks
WAIT = 30.0

# The jobs every implementation serves, by what their config asks the plugin.
JOBS = {
    "ok": {},
    "deliver": {"deliver": [{"channel": "telegram", "recipient": "42",
                             "payload": {"text": "hi"}}]},
    "transient": {"raise": "transient"},
    "permanent": {"raise": "permanent"},
    "config": {"raise": "config"},
    "internal": {"error_code": nx.ERROR_INTERNAL},
    # Late by a margin no scheduling delay closes; longer only makes a stdio
    # plugin (one request at a time) keep the next test waiting.
    "timeout": {"sleep": TICK_TIMEOUT + 1},
    "crash": {"exit": 3},
    "malformed": {"raw_result": {"next_cursor": 5}},
    "slow": {"sleep": 60},
    "scheduled": {"cursor_scheduled": True},
    "partial": {"partial": "transient"},
    "partial_wire": {"error_code": nx.ERROR_PERMANENT, "error_data": {
        "next_cursor": "NDI", "deliver": [{"channel": "telegram", "recipient": "7",
                                           "payload": {"text": "fetched"}}]}},
}


def plugin_pids(plugin_id: str) -> list[int]:
    """Live processes started for ``plugin_id`` (its children inherit the mark)."""
    mark = f"NEXO_POLLER_PLUGIN_ID={plugin_id}\0".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if mark in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


class LifecycleContract:
    """The contract of a poller, whatever its lifecycle.  Subclasses set
    ``lifecycle`` (the manifest's), ``nats`` (the broker is a nats-server)
    and ``poller_extra``."""
    lifecycle = "ephemeral"
    nats = False
    poller_extra = ""           # more of the manifest's [plugin.poller]

    @classmethod
    def setUpClass(cls):
        if cls.nats:
            require_nats()
        logger = logging.getLogger("nexo_poller")     # the failures here are on purpose
        cls.level = logger.level
        logger.setLevel(logging.CRITICAL)
        cls.dir = tempfile.mkdtemp(prefix=f"nexo-conf-{cls.lifecycle}-")
        cls.server = NatsServer().start() if cls.nats else None
        cls.plugin_id = f"conf-{cls.__name__.lower()}-{os.getpid()}"
        write_manifest(cls.dir, cls.plugin_id, "counter", command=PY, args=(SDK_PLUGIN,),
                       lifecycle=cls.lifecycle, max_concurrent_ticks=LIMIT,
                       tick_timeout_secs=TICK_TIMEOUT, poller_extra=cls.poller_extra)
        with open(os.path.join(cls.dir, "token"), "w") as f:
            f.write(TOKEN)
        cls.config_path = cls.write_config("pollers.json", "state.db", JOBS)
        try:
            cls.runner = cls.make_runner(cls.config_path, [j for j in JOBS if j != "slow"])
            cls.runner.start(background=False)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        logging.getLogger("nexo_poller").setLevel(cls.level)
        runner = getattr(cls, "runner", None)
        if runner is not None:
            runner.stop()
        if cls.server is not None:
            cls.server.cleanup()
        shutil.rmtree(cls.dir, ignore_errors=True)

    @classmethod
    def write_config(cls, name, state_db, jobs, **top):
        doc = {"state_db": state_db, "default_jitter_ms": 0, "shutdown_grace_secs": 5,
               "broker": cls.server.url if cls.nats else None,
               "admin_addr": "127.0.0.1:0", "admin_token_file": "token",
               "plugins": [os.path.join("plugins", cls.plugin_id)],
               "jobs": [{"id": job, "kind": "counter", "config": config,
                         "schedule": {"every_secs": 3600}} for job, config in jobs.items()],
               **top}
        path = os.path.join(cls.dir, name)
        with open(path, "w") as f:
            json.dump({k: v for k, v in doc.items() if v is not None}, f)
        return path

    @classmethod
    def make_runner(cls, path, jobs):
        """A Runner of the config at ``path`` serving only ``jobs`` (fresh
        plugin handles: a handle belongs to one runner)."""
        import dataclasses
        cfg = nx.load_config(path)
        return nx.Runner(dataclasses.replace(cfg, jobs=[j for j in cfg.jobs if j.id in jobs]))

    def tick(self, job, runner=None):
        return (runner or self.runner).run_once(job)

    def wait_serving(self):
        """After a tick that broke the plugin (a crash, a timeout), until an ok tick passes."""
        self.assertTrue(wait_until(lambda: self.tick("ok").status == "ok", WAIT, 0.2),
                        "the plugin did not serve again")

    # -- the contract -----------------------------------------------------------------

    def test_tick_carries_the_cursor_in_and_out(self):
        first = self.tick("ok")
        self.assertEqual((first.status, first.error), ("ok", None))
        n = int(first.ack.next_cursor)
        second = self.tick("ok")
        self.assertEqual(second.ack.next_cursor, str(n + 1).encode(),
                         "the committed cursor goes back in")
        self.assertEqual(second.ack.metrics.items_seen, 1)
        self.assertEqual(self.runner.state.load(["ok"])["ok"].cursor, str(n + 1).encode())

    def test_a_tick_carries_the_scheduled_time_of_its_slot(self):
        o = self.runner.run_once("scheduled", scheduled_at=1_900_000_000.0)
        self.assertEqual((o.status, o.error), ("ok", None))
        self.assertEqual(o.ack.next_cursor, b"2030-03-17T17:46:40+00:00",
                         "the plugin's ctx.scheduled_at is the slot's, not now")

    def committed_deliveries(self, job):
        """The deliveries committed for ``job``: delivered, or still in the outbox.
        The publisher may move one from the outbox to delivered between two
        reads: read the count again until it held still around the outbox's."""
        def delivered():
            return self.runner.state.load([job])[job].delivered_total
        while True:
            first = delivered()
            queued = sum(i.job == job for i in self.runner.state.outbox())
            if delivered() == first:
                return first + queued

    def test_an_error_commits_its_partial_progress(self):
        before = self.runner.state.load(["partial"])["partial"]
        sent = self.committed_deliveries("partial")
        n = int(before.cursor or b"0")
        o = self.tick("partial")
        self.assertEqual(o.status, "transient")
        self.assertIn("fixture failure after some progress", o.error)
        after = self.runner.state.load(["partial"])["partial"]
        self.assertEqual(after.cursor, str(n + 1).encode(), "the cursor so far is committed")
        self.assertEqual(after.consecutive_errors, before.consecutive_errors + 1,
                         "the error policy applies as for any Transient")
        self.assertEqual(o.ack.deliver, (nx.Delivery("telegram", "42",
                                                     {"text": f"item {n + 1}"}),))
        self.assertEqual(self.committed_deliveries("partial"), sent + 1,
                         "the delivery is committed with the error")
        self.assertEqual(self.tick("partial").ack.next_cursor, str(n + 2).encode(),
                         "the next tick starts from the partial cursor")

    def test_an_error_reply_carries_partial_progress_in_its_data(self):
        self.addCleanup(self.runner.resume, "partial_wire")
        sent = self.committed_deliveries("partial_wire")
        o = self.tick("partial_wire")
        self.assertEqual((o.status, o.error), ("permanent", "fixture error (code -32002)"))
        after = self.runner.state.load(["partial_wire"])["partial_wire"]
        self.assertEqual((after.cursor, after.paused), (b"42", True))
        self.assertEqual(self.committed_deliveries("partial_wire"), sent + 1)

    def test_deliveries_come_back_as_tick_ack_deliver(self):
        o = self.tick("deliver")
        self.assertEqual(o.status, "ok", o.error)
        self.assertEqual(o.ack.deliver, (nx.Delivery("telegram", "42", {"text": "hi"}),))

    def test_every_poller_error_variant_maps_the_same(self):
        expected = {"transient": ("transient", "fixture transient failure (code -32001)"),
                    "permanent": ("permanent", "fixture permanent failure (code -32002)"),
                    "config": ("config", "job 'config': fixture config failure"),
                    "internal": ("transient", "fixture error (code -32603)")}
        got = {}
        for job in expected:
            o = self.tick(job)
            got[job] = (o.status.value, o.error)
        self.assertEqual(got, expected)

    def supervisor(self):
        """The plugin's supervisor, None for a lifecycle the daemon does not
        supervise (by nature, ``_lifecycle_rules``)."""
        sup = self.runner.supervisors().get(self.plugin_id)
        self.assertEqual(sup is not None,
                         nx._LIFECYCLE_RULES[nx.Lifecycle(self.lifecycle)].supervised)
        return sup

    def test_a_tick_past_its_timeout_is_transient(self):
        self.addCleanup(self.wait_serving)
        sup = self.supervisor()
        before = (sup.proc.pid, sup.restarts) if sup else None
        o = self.tick("timeout")
        self.assertEqual(o.status, "transient")
        self.assertIn(f"timed out after {TICK_TIMEOUT}s", o.error)
        if sup is None:     # by nature: the tick's own process is killed and reaped
            self.assertEqual(plugin_pids(self.plugin_id), [])
        else:               # by nature: the plugin's process stays (a late reply is dropped)
            self.assertEqual((sup.proc.pid, sup.restarts), before)

    def test_a_plugin_that_crashes_mid_tick(self):
        self.addCleanup(self.wait_serving)
        sup = self.supervisor()
        restarts = sup.restarts if sup else 0
        o = self.tick("crash")
        self.assertEqual(o.status, "transient")
        self.assertIn("exit status 3", o.error)
        if sup is not None:  # by nature: down until its supervisor restarted it
            self.assertIn("is down", o.error)
            self.assertTrue(wait_until(lambda: sup.restarts == restarts + 1, WAIT))

    def test_a_malformed_reply_is_transient(self):
        o = self.tick("malformed")
        self.assertEqual(o.status, "transient")
        self.assertIn("unparsable reply: next_cursor must be a string or null, got number",
                      o.error)

    def limit_runner(self, name):
        """A runner of 2 x max_concurrent_ticks jobs, each tick 0.3 s long,
        and the file the plugin appends the ticks it saw in flight to."""
        inflight = os.path.join(self.dir, f"inflight-{name}")
        os.mkdir(inflight)
        jobs = {f"c{i}": {"sleep": 0.3, "inflight_dir": inflight} for i in range(2 * LIMIT)}
        r = self.make_runner(self.write_config(f"{name}.json", f"{name}.db", jobs), jobs)
        self.addCleanup(r.stop)
        return r, inflight + ".peaks"

    def assert_within_the_limit(self, peaks_file):
        with open(peaks_file) as f:
            peaks = [int(line) for line in f]
        self.assertEqual(len(peaks), 2 * LIMIT)
        self.assertLessEqual(max(peaks), LIMIT, f"ticks seen in flight: {peaks}")

    def test_at_most_max_concurrent_ticks_at_once(self):
        r, peaks = self.limit_runner("scheduled")
        r.start()                           # every job due at once
        self.assertTrue(wait_until(lambda: all(s["last_status"] == "ok" for s in r.status()),
                                   WAIT, 0.1), r.status())
        self.assert_within_the_limit(peaks)

    def test_operator_runs_keep_the_limit_too(self):
        # The admin API's run (Runner.run_once) ran beside the lanes: on main
        # four at once reached a plugin whose max_concurrent_ticks is 2.
        r, peaks = self.limit_runner("operator")
        r.start(background=False)
        outcomes = []
        threads = [threading.Thread(target=lambda j=job: outcomes.append(r.run_once(j)))
                   for job in ("c0", "c1", "c2", "c3")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        self.assertEqual([o.status.value for o in outcomes], ["ok"] * 4,
                         [o.error for o in outcomes])
        self.assert_within_the_limit(peaks)

    def test_stop_mid_tick_leaves_no_process(self):
        r = self.make_runner(self.write_config("stop.json", "stop.db", JOBS), ["slow", "ok"])
        self.addCleanup(r.stop)
        others = set(plugin_pids(self.plugin_id))      # the class runner's plugin
        r.start(background=False)
        self.assertEqual(self.tick("ok", r).status, "ok")   # a long-lived plugin is up
        done = []
        t = threading.Thread(target=lambda: done.append(self.tick("slow", r)))
        t.start()
        self.assertTrue(wait_until(lambda: any(s["running"] for s in r.status()), WAIT))
        self.assertTrue(wait_until(lambda: set(plugin_pids(self.plugin_id)) - others, WAIT),
                        "a plugin process runs the tick")
        r.stop()
        t.join(WAIT)
        self.assertFalse(t.is_alive(), "the tick in flight ended with the stop")
        self.assertEqual((done[0].status, done[0].error), ("cancelled", "tick cancelled"))
        self.assertEqual(set(plugin_pids(self.plugin_id)) - others, set(),
                         "plugin processes outlived the stop")

    def test_cli_tick_dry_run_reaches_it(self):
        out = subprocess.run([PY, NEXO, "--config", self.config_path, "tick", "ok",
                              "--dry-run", "--cursor-text", "41"], capture_output=True,
                             text=True, timeout=120, cwd=self.dir, stdin=subprocess.DEVNULL)
        self.assertEqual(out.returncode, 0, out.stderr)
        doc = json.loads(out.stdout)
        self.assertEqual((doc["outcome"], doc["next_cursor"]["text"], doc["stored"]),
                         ("ok", "42", False))
        out = subprocess.run([PY, NEXO, "--config", self.config_path, "tick", "permanent",
                              "--dry-run"], capture_output=True, text=True, timeout=120,
                             cwd=self.dir, stdin=subprocess.DEVNULL)
        self.assertEqual(out.returncode, nx.EXIT_TICK_PERMANENT, out.stderr)

    def test_admin_run_reaches_it(self):
        port = self.runner.admin_address[1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        self.addCleanup(conn.close)
        conn.request("POST", "/admin/pollers/ok/run",
                     headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        self.assertEqual((resp.status, doc["ok"], doc["outcome"]["outcome"]), (200, True, "ok"))
        self.assertEqual(doc["items_seen"], 1)


class TestOnePlaceDecides(unittest.TestCase):
    """Issue 21 item 2: one function maps a manifest to its lifecycle's rules
    (``_lifecycle_rules``); nothing else compares a lifecycle to decide."""

    def test_no_code_compares_a_handles_lifecycle(self):
        import ast
        with open(nx.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        places = []

        def visit(node, where):
            for child in ast.iter_child_nodes(node):
                name = where
                if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                    name = f"{where}.{child.name}" if where else child.name
                if isinstance(child, ast.Compare) and any(
                        isinstance(n, ast.Attribute) and n.attr == "lifecycle"
                        for n in [child.left, *child.comparators]):
                    places.append(f"{name} (line {child.lineno})")
                visit(child, name)
        visit(tree, "")
        self.assertEqual(places, [], "the lifecycle is decided outside _lifecycle_rules")

    def test_every_lifecycle_has_its_rules_and_proxy(self):
        for lifecycle in nx.Lifecycle:
            h = nx.PluginPollerHandle("p", ("k",), "plugin.poller.p", lifecycle=lifecycle,
                                      entrypoint_command=PY)
            rules = nx._lifecycle_rules(h)
            self.assertIsInstance(nx._proxy_for("k", h, None, limit=False), rules.proxy)
        self.assertEqual({lc.value for lc in nx.Lifecycle},
                         {opts["lifecycle"] for _, opts in IMPLEMENTATIONS},
                         "every lifecycle is in the conformance suite")


# Every implementation of the contract; a new lifecycle is one more line.
IMPLEMENTATIONS = [
    ("Ephemeral", {"lifecycle": "ephemeral"}),
    ("LongLivedUnixBroker", {"lifecycle": "long_lived"}),
    ("LongLivedNats", {"lifecycle": "long_lived", "nats": True}),
    ("Stdio", {"lifecycle": "stdio"}),
    ("StdioBridge", {"lifecycle": "stdio", "poller_extra": "stdio_bridge = true\n"}),
]
for _name, _opts in IMPLEMENTATIONS:
    globals()[f"Test{_name}"] = type(f"Test{_name}", (LifecycleContract, unittest.TestCase),
                                     _opts)
del _name, _opts


if __name__ == "__main__":
    unittest.main()
