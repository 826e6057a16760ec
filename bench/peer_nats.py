#!/usr/bin/env python3
"""Peer for figures 1-2: nats-py request/reply against a local nats-server.

Runs only in the suite's throwaway virtual environment (bench/.venv), where
nats-py is installed.  ``peer_nats.py rt 'JSON'`` starts ``procs`` responder
processes in one queue group, then measures sequential round trips and
throughput with K requests in flight from one asyncio client; the result is
the last line of stdout.  ``peer_nats.py responder URL SUBJECT`` is one
responder: it decodes each request and answers a tick-shaped JSON reply.
"""
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, floor_call, summary  # noqa: E402

import nats  # noqa: E402

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


async def responder(url: str, subject: str) -> None:
    # exit with the process that started us (stdin is its pipe)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    nc = await nats.connect(url)

    async def handler(msg):
        req = json.loads(msg.data)
        await msg.respond(_dumps({"jsonrpc": "2.0", "id": req.get("id"),
                                  "result": {}}).encode())
    await nc.subscribe(subject, queue="bench", cb=handler)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def measure(a: dict) -> dict:
    nc = await nats.connect(a["url"])
    envelope = json.loads(a["envelope"])
    subject = a["subject"]

    async def call():
        msg = await nc.request(subject, _dumps(envelope).encode(), timeout=10)
        return json.loads(msg.data)

    out = {}
    if a.get("rounds_rt"):
        # side by side with the floor: blocks of each, taking turns
        floor = floor_call(a["echo"], envelope)
        pc = time.perf_counter
        for _ in range(a["warm"]):
            floor()
            await call()
        lat, flo = [], []
        for r in range(a["rounds_rt"]):
            order = ("floor", "nats") if r % 2 == 0 else ("nats", "floor")
            for name in order:
                for _ in range(a["block"]):
                    t0 = pc()
                    if name == "floor":
                        floor()
                        flo.append((pc() - t0) * 1e6)
                    else:
                        await call()
                        lat.append((pc() - t0) * 1e6)
        floor.close()
        out["latency"], out["floor"] = summary(lat), summary(flo)

    async def run_for(k: int, secs: float) -> dict:
        lat: list = []
        stop = time.perf_counter() + secs

        async def loop():
            pc = time.perf_counter
            while True:
                t0 = pc()
                if t0 >= stop:
                    return
                await call()
                lat.append((pc() - t0) * 1e6)
        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(k)))
        elapsed = time.perf_counter() - start
        return {"count": len(lat), "rate": len(lat) / elapsed, "lat_us": summary(lat)}

    if a.get("inflight"):
        tp = {}
        for k in a["inflight"]:
            await run_for(k, a["warm_secs"])
            runs = sorted([await run_for(k, a["secs"]) for _ in range(a["rounds"])],
                          key=lambda r: r["rate"])
            mid = runs[len(runs) // 2]
            tp[str(k)] = {"rate": mid["rate"], "rates": [r["rate"] for r in runs],
                          "lat_us": mid["lat_us"]}
        out["throughput"] = tp
    await nc.close()
    return out


def rt(a: dict) -> dict:
    subject = a["subject"]
    procs = []
    try:
        for _ in range(a["procs"]):
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "responder",
                                  a["url"], subject], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a nats responder did not start")
        return asyncio.run(measure(a))
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    if sys.argv[1] == "responder":
        try:
            asyncio.run(responder(sys.argv[2], sys.argv[3]))
        except KeyboardInterrupt:
            pass
    else:
        emit(rt(json.loads(sys.argv[2])))
