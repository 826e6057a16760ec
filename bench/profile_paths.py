#!/usr/bin/env python3
"""Profile the tick round trip in every thread of both processes (cProfile).

    python bench/profile_paths.py [latency|throughput] [--n N] [--top K]
                                  [--external] [--raw-plugin]

The daemon side (this process: the caller, the broker's loop thread) and the
plugin side (its reader thread and handler pool) each get one cProfile per
thread, timed with CPU time (time.thread_time) so that blocking in select,
recv or a lock does not show up as cost.  Each side's profiles are merged
and printed by own time.  This is a diagnosis tool, not a figure: profiling
slows every Python call down, so read the shares, not the absolute times.
Standard library only.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, run_for  # noqa: E402

sys.path.insert(0, REPO)

_profiles: list[cProfile.Profile] = []


def _new_profile() -> cProfile.Profile:
    p = cProfile.Profile(time.thread_time)
    _profiles.append(p)
    return p


def _boot(frame, event, arg):
    """First profile event of a new thread: switch it to its own cProfile."""
    sys.setprofile(None)
    _new_profile().enable()


def profile_all_threads() -> None:
    """Profile this thread now and every thread started from here on."""
    threading.setprofile(_boot)
    _new_profile().enable()


def merged(sort: str, top: int) -> str:
    live = [p for p in _profiles]
    st = None
    for p in live:
        try:
            p.create_stats()
        except Exception:
            continue
        if not p.stats:
            continue
        if st is None:
            st = pstats.Stats(p, stream=io.StringIO())
        else:
            st.add(p)
    if st is None:
        return "(no samples)\n"
    out = io.StringIO()
    st.stream = out
    st.strip_dirs().sort_stats(sort).print_stats(top)
    return out.getvalue()


def raw_plugin_main() -> int:
    """A minimal broker client as the plugin: one blocking thread, no pool, no
    SDK.  Profiling against it isolates the daemon's side."""
    import json
    import socket
    path, topic = os.environ["NEXO_BROKER_URL"][7:], os.environ["NEXO_POLLER_TICK_TOPIC"]
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    sock.sendall(dumps({"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": {
        "topic": topic, "sid": 1, "queue": "raw"}}).encode() + b"\n")
    for line in sock.makefile("rb"):
        msg = json.loads(line)
        if msg.get("method") == "message":
            p = msg["params"]
            reply = {"jsonrpc": "2.0", "id": p["payload"].get("id"), "result": {}}
            sock.sendall(dumps({"jsonrpc": "2.0", "method": "reply", "params": {
                "inbox": p["inbox"], "payload": reply}}).encode() + b"\n")
    return 0


def plugin_main() -> int:
    """The no-op plugin, profiled; dumps its stats to $BENCH_PROFILE_OUT on SIGTERM."""
    out = os.environ["BENCH_PROFILE_OUT"]
    top = int(os.environ.get("BENCH_PROFILE_TOP", "30"))

    def dump(signum, frame):
        with open(out, "w") as fh:
            fh.write(merged("tottime", top))
        os._exit(0)
    signal.signal(signal.SIGTERM, dump)
    profile_all_threads()
    import nexo_poller
    return nexo_poller.run_plugin({"bench": lambda ctx: None})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="latency", choices=["latency", "throughput"])
    ap.add_argument("--n", type=int, default=20000, help="round trips (latency)")
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--secs", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--raw-plugin", action="store_true",
                    help="answer with a minimal one-thread broker client instead of "
                         "run_plugin (isolates the daemon's side)")
    ap.add_argument("--external", action="store_true",
                    help="measure through a BrokerClient in this process (the socket path)")
    a = ap.parse_args()
    import tempfile
    import nexo_poller as nx
    import workers
    tmp = tempfile.mkdtemp(prefix="nexo-prof-")
    plugin_out = os.path.join(tmp, "plugin.txt")
    handle = nx.PluginPollerHandle(
        plugin_id="bench", kinds=("bench",), broker_topic_prefix="bench.noop",
        max_concurrent_ticks=64, tick_timeout=30, entrypoint_command=sys.executable,
        entrypoint_args=(os.path.abspath(__file__),
                         "--raw-plugin" if a.raw_plugin else "--plugin"),
        entrypoint_env={"BENCH_PROFILE_OUT": plugin_out, "BENCH_PROFILE_TOP": str(a.top)})
    profile_all_threads()                    # before the broker's thread starts
    server = nx.BrokerServer().start()
    sup = nx.PluginSupervisor(handle, server.url).start()
    client = nx.BrokerClient.connect(server.url) if a.external else server.client()
    request = workers.sample_request()

    def call():
        return nx.forward_tick(client, handle, request)
    try:
        workers.wait_subscriptions(server, 1)
        for _ in range(500):
            call()
        for p in _profiles:                  # drop the warm-up
            p.clear()
        t0 = time.perf_counter()
        if a.mode == "latency":
            for _ in range(a.n):
                call()
            done = a.n
        else:
            done = run_for(call, a.inflight, a.secs)["count"]
        elapsed = time.perf_counter() - t0
        daemon = merged("tottime", a.top)
    finally:
        threading.setprofile(None)
        client.close()
        sup.stop()
        server.close()
    print(f"== {a.mode}{' (external client)' if a.external else ''}: {done} ticks in "
          f"{elapsed:.2f} s under the profiler ({done / elapsed:,.0f}/s)")
    print("\n== daemon process (caller + broker loop), CPU time by own time\n" + daemon)
    for _ in range(50):
        if os.path.exists(plugin_out):
            break
        time.sleep(0.1)
    try:
        with open(plugin_out) as fh:
            print("== plugin process (reader + handler pool), CPU time by own time\n"
                  + fh.read())
        os.unlink(plugin_out)
    except OSError:
        print("== plugin process: no profile written")
    os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plugin":
        sys.exit(plugin_main())
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-plugin":
        sys.exit(raw_plugin_main())
    sys.exit(main())
