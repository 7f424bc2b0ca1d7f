"""Every ``$ flowplug ...`` sample in the docs is what the command prints, so the docs
cannot drift from the CLI.

A sample is a ```text block whose lines starting with ``$ `` are commands (``VAR=value``
assignments may come first) and whose other lines are the expected output. The files a
sample reads are the ```toml blocks before it on the same page whose first line names them
(``# flowplug.toml``). Commands run with the built-in transports (what ``pip install .``
gives a new user), in a fresh folder shown as ``/home/me/proj``, 100 columns wide. Where
the output measures the machine (``doctor``, ``demo``, ``bench``, ``--version``) numbers
are compared as numbers, not values; ``doctor``'s stale-segment lines depend on what other
processes left in /dev/shm and are not compared.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import flowplug as fp
from flowplug import stats

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHOWN_CWD = "/home/me/proj"
#: the transports the samples show: the built-ins.
SHOWN = {"queue", "shm", "thread", "zmq"}
VARYING = {"doctor", "demo", "bench", "--version"}
VERDICT = "|".join(
    re.escape(v)
    for v in (stats.INPUT_BOUND_VERDICT, stats.CONSUMER_BOUND_VERDICT, stats.NO_VERDICT)
)
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def samples() -> list[tuple[str, int, str, dict[str, str], str]]:
    """``(page, line, command, files, expected output)`` of every sample."""
    found = []
    for page in PAGES:
        text = page.read_text()
        files: dict[str, str] = {}
        for m in FENCE.finditer(text):
            kind, body = m.group(1), m.group(2)
            line = text.count("\n", 0, m.start()) + 2
            if kind == "toml" and re.match(r"# [\w.-]+\.toml\n", body):
                files[body.split("\n", 1)[0][2:]] = body
            if kind != "text" or not body.startswith("$ "):
                continue
            for i, chunk in enumerate(re.split(r"^\$ ", body, flags=re.MULTILINE)[1:]):
                command, _, output = chunk.partition("\n")
                found.append((page.name, line + i, command, dict(files), output))
    return found


SAMPLES = samples()


def test_there_are_samples_to_check():
    commands = {command.split("flowplug ", 1)[1].split()[0] for _, _, command, _, _ in SAMPLES}
    assert {"transports", "config", "doctor", "demo", "bench", "--help"} <= commands


def _normal(text: str, varying: bool) -> list[str]:
    lines = []
    for line in text.rstrip("\n").splitlines():
        if varying:
            if "stale flowplug segment" in line or line.startswith("      /dev/shm/"):
                continue
            line = re.sub(r"\d[\d,]*(\.\d+)?", "N", line)
            line = re.sub(r"(wmem_max: N MiB);.*", r"\1", line)  # the hint: by machine
            line = re.sub(VERDICT, "<verdict>", line)  # the runner's view of this run
            line = re.sub(r"-{2,}", "--", " ".join(line.split()))
            line = re.sub(r"^N problem\(s\) to fix$|^no problems found$", "<verdict>", line)
        lines.append(line.rstrip())
    return lines


@pytest.mark.parametrize(
    ("page", "line", "command", "files", "expected"),
    SAMPLES,
    ids=[f"{page}:{line}" for page, line, *_ in SAMPLES],
)
def test_sample_is_what_the_command_prints(page, line, command, files, expected, run_cli, tmp_path):
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words[: words.index("flowplug")])
    args = words[words.index("flowplug") + 1 :]
    cwd = tmp_path / "proj"
    cwd.mkdir()
    for name, body in files.items():
        (cwd / name).write_text(body)
    others = sorted(set(fp.available_transports()) - SHOWN)  # a developer's extra plugins
    if others:
        env["FLOWPLUG_BLOCK_PLUGINS"] = ",".join(others)
    result = run_cli(args, None, cwd, COLUMNS="100", **env)
    got = result.stdout if result.returncode == 0 else result.stdout + result.stderr
    got = got.replace(str(cwd.resolve()), SHOWN_CWD).replace(str(cwd), SHOWN_CWD)
    varying = bool(set(args) & VARYING)
    assert _normal(got, varying) == _normal(expected, varying), (
        f"{page}, sample at line {line}: `{command}` now prints:\n{got}"
    )
