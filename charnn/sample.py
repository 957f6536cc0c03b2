"""Generation: prime, temperature, top-k, top-p, streaming.

``generate`` is an iterator over generated characters, so a caller can stream
them as they come. The prime is consumed in one forward pass; each later step
feeds one character.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import ConfigError
from .model import CharRNN
from .tokenizer import CharTokenizer

START_CANDIDATES = ("\n", " ")  # what an empty prime is conditioned on


def validate_options(temperature: float, top_k: int, top_p: float, length: int) -> None:
    if not temperature >= 0:
        raise ConfigError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top-k must be 0 (off) or positive, got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top-p must be in (0, 1], got {top_p}")
    if length < 0:
        raise ConfigError(f"length must not be negative, got {length}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask all but the ``top_k`` most likely and the smallest set whose
    probability reaches ``top_p`` (nucleus). logits (B, V) -> (B, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
         generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def start_ids(tokenizer: CharTokenizer, prime: str) -> list[int]:
    if prime:
        return tokenizer.encode(prime)
    for ch in START_CANDIDATES:
        if ch in tokenizer:
            return [tokenizer.stoi[ch]]
    return [0]


@torch.inference_mode()
def generate(model: CharRNN, tokenizer: CharTokenizer, prime: str = "", length: int = 500,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             ) -> Iterator[str]:
    """Yield ``length`` generated characters after ``prime`` (the prime itself
    is not yielded). Characters outside the vocabulary raise VocabError."""
    validate_options(temperature, top_k, top_p, length)
    ids = start_ids(tokenizer, prime)
    device = model.head.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, P)
        logits, state = model(x)  # the whole prime in one pass
        last = logits[:, -1]  # (1, V)
        for _ in range(length):
            nxt = pick(last, temperature, top_k, top_p, generator)  # (1,)
            yield tokenizer.chars[int(nxt)]
            logits, state = model(nxt.view(1, 1), state)
            last = logits[:, -1]
    finally:
        model.train(was_training)


def sample_text(model: CharRNN, tokenizer: CharTokenizer, prime: str = "", length: int = 500, **kwargs) -> str:
    """The prime followed by ``length`` generated characters."""
    return prime + "".join(generate(model, tokenizer, prime, length, **kwargs))
