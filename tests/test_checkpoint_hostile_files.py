"""Hostile inputs cost nothing to reject (issue 10 parts 5, 7, 8).

Every file here is really crafted -- zip members and pickles written by hand,
memo bombs, stride-0 views, sparse and integer weights, escape sequences --
and each must be refused with a clear CharnnError, quickly, through the
library and through ``charnn sample``, ``eval`` and ``info`` without a
traceback. Prime files are real FIFOs, devices and large files.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import charnn.storage.checkpoint as ckpt_mod
from charnn.cli import app
from charnn.model.config import ModelConfig
from charnn.errors import CheckpointError, ConfigError, DataError, NonFiniteError, safe_display
from charnn.analysis.evaluate import evaluate_ids, surprisal
from charnn.model.rnn import CharRNN, parameter_count, parameter_shapes
from charnn.generation.sample import (DEFAULT_TEMPERATURE, MAX_PRIME_CHARS, MAX_PRIME_FILE_BYTES, MAX_SAMPLE_MEMORY,
                           generate, generate_samples, read_prime_file, sample_text)
from charnn.text.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parent.parent
VOCAB = sorted(set("abcdefghijklmnopqrstuvwxyz .\n"))
FAST = 1.0  # seconds: every rejection here must be well under this


# ---------------------------------------------------------------------------
# Crafting: a torch-compatible pickle whose tensors we describe by hand
# ---------------------------------------------------------------------------

class StorageRef:
    """A storage as torch's pickle names it: (type, key, location, numel)."""

    def __init__(self, key: str, storage_type, numel: int):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class FakeTensor:
    """Unpickles through torch's own _rebuild_tensor_v2 with any size/stride."""

    def __init__(self, ref: StorageRef, size, stride, offset: int = 0):
        self.ref, self.size, self.stride, self.offset = ref, tuple(size), tuple(stride), offset

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.ref, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def craft(path: Path, obj=None, storages: dict[str, bytes] | None = None, pkl: bytes | None = None,
          extra: dict[str, bytes] | None = None, compress: bool = False) -> Path:
    """A torch-style zip written member by member."""
    if pkl is None:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        pkl = buf.getvalue()
    how = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", how) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for k, b in (storages or {}).items():
            z.writestr(f"archive/data/{k}", b)
        for k, b in (extra or {}).items():
            z.writestr(f"archive/{k}", b)
        z.writestr("archive/version", "3\n")
    return path


def tiny_config(**kw) -> ModelConfig:
    opts = dict(cell="lstm", vocab_size=len(VOCAB), embedding_dim=8, hidden_size=16, num_layers=1, dropout=0.0)
    opts.update(kw)
    return ModelConfig(**opts)


def real_payload(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = CharRNN(tiny_config())
    return ckpt_mod.build_payload(model, CharTokenizer(VOCAB), train_config={"corpus": ["x.txt"]},
                                  train_state={"step": 1, "rng_cpu": torch.get_rng_state()},
                                  metrics=[{"step": 1, "train_loss": 3.3, "val_loss": None}])


def memo_bomb(levels: int = 60, width: int = 2) -> list:
    """width**levels references, a few hundred bytes pickled."""
    a: list = []
    for _ in range(levels):
        a = [a] * width
    return a


def nested(depth: int) -> list:
    a: list = []
    for _ in range(depth):
        a = [a]
    return a


def save(path: Path, payload: dict) -> Path:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 50_000))  # the pickler recurses into deep nesting
    try:
        torch.save(payload, path)
    finally:
        sys.setrecursionlimit(limit)
    return path


def _expanded_state(cfg: ModelConfig) -> dict:
    """Every weight a stride-0 view of one float: the declared shapes are
    huge, the storage is 4 bytes."""
    return {k: torch.zeros(1).expand(*shape) for k, shape in parameter_shapes(cfg).items()}


ESC = "\x1b[2J\x1b[31mPWNED\x1b[0m"
BIDI = "abc\u202egnp.exe"


def _attacks(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a regex the error must match)."""
    good = real_payload()
    out: dict[str, tuple[Path, str]] = {}

    def add(name: str, path: Path, needle: str) -> None:
        out[name] = (path, needle)

    def mutated(name: str, needle: str, **changes) -> None:
        add(name, save(folder / f"{name}.pt", {**good, **changes}), needle)

    # -- sizes the file does not back with data
    big = 10**12
    ref = StorageRef("0", torch.FloatStorage, big)
    add("declared-storage-1e12", craft(folder / "declared.pt", {
        "format": "charnn-checkpoint", "format_version": 1, "w": FakeTensor(ref, (big,), (1,))}, {"0": bytes(16)}),
        "not a readable checkpoint")
    huge = tiny_config(hidden_size=10**6, embedding_dim=10**5)
    mutated("stride0-hidden-1e6", "claims .* elements but stores fewer",
            model_config=huge.to_dict(), model_state=_expanded_state(huge))
    mutated("config-hidden-1e7", r"rnn\.weight_ih_l0 has shape",
            model_config={**good["model_config"], "hidden_size": 10**7})
    mutated("config-layers-1e9", "num_layers=1000000000",
            model_config={**good["model_config"], "num_layers": 10**9})
    mutated("config-vocab-1e12", "vocab_size", model_config={**good["model_config"], "vocab_size": 10**12})
    # -- metadata that is tiny on disk but huge to walk
    wide = memo_bomb(levels=8, width=30)  # 30**8 = 6.6e11 references, 8 levels deep
    mutated("memo-bomb-metrics", "more than 100,000 entries", metrics=wide)
    mutated("memo-bomb-train-config", "more than 100,000 entries", train_config={"corpus": wide})
    mutated("memo-bomb-train-state", "more than 100,000 entries", train_state={"step": 1, "x": wide})
    mutated("memo-bomb-optimizer", "more than 100,000 entries", optimizer_state={"state": wide})
    mutated("memo-bomb-deep", "nested deeper than 32", metrics=memo_bomb(levels=60))
    mutated("memo-bomb-vocab", "vocab", vocab=[memo_bomb()] * len(VOCAB))
    mutated("memo-bomb-model-config", "model_config", model_config={**good["model_config"], "cell": memo_bomb()})
    mutated("deep-nesting", "nested deeper than 32", train_config={"corpus": nested(5000)})
    mutated("long-string", "string of 100,000 characters", train_config={"corpus": ["x" * 100_000]})
    mutated("many-strings", "more than 4,000,000 characters",
            train_config={"corpus": ["y" * 4000] * 2000})
    mutated("int-beyond-64-bits", "integer beyond 64 bits", train_state={"step": 10**40})
    mutated("metrics-not-flat", "flat rows", metrics=[{"step": 1, "x": [1, 2]}])
    mutated("foreign-object", "plain data", train_config={"corpus": {1, 2}})
    # -- tensors of the wrong kind
    sd = good["model_state"]
    mutated("sparse-weight", "sparse", model_state={**sd, "head.bias": sd["head.bias"].to_sparse()})
    mutated("int64-weight", "int64", model_state={**sd, "head.weight": sd["head.weight"].long()})
    mutated("complex-weight", "complex", model_state={**sd, "head.bias": sd["head.bias"].to(torch.complex64)})
    mutated("quantized-weight", "quantized", model_state={
        **sd, "head.bias": torch.quantize_per_tensor(sd["head.bias"], 0.1, 0, torch.qint8)})
    mutated("sparse-in-train-state", "sparse", train_state={"step": 1, "x": torch.eye(3).to_sparse()})
    # -- escape sequences in strings that reach error messages
    mutated("ansi-vocab-entry", "vocab", vocab=[ESC] + VOCAB[1:])
    mutated("ansi-weight-name", "unexpected", model_state={**sd, ESC: torch.zeros(1)})
    mutated("ansi-cell", "model_config", model_config={**good["model_config"], "cell": ESC})
    mutated("bidi-created-too-long", "created", created=BIDI * 40)
    # -- the zip itself
    add("pickle-too-large", craft(folder / "bigpickle.pt", pkl=b"\x80\x02]" + b"]a" * (1 << 20) + b"."),
        "object pickle is")
    add("compressed-member", craft(folder / "deflate.pt", pkl=b"\x80\x02}." + bytes(1 << 20), compress=True),
        "compressed")
    add("odd-member", craft(folder / "odd.pt", {"a": 1}, extra={"code/__torch__.py": b"x"}),
        "unexpected member")
    return out


@pytest.fixture(scope="module")
def attacks(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return _attacks(tmp_path_factory.mktemp("hostile"))


def _names() -> list[str]:
    # The names, without writing the files at collection time.
    import ast
    import inspect

    src = inspect.getsource(_attacks)
    names = []
    for node in ast.walk(ast.parse(textwrap.dedent(src))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("add", "mutated") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.append(first.value)
    return names


NAMES = _names()


def test_every_attack_is_listed():
    assert len(NAMES) >= 28 and len(set(NAMES)) == len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_library_rejects_quickly_with_a_clear_error(attacks, name):
    path, needle = attacks[name]
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        ckpt_mod.load(path)
    elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert re.search(needle, msg), msg
    assert "\x1b" not in msg and "\u202e" not in msg, msg
    assert len(msg) < 1000, msg
    assert elapsed < FAST, f"{name}: {elapsed:.2f} s"


@pytest.mark.parametrize("name", NAMES)
def test_cli_rejects_without_traceback(attacks, name, tmp_path):
    path, _ = attacks[name]
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on a mat.\n" * 5, encoding="utf-8")
    runner = CliRunner()
    for args in (["sample", str(path), "-n", "5", "--seed", "1"], ["eval", str(path), str(corpus)],
                 ["info", str(path)], ["info", str(path), "--json"]):
        t0 = time.perf_counter()
        result = runner.invoke(app, args)
        elapsed = time.perf_counter() - t0
        assert result.exit_code == 1, (args, result.output)
        assert "Error: " in result.stderr, result.stderr
        assert "Traceback" not in result.output and "bug" not in result.output, result.output
        assert "\x1b" not in result.output and "\u202e" not in result.output, result.output
        assert elapsed < 2 * FAST, f"{args[0]} {name}: {elapsed:.2f} s"


def test_no_model_is_built_from_declared_sizes(attacks, monkeypatch):
    """validate() checks sizes arithmetically; CharRNN is never called for an attack."""
    built = []
    real_init = CharRNN.__init__

    def spy(self, config):
        built.append(config)
        real_init(self, config)

    monkeypatch.setattr(CharRNN, "__init__", spy)
    for name, (path, _) in attacks.items():
        with pytest.raises(CheckpointError):
            ckpt_mod.load_model(path)
    assert built == []


@pytest.mark.system
def test_rejection_uses_little_memory(attacks, tmp_path):
    """In a fresh process: all attack files rejected, peak memory barely above
    the import baseline, each in well under a second."""
    listing = tmp_path / "files.json"
    listing.write_text(json.dumps({n: str(p) for n, (p, _) in attacks.items()}))
    script = textwrap.dedent(f"""
        import json, resource, time
        import charnn.storage.checkpoint as c
        from charnn.errors import CheckpointError
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = {{}}
        for name, p in json.load(open({str(listing)!r})).items():
            t = time.perf_counter()
            try:
                c.load(p)
            except CheckpointError:
                pass
            else:
                raise SystemExit(f"{{name}} was accepted")
            times[name] = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"grew_mb": (peak - base) / 1024, "times": times}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["grew_mb"] < 150, report
    slow = {k: round(v, 3) for k, v in report["times"].items() if v > FAST}
    assert not slow, slow


def test_a_real_checkpoint_still_loads_and_samples(tmp_path):
    p = save(tmp_path / "good.pt", real_payload())
    model, tok, ck = ckpt_mod.load_model(p)
    assert ck.metrics[0]["train_loss"] == 3.3
    assert len(sample_text(model, tok, "a", 20, seed=1)) == 21


def test_legacy_and_raw_pickles_are_refused(tmp_path):
    good = real_payload()
    legacy = tmp_path / "legacy.pt"
    torch.save(good, legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"format": "charnn-checkpoint"}))
    for p in (legacy, raw):
        with pytest.raises(CheckpointError, match="refusing to load .* bare pickle"):
            ckpt_mod.load(p)


@pytest.mark.system
def test_checkpoint_that_is_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    code = f"import charnn.storage.checkpoint as c\ntry:\n    c.load({str(fifo)!r})\nexcept Exception as e:\n    print(e)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "not a regular file" in run.stdout, run.stdout + run.stderr


# ---------------------------------------------------------------------------
# Finite weights that overflow
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def overflowing(tmp_path_factory) -> Path:
    """Every weight finite, but the head's products overflow fp32."""
    good = real_payload(seed=1)
    sd = dict(good["model_state"])
    sd["head.weight"] = torch.full_like(sd["head.weight"], 3e38)
    sd["embedding.weight"] = torch.full_like(sd["embedding.weight"], 1.0)
    path = tmp_path_factory.mktemp("overflow") / "overflow.pt"
    return save(path, {**good, "model_state": sd})


def test_overflowing_weights_load_but_sampling_says_why(overflowing):
    model, tok, _ = ckpt_mod.load_model(overflowing)  # finite: loads
    for call in (lambda: "".join(generate(model, tok, "a", 50, seed=1)),
                 lambda: "".join(generate(model, tok, "a", 50, temperature=0)),
                 lambda: generate_samples(model, tok, "a", 50, num_samples=3, seed=1, top_p=0.9),
                 lambda: sample_text(model, tok, "", 10, seed=2)):
        with pytest.raises(NonFiniteError, match="non-finite .* use an earlier checkpoint"):
            call()


def test_overflowing_weights_eval_says_why_not_nan(overflowing):
    model, tok, _ = ckpt_mod.load_model(overflowing)
    ids = tok.encode_array("the cat sat on a mat. " * 20)
    with pytest.raises(NonFiniteError, match="non-finite"):
        evaluate_ids(model, ids)
    with pytest.raises(NonFiniteError, match="non-finite"):
        surprisal(model, ids)
    # A trainer with its own NaN guard may ask for the raw NaN instead.
    assert math.isnan(evaluate_ids(model, ids, check_finite=False).loss)


def test_overflowing_weights_cli(overflowing, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on a mat.\n" * 5, encoding="utf-8")
    runner = CliRunner()
    for args in (["sample", str(overflowing), "-n", "20", "--seed", "1"],
                 ["sample", str(overflowing), "-n", "20", "-m", "3", "--seed", "1"],
                 ["eval", str(overflowing), str(corpus)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "Error: the model produced non-finite values" in result.stderr, result.stderr
        assert "Traceback" not in result.output


def test_sane_weights_skip_the_per_step_check():
    from charnn.generation.sample import Sampler

    torch.manual_seed(0)
    model = CharRNN(tiny_config()).eval()
    assert not Sampler(model, CharTokenizer(VOCAB), 1.0).check_every_step
    # The pick divides (logits - max) <= 0 by T in float64: a tiny T gives -inf, never NaN, so it
    # needs no check either, and picks the most likely character as greedy does.
    tiny = Sampler(model, CharTokenizer(VOCAB), 5e-324, top_k=3)
    assert not tiny.check_every_step
    greedy = Sampler(model, CharTokenizer(VOCAB), 0.0)
    prime = [1, 2, 3]
    assert [int(i) for i in tiny.ids(prime, 40, [7])] == [int(i) for i in greedy.ids(prime, 40, [7])]


# ---------------------------------------------------------------------------
# Inputs have bounds
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save(tmp_path_factory.mktemp("good") / "good.pt", real_payload())


def _run_limited(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """In a child process with a timeout, so a regression that blocks fails
    instead of hanging the suite."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.system
def test_prime_file_fifo_never_blocks(tmp_path, ckpt):
    fifo = tmp_path / "prime.fifo"
    os.mkfifo(fifo)  # no writer ever opens it: a blocking open() would wait forever
    lib = _run_limited(f"from charnn.generation.sample import read_prime_file\ntry:\n    read_prime_file({str(fifo)!r})\n"
                       "except Exception as e:\n    print(type(e).__name__, e)")
    assert "DataError" in lib.stdout and "FIFO" in lib.stdout, lib.stdout + lib.stderr
    cli = _run_limited(textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from charnn.cli import app
        r = CliRunner().invoke(app, ["sample", {str(ckpt)!r}, "--prime-file", {str(fifo)!r}, "-n", "5"])
        print(r.exit_code); print(r.stderr)
    """))
    assert cli.stdout.startswith("1\n") and "FIFO" in cli.stdout and "Traceback" not in cli.stdout, cli.stdout


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_prime_file_device_is_refused(ckpt):
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="is a device, not a regular file"):
        read_prime_file("/dev/zero")
    assert time.perf_counter() - t0 < FAST
    result = CliRunner().invoke(app, ["sample", str(ckpt), "--prime-file", "/dev/zero", "-n", "5"])
    assert result.exit_code == 1 and "device" in result.stderr and "Traceback" not in result.output


def test_prime_file_folder_and_size_limit(tmp_path, ckpt):
    with pytest.raises(DataError, match="folder"):
        read_prime_file(tmp_path)
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: no disk used
        f.truncate(MAX_PRIME_FILE_BYTES + 1)
    with pytest.raises(DataError, match=r"at most 4\.2 MB .*MAX_PRIME_FILE_BYTES"):
        read_prime_file(big)
    ok = tmp_path / "ok.txt"
    ok.write_text("the cat\r\n", encoding="utf-8")
    assert read_prime_file(ok) == "the cat\n"
    result = CliRunner().invoke(app, ["sample", str(ckpt), "--prime-file", str(big), "-n", "5"])
    assert result.exit_code == 1 and "MAX_PRIME_FILE_BYTES" in result.stderr


def test_prime_length_limit(ckpt):
    model, tok, _ = ckpt_mod.load_model(ckpt)
    with pytest.raises(ConfigError, match="MAX_PRIME_CHARS"):
        sample_text(model, tok, "a" * (MAX_PRIME_CHARS + 1), 5, seed=1)
    # A long prime within the limit is read in chunks (bounded activations).
    long = ("the cat sat on a mat. " * 1000)[:20_000]
    assert sample_text(model, tok, long, 5, seed=1).startswith(long)


def test_num_samples_memory_is_bounded(ckpt):
    model, tok, _ = ckpt_mod.load_model(ckpt)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"the limit is 2\.1 GB \(charnn\.generation\.sample\.MAX_SAMPLE_MEMORY\)"):
        generate_samples(model, tok, "a", 10_000, num_samples=10**6, seed=1)
    with pytest.raises(ConfigError, match="MAX_SAMPLE_MEMORY|free"):
        generate_samples(model, tok, "a", 10**9, num_samples=4, seed=1)
    assert time.perf_counter() - t0 < FAST
    result = CliRunner().invoke(app, ["sample", str(ckpt), "-m", "1000000", "-n", "10000", "--seed", "1"])
    assert result.exit_code == 1 and "MAX_SAMPLE_MEMORY" in result.stderr, result.output
    assert MAX_SAMPLE_MEMORY == 2 << 30


@pytest.mark.parametrize("seed", [2**64, -1, 10**30, 10**5000], ids=["2**64", "-1", "1e30", "1e5000"])
def test_seeds_beyond_64_bits(ckpt, seed):
    model, tok, _ = ckpt_mod.load_model(ckpt)
    with pytest.raises(ConfigError, match=r"seed must be between 0 and 2\*\*64-1"):
        generate(model, tok, "a", 5, seed=seed)
    with pytest.raises(ConfigError, match="seed"):
        generate_samples(model, tok, "a", 5, num_samples=2, seed=seed)
    if seed < 10**100:
        result = CliRunner().invoke(app, ["sample", str(ckpt), "-n", "5", "--seed", str(seed)])
        assert result.exit_code in (1, 2) and "seed" in result.output and "Traceback" not in result.output


def test_last_seed_of_a_batch_must_fit(ckpt):
    model, tok, _ = ckpt_mod.load_model(ckpt)
    top = 2**64 - 1
    assert len(generate_samples(model, tok, "a", 3, num_samples=1, seed=top)) == 1
    with pytest.raises(ConfigError, match=r"seed\+1 must fit"):
        generate_samples(model, tok, "a", 3, num_samples=2, seed=top)


def test_one_default_temperature(ckpt):
    import inspect

    from charnn.generation.sample import Sampler

    for fn in (generate, generate_samples, Sampler.__init__):
        assert inspect.signature(fn).parameters["temperature"].default == DEFAULT_TEMPERATURE == 0.8
    model, tok, _ = ckpt_mod.load_model(ckpt)
    assert sample_text(model, tok, "a", 40, seed=5) == sample_text(model, tok, "a", 40, seed=5, temperature=0.8)
    assert sample_text(model, tok, "a", 40, seed=5) != sample_text(model, tok, "a", 40, seed=5, temperature=1.0)


# ---------------------------------------------------------------------------
# A model too large to allocate
# ---------------------------------------------------------------------------

def test_model_too_large_says_how_much_memory():
    cfg = ModelConfig(vocab_size=100, hidden_size=200_000, num_layers=2)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"a 2x200000 LSTM needs 1\.9 TB for its weights \(about 4x that to "
                                          r"train\); this machine has .* free"):
        CharRNN(cfg)
    assert time.perf_counter() - t0 < FAST


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 3])
def test_arithmetic_shapes_match_torch(cell, layers):
    cfg = tiny_config(cell=cell, num_layers=layers, hidden_size=12, embedding_dim=5)
    model = CharRNN(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == parameter_shapes(cfg)
    assert parameter_count(cfg) == model.num_parameters()


# ---------------------------------------------------------------------------
# safe_display
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw, shown", [
    ("plain é 中文 😀 ok", "plain é 中文 😀 ok"),
    ("a\x1b[31mred", "a\\x1b[31mred"),
    ("x\u202eevil", "x\\u202eevil"),
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
    ("line\nbreak\ttab\r", "line\\x0abreak\\x09tab\\x0d"),
    ("c1 \x9b csi \x85", "c1 \\x9b csi \\x85"),
    ("zero\u200bwidth \u2028sep", "zero\\u200bwidth \\u2028sep"),
    ("nbsp\xa0ideographic\u3000space", "nbsp\xa0ideographic\u3000space"),
])
def test_safe_display(raw, shown):
    assert safe_display(raw) == shown
    shown.encode("utf-8")  # printable: no lone surrogate survives


def test_safe_display_keep_and_limit():
    assert safe_display("a\nb\x1b", keep="\n") == "a\nb\\x1b"
    assert safe_display("x" * 300, limit=10) == "x" * 10 + "... (290 more characters)"
    assert safe_display(12) == "12"


def test_largest_allowed_pickle_is_parsed_in_bounded_time(tmp_path):
    """The cap on data.pkl bounds torch's (pure Python) unpickler: a pickle of
    the cheapest opcodes just under the cap is refused in seconds, not minutes
    (about 1.1 s on an idle core; the cap exists because 4 MB took 9 s)."""
    n = ckpt_mod.MAX_PICKLE_BYTES
    p = craft(tmp_path / "max.pt", pkl=b"\x80\x02]" + b"]a" * ((n - 8) // 2) + b".")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError):
        ckpt_mod.load(p)
    assert time.perf_counter() - t0 < 6.0
    over = craft(tmp_path / "over.pt", pkl=b"\x80\x02]" + b"]a" * (n // 2) + b".")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="object pickle is"):
        ckpt_mod.load(over)
    assert time.perf_counter() - t0 < 0.1
