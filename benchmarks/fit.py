"""Which model size fits which text and budget: charnn trained on a suite of
corpora over a grid of shapes, budgets and seeds (GitHub issue 12).

A cell is (corpus, budget, config, seed). Each runs the real CLI in a fresh
process, ``charnn train CORPUS --time-limit B --seed S --threads T <config>``,
then ``charnn eval best.pt --json``, which scores the whole validation split
(the last 10% of the text): that loss, in nats per character, is the figure.
One CSV row per finished cell is appended to benchmarks/results/fit.csv; a
cell already there is skipped, so a stopped run picks up where it was.

    python benchmarks/fit.py corpora                    # build the corpus suite, print its table
    python benchmarks/fit.py plan [--phase all]         # the cells and the machine time they need
    python benchmarks/fit.py run --phase 1m [--corpus NAME...] [--config NAME...] [--seeds 1337,1,2] [--dry-run]
    python benchmarks/fit.py run --phase 5m             # the best of 1m and 2 rungs up, with v0.1 and auto
    python benchmarks/fit.py run --phase 20m            # the best of 5m and 1 rung up, on the corpora marked for it
    python benchmarks/fit.py run --phase 5m --corpus kjv-1m   # the held-out text: v0.1 and auto only
    python benchmarks/fit.py table                      # Markdown tables (docs/gen_tables.py puts them in the docs)

Run it on an otherwise idle machine: each cell holds /tmp/charnn-bench.lock
(``--lock``) while it runs, and the 1-minute load average before and after is
recorded with it. Ctrl-C (or SIGTERM) stops between or during cells; the
interrupted cell is not recorded and runs again next time.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bigram import VAL_FRACTION, bigram_result, val_count  # noqa: E402
from corpora import CORPORA, BY_NAME, CorpusFile, MissingSource, build, markdown_table  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "fit.csv"
CORPORA_MD = HERE / "results" / "CORPORA.md"
LOCK = "/tmp/charnn-bench.lock"
SEEDS = [1337]  # charnn's default seed; --seeds adds more for the spread

# ---------------------------------------------------------------------------
# The grid: every config is a set of `charnn train` options
# ---------------------------------------------------------------------------

V01 = {"hidden": 320, "layers": 2, "embed": 128, "dropout": 0.1}  # charnn 0.1's defaults
#                     name          hidden layers embed dropout weight decay (None: charnn's 0.01)
GRID = [("2x128-d0",              128,   2,   64,   0.0,  None),  # charnn.model.sizing.LADDER's shapes...
        ("2x192-d0",              192,   2,   64,   0.0,  None),
        ("2x256-d0",              256,   2,   96,   0.0,  None),
        ("2x320-d0",              320,   2,  128,   0.0,  None),
        ("2x448-d0",              448,   2,  128,   0.0,  None),
        ("2x128-d30",             128,   2,   64,   0.3,  None),  # ...and regularisation for many epochs
        ("2x256-d30",             256,   2,   96,   0.3,  None),
        ("2x256-d30-wd10",        256,   2,   96,   0.3,  0.1)]


def shape_options(hidden: int, layers: int, embed: int, dropout: float,
                  wd: float | None = None) -> tuple[str, ...]:
    opts = ("--hidden-size", str(hidden), "--num-layers", str(layers), "--embedding-dim", str(embed),
            "--dropout", str(dropout))
    return opts + (("--weight-decay", str(wd)) if wd is not None else ())


CONFIGS: dict[str, tuple[str, ...]] = {
    "v0.1": shape_options(**V01),  # spelled out: keeps its meaning when the default becomes auto
    "auto": (),  # charnn's own choice: no size options
    **{name: shape_options(*row) for name, *row in GRID},
}
BASELINES = ("v0.1", "auto")  # in every phase, on every corpus
# Not charnn: nanoGPT's CPU recipe (benchmarks/nanogpt.py), the reference
# charnn is compared with, in the phases marked for it, on every corpus.
REFERENCES = ("nanogpt",)
NANOGPT = Path(__file__).resolve().with_name("nanogpt.py")


# How charnn reads its text: "auto" (charnn chooses from the epochs the
# budget buys), "shuffled" (blocks in a new random order each epoch) or
# "in-order" (each stream one stretch). A row's order is read from its
# options; a row with no order flag was read in order. v0.1 is charnn 0.1's
# baseline: its shape, in order.
ORDERS = ("auto", "shuffled", "in-order")
ORDER_FLAGS = {"auto": ("--order", "auto"), "shuffled": ("--shuffle",), "in-order": ("--no-shuffle",)}


def config_options(config: str, has_size: bool, order: str | None = None) -> tuple[str, ...]:
    """The options of a config for this charnn: with a --size option, auto
    asks for it and every other config says --size fixed, so that nothing
    but the options given shapes the model; with ``order``, the flag that
    says how it reads the text (v0.1: always --no-shuffle)."""
    if config in REFERENCES:
        return ()
    opts = CONFIGS[config]
    if has_size:
        opts += ("--size", "auto" if config == "auto" else "fixed")
    if order is not None:
        opts += ORDER_FLAGS["in-order" if config == "v0.1" else order]
    return opts


def order_of(config: str, options: str | tuple[str, ...]) -> str:
    """A cell's reading order from its charnn options; "" for what is not charnn."""
    if config in REFERENCES or config == "bigram":
        return ""
    words = list(options.split() if isinstance(options, str) else options)
    if "--order" in words[:-1]:
        return words[words.index("--order") + 1]
    return "shuffled" if "--shuffle" in words else "in-order"


def order_label(order: str) -> str:
    return {"auto": "order auto", "shuffled": "shuffled", "in-order": "in order"}[order]


def row_in_order_table(r: dict, order: str) -> bool:
    """Whether a results row belongs to the table of ``order``: charnn's rows
    of that order, the references and the bigram, and v0.1 (always in order)."""
    return order_of(r["config"], r.get("options", "")) in ("", order) or r["config"] == "v0.1"


@dataclass(frozen=True)
class Phase:
    seconds: int  # --time-limit of each cell
    top: int  # 0: the whole grid; N: the N best grid configs of `previous`, per corpus
    previous: str | None
    long_only: bool  # only the corpora marked long_runs
    up: int = 0  # also this many shapes up the ladder from the largest of those
    references: bool = False  # also nanoGPT's recipe (REFERENCES)


# A budget five times longer buys about five times the steps, and the 1-minute
# results say the best size grows with the steps (sizing.STEPS_PER_MPARAM:
# five times the steps is about two rungs of the ladder, four times about one
# and a half). So each later phase runs the previous phase's best grid config
# and the rungs above it (same regularisation where the grid has it), each
# with v0.1 and auto. 1m about 1.1 h, 5m about 2.3 h, 20m about 2.8 h on 2
# cores; scoring the whole 2.1M-character validation split of python-src
# takes minutes for the larger models.
PHASES = {"1m": Phase(60, 0, None, False),
          "5m": Phase(300, 1, "1m", False, up=2, references=True),
          "20m": Phase(1200, 1, "5m", True, up=1)}


def rung_up(config: str) -> str | None:
    """The grid config one ladder rung larger than `config`: the same layers
    and regularisation where the grid has that, else without regularisation;
    None at the top of the grid."""
    rows = {name: row for name, *row in GRID}
    hidden, layers, _, dropout, wd = rows[config]
    larger = sorted((row[0], name) for name, row in rows.items() if row[0] > hidden and row[1] == layers)
    if not larger:
        return None
    for reg in ((dropout, wd), (0.0, None)):
        same = [name for h, name in larger if h == larger[0][0] and tuple(rows[name][3:]) == reg]
        if same:
            return same[0]
    return None


@dataclass(frozen=True)
class Cell:
    corpus: CorpusFile
    budget: str  # a phase name ("1m") or any --time-limit text in tests
    seconds: int
    config: str
    options: tuple[str, ...]
    seed: int

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        return (self.corpus.spec.name, self.corpus.sha256, self.budget, self.config, str(self.seed),
                order_of(self.config, self.options))

    def label(self) -> str:  # also the log's name: rows from before --shuffle have no order in it
        flag = f" {order_label(order_of(self.config, self.options))}" if any(
            f in self.options for f in ("--shuffle", "--no-shuffle", "--order")) else ""
        return f"{self.corpus.spec.name} {self.budget} {self.config}{flag} seed {self.seed}"


# ---------------------------------------------------------------------------
# The results file: one row per finished cell, appended and synced
# ---------------------------------------------------------------------------

FIELDS = ["corpus", "corpus_sha256", "budget", "config", "seed", "val_loss", "val_bpc", "error",
          "options", "budget_s", "corpus_chars", "vocab", "train_chars", "val_chars",
          "model", "steps", "epochs", "parameters", "train_loss", "best_step", "precision", "threads",
          "train_wall_s", "eval_wall_s", "size_line", "load1_before", "load1_after",
          "charnn_commit", "started"]


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    """Append one row (header first in a new file), then flush and fsync, so
    a crash loses at most the cell that was running."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            sys.exit(f"{path} has other columns than this script writes; move it away to start a new one")
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: _fmt(row.get(k, "")) for k in FIELDS})
        f.flush()
        os.fsync(f.fileno())


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def done_keys(rows: list[dict]) -> tuple[set, set]:
    """(keys with a successful row, keys with only failed rows)."""
    ok = {_key(r) for r in rows if not r["error"]}
    failed = {_key(r) for r in rows if r["error"]} - ok
    return ok, failed


def _key(r: dict) -> tuple[str, str, str, str, str, str]:
    return (r["corpus"], r["corpus_sha256"], r["budget"], r["config"], r["seed"],
            order_of(r["config"], r.get("options", "")))


# ---------------------------------------------------------------------------
# Running one cell: the real CLI, in fresh processes
# ---------------------------------------------------------------------------

class CellError(Exception):
    """The cell ran and failed; recorded with its message."""


class Interrupted(Exception):
    """charnn was stopped by a signal we did not expect; the suite stops."""


def charnn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "charnn", *args]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # charnn saves and exits 130; we discard the run anyway
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run(cmd: list[str], stdout, log, timeout: float, what: str = "") -> tuple[int, float]:
    """(exit code, wall seconds); Ctrl-C or SIGTERM here stops the child too."""
    what = what or f"charnn {cmd[3]}"
    t0 = time.perf_counter()
    # rich wraps what it prints at 80 columns when stderr is not a terminal: one line per line
    env = {**os.environ, "COLUMNS": "1000"}
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=log, stdin=subprocess.DEVNULL, env=env)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise CellError(f"{what} took over {timeout:.0f} s; stopped") from None
    except BaseException:
        _stop(proc)
        raise
    if rc in (-2, -15, 129, 130, 143):
        raise Interrupted(f"{what} was stopped by a signal (exit {rc})")
    return rc, time.perf_counter() - t0


def _error_line(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    return ((errors or lines or ["no output"])[-1])[:300]


SIZE_LINE = re.compile(r"(?i)(?<![\w-])size\b")  # charnn's "size: ..." -- not hidden_size, --size


def _metrics(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "train_loss" in r]
    val = [r for r in rows if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"]) if val else {}
    return {"steps": rows[-1]["step"] if rows else 0,
            "epochs": max((r["epoch"] for r in rows if "epoch" in r), default=0.0),
            "train_loss": train[-1]["train_loss"] if train else "",
            "best_step": best.get("step", "")}


def run_cell(cell: Cell, threads: int, logs: Path) -> dict:
    """Train, evaluate and describe one cell; a CellError if charnn failed."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / (re.sub(r"[^\w.-]+", "_", cell.label()) + ".log")
    if cell.config in REFERENCES:
        return run_reference(cell, threads, log_path)
    tmp = Path(tempfile.mkdtemp(prefix="charnn-fit-"))
    run = tmp / "run"
    row: dict = {"threads": threads, "load1_before": round(os.getloadavg()[0], 2)}
    try:
        with open(log_path, "w") as log:
            train = charnn_cmd("train", str(cell.corpus.path), "--time-limit", str(cell.seconds),
                               "--out", str(run), "--overwrite", "--seed", str(cell.seed),
                               "--threads", str(threads), *cell.options,
                               # the suite measures the size rule: every cell trains from scratch
                               *(["--base", "none"] if charnn_has_option("--base") else []))
            log.write(" ".join(train) + "\n")
            log.flush()
            rc, row["train_wall_s"] = _run(train, log, log, timeout=cell.seconds * 2 + 900)
            if rc:
                raise CellError(f"charnn train exited {rc}: {_error_line(log_path)}")
            with open(tmp / "eval.json", "w") as out:
                rc, row["eval_wall_s"] = _run(charnn_cmd("eval", str(run / "best.pt"), "--json",
                                                         "--threads", str(threads)), out, log, timeout=7200)
            if rc:
                raise CellError(f"charnn eval exited {rc}: {_error_line(log_path)}")
            with open(tmp / "info.json", "w") as out:
                rc, _ = _run(charnn_cmd("info", str(run / "last.pt"), "--json"), out, log, timeout=600)
            if rc:
                raise CellError(f"charnn info exited {rc}: {_error_line(log_path)}")
        row["load1_after"] = round(os.getloadavg()[0], 2)
        return _describe(row, cell, run, tmp, log_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_reference(cell: Cell, threads: int, log_path: Path) -> dict:
    """nanoGPT's recipe on the cell's corpus and budget, scored like charnn
    (the whole held-out split); a CellError if it failed."""
    tmp = Path(tempfile.mkdtemp(prefix="charnn-fit-"))
    row: dict = {"threads": threads, "load1_before": round(os.getloadavg()[0], 2)}
    try:
        cmd = [sys.executable, str(NANOGPT), str(cell.corpus.path), "--time-limit", str(cell.seconds),
               "--seed", str(cell.seed), "--threads", str(threads), "--json", str(tmp / "result.json")]
        with open(log_path, "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            rc, wall = _run(cmd, log, log, timeout=cell.seconds * 2 + 900, what="nanogpt.py")
        if rc:
            raise CellError(f"nanogpt.py exited {rc}: {_error_line(log_path)}")
        row["load1_after"] = round(os.getloadavg()[0], 2)
        try:
            got = json.loads((tmp / "result.json").read_text())
            row.update({k: got[k] for k in ("val_loss", "val_bpc", "val_chars", "model", "parameters", "steps",
                                            "epochs", "train_loss", "best_step", "train_wall_s", "eval_wall_s")},
                       precision="fp32", size_line="")
        except (OSError, ValueError, KeyError) as e:
            raise CellError(f"nanogpt.py's output was not what this script reads: {type(e).__name__}: {e}") from None
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _describe(row: dict, cell: Cell, run: Path, tmp: Path, log_path: Path) -> dict:
    """The row's figures, from what charnn wrote: eval's and info's JSON, the
    run's metrics.jsonl, the size line of its log."""
    try:
        evaluated = json.loads((tmp / "eval.json").read_text())
        info = json.loads((tmp / "info.json").read_text())
        if info["train_config"].get("corpus_hash") != cell.corpus.sha256:
            raise CellError("charnn's corpus hash differs from the corpus file's sha256: it read another text")
        size_lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()[1:]
                      if SIZE_LINE.search(line)]
        reason = info["train_config"].get("size_reason")
        m = info["model_config"]
        row.update(val_loss=evaluated["loss"], val_bpc=evaluated["bpc"], val_chars=evaluated["chars"],
                   model=f"{m['cell']} {m['num_layers']}x{m['hidden_size']} e{m['embedding_dim']} "
                         f"d{m['dropout']}",
                   parameters=info["parameters"], precision=info["train_state"].get("precision", ""),
                   size_line=size_lines[0] if size_lines else f"size: {reason}" if reason else "",
                   **_metrics(run))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CellError(f"charnn's output was not what this script reads: {type(e).__name__}: {e}") from None
    return row


# ---------------------------------------------------------------------------
# Choosing the cells
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _train_help() -> str:
    """`charnn train --help`, asked once per run of this script."""
    return subprocess.run(charnn_cmd("train", "--help"), capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}).stdout


def charnn_has_option(flag: str) -> bool:
    """Whether `charnn train` has ``flag`` (--size: the automatic choice of
    issue 12; --shuffle: the reading order)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}\b", _train_help()) is not None


def charnn_has_size_option() -> bool:
    return charnn_has_option("--size")


def mean_losses(rows: list[dict], corpus: CorpusFile, budget: str, order: str | None = None) -> dict[str, float]:
    """Mean validation loss over seeds of each config, failed rows left out
    (with ``order``, only the rows of its table)."""
    by: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if (r["corpus"], r["corpus_sha256"], r["budget"]) == (corpus.spec.name, corpus.sha256, budget) \
                and not r["error"] and r["config"] != "bigram" and (order is None or row_in_order_table(r, order)):
            by[r["config"]].append(float(r["val_loss"]))
    return {c: statistics.fmean(v) for c, v in by.items()}


def phase_configs(phase: Phase, corpus: CorpusFile, rows: list[dict],
                  asked: list[str] | None = None, order: str | None = None) -> tuple[list[str], str, int]:
    """The configs a phase runs on a corpus, a note (why, or what is missing),
    and how many grid configs the previous phase has yet to choose. A held-out
    corpus runs the baselines, and grid configs only when ``asked`` names them
    (to check auto's choice there; the rule is never fitted on them)."""
    grid = [name for name, *_ in GRID]
    base = [*BASELINES, *(REFERENCES if phase.references else ())]
    if corpus.spec.role == "holdout":
        checks = [c for c in grid if c in (asked or ())]
        return [*base, *checks], ("held out: the baselines" + (", and the grid configs asked for" if checks
                                                              else " only, never the grid")), 0
    if not phase.top:
        return [*base, *grid], "the whole grid", 0
    prev = {c: v for c, v in mean_losses(rows, corpus, phase.previous, order).items() if c in grid}
    best = sorted(prev, key=prev.get)[: phase.top]
    missing = phase.top - len(best) + (0 if best else phase.up)  # the rungs up come from the best
    note = f"best {phase.top} of {phase.previous}"
    if phase.up and best:
        up = max(best, key=lambda c: scored_weights(CONFIGS[c], 100))
        added = []
        for _ in range(phase.up):
            up = rung_up(up)
            if up is None:
                break
            if up not in best:
                best.append(up)
                added.append(up)
        if added:
            note += f" and {len(added)} rung{'s' * (len(added) > 1)} up ({', '.join(added)})"
    if len(prev) < len(grid):
        note += f" ({len(prev)} of {len(grid)} grid configs measured in {phase.previous})"
    asked_extra = [c for c in grid if c in (asked or ()) and c not in best]
    if asked_extra:  # named with --config: run whatever the previous phase says
        best += asked_extra
        note += f", and asked for: {', '.join(asked_extra)}"
    return [*base, *best], note, missing


def phase_cells(name: str, corpora: list[CorpusFile], rows: list[dict], configs: list[str] | None,
                seeds: list[int], has_size: bool, top: int | None = None,
                order: str | None = None) -> tuple[list[Cell], list[Cell], list[str]]:
    """(cells to run, placeholders for configs the previous phase has yet to
    choose -- priced as v0.1 -- and one note per corpus)."""
    phase = PHASES[name] if top is None or not PHASES[name].top else replace(PHASES[name], top=top)
    cells, pending, notes = [], [], []
    for corpus in corpora:
        if phase.long_only and not corpus.spec.long_runs:
            continue
        chosen, note, missing = phase_configs(phase, corpus, rows, configs, order)
        notes.append(f"{corpus.spec.name}: {note}: {', '.join(chosen)}"
                     + (f"; {missing} still to be chosen from {phase.previous}" if missing else ""))
        for config in chosen:
            if (configs is None or config in configs) and (has_size or config != "auto"):
                options = config_options(config, has_size, order)
                cells += [Cell(corpus, name, phase.seconds, config, options, s) for s in seeds]
        if configs is None:
            pending += [Cell(corpus, name, phase.seconds, "?", config_options("v0.1", has_size, order), s)
                        for _ in range(missing) for s in seeds]
    return cells, pending, notes


# ---------------------------------------------------------------------------
# How long it takes (measured on this project's 2-core machine; `fit.py plan` prices cells with it)
# ---------------------------------------------------------------------------

PROCESS_S = 3.0  # python + torch import, checkpoint load/save, per process
READ_CHARS_PER_S = 5e6  # reading, hashing and encoding the corpus, per process
EVAL_WEIGHT_CHARS_PER_S = 4e10  # fp32 scoring: weights used per character x characters/s
EVAL_MAX_CHARS_PER_S = 2e5  # the fastest scoring gets, however small the model


def scored_weights(options: tuple[str, ...], vocab: int) -> int:
    """Weights each scored character passes through: LSTM layers and the head."""
    o = dict(zip(options[::2], options[1::2]))
    h = int(o.get("--hidden-size", V01["hidden"]))
    layers = int(o.get("--num-layers", V01["layers"]))
    e = int(o.get("--embedding-dim", V01["embed"]))
    return 4 * h * (e + h) + (layers - 1) * 4 * h * 2 * h + h * vocab


def estimate_s(corpus: CorpusFile, seconds: int, options: tuple[str, ...]) -> float:
    read = corpus.chars / READ_CHARS_PER_S
    rate = min(EVAL_MAX_CHARS_PER_S, EVAL_WEIGHT_CHARS_PER_S / scored_weights(options, corpus.vocab))
    return seconds + 3 * PROCESS_S + 2 * read + corpus.val_chars / rate


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def suite(names: list[str] | None = None, role: str = "suite") -> list[CorpusFile]:
    specs = [BY_NAME[n] for n in names] if names else [c for c in CORPORA if c.role == role]
    try:
        return [build(s) for s in specs]
    except MissingSource as e:
        sys.exit(f"Error: {e}")


def cmd_corpora(args) -> int:
    files, missing = [], []
    for spec in CORPORA:
        try:
            files.append(build(spec))
        except MissingSource as e:
            missing.append(f"{spec.name}: {e}")
    table = markdown_table(files)
    print(table)
    for m in missing:
        print(f"Error: {m}", file=sys.stderr)
    changed = changed_texts(files, read_rows(args.results))
    for line in changed:
        print(f"Note: {line}", file=sys.stderr)
    if changed:  # CORPORA.md describes the texts the results hold
        print(f"{CORPORA_MD.relative_to(HERE.parent)} left as it is: it records the texts the results were "
              "measured on", file=sys.stderr)
    elif not missing:
        CORPORA_MD.parent.mkdir(parents=True, exist_ok=True)
        CORPORA_MD.write_text(CORPORA_DOC.format(table=table, val=f"{VAL_FRACTION:.0%}"))
        print(f"\nwritten to {CORPORA_MD.relative_to(HERE.parent)}")
    return 1 if missing else 0


def _selected(args) -> tuple[list[str], list[CorpusFile], list[dict], list[int], bool]:
    phases = list(PHASES) if args.phase == "all" else [args.phase]
    for c in args.config or []:
        if c not in CONFIGS and c not in REFERENCES:
            sys.exit(f"Error: unknown config {c!r}; choose from {', '.join([*CONFIGS, *REFERENCES])}")
    for c in args.corpus or []:
        if c not in BY_NAME:
            sys.exit(f"Error: unknown corpus {c!r}; choose from {', '.join(BY_NAME)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else SEEDS
    if not charnn_has_option("--order"):
        sys.exit("Error: this charnn has no --order option; check out charnn 0.2.1 or later")
    return phases, suite(args.corpus), read_rows(args.results), seeds, charnn_has_size_option()


def _auto_note(has_size: bool) -> str:
    return ("" if has_size else "auto: not run -- charnn train has no --size option yet, so no size "
            "options means exactly v0.1; the table shows v0.1's figure for it\n")


def cmd_plan(args) -> int:
    phases, corpora, rows, seeds, has_size = _selected(args)
    ok, _ = done_keys(rows)
    total = 0.0
    print(_auto_note(has_size), end="")
    for line in changed_texts(corpora, rows):
        print(f"Note: {line}")
    for name in phases:
        cells, pending, notes = phase_cells(name, corpora, rows, args.config, seeds, has_size, args.top, args.order)
        todo = [c for c in cells if c.key not in ok] + pending
        est = sum(estimate_s(c.corpus, c.seconds, c.options) for c in todo)
        total += est
        print(f"\nphase {name} ({PHASES[name].seconds} s per cell): {len(cells) + len(pending)} cells, "
              f"{len(cells) + len(pending) - len(todo)} done, {len(todo)} to run, about {_hours(est)}")
        for n in notes:
            print(f"  {n}")
    print(f"\ntotal still to run: about {_hours(total)} on this machine "
          f"(seeds {','.join(map(str, seeds))})")
    return 0


def _lock(path: str):
    if not path:
        return None
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"  waiting for {path} (another benchmark is running)", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


def charnn_commit() -> str:
    spec = importlib.util.find_spec("charnn")
    where = Path(spec.origin).parent if spec and spec.origin else HERE
    git = ["git", "-C", str(where)]
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return "unknown"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True).stdout
    return head.stdout.strip() + ("+dirty" if dirty.strip() else "")


def ensure_bigram(corpus: CorpusFile, results: Path) -> None:
    rows = read_rows(results)
    if any(r["config"] == "bigram" and r["corpus_sha256"] == corpus.sha256 for r in rows):
        return
    text = corpus.path.read_text(encoding="utf-8")
    b = bigram_result(text)
    append_row(results, {"corpus": corpus.spec.name, "corpus_sha256": corpus.sha256, "budget": "-",
                         "config": "bigram", "seed": "-", "val_loss": b["val_loss"],
                         "val_bpc": b["val_loss"] / math.log(2), "error": "",
                         "options": f"lambda={b['lambda']:.6f}", "corpus_chars": corpus.chars,
                         "vocab": corpus.vocab, "train_chars": b["train_chars"], "val_chars": b["val_chars"],
                         "train_wall_s": round(b["seconds"], 2), "charnn_commit": "-",
                         "started": _now()})
    print(f"bigram {corpus.spec.name}: {b['val_loss']:.4f} nats/char (lambda {b['lambda']:.4f})", flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_cells(cells: list[Cell], results: Path, *, threads: int, retry_failed: bool = False,
              lock: str = "", logs: Path | None = None) -> int:
    """Run the cells not yet in ``results``, appending a row after each; the
    number run. KeyboardInterrupt propagates with the running cell unrecorded."""
    ok, failed = done_keys(read_rows(results))
    todo = [c for c in cells if c.key not in ok and (retry_failed or c.key not in failed)]
    skipped_failed = sum(1 for c in cells if c.key in failed and not retry_failed)
    print(f"{len(cells)} cells: {len(cells) - len(todo) - skipped_failed} done, "
          f"{skipped_failed} failed before (--retry-failed runs them), {len(todo)} to run", flush=True)
    commit = charnn_commit()
    logs = logs or results.parent / "logs"
    for i, cell in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {cell.label()} ...", flush=True)
        held = _lock(lock)
        try:
            base = {"corpus": cell.corpus.spec.name, "corpus_sha256": cell.corpus.sha256,
                    "budget": cell.budget, "config": cell.config, "seed": cell.seed,
                    "options": " ".join(cell.options), "budget_s": cell.seconds,
                    "corpus_chars": cell.corpus.chars, "vocab": cell.corpus.vocab,
                    "train_chars": cell.corpus.chars - val_count(cell.corpus.chars),
                    "charnn_commit": commit, "started": _now(), "error": ""}
            try:
                row = {**base, **run_cell(cell, threads, logs)}
            except CellError as e:
                row = {**base, "error": str(e)}
        finally:
            if held:
                held.close()
        append_row(results, row)
        if row["error"]:
            print(f"  failed: {row['error']}", flush=True)
        else:
            print(f"  {row['val_loss']:.4f} nats/char, {row.get('steps')} steps, {row.get('epochs', 0):.2f} "
                  f"epochs, train {row.get('train_wall_s', 0):.0f} s + eval {row.get('eval_wall_s', 0):.0f} s",
                  flush=True)
    return len(todo)


def recorded_sources(path: Path = CORPORA_MD) -> dict[tuple[str, str], str]:
    """(corpus, first 12 hex digits of its sha256) -> the packages it was
    built from, as CORPORA.md records them for the texts measured."""
    out: dict[tuple[str, str], str] = {}
    header: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if {"name", "sha256", "provided by"} <= set(cells):  # markdown_table's header
            header = cells
        elif header and len(cells) == len(header) and not cells[0].startswith("---"):
            row = dict(zip(header, cells))
            out[(row["name"], row["sha256"])] = row["provided by"]
    return out


def changed_texts(corpora: list[CorpusFile], rows: list[dict], sources: Path = CORPORA_MD) -> list[str]:
    """One line per corpus whose text here is not the one its newest results
    were measured on (a Debian package updated since, say): the tables show
    each corpus's newest text only, so a row for this one would hide them."""
    out = []
    recorded = recorded_sources(sources)
    for corpus in corpora:
        measured = [r for r in rows if r["corpus"] == corpus.spec.name and r["config"] != "bigram"]
        if measured and measured[-1]["corpus_sha256"] != corpus.sha256:
            old = measured[-1]["corpus_sha256"]
            n = sum(r["corpus_sha256"] == old for r in measured)
            chars = int(measured[-1].get("corpus_chars") or 0)
            source = recorded.get((corpus.spec.name, old[:12]))
            out.append(f"{corpus.spec.name}: this machine's text ({corpus.sha256[:12]}, {corpus.chars:,} characters"
                       f"{', from ' + corpus.provided_by if corpus.provided_by else ''}) is not the one its "
                       f"{n} newest results were measured on ({old[:12]}, {chars:,} characters"
                       f"{', from ' + source + ' as ' + sources.name + ' records' if source else ''}); "
                       "a row for it would start a new table for this corpus and hide those")
    return out


def cmd_run(args) -> int:
    if args.phase == "all":
        sys.exit("Error: run one phase at a time (--phase 1m, then 5m, then 20m): each picks from the last")
    phases, corpora, rows, seeds, has_size = _selected(args)
    changed = changed_texts(corpora, rows)
    if changed and not args.new_text and not args.dry_run:
        sys.exit("Error: " + "\nError: ".join(changed) + "\nInstall the packages that built the measured "
                 "text, leave the corpus out (--corpus), or pass --new-text to measure this text from scratch "
                 "(the older rows stay in the file, out of the tables)")
    for line in changed:
        print(f"Note: {line}")
    cells, pending, notes = phase_cells(args.phase, corpora, rows, args.config, seeds, has_size, args.top,
                                        args.order)
    if pending:
        print(f"Error: the {PHASES[args.phase].previous} phase has not measured enough configs to choose "
              f"from on some corpora; this run leaves those choices out", file=sys.stderr)
    print(_auto_note(has_size), end="")
    for n in notes:
        print(n)
    if args.dry_run:
        ok, failed = done_keys(rows)
        for c in cells:
            state = "done" if c.key in ok else "failed" if c.key in failed else \
                f"to run, about {_hours(estimate_s(c.corpus, c.seconds, c.options))}"
            what = "benchmarks/nanogpt.py" if c.config in REFERENCES else f"charnn train {' '.join(c.options)}"
            print(f"  {c.label():45s} {state}   {what}")
        return 0
    for corpus in {c.corpus.spec.name: c.corpus for c in cells}.values():
        ensure_bigram(corpus, args.results)
    run_cells(cells, args.results, threads=args.threads, retry_failed=args.retry_failed, lock=args.lock)
    return 0


# ---------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------

def _cells(rows: list[dict], order: str | None = None) -> dict[tuple[str, str, str], list[float]]:
    """(corpus, budget, config) -> losses over seeds, from the newest corpus
    version of each corpus (with ``order``, the rows of its table); configs
    that only failed get an empty list."""
    latest = {r["corpus"]: r["corpus_sha256"] for r in rows}
    out: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["corpus_sha256"] != latest[r["corpus"]] or (order is not None and not row_in_order_table(r, order)):
            continue
        losses = out[(r["corpus"], r["budget"], r["config"])]
        if not r["error"]:
            losses.append(float(r["val_loss"]))
    return out


def markdown(rows: list[dict], order: str | None = None) -> str:
    cells = _cells(rows, order)
    # the other order's configs: "best" is the best of every config measured
    # in the cell, however it read the text (marked), so a cell whose grid was
    # only run the other way still has a real best to compare auto with
    others = {} if order is None else {
        (*k, o): statistics.fmean(v) for o in ORDERS if o != order for k, v in _cells(rows, o).items()
        if v and k[2] not in (*REFERENCES, "bigram", "v0.1")}
    corpora = [c.name for c in CORPORA if any(k[0] == c.name for k in cells)]
    budgets = [b for b in PHASES if any(k[1] == b for k in cells)]
    bigram = {k[0]: v[0] for k, v in cells.items() if k[2] == "bigram" and v}
    mean = {k: statistics.fmean(v) for k, v in cells.items() if v}
    aliased = False
    out = ["| corpus | budget | bigram | nanoGPT | v0.1 | auto | best config | best | auto vs best |",
           "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for corpus in corpora:
        for budget in budgets:
            here = {k[2]: v for k, v in mean.items() if k[:2] == (corpus, budget) and k[2] not in REFERENCES}
            if not here:
                continue
            best = min(here, key=here.get)  # of charnn's configs
            best_loss, best_name = here[best], best
            other = {k[2:]: v for k, v in others.items() if k[:2] == (corpus, budget) and k[2] != "auto"}
            if other and min(other.values()) < best_loss:
                (name, o) = min(other, key=other.get)
                best_loss, best_name = other[(name, o)], f"{name} ({order_label(o)})"
            auto = here.get("auto")
            auto_text = _num(auto)
            if auto is None and "v0.1" in here and order is None:
                auto, auto_text, aliased = here["v0.1"], f"{here['v0.1']:.4f}*", True
            gap = f"{(auto - best_loss) / best_loss:+.1%}" if auto is not None else ""
            out.append(f"| {corpus} | {budget} | {_num(bigram.get(corpus))} | {_num(mean.get((corpus, budget, 'nanogpt')))} "
                       f"| {_num(here.get('v0.1'))} "
                       f"| {auto_text} | {best_name} | {best_loss:.4f} | {gap} |")
    if aliased:
        out.append("\n\\* v0.1's figure: no auto cell was run (charnn train had no --size option, so "
                   "no size options meant v0.1).")
    out.append("\nValidation loss (nats/char) on the whole held-out split (last 10%), mean over seeds; "
               "bold: the best of its budget."
               + ("" if order is None else " charnn's configs read the text "
                  + {"auto": "in the order charnn chooses from the budget (--order auto, the default): in "
                             "order when it reads the text at least once, shuffled blocks when not",
                     "shuffled": "in shuffled blocks (--order shuffled)",
                     "in-order": "each stream in order (--order in-order, as charnn 0.1 did)"}[order]
                  + "; v0.1 is charnn 0.1 as it was: its shape and dropout, reading in order."))
    configs = ["bigram", *REFERENCES, *CONFIGS]
    for b in budgets:  # one matrix per budget: a row per config, a column per corpus
        here = [c for c in corpora if any(k[:2] == (c, b) for k in cells)]
        out += [f"\n**{b}**\n", "| config | " + " | ".join(here) + " |", "| --- |" + " ---: |" * len(here)]
        for config in configs:
            if not any((c, "-" if config == "bigram" else b, config) in cells for c in here):
                continue
            row = []
            for corpus in here:
                key = (corpus, "-" if config == "bigram" else b, config)
                best = min((v for k, v in mean.items() if k[:2] == (corpus, b)), default=None)
                value = mean.get(key)
                text = _num(value) if value is not None else ("failed" if key in cells else "")
                row.append(f"**{text}**" if value is not None and value == best and config != "bigram" else text)
            out.append(f"| {config} | " + " | ".join(row) + " |")
    spread = [(k, v) for k, v in cells.items() if len(v) > 1]
    if spread:
        out += ["\nSeed spread, where a cell has several seeds:\n",
                "| corpus | budget | config | seeds | mean | max - min | std |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for (corpus, budget, config), v in sorted(spread):
            out.append(f"| {corpus} | {budget} | {config} | {len(v)} | {statistics.fmean(v):.4f} "
                       f"| {max(v) - min(v):.4f} | {statistics.stdev(v):.4f} |")
    return "\n".join(out)


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def cmd_table(args) -> int:
    rows = read_rows(args.results)
    if not rows:
        sys.exit(f"Error: no results in {args.results} yet; run `python benchmarks/fit.py run --phase 1m`")
    print(markdown(rows, args.order))
    return 0


CORPORA_DOC = """# The corpus suite of benchmarks/fit.py

Built by `python benchmarks/fit.py corpora` into `benchmarks/corpora/` (or
`$CHARNN_BENCH_DIR`), once, offline, deterministically: files in sorted path
order, UTF-8 without BOM, LF newlines, a final newline -- the text charnn reads
from the file unchanged, so charnn's corpus hash equals the sha256 below
(fit.py checks it for every cell). charnn holds out the last {val} of each for
validation. Characters and vocabulary are of the whole text.

The `suite` corpora are the grid's; `kjv-1m` is held out from all choosing: it
checks the chosen defaults on text they were not fitted on (e.g. `charnn train
benchmarks/corpora/kjv-1m.txt --time-limit 5m` should reach at most 1.45
nats/char).

{table}

To build them on a fresh Debian machine:

```bash
apt-get install -y fortunes-zh jargon-text python3.11-doc bible-kjv bible-kjv-text
python benchmarks/fit.py corpora
```
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--results", type=Path, default=RESULTS, help="results CSV (default: %(default)s)")
    common.add_argument("--order", choices=ORDERS, default="auto",
                        help="how charnn's configs read the text: chosen by charnn from the budget (--order "
                             "auto), shuffled blocks (--shuffle) or each stream in order (--no-shuffle, "
                             "charnn 0.1); v0.1 always reads in order (default: "
                             "%(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    corpora_cmd = sub.add_parser("corpora", help="build the corpus suite and print its table")
    corpora_cmd.add_argument("--results", type=Path, default=RESULTS,
                             help="results CSV whose texts CORPORA.md records (default: %(default)s)")
    for name in ("plan", "run"):
        s = sub.add_parser(name, parents=[common], help="the cells and their estimated time" if name == "plan"
                           else "run the cells not yet in the results")
        s.add_argument("--phase", choices=[*PHASES, "all"], default="all" if name == "plan" else None,
                       required=name == "run")
        s.add_argument("--corpus", nargs="+", metavar="NAME", help="only these corpora")
        s.add_argument("--config", nargs="+", metavar="NAME", help="only these configs")
        s.add_argument("--seeds", help="comma-separated seeds (default: 1337)")
        s.add_argument("--top", type=int, help="5m and 20m: how many of the previous phase's best grid "
                       "configs to run, besides the rungs up from them (default: 1)")
        if name == "run":
            s.add_argument("--dry-run", action="store_true", help="list the cells, run nothing")
            s.add_argument("--retry-failed", action="store_true", help="run failed cells again")
            s.add_argument("--new-text", action="store_true",
                           help="run even where a corpus's text here differs from the one its results "
                                "were measured on (its table starts again)")
            s.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                           help="charnn --threads (default: %(default)s)")
            s.add_argument("--lock", default=LOCK, help="file locked while a cell runs; '' for none "
                           "(default: %(default)s)")
    sub.add_parser("table", parents=[common], help="Markdown tables of the results")
    args = p.parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        return {"corpora": cmd_corpora, "plan": cmd_plan, "run": cmd_run, "table": cmd_table}[args.command](args)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\nstopped{': ' + str(e) if str(e) else ''}; the interrupted cell was not recorded "
              "and runs again next time", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
