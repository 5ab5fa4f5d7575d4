"""Quantize a model's frozen base: `quantize_frozen(model, "int8" | "int4" | "int8-dynamic")`, trainable tensors
stay fp32.

int8: symmetric, one scale per output channel, for Linear, Conv and Embedding. int4: symmetric, one scale per block
of `block_size` input features, for Linear and Embedding (Conv gets int8 under "int4": conv kernels are small).
Linear weights are packed in onnxruntime's MatMulNBits layout so the exported graphs compute with them directly
(see `exporters.quantized_ops`). "int8-dynamic" stores Linear weights as int8 too but also rounds their *inputs* to
8 bits at run time (onnxruntime's DynamicQuantizeMatMul): integer matmuls (measured 1.35x faster than fp32 sgemm at
one thread on AVX2), for activations rounded with one scale per tensor. Call it after `edgepeft.apply`: it
quantizes exactly the weights that are frozen then, and the LoRA / BitFit tensors around them keep training in fp32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exporters.quantized_ops import (dequantize_codes_t, dequantize_nbits, dynamic_quant_matmul, matmul_nbits,
                                     unpack_codes)

from .errors import ConfigError

__all__ = ["quantize_frozen", "QuantizedLinear", "DynamicQuantizedLinear", "QuantizedEmbedding", "QuantizedConv",
           "SCHEMES", "QUANT_ATTR"]

SCHEMES = ("int8", "int4", "int8-dynamic")
QUANT_ATTR = "edgepeft_quantization"  # what the exporter copies into the manifest's "quantization"


def _int8_block(in_features: int) -> int:
    """int8 has one scale per channel; MatMulNBits still wants blocks (a power of two >= 16), so use big ones."""
    return max(16, min(128, 1 << math.ceil(math.log2(in_features))))


def pack_nbits(weight: torch.Tensor, bits: int, block_size: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, K] -> (uint8 [N, n_blocks, block_size * bits / 8], fp32 scales [N, n_blocks]), symmetric."""
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    padded = torch.zeros(n, n_blocks * block_size, dtype=torch.float32)
    padded[:, :k] = weight.detach().float()
    blocks = padded.reshape(n, n_blocks, block_size)
    qmax = (1 << (bits - 1)) - 1  # 127 or 7: symmetric, the most negative code is unused
    amax = weight.detach().abs().amax(dim=1, keepdim=True).expand(n, n_blocks) if per_channel else blocks.abs().amax(-1)
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.clamp(torch.round(blocks / scales.unsqueeze(-1)), -qmax, qmax).to(torch.int32) + (1 << (bits - 1))
    codes = codes.to(torch.uint8)
    if bits == 4:
        codes = torch.bitwise_or(codes[..., 0::2], torch.bitwise_left_shift(codes[..., 1::2], 4))
    return codes.contiguous(), scales.contiguous()


class QuantizedLinear(nn.Module):
    """A frozen Linear whose weight lives as MatMulNBits-packed codes + scales; the bias (maybe BitFit) stays fp32."""

    def __init__(self, linear: nn.Linear, bits: int, block_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.block_size = _int8_block(linear.in_features) if bits == 8 else block_size
        qweight, scales = pack_nbits(linear.weight, bits, self.block_size, per_channel=bits == 8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = linear.bias  # the same Parameter: BitFit keeps training it

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_nbits(self.qweight, self.scales, self.bits, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = matmul_nbits(x, self.qweight, self.scales, self.bits, self.block_size, self.in_features, self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, block={self.block_size}"


class DynamicQuantizedLinear(nn.Module):
    """A frozen Linear for "int8-dynamic": int8 weight (one scale per output channel) times activations rounded to
    uint8 at run time; the bias (maybe BitFit) stays fp32.

    Codes are stored transposed ([in, out], the kernel's B) and unsigned (code + 128): onnxruntime's uint8 x uint8
    kernel is exact on every CPU, its uint8 x int8 one saturates on x86 without VNNI.
    """

    ZERO_POINT = 128

    def __init__(self, linear: nn.Linear, grad_int8: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.grad_int8 = linear.in_features, linear.out_features, grad_int8
        codes, scales = _per_row_int8(linear.weight)
        self.register_buffer("codes", (codes.to(torch.int16) + self.ZERO_POINT).to(torch.uint8).t().contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("zero_point", torch.tensor(self.ZERO_POINT, dtype=torch.uint8))
        self.bias = linear.bias  # the same Parameter: BitFit keeps training it

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_codes_t(self.codes, self.scales, self.zero_point).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = dynamic_quant_matmul(x, self.codes, self.scales, self.zero_point, self.grad_int8)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, weights int8, activations uint8 per tensor, "
                f"input gradient {'int8' if self.grad_int8 else 'fp32'}")


def _per_row_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    amax = flat.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    codes = torch.clamp(torch.round(flat / scales[:, None]), -127, 127).to(torch.int8).reshape(weight.shape)
    return codes, scales


class QuantizedEmbedding(nn.Module):
    """A quantized table, one scale per row (int8) or per block of a row (int4): a lookup gathers packed rows and
    their scales and dequantizes only those, so the table never exists in fp32."""

    def __init__(self, embedding: nn.Embedding, bits: int = 8, block_size: int = 32) -> None:
        super().__init__()
        if embedding.max_norm is not None:
            raise ConfigError("quantizing an Embedding with max_norm is not supported; pass max_norm=None")
        self.bits, self.embedding_dim = bits, embedding.embedding_dim
        self.block_size = _int8_block(embedding.embedding_dim) if bits == 8 else block_size
        qweight, scales = pack_nbits(embedding.weight, bits, self.block_size, per_channel=bits == 8)
        # Rows stay 2-D ([num_embeddings, packed bytes]): a lookup then gathers straight from the stored table. A
        # 3-D table would be flattened first, and that reshape copies the whole table (and pages it all in) at every
        # step on a runtime that does not fold it (measured: 11.7 MB per MiniLM step).
        self.block_shape = tuple(qweight.shape[1:])
        self.register_buffer("qweight", qweight.flatten(1))
        self.register_buffer("scales", scales)
        self.padding_idx, self.num_embeddings = embedding.padding_idx, embedding.num_embeddings

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_nbits(self.qweight.unflatten(1, self.block_shape), self.scales, self.bits, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight).unflatten(-1, self.block_shape)
        values = unpack_codes(rows, self.bits) * F.embedding(ids, self.scales).unsqueeze(-1)
        return values.flatten(-2)[..., : self.embedding_dim]


class QuantizedConv(nn.Module):
    """int8 Conv1d/2d weight, one scale per output channel, dequantized right before the convolution."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ConfigError(f"quantized Conv supports padding_mode='zeros', got {conv.padding_mode!r}")
        codes, scales = _per_row_int8(conv.weight)
        self.register_buffer("qweight", codes)
        self.register_buffer("scales", scales)
        self.bias = conv.bias
        self._conv = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def dequantized_weight(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.qweight.dim() - 1)
        return self.qweight.to(torch.float32) * self.scales.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def _frozen(module: nn.Module) -> bool:
    return not module.weight.requires_grad


def quantize_frozen(model: nn.Module, scheme: str | None, block_size: int = 32,
                    int8_gradients: bool = True) -> nn.Module:
    """Replace every frozen Linear / Conv / Embedding weight by its quantized form, in place; None does nothing.

    `int8_gradients` (int8-dynamic only): compute the backward's dX = dY @ W as an int8 matmul too (the step's other
    half of the frozen matmuls) instead of in fp32 from dequantized weights.
    """
    if scheme is None:
        return model
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization {scheme!r}; use one of {SCHEMES} or None (pass --quant int8)")
    if not int8_gradients and scheme != "int8-dynamic":
        raise ConfigError(f"int8_gradients=False only applies to 'int8-dynamic' (the {scheme!r} backward is fp32 "
                          "already); drop it or use scheme='int8-dynamic'")
    if block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(f"block_size must be a power of two >= 16, got {block_size}; 32 or 64 are typical")
    if getattr(model, QUANT_ATTR, None):
        raise ConfigError("this model is already quantized; quantize a fresh copy instead")
    bits = 4 if scheme == "int4" else 8
    replaced: dict[str, int] = {"linear": 0, "conv": 0, "embedding": 0}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _frozen(module):
            if scheme == "int8-dynamic":
                new, kind = DynamicQuantizedLinear(module, int8_gradients), "linear"
            else:
                new, kind = QuantizedLinear(module, bits, block_size), "linear"
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and _frozen(module):
            new, kind = QuantizedConv(module), "conv"
        elif isinstance(module, nn.Embedding) and _frozen(module):
            new, kind = QuantizedEmbedding(module, bits, block_size), "embedding"
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced[kind] += 1
    if not any(replaced.values()):
        raise ConfigError("no frozen Linear, Conv or Embedding layer to quantize; apply a PEFT method first")
    record: dict[str, Any] = {"scheme": scheme, "linear_bits": bits,
                              "block_size": block_size if scheme == "int4" else "per-channel", "layers": replaced}
    if scheme == "int8-dynamic":
        record["activations"] = "uint8, one scale per tensor, at run time"
        record["input_gradients"] = "int8" if int8_gradients else "fp32"
    setattr(model, QUANT_ATTR, record)
    return model
