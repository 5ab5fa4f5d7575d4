"""Tiny bundles built by hand with onnx.helper, so runtime tests need neither torch nor the exporters.

The model is a linear softmax classifier over a frozen projection: logits = (x @ P) @ W + b, with P frozen (ONNX
external data in weights.bin, shared by the three graphs) and W, b trainable. The train-step graph writes the
cross-entropy gradient out by hand (softmax - onehot) and applies plain SGD or AdamW, following the graph
contract in docs/ARCHITECTURE.md. Tests compare it against an independent numpy computation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data
from safetensors.numpy import save as save_safetensors

from device_runtime import SGD, AdamW, Bundle, write_bundle
from device_runtime.manifest_schema import MANIFEST_SHA256, manifest_sha256

__all__ = ["D_IN", "D_HID", "NUM_CLASSES", "IGNORE", "Handmade", "build_bundle", "make_batch", "base_manifest",
           "edit_manifest", "teacher_task"]

D_IN, D_HID, NUM_CLASSES, IGNORE = 4, 3, 3, -100
W_NAME, B_NAME = "head.weight", "head.bias"
OPSET = 17
F = TensorProto.FLOAT


@dataclass(frozen=True)
class Handmade:
    """A written bundle plus the tensors it was built from (for the numpy reference)."""

    bundle: Bundle
    proj: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    optimizer: Any


def _const(name: str, value: Any, dtype: Any = np.float32) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=dtype), name))


def _forward() -> list[onnx.NodeProto]:
    return [
        helper.make_node("MatMul", ["x", "frozen.proj"], ["h"]),
        helper.make_node("MatMul", ["h", f"trainable::{W_NAME}"], ["hw"]),
        helper.make_node("Add", ["hw", f"trainable::{B_NAME}"], ["logits"]),
    ]


def _cross_entropy() -> list[onnx.NodeProto]:
    """loss = -sum(valid * log_softmax[label]) / max(count, 1); also exposes onehot, w, denom for the backward."""
    return [
        _const("ignore", IGNORE, np.int64),
        _const("zero_i", 0, np.int64),
        _const("depth", NUM_CLASSES, np.int64),
        _const("onehot_values", [0.0, 1.0]),
        _const("one", 1.0),
        _const("axis_last", [-1], np.int64),
        helper.make_node("Equal", ["labels", "ignore"], ["is_ignored"]),
        helper.make_node("Not", ["is_ignored"], ["valid"]),
        helper.make_node("Cast", ["valid"], ["w"], to=F),
        helper.make_node("Where", ["valid", "labels", "zero_i"], ["safe_labels"]),
        helper.make_node("OneHot", ["safe_labels", "depth", "onehot_values"], ["onehot"], axis=-1),
        helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=-1),
        helper.make_node("Mul", ["logp", "onehot"], ["logp_picked_full"]),
        helper.make_node("ReduceSum", ["logp_picked_full", "axis_last"], ["picked"], keepdims=0),
        helper.make_node("Mul", ["picked", "w"], ["picked_w"]),
        helper.make_node("ReduceSum", ["picked_w"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["w"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "one"], ["denom"]),
        helper.make_node("Neg", ["total"], ["neg_total"]),
        helper.make_node("Div", ["neg_total", "denom"], ["loss"]),
    ]


def _backward() -> list[onnx.NodeProto]:
    """dlogits = (softmax - onehot) * valid / denom; gW = h^T dlogits; gb = sum over batch; global L2 norm."""
    return [
        _const("axis_0", [0], np.int64),
        _const("axis_1", [1], np.int64),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("Sub", ["probs", "onehot"], ["diff"]),
        helper.make_node("Unsqueeze", ["w", "axis_1"], ["w_col"]),
        helper.make_node("Mul", ["diff", "w_col"], ["diff_w"]),
        helper.make_node("Div", ["diff_w", "denom"], ["dlogits"]),
        helper.make_node("Transpose", ["h"], ["h_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h_t", "dlogits"], [f"grad::{W_NAME}"]),
        helper.make_node("ReduceSum", ["dlogits", "axis_0"], [f"grad::{B_NAME}"], keepdims=0),
        helper.make_node("Mul", [f"grad::{W_NAME}", f"grad::{W_NAME}"], ["gw_sq"]),
        helper.make_node("Mul", [f"grad::{B_NAME}", f"grad::{B_NAME}"], ["gb_sq"]),
        helper.make_node("ReduceSum", ["gw_sq"], ["gw_sq_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["gb_sq"], ["gb_sq_sum"], keepdims=0),
        helper.make_node("Add", ["gw_sq_sum", "gb_sq_sum"], ["g_sq"]),
        helper.make_node("Sqrt", ["g_sq"], ["grad_norm"]),
    ]


def _sgd(param: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Mul", ["lr", f"grad::{param}"], [f"delta::{param}"]),
        helper.make_node("Sub", [f"trainable::{param}", f"delta::{param}"], [f"new_trainable::{param}"]),
    ]


def _adamw(param: str, opt: AdamW) -> list[onnx.NodeProto]:
    """torch.optim.AdamW: p *= 1 - lr*wd; m, v moments; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""
    b1, b2 = opt.betas
    g, p, q = f"grad::{param}", f"trainable::{param}", f"{param}::"
    return [
        _const(q + "b1", b1), _const(q + "1-b1", 1 - b1), _const(q + "b2", b2), _const(q + "1-b2", 1 - b2),
        _const(q + "wd", opt.weight_decay), _const(q + "eps", opt.eps), _const(q + "one", 1.0),
        helper.make_node("Mul", ["lr", q + "wd"], [q + "lr_wd"]),
        helper.make_node("Sub", [q + "one", q + "lr_wd"], [q + "decay"]),
        helper.make_node("Mul", [p, q + "decay"], [q + "p_decayed"]),
        helper.make_node("Mul", [q + "b1", f"state::exp_avg/{param}"], [q + "m_old"]),
        helper.make_node("Mul", [q + "1-b1", g], [q + "m_g"]),
        helper.make_node("Add", [q + "m_old", q + "m_g"], [f"new_state::exp_avg/{param}"]),
        helper.make_node("Mul", [g, g], [q + "g2"]),
        helper.make_node("Mul", [q + "b2", f"state::exp_avg_sq/{param}"], [q + "v_old"]),
        helper.make_node("Mul", [q + "1-b2", q + "g2"], [q + "v_g"]),
        helper.make_node("Add", [q + "v_old", q + "v_g"], [f"new_state::exp_avg_sq/{param}"]),
        helper.make_node("Pow", [q + "b1", "step"], [q + "b1_t"]),
        helper.make_node("Pow", [q + "b2", "step"], [q + "b2_t"]),
        helper.make_node("Sub", [q + "one", q + "b1_t"], [q + "bc1"]),
        helper.make_node("Sub", [q + "one", q + "b2_t"], [q + "bc2"]),
        helper.make_node("Sqrt", [f"new_state::exp_avg_sq/{param}"], [q + "sqrt_v"]),
        helper.make_node("Sqrt", [q + "bc2"], [q + "sqrt_bc2"]),
        helper.make_node("Div", [q + "sqrt_v", q + "sqrt_bc2"], [q + "v_hat"]),
        helper.make_node("Add", [q + "v_hat", q + "eps"], [q + "adam_denom"]),
        helper.make_node("Div", [f"new_state::exp_avg/{param}", q + "adam_denom"], [q + "ratio"]),
        helper.make_node("Div", ["lr", q + "bc1"], [q + "step_size"]),
        helper.make_node("Mul", [q + "step_size", q + "ratio"], [q + "update"]),
        helper.make_node("Sub", [q + "p_decayed", q + "update"], [f"new_trainable::{param}"]),
    ]


def _vi(name: str, elem: int, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _frozen_initializer(proj: np.ndarray) -> TensorProto:
    """P as external data at offset 0 of weights.bin; the three graphs point at the same bytes."""
    tensor = numpy_helper.from_array(proj, "frozen.proj")
    set_external_data(tensor, location="weights.bin", offset=0, length=proj.nbytes)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def _model(nodes: list[onnx.NodeProto], inputs: list[Any], outputs: list[Any], proj: np.ndarray) -> bytes:
    graph = helper.make_graph(nodes, "handmade", inputs, outputs, initializer=[_frozen_initializer(proj)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9  # what onnxruntime 1.32 reads; onnx 1.23 would default to a newer IR
    return model.SerializeToString()


def _graphs(proj: np.ndarray, opt: Any, drop_output: str | None) -> dict[str, bytes]:
    x = _vi("x", F, ["batch", D_IN])
    labels = _vi("labels", TensorProto.INT64, ["batch"])
    params = [_vi(f"trainable::{W_NAME}", F, [D_HID, NUM_CLASSES]), _vi(f"trainable::{B_NAME}", F, [NUM_CLASSES])]
    shapes = {W_NAME: [D_HID, NUM_CLASSES], B_NAME: [NUM_CLASSES]}
    state_names = opt.state_names([W_NAME, B_NAME])
    state_in = [_vi(f"state::{s}", F, shapes[s.split("/", 1)[1]]) for s in state_names]
    state_out = [_vi(f"new_state::{s}", F, shapes[s.split("/", 1)[1]]) for s in state_names]
    update: list[onnx.NodeProto] = []
    for param in (W_NAME, B_NAME):
        update += _sgd(param) if isinstance(opt, SGD) else _adamw(param, opt)
    train_outputs = [_vi("loss", F, []), _vi("grad_norm", F, [])]
    train_outputs += [_vi(f"new_trainable::{p}", F, shapes[p]) for p in (W_NAME, B_NAME)] + state_out
    train_outputs = [o for o in train_outputs if o.name != drop_output]
    scalars = [_vi("step", F, []), _vi("lr", F, [])]
    logits = _vi("logits", F, ["batch", NUM_CLASSES])
    return {
        "train_step.onnx": _model(_forward() + _cross_entropy() + _backward() + update,
                                  [x, labels] + params + state_in + scalars, train_outputs, proj),
        "eval.onnx": _model(_forward() + _cross_entropy(), [x, labels] + params,
                            [_vi("loss", F, []), logits, _vi("count", F, [])], proj),
        "infer.onnx": _model(_forward(), [x] + params, [logits], proj),
    }


def base_manifest(opt: Any) -> dict[str, Any]:
    """The manifest (without `files`) of the handmade classifier."""
    spec = lambda name, shape: {"name": name, "dtype": "float32", "shape": shape}  # noqa: E731
    shapes = {W_NAME: [D_HID, NUM_CLASSES], B_NAME: [NUM_CLASSES]}
    return {
        "format": "edgepeft-bundle",
        "format_version": 1,
        "created_by": "tests/handmade_bundle",
        "model": {"id": "handmade-linear", "source": "test"},
        "methods": [{"name": "head", "config": {"modules": ["head"]}}],
        "quantization": None,
        "backend": "onnx",
        "target": None,
        "inputs": [spec("x", ["batch", D_IN])],
        "labels": {"name": "labels", "dtype": "int64", "shape": ["batch"]},
        "loss": {"name": "cross_entropy", "ignore_index": IGNORE, "num_classes": NUM_CLASSES},
        "output": spec("logits", ["batch", NUM_CLASSES]),
        "trainable": [spec(W_NAME, shapes[W_NAME]), spec(B_NAME, shapes[B_NAME])],
        "optimizer": {**opt.to_manifest(),
                      "state": [spec(s, shapes[s.split("/", 1)[1]]) for s in opt.state_names([W_NAME, B_NAME])]},
        "graphs": {"train_step": "train_step.onnx", "eval": "eval.onnx", "infer": "infer.onnx"},
    }


def build_bundle(out_dir: Path, optimizer: Any = None, seed: int = 0, drop_output: str | None = None) -> Handmade:
    """Write the handmade bundle to `out_dir` with `write_bundle` (plain SGD lr=0.1 unless told otherwise)."""
    opt = optimizer if optimizer is not None else SGD(lr=0.1)
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(D_IN, D_HID)).astype(np.float32)
    weight = (0.5 * rng.normal(size=(D_HID, NUM_CLASSES))).astype(np.float32)
    bias = (0.1 * rng.normal(size=(NUM_CLASSES,))).astype(np.float32)
    files: dict[str, Any] = dict(_graphs(proj, opt, drop_output))
    files["weights.bin"] = proj.tobytes()
    files["adapter.safetensors"] = save_safetensors({W_NAME: weight, B_NAME: bias})
    bundle = write_bundle(out_dir, base_manifest(opt), files)
    return Handmade(bundle, proj, weight, bias, opt)


def make_batch(rng: np.random.Generator, n: int = 5, ignored: int = 1) -> dict[str, np.ndarray]:
    """n examples; the first `ignored` labels are ignore_index so masking is always exercised."""
    x = rng.normal(size=(n, D_IN)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int64)
    labels[:ignored] = IGNORE
    return {"x": x, "labels": labels}


def edit_manifest(bundle_dir: Path, edit: Callable[[dict[str, Any]], Any], reseal: bool = True) -> None:
    """Apply `edit` to manifest.json. reseal=True updates its manifest_sha256, as a buggy exporter would write it
    (so the schema and file checks behind the checksum get tested); reseal=False is tampering after export."""
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if reseal:
        manifest[MANIFEST_SHA256] = manifest_sha256(manifest)
    path.write_text(json.dumps(manifest))


def teacher_task(hm: Handmade, n: int, seed: int, wrong: bool = False) -> dict[str, np.ndarray]:
    """n examples labelled by a fixed teacher classifier of the bundle's own form, so training on them helps;
    wrong=True shifts every label by one class, so training on them hurts (for the loop's guards)."""
    teacher = np.random.default_rng(99)
    w, b = teacher.normal(size=(D_HID, NUM_CLASSES)), teacher.normal(size=NUM_CLASSES)
    x = np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32)
    labels = ((x @ hm.proj) @ w + b).argmax(axis=1)
    if wrong:
        labels = (labels + 1) % NUM_CLASSES
    return {"x": x, "labels": labels.astype(np.int64)}
