"""Soak: run a random mix of the fault scenarios for N minutes and print counts.

    python tests/faults/soak.py [MINUTES] [--seed N]      (nox -s soak -- MINUTES)

Each run picks a transport and a scenario (with random parameters), runs it under a
deadline, then checks that nothing was left behind (processes, threads, fds, /dev/shm).
It prints runs, faults injected, hangs, leaks and failures per scenario, and the largest
measured reaction times; the exit status is 1 if anything hung, leaked or failed.
``FLOWPLUG_FAULT_CYCLES`` sets the cycles of the create/iterate/close scenario (default
1000 here, 100 in the tests). ``--transports`` picks the transports; by default every
registered one whose workers the Runner starts (a transport that runs its own workers, as
Ray's actors, needs its cluster started before the leak checks: its plugin's suite runs
the scenarios on it).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import random
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faultlib as fl

import flowplug as fp
from flowplug.testing.leaks import leaked, snapshot

#: cycles of scenario 11. Read here, not through faultlib (which reads the same variable
#: with the tests' default of 100 when it is imported, before main() could set it).
CYCLES = int(os.environ.get("FLOWPLUG_FAULT_CYCLES", "1000"))

#: name -> (weight, deadline in s, run(transport, rng) -> faults injected)
SCENARIOS = {
    "01 worker raises": (3, 60, lambda t, r: fl.scenario_worker_raises(t, k=r.randint(0, 30))),
    "02 reset_state raises": (2, 60, lambda t, r: fl.scenario_reset_fails(t)),
    "03 worker dies": (4, 60, lambda t, r: fl.scenario_worker_dies(t, r.choice(fl.death_modes(t)))),
    "04 consumer SIGKILL": (2, 90, lambda t, r: fl.scenario_consumer_killed(t, r.random() < 0.5)),
    "05 consumer SIGINT": (2, 90, lambda t, r: fl.scenario_consumer_sigint(t)),
    "06 dropped runner": (2, 90, lambda t, r: fl.scenario_dropped(t)),
    "07 unpicklable": (
        2,
        60,
        lambda t, r: fl.scenario_unpicklable(t, r.choice(["lambda", "lock", "socket"])),
    ),
    "08 too large": (2, 90, lambda t, r: fl.scenario_too_large(t)),
    "08 too large, limited": (1, 90, lambda t, r: fl.scenario_too_large("limited")),
    "09 timeout": (2, 60, lambda t, r: fl.scenario_timeout(t)),
    "10 stuck worker": (2, 60, lambda t, r: fl.scenario_stuck(t)),
    "11 cycles": (1, 600, lambda t, r: fl.scenario_cycles(t, CYCLES)),
    "12 threads": (2, 60, lambda t, r: fl.scenario_threads(t)),
    "13 nested": (2, 120, lambda t, r: fl.scenario_nested(t)),
    "14 fork after threads": (2, 90, lambda t, r: fl.scenario_fork_after_threads(t)),
    "15 /dev/shm too small": (1, 60, lambda t, r: fl.scenario_shm_tiny(t)),
    "16 chatty workers": (1, 150, lambda t, r: fl.scenario_chatty(t)),
    "17 stranger's bytes": (2, 90, lambda t, r: fl.scenario_garbage(t)),
    "18 fairness": (2, 60, lambda t, r: fl.scenario_fair(t, delay=r.uniform(0.05, 1.0))),
    "19 closed stdio": (1, 60, lambda t, r: fl.scenario_report_with_closed_stdio(t)),
    "20 str() raises": (1, 60, lambda t, r: fl.scenario_broken_str(t)),
    "21 cannot connect, faulty": (
        1,
        60,
        lambda t, r: fl.scenario_cannot_connect(r.random() < 0.5),
    ),
    "22 report cannot be sent, faulty": (
        1,
        60,
        lambda t, r: fl.scenario_report_cannot_be_sent(r.random() < 0.5),
    ),
    "23 fails to load": (
        1,
        90,
        lambda t, r: fl.scenario_dataflow_fails_to_load(t, r.choice(["spawn", "forkserver"])),
    ),
    "24 many buffers": (1, 90, lambda t, r: fl.scenario_many_buffers(t)),
    "25 close from a thread": (2, 90, lambda t, r: fl.scenario_close_from_another_thread(t, 2)),
    "26 fork of the consumer": (
        1,
        90,
        lambda t, r: fl.scenario_fork_of_the_consumer(t, r.choice(["child", "pool"])),
    ),
    "27 quiet segfault": (1, 60, lambda t, r: fl.scenario_segfault_is_quiet(t)),
    "28 Ctrl-C in gc cleanup": (1, 90, lambda t, r: fl.scenario_ctrl_c_during_gc_cleanup(t)),
    "29 fd limits": (
        1,
        240,
        lambda t, r: fl.scenario_fd_limits(
            t,
            r.choice(["replicate", "shard", "map"]),
            r.choice(["fork", "spawn"]) if fl.forks(t) else "fork",
        ),
    ),
    "29 fd shortage unchecked": (1, 240, lambda t, r: fl.scenario_fd_shortage_unchecked(t)),
    "30 several runners": (
        2,
        90,
        lambda t, r: fl.scenario_several_runners(t, r.choice(["raises", "dies"]), r.random() < 0.5),
    ),
    "31 spawned worker fails": (
        2,
        90,
        lambda t, r: _spawned_fails(t, r),
    ),
    "32 ended thread, then a failure": (
        2,
        60,
        lambda t, r: fl.scenario_ended_thread_then_death(
            t, r.choice(["raises", fl.death_modes(t)[0]])
        ),
    ),
    "34 fds used up after start": (1, 120, lambda t, r: fl.scenario_fds_used_up_after_start(t)),
    "33 exit status reaped first": (
        1,
        60,
        lambda t, r: fl.scenario_exit_status_taken_first(t, r.choice(["sigkill", "exit3"])),
    ),
}


def _spawned_fails(transport: str, rng: random.Random) -> int:
    """31: scenario 1 or 3 with workers started by spawn or forkserver."""
    if not fl.forks(transport):
        return 0
    start_method = rng.choice(["spawn", "forkserver"])
    if rng.random() < 0.5:
        return fl.scenario_worker_raises(transport, rng.randint(0, 30), start_method)
    return fl.scenario_worker_dies(transport, rng.choice(fl.death_modes(transport)), start_method)


class Hang(Exception):
    """A scenario passed its deadline."""


def _alarm(signum: int, frame: object) -> None:
    raise Hang()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("minutes", nargs="?", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--transports",
        default=None,
        help="comma-separated transports (default: every registered one the Runner "
        "starts workers for)",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    fl.register_limited()
    # spawn and forkserver start helper processes on first use, which live on: start them
    # now, or the first run that uses them counts them as left behind
    from multiprocessing import forkserver, resource_tracker

    forkserver.ensure_running()
    resource_tracker.ensure_running()
    if args.transports:
        transports = sorted(args.transports.split(","))
    else:
        transports = sorted(
            t
            for t in fp.available_transports()
            if t not in ("limited", "faulty", "faulty_thread")
            and not fp.get_transport(t).runs_workers
        )
    names = list(SCENARIOS)
    weights = [SCENARIOS[n][0] for n in names]
    signal.signal(signal.SIGALRM, _alarm)
    print(
        f"soak: {args.minutes:g} min, seed {seed}, transports {', '.join(transports)}, "
        f"{CYCLES} cycles in scenario 11",
        flush=True,
    )
    runs, faults, hangs, leaks, failures = Counter(), Counter(), Counter(), Counter(), Counter()
    end = time.monotonic() + args.minutes * 60
    while time.monotonic() < end:
        name = rng.choices(names, weights)[0]
        transport = (
            "limited"
            if name.endswith("limited")
            else "faulty"  # scenarios 21, 22 bring their own transports
            if name.endswith("faulty")
            else rng.choice(transports)
        )
        _, deadline, run = SCENARIOS[name]
        key = (name, transport)
        before = snapshot()
        faulthandler.dump_traceback_later(deadline + 30, exit=True)  # if the alarm cannot
        signal.alarm(deadline)
        try:
            faults[key] += run(transport, rng)
        except Hang:
            hangs[key] += 1
            print(f"HANG {name} [{transport}] after {deadline} s", flush=True)
            faulthandler.dump_traceback(all_threads=True)
        except Exception:
            failures[key] += 1
            print(f"FAIL {name} [{transport}]:\n{traceback.format_exc()}", flush=True)
        finally:
            signal.alarm(0)
            faulthandler.cancel_dump_traceback_later()
        runs[key] += 1
        gc.collect()
        left = leaked(before, settle=10.0)
        if left:
            leaks[key] += 1
            print(f"LEAK {name} [{transport}]: {left}", flush=True)
        fp.reload_plugins()
        fl.register_limited()

    print(
        f"\n{'scenario':<24}{'transport':<11}{'runs':>6}{'faults':>8}{'hangs':>7}"
        f"{'leaks':>7}{'fails':>7}"
    )
    for key in sorted(runs):
        print(
            f"{key[0]:<24}{key[1]:<11}{runs[key]:>6}{faults[key]:>8}{hangs[key]:>7}"
            f"{leaks[key]:>7}{failures[key]:>7}"
        )
    total = [sum(c.values()) for c in (runs, faults, hangs, leaks, failures)]
    print(f"{'total':<35}{total[0]:>6}{total[1]:>8}{total[2]:>7}{total[3]:>7}{total[4]:>7}")
    print("\nlargest measured times:")
    for what, values in sorted(fl.MEASURED.items()):
        print(f"  {what}: max {max(values):.2f} s over {len(values)} runs")
    print(
        f"\nruns={total[0]} faults_injected={total[1]} hangs={total[2]} leaks={total[3]} "
        f"failures={total[4]} seed={seed}"
    )
    return 1 if total[2] or total[3] or total[4] else 0


if __name__ == "__main__":
    sys.exit(main())
