"""Fault scenarios: the machine's limits run short (docs/reliability.md row 29)."""

from __future__ import annotations

import subprocess
import sys

from probes import HERE

FDSWEEP = HERE / "fdsweep.py"


def fd_sweep(transport: str, start_method: str, mode: str, *flags: str) -> list[tuple[int, str]]:
    """Run fdsweep.py (every RLIMIT_NOFILE soft limit from one above the fds in use, up
    to three limits past the first that works) in a process of its own; return
    ``(limit, outcome)`` per limit. The process must end normally (an abort is -6), and
    leave no fd open that it did not have before."""
    proc = subprocess.run(
        [sys.executable, str(FDSWEEP), transport, start_method, mode, *flags],
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


def scenario_fd_limits(transport: str, mode: str, start_method: str = "fork") -> int:
    """29. Every RLIMIT_NOFILE soft limit from one above the fds in use upward: each run
    works, or is refused before anything opens with the Runner's ConfigError naming
    RLIMIT_NOFILE and ``ulimit -n``; never an abort, a WorkerDied or a WorkerError; a
    threshold (refused below, working from it on); no fd left open."""
    outcomes = fd_sweep(transport, start_method, mode)
    kinds = [out.split(" ", 1)[0] for _, out in outcomes]
    bad = [(limit, out) for limit, out in outcomes if out != "OK" and not out.startswith("LIMIT ")]
    assert not bad, bad
    first_ok = kinds.index("OK")
    assert set(kinds[:first_ok]) <= {"LIMIT"} and set(kinds[first_ok:]) == {"OK"}, outcomes
    for limit, out in outcomes[:first_ok]:  # the limit, the counts, the way out
        said = f"too few file descriptors for this run: RLIMIT_NOFILE (`ulimit -n`) is {limit},"
        assert said in out, out
        assert f"and transport {transport!r} with 2 workers needs about" in out, out
        assert "`ulimit -n 1024`" in out and "resource.setrlimit" in out, out
    return first_ok


def scenario_fd_shortage_unchecked(transport: str) -> int:
    """29'. The same with the Runner's check off, as if other code opened files after it
    (ParallelMap, fork): the process never aborts, nothing hangs, no worker dies, nothing
    leaks; what fails raises a ConfigError (or a WorkerError that is one) naming
    RLIMIT_NOFILE and ``ulimit -n``, never a raw OSError/ZMQError or a RunnerTimeout."""
    outcomes = fd_sweep(transport, "fork", "map", "--unchecked")
    unclear = [
        (limit, out) for limit, out in outcomes if out != "OK" and not out.startswith("LIMIT ")
    ]
    assert not unclear, unclear
    assert "OK" in [out for _, out in outcomes], outcomes
    return sum(out != "OK" for _, out in outcomes)


FDFILL = HERE / "fdfill.py"


def scenario_fds_used_up_after_start(transport: str) -> int:
    """34. Once a run started (``with runner:``), other code of the program takes every
    file descriptor left, and the run goes on: replicate, ParallelMap (fork) and shard
    (spawn), the consumer keeping 1 MiB arrays (a store with a byte limit fills up and
    the workers send copies). Never an abort of the consumer (libzmq's listener cannot
    accept without an fd), never a hang, every datapoint delivered."""
    proc = subprocess.run(
        [sys.executable, str(FDFILL), transport], capture_output=True, text=True, timeout=240
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines and lines[-1] == "DONE", (
        f"the process ended with {proc.returncode} (an abort is -6)\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    bad = [line for line in lines[:-1] if not line.endswith(" OK")]
    assert not bad, bad
    return len(lines) - 1
