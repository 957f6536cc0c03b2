"""Property-based tests (hypothesis): the tokenizer round-trips any Unicode,
corpus reading never crashes on any bytes, TBPTT batching covers every
training target exactly once per epoch, in order within each stream."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from charnn.text.data import IGNORE_INDEX, BlockBatcher, StreamBatcher, normalize_newlines, read_corpus
from charnn.errors import DataError, VocabError
from charnn.text.tokenizer import CharTokenizer

SETTINGS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Every code point, lone surrogates included (the tokenizer works on code points).
any_char = st.characters(codec=None, exclude_categories=())
tricky_char = st.sampled_from([
    "\x00", "\x07", "\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\u00a0", "\u200b", "\u200d", "\u200e",
    "\u202e", "\u2028", "\u2029", "\ufeff", "\ufffd", "\uffff", "e\u0301"[1], "\u05d0", "\u0627",
    "\U0001F600", "\U0001F3FB", "\U00010348", "\U0010FFFF", "\ud800", "\udfff", "\udc80",
])
unicode_text = st.text(alphabet=st.one_of(any_char, tricky_char), min_size=1, max_size=200)


@SETTINGS
@given(unicode_text)
def test_tokenizer_round_trips_any_unicode(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode_array(text)
    assert len(ids) == len(text)
    assert tok.decode(ids.tolist()) == text
    assert tok.decode(tok.encode(text)) == text
    # Vocabulary: distinct characters in code-point order; plain data round-trips.
    assert tok.chars == sorted(set(text), key=ord)
    assert CharTokenizer.from_list(tok.to_list()) == tok
    assert CharTokenizer.from_text(iter([text[: len(text) // 2], text[len(text) // 2:]])) == tok
    assert ids.dtype.kind in "ui" and (len(ids) == 0 or int(ids.max()) < tok.vocab_size)


@SETTINGS
@given(unicode_text, st.data())
def test_unknown_characters_are_named_or_skipped(text, data):
    vocab = sorted(set(text), key=ord)
    keep = data.draw(st.lists(st.sampled_from(vocab), min_size=1, unique=True))
    tok = CharTokenizer(sorted(keep, key=ord))
    missing = set(text) - set(keep)
    if missing:
        with pytest.raises(VocabError) as info:
            tok.encode(text)
        assert set(info.value.characters) == missing
    skipped = tok.decode(tok.encode(text, unknown="skip"))
    assert skipped == "".join(c for c in text if c in set(keep))


@SETTINGS
@given(st.binary(max_size=3000), st.sampled_from(["utf-8", "latin-1", "utf-16", "ascii", "cp1252"]))
def test_read_corpus_never_crashes_on_any_bytes(raw, encoding):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "corpus.txt"
        path.write_bytes(raw)
        try:
            corpus = read_corpus([path], encoding=encoding)
        except DataError as e:
            assert str(e)  # a message for the user
            return
        assert corpus.text == normalize_newlines(raw.decode(encoding))
        assert corpus.text and "\r" not in corpus.text
        # The text goes on through the tokenizer without surprises.
        tok = CharTokenizer.from_text(corpus.text)
        assert tok.decode(tok.encode(corpus.text)) == corpus.text


@SETTINGS
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=4))
def test_read_corpus_folder_of_arbitrary_files(blobs):
    with tempfile.TemporaryDirectory() as d:
        for i, blob in enumerate(blobs):
            (Path(d) / f"f{i}.txt").write_bytes(blob)
        try:
            corpus = read_corpus([d])
        except DataError:
            return
        assert corpus.text and corpus.files


@SETTINGS
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1,
               max_size=300))
def test_read_corpus_returns_valid_utf8_text(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.txt"
        path.write_bytes(text.encode("utf-8"))
        expected = normalize_newlines(text)
        if not expected:
            with pytest.raises(DataError):
                read_corpus([path])
            return
        assert read_corpus([path]).text == expected


@settings(max_examples=150, deadline=None, database=None)
@given(st.integers(2, 600), st.integers(1, 9), st.integers(1, 24))
def test_stream_batcher_covers_every_target_once_in_order(n, batch_size, seq_len):
    ids = np.arange(n, dtype=np.int64)  # id == position, so targets name themselves
    if n - 1 < batch_size * seq_len:
        with pytest.raises(DataError):
            StreamBatcher(ids, batch_size, seq_len)
        return
    b = StreamBatcher(ids, batch_size, seq_len)
    streams: list[list[int]] = [[] for _ in range(batch_size)]
    chunks = list(b.epoch())
    assert [i for i, _, _ in chunks] == list(range(len(b)))
    for _, x, y in chunks:
        assert x.shape == y.shape and x.shape[0] == batch_size and 1 <= x.shape[1] <= seq_len
        valid = y != IGNORE_INDEX
        # Every valid target is the character right after its input.
        assert bool((y[valid] == x[valid] + 1).all())
        # Padding only at the end of a stream: once invalid, the rest of the row is too.
        for row in range(batch_size):
            v = valid[row].tolist()
            assert v == sorted(v, reverse=True)
            streams[row].extend(y[row][valid[row]].tolist())
    everything = [t for s in streams for t in s]
    assert sorted(everything) == list(range(1, n)), "a target missing or repeated"
    for s in streams:  # each stream is one contiguous, in-order stretch of the text
        assert s == list(range(s[0], s[0] + len(s))) if s else True
    firsts = [s[0] for s in streams if s]
    assert firsts == sorted(firsts)
    # Resuming mid-epoch yields the same chunks.
    mid = len(b) // 2
    for (i1, x1, y1), (i2, x2, y2) in zip(chunks[mid:], b.epoch(mid)):
        assert i1 == i2 and bool((x1 == x2).all()) and bool((y1 == y2).all())


@SETTINGS
@given(st.integers(2, 300), st.integers(1, 6), st.integers(1, 16), st.integers(1, 3))
def test_stream_batcher_per_rank_rows_partition_the_streams(n, per_rank, seq_len, world):
    """Under DDP each rank takes ``batch_size / world`` rows; together they are
    the whole batch, so the whole epoch is still covered exactly once."""
    batch_size = per_rank * world
    assume(n - 1 >= batch_size * seq_len)
    b = StreamBatcher(np.arange(n, dtype=np.int64), batch_size, seq_len)
    seen = []
    for rank in range(world):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        for _, _, y in b.epoch():
            yr = y[rows]
            seen.extend(yr[yr != IGNORE_INDEX].tolist())
    assert sorted(seen) == list(range(1, n))


@SETTINGS
@given(st.integers(2, 3000), st.integers(1, 9), st.integers(1, 24), st.integers(0, 2 ** 64 - 1),
       st.integers(0, 5), st.integers(1, 3))
def test_block_batcher_every_target_once_per_epoch_in_blocks(n, batch_size, seq_len, seed, epoch, world):
    """Shuffled blocks: every target exactly once per epoch, whichever epoch;
    each row reads whole blocks left to right, a block starting exactly where
    starts_block says (the trainer resets the state there); the ranks' rows
    together are the whole batch; resuming mid-epoch gives the same chunks."""
    ids = np.arange(n, dtype=np.int64)
    if n - 1 < batch_size * seq_len:
        with pytest.raises(DataError):
            BlockBatcher(ids, batch_size, seq_len, seed)
        return
    b = BlockBatcher(ids, batch_size, seq_len, seed)
    chunks = list(b.epoch(0, epoch))
    assert [i for i, _, _ in chunks] == list(range(len(b)))
    rows: list[list[list[int]]] = [[] for _ in range(batch_size)]  # per row, its blocks' targets
    for i, x, y in chunks:
        assert x.shape == y.shape == (batch_size, seq_len)
        valid = y != IGNORE_INDEX
        assert bool((y[valid] == x[valid] + 1).all())
        for r in range(batch_size):
            if b.starts_block(i):
                rows[r].append([])
            rows[r][-1].extend(y[r][valid[r]].tolist())
    blocks = [blk for row in rows for blk in row if blk]
    for blk in blocks:  # one contiguous stretch, read in order, within one block of the text
        assert blk == list(range(blk[0], blk[0] + len(blk)))
        assert (blk[0] - 1) // b.block_len == (blk[-1] - 1) // b.block_len
    everything = sorted(t for blk in blocks for t in blk)
    assert everything == list(range(1, n)), "a target missing or repeated"
    per_rank = batch_size // world
    if per_rank and batch_size % world == 0:
        seen = []
        for rank in range(world):
            for _, _, y in b.epoch(0, epoch):
                yr = y[rank * per_rank:(rank + 1) * per_rank]
                seen.extend(yr[yr != IGNORE_INDEX].tolist())
        assert sorted(seen) == list(range(1, n))
    mid = len(b) // 2
    fresh = BlockBatcher(ids, batch_size, seq_len, seed)  # a resumed run builds its own batcher
    for (i1, x1, y1), (i2, x2, y2) in zip(chunks[mid:], fresh.epoch(mid, epoch)):
        assert i1 == i2 and bool((x1 == x2).all()) and bool((y1 == y2).all())
