"""An ephemeral example plugin: each tick "reads" a few new feed items.

The cursor is the number of the last item seen, so a restart of the daemon
picks up exactly where the last committed tick left off.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import nexo_poller as nx  # noqa: E402


def tick(ctx: nx.PollContext) -> nx.TickAck:
    last = int(ctx.cursor or b"0")
    per_tick = int(os.environ.get("DEMO_FEED_ITEMS_PER_TICK", "3"))
    items = [f"{ctx.config.get('feed', 'feed')}#{n}" for n in range(last + 1, last + 1 + per_tick)]
    return nx.TickAck(next_cursor=str(last + per_tick).encode(),
                      metrics=nx.TickMetrics(items_seen=len(items), items_dispatched=len(items)))


if __name__ == "__main__":
    sys.exit(nx.run_plugin({"demo_feed": tick}))
