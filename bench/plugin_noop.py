#!/usr/bin/env python3
"""A no-op plugin for the benchmarks, written with nexo_poller.run_plugin.

Serves the kinds named on the command line (default: ``bench``); each tick
returns an empty TickAck.  Long-lived when started with NEXO_BROKER_URL and
NEXO_POLLER_TICK_TOPIC (PluginSupervisor sets them), ephemeral over stdio
with NEXO_POLLER_EPHEMERAL=1.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nexo_poller  # noqa: E402


def noop(ctx):
    return None


if __name__ == "__main__":
    kinds = sys.argv[1:] or ["bench"]
    sys.exit(nexo_poller.run_plugin({kind: noop for kind in kinds}))
