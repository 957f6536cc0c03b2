"""The corpus suite of benchmarks/fit.py: which texts, where they come from,
their licences, and how each is assembled -- once, offline, deterministically.

Every text comes from a file already on this machine (the project's shared
data, this Python's standard library, Debian packages); nothing is downloaded
when the suite runs. Each corpus is written to ``<bench dir>/<name>.txt``
(``$CHARNN_BENCH_DIR``, default ``benchmarks/corpora/``) in the form charnn
reads unchanged -- UTF-8 without a byte-order mark, LF newlines, ending in a
newline -- so charnn's corpus hash of the file is the sha256 recorded here.
Beside it, ``<name>.json`` records sha256, characters and vocabulary size.

    python benchmarks/fit.py corpora     # build them all, print the table
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parents[1] / "shared" / "data"  # the project's shared/ beside the checkout
FORTUNES = Path("/usr/share/games/fortunes")
PY_DOC_SOURCES = Path(f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}/html/_sources")
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
LLVM_HEADERS = Path("/usr/include/llvm-14")
SOURCE_CAP_CHARS = 21_000_000  # "source code over 20 MB": the sorted stdlib, cut after this
HOLDOUT_CHARS = 1_000_000  # the held-out KJV slice: whole lines up to this many characters
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class MissingSource(Exception):
    """A corpus's source is not on this machine; the message says how to get it."""


# ---------------------------------------------------------------------------
# Assembly helpers
# ---------------------------------------------------------------------------

def normalise(text: str) -> str:
    """What charnn would read: no byte-order mark, LF newlines; plus a final newline."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def concat_files(root: Path, suffix: str, header: str, cap_chars: int = 0) -> str:
    """Every ``*suffix`` file under ``root`` in sorted relative-path order (the
    folders in SKIP_DIRS left out, files that are not UTF-8 skipped), each under
    ``header.format(path=...)``; with ``cap_chars``, stop once the text is that long."""
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob(f"*{suffix}")
                   if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts))
    parts, total = [], 0
    for rel, path in files:
        try:
            text = normalise(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        piece = f"{header.format(path=rel)}\n{text.rstrip()}\n\n"
        parts.append(piece)
        total += len(piece)
        if cap_chars and total >= cap_chars:
            break
    return "".join(parts)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def clean_fortunes(text: str) -> str:
    """A fortune file as plain text: colour escapes removed, each ``%``
    separator line turned into a blank line between entries."""
    lines = [ANSI.sub("", line).rstrip() for line in normalise(text).split("\n")]
    lines = ["" if line == "%" else line for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def kjv_prose(text: str, limit: int) -> str:
    """The ``bible`` program's output as prose: verse numbers dropped, chapter
    headings kept, whole lines up to ``limit`` characters."""
    lines = [re.sub(r"^\s*\d+ ", "", line).rstrip() for line in normalise(text).split("\n")]
    out, total = [], 0
    for line in "\n".join(lines).strip("\n").split("\n"):
        if total + len(line) + 1 > limit:
            break
        out.append(line)
        total += len(line) + 1
    return "\n".join(out) + "\n"


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise MissingSource(f"{path} is missing: install the Debian package {package} "
                            f"(apt-get install -y {package})")
    return path


# ---------------------------------------------------------------------------
# The sources
# ---------------------------------------------------------------------------

def _war_and_peace() -> str:
    path = SHARED_DATA / "war-and-peace.txt"
    if not path.is_file():
        raise MissingSource(f"{path} is missing: it is the project's shared data (shared/data/ "
                            "beside the checkout)")
    return normalise(path.read_bytes().decode("utf-8"))


def _python_source() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return concat_files(root, ".py", "# ===== {path} =====", cap_chars=SOURCE_CAP_CHARS)


def _python_docs() -> str:
    root = _need(PY_DOC_SOURCES, f"python{sys.version_info.major}.{sys.version_info.minor}-doc")
    return concat_files(root, ".txt", ".. ===== {path} =====")


def _tang_song() -> str:
    texts = [_need(FORTUNES / name, "fortunes-zh").read_bytes().decode("utf-8")
             for name in ("tang300", "song100")]
    return "\n".join(clean_fortunes(t) for t in texts)


def _jargon() -> str:
    return normalise(gzip.decompress(_need(JARGON, "jargon-text").read_bytes()).decode("utf-8"))


def _llvm_headers() -> str:
    return concat_files(_need(LLVM_HEADERS, "llvm-14-dev"), ".h", "// ===== {path} =====")


def _kjv() -> str:
    if shutil.which("bible") is None or not Path("/usr/lib/bible.data").exists():
        raise MissingSource("the bible program or its KJV text is missing: install the Debian "
                            "packages bible-kjv and bible-kjv-text (apt-get install -y bible-kjv "
                            "bible-kjv-text)")
    # -l0: one verse per line, unwrapped; the data is compressed, so the program must export it
    out = subprocess.run(["bible", "-l0", "gen1:1-rev22:21"], capture_output=True, check=True,
                         stdin=subprocess.DEVNULL).stdout
    return kjv_prose(out.decode("utf-8"), HOLDOUT_CHARS)


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    kind: str
    source: str  # where the text comes from and how it is cut
    package: str  # what provides it: a Debian package, or the project / Python itself
    licence: str
    assemble: Callable[[], str]
    debs: tuple[str, ...] = ()  # Debian packages it needs (their versions are recorded)
    role: str = "suite"  # "suite" (the grid runs on it) or "holdout" (never used to choose)
    long_runs: bool = False  # also in the 20-minute phase


_PY = f"{sys.version_info.major}.{sys.version_info.minor}"
CORPORA = [
    CorpusSpec("tang-song", "Chinese classical poetry (non-Latin script, tiny)",
               "300 Tang poems + 100 Song ci, fortune files tang300 and song100; colour escapes "
               "removed, '%' separators become blank lines", "Debian fortunes-zh",
               "GPL-3.0+ (the package; the poems themselves are centuries old)", _tang_song,
               debs=("fortunes-zh",)),
    CorpusSpec("jargon", "English glossary (hacker dictionary, 1.7 MB)",
               "The Jargon File 4.4.7, jargon.txt.gz as packaged", "Debian jargon-text",
               "public domain", _jargon, debs=("jargon-text",)),
    CorpusSpec("war-and-peace", "English prose (novel, 3.2 MB)",
               "Tolstoy, War and Peace (English translation), shared/data/war-and-peace.txt; "
               "BOM dropped, CRLF -> LF", "the project's shared data", "public domain",
               _war_and_peace, long_runs=True),
    CorpusSpec("python-docs", "technical English in reStructuredText (11 MB)",
               f"Python {_PY} documentation sources, html/_sources/**/*.txt in sorted path order, "
               "a '.. ===== path =====' line before each", f"Debian python{_PY}-doc",
               "PSF License 2.0", _python_docs, debs=(f"python{_PY}-doc",)),
    CorpusSpec("python-src", "source code (Python, 21 MB)",
               f"this Python's ({platform.python_version()}) standard library .py files, tests "
               "included, in sorted path order, a '# ===== path =====' line before each, cut after "
               "21,000,000 characters", "the running Python's own files", "PSF License 2.0",
               _python_source, long_runs=True),
    CorpusSpec("kjv-1m", "English prose (scripture, 1 MB)",
               "King James Bible, Genesis on, exported with `bible -l0 gen1:1-rev22:21`, verse "
               "numbers dropped, first 1,000,000 characters (whole lines)",
               "Debian bible-kjv + bible-kjv-text", "public domain (1611 text)", _kjv,
               debs=("bible-kjv", "bible-kjv-text"), role="holdout"),
    CorpusSpec("llvm-headers", "source code (C++ headers, 15 MB)",
               "LLVM 14's C++ headers, /usr/include/llvm-14/**/*.h in sorted path order, a "
               "'// ===== path =====' line before each", "Debian llvm-14-dev",
               "Apache-2.0 WITH LLVM-exception", _llvm_headers, debs=("llvm-14-dev",), role="holdout"),
]
BY_NAME = {c.name: c for c in CORPORA}


# ---------------------------------------------------------------------------
# The cache folder
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CorpusFile:
    spec: CorpusSpec
    path: Path
    sha256: str
    chars: int
    vocab: int
    provided_by: str = ""  # the packages and versions it was built from

    @property
    def val_chars(self) -> int:
        from bigram import VAL_FRACTION, val_count
        return val_count(self.chars, VAL_FRACTION)


def bench_dir() -> Path:
    return Path(os.environ.get("CHARNN_BENCH_DIR") or HERE / "corpora")


def describe(text: str) -> dict:
    return {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text),
            "vocab": len(set(text))}


def write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(spec: CorpusSpec, folder: Path | None = None) -> CorpusFile:
    """The corpus file, assembled on first use. A file whose text no longer
    matches its recorded sha256 is an error (delete both files to rebuild)."""
    folder = folder or bench_dir()
    path, meta_path = folder / f"{spec.name}.txt", folder / f"{spec.name}.json"
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if hashlib.sha256(path.read_bytes()).hexdigest() != meta["sha256"]:
            raise MissingSource(f"{path} changed since it was built; delete it and {meta_path.name} "
                                "to rebuild it")
    else:
        text = normalise(spec.assemble())
        meta = {"name": spec.name, **describe(text), "provided_by": provided_by(spec)}
        write_atomic(path, text.encode("utf-8"))
        write_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return CorpusFile(spec, path, meta["sha256"], meta["chars"], meta["vocab"],
                      meta.get("provided_by", spec.package))


def provided_by(spec: CorpusSpec) -> str:
    """``spec.package`` with the installed version of each Debian package."""
    if not spec.debs:
        return spec.package
    versions = []
    for deb in spec.debs:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", deb], capture_output=True, text=True)
        versions.append(f"{deb} {out.stdout.strip() or '(version unknown)'}")
    return "Debian " + ", ".join(versions)


def markdown_table(files: list[CorpusFile]) -> str:
    rows = ["| name | role | kind | characters | vocabulary | sha256 | source | provided by | licence |",
            "| --- | --- | --- | ---: | ---: | --- | --- | --- | --- |"]
    for f in files:
        s = f.spec
        role = s.role + (", 20m phase" if s.long_runs else "")
        rows.append(f"| {s.name} | {role} | {s.kind} | {f.chars:,} | {f.vocab:,} | {f.sha256[:12]} "
                    f"| {s.source} | {f.provided_by} | {s.licence} |")
    return "\n".join(rows)
