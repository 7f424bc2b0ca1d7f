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
def docs(session: nox.Session) -> None:
    """Build the documentation site; broken references and links fail the build."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "-d", "site", env={"NO_MKDOCS_2_WARNING": "1"})


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
