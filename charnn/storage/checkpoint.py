"""The checkpoint: one self-describing file shared by every command.

A ``torch.save`` of plain containers and tensors only, read back with
``torch.load(..., weights_only=True)`` so a malicious file cannot run code.
Writes are atomic: a temporary file in the same folder, then ``os.replace``.
See the README's "Checkpoint format" for the keys.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import pickle
import stat
import zipfile
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..model.config import ModelConfig
from ..errors import CharnnError, CheckpointError, ConfigError, format_bytes, safe_display
from ..model.rnn import CharRNN, available_memory, parameter_shapes
from ..safe_files import TMP_PREFIX, serialize, write_atomic  # noqa: F401 (TMP_PREFIX re-exported)
from ..text.tokenizer import CharTokenizer

FORMAT = "charnn-checkpoint"
# 2: the vocabulary is an int32 tensor of code points (1: a list of one-character
# strings, which put 100k characters past the object-pickle cap); files of
# format 1 load through _vocab_chars. A charnn that reads only format 1 refuses
# format 2 by its version check, so an older charnn never resumes a newer run
# (its reading order, for one) with part of the run ignored.
FORMAT_VERSION = 2
REQUIRED_KEYS = ("format", "format_version", "model_config", "vocab", "model_state")


@dataclass
class Checkpoint:
    """A loaded, validated checkpoint."""

    path: Path
    data: dict[str, Any]
    model_config: ModelConfig
    tokenizer: CharTokenizer
    train_config: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def build_model(self, device: torch.device | str = "cpu") -> CharRNN:
        try:
            model = CharRNN(self.model_config)  # checks free memory before allocating
        except ConfigError as e:
            raise CheckpointError(f"cannot load the model in {self.path}: {e}") from None
        model.load_state_dict(self.data["model_state"])
        return model.to(device).eval()


def build_payload(
    model: CharRNN,
    tokenizer: CharTokenizer,
    train_config: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    metrics: list[dict[str, Any]] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint as plain data. Weights are copied to the CPU in fp32."""
    model_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "charnn_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_config": model.config.to_dict(),
        "vocab": vocab_tensor(tokenizer),
        "model_state": model_state,
        "train_config": dict(train_config or {}),
        "train_state": dict(train_state or {}),
        "metrics": list(metrics or []),
    }
    if optimizer_state is not None:
        payload["optimizer_state"] = optimizer_state
    if scheduler_state is not None:
        payload["scheduler_state"] = scheduler_state
    return payload


def vocab_tensor(tokenizer: CharTokenizer) -> torch.Tensor:
    """The vocabulary as the checkpoint stores it: code points, index = token id.

    A tensor, not a list of strings: its bytes go to a storage member (4 per
    character, bounded by the file's size) instead of the object pickle, whose
    cap keeps crafted files cheap to refuse."""
    return torch.tensor([ord(c) for c in tokenizer.chars], dtype=VOCAB_DTYPE)


def save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically: temp file in the same folder, fsync, ``os.replace``,
    fsync of the folder (:func:`charnn.safe_files.write_atomic`).

    On failure (disk full, file size limit, read-only, ...) the previous file
    at ``path`` is untouched, no temp file is left, and a
    :class:`CheckpointError` says what happened and what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(
            f"cannot write checkpoint {path}: {path.parent} exists and is not a folder; "
            "choose another --out"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot create folder {path.parent}: {e.strerror or e}") from None
    # Serialize in memory, then write the bytes with plain file I/O: a full
    # disk is then a real OSError (torch's zip writer would raise a vague
    # RuntimeError from inside torch.save).
    return write_atomic(path, serialize(payload))


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
# characters (charnn.train). The vocabulary and weights are tensors, outside it.
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


def _untrusted(path: Path, what: str) -> CheckpointError:
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
        raise _untrusted(path, f"{len(infos):,} zip members; charnn checkpoints have a few dozen")
    prefix = infos[0].filename.split("/", 1)[0] if infos else ""
    names, total, pickle_size, storage_bytes = set(), 0, None, 0
    for info in infos:
        name = info.filename
        head, _, rest = name.partition("/")
        shown = safe_display(name, 100)
        if head != prefix or not rest or name in names:
            raise CheckpointError(f"{path} is not a readable checkpoint (not a torch zip file: "
                                  f"unexpected member {shown})")
        names.add(name)
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size or info.flag_bits & 1:
            raise _untrusted(path, f"member {shown} is compressed or encrypted; torch stores members as they are")
        if info.header_offset + info.file_size > size:
            raise _untrusted(path, f"member {shown} claims more bytes than the file has")
        total += info.file_size
        if rest == "data.pkl":
            pickle_size = info.file_size
        elif rest.startswith("data/") and rest[5:].isdigit():
            storage_bytes += info.file_size
        elif rest in _SMALL_RECORDS or rest.startswith(".data/"):
            if info.file_size > MAX_SMALL_MEMBER:
                raise _untrusted(path, f"member {shown} is {info.file_size:,} bytes; torch writes a few")
        else:
            raise CheckpointError(f"{path} is not a readable checkpoint (not a plain torch.save file: "
                                  f"unexpected member {shown})")
    if pickle_size is None:
        raise CheckpointError(f"{path} is not a readable checkpoint (a zip file without torch's data.pkl)")
    if total > size:
        raise _untrusted(path, f"its members declare {total:,} bytes but the file has {size:,}")
    if pickle_size > MAX_PICKLE_BYTES:
        raise _untrusted(path, f"its object pickle is {format_bytes(pickle_size)}; charnn reads at most "
                               f"{format_bytes(MAX_PICKLE_BYTES)}")
    free = available_memory()
    if free is not None and storage_bytes > free:
        raise CheckpointError(f"{path} holds {format_bytes(storage_bytes)} of tensors; this machine has "
                              f"{format_bytes(free)} free memory to load them")


def read_payload(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` after the zip-level checks,
    every failure a CheckpointError. The object graph is checked by :func:`validate`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        hint = ""
        if (path / "best.pt").exists():
            hint = f"; did you mean {path / 'best.pt'}?"
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


class _Budget:
    """Nodes and characters walked so far, shared by every section of one file."""

    def __init__(self) -> None:
        self.nodes = 0
        self.chars = 0


def _check_tensor(t: Any, where: str, path: Path, dtypes: tuple[torch.dtype, ...]) -> None:
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


def _check_plain(obj: Any, where: str, path: Path, budget: _Budget, tensors: bool) -> None:
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
                raise _untrusted(path, f"a string of {len(x):,} characters in {where}; "
                                       f"at most {MAX_STRING:,} are allowed")
            if budget.chars > MAX_TOTAL_CHARS:
                raise _untrusted(path, f"more than {MAX_TOTAL_CHARS:,} characters of text in its metadata")
        elif t is int:
            if not _INT_RANGE[0] <= x < _INT_RANGE[1]:
                raise _untrusted(path, f"an integer beyond 64 bits in {where}")
        elif t is list or t is tuple or isinstance(x, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise _untrusted(path, f"{where} is nested deeper than {MAX_DEPTH} levels")
            is_dict = isinstance(x, dict)
            nodes += 2 * len(x) if is_dict else len(x)
            if nodes > MAX_NODES:
                raise _untrusted(path, f"its metadata has more than {MAX_NODES:,} entries "
                                       f"(counting repeated references), found in {where}")
            if is_dict:
                for k in x:
                    if type(k) is not str and type(k) is not int:
                        raise _untrusted(path, f"a mapping in {where} has keys that are not strings or integers")
                stack.extend(zip(x.keys(), repeat(depth + 1)))
                stack.extend(zip(x.values(), repeat(depth + 1)))
            else:
                stack.extend(zip(x, repeat(depth + 1)))
        elif isinstance(x, torch.Tensor) and tensors:
            _check_tensor(x, f"a tensor in {where}", path, DATA_DTYPES)
        elif isinstance(x, (bool, float, int, str, torch.dtype, torch.device)):
            continue  # subclasses of the plain types (torch.Size's ints are plain)
        else:
            raise _untrusted(path, f"a {safe_display(type(x).__name__)} in {where}, "
                                   "where only plain data belongs")
    budget.nodes = nodes


def _vocab_chars(vocab: Any, version: int, path: Path) -> list[str]:
    """The vocabulary's characters, checked before anything prints an entry:
    format 2's tensor of code points, or format 1's list of characters."""
    if version >= 2:
        if not isinstance(vocab, torch.Tensor):
            raise CheckpointError(f"{path}: vocab is not a tensor of code points")
        _check_tensor(vocab, "vocab", path, (VOCAB_DTYPE,))
        if vocab.dim() != 1:
            raise CheckpointError(f"{path}: vocab has shape {tuple(vocab.shape)}; it must be a list of code points")
        if vocab.numel() > MAX_VOCAB:
            raise _untrusted(path, f"a vocabulary of {vocab.numel():,} entries; Unicode has {MAX_VOCAB:,} code points")
        if vocab.numel() and (int(vocab.min()) < 0 or int(vocab.max()) >= MAX_VOCAB):
            raise CheckpointError(f"{path}: invalid vocabulary: an entry is not a Unicode code point "
                                  f"(0 to {MAX_VOCAB - 1:#x})")
        return [chr(p) for p in vocab.tolist()]
    if not isinstance(vocab, list):
        raise CheckpointError(f"{path}: vocab is not a list of characters")
    if len(vocab) > MAX_VOCAB:
        raise _untrusted(path, f"a vocabulary of {len(vocab):,} entries; Unicode has {MAX_VOCAB:,} code points")
    for i, ch in enumerate(vocab):
        if not isinstance(ch, str) or len(ch) != 1:
            shown = repr(ch) if isinstance(ch, str) else f"a {type(ch).__name__}"
            raise CheckpointError(f"{path}: invalid vocabulary: entry {i} is {safe_display(shown, 40)}; "
                                  "vocab entries must be single characters")
    return list(vocab)


def _check_model_config(mc: Any, path: Path) -> ModelConfig:
    if not isinstance(mc, dict):
        raise CheckpointError(f"{path}: model_config is not a mapping")
    if len(mc) > 64 or not all(isinstance(k, str) and len(k) <= 64 for k in mc) or not all(
            v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 64)
            for v in mc.values()):
        raise CheckpointError(f"{path}: invalid model_config: its entries must be short names with "
                              "numbers or short strings")
    try:
        return ModelConfig.from_dict(mc)
    except (CharnnError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path}: invalid model_config: {safe_display(e)}") from None


def _check_weights(state: Any, config: ModelConfig, path: Path) -> None:
    """Step 4: names and shapes from the config's arithmetic, dtypes and data."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: model_state is not a mapping of tensors")
    if not all(isinstance(k, str) and len(k) <= MAX_KEY_CHARS for k in state):
        raise CheckpointError(f"{path}: model_state has weight names that are not short strings")
    n_expected = 3 + 4 * config.num_layers
    if n_expected > len(state) + 64:  # never list the names of a billion layers
        raise CheckpointError(
            f"{path}: weights do not match its model_config: num_layers={config.num_layers} needs "
            f"{n_expected:,} weight tensors, the file holds {len(state)} (missing weights)")
    expected = parameter_shapes(config)
    missing_w = sorted(set(expected) - set(state))
    extra_w = sorted(set(state) - set(expected))
    if missing_w or extra_w:
        raise CheckpointError(
            f"{path}: weights do not match its model_config (missing: {missing_w[:5]}, "
            f"unexpected: {safe_display(extra_w[:5])})"
        )
    for key, shape in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{path}: weight {key} has shape {tuple(t.shape)}, model_config implies {shape}"
            )
        _check_tensor(t, f"weight {key}", path, FLOAT_DTYPES)
    for key in expected:
        if not bool(torch.isfinite(state[key]).all()):
            # A damaged file (or a diverged run saved by another tool): NaN/inf
            # weights would only produce NaN losses and failed sampling later.
            raise CheckpointError(
                f"{path}: weight {key} holds NaN or infinite values; the file is damaged "
                "(use an earlier checkpoint)"
            )


def validate(data: Any, path: str | os.PathLike = "checkpoint") -> Checkpoint:
    """Check format, version, every entry's type and size, config vs weights,
    vocabulary vs sizes -- without building a model."""
    path = Path(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a charnn checkpoint (no 'format': '{FORMAT}' entry); "
            "it may come from another tool"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path} has no valid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}, newer than this charnn "
            f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade charnn"
        )
    if version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks required entries: {', '.join(missing)}")
    if not all(isinstance(k, str) for k in data) or len(data) > 64:
        raise _untrusted(path, "unexpected top-level entries")
    config = _check_model_config(data["model_config"], path)
    chars = _vocab_chars(data["vocab"], version, path)
    budget = _Budget()
    for key, value in data.items():
        if key in ("vocab", "model_state"):
            continue
        _check_plain(value, safe_display(key, 40), path, budget, tensors=key not in ("train_config", "metrics"))
    for key in ("charnn_version", "created"):
        if not isinstance(data.get(key, ""), str) or len(data.get(key, "")) > 100:
            raise CheckpointError(f"{path}: {key} is not a short string")
    for key in ("train_config", "train_state"):
        if not isinstance(data.get(key, {}), dict):
            raise CheckpointError(f"{path}: {key} is not a mapping")
    metrics = data.get("metrics", [])
    if not isinstance(metrics, list):
        raise CheckpointError(f"{path}: metrics is not a list")
    for row in metrics:
        if not isinstance(row, dict) or not all(v is None or isinstance(v, (bool, int, float, str))
                                                for v in row.values()):
            raise CheckpointError(f"{path}: metrics must be a list of flat rows of numbers")
    try:
        tokenizer = CharTokenizer(chars)
    except (CharnnError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid vocabulary: {safe_display(e)}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{path}: vocabulary has {tokenizer.vocab_size} characters but model_config "
            f"says vocab_size={config.vocab_size}"
        )
    _check_weights(data["model_state"], config, path)
    return Checkpoint(
        path=path,
        data=data,
        model_config=config,
        tokenizer=tokenizer,
        train_config=data.get("train_config", {}),
        train_state=data.get("train_state", {}),
        metrics=metrics,
    )


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint."""
    return validate(read_payload(path, map_location=map_location), path)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CharRNN, CharTokenizer, Checkpoint]:
    """The model (in eval mode, on ``device``), its tokenizer and the checkpoint."""
    ckpt = load(path, map_location="cpu")
    return ckpt.build_model(device), ckpt.tokenizer, ckpt
