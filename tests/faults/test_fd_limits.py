"""Scenario 29 of the fault matrix (docs/reliability.md): too few file descriptors.

Each case runs tests/faults/fdsweep.py in a process of its own, which lowers its
RLIMIT_NOFILE soft limit step by step from just above the fds it has open and starts a
small run at each: every run must work or be refused up front with the Runner's
ConfigError naming RLIMIT_NOFILE and ``ulimit -n``; never an abort of the process
(libzmq's "Too many open files (src/epoll.cpp)"), never a WorkerDied or a WorkerError.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import flowplug as fp

SWEEP = Path(__file__).with_name("fdsweep.py")


def sweep(transport: str, start_method: str, mode: str, *flags: str) -> list[tuple[int, str]]:
    proc = subprocess.run(
        [sys.executable, str(SWEEP), transport, start_method, mode, *flags],
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines and lines[-1].startswith("DONE"), (
        f"the sweep process ended with {proc.returncode} (an abort is -6)\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    used = int(lines[0].split()[1])
    # a refused run opened nothing, a failed one closed what it had opened
    assert lines[-1] == f"DONE {used}", f"fds left open: {lines[-1]} (used {used})"
    out = []
    for line in lines[1:-1]:
        limit, outcome = line.split(" ", 1)
        out.append((int(limit), outcome))
    return out


def process_transports() -> list[str]:
    return sorted(
        n
        for n, cls in fp.available_transports().items()
        if cls.crosses_processes and not cls.runs_workers and n not in ("faulty",)
    )


CASES = [(t, "fork", m) for t in process_transports() for m in ("replicate", "shard", "map")]
CASES += [(t, "spawn", "replicate") for t in process_transports()]
CASES += [("thread", "fork", "replicate")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("transport", "start_method", "mode"), CASES)
def test_29_every_limit_runs_or_is_refused_up_front(transport, start_method, mode):
    if transport not in fp.available_transports():
        raise AssertionError(f"transport {transport!r} is not installed")
    outcomes = sweep(transport, start_method, mode)
    bad = [(limit, out) for limit, out in outcomes if out not in ("OK", "LIMIT")]
    assert not bad, bad
    kinds = [out for _, out in outcomes]
    first_ok = kinds.index("OK")
    # refused below some limit, working from it on: the check is a threshold
    assert set(kinds[:first_ok]) <= {"LIMIT"} and set(kinds[first_ok:]) == {"OK"}, outcomes


def test_29_the_refusal_names_the_limit_the_need_and_the_way_out():
    proc = subprocess.run(
        [sys.executable, str(SWEEP), "zmq", "fork", "replicate", "--show"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    refusal = next(line for line in proc.stdout.splitlines() if " LIMIT " in line)
    limit = refusal.split()[0]
    assert f"RLIMIT_NOFILE (`ulimit -n`) is {limit}" in refusal
    assert "open, and transport 'zmq' with 2 workers needs about" in refusal
    assert "`ulimit -n 1024`" in refusal and "resource.setrlimit" in refusal


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", process_transports())
def test_29_without_the_check_a_shortage_is_still_an_error_not_an_abort(transport):
    """As if other code opened files after the check: the process never aborts, no worker
    dies, nothing leaks; what fails raises an exception (``sweep`` checks the rest)."""
    outcomes = sweep(transport, "fork", "map", "--unchecked")
    deaths = [(limit, out) for limit, out in outcomes if "WorkerDied" in out]
    assert not deaths, deaths
    assert "OK" in [out for _, out in outcomes]
