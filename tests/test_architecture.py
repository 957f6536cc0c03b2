"""The package's shape, computed from its source: no import cycle, each folder
imports only the folders below it, no module over 500 lines, the Trainer class
under 350. Every import counts, function-local and TYPE_CHECKING ones too: a
cycle hidden in a function still means the two modules cannot be read (or
changed) one without the other."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "charnn"

# Each folder may import its own modules and those of lower layers only.
# Folders on one layer do not import each other.
LAYERS = [
    {"errors"},
    {"safe_files"},  # atomic writes and charnn's own files: the corpus cache (text/) uses them too
    {"text"},
    {"model"},
    {"storage"},
    {"training"},
    {"generation", "analysis"},
    {"serve", "export"},  # each built on generation/analysis, neither on the other
    {"cli"},
    {"__main__"},
]
MAX_MODULE_LINES = 500
MAX_TRAINER_LINES = 350


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The charnn modules that `path` imports, resolved to modules (a name
    imported from a package counts as its submodule where one exists)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [(source, [a.name for a in node.names])]
        else:
            continue
        for source, names in targets:
            if source != "charnn" and not source.startswith("charnn."):
                continue
            subs = [f"{source}.{n}" for n in names if f"{source}.{n}" in known]
            if subs:
                found.update(subs)
            if len(subs) < len(names) or not names:
                while source not in known:  # `import charnn.a.b` where b is not a module
                    source = source.rpartition(".")[0]
                found.add(source)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def folder(name: str) -> str:
    """The layer key of a module: its folder under charnn/, or its own name
    for a top-level module."""
    return name.split(".")[1] if "." in name else name


def layer(name: str) -> int:
    key = folder(name)
    for i, keys in enumerate(LAYERS):
        if key in keys:
            return i
    raise AssertionError(f"{name}: charnn/{key} has no place in LAYERS; add it where it belongs")


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "charnn.training.schedule" in graph["charnn.cli.common"]  # function-local, relative
    assert "charnn.cli" in graph["charnn.__main__"]  # from .cli import app
    assert "charnn.model.rnn" in graph["charnn.storage.checkpoint"]  # from ..model.rnn import ...
    assert "charnn.storage.checkpoint" in graph["charnn.training.trainer"]  # from ..storage import checkpoint


def test_no_import_cycle():
    graph = import_graph()
    # The package root holds the version and the lazy public API only: it
    # imports no charnn module when imported, and every module may read
    # its __version__.
    assert graph["charnn"] == set()
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail("import cycle: " + " -> ".join(e.args[1]))


def test_each_folder_imports_only_downward():
    wrong = []
    for name, deps in import_graph().items():
        if name == "charnn":
            continue
        for dep in deps:
            if dep == "charnn" or folder(dep) == folder(name):
                continue
            if layer(dep) >= layer(name):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("name,path", sorted(modules().items()))
def test_no_module_over_500_lines(name, path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(PACKAGE.parent)}: {lines} lines; split it along its jobs"


def test_trainer_class_under_350_lines():
    from charnn.training import trainer

    tree = ast.parse(Path(trainer.__file__).read_text(encoding="utf-8"))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    lines = cls.end_lineno - cls.lineno + 1
    assert lines < MAX_TRAINER_LINES, f"Trainer is {lines} lines"
