"""The sweep of /dev/shm entries left by dead owners, and the run id it relies on."""

import os
import re
import subprocess
import sys

from flowplug._sweep import new_run_id, sweep_stale


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


def test_sweep_removes_only_entries_of_dead_owners(tmp_path):
    dead = _dead_pid()
    stale = [f"fp-{dead}-0123abcd", f"flowplug-fp-{dead}-0123abcd-store"]
    live = [f"fp-{os.getpid()}-0123abcd", "fp-1-0123abcd-seg", "fp-other", "psm_12345"]
    for name in stale + live:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(sweep_stale(str(tmp_path))) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(live)


def test_sweep_of_a_missing_directory_does_nothing(tmp_path):
    assert sweep_stale(str(tmp_path / "absent")) == []
