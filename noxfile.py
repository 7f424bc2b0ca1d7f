"""Sessions: `nox -l` lists them. `nox -s tests` is what CI runs."""

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite in parallel (pytest -n auto), every test under a timeout."""
    # The test extra pins torch==2.13.0 (tests/test_torch.py): the CPU build, never a GPU one.
    session.install("-e", ".[test]")
    # torchdata's StatefulDataLoader, next to flowplug.torch's (tests/test_resume_torch.py);
    # --no-deps: it declares an unpinned torch (see the test extra in pyproject.toml).
    session.install("--no-deps", "torchdata==0.11.0")
    session.run("pytest", "-n", "auto", *session.posargs)


LINTED = ["flowplug", "plugins", "tests", "benchmarks", "noxfile.py"]


@nox.session
def lint(session: nox.Session) -> None:
    """Check style, formatting and common bugs with ruff, and with vermin that nothing
    needs a Python newer than 3.10 (the floor of requires-python)."""
    session.install("ruff", "vermin")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)
    session.run("vermin", "--no-tips", "--violations", "--eval-annotations", "-t=3.10-", *LINTED)


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the core and every plugin with mypy, as Python 3.10 (see [tool.mypy])."""
    session.install("-e", ".", "mypy")
    session.run("mypy", *session.posargs)


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """Build the documentation site; broken references and links fail the build."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "-d", "site", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(default=False)
def ray(session: nox.Session) -> None:
    """Test the ray transport (plugins/flowplug-ray) against one local Ray instance."""
    session.install("-e", ".[test]", "-e", "plugins/flowplug-ray")
    # One process: the tests share a local Ray (num_cpus=4 logical, a 256 MiB object
    # store) started by their conftest; xdist workers would each start their own.
    session.run("pytest", "plugins/flowplug-ray/tests", "-p", "no:xdist", *session.posargs)


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """Install flowplug and push arrays through every transport (the README's main job)."""
    session.install("-e", ".")
    session.run("flowplug", "demo", *session.posargs)


@nox.session(default=False)
def example_plugin(session: nox.Session) -> None:
    """Install plugins/flowplug-example like a user would and run the contract suite on it."""
    session.install("-e", ".[test]")
    session.install("./plugins/flowplug-example")
    session.run("flowplug", "transports")
    session.run("pytest", "-n", "auto", "plugins/flowplug-example/tests", *session.posargs)


#: the peers of the full benchmark, pinned. torch is pinned too: an unpinned torch resolves
#: to a multi-GB GPU build; 2.13.0 is the CPU build on this project's machines.
BENCH_PEERS = ["msgpack", "msgpack-numpy", "psutil", "tabulate", "termcolor", "tqdm", "six"]
BENCH_TORCH = "torch==2.13.0"


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Run the full benchmark table against tensorpack, torch and pyzmq (slow)."""
    session.install("-e", ".[plot]")
    # tensorpack 0.11 declares TensorFlow-era dependencies its dataflow does not need.
    session.install("--no-deps", "tensorpack==0.11")
    session.install(*BENCH_PEERS, BENCH_TORCH)
    # Startup is timed: flowplug's modules are compiled as an installed package's are,
    # even where PYTHONDONTWRITEBYTECODE is set (the peers' were compiled by pip).
    session.run("python", "-m", "compileall", "-q", "flowplug", "plugins")
    out = session.posargs or ["--json", "bench-full.json", "--plot", "bench-full.png"]
    session.run("flowplug", "bench", "--all", *out)
    if "--json" in out:
        session.run("python", "benchmarks/targets.py", out[out.index("--json") + 1])


@nox.session(default=False)
def soak(session: nox.Session) -> None:
    """Run a random mix of the fault scenarios for N minutes (posargs or FLOWPLUG_SOAK_MINUTES)."""
    session.install("-e", ".[test]")
    minutes = session.posargs or [os.environ.get("FLOWPLUG_SOAK_MINUTES", "5")]
    env = {"FLOWPLUG_FAULT_CYCLES": os.environ.get("FLOWPLUG_FAULT_CYCLES", "1000")}
    session.run("python", "tests/faults/soak.py", *minutes, env=env)
