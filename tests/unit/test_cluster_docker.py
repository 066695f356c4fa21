"""The container images install the project with exactly the Makefile's `install` commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def makefile_install_commands() -> list[str]:
    """The recipe of the Makefile's `$(VENV)/.installed` target, with its variables expanded."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) \?= (.+)$", text, re.M))
    variables.update(re.findall(r"^(\w+) := (.+)$", text, re.M))
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", text, re.M).group(1)

    def expand(line: str) -> str:
        for _ in range(5):
            line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
        return line.replace("$@", "$(VENV)/.installed").replace("$(VENV)", variables["VENV"]).strip()

    return [expand(line) for line in recipe.splitlines()]


def between_markers(lines: list[str], prefix: str = "") -> list[str]:
    start = next(i for i, x in enumerate(lines) if "== make install ==" in x)
    stop = next(i for i, x in enumerate(lines) if "== end make install ==" in x)
    return [x.strip()[len(prefix):].strip() for x in lines[start + 1:stop] if x.strip()]


def test_makefile_recipe_is_what_we_think():
    commands = makefile_install_commands()
    assert commands[0] == "test -x .venv/bin/python || python3 -m venv .venv"
    assert ".venv/bin/python -m pip install -q -e '.[dev]'" in commands
    assert "bash scripts/install_deepspeed.sh .venv/bin/python" in commands
    assert "bash scripts/install_ffcv.sh .venv/bin/python" in commands


def test_dockerfile_runs_the_makefile_install_commands():
    lines = (ROOT / "docker" / "Dockerfile").read_text().splitlines()
    steps = between_markers(lines)
    assert all(s.startswith("RUN ") for s in steps), steps
    assert [s[len("RUN "):] for s in steps] == makefile_install_commands()
    assert any(x.startswith("FROM nvidia/cuda:") for x in lines)


def test_apptainer_definition_runs_the_makefile_install_commands():
    lines = (ROOT / "docker" / "rift.def").read_text().splitlines()
    assert between_markers(lines) == makefile_install_commands()
    assert "Bootstrap: docker" in lines and any(x.startswith("From: nvidia/cuda:") for x in lines)
