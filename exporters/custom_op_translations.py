"""ONNX translations of our torch custom ops and of the aten ops torchlib lacks, added to the translator's registry.

Kept apart from `quantized_ops` so the host (`edgepeft.quantization`) can use the ops without importing onnxscript.
"""

from __future__ import annotations

import functools

import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from . import quantized_ops  # noqa: F401  (registers torch.ops.edgepeft.*)

__all__ = ["ONNX_TRANSLATIONS", "TRAIN_STEP_TRANSLATIONS", "onnx_registry"]


def _matmul_nbits_schema() -> OpSchema:
    """onnx's registry does not know onnxruntime's contrib ops; onnxscript needs a schema to emit one."""
    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1")],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], "activations and scales"), ("T2", ["tensor(uint8)"], "codes")],
        attributes=[attr(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")],
    )


_MATMUL_NBITS = Op(Opset("com.microsoft", 1), "MatMulNBits", op_schema=_matmul_nbits_schema())


def _matmul_nbits_onnx(x, qweight, scales, bits: int, block_size: int, in_features: int, out_features: int):
    flat_scales = op.Reshape(scales, op.Constant(value_ints=[-1]))
    return _MATMUL_NBITS(x, qweight, flat_scales, K=in_features, N=out_features, bits=bits, block_size=block_size)


def _dynamic_quant_matmul_schema() -> OpSchema:
    param = OpSchema.FormalParameter
    return OpSchema(
        "DynamicQuantizeMatMul", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("b_scale", "T1"), param("b_zero_point", "T2")],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], "activations and scales"), ("T2", ["tensor(uint8)"], "codes")],
    )


_DYNAMIC_QUANT_MATMUL = Op(Opset("com.microsoft", 1), "DynamicQuantizeMatMul",
                           op_schema=_dynamic_quant_matmul_schema())


def _dynamic_quant_matmul_onnx(x, codes, scales, zero_point, grad_int8: bool):
    """onnxruntime quantizes x (uint8, per tensor) inside the kernel; grad_int8 only shapes the backward."""
    return _DYNAMIC_QUANT_MATMUL(x, codes, scales, zero_point)


def _unary_contrib_schema(name: str) -> OpSchema:
    param = OpSchema.FormalParameter
    return OpSchema(name, "com.microsoft", 1, inputs=[param("X", "T")], outputs=[param("Y", "T")],
                    type_constraints=[("T", ["tensor(float)"], "activations")])


_GELU = Op(Opset("com.microsoft", 1), "Gelu", op_schema=_unary_contrib_schema("Gelu"))
_FAST_GELU = Op(Opset("com.microsoft", 1), "FastGelu", op_schema=_unary_contrib_schema("FastGelu"))


def _gelu_onnx(x, approximate: str = "none"):
    """One onnxruntime kernel for torch's GELU (erf form: `Gelu`; tanh form: `FastGelu`, the same formula), where
    torchlib writes five elementwise ops on opset 18 (no ONNX Gelu before 20) that onnxruntime's own fusion does
    not match. Measured on MiniLM int8-dynamic (batch 8 x 64): ~5 ms less kernel time per step, and the last
    layer's forward no longer holds two FFN-wide temporaries next to every saved activation. Train steps only (see
    `onnx_registry`)."""
    return _FAST_GELU(x) if approximate == "tanh" else _GELU(x)


def _sym_numel_onnx(x):
    """make_fx records `numel()` of a tensor with a symbolic size as `aten.sym_numel` (torch.export used to rewrite
    it into size products before torchlib saw it; we translate make_fx's graph directly)."""
    return op.Size(x)


ONNX_TRANSLATIONS = {
    torch.ops.edgepeft.matmul_nbits.default: _matmul_nbits_onnx,
    torch.ops.edgepeft.dynamic_quant_matmul.default: _dynamic_quant_matmul_onnx,
    torch.ops.aten.sym_numel.default: _sym_numel_onnx,
}
# Fused onnxruntime kernels for graphs that only ever run on its CPU provider (the train step). The inference and
# eval graphs keep standard ops: a mobile EP's op table (QNN, NNAPI, Core ML) lists ai.onnx ops, and a contrib
# kernel there would fall back to the CPU and split the NPU's partition.
TRAIN_STEP_TRANSLATIONS = {
    torch.ops.aten.gelu.default: _gelu_onnx,
}


@functools.cache
def onnx_registry(train_step: bool = False):
    """torchlib's aten-to-ONNX table plus ours (and, for a train step, the fused kernels): built once per process
    and kind (it takes about a second each time)."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    ours = {**ONNX_TRANSLATIONS, **(TRAIN_STEP_TRANSLATIONS if train_step else {})}
    for torch_op, onnx_fn in ours.items():
        registry.register_op(torch_op, onnx_fn, is_complex=False)
    return registry
