"""Third-party plugins, really installed by pip (see ``plugin_envs`` in conftest.py).

No entry point is mocked: each test puts a pip target directory on sys.path (or on the
PYTHONPATH of a fresh interpreter) and flowplug finds what is installed there.
"""

from importlib import metadata

import pytest

import flowplug as fp
from flowplug import plugins

#: the transports flowplug's own distribution declares (read from its metadata, not listed)
BUILTINS = {ep.name for ep in metadata.entry_points(group="flowplug") if ep.dist.name == "flowplug"}


# ---------------------------------------------------------------------------- the example plugin


def test_example_is_found_after_pip_install_alone(plugin_envs, use_env):
    use_env(plugin_envs.example)
    assert set(fp.available_transports()) == BUILTINS | {"pipe"}
    origin = plugins.get_registry().origin["pipe"]
    assert (origin.distribution, origin.version) == ("flowplug-example", "0.1.0")


def test_example_selected_by_flowplug_toml_in_a_fresh_interpreter(
    plugin_envs, run_python, tmp_path
):
    (tmp_path / "flowplug.toml").write_text(
        'transport = "pipe"\nnum_workers = 2\n\n[transports.pipe]\npipe_size = "128KiB"\n'
    )
    result = run_python(
        """
        import flowplug as fp
        cfg = fp.load_config()
        print(cfg.transport, cfg.num_workers, cfg.transports["pipe"]["pipe_size"])
        with fp.Runner(fp.DataFromList(list(range(5)))) as runner:
            epoch = list(runner)  # two workers, each repeating its own copy
            ok = set(epoch) <= set(range(5))
            print(runner.transport_name, runner.num_workers, len(epoch), ok)
        """,
        plugin_envs.example,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["pipe 2 131072", "pipe 2 5 True"]


def test_example_selected_by_environment_variable(plugin_envs, run_python, tmp_path):
    result = run_python(
        """
        import flowplug as fp
        with fp.Runner(fp.DataFromList(["a", "b"])) as runner:
            print(runner.transport_name, list(runner))
        """,
        plugin_envs.example,
        tmp_path,
        FLOWPLUG_TRANSPORT="pipe",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pipe ['a', 'b']"


def test_example_selected_by_pyproject_with_its_options(
    plugin_envs, use_env, tmp_path, monkeypatch
):
    use_env(plugin_envs.example)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "app"\n\n[tool.flowplug]\ntransport = "pipe"\n\n'
        "[tool.flowplug.transports.pipe]\npipe_size = 65536\n"
    )
    monkeypatch.chdir(tmp_path)
    with fp.Runner(fp.DataFromList([1, 2, 3])) as runner:
        assert runner.transport_name == "pipe"
        assert list(runner) == [1, 2, 3]
    cfg = fp.load_config()
    assert cfg.transports == {"pipe": {"pipe_size": 65536}}
    assert (
        cfg.source("transports.pipe.pipe_size") == f"{tmp_path / 'pyproject.toml'} [tool.flowplug]"
    )


def test_example_option_is_validated_from_the_file(plugin_envs, use_env, tmp_path, monkeypatch):
    use_env(plugin_envs.example)
    (tmp_path / "flowplug.toml").write_text('[transports.pipe]\npipe_size = "lots"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fp.ConfigError) as info:
        fp.Runner(fp.DataFromList([1]), transport="pipe")
    msg = str(info.value)
    assert str(tmp_path / "flowplug.toml") in msg
    assert "[transports.pipe] pipe_size = 'lots'" in msg and "512MiB" in msg


def test_example_refuses_spawn_naming_the_way_out(plugin_envs, use_env):
    use_env(plugin_envs.example)
    runner = fp.Runner(fp.DataFromList([1]), transport="pipe", start_method="spawn")
    with pytest.raises(fp.ConfigError, match="start_method='fork'"):
        runner.reset_state()


# ---------------------------------------------------------------------------- broken plugins


def test_broken_plugins_leave_the_others_working(plugin_envs, use_env):
    use_env(plugin_envs.broken)
    registry = plugins.get_registry()
    # "dupe" loads first (plugins load sorted by name), so the example's "pipe" clashes.
    assert set(registry.broken) == {"brokenimport", "brokenhook", "pipe", "typo"}
    assert set(fp.available_transports()) == BUILTINS  # "pipe" is taken twice
    with fp.Runner(fp.DataFromList([1, 2]), transport="zmq", num_workers=1) as runner:
        assert list(runner) == [1, 2]


@pytest.mark.parametrize(
    ("name", "distribution", "original"),
    [
        ("brokenimport", "flowplug-broken-import", "RuntimeError: libfoo 2.0 is missing"),
        ("brokenhook", "flowplug-broken-hook", "ValueError: the hook exploded"),
        ("typo", "flowplug-typo", "flowplug_register_transport"),
    ],
)
def test_selecting_a_broken_plugin_names_distribution_and_error(
    plugin_envs, use_env, name, distribution, original
):
    use_env(plugin_envs.broken)
    with pytest.raises(fp.PluginError) as info:
        fp.Runner(fp.DataFromList([1]), transport=name)
    msg = str(info.value)
    assert f"{distribution} 6.6.6" in msg and original in msg
    assert f"FLOWPLUG_BLOCK_PLUGINS={name}" in msg
    assert info.value.__cause__ is not None  # the original exception, for --debug


def test_two_plugins_registering_one_name_is_an_error_naming_both(plugin_envs, use_env):
    use_env(plugin_envs.broken)
    with pytest.raises(fp.PluginError) as info:
        fp.get_transport("pipe")
    msg = str(info.value)
    assert "'pipe' is registered twice" in msg
    assert "flowplug-example 0.1.0" in msg and "flowplug-dupe 6.6.6" in msg


def test_two_distributions_declaring_one_entry_point_is_an_error_naming_both(plugin_envs, use_env):
    use_env(plugin_envs.clone)
    with pytest.raises(fp.PluginError) as info:
        fp.get_transport("pipe")
    msg = str(info.value)
    assert "flowplug-example 0.1.0" in msg and "flowplug-pipe-clone 6.6.6" in msg
    assert set(fp.available_transports()) == BUILTINS


def test_broken_plugin_selected_by_config_names_the_file(
    plugin_envs, use_env, tmp_path, monkeypatch
):
    use_env(plugin_envs.broken)
    (tmp_path / "flowplug.toml").write_text('transport = "brokenhook"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fp.PluginError) as info:
        fp.load_config()
    msg = str(info.value)
    assert str(tmp_path / "flowplug.toml") in msg and "flowplug-broken-hook" in msg


def test_block_list_skips_a_plugin(plugin_envs, use_env, monkeypatch):
    monkeypatch.setenv("FLOWPLUG_BLOCK_PLUGINS", "dupe, typo")
    use_env(plugin_envs.broken)
    registry = plugins.get_registry()
    assert set(registry.broken) == {"brokenimport", "brokenhook"}
    assert fp.get_transport("pipe").__module__ == "flowplug_example.transport"


# ---------------------------------------------------------------------------- autoload off


def test_autoload_off_loads_only_the_named_plugins(plugin_envs, run_python, tmp_path):
    result = run_python(
        """
        import sys
        import flowplug as fp
        print(sorted(fp.available_transports()))
        print([m for m in sys.modules if m.startswith("flowplug_broken")])
        with fp.Runner(fp.DataFromList([7]), transport="pipe") as runner:
            print(list(runner))
        """,
        plugin_envs.broken,
        tmp_path,
        FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD="1",
        FLOWPLUG_PLUGINS="zmq,pipe",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['pipe', 'zmq']", "[]", "[7]"]


def test_autoload_off_loads_the_plugins_named_in_the_config(
    plugin_envs, use_env, tmp_path, monkeypatch
):
    monkeypatch.setenv("FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "1")
    use_env(plugin_envs.broken)
    assert dict(fp.available_transports()) == {}
    (tmp_path / "flowplug.toml").write_text('plugins = ["pipe", "thread"]\ntransport = "pipe"\n')
    monkeypatch.chdir(tmp_path)
    with fp.Runner(fp.DataFromList([1, 2])) as runner:
        assert list(runner) == [1, 2]
    assert set(fp.available_transports()) == {"pipe", "thread"}
    assert fp.load_config().source("plugins") == str(tmp_path / "flowplug.toml")


def test_config_naming_an_uninstalled_plugin_is_an_error(
    plugin_envs, use_env, tmp_path, monkeypatch
):
    monkeypatch.setenv("FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "1")
    use_env(plugin_envs.example)
    (tmp_path / "flowplug.toml").write_text('plugins = ["pipes"]\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fp.ConfigError) as info:
        fp.load_config()
    msg = str(info.value)
    assert str(tmp_path / "flowplug.toml") in msg and "'pipes'" in msg
    assert "Did you mean 'pipe'?" in msg


# ---------------------------------------------------------------------------- by import path


def test_a_runner_imports_only_the_transport_it_uses(run_python, tmp_path):
    result = run_python(
        """
        import sys
        import flowplug as fp

        def loaded():
            return sorted(m for m in sys.modules if m.endswith(".transport") and "_" in m)

        with fp.Runner(fp.DataFromList([1, 2]), transport="thread") as runner:
            print(list(runner), loaded(), "zmq" in sys.modules)
        print(sorted(fp.available_transports()))
        print(loaded())
        """,
        None,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    ran, listed, after = result.stdout.splitlines()
    assert ran == "[1, 2] ['flowplug_thread.transport'] False"
    assert set(eval(listed)) >= BUILTINS
    assert set(eval(after)) >= {f"flowplug_{name}.transport" for name in BUILTINS}


def _registry(hook, distribution="flowplug-lazy"):
    """A registry of its own with one plugin ``lazy`` whose hook is ``hook``."""
    import types

    import pluggy

    from flowplug import hookspecs

    pm = pluggy.PluginManager(plugins.GROUP)
    pm.add_hookspecs(hookspecs)
    registry = plugins.TransportRegistry(pm)
    module = types.ModuleType("lazy_plugin")
    module.flowplug_register_transports = fp.hookimpl(hook)
    registry.plugins["lazy"] = plugins.PluginInfo("lazy", distribution, "1.0")
    pm.register(module, name="lazy")
    registry.collect()
    return registry


def test_a_transport_registered_by_path_is_named_at_once_and_imported_when_selected():
    def hook(register):
        register("flowplug_thread.transport:ThreadTransport", name="thread")
        register("flowplug_ghost.transport:GhostTransport", name="ghost")

    registry = _registry(hook)
    assert registry.names() == ["ghost", "thread"]
    with pytest.raises(fp.TransportNotFound, match="Did you mean 'ghost'"):
        registry.get("ghots")
    assert registry._failed == {}  # naming them imported nothing
    from flowplug_thread.transport import ThreadTransport

    assert registry.get("thread") is ThreadTransport
    assert registry.origin["thread"].distribution == "flowplug-lazy"


def test_a_transport_whose_path_fails_to_import_makes_its_plugin_broken():
    def hook(register):
        register("flowplug_ghost.transport:GhostTransport", name="ghost")
        register("flowplug_thread.transport:ThreadTransport", name="thread")

    registry = _registry(hook)
    with pytest.raises(fp.PluginError) as info:
        registry.get("ghost")
    msg = str(info.value)
    assert "'lazy' from distribution flowplug-lazy 1.0" in msg and "flowplug_ghost" in msg
    assert "FLOWPLUG_BLOCK_PLUGINS=lazy" in msg
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    with pytest.raises(fp.PluginError, match=r"flowplug-lazy 1\.0"):
        registry.get("ghost")  # the same error each time it is selected
    assert set(registry.transports) == {"thread"}  # the plugin's other transport works
    assert set(registry.broken) == {"lazy"}


def test_a_class_given_by_path_is_checked_when_it_is_imported():
    def hook(register):
        register("flowplug_thread.transport:ThreadTransport", name="threads")
        register("flowplug.errors:ConfigError", name="config")

    registry = _registry(hook)
    with pytest.raises(fp.PluginError, match="whose name is 'thread'; make them agree"):
        registry.get("threads")
    with pytest.raises(fp.PluginError, match=r"not a subclass of flowplug\.Transport"):
        registry.get("config")
    assert registry.transports == {}


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("flowplug_thread.transport:ThreadTransport",), {}, "needs its name"),
        (("flowplug_thread.transport.ThreadTransport",), {"name": "t"}, "'module:Class'"),
        (("flowplug_thread.transport:ThreadTransport",), {"name": "Thread"}, "lower-case"),
    ],
)
def test_register_by_path_refuses_a_bad_declaration_at_once(args, kwargs, message):
    def hook(register):
        register(*args, **kwargs)

    registry = _registry(hook)
    assert message in str(registry._broken["lazy"].error)
    assert registry.names() == []


def test_two_plugins_declaring_one_name_by_path_is_a_conflict():
    def hook(register):
        register("flowplug_thread.transport:ThreadTransport", name="thread")

    registry = _registry(hook)
    from flowplug_thread.transport import ThreadTransport

    other = plugins.PluginInfo("other", "flowplug-other", "2.0")
    with pytest.raises(fp.PluginError, match="registered twice"):
        registry.register(ThreadTransport, origin=other)
    with pytest.raises(fp.PluginError) as info:
        registry.get("thread")
    assert "flowplug-lazy 1.0" in str(info.value) and "flowplug-other 2.0" in str(info.value)


# ---------------------------------------------------------------------------- startup cost


def _fake_dist(root, name, version, entry_points):
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_entry_points_are_those_importlib_metadata_selects(tmp_path, monkeypatch):
    # The same distribution twice on sys.path (the first wins, as in importlib.metadata),
    # one that names the group only in another group, one with the group and others.
    _fake_dist(tmp_path / "a", "fp_twice", "2.0", "[flowplug]\nnew = fp_twice.plugin\n")
    _fake_dist(tmp_path / "b", "FP.Twice", "1.0", "[flowplug]\nold = fp_twice.old\n")
    _fake_dist(tmp_path / "a", "mentions", "1.0", "[console_scripts]\nflowplug-x = m:main\n")
    _fake_dist(
        tmp_path / "a", "mixed", "1.0", "[console_scripts]\nm = m:main\n\n[flowplug]\nmix = m.p\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    monkeypatch.syspath_prepend(str(tmp_path / "a"))

    def described(eps):
        return [(ep.name, ep.value, ep.group, ep.dist.metadata["Name"]) for ep in eps]

    expected = sorted(metadata.entry_points(group="flowplug"), key=lambda ep: ep.name)
    found = plugins._entry_points()
    assert described(found) == described(expected)
    assert {"new", "mix"} <= {ep.name for ep in found}
    assert "old" not in {ep.name for ep in found}


def test_selecting_a_transport_reads_no_distribution_metadata(monkeypatch):
    # Parsing METADATA costs about a millisecond per entry point on the way to a runner's
    # first datapoint: the plugins' distribution names are read when a message needs them.
    reads = []
    original = metadata.PathDistribution.metadata

    def counted(self):
        reads.append(self)
        return original.fget(self)

    monkeypatch.setattr(metadata.PathDistribution, "metadata", property(counted))
    fp.reload_plugins()
    try:
        assert fp.get_transport("thread").name == "thread"
        assert fp.load_config(transport="queue").transport == "queue"
        assert reads == []
        origin = plugins.get_registry().origin["thread"]
        assert (origin.distribution, origin.version) == ("flowplug", metadata.version("flowplug"))
        assert reads  # read when asked for
        assert origin == plugins.PluginInfo("thread", "flowplug", metadata.version("flowplug"))
        assert "distribution='flowplug'" in repr(origin)
    finally:
        fp.reload_plugins()
