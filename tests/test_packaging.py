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
        assert any((REPO / "charnn").glob(name)), name


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


@pytest.mark.system
def test_the_wheel_carries_the_bases_and_trains_from_one_offline(tmp_path):
    """`pip wheel .` holds the shipped bases; installed from that file alone
    (no index, no network) into a fresh virtualenv, `charnn train --base auto`
    fine-tunes the English base. torch comes from the system (the venv sees
    its site-packages) as it is not what this test is about."""
    import os
    import subprocess
    import sys
    import zipfile

    from charnn.training import base as base_mod

    bases = base_mod.shipped_bases()
    if base_mod.DEFAULT_BASE not in bases:
        pytest.fail(f"charnn/bases/{base_mod.DEFAULT_BASE}.pt is missing: the repository ships it")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")}
    env["PIP_NO_INDEX"] = "1"

    def run(*cmd, cwd=tmp_path, timeout=300):
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, (cmd, out.stdout[-3000:], out.stderr[-3000:])
        return out

    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", REPO)
    wheel, = (tmp_path / "dist").glob("charnn-*.whl")
    assert wheel.stat().st_size <= 20 * 2**20, wheel.stat().st_size
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in bases.values():
        assert {f"charnn/bases/{path.name}", f"charnn/bases/{path.stem}.json"} <= names

    run(sys.executable, "-m", "venv", "--system-site-packages", tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel)
    where = run(python, "-c", "import charnn, pathlib; print(pathlib.Path(charnn.__file__).resolve())").stdout.strip()
    assert where.startswith(str((tmp_path / "venv").resolve())), where
    text = tmp_path / "letters.txt"
    text.write_text("Dear Anna, the garden is quiet this morning and the letters came late again.\n" * 300,
                    encoding="utf-8")
    out = run(python, "-m", "charnn", "train", text, "--max-steps", "3", "--eval-every", "3", "--sample-every", "0",
              "-o", tmp_path / "run")
    said = " ".join(out.stderr.split())
    assert f"start: fine-tuning {base_mod.DEFAULT_BASE}" in said, said
