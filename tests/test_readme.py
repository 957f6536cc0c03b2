"""The README stays true: every test it cites exists, and every `charnn`
command in its code blocks uses only options that command has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def cited_tests() -> list[tuple[str, str | None]]:
    """(file, test name or None) for each `tests/x.py[::name]` the README cites,
    including `::name` continuations that follow in the same table cell."""
    out = []
    for cell in re.findall(r"\|([^|\n]*tests/[^|\n]*)\|?", README):
        current = None
        for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", cell):
            file, name = m.group(1), m.group(2)
            current = file or current
            if current:
                out.append((current, name))
    return out


@pytest.mark.parametrize("file,name", cited_tests())
def test_every_cited_test_exists(file, name):
    path = REPO / file
    assert path.is_file(), file
    if name:
        assert re.search(rf"^def {name}\(", path.read_text(encoding="utf-8"), re.M), f"{file}::{name}"


def test_the_readme_cites_tests():
    assert len(cited_tests()) >= 20


def charnn_commands() -> list[list[str]]:
    """Every `charnn ...` / `python3 -m charnn ...` command line in bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0]
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part, comments=True) if part.strip() else []
                for i, w in enumerate(words):
                    if w == "charnn" and (i == 0 or words[i - 1] in ("-m",)):
                        commands.append(words[i + 1:])
                        break
    return commands


def _options_of(command: str) -> set[str]:
    import typer.main

    from charnn.cli import app

    group = typer.main.get_command(app)
    cmd = group.get_command(None, command)  # type: ignore[arg-type]
    assert cmd is not None, f"README uses `charnn {command}`, which does not exist"
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("words", charnn_commands(), ids=lambda w: " ".join(w)[:60])
def test_readme_commands_use_real_options(words):
    if not words or words[0].startswith("-"):
        return
    options = _options_of(words[0])
    for w in words[1:]:
        if w.startswith("-") and not re.fullmatch(r"-\d.*", w):
            assert w.split("=")[0] in options, f"`charnn {words[0]}` has no option {w}"


def test_the_readme_has_commands():
    assert len(charnn_commands()) >= 15
