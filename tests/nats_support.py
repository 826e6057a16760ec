"""A real nats-server for the NATS tests: started on loopback on a free port
with JetStream in a temporary store, killed and reaped by ``stop()``.
(Not a test module.)  Without the binary the tests skip with a visible
reason, unless NEXO_REQUIRE_NATS=1 (CI), where they fail."""

import os
import shutil
import socket
import subprocess
import tempfile
import unittest

from support import wait_until

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)


def require_nats() -> None:
    """Call from setUpClass/setUp: skip (or fail under NEXO_REQUIRE_NATS=1)."""
    if NATS_SERVER is None:
        if os.environ.get("NEXO_REQUIRE_NATS") == "1":
            raise AssertionError("nats-server not found and NEXO_REQUIRE_NATS=1")
        raise unittest.SkipTest("nats-server not installed (apt-get install nats-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One nats-server process; ``start()`` returns once it accepts clients."""

    def __init__(self, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.args = list(args)
        self.store = tempfile.mkdtemp(prefix="nexo-nats-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> "NatsServer":
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store,
             *self.args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

        def accepting() -> bool:
            """Greets a client, or has exited (then waiting is over too)."""
            try:
                with socket.create_connection(("127.0.0.1", self.port), 1) as s:
                    if s.recv(4096).startswith(b"INFO "):
                        return True
            except OSError:
                pass
            return self.proc.poll() is not None

        if not wait_until(accepting, 20, 0.02) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError(f"nats-server did not start on port {self.port}")
        return self

    def stop(self) -> None:
        """Kill and reap the server (the store stays for a restart)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)
