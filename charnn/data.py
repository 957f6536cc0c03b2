"""Corpus reading, encoding, the train/validation split and TBPTT batching.

Text flows one way: files -> normalised text -> integer ids (a compact numpy
array, memory-mapped from a cache for big corpora) -> (B, T) batches.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .errors import DataError
from .tokenizer import CharTokenizer

BINARY_SNIFF_BYTES = 8192
IGNORE_INDEX = -100  # target value that the loss skips (padding)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

@dataclass
class Corpus:
    text: str
    files: list[str]  # the files read, in order
    sha256: str  # of the normalised text, UTF-8 encoded
    name: str  # short name for the default output folder
    warnings: list[str] = field(default_factory=list)  # skipped files etc.; the CLI shows them


def normalize_newlines(text: str) -> str:
    """Drop a leading byte-order mark; CRLF and lone CR become LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def looks_binary(head: bytes) -> bool:
    """NUL bytes, or many control bytes, in the first few KB."""
    if not head:
        return False
    if b"\0" in head:
        return True
    controls = sum(1 for b in head if b < 9 or 13 < b < 32)
    return controls / len(head) > 0.1


def _sniff_binary(head: bytes, encoding: str) -> bool:
    """``looks_binary``, except for UTF-16/32 text, where NUL bytes are normal
    (strict decoding still rejects a file that is not such text)."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        name = encoding
    if name.startswith(("utf-16", "utf-32")):
        return False
    return looks_binary(head)


ENCODING_HINT = "pass --encoding latin-1 (or the file's real encoding) or convert it to UTF-8"


def decode_bytes(raw: bytes, source: str, encoding: str = "utf-8", hint: str = ENCODING_HINT) -> str:
    """Strict decoding with an error that names the file and byte offset."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1].hex()
        raise DataError(
            f"{source} is not {encoding} text (invalid byte 0x{bad} at offset {e.start}); {hint}"
        ) from None
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r}; try utf-8 or latin-1") from None


def _read_file(path: Path, encoding: str) -> str:
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_bytes(raw, str(path), encoding)


def _directory_files(root: Path, skip_dir: Callable[[str], bool] | None = None) -> list[Path]:
    """Regular files under ``root``, recursively, sorted; hidden entries skipped,
    and folders whose name ``skip_dir`` rejects are not even walked."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and not (skip_dir and skip_dir(d)))
        for name in sorted(filenames):
            if not name.startswith("."):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def corpus_name(paths: Sequence[str | os.PathLike]) -> str:
    first = Path(paths[0])
    name = first.stem if first.is_file() else first.resolve().name
    return name or "corpus"


def read_corpus(paths: Sequence[str | os.PathLike], encoding: str = "utf-8") -> Corpus:
    """Read files and directories (their text files, recursively, in sorted
    order) into one normalised text. Binary files inside a directory are
    skipped with a warning; a named file that is binary is an error."""
    if not paths:
        raise DataError("no corpus given; pass one or more text files or folders")
    pieces: list[str] = []
    files: list[str] = []
    warnings: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise DataError(f"corpus {path} does not exist; check the path")
        if path.is_dir():
            candidates = _directory_files(path)
            text_found = 0
            for f in candidates:
                try:
                    with open(f, "rb") as fh:
                        head = fh.read(BINARY_SNIFF_BYTES)
                except OSError as e:
                    warnings.append(f"skipped {f}: {e.strerror or e}")
                    continue
                if _sniff_binary(head, encoding):
                    warnings.append(f"skipped binary file {f}")
                    continue
                pieces.append(normalize_newlines(_read_file(f, encoding)))
                files.append(str(f))
                text_found += 1
            if text_found == 0:
                raise DataError(f"folder {path} holds no text files; point charnn at your text")
        elif path.is_file():
            try:
                with open(path, "rb") as fh:
                    head = fh.read(BINARY_SNIFF_BYTES)
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror or e}") from None
            if _sniff_binary(head, encoding):
                raise DataError(f"{path} looks like a binary file, not text; pass a text file")
            pieces.append(normalize_newlines(_read_file(path, encoding)))
            files.append(str(path))
        else:
            raise DataError(f"{path} is neither a file nor a folder")
    text = _join(pieces)
    if not text:
        raise DataError(f"the corpus ({', '.join(map(str, paths))}) is empty; it needs some text")
    sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return Corpus(text=text, files=files, sha256=sha, name=corpus_name(paths), warnings=warnings)


def _join(pieces: list[str]) -> str:
    # Files are joined with a newline between them unless one already ends there.
    out = []
    for piece in pieces:
        if out and not out[-1].endswith("\n") and piece:
            out.append("\n")
        out.append(piece)
    return "".join(out)


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


def _builtin_skip_dir(name: str) -> bool:
    return name in _BUILTIN_SKIP_DIRS or name.startswith("config-")


def builtin_corpus_files() -> list[Path]:
    """The standard-library ``.py`` files, in fixed order, within the cap."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    # Prune while walking: site-packages alone can hold far more files than
    # the standard library (torch), and none of them is wanted.
    for f in _directory_files(root, skip_dir=_builtin_skip_dir):
        if f.suffix != ".py":
            continue
        size = f.stat().st_size
        if size == 0 or size > BUILTIN_MAX_FILE_BYTES or total + size > BUILTIN_CAP_BYTES:
            continue
        chosen.append(f)
        total += size
    return chosen


def builtin_corpus_path() -> Path:
    """Assemble (once) and return the built-in corpus file under ``data/``."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = data_dir() / f"{BUILTIN_NAME}-{version}.txt"
    if target.is_file() and target.stat().st_size > 0:
        return target
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for f in builtin_corpus_files():
        try:
            text = normalize_newlines(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(f"# ===== {f.relative_to(root).as_posix()} =====\n{text.rstrip()}\n\n")
    if not parts:
        raise DataError(f"could not find this Python's standard library source under {root}; "
                        "pass a corpus file instead")
    _atomic_write_text(target, "".join(parts))
    return target


def _atomic_write(target: Path, write, suffix: str = "") -> None:
    """Write through ``write(binary_file)`` to a temp file beside ``target``, then
    ``os.replace``: readers never see a half-written file, and a failure leaves
    no temp file behind. Raises OSError."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".charnn-tmp-", suffix=suffix, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary files
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_write_text(target: Path, text: str) -> None:
    try:
        _atomic_write(target, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        raise DataError(f"cannot write {target}: {e.strerror or e}; set CHARNN_DATA_DIR "
                        "to a writable folder") from None


# ---------------------------------------------------------------------------
# Encoding (with a memory-mapped cache) and splitting
# ---------------------------------------------------------------------------

def encode_corpus(corpus: Corpus, tokenizer: CharTokenizer, cache: bool = True) -> np.ndarray:
    """The corpus as ids. With ``cache``, the array is stored once as a ``.npy``
    under ``data/.cache`` keyed by the text's and the vocabulary's hashes, and
    read back memory-mapped; a changed text gets a new key."""
    if not cache:
        return tokenizer.encode_array(corpus.text)
    vocab_hash = hashlib.sha256("".join(tokenizer.chars).encode("utf-8", "surrogatepass")).hexdigest()
    path = data_dir() / ".cache" / f"{corpus.sha256[:24]}-{vocab_hash[:12]}.npy"
    if path.is_file():
        try:
            ids = np.load(path, mmap_mode="r")
            if ids.shape == (len(corpus.text),):
                return ids
        except (OSError, ValueError):
            pass  # unreadable cache entry: rebuild it
    ids = tokenizer.encode_array(corpus.text)
    try:
        _atomic_write(path, lambda f: np.save(f, ids), suffix=".npy")
        return np.load(path, mmap_mode="r")
    except OSError:
        return ids  # a read-only or full disk only costs the cache


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
# The training text is cut into B contiguous streams, one per batch row, each
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

class StreamBatcher:
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

    def __len__(self) -> int:
        return self.chunks_per_epoch

    def chunk(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of chunk ``index`` of an epoch: two (B, T) int64."""
        lo = index * self.seq_len
        hi = min(lo + self.seq_len, self.stream_len)
        pos = self.starts[:, None] + np.arange(lo, hi)[None, :]  # (B, T)
        valid = pos < self.ends[:, None]
        safe = np.where(valid, pos, 0)
        x = torch.from_numpy(np.asarray(self.ids[safe], dtype=np.int64))
        y = torch.from_numpy(np.asarray(self.ids[safe + 1], dtype=np.int64))
        if not valid.all():
            y[torch.from_numpy(~valid)] = IGNORE_INDEX
        return x, y

    def epoch(self, start: int = 0) -> Iterable[tuple[int, torch.Tensor, torch.Tensor]]:
        for i in range(start, self.chunks_per_epoch):
            x, y = self.chunk(i)
            yield i, x, y
