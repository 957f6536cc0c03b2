"""``inspect --max-chars N`` with ``--unknown error`` checks only the N
characters it inspects, not the rest of the chunk it read from the file."""

from __future__ import annotations

from conftest import assert_clean_error, invoke

from charnn.storage import checkpoint as ckpt_mod


def _known_text(trained, n: int) -> str:
    chars = [c for c in ckpt_mod.load(trained.best).tokenizer.chars if c.isalpha()]
    return "".join(chars[i % len(chars)] for i in range(n))


def test_an_unknown_character_just_past_max_chars_is_not_read(trained, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(_known_text(trained, 300) + "\u2603" + _known_text(trained, 50), encoding="utf-8")
    page = tmp_path / "page.html"
    r = invoke("inspect", trained.best, text, "--max-chars", "300", "--unknown", "error", "--html", page)
    assert r.exit_code == 0, r.output
    assert page.exists()


def test_an_unknown_character_within_max_chars_is_still_refused(trained, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(_known_text(trained, 299) + "\u2603" + _known_text(trained, 50), encoding="utf-8")
    r = invoke("inspect", trained.best, text, "--max-chars", "300", "--unknown", "error",
               "--html", tmp_path / "page.html")
    assert_clean_error(r, "\u2603", str(text))
