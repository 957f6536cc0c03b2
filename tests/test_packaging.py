"""What `pip install .` ships: every package (a wheel without charnn.cli has
no `charnn` command) and the serve page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_every_package_is_found_by_pyproject():
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(where=str(REPO), include=find["include"], exclude=find.get("exclude", ())))
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "charnn").rglob("__init__.py")}
    assert {"charnn.cli", "charnn.serve", "charnn.training"} <= found
    assert found == shipped


def test_package_data_files_exist():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    for name in re.findall(r'"([^"]+)"', section):
        assert (REPO / "charnn" / name).is_file(), name


@pytest.mark.system
def test_the_cli_needs_no_click_package_beside_typer():
    """New typer releases carry their own click and no longer install the
    click package (a fresh `pip install -e .` has none), so charnn must not
    import it. The test environment does have click (uvicorn brings it):
    the subprocess blocks the import, as a fresh install lacks it."""
    import subprocess
    import sys

    import pytest

    try:
        import typer._click  # noqa: F401
    except ImportError:
        pytest.skip("this typer runs on the click package, which it installs")
    code = ("import sys; sys.modules['click'] = None\n"
            "from typer.testing import CliRunner\n"
            "from charnn.cli import app\n"
            "r = CliRunner().invoke(app, ['train', '--help'])\n"
            "print(r.exit_code, 'Usage:' in r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.split() == ["0", "True"], out.stderr[-2000:]
