"""What a model's units do: per-character states and gates, the units that
track features of the text, and gate saturation.

``inspect(model, text, tokenizer)`` runs the model over the text, one
character at a time from a zero state, and records for every character each
layer's hidden state ``h``, an LSTM's cell state ``c`` and the gate
activations (LSTM ``i, f, o, g``; GRU ``r, z, n``; a vanilla RNN has none).
Everything is computed by :class:`_Stepper`, the cell equations written out
on the model's own weights (tested equal to ``nn.LSTM``/``nn.GRU``/``nn.RNN``).

Then:

- **features** of the text (:data:`BUILTIN_FEATURES`, and ``NAME=REGEX``
  patterns) are correlated with every unit's ``h`` and ``c`` (Pearson r over
  the characters, all layers); the units with the largest |r| track them;
- **gate saturation** (Karpathy, Johnson & Fei-Fei 2015, figure 3): per layer
  and gate, the fraction of (unit, character) pairs where the gate is
  left-saturated (< 0.1) or right-saturated (> 0.9), overall and per unit.
  ``g`` and ``n`` are tanh-valued (-1..1): for them the same 10% of the range
  is used, < -0.8 and > 0.8.

Memory. Correlations and saturation are accumulated chunk by chunk (float64
sums, the state carried between chunks), so they cover all the characters
at constant memory. The per-character arrays are kept for the first
``keep_chars`` characters: float32, ``4 * chars * layers * hidden * (2 + gates)``
bytes for an LSTM -- 100,000 characters of a 2x512 LSTM would be 2.5 GB
(1.2 GB in float16), which is why the command line keeps only what its page
shows.

Also here: the standalone HTML page (:func:`inspect_page`) and the saturation
scatter as a PNG (:func:`saturation_png`). Library code: nothing is printed.
"""

from __future__ import annotations

import base64
import html
import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .errors import CharnnError, ConfigError, DataError
from .model import CharRNN
from .report import show_char

__all__ = ["inspect", "Inspection", "LayerTrace", "FeatureCorrelation", "UnitCorrelation", "GateSaturation",
           "text_features", "parse_feature", "BUILTIN_FEATURES", "GATES", "inspect_page", "saturation_png"]

MAX_CHARS = 100_000  # default characters inspected
LEFT, RIGHT = 0.1, 0.9  # gate saturation thresholds (sigmoid gates)
GATES = {"lstm": ("i", "f", "o", "g"), "gru": ("r", "z", "n"), "rnn": ()}
TANH_GATES = {"g", "n"}  # -1..1; saturation uses < -0.8 / > 0.8
GATE_TITLES = {"i": "input", "f": "forget", "o": "output", "g": "cell input, tanh",
               "r": "reset", "z": "update", "n": "new, tanh"}


# ---------------------------------------------------------------------------
# Features of the text
# ---------------------------------------------------------------------------
#
# One value per character. Span features (in_string, in_comment, regexes)
# are 1 on every character of the span, its delimiters included.
#
# The string/comment/bracket scanner reads code the way most C-like and Python
# tokenizers do, in one pass, so quotes inside comments and '#' inside strings
# do not count:
#   - outside strings and comments, ' or " opens a string; ''' or """ opens a
#     triple-quoted one. A backslash escapes the next character. A string ends
#     at its own closing quote(s); a single-quoted one also ends (unclosed) at
#     the end of its line, so an apostrophe in prose ("don't") or a comment
#     runs to the end of that line at most.
#   - '#' and '//' start a comment to the end of the line (the newline is not
#     in it); '/*' starts one up to and including '*/'. Note that '//' is also
#     Python's floor division: in Python text, the rest of such a line counts
#     as comment.
#   - bracket_depth counts ( [ { minus ) ] } outside strings and comments,
#     never below 0; an opening bracket already counts on itself, a closing
#     one no longer does (the depth after reading the character).

BUILTIN_FEATURES: dict[str, str] = {
    "line_position": "characters since the last newline (0 on the newline itself)",
    "in_string": "1 inside a quoted string, quotes included (' \" ''' \"\"\")",
    "bracket_depth": "nesting depth of ( [ { outside strings and comments",
    "indent": "leading spaces/tabs of the line the character is on",
    "in_comment": "1 inside a comment: # or // to the end of the line, /* ... */",
    "in_word": "1 on letters, digits and _",
}

_SPECIAL = re.compile(r"""['"#()\[\]{}]|//|/\*""")
_STRING_BODY = {
    "'": re.compile(r"(?:[^'\\\n]|\\[\s\S])*'?"),
    '"': re.compile(r'(?:[^"\\\n]|\\[\s\S])*"?'),
    "'''": re.compile(r"(?:[^'\\]|\\[\s\S]|'(?!''))*(?:''')?"),
    '"""': re.compile(r'(?:[^"\\]|\\[\s\S]|"(?!""))*(?:""")?'),
}


def _scan_code(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(in_string, in_comment, bracket_depth), each (T,), by the rules above."""
    n = len(text)
    in_string = np.zeros(n, dtype=np.float64)
    in_comment = np.zeros(n, dtype=np.float64)
    depth_at = np.zeros(n, dtype=np.float64)
    depth, pos = 0, 0
    while pos < n:
        m = _SPECIAL.search(text, pos)
        start = m.start() if m else n
        depth_at[pos:start] = depth
        if m is None:
            break
        tok = m.group()
        if tok in ("'", '"'):
            opener = tok * 3 if text.startswith(tok * 3, start) else tok
            body = _STRING_BODY[opener].match(text, start + len(opener))
            end = body.end()
            in_string[start:end] = 1
        elif tok in ("#", "//"):
            end = text.find("\n", start)
            end = n if end < 0 else end
            in_comment[start:end] = 1
        elif tok == "/*":
            end = text.find("*/", start + 2)
            end = n if end < 0 else end + 2
            in_comment[start:end] = 1
        else:
            depth = depth + 1 if tok in "([{" else max(0, depth - 1)
            end = start + 1
        depth_at[start:end] = depth
        pos = end
    return in_string, in_comment, depth_at


def _line_position(text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    idx = np.arange(len(codes))
    last_newline = np.maximum.accumulate(np.where(codes == 10, idx, -1))  # -1: a newline imagined before the text
    return (idx - last_newline).astype(np.float64)


def _indent(text: str) -> np.ndarray:
    lines = text.split("\n")
    widths = np.array([len(line) - len(line.lstrip(" \t")) for line in lines], dtype=np.float64)
    lengths = np.array([len(line) + 1 for line in lines])  # each line owns the newline that ends it
    return np.repeat(widths, lengths)[: len(text)]


def _in_word(text: str) -> np.ndarray:
    return np.fromiter((c.isalnum() or c == "_" for c in text), dtype=bool, count=len(text)).astype(np.float64)


def _regex_feature(pattern: re.Pattern, text: str) -> np.ndarray:
    marks = np.zeros(len(text) + 1, dtype=np.int64)
    for m in pattern.finditer(text):
        if m.end() > m.start():  # empty matches cover no character
            marks[m.start()] += 1
            marks[m.end()] -= 1
    return (np.cumsum(marks[:-1]) > 0).astype(np.float64)


@dataclass(frozen=True)
class FeatureSpec:
    """A feature to correlate: a built-in name, a regex, or given values."""

    name: str
    pattern: re.Pattern | None = None
    values: np.ndarray | None = None

    @property
    def description(self) -> str:
        if self.pattern is not None:
            return f"1 inside a match of /{self.pattern.pattern}/"
        if self.values is not None:
            return "given values"
        return BUILTIN_FEATURES[self.name]


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def parse_feature(spec: str) -> FeatureSpec:
    """``"NAME=REGEX"`` (1 on the characters inside a match; ``^``/``$`` match
    at line breaks) or the name of a built-in feature."""
    if "=" not in spec:
        if spec in BUILTIN_FEATURES:
            return FeatureSpec(spec)
        raise ConfigError(f"feature {spec!r} is neither a built-in ({', '.join(BUILTIN_FEATURES)}) nor "
                          "NAME=REGEX; write it like --feature 'def=^def '")
    name, regex = spec.split("=", 1)
    name = name.strip()
    if not _NAME.match(name):
        raise ConfigError(f"feature name {name!r} in {spec!r}: use letters, digits and _ (starting with a "
                          "letter), like --feature 'def=^def '")
    if name in BUILTIN_FEATURES:
        raise ConfigError(f"feature name {name!r} is taken by a built-in feature; choose another name")
    if not regex:
        raise ConfigError(f"feature {name!r} has an empty regular expression; write it like {name}=REGEX")
    try:
        pattern = re.compile(regex, re.MULTILINE)
    except re.error as e:
        raise ConfigError(f"feature {name!r}: {regex!r} is not a valid regular expression ({e}); "
                          "fix the pattern (Python re syntax)") from None
    return FeatureSpec(name, pattern=pattern)


def _feature_specs(features: Iterable[Any] | None) -> list[FeatureSpec]:
    if features is None:
        return [FeatureSpec(name) for name in BUILTIN_FEATURES]
    specs: list[FeatureSpec] = []
    for item in features:
        if isinstance(item, FeatureSpec):
            spec = item
        elif isinstance(item, str):
            spec = parse_feature(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            spec = FeatureSpec(item[0], values=np.asarray(item[1], dtype=np.float64))
        else:
            raise ConfigError(f"a feature is a built-in name, 'NAME=REGEX' or a (name, values) pair; got {item!r}")
        if any(s.name == spec.name for s in specs):
            raise ConfigError(f"feature {spec.name!r} is given twice; give each feature once")
        specs.append(spec)
    return specs


def text_features(text: str, features: Iterable[Any] | None = None) -> dict[str, np.ndarray]:
    """Each feature's value on every character of ``text``, float64 (T,).
    ``features``: built-in names, ``"NAME=REGEX"`` strings or (name, values)
    pairs; None: all the built-ins."""
    specs = _feature_specs(features)
    out: dict[str, np.ndarray] = {}
    scanned: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for spec in specs:
        if spec.values is not None:
            if spec.values.shape != (len(text),):
                raise ConfigError(f"feature {spec.name!r} has {spec.values.size} values for {len(text)} characters; "
                                  "give one value per character")
            values = spec.values
        elif spec.pattern is not None:
            values = _regex_feature(spec.pattern, text)
        elif spec.name in ("in_string", "in_comment", "bracket_depth"):
            scanned = scanned or _scan_code(text)
            values = scanned[("in_string", "in_comment", "bracket_depth").index(spec.name)]
        else:
            values = {"line_position": _line_position, "indent": _indent, "in_word": _in_word}[spec.name](text)
        out[spec.name] = values
    return out


# ---------------------------------------------------------------------------
# The cell equations, on the model's own weights
# ---------------------------------------------------------------------------

class _Stepper:
    """Runs a CharRNN's recurrent stack over a chunk of characters, one step
    at a time, and returns every layer's h, c and gates for every character.

    Weights are fp32 CPU copies laid out for the step: an LSTM's gate rows are
    reordered from torch's i, f, g, o to i, f, o, g (one sigmoid for three
    gates). Each layer's input half, ``W_ih x + b``, is one matrix product
    for the whole chunk (a table lookup for layer 0); the step adds ``W_hh h``
    and applies the nonlinearities in place in the chunk's buffers.
    """

    def __init__(self, model: CharRNN):
        cfg = model.config
        self.cell, self.L, self.H = cfg.cell, cfg.num_layers, cfg.hidden_size
        H = self.H
        rnn = model.rnn
        with torch.no_grad():
            emb = model.embedding.weight.detach().float().cpu()  # (V, E)
            self.w_ih, self.w_hh, self.b_x, self.b_h = [], [], [], []
            for layer in range(self.L):
                w_ih = getattr(rnn, f"weight_ih_l{layer}").detach().float().cpu()  # (G*H, in)
                w_hh = getattr(rnn, f"weight_hh_l{layer}").detach().float().cpu()  # (G*H, H)
                b_ih = getattr(rnn, f"bias_ih_l{layer}").detach().float().cpu()
                b_hh = getattr(rnn, f"bias_hh_l{layer}").detach().float().cpu()
                if self.cell == "lstm":
                    r = torch.arange(H)
                    order = torch.cat([r, r + H, r + 3 * H, r + 2 * H])  # i, f, g, o -> i, f, o, g
                    w_ih, w_hh, b_ih, b_hh = w_ih[order], w_hh[order], b_ih[order], b_hh[order]
                if self.cell == "gru":  # b_hn stays with h: n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
                    b_x, b_h = b_ih, b_hh
                else:
                    b_x, b_h = b_ih + b_hh, torch.zeros(0)
                self.w_ih.append(w_ih.t().contiguous())  # (in, G*H): x @ w
                self.w_hh.append(w_hh.contiguous())  # (G*H, H): addmv(w, h)
                self.b_x.append(b_x)
                self.b_h.append(b_h)
            self.table = emb @ self.w_ih[0] + self.b_x[0]  # (V, G*H): layer 0's input half per character

    def init_state(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (h, c), each (H,); c unused by GRU/RNN."""
        return [(torch.zeros(self.H), torch.zeros(self.H)) for _ in range(self.L)]

    def run(self, ids: torch.Tensor, state: list) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """ids (T,) -> per layer (h (T, H), c (T, H) or None, gates (T, G*H)).
        ``state`` is updated in place to the state after the last character."""
        out = []
        x = None
        for layer in range(self.L):
            if layer == 0:
                pre = self.table.index_select(0, ids)  # (T, G*H)
            else:
                pre = torch.addmm(self.b_x[layer], x, self.w_ih[layer])  # (T, G*H)
            h0, c0 = state[layer]
            step = {"lstm": self._lstm, "gru": self._gru, "rnn": self._rnn}[self.cell]
            h, c = step(layer, pre, h0, c0)
            state[layer] = (h[-1].clone(), c[-1].clone() if c is not None else c0)
            out.append((h, c, pre))  # pre now holds the gate activations
            x = h
        return out

    def _lstm(self, layer: int, G: torch.Tensor, h_prev: torch.Tensor, c_prev: torch.Tensor):
        T, H = G.shape[0], self.H
        w = self.w_hh[layer]
        hs, cs = torch.empty(T, H), torch.empty(T, H)
        rows, sig, tanh_g = G.unbind(0), G[:, : 3 * H].unbind(0), G[:, 3 * H :].unbind(0)
        i_, f_, o_ = G[:, :H].unbind(0), G[:, H : 2 * H].unbind(0), G[:, 2 * H : 3 * H].unbind(0)
        h_rows, c_rows = hs.unbind(0), cs.unbind(0)
        for t in range(T):
            rows[t].addmv_(w, h_prev)  # gates = W_ih x + b + W_hh h_(t-1)
            sig[t].sigmoid_()  # i, f, o
            tanh_g[t].tanh_()  # g
            c = torch.mul(f_[t], c_prev, out=c_rows[t]).addcmul_(i_[t], tanh_g[t])  # c = f*c + i*g
            h_prev = torch.tanh(c, out=h_rows[t]).mul_(o_[t])  # h = o * tanh(c)
            c_prev = c
        return hs, cs

    def _gru(self, layer: int, G: torch.Tensor, h_prev: torch.Tensor, _c: torch.Tensor):
        T, H = G.shape[0], self.H
        w, b = self.w_hh[layer], self.b_h[layer]
        hs = torch.empty(T, H)
        gh = torch.empty(3 * H)
        rz, n_ = G[:, : 2 * H].unbind(0), G[:, 2 * H :].unbind(0)
        r_, z_ = G[:, :H].unbind(0), G[:, H : 2 * H].unbind(0)
        h_rows = hs.unbind(0)
        for t in range(T):
            torch.addmv(b, w, h_prev, out=gh)  # W_hh h + b_hh: (3H,)
            rz[t].add_(gh[: 2 * H]).sigmoid_()  # r, z
            n_[t].addcmul_(r_[t], gh[2 * H :]).tanh_()  # n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
            h_prev = torch.sub(h_prev, n_[t], out=h_rows[t]).mul_(z_[t]).add_(n_[t])  # (1-z)*n + z*h
        return hs, None

    def _rnn(self, layer: int, G: torch.Tensor, h_prev: torch.Tensor, _c: torch.Tensor):
        w = self.w_hh[layer]
        rows = G.unbind(0)
        for t in range(G.shape[0]):
            h_prev = rows[t].addmv_(w, h_prev).tanh_()  # h = tanh(W_ih x + W_hh h + b)
        return G, None  # no gates: the "pre" buffer is h itself


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

@dataclass
class LayerTrace:
    """One layer's per-character arrays (the first ``kept`` characters), float32 (K, H)."""

    h: np.ndarray
    c: np.ndarray | None  # LSTM only
    gates: dict[str, np.ndarray]  # name -> (K, H), in GATES order

    def state(self, name: str) -> np.ndarray:
        if name == "h":
            return self.h
        if name == "c" and self.c is not None:
            return self.c
        if name in self.gates:
            return self.gates[name]
        raise ConfigError(f"no state {name!r} in this layer; choose one of {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return ["h"] + (["c"] if self.c is not None else []) + list(self.gates)


@dataclass(frozen=True)
class UnitCorrelation:
    layer: int
    unit: int
    state: str  # "h" or "c"
    r: float

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "unit": self.unit, "state": self.state, "r": round(self.r, 6)}


@dataclass
class FeatureCorrelation:
    """A feature's values and its Pearson r with every unit's h and c."""

    name: str
    description: str
    values: np.ndarray  # (T,) the feature on every character inspected
    r: np.ndarray | None  # (L, S, H) with S = len(states); NaN for constant units; None: feature constant
    states: tuple[str, ...]

    @property
    def constant(self) -> bool:
        """True when the feature has one value over the whole text: r is undefined."""
        return self.r is None

    def top(self, n: int = 5) -> list[UnitCorrelation]:
        """The ``n`` units (layer, unit) with the largest |r|, each with the state
        (h or c) where its |r| is largest; constant units excluded."""
        if self.r is None:
            return []
        a = np.nan_to_num(np.abs(self.r), nan=-1.0)  # (L, S, H)
        best_state = a.argmax(axis=1)  # (L, H): h or c, per unit
        best = a.max(axis=1).ravel()  # (L*H,)
        order = np.argsort(-best, kind="stable")[:n]
        H = self.r.shape[2]
        out = []
        for k in order:
            if best[k] < 0:
                break
            layer, unit = divmod(int(k), H)
            s = int(best_state[layer, unit])
            out.append(UnitCorrelation(layer, unit, self.states[s], float(self.r[layer, s, unit])))
        return out


@dataclass
class GateSaturation:
    layer: int
    gate: str
    left: float  # fraction of (unit, character) pairs below 0.1 (tanh gates: -0.8)
    right: float  # ... above 0.9 (tanh gates: 0.8)
    unit_left: np.ndarray  # (H,) per unit
    unit_right: np.ndarray  # (H,)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "gate": self.gate, "left": round(self.left, 6), "right": round(self.right, 6)}


@dataclass
class Inspection:
    """What :func:`inspect` found. ``layers[l].h`` etc. hold the first ``kept``
    characters; ``features`` and ``saturation`` cover all ``chars``."""

    cell: str
    num_layers: int
    hidden_size: int
    chars: int
    text: str
    ids: np.ndarray
    kept: int
    layers: list[LayerTrace]
    features: list[FeatureCorrelation]
    saturation: list[GateSaturation]
    seconds: float = 0.0

    @property
    def gates(self) -> tuple[str, ...]:
        return GATES[self.cell]

    @property
    def states(self) -> tuple[str, ...]:
        """The states correlated with features: ("h", "c") for an LSTM, ("h",) otherwise."""
        return ("h", "c") if self.cell == "lstm" else ("h",)

    def feature(self, name: str) -> FeatureCorrelation:
        for f in self.features:
            if f.name == name:
                return f
        raise ConfigError(f"no feature {name!r}; inspected: {', '.join(f.name for f in self.features)}")

    def to_dict(self, top: int = 5) -> dict[str, Any]:
        """Plain data (JSON-ready; never NaN): chars, features with their top
        units, gate saturation per layer and gate."""
        return {
            "chars": self.chars,
            "cell": self.cell,
            "features": [{"name": f.name, "constant": f.constant, "top": [u.to_dict() for u in f.top(top)]}
                         for f in self.features],
            "gates": [g.to_dict() for g in self.saturation],
        }


# ---------------------------------------------------------------------------
# inspect()
# ---------------------------------------------------------------------------

class _Moments:
    """Running sums for Pearson r of every unit against standardised features:
    sum x, sum x^2 and Z^T x, in float64, of x shifted by its first value (so a
    constant unit sums to exactly zero and large offsets do not cancel)."""

    def __init__(self, F: int, H: int):
        self.shift: torch.Tensor | None = None
        self.s1 = torch.zeros(H, dtype=torch.float64)
        self.s2 = torch.zeros(H, dtype=torch.float64)
        self.zx = torch.zeros(F, H, dtype=torch.float64)

    def add(self, x: torch.Tensor, z: torch.Tensor) -> None:
        """x (T, H) a state, z (T, F) the standardised features."""
        if self.shift is None:
            self.shift = x[0].double().clone()
        xs = x.double() - self.shift  # (T, H)
        self.s1 += xs.sum(0)
        self.s2 += (xs * xs).sum(0)
        self.zx += z.t() @ xs  # (F, H): one product for every feature and unit

    def r(self, n: int) -> np.ndarray:
        """(F, H) Pearson r; NaN for units with no variation."""
        mean = self.s1 / n
        var = (self.s2 / n - mean * mean).clamp_min(0)
        std = var.sqrt()
        scale = 1.0 + mean.abs() + (self.shift.abs() if self.shift is not None else 0)
        flat = std <= 1e-7 * scale  # no variation beyond float32 rounding
        # With z standardised (mean 0, sd 1), cov(z, x) = mean(z * x): no centring of x needed.
        r = (self.zx / n) / torch.where(flat, torch.ones_like(std), std)
        r = r.clamp(-1.0, 1.0)
        r[:, flat] = float("nan")
        return r.numpy()


def _as_ids_and_text(ids_or_text: Any, tokenizer: Any) -> tuple[np.ndarray, str]:
    if isinstance(ids_or_text, str):
        if tokenizer is None:
            raise ConfigError("inspect() got text but no tokenizer; pass the tokenizer that load_model returns")
        return np.asarray(tokenizer.encode_array(ids_or_text), dtype=np.int64), ids_or_text
    ids = np.asarray(ids_or_text, dtype=np.int64).reshape(-1)
    if tokenizer is None:
        raise ConfigError("inspect() needs the tokenizer to compute the text's features; "
                          "pass the tokenizer that load_model returns")
    return ids, tokenizer.decode(ids.tolist())


@torch.inference_mode()
def inspect(model: CharRNN, ids_or_text: Any, tokenizer: Any = None, *, features: Iterable[Any] | None = None,
            max_chars: int | None = MAX_CHARS, keep_chars: int | None = None, chunk_len: int = 1024,
            progress: Any = None) -> Inspection:
    """Run ``model`` over the first ``max_chars`` characters of a text (a
    string, or ids with their ``tokenizer``), one stream from a zero state,
    and return its per-character states and gates (the first ``keep_chars``;
    None: all -- see the module note on memory), every unit's correlation with
    ``features`` (None: all of :data:`BUILTIN_FEATURES`; also ``"NAME=REGEX"``
    strings and ``(name, values)`` pairs) and gate saturation.

    ``progress``, if given, is called with (characters done, total) after each
    chunk of ``chunk_len`` characters.
    """
    import time

    started = time.perf_counter()
    ids, text = _as_ids_and_text(ids_or_text, tokenizer)
    if max_chars is not None:
        if max_chars < 2:
            raise ConfigError(f"max_chars must be at least 2, got {max_chars}")
        ids, text = ids[:max_chars], text[:max_chars]
    T = len(ids)
    if T < 2:
        raise DataError(f"the text has {T} character(s); inspecting needs at least 2")
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise DataError(f"the text's ids must be in 0..{vocab - 1} (the model's vocabulary)")
    if chunk_len < 1:
        raise ConfigError(f"chunk_len must be at least 1, got {chunk_len}")
    specs = _feature_specs(features)
    values = text_features(text, specs)
    names = list(values)

    # Standardise the features once; constant ones (sd 0) have no r.
    fmat = np.stack([values[n] for n in names], axis=1) if names else np.zeros((T, 0))  # (T, F)
    fsd = fmat.std(axis=0)
    constant = fsd <= 1e-12 * (1 + np.abs(fmat).max(axis=0, initial=0))
    z = torch.from_numpy((fmat - fmat.mean(axis=0)) / np.where(constant, 1.0, fsd))  # (T, F)

    stepper = _Stepper(model)
    L, H, cell = stepper.L, stepper.H, stepper.cell
    gate_names = GATES[cell]
    states = ("h", "c") if cell == "lstm" else ("h",)
    K = T if keep_chars is None else max(0, min(int(keep_chars), T))
    layers = [LayerTrace(h=np.empty((K, H), np.float32), c=np.empty((K, H), np.float32) if cell == "lstm" else None,
                         gates={g: np.empty((K, H), np.float32) for g in gate_names}) for _ in range(L)]
    moments = [[_Moments(len(names), H) for _ in states] for _ in range(L)]
    low = torch.zeros(L, len(gate_names), H, dtype=torch.float64)
    high = torch.zeros(L, len(gate_names), H, dtype=torch.float64)
    thresholds = torch.tensor([[-0.8, 0.8] if g in TANH_GATES else [LEFT, RIGHT] for g in gate_names])

    ids_t = torch.from_numpy(ids)
    state = stepper.init_state()
    for lo in range(0, T, chunk_len):
        hi = min(T, lo + chunk_len)
        out = stepper.run(ids_t[lo:hi], state)
        zc = z[lo:hi]
        for layer, (h, c, g) in enumerate(out):
            for s, x in enumerate((h, c)[: len(states)]):
                moments[layer][s].add(x, zc)
            if gate_names:
                gv = g.view(hi - lo, len(gate_names), H)  # (T, G, H)
                low[layer] += (gv < thresholds[:, 0, None]).sum(0)
                high[layer] += (gv > thresholds[:, 1, None]).sum(0)
            if lo < K:
                k = min(K, hi) - lo
                trace = layers[layer]
                trace.h[lo : lo + k] = h[:k].numpy()
                if c is not None:
                    trace.c[lo : lo + k] = c[:k].numpy()
                for j, name in enumerate(gate_names):
                    trace.gates[name][lo : lo + k] = g[:k, j * H : (j + 1) * H].numpy()
        if progress is not None:
            progress(hi, T)

    r_all = np.stack([np.stack([m.r(T) for m in per_layer], axis=1) for per_layer in moments], axis=1)  # (F, L, S, H)
    correlations = [FeatureCorrelation(name=n, description=spec.description, values=values[n],
                                       r=None if constant[f] else r_all[f], states=states)
                    for f, (n, spec) in enumerate(zip(names, specs))]
    saturation = [GateSaturation(layer=layer, gate=g, left=float(low[layer, j].sum() / (T * H)),
                                 right=float(high[layer, j].sum() / (T * H)),
                                 unit_left=(low[layer, j] / T).numpy(), unit_right=(high[layer, j] / T).numpy())
                  for layer in range(L) for j, g in enumerate(gate_names)]
    return Inspection(cell=cell, num_layers=L, hidden_size=H, chars=T, text=text, ids=ids, kept=K, layers=layers,
                      features=correlations, saturation=saturation, seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------
# The saturation scatter as a PNG
# ---------------------------------------------------------------------------

GATE_COLOURS = {"i": "#1b9e77", "f": "#d95f02", "o": "#7570b3", "g": "#e7298a",
                "r": "#1b9e77", "z": "#d95f02", "n": "#e7298a"}


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or a CharnnError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharnnError("--plot needs matplotlib, which is not installed; "
                          "install it with: pip install 'charnn[plot]' (or pip install matplotlib)") from None
    return plt


def saturation_png(result: Inspection, path: str | Path, title: str = "") -> Path:
    """Per layer, every unit of every gate as a point: fraction of characters
    left-saturated (x) against right-saturated (y). Needs matplotlib."""
    if not result.saturation:
        raise CharnnError("a vanilla RNN has no gates, so there is no saturation plot; "
                          "--plot applies to LSTM and GRU models")
    plt = pyplot()
    path = Path(path)
    L = result.num_layers
    fig, axes = plt.subplots(1, L, figsize=(4.2 * L, 4.4), dpi=100, squeeze=False)
    try:
        for layer, ax in enumerate(axes[0]):
            for g in (s for s in result.saturation if s.layer == layer):
                ax.scatter(g.unit_left, g.unit_right, s=8, alpha=0.6, color=GATE_COLOURS[g.gate],
                           label=f"{g.gate} ({GATE_TITLES[g.gate]})", linewidths=0)
            ax.plot([0, 1], [1, 0], color="#999", linewidth=0.8, linestyle=":")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_aspect("equal")
            ax.set_xlabel("fraction left-saturated (< 0.1)")
            if layer == 0:
                ax.set_ylabel("fraction right-saturated (> 0.9)")
            ax.set_title(f"layer {layer}")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(loc="upper right", fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        try:
            if not path.parent.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, format="png")
        except OSError as e:
            raise CharnnError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------
#
# One standalone file. Activations of the shown characters are stored for
# every layer, state and unit as int8, unit-major, base64, one <script
# type="application/octet-stream"> block per (layer, state), decoded only
# when a unit of that block is first shown. Each stores s = q/127 in -1..1,
# the colour coordinate; the value is s for h/g/n (tanh), (s+1)/2 for the
# sigmoid gates, and s * scale[unit] for c (scale = the unit's max |c| over the
# shown text). Size: chars x layers x hidden x (2 + gates) x 4/3 bytes plus
# ~70 bytes per character of markup.

HTML_CHARS = 2000  # default characters shown on the page


def _quantise(x: np.ndarray, kind: str) -> tuple[np.ndarray, list[float] | None]:
    """(K, H) float -> int8 (H, K) unit-major, and per-unit scales for c."""
    scales = None
    if kind == "sigmoid":
        s = x * 2.0 - 1.0
    elif kind == "c":
        m = np.abs(x).max(axis=0) if len(x) else np.zeros(x.shape[1])
        m = np.where(m > 0, m, 1.0)
        s, scales = x / m, [float(f"{v:.5g}") for v in m]
    else:
        s = x
    q = np.clip(np.rint(s * 127.0), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scales


def _kind(state: str) -> str:
    if state == "c":
        return "c"
    if state in ("h",) or state in TANH_GATES:
        return "tanh"
    return "sigmoid"


def _scatter_svg(result: Inspection) -> str:
    """Per layer, a 0..1 x 0..1 square: each unit of each gate a dot at (left, right)."""
    size, pad = 220, 34
    parts = []
    for layer in range(result.num_layers):
        dots = []
        for g in (s for s in result.saturation if s.layer == layer):
            pts = "".join(f'<circle cx="{pad + x * size:.1f}" cy="{pad + (1 - y) * size:.1f}" r="2.2" data-u="{u}"/>'
                          for u, (x, y) in enumerate(zip(g.unit_left.tolist(), g.unit_right.tolist())))
            dots.append(f'<g class="gate" data-layer="{layer}" data-gate="{g.gate}" fill="{GATE_COLOURS[g.gate]}" '
                        f'fill-opacity="0.6">{pts}</g>')
        w = size + 2 * pad
        axes = (f'<rect x="{pad}" y="{pad}" width="{size}" height="{size}" fill="#fafafa" stroke="#888"/>'
                f'<line x1="{pad}" y1="{pad}" x2="{pad + size}" y2="{pad + size}" stroke="#ccc" stroke-dasharray="3"/>'
                f'<text x="{pad + size / 2}" y="{pad - 10}" text-anchor="middle" font-size="13">layer {layer}</text>'
                f'<text x="{pad}" y="{pad + size + 14}" font-size="10">0</text>'
                f'<text x="{pad + size}" y="{pad + size + 14}" font-size="10" text-anchor="end">1</text>'
                f'<text x="{pad + size / 2}" y="{pad + size + 26}" font-size="11" text-anchor="middle">'
                f'left-saturated (&lt; 0.1)</text>'
                f'<text x="{pad - 6}" y="{pad + 4}" font-size="10" text-anchor="end">1</text>'
                f'<text transform="translate({pad - 14},{pad + size / 2}) rotate(-90)" font-size="11" '
                f'text-anchor="middle">right-saturated (&gt; 0.9)</text>')
        parts.append(f'<svg class="scatter" width="{w}" height="{w}" viewBox="0 0 {w} {w}" '
                     f'xmlns="http://www.w3.org/2000/svg">{axes}{"".join(dots)}</svg>')
    legend = " ".join(f'<span class="sw" style="background:{GATE_COLOURS[g]}"></span>{g} {html.escape(GATE_TITLES[g])}'
                      for g in result.gates)
    return "".join(parts) + f'<div class="legend">{legend}</div>'


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.2em; }} h2 {{ font-size: 1.05em; margin-top: 1.4em; }}
.controls {{ display: flex; flex-wrap: wrap; gap: 0.6em 1.2em; align-items: center; margin: 0.6em 0; }}
.controls label {{ white-space: nowrap; }}
#info {{ font-family: ui-monospace, Menlo, Consolas, monospace; margin: 0.4em 0; }}
#scale {{ display: inline-block; width: 12em; height: 0.9em; vertical-align: middle;
         background: linear-gradient(to right, #2166ac, #f7f7f7, #b2182b); border: 1px solid #aaa; }}
.text {{ font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 1.45;
        border: 1px solid #ccc; padding: 1em; word-break: break-all; }}
.text span.c {{ border-radius: 2px; cursor: default; }}
.text span.c:hover {{ outline: 2px solid #000; }}
.text span.nl {{ color: #999; }}
#panel {{ position: fixed; right: 1em; top: 1em; background: #fff; border: 1px solid #888; padding: 0.6em 0.9em;
         font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; min-width: 14em;
         box-shadow: 0 2px 6px #0003; }}
.scatter {{ margin-right: 1em; }} .scatter circle {{ cursor: pointer; }} .scatter circle:hover {{ stroke: #000; }}
.legend .sw {{ display: inline-block; width: 0.8em; height: 0.8em; margin: 0 0.3em 0 1em; border-radius: 50%; }}
table.tops td {{ padding: 0 0.8em 0 0; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{summary}</p>
<div class="controls">
<label>top units per feature <select id="top">{top_options}</select></label>
<label>layer <select id="layer">{layer_options}</select></label>
<label>state <select id="state">{state_options}</select></label>
<label>unit <input id="unit" type="number" min="0" max="{max_unit}" value="0" style="width:5em"></label>
<button id="show">show</button>
</div>
<div id="info"></div>
<div>colour: <span id="lo"></span> <span id="scale"></span> <span id="hi"></span></div>
<div id="panel">hover over a character</div>
<div class="text" id="text">{spans}</div>
<h2>Gate saturation</h2>
<p>Each dot is one unit of one gate: the fraction of the {chars} characters on which it was
left-saturated (&lt; 0.1; tanh-valued g and n: &lt; -0.8) against right-saturated (&gt; 0.9; &gt; 0.8).
Click a dot to colour the text by that gate.</p>
{scatter}
<h2>Features</h2>
<table class="tops">{feature_rows}</table>
{blobs}
<script id="meta" type="application/json">{meta}</script>
<script>
(function () {{
  var meta = JSON.parse(document.getElementById("meta").textContent);
  var spans = document.getElementById("text").getElementsByClassName("c");
  var cache = {{}}, current = null;
  function block(layer, state) {{
    var key = layer + "-" + state;
    if (!cache[key]) {{
      var bin = atob(document.getElementById("q-" + key).textContent.trim());
      var a = new Int8Array(bin.length);
      for (var i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i);
      cache[key] = a;
    }}
    return cache[key];
  }}
  function colour(s) {{
    // diverging: -1 blue (#2166ac), 0 near-white (#f7f7f7), +1 red (#b2182b)
    var lo = [33, 102, 172], mid = [247, 247, 247], hi = [178, 24, 43];
    var end = s < 0 ? lo : hi, t = Math.min(1, Math.abs(s));
    var c = mid.map(function (m, k) {{ return Math.round(m + (end[k] - m) * t); }});
    return "rgb(" + c.join(",") + ")";
  }}
  function value(sel, s) {{
    if (sel.kind === "sigmoid") return (s + 1) / 2;
    if (sel.kind === "c") return s * meta.cscale[sel.layer][sel.unit];
    if (sel.kind === "feature") return meta.features[sel.name][sel.i];
    return s;
  }}
  function fmt(v) {{ return (v >= 0 ? "+" : "") + v.toFixed(3); }}
  function show(sel) {{
    var n = meta.shown, s = new Float32Array(n), i;
    if (sel.kind === "feature") {{
      var f = meta.features[sel.name], m = Math.max.apply(null, f.concat([1e-9]));
      for (i = 0; i < n; i++) s[i] = f[i] / m;
      sel.range = [0, m];
    }} else {{
      var a = block(sel.layer, sel.state), off = sel.unit * n;
      for (i = 0; i < n; i++) s[i] = a[off + i] / 127;
      sel.range = sel.kind === "sigmoid" ? [0, 1] : sel.kind === "c" ?
        [-meta.cscale[sel.layer][sel.unit], meta.cscale[sel.layer][sel.unit]] : [-1, 1];
    }}
    for (i = 0; i < n; i++) spans[i].style.background = colour(s[i]);
    sel.s = s;
    current = sel;
    document.getElementById("lo").textContent = sel.kind === "feature" ? "" : sel.range[0].toFixed(2);
    document.getElementById("hi").textContent = sel.range[1].toFixed(2);
    var label = sel.kind === "feature" ? "feature " + sel.name :
      "layer " + sel.layer + ", " + meta.state_titles[sel.state] + ", unit " + sel.unit;
    var rs = sel.kind === "feature" ? [] : meta.r.filter(function (e) {{
      return e[1] === sel.layer && e[2] === sel.state && e[3] === sel.unit; }});
    document.getElementById("info").textContent = label + (rs.length ? "   r with " + rs.map(function (e) {{
      return e[0] + " " + fmt(e[4]); }}).join(", ") : "");
    if (sel.kind !== "feature") {{
      document.getElementById("layer").value = sel.layer;
      document.getElementById("state").value = sel.state;
      document.getElementById("unit").value = sel.unit;
    }}
  }}
  function pick(layer, state, unit) {{
    var kind = state === "c" ? "c" : (state === "h" || meta.tanh_gates.indexOf(state) >= 0) ? "tanh" : "sigmoid";
    show({{kind: kind, layer: layer, state: state, unit: unit}});
  }}
  document.getElementById("top").addEventListener("change", function (e) {{
    var p = e.target.value.split(":");
    if (p[0] === "feature") show({{kind: "feature", name: p[1]}});
    else pick(+p[0], p[1], +p[2]);
  }});
  document.getElementById("show").addEventListener("click", function () {{
    var u = Math.max(0, Math.min(meta.hidden - 1, parseInt(document.getElementById("unit").value, 10) || 0));
    pick(+document.getElementById("layer").value, document.getElementById("state").value, u);
  }});
  var circles = document.querySelectorAll(".scatter circle");
  for (var k = 0; k < circles.length; k++) {{
    circles[k].addEventListener("click", function (e) {{
      var g = e.currentTarget.parentNode;
      pick(+g.getAttribute("data-layer"), g.getAttribute("data-gate"), +e.currentTarget.getAttribute("data-u"));
    }});
  }}
  var panel = document.getElementById("panel");
  document.getElementById("text").addEventListener("mouseover", function (e) {{
    var el = e.target;
    if (!el.classList || !el.classList.contains("c") || !current) return;
    var i = +el.getAttribute("data-i"), txt = "char " + i + "  " + meta.chars[i] + "\\n";
    txt += current.kind === "feature" ? current.name + " = " + value({{kind: "feature", name: current.name, i: i}}) :
      "value " + fmt(value(current, current.s[i]));
    meta.feature_names.forEach(function (name) {{ txt += "\\n" + name + " = " + meta.features[name][i]; }});
    panel.textContent = txt;
    panel.style.whiteSpace = "pre";
  }});
  var first = meta.first;
  if (first) pick(first[0], first[1], first[2]); else pick(0, "h", 0);
  document.body.setAttribute("data-ready", String(spans.length));
}})();
</script>
</body>
</html>
"""


def inspect_page(result: Inspection, title: str = "charnn inspect", top: int = 5,
                 chars: int | None = HTML_CHARS) -> str:
    """The standalone page for the first ``chars`` characters (at most those
    the result kept; None: all kept)."""
    shown = result.kept if chars is None else min(chars, result.kept)
    if shown < 1:
        raise ConfigError("the page needs per-character states: inspect with keep_chars of at least 1")
    text = result.text[:shown]
    spans = "".join(
        (f'<span class="c nl" data-i="{i}">↵</span>\n' if ch == "\n" else
         f'<span class="c" data-i="{i}">{html.escape(ch)}</span>')
        for i, ch in enumerate(text))
    states = ["h"] + (["c"] if result.cell == "lstm" else []) + list(result.gates)
    state_titles = {"h": "h (hidden state)", "c": "c (cell state)", **{g: f"{g} gate ({GATE_TITLES[g]})"
                                                                         for g in result.gates}}
    blobs, cscale = [], []
    for layer, trace in enumerate(result.layers):
        layer_scales: list[float] = []
        for s in states:
            q, scales = _quantise(trace.state(s)[:shown], _kind(s))
            if scales is not None:
                layer_scales = scales
            blobs.append(f'<script type="application/octet-stream" id="q-{layer}-{s}">'
                         f'{base64.b64encode(q.tobytes()).decode("ascii")}</script>')
        cscale.append(layer_scales)
    top_options, feature_rows, r_rows = [], [], []
    first = None
    for f in result.features:
        units = f.top(top)
        label = html.escape(f"{f.name}: {f.description}")
        if f.constant:
            feature_rows.append(f"<tr><td>{html.escape(f.name)}</td><td>constant over the text: r undefined</td></tr>")
            continue
        opts = [f'<option value="feature:{html.escape(f.name)}">the feature itself</option>']
        for u in units:
            opts.append(f'<option value="{u.layer}:{u.state}:{u.unit}">layer {u.layer} {u.state} unit {u.unit}  '
                        f'r = {u.r:+.3f}</option>')
            r_rows.append([f.name, u.layer, u.state, u.unit, round(u.r, 4)])
        if first is None and units:
            first = [units[0].layer, units[0].state, units[0].unit]
            opts[1] = opts[1].replace("<option ", "<option selected ", 1)
        top_options.append(f'<optgroup label="{label}">{"".join(opts)}</optgroup>')
        feature_rows.append(f"<tr><td>{html.escape(f.name)}</td><td>" + ", ".join(
            f"L{u.layer} {u.state}{u.unit} {u.r:+.2f}" for u in units) + "</td></tr>")
    feature_values = {f.name: [float(f"{v:.4g}") for v in f.values[:shown].tolist()] for f in result.features}
    meta = {"shown": shown, "hidden": result.hidden_size, "cscale": cscale, "r": r_rows, "first": first,
            "tanh_gates": sorted(TANH_GATES), "state_titles": state_titles, "chars": [show_char(c) for c in text],
            "features": feature_values, "feature_names": [f.name for f in result.features]}
    summary = (f"{result.cell} {result.num_layers}x{result.hidden_size}: {result.chars:,} characters inspected "
               f"(correlations and saturation over all of them); the first {shown:,} are shown. "
               "Pick a unit; each character is coloured by the unit's value after reading it "
               "(blue negative or closed, red positive or open).")
    return _PAGE.format(
        title=html.escape(title), summary=html.escape(summary), top_options="".join(top_options),
        layer_options="".join(f'<option value="{i}">{i}</option>' for i in range(result.num_layers)),
        state_options="".join(f'<option value="{s}">{html.escape(state_titles[s])}</option>' for s in states),
        max_unit=result.hidden_size - 1, spans=spans, chars=f"{result.chars:,}",
        scatter=_scatter_svg(result) if result.saturation else "<p>A vanilla RNN has no gates.</p>",
        feature_rows="".join(feature_rows), blobs="\n".join(blobs),
        meta=json.dumps(meta, ensure_ascii=True).replace("</", "<\\/"))


# ``charnn.inspect`` is both this module and its main function: the package
# exports the function lazily, but once this module is imported Python binds
# the package attribute to the module. Making the module callable keeps
# ``charnn.inspect(model, text, tokenizer)`` working either way.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Inspection:
        return inspect(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
