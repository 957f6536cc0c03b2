"""The README and every page under docs/ stay true: every test they cite
exists, every `charnn` command they show parses against that command's real
options and values, every relative link (and #anchor) resolves, every page is
reachable from the README, and the generated tables (options, results) are
what the code and the results give today."""

from __future__ import annotations

import re
import shlex
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
README_LIMIT = 250  # lines: the front door is read in five minutes; the rest lives in docs/


def pages() -> list[Path]:
    """Every page the checks cover: the README, docs/**/*.md, benchmarks/README.md."""
    return [README, *sorted(DOCS.rglob("*.md")), REPO / "benchmarks" / "README.md"]


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


# -- cited tests ------------------------------------------------------------------

def cited_tests(text: str) -> list[tuple[str, str | None]]:
    """(file, test name or None) for each `tests/x.py[::name]` the text cites,
    including `::name` continuations that follow in the same table cell or
    sentence."""
    out = []
    for cell in re.split(r"\||\n\n", text):
        current = None
        for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", cell):
            file, name = m.group(1), m.group(2)
            current = file or current
            if current and (file or name):
                out.append((current, name))
    return out


def all_citations() -> list[tuple[str, str, str | None]]:
    return [(_rel(p), f, n) for p in pages() if p.is_file() for f, n in cited_tests(read(p))]


@pytest.mark.parametrize("page,file,name", all_citations(), ids=lambda v: str(v))
def test_every_cited_test_exists(page, file, name):
    path = REPO / file
    assert path.is_file(), f"{page} cites {file}, which does not exist"
    if name:
        assert re.search(rf"^(async )?def {name}\(", read(path), re.M), f"{page} cites {file}::{name}, which does not exist"


def test_the_guarantees_cite_tests():
    assert len(cited_tests(read(DOCS / "guarantees.md"))) >= 20


# -- charnn commands ----------------------------------------------------------------

def charnn_commands(text: str) -> list[tuple[list[str], bool]]:
    """Every `charnn ...` / `python3 -m charnn ...` command line in bash and
    console blocks (a console block's `$ ` prompt dropped, output lines left),
    and every inline code span that starts with one. With each, whether it is
    a whole command (a block's) or may be a mention (`charnn eval`, `--hidden-size H`)."""
    commands = []
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [("inline", span) for span in re.findall(r"`((?:python3? -m )?charnn [^`]+)`", prose)
             if not re.match(r"(python3? -m )?charnn [A-Z]", span)]  # `charnn COMMAND --help`: a placeholder
    for lang, block in [*re.findall(r"```(bash|console)\n(.*?)```", text, re.S), *spans]:
        for line in block.replace("\\\n", " ").splitlines():
            if lang == "console":
                line = line.strip()
                if line.startswith("$ "):
                    line = line[2:]
                elif not line.startswith("charnn "):
                    continue
            line = line.split(" #")[0]
            for part in re.split(r"&&|\||;", line):
                try:
                    words = shlex.split(part, comments=True) if part.strip() else []
                except ValueError:  # an unbalanced quote is a typo in the docs
                    raise AssertionError(f"cannot parse {part!r}") from None
                cut = next((i for i, w in enumerate(words) if re.fullmatch(r"\d?>>?.*|<", w)), len(words))
                words = words[:cut]  # a redirection (`> s.json`) is the shell's, not the command's
                for i, w in enumerate(words):
                    if w == "charnn" and (i == 0 or words[i - 1] in ("-m", "do", "then")):
                        commands.append((words[i + 1:], lang != "inline"))
                        break
    return commands


def all_commands() -> list[tuple[str, list[str], bool]]:
    return [(_rel(p), words, whole) for p in pages() if p.is_file() for words, whole in charnn_commands(read(p))]


def _command(name: str):
    import typer.main

    from charnn.cli import app

    group = typer.main.get_command(app)
    return group.get_command(None, name)  # type: ignore[arg-type]


@pytest.mark.parametrize("page,words,whole", all_commands(),
                         ids=lambda v: " ".join(v)[:60] if isinstance(v, list) else str(v))
def test_every_command_shown_parses(page, words, whole):
    """The command exists, and its options and their values are the real ones:
    the words are parsed by the command's own click parser (types, choices,
    ranges and callbacks), which runs nothing. A mention in running text, or
    a command with a shell variable, is checked by option names only."""
    from charnn.cli.common import click  # the click typer runs on (its own copy in new typer)

    if not words or words[0].startswith("-"):  # `charnn --help`, `charnn --version`
        return
    cmd = _command(words[0])
    assert cmd is not None, f"{page} shows `charnn {words[0]}`, which does not exist"
    options = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
    for w in words[1:]:
        if w.startswith("-") and not re.fullmatch(r"-\d.*", w):
            assert w.split("=")[0] in options, f"{page}: `charnn {words[0]}` has no option {w}"
    if not whole or any("$" in w for w in words):
        return
    try:
        cmd.make_context(words[0], list(words[1:]), resilient_parsing=False)
    except click.exceptions.Exit:  # --help
        pass
    except click.UsageError as e:
        raise AssertionError(f"{page}: `charnn {' '.join(words)}` does not parse: {e.format_message()}") from None


def test_the_docs_show_commands():
    assert sum(whole for *_, whole in all_commands()) >= 40
    assert {w[0] for _, w, _ in all_commands() if w} >= {"train", "sample", "eval", "inspect", "serve", "info"}


# -- links ----------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", read(page), flags=re.S)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+?)\s*$", text, re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", read(page), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)\)", text)]


def all_links() -> list[tuple[str, str]]:
    return [(_rel(p), link) for p in pages() if p.is_file() for link in links(p)
            if not re.match(r"[a-z][a-z0-9+.-]*:", link)]  # https:, mailto: are not checked here


@pytest.mark.parametrize("page,link", all_links(), ids=lambda v: str(v))
def test_every_relative_link_resolves(page, link):
    source = REPO / page
    path, _, anchor = link.partition("#")
    target = (source.parent / path).resolve() if path else source
    assert target.exists(), f"{page} links to {link}: {path} does not exist"
    if anchor and target.suffix == ".md":
        assert anchor in anchors(target), f"{page} links to {link}: no heading with that anchor in {path or page}"


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in links(README)}
    missing = [_rel(p) for p in sorted(DOCS.rglob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link to {missing}"
    assert (REPO / "benchmarks" / "README.md").resolve() in linked
    assert (REPO / "CHANGELOG.md").resolve() in linked


# -- the front door ---------------------------------------------------------------------

def test_the_readme_is_short():
    n = len(read(README).splitlines())
    assert n <= README_LIMIT, f"README.md has {n} lines; move detail into docs/"


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = read(REPO / ".ci" / "run").strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in read(README), ci


def test_the_readme_states_the_quick_tier():
    text = " ".join(read(README).split())
    assert 'python3 -m pytest -q -m "not system"' in text
    markers = read(REPO / "pyproject.toml")
    assert '"system:' in markers  # the marker the quick tier leaves out exists


# -- generated tables --------------------------------------------------------------------

def _gen():
    sys.path.insert(0, str(DOCS))
    import gen_tables

    return gen_tables


def test_generated_tables_are_current():
    """Options tables come from the commands' params (names, value placeholders,
    defaults), results tables from benchmarks/fit.py; `python3
    docs/gen_tables.py` rewrites them."""
    stale = _gen().stale()
    assert not stale, f"stale generated tables (run python3 docs/gen_tables.py): {stale}"


def test_every_command_has_its_options_table():
    import typer.main

    from charnn.cli import app

    text = "\n".join(read(p) for p in DOCS.rglob("*.md"))
    for name in typer.main.get_command(app).commands:
        assert f"<!-- generated: options {name} -->" in text, f"no options table for charnn {name} in docs/"
    assert "<!-- generated: results headline -->" in read(README)
    assert "<!-- generated: results all -->" in read(REPO / "benchmarks" / "README.md")


def test_the_checkpoint_page_python_example_computes_charnns_logits(trained, tmp_path, monkeypatch):
    """docs/checkpoints.md promises that its plain-torch snippet reads a
    checkpoint and gives the logits charnn computes: run it on a real one."""
    import torch

    from charnn import load_model

    block = re.search(r"```python\n(.*?)```", read(DOCS / "checkpoints.md"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "best.pt").write_bytes(trained.best.read_bytes())
    scope: dict = {}
    exec(compile(block, "docs/checkpoints.md", "exec"), scope)
    model, tokenizer, _ = load_model(trained.best)
    assert scope["ids"].tolist() == [tokenizer.encode("Hello")]
    with torch.no_grad():
        expected = model(scope["ids"])[0]
    assert torch.allclose(scope["logits"], expected, atol=1e-5)
