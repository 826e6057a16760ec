"""Helpers shared by the tests: the paths of the module and its fixture
plugin, cursor codecs, polling with a deadline, process checks, the one
manifest writer, a test case with its own temporary folder, and the one
fake in-process poller.  (Not a test module: discovery skips it; test
files put this folder on sys.path to import it.)"""

import base64
import json
import logging
import os
import sys
import tempfile
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEXO = os.path.join(ROOT, "nexo_poller.py")
LAUNCHER = os.path.join(ROOT, "nexo-poller")      # ./nexo-poller: imports NEXO, runs main
PLUGIN = os.path.join(ROOT, "tests", "fixtures", "e2e_counter_plugin.py")
PY = sys.executable
if ROOT not in sys.path:            # FakePoller answers with the module's TickAck
    sys.path.insert(0, ROOT)


def _cache_bytecode() -> None:
    """Write nexo_poller's cached bytecode (__pycache__, git-ignored) once
    per run, even under PYTHONDONTWRITEBYTECODE (it stops writing, not
    reading): every plugin fixture, SDK plugin and launcher the tests start
    imports the module, and compiling its ~10,000 lines costs each of them
    about 0.2 s.  A read-only checkout just goes without."""
    import py_compile
    try:
        py_compile.compile(NEXO, doraise=True)
    except (py_compile.PyCompileError, OSError):
        pass


_cache_bytecode()


def b64(raw: bytes) -> str:
    """A cursor as it travels on the wire: URL-safe base64, no padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def q(text: str) -> str:
    """A TOML basic string (JSON's escapes are a subset TOML accepts)."""
    return json.dumps(text)


def wait_until(pred, timeout: float = 15.0, interval: float = 0.01):
    """Poll ``pred`` until it returns something truthy; that value, or None
    at the deadline.  Only for state no event reports (another process,
    the broker's bookkeeping)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def main_in_process(argv) -> tuple[int, str, str]:
    """``nexo_poller.main(argv)`` in this process: (exit code, stdout,
    stderr).  The root logger's handlers are put back and nexo_poller's
    logger quietened after (main configures logging for its run)."""
    import contextlib
    import io
    from nexo_poller import main
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers = list(root.handlers)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    root.handlers[:] = handlers
    logging.getLogger("nexo_poller").setLevel(logging.CRITICAL)
    return code, out.getvalue(), err.getvalue()


def pid_gone(pid: int) -> bool:
    """True when the process no longer exists or is only a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return True
    return data[data.rindex(")") + 2:].split()[0] in ("Z", "X")


def write_config(path: str, doc) -> str:
    """Replace ``path`` at once with ``doc`` (a dict as JSON, or text), so a
    daemon reloading it never reads half a file; returns ``path``."""
    text = doc if isinstance(doc, str) else json.dumps(doc, indent=2)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_plugin_manifest(folder: str, plugin_id: str, kinds, *, command: str, args=(),
                          lifecycle: str = "ephemeral", env: dict | None = None,
                          max_concurrent_ticks: int | None = None,
                          tick_timeout_secs: int = 20, prefix: str | None = None,
                          version: str | None = "0.0.1", entrypoint_extra: str = "",
                          poller_extra: str = "") -> str:
    """Write ``folder/nexo-plugin.toml``; returns its path.  The topic
    prefix defaults to plugin.poller.<plugin_id>; ``entrypoint_extra`` and
    ``poller_extra`` are raw TOML added to ``[plugin.entrypoint]`` and
    ``[plugin.poller]``; a ``None`` version or limit leaves the key out."""
    os.makedirs(folder, exist_ok=True)
    lines = ["[plugin]", f"id = {q(plugin_id)}"]
    if version is not None:
        lines.append(f"version = {q(version)}")
    lines += ["", "[plugin.entrypoint]", f"command = {q(command)}",
              f"args = [{', '.join(q(a) for a in args)}]", entrypoint_extra]
    if env:
        lines += ["", "[plugin.entrypoint.env]"]
        lines += [f"{q(k)} = {q(v)}" for k, v in env.items()]
    lines += ["", "[plugin.poller]", f"kinds = [{', '.join(q(k) for k in kinds)}]",
              f"broker_topic_prefix = {q(prefix or 'plugin.poller.' + plugin_id)}",
              f"lifecycle = {q(lifecycle)}"]
    if max_concurrent_ticks is not None:
        lines.append(f"max_concurrent_ticks = {max_concurrent_ticks}")
    lines += [f"tick_timeout_secs = {tick_timeout_secs}", poller_extra, ""]
    path = os.path.join(folder, "nexo-plugin.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def write_manifest(root: str, name: str, kind: str, **options) -> str:
    """Write plugins/<name>/nexo-plugin.toml (id ``name``, one kind, topic
    prefix plugin.poller.<name>; ``options`` as write_plugin_manifest's);
    returns the folder relative to ``root``."""
    write_plugin_manifest(os.path.join(root, "plugins", name), name, [kind], **options)
    return os.path.join("plugins", name)


def write_counter_plugin(root: str, name: str, kind: str, lifecycle: str, pid_file: str,
                         max_concurrent_ticks: int) -> str:
    """Write plugins/<name>/nexo-plugin.toml for the counter fixture; returns
    the folder relative to ``root``."""
    return write_manifest(root, name, kind, command=PY, args=(PLUGIN, kind),
                          lifecycle=lifecycle, env={"E2E_PID_FILE": pid_file},
                          max_concurrent_ticks=max_concurrent_ticks)


def quiet_log(test: unittest.TestCase) -> None:
    """nexo_poller's logger at CRITICAL for the rest of ``test`` (assertLogs
    lowers it where a test reads the log)."""
    logger = logging.getLogger("nexo_poller")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    test.addCleanup(logger.setLevel, level)


class TempDirCase(unittest.TestCase):
    """A test with its own temporary folder ``self.dir`` (removed after
    everything else the test cleans up) and ``self.db``, a state database
    path in it; nexo_poller's logger is quiet unless ``quiet`` is False."""

    tmp_prefix = "nexo-test-"
    quiet = True
    tmp_cleanup_errors_ok = False   # a process of the test may still write into it

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory(prefix=self.tmp_prefix,
                                          ignore_cleanup_errors=self.tmp_cleanup_errors_ok)
        self.addCleanup(tmp.cleanup)
        self.dir = os.path.realpath(tmp.name)
        self.db = os.path.join(self.dir, "s.db")
        if self.quiet:
            quiet_log(self)

    def runner_config(self, jobs, *, extra_kinds=("mem",), base_dir=None, **top):
        """A DaemonConfig on ``self.db`` with ``jobs``: no jitter, a 3 s
        shutdown grace; ``top`` adds or overrides top-level keys."""
        from nexo_poller import config_from_dict
        doc = {"state_db": self.db, "default_jitter_ms": 0, "shutdown_grace_secs": 3,
               "jobs": jobs}
        doc.update(top)
        return config_from_dict(doc, base_dir=self.dir if base_dir is None else base_dir,
                                extra_kinds=list(extra_kinds))

    def start_runner(self, cfg, *pollers, start=True, **options):
        """A Runner on ``cfg`` (``options`` to its constructor) with ``pollers``
        registered, stopped when the test ends; started in the foreground
        (the test fires its ticks) unless ``start`` is False."""
        from nexo_poller import Runner
        r = Runner(cfg, **options)
        for p in pollers:
            r.register(p)
        self.addCleanup(r.stop)
        if start:
            r.start(background=False)
        return r


def count_ticks(ctx):
    """A FakePoller step: the cursor counts the job's ticks (b"1", b"2", ...)."""
    from nexo_poller import TickAck
    return TickAck(next_cursor=str(int(ctx.cursor or b"0") + 1).encode())


class FakePoller:
    """The in-process poller of the tests.  ``script`` maps a job id to a
    list of steps, each a TickAck, an exception (raised) or a callable(ctx)
    returning either; when a job's list runs out, ``default`` (a step too;
    TickAck() when not given) is used.  Records every context it ticked."""

    def __init__(self, kind="mem", default=None, script=None, max_concurrent_ticks=None):
        from nexo_poller import TickAck
        self._ack_type = TickAck
        self.kind = kind
        self.default = default if default is not None else TickAck()
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.calls = []
        self.lock = threading.Lock()
        if max_concurrent_ticks is not None:
            self.max_concurrent_ticks = max_concurrent_ticks

    def tick(self, ctx):
        with self.lock:
            self.calls.append(ctx)
            steps = self.script.get(ctx.job_id)
            step = steps.pop(0) if steps else self.default
        if callable(step) and not isinstance(step, (self._ack_type, BaseException)):
            step = step(ctx)
        if isinstance(step, BaseException):
            raise step
        return step

    def calls_for(self, job_id):
        with self.lock:
            return [c for c in self.calls if c.job_id == job_id]


def no_threads_named(name: str):
    """A patch under which ``Thread.start()`` of threads called ``name``
    fails as it does when the process is out of threads (EAGAIN,
    RLIMIT_NPROC): use it as a context manager."""
    import threading
    from unittest import mock
    real_start = threading.Thread.start

    def start(thread):
        if thread.name == name:
            raise RuntimeError("can't start new thread")
        return real_start(thread)
    return mock.patch.object(threading.Thread, "start", start)
