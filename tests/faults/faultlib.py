"""The fault-injection scenarios; docs/reliability.md has the table they check.

Each ``scenario_*`` function injects one kind of fault into a Runner on one transport,
asserts the documented behaviour, and returns how many faults it injected. The pytest
modules next to this file run each scenario once per registered transport; ``soak.py``
runs a random mix for minutes. Only flowplug's public API is used, and the scenarios adapt
to what a transport declares (``crosses_processes``, ``uses_shared_memory``,
``size_limit_option``), never to its name.

The scenarios are split by theme: ``scenarios_errors.py`` (a worker's error reaches the
consumer), ``scenarios_deaths.py`` (deaths, hangs, interrupts), ``scenarios_lifecycle.py``
(cycles, threads, forks, strangers, several runners), ``scenarios_limits.py`` (too few
file descriptors). What they inject faults with is in ``flows.py``,
what they observe with in ``probes.py``. This module gathers them for the pytest modules
and the soak session.
"""

from __future__ import annotations

from flows import register_faulty, register_limited
from probes import CYCLES, MEASURED
from scenarios_deaths import (
    death_modes,
    forks,
    scenario_consumer_killed,
    scenario_consumer_sigint,
    scenario_ctrl_c_during_gc_cleanup,
    scenario_dropped,
    scenario_ended_thread_then_death,
    scenario_exit_status_taken_first,
    scenario_segfault_is_quiet,
    scenario_stuck,
    scenario_timeout,
    scenario_worker_dies,
)
from scenarios_errors import (
    scenario_broken_str,
    scenario_cannot_connect,
    scenario_dataflow_fails_to_load,
    scenario_fair,
    scenario_many_buffers,
    scenario_report_cannot_be_sent,
    scenario_report_with_closed_stdio,
    scenario_reset_fails,
    scenario_too_large,
    scenario_unpicklable,
    scenario_worker_raises,
)
from scenarios_lifecycle import (
    scenario_chatty,
    scenario_close_from_another_thread,
    scenario_cycles,
    scenario_fork_after_threads,
    scenario_fork_of_the_consumer,
    scenario_garbage,
    scenario_nested,
    scenario_several_runners,
    scenario_shm_tiny,
    scenario_threads,
)
from scenarios_limits import (
    scenario_fd_limits,
    scenario_fd_shortage_unchecked,
    scenario_fds_used_up_after_start,
)

__all__ = [
    "CYCLES",
    "MEASURED",
    "death_modes",
    "forks",
    "register_faulty",
    "register_limited",
    "scenario_broken_str",
    "scenario_cannot_connect",
    "scenario_chatty",
    "scenario_close_from_another_thread",
    "scenario_consumer_killed",
    "scenario_consumer_sigint",
    "scenario_ctrl_c_during_gc_cleanup",
    "scenario_cycles",
    "scenario_dataflow_fails_to_load",
    "scenario_dropped",
    "scenario_ended_thread_then_death",
    "scenario_exit_status_taken_first",
    "scenario_fair",
    "scenario_fd_limits",
    "scenario_fd_shortage_unchecked",
    "scenario_fds_used_up_after_start",
    "scenario_fork_after_threads",
    "scenario_fork_of_the_consumer",
    "scenario_garbage",
    "scenario_many_buffers",
    "scenario_nested",
    "scenario_report_cannot_be_sent",
    "scenario_report_with_closed_stdio",
    "scenario_reset_fails",
    "scenario_segfault_is_quiet",
    "scenario_several_runners",
    "scenario_shm_tiny",
    "scenario_stuck",
    "scenario_threads",
    "scenario_timeout",
    "scenario_too_large",
    "scenario_unpicklable",
    "scenario_worker_dies",
    "scenario_worker_raises",
]
