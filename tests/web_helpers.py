"""Helpers for the web-export tests: checkpoints of any shape built with torch
and saved through charnn's own save path, and a page driven by its URL fragment."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote

import torch


def build_checkpoint(path: Path, chars: str, cell: str = "lstm", layers: int = 1, hidden: int = 32,
                     embedding: int = 16, scale: float = 3.0, seed: int = 0) -> Path:
    """An untrained CharRNN with weights scaled by ``scale`` (torch's small
    init gives near-uniform next-character distributions; scaled, they are
    peaked and varied, as a trained model's), saved with charnn's save()."""
    from charnn.model.config import ModelConfig
    from charnn.model.rnn import CharRNN
    from charnn.storage.checkpoint import build_payload, save
    from charnn.text.tokenizer import CharTokenizer

    torch.manual_seed(seed)
    tokenizer = CharTokenizer(sorted(set(chars)))
    model = CharRNN(ModelConfig(cell=cell, vocab_size=tokenizer.vocab_size, embedding_dim=embedding,
                                hidden_size=hidden, num_layers=layers, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(scale if name.startswith("rnn.") else 1.0)
        model.head.weight.mul_(scale * 3)
    return save(build_payload(model, tokenizer), path)


def fragment(prime: str = "", n: int = 500, seed: int | None = 0, temperature: float = 0.8, top_k: int = 0,
             top_p: float = 1.0, stop: str = "", run: bool = True) -> str:
    parts = {"prime": prime, "n": n, "seed": "" if seed is None else seed, "temperature": temperature,
             "top_k": top_k, "top_p": top_p, "stop": stop}
    text = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in parts.items())
    return "#" + text + ("&run=1" if run else "")


def run_page(browser, frag: str, timeout: float = 120) -> tuple[str, str]:
    """Drive the open page with ``frag`` (a hashchange, as a user's link would
    on a loaded page) and wait for its title to end in " — done" or say an
    error: (title, text of #output)."""
    browser.eval(f"document.title = 'driving'; location.hash = {frag!r}; 0")
    end = time.monotonic() + timeout
    while True:
        title = browser.eval("document.title")
        if title.endswith(" — done") or " — error: " in title:
            return title, browser.eval("document.getElementById('output').textContent")
        assert time.monotonic() < end, f"the page did not finish: {title}"
        time.sleep(0.02)


def open_offline(browser, url: str, scripts: bool = True) -> None:
    """A new tab with the network switched off and requests recorded (in
    ``browser.events``), then ``url``; with ``scripts=False`` JavaScript is off."""
    target = browser.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
    browser.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                   session=False)["sessionId"]
    browser.send("Page.enable")
    browser.send("Network.enable")
    browser.send("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                      "uploadThroughput": -1})
    if not scripts:
        browser.send("Emulation.setScriptExecutionDisabled", {"value": True})
    browser.send("Page.navigate", {"url": url})


def requested_urls(browser) -> list[str]:
    return [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]


def near_tie(model, tokenizer, prime: str, generated: str, seed: int, temperature: float, top_k: int = 0,
             top_p: float = 1.0) -> float:
    """How close charnn's pick of character ``len(generated)`` after ``prime``
    came to another: for a sampled pick, the distance of its uniform from the
    nearest cumulative-probability boundary; for a greedy one, the gap between
    the two largest logits."""
    from charnn.generation import rng
    from charnn.generation.sample import filter_logits, start_ids

    ids = [int(i) for i in start_ids(tokenizer, prime)] + [int(i) for i in tokenizer.encode_array(generated)]
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0][0, -1].float()  # (V,)
    V = logits.shape[0]
    if temperature == 0 or top_k == 1:
        top2 = logits.topk(2).values
        return float(top2[0] - top2[1])
    z = (logits.double() - logits.double().max()) / temperature
    filtered = (0 < top_k < V) or top_p < 1.0
    if filtered:
        z = filter_logits(z[None], top_k if 0 < top_k < V else 0, top_p)[0]
    c = torch.cumsum(z.exp(), 0)
    c = c / c[-1]
    u = float(rng.uniforms([seed], len(generated), 1)[0, 0])
    return float((c - u).abs().min())
