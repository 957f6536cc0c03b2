"""A bidi control in the text (U+202E RIGHT-TO-LEFT OVERRIDE and its kin) is
one character on the ``eval --html`` and ``inspect --html`` pages: it must not
reverse how the characters after it are laid out. Checked where it shows: the
pages are laid out by headless Chromium and the characters' positions read."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import invoke, train_tiny

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
LINE = "abc\u202edef ghi\u2067jkl\u202bmno\n"
# Appended to a copy of each page: the left edge of each character element,
# in the page's order, into an attribute --dump-dom shows.
MEASURE = """<script>
window.addEventListener("load", function () {
  var xs = [], spans = document.querySelectorAll(".text span.c");
  for (var i = 0; i < spans.length; i++) xs.push(Math.round(spans[i].getBoundingClientRect().left));
  document.body.setAttribute("data-xs", xs.join(","));
});
</script>"""


@pytest.fixture(scope="module")
def bidi_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bidi")
    corpus = root / "bidi.txt"
    corpus.write_text(LINE * 200, encoding="utf-8")
    return train_tiny(corpus, root / "run", max_steps=4, eval_every=4)


def _positions(page, tmp_path) -> list[int]:
    probe = tmp_path / ("measured-" + page.name)
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=4000,800", "--dump-dom", probe.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish in 60 s")
    found = re.search(r'data-xs="([\d,\-]*)"', done.stdout)
    assert found, done.stderr[-2000:]
    return [int(x) for x in found.group(1).split(",")]


def _assert_left_to_right(xs: list[int], first: int) -> None:
    """The characters of the first line (from page element ``first``) stand
    left to right in the text's order, the bidi controls among them."""
    line = xs[first : first + len(LINE) - 1 - (1 if first == 0 else 0)]
    assert len(line) > 10
    assert line == sorted(line), line


@pytest.mark.system
@pytest.mark.skipif(BROWSER is None, reason="chromium is not installed")
@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_the_page_keeps_bidi_controls_to_themselves(bidi_run, tmp_path, command):
    text = tmp_path / "t.txt"
    text.write_text(LINE * 2, encoding="utf-8")
    page = tmp_path / f"{command}.html"
    r = invoke(command, bidi_run.best, text, "--html", page)
    assert r.exit_code == 0, r.output
    # eval's first character is context, not a span.c; both pages lay the rest out left to right
    _assert_left_to_right(_positions(page, tmp_path), 0)
