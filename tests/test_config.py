"""Settings from explicit arguments, environment variables, flowplug.toml, pyproject.toml.

Every test works in its own directory (monkeypatch.chdir) with real files and real
environment variables.
"""

import os
import re
import subprocess
import sys
import types

import pytest

import flowplug as fp
from flowplug.config import ENV_VARS, default_transport

DF = fp.DataFromList([1, 2, 3])
AVAILABLE = ", ".join(sorted(fp.available_transports()))


@pytest.fixture(autouse=True)
def _in_empty_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in (*ENV_VARS, "FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "FLOWPLUG_BLOCK_PLUGINS"):
        monkeypatch.delenv(var, raising=False)


def write(path, text):
    path.write_text(text)
    return str(path.resolve())


# ---------------------------------------------------------------------------- sources


def test_defaults_when_nothing_is_set():
    cfg = fp.load_config()
    assert (cfg.transport, cfg.num_workers, cfg.capacity) == (default_transport(), 1, 50)
    assert (cfg.start_method, cfg.timeout, cfg.plugins) == (None, None, ())
    assert cfg.files == () and cfg.transports == {}
    assert {cfg.source(k) for k in ("transport", "num_workers", "timeout")} == {"default"}


def test_the_default_transport_is_shm_where_its_store_fits_else_zmq(tmp_path, monkeypatch):
    room = {"free": 2 << 30}

    def statvfs(where):
        assert where == str(tmp_path)
        return types.SimpleNamespace(f_bavail=room["free"] // 4096, f_frsize=4096)

    monkeypatch.setattr(os, "statvfs", statvfs)
    assert default_transport(str(tmp_path)) == "shm"
    room["free"] = 64 << 20  # a container's /dev/shm
    assert default_transport(str(tmp_path)) == "zmq"
    room["free"] = 2 << 30
    monkeypatch.setattr(sys, "platform", "darwin")
    assert default_transport(str(tmp_path)) == "zmq"


def test_the_default_transport_falls_back_to_zmq_when_shm_is_not_there(tmp_path):
    code = (
        "import flowplug as fp; cfg = fp.load_config(); "
        "print(cfg.transport, cfg.source('transport'))"
    )
    env = {**os.environ, "FLOWPLUG_BLOCK_PLUGINS": "shm"}
    env.pop("FLOWPLUG_TRANSPORT", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["zmq", "default"]


def test_sources_in_order_argument_env_flowplug_toml_pyproject(tmp_path, monkeypatch):
    pyproject = write(
        tmp_path / "pyproject.toml",
        "[tool.flowplug]\nnum_workers = 2\ncapacity = 20\ntimeout = 2.0\ntransport = 'queue'\n",
    )
    toml = write(tmp_path / "flowplug.toml", "num_workers = 3\ncapacity = 30\ntimeout = 3\n")
    monkeypatch.setenv("FLOWPLUG_NUM_WORKERS", "4")
    monkeypatch.setenv("FLOWPLUG_CAPACITY", "40")

    cfg = fp.load_config()
    assert (cfg.transport, cfg.num_workers, cfg.capacity, cfg.timeout) == ("queue", 4, 40, 3.0)
    assert cfg.source("transport") == f"{pyproject} [tool.flowplug]"
    assert cfg.source("timeout") == toml
    assert cfg.source("capacity") == "environment variable FLOWPLUG_CAPACITY"
    assert cfg.files == (toml, f"{pyproject} [tool.flowplug]")

    runner = fp.Runner(DF, num_workers=5)
    assert (runner.transport_name, runner.num_workers, runner.capacity) == ("queue", 5, 40)
    assert runner.timeout == 3.0


def test_pyproject_without_flowplug_table_is_not_a_source(tmp_path):
    write(tmp_path / "pyproject.toml", "[project]\nname = 'app'\n[tool.other]\nx = 1\n")
    assert fp.load_config().files == ()


def test_plain_runner_honours_environment(monkeypatch):
    monkeypatch.setenv("FLOWPLUG_TRANSPORT", "thread")
    monkeypatch.setenv("FLOWPLUG_NUM_WORKERS", "2")
    monkeypatch.setenv("FLOWPLUG_TIMEOUT", "7.5")
    with fp.Runner(lambda: fp.DataFromList([1, 2]), mode="replicate") as runner:
        assert (runner.transport_name, runner.num_workers, runner.timeout) == ("thread", 2, 7.5)
        epoch = list(runner)  # each worker repeats its own copy: any mix of 1 and 2
        assert len(epoch) == 2 and set(epoch) <= {1, 2}


def test_env_start_method_does_not_apply_to_thread_workers(monkeypatch):
    monkeypatch.setenv("FLOWPLUG_START_METHOD", "spawn")
    assert fp.Runner(DF, transport="queue").start_method == "spawn"
    assert fp.Runner(DF, transport="thread").start_method is None
    with pytest.raises(fp.ConfigError, match="threads"):
        fp.Runner(DF, transport="thread", start_method="spawn")


def test_transport_tables_merge_per_option_and_arguments_win(tmp_path):
    write(tmp_path / "pyproject.toml", "[tool.flowplug.transports.zmq]\nhwm = 5\n")
    toml = write(tmp_path / "flowplug.toml", "[transports.zmq]\nhwm = 9\n")
    cfg = fp.load_config()
    zmq = fp.get_transport("zmq")
    assert cfg.transports == {"zmq": {"hwm": 9}}
    assert cfg.source("transports.zmq.hwm") == toml
    defaults = {o.name: o.default for o in zmq.options}
    assert cfg.options_for(zmq) == {**defaults, "hwm": 9}
    assert cfg.options_for(zmq, {"hwm": 11}) == {**defaults, "hwm": 11}
    with fp.Runner(DF, transport="zmq") as runner:
        assert list(runner) == [1, 2, 3]


def test_from_config_reads_the_given_file_and_overrides_win(tmp_path):
    write(tmp_path / "flowplug.toml", "num_workers = 3\n")  # not read: a path is given
    ci = write(tmp_path / "ci.toml", "transport = 'queue'\nnum_workers = 2\ncapacity = 8\n")
    runner = fp.Runner.from_config(DF, ci, capacity=4, mode="replicate")
    assert (runner.transport_name, runner.num_workers, runner.capacity) == ("queue", 2, 4)
    assert fp.load_config(ci).files == (ci,)
    with runner:
        epoch = list(runner)
        assert len(epoch) == 3 and set(epoch) <= {1, 2, 3}


def test_from_config_reads_tool_flowplug_of_a_named_pyproject(tmp_path):
    sub = tmp_path / "proj"
    sub.mkdir()
    path = write(sub / "pyproject.toml", "[tool.flowplug]\ncapacity = 9\n")
    assert fp.Runner.from_config(DF, path).capacity == 9
    assert fp.load_config(path).source("capacity") == f"{path} [tool.flowplug]"


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("missing.toml", None, "does not exist"),
        ("pyproject.toml", "[project]\nname = 'x'\n", "has no [tool.flowplug] table"),
    ],
)
def test_from_config_with_an_unusable_path(tmp_path, name, text, expected):
    if text is not None:
        write(tmp_path / name, text)
    with pytest.raises(fp.ConfigError, match=re.escape(expected)):
        fp.Runner.from_config(DF, tmp_path / name)


# ---------------------------------------------------------------------------- bad files

BAD_FILES = [
    (
        "num_worker = 4",
        ["num_worker = 4", "valid keys: transport, num_workers", "Did you mean 'num_workers'?"],
    ),
    ('num_workers = "4"', ["num_workers = '4'", "integer of at least 1"]),
    ("num_workers = 0", ["num_workers = 0", "integer of at least 1"]),
    ("capacity = true", ["capacity = True", "integer"]),
    ('start_method = "spwan"', ["'spwan'", "fork, spawn, forkserver", "Did you mean 'spawn'?"]),
    ('timeout = "soon"', ["timeout = 'soon'", "positive number of seconds"]),
    ('plugins = "zmq"', ["plugins = 'zmq'", "list of entry-point names"]),
    ("transports = 3", ["transports", "one table per transport"]),
    (
        "[transports.zmq]\nhwn = 3",
        ["[transports.zmq] hwn = 3", "accepts: ", "hwm)", "Did you mean 'hwm'?"],
    ),
    ('[transports.zmq]\nhwm = "100"', ["[transports.zmq] hwm = '100'", "must be int, got str"]),
    (
        "[transports.zqm]\nhwm = 3",
        ["[transports.zqm]", f"available: {AVAILABLE}", "Did you mean 'zmq'?"],
    ),
    ("num_workers = ", ["is not valid TOML", "line 1"]),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_FILES)
def test_bad_flowplug_toml_names_file_key_value_and_choices(tmp_path, text, fragments):
    path = write(tmp_path / "flowplug.toml", text + "\n")
    with pytest.raises(fp.ConfigError) as info:
        fp.load_config()
    msg = str(info.value)
    assert msg.startswith(path)
    for fragment in fragments:
        assert fragment in msg
    with pytest.raises(fp.ConfigError):
        fp.Runner(DF)  # the runner never falls back to defaults


def test_bad_pyproject_table_names_the_table(tmp_path):
    path = write(tmp_path / "pyproject.toml", "[tool.flowplug.transports.zmq]\nhwm = 1.5\n")
    with pytest.raises(fp.ConfigError) as info:
        fp.load_config()
    assert str(info.value).startswith(
        f"{path} [tool.flowplug]: [tool.flowplug.transports.zmq] hwm = 1.5: "
    )


def test_unknown_transport_in_file_is_transport_not_found(tmp_path):
    path = write(tmp_path / "flowplug.toml", 'transport = "zmqq"\n')
    with pytest.raises(fp.TransportNotFound) as info:
        fp.Runner(DF)
    msg = str(info.value)
    assert msg.startswith(f"{path}: transport = 'zmqq': no transport 'zmqq'")
    assert f"available: {AVAILABLE}" in msg and "Did you mean 'zmq'?" in msg
    assert info.value.where == path


# ---------------------------------------------------------------------------- bad environment


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("FLOWPLUG_NUM_WORKERS", "four", "integer of at least 1"),
        ("FLOWPLUG_CAPACITY", "0", "integer of at least 1"),
        ("FLOWPLUG_START_METHOD", "forc", "Did you mean 'fork'?"),
        ("FLOWPLUG_TIMEOUT", "-1", "positive number of seconds"),
    ],
)
def test_bad_environment_variable_names_variable_and_value(monkeypatch, var, value, fragment):
    monkeypatch.setenv(var, value)
    with pytest.raises(fp.ConfigError) as info:
        fp.load_config()
    msg = str(info.value)
    assert msg.startswith(f"environment variable {var} = {value!r}: ") and fragment in msg
    with pytest.raises(fp.ConfigError):
        fp.Runner(DF, num_workers=1, capacity=1, start_method="fork", timeout=1)


def test_unknown_transport_in_environment(monkeypatch):
    monkeypatch.setenv("FLOWPLUG_TRANSPORT", "thred")
    with pytest.raises(fp.TransportNotFound, match=r"FLOWPLUG_TRANSPORT.*Did you mean 'thread'"):
        fp.Runner(DF)
    # an explicit argument is what the user asked for; the variable is not consulted
    assert fp.Runner(DF, transport="queue").transport_name == "queue"


def test_explicit_bad_values_are_config_errors():
    with pytest.raises(fp.ConfigError, match="argument num_workers = 0"):
        fp.Runner(DF, num_workers=0)
    with pytest.raises(fp.ConfigError, match=r"has no option 'hwn'.*Did you mean 'hwm'"):
        fp.Runner(DF, transport="zmq", hwn=3)
    with pytest.raises(fp.TransportNotFound, match="Did you mean 'queue'"):
        fp.Runner(DF, transport="queu")


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("512MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("2 gib", 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("64k", 64_000),
    ],
)
def test_parse_size(text, size):
    assert fp.parse_size(text) == size


@pytest.mark.parametrize("text", ["-1", -1, "2 gigs", "", "1e9", 1.5, True, None])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        fp.parse_size(text)
