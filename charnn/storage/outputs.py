"""Files a command writes besides checkpoints: HTML pages, PNG plots, ONNX models.

A command never writes over one of its own inputs (the checkpoint, the text
files) or over an existing file of another kind than the one it writes
(a text, a checkpoint, anything that is not an HTML page, a PNG or an ONNX
model) unless the
user passes ``--overwrite``. Paths are compared by the file they name
(``os.path.samefile``: device and inode, symlinks followed), so a symlink or
another spelling of an input is caught too. The check runs before the
command's work, the write after it, atomically as checkpoints are written
(:func:`charnn.safe_files.write_atomic`): a reader sees the old file or the
new one. An output path that is itself a symlink is replaced by the new
file; the link's target is left alone.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from ..errors import CharnnError, safe_display
from ..safe_files import write_atomic
from ..text.reading import file_kind

# What a file of each kind starts with (after a byte-order mark and blanks for HTML).
_KINDS = {"html": "an HTML page", "png": "a PNG image", "onnx": "an ONNX model"}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# An ONNX file is a serialized ModelProto, which has no magic number; its
# writers put field 1 (ir_version, a small varint: tag 0x08) first, then
# another of the message's fields. The tags of fields 2-8 (producer name and
# version, domain, model version, doc string, graph, opset import) and 14
# (metadata) are what may follow.
_ONNX_NEXT_TAGS = frozenset(b"\x12\x1a\x22\x28\x32\x3a\x42\x72")


def _is_onnx(head: bytes) -> bool:
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] < 0x80 and head[2] in _ONNX_NEXT_TAGS


def _is_kind(path: Path, kind: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if kind == "png":
        return head.startswith(_PNG_MAGIC)
    if kind == "onnx":
        return _is_onnx(head)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().lower().startswith((b"<!doctype html", b"<html"))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _inside(path: Path, folder: Path) -> bool:
    """``path`` (symlinks resolved) lies somewhere under the folder ``folder``."""
    if not os.path.isdir(folder):
        return False
    return any(_same(parent, folder) for parent in Path(os.path.realpath(path)).parents)


def corpus_inputs(train_config: object) -> list[str]:
    """The files and folders a checkpoint's run was trained on: what ``eval``
    and ``inspect`` read when given no files (its validation split)."""
    paths = train_config.get("corpus") if isinstance(train_config, dict) else None
    return [p for p in paths if isinstance(p, str) and p] if isinstance(paths, list) else []


def check_output(path: Path, kind: str, option: str, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False) -> None:
    """Refuse, before any work, to write ``path`` (given as ``option``) over
    one of ``inputs`` or over an existing file that is not of ``kind``
    ("html", "png" or "onnx"), unless ``overwrite``."""
    shown = safe_display(path)
    try:
        st = os.stat(path)  # follows a symlink: what the link names is what matters
    except FileNotFoundError:
        return
    except OSError as e:
        raise CharnnError(f"cannot write {option} {shown}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CharnnError(f"cannot write {option} {shown}: it is a folder; give a file name such as "
                          f"page.{kind}")
    if not stat.S_ISREG(st.st_mode):
        raise CharnnError(f"cannot write {option} {shown}: it is {file_kind(st.st_mode)}, not a file; "
                          "choose another path")
    if overwrite:
        return
    for given in inputs:
        if _same(path, Path(given)):
            raise CharnnError(f"{option} {shown} is the same file as {safe_display(given)}, which this command reads; "
                              "choose another path (or pass --overwrite to replace it)")
        if _inside(path, Path(given)):
            raise CharnnError(f"{option} {shown} is a file in {safe_display(given)}, a folder this command reads; "
                              "choose a path outside it (or pass --overwrite to replace it)")
    if not _is_kind(path, kind):
        raise CharnnError(f"{option} {shown} exists and is not {_KINDS[kind]}; choose another path "
                          "(or pass --overwrite to replace it)")


def write_output(path: Path, data: bytes | str) -> Path:
    """Write atomically (temp file in the same folder, fsync, ``os.replace``),
    making the folder if needed; a CharnnError on failure, the previous file
    untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharnnError(f"cannot create folder {safe_display(path.parent)}: {e.strerror or e}") from None
    if isinstance(data, str):
        data = data.encode("utf-8")
    with _signals_unwind():
        try:
            return write_atomic(path, data, error=CharnnError)
        except CharnnError as e:  # its advice names the checkpoints' option; pages and plots have their own
            raise CharnnError(str(e).replace("another --out", "another path")) from None


@contextmanager
def _signals_unwind():
    """SIGTERM and SIGHUP end the process by unwinding (exit status 128 + the
    signal, as their default would give), so write_atomic removes its temp
    file; by default they would leave a partly written page beside the output."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    names = ("SIGTERM", "SIGHUP")
    old = {}
    for name in names:
        if hasattr(signal, name):
            sig = getattr(signal, name)
            if signal.getsignal(sig) is signal.SIG_DFL:
                old[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
