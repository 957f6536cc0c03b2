"""The exported web page's speed, next to charnn sample's, on one machine.

For LSTMs of 2x256 and 2x512 (embedding 128, a 97-character vocabulary,
untrained weights: speed does not depend on them), it exports a page
(--weights fp32; int16 pages decode to the same Float32Arrays, so run at the
same speed), opens it from file:// in headless Chromium and times
``--chars`` characters generated in the page's worker (the page's own
figure, printed in its status line), then times ``charnn.generation.sample.generate``
(the path ``charnn sample`` prints from, one thread) for the same number
of characters. Each side is measured ``--repeats`` times, interleaved; the
median is printed. The issue's targets: 2x256 >= 1,000 chars/s in the page,
2x512 >= 300.

With ``--storages`` it measures instead, for each weight storage, delta
(the largest difference between the cumulative probabilities at T=0.8 the
page computes, in float64 from the stored weights, and charnn's, in float32,
over 4 samples of 500 characters; and the same for the logits) and the loss
change against fp32 that ``export`` reports, for LSTMs 2x256, 2x320, 2x512, a
GRU and an RNN 2x320 (embedding 128, untrained, scored on their own text) and
any ``--checkpoint`` given (scored on its validation split). fp16 is there
for comparison (export offers int16 instead). docs/export.md states the
condition delta bounds.

    flock /tmp/charnn-bench.lock python benchmarks/bench_web.py
    python benchmarks/bench_web.py --storages --checkpoint runs/x/best.pt
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The MKL mode `charnn sample` runs in (cli.common.inference_only), set before
# torch's first matrix product.
os.environ.setdefault("MKL_CBWR", "AUTO")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from serve_helpers import Chromium  # noqa: E402
from web_helpers import build_checkpoint, fragment, open_offline, run_page  # noqa: E402

from charnn.export import export  # noqa: E402
from charnn.export.web import rounded_model  # noqa: E402
from charnn.generation.sample import generate, generate_samples, start_ids  # noqa: E402
from charnn.storage.checkpoint import load_model  # noqa: E402

VOCAB = "".join(chr(i) for i in range(32, 127)) + "\n\t"
SHAPES = [(2, 256), (2, 512)]


def page_speed(browser: Chromium, page: Path, chars: int) -> float:
    open_offline(browser, page.as_uri() + fragment(n=0))
    browser.wait_for("document.title.endsWith(' — done')", 120)
    run_page(browser, fragment("The ", chars, 1))
    status = browser.eval("document.getElementById('status').textContent")
    return float(re.search(r"\(([\d,]+)/s", status).group(1).replace(",", ""))


def charnn_speed(ckpt: Path, chars: int) -> float:
    model, tok, _ = load_model(ckpt)
    start = time.perf_counter()
    for _ in generate(model, tok, "The ", chars, seed=1, precision="fp32"):
        pass
    return chars / (time.perf_counter() - start)


def twin_of(model, storage: str):
    """The model with the weights the page would use, in float64."""
    if storage == "fp16":  # rounded as fp16 (biases too would stay fp32; they are a rounding error here)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for p in twin.parameters():
                if p.dim() > 1:
                    p.copy_(p.half().float())
        return twin.double()
    twin = rounded_model(model, storage)
    return (copy.deepcopy(twin) if twin is model else twin).double()


def delta(ckpt: Path, storage: str) -> tuple[float, float]:
    """(cumulative probabilities, logits): the largest differences."""
    model, tok, _ = load_model(ckpt)
    twin = twin_of(model, storage)
    worst = worst_logit = 0.0
    for s in generate_samples(model, tok, "The ", 500, num_samples=4, seed=1, precision="fp32"):
        ids = torch.tensor([[int(i) for i in start_ids(tok, s.prime)] + [int(i) for i in tok.encode_array(s.generated)]])
        with torch.inference_mode():
            l32, l64 = model(ids)[0][0].double(), twin(ids)[0][0]
        c32, c64 = torch.softmax(l32 / 0.8, -1).cumsum(-1), torch.softmax(l64 / 0.8, -1).cumsum(-1)
        worst = max(worst, float((c32 - c64).abs().max()))
        worst_logit = max(worst_logit, float((l32 - l64).abs().max()))
    return worst, worst_logit


def storages(checkpoints: list[Path], root: Path) -> None:
    from charnn.export.web import text_loss, validation_texts

    ckpts = {f"{cell.upper()} 2x{hidden}": build_checkpoint(root / f"{cell}{hidden}.pt", VOCAB, cell=cell, layers=2,
                                                             hidden=hidden, embedding=128, scale=1.0)
             for cell, hidden in [("lstm", 256), ("lstm", 320), ("lstm", 512), ("gru", 320), ("rnn", 320)]}
    ckpts.update({str(c): c for c in checkpoints})
    print(f"{'model':<28} {'storage':<8} {'delta cum. prob.':>17} {'delta logits':>13} {'loss change':>12}")
    for name, ckpt in ckpts.items():
        model, tok, data = load_model(ckpt)
        texts, _ = validation_texts(model, tok, data)
        base = text_loss(model, texts)
        for storage in ("fp32", "int16", "fp16", "int8"):
            d, d_logit = delta(ckpt, storage)
            change = (text_loss(twin_of(model, storage).float(), texts) - base) / base
            print(f"{name:<28} {storage:<8} {d:>17.1e} {d_logit:>13.1e} {change:>+12.4%}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chars", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--storages", action="store_true", help="measure delta and loss per weight storage instead")
    ap.add_argument("--checkpoint", type=Path, action="append", default=[], help="with --storages: also this one")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.storages:
        with tempfile.TemporaryDirectory() as tmp:
            storages(args.checkpoint, Path(tmp))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        browser = Chromium(args.chromium, root / "profile")
        try:
            for layers, hidden in SHAPES:
                ckpt = build_checkpoint(root / f"{layers}x{hidden}.pt", VOCAB, layers=layers, hidden=hidden,
                                        embedding=128, scale=1.0)
                page = export(ckpt, "web", root / f"{layers}x{hidden}.html", weights="fp32").path
                web, py = [], []
                for _ in range(args.repeats):
                    web.append(page_speed(browser, page, args.chars))
                    py.append(charnn_speed(ckpt, args.chars))
                rows.append((f"LSTM {layers}x{hidden}", statistics.median(web), statistics.median(py),
                             delta(ckpt, "fp32")[0], delta(ckpt, "int16")[0]))
        finally:
            browser.close()
    print(f"{'model':<14} {'page chars/s':>13} {'charnn sample chars/s':>22} {'page/charnn':>12} "
          f"{'delta fp32':>11} {'delta int16':>11}")
    for name, web, py, d32, d16 in rows:
        print(f"{name:<14} {web:>13,.0f} {py:>22,.0f} {web / py:>12.2f} {d32:>11.1e} {d16:>11.1e}")


if __name__ == "__main__":
    main()
