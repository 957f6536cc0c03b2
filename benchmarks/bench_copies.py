"""The copy report's and --max-copy's costs (issue 27): index build time and
peak memory, the report's time once the index is cached, and what the guard
adds per generated character.

    python3 benchmarks/bench_copies.py [CHECKPOINT]

Texts: ../shared/data/war-and-peace.txt (3.2M characters) and the first
5,000,000 characters of ../shared/data/gutenberg/*.txt joined in name order.
CHECKPOINT (default: a fresh model of 2x128, untrained, War and Peace's
vocabulary) is sampled with and without ``--max-copy 20`` in one process,
alternating, so the ratio holds on a busy machine.
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charnn.generation.copies import CopyGuard, TrainingText, copy_report, open_index  # noqa: E402
from charnn.generation.sample import generate_samples  # noqa: E402
from charnn.text.copyindex import is_suffix_array, load_or_build, suffix_array, text_codes  # noqa: E402
from charnn.text.reading import read_corpus  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")


def texts() -> dict[str, tuple[str, str]]:
    wp = read_corpus([DATA / "war-and-peace.txt"])
    books = read_corpus(sorted((DATA / "gutenberg").glob("*.txt")))
    five = books.text[:5_000_000]
    import hashlib

    return {"war-and-peace (3.2M)": (wp.text, wp.sha256),
            "gutenberg, first 5M": (five, hashlib.sha256(five.encode("utf-8")).hexdigest())}


def build(name: str, text: str) -> None:
    codes = text_codes(text)
    t = time.perf_counter()
    sa = suffix_array(codes)
    seconds = time.perf_counter() - t
    tracemalloc.start()
    suffix_array(codes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t = time.perf_counter()
    assert is_suffix_array(codes, sa)
    check = time.perf_counter() - t
    print(f"{name}: {len(text):,} characters: build {seconds:.2f} s, peak {peak / 2**20:.0f} MiB "
          f"({peak / len(text):.0f} B/char); full check {check:.2f} s; index {sa.nbytes / 2**20:.0f} MiB + text")


def report(name: str, text: str, sha: str, sample: str) -> None:
    load_or_build(text, sha)  # cached
    t = time.perf_counter()
    index = open_index(TrainingText(text, sha, name))
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    r = copy_report(index, sample, 0)
    made = time.perf_counter() - t
    print(f"{name}: cached index loaded and checked in {loaded:.3f} s; report on {len(sample):,} characters "
          f"{made:.3f} s (longest {r.longest}); total {loaded + made:.3f} s")


def guard_cost(text: str, sha: str, ckpt: str | None) -> None:
    from charnn.model.config import ModelConfig
    from charnn.model.rnn import CharRNN
    from charnn.storage.checkpoint import load_model
    from charnn.text.tokenizer import CharTokenizer

    torch.set_num_threads(1)
    if ckpt:
        model, tok, _ = load_model(ckpt)
    else:
        tok = CharTokenizer.from_text(text)
        torch.manual_seed(0)
        model = CharRNN(ModelConfig(vocab_size=tok.vocab_size, embedding_dim=64, hidden_size=128, num_layers=2,
                                    dropout=0.0)).eval()
    index = open_index(TrainingText(text, sha, "war-and-peace"))
    n = 2000
    for streams in (1, 8):
        plain, guarded = [], []
        for rep in range(3):
            t = time.perf_counter()
            generate_samples(model, tok, "", n, num_samples=streams, seed=rep, temperature=0.8)
            plain.append(time.perf_counter() - t)
            guard = CopyGuard(index, tok, 20)
            t = time.perf_counter()
            out = generate_samples(model, tok, "", n, num_samples=streams, seed=rep, temperature=0.8, guard=guard)
            guarded.append(time.perf_counter() - t)
        a, b = min(plain) / (n * streams), min(guarded) / (n * streams)
        print(f"max-copy 20, {streams} stream(s) of {n} characters: {1e6 * a:.1f} us/char without, "
              f"{1e6 * b:.1f} us/char with (+{1e6 * (b - a):.1f} us, x{b / a:.2f}); "
              f"redirected {sum(s.redirected for s in out)}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["CHARNN_DATA_DIR"] = tmp
        all_texts = texts()
        for name, (text, _) in all_texts.items():
            build(name, text)
        wp_text, wp_sha = all_texts["war-and-peace (3.2M)"]
        sample = wp_text[1_000_000:1_001_000] + "".join(np.random.default_rng(0).choice(list("abc de"), 1000))
        for name, (text, sha) in all_texts.items():
            report(name, text, sha, sample)
        guard_cost(wp_text, wp_sha, sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
