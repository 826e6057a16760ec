"""A long-lived example plugin: one process serves every tick.

It keeps warm state (how many ticks this process has served), which an
ephemeral plugin could not, and stores a tick count in the job's cursor.
"""
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import nexo_poller as nx  # noqa: E402

_served = 0
_lock = threading.Lock()


def tick(ctx: nx.PollContext) -> nx.TickAck:
    global _served
    with _lock:
        _served += 1
        served = _served
    count = int(ctx.cursor or b"0") + 1
    print(f"{ctx.job_id}: tick {count} at {ctx.now:%H:%M:%S} "
          f"({served} served by pid {os.getpid()})", file=sys.stderr, flush=True)
    return nx.TickAck(next_cursor=str(count).encode(), metrics=nx.TickMetrics(1, 0))


if __name__ == "__main__":
    sys.exit(nx.run_plugin({"demo_clock": tick}))
