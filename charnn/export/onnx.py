"""A checkpoint as an ONNX model: ids and state in, logits and state out.

The graph is written node by node with the ``onnx`` package from the
checkpoint's weights, using ONNX's own LSTM, GRU and RNN operators (whose
equations are torch's, once the gates are reordered). torch's exporters are
not used: the TorchScript one is deprecated, and the torch.export one (torch
2.13) fixes the time axis of a tanh RNN to the example's length, annotates the
logits of the other cells with that fixed length, and does not exist in the
older torch versions charnn supports.

Inputs: ``ids`` int64 (batch, time), ``h`` float32 (layers, batch, hidden)
and, for an LSTM, ``c`` of the same shape. Outputs: ``logits`` float32
(batch, time, vocab), ``h_out`` (and ``c_out``): the state after the last
step. Batch and time are free, so time 1 is the one-step model and a longer
time scores a chunk. The metadata carries what a runtime needs without
charnn (:data:`METADATA_KEYS`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .result import ExportResult
from .. import __version__
from ..errors import CharnnError, format_bytes
from ..generation.sample import DEFAULT_TEMPERATURE
from ..model.rnn import CharRNN, describe, parameter_count
from ..storage.checkpoint import load_model
from ..storage.outputs import check_output, write_output

INSTALL_HINT = "pip install 'charnn[export]'"
# ai.onnx opset 14 and IR version 8 have every operator used here in its current
# form and load in onnxruntime >= 1.10 and the other runtimes of recent years.
OPSET = 14
IR_VERSION = 8
# A protobuf message, so an ONNX file holding its weights, cannot exceed 2 GiB.
MAX_BYTES = 2**31 - 2**20
METADATA_KEYS = ("vocab", "cell", "num_layers", "hidden_size", "temperature", "charnn_version", "checkpoint")
# torch's gate blocks in ONNX's order: LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h.
_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn": (0,)}
_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
# The difference between onnxruntime's logits (and state) and torch's that export accepts:
# CHECK_TOLERANCE plus CHECK_RELATIVE of the largest value torch computed. A confident model's
# logits reach 100 and more, where float32 rounding alone moves them by about 1e-4; a wrong
# graph is off by the values' own size.
CHECK_TOLERANCE = 1e-4
CHECK_RELATIVE = 1e-5


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise CharnnError(f"--format onnx needs the onnx package, which is not installed; install it with: "
                          f"{INSTALL_HINT} (or pip install onnx onnxruntime)") from None
    return onnx


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> ExportResult:
    """Write ``checkpoint`` as an ONNX model to ``out``; when onnxruntime is
    installed, check first that it computes torch's logits."""
    out = Path(out)
    check_output(out, "onnx", "--out", inputs=[checkpoint], overwrite=overwrite)
    onnx = _onnx()
    model, tokenizer, ckpt = load_model(checkpoint)
    need = parameter_count(model.config) * 4
    if need > MAX_BYTES:
        raise CharnnError(f"{describe(model.config)} has {format_bytes(need)} of weights; an ONNX file holds at "
                          "most 2 GB. Export a smaller model")
    name = "/".join(Path(os.path.realpath(ckpt.path)).parts[-2:])
    proto = build_model(onnx, model, tokenizer.to_list(), name)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    details: dict[str, object] = {"opset": OPSET}
    details.update(_check_in_onnxruntime(data, model))
    write_output(out, data)
    return ExportResult(out, len(data), "onnx", details)


def _tensor(onnx: Any, name: str, array: np.ndarray) -> Any:
    return onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)


def _gates(weight: torch.Tensor, cell: str) -> np.ndarray:
    """torch's stacked gate blocks (rows) in ONNX's order."""
    blocks = weight.detach().cpu().float().numpy().reshape(len(_GATE_ORDER[cell]), -1, *weight.shape[1:])
    return np.concatenate([blocks[i] for i in _GATE_ORDER[cell]])


def build_model(onnx: Any, model: CharRNN, vocab: list[str], name: str) -> Any:
    """The ModelProto of ``model`` (a CharRNN in eval mode)."""
    helper, TP = onnx.helper, onnx.TensorProto
    cfg = model.config
    cell, L, H, V = cfg.cell, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    lstm = cell == "lstm"
    state_names = ("h", "c") if lstm else ("h",)
    params = dict(model.state_dict())
    inits = [
        _tensor(onnx, "embedding", params["embedding.weight"].float().numpy()),
        _tensor(onnx, "head_weight_t", params["head.weight"].float().numpy().T),
        _tensor(onnx, "head_bias", params["head.bias"].float().numpy()),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["embedded"], axis=0),  # (B, T, E)
        helper.make_node("Transpose", ["embedded"], ["x0"], perm=[1, 0, 2]),  # (T, B, E): the operators' layout
    ]
    x = "x0"
    finals: dict[str, list[str]] = {s: [] for s in state_names}
    for k in range(L):
        # One direction per layer: W (1, G*H, in), R (1, G*H, H), B (1, 2*G*H) = [input biases, recurrent biases].
        inits += [
            _tensor(onnx, f"W{k}", _gates(params[f"rnn.weight_ih_l{k}"], cell)[None]),
            _tensor(onnx, f"R{k}", _gates(params[f"rnn.weight_hh_l{k}"], cell)[None]),
            _tensor(onnx, f"B{k}", np.concatenate([_gates(params[f"rnn.bias_ih_l{k}"], cell),
                                                   _gates(params[f"rnn.bias_hh_l{k}"], cell)])[None]),
            _tensor(onnx, f"layer{k}", np.array([k], np.int64)),
            _tensor(onnx, f"layer{k}_end", np.array([k + 1], np.int64)),
        ]
        for s in state_names:
            nodes.append(helper.make_node("Slice", [s, f"layer{k}", f"layer{k}_end", "axis0"], [f"{s}{k}"]))
        outputs = [f"y{k}"] + [f"{s}{k}_out" for s in state_names]
        inputs = [x, f"W{k}", f"R{k}", f"B{k}", "", "h%d" % k] + (["c%d" % k] if lstm else [])
        attrs: dict[str, Any] = {"hidden_size": H}
        if cell == "gru":
            attrs["linear_before_reset"] = 1  # torch's GRU applies the reset gate after the recurrent product
        nodes.append(helper.make_node(_OPS[cell], inputs, outputs, **attrs))
        nodes.append(helper.make_node("Squeeze", [f"y{k}", "axis1"], [f"x{k + 1}"]))  # (T, 1, B, H) -> (T, B, H)
        x = f"x{k + 1}"
        for s in state_names:
            finals[s].append(f"{s}{k}_out")
    inits += [_tensor(onnx, "axis0", np.array([0], np.int64)), _tensor(onnx, "axis1", np.array([1], np.int64))]
    nodes += [helper.make_node("Concat", finals[s], [f"{s}_out"], axis=0) for s in state_names]
    nodes += [
        helper.make_node("Transpose", [x], ["top"], perm=[1, 0, 2]),  # (B, T, H)
        helper.make_node("MatMul", ["top", "head_weight_t"], ["scores"]),
        helper.make_node("Add", ["scores", "head_bias"], ["logits"]),
    ]
    state_shape = [L, "batch", H]
    graph = helper.make_graph(
        nodes, "charnn",
        inputs=[helper.make_tensor_value_info("ids", TP.INT64, ["batch", "time"])]
        + [helper.make_tensor_value_info(s, TP.FLOAT, state_shape) for s in state_names],
        outputs=[helper.make_tensor_value_info("logits", TP.FLOAT, ["batch", "time", V])]
        + [helper.make_tensor_value_info(f"{s}_out", TP.FLOAT, state_shape) for s in state_names],
        initializer=inits,
    )
    proto = helper.make_model(graph, producer_name="charnn", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", OPSET)],
                              doc_string=f"charnn {describe(cfg)} character model: ids (batch, time) and state -> "
                                         "logits (batch, time, vocab) and the state after the last step")
    proto.ir_version = IR_VERSION
    meta = {
        # ASCII JSON: a vocabulary may hold a lone surrogate, which UTF-8 (protobuf's strings) cannot carry.
        "vocab": json.dumps(vocab, ensure_ascii=True),
        "cell": cell,
        "num_layers": str(L),
        "hidden_size": str(H),
        "temperature": repr(DEFAULT_TEMPERATURE),
        "charnn_version": __version__,
        "checkpoint": name,
    }
    helper.set_model_props(proto, meta)
    return proto


def _check_in_onnxruntime(data: bytes, model: CharRNN, batch: int = 2, steps: int = 16) -> dict[str, object]:
    """Run the serialized model once in onnxruntime on random ids and state
    and compare its logits and state with torch's; a CharnnError when they
    differ by more than :data:`CHECK_TOLERANCE` plus :data:`CHECK_RELATIVE`
    of the largest value. Nothing when onnxruntime is
    not installed (it is for running the file, not for writing it)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"not checked": "onnxruntime is not installed"}
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (batch, steps), generator=g)
    shape = (cfg.num_layers, batch, cfg.hidden_size)
    state = tuple(torch.randn(shape, generator=g) * 0.5 for _ in range(2 if model.is_lstm else 1))
    with torch.no_grad():
        logits, new = model(ids, state if model.is_lstm else state[0])
    expected = [logits, *(new if model.is_lstm else (new,))]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings would go to stderr, around charnn's own output
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        names = ["ids", "h", "c"][: 1 + len(state)]
        got = session.run(None, dict(zip(names, [ids.numpy(), *(s.numpy() for s in state)])))
    except Exception as e:  # onnxruntime raises its own exception types, not exported
        raise CharnnError(f"onnxruntime {ort.__version__} cannot run the exported model: "
                          f"{str(e).splitlines()[0][:300]}; nothing was written") from None
    diff = max(float(np.abs(g_ - e_.numpy()).max()) for g_, e_ in zip(got, expected))
    largest = max(float(e_.abs().max()) for e_ in expected)
    allowed = CHECK_TOLERANCE + CHECK_RELATIVE * largest
    if not diff <= allowed:
        raise CharnnError(f"onnxruntime {ort.__version__} computes logits or state up to {diff:.3g} away from torch's "
                          f"(more than {allowed:.3g}: {CHECK_TOLERANCE:g} plus {CHECK_RELATIVE:g} of the largest, "
                          f"{largest:.3g}); nothing was written")
    return {"checked in onnxruntime": ort.__version__, "max |logit difference|": f"{diff:.1e}"}
