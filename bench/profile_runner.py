"""cProfile of every thread of figure 11's daemon (Runner, sqlite state, one
long-lived plugin) at one demand: ``python bench/profile_runner.py 2500``
prints the done rate, the daemon's CPU per tick (inflated by profiling) and
the functions with the most time of their own."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_paths   # noqa: E402 -- the bench's own modules, beside this file
import workers         # noqa: E402


def main() -> None:
    demand = int(sys.argv[1]) if len(sys.argv) > 1 else 2500
    profile_paths.profile_all_threads()
    r = workers.w_runner_plugin({"demand": demand, "jobs": demand * 2, "inflight": 8,
                                 "warm_secs": 3, "secs": 5})
    print(f"done {r['done_rate']:.0f} ticks/s, daemon CPU {r['daemon_cpu_us_per_tick']:.0f} "
          "us/tick (profiled)")
    print(profile_paths.merged("tottime", 40))


if __name__ == "__main__":
    main()
