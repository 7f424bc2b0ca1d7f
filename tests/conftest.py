import fcntl
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["flowplug.testing.pytest_plugin"]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "plugins" / "flowplug-example"


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test sees the plugins as installed, whatever an earlier test did."""
    import flowplug as fp

    yield
    fp.reload_plugins()


# ---------------------------------------------------------------------------- installed plugins

#: Small third-party distributions that fail in the ways flowplug must survive. Each is built
#: and installed by pip, exactly like a real plugin.
BROKEN_DISTRIBUTIONS = {
    # the module raises while it is imported
    "flowplug-broken-import": (
        "brokenimport",
        "raise RuntimeError('libfoo 2.0 is missing')\n",
    ),
    # the module imports; its registration hook raises
    "flowplug-broken-hook": (
        "brokenhook",
        """
        import flowplug

        @flowplug.hookimpl
        def flowplug_register_transports(register):
            raise ValueError("the hook exploded")
        """,
    ),
    # registers a transport under a name the example plugin already uses
    "flowplug-dupe": (
        "dupe",
        """
        import flowplug

        class OtherPipe(flowplug.Transport):
            name = "pipe"

            def open(self):
                raise NotImplementedError

            def recv(self, timeout):
                raise NotImplementedError

        @flowplug.hookimpl
        def flowplug_register_transports(register):
            register(OtherPipe)
        """,
    ),
    # a typo in the hook's name: pluggy's check_pending() rejects it
    "flowplug-typo": (
        "typo",
        """
        import flowplug

        @flowplug.hookimpl
        def flowplug_register_transport(register):
            pass
        """,
    ),
}
#: declares the entry point ``pipe`` that flowplug-example declares too
CLONE_DISTRIBUTION = ("flowplug-pipe-clone", "pipe", "")


@dataclass(frozen=True)
class PluginEnvs:
    """Target directories that pip installed plugins into; put one on sys.path to use it."""

    #: flowplug-example alone
    example: Path
    #: flowplug-example plus every distribution of BROKEN_DISTRIBUTIONS
    broken: Path
    #: flowplug-example plus CLONE_DISTRIBUTION
    clone: Path


def _write_distribution(root: Path, dist: str, entry_point: str, module: str) -> Path:
    package = dist.replace("-", "_")
    src = root / dist
    (src / package).mkdir(parents=True)
    (src / package / "__init__.py").write_text("")
    (src / package / "plugin.py").write_text(textwrap.dedent(module))
    (src / "pyproject.toml").write_text(
        textwrap.dedent(f"""
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "{dist}"
        version = "6.6.6"

        [project.entry-points.flowplug]
        {entry_point} = "{package}.plugin"

        [tool.hatch.build.targets.wheel]
        packages = ["{package}"]
        """)
    )
    return src


def _pip_install(target: Path, sources: list[Path]) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            *map(str, sources),
        ],
        check=True,
        timeout=300,
    )


@pytest.fixture(scope="session")
def plugin_envs(tmp_path_factory, request) -> PluginEnvs:
    """Build and pip-install the example and the broken plugins once per test session.

    Under xdist the workers share one build: the first takes the lock and builds, the
    others wait for it and reuse the result.
    """
    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):
        root = root.parent  # shared by the workers of this session only
    base = root / "flowplug-plugin-envs"
    envs = PluginEnvs(example=base / "example", broken=base / "broken", clone=base / "clone")
    with open(root / "flowplug-plugin-envs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = base / "done"
        if not done.exists():
            sources = [
                _write_distribution(base / "src", dist, ep, module)
                for dist, (ep, module) in BROKEN_DISTRIBUTIONS.items()
            ]
            _pip_install(envs.example, [EXAMPLE])
            _pip_install(envs.broken, [EXAMPLE, *sources])
            _pip_install(
                envs.clone, [EXAMPLE, _write_distribution(base / "src", *CLONE_DISTRIBUTION)]
            )
            done.touch()
    return envs


@pytest.fixture
def run_python():
    """``run_python(code, path, cwd, **env)``: run ``code`` in a fresh interpreter with
    ``path`` (a target dir of :func:`plugin_envs`, or None) as PYTHONPATH, ``env`` set and
    every other FLOWPLUG_* variable unset."""

    def run(code: str, path: Path | None, cwd: Path, **env: str):
        return _run([sys.executable, "-c", textwrap.dedent(code)], path, cwd, env)

    return run


@pytest.fixture
def run_cli():
    """``run_cli(args, path, cwd, **env)``: ``python -m flowplug ARGS``, as run_python."""

    def run(args: list[str], path: Path | None, cwd: Path, **env: str):
        return _run([sys.executable, "-m", "flowplug", *args], path, cwd, env)

    return run


@pytest.fixture
def use_env(monkeypatch):
    """``use_env(path)``: put a target dir of :func:`plugin_envs` on sys.path for this test
    and forget the loaded plugins, so the next lookup finds what pip installed there."""
    import flowplug as fp

    def use(path: Path) -> None:
        monkeypatch.syspath_prepend(str(path))
        fp.reload_plugins()

    return use


def _run(argv, path, cwd, env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPLUG_")}
    full.pop("PYTHONPATH", None)
    if path is not None:
        full["PYTHONPATH"] = str(path)
    full.update(env)
    return subprocess.run(argv, cwd=cwd, env=full, capture_output=True, text=True, timeout=60)
