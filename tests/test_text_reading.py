"""Corpus reading, the built-in corpus, encoding cache, split and TBPTT batching."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from charnn.text import data
from charnn.text.data import (IGNORE_INDEX, BlockBatcher, StreamBatcher, builtin_corpus_files, builtin_corpus_path,
                         encode_corpus, read_corpus, split_ids)
from charnn.errors import CharnnError, DataError
from charnn.text.tokenizer import CharTokenizer


# ---------------------------------------------------------------------------
# read_corpus
# ---------------------------------------------------------------------------

def test_read_single_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello\nworld\n", encoding="utf-8")
    corpus = read_corpus([f])
    assert corpus.text == "hello\nworld\n"
    assert corpus.files == [(str(f), 12)]  # (path, characters)
    assert corpus.skipped == []
    assert corpus.name == "a"
    assert corpus.warnings == []
    import hashlib
    assert corpus.sha256 == hashlib.sha256(b"hello\nworld\n").hexdigest()


def test_read_directory_recursive_sorted(tmp_path):
    root = tmp_path / "books"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "z.txt").write_text("Z\n", encoding="utf-8")
    (root / "b" / "deep" / "2.txt").write_text("B2\n", encoding="utf-8")
    (root / "b" / "1.txt").write_text("B1\n", encoding="utf-8")
    (root / "a" / "x.md").write_text("AX\n", encoding="utf-8")
    (root / ".hidden.txt").write_text("HIDDEN\n", encoding="utf-8")
    corpus = read_corpus([root])
    assert corpus.text == "AX\nB1\nB2\nZ\n"
    rel = [Path(f).relative_to(root).as_posix() for f, _ in corpus.files]
    assert [n for _, n in corpus.files] == [3, 3, 3, 2]
    assert rel == ["a/x.md", "b/1.txt", "b/deep/2.txt", "z.txt"]
    assert corpus.name == "books"


def test_files_joined_with_newline_and_paths_in_given_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first", encoding="utf-8")  # no trailing newline
    b.write_text("second\n", encoding="utf-8")
    assert read_corpus([b, a]).text == "second\nfirst"
    assert read_corpus([a, b]).text == "first\nsecond\n"


def test_invalid_utf8_names_file_and_offset(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("café au lait".encode("utf-8") + b" na\xefve")
    with pytest.raises(DataError) as info:
        read_corpus([f])
    msg = str(info.value)
    assert str(f) in msg
    assert "0xef" in msg
    assert "offset 16" in msg
    assert "--encoding" in msg  # says what to do


def test_encoding_latin1(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("naïve café\r\n".encode("latin-1"))
    assert read_corpus([f], encoding="latin-1").text == "naïve café\n"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32-le"])
def test_wide_encodings_are_not_mistaken_for_binary(tmp_path, encoding):
    f = tmp_path / "wide.txt"
    f.write_bytes("wide text\r\nsecond line\n".encode(encoding))
    assert read_corpus([f], encoding=encoding).text == "wide text\nsecond line\n"
    d = tmp_path / "folder"
    d.mkdir()
    (d / "a.txt").write_bytes("in a folder\n".encode(encoding))
    assert read_corpus([d], encoding=encoding).text == "in a folder\n"
    with pytest.raises(DataError, match="binary"):  # and without --encoding it is refused, not misread
        read_corpus([f])


def test_unknown_encoding_is_data_error(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abc", encoding="utf-8")
    with pytest.raises(DataError, match="unknown text encoding"):
        read_corpus([f], encoding="no-such-codec")


def test_bom_dropped_and_newlines_normalised(tmp_path):
    f = tmp_path / "win.txt"
    f.write_bytes(b"\xef\xbb\xbfline1\r\nline2\rline3\n\r\n")
    corpus = read_corpus([f])
    assert corpus.text == "line1\nline2\nline3\n\n"
    assert "\ufeff" not in corpus.text and "\r" not in corpus.text


def test_bom_only_in_front_each_file(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"\xef\xbb\xbfA\n")
    b.write_bytes(b"\xef\xbb\xbfB\n")
    assert read_corpus([a, b]).text == "A\nB\n"


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf"])
def test_empty_corpus_is_error(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match="empty"):
        read_corpus([f])


def test_no_paths_is_error():
    with pytest.raises(DataError):
        read_corpus([])


def test_missing_path_is_error(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        read_corpus([tmp_path / "nope.txt"])
    assert "nope.txt" in str(info.value)


def test_binary_file_in_directory_skipped_with_warning(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a.txt").write_text("text here\n", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    corpus = read_corpus([root])
    assert corpus.text == "text here\n"
    assert corpus.files == [(str(root / "a.txt"), 10)]
    assert corpus.skipped == [(str(root / "image.png"), "looks like a binary file, not text")]
    assert len(corpus.warnings) == 1
    assert "image.png" in corpus.warnings[0] and "binary" in corpus.warnings[0]


def test_directory_of_only_binary_files_is_error(tmp_path):
    root = tmp_path / "bin"
    root.mkdir()
    (root / "x.bin").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match="no text files"):
        read_corpus([root])


def test_named_binary_file_is_error(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"\x00\x01\x02\x03" * 64)
    with pytest.raises(DataError, match="binary") as info:
        read_corpus([f])
    assert "blob.bin" in str(info.value)


def test_data_errors_are_charnn_errors():
    assert issubclass(DataError, CharnnError)


# ---------------------------------------------------------------------------
# The built-in corpus
# ---------------------------------------------------------------------------

def test_builtin_corpus_deterministic_and_capped(tmp_path, monkeypatch):
    files = builtin_corpus_files()
    assert files, "the running Python's standard library source was not found"
    assert files == builtin_corpus_files()  # fixed order
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert all(f.suffix == ".py" for f in files)
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/")[:-1])
    assert sum(f.stat().st_size for f in files) <= data.BUILTIN_CAP_BYTES

    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    monkeypatch.setenv("CHARNN_DATA_DIR", str(first_dir))
    p1 = builtin_corpus_path()
    assert p1.parent == first_dir  # written under the data dir, never the repo
    monkeypatch.setenv("CHARNN_DATA_DIR", str(second_dir))
    p2 = builtin_corpus_path()
    b1, b2 = p1.read_bytes(), p2.read_bytes()
    assert b1 == b2
    assert 100_000 < len(b1) <= data.BUILTIN_CAP_BYTES * 1.05  # headers add a little
    text = b1.decode("utf-8")
    assert "\r" not in text
    assert text.startswith("# ===== " + rel[0])
    # Cached: a second call reuses the file.
    mtime = p2.stat().st_mtime_ns
    assert builtin_corpus_path() == p2 and p2.stat().st_mtime_ns == mtime
    # It reads as an ordinary corpus, and it is an ordinary (not private) file.
    assert read_corpus([p2]).text == text
    assert p2.stat().st_mode & 0o777 == 0o644
    assert [f.name for f in second_dir.iterdir()] == [p2.name]  # no temp files left


def test_data_dir_follows_env(data_dir):
    assert data.data_dir() == data_dir


# ---------------------------------------------------------------------------
# Encoding cache
# ---------------------------------------------------------------------------

def _corpus(tmp_path, text, name="c.txt"):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return read_corpus([f])


def test_encode_corpus_cache_read_into_memory(tmp_path, data_dir):
    corpus = _corpus(tmp_path, "hello world\n" * 50)
    tok = CharTokenizer.from_text(corpus.text)
    ids = encode_corpus(corpus, tok)
    assert not isinstance(ids, np.memmap)  # a mapped cache file truncated mid-run means SIGBUS
    assert ids.dtype == np.uint8
    assert tok.decode(ids) == corpus.text
    cached = list((data_dir / ".cache").glob("*.npy"))
    assert len(cached) == 1
    assert cached[0].stat().st_mode & 0o777 == 0o644
    assert not list((data_dir / ".cache").glob(".charnn-tmp-*"))

    # Unchanged text: the same file is reused, not rewritten (its mtime records the use).
    inode = cached[0].stat().st_ino
    os.utime(cached[0], ns=(1, 1))
    again = encode_corpus(_corpus(tmp_path, "hello world\n" * 50), tok)
    assert np.array_equal(again, ids) and not isinstance(again, np.memmap)
    assert list((data_dir / ".cache").glob("*.npy")) == cached
    assert cached[0].stat().st_ino == inode
    assert cached[0].stat().st_mtime_ns > 1

    # Changed text: a new key.
    changed = _corpus(tmp_path, "hello world\n" * 49 + "world hello\n")
    ids2 = encode_corpus(changed, tok)
    assert tok.decode(ids2) == changed.text
    assert len(list((data_dir / ".cache").glob("*.npy"))) == 2


def test_encode_corpus_cache_write_failure_costs_only_the_cache(tmp_path, data_dir, monkeypatch):
    corpus = _corpus(tmp_path, "abcabc")
    tok = CharTokenizer.from_text(corpus.text)

    def full_disk(f, arr):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.np, "save", full_disk)
    assert encode_corpus(corpus, tok).tolist() == [0, 1, 2, 0, 1, 2]
    assert list((data_dir / ".cache").iterdir()) == []  # no half-written entry, no temp file


def test_encode_corpus_without_cache_writes_nothing(tmp_path, data_dir):
    corpus = _corpus(tmp_path, "abcabc")
    tok = CharTokenizer.from_text(corpus.text)
    ids = encode_corpus(corpus, tok, cache=False)
    assert ids.tolist() == [0, 1, 2, 0, 1, 2]
    assert not (data_dir / ".cache").exists()


def test_encode_corpus_rebuilds_corrupt_cache(tmp_path, data_dir):
    corpus = _corpus(tmp_path, "abcabc")
    tok = CharTokenizer.from_text(corpus.text)
    encode_corpus(corpus, tok)
    (entry,) = (data_dir / ".cache").glob("*.npy")
    entry.write_bytes(b"garbage")
    assert encode_corpus(corpus, tok).tolist() == [0, 1, 2, 0, 1, 2]


def test_encode_corpus_unknown_chars_error(tmp_path, data_dir):
    from charnn.errors import VocabError

    corpus = _corpus(tmp_path, "abcx")
    with pytest.raises(VocabError):
        encode_corpus(corpus, CharTokenizer.from_text("abc"))


# ---------------------------------------------------------------------------
# split_ids
# ---------------------------------------------------------------------------

def test_split_last_fraction_contiguous():
    ids = np.arange(1000)
    train, val = split_ids(ids, 0.1)
    assert len(val) == 100 and len(train) == 900
    assert np.array_equal(train, np.arange(900))
    assert np.array_equal(val, np.arange(900, 1000))
    train, val = split_ids(ids, 0.0)
    assert len(train) == 1000 and len(val) == 0


@pytest.mark.parametrize("frac", [-0.1, 1.0, 1.5])
def test_split_bad_fraction(frac):
    with pytest.raises(DataError):
        split_ids(np.arange(10), frac)


# ---------------------------------------------------------------------------
# StreamBatcher
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch_size, seq_len", [(101, 4, 5), (100, 3, 7), (64, 4, 4), (33, 8, 4),
                                                    (1000, 16, 32), (10, 3, 2),
                                                    (6, 4, 1), (13, 4, 3)])
def test_batcher_every_target_once_in_order(n, batch_size, seq_len):
    ids = (np.arange(n) % 251).astype(np.uint8)
    pos_of = np.arange(n)  # use positions to track each target
    b = StreamBatcher(pos_of, batch_size, seq_len)
    seen = []
    per_stream: list[list[int]] = [[] for _ in range(batch_size)]
    chunks = list(b.epoch())
    assert [i for i, _, _ in chunks] == list(range(len(b)))
    for i, x, y in chunks:
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert x.shape == y.shape and x.shape[0] == batch_size and x.shape[1] <= seq_len
        valid = y != IGNORE_INDEX
        # targets are inputs shifted by one, wherever the target is real
        assert torch.equal(y[valid], x[valid] + 1)
        for row in range(batch_size):
            per_stream[row].extend(y[row][valid[row]].tolist())
        seen.extend(y[valid].tolist())
        # padding is only ever IGNORE_INDEX, never a real id
        assert set(y[~valid].tolist()) <= {IGNORE_INDEX}
    assert sorted(seen) == list(range(1, n))  # every target exactly once
    for row in per_stream:
        if row:  # contiguous and in order within each stream
            assert row == list(range(row[0], row[0] + len(row)))
    # streams tile the text in order
    flat = [t for row in per_stream for t in row]
    assert flat == list(range(1, n))
    # the same holds for the compact dtype the trainer uses
    b8 = StreamBatcher(ids, batch_size, seq_len)
    x, y = b8.chunk(0)
    assert x.dtype == torch.int64


def test_batcher_padding_only_at_end_of_last_stream():
    b = StreamBatcher(np.arange(12), 2, 4)  # 11 targets -> streams of 6 (the last one 5)
    assert len(b) == 2
    x0, y0 = b.chunk(0)
    x1, y1 = b.chunk(1)
    assert y0.tolist() == [[1, 2, 3, 4], [7, 8, 9, 10]]
    assert y1.tolist() == [[5, 6], [11, IGNORE_INDEX]]
    assert x1.tolist()[0] == [4, 5]


def _block_order(b: BlockBatcher, epoch: int) -> list[int]:
    """The text blocks in the order the rows start them in ``epoch``."""
    return [int(v) for v in b.layout(epoch).T.ravel() if v >= 0]


def test_block_batcher_new_order_each_epoch_same_for_same_seed():
    ids = np.arange(600_001)
    b = BlockBatcher(ids, 16, 64, seed=7)
    assert 16 <= b.block_chunks <= 32 and b.block_len == b.block_chunks * 64
    orders = [_block_order(b, e) for e in range(3)]
    assert all(sorted(o) == list(range(b.n_blocks)) for o in orders)
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(b.n_blocks))
    assert _block_order(BlockBatcher(ids, 16, 64, seed=7), 1) == orders[1]  # what a resume rebuilds
    assert _block_order(BlockBatcher(ids, 16, 64, seed=8), 1) != orders[1]
    assert _block_order(BlockBatcher(ids, 16, 64, seed=2 ** 64 - 1), 0) != orders[0]  # the largest seed works


def test_block_batcher_part_of_an_epoch_reads_all_of_the_text():
    """The point of shuffling: a run that stops at a quarter of an epoch has
    read from every part of the text (in order, it would have read only the
    first quarter of each row's stretch, none of the text's last stretch's end)."""
    n = 1_000_001
    b = BlockBatcher(np.arange(n), 16, 64, seed=1337)
    tenths = np.zeros(10, dtype=int)
    for _, x, y in b.epoch(0, 0):
        if _ >= len(b) // 4:
            break
        t = y[y != IGNORE_INDEX].numpy()
        np.add.at(tenths, (t - 1) * 10 // (n - 1), 1)
    share = tenths / tenths.sum()
    assert share.min() > 0.06 and share.max() < 0.14, share  # about a tenth from each tenth
    in_order = StreamBatcher(np.arange(n), 16, 64)
    _, y = in_order.chunk(len(in_order) // 4 - 1)
    assert int(y.max()) < n - 1 - (n // 16) * 0.7  # what --no-shuffle would have reached by then


def test_block_batcher_blocks_fill_the_rows_with_little_padding():
    """Blocks of at most 32 chunks (a little less where that fills the rows
    evenly), never tiny: a small text gets one block per row, so the state is
    reset only where an epoch starts, as in order."""
    for n, batch, seq in [(35_000, 16, 64), (32_929, 16, 64), (5_000, 16, 64), (1_025, 16, 64),
                          (300_000, 32, 100), (2_000_001, 16, 64)]:
        b = BlockBatcher(np.arange(n), batch, seq, seed=1)
        waste = 1 - (n - 1) / (len(b) * batch * seq)
        per_row = -(-len(StreamBatcher(np.arange(n), batch, seq)) // data.BLOCK_CHUNKS)
        assert b.block_chunks == -(-len(StreamBatcher(np.arange(n), batch, seq)) // per_row)
        assert data.BLOCK_CHUNKS // 2 <= b.block_chunks <= data.BLOCK_CHUNKS or per_row == 1
        assert waste < 0.06, (n, b.block_chunks, waste)
    tiny = BlockBatcher(np.arange(30_000), 16, 64, seed=1)  # 30 chunks per row
    assert tiny.blocks_per_row == 1 and tiny.block_chunks == len(StreamBatcher(np.arange(30_000), 16, 64)) == 30


def test_block_batcher_too_short_error_is_the_same():
    with pytest.raises(DataError, match="too short"):
        BlockBatcher(np.arange(50), 4, 16, seed=0)


def test_batcher_too_short_error():
    with pytest.raises(DataError) as info:
        StreamBatcher(np.arange(50), 4, 16)
    msg = str(info.value)
    assert "50 characters" in msg and "too short" in msg
    assert "--batch-size 4" in msg and "--seq-len 16" in msg and "65" in msg


def test_batcher_bad_sizes():
    with pytest.raises(DataError):
        StreamBatcher(np.arange(50), 0, 4)
