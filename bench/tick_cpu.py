"""CPU per tick of each process on the daemon's tick path, NATS vs Unix socket.

    python bench/tick_cpu.py [--inflight 64] [--secs 3] [--runs 2]

Figure 10's workload (``forward_tick`` to one supervised SDK no-op plugin,
K ticks in flight) three ways: over a local nats-server as the daemon sends
it (nexo ``Event(Message)`` envelopes), over NATS with the requester
sending plain JSON (``nexo_envelopes=False``; the plugin answers in the
shape asked), and over the embedded Unix-socket broker.  For each: ticks/s
and the CPU time (user + system, from /proc) per tick of the requesting
process, the plugin process and nats-server.  Says where a path's CPU goes
when its rate differs; not a figure of bench/run.py.  Standard library
only; needs ``nats-server`` on PATH or in /usr/sbin.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import children_of, cpu_secs, run_for, start_nats_server  # noqa: E402
import workers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nexo_poller as nx  # noqa: E402


def measure(name: str, client, handle, pids: dict, a) -> None:
    request = workers.sample_request()

    def call():
        return nx.forward_tick(client, handle, request)
    run_for(call, a.inflight, 1.0)                       # warm-up
    for _ in range(a.runs):
        before = {k: cpu_secs(p) for k, p in pids.items()}
        start = time.perf_counter()
        n = run_for(call, a.inflight, a.secs)["count"]
        rate = n / (time.perf_counter() - start)
        per = {k: (cpu_secs(p) - before[k]) / n * 1e6 for k, p in pids.items()}
        print(f"{name:<28} {rate:>8,.0f} ticks/s  CPU us/tick: "
              + ", ".join(f"{k} {v:.0f}" for k, v in per.items())
              + f", all {sum(per.values()):.0f}", flush=True)


def plugin_pid(before: set[int]) -> int:
    for _ in range(200):
        new = set(children_of(os.getpid())) - before
        if new:
            return new.pop()
        time.sleep(0.05)
    raise SystemExit("the plugin did not start")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--secs", type=float, default=3.0)
    p.add_argument("--runs", type=int, default=2)
    a = p.parse_args()
    nats, port = start_nats_server()
    url = f"nats://127.0.0.1:{port}"
    server = nx.BrokerServer().start()
    try:
        kids = set(children_of(os.getpid()))
        handle = nx.PluginPollerHandle(
            plugin_id="bench-nats", kinds=("bench",), broker_topic_prefix="bench.nats",
            max_concurrent_ticks=64, tick_timeout=30, entrypoint_command=sys.executable,
            entrypoint_args=(workers.PLUGIN, "bench"))
        sup = nx.PluginSupervisor(handle, url, backoff_initial=0.2).start()
        plugin = plugin_pid(kids)
        for envelopes in (True, False):
            client = nx.NatsClient.connect(url, nexo_envelopes=envelopes)
            try:
                nx.forward_tick(client, handle, workers.sample_request())   # waits for it
                measure("NATS, nexo envelopes" if envelopes else "NATS, plain JSON",
                        client, handle, {"requester": os.getpid(), "plugin": plugin,
                                         "nats-server": nats.pid}, a)
            finally:
                client.close()
        sup.stop()
        kids = set(children_of(os.getpid()))
        unix_handle = workers.bench_handle()
        unix_sup = nx.PluginSupervisor(unix_handle, server.url, backoff_initial=0.2).start()
        try:
            plugin = plugin_pid(kids)
            workers.wait_subscriptions(server, 1)
            client = server.client()
            try:
                measure("Unix socket", client, unix_handle,
                        {"requester": os.getpid(), "plugin": plugin}, a)
            finally:
                client.close()
        finally:
            unix_sup.stop()
    finally:
        server.close()
        nats.kill()
        nats.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
