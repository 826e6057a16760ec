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


def write_counter_plugin(root: str, name: str, kind: str, lifecycle: str, pid_file: str,
                         max_concurrent_ticks: int) -> str:
    """Write plugins/<name>/nexo-plugin.toml for the counter fixture; returns
    the folder relative to ``root``."""
    folder = os.path.join(root, "plugins", name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "nexo-plugin.toml"), "w", encoding="utf-8") as f:
        f.write(f"""[plugin]
id = {q(name)}
version = "0.0.1"

[plugin.entrypoint]
command = {q(PY)}
args = [{q(PLUGIN)}, {q(kind)}]

[plugin.entrypoint.env]
E2E_PID_FILE = {q(pid_file)}

[plugin.poller]
kinds = [{q(kind)}]
broker_topic_prefix = {q("plugin.poller." + name)}
lifecycle = {q(lifecycle)}
max_concurrent_ticks = {max_concurrent_ticks}
tick_timeout_secs = 20
""")
    return os.path.join("plugins", name)
