"""Torch custom ops for frozen quantized weights (their ONNX translations: `custom_op_translations`).

`edgepeft::matmul_nbits(x, qweight, scales, ...)` is `x @ W.T` with W stored block-quantized (4 or 8 bits, the
layout of onnxruntime's com.microsoft MatMulNBits: uint8 [N, n_blocks, block_bytes], scales [N, n_blocks], implicit
zero point 2^(bits-1)). Its forward exports to MatMulNBits, which dequantizes inside the kernel, so no fp32 copy of
the weight exists for the forward. Its backward (dX = dY @ W, the only gradient a frozen weight needs) dequantizes
the same packed bytes with plain ops right before the matmul: onnxruntime's planner frees that fp32 tensor after the
matmul, so at most one layer's fp32 weight is alive at a time, and the bundle stores every weight once.
"""

from __future__ import annotations

import torch

__all__ = ["unpack_codes", "dequantize_nbits", "matmul_nbits"]



def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., block_bytes] -> fp32 codes minus the zero point 2^(bits-1), [..., block_bytes * 8 / bits]."""
    if bits == 8:
        codes = packed.to(torch.float32)
    else:
        # Two 4-bit codes per byte, the lower index in the low nibble. Unpacked with float arithmetic, which is exact
        # for 0..255: torch.onnx (2.13) translates uint8 bitwise_right_shift through int8 and gets the type wrong.
        as_float = packed.to(torch.float32)
        high = torch.floor(as_float / 16.0)
        codes = torch.stack([as_float - 16.0 * high, high], dim=-1).flatten(-2)
    return codes - float(1 << (bits - 1))


def dequantize_nbits(qweight: torch.Tensor, scales: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """[N, n_blocks, block_bytes] uint8 + [N, n_blocks] scales -> fp32 [N, in_features]."""
    n = qweight.shape[0]
    values = unpack_codes(qweight, bits) * scales.unsqueeze(-1)
    return values.reshape(n, -1)[:, :in_features]


@torch.library.custom_op("edgepeft::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int,
                 in_features: int, out_features: int) -> torch.Tensor:
    return x @ dequantize_nbits(qweight, scales, bits, in_features).T


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, qweight, scales, bits, block_size, in_features, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    _, qweight, scales, bits, _, in_features, _ = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.bits, ctx.in_features = bits, in_features


def _backward(ctx, grad_output):
    qweight, scales = ctx.saved_tensors
    # Re-dequantized here rather than saved from the forward: nothing fp32 lives from forward to backward.
    weight = dequantize_nbits(qweight, scales, ctx.bits, ctx.in_features)
    return grad_output @ weight, None, None, None, None, None, None


matmul_nbits.register_autograd(_backward, setup_context=_setup_context)
