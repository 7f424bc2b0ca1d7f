"""Sessions: `nox -l` lists them. `nox -s tests` is what CI runs."""

import os

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite in parallel (pytest -n auto), every test under a timeout."""
    session.install("-e", ".[test]")
    session.run("pytest", "-n", "auto", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install("ruff")
    session.run("ruff", "check", "flowplug", "plugins", "tests", "benchmarks", "noxfile.py")


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """Install flowplug and push arrays through every transport (the README's main job)."""
    session.install("-e", ".")
    session.run("flowplug", "demo", *session.posargs)


@nox.session(default=False)
def soak(session: nox.Session) -> None:
    """Run a random mix of the fault scenarios for N minutes (posargs or FLOWPLUG_SOAK_MINUTES)."""
    session.install("-e", ".[test]")
    minutes = session.posargs or [os.environ.get("FLOWPLUG_SOAK_MINUTES", "5")]
    env = {"FLOWPLUG_FAULT_CYCLES": os.environ.get("FLOWPLUG_FAULT_CYCLES", "1000")}
    session.run("python", "tests/faults/soak.py", *minutes, env=env)
