"""A fast single-step path for generation: the cell equations written out.

``nn.LSTM`` is built for long sequences. Called once per character it pays
for a general-purpose step every time: module dispatch, argument checks, and
on CPUs a oneDNN primitive set up (weights reordered) on every call. Here the
weights of a trained :class:`~charnn.model.rnn.CharRNN` are re-laid out *once* and
each step is a handful of tensor operations:

- layer 0 never multiplies by the embedding: ``W_ih @ embedding + biases`` is
  folded into one table of shape (V, G*H) (G = 4 gates for an LSTM, 3 for a
  GRU, 1 for a plain RNN), so the input half of the first layer is a row
  lookup;
- every later layer does one fused matrix product of ``[x; h]`` with
  ``[W_ih | W_hh]``, bias added by the same ``addmm``;
- LSTM gate rows are reordered from torch's ``i, f, g, o`` to ``i, f, o, g`` so
  one ``sigmoid`` covers the three sigmoid gates and one ``tanh`` the fourth;
  the element-wise updates run in place.

In fp32 the arithmetic is torch's own (the same numbers up to rounding), so
greedy output matches the plain ``nn.LSTM`` loop. With bf16 weights (for big
sampled batches, see ``sample.sampling_precision``) the matrix products use the
CPU's bf16 dot products, on weights oneDNN has laid out for them once, where
torch has oneDNN: a product on torch's own layout lays the weight out again
at every call (64 streams at 2x512: 741 -> 442 us for the 1024 x 2048 layer,
the same numbers).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rnn import CharRNN

PRIME_CHUNK = 4096  # characters of a prime read per sequence pass: bounds the pass's activations
# Magnitudes below this cannot reach fp32's (or bf16's) 3.4e38 in any step, with room to spare.
SAFE_MAGNITUDE = 1e36


class PackedRNN:
    """A CharRNN's weights packed for one-character-at-a-time inference.

    Build it once (``PackedRNN(model)``), then ``state = init_state(B)`` and
    ``logits, state = step(ids, state)`` per character. ``forward_prime``
    consumes a whole prime with the model's own sequence forward.
    """

    def __init__(self, model: CharRNN, dtype: torch.dtype = torch.float32, batch_size: int = 1):
        cfg = model.config
        self.model = model
        self.cell = cfg.cell
        self.num_layers = cfg.num_layers
        self.hidden_size = cfg.hidden_size
        self.dtype = dtype
        self.exact = dtype == torch.float32  # torch's own products: greedy output equals nn.LSTM's
        self.batch_size = batch_size  # the streams a step will run (oneDNN lays weights out for it)
        self.prepacked = not self.exact and prepacking_works(dtype)
        with torch.no_grad():
            emb = model.embedding.weight.detach().float()  # (V, E)
            self.tables: Tensor  # (V, G*H): layer 0's input contribution per character
            # Weight matrices below are as ``_w`` lays them out (fp32: (K, N), x @ W).
            self.w_cat: list[Tensor] = []  # LSTM/RNN layers >= 1: [W_ih | W_hh]^T, (2H, G*H)
            self.w_hh: list[Tensor] = []  # layer 0 (all cells), GRU all layers: W_hh^T, (H, G*H)
            self.w_ih: list[Tensor] = []  # GRU layers >= 1: W_ih^T, (H, 3H)
            self.b_ih: list[Tensor] = []
            self.b_hh: list[Tensor] = []
            self.bias: list[Tensor] = []  # fused b_ih + b_hh (LSTM, RNN)
            for layer in range(self.num_layers):
                w_ih, w_hh, b_ih, b_hh = step_weights(model, layer)
                if layer == 0:
                    table = emb @ w_ih.t() + b_ih  # (V, G*H)
                    if self.cell != "gru":  # GRU keeps b_hh with h: n = tanh(.. + r*(W_hn h + b_hn))
                        table = table + b_hh
                    self.tables = table.contiguous()
                    self.w_hh.append(self._w(w_hh.t()))
                    self.w_cat.append(torch.empty(0))
                    self.w_ih.append(torch.empty(0))
                elif self.cell == "gru":
                    self.w_ih.append(self._w(w_ih.t()))
                    self.w_hh.append(self._w(w_hh.t()))
                    self.w_cat.append(torch.empty(0))
                else:
                    self.w_cat.append(self._w(torch.cat([w_ih, w_hh], dim=1).t()))  # (2H, G*H)
                    self.w_hh.append(torch.empty(0))
                    self.w_ih.append(torch.empty(0))
                self.b_ih.append(b_ih.to(dtype).contiguous())
                self.b_hh.append(b_hh.to(dtype).contiguous())
                self.bias.append((b_ih + b_hh).to(dtype).contiguous())
            self.head_w = model.head.weight.detach().float().t().contiguous()  # (H, V), small: kept fp32
            self.head_b = model.head.bias.detach().float().contiguous()
            self.value_bound = self._value_bound()

    def _value_bound(self) -> float:
        """An upper bound on |every gate pre-activation and logit| over any
        number of steps. Every cell's output h lies in [-1, 1] (tanh, or a
        convex mix of tanh values for the GRU), so a layer's pre-activations
        are at most max|input| * row-sum|W_ih| + row-sum|W_hh| + |biases|, and
        the logits at most row-sum|W_head| + |b_head|. Below
        :data:`SAFE_MAGNITUDE` no step can overflow to inf (or then NaN), so
        the sampler need not check; above it (absurd weights) it checks every step."""
        rnn = self.model.rnn

        def rowsum(w: Tensor) -> float:
            return float(w.detach().float().abs().sum(1).max())

        def amax(t: Tensor) -> float:
            return float(t.detach().float().abs().max())

        bounds = [amax(self.tables) + rowsum(rnn.weight_hh_l0) + amax(rnn.bias_hh_l0)]
        for layer in range(1, self.num_layers):
            bounds.append(rowsum(getattr(rnn, f"weight_ih_l{layer}")) + rowsum(getattr(rnn, f"weight_hh_l{layer}"))
                          + amax(getattr(rnn, f"bias_ih_l{layer}")) + amax(getattr(rnn, f"bias_hh_l{layer}")))
        bounds.append(rowsum(self.model.head.weight) + amax(self.model.head.bias))
        bound = max(bounds)
        return bound if bound == bound else float("inf")  # NaN weights: unbounded

    def _w(self, t: Tensor) -> Tensor:
        """A weight matrix given as (K, N) -- ``x @ t`` is the product -- laid out
        as the step's matmuls run fastest: fp32 ``addmm`` reads (K, N); bf16
        takes torch's own (N, K) layout, laid out once more for oneDNN where
        :func:`prepacking_works` (see :meth:`_linear`)."""
        if self.dtype == torch.float32:
            return t.contiguous()
        w = t.t().to(self.dtype).contiguous()
        return torch.ops.mkldnn._reorder_linear_weight(w, self.batch_size) if self.prepacked else w

    # -- state -------------------------------------------------------------
    def init_state(self, batch_size: int) -> list[Tensor]:
        """Per layer: h (B, H), and for an LSTM c (B, H) after the h's."""
        dev = self.head_b.device
        n = self.num_layers * (2 if self.cell == "lstm" else 1)
        return [torch.zeros(batch_size, self.hidden_size, device=dev) for _ in range(n)]

    def state_from_model(self, state, batch_size: int) -> list[Tensor]:
        """Convert the model's (L, 1, H) state to ours, repeated for ``batch_size`` streams."""
        parts = state if isinstance(state, tuple) else (state,)
        out = []
        for part in parts:
            for layer in range(self.num_layers):
                out.append(part[layer].float().expand(batch_size, -1).contiguous())  # (B, H)
        return out

    @torch.inference_mode()
    def forward_prime(self, ids, batch_size: int) -> tuple[Tensor, list[Tensor]]:
        """Consume ``ids`` (a sequence, array or tensor of ids) with the model's
        own sequence forward, :data:`PRIME_CHUNK` ids per pass with the state
        carried, so a long prime needs bounded memory: logits (B, V) after the
        last id, and the state for ``batch_size`` streams."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            x = torch.as_tensor(ids, dtype=torch.long).to(self.head_b.device).reshape(1, -1)  # (1, P)
            if x.shape[1] == 0:
                raise ValueError("forward_prime needs at least one id (see sample.start_ids)")
            state = None
            for lo in range(0, x.shape[1], PRIME_CHUNK):
                out, state = model.rnn(model.embedding(x[:, lo : lo + PRIME_CHUNK]), state)  # (1, T, H)
            logits = model.head(out[:, -1])  # (1, V): only the last position is needed
        finally:
            model.train(was_training)
        last = logits.float().expand(batch_size, -1).contiguous()  # (B, V)
        return last, self.state_from_model(state, batch_size)

    # -- one step ------------------------------------------------------------
    def step(self, ids: Tensor, state: list[Tensor]) -> Tensor:
        """ids (B,) long -> logits (B, V). ``state`` (the list and its tensors)
        is updated in place; call under ``torch.inference_mode()``."""
        if self.cell == "lstm":
            x = self._lstm(ids, state)
        elif self.cell == "gru":
            x = self._gru(ids, state)
        else:
            x = self._rnn(ids, state)
        return torch.addmm(self.head_b, x, self.head_w)  # (B, V)

    def _mm(self, bias: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """bias + x @ W, as fp32 (B, N). ``bias``: (N,), or fp32 rows (B, N)
        of the input table, which a reduced-precision step adds to in place."""
        if self.exact:
            return torch.addmm(bias, x, w)
        # bf16 weights halve the bytes each step reads and use the CPU's bf16
        # dot products (accumulated in fp32); cell state and nonlinearities stay fp32.
        x = x.to(self.dtype)
        if bias.dim() == 2:  # the table's rows stay fp32; the product is rounded to bf16
            return bias.add_(self._linear(x, w, None))
        return self._linear(x, w, bias).float()

    def _linear(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
        return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())

    def _lstm(self, ids: Tensor, state: list[Tensor]) -> Tensor:
        H, L = self.hidden_size, self.num_layers
        x = ids
        for layer in range(L):
            h, c = state[layer], state[L + layer]
            if layer == 0:
                gates = self._mm(self.tables.index_select(0, ids), h, self.w_hh[0])  # (B, 4H): i, f, o, g
            else:
                gates = self._mm(self.bias[layer], torch.cat((x, h), 1), self.w_cat[layer])
            # In place: each op here would otherwise allocate a (B, H..4H) tensor per step.
            gates[:, : 3 * H].sigmoid_()
            gates[:, 3 * H :].tanh_()
            i, f, o, g = gates.chunk(4, 1)
            c = c.mul_(f).addcmul_(i, g)  # c = f*c + i*g (our own state tensor, updated in place)
            h = torch.tanh(c).mul_(o)  # h = o * tanh(c)
            state[layer], state[L + layer] = h, c
            x = h
        return x

    def _gru(self, ids: Tensor, state: list[Tensor]) -> Tensor:
        H = self.hidden_size
        x = ids
        for layer in range(self.num_layers):
            h = state[layer]
            gi = self.tables.index_select(0, ids) if layer == 0 else self._mm(self.b_ih[layer], x, self.w_ih[layer])  # (B, 3H)
            gh = self._mm(self.b_hh[layer], h, self.w_hh[layer])  # (B, 3H)
            rz = (gi[:, : 2 * H] + gh[:, : 2 * H]).sigmoid()
            r, z = rz.chunk(2, 1)
            n = torch.addcmul(gi[:, 2 * H :], r, gh[:, 2 * H :]).tanh()  # tanh(W_in x + b_in + r*(W_hn h + b_hn))
            h = torch.addcmul(n, z, h - n)  # (1-z)*n + z*h
            state[layer] = h
            x = h
        return x

    def _rnn(self, ids: Tensor, state: list[Tensor]) -> Tensor:
        x = ids
        for layer in range(self.num_layers):
            h = state[layer]
            if layer == 0:
                h = self._mm(self.tables.index_select(0, ids), h, self.w_hh[0]).tanh()
            else:
                h = self._mm(self.bias[layer], torch.cat((x, h), 1), self.w_cat[layer]).tanh()
            state[layer] = h
            x = h
        return x


_PREPACKING: dict[torch.dtype, bool] = {}


def prepacking_works(dtype: torch.dtype) -> bool:
    """Whether this torch can lay a ``dtype`` weight out for oneDNN once and
    multiply by it (a CPU build with oneDNN; not every platform has it), and
    gets the numbers ``addmm`` gets. Tried once per process."""
    if dtype not in _PREPACKING:
        try:
            w = torch.linspace(-1, 1, 48).reshape(8, 6).to(dtype)
            x = torch.linspace(-2, 3, 18).reshape(3, 6).to(dtype)
            b = torch.linspace(0, 1, 8).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
            _PREPACKING[dtype] = bool(torch.equal(out, torch.addmm(b, x, w.t())))
        except (RuntimeError, AttributeError, NotImplementedError):
            _PREPACKING[dtype] = False
    return _PREPACKING[dtype]


def step_weights(model: CharRNN, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Layer ``layer``'s W_ih (G*H, in), W_hh (G*H, H), b_ih and b_hh as fp32
    copies laid out for a step written by hand: an LSTM's gate rows reordered
    from torch's i, f, g, o to i, f, o, g, so one sigmoid covers three gates."""
    rnn = model.rnn
    w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l{layer}").detach().float()
                              for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    if model.config.cell == "lstm":
        H = model.config.hidden_size
        r = torch.arange(H, device=w_ih.device)
        order = torch.cat([r, r + H, r + 3 * H, r + 2 * H])
        w_ih, w_hh, b_ih, b_hh = w_ih[order], w_hh[order], b_ih[order], b_hh[order]
    return w_ih, w_hh, b_ih, b_hh
