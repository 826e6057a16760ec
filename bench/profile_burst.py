"""cProfile of every thread of figure 4's burst (every job due at once):
``python bench/profile_burst.py [JOBS]`` (30000) prints the drain rate (slowed
by profiling) and the functions with the most time of their own;
``NO_PROFILE=1`` gives the rate and CPU a tick unprofiled (for an A/B)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_paths   # noqa: E402 -- the bench's own modules, beside this file
import workers         # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30_000
    profiled = os.environ.get("NO_PROFILE") is None     # NO_PROFILE=1: the rate alone
    if profiled:
        profile_paths.profile_all_threads()
    r = workers.w_sched({"n": n, "mode": "burst"})
    print(f"{n} jobs drained at {r['rate']:.0f} ticks/s, {r['cpu_us_per_tick']:.0f} us CPU a tick")
    if profiled:
        print(profile_paths.merged("tottime", 45))


if __name__ == "__main__":
    main()
