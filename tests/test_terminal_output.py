"""The CLI's screens and outputs: every --help at 80 columns, the training
progress line at 80 columns, ``eval --show`` colours, strict JSON, and
standard output that is full, closed or a pipe whose reader left (real
processes, real /dev/full, a real closed fd, a real pipe), plus the messages'
grammar."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import assert_clean_error, invoke

REPO = Path(__file__).resolve().parents[1]
# Every command's help follows the conventions in charnn/cli/common.py.
CONVENTIONAL = {"charnn", "train", "sample", "eval", "info", "inspect", "serve"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    for k in ("COLUMNS", "LINES", "PYTHONUNBUFFERED", "RANK", "FORCE_COLOR"):
        e.pop(k, None)
    e.update(extra)
    return e


def charnn(*args, **kw) -> subprocess.CompletedProcess:
    """``python -m charnn ARGS`` as a real process (bytes arguments pass as they are)."""
    argv = [sys.executable, "-m", "charnn", *[a if isinstance(a, bytes) else str(a) for a in args]]
    return subprocess.run(argv, capture_output=True, env=kw.pop("env", None) or env(), timeout=120, **kw)


def shell(command: str) -> subprocess.CompletedProcess:
    """``command`` through bash (for ``>&-`` and real pipelines); ``CHARNN``
    in it is this interpreter's ``python -m charnn``."""
    cmd = command.replace("CHARNN", f"{sys.executable} -m charnn")
    return subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], capture_output=True, env=env(), timeout=180)


def assert_quiet(stderr: bytes) -> None:
    text = stderr.decode(errors="replace")
    assert "Traceback" not in text and "Exception ignored" not in text, text


# ---------------------------------------------------------------------------
# --help at 80 columns
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    import typer

    from charnn.cli import app

    out = {}
    for cmd in [[]] + [[name] for name in typer.main.get_command(app).commands]:
        done = charnn(*cmd, "--help", env=env(COLUMNS="80"))
        assert done.returncode == 0, done.stderr
        out[" ".join(cmd) or "charnn"] = done.stdout.decode()
    return out


@pytest.mark.system
def test_every_help_fits_80_columns(helps):
    assert CONVENTIONAL <= set(helps)
    for name, text in helps.items():
        long = [line for line in text.splitlines() if len(line) > 80]
        assert not long, (name, long)
        assert "<bool>" not in text, (name, text)  # flags take no value
        assert "╭" not in text and "│" not in text, name  # plain click help, not squeezed rich panels


@pytest.mark.system
def test_help_has_one_default_style_and_named_values(helps):
    for name in CONVENTIONAL:
        text = helps[name]
        assert not re.search(r"<(int|float|str|path|list)", text), (name, text)  # a metavar names the value
        assert not re.search(r"x[<>]=", text), (name, text)  # bounds in words, not "x>=1"
        assert "(default" not in text and "Default:" not in text, (name, text)  # only "[default: X]"
    for name in ("sample", "eval", "info"):
        assert "CHECKPOINT" in helps[name]
    assert "[default: 0.8]" in helps["sample"] and "[default: 500]" in helps["sample"]


@pytest.mark.system
def test_train_help_states_the_automatic_values_the_code_uses(helps):
    from charnn.training import schedule

    text = " ".join(helps["train"].split())
    assert (f"[default: {schedule.AUTO_WARMUP_STEPS} steps or {schedule.AUTO_WARMUP_SHARE:.0%} of the budget, "
            "whichever is shorter]") in text, text
    assert (f"[default: about {schedule.AUTO_EVALS} times per run, at most every {schedule.MAX_EVAL_EVERY:,} "
            "steps]") in text, text
    assert f"[default: up to {schedule.AUTO_EVAL_CHARS:,}, fewer" in text, text


@pytest.mark.system
def test_help_descriptions_get_room(helps):
    """Descriptions start by column 34 and so get at least ~45 columns."""
    for name, text in helps.items():
        for line in text.splitlines():
            m = re.match(r"  (-\S.*?)  +(\S.*)$", line)
            if m:
                assert line.index(m.group(2)) <= 34, (name, line)


@pytest.mark.system
def test_help_text_is_not_eaten_by_markup_and_states_units(helps):
    helps = {k: " ".join(v.split()) for k, v in helps.items()}  # as read, not as wrapped
    assert "charnn[plot]" in helps["info"]
    assert "--threads N" in helps["sample"] and "--threads N" in helps["eval"]
    assert "idle cores, at most 4" in helps["eval"]
    assert "cuda:N" in helps["sample"] and "cuda:N" in helps["eval"]
    assert "Characters to generate" in helps["sample"]
    assert "seconds" in helps["train"]  # a bare number for --time-limit
    assert "eval" in helps["charnn"] and "Generate text from a checkpoint." in helps["charnn"]


# ---------------------------------------------------------------------------
# The training progress line
# ---------------------------------------------------------------------------

START = {"kind": "start", "model_config": {"cell": "lstm", "num_layers": 2, "hidden_size": 320, "embedding_dim": 128,
                                           "dropout": 0.1},
         "config": {"max_steps": 0, "epochs": 0, "time_limit": 300, "batch_size": 16, "seq_len": 64, "lr": 0.007},
         "parameters": 1412450, "train_chars": 3600000, "val_chars": 400000, "vocab_size": 98, "device": "cpu",
         "precision": "fp32", "world_size": 1, "out_dir": "checkpoints/a-rather-long-corpus-name", "resumed_at": 0}


def log(step: int, progress: float) -> dict:
    return {"kind": "log", "step": step, "train_loss": 1.23456, "lr": 7e-3, "grad_norm": 0.5234,
            "clipped_share": 0.03, "chars_per_sec": 12345.6, "elapsed": 200.0, "progress": progress, "epoch": 0.5}


def bar_lines(reporter) -> list[str]:
    """The progress bar as it is drawn now, at the reporter's console width."""
    view = Console(width=reporter.console.width, record=True, file=io.StringIO(), color_system=None)
    reporter.progress.refresh()
    view.print(reporter.progress.get_renderable())
    return view.export_text().rstrip("\n").splitlines()


@pytest.mark.parametrize("width", [80, 100, 160])
def test_progress_bar_keeps_its_fields_at_80_columns(width):
    from charnn.cli.progress import TrainReporter

    console = Console(width=width, record=True, force_terminal=True, file=io.StringIO())
    reporter = TrainReporter(sample_every=0, console=console)
    with reporter:
        reporter({"kind": "status", "message": "reading corpus"})
        (line,) = bar_lines(reporter)
        assert line.startswith("train") and "0%" in line and "ETA" in line and "reading corpus" in line
        reporter(START)
        reporter({"kind": "status", "message": "calibrating evaluation"})
        assert "calibrating evaluation" in bar_lines(reporter)[0]
        reporter(log(1000, 0.25))
        reporter({"kind": "eval", "step": 1000, "val_loss": 1.6123, "val_bpc": 1.6123 / math.log(2), "improved": True})
        reporter(log(12345, 0.6))
        (line,) = bar_lines(reporter)
        assert len(line) <= width, line
        for field in ("train", "━", "60%", "ETA", "step 12,345", "loss 1.235", "val 1.612"):
            assert field in line, (field, line)
        if width >= 160:
            assert "chars/s" in line and "lr 7.00e-03" in line
        reporter({"kind": "status", "message": "evaluating at step 12,345"})
        (line,) = bar_lines(reporter)
        assert "step 12,345" in line and "evaluating" in line and len(line) <= width
        assert "at step" not in line  # the bar shows the step once
        reporter({"kind": "end", "step": 12400, "stopped_because": "budget"})
        (line,) = bar_lines(reporter)
        assert "100%" in line and "ETA 0:00" in line and "step 12,400" in line


def test_plain_log_lines_fit_80_columns():
    from charnn.cli.progress import TrainReporter

    out = io.StringIO()
    console = Console(width=80, file=out, color_system=None)  # not a terminal: log lines
    reporter = TrainReporter(sample_every=0, console=console)
    with reporter:
        reporter({"kind": "status", "message": "reading corpus"})
        reporter(START)
        reporter(log(10, 0.01))
        reporter({"kind": "eval", "step": 10, "val_loss": 1.6123, "val_bpc": 2.326, "improved": False})
        reporter(log(20, 0.02))
        reporter({"kind": "warning", "message": "a rather long warning " * 8})
    lines = out.getvalue().splitlines()
    assert lines[0] == "reading corpus"
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert any("step 20 loss 1.235" in line and "val 1.612" in line for line in lines), lines
    assert "1 parameter" not in out.getvalue() and "1,412,450 parameters" in out.getvalue()


def test_sample_preview_lines_fit():
    from charnn.cli.progress import TrainReporter

    reporter = TrainReporter(sample_every=0, console=Console(width=80, file=io.StringIO()))
    text = reporter.preview("x" * 300 + "\n\x1b[31mred\tline\n" + "y" * 20)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines) and lines[0].endswith("…")
    assert "\x1b" not in text and "\\u001b[31mred line" in text


# ---------------------------------------------------------------------------
# eval --show: only the first character dim; the bands distinct at 16, 256 and true colour
# ---------------------------------------------------------------------------

def _render(console: Console, renderable) -> str:
    console.print(renderable)
    return console.file.getvalue()


def test_show_dims_only_the_first_character():
    from charnn.cli.eval import band_styles, surprisal_line

    styles = band_styles("truecolor")
    line = surprisal_line("abcd", [0.1, 3.0, 9.0], styles)
    console = Console(color_system="truecolor", force_terminal=True, file=io.StringIO(), width=80)
    segments = [s for s in console.render(line) if s.text.strip()]
    assert segments[0].text == "a" and segments[0].style.dim
    assert all(not s.style.dim for s in segments[1:]), segments
    assert all(s.style.bgcolor is not None for s in segments[1:])


@pytest.mark.parametrize("system", ["standard", "256", "truecolor"])
def test_surprisal_bands_are_distinct(system):
    from charnn.cli.eval import band_styles, surprisal_legend
    from charnn.analysis.report import BANDS

    console = Console(color_system=system, force_terminal=True, file=io.StringIO(), width=200)
    assert console.color_system == system
    ansi = _render(console, surprisal_legend(band_styles(console.color_system)))
    codes = []
    for _, _, label in BANDS:
        m = re.search(r"((?:\x1b\[[0-9;]*m)+) " + re.escape(label) + " ", ansi)
        assert m, (label, ansi)
        codes.append(m.group(1))
    assert len(set(codes)) == len(BANDS), (system, codes)


@pytest.mark.system
def test_eval_show_end_to_end_uses_the_terminal_palette(trained, tmp_path):
    """Through the real command: a forced 16-colour terminal gets the named palette."""
    f = tmp_path / "t.txt"
    f.write_text(trained.text[:200], encoding="utf-8")
    done = charnn("eval", trained.best, f, "--show", "--max-chars", "50",
                  env=env(FORCE_COLOR="1", TERM="xterm", COLUMNS="80", COLORTERM=""))
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "\x1b[" in text and "first 50 characters" in ANSI.sub("", text)
    assert "\x1b[2m" in text.split("first 50 characters", 1)[1][:80]  # the dim first character
    assert "\x1b[30;102m" in text and "48;" not in text  # named colours, not rounded hex


# ---------------------------------------------------------------------------
# Strict JSON, odd characters, and standard output that fails
# ---------------------------------------------------------------------------

def strict_loads(text: str):
    def bad(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def test_json_safe_replaces_nan_and_infinity():
    from charnn.cli.common import dumps

    s = dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": (1, "x"), "d": torch.tensor(2.5),
               "e": float("nan")})
    assert strict_loads(s) == {"a": None, "b": [None, None, 1.5], "c": [1, "x"], "d": 2.5, "e": None}


@pytest.fixture(scope="module")
def odd_checkpoint(trained, tmp_path_factory) -> Path:
    """The tiny model with a lone surrogate in its vocabulary (what a corpus
    read with errors=surrogateescape would give), NaN best loss and a NaN
    validation row."""
    data = torch.load(trained.best, map_location="cpu", weights_only=True)
    data["vocab"][-1] = 0xDCFF  # the code points of the characters
    data["train_state"]["best_val"] = math.nan
    data["metrics"] = list(data.get("metrics") or []) + [{"step": 999, "val_loss": math.nan, "train_loss": math.inf}]
    path = tmp_path_factory.mktemp("odd") / "odd.pt"
    torch.save(data, path)
    return path


@pytest.mark.system
def test_info_json_has_no_nan_and_vocab_prints(odd_checkpoint):
    done = charnn("info", odd_checkpoint, "--json")
    assert done.returncode == 0, done.stderr
    data = strict_loads(done.stdout.decode())
    assert data["best_val_loss"] is None and data["best_val_bpc"] is None
    assert data["vocab"][-1] == "\udcff"
    plain = charnn("info", odd_checkpoint)
    assert plain.returncode == 0, plain.stderr
    assert_quiet(plain.stderr)
    assert b"\\udcff" in plain.stdout  # escaped, not a crash


def test_eval_json_is_strict(trained, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(trained.text[:300], encoding="utf-8")
    result = invoke("eval", trained.best, f, "--json")
    assert result.exit_code == 0, result.output
    strict_loads(result.stdout)


@pytest.mark.system
def test_generated_lone_surrogates_print(odd_checkpoint):
    """The prime is given as the byte 0xff, which Python's argv decoding turns
    into the lone surrogate the vocabulary holds; printing it must not crash."""
    done = charnn("sample", odd_checkpoint, "-p", b"ab\xff", "-n", "30", "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert_quiet(done.stderr)
    assert done.stdout.startswith(b"ab\\udcff")
    many = charnn("sample", odd_checkpoint, "-p", b"\xff", "-n", "20", "-m", "2", "--json", "--seed", "1")
    assert many.returncode == 0, many.stderr
    assert [d["prime"] for d in json.loads(many.stdout)] == ["\udcff"] * 2


OUTPUT_COMMANDS = {
    "help": "--help",
    "info-json": "info {ckpt} --json",
    "eval": "eval {ckpt} {text}",
    "sample": "sample {ckpt} -n 20000 --seed 3",
    "samples-json": "sample {ckpt} -n 3000 -m 4 --json --seed 3",
}


@pytest.fixture(scope="module")
def text_file(trained, tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "t.txt"
    f.write_text(trained.text[:500], encoding="utf-8")
    return f


@pytest.mark.system
@pytest.mark.parametrize("name", list(OUTPUT_COMMANDS))
def test_full_stdout_is_one_clear_error(name, trained, text_file):
    cmd = OUTPUT_COMMANDS[name].format(ckpt=trained.best, text=text_file)
    done = shell(f"CHARNN {cmd} > /dev/full")
    assert_quiet(done.stderr)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stderr.decode().strip().splitlines()[-1] == "Error: cannot write to standard output: the disk is full."


@pytest.mark.system
@pytest.mark.parametrize("name", list(OUTPUT_COMMANDS))
def test_closed_stdout_is_one_clear_error(name, trained, text_file):
    cmd = OUTPUT_COMMANDS[name].format(ckpt=trained.best, text=text_file)
    done = shell(f"CHARNN {cmd} >&-")
    assert_quiet(done.stderr)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stderr.decode().strip().splitlines()[-1] == "Error: cannot write to standard output: it is closed."


@pytest.mark.system
@pytest.mark.parametrize("name", list(OUTPUT_COMMANDS))
def test_broken_pipe_is_quiet(name, trained, text_file):
    cmd = OUTPUT_COMMANDS[name].format(ckpt=trained.best, text=text_file)
    done = shell(f"CHARNN {cmd} | head -c 10")
    assert len(done.stdout) == 10
    assert_quiet(done.stderr)
    assert done.returncode == 0, (done.returncode, done.stderr)


@pytest.mark.system
def test_training_ignores_a_closed_stdout(session_corpus, tmp_path):
    """train prints nothing on stdout, so a closed one does not matter."""
    done = shell(f"CHARNN train {session_corpus} --out {tmp_path / 'run'} --max-steps 2 --hidden-size 8 "
                 f"--num-layers 1 --seq-len 16 --batch-size 4 --precision fp32 >&-")
    assert_quiet(done.stderr)
    assert done.returncode == 0, done.stderr.decode()
    assert (tmp_path / "run" / "last.pt").exists()


# ---------------------------------------------------------------------------
# Messages, threads, devices, torchrun
# ---------------------------------------------------------------------------

def test_plural():
    from charnn.cli.common import plural

    assert plural(1, "step") == "1 step" and plural(2, "step") == "2 steps" and plural(0, "file") == "0 files"
    assert plural(1000, "character") == "1,000 characters" and plural(1.0, "epoch") == "1 epoch"
    assert plural(0.5, "epoch") == "0.5 epochs" and plural(3, "sample") == "3 samples"


def test_interrupted_is_one_sentence():
    from charnn.cli.common import interrupted_message

    msg = interrupted_message("interrupted at step 7; saved run/last.pt (continue with --resume run/last.pt)")
    assert msg.startswith("Interrupted at step 7;") and msg.lower().count("interrupted") == 1
    assert interrupted_message("") == "Interrupted."
    # The trainer's own message: the command to type last, on its own line, without a full stop.
    msg = interrupted_message("interrupted by SIGTERM at step 7; saved run/last.pt.\n"
                              "Continue with: charnn train --resume run/last.pt")
    assert msg.startswith("Interrupted by SIGTERM at step 7;") and msg.lower().count("interrupted") == 1
    assert msg.splitlines()[-1] == "Continue with: charnn train --resume run/last.pt"


def test_eval_without_files_says_what_it_scored(trained):
    result = invoke("eval", trained.best)
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("scored      validation split of corpus"), first
    assert re.search(r" \(last 10%, [\d,]+ characters\)$", first), first
    data = json.loads(invoke("eval", trained.best, "--json").stdout)
    assert data["scored"] == first.split(None, 1)[1]
    # The header counts what the table counts: the characters scored (the
    # split's first character is only context).
    header = int(re.search(r"([\d,]+) characters\)$", first).group(1).replace(",", ""))
    counted = re.search(r"^characters  ([\d,]+)$", result.stdout, re.M).group(1)
    assert header == int(counted.replace(",", "")) == data["chars"], (first, counted)


def test_eval_singular_and_plural(trained, tmp_path):
    f = tmp_path / "one.txt"
    f.write_text(trained.text[:50] + "λ", encoding="utf-8")
    result = invoke("eval", trained.best, f, "--unknown", "skip")
    assert result.exit_code == 0, result.output
    assert "unknown     1 character outside the vocabulary" in result.stdout
    assert f"scored      {f}" in result.stdout


def test_threads_option(trained):
    before = torch.get_num_threads()
    try:
        assert invoke("sample", trained.best, "-n", 5, "--seed", 1, "--threads", 2).exit_code == 0
        assert torch.get_num_threads() == 2
        assert invoke("sample", trained.best, "-n", 5, "--seed", 1).exit_code == 0
        assert torch.get_num_threads() == 1  # small batches keep one thread when not told
        assert invoke("eval", trained.best, "--threads", 1).exit_code == 0
        assert torch.get_num_threads() == 1
        for cmd in ("sample", "eval"):
            r = invoke(cmd, trained.best, "--threads", 0)
            assert r.exit_code == 2 and "--threads" in r.stderr and "at least 1" in r.stderr
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages without a GPU")
def test_device_cuda_n(trained):
    for cmd in ("sample", "eval"):
        assert_clean_error(invoke(cmd, trained.best, "--device", "cuda:1"), "cuda:1", "no CUDA GPU")
        r = invoke(cmd, trained.best, "--device", "cuda:x")
        assert r.exit_code == 2 and "cuda:N" in r.stderr
        assert invoke(cmd, trained.best, "--device", "CPU", *(["-n", 5] if cmd == "sample" else [])).exit_code == 0


def test_resolve_device_counts_gpus(monkeypatch):
    from charnn.model.devices import resolve_device
    from charnn.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"cuda:2 asked for, but this machine has 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.system
def test_errors_print_once_under_torchrun(tmp_path):
    missing = tmp_path / "missing.pt"
    quiet = charnn("info", missing, env=env(RANK="1", WORLD_SIZE="2"))
    assert quiet.returncode == 1 and quiet.stderr == b""
    loud = charnn("info", missing, env=env(RANK="0", WORLD_SIZE="2"))
    assert loud.returncode == 1 and loud.stderr.decode().startswith("Error: ")
