"""The core's fault scenarios (docs/reliability.md) on transport 'ray'.

The scenarios are the core's own code, imported from tests/faults, not copied: they adapt
to what a transport declares, so a row that holds here holds as it is stated there. Rows
5, 26 and 28 interrupt or fork a consumer process (tests/faults/consumer.py); there the
transport starts a Ray instance of the consumer's own, every process of which is the
consumer's descendant, so the scenario sees all of them go. The others run on the
session's instance (conftest.py), which also puts tests/faults on the actors' path.

Which issue-13 case each test covers: 1 closed stdio (19), 2 a fork of the consumer (26),
3 more buffers than IOV_MAX (24), 5 close() from another thread (25), 7 Ctrl-C (05, 28),
9 a quiet intended segfault (27); several runners (30) and an ended starting thread (32);
every failure a WorkerError or WorkerDied (01, 02, 03, 07, 20); an error report not held
back by a flooding worker (18). Not here: rows 4 and 6 (Ray's own processes outlive a
SIGKILLed consumer for a while; Ray writes to stderr when it starts), the fd rows (Ray's
workers are not the Runner's processes), and the rows of start methods, which mean nothing
here (docs/reliability.md, "On Ray").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests" / "faults"))
pytest.register_assert_rewrite(
    "faultlib", "flows", "probes", "scenarios_deaths", "scenarios_errors", "scenarios_lifecycle"
)

import faultlib as fl  # noqa: E402 - after its directory is on the path

RAY = "ray"


@pytest.fixture
def half_a_cpu_per_actor(tmp_path, monkeypatch):
    """Three runners of two workers need six actors; the session's instance has four
    logical CPUs. Each actor asks for half a CPU instead, set where a user would set it: a
    flowplug.toml in the working directory."""
    (tmp_path / "flowplug.toml").write_text("[transports.ray]\nnum_cpus = 0.5\n")
    monkeypatch.chdir(tmp_path)


def test_01_worker_error_stops_the_others(no_leaks):
    assert fl.scenario_worker_raises(RAY) == 1


def test_02_reset_state_error_names_the_worker(no_leaks):
    assert fl.scenario_reset_fails(RAY) == 1


def test_03_worker_death_is_reported(no_leaks):
    for how in fl.death_modes(RAY):
        assert fl.scenario_worker_dies(RAY, how) == 1


def test_05_sigint_gives_one_clean_keyboard_interrupt(no_leaks):
    assert fl.scenario_consumer_sigint(RAY) == 1


@pytest.mark.parametrize("kind", ["lambda", "lock", "socket"])
def test_07_unpicklable_datapoint(no_leaks, kind):
    assert fl.scenario_unpicklable(RAY, kind) == 1


def test_09_timeout_then_close(no_leaks):
    assert fl.scenario_timeout(RAY) == 1


def test_10_close_escalates_on_a_stuck_worker(no_leaks):
    assert fl.scenario_stuck(RAY) == 2


def test_12_threads(no_leaks):
    assert fl.scenario_threads(RAY) == 1


def test_18_a_flooding_worker_cannot_hold_back_an_error(no_leaks):
    assert fl.scenario_fair(RAY) == 1


def test_19_error_report_survives_closed_stdio_and_comes_after_the_data(no_leaks):
    assert fl.scenario_report_with_closed_stdio(RAY) == 1


def test_20_exception_whose_str_raises(no_leaks):
    assert fl.scenario_broken_str(RAY) == 1


def test_24_a_datapoint_with_thousands_of_buffers(no_leaks):
    assert fl.scenario_many_buffers(RAY) == 1


def test_25_close_from_another_thread_wakes_the_consumer(no_leaks):
    # Four rounds: blocked, streaming 64 KiB datapoints, blocked, streaming small ones.
    assert fl.scenario_close_from_another_thread(RAY, 4) == 4


@pytest.mark.parametrize("how", ["child", "pool"])
def test_26_a_fork_of_the_consumer_leaves_the_runner_alone(no_leaks, how):
    assert fl.scenario_fork_of_the_consumer(RAY, how) == 1


def test_27_an_intended_segfault_prints_no_dump(no_leaks):
    assert fl.scenario_segfault_is_quiet(RAY) == 1


def test_28_ctrl_c_during_cleanup_by_gc_is_not_swallowed(no_leaks):
    assert fl.scenario_ctrl_c_during_gc_cleanup(RAY) == 1


@pytest.mark.parametrize("how", ["raises", "dies"])
@pytest.mark.parametrize("threads", [False, True], ids=["in-turn", "threads"])
def test_30_one_failing_runner_leaves_the_others_alone(
    no_leaks, half_a_cpu_per_actor, how, threads
):
    assert fl.scenario_several_runners(RAY, how, threads) == 1


@pytest.mark.parametrize("how", ["raises", "sigkill"])
def test_32_runner_started_by_an_ended_thread_then_a_worker_fails(no_leaks, how):
    assert fl.scenario_ended_thread_then_death(RAY, how) == 1
