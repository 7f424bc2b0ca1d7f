"""``flowplug bench`` runs from an installed flowplug and prints a table (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

import flowplug as fp
from flowplug import bench
from flowplug.bench import report, systems
from flowplug.cli import main


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
