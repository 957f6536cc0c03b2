"""The built-in corpus, encoding, the train/validation split and TBPTT batching.

Text flows one way: files -> normalised text (:mod:`charnn.text.reading`, what a
corpus folder contributes) -> integer ids (a compact numpy array,
read back from a cache for big corpora) -> (B, T) batches.

The encoded-corpus cache
------------------------
``encode_corpus`` keeps the ids of a corpus as a ``.npy`` (read into memory, never mapped) under
``data_dir()/.cache``, named by the text's hash, the vocabulary's hash and a
SHA-256 checksum of the ids themselves. An entry is used only if its dtype,
shape, id range (every id < vocabulary size) and checksum match and it agrees
with the text at 4,096 evenly spaced positions; otherwise it is deleted and
rebuilt. The cache keeps at most ``CACHE_MAX_ENTRIES`` (8) entries and
``CACHE_MAX_BYTES`` (2 GiB), least recently used first out (a use touches the
entry's mtime); it is pruned on every write. The newest entry is always kept,
even alone over the size bound. Entries are written to a temporary file and
renamed into place, so concurrent runs never see a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import DataError
from ..safe_files import TMP_PREFIX, replace_atomically
# Reading is its own module; its public names are also imported from here.
from .reading import (BINARY_SNIFF_BYTES, CHARNN_FILE_PREFIX, ENCODING_HINT, RUN_MARKER,  # noqa: F401
                      Corpus, Progress, Status, check_encoding, corpus_name, count_text, decode_bytes,
                      directory_files, file_kind, looks_binary, normalize_newlines, read_corpus, show_path)
from .tokenizer import CharTokenizer, dtype_for

IGNORE_INDEX = -100  # target value that the loss skips (padding)


# ---------------------------------------------------------------------------
# The built-in corpus: this Python's own standard library source
# ---------------------------------------------------------------------------

BUILTIN_NAME = "python-stdlib"
BUILTIN_CAP_BYTES = 4_000_000  # total size of the assembled corpus
BUILTIN_MAX_FILE_BYTES = 150_000  # skip giant generated files
_BUILTIN_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                      "__pycache__", "encodings", "pydoc_data", "lib2to3", "ensurepip",
                      "turtledemo", "config-3"}


def data_dir() -> Path:
    """Where corpora and caches live: ``$CHARNN_DATA_DIR``, else the project's
    ``data/`` folder in a source checkout, else ``~/.cache/charnn``."""
    env = os.environ.get("CHARNN_DATA_DIR")
    if env:
        return Path(env)
    repo_data = Path(__file__).resolve().parent.parent / "data"
    if repo_data.is_dir() and os.access(repo_data, os.W_OK):
        return repo_data
    return Path.home() / ".cache" / "charnn"


def _check_data_dir(folder: Path) -> None:
    """A DataError if the data folder ``folder`` cannot be one: it, or the
    nearest existing path above it, is a file (or a FIFO, a device...). A
    missing folder is fine (it is created); an unwritable one is reported by
    the write itself."""
    p = folder
    while True:
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):
            if p == p.parent:
                return
            p = p.parent
            continue
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode):
            return
        what = "a file" if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)
        env = os.environ.get("CHARNN_DATA_DIR")
        if env:
            where = (f"CHARNN_DATA_DIR={show_path(env)} is {what}, not a folder" if p == folder else
                     f"CHARNN_DATA_DIR={show_path(env)} cannot be a folder: {show_path(p)} is {what}, not a folder")
            raise DataError(f"{where}; set CHARNN_DATA_DIR to a folder (it is created if missing) "
                            "or unset it")
        raise DataError(f"the data folder {show_path(folder)} cannot be created: {show_path(p)} is {what}, "
                        "not a folder; remove it or set CHARNN_DATA_DIR to a folder")


def _builtin_skip_dir(name: str) -> bool:
    return name in _BUILTIN_SKIP_DIRS or name.startswith("config-")


def builtin_corpus_files() -> list[Path]:
    """The standard-library ``.py`` files, in fixed order, within the cap."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    # Prune while walking: site-packages alone can hold far more files than
    # the standard library (torch), and none of them is wanted.
    for f in directory_files(root, skip_dir=_builtin_skip_dir):
        if f.suffix != ".py":
            continue
        size = f.stat().st_size
        if size == 0 or size > BUILTIN_MAX_FILE_BYTES or total + size > BUILTIN_CAP_BYTES:
            continue
        chosen.append(f)
        total += size
    return chosen


def builtin_corpus_path(progress: Progress | None = None) -> Path:
    """Assemble (once) and return the built-in corpus file under ``data/``.
    ``progress`` hears about the assembly (a few seconds, the first time)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = data_dir()
    target = folder / f"{BUILTIN_NAME}-{version}.txt"
    if target.is_file() and target.stat().st_size > 0:
        return target
    _check_data_dir(folder)  # before the assembly: "cannot write afile/...: File exists" says nothing
    if progress is not None:
        progress("assembling the built-in corpus from this Python's standard library (once)")
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for f in builtin_corpus_files():
        try:
            text = normalize_newlines(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(f"# ===== {f.relative_to(root).as_posix()} =====\n{text.rstrip()}\n\n")
    if not parts:
        raise DataError(f"could not find this Python's standard library source under {show_path(root)}; "
                        "pass a corpus file instead")
    _atomic_write_text(target, "".join(parts))
    return target


def atomic_write(target: Path, write) -> None:
    """:func:`~charnn.safe_files.replace_atomically`, its folder made first. Raises OSError."""
    target.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(target, write)


def _atomic_write_text(target: Path, text: str) -> None:
    try:
        atomic_write(target, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        raise DataError(f"cannot write {show_path(target)}: {e.strerror or e}; set CHARNN_DATA_DIR "
                        "to a writable folder") from None


# ---------------------------------------------------------------------------
# Encoding (with a cache) and splitting
# ---------------------------------------------------------------------------

CACHE_MAX_ENTRIES = 8  # encoded corpora kept under data_dir()/.cache ...
CACHE_MAX_BYTES = 2 * 1024**3  # ... and their total size (2 GiB); least recently used go first
CACHE_SPOT_CHECKS = 4096  # positions where a cache entry is compared with the text
CACHE_STALE_TMP_S = 3600  # temp files older than this are left by killed writers
ENCODE_STATUS_CHARS = 4_000_000  # encoding this many characters takes about a second


def cache_dir() -> Path:
    """Where ``encode_corpus`` keeps encoded corpora."""
    return data_dir() / ".cache"


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids).data).hexdigest()[:16]


def encode_corpus(corpus: Corpus, tokenizer: CharTokenizer, cache: bool = True, *,
                  progress: Progress | None = None) -> np.ndarray:
    """The corpus as ids. With ``cache``, the array is stored once as a ``.npy``
    under ``data_dir()/.cache`` keyed by the text's and the vocabulary's hashes,
    and read back into memory; an entry that does not match is rebuilt, and
    the cache stays within its bounds (see the module docstring)."""
    status = Status(progress)

    def encode() -> np.ndarray:
        if len(corpus.text) >= ENCODE_STATUS_CHARS:
            status.say(f"encoding {count_text(len(corpus.text))} characters")
        return tokenizer.encode_array(corpus.text)

    if not cache:
        return encode()
    vocab_hash = hashlib.sha256("".join(tokenizer.chars).encode("utf-8", "surrogatepass")).hexdigest()
    key = f"{corpus.sha256[:24]}-{vocab_hash[:12]}"
    folder = cache_dir()
    hit = _cache_lookup(folder, key, corpus.text, tokenizer)
    if hit is not None:
        return hit
    ids = encode()
    path = folder / f"{key}-{_ids_digest(ids)}.npy"
    try:
        atomic_write(path, lambda f: np.save(f, ids))
        prune_cache(folder, keep=path)
    except (OSError, ValueError):
        pass  # a read-only or full disk (or a concurrent prune) only costs the cache
    return ids


def _cache_lookup(folder: Path, key: str, text: str, tokenizer: CharTokenizer) -> np.ndarray | None:
    """A verified entry for ``key``, read into memory, its use recorded in its
    mtime; entries that fail verification are deleted."""
    return cache_lookup(folder, key, lambda path: _verified_entry(path, text, tokenizer))


def cache_lookup(folder: Path, key: str, verified: Callable[[Path], np.ndarray | None]) -> np.ndarray | None:
    """The first cache file ``KEY-*.npy`` in ``folder`` that ``verified``
    reads and trusts (it returns None for one it does not: that file is
    deleted), its mtime touched so pruning keeps the most recently used."""
    try:
        candidates = sorted(folder.glob(f"{key}-*.npy"))
    except OSError:
        return None
    for path in candidates:
        found = verified(path)
        if found is None:
            try:
                path.unlink()
            except OSError:
                pass
            continue
        try:
            os.utime(path)  # least recently used goes first when pruning
        except OSError:
            pass
        return found
    return None


def _verified_entry(path: Path, text: str, tokenizer: CharTokenizer) -> np.ndarray | None:
    """The entry's ids if they can be trusted to be ``text`` encoded by
    ``tokenizer``: right dtype and length, checksum as in the name, every id in
    the vocabulary, equal to the text at evenly spaced positions."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        # Read, not memory-mapped: a cache file truncated or replaced while a
        # run trains on it would kill the run with SIGBUS; an encoded text
        # costs no more memory than encoding it afresh would.
        ids = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001 - any unreadable or crafted file is just a cache miss
        return None
    if not isinstance(ids, np.ndarray) or ids.shape != (len(text),):
        return None
    if ids.dtype != dtype_for(tokenizer.vocab_size):
        return None
    if _ids_digest(ids) != path.stem.rsplit("-", 1)[-1]:
        return None
    if len(ids) and (int(ids.max()) >= tokenizer.vocab_size or int(ids.min()) < 0):
        return None
    positions = np.unique(np.linspace(0, len(text) - 1, num=min(len(text), CACHE_SPOT_CHECKS)).astype(np.int64))
    try:
        expected = tokenizer.encode_array("".join(text[i] for i in positions.tolist()))
    except Exception:  # noqa: BLE001 - unknown characters: the full encode raises the real error
        return None
    if not np.array_equal(np.asarray(ids[positions]), expected):
        return None
    return ids


def prune_cache(folder: Path, keep: Path, max_entries: int | None = None, max_bytes: int | None = None) -> None:
    """Delete the least recently used entries beyond the bounds (``keep`` always
    stays) and temp files that killed writers left behind. The bounds default
    to the encoded corpora's (read at call time)."""
    max_entries = CACHE_MAX_ENTRIES if max_entries is None else max_entries
    max_bytes = CACHE_MAX_BYTES if max_bytes is None else max_bytes
    entries = []
    now = time.time()
    try:
        listing = list(os.scandir(folder))
    except OSError:
        return
    for entry in listing:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if entry.name.startswith(TMP_PREFIX):
            if now - st.st_mtime > CACHE_STALE_TMP_S:
                _unlink_quietly(Path(entry.path))
        elif entry.name.endswith(".npy"):
            newest = entry.name == keep.name
            entries.append((newest, st.st_mtime_ns, st.st_size, Path(entry.path)))
    entries.sort(key=lambda e: (e[0], e[1]), reverse=True)  # kept entry, then newest first
    count = total = 0
    for i, (newest, _, size, _path) in enumerate(entries):
        if not newest and (count + 1 > max_entries or total + size > max_bytes):
            for _, _, _, old in entries[i:]:
                _unlink_quietly(old)
            return
        count += 1
        total += size


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # already gone (another run pruned it) or not ours to delete


def split_ids(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last ``val_fraction`` of the text is validation, contiguous."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(ids) * val_fraction))
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


# ---------------------------------------------------------------------------
# TBPTT batching
# ---------------------------------------------------------------------------
#
# In order (--no-shuffle, and every checkpoint without a recorded order): the
# training text is cut into B contiguous streams, one per batch row, each
# read left to right in chunks of T characters; the state carried out of chunk
# c of row b is exactly the context of chunk c+1 of row b:
#
#   text:  a b c d e f g h i j k l m n o p q r s t u v w x y
#
#          |-- chunk 0 --|-- chunk 1 --|- 2 -|
#   row 0:  a  b  c  d     e  f  g  h    i  j       (stream 0)
#   row 1:  k  l  m  n     o  p  q  r    s  t       (stream 1)
#   row 2:  u  v  w  x     .  .  .  .    .  .       (stream 2, padded)
#
# Targets are the inputs shifted by one character. Streams are ceil((N-1)/B)
# long, so every training character is a target exactly once per epoch; the
# last stream is padded with IGNORE_INDEX targets that the loss skips.

class _Batcher:
    """What both batchers share: ``chunks_per_epoch`` chunks an epoch, walked in order."""
    chunks_per_epoch: int

    def __len__(self) -> int:
        return self.chunks_per_epoch

    def chunk(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def epoch(self, start: int = 0, epoch: int = 0) -> Iterable[tuple[int, torch.Tensor, torch.Tensor]]:
        for i in range(start, self.chunks_per_epoch):
            x, y = self.chunk(i, epoch)
            yield i, x, y


class StreamBatcher(_Batcher):
    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int):
        n_targets = len(ids) - 1
        if batch_size < 1 or seq_len < 1:
            raise DataError("batch size and sequence length must be at least 1")
        if n_targets < batch_size * seq_len:
            raise DataError(
                f"the training text has {len(ids):,} characters, too short for "
                f"--batch-size {batch_size} x --seq-len {seq_len} (needs at least "
                f"{batch_size * seq_len + 1:,}); add text or lower --batch-size/--seq-len"
            )
        self.ids = ids
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.n_targets = n_targets
        self.stream_len = -(-n_targets // batch_size)  # ceil
        self.starts = np.arange(batch_size, dtype=np.int64) * self.stream_len  # (B,)
        self.ends = np.minimum(self.starts + self.stream_len, n_targets)  # (B,)
        self.chunks_per_epoch = -(-self.stream_len // seq_len)

    def chunk(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of chunk ``index`` of an epoch (every epoch is the same): two (B, T) int64."""
        lo = index * self.seq_len
        hi = min(lo + self.seq_len, self.stream_len)
        pos = self.starts[:, None] + np.arange(lo, hi)[None, :]  # (B, T)
        return _gather(self.ids, pos, pos < self.ends[:, None])

    def starts_block(self, index: int) -> bool:
        """Whether chunk ``index`` starts new text in every row (the carried state is reset)."""
        return index == 0


def _gather(ids: np.ndarray, pos: np.ndarray, valid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    safe = np.where(valid, pos, 0)
    x = torch.from_numpy(np.asarray(ids[safe], dtype=np.int64))
    y = torch.from_numpy(np.asarray(ids[safe + 1], dtype=np.int64))
    if not valid.all():
        y[torch.from_numpy(~valid)] = IGNORE_INDEX
    return x, y


# Shuffled blocks. Read in order, a run that stops before one epoch has seen
# only the first part of each of the B stretches, and its last steps were all
# on one neighbourhood of each: on text that changes along its length (source
# files in path order, documentation by topic) the model is then fitted to
# wherever the budget happened to end. So the training text is cut into
# blocks of K chunks (K*T characters: K is 32, or a little less so that the
# blocks fill the rows evenly; a text with fewer than 32 chunks per row gets
# one block per row),
# every epoch deals them out to the rows in a fresh random order (from the
# run's seed and the epoch: an exact resume needs only the position), and
# each row reads its blocks in turn, every block left to right with the
# state carried from chunk to chunk:
#
#   blocks:  A B C D E F G   (the text, cut every K*T characters)
#   epoch 0: row 0: F A D     row 1: C G B     row 2: E - -   ("-": padding)
#   epoch 1: another order
#
# All rows start a block at the same chunk, so the state is reset for the
# whole batch there (the model learns to start from a zero state, as the
# sampler does). Every training character is a target exactly once per
# epoch; the padding (under 6% of an epoch, the end of the text's last block
# and the empty slots of the last column) is skipped by the loss.
#
# 32 chunks: 1-chunk blocks (a reset every chunk) learned much more slowly on
# the Chinese poems (1 minute, 2x256: 4.99 against 4.89 in order), 256 did no
# better on the Jargon File or the docs (1 minute). Known cost: on the Jargon
# File shuffled runs often stall on the first plateau and stay 6-9% behind at
# 1,500 steps, not because of the resets (benchmarks/reading_order.py;
# benchmarks/README.md, "Reading order").
BLOCK_CHUNKS = 32  # chunks per block at most: 2,048 characters at the default --seq-len 64


class BlockBatcher(_Batcher):
    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int):
        check = StreamBatcher(ids, batch_size, seq_len)  # the same limits and messages
        self.ids = ids
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.n_targets = check.n_targets
        chunks_per_row = check.chunks_per_epoch
        per_row = -(-chunks_per_row // BLOCK_CHUNKS)  # blocks each row reads per epoch
        self.block_chunks = -(-chunks_per_row // per_row)
        self.block_len = self.block_chunks * seq_len
        self.n_blocks = -(-self.n_targets // self.block_len)
        self.blocks_per_row = -(-self.n_blocks // batch_size)
        self.chunks_per_epoch = self.blocks_per_row * self.block_chunks
        self._layout: tuple[int, np.ndarray] | None = None

    def layout(self, epoch: int) -> np.ndarray:
        """(B, blocks per row): the blocks each row reads in ``epoch``, -1 for padding."""
        if self._layout is None or self._layout[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            order = np.full(self.batch_size * self.blocks_per_row, -1, dtype=np.int64)
            order[: self.n_blocks] = rng.permutation(self.n_blocks)
            # dealt round-robin: the padding slots are the last block of the last rows
            self._layout = (epoch, order.reshape(self.blocks_per_row, self.batch_size).T.copy())
        return self._layout[1]

    def starts_block(self, index: int) -> bool:
        return index % self.block_chunks == 0

    def chunk(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of chunk ``index`` of ``epoch``: two (B, T) int64."""
        blocks = self.layout(epoch)[:, index // self.block_chunks]  # (B,)
        lo = (index % self.block_chunks) * self.seq_len
        pos = blocks[:, None] * self.block_len + np.arange(lo, lo + self.seq_len)[None, :]  # (B, T)
        valid = (blocks[:, None] >= 0) & (pos < self.n_targets)
        return _gather(self.ids, pos, valid)


def make_batcher(ids: np.ndarray, batch_size: int, seq_len: int, *, shuffle: bool,
                 seed: int) -> "StreamBatcher | BlockBatcher":
    """The batcher of a run: shuffled blocks, or (``shuffle=False``) each row
    one stretch of the text in order."""
    if shuffle:
        return BlockBatcher(ids, batch_size, seq_len, seed)
    return StreamBatcher(ids, batch_size, seq_len)
