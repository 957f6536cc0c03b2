"""The exported web page at its edges, in a real headless Chromium from
file://: it refuses what charnn sample refuses (with its message), and its
controls stay inside their column at any window width."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import invoke, make_text
from serve_helpers import Chromium
from web_helpers import build_checkpoint, fragment, open_offline, run_page

pytestmark = pytest.mark.system
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (.ci/run installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("edges")
    ckpt = build_checkpoint(root / "edges.pt", make_text(), hidden=24, embedding=8)
    return ckpt, export_page(ckpt, root / "edges.html")


def export_page(ckpt: Path, out: Path) -> Path:
    result = invoke("export", ckpt, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Chromium(CHROMIUM, tmp_path_factory.mktemp("profile"))
    yield b
    b.close()


def load(browser, page: Path, width: int = 1200) -> None:
    open_offline(browser, page.as_uri() + fragment(n=0))
    browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                        "mobile": False})
    browser.wait_for("document.title.endsWith(' — done')", 120)


@pytest.mark.parametrize("temperature", ["1e39", "1e300"])
def test_temperature_beyond_float32_is_refused_as_charnn_sample_refuses_it(page, browser, temperature):
    ckpt, html = page
    cli = invoke("sample", ckpt, "-n", "5", "--seed", "1", "--temperature", temperature, "--no-copy-report")
    assert cli.exit_code != 0
    message = cli.stderr.strip().removeprefix("Error: ").split(", got")[0]
    assert message == "temperature must be at most 3.403e+38 (float32's largest number)", cli.stderr
    load(browser, html)
    title, out = run_page(browser, fragment("", 5, 1, float(temperature)))
    assert f" — error: {message}" in title, title
    assert out == ""


@pytest.mark.parametrize("width", [1200, 900, 761, 700, 420])
def test_controls_stay_inside_the_form(page, browser, width):
    """Every input and text area ends within the controls' column (and within
    the window): none runs under the output panel or off the screen."""
    load(browser, page[1], width)
    boxes = json.loads(browser.eval(
        "JSON.stringify({form: document.getElementById('controls').getBoundingClientRect().right,"
        " view: document.documentElement.clientWidth,"
        " fields: [...document.querySelectorAll('#controls input, #controls textarea')]"
        "   .map((e) => [e.id, e.getBoundingClientRect().right])})"))
    assert boxes["form"] <= boxes["view"], boxes
    outside = [(name, right) for name, right in boxes["fields"] if right > boxes["form"] + 0.5]
    assert not outside, (width, boxes["form"], outside)


def test_a_note_with_a_long_word_does_not_widen_the_page(page, browser, tmp_path):
    """A note that names a hash or a long address keeps the page within a
    phone's width (420 px): the word wraps instead."""
    note = "Trained on letters.txt, sha256 " + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    html = tmp_path / "noted.html"
    result = invoke("export", page[0], "-o", html, "--note", note)
    assert result.exit_code == 0, result.output
    load(browser, html, 420)
    assert browser.eval("document.querySelector('.note').textContent") == note
    widths = browser.eval("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], widths
