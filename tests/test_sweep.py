"""The one sweep of /dev/shm entries left by dead owners, and the run id it relies on."""

import os
import re
import subprocess
import sys

from flowplug._sweep import new_run_id, stale_entries, sweep_stale


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def test_run_id_names_the_owner():
    assert re.fullmatch(rf"fp-{os.getpid()}-[0-9a-f]{{8}}", new_run_id())
    assert new_run_id() != new_run_id()


def test_sweep_removes_only_unlocked_entries_of_dead_owners(tmp_path):
    dead = _dead_pid()
    stale = [f"fp-{dead}-0123abcd", f"fp-{dead}-0123abcd-store_2"]
    kept = [
        f"fp-{os.getpid()}-0123abcd",  # this process
        "fp-1-0123abcd-seg",  # a live process
        f"fp-{dead}-0123abcd-x.new",  # being built (a dot): never swept
        f"xfp-{dead}-0123abcd",  # not a flowplug name
        f"fp-{dead}-0123",  # not a run id
        "fp-other",
        "psm_12345",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 5000)
    (tmp_path / f"fp-{dead}-0123abcd-dir").mkdir()  # not a file the sweep opens
    kept.append(f"fp-{dead}-0123abcd-dir")
    # A live owner in another pid namespace: its pid does not exist here, but it holds a
    # lock on its entry (a child process holds one for it).
    locked = f"fp-{dead}-89abcdef"
    kept.append(locked)
    (tmp_path / locked).write_bytes(b"x")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path / locked)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        found = stale_entries(str(tmp_path))
        assert [(os.path.basename(e.path), e.pid) for e in found] == [(n, dead) for n in stale]
        assert all(e.size >= 5000 for e in found)
        removed = sweep_stale(str(tmp_path))
        assert sorted(removed) == sorted(str(tmp_path / n) for n in stale)
        assert sorted(os.listdir(tmp_path)) == sorted(kept)
    finally:
        holder.communicate("", timeout=10)
    assert sweep_stale(str(tmp_path)) == [str(tmp_path / locked)]  # its lock is gone


_HOLD_LOCK = """
import fcntl, sys
f = open(sys.argv[1], "r+b")
fcntl.lockf(f, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_sweep_of_a_missing_directory_does_nothing(tmp_path):
    assert sweep_stale(str(tmp_path / "absent")) == []
