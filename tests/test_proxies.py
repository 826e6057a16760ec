"""Tests of the long-lived plugin machinery: PluginSupervisor and PluginPollerProxy.

Real plugin processes (tests/fixtures/sdk_plugin.py, stubborn_plugin.py), a
real BrokerServer, real signals.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nexo_poller import (BrokerServer, PluginPollerHandle, PluginPollerProxy,  # noqa: E402
                         PluginSupervisor, PollContext, PollerError)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import wait_until  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SDK_PLUGIN = os.path.join(HERE, "fixtures", "sdk_plugin.py")
STUBBORN_PLUGIN = os.path.join(HERE, "fixtures", "stubborn_plugin.py")
NOW = datetime(2026, 5, 17, 10, 0, 0, tzinfo=timezone.utc)
WAIT = 10.0



def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def alive_in_group(pgid):
    """Pids of processes of group ``pgid`` that are not zombies."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            found.append(int(name))
    return found


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] not in ("Z", "X")


def make_handle(plugin_id, *, command=SDK_PLUGIN, max_concurrent=1, timeout=30, env=None):
    return PluginPollerHandle(
        plugin_id=plugin_id, kinds=("counter",),
        broker_topic_prefix=f"plugin.poller.{plugin_id}", lifecycle="long_lived",
        max_concurrent_ticks=max_concurrent, tick_timeout=timedelta(seconds=timeout),
        entrypoint_command=sys.executable, entrypoint_args=(command,),
        entrypoint_env=env or {})


def ctx(config=None, cursor=None, job="job-1"):
    return PollContext(job_id=job, agent_id="agent-1", kind="counter", cursor=cursor,
                       config=config if config is not None else {}, now=NOW,
                       interval_hint=timedelta(seconds=60))


class _SupervisorCase(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.server = BrokerServer().start()
        self.addCleanup(self.server.close)
        self.local = self.server.client()
        self.addCleanup(self.local.close)

    def supervise(self, handle, **kw):
        kw.setdefault("backoff_initial", 0.05)
        sup = PluginSupervisor(handle, self.server.url, **kw)
        self.addCleanup(sup.stop)
        return sup.start()

    def path(self, name):
        return os.path.join(self.tmp.name, name)


class SupervisorTests(_SupervisorCase):

    def test_child_environment_and_process_group(self):
        report = self.path("report.json")
        handle = make_handle("sup_env", env={"FIXTURE_EXTRA": "from-manifest",
                                             "SDK_PLUGIN_REPORT": report})
        sup = self.supervise(handle)
        self.assertTrue(wait_until(lambda: read_json(report) is not None))
        info = read_json(report)
        env = info["env"]
        self.assertEqual(env.get("NEXO_BROKER_URL"), self.server.url)
        self.assertEqual(env.get("NEXO_POLLER_PLUGIN_ID"), "sup_env")
        self.assertEqual(env.get("NEXO_POLLER_TICK_TOPIC"), "plugin.poller.sup_env.tick")
        self.assertEqual(env.get("FIXTURE_EXTRA"), "from-manifest")
        self.assertNotIn("NEXO_POLLER_EPHEMERAL", env)
        self.assertEqual(info["pid"], sup.proc.pid)
        self.assertEqual(info["pgid"], info["pid"])
        self.assertEqual(os.getpgid(sup.proc.pid), sup.proc.pid)
        self.assertNotEqual(os.getpgid(sup.proc.pid), os.getpgid(0))
        # And it serves ticks.
        proxy = PluginPollerProxy("counter", handle, self.local)
        self.assertEqual(proxy.tick(ctx(cursor=b"1")).next_cursor, b"2")

    def test_sigkill_mid_tick_fails_fast_then_restarts(self):
        handle = make_handle("sup_kill", timeout=30)
        sup = self.supervise(handle)
        proxy = PluginPollerProxy("counter", handle, self.local)
        self.assertEqual(proxy.tick(ctx()).next_cursor, b"1")     # plugin is up
        first_pid = sup.proc.pid
        mark = self.path("mark")
        outcome = {}

        def slow_tick():
            try:
                outcome["ok"] = proxy.tick(ctx({"sleep": 10, "mark": mark}))
            except Exception as exc:         # asserted below
                outcome["err"] = exc
            outcome["at"] = time.monotonic()
        with self.assertLogs("nexo_poller", "INFO") as logs:
            t = threading.Thread(target=slow_tick)
            t.start()
            self.assertTrue(wait_until(lambda: os.path.exists(mark)), "tick never started")
            with open(mark) as f:
                self.assertEqual(int(f.read()), first_pid)
            killed_at = time.monotonic()
            os.kill(first_pid, signal.SIGKILL)
            t.join(WAIT)
            self.assertFalse(t.is_alive(), "tick still waiting for a dead plugin")
            self.assertIsInstance(outcome.get("err"), PollerError.Transient, outcome)
            self.assertLess(outcome["at"] - killed_at, 5.0)

            self.assertTrue(wait_until(lambda: sup.restarts >= 1), "no restart")
            ack = None
            for _ in range(5):               # the first tick after a kill may race
                try:
                    ack = proxy.tick(ctx(cursor=b"10"))
                    break
                except PollerError.Transient:
                    continue
            self.assertIsNotNone(ack, "no tick succeeded after the restart")
            self.assertEqual(ack.next_cursor, b"11")
            self.assertNotEqual(sup.proc.pid, first_pid)
            self.assertEqual(sup.restarts, 1)
        self.assertTrue(any("sup_kill" in m and "exited" in m for m in logs.output),
                        logs.output)

    def test_cancel_mid_tick(self):
        handle = make_handle("sup_cancel", timeout=30)
        self.supervise(handle)
        proxy = PluginPollerProxy("counter", handle, self.local)
        proxy.tick(ctx())
        mark = self.path("mark")
        c = ctx({"sleep": 3, "mark": mark})
        outcome = {}

        def run():
            try:
                outcome["ok"] = proxy.tick(c)
            except Exception as exc:         # asserted below
                outcome["err"] = exc
            outcome["at"] = time.monotonic()
        t = threading.Thread(target=run)
        t.start()
        self.assertTrue(wait_until(lambda: os.path.exists(mark)))
        cancelled_at = time.monotonic()
        c.cancel.set()
        t.join(WAIT)
        self.assertIsInstance(outcome.get("err"), PollerError.Transient, outcome)
        self.assertLess(outcome["at"] - cancelled_at, 2.0)
        self.assertEqual(self.server.stats()["pending"], 0)
        self.assertEqual(handle.slots._used, 0)
        # The plugin's late answer is dropped; the next tick gets its own.
        self.assertEqual(proxy.tick(ctx(cursor=b"5")).next_cursor, b"6")

    def test_stop_terminates_plugin_and_its_group(self):
        handle = make_handle("sup_stop")
        sup = self.supervise(handle, stop_grace=5.0)
        proxy = PluginPollerProxy("counter", handle, self.local)
        proxy.tick(ctx())
        proc = sup.proc
        t0 = time.monotonic()
        sup.stop()
        self.assertLess(time.monotonic() - t0, 4.0, "a SIGTERM-obeying plugin needed the grace")
        self.assertIsNotNone(proc.poll())
        self.assertEqual(alive_in_group(proc.pid), [])
        self.assertTrue(wait_until(
            lambda: not self.server.has_subscriber(handle.tick_topic())))
        # Stopped means stopped: no restart behind our back.
        time_restarts = sup.restarts
        self.assertFalse(wait_until(lambda: sup.proc.poll() is None, timeout=0.5))
        self.assertEqual(sup.restarts, time_restarts)

    def test_stop_kills_plugin_that_ignores_sigterm(self):
        report = self.path("stubborn.json")
        handle = make_handle("sup_stubborn", command=STUBBORN_PLUGIN,
                             env={"STUBBORN_REPORT": report})
        sup = self.supervise(handle, stop_grace=0.5)
        self.assertTrue(wait_until(lambda: read_json(report) is not None))
        info = read_json(report)
        leader, grandchild = info["pid"], info["grandchild"]
        self.assertEqual(os.getpgid(grandchild), leader)
        with self.assertLogs("nexo_poller", "WARNING") as logs:
            t0 = time.monotonic()
            sup.stop()
            elapsed = time.monotonic() - t0
        self.assertGreaterEqual(elapsed, 0.4)       # it did wait for the grace
        self.assertLess(elapsed, 8.0)
        self.assertTrue(any("SIGTERM" in m for m in logs.output), logs.output)
        self.assertFalse(pid_alive(leader))
        self.assertTrue(wait_until(lambda: not pid_alive(grandchild)),
                        "grandchild survived stop()")
        self.assertTrue(wait_until(lambda: alive_in_group(leader) == []),
                        alive_in_group(leader))

    def test_output_relayed_to_log_with_plugin_id(self):
        handle = make_handle("sup_relay", env={"SDK_PLUGIN_GREET": "1"})
        with self.assertLogs("nexo_poller", "INFO") as logs:
            sup = self.supervise(handle)

            def seen(text):
                return any(r.getMessage() == f"plugin sup_relay: {text}" for r in logs.records)
            self.assertTrue(wait_until(lambda: seen("hello from stdout")
                                       and seen("hello from stderr")), logs.output)
            sup.stop()
        relayed = [r for r in logs.records if "hello from" in r.getMessage()]
        self.assertEqual(len(relayed), 2, logs.output)
        self.assertTrue(all(r.levelname == "INFO" for r in relayed))

    def test_an_unlimited_proxy_leaves_the_limit_to_its_caller(self):
        handle = make_handle("sup_nolimit", max_concurrent=1)
        self.supervise(handle)
        proxy = PluginPollerProxy("counter", handle, self.local, limit=False)
        proxy.tick(ctx())
        handle.slots.acquire(1)             # the one slot is taken elsewhere...
        try:
            ack = proxy.tick(ctx(job="free"))   # ...and this tick does not wait for it
        finally:
            handle.slots.release()
        self.assertIsNotNone(ack.next_cursor)

    def test_max_concurrent_ticks_enforced(self):
        handle = make_handle("sup_conc", max_concurrent=2)
        self.supervise(handle)
        proxy = PluginPollerProxy("counter", handle, self.local)
        proxy.tick(ctx())                   # warm up: the plugin is subscribed
        acks, errors = [], []
        lock = threading.Lock()
        go = threading.Barrier(4)

        def slow(i):
            try:
                go.wait(WAIT)
                ack = proxy.tick(ctx({"sleep": 0.4, "report_peak": True}, job=f"job-{i}"))
                with lock:
                    acks.append(ack)
            except Exception as exc:         # asserted below
                with lock:
                    errors.append(exc)
        threads = [threading.Thread(target=slow, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(len(acks), 4)
        peaks = [a.metrics.items_dispatched for a in acks]
        self.assertLessEqual(max(peaks), 2, peaks)
        self.assertEqual(max(peaks), 2, f"ticks never overlapped: {peaks}")
        self.assertEqual(sorted(a.next_cursor for a in acks), [b"1"] * 4)


class OrphanedPluginTests(unittest.TestCase):
    """A long-lived plugin leaves when its daemon's broker goes away."""

    def test_plugin_exits_when_broker_closes(self):
        server = BrokerServer().start()
        topic = "plugin.poller.orphan.tick"
        env = dict(os.environ, NEXO_BROKER_URL=server.url, NEXO_POLLER_TICK_TOPIC=topic,
                   NEXO_POLLER_PLUGIN_ID="orphan")
        env.pop("NEXO_POLLER_EPHEMERAL", None)
        proc = subprocess.Popen([sys.executable, SDK_PLUGIN], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            self.assertTrue(wait_until(lambda: server.has_subscriber(topic)
                                       or proc.poll() is not None))
            if proc.poll() is not None:
                self.fail(f"plugin exited early ({proc.returncode}): {proc.stderr.read()!r}")
            self.assertTrue(server.has_subscriber(topic))
            # One tick round trip: the plugin is past its subscribe call and serving
            # (a broker closing mid-subscribe is a failed start, exit status 1).
            local = server.client()
            handle = PluginPollerHandle(plugin_id="orphan", kinds=("counter",),
                                        broker_topic_prefix="plugin.poller.orphan",
                                        tick_timeout=timedelta(seconds=30))
            ack = PluginPollerProxy("counter", handle, local).tick(ctx(cursor=b"3"))
            self.assertEqual(ack.next_cursor, b"4")
            server.close()
            t0 = time.monotonic()
            try:
                code = proc.wait(5)
            except subprocess.TimeoutExpired:
                self.fail("plugin still running 5 s after its broker closed")
            self.assertLess(time.monotonic() - t0, 5.0)
            self.assertEqual(code, 0, proc.stderr.read())
        finally:
            server.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()

    def test_plugin_without_broker_env_refuses_to_start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXO_")}
        proc = subprocess.run([sys.executable, SDK_PLUGIN], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30)
        self.assertEqual(proc.returncode, 2)
        self.assertIn(b"NEXO_BROKER_URL", proc.stderr)


if __name__ == "__main__":
    unittest.main()


class SupervisorHighFdTest(unittest.TestCase):
    """The relay of a plugin's output must work whatever its pipe's fd number
    (select() cannot watch descriptors past 1023)."""

    def test_output_is_relayed_when_the_pipe_fd_is_above_1024(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1200:
            self.skipTest(f"RLIMIT_NOFILE hard limit {hard} is below 1200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        self.addCleanup(lambda: [os.close(fd) for fd in fillers])
        script = "import sys, time; print('hello from a high fd', flush=True); time.sleep(30)"
        handle = PluginPollerHandle(
            "highfd", ["highfd"], "plugin.poller.highfd", entrypoint_command=sys.executable,
            entrypoint_args=["-c", script])
        with self.assertLogs("nexo_poller", "INFO") as logs:
            sup = PluginSupervisor(handle, "unix:///nonexistent.sock",
                                               stop_grace=1.0).start()
            self.addCleanup(sup.stop)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(
                    "hello from a high fd" in line for line in logs.output):
                time.sleep(0.05)
            self.assertGreater(sup.proc.stdout.fileno(), 1024)
        self.assertTrue(any("plugin highfd: hello from a high fd" in line
                            for line in logs.output), logs.output)
