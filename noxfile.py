"""Sessions: `nox -l` lists them. `nox -s tests` is what CI runs."""

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
