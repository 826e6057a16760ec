"""Helpers shared by the tests: the paths of the module and its fixture
plugin, cursor codecs, polling with a deadline, process checks, and the
manifest of the counter fixture plugin.  (Not a test module: discovery
skips it; test files put this folder on sys.path to import it.)"""

import base64
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEXO = os.path.join(ROOT, "nexo_poller.py")
LAUNCHER = os.path.join(ROOT, "nexo-poller")      # ./nexo-poller: imports NEXO, runs main
PLUGIN = os.path.join(ROOT, "tests", "fixtures", "e2e_counter_plugin.py")
PY = sys.executable


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


def pid_gone(pid: int) -> bool:
    """True when the process no longer exists or is only a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return True
    return data[data.rindex(")") + 2:].split()[0] in ("Z", "X")


def write_manifest(root: str, name: str, kind: str, *, command: str, args=(),
                   lifecycle: str = "ephemeral", env: dict | None = None,
                   max_concurrent_ticks: int | None = None, tick_timeout_secs: int = 20,
                   entrypoint_extra: str = "", poller_extra: str = "") -> str:
    """Write plugins/<name>/nexo-plugin.toml (id ``name``, one kind, topic
    prefix plugin.poller.<name>); returns the folder relative to ``root``.
    ``entrypoint_extra`` and ``poller_extra`` are raw TOML added to
    ``[plugin.entrypoint]`` and ``[plugin.poller]``."""
    folder = os.path.join(root, "plugins", name)
    os.makedirs(folder, exist_ok=True)
    env_table = "".join(f"{k} = {q(v)}\n" for k, v in (env or {}).items())
    limit = "" if max_concurrent_ticks is None else \
        f"max_concurrent_ticks = {max_concurrent_ticks}\n"
    with open(os.path.join(folder, "nexo-plugin.toml"), "w", encoding="utf-8") as f:
        f.write(f"""[plugin]
id = {q(name)}
version = "0.0.1"

[plugin.entrypoint]
command = {q(command)}
args = [{", ".join(q(a) for a in args)}]
{entrypoint_extra}
{"[plugin.entrypoint.env]" if env_table else ""}
{env_table}
[plugin.poller]
kinds = [{q(kind)}]
broker_topic_prefix = {q("plugin.poller." + name)}
lifecycle = {q(lifecycle)}
{limit}tick_timeout_secs = {tick_timeout_secs}
{poller_extra}""")
    return os.path.join("plugins", name)


def write_counter_plugin(root: str, name: str, kind: str, lifecycle: str, pid_file: str,
                         max_concurrent_ticks: int) -> str:
    """Write plugins/<name>/nexo-plugin.toml for the counter fixture; returns
    the folder relative to ``root``."""
    return write_manifest(root, name, kind, command=PY, args=(PLUGIN, kind),
                          lifecycle=lifecycle, env={"E2E_PID_FILE": pid_file},
                          max_concurrent_ticks=max_concurrent_ticks)


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
