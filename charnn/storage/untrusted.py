"""Reading a checkpoint as untrusted input: the zip directory, the object
pickle and the loaded containers are checked against limits before the work
each one bounds, so a crafted file costs next to nothing to refuse."""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import stat
import zipfile
from itertools import repeat
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, format_bytes, safe_display
from ..model.rnn import available_memory

# ---------------------------------------------------------------------------
# Reading: every limit is checked before the work it bounds
# ---------------------------------------------------------------------------
#
# A checkpoint is untrusted input (it may come from anyone). Rejecting a bad
# one must cost next to nothing, so the checks run cheapest first:
#
# 1. the zip's directory (no data read): only the members torch writes, stored
#    uncompressed, sizes that add up to no more than the file, a small pickle,
#    storages that fit in free memory;
# 2. torch.load(weights_only=True): plain containers and tensors only;
# 3. the loaded objects, walked iteratively with a budget that counts every
#    *reference* (a pickle-memo bomb -- one list referenced twice per level --
#    is tiny on disk but exponential to walk), a depth limit and string limits;
# 4. weight names and shapes computed arithmetically from model_config and
#    compared with the stored tensors, so no model is ever built from sizes
#    the file does not back with data.

# The object pickle holds only what a run writes besides tensors: at most
# MAX_METRIC_ROWS metric rows (the trainer thins them; a row pickles to at most
# ~110 bytes, measured in tests/test_checkpoint_limits.py), the options (a few
# kB), train_state's counters and about 100 resume notes of at most 300
# characters (charnn.training.state). Vocabulary and weights are tensors, outside it.
MAX_METRIC_ROWS = 2000  # the checkpoint keeps a short history; the JSONL log keeps all
MAX_PICKLE_BYTES = 512 << 10  # ~2x the largest a run writes; parsing the largest allowed takes ~1 s
MAX_MEMBERS = 10_000  # zip members (a real checkpoint has ~50)
MAX_SMALL_MEMBER = 4096  # bytes of torch's own small records (version, byteorder, ...)
MAX_NODES = 100_000  # references walked in the metadata, counting repeats (a full 2000-row history: ~33k)
MAX_DEPTH = 32  # nesting of containers
MAX_STRING = 4096  # characters in one string (PATH_MAX)
MAX_TOTAL_CHARS = 4_000_000  # characters in all strings, counting repeats
MAX_KEY_CHARS = 200  # a weight's name
MAX_VOCAB = 0x110000  # every Unicode code point
VOCAB_DTYPE = torch.int32
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DATA_DTYPES = FLOAT_DTYPES + (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
_SMALL_RECORDS = {"version", "byteorder", ".format_version", ".storage_alignment"}
_INT_RANGE = (-(1 << 63), 1 << 64)


def untrusted(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable checkpoint ({what}); it is damaged or was "
                           "crafted -- do not trust it")


def _check_archive(f: io.BufferedReader, size: int, path: Path) -> None:
    """Step 1: the zip's directory only."""
    if not zipfile.is_zipfile(f):
        f.seek(0)
        if f.read(1) == b"\x80":  # a bare pickle stream: torch's legacy format, or pickle.dump
            raise CheckpointError(
                f"refusing to load {path}: it is a bare pickle (the legacy torch format or pickle.dump), "
                "not the zip-based torch format charnn writes; such files could run code or declare "
                "unbounded sizes, so charnn never reads them. Do not trust this file"
            )
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file)")
    try:
        f.seek(0)
        infos = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt zip: "
                              f"{safe_display(e)})") from None
    if len(infos) > MAX_MEMBERS:
        raise untrusted(path, f"{len(infos):,} zip members; charnn checkpoints have a few dozen")
    prefix = infos[0].filename.split("/", 1)[0] if infos else ""
    names, total, pickle_size, storage_bytes = set(), 0, None, 0
    pickle_info: zipfile.ZipInfo | None = None
    for info in infos:
        name = info.filename
        head, _, rest = name.partition("/")
        shown = safe_display(name, 100)
        if head != prefix or not rest or name in names:
            raise CheckpointError(f"{path} is not a readable checkpoint (not a torch zip file: "
                                  f"unexpected member {shown})")
        names.add(name)
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size or info.flag_bits & 1:
            raise untrusted(path, f"member {shown} is compressed or encrypted; torch stores members as they are")
        if info.header_offset + info.file_size > size:
            raise untrusted(path, f"member {shown} claims more bytes than the file has")
        total += info.file_size
        if rest == "data.pkl":
            pickle_size, pickle_info = info.file_size, info
        elif rest.startswith("data/") and rest[5:].isdigit():
            storage_bytes += info.file_size
        elif rest in _SMALL_RECORDS or rest.startswith(".data/"):
            if info.file_size > MAX_SMALL_MEMBER:
                raise untrusted(path, f"member {shown} is {info.file_size:,} bytes; torch writes a few")
        else:
            raise CheckpointError(f"{path} is not a readable checkpoint (not a plain torch.save file: "
                                  f"unexpected member {shown})")
    if pickle_size is None:
        raise CheckpointError(f"{path} is not a readable checkpoint (a zip file without torch's data.pkl)")
    if total > size:
        raise untrusted(path, f"its members declare {total:,} bytes but the file has {size:,}")
    if pickle_size > MAX_PICKLE_BYTES:
        if _format_1_head(f, pickle_info):
            raise CheckpointError(
                f"{path} was written by charnn 0.2.3 or older (checkpoint format 1) for a vocabulary of more "
                f"than about 30,000 characters. Format 1 keeps the vocabulary inside the object pickle, here "
                f"{format_bytes(pickle_size)}, over the {format_bytes(MAX_PICKLE_BYTES)} charnn reads from any "
                "file (the cap that keeps crafted files cheap to refuse), so no charnn can read it. The "
                "run's text is not affected: train again on it (charnn train TEXT --out NEW_FOLDER); the "
                "new checkpoints store the vocabulary as a tensor and load")
        raise untrusted(path, f"its object pickle is {format_bytes(pickle_size)}; charnn reads at most "
                               f"{format_bytes(MAX_PICKLE_BYTES)}")
    free = available_memory()
    if free is not None and storage_bytes > free:
        raise CheckpointError(f"{path} holds {format_bytes(storage_bytes)} of tensors; this machine has "
                              f"{format_bytes(free)} free memory to load them")


def _broken_link(path: Path) -> str:
    """What is wrong with a symlink ``path`` that leads to no file."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return (f"checkpoint {path} is a symlink loop (its links lead back to themselves); "
                    "give the checkpoint file itself")
    return f"checkpoint {path} is a symlink to {os.readlink(path)}, which does not exist; check the link"


# How charnn's payload dict starts in a pickle (protocol 2, as torch.save
# writes): "format", its value, then "format_version" and a one-byte int.
_FORMAT_1_HEAD = re.compile(rb"X\x06\x00\x00\x00format.{0,40}?X\x0e\x00\x00\x00format_versionq.K\x01", re.S)


def _format_1_head(f: io.BufferedReader, info: zipfile.ZipInfo | None) -> bool:
    """Whether an object pickle too large to read starts like a charnn format-1
    checkpoint's: its first bytes only, to choose the error message (the file
    is refused either way)."""
    if info is None:
        return False
    try:
        f.seek(0)
        with zipfile.ZipFile(f).open(info) as member:
            head = member.read(256)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False
    return _FORMAT_1_HEAD.search(head) is not None


def read_payload(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                 prefer: str = "best.pt") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` after the zip-level checks,
    every failure a CheckpointError. The object graph is checked by :func:`validate`.
    ``prefer``: the file of a run folder to suggest when ``path`` is the folder
    (``last.pt`` to resume, ``best.pt`` to sample or evaluate)."""
    path = Path(path)
    try:
        exists = path.exists()
    except OSError as e:  # a name too long for the file system, a folder it may not search
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not exists:
        if path.is_symlink():
            raise CheckpointError(_broken_link(path))
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        hint = ""
        for name in dict.fromkeys((prefer, "best.pt", "last.pt")):
            if (path / name).exists():
                hint = f"; did you mean {path / name}?"
                break
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer. The checks and
        # torch.load read this one open file, so it cannot be swapped between them.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is not a regular file (a FIFO, socket or device); "
                                  "give a checkpoint file")
        if st.st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was never written completely")
        _check_archive(f, st.st_size, path)
        f.seek(0)
        return _torch_load(f, path, map_location)


def _torch_load(f: io.BufferedReader, path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        # Not mmap=True: the zip checks already bound memory by the file's size,
        # and a mapped file that is later truncated in place (cp over it) would
        # crash the process with SIGBUS, and on Windows could not be replaced.
        data = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's first line is generic; the line naming the cause is the useful one.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        cause = next((ln for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln), "")
        if not cause:
            raise CheckpointError(
                f"{path} is not a readable checkpoint (corrupt, or not a charnn/torch file)"
            ) from None
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects beyond plain data and tensors, "
            "which could run code. charnn checkpoints never do; do not trust this file "
            f"({safe_display(cause)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, TypeError, IndexError, UnicodeDecodeError, io.UnsupportedOperation,
            MemoryError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file): "
            f"{type(e).__name__}: {safe_display(first)}"
        ) from None
    except Exception as e:  # torch raises assorted types on garbage input
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(e).__name__}") from None
    return data


class WalkBudget:
    """Nodes and characters walked so far, shared by every section of one file."""

    def __init__(self) -> None:
        self.nodes = 0
        self.chars = 0


def check_tensor(t: Any, where: str, path: Path, dtypes: tuple[torch.dtype, ...]) -> None:
    """A plain dense CPU tensor of an expected dtype that stores all it claims."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise CheckpointError(f"{path}: {where} is a {type(t).__name__}, not a plain tensor")
    if t.layout != torch.strided:
        raise CheckpointError(f"{path}: {where} is a {str(t.layout).replace('torch.', '')} tensor; "
                              "charnn checkpoints hold dense tensors only")
    if t.is_quantized or t.is_meta or t.dtype not in dtypes:
        kind = "quantized" if t.is_quantized else "meta (data-less)" if t.is_meta else str(t.dtype)
        allowed = ("floating point" if dtypes == FLOAT_DTYPES else "numeric" if dtypes == DATA_DTYPES
                   else " or ".join(str(d).replace("torch.", "") for d in dtypes))
        raise CheckpointError(f"{path}: {where} is a {kind} tensor; charnn expects {allowed} tensors here")
    claimed = (t.storage_offset() + t.numel()) * t.element_size()
    if t.numel() and claimed > t.untyped_storage().nbytes():
        raise CheckpointError(f"{path}: {where} claims {t.numel():,} elements but stores fewer; "
                              "the file is damaged or crafted -- do not trust it")


def check_plain(obj: Any, where: str, path: Path, budget: WalkBudget, tensors: bool) -> None:
    """Plain data (dict, list, tuple, str, int, float, bool, None; tensors where
    ``tensors``), walked without recursion within the node, depth and string
    budgets. A container's children are counted when it is reached, before
    any is visited, so a memo bomb stops after MAX_NODES references."""
    stack = [(obj, 0)]
    nodes = budget.nodes + 1
    while stack:
        x, depth = stack.pop()
        t = type(x)
        if t is float or t is bool or x is None:
            continue
        if t is str:
            budget.chars += len(x)
            if len(x) > MAX_STRING:
                raise untrusted(path, f"a string of {len(x):,} characters in {where}; "
                                       f"at most {MAX_STRING:,} are allowed")
            if budget.chars > MAX_TOTAL_CHARS:
                raise untrusted(path, f"more than {MAX_TOTAL_CHARS:,} characters of text in its metadata")
        elif t is int:
            if not _INT_RANGE[0] <= x < _INT_RANGE[1]:
                raise untrusted(path, f"an integer beyond 64 bits in {where}")
        elif t is list or t is tuple or isinstance(x, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise untrusted(path, f"{where} is nested deeper than {MAX_DEPTH} levels")
            is_dict = isinstance(x, dict)
            nodes += 2 * len(x) if is_dict else len(x)
            if nodes > MAX_NODES:
                raise untrusted(path, f"its metadata has more than {MAX_NODES:,} entries "
                                       f"(counting repeated references), found in {where}")
            if is_dict:
                for k in x:
                    if type(k) is not str and type(k) is not int:
                        raise untrusted(path, f"a mapping in {where} has keys that are not strings or integers")
                stack.extend(zip(x.keys(), repeat(depth + 1)))
                stack.extend(zip(x.values(), repeat(depth + 1)))
            else:
                stack.extend(zip(x, repeat(depth + 1)))
        elif isinstance(x, torch.Tensor) and tensors:
            check_tensor(x, f"a tensor in {where}", path, DATA_DTYPES)
        elif isinstance(x, (bool, float, int, str, torch.dtype, torch.device)):
            continue  # subclasses of the plain types (torch.Size's ints are plain)
        else:
            raise untrusted(path, f"a {safe_display(type(x).__name__)} in {where}, "
                                   "where only plain data belongs")
    budget.nodes = nodes
