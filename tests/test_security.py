"""Worst-day security checks.

* The broker socket (0600) and its folder (0700) are private; another uid is
  refused by file permissions, and, with permissions opened up, by the
  broker's SO_PEERCRED check (needs root: the test forks and setuid()s).
* Entrypoints run without a shell, with exactly the daemon's environment plus
  the manifest's env plus the NEXO_* variables of their lifecycle.
* A job's config (secrets) never reaches the daemon's log, even at debug.
* A manifest cannot make the daemon run a program it does not name.
* State and socket files are created private, whatever the umask.
"""

import json
import os
import random
import re
import signal
import socket
import stat
import sys
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures"))

import worstday as wd  # noqa: E402
import nexo_poller as nx  # noqa: E402
from nexo_poller import Lifecycle, PollerError  # noqa: E402

NOW = datetime(2026, 5, 17, 10, 0, 0, tzinfo=timezone.utc)
NOBODY = 65534
ROOT_ONLY = unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0,
                                "needs root to setuid() to another user")


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


class SecurityCase(unittest.TestCase):
    def setUp(self):
        self.seed = wd.seed_for(self.id())
        self.rng = random.Random(self.seed)
        self.token = "sec-%d-%d" % (os.getpid(), time.monotonic_ns())
        self.tmp = wd.TempDir("worstsec-")
        self.addCleanup(self.tmp.cleanup)
        self.addCleanup(wd.kill_tagged, self.token)

    def as_nobody(self, fn):
        """Run ``fn()`` in a forked child with uid/gid 65534; returns its result
        (a short string) or raises on a child failure."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                  # the child: no exceptions escape
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                out = fn()
            except BaseException as exc:              # noqa: BLE001
                out = "child-error %s: %s" % (type(exc).__name__, exc)
            try:
                os.write(w, out.encode()[:4000])
            finally:
                os._exit(0)
        os.close(w)
        chunks = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            data = os.read(r, 4096)
            if not data:
                break
            chunks.append(data)
        os.close(r)
        os.waitpid(pid, 0)
        return b"".join(chunks).decode()


# ============================================================================
# The broker socket
# ============================================================================

def try_connect(path):
    """As the child: connect, ping, and say what happened."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        return _ping_over(s, path)


def _ping_over(s, path):
    s.settimeout(5)
    try:
        s.connect(path)
    except PermissionError:
        return "refused-by-permissions"
    except OSError as exc:
        return "connect-error %s" % exc
    try:
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
        data = s.recv(4096)
    except socket.timeout:
        return "no-answer"
    except OSError as exc:
        return "closed-with-error %s" % exc.errno
    finally:
        s.close()
    return "closed" if not data else "served %r" % data[:100]


def ping_ok(server):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.path)
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
    data = s.recv(4096)
    s.close()
    return json.loads(data).get("result") == "pong"


class TestBrokerSocket(SecurityCase):

    def test_socket_and_folder_are_private_whatever_the_umask(self):
        for umask in (0o022, 0o000):
            with self.subTest(umask=oct(umask)):
                old = os.umask(umask)
                try:
                    own = nx.BrokerServer().start()
                    configured = nx.BrokerServer(self.tmp.join("new-%o" % umask, "deeper",
                                                               "b.sock")).start()
                finally:
                    os.umask(old)
                try:
                    for server in (own, configured):
                        self.assertEqual(mode(server.path), 0o600, server.path)
                        self.assertEqual(mode(os.path.dirname(server.path)), 0o700, server.path)
                        self.assertTrue(stat.S_ISSOCK(os.lstat(server.path).st_mode))
                finally:
                    own.close()
                    configured.close()

    @ROOT_ONLY
    def test_other_uid_is_refused_by_permissions(self):
        server = nx.BrokerServer().start()
        self.addCleanup(server.close)
        self.assertEqual(self.as_nobody(lambda: try_connect(server.path)),
                         "refused-by-permissions")
        self.assertTrue(ping_ok(server))

    @ROOT_ONLY
    def test_other_uid_is_refused_by_peer_credentials(self):
        server = nx.BrokerServer().start()
        self.addCleanup(server.close)
        os.chmod(os.path.dirname(server.path), 0o755)
        os.chmod(server.path, 0o777)
        before = server.stats()["connections"]
        got = self.as_nobody(lambda: try_connect(server.path))
        self.assertIn(got, ("closed", "closed-with-error 104", "closed-with-error 32"),
                      "uid %d got through the broker's SO_PEERCRED check: %s" % (NOBODY, got))
        self.assertTrue(server._thread.is_alive())
        self.assertTrue(ping_ok(server), "the owner must still be served")
        self.assertTrue(wd.wait_until(lambda: server.stats()["connections"] == before, 5),
                        server.stats())


class TestReplySpoofing(SecurityCase):

    def test_only_a_peer_that_was_asked_can_answer(self):
        # Long-lived plugins share the broker.  Inbox numbers are sequential, so
        # any client can predict the next one; the broker must still take a reply
        # only from a peer the request was delivered to, or one plugin could
        # answer another plugin's ticks (and plant cursors).
        server = nx.BrokerServer().start()
        self.addCleanup(server.close)

        def conn():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(server.path)
            s.settimeout(5)
            self.addCleanup(s.close)
            return s, s.makefile("rb")

        def send(s, obj):
            s.sendall(json.dumps(obj).encode() + b"\n")

        def read(f):
            return json.loads(f.readline())
        responder, rf = conn()
        send(responder, {"jsonrpc": "2.0", "id": 1, "method": "subscribe",
                         "params": {"topic": "victim.tick", "sid": 1}})
        self.assertEqual(read(rf)["result"], True)
        evil, ef = conn()
        send(evil, {"jsonrpc": "2.0", "id": 1, "method": "subscribe",
                    "params": {"topic": "evil.self", "sid": 1}})
        read(ef)
        send(evil, {"jsonrpc": "2.0", "id": 2, "method": "request",
                    "params": {"topic": "evil.self", "payload": 0, "timeout_ms": 100}})
        own = read(ef)["params"]["inbox"]
        requester = server.client()
        self.addCleanup(requester.close)
        box = {}
        t = threading.Thread(target=lambda: box.update(
            r=requester.request("victim.tick", {"tick": 1}, 5)))
        t.start()
        delivered = read(rf)["params"]["inbox"]
        for guess in range(own + 1, own + 4):
            send(evil, {"jsonrpc": "2.0", "method": "reply",
                        "params": {"inbox": guess, "payload": {"next_cursor": "spoofed"}}})
        time.sleep(0.2)
        send(responder, {"jsonrpc": "2.0", "method": "reply",
                         "params": {"inbox": delivered, "payload": {"next_cursor": "genuine"}}})
        t.join(10)
        self.assertEqual(box.get("r"), {"next_cursor": "genuine"},
                         "a client that was never asked answered the request "
                         "(inbox %d, predicted from %d)" % (delivered, own))


# ============================================================================
# Entrypoints: no shell, exact environment, only the named program
# ============================================================================

META = ["; touch {x}", "$(touch {x})", "`touch {x}`", "&& touch {x}", "| touch {x}",
        "{x}' ; touch '{x}", "*", "$HOME", "a\nb", "--startup=nope"]


class TestEntrypoints(SecurityCase):

    def eph_tick(self, command, args=(), env=None, cwd=None):
        request = nx.build_tick_request("sec", "job", "agent", None, {}, NOW, 60)
        try:
            return nx.spawn_ephemeral_tick(command, "sec", request, 10, args=args,
                                           env=env, cwd=cwd or self.tmp.path)
        except PollerError as exc:
            return exc

    def test_a_command_string_is_not_given_to_a_shell(self):
        marker = self.tmp.join("pwned")
        for command in ("/bin/true; touch %s" % marker, "sh -c 'touch %s'" % marker,
                        "$(touch %s)" % marker, "/bin/true && touch %s" % marker):
            with self.subTest(command=command):
                result = self.eph_tick(command)     # no such program: Config (issue 15)
                self.assertIsInstance(result, PollerError.Config, repr(result))
                self.assertFalse(os.path.exists(marker), "a shell ran %r" % command)

    def test_arguments_reach_the_plugin_verbatim_in_both_lifecycles(self):
        marker = self.tmp.join("pwned")
        args = [a.format(x=marker) for a in META]
        dumps = self.tmp.join("dumps")
        os.mkdir(dumps)
        env = {wd.TOKEN_VAR: self.token, "WORST_ENV_DUMP": dumps}
        result = self.eph_tick(wd.PY, [wd.WORST] + args, env=env)
        self.assertIsInstance(result, nx.TickAck, repr(result))
        handle = nx.PluginPollerHandle(
            plugin_id="sec_lived", kinds=("sec_lived",), broker_topic_prefix="sec.lived",
            lifecycle=Lifecycle.LONG_LIVED, entrypoint_command=wd.PY,
            entrypoint_args=(wd.WORST, *args), entrypoint_env=env, working_dir=self.tmp.path)
        with nx.BrokerServer() as server:
            sup = nx.PluginSupervisor(handle, server.url, stop_grace=2).start()
            try:
                self.assertTrue(wd.wait_until(
                    lambda: server.has_subscriber(handle.tick_topic()), 15))
            finally:
                sup.stop()
        files = sorted(os.listdir(dumps))
        self.assertEqual(len(files), 2, files)
        for name in files:
            with open(os.path.join(dumps, name)) as f:
                self.assertEqual(json.load(f)["argv"], args, name)
        self.assertFalse(os.path.exists(marker), "an argument was interpreted by a shell")

    def test_environment_is_exactly_daemon_plus_manifest_plus_nexo(self):
        dumps = self.tmp.join("dumps")
        os.mkdir(dumps)
        daemon_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.tmp.path,
                      "LC_ALL": "C.UTF-8", wd.TOKEN_VAR: self.token,
                      "DAEMON_ONLY": "from the daemon", "SHADOWED": "daemon value",
                      "EMPTY_VAR": "", "WITH_EQUALS": "a=b=c"}
        manifest_env = {"WORST_ENV_DUMP": dumps, "SHADOWED": "manifest value",
                        "MANIFEST_ONLY": "x y", "NEXO_POLLER_PLUGIN_ID": "spoofed"}
        wd.write_manifest(self.tmp.join("p", "eph"), "env_eph", ["env_eph"],
                          lifecycle="ephemeral", env=manifest_env)
        wd.write_manifest(self.tmp.join("p", "lived"), "env_lived", ["env_lived"],
                          lifecycle="long_lived",
                          env=dict(manifest_env, NEXO_POLLER_TICK_TOPIC="spoofed.topic",
                                   NEXO_BROKER_URL="unix:///spoofed"))
        config = wd.write_config(self.tmp.join("pollers.json"), {
            "state_db": "state/poller.db", "broker": "unix://run/broker.sock",
            "default_jitter_ms": 0, "plugins": ["p/eph", "p/lived"],
            "jobs": [wd.every_job("je", "env_eph", 30), wd.every_job("jl", "env_lived", 30)]})
        d = wd.Daemon(config, cwd=self.tmp.path, env=daemon_env)
        try:
            d.wait_started()
            ok = wd.wait_until(lambda: {"je", "jl"} <= {r["job"] for r in d.ticks(outcome="ok")},
                               30)
            self.assertTrue(ok, d.tail())
            d.signal(signal.SIGTERM)
            self.assertEqual(d.wait(20), 0, d.tail())
        finally:
            d.cleanup()
        got = {}
        for name in os.listdir(dumps):
            with open(os.path.join(dumps, name)) as f:
                got[name.split("-")[1]] = json.load(f)["env"]
        self.assertEqual(set(got), {"ephemeral", "long_lived"}, sorted(os.listdir(dumps)))
        # issue 15: the module's folder leads PYTHONPATH; NEXO_PYTHON is the daemon's Python
        python = dict(PYTHONPATH=os.path.dirname(os.path.abspath(nx.__file__)),
                      NEXO_PYTHON=got["ephemeral"].get("NEXO_PYTHON", "?"))
        self.assertTrue(os.path.isabs(python["NEXO_PYTHON"]), python)
        want_eph = dict(daemon_env, **manifest_env, **python)
        want_eph.update(NEXO_POLLER_PLUGIN_ID="env_eph", NEXO_POLLER_EPHEMERAL="1")
        self.assertEqual(got["ephemeral"], want_eph)
        want_lived = dict(daemon_env, **manifest_env, **python)
        want_lived.update(NEXO_POLLER_PLUGIN_ID="env_lived",
                          NEXO_POLLER_TICK_TOPIC="plugin.poller.env_lived.tick",
                          NEXO_BROKER_URL="unix://" + self.tmp.join("run", "broker.sock"),
                          NEXO_POLLER_LIFELINE="stdin")
        self.assertEqual(got["long_lived"], want_lived)

    def test_a_manifest_cannot_run_a_program_it_does_not_name(self):
        folder = self.tmp.join("plugin")
        elsewhere = self.tmp.join("cwd")
        for d in (folder, elsewhere, os.path.join(elsewhere, "bin"),
                  os.path.join(folder, "bin")):
            os.makedirs(d, exist_ok=True)
        name = "nexo-probe-%d" % os.getpid()

        def probe(path, marker):
            with open(path, "w") as f:
                f.write("#!/bin/sh\ntouch '%s'\nIFS= read -r _r\n"
                        "echo '{\"result\":{}}'\n" % marker)
            os.chmod(path, 0o755)
        probe(os.path.join(folder, name), self.tmp.join("ran-bare-in-manifest-folder"))
        probe(os.path.join(elsewhere, name), self.tmp.join("ran-bare-in-cwd"))
        probe(os.path.join(folder, "bin", "run"), self.tmp.join("ran-manifest-relative"))
        probe(os.path.join(elsewhere, "bin", "run"), self.tmp.join("ran-cwd-relative"))

        def manifest(command):
            wd.write_manifest(folder, "probe", ["probe_kind"], command=command, args=[])
            return nx.load_manifest(os.path.join(folder, "nexo-plugin.toml"))

        old = os.getcwd()
        os.chdir(elsewhere)
        try:
            # A bare name is looked up on PATH only: not in the manifest's folder
            # (the plugin's cwd), not in the daemon's cwd.
            h = manifest(name)
            proxy = nx.EphemeralPollerProxy("probe_kind", h)
            ctx = nx.PollContext("j", "a", "probe_kind", None, {}, NOW, timedelta(seconds=60))
            with self.assertRaises(PollerError.Config):     # not on PATH (issue 15)
                proxy.tick(ctx)
            # A relative path with a slash means the manifest's folder.
            h = manifest("bin/run")
            self.assertEqual(h.entrypoint_command, os.path.join(folder, "bin", "run"))
            self.assertIsInstance(nx.EphemeralPollerProxy("probe_kind", h).tick(ctx), nx.TickAck)
        finally:
            os.chdir(old)
        ran = sorted(n for n in os.listdir(self.tmp.path) if n.startswith("ran-"))
        self.assertEqual(ran, ["ran-manifest-relative"])

    def test_a_manifest_rejects_a_nul_byte_in_what_it_would_execute(self):
        # A NUL cannot be passed to exec: such a manifest must be refused up front,
        # as it is for [plugin.entrypoint.env].
        head = '[plugin]\nid = "nul"\n[plugin.entrypoint]\n'
        tail = ('[plugin.poller]\nkinds = ["nul_kind"]\nbroker_topic_prefix = "x"\n'
                'lifecycle = "ephemeral"\n')
        for name, entry in (("command", 'command = "/bin/true\\u0000; rm -rf /"\n'),
                            ("args", 'command = "/bin/true"\nargs = ["a\\u0000b"]\n')):
            with self.subTest(key=name):
                path = self.tmp.join("nul-%s.toml" % name)
                with open(path, "w") as f:
                    f.write(head + entry + tail)
                with self.assertRaises(nx.ManifestError):
                    nx.load_manifest(path)


# ============================================================================
# Secrets in job config never logged
# ============================================================================

class TestSecrets(SecurityCase):

    def test_job_config_never_appears_in_debug_logs(self):
        secret = "s3cr3t-%016x" % self.rng.getrandbits(64)
        wd.write_manifest(self.tmp.join("p", "eph"), "sec_eph", ["sec_eph"],
                          lifecycle="ephemeral", timeout_secs=1, max_concurrent=8,
                          env={wd.TOKEN_VAR: self.token})
        wd.write_manifest(self.tmp.join("p", "lived"), "sec_lived", ["sec_lived"],
                          lifecycle="long_lived", timeout_secs=1, max_concurrent=8,
                          env={wd.TOKEN_VAR: self.token})
        faults = ["ok", "error", "notjson", "badcursor", "crash", "hang", "partial",
                  "flood_stderr"]
        jobs = []
        for kind in ("sec_eph", "sec_lived"):
            for fault in faults:
                cfg = {"api_key": secret, "nested": {"password": secret, "list": [secret]},
                       "fault": fault, "mb": 1}
                if fault in ("crash", "hang", "partial"):     # once: keep the plugin up
                    cfg["once_file"] = self.tmp.join("once-%s-%s" % (kind, fault))
                jobs.append(wd.every_job("%s-%s" % (kind, fault), kind, 0.5, cfg))
            jobs.append(wd.every_job("%s-perm" % kind, kind, 0.5,
                                     {"fault": "error", "code": -32002, "token": secret}))
            jobs.append(wd.every_job("%s-conf" % kind, kind, 0.5,
                                     {"fault": "error", "code": -32602, "token": secret}))
        doc = {"default_jitter_ms": 0, "backoff_initial_secs": 0.2,
               "backoff_max_secs": 0.5, "breaker_threshold": 2, "failure_alert_cooldown_secs": 0,
               "plugins": ["p/eph", "p/lived"], "jobs": jobs}
        tick_re = re.compile(r"tick job=(\S+) kind=\S+ outcome=(\w+)")
        for fmt in ("text", "json"):
            for f in os.listdir(self.tmp.path):
                if f.startswith("once-"):
                    os.unlink(self.tmp.join(f))

            def outcomes():
                seen = {}
                for job, outcome in tick_re.findall(d.text()):
                    seen.setdefault(job, set()).add(outcome)
                return seen

            def every_job_done():
                seen = outcomes()
                return all(seen.get(j["id"], set()) - {"cancelled"} for j in jobs)
            with self.subTest(log_format=fmt):
                config = wd.write_config(self.tmp.join("pollers-%s.json" % fmt), dict(
                    doc, state_db="state-%s/poller.db" % fmt))
                d = wd.Daemon(config, cwd=self.tmp.path, env=wd.daemon_env(self.token),
                              log_level="debug", log_format=fmt)
                try:
                    done = wd.wait_until(every_job_done, 40)
                    d.signal(signal.SIGTERM)
                    self.assertEqual(d.wait(30), 0, d.tail())
                finally:
                    d.cleanup()
                text = d.text()
                self.assertTrue(done, "not every job ticked: %s" % outcomes())
                self.assertIn("DEBUG" if fmt == "text" else '"level":"debug"', text)
                self.assertNotIn(secret, text, "a job's config reached the log (%s)" % fmt)
                self.assertNotIn("s3cr3t", text)


# ============================================================================
# Private state and socket files
# ============================================================================

class TestPrivateFiles(SecurityCase):

    def test_state_store_files_are_private_whatever_the_umask(self):
        for umask in (0o022, 0o000):
            with self.subTest(umask=oct(umask)):
                old = os.umask(umask)
                try:
                    path = self.tmp.join("state-%o" % umask, "poller.db")
                    store = nx.SqliteStateStore(path)
                    store.claim({"a": 1.0}, 0.0)
                    files = [path, path + "-wal", path + "-shm"]
                    for f in files:
                        self.assertTrue(os.path.exists(f), f)
                        self.assertEqual(mode(f), 0o600, f)
                    self.assertEqual(mode(os.path.dirname(path)), 0o700)
                    store.close()
                finally:
                    os.umask(old)

    def test_daemon_creates_private_state_and_socket_under_umask_0(self):
        wd.write_manifest(self.tmp.join("p", "lived"), "priv_lived", ["priv_lived"],
                          lifecycle="long_lived", env={wd.TOKEN_VAR: self.token})
        config = wd.write_config(self.tmp.join("pollers.json"), {
            "state_db": "state/sub/poller.db", "broker": "unix://run/sub/broker.sock",
            "default_jitter_ms": 0, "plugins": ["p/lived"],
            "jobs": [wd.every_job("j", "priv_lived", 0.2)]})
        import subprocess
        log = open(self.tmp.join("daemon.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen([wd.PY, wd.MODULE, "--config", config, "--log-format", "json",
                                 "run"], cwd=self.tmp.path, env=wd.daemon_env(self.token),
                                stdout=log, stderr=subprocess.STDOUT, umask=0,
                                start_new_session=True)
        try:
            db = self.tmp.join("state", "sub", "poller.db")
            sock = self.tmp.join("run", "sub", "broker.sock")
            def logged():
                with open(log.name, "rb") as f:
                    return f.read()
            ready = wd.wait_until(lambda: os.path.exists(db + "-wal") and os.path.exists(sock)
                                  and b'"outcome":"ok"' in logged(), 30)
            self.assertTrue(ready, logged()[-2000:])
            for path, want in ((db, 0o600), (db + "-wal", 0o600), (db + "-shm", 0o600),
                               (os.path.dirname(db), 0o700), (sock, 0o600),
                               (os.path.dirname(sock), 0o700)):
                self.assertEqual(mode(path), want, "%s is %o" % (path, mode(path)))
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


if __name__ == "__main__":
    unittest.main()
