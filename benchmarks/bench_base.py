"""Does starting from the shipped base beat training from scratch?

    python benchmarks/bench_base.py TEXT[:BUDGET,...] ...      # e.g. poems.txt:2m,5m
    python benchmarks/bench_base.py --base-only TEXT:BUDGET     # only the base side again (keeps the scratch run)
    python benchmarks/bench_base.py --table                     # print the recorded rows

For each text and budget it runs, one after the other (never side by side),
``charnn train TEXT --time-limit BUDGET --base prose-en`` and the same with
``--base none``, scores each run's ``best.pt`` with ``charnn eval`` (the
held-out last 10%), and appends a row to ``benchmarks/results/base.csv``: the
text's size, how much of its characters and character pairs the base knows
and how surprised the base is by it (what ``--base auto`` decides by),
both losses and the steps each run made. The table shows what ``--base auto``
(the default) chooses for each row under the current rule, and so what it
scores: the base's loss or the scratch run's. Nothing else should run
meanwhile.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from charnn.storage import checkpoint  # noqa: E402
from charnn.text.reading import read_corpus  # noqa: E402
from charnn.training import base as base_mod  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "base.csv"
FIELDS = ["text", "chars", "budget", "char_cover", "pair_cover", "surprise", "base_loss", "none_loss", "base_steps",
          "none_steps", "threads", "load1", "date", "sha256"]


def charnn(*args: str) -> list[str]:
    return [sys.executable, "-m", "charnn", *args]


def train_and_score(text: Path, budget: str, base: str, threads: int) -> tuple[float, int, str]:
    """One run: its validation loss (charnn eval on best.pt), its steps, its start line."""
    with tempfile.TemporaryDirectory(prefix="charnn-base-") as tmp:
        run = Path(tmp) / "run"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = subprocess.run(charnn("train", str(text), "--time-limit", budget, "--base", base, "-o", str(run),
                                    "--threads", str(threads), "--sample-every", "0"),
                             capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"charnn train failed:\n{out.stderr[-3000:]}")
        said = " ".join(out.stderr.split())
        start = re.search(r"start: (.*?)(?: data:| batch | device | size:|$)", said)
        scored = subprocess.run(charnn("eval", str(run / "best.pt"), "--json", "--threads", str(threads)),
                                capture_output=True, text=True, env=env)
        if scored.returncode:
            sys.exit(f"charnn eval failed:\n{scored.stderr[-3000:]}")
        loss = float(json.loads(scored.stdout)["loss"])
        steps = int(checkpoint.load(run / "last.pt").train_state["step"])
        return loss, steps, start.group(1) if start else ""


def coverage(text: Path) -> tuple[float, float, float | None]:
    """How well the shipped base knows the text: its characters, its
    character pairs, and its surprise (what --base auto decides by)."""
    path = base_mod.shipped_bases()[base_mod.DEFAULT_BASE]
    body, base = read_corpus([text]).text, checkpoint.load(path)
    chars, pairs = base_mod.coverage(body, set(base.tokenizer.chars), set(base_mod.card(path)["bigrams"]))
    known = chars >= base_mod.MIN_CHAR_COVERAGE  # as charnn train: another script is not scored
    return chars, pairs or 0.0, (base_mod.surprise(base, body) if known else None)


def recorded() -> list[dict]:
    return list(csv.DictReader(open(RESULTS, encoding="utf-8"))) if RESULTS.exists() else []


def measure(spec: str, threads: int, base_only: bool) -> None:
    """Measure one text at each budget; a row replaces an earlier one of the
    same text and budget. ``base_only`` keeps that row's scratch run (the
    scratch path does not depend on the base or its recipe)."""
    path, _, budgets = spec.partition(":")
    text = Path(path)
    chars, pairs, surprised = coverage(text)
    size = len(read_corpus([text]).text)
    digest = hashlib.sha256(text.read_bytes()).hexdigest()
    for budget in (budgets or "2m").split(","):
        rows = recorded()
        old = [r for r in rows if r["sha256"] == digest and r["budget"] == budget]
        if base_only and not old:
            sys.exit(f"--base-only: no recorded scratch run of {text} at {budget}")
        base_loss, base_steps, _ = train_and_score(text, budget, base_mod.DEFAULT_BASE, threads)
        if base_only:
            none_loss, none_steps = float(old[-1]["none_loss"]), int(old[-1]["none_steps"])
        else:
            none_loss, none_steps, _ = train_and_score(text, budget, "none", threads)
        row = {"text": text.name, "chars": size, "budget": budget, "char_cover": f"{chars:.4f}",
               "pair_cover": f"{pairs:.4f}", "surprise": "" if surprised is None else f"{surprised:.3f}",
               "base_loss": f"{base_loss:.4f}", "none_loss": f"{none_loss:.4f}",
               "base_steps": base_steps, "none_steps": none_steps, "threads": threads,
               "load1": f"{os.getloadavg()[0]:.2f}", "date": time.strftime("%Y-%m-%d %H:%M"), "sha256": digest}
        rows = [r for r in rows if not (r["sha256"] == digest and r["budget"] == budget)] + [row]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def auto_chooses_base(row: dict) -> bool:
    """What --base auto decides for this row's text under the current rule."""
    card = base_mod.card(base_mod.shipped_bases()[base_mod.DEFAULT_BASE])
    surprised = float(row["surprise"]) if row["surprise"] else None
    return base_mod.auto_takes_base(float(row["char_cover"]), surprised, int(row["chars"]),
                                    card.get("characters"))


def markdown() -> str:
    """The recorded rows as a Markdown table, with what --base auto chooses for each."""
    rows = recorded()
    lines = ["| text | characters | budget | base knows (chars / pairs) | surprise | `--base prose-en` | "
             "`--base none` | auto chooses | auto vs none | steps (base / none) |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        base, none = float(r["base_loss"]), float(r["none_loss"])
        chosen = auto_chooses_base(r)
        surprised = f"{float(r['surprise']):.2f}" if r["surprise"] else "-"  # not scored: another script
        auto = base if chosen else none
        lines.append(f"| {r['text']} | {int(r['chars']):,} | {r['budget']} | "
                     f"{float(r['char_cover']):.1%} / {float(r['pair_cover']):.1%} | {surprised} | "
                     f"{base:.4f} | {none:.4f} | "
                     f"{'base' if chosen else 'none'} | {(auto / none - 1) * 100:+.1f}% | "
                     f"{int(r['base_steps']):,} / {int(r['none_steps']):,} |")
    return "\n".join(lines) + "\n"


def sources() -> str:
    """The shipped bases' sources, licences and hashes, from their cards."""
    lines = ["| base | source | Gutenberg | licence | sha256 |", "| --- | --- | --- | --- | --- |"]
    for name, path in base_mod.shipped_bases().items():
        for src in base_mod.card(path).get("sources", []):
            lines.append(f"| {name} | {Path(src['file']).name} | {src['gutenberg']} | {src['licence']} | "
                         f"`{src['sha256']}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("texts", nargs="*", help="TEXT or TEXT:BUDGET[,BUDGET...] (default budget 2m)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--base-only", action="store_true",
                   help="run only the base (after a change to it or its recipe); keep the recorded scratch run")
    p.add_argument("--table", action="store_true", help="print the recorded rows as a Markdown table")
    args = p.parse_args()
    if args.table:
        print(markdown(), end="")
        return
    if base_mod.DEFAULT_BASE not in base_mod.shipped_bases():
        sys.exit(f"no {base_mod.DEFAULT_BASE} base in charnn/bases: build it with benchmarks/build_bases.py")
    for spec in args.texts:
        measure(spec, args.threads, args.base_only)


if __name__ == "__main__":
    main()
