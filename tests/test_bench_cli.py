"""``flowplug bench`` runs from an installed flowplug and prints a table (no speed asserted)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import flowplug as fp
from flowplug import bench
from flowplug.bench import report, systems
from flowplug.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_prints_a_table_with_measured_rows(capsys):
    assert main(["bench", "--quick", "--peers", "pyzmq", "-p", "small"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["system", "payload"]
    default = f"flowplug {fp.Runner(fp.DataFromList([0])).transport_name}"
    for label in (default, "pyzmq PUSH/PULL pickle5", "memcpy (np.copyto, 1 core)"):
        (row,) = [line for line in lines if line.startswith(label)]
        items_per_s = row[len(label) :].split()[2]  # after payload and workers
        assert float(items_per_s.replace(",", "")) > 0, row


def test_json_rows_have_every_measure_and_ratios(capsys):
    argv = ["bench", "--quick", "-t", "zmq", "--peers", "none", "-p", "medium", "--json", "-"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"memcpy", "fp-zmq"}
    row = rows["fp-zmq"]
    assert row["status"] == "ok", row
    assert row["nbytes"] == 64 * 1024
    assert row["startup_s"] > 0 and row["peak_rss_mb"] > 0 and len(row["rates"]) == 1
    assert row["vs_memcpy"] == pytest.approx(row["gb_per_s"] / rows["memcpy"]["gb_per_s"])
    assert result["machine"]["cpus"] >= 1


def test_a_missing_peer_is_reported_not_faked(monkeypatch):
    absent = systems.System("torch DataLoader", "peer", ("no_such_module_fp",), "pip install x")
    monkeypatch.setitem(systems.PEERS, "torch", absent)
    config = bench.BenchConfig(transports=[], peers=["torch"], payloads=["small"], repeats=1)
    (memcpy, row) = bench.plan(config)
    assert memcpy["system"] == "memcpy"
    result = bench.run(
        bench.BenchConfig(
            transports=[], peers=["torch"], payloads=["small"], warmup=0.01, seconds=0.01
        )
    )
    (row,) = [r for r in result["rows"] if r["system"] == "torch"]
    assert row["status"].startswith("not installed") and "no_such_module_fp" in row["status"]
    assert "items_per_s" not in row and row["vs_counterpart"] is None
    assert "not installed" in bench.table(result["rows"])


def test_missing_peers_are_one_line_per_reason_not_one_per_row(monkeypatch):
    absent = systems.System("tp X", "peer", ("no_such_module_fp",), "pip install x")
    for key in ("tp-queue", "tp-zmq"):
        monkeypatch.setitem(systems.PEERS, key, replace(absent, name=f"tp {key}"))
    result = bench.run(
        bench.BenchConfig(
            transports=[],
            peers=["tp-queue", "tp-zmq"],
            payloads=["small", "medium"],
            workers=[1, 2],
            warmup=0.01,
            seconds=0.01,
            repeats=1,
        )
    )
    text = bench.table(result["rows"])
    lines = [line for line in text.splitlines() if "no_such_module_fp" in line]
    assert lines == [
        "not measured: tp tp-queue, tp tp-zmq: not installed: no_such_module_fp not installed "
        "(pip install x)"
    ]
    assert len([r for r in result["rows"] if r["system"] == "tp-zmq"]) == 4  # still in the JSON


def test_the_default_bench_measures_every_installed_transport(capsys):
    argv = ["bench", "--quick", "--peers", "none", "-p", "small", "--json", "-"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    measured = {r["system"] for r in result["rows"] if r["status"] == "ok"}
    assert measured == {"memcpy"} | {f"fp-{t}" for t in fp.available_transports()}
    for row in result["rows"]:
        assert row["consumer_cpu_s_per_item"] > 0, row


def test_the_plot_title_names_the_machine():
    machine = bench.harness.machine()
    title = report.title(machine)
    for part in (f"{machine['cpus']} cores", f"Python {machine['python']}", "numpy ", "pyzmq "):
        assert part in title, title


def test_unknown_peer_is_a_usage_error(capsys):
    assert main(["bench", "--quick", "--peers", "tensorflow"]) == 2
    assert "unknown peer 'tensorflow'" in capsys.readouterr().err


def test_every_peer_is_preloaded_so_startup_counts_no_imports():
    # A peer without an entry would fail at measuring time (KeyError), not here.
    assert set(systems.IMPORTS) == set(systems.PEERS)
    code = (
        "import sys; from flowplug.bench import systems; "
        "assert 'flowplug.runner' not in sys.modules; systems.preload('fp-queue'); "
        "assert 'flowplug.runner' in sys.modules; "
        "assert not any(m.startswith('flowplug_') for m in sys.modules), 'plugins loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rounds_give_each_row_its_round_rates_and_their_median(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "-t", "zmq", "--peers", "none", "-p", "small", "--rounds", "3"]
    argv += ["--repeats", "2", "--seconds", "0.02", "--warmup", "0.01", "--json", str(out)]
    assert main(argv) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert progress == [
        f"[round {k}/3 {i}/2] {what}"
        for k in (1, 2, 3)
        for i, what in ((1, "memcpy (np.copyto, 1 core) small w=1"), (2, "flowplug zmq small w=1"))
    ]
    result = json.loads(out.read_text())
    assert (result["config"]["rounds"], result["config"]["repeats"]) == (3, 2)
    rows = {r["system"]: r for r in result["rows"]}
    for row in rows.values():
        assert row["status"] == "ok", row
        rates, per_round = row["rates"], row["round_rates"]
        assert len(rates) == 6 and len(per_round) == 3  # every repeat of every round
        assert per_round == [statistics.median(rates[i : i + 2]) for i in (0, 2, 4)]
        assert row["items_per_s"] == statistics.median(per_round)
    zmq, memcpy = rows["fp-zmq"], rows["memcpy"]
    per_round = [z / m for z, m in zip(zmq["round_rates"], memcpy["round_rates"], strict=True)]
    ratio = statistics.median(per_round) * zmq["nbytes"] / memcpy["nbytes"]
    assert zmq["vs_memcpy"] == pytest.approx(ratio)


def test_all_measures_three_rounds_of_one_repeat_the_default_one_round(monkeypatch, capsys):
    seen = []

    def run(config, progress):
        seen.append((config.rounds, config.repeats))
        return {"machine": {}, "config": {}, "rows": []}

    monkeypatch.setattr(bench, "run", run)
    for argv in (["--all"], [], ["--all", "--rounds", "1"], ["--rounds", "5", "--repeats", "2"]):
        assert main(["bench", *argv, "--json", "-"]) == 0
    assert seen == [(3, 1), (1, 3), (1, 3), (5, 2)]


def _ok(rate: float, **more: float) -> dict:
    return {
        "status": "ok",
        "rates": [rate],
        "items_per_s": rate,
        "nbytes": 10,
        "startup_s": 0.1,
        "cpu_s_per_item": 1e-5,
        "consumer_cpu_s_per_item": 1e-6,
        "peak_rss_mb": 40.0,
    } | more


def test_a_row_that_fails_in_one_round_is_failed_and_not_measured_again(monkeypatch):
    calls = []

    def measure(row, config):
        calls.append(row["system"])
        if row["system"] == "pyzmq" and calls.count("pyzmq") == 2:
            return {"status": "failed: RuntimeError: boom"}
        return _ok(100.0 * calls.count(row["system"]), startup_s=0.1 * len(calls))

    monkeypatch.setattr(bench.harness, "_measure", measure)
    config = bench.BenchConfig(transports=[], peers=["pyzmq"], payloads=["small"], rounds=3)
    rows = {r["system"]: r for r in bench.run(config)["rows"]}
    assert calls == ["memcpy", "pyzmq", "memcpy", "pyzmq", "memcpy"]
    failed = rows["pyzmq"]
    assert failed["status"] == "failed in round 2 of 3: RuntimeError: boom"
    assert failed["round_rates"] == [100.0] and "items_per_s" not in failed
    assert failed["vs_memcpy"] is None and "failed in round 2" in bench.table(list(rows.values()))
    memcpy = rows["memcpy"]
    assert memcpy["round_rates"] == [100.0, 200.0, 300.0] and memcpy["items_per_s"] == 200.0
    assert memcpy["startup_s"] == pytest.approx(0.3)  # the median of 0.1, 0.3, 0.5


def test_combine_takes_medians_over_rounds_and_the_peak_rss_maximum():
    rounds = [_ok(10.0, peak_rss_mb=50.0), _ok(30.0, cpu_s_per_item=3e-5), _ok(20.0)]
    row = bench.harness.combine(rounds, 3)
    assert (row["items_per_s"], row["round_rates"]) == (20.0, [10.0, 30.0, 20.0])
    assert row["gb_per_s"] == pytest.approx(20.0 * 10 / 1e9)
    assert row["cpu_s_per_item"] == 1e-5 and row["peak_rss_mb"] == 50.0
    one = bench.harness.combine([{"status": "failed: no result after 61 s"}], 1)
    assert one == {"status": "failed: no result after 61 s", "round_rates": []}


def _row(system: str, payload: str, round_rates: list[float], **more: object) -> dict:
    return {
        "system": system,
        "label": system,
        "kind": "flowplug" if system.startswith("fp-") else "peer",
        "payload": payload,
        "workers": 1,
        "touch": False,
        "counterpart": "tp-zmq",
        "status": "ok",
        "round_rates": round_rates,
        "items_per_s": statistics.median(round_rates),
    } | more


def _targets():
    spec = importlib.util.spec_from_file_location("targets", ROOT / "benchmarks" / "targets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_targets_take_the_median_of_per_round_ratios(capsys):
    zmq, pyzmq = _row("fp-zmq", "medium", [10, 20, 30]), _row("pyzmq", "medium", [5, 40, 15])
    shm, ring = _row("fp-shm", "medium", [4, 8, 30]), _row("shm-ring", "medium", [10, 4, 12])
    # per round: zmq/pyzmq 2, 0.5, 2 (median 2; the medians' ratio is 20/15 = 1.33);
    # shm/ring 0.4, 2, 2.5 (median 2; the medians' ratio 8/10 = 0.8)
    assert bench.harness.paired_ratio(zmq, pyzmq) == 2.0
    assert bench.harness.paired_ratio(shm, ring) == 2.0
    _targets().check({"config": {"rounds": 3}, "rows": [zmq, pyzmq, shm, ring]})
    out = capsys.readouterr().out
    assert "ratios: median of the 3 per-round ratios" in out
    assert "zmq >= 0.9x bare pyzmq: 1 rows, worst fp-zmq medium w=1 2.00x; rounds 2.00 0.50" in out
    assert "medium w=1: shm vs raw shm ring: 2.00x (goal 0.5x; 8 vs 10 items/s; rounds 0.40" in out


def test_targets_with_one_round_take_the_ratio_of_the_rates(capsys):
    zmq, pyzmq = _row("fp-zmq", "medium", [20]), _row("pyzmq", "medium", [25])
    assert bench.harness.paired_ratio(zmq, pyzmq) == 0.8
    _targets().check({"config": {"rounds": 1}, "rows": [zmq, pyzmq]})
    out = capsys.readouterr().out
    assert "ratios: of the rows' items/s (1 round" in out
    assert "NOT MET       zmq >= 0.9x bare pyzmq: 1 rows, worst fp-zmq medium w=1 0.80x\n" in out


def test_zero_rounds_is_a_usage_error(capsys):
    assert main(["bench", "--rounds", "0"]) == 2
    assert "argument --rounds: must be at least 1, got 0" in capsys.readouterr().err
