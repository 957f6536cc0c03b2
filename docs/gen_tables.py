"""The tables in the docs that come from the code or the results, written
between markers so they are regenerated, never typed:

    <!-- generated: options train -->          one command's options, from its Typer params
    <!-- generated: results headline -->       the first table `benchmarks/fit.py table` prints
    <!-- generated: results all -->            everything `benchmarks/fit.py table` prints
    <!-- generated: bases results -->          `benchmarks/bench_base.py --table`: base against scratch
    <!-- generated: bases sources -->          the shipped bases' sources, from their cards
    ...
    <!-- end generated -->

    python3 docs/gen_tables.py           # rewrite every block in README.md, docs/*.md, benchmarks/README.md
    python3 docs/gen_tables.py --check   # exit 1 naming the blocks that differ (tests/test_readme.py does this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's charnn, not an installed one (benchmarks/fit.py imports it too)
BLOCK = re.compile(r"(<!-- generated: (?P<what>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
DEFAULT = re.compile(r"\s*\[default: (?P<value>[^\]]*)\]")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), REPO / "benchmarks" / "README.md"]


def command(name: str):
    """The click command behind ``charnn NAME``."""
    import typer.main

    from charnn.cli import app

    group = typer.main.get_command(app)
    cmd = group.get_command(None, name)  # type: ignore[arg-type]
    if cmd is None:
        raise SystemExit(f"no command charnn {name}")
    return cmd


def option_rows(name: str) -> list[tuple[str, str, str]]:
    """(option, default, meaning) for each visible option of ``charnn NAME``,
    as its --help gives them: names and value placeholder, the ``[default: X]``
    click shows or the help text writes out, and the help text without it."""
    import click

    cmd = command(name)
    ctx = click.Context(cmd, info_name=name)
    rows = []
    for param in cmd.get_params(ctx):
        if param.param_type_name != "option" or param.name == "help":
            continue
        record = param.get_help_record(ctx)
        if record is None:  # hidden
            continue
        names, text = record
        text = " ".join(text.split())
        m = DEFAULT.search(text)
        default = m.group("value") if m else ""
        meaning = DEFAULT.sub("", text).strip()
        rows.append((names, default, meaning))
    return rows


def options_table(name: str) -> str:
    def cell(s: str) -> str:  # a table cell: no column breaks, no HTML tags (<corpus name>)
        return s.replace("|", "\\|").replace("<", "&lt;")

    lines = ["| option | default | meaning |", "| --- | --- | --- |"]
    for names, default, meaning in option_rows(name):
        lines.append(f"| `{cell(names)}` | {cell(default)} | {cell(meaning)} |")
    return "\n".join(lines) + "\n"


def results(which: str) -> str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import fit  # noqa: E402

    text = fit.markdown(fit.read_rows(fit.RESULTS), "auto").strip() + "\n"
    if which == "headline":
        return text.split("\n\n")[0].strip() + "\n"
    return text


def bases(which: str) -> str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_base  # noqa: E402

    return bench_base.markdown() if which == "results" else bench_base.sources()


def generate(what: str) -> str:
    kind, _, arg = what.partition(" ")
    if kind == "bases":
        return bases(arg)
    if kind == "options":
        return options_table(arg)
    if kind == "results":
        return results(arg)
    raise SystemExit(f"unknown generated block {what!r}")


def refresh(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + generate(m.group("what")) + m.group(4), text)


def stale() -> list[str]:
    """'PAGE: BLOCK' for every generated block that differs from what the code gives now."""
    out = []
    for page in pages():
        if not page.is_file():
            continue
        for m in BLOCK.finditer(page.read_text(encoding="utf-8")):
            if m.group("body") != generate(m.group("what")):
                out.append(f"{page.relative_to(REPO)}: {m.group('what')}")
    return out


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        bad = stale()
        for b in bad:
            print(f"stale: {b} (run python3 docs/gen_tables.py)")
        return 1 if bad else 0
    for page in pages():
        if page.is_file():
            text = page.read_text(encoding="utf-8")
            new = refresh(text)
            if new != text:
                page.write_text(new, encoding="utf-8")
                print(f"wrote {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
