"""Corpus reading, encoding, the train/validation split and TBPTT batching.

Text flows one way: files -> normalised text -> integer ids (a compact numpy
array, memory-mapped from a cache for big corpora) -> (B, T) batches.

What a corpus folder contributes
--------------------------------
A folder is walked recursively; its files are read in sorted order of their
paths relative to the folder. Inside a folder:

- hidden entries (names starting with ``.``, so charnn's own ``.charnn*``
  files and ``data/.cache``) are never read;
- a folder holding a ``.charnn-run`` marker (every run folder has one), or the
  ``metrics.jsonl`` and ``*.pt`` files of an older run, is a charnn run folder
  and is skipped with one warning; anything under an ``exclude`` path (the
  trainer passes its output folder and the data cache) is left out silently;
- only regular files are read: FIFOs, sockets and devices are skipped with a
  warning and never opened for reading (a FIFO would block forever);
- symbolic links are followed to regular files and folders; a folder or file
  reached a second time (a link cycle, two links to one file) is skipped;
- the per-file decoding rule: each file is decoded strictly with the one
  ``encoding`` given (no guessing). A file that looks binary (NUL bytes or
  many control bytes in its first 8 KB, except for UTF-16/32 encodings) or
  that does not decode is skipped with a warning naming it and the reason
  ("not UTF-8 text (invalid byte 0xe9 at offset 120)"). If a folder yields no
  text at all, that is an error saying why its files were skipped (the
  first five reasons, and how many more).

A file or folder named explicitly is never skipped quietly: a named file that
is binary, does not decode, is not a regular file (a FIFO, a device) or is one
of charnn's ``.charnn*`` files, and a named folder that is a run folder or an
``exclude`` path itself, is an error saying so. (A named file or folder inside
an ``exclude`` folder is read: ``charnn train notes.txt --out .`` works.)

The encoded-corpus cache
------------------------
``encode_corpus`` keeps the ids of a corpus as a memory-mapped ``.npy`` under
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

import codecs
import hashlib
import os
import stat
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .errors import DataError, safe_display
from .tokenizer import CharTokenizer, dtype_for

BINARY_SNIFF_BYTES = 8192
IGNORE_INDEX = -100  # target value that the loss skips (padding)
RUN_MARKER = ".charnn-run"  # present in every charnn run folder
CHARNN_FILE_PREFIX = ".charnn"  # charnn's own files (lock, marker, temp files)

Progress = Callable[[str], None]


def _show(path: object) -> str:
    """A path as it goes into a message: control characters (an ANSI escape in
    a file name) made visible, never sent raw to a terminal. Only messages use
    it; ``Corpus.files`` and ``Corpus.skipped`` keep the real paths."""
    return safe_display(str(path), limit=None)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

@dataclass
class Corpus:
    text: str
    files: list[tuple[str, int]]  # (path, characters) of each file read, in order
    sha256: str  # of the normalised text, UTF-8 encoded
    name: str  # short name for the default output folder
    warnings: list[str] = field(default_factory=list)  # skipped files etc.; the CLI shows them
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), for --verbose


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


def _codec_name(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        return encoding


def _sniff_binary(head: bytes, encoding: str) -> bool:
    """``looks_binary``, except for UTF-16/32 text, where NUL bytes are normal
    (strict decoding still rejects a file that is not such text)."""
    if _codec_name(encoding).startswith(("utf-16", "utf-32")):
        return False
    return looks_binary(head)


ENCODING_HINT = "pass --encoding latin-1 (or the file's real encoding) or convert it to UTF-8"


def check_encoding(encoding: str) -> str:
    """``encoding`` if Python knows it as a text encoding, else a DataError
    naming it (never a LookupError)."""
    try:
        info = codecs.lookup(encoding)
    except (LookupError, TypeError, ValueError):
        raise DataError(f"unknown text encoding {encoding!r}; try utf-8 or latin-1 "
                        "(any Python codec name works, e.g. cp1252, utf-16)") from None
    if not getattr(info, "_is_text_encoding", True):  # hex, base64, rot13, zlib, ...
        raise DataError(f"{encoding!r} is not a text encoding; try utf-8 or latin-1")
    return encoding


def _decode_problem(e: UnicodeError, raw: bytes) -> str:
    if isinstance(e, UnicodeDecodeError):
        bad = raw[e.start : e.start + 1].hex()
        return f"invalid byte 0x{bad} at offset {e.start}"
    return str(e)


def decode_bytes(raw: bytes, source: str, encoding: str = "utf-8", hint: str = ENCODING_HINT) -> str:
    """Strict decoding with an error that names the file and byte offset."""
    check_encoding(encoding)
    try:
        return raw.decode(encoding)
    except UnicodeError as e:
        raise DataError(f"{_show(source)} is not {encoding} text ({_decode_problem(e, raw)}); {hint}") from None


_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _binary_reason(head: bytes) -> str:
    for bom, name in _BOMS:
        if head.startswith(bom):
            return (f"looks like a binary file, but starts with a {name} byte-order mark: "
                    f"if it is {name} text, pass --encoding {name.lower()}")
    return "looks like a binary file, not text"


def _label(encoding: str) -> str:
    name = _codec_name(encoding)
    return name.upper() if name.startswith("utf") else encoding


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for messages: "a FIFO", ..."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


class _Unreadable(Exception):
    """A file that is not a readable regular file; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file. Opened non-blocking and checked with fstat,
    so a FIFO swapped in after the caller's stat still never blocks."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        raise _Unreadable("permission denied") from None
    except OSError as e:
        raise _Unreadable(e.strerror or str(e)) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise _Unreadable(file_kind(mode))
        try:
            return f.read()
        except OSError as e:
            raise _Unreadable(e.strerror or str(e)) from None


def _within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies inside it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_run_folder(names: set[str]) -> bool:
    """A charnn run folder: its marker, or (older runs) a metrics log beside checkpoints."""
    return RUN_MARKER in names or ("metrics.jsonl" in names and any(n.endswith(".pt") for n in names))


def _count(n: float) -> str:
    """41_000_000 -> '41M', 4_100_000 -> '4.1M', 1204 -> '1,204'."""
    for unit, size in (("G", 1e9), ("M", 1e6)):
        if n >= size:
            v = n / size
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return f"{int(n):,}"


class _Status:
    """Calls ``progress`` for steps that may take over a second: at once for
    steps known to be long, otherwise only once a step has run a second."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.start = self.last = time.monotonic()

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
        self.start = self.last = time.monotonic()

    def tick(self, message: Callable[[], str]) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self.start >= 1.0 and now - self.last >= 0.5:
            self.last = now
            self.progress(message())


READ_STATUS_FILES = 200  # announce reading at or above this many files ...
READ_STATUS_BYTES = 16_000_000  # ... or this many bytes


class _CorpusReader:
    """Collects the text of the named paths, and what was skipped and why."""

    def __init__(self, encoding: str, exclude: Iterable[str | os.PathLike], status: _Status):
        self.encoding = encoding
        self.excluded = [os.path.realpath(os.path.abspath(p)) for p in exclude]
        self.active: list[str] = []  # the exclude paths inside the folder being walked
        self.status = status
        self.pieces: list[str] = []
        self.files: list[tuple[str, int]] = []
        self.skipped: list[tuple[str, str]] = []
        self.warnings: list[str] = []

    def is_excluded(self, real: str) -> bool:
        return any(_within(real, ex) for ex in self.active)

    def skip(self, path: str, reason: str, warning: str | None = None) -> None:
        self.skipped.append((path, reason))
        self.warnings.append(warning or f"skipped {_show(path)}: {reason}")

    def add(self, path: str, text: str) -> None:
        self.pieces.append(text)
        self.files.append((path, len(text)))

    # -- a path named by the user: never skipped quietly -----------------
    def named(self, path: Path) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):
                raise DataError(f"corpus {_show(path)} is a broken symbolic link (its target is missing); "
                                "check the path") from None
            raise DataError(f"corpus {_show(path)} does not exist; check the path") from None
        except OSError as e:
            raise DataError(f"cannot read {_show(path)}: {e.strerror or e}") from None
        try:
            real = os.path.realpath(path)
        except OSError as e:  # a link into a place this process cannot read
            raise DataError(f"cannot resolve {_show(path)}: {e.strerror or e}") from None
        if real in self.excluded:
            raise DataError(f"{_show(path)} is where charnn writes this run (its output folder or the data "
                            "cache), so it cannot be read as the corpus; pass your text, or another --out")
        if stat.S_ISDIR(st.st_mode):
            self.folder(path)
        elif stat.S_ISREG(st.st_mode):
            if path.name.startswith(CHARNN_FILE_PREFIX):
                raise DataError(f"{_show(path)} is one of charnn's own files, not text; pass your text files")
            self.named_file(path)
        else:
            raise DataError(f"{_show(path)} is {file_kind(st.st_mode)}, not a regular file; pass a text file")

    def named_file(self, path: Path) -> None:
        try:
            raw = _read_regular(path)
        except _Unreadable as e:
            raise DataError(f"cannot read {_show(path)}: {e.reason}") from None
        if _sniff_binary(raw[:BINARY_SNIFF_BYTES], self.encoding):
            reason = _binary_reason(raw[:4])
            if reason.endswith("not text"):
                raise DataError(f"{_show(path)} looks like a binary file, not text; pass a text file")
            raise DataError(f"{_show(path)} {reason}")
        self.add(str(path), normalize_newlines(decode_bytes(raw, str(path), self.encoding)))

    # -- a folder: what cannot be read is skipped, with the reason -------
    def folder(self, root: Path) -> None:
        try:
            names = set(os.listdir(root))
        except OSError as e:
            raise DataError(f"cannot read folder {_show(root)}: {e.strerror or e}") from None
        if _is_run_folder(names):
            raise DataError(f"{_show(root)} is a charnn run folder (checkpoints and logs), not text; "
                            "pass the folder or files of your text")
        skipped_before = len(self.skipped)
        # An exclude path around the folder (`charnn train books/ --out .`) holds
        # charnn's files beside it, not in it: only those inside it matter.
        try:
            real_root = os.path.realpath(root)
        except OSError as e:
            raise DataError(f"cannot resolve folder {_show(root)}: {e.strerror or e}") from None
        self.active = [ex for ex in self.excluded if not _within(real_root, ex)]
        found = self.walk(root)
        total = sum(size for _, _, size in found)
        if len(found) >= READ_STATUS_FILES or total >= READ_STATUS_BYTES:
            self.status.say(f"reading {len(found):,} files ({_count(total)}B)")
        read = 0
        for i, (_, f, _) in enumerate(found):
            self.status.tick(lambda: f"reading files: {i:,} of {len(found):,}")
            text = self.folder_file(f)
            if text is not None:
                self.add(str(f), text)
                read += 1
        if read == 0:
            self.nothing_read(root, self.skipped[skipped_before:])

    def folder_file(self, f: Path) -> str | None:
        try:
            raw = _read_regular(f)
        except _Unreadable as e:
            self.skip(str(f), e.reason)
            return None
        if _sniff_binary(raw[:BINARY_SNIFF_BYTES], self.encoding):
            self.skip(str(f), _binary_reason(raw[:4]))
            return None
        try:
            return normalize_newlines(raw.decode(self.encoding))
        except UnicodeError as e:
            self.skip(str(f), f"not {_label(self.encoding)} text ({_decode_problem(e, raw)})")
            return None

    def walk(self, root: Path) -> list[tuple[str, Path, int]]:
        """(relative path, path, size) of the regular files under ``root``,
        sorted by relative path; skips are recorded on the way."""
        try:
            root_st = os.stat(root)
        except OSError as e:  # it changed since it was named
            raise DataError(f"cannot read folder {_show(root)}: {e.strerror or e}") from None
        seen_dirs = {(root_st.st_dev, root_st.st_ino)}
        seen_files: dict[tuple[int, int], Path] = {}
        found: list[tuple[str, Path, int]] = []
        stack = [(root, os.path.realpath(root), "")]
        while stack:
            self.status.tick(lambda: f"scanning {_show(root)}: {len(found):,} files so far")
            folder, real_folder, rel = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                self.skip(f"{folder}/", f"cannot list it: {e.strerror or e}")
                continue
            if rel and _is_run_folder({e.name for e in entries}):
                self.skip(f"{folder}/", "a charnn run folder",
                          warning=f"skipping {_show(folder)}/: a charnn run folder")
                continue
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path, child_rel = folder / entry.name, f"{rel}/{entry.name}" if rel else entry.name
                try:
                    link = entry.is_symlink()
                    real = os.path.realpath(path) if link else os.path.join(real_folder, entry.name)
                except OSError as e:  # a link into a place this process cannot read (EACCES), ...
                    self.skip(str(path), f"cannot follow the symbolic link: {e.strerror or e}")
                    continue
                if self.is_excluded(real):
                    continue
                try:
                    st = os.stat(path)  # follows links
                except FileNotFoundError:
                    if link:
                        self.skip(str(path), "a broken symbolic link")
                    continue  # otherwise it vanished while we looked
                except OSError as e:
                    self.skip(str(path), e.strerror or str(e))  # a link loop, permissions
                    continue
                key = (st.st_dev, st.st_ino)
                if stat.S_ISDIR(st.st_mode):
                    if key in seen_dirs:
                        self.skip(f"{path}/", "a symbolic link to a folder already read")
                        continue
                    seen_dirs.add(key)
                    subfolders.append((path, real, child_rel))
                elif stat.S_ISREG(st.st_mode):
                    if key in seen_files:
                        self.skip(str(path), f"the same file as {_show(seen_files[key])}")
                        continue
                    seen_files[key] = path
                    found.append((child_rel, path, st.st_size))
                else:
                    self.skip(str(path), file_kind(st.st_mode))
            stack.extend(reversed(subfolders))
        found.sort(key=lambda item: item[0])
        return found

    def nothing_read(self, root: Path, skipped: list[tuple[str, str]]) -> None:
        if not skipped:
            raise DataError(f"folder {_show(root)} holds no text files; point charnn at your text")
        listed = "; ".join(f"{_show(p)}: {r}" for p, r in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        hint = "point charnn at your text"
        if any(r.startswith("not ") and "text (" in r for _, r in skipped):
            hint = f"if the files are in another encoding, {ENCODING_HINT}"
        raise DataError(f"folder {_show(root)} holds no text files charnn can read (skipped {listed}{more}); {hint}")


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
    try:
        name = first.stem if first.is_file() else first.resolve().name
    except OSError:  # unresolvable (a link into an unreadable place): reading it says why
        name = first.stem
    return name or "corpus"


def read_corpus(paths: Sequence[str | os.PathLike], encoding: str = "utf-8", *,
                exclude: Iterable[str | os.PathLike] = (), progress: Progress | None = None) -> Corpus:
    """Read files and folders (their text files, recursively, in sorted order)
    into one normalised text; see the module docstring for what a folder
    contributes and what is skipped. ``exclude``: paths (files or folders,
    existing or not) never read. ``progress`` is called with a short status
    for steps that may take over a second."""
    if not paths:
        raise DataError("no corpus given; pass one or more text files or folders")
    check_encoding(encoding)
    reader = _CorpusReader(encoding, exclude, _Status(progress))
    for p in paths:
        reader.named(Path(p))
    text = _join(reader.pieces)
    if not text:
        raise DataError(f"the corpus ({', '.join(map(_show, paths))}) is empty; it needs some text")
    if len(text) >= 100_000_000:
        reader.status.say(f"hashing {_count(len(text))} characters")
    sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return Corpus(text=text, files=reader.files, sha256=sha, name=corpus_name(paths),
                  warnings=reader.warnings, skipped=reader.skipped)


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
            where = (f"CHARNN_DATA_DIR={_show(env)} is {what}, not a folder" if p == folder else
                     f"CHARNN_DATA_DIR={_show(env)} cannot be a folder: {_show(p)} is {what}, not a folder")
            raise DataError(f"{where}; set CHARNN_DATA_DIR to a folder (it is created if missing) "
                            "or unset it")
        raise DataError(f"the data folder {_show(folder)} cannot be created: {_show(p)} is {what}, "
                        "not a folder; remove it or set CHARNN_DATA_DIR to a folder")


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
        raise DataError(f"could not find this Python's standard library source under {_show(root)}; "
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
        raise DataError(f"cannot write {_show(target)}: {e.strerror or e}; set CHARNN_DATA_DIR "
                        "to a writable folder") from None


# ---------------------------------------------------------------------------
# Encoding (with a memory-mapped cache) and splitting
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
    and read back memory-mapped; an entry that does not match is rebuilt, and
    the cache stays within its bounds (see the module docstring)."""
    status = _Status(progress)

    def encode() -> np.ndarray:
        if len(corpus.text) >= ENCODE_STATUS_CHARS:
            status.say(f"encoding {_count(len(corpus.text))} characters")
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
        _atomic_write(path, lambda f: np.save(f, ids), suffix=".npy")
        _prune_cache(folder, keep=path)
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return ids  # a read-only or full disk (or a concurrent prune) only costs the cache


def _cache_lookup(folder: Path, key: str, text: str, tokenizer: CharTokenizer) -> np.ndarray | None:
    """A verified entry for ``key``, memory-mapped, its use recorded in its
    mtime; entries that fail verification are deleted."""
    try:
        candidates = sorted(folder.glob(f"{key}-*.npy"))
    except OSError:
        return None
    for path in candidates:
        ids = _verified_entry(path, text, tokenizer)
        if ids is None:
            try:
                path.unlink()
            except OSError:
                pass
            continue
        try:
            os.utime(path)  # least recently used goes first when pruning
        except OSError:
            pass
        return ids
    return None


def _verified_entry(path: Path, text: str, tokenizer: CharTokenizer) -> np.ndarray | None:
    """The entry's ids if they can be trusted to be ``text`` encoded by
    ``tokenizer``: right dtype and length, checksum as in the name, every id in
    the vocabulary, equal to the text at evenly spaced positions."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
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


def _prune_cache(folder: Path, keep: Path) -> None:
    """Delete the least recently used entries beyond the bounds (``keep`` always
    stays) and temp files that killed writers left behind."""
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
        if entry.name.startswith(".charnn-tmp-"):
            if now - st.st_mtime > CACHE_STALE_TMP_S:
                _unlink_quietly(Path(entry.path))
        elif entry.name.endswith(".npy"):
            newest = entry.name == keep.name
            entries.append((newest, st.st_mtime_ns, st.st_size, Path(entry.path)))
    entries.sort(key=lambda e: (e[0], e[1]), reverse=True)  # kept entry, then newest first
    count = total = 0
    for i, (newest, _, size, path) in enumerate(entries):
        if not newest and (count + 1 > CACHE_MAX_ENTRIES or total + size > CACHE_MAX_BYTES):
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
