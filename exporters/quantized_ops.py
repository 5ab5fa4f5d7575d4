"""Torch custom ops for frozen quantized weights (their ONNX translations: `custom_op_translations`).

`edgepeft::matmul_nbits(x, qweight, scales, ...)` is `x @ W.T` with W stored block-quantized (4 or 8 bits, the
layout of onnxruntime's com.microsoft MatMulNBits: uint8 [N, n_blocks, block_bytes], scales [N, n_blocks], implicit
zero point 2^(bits-1)). Its forward exports to MatMulNBits, which dequantizes inside the kernel, so no fp32 copy of
the weight exists for the forward. Its backward (dX = dY @ W, the only gradient a frozen weight needs) dequantizes
the same packed bytes with plain ops right before the matmul: onnxruntime's planner frees that fp32 tensor after the
matmul, so at most one layer's fp32 weight is alive at a time, and the bundle stores every weight once.

`edgepeft::dynamic_quant_matmul(x, codes, scales, zero_point, grad_int8)` is the "int8-dynamic" frozen Linear: int8
weights *and* int8 activations, quantized at run time, the arithmetic of onnxruntime's com.microsoft
DynamicQuantizeMatMul, which it exports to. x is quantized to uint8 with one scale and zero point for the whole
tensor (from its min and max, the range widened to hold 0, round half to even); codes are uint8 [K, N] with one
zero point (128: symmetric int8 stored unsigned) and one fp32 scale per output column. onnxruntime's CPU kernel for
uint8 x uint8 accumulates exactly in int32 on every ISA; with int8 weights, x86 without VNNI saturates 16-bit pair
sums (measured: 4.7% error on random codes), which is why the codes are stored unsigned. The torch implementation
here reproduces the kernel bit for bit (the integer products are summed in float64, exact below 2^53), so a model
trains the same on the host and in the exported graph; `tests/exporters/test_quantized_ops.py` checks it against
onnxruntime.

Its backward passes the gradient straight through the activation rounding (the rounding has no useful gradient)
and computes dX = dY @ W. With `grad_int8` that product is itself a dynamic int8 matmul, of (dY * scales) with the
transposed codes: the backward is then as fast as the forward, at the price of rounding each gradient tensor to 8
bits with one scale.
"""

from __future__ import annotations

import torch

__all__ = ["unpack_codes", "dequantize_nbits", "matmul_nbits", "dynamic_quant_matmul", "quantize_dynamic_uint8",
           "dequantize_codes_t"]


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


def quantize_dynamic_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 x -> (codes as fp32 integers 0..255, scale, zero point): onnxruntime's DynamicQuantizeLinear rule.

    The range is [min(x, 0), max(x, 0)]; scale = range / 255 (1 when the range is empty); the zero point is
    round(-min / scale) clamped to 0..255; codes = clamp(round(x / scale) + zero point). Rounding is half to even,
    as both torch.round and the kernel's float-to-int conversion do.
    """
    zero = x.new_zeros(())
    low, high = torch.minimum(x.min(), zero), torch.maximum(x.max(), zero)
    scale = torch.where(high == low, torch.ones_like(high), (high - low) / 255.0)
    zero_point = torch.clamp(torch.round(zero - low / scale), 0.0, 255.0)
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0.0, 255.0)
    return codes, scale, zero_point


def dequantize_codes_t(codes: torch.Tensor, scales: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 codes [K, N] -> the fp32 weight they stand for, still transposed: (codes - zero_point) * scales."""
    return (codes.to(torch.float32) - zero_point.to(torch.float32)) * scales


def _integer_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                    zero_point: torch.Tensor) -> torch.Tensor:
    """y = round-trip(x) @ ((codes - zero_point) * scales), summed exactly, scaled like the kernel: float(acc) *
    (x_scale * scale[n])."""
    flat = x.reshape(-1, x.shape[-1])
    x_codes, x_scale, x_zero = quantize_dynamic_uint8(flat)
    acc = (x_codes - x_zero).to(torch.float64) @ (codes.to(torch.float64) - zero_point.to(torch.float64))
    out = acc.to(torch.float32) * (x_scale * scales)
    return out.reshape(*x.shape[:-1], codes.shape[-1])


@torch.library.custom_op("edgepeft::dynamic_quant_matmul", mutates_args=())
def dynamic_quant_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero_point: torch.Tensor,
                         grad_int8: bool) -> torch.Tensor:
    return _integer_matmul(x, codes, scales, zero_point)


@dynamic_quant_matmul.register_fake
def _dynamic_quant_matmul_fake(x, codes, scales, zero_point, grad_int8):
    return x.new_empty((*x.shape[:-1], codes.shape[-1]))


def _dq_setup_context(ctx, inputs, output) -> None:
    _, codes, scales, zero_point, grad_int8 = inputs
    ctx.save_for_backward(codes, scales, zero_point)
    ctx.grad_int8 = grad_int8


def _dq_backward(ctx, grad_output):
    codes, scales, zero_point = ctx.saved_tensors
    if ctx.grad_int8:
        # dY @ W = (dY * scales) @ (codes - zp).T: the transposed codes, one scale (1) for all.
        grad_x = dynamic_quant_matmul(grad_output * scales, codes.t().contiguous(), scales.new_ones(()), zero_point,
                                      False)
    else:
        grad_x = grad_output @ dequantize_codes_t(codes, scales, zero_point).t()  # [K, N], freed after the matmul
    return grad_x, None, None, None, None


dynamic_quant_matmul.register_autograd(_dq_backward, setup_context=_dq_setup_context)
