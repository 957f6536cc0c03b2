"""What `pip install .` ships: every package (a wheel without charnn.cli has
no `charnn` command) and the serve page."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    listed = set(re.findall(r'"(charnn(?:\.\w+)*)"', re.search(r"^packages = \[(.*?)\]", text, re.M).group(1)))
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "charnn").rglob("__init__.py")}
    assert found == listed


def test_package_data_files_exist():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    for name in re.findall(r'"([^"]+)"', section):
        assert (REPO / "charnn" / name).is_file(), name
