"""Tests of the "Processes" section: spawn_ephemeral_tick and EphemeralPollerProxy.

Every fixture runs as ``sys.executable <fixture> <mode>`` so any interpreter
works.  Time bounds are generous on purpose: they separate "returns at the
deadline" from "hangs", not fast from slow.  NEXO_TEST_FULL=1 runs 200 ticks
instead of 60 in the zombie and file-descriptor check.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import TempDirCase  # noqa: E402
import nexo_poller  # noqa: E402
from nexo_poller import (  # noqa: E402
    EphemeralPollerProxy, ErrorClass, Lifecycle, PluginPollerHandle, PollContext,
    PollerError, TickAck, TickMetrics, build_tick_request, spawn_ephemeral_tick)

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MISBEHAVE = os.path.join(FIXTURES, "misbehave.py")
TEMPLATE = os.path.join(FIXTURES, "template_plugin.py")
HELPER = os.path.join(FIXTURES, "processes_helper.py")
PY = sys.executable
PLUGIN = "test.plugin"
NOW = datetime(2026, 5, 17, 10, 0, 0, tzinfo=timezone.utc)
MIB = 1 << 20
MANY_TICKS = 200 if os.environ.get("NEXO_TEST_FULL") == "1" else 60    # 15 of each mode


def make_request(job_id="job-1", cursor=None, config=None, interval=60, kind="rss"):
    if config is None:
        config = {"feed": "https://example.org/rss"}
    return build_tick_request(kind, job_id, "agent-1", cursor, config, NOW, interval)


def run_mode(mode, timeout=20.0, *, request=None, cancel=None, env=None, cwd=None,
             extra_args=(), script=MISBEHAVE, **kw):
    return spawn_ephemeral_tick(PY, PLUGIN, request or make_request(), timeout, cancel,
                                args=[script, mode, *extra_args], env=env, cwd=cwd, **kw)


def proc_stat(pid):
    """(state, ppid) of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def child_pids():
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None and st[1] == me:
                found.append((int(entry), st[0]))
    return sorted(found)


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def read_pidfile(path):
    with open(path, encoding="ascii") as f:
        return int(f.read().strip())


class Base(TempDirCase):
    tmp_prefix, quiet = "nexo-proc-test-", False

    def setUp(self):
        super().setUp()
        self.tmp = self.dir

    def path(self, name):
        return os.path.join(self.tmp, name)

    def read_json(self, name):
        with open(self.path(name), encoding="utf-8") as f:
            return json.load(f)

    def assert_transient_within(self, seconds, fn, *args, **kwargs):
        t0 = time.monotonic()
        with self.assertRaises(PollerError.Transient) as cm:
            fn(*args, **kwargs)
        elapsed = time.monotonic() - t0
        self.assertLess(elapsed, seconds, f"took {elapsed:.2f}s: {cm.exception}")
        self.assertEqual(cm.exception.classify(), ErrorClass.TRANSIENT)
        return cm.exception, elapsed

    def assert_process_gone(self, pid, within=5.0):
        """Gone, or a zombie waiting for init to reap it: either way, not running."""
        deadline = time.monotonic() + within
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            st = proc_stat(pid)
            if st is None or st[0] in ("Z", "X", "x"):
                return
            if time.monotonic() >= deadline:
                self.fail(f"process {pid} still running (state {st[0]}) {within}s later")
            time.sleep(0.02)

    def spy_popen(self):
        """Record every Popen the module makes (to check the child was reaped)."""
        made = []
        real = subprocess.Popen

        def spy(*a, **k):
            p = real(*a, **k)
            made.append(p)
            return p

        patcher = mock.patch.object(nexo_poller.subprocess, "Popen", side_effect=spy)
        patcher.start()
        self.addCleanup(patcher.stop)
        return made


# ---------------------------------------------------------------------------
# What the original does
# ---------------------------------------------------------------------------

class OriginalBehaviour(Base):

    def test_normal_reply_gives_ack_with_decoded_cursor_and_metrics(self):
        config = {"feed": "https://example.org/rss", "n": [1, 2, 3]}
        ack = run_mode("echo", request=make_request("job-42", config=config, interval=300))
        self.assertIsInstance(ack, TickAck)
        self.assertEqual(ack.next_cursor, b"echo:job-42")
        self.assertEqual(ack.next_interval_hint, timedelta(seconds=300))
        self.assertEqual(ack.metrics, TickMetrics(len(json.dumps(config)), 0))

    def test_timeout_accepts_timedelta(self):
        ack = run_mode("echo", timeout=timedelta(seconds=20))
        self.assertEqual(ack.next_cursor, b"echo:job-1")

    def test_request_is_one_jsonrpc_line_then_stdin_closes(self):
        report = self.path("report.json")
        request = make_request("job-7", cursor=b"prev-cursor", interval=300)
        ack = run_mode("read_all", script=HELPER, request=request,
                       env={"FIXTURE_REPORT": report})
        self.assertEqual(ack.next_cursor, b"1")     # exactly one line before EOF
        info = self.read_json("report.json")
        self.assertTrue(info["raw_ends_with_newline"])
        msg = json.loads(info["lines"][0])
        self.assertEqual(msg["jsonrpc"], "2.0")
        self.assertEqual(msg["method"], "poll_tick")
        self.assertIn("id", msg)
        self.assertEqual(msg["params"], request.to_dict())
        self.assertEqual(msg["params"]["cursor"], "cHJldi1jdXJzb3I")
        self.assertEqual(msg["params"]["now"], "2026-05-17T10:00:00+00:00")
        self.assertEqual(msg["params"]["interval_hint_secs"], 300)

    def test_child_env_has_ephemeral_flag_and_plugin_id(self):
        report = self.path("report.json")
        run_mode("echo", env={"FIXTURE_REPORT": report})
        env = self.read_json("report.json")["env"]
        self.assertEqual(env["NEXO_POLLER_EPHEMERAL"], "1")
        self.assertEqual(env["NEXO_POLLER_PLUGIN_ID"], PLUGIN)

    def test_daemon_env_is_inherited(self):
        report = self.path("report.json")
        with mock.patch.dict(os.environ, {"FIXTURE_EXTRA": "from-daemon",
                                          "FIXTURE_REPORT": report}):
            run_mode("echo")
        self.assertEqual(self.read_json("report.json")["env"]["FIXTURE_EXTRA"], "from-daemon")

    def test_daemon_broker_url_is_inherited(self):
        report = self.path("report.json")
        url = "unix://" + self.path("broker.sock")
        with mock.patch.dict(os.environ, {"NEXO_BROKER_URL": url}):
            run_mode("read_all", script=HELPER, env={"FIXTURE_REPORT": report})
        self.assertEqual(self.read_json("report.json")["env"]["NEXO_BROKER_URL"], url)

    def test_extra_env_is_passed(self):
        report = self.path("report.json")
        run_mode("echo", env={"FIXTURE_REPORT": report, "FIXTURE_EXTRA": "from-manifest"})
        env = self.read_json("report.json")["env"]
        self.assertEqual(env["FIXTURE_EXTRA"], "from-manifest")
        self.assertEqual(env["NEXO_POLLER_EPHEMERAL"], "1")

    def test_extra_env_overrides_daemon_env_but_not_nexo_vars(self):
        report = self.path("report.json")
        with mock.patch.dict(os.environ, {"FIXTURE_EXTRA": "from-daemon"}):
            run_mode("read_all", script=HELPER,
                     env={"FIXTURE_REPORT": report, "FIXTURE_EXTRA": "from-manifest",
                          "NEXO_POLLER_PLUGIN_ID": "spoofed",
                          "NEXO_POLLER_EPHEMERAL": "0"})
        env = self.read_json("report.json")["env"]
        self.assertEqual(env["FIXTURE_EXTRA"], "from-manifest")
        self.assertEqual(env["NEXO_POLLER_PLUGIN_ID"], PLUGIN)
        self.assertEqual(env["NEXO_POLLER_EPHEMERAL"], "1")

    def test_args_are_passed(self):
        report = self.path("report.json")
        run_mode("echo", extra_args=["--flag", "two words", ""],
                 env={"FIXTURE_REPORT": report})
        self.assertEqual(self.read_json("report.json")["argv"],
                         ["echo", "--flag", "two words", ""])

    def test_cwd_is_honoured(self):
        report = self.path("report.json")
        workdir = self.path("work")
        os.mkdir(workdir)
        run_mode("echo", cwd=workdir, env={"FIXTURE_REPORT": report})
        self.assertEqual(os.path.realpath(self.read_json("report.json")["cwd"]), workdir)

    def test_timeout_is_transient_and_quick(self):
        exc, elapsed = self.assert_transient_within(
            3.0, run_mode, "sleep", timeout=timedelta(milliseconds=500),
            env={"FIXTURE_SLEEP": "5"})
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertRegex(str(exc), r"(?i)time")

    def test_timeout_kills_a_child_that_ignores_sigterm(self):
        made = self.spy_popen()
        self.assert_transient_within(3.0, run_mode, "ignore_term", timeout=0.5)
        self.assertEqual(len(made), 1)
        self.assertIsNotNone(made[0].returncode)     # killed and reaped
        self.assert_process_gone(made[0].pid)

    def test_cancel_from_timer_is_transient_cancelled_and_quick(self):
        cancel = threading.Event()
        timer = threading.Timer(0.3, cancel.set)
        timer.start()
        self.addCleanup(timer.cancel)
        exc, elapsed = self.assert_transient_within(
            3.0, run_mode, "sleep", timeout=30, cancel=cancel, env={"FIXTURE_SLEEP": "5"})
        self.assertIn("cancel", str(exc).lower())

    def test_cancel_already_set_is_transient_and_quick(self):
        cancel = threading.Event()
        cancel.set()
        exc, _ = self.assert_transient_within(
            3.0, run_mode, "sleep", timeout=30, cancel=cancel, env={"FIXTURE_SLEEP": "5"})
        self.assertIn("cancel", str(exc).lower())

    def test_exit_before_reply_is_transient(self):
        self.assert_transient_within(10.0, run_mode, "exit_early")

    def test_exit_without_reading_a_large_request_is_transient(self):
        request = make_request(config={"blob": "z" * (4 * MIB)})
        self.assert_transient_within(10.0, run_mode, "exit_early", request=request,
                                     env={"FIXTURE_SKIP_READ": "1"})

    def test_partial_line_then_exit_is_transient(self):
        self.assert_transient_within(10.0, run_mode, "partial_line")

    def test_empty_line_is_transient(self):
        self.assert_transient_within(10.0, run_mode, "empty_line")

    def test_not_json_is_transient(self):
        self.assert_transient_within(10.0, run_mode, "not_json")

    def test_error_code_transient(self):
        exc, _ = self.assert_transient_within(
            10.0, run_mode, "error", env={"FIXTURE_CODE": "-32001"})
        self.assertIn("fixture error", str(exc))

    def test_error_code_permanent(self):
        with self.assertRaises(PollerError.Permanent) as cm:
            run_mode("error", env={"FIXTURE_CODE": "-32002"})
        self.assertEqual(cm.exception.classify(), ErrorClass.PERMANENT)
        self.assertIn("fixture error", str(cm.exception))

    def test_error_code_config(self):
        with self.assertRaises(PollerError.Config) as cm:
            run_mode("error", request=make_request("job-cfg"), env={"FIXTURE_CODE": "-32602"})
        self.assertEqual(cm.exception.classify(), ErrorClass.CONFIG)
        self.assertEqual(cm.exception.job, "job-cfg")
        self.assertIn("fixture error", str(cm.exception))

    def test_error_code_unknown_is_transient(self):
        self.assert_transient_within(10.0, run_mode, "error", env={"FIXTURE_CODE": "-32603"})

    def test_error_without_code_is_transient(self):
        exc, _ = self.assert_transient_within(10.0, run_mode, "error_nocode")
        self.assertIn("no code", str(exc))

    def test_bare_result_without_jsonrpc_or_id(self):
        ack = run_mode("bare")
        self.assertEqual(ack.next_cursor, b"hello")
        self.assertIsNone(ack.next_interval_hint)
        self.assertIsNone(ack.metrics)

    def test_bad_cursor_is_transient(self):
        self.assert_transient_within(10.0, run_mode, "bad_cursor")

    def test_padded_cursor_decodes(self):
        self.assertEqual(run_mode("padded_cursor").next_cursor, b"hello")

    # Changed by issue 15: a command that cannot start will not heal by
    # retrying, so it is a Config error (the job pauses with an alert).
    def test_missing_program_is_config_with_path(self):
        missing = self.path("no-such-plugin")
        with self.assertRaises(PollerError.Config) as cm:
            spawn_ephemeral_tick(missing, PLUGIN, make_request(), 10)
        self.assertIn(missing, str(cm.exception))

    def test_non_executable_file_is_config_with_path(self):
        script = self.path("plugin.sh")
        with open(script, "w", encoding="ascii") as f:
            f.write("#!/bin/sh\necho '{\"result\":{}}'\n")
        os.chmod(script, 0o644)
        with self.assertRaises(PollerError.Config) as cm:
            spawn_ephemeral_tick(script, PLUGIN, make_request(), 10)
        self.assertIn(script, str(cm.exception))

    def test_template_plugin_works_and_cursor_advances(self):
        def tick(cursor):
            return spawn_ephemeral_tick(PY, PLUGIN, make_request(cursor=cursor,
                                        config={"next_interval_secs": 30}),
                                        20, args=[TEMPLATE])
        first = tick(None)
        self.assertEqual(first.next_cursor, b"1")
        self.assertEqual(first.metrics, TickMetrics(1, 1))
        self.assertEqual(first.next_interval_hint, timedelta(seconds=30))
        second = tick(first.next_cursor)
        self.assertEqual(second.next_cursor, b"2")
        self.assertEqual(second.metrics, TickMetrics(1, 1))


# ---------------------------------------------------------------------------
# The original's weak points, fixed
# ---------------------------------------------------------------------------

class Fixes(Base):

    def test_child_never_reads_stdin_with_multi_megabyte_request_times_out(self):
        made = self.spy_popen()
        request = make_request(config={"blob": "y" * (8 * MIB)})
        self.assert_transient_within(3.0, run_mode, "noread", timeout=0.5, request=request)
        self.assertIsNotNone(made[0].returncode)

    def test_chatty_stderr_does_not_block_the_reply(self):
        t0 = time.monotonic()
        ack = run_mode("chatty_stderr", timeout=30)
        self.assertLess(time.monotonic() - t0, 10.0)
        self.assertEqual(ack.next_cursor, b"echo:job-1")

    def test_grandchild_holding_stdout_does_not_delay_reply_and_is_killed(self):
        pidfile = self.path("grandchild.pid")
        made = self.spy_popen()
        t0 = time.monotonic()
        ack = run_mode("grandchild", timeout=30, env={"FIXTURE_PIDFILE": pidfile})
        self.assertLess(time.monotonic() - t0, 10.0)
        self.assertEqual(ack.next_cursor, b"echo:job-1")
        self.assertIsNotNone(made[0].returncode)
        self.assert_process_gone(read_pidfile(pidfile))

    def test_timeout_kills_child_and_grandchild(self):
        pidfile = self.path("grandchild.pid")
        made = self.spy_popen()
        # 2 s leaves the child time to start its grandchild and write the pidfile.
        self.assert_transient_within(6.0, run_mode, "grandchild_hang", timeout=2.0,
                                     env={"FIXTURE_PIDFILE": pidfile})
        self.assertTrue(os.path.exists(pidfile), "fixture never started its grandchild")
        self.assertIsNotNone(made[0].returncode)
        self.assert_process_gone(made[0].pid)
        self.assert_process_gone(read_pidfile(pidfile))

    def test_huge_reply_without_newline_hits_the_default_bound(self):
        exc, _ = self.assert_transient_within(3.0, run_mode, "huge_reply", timeout=30)
        self.assertRegex(str(exc), r"%d|1 ?MiB|1024 ?KiB" % nexo_poller.DEFAULT_MAX_REPLY_BYTES)

    def test_long_valid_reply_line_is_accepted_under_a_raised_bound(self):
        ack = run_mode("long_reply", script=HELPER, timeout=30, max_reply_bytes=4 << 20,
                       env={"FIXTURE_PAD_BYTES": str(2 * MIB)})
        self.assertEqual(ack.next_cursor, b"hello")

    def test_long_valid_reply_line_is_rejected_under_the_default_bound(self):
        self.assert_transient_within(10.0, run_mode, "long_reply", script=HELPER,
                                     timeout=30, env={"FIXTURE_PAD_BYTES": str(2 * MIB)})

    def test_flood_stdout_ends_transient_quickly(self):
        self.assert_transient_within(3.0, run_mode, "flood_stdout", timeout=30)

    def test_no_zombies_and_no_leaked_fds_after_many_ticks(self):
        modes = ("echo", "exit_early", "not_json", "timeout")

        def one(i):
            mode = modes[i % len(modes)]
            req = make_request(f"job-{i}")
            try:
                if mode == "timeout":
                    ack = run_mode("noread", timeout=0.1, request=req)
                else:
                    ack = run_mode(mode, timeout=30, request=req)
            except PollerError.Transient:
                return mode, "transient"
            return mode, ack.next_cursor

        # Warm up once so lazily opened fds (e.g. /dev/urandom) are not counted.
        one(0)
        fds_before, kids_before = fd_count(), child_pids()
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(one, range(MANY_TICKS)))
        fds_after, kids_after = fd_count(), child_pids()

        for i, (mode, outcome) in enumerate(results):
            want = b"echo:job-%d" % i if mode == "echo" else "transient"
            self.assertEqual(outcome, want, f"tick {i} ({mode})")
        self.assertEqual(kids_after, kids_before)
        self.assertEqual(fds_after, fds_before)


# ---------------------------------------------------------------------------
# EphemeralPollerProxy and max_concurrent_ticks
# ---------------------------------------------------------------------------

def make_handle(*, args=(), env=None, cwd=None, command=PY, max_ticks=1, timeout=20.0):
    return PluginPollerHandle(
        plugin_id="proxy.plugin", kinds=("rss",), broker_topic_prefix="plugin.poller.rss",
        lifecycle=Lifecycle.EPHEMERAL, max_concurrent_ticks=max_ticks,
        tick_timeout=timedelta(seconds=timeout), entrypoint_command=command,
        entrypoint_args=tuple(args), entrypoint_env=dict(env or {}), working_dir=cwd)


def make_ctx(job_id="job-1", cursor=None, config=None):
    return PollContext(job_id=job_id, agent_id="agent-1", kind="rss", cursor=cursor,
                       config={"feed": "x"} if config is None else config, now=NOW,
                       interval_hint=timedelta(seconds=60))


class Proxy(Base):

    def test_handle_without_entrypoint_command_is_config(self):
        handle = make_handle(command=None)
        with self.assertRaises(PollerError.Config) as cm:
            EphemeralPollerProxy("rss", handle).tick(make_ctx("job-x"))
        self.assertEqual(cm.exception.job, "job-x")
        self.assertEqual(cm.exception.classify(), ErrorClass.CONFIG)

    def test_proxy_honours_entrypoint_args_env_and_working_dir(self):
        report = self.path("report.json")
        workdir = self.path("plugin-home")
        os.mkdir(workdir)
        handle = make_handle(args=(MISBEHAVE, "echo", "--extra"), cwd=workdir,
                             env={"FIXTURE_REPORT": report, "FIXTURE_EXTRA": "manifest"})
        ack = EphemeralPollerProxy("rss", handle).tick(make_ctx("job-p"))
        self.assertEqual(ack.next_cursor, b"echo:job-p")
        info = self.read_json("report.json")
        self.assertEqual(info["argv"], ["echo", "--extra"])
        self.assertEqual(os.path.realpath(info["cwd"]), workdir)
        self.assertEqual(info["env"], {"NEXO_POLLER_EPHEMERAL": "1",
                                       "NEXO_POLLER_PLUGIN_ID": "proxy.plugin",
                                       "FIXTURE_EXTRA": "manifest"})

    def test_proxy_honours_tick_timeout(self):
        handle = make_handle(args=(MISBEHAVE, "sleep"), env={"FIXTURE_SLEEP": "5"},
                             timeout=0.5)
        self.assert_transient_within(3.0, EphemeralPollerProxy("rss", handle).tick, make_ctx())

    def test_proxy_honours_ctx_cancel(self):
        handle = make_handle(args=(MISBEHAVE, "sleep"), env={"FIXTURE_SLEEP": "5"})
        ctx = make_ctx()
        timer = threading.Timer(0.3, ctx.cancel.set)
        timer.start()
        self.addCleanup(timer.cancel)
        exc, _ = self.assert_transient_within(3.0, EphemeralPollerProxy("rss", handle).tick, ctx)
        self.assertIn("cancel", str(exc).lower())

    def _two_concurrent_ticks(self, max_ticks, sleep):
        stamps = self.path("stamps.txt")
        handle = make_handle(args=(HELPER, "stamp"), max_ticks=max_ticks,
                             env={"FIXTURE_STAMPS": stamps, "FIXTURE_SLEEP": str(sleep)})
        proxy = EphemeralPollerProxy("rss", handle)
        barrier = threading.Barrier(2)

        def run(i):
            barrier.wait(10)
            return proxy.tick(make_ctx(f"job-{i}"))

        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            acks = list(pool.map(run, range(2)))
        self.assertEqual(len(acks), 2)
        with open(stamps, encoding="ascii") as f:
            spans = sorted(tuple(map(float, line.split())) for line in f if line.strip())
        self.assertEqual(len(spans), 2)
        return spans

    def test_max_concurrent_ticks_one_never_overlaps(self):
        (s1, e1), (s2, e2) = self._two_concurrent_ticks(1, 0.5)
        self.assertGreaterEqual(s2, e1, f"ticks overlapped: {s1}-{e1} and {s2}-{e2}")

    def test_max_concurrent_ticks_two_does_overlap(self):
        # Control for the test above: the stamps do show overlap when allowed.
        (s1, e1), (s2, e2) = self._two_concurrent_ticks(2, 1.5)
        self.assertLess(s2, e1, f"ticks did not overlap: {s1}-{e1} and {s2}-{e2}")

    def test_waiting_for_a_slot_longer_than_tick_timeout_is_transient(self):
        report = self.path("report.json")
        handle = make_handle(args=(MISBEHAVE, "echo"), env={"FIXTURE_REPORT": report},
                             timeout=0.5)
        proxy = EphemeralPollerProxy("rss", handle)
        # Stand in for another tick of the same plugin holding the only slot.
        self.assertTrue(handle.slots.acquire(0))
        try:
            exc, elapsed = self.assert_transient_within(3.0, proxy.tick, make_ctx())
        finally:
            handle.slots.release()
        self.assertGreaterEqual(elapsed, 0.4)
        self.assertIn("slot", str(exc))
        self.assertFalse(os.path.exists(report), "the plugin ran without a slot")
        # The slot is usable again once freed.
        self.assertEqual(proxy.tick(make_ctx("job-2")).next_cursor, b"echo:job-2")

    def test_cancel_while_waiting_for_a_slot_is_transient_and_quick(self):
        handle = make_handle(args=(MISBEHAVE, "echo"), timeout=30)
        ctx = make_ctx()
        self.assertTrue(handle.slots.acquire(0))
        timer = threading.Timer(0.2, ctx.cancel.set)
        timer.start()
        self.addCleanup(timer.cancel)
        try:
            exc, _ = self.assert_transient_within(
                3.0, EphemeralPollerProxy("rss", handle).tick, ctx)
        finally:
            handle.slots.release()
        self.assertIn("cancel", str(exc).lower())

    def test_failed_tick_releases_its_slot(self):
        handle = make_handle(args=(MISBEHAVE, "exit_early"), timeout=5)
        proxy = EphemeralPollerProxy("rss", handle)
        for _ in range(3):
            # Each would wait the full tick timeout for a slot if one leaked.
            self.assert_transient_within(4.0, proxy.tick, make_ctx())


class AdminSecretsStayHome(Base):
    """The admin API's token (and any NEXO_POLLER_ADMIN_* setting) is the
    operator's, not the plugins': a plugin holding it could pause or reset
    any job (review finding 6)."""

    ADMIN = {"NEXO_POLLER_ADMIN_TOKEN": "s3cret", "NEXO_POLLER_ADMIN_URL": "http://127.0.0.1:1"}

    def test_a_plugin_does_not_get_the_admin_token(self):
        report = self.path("report.json")
        with mock.patch.dict(os.environ, {**self.ADMIN, "FIXTURE_EXTRA": "from-daemon"}):
            run_mode("read_all", script=HELPER, env={"FIXTURE_REPORT": report})
        env = self.read_json("report.json")["env"]
        self.assertEqual([k for k in env if k.startswith("NEXO_POLLER_ADMIN")], [])
        self.assertEqual(env["FIXTURE_EXTRA"], "from-daemon")     # the rest is inherited

    def test_no_lifecycle_passes_it_on(self):
        # Every plugin process (ephemeral or long-lived) gets _child_env's.
        with mock.patch.dict(os.environ, self.ADMIN):
            env = nexo_poller._child_env("p", {"X": "1"})
        self.assertEqual([k for k in env if k.startswith("NEXO_POLLER_ADMIN")], [])
        self.assertEqual(env["X"], "1")


if __name__ == "__main__":
    unittest.main()
