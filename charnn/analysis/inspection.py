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

The features live in :mod:`charnn.analysis.features`; the standalone HTML page and
the saturation scatter as a PNG in :mod:`charnn.analysis.inspect_page`. Library code:
nothing is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .features import BUILTIN_FEATURES, _feature_specs, parse_feature, text_features  # noqa: F401
from ..model.fastrnn import step_weights
from ..model.rnn import CharRNN

__all__ = ["inspect", "Inspection", "LayerTrace", "FeatureCorrelation", "UnitCorrelation", "GateSaturation",
           "text_features", "parse_feature", "BUILTIN_FEATURES", "GATES"]

MAX_CHARS = 100_000  # default characters inspected
LEFT, RIGHT = 0.1, 0.9  # gate saturation thresholds (sigmoid gates)
GATES = {"lstm": ("i", "f", "o", "g"), "gru": ("r", "z", "n"), "rnn": ()}
TANH_GATES = {"g", "n"}  # -1..1; saturation uses < -0.8 / > 0.8
GATE_TITLES = {"i": "input", "f": "forget", "o": "output", "g": "cell input, tanh",
               "r": "reset", "z": "update", "n": "new, tanh"}


# ---------------------------------------------------------------------------
# The cell equations, on the model's own weights
# ---------------------------------------------------------------------------

class _Stepper:
    """Runs a CharRNN's recurrent stack over a chunk of characters, one step
    at a time, and returns every layer's h, c and gates for every character.

    Weights are fp32 CPU copies laid out for the step
    (:func:`~charnn.model.fastrnn.step_weights`: an LSTM's gates as i, f, o,
    g). Each layer's input half, ``W_ih x + b``, is one matrix product for
    the whole chunk (a table lookup for layer 0); the step adds ``W_hh h``
    and applies the nonlinearities in place in the chunk's buffers.
    """

    def __init__(self, model: CharRNN):
        cfg = model.config
        self.cell, self.L, self.H = cfg.cell, cfg.num_layers, cfg.hidden_size
        with torch.no_grad():
            emb = model.embedding.weight.detach().float().cpu()  # (V, E)
            self.w_ih, self.w_hh, self.b_x, self.b_h = [], [], [], []
            for layer in range(self.L):
                w_ih, w_hh, b_ih, b_hh = (w.cpu() for w in step_weights(model, layer))
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
