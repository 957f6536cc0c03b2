"""Rebuild charnn's shipped base model from its public-domain sources.

    python benchmarks/build_bases.py            # train (2 h 45 min on a 2-core CPU), then pack
    python benchmarks/build_bases.py --pack RUN/best.pt   # only pack a finished run

Trains ``prose-en`` with ``charnn train`` on the 18 Project Gutenberg novels
in ``../shared/data/gutenberg/`` and War and Peace
(``../shared/data/war-and-peace.txt``), checks every source against the
sha256 recorded below, then packs the run's ``best.pt`` as the shipped base:
``charnn/bases/prose-en.pt`` (weights in bf16, no optimizer state) and
``charnn/bases/prose-en.json`` (its card: sources, licences, recipe, the
measured loss in fp32 and bf16, the character pairs of its training text).
It prints what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from charnn.model.scoring import evaluate_ids  # noqa: E402
from charnn.storage.checkpoint import build_payload, load_model, save  # noqa: E402
from charnn.text.reading import read_corpus  # noqa: E402

NAME = "prose-en"
DATA = REPO.parent / "shared" / "data"
# (file under DATA, Project Gutenberg ebook number or "" , sha256 of the file as stored)
SOURCES = [
    ("gutenberg/a-tale-of-two-cities.txt", "#98"),
    ("gutenberg/adventures-of-huckleberry-finn.txt", "#76"),
    ("gutenberg/alice-s-adventures-in-wonderland.txt", "#11"),
    ("gutenberg/dracula.txt", "#345"),
    ("gutenberg/emma.txt", "#158"),
    ("gutenberg/frankenstein.txt", "#84"),
    ("gutenberg/great-expectations.txt", "#1400"),
    ("gutenberg/little-women.txt", "#514"),
    ("gutenberg/middlemarch.txt", "#145"),
    ("gutenberg/moby-dick-or-the-whale.txt", "#2701"),
    ("gutenberg/oliver-twist.txt", "#730"),
    ("gutenberg/pride-and-prejudice.txt", "#1342"),
    ("gutenberg/the-adventures-of-sherlock-holmes.txt", "#1661"),
    ("gutenberg/the-picture-of-dorian-gray.txt", "#174"),
    ("gutenberg/the-scarlet-letter.txt", "#33"),
    ("gutenberg/the-time-machine.txt", "#35"),
    ("gutenberg/treasure-island.txt", "#120"),
    ("gutenberg/wuthering-heights.txt", "#768"),
    ("war-and-peace.txt", "#2600"),
]
SHA256_FILE = Path(__file__).resolve().parent / "results" / "bases-sources.sha256"
# The recipe: a 2x512 LSTM (the largest that fine-tunes at about 20,000
# characters/s in bf16 on a 2-core CPU), 32 streams x 128 characters (bf16 is
# 3x fp32's speed at this batch), shuffled blocks, 2% held out.
TRAIN_ARGS = ["--size", "fixed", "--hidden-size", "512", "--num-layers", "2", "--embedding-dim", "64",
              "--dropout", "0.1", "--batch-size", "32", "--seq-len", "128", "--lr", "5e-3", "--precision", "bf16",
              "--eval-every", "1000", "--val-fraction", "0.02", "--order", "shuffled"]
TIME_LIMIT = "2h45m"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sources() -> list[dict]:
    """Every source present and as recorded (a different file would make another base)."""
    recorded = {}
    if SHA256_FILE.is_file():
        for line in SHA256_FILE.read_text().splitlines():
            digest, name = line.split(None, 1)
            recorded[name.strip()] = digest
    rows = []
    for rel, ebook in SOURCES:
        path = DATA / rel
        if not path.is_file():
            sys.exit(f"missing source {path}")
        digest = sha256(path)
        if rel in recorded and recorded[rel] != digest:
            sys.exit(f"{path} is not the recorded text (sha256 {digest}, recorded {recorded[rel]})")
        rows.append({"file": rel, "gutenberg": ebook, "licence": "public domain (Project Gutenberg, USA)",
                     "sha256": digest, "bytes": path.stat().st_size})
    if not recorded:
        SHA256_FILE.parent.mkdir(parents=True, exist_ok=True)
        SHA256_FILE.write_text("".join(f"{r['sha256']}  {r['file']}\n" for r in rows))
    return rows


INPUTS = [DATA / "gutenberg", DATA / "war-and-peace.txt"]  # what charnn train reads: the folder (its README too) and the novel


def train(out: Path, threads: int) -> float:
    cmd = [sys.executable, "-m", "charnn", "train", *map(str, INPUTS), "-o", str(out),
           "--time-limit", TIME_LIMIT, "--threads", str(threads), *TRAIN_ARGS]
    print("$", " ".join(cmd), flush=True)
    started = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.time() - started


@torch.no_grad()
def pack(best: Path, sources: list[dict], train_seconds: float | None) -> None:
    model, tokenizer, ckpt = load_model(best)
    corpus = read_corpus(INPUTS)
    if corpus.sha256 != ckpt.train_config.get("corpus_hash"):
        sys.exit(f"{best} was not trained on these sources (its corpus hash differs); train it with this script")
    text = corpus.text
    val_fraction = float(ckpt.train_config.get("val_fraction", 0.02))
    val = text[int(len(text) * (1 - val_fraction)):][:200_000]
    ids = torch.as_tensor(tokenizer.encode(val))
    fp32 = evaluate_ids(model, ids).loss
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).float())
    bf16 = evaluate_ids(model, ids).loss
    bigrams = sorted({text[i:i + 2] for i in range(len(text) - 1)})
    state = dict(ckpt.train_state)
    keep = {k: state[k] for k in ("step", "epoch", "chars_seen", "best_val", "elapsed", "device", "precision")
            if k in state}
    # The run's options as trained, less where it ran: the sources by name (a
    # copy report then says the text is not here and asks for --against).
    options = {k: v for k, v in ckpt.train_config.items() if k not in ("out", "corpus")}
    options.update(corpus=[p.name for p in INPUTS], corpus_name=NAME)
    payload = build_payload(model, tokenizer, train_config=options, train_state=keep, metrics=ckpt.metrics)
    payload["model_state"] = {k: v.to(torch.bfloat16) for k, v in payload["model_state"].items()}
    target = REPO / "charnn" / "bases" / f"{NAME}.pt"
    save(payload, target)
    info = {
        "name": NAME,
        "description": "English prose: 18 novels from Project Gutenberg and War and Peace",
        "model": f"{model.config.num_layers}x{model.config.hidden_size} {model.config.cell.upper()}, "
                 f"embedding {model.config.embedding_dim}, {model.num_parameters():,} weights, stored in bf16",
        "sources": sources,
        "characters": len(text),
        "corpus_sha256": corpus.sha256,
        "recipe": "charnn train SOURCES --time-limit " + TIME_LIMIT + " " + " ".join(TRAIN_ARGS),
        # the run's own training time (a packed run may have been stopped and resumed)
        "train_seconds": round(float(keep.get("elapsed") or train_seconds or 0), 1),
        "steps": keep.get("step"),
        "val_loss_fp32": round(fp32, 4),
        "val_loss_bf16": round(bf16, 4),
        "val_chars": len(val),
        "built": dt.date.today().isoformat(),
        "bigrams": bigrams,
    }
    target.with_suffix(".json").write_text(json.dumps(info, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{target}: {target.stat().st_size:,} bytes; validation loss {fp32:.4f} nats/char in fp32, "
          f"{bf16:.4f} in bf16 ({(bf16 / fp32 - 1) * 100:+.2f}%), on {len(val):,} held-out characters; "
          f"{len(bigrams):,} character pairs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pack", type=Path, help="pack this finished run's best.pt instead of training")
    p.add_argument("--out", type=Path, default=Path("/tmp/charnn-base-run"), help="the training run's folder")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    sources = check_sources()
    seconds = None
    best = args.pack
    if best is None:
        seconds = train(args.out, args.threads)
        best = args.out / "best.pt"
    pack(best, sources, seconds)


if __name__ == "__main__":
    main()
