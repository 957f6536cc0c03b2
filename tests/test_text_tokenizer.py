"""CharTokenizer: code points, sorted vocabulary, round trips, unknown characters, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charnn.errors import CharnnError, VocabError
from charnn.text.tokenizer import CharTokenizer, dtype_for


def test_vocab_is_sorted_set_of_code_points():
    tok = CharTokenizer.from_text("banana band")
    assert tok.chars == [" ", "a", "b", "d", "n"]
    assert tok.vocab_size == len(tok) == 5
    assert tok.stoi == {" ": 0, "a": 1, "b": 2, "d": 3, "n": 4}


def test_code_points_not_bytes():
    # é is 2 UTF-8 bytes, 😀 is 4 (an astral code point), a combining accent is
    # its own code point: each is exactly one token.
    text = "e\u0301 é 😀 𝄞 中"
    tok = CharTokenizer.from_text(text)
    assert sorted(tok.chars) == tok.chars
    assert set(tok.chars) == set(text)
    assert "😀" in tok and "𝄞" in tok and "\u0301" in tok
    ids = tok.encode(text)
    assert len(ids) == len(text) == 10
    assert tok.decode(ids) == text
    # Sorted by code point: the astral characters come last.
    assert tok.chars[-2:] == ["𝄞", "😀"]


def test_from_text_on_iterable_equals_from_string():
    assert CharTokenizer.from_text(["ab", "c😀"]) == CharTokenizer.from_text("abc😀")


def test_from_text_large_text_spans_chunks(monkeypatch):
    import charnn.text.tokenizer as tokmod

    monkeypatch.setattr(tokmod, "_CHUNK", 7)  # force several encoding chunks
    text = "abc😀defg\u0301hij" * 5
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text))
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(VocabError):
        tok.encode(text + "Z")


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_round_trip_any_text(text):
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text))
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # ids follow the code-point order of the vocabulary
    assert [tok.chars[i] for i in ids] == list(text)


def test_to_list_from_list_round_trip():
    tok = CharTokenizer.from_text("hello, wörld 😀\n")
    data = tok.to_list()
    assert isinstance(data, list) and all(isinstance(c, str) and len(c) == 1 for c in data)
    again = CharTokenizer.from_list(data)
    assert again == tok
    assert again.encode("hello") == tok.encode("hello")
    data.append("Z")  # the list is a copy, not the tokenizer's own
    assert "Z" not in tok


@pytest.mark.parametrize("bad", [["a", "a"], ["ab"], [], [1]])
def test_from_list_rejects_bad_vocab(bad):
    with pytest.raises(VocabError):
        CharTokenizer.from_list(bad)


def test_unknown_characters_are_an_error_listing_them():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(VocabError) as info:
        tok.encode("abxé😀x")
    err = info.value
    assert isinstance(err, CharnnError)
    msg = str(err)
    assert "'x' (U+0078)" in msg
    assert "'é' (U+00E9)" in msg
    assert "'😀' (U+1F600)" in msg
    assert "3 character(s)" in msg
    assert "--unknown skip" in msg  # says what to do
    assert err.characters == ["x", "é", "😀"]


def test_unknown_control_characters_are_escaped():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(VocabError) as info:
        tok.encode("a\tb\x00")
    msg = str(info.value)
    assert "'\\t' (U+0009)" in msg
    assert "'\\x00' (U+0000)" in msg
    assert "\x00" not in msg  # escaped, never raw


def test_many_unknown_characters_are_summarised():
    tok = CharTokenizer.from_text("a")
    bad = "".join(chr(0x100 + i) for i in range(30))
    with pytest.raises(VocabError) as info:
        tok.encode(bad)
    assert "and 10 more" in str(info.value)
    assert len(info.value.characters) == 30


def test_unknown_never_maps_silently():
    # Characters between/around vocabulary code points must not land on a
    # neighbour's id (a searchsorted bug would do exactly that).
    tok = CharTokenizer.from_text("bdf")
    for ch in "aceg\U0010ffff":
        with pytest.raises(VocabError):
            tok.encode(ch)


def test_unknown_skip_drops_characters():
    tok = CharTokenizer.from_text("abc")
    assert tok.decode(tok.encode("axbyc😀", unknown="skip")) == "abc"
    assert tok.encode("xyz", unknown="skip") == []
    with pytest.raises(ValueError):
        tok.encode("a", unknown="replace")


def test_unknown_chars_helper():
    tok = CharTokenizer.from_text("abc")
    assert tok.unknown_chars("zabyz") == ["y", "z"]
    assert tok.unknown_chars("abc") == []


def test_decode_out_of_range_is_vocab_error():
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(VocabError, match="out of range"):
        tok.decode([0, 5])


@pytest.mark.parametrize("size, dtype", [(1, np.uint8), (256, np.uint8), (257, np.uint16),
                                         (65536, np.uint16), (65537, np.int32)])
def test_dtype_for(size, dtype):
    assert dtype_for(size) == np.dtype(dtype)


@pytest.mark.parametrize("size, dtype", [(200, np.uint8), (256, np.uint8), (300, np.uint16),
                                         (70000, np.int32)])
def test_encode_array_dtype_and_values(size, dtype):
    chars = [chr(0x20 + i) if i < 0xD800 - 0x20 else chr(0x20 + i + 0x800) for i in range(size)]
    tok = CharTokenizer(chars)
    text = chars[0] + chars[-1] + chars[size // 2]
    ids = tok.encode_array(text)
    assert ids.dtype == np.dtype(dtype)
    assert ids.tolist() == [0, size - 1, size // 2]
    assert tok.decode(ids) == text


def test_encode_array_empty_text():
    tok = CharTokenizer.from_text("ab")
    ids = tok.encode_array("")
    assert ids.dtype == np.uint8 and ids.shape == (0,)


def test_unsorted_vocab_list_keeps_its_ids():
    # A vocabulary list is index = id, whatever its order.
    tok = CharTokenizer(["c", "a", "b"])
    assert tok.encode("abc") == [1, 2, 0]
    assert tok.decode([0, 1, 2]) == "cab"
