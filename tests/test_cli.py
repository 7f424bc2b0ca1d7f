"""The ``flowplug`` command: transports, config, doctor; exit codes and one-line errors."""

import json
import os
import secrets
import subprocess
import sys

import pytest

import flowplug as fp
from flowplug.cli import main
from flowplug.config import ENV_VARS


@pytest.fixture(autouse=True)
def _in_empty_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in (*ENV_VARS, "FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "FLOWPLUG_BLOCK_PLUGINS"):
        monkeypatch.delenv(var, raising=False)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- transports


def test_transports_json_lists_builtins_with_capabilities(capsys):
    code, out, _ = run(capsys, "transports", "--json")
    assert code == 0
    data = json.loads(out)
    rows = {row["name"]: row for row in data["transports"]}
    assert set(rows) == set(fp.available_transports())
    assert rows["thread"]["crosses_processes"] is False and rows["thread"]["zero_copy"] is True
    assert rows["zmq"]["crosses_processes"] is True
    assert rows["zmq"]["distribution"] == "flowplug" and rows["zmq"]["version"] == fp.__version__
    options = {o["name"]: o for o in rows["zmq"]["options"]}
    assert [o.name for o in fp.get_transport("zmq").options] == list(options)
    hwm = options["hwm"]
    assert (hwm["type"], hwm["default"]) == ("int", 0) and hwm["help"]
    assert data["broken"] == [] and data["conflicts"] == []


def test_transports_lists_an_installed_plugin(plugin_envs, run_cli, tmp_path):
    result = run_cli(["transports"], plugin_envs.example, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "pipe       flowplug-example 0.1.0  (processes)" in lines
    assert any(line.strip().startswith("pipe_size: size = 0  ") for line in lines)


def test_transports_reports_broken_plugins_and_still_lists_the_rest(plugin_envs, run_cli, tmp_path):
    result = run_cli(["transports", "--json"], plugin_envs.broken, tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {row["name"] for row in data["transports"]} >= {"queue", "thread", "zmq"}
    broken = "\n".join(data["broken"])
    for dist in ("flowplug-broken-import", "flowplug-broken-hook", "flowplug-typo"):
        assert dist in broken
    assert "libfoo 2.0 is missing" in broken and "the hook exploded" in broken
    (conflict,) = data["conflicts"]
    assert "flowplug-dupe" in conflict and "flowplug-example" in conflict


# ---------------------------------------------------------------------------- config


def test_config_shows_each_value_and_its_source(capsys, tmp_path, monkeypatch):
    (tmp_path / "flowplug.toml").write_text("capacity = 8\n[transports.zmq]\nhwm = 3\n")
    monkeypatch.setenv("FLOWPLUG_NUM_WORKERS", "6")
    code, out, _ = run(capsys, "config")
    assert code == 0
    toml = str(tmp_path / "flowplug.toml")
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert f"config files: {toml}" in lines
    assert f"transport = {fp.load_config().transport!r} (default)" in lines
    assert "num_workers = 6 (environment variable FLOWPLUG_NUM_WORKERS)" in lines
    assert f"capacity = 8 ({toml})" in lines
    assert "[transports.zmq]" in lines and f"hwm = 3 ({toml})" in lines


def test_config_json(capsys, tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.flowplug]\ntransport = 'queue'\n")
    code, out, _ = run(capsys, "config", "--json")
    assert code == 0
    data = json.loads(out)
    source = f"{tmp_path / 'pyproject.toml'} [tool.flowplug]"
    assert data["files"] == [source]
    assert data["settings"]["transport"] == {"value": "queue", "source": source}
    assert data["settings"]["timeout"] == {"value": None, "source": "default"}
    declared = fp.get_transport("queue").options
    assert data["transports"] == {
        "queue": {o.name: {"value": o.default, "source": "default"} for o in declared}
    }


def test_config_shows_the_selected_transports_declared_options(capsys):
    code, out, _ = run(capsys, "config", "--json")
    assert code == 0
    selected = fp.load_config().transport
    declared = fp.get_transport(selected).options
    assert json.loads(out)["transports"] == {
        selected: {o.name: {"value": o.default, "source": "default"} for o in declared}
    }


def test_config_file_option(capsys, tmp_path):
    (tmp_path / "ci.toml").write_text("timeout = 4\n")
    code, out, _ = run(capsys, "config", "--json", "--file", str(tmp_path / "ci.toml"))
    assert code == 0
    assert json.loads(out)["settings"]["timeout"]["value"] == 4.0


def test_bad_config_is_one_line_and_exit_1(capsys, tmp_path):
    (tmp_path / "flowplug.toml").write_text("num_worker = 2\n")
    code, out, err = run(capsys, "config")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"flowplug: error: {tmp_path / 'flowplug.toml'}: unknown key num_worker")
    assert "Did you mean 'num_workers'?" in err


def test_debug_shows_the_traceback(run_cli, tmp_path):
    (tmp_path / "flowplug.toml").write_text("num_worker = 2\n")
    plain = run_cli(["config"], None, tmp_path)
    debug = run_cli(["--debug", "config"], None, tmp_path)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "flowplug.errors.ConfigError" in debug.stderr


@pytest.mark.parametrize(
    "argv", [[], ["nope"], ["config", "--bogus"], ["demo", "--workers", "many"]]
)
def test_usage_errors_exit_2(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and "usage: flowplug" in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "doctor" in out and "config" in out


@pytest.mark.parametrize(
    "command", [[], ["transports"], ["config"], ["doctor"], ["demo"], ["bench"]]
)
def test_help_is_plain_text(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0 and out.startswith("usage: flowplug")
    for markup in ("``", ":class:", ":func:", ":mod:", ".. "):
        assert markup not in out, (markup, out)


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith(f"flowplug {fp.__version__} (Python ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--mb", "0"], "argument --mb: must be at least 1, got 0"),
        (["demo", "--workers", "0"], "argument -w/--workers: must be at least 1, got 0"),
        (["demo", "--seconds", "-1"], "argument --seconds: must be more than 0 seconds"),
        (["demo", "-t", "nope"], "no transport 'nope'; available: "),
        (["demo", "-t", "zmqq"], "Did you mean 'zmq'?"),
        (["bench", "--payload", "nonsense"], "unknown payload 'nonsense'; choose from small"),
        (["bench", "--peers", "tensorflow"], "unknown peer 'tensorflow'; choose from tp-queue"),
        (["bench", "-t", "nope"], "no transport 'nope'"),
        (["bench", "--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
        (["bench", "--warmup", "x"], "argument --warmup: expected seconds, got 'x'"),
    ],
)
def test_bad_arguments_are_usage_errors_with_nothing_else_printed(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""  # no header, no table before the error
    assert err.startswith(f"usage: flowplug {argv[0]} ")
    last = err.splitlines()[-1]
    assert last.startswith(f"flowplug {argv[0]}: error: ") and message in last, err


def test_config_reports_every_problem_of_a_file(capsys, tmp_path):
    (tmp_path / "flowplug.toml").write_text(
        "num_worker = 2\ncapacity = 0\n[transports.zmq]\nhwm = 'x'\nbogus = 1\n"
    )
    code, out, err = run(capsys, "config")
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 4 and all(line.startswith("flowplug: error: ") for line in lines)
    assert "unknown key num_worker" in lines[0] and "capacity = 0" in lines[1]
    assert "hwm = 'x'" in lines[2] and "no option 'bogus'" in lines[3]
    assert lines[-1].endswith("(--debug shows the traceback)")


def test_sizes_are_shown_in_units(capsys, tmp_path):
    (tmp_path / "flowplug.toml").write_text("transport = 'shm'\n[transports.shm]\nsize = '2GiB'\n")
    code, out, _ = run(capsys, "config")
    assert code == 0
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert f"size = 2 GiB ({tmp_path / 'flowplug.toml'})" in lines
    code, out, _ = run(capsys, "transports")
    (size,) = [line.strip() for line in out.splitlines() if line.strip().startswith("size:")]
    default = fp.get_transport("shm").options[0].default
    assert size.startswith(f"size: size = {fp.config.format_size(default)}  ")
    assert fp.parse_size(fp.config.format_size(default)) == default


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (1024**3, "1 GiB"), (3 * 1024**2, "3 MiB"), (2 * 10**9, "2 GB"), (1001, "1001 B")],
)
def test_format_size_round_trips(n, text):
    assert fp.config.format_size(n) == text and fp.parse_size(text) == n


def test_demo_says_threads_copy_nothing(capsys):
    code, out, err = run(capsys, "demo", "-t", "thread", "-t", "zmq", "--seconds", "0.2")
    assert code == 0, err
    header, thread, zmq = out.splitlines()
    assert header.startswith("pushing 1 MiB uint8 arrays")
    assert thread.startswith("thread") and "items/s  no copy (reference handed over)" in thread
    assert zmq.startswith("zmq") and " GiB/s " in zmq


# ---------------------------------------------------------------------------- doctor


@pytest.fixture
def segments(tmp_path, monkeypatch):
    """A stale segment (its owner pid has exited) and a live one (owned by this process).

    They live in a private directory that doctor is pointed at: in /dev/shm, any other
    test's runner (xdist) sweeps the stale one between the two doctor calls.
    """
    from flowplug import _sweep

    monkeypatch.setattr(_sweep, "SHM_DIR", str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    tag = secrets.token_hex(4)
    stale = f"{tmp_path}/fp-{child.pid}-{tag}-store"
    live = f"{tmp_path}/fp-{os.getpid()}-{tag}"
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"\0" * 8192)
    yield stale, live
    for path in (stale, live):
        if os.path.exists(path):
            os.unlink(path)


def test_doctor_reports_stale_segments_and_clean_removes_only_those(capsys, segments):
    stale, live = segments
    code, out, _ = run(capsys, "doctor")
    assert code == 1
    assert f"{stale} (pid {os.path.basename(stale).split('-')[1]} is gone)" in out
    assert live not in out
    assert "flowplug doctor --clean" in out

    code, out, _ = run(capsys, "doctor", "--clean")
    assert code == 0, out
    assert f"removed {stale}" in out and "no problems found" in out
    assert not os.path.exists(stale) and os.path.exists(live)


def test_doctor_checks_the_platform(capsys):
    code, out, _ = run(capsys, "doctor", "--clean")
    assert code == 0, out
    assert "start methods: " in out and "fork" in out
    assert "ipc:// sockets work" in out
    assert "/dev/shm: " in out and "MiB total" in out
    for dist in ("pyzmq", "pyarrow"):
        assert f"ok    {dist} " in out
    assert "plugin autoload on" in out


@pytest.mark.parametrize(("wmem_max", "hint"), [(212992, True), (4194304, False)])
def test_doctor_says_how_to_give_zmq_room_for_large_datapoints(
    capsys, tmp_path, monkeypatch, wmem_max, hint
):
    from flowplug import cli

    fake = tmp_path / "wmem_max"
    fake.write_text(f"{wmem_max}\n")
    monkeypatch.setattr(cli, "_WMEM_MAX", str(fake))
    code, out, _ = run(capsys, "doctor", "--clean")
    assert code == 0, out
    line = next(x for x in out.splitlines() if "net.core.wmem_max" in x)
    assert line.startswith("ok    net.core.wmem_max: ")
    assert ("sudo sysctl -w net.core.wmem_max=4194304" in line) is hint
    monkeypatch.setattr(cli, "_WMEM_MAX", str(tmp_path / "missing"))
    code, out, _ = run(capsys, "doctor", "--clean")
    assert code == 0 and "wmem_max" not in out  # not Linux: nothing said


def test_doctor_fails_on_a_bad_config_and_says_why(capsys, tmp_path):
    (tmp_path / "flowplug.toml").write_text('transport = "zmqq"\n')
    code, out, _ = run(capsys, "doctor", "--clean")
    assert code == 1
    assert "FAIL  config: " in out and "Did you mean 'zmq'?" in out


def test_doctor_names_broken_plugins(plugin_envs, run_cli, tmp_path):
    result = run_cli(["doctor", "--clean"], plugin_envs.broken, tmp_path)
    assert result.returncode == 1
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    text = "\n".join(fails)
    for dist in ("flowplug-broken-import", "flowplug-broken-hook", "flowplug-typo"):
        assert dist in text
    assert "registered twice" in text and "FLOWPLUG_BLOCK_PLUGINS=" in text


def test_doctor_with_autoload_off(plugin_envs, run_cli, tmp_path):
    result = run_cli(
        ["doctor", "--clean"],
        plugin_envs.broken,
        tmp_path,
        FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD="1",
        FLOWPLUG_PLUGINS="zmq,pipe",
    )
    assert result.returncode == 0, result.stdout
    assert "transports: pipe, zmq; plugin autoload off" in result.stdout
