"""The fault matrix (docs/reliability.md), every scenario once per registered transport.

The scenarios live in scenarios_*.py (gathered by faultlib.py) so that the soak session
(soak.py) runs the same code.
"""

import pytest
from faultlib import (
    death_modes,
    forks,
    register_limited,
    scenario_broken_str,
    scenario_cannot_connect,
    scenario_chatty,
    scenario_close_from_another_thread,
    scenario_consumer_killed,
    scenario_consumer_sigint,
    scenario_ctrl_c_during_gc_cleanup,
    scenario_cycles,
    scenario_dataflow_fails_to_load,
    scenario_dropped,
    scenario_ended_thread_then_death,
    scenario_exit_status_taken_first,
    scenario_fair,
    scenario_fd_limits,
    scenario_fd_shortage_unchecked,
    scenario_fds_used_up_after_start,
    scenario_fork_after_threads,
    scenario_fork_of_the_consumer,
    scenario_garbage,
    scenario_many_buffers,
    scenario_nested,
    scenario_report_cannot_be_sent,
    scenario_report_with_closed_stdio,
    scenario_reset_fails,
    scenario_segfault_is_quiet,
    scenario_several_runners,
    scenario_shm_tiny,
    scenario_stuck,
    scenario_threads,
    scenario_timeout,
    scenario_too_large,
    scenario_unpicklable,
    scenario_worker_dies,
    scenario_worker_raises,
)


def test_01_worker_error_stops_the_others(transport):
    assert scenario_worker_raises(transport) == 1


def test_02_reset_state_error_names_the_worker(transport):
    assert scenario_reset_fails(transport) == 1


def test_03_worker_death_is_reported(transport):
    for how in death_modes(transport):
        assert scenario_worker_dies(transport, how) == 1


@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "other-thread"])
def test_04_killed_consumer_leaves_no_orphans(transport, in_thread):
    assert scenario_consumer_killed(transport, in_thread) == 1


def test_05_sigint_gives_one_clean_keyboard_interrupt(transport):
    assert scenario_consumer_sigint(transport) == 1


def test_06_dropped_runner_is_released(transport):
    assert scenario_dropped(transport) == 2


@pytest.mark.parametrize("kind", ["lambda", "lock", "socket"])
def test_07_unpicklable_datapoint(transport, kind):
    assert scenario_unpicklable(transport, kind) == 1


def test_08_datapoint_over_the_limit(transport):
    scenario_too_large(transport)


def test_08_data_too_large_in_a_worker_keeps_sizes_and_option():
    register_limited()
    assert scenario_too_large("limited") == 1


def test_09_timeout_then_close(transport):
    assert scenario_timeout(transport) == 1


def test_10_close_escalates_on_a_stuck_worker(transport):
    assert scenario_stuck(transport) == 2


def test_11_create_iterate_close_cycles_leak_nothing(transport):
    scenario_cycles(transport)


def test_12_threads(transport):
    assert scenario_threads(transport) == 1


def test_13_nested_runner(transport):
    assert scenario_nested(transport) == 1


def test_14_fork_after_threads_and_zmq_context(transport):
    assert scenario_fork_after_threads(transport) == 1


def test_15_shared_memory_too_small(transport):
    scenario_shm_tiny(transport)


def test_16_chatty_workers_do_not_deadlock(transport):
    assert scenario_chatty(transport) == 1


def test_17_strangers_bytes_are_never_unpickled(transport):
    assert scenario_garbage(transport) >= 1


def test_18_a_flooding_worker_cannot_hold_back_an_error(transport):
    assert scenario_fair(transport) == 1


def test_19_error_report_survives_closed_stdio_and_comes_after_the_data(transport):
    assert scenario_report_with_closed_stdio(transport) == 1


def test_20_exception_whose_str_raises(transport):
    assert scenario_broken_str(transport) == 1


@pytest.mark.parametrize("in_threads", [False, True], ids=["processes", "threads"])
def test_21_worker_that_cannot_connect(in_threads):
    assert scenario_cannot_connect(in_threads) == 1


@pytest.mark.parametrize("in_threads", [False, True], ids=["processes", "threads"])
def test_22_report_that_cannot_go_through_the_transport(in_threads):
    assert scenario_report_cannot_be_sent(in_threads) == 1


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_23_dataflow_that_fails_to_load_in_the_worker(transport, start_method):
    scenario_dataflow_fails_to_load(transport, start_method)


def test_24_a_datapoint_with_thousands_of_buffers(transport):
    assert scenario_many_buffers(transport) == 1


def test_25_close_from_another_thread_wakes_the_consumer(transport):
    assert scenario_close_from_another_thread(transport) > 0


@pytest.mark.parametrize("how", ["child", "pool"])
def test_26_a_fork_of_the_consumer_leaves_the_runner_alone(transport, how):
    assert scenario_fork_of_the_consumer(transport, how) == 1


def test_27_an_intended_segfault_prints_no_dump(transport):
    scenario_segfault_is_quiet(transport)


def test_28_ctrl_c_during_cleanup_by_gc_is_not_swallowed(transport):
    assert scenario_ctrl_c_during_gc_cleanup(transport) == 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("mode", "start_method"),
    [("replicate", "fork"), ("shard", "fork"), ("map", "fork"), ("replicate", "spawn")],
)
def test_29_every_fd_limit_runs_or_is_refused_up_front(transport, mode, start_method):
    if start_method != "fork" and not forks(transport):
        return  # start_method means nothing to this transport's workers
    assert scenario_fd_limits(transport, mode, start_method) >= 1


@pytest.mark.timeout(300)
def test_29_without_the_check_a_shortage_is_an_error_never_an_abort(transport):
    scenario_fd_shortage_unchecked(transport)


@pytest.mark.parametrize("how", ["raises", "dies"])
@pytest.mark.parametrize("threads", [False, True], ids=["in-turn", "threads"])
def test_30_one_failing_runner_leaves_the_others_alone(transport, how, threads):
    assert scenario_several_runners(transport, how, threads) == 1


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_31_worker_error_and_death_with_spawned_workers(transport, start_method):
    if not forks(transport):
        return  # start_method means nothing to this transport's workers
    assert scenario_worker_raises(transport, 4, start_method) == 1
    for how in death_modes(transport):
        assert scenario_worker_dies(transport, how, start_method) == 1


def test_32_runner_started_by_an_ended_thread_then_a_worker_fails(transport):
    for how in ["raises", death_modes(transport)[0]]:
        assert scenario_ended_thread_then_death(transport, how) == 1


@pytest.mark.parametrize("how", ["sigkill", "exit3"])
def test_33_a_death_names_its_status_when_another_thread_reaped_it_first(transport, how):
    assert scenario_exit_status_taken_first(transport, how) == int(forks(transport))


def test_34_every_fd_taken_after_the_start_and_the_run_goes_on(transport):
    assert scenario_fds_used_up_after_start(transport) >= 2
