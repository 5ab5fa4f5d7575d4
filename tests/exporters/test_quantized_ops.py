"""`edgepeft::dynamic_quant_matmul` computes exactly what onnxruntime's DynamicQuantizeMatMul computes.

The torch op is the host's (and the parity reference's) arithmetic for the "int8-dynamic" base; the exported graph
runs onnxruntime's kernel. Bit-for-bit equality on awkward inputs (one-sided ranges, an outlier, all zeros, odd
sizes, 3-D activations) is what lets the train-step parity tests keep tight tolerances.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from exporters.quantized_ops import dynamic_quant_matmul, quantize_dynamic_uint8


def _onnxruntime_matmul(x: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    k, n = codes.shape
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "codes", "scales", "zp"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*(None,) * (x.ndim - 1), k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales"),
         numpy_helper.from_array(np.array(128, np.uint8), "zp")])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _inputs(kind: str, rng: np.random.Generator) -> np.ndarray:
    shape = (3, 7, 37) if kind == "3d" else (int(rng.integers(1, 300)), 37 if kind == "odd" else 384)
    x = (rng.standard_normal(shape) * 10 ** rng.uniform(-3, 2)).astype(np.float32)
    if kind == "positive":
        x = np.abs(x)
    elif kind == "negative":
        x = -np.abs(x)
    elif kind == "outlier":
        x.flat[5] = 50.0 * np.abs(x).max()
    elif kind == "zeros":
        x[:] = 0.0
    return x


@pytest.mark.parametrize("kind", ["normal", "positive", "negative", "outlier", "zeros", "odd", "3d"])
def test_matches_onnxruntime_bit_for_bit(kind: str) -> None:
    rng = np.random.default_rng(sum(map(ord, kind)))
    for _ in range(3):
        x = _inputs(kind, rng)
        k, n = x.shape[-1], int(rng.choice([5, 48, 1536 if x.shape[-1] == 384 else 64]))
        codes = rng.integers(1, 256, (k, n)).astype(np.uint8)
        scales = ((rng.random(n) + 0.1) * 0.01).astype(np.float32)
        ours = dynamic_quant_matmul(torch.from_numpy(x), torch.from_numpy(codes), torch.from_numpy(scales),
                                    torch.tensor(128, dtype=torch.uint8), False).numpy()
        np.testing.assert_array_equal(ours, _onnxruntime_matmul(x, codes, scales))


def test_quantization_rule_round_trips_within_half_a_step() -> None:
    x = torch.cat([torch.linspace(-3.0, 5.0, 1000), torch.zeros(1)])
    codes, scale, zero_point = quantize_dynamic_uint8(x)
    assert codes.min() >= 0 and codes.max() <= 255 and float(scale) == pytest.approx(8.0 / 255)
    assert torch.all(((codes - zero_point) * scale - x).abs() <= scale / 2 + 1e-6)
    assert codes[-1] == zero_point  # 0 is exact: padded positions stay 0


def test_int8_input_gradient_is_straight_through_dequantized_weight() -> None:
    """The int8 backward approximates dY @ W within the rounding of dY; the fp32 one equals it."""
    torch.manual_seed(0)
    weight = torch.randn(48, 64) * 0.05
    scales = weight.abs().amax(1) / 127
    codes = (torch.round(weight / scales[:, None]).to(torch.int16) + 128).to(torch.uint8).t().contiguous()
    dequantized = (codes.float() - 128) * scales  # [in, out]
    x = torch.randn(6, 64, requires_grad=True)
    grad = torch.randn(6, 48)
    for int8_gradients, tolerance in ((False, 1e-6), (True, 2e-2)):
        x.grad = None
        dynamic_quant_matmul(x, codes, scales, torch.tensor(128, dtype=torch.uint8), int8_gradients).backward(grad)
        want = grad @ dequantized.t()
        assert torch.allclose(x.grad, want, atol=tolerance * want.abs().max().item()), int8_gradients
