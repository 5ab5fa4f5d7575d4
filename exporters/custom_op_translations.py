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

__all__ = ["ONNX_TRANSLATIONS", "onnx_registry"]


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


def _sym_numel_onnx(x):
    """make_fx records `numel()` of a tensor with a symbolic size as `aten.sym_numel` (torch.export used to rewrite
    it into size products before torchlib saw it; we translate make_fx's graph directly)."""
    return op.Size(x)


ONNX_TRANSLATIONS = {
    torch.ops.edgepeft.matmul_nbits.default: _matmul_nbits_onnx,
    torch.ops.edgepeft.dynamic_quant_matmul.default: _dynamic_quant_matmul_onnx,
    torch.ops.aten.sym_numel.default: _sym_numel_onnx,
}


@functools.cache
def onnx_registry():
    """torchlib's aten-to-ONNX table plus ours: built once per process (it takes about a second each time)."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    for torch_op, onnx_fn in ONNX_TRANSLATIONS.items():
        registry.register_op(torch_op, onnx_fn, is_complex=False)
    return registry
