"""The run folder: one object owns a training run's output folder.

Everything that touches the folder lives here, so the training loop only asks
it to save and to log:

- **choosing** it (:mod:`charnn.storage.outdir`): a new run never replaces
  another run's files (:func:`choose_out_dir`: the default folder moves on to ``NAME-2/``,
  ``NAME-3/``...; an explicit ``--out`` that holds a run is refused unless
  ``--overwrite``);
- **replacing** an earlier run (``--overwrite``): its files go just before the
  new run's first checkpoint or metrics row, so a run that fails while it sets
  up (a bad text or base, Ctrl-C) leaves the earlier run as it was;
- **owning** it: an exclusive ``flock`` on ``.charnn.lock`` for as long as the
  run is open, so two live processes never write one folder; a lock left by a
  killed process (the kernel released the ``flock``) is taken over and said so;
- **checking** it before any training: it exists, is a folder, is writable;
- **atomic writes** (:func:`charnn.safe_files.write_atomic`, also used by
  :func:`charnn.storage.checkpoint.save`): a temp file in the same folder, fsync,
  ``os.replace``, fsync of the folder; a full disk is a message that says so;
- **cleaning**: temp files left by killed saves go at the next open or save;
  ``step-N.pt`` files rotate by their step *number*;
- **the metrics log** ``metrics.jsonl``: one strict-JSON object per line
  (NaN and infinities become ``null``); on resume, rows after the resumed step
  are dropped so a crash and resume never duplicate steps.

The folder holds, besides checkpoints and the log, two small dotfiles:
``.charnn-run`` (JSON: when the run was created, by which charnn; the corpus
reader skips any folder containing it) and ``.charnn.lock`` (JSON: pid, host
and start time of the process writing the folder). The lock file is *kept*
when the run closes, emptied: removing it would open a race (a process that
opened the old file before the unlink could lock it while another locks a new
one). An empty lock file means the last run ended cleanly; a non-empty one
whose ``flock`` is free was left by a process that died (kill -9, OOM).

charnn's own files there (``metrics.jsonl``, ``.charnn-run``, ``.charnn.lock``)
must be regular files: anything else (a FIFO, whose open would block forever, a
device, a folder, a symbolic link) is a :class:`RunFolderError` naming it
(:mod:`charnn.safe_files` opens them), so charnn never hangs on one.

Files are created with mode ``0o666`` filtered by the process umask, like any
``open()``. Locks are advisory ``flock`` locks: reliable on local file systems;
on network file systems they are only as good as the server's lock support.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import FolderLockedError, FolderTakenError, RunFolderError
# write_atomic, serialize, json_safe, json_line and TMP_PREFIX are also imported from here.
from ..safe_files import (RUN_MARKER, TMP_PREFIX, check_own_file, create_temp, json_line, json_safe,  # noqa: F401
                         open_own, os_error_reason, read_own, remove_stale_temps, serialize, write_all,
                         write_atomic)
# The folder's file names and choosing it, also imported from here.
from .outdir import (CHECKPOINT_NAMES, METRICS_NAME, STEP_FILE, choose_out_dir, folder_holds_run,  # noqa: F401
                     step_file_name, step_files)

LOCK_NAME = ".charnn.lock"

# ---------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


class RunFolder:
    """Owns one run's output folder while it is open (a context manager).

    >>> with RunFolder(out, resuming_at_step=None) as folder:   # doctest: +SKIP
    ...     folder.log({"step": 1, "train_loss": 3.2})
    ...     folder.save(payload, "last.pt")

    ``open()`` raises :class:`RunFolderError` (not a folder, read-only, locked
    by a live process, ...) before anything is written; ``notes`` then lists
    what it did that the user should hear about (a stale lock taken over, temp
    files removed, metrics rows dropped on resume, an earlier run removed by
    ``overwrite``, which the first ``save`` or ``log`` does). ``save`` raises
    :class:`CheckpointError` (:class:`RunFolderError` when an earlier run's
    file cannot be removed); ``log`` never raises for I/O (see there).
    """

    def __init__(self, path: str | os.PathLike, *, resuming_at_step: int | None = None,
                 overwrite: bool = False):
        self.path = Path(path)
        self.resuming_at_step = resuming_at_step
        self.overwrite = overwrite
        self.notes: list[str] = []
        self.log_failures = 0  # metrics rows that could not be written
        self._lock_fd: int | None = None
        self._metrics_fd: int | None = None
        self._log_failing = False
        self._old_run_pending = False  # overwrite: the earlier run's files are still there

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def __enter__(self) -> "RunFolder":
        if not self.is_open:
            self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, open={self.is_open})"

    # -- opening ---------------------------------------------------------------------
    def open(self) -> "RunFolder":
        """Create, lock, check and tidy the folder; see the class docstring."""
        if self.is_open:
            return self
        if self.overwrite and self.resuming_at_step is not None:
            raise RunFolderError("--overwrite starts a new run and cannot be combined with --resume; "
                                 "drop one of them")
        self._created = {"folder": not self.path.exists(), "lock": not (self.path / LOCK_NAME).exists(),
                         "marker": not (self.path / RUN_MARKER).exists()}
        self._existed_above = self._existing_parent()  # folders below it are made here
        self._make()
        self._lock()
        try:
            if self.resuming_at_step is None and not self.overwrite and folder_holds_run(self.path):
                # Checked again under the lock: another new run may have taken
                # the folder since it was chosen.
                raise FolderTakenError(f"{self.path} already holds a training run (another run took it a "
                                       "moment ago); choose another --out, or --overwrite to replace it")
            self._check_writable()
            # The earlier run stays until this one writes (see _replace_old_run).
            self._old_run_pending = self.overwrite
            stale = remove_stale_temps(self.path)
            if stale:
                self.notes.append(f"removed {len(stale)} unfinished temp file(s) left in {self.path} "
                                  "by an interrupted save")
            self._write_marker()
            if not self._old_run_pending:  # the earlier run's log is left as it is until it is removed
                self._tidy_metrics()
            if self.resuming_at_step is not None:
                later = [p.name for n, p in step_files(self.path) if n > self.resuming_at_step]
                if later:
                    self.notes.append(
                        f"{', '.join(later[:3])}{' ...' if len(later) > 3 else ''} in {self.path} "
                        f"are from after step {self.resuming_at_step}, where this run resumes; they "
                        "are kept until training reaches those steps")
        except BaseException:
            remove_stale_temps(self.path)  # a Ctrl-C in _check_writable leaves its probe
            self.close()
            raise
        return self

    def _make(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"the output folder {self.path} is a file, not a folder; "
                                 "choose another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunFolderError(f"cannot create the output folder {self.path}: part of that path is "
                                 "a file, not a folder; choose another --out") from None
        except OSError as e:
            reason, todo = os_error_reason(e, self._existing_parent())
            raise RunFolderError(f"cannot create the output folder {self.path}: {reason}. {todo}.") from None

    def _existing_parent(self) -> Path:
        p = self.path
        while not p.exists() and p != p.parent:
            p = p.parent
        return p

    def _unwritable(self, e: OSError) -> RunFolderError:
        reason, todo = os_error_reason(e, self.path)
        return RunFolderError(f"cannot write to the output folder {self.path}: {reason}. {todo}.")

    def _lock(self) -> None:
        import fcntl

        lock_path = self.path / LOCK_NAME
        check_own_file(lock_path)
        try:
            fd = open_own(lock_path, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise self._unwritable(e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise FolderLockedError(
                f"another charnn train ({_describe_holder(holder)}) is writing to {self.path}; "
                "wait for it to finish or choose another --out") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise RunFolderError(f"cannot lock the output folder {self.path}: this file system does "
                                     "not support locks; choose an --out on a local disk") from None
            raise self._unwritable(e) from None
        # The flock is ours. A record left in the file means its writer died
        # without closing (a clean close empties it).
        previous = _read_record(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                  "charnn_version": __version__}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
        except OSError as e:
            os.close(fd)
            raise self._unwritable(e) from None
        self._lock_fd = fd
        if previous is not None and previous.get("pid") != os.getpid():
            pid, host = previous.get("pid"), previous.get("host")
            if isinstance(pid, int) and host == socket.gethostname() and _pid_alive(pid):
                why = "no longer holds it (that pid now belongs to another process)"
            else:
                why = "ended without releasing it (killed?)"
            self.notes.append(f"took over the lock of {self.path} left by {_describe_holder(previous)}, "
                              f"which {why}")

    def _check_writable(self) -> None:
        """Found here, before training, not at the first checkpoint."""
        try:
            fd, tmp = create_temp(self.path)
        except OSError as e:
            raise self._unwritable(e) from None
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass

    def _replace_old_run(self) -> None:
        """With ``overwrite``, before this run's first file: remove the earlier run's (a
        stale metrics.jsonl would mix into this run's) and mark the folder as this run's."""
        if not self._old_run_pending:
            return
        self._remove_old_run()
        self._old_run_pending = False
        self._write_marker()

    def _remove_old_run(self) -> None:
        names = [n for n in (*CHECKPOINT_NAMES, METRICS_NAME) if (self.path / n).exists()]
        names += [p.name for _, p in step_files(self.path)]
        for name in names:
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError as e:
                raise RunFolderError(f"--overwrite: could not remove {self.path / name}: "
                                     f"{e.strerror or e}; remove it yourself or choose another --out") from None
        try:
            (self.path / RUN_MARKER).unlink(missing_ok=True)
        except OSError:
            pass
        if names:
            self.notes.append(f"--overwrite: removed the earlier run in {self.path} ({', '.join(names[:6])}"
                              f"{' ...' if len(names) > 6 else ''})")

    def _write_marker(self) -> None:
        marker = self.path / RUN_MARKER
        try:
            raw = read_own(marker)  # RunFolderError: a FIFO, a folder, ... there
        except OSError:
            raw = b""  # unreadable: write it again
        if raw is not None:
            try:
                if isinstance(json.loads(raw.decode("utf-8")), dict):
                    return
            except ValueError:  # (UnicodeDecodeError too)
                pass  # damaged: write it again
        data = json.dumps({"created": _now(), "charnn_version": __version__}).encode() + b"\n"
        write_atomic(marker, data, error=RunFolderError)

    def _tidy_metrics(self) -> None:
        """On resume at step k: keep the rows with step <= k (a crash after the
        checkpoint logged steps that will now be trained again). Always: drop
        lines a crash cut short, so the log stays one valid JSON object a line."""
        path = self.metrics_path
        try:
            raw = read_own(path)  # RunFolderError: a FIFO, a folder, ... there
        except OSError as e:
            raise RunFolderError(f"cannot read {path}: {e.strerror or e}; "
                                 "move it away or choose another --out") from None
        if raw is None:
            return
        k = self.resuming_at_step
        if k is None and (not raw or raw.endswith(b"\n")):
            return  # nothing to check: a new run's intact log (appends go after it)
        kept, dropped_later, dropped_broken = [], 0, 0
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                dropped_broken += 1
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if k is not None and isinstance(step, int) and not isinstance(step, bool) and step > k:
                dropped_later += 1
                continue
            new_line = json_line(row) if isinstance(row, dict) else json.dumps(json_safe(row)) + "\n"
            kept.append(new_line.encode("utf-8"))
        data = b"".join(kept)
        if data == raw:
            return
        write_atomic(path, data, error=RunFolderError)
        if dropped_later:
            self.notes.append(f"{path}: removed {dropped_later} row(s) logged after step {k}, "
                              "where this run resumes")
        if dropped_broken:
            self.notes.append(f"{path}: removed {dropped_broken} unreadable line(s) "
                              "(a write cut short by a crash)")

    # -- writing ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self.is_open:
            raise RuntimeError(f"{self!r} is not open; call open() first")

    def save(self, payload: dict[str, Any] | bytes, name: str) -> Path:
        """Write a checkpoint atomically as ``name`` in the folder.

        ``payload`` is a checkpoint dict, or its bytes from :func:`serialize`
        (serialize once, save as last.pt, best.pt and a step file). Raises
        :class:`CheckpointError` (disk full, ...); the previous file is intact.
        Temp files left by killed saves are removed afterwards.
        """
        self._check_open()
        if not name or Path(name).name != name or name.startswith(TMP_PREFIX) or name in (LOCK_NAME, RUN_MARKER):
            raise ValueError(f"invalid checkpoint name {name!r}")
        self._replace_old_run()
        data = payload if isinstance(payload, (bytes, bytearray)) else serialize(payload)
        path = write_atomic(self.path / name, bytes(data))
        remove_stale_temps(self.path)  # we hold the lock: any temp file here is a dead save's
        return path

    def save_step(self, payload: dict[str, Any] | bytes, step: int, keep: int) -> Path:
        """Save ``step-NNNNNNN.pt`` and keep the newest ``keep`` step files,
        newest by the step *number* in the name. Step files numbered after
        ``step`` (from a run that went further before an earlier checkpoint was
        resumed) are left alone: training overwrites them when it gets there."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        path = self.save(payload, step_file_name(step))
        older = [(n, p) for n, p in step_files(self.path) if n <= step]
        for _, old in older[:-keep]:
            if old != path:
                try:
                    old.unlink(missing_ok=True)
                except OSError:
                    pass  # a file we cannot remove is only disk space
        return path

    def log(self, row: dict[str, Any]) -> str | None:
        """Append ``row`` to ``metrics.jsonl`` as one strict JSON line
        (NaN/±inf -> null). Never raises for I/O: returns None when written, or
        a warning message for the trainer to report when the line could not be
        written (disk full, ...). The file is then left as it was (a partial
        line is cut off again), so it stays valid JSONL; training goes on. The
        warning is returned once per spell of failures, not at every row;
        ``log_failures`` counts the rows lost."""
        self._check_open()
        data = json_line(row).encode("utf-8")
        try:
            self._replace_old_run()  # RunFolderError: the row is not written beside the earlier run's
            if self._metrics_fd is None:
                # Non-blocking: a FIFO put there since open() is refused, not waited on.
                self._metrics_fd = open_own(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            fd = self._metrics_fd
            size = os.fstat(fd).st_size
            try:
                write_all(fd, data)
            except OSError:
                try:
                    os.ftruncate(fd, size)  # no half line
                except OSError:
                    pass
                raise
        except RunFolderError as e:  # not a regular file (see open_own), an earlier run's file kept
            self.log_failures += 1
            if self._log_failing:
                return None
            self._log_failing = True
            return (f"metrics rows are not being logged (they stay in the checkpoint's short history): "
                    f"{e}.")
        except OSError as e:
            self.log_failures += 1
            if self._log_failing:
                return None
            self._log_failing = True
            reason, todo = os_error_reason(e, self.path, len(data))
            return (f"could not append to {self.metrics_path}: {reason}; metrics rows are not being "
                    f"logged (they stay in the checkpoint's short history). {todo}.")
        self._log_failing = False
        return None

    # -- closing ------------------------------------------------------------------------
    def abandon(self) -> None:
        """Close a run that wrote nothing (it was refused after open(): no
        budget, a budget too short, ...) and take back what open() added:
        the marker and lock it created, and the folder if it made it and it is
        empty, so the folder does not look like it holds a run."""
        created = getattr(self, "_created", None)
        self.close()
        if not created:
            return
        for key, name in (("marker", RUN_MARKER), ("lock", LOCK_NAME)):
            if created[key]:
                try:
                    (self.path / name).unlink(missing_ok=True)
                except OSError:
                    pass
        if created["folder"]:
            # The folder, and the parents mkdir made for it (checkpoints/ of
            # checkpoints/NAME), each only if empty.
            top = getattr(self, "_existed_above", self.path.parent)
            p = self.path
            while p != top and p != p.parent:
                try:
                    p.rmdir()
                except OSError:
                    break
                p = p.parent

    def close(self) -> None:
        """Close the log and release the lock. The lock file is kept, emptied
        (see the module docstring). Safe to call twice."""
        if self._metrics_fd is not None:
            try:
                os.close(self._metrics_fd)
            except OSError:
                pass
            self._metrics_fd = None
        if self._lock_fd is not None:
            import fcntl

            fd, self._lock_fd = self._lock_fd, None
            try:
                os.ftruncate(fd, 0)  # "ended cleanly"
            except OSError:
                pass
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(fd)


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 4096, 0)
    except OSError:
        return None
    if not raw.strip():
        return None
    try:
        record = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _printable(text: str, limit: int = 100) -> str:
    """A string from a file, safe to show on a terminal (no control characters)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _describe_holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "pid unknown"
    pid = record.get("pid")
    host = record.get("host")
    parts = [f"pid {pid}" if isinstance(pid, int) else "pid unknown"]
    if isinstance(host, str) and host != socket.gethostname():
        parts[0] += f" on {_printable(host)}"
    started = record.get("started")
    if isinstance(started, str):
        parts.append(f"started {_printable(started, 40)}")
    return ", ".join(parts)
