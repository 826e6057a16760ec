"""The daemon of figure 11 at one demand, once per ``run_history`` value, in
turns: ``python bench/history_ab.py 5000 0,100,0,100`` prints, per run,
run_history, done ticks/s, daemon CPU us per tick, the median commit batch
and the commit latency p99 (ms).  What the run history costs at overload."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run       # noqa: E402 -- the bench's own modules, beside this file
import workers   # noqa: E402


def main() -> None:
    sizes = run.FULL["runner"]
    demand = int(sys.argv[1])
    for keep in (int(k) for k in sys.argv[2].split(",")):
        r = workers.call_worker("runner-plugin", {
            "demand": demand, "jobs": int(demand * sizes["interval"]),
            "inflight": sizes["inflight"], "warm_secs": sizes["warm_secs"],
            "secs": sizes["secs"], "run_history": keep}, timeout=300)
        print(keep, round(r["done_rate"]), round(r["daemon_cpu_us_per_tick"]),
              r["commit_batch"]["p50"], round(r["commit_latency_ms"]["p99"]), flush=True)


if __name__ == "__main__":
    main()
