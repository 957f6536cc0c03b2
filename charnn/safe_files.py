"""Writing charnn's own files safely, wherever they are.

- **atomic writes** (:func:`write_atomic`, used by the run folder and by
  :func:`charnn.storage.checkpoint.save`; :func:`replace_atomically` under it,
  used by the corpus cache): a temp file in the same folder, fsync,
  ``os.replace``, fsync of the folder. The bytes are written with plain file
  I/O, so a full disk is a real ``OSError``, turned into a message that says
  so (with the sizes), as are a quota, a file size limit, a read-only file
  system and a missing permission;
- **own files** (the metrics log, the run marker, the lock) are opened only
  when they are regular files: found with ``lstat``, opened non-blocking and
  without following links, so a FIFO, a device or a symbolic link there is a
  :class:`RunFolderError` naming it and never a hang;
- **strict JSON lines**: NaN and infinities become ``null``.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import CharnnError, CheckpointError, RunFolderError, format_bytes

TMP_PREFIX = ".charnn-tmp-"  # temp files end in .tmp, never .pt, so no one mistakes them
TMP_SUFFIX = ".tmp"
RUN_MARKER = ".charnn-run"  # present in every charnn run folder


# ---------------------------------------------------------------------------
# Errors written for the user
# ---------------------------------------------------------------------------

def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _no_free_inodes(folder: Path) -> bool:
    """Whether the file system holding ``folder`` has run out of inodes (file
    entries). File systems without a fixed inode count (btrfs) report 0 total."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_files > 0 and st.f_favail == 0


def os_error_reason(e: OSError, folder: Path, needed: int | None = None) -> tuple[str, str]:
    """What an OSError means for someone writing into ``folder``, and what to do."""
    free = _free_bytes(folder)
    if e.errno == errno.ENOSPC and _no_free_inodes(folder):
        # Bytes may be free while no new file can be created: saying "the disk
        # is full (... 0.9 MB free)" would contradict itself.
        bytes_short = free is not None and (free == 0 or (needed is not None and free < needed))
        also = " and no space left either" if bytes_short else ""
        return (f"the file system has no free inodes left (it holds too many files{also}; "
                "a new file cannot be created whatever its size)",
                "Remove files you do not need from that file system (many small files free the most) "
                "or choose another --out")
    sizes = []
    if needed is not None:
        sizes.append(f"{format_bytes(needed)} needed")
    if free is not None:
        sizes.append(f"{format_bytes(free)} free")
    sizes_text = f"; {', '.join(sizes)}" if sizes else ""
    if e.errno == errno.ENOSPC:
        return (f"the disk is full (no space left on the device{sizes_text})",
                "Free space or choose another --out")
    if e.errno == errno.EDQUOT:
        return (f"the disk quota is exceeded (no space left in your quota{sizes_text})",
                "Free space or choose another --out")
    if e.errno == errno.EFBIG:
        limit = f" ({format_bytes(needed)} needed)" if needed is not None else ""
        return (f"the file is larger than the file size limit of this process{limit}",
                "Raise the limit (ulimit -f unlimited) or train a smaller model")
    if e.errno == errno.EROFS:
        return (f"{folder} is on a read-only file system", "Choose another --out")
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"no permission to write in {folder}",
                "Fix the folder's permissions or choose another --out")
    if e.errno == errno.ENOENT:
        return (f"the folder {folder} does not exist (was it removed?)", "Choose another --out")
    return (e.strerror or str(e), "Check the disk or choose another --out")


def _write_error(path: Path, e: OSError, needed: int | None, existed: bool,
                 error: type[CharnnError]) -> CharnnError:
    reason, todo = os_error_reason(e, path.parent, needed)
    what = "checkpoint" if path.suffix == ".pt" else "file"
    kept = f" The previous {what} there is intact." if existed else ""
    return error(f"could not write {path}: {reason}.{kept} {todo}.")


# ---------------------------------------------------------------------------
# charnn's own files in the folder: regular files only
# ---------------------------------------------------------------------------

def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for messages: "a FIFO", ..."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _not_regular(path: Path, mode: int) -> RunFolderError:
    return RunFolderError(f"{path} is {file_kind(mode)}, not a regular file; remove it "
                          "(charnn keeps its own file there) or choose another --out")


def check_own_file(path: Path) -> bool:
    """Whether charnn's own file ``path`` (metrics log, marker, lock) exists.
    Checked with ``lstat``: anything there but a regular file (a FIFO, whose
    open would block forever, a device, a folder, a symbolic link) is a
    :class:`RunFolderError` naming it, before anything opens it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # the open that follows reports it
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return True


_OPEN_SAFE = os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC


def open_own(path: Path, flags: int) -> int:
    """``os.open`` of charnn's own file ``path``, never blocking: non-blocking
    and not following a link, then checked with ``fstat``, so a FIFO swapped in
    after :func:`check_own_file` is still refused, not waited on. Raises
    :class:`RunFolderError` for a file that is not a regular one, OSError
    otherwise. (O_NONBLOCK does nothing to a regular file's I/O.)"""
    try:
        fd = os.open(path, flags | _OPEN_SAFE, 0o666)
    except OSError:
        # ELOOP (a link), ENXIO (a FIFO without reader, opened for writing), ...
        check_own_file(path)
        raise
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    return fd


def read_own(path: Path) -> bytes | None:
    """The bytes of charnn's own file ``path``, or None if there is none; see
    :func:`open_own`."""
    if not check_own_file(path):
        return None
    try:
        fd = open_own(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------

def serialize(payload: dict[str, Any]) -> bytes:
    """A checkpoint payload as the bytes ``torch.save`` would write."""
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def create_temp(folder: Path) -> tuple[int, Path]:
    """A new temp file in ``folder``, mode 0o666 & ~umask (like ``open()``;
    ``mkstemp`` would make it private)."""
    while True:
        tmp = folder / f"{TMP_PREFIX}{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        return fd, tmp


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)  # raises ENOSPC/EFBIG/...: a short write is followed by the error
        view = view[n:]


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Best effort: some file systems
    cannot fsync a folder; the file itself is already on disk."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` through ``write(file)`` so that readers see the old file
    or the new one, never a mixture: a temp file (``TMP_PREFIX``) in the same
    folder, write, flush, fsync, ``os.replace``, fsync of the folder. On any
    failure (Ctrl-C too) the temp file is removed and the exception goes on
    (an OSError for the disk's faults)."""
    fd, tmp = create_temp(path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_folder(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes, *,
                 error: type[CharnnError] = CheckpointError) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new
    one, never a mixture: a temp file (``TMP_PREFIX``) in the same folder,
    write, flush, fsync, ``os.replace``, fsync of the folder.

    On any failure the temp file is removed, the previous file at ``path`` is
    untouched, and an ``error`` (a :class:`CheckpointError` by default) says
    what happened: disk full (with the sizes), quota, file size limit,
    read-only, permission. The parent folder must exist.
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"cannot write {path}: it is a folder; choose another file name or --out")
    existed = path.exists()
    try:
        replace_atomically(path, lambda f: f.write(data))
    except OSError as e:
        raise _write_error(path, e, len(data), existed, error) from None
    return path


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove the temp files that killed saves left in ``folder``; their names."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX) and not entry.is_dir(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # read-only or not ours; harmless (never taken for a checkpoint)
    return removed


# ---------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------

def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data: NaN and ±inf become None (``null``),
    tensors and numpy scalars become numbers, tuples lists, other objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):  # (bool is an int)
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    for attr in ("item", "tolist"):  # torch / numpy scalars and arrays
        fn = getattr(value, attr, None)
        if callable(fn):
            try:
                return json_safe(fn())
            except (TypeError, ValueError, RuntimeError):
                pass
    return str(value)


def json_line(row: dict[str, Any]) -> str:
    """One strict JSON line (no NaN/Infinity tokens), newline included."""
    return json.dumps(json_safe(row), allow_nan=False, ensure_ascii=False) + "\n"
