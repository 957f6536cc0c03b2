"""nanoGPT's CPU recipe for character models, given a time budget: the
reference issue 12 compares charnn with ("at least as good as nanoGPT's CPU
recipe given the same time on this machine").

The recipe is the one nanoGPT's README gives for training the Shakespeare
character model on a CPU: a GPT of 4 layers, 4 heads, width 128, context
(block) 64, batch 12, no dropout, AdamW at 1e-3 (betas 0.9/0.99, weight
decay 0.1 on matrices), 100 warmup steps then a cosine down to 1e-4, gradients
clipped at 1, batches of random windows, its own validation estimate (20
random batches every 250 steps) deciding which weights to keep. This is an
independent implementation written from that description, not nanoGPT's code.

Differences, so that the comparison is fair to both sides:
- the text, its alphabet and its split are charnn's (``read_corpus``,
  ``CharTokenizer``, ``split_ids``: the last 10% held out);
- the cosine runs over the time budget (measured, as charnn's schedule does),
  not over a fixed number of steps;
- the figure is the loss on the **whole** held-out split, every character
  scored once with 32 to 64 characters of context (windows of 64 moved by
  32), in nats per character -- the number ``charnn eval`` gives for charnn.

    python benchmarks/nanogpt.py CORPUS --time-limit 300 [--seed 1337] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# The charnn of this checkout, not whichever one is installed (fit.py runs
# this file as a script, so the repository root is not on the path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from charnn.text.data import read_corpus, split_ids  # noqa: E402
from charnn.text.tokenizer import CharTokenizer  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block: int = 64
    batch: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20


class Block(nn.Module):
    def __init__(self, r: Recipe):
        super().__init__()
        self.n_head = r.n_head
        self.ln1 = nn.LayerNorm(r.n_embd, bias=False)
        self.qkv = nn.Linear(r.n_embd, 3 * r.n_embd, bias=False)
        self.proj = nn.Linear(r.n_embd, r.n_embd, bias=False)
        self.ln2 = nn.LayerNorm(r.n_embd, bias=False)
        self.fc = nn.Linear(r.n_embd, 4 * r.n_embd, bias=False)
        self.out = nn.Linear(4 * r.n_embd, r.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, r: Recipe):
        super().__init__()
        self.tok = nn.Embedding(vocab, r.n_embd)
        self.pos = nn.Embedding(r.block, r.n_embd)
        self.blocks = nn.ModuleList(Block(r) for _ in range(r.n_layer))
        self.ln = nn.LayerNorm(r.n_embd, bias=False)
        self.head = nn.Linear(r.n_embd, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * r.n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # (B, T, V)


def loss_of(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def random_batch(ids: torch.Tensor, r: Recipe, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    at = torch.randint(len(ids) - r.block - 1, (r.batch,), generator=gen)
    x = torch.stack([ids[i : i + r.block] for i in at.tolist()])
    y = torch.stack([ids[i + 1 : i + 1 + r.block] for i in at.tolist()])
    return x, y


@torch.no_grad()
def whole_split_loss(model: GPT, ids: torch.Tensor, block: int, batch: int = 64) -> tuple[float, int]:
    """Mean loss over every target of ``ids`` (all but the first character),
    each scored once: windows of ``block`` moved by ``block // 2``; the first
    window scores all its positions, the others their second half."""
    model.eval()
    stride = block // 2
    n = len(ids)
    starts = list(range(0, max(1, n - block), stride))
    if starts[-1] + block < n:
        starts.append(max(0, n - 1 - block))  # the last window ends on the last character
    total, count, scored_to = 0.0, 0, 1  # targets ids[1 .. scored_to) are scored
    for lo in range(0, len(starts), batch):
        group = starts[lo : lo + batch]
        width = min(block, n - 1)
        x = torch.stack([ids[s : s + width] for s in group])
        y = torch.stack([ids[s + 1 : s + 1 + width] for s in group])
        nll = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")  # (b, width)
        for row, s in enumerate(group):
            first = max(scored_to, s + 1) - (s + 1)  # the first position not scored yet
            total += float(nll[row, first:].sum())
            count += width - first
            scored_to = s + 1 + width
    model.train()
    return total / count, count


def train(corpus: Path, seconds: float, seed: int, threads: int, r: Recipe = Recipe()) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    text = read_corpus([corpus]).text
    tok = CharTokenizer.from_text(text)
    all_ids = torch.from_numpy(tok.encode_array(text).astype("int64"))
    train_ids, val_ids = (torch.as_tensor(a) for a in split_ids(all_ids.numpy(), 0.1))
    if len(train_ids) < r.block + 2 or len(val_ids) < r.block + 2:
        raise SystemExit(f"Error: {corpus} is too short for windows of {r.block} characters")
    model = GPT(tok.vocab_size, r)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, r.beta2))
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_step, step, train_loss = math.inf, None, 0, 0, math.nan
    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
        if step % r.eval_interval == 0 and step > 0:  # its own estimate: random validation batches
            with torch.no_grad():
                model.eval()
                est = sum(float(loss_of(model, *random_batch(val_ids, r, gen))) for _ in range(r.eval_iters))
                model.train()
            if est / r.eval_iters < best:
                best, best_step = est / r.eval_iters, step
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
        progress = elapsed / seconds
        lr = r.lr * (step + 1) / r.warmup if step < r.warmup else (
            r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = loss_of(model, *random_batch(train_ids, r, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        train_loss = loss.item()
        step += 1
    train_s = time.perf_counter() - t0
    if best_state is None:  # never estimated: keep the last weights
        best_step = step
    else:
        model.load_state_dict(best_state)
    t1 = time.perf_counter()
    val_loss, val_chars = whole_split_loss(model, val_ids, r.block)
    return {"val_loss": val_loss, "val_bpc": val_loss / math.log(2), "val_chars": val_chars,
            "steps": step, "epochs": step * r.batch * r.block / len(train_ids), "train_loss": train_loss,
            "best_step": best_step, "parameters": sum(p.numel() for p in model.parameters()),
            "train_wall_s": round(train_s, 2), "eval_wall_s": round(time.perf_counter() - t1, 2),
            "vocab": tok.vocab_size, "model": f"gpt {r.n_layer}x{r.n_embd} h{r.n_head} block {r.block}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path)
    p.add_argument("--time-limit", type=float, required=True, help="training seconds")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = p.parse_args(argv)
    result = train(args.corpus, args.time_limit, args.seed, args.threads)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['val_loss']:.4f} nats/char on the whole held-out split ({result['val_chars']:,} characters), "
          f"{result['steps']:,} steps, {result['epochs']:.3g} epochs, best estimate at step {result['best_step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
