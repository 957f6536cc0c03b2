"""Real file-system faults for tests: a small tmpfs (a disk that fills up), a
read-only mount. Mounting needs root (CI runs as root); where it is not
allowed the test is skipped with the reason, never faked with a mock."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "2m", read_only: bool = False) -> Iterator[Path]:
    """Mount a fresh tmpfs of ``size`` at ``where`` for the block; unmount after."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0755" + (",ro" if read_only else "")
    try:
        r = _run("mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where))
    except FileNotFoundError:
        pytest.skip("no mount command on this machine: cannot make a real small or read-only disk")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()[:200]}")
    try:
        yield where
    finally:
        if _run("umount", str(where)).returncode != 0:
            _run("umount", "-l", str(where))  # something still holds a file: detach lazily


def remount_read_only(where: Path) -> None:
    r = _run("mount", "-o", "remount,ro", str(where))
    if r.returncode != 0:
        pytest.skip(f"cannot remount {where} read-only: {r.stderr.strip()[:200]}")


def free_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


def fill(where: Path, leave: int = 0, name: str = "filler.bin") -> Path:
    """Fill the file system holding ``where`` until ``leave`` bytes are free
    (0: completely full). Returns the filler file (delete it to free space)."""
    filler = where / name
    chunk = b"\0" * 65536
    with open(filler, "ab", buffering=0) as f:  # unbuffered: nothing left to flush at close
        while True:
            room = free_bytes(where) - leave
            if room <= 0:
                break
            try:
                f.write(chunk[: min(len(chunk), room)])
            except OSError:  # ENOSPC: full
                break
    return filler
