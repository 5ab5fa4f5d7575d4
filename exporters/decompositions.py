"""Decompositions the tracer applies so every backward op has an exact ONNX translation.

torch's core-aten table keeps `aten.convolution_backward` as one op, and torch.onnx (2.13) has no translation for
it. Here it becomes two forward convolutions, which ONNX has: the input gradient is a transposed convolution of
the output gradient with the same weight; the weight gradient is a convolution of the input with the output gradient
(batch and channel axes swapped, the roles of stride and dilation exchanged). The parity suite checks the result
against torch autograd on a CNN.
"""

from __future__ import annotations

import functools

import torch
from torch._decomp import core_aten_decompositions

from .errors import ExportError

__all__ = ["decomposition_table", "fold_matmuls"]

aten = torch.ops.aten


def _conv_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                   groups, output_mask):
    if transposed:
        raise ExportError("training through a transposed convolution is not supported yet; freeze it below the "
                          "lowest trainable tensor or replace it with an upsample + conv")
    spatial = weight.dim() - 2
    kernel = weight.shape[2:]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        # The transposed conv can land one short of the input size when stride > 1; output_padding restores it.
        extra = [
            input.shape[2 + i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
            for i in range(spatial)
        ]
        grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, extra, groups)
    if output_mask[1]:
        per_group = []
        in_per_group = input.shape[1] // groups
        out_per_group = grad_output.shape[1] // groups
        for g in range(groups):
            x = input[:, g * in_per_group : (g + 1) * in_per_group] if groups > 1 else input
            dy = grad_output[:, g * out_per_group : (g + 1) * out_per_group] if groups > 1 else grad_output
            # [Cin, N, *S] conv [Cout, N, *So] -> [Cin, Cout, *K'] with stride and dilation swapped
            w = aten.convolution(x.transpose(0, 1), dy.transpose(0, 1), None, dilation, padding, stride, False,
                                 [0] * spatial, 1)
            for i in range(spatial):
                w = w.narrow(2 + i, 0, kernel[i])
            per_group.append(w.transpose(0, 1))
        grad_weight = per_group[0] if groups == 1 else torch.cat(per_group, dim=0)
    if output_mask[2]:
        grad_bias = grad_output.sum(dim=[0, *range(2, grad_output.dim())])
    return grad_input, grad_weight, grad_bias


def fold_matmuls(table: dict) -> dict:
    """Make `table` trace `[..., K] @ [K, N]` always as one `mm` over the flattened leading dims.

    torch's decomposition folds the leading dims only when it can prove the left operand contiguous, which it
    cannot with symbolic strides; otherwise it expands the weight to `[batch, K, N]` for a `bmm`. In a traced train
    step that happened behind every attention output projection (its input comes out of a permute): per layer, a
    copy of the weight per example in the forward and again in the backward (MiniLM: 8 x 590 KB per layer and pass).
    A reshape copies the activation at most once instead, and the matmul keeps its 2-D weight.
    """
    general = table.get(aten.matmul.default)

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() >= 3 and b.dim() == 2:
            return aten.mm(a.reshape(-1, a.shape[-1]), b).view(*a.shape[:-1], b.shape[-1])
        return general(a, b) if general is not None else NotImplemented

    table[aten.matmul.default] = matmul
    return table


def decomposition_table() -> dict:
    """core-aten decompositions, then torch.onnx's for ops its translator lacks (e.g. squeeze.dims), then ours.

    With every op translatable after one make_fx pass, the exporter needs no decomposition pass of torch.onnx's
    own; see `onnx_graph._translate_traced`. A fresh copy of a table built once per process (about 1.5 s).
    """
    return dict(_decomposition_table())


@functools.cache
def _decomposition_table() -> dict:
    from torch.onnx._internal.exporter import _decomp

    from .custom_op_translations import onnx_registry

    # The registry already holds our own translations, so they count as implemented and stay undecomposed.
    implemented = set(_decomp.get_onnx_implemented_overloads(onnx_registry()))
    table = dict(_decomp.create_onnx_friendly_decomposition_table(implemented))
    table.update(core_aten_decompositions())
    table[aten.convolution_backward.default] = _conv_backward
    return fold_matmuls(table)
