"""Reading a corpus: files and folders to one normalised text.

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
"""

from __future__ import annotations

import codecs
import hashlib
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import DataError, safe_display
from ..safe_files import RUN_MARKER, file_kind

BINARY_SNIFF_BYTES = 8192
CHARNN_FILE_PREFIX = ".charnn"  # charnn's own files (lock, marker, temp files)

Progress = Callable[[str], None]


def show_path(path: object) -> str:
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
        raise DataError(f"{show_path(source)} is not {encoding} text ({_decode_problem(e, raw)}); {hint}") from None


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


def count_text(n: float) -> str:
    """41_000_000 -> '41M', 4_100_000 -> '4.1M', 1204 -> '1,204'."""
    for unit, size in (("G", 1e9), ("M", 1e6)):
        if n >= size:
            v = n / size
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return f"{int(n):,}"


class Status:
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

    def __init__(self, encoding: str, exclude: Iterable[str | os.PathLike], status: Status,
                 encoding_hint: str = ENCODING_HINT):
        self.encoding = encoding
        self.encoding_hint = encoding_hint
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
        self.warnings.append(warning or f"skipped {show_path(path)}: {reason}")

    def add(self, path: str, text: str) -> None:
        self.pieces.append(text)
        self.files.append((path, len(text)))

    # -- a path named by the user: never skipped quietly -----------------
    def named(self, path: Path) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):
                raise DataError(f"corpus {show_path(path)} is a broken symbolic link (its target is missing); "
                                "check the path") from None
            raise DataError(f"corpus {show_path(path)} does not exist; check the path") from None
        except OSError as e:
            raise DataError(f"cannot read {show_path(path)}: {e.strerror or e}") from None
        try:
            real = os.path.realpath(path)
        except OSError as e:  # a link into a place this process cannot read
            raise DataError(f"cannot resolve {show_path(path)}: {e.strerror or e}") from None
        if real in self.excluded:
            raise DataError(f"{show_path(path)} is where charnn writes this run (its output folder or the data "
                            "cache), so it cannot be read as the corpus; pass your text, or another --out")
        if stat.S_ISDIR(st.st_mode):
            self.folder(path)
        elif stat.S_ISREG(st.st_mode):
            if path.name.startswith(CHARNN_FILE_PREFIX):
                raise DataError(f"{show_path(path)} is one of charnn's own files, not text; pass your text files")
            self.named_file(path)
        else:
            raise DataError(f"{show_path(path)} is {file_kind(st.st_mode)}, not a regular file; pass a text file")

    def named_file(self, path: Path) -> None:
        try:
            raw = _read_regular(path)
        except _Unreadable as e:
            raise DataError(f"cannot read {show_path(path)}: {e.reason}") from None
        if _sniff_binary(raw[:BINARY_SNIFF_BYTES], self.encoding):
            reason = _binary_reason(raw[:4])
            if reason.endswith("not text"):
                raise DataError(f"{show_path(path)} looks like a binary file, not text; pass a text file")
            raise DataError(f"{show_path(path)} {reason}")
        self.add(str(path), normalize_newlines(decode_bytes(raw, str(path), self.encoding, self.encoding_hint)))

    # -- a folder: what cannot be read is skipped, with the reason -------
    def folder(self, root: Path) -> None:
        try:
            names = set(os.listdir(root))
        except OSError as e:
            raise DataError(f"cannot read folder {show_path(root)}: {e.strerror or e}") from None
        if _is_run_folder(names):
            raise DataError(f"{show_path(root)} is a charnn run folder (checkpoints and logs), not text; "
                            "pass the folder or files of your text")
        skipped_before = len(self.skipped)
        # An exclude path around the folder (`charnn train books/ --out .`) holds
        # charnn's files beside it, not in it: only those inside it matter.
        try:
            real_root = os.path.realpath(root)
        except OSError as e:
            raise DataError(f"cannot resolve folder {show_path(root)}: {e.strerror or e}") from None
        self.active = [ex for ex in self.excluded if not _within(real_root, ex)]
        found = self.walk(root)
        total = sum(size for _, _, size in found)
        if len(found) >= READ_STATUS_FILES or total >= READ_STATUS_BYTES:
            self.status.say(f"reading {len(found):,} files ({count_text(total)}B)")
        read = 0
        for i, (_, f, _) in enumerate(found):
            self.status.tick(lambda i=i: f"reading files: {i:,} of {len(found):,}")
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
            raise DataError(f"cannot read folder {show_path(root)}: {e.strerror or e}") from None
        seen_dirs = {(root_st.st_dev, root_st.st_ino)}
        seen_files: dict[tuple[int, int], Path] = {}
        found: list[tuple[str, Path, int]] = []
        stack = [(root, os.path.realpath(root), "")]
        while stack:
            self.status.tick(lambda: f"scanning {show_path(root)}: {len(found):,} files so far")
            folder, real_folder, rel = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                self.skip(f"{folder}/", f"cannot list it: {e.strerror or e}")
                continue
            if rel and _is_run_folder({e.name for e in entries}):
                self.skip(f"{folder}/", "a charnn run folder",
                          warning=f"skipping {show_path(folder)}/: a charnn run folder")
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
                        self.skip(str(path), f"the same file as {show_path(seen_files[key])}")
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
            raise DataError(f"folder {show_path(root)} holds no text files; point charnn at your text")
        listed = "; ".join(f"{show_path(p)}: {r}" for p, r in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        hint = "point charnn at your text"
        if any(r.startswith("not ") and "text (" in r for _, r in skipped):
            hint = f"if the files are in another encoding, {self.encoding_hint}"
        raise DataError(f"folder {show_path(root)} holds no text files charnn can read (skipped {listed}{more}); {hint}")


def directory_files(root: Path, skip_dir: Callable[[str], bool] | None = None) -> list[Path]:
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
                exclude: Iterable[str | os.PathLike] = (), progress: Progress | None = None,
                encoding_hint: str = ENCODING_HINT) -> Corpus:
    """Read files and folders (their text files, recursively, in sorted order)
    into one normalised text; see the module docstring for what a folder
    contributes and what is skipped. ``exclude``: paths (files or folders,
    existing or not) never read. ``progress`` is called with a short status
    for steps that may take over a second."""
    if not paths:
        raise DataError("no corpus given; pass one or more text files or folders")
    check_encoding(encoding)
    reader = _CorpusReader(encoding, exclude, Status(progress), encoding_hint)
    for p in paths:
        reader.named(Path(p))
    text = _join(reader.pieces)
    if not text:
        raise DataError(f"the corpus ({', '.join(map(show_path, paths))}) is empty; it needs some text")
    if len(text) >= 100_000_000:
        reader.status.say(f"hashing {count_text(len(text))} characters")
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
