"""Rematerialization of cheap saved activations (`export(rematerialize=True)`, the default).

The rewrite must not change a single value: a step with it equals a step without it bit for bit, with and without
segment recompute. The graph must show what it claims: attention probabilities and LayerNorm outputs are no longer
read by the backward, their clones run after a gradient, and nothing expensive (a weight matmul) is cloned.
Parity against torch autograd with the pass on is the rest of the suite: every ONNX export rematerializes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from device_runtime import Bundle, Trainer
from edgepeft import quantize_frozen
from exporters.onnx import export, plan_export
from exporters.rematerialize import _dim_value, rematerialize_cheap

from .parity_cases import OPTIMIZERS, build_model, example_inputs, make_batch
from .test_recompute import DEEP, _ancestors, _deep_transformer


def _steps(bundle: Path, model, steps: int = 4) -> tuple[list[float], dict[str, np.ndarray]]:
    trainer = Trainer.open(bundle)
    rng = np.random.default_rng(5)
    losses = []
    for step in range(steps):
        batch_size, seq = (5, 9) if step % 2 == 0 else (2, 4)
        losses.append(trainer.step(make_batch(model, "transformer", batch_size, rng, seq=seq)))
    return losses, trainer.trainable_state()


def _identical_with_and_without(option: str, model, tmp_path: Path, **export_options) -> dict[bool, Bundle]:
    """Export `model` with `option` on and off, train both 4 steps on the same batches, and assert every loss and
    trained tensor equal bit for bit; returns the two bundles."""
    bundles, results = {}, {}
    for on in (True, False):
        bundles[on] = export(model, example_inputs("transformer"), out=tmp_path / f"{option}-{on}",
                             optimizer=OPTIMIZERS["adamw"], **export_options, **{option: on})
        results[on] = _steps(bundles[on].path, model)
    (losses, state), (plain_losses, plain_state) = results[True], results[False]
    assert losses == plain_losses
    for name, value in plain_state.items():
        assert np.array_equal(state[name], value), name
    return bundles


@pytest.mark.parametrize("recompute", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_rematerialized_step_is_bit_identical(tmp_path: Path, recompute: bool) -> None:
    bundles = _identical_with_and_without("rematerialize", _deep_transformer(), tmp_path, recompute=recompute)
    for remat, bundle in bundles.items():
        assert ("rematerialize" in bundle.manifest) == remat


def _backward_reads(nodes: list[onnx.NodeProto]) -> set[str]:
    forward = _ancestors(nodes, "loss")
    return {name for n in nodes if n.name not in forward for name in n.input}


def _rematerialized(model, example) -> tuple[list[onnx.NodeProto], set[str], set[str], int]:
    """The train step rewritten, what its backward read before, the forward's nodes, and where the kept last two
    segments start (their backward runs first, see the module)."""
    plan = plan_export(model, example)
    proto = plan.trace("train_step")
    read_before = _backward_reads(list(proto.graph.node))
    report = rematerialize_cheap(proto, plan.weighing_dims())
    assert report.tensors > 0 and report.released_bytes > 2 * report.kept_bytes, report
    nodes = list(proto.graph.node)
    forward = _ancestors(nodes, "loss")
    norms = [i for i, n in enumerate(nodes) if n.op_type == "LayerNormalization" and n.name in forward]
    return nodes, read_before, forward, norms[-2]


def _tiny_bert():
    """HF BERT attends through torch's SDPA, whose safe softmax masks fully padded rows with
    `where(..., full_like(0), softmax)`: the probabilities' copy for P @ V is built through a CastLike."""
    pytest.importorskip("optimum")
    from edgepeft import LoRAConfig, TrainHeadConfig, apply, make_example_batch

    from .test_hf_models import _tiny

    from exporters.hf_tracing import capture_with_torch_export

    model = _tiny("bert")
    apply(model, LoRAConfig(r=4, alpha=8, target_modules=["query", "value"]),
          TrainHeadConfig(target_modules=model.default_head_targets))
    example = make_example_batch(model, batch_size=3, seq_len=7)
    return capture_with_torch_export(model, example, None), example


@pytest.mark.parametrize("name", ["transformer", "bert"])
def test_attention_probabilities_and_their_copies_are_rebuilt(name: str) -> None:
    """Below the last two segments the backward reads no attention probabilities of the forward, only their
    clones, and no copy of them either: the masked, expanded and reshaped operand of P @ V that torch saves for dV."""
    model, example = (_deep_transformer(), example_inputs("transformer")) if name == "transformer" else _tiny_bert()
    nodes, read_before, forward, kept_from = _rematerialized(model, example)
    backward_reads = _backward_reads(nodes)
    position = {n.name: i for i, n in enumerate(nodes)}
    softmax = [n.output[0] for n in nodes if n.op_type == "Softmax" and n.name in forward
               and position[n.name] < kept_from and n.output[0] in read_before]
    assert softmax and not [o for o in softmax if o in backward_reads]
    probabilities = set(softmax)
    for n in nodes:
        if n.name in forward and n.op_type != "MatMul" and probabilities & set(n.input):
            probabilities.update(n.output)
    copies = (probabilities - set(softmax)) & read_before
    assert copies and not copies & backward_reads, sorted(copies & backward_reads)
    originals = [n.name.split("/", 2)[2] for n in nodes if n.name.startswith("remat/") and "/node_" in n.name]
    assert originals and all(position[o] < kept_from for o in originals), "the last two segments stay as they are"
    assert len([n for n in nodes if n.op_type == "Softmax" and n.name.startswith("remat/")]) >= len(softmax)


def test_layernorm_outputs_are_rebuilt() -> None:
    """LayerNorm outputs reach the backward as reshaped views (LoRA's input): the views are rebuilt from a clone."""
    nodes, _, _, _ = _rematerialized(_deep_transformer(), example_inputs("transformer"))
    backward_reads = _backward_reads(nodes)
    norm_clones = [n for n in nodes if n.op_type == "LayerNormalization" and n.name.startswith("remat/")]
    assert norm_clones and all(n.output[0] not in backward_reads or n.output[0].endswith("__remat")
                               for n in norm_clones)
    views = {o for n in nodes if n.op_type == "Reshape" and n.name.startswith("remat/")
             and n.input[0] in {c.output[0] for c in norm_clones} for o in n.output}
    assert views and views <= backward_reads


def test_clones_run_after_a_gradient_and_never_rerun_a_weight_matmul() -> None:
    plan = plan_export(_deep_transformer(), example_inputs("transformer"))
    proto = plan.trace("train_step")
    rematerialize_cheap(proto, plan.weighing_dims())
    nodes = list(proto.graph.node)
    forward = _ancestors(nodes, "loss")
    producer = {o: n for n in nodes for o in n.output if o}
    gates = [n for n in nodes if n.name.startswith("remat/") and n.name.endswith("/Reshape")]
    assert gates and all(producer[g.input[0]].name not in forward for g in gates)
    shapes = {v.name: v.type.tensor_type.shape for v in proto.graph.value_info}
    external = {t.name for t in proto.graph.initializer} | {v.name for v in proto.graph.input}
    def original(name: str) -> str:  # a clone's output, or a gate's (start + 0 * g), back to the forward tensor
        node = producer[name]
        return node.input[0] if node.name.endswith("/Add") and node.name.startswith("remat/") else name.removesuffix("__remat")

    matmuls = [n for n in nodes if n.name.startswith("remat/") and n.op_type == "MatMul"]
    assert matmuls, "no attention matmul was cloned"
    for clone in matmuls:
        for operand in clone.input:
            assert operand not in external, clone.name
            shape = shapes.get(original(operand))
            assert shape is not None and any(d.dim_param for d in shape.dim), (clone.name, operand)


@pytest.mark.parametrize("quant", [None, pytest.param("int8-dynamic", marks=pytest.mark.slow)])
def test_expanding_matmuls_are_rerun_bit_identically(tmp_path: Path, quant: str | None) -> None:
    """`rematerialize_matmuls`: the FFN up-projection (d_model -> d_ff = 2 x d_model here) is re-run in the backward,
    through DynamicQuantizeMatMul too, and its output below the last two segments is no longer read from the
    forward; every value equals the step without it, bit for bit."""
    model = _deep_transformer()
    if quant:
        quantize_frozen(model, quant)
    bundles = _identical_with_and_without("rematerialize_matmuls", model, tmp_path)
    for matmuls, bundle in bundles.items():
        assert bundle.manifest["rematerialize"]["expanding_matmuls"] is matmuls

    proto = onnx.load(str(bundles[True].graph_path("train_step")), load_external_data=False)
    nodes = list(proto.graph.node)
    width = {v.name: v.type.tensor_type.shape.dim[-1].dim_value for v in proto.graph.value_info
             if v.type.tensor_type.shape.dim}
    forward = _ancestors(nodes, "loss")
    ops = {"DynamicQuantizeMatMul"} if quant else {"MatMul", "Gemm"}
    originals = [n for n in nodes if n.op_type in ops and n.name in forward
                 and width.get(n.input[0]) == DEEP["d_model"] and width.get(n.output[0]) == DEEP["d_ff"]]
    names = {n.name for n in originals}
    cloned = [n for n in nodes if n.name.startswith("remat/") and n.name.split("/", 2)[2] in names]
    assert len(originals) == DEEP["n_layers"] and len(cloned) == DEEP["n_layers"] - 1  # the top layer's is kept
    # what the backward reads of each re-run projection's output (the GELU's input) is the rebuilt copy
    backward_reads = _backward_reads(nodes)
    downstream = {n.output[0] for n in originals[:-1]}
    for n in nodes:
        if n.name in forward and n.op_type in ("Reshape", "Add") and downstream & set(n.input):
            downstream.update(n.output)
    assert not downstream & backward_reads, sorted(downstream & backward_reads)


def test_a_model_without_attention_still_exports_and_trains(tmp_path: Path) -> None:
    """An MLP keeps mostly weight-matmul inputs: little or nothing to rebuild, and the bundle trains as before."""
    model = build_model("mlp", "lora")
    export(model, example_inputs("mlp"), out=tmp_path / "on", optimizer=OPTIMIZERS["sgd"])
    export(model, example_inputs("mlp"), out=tmp_path / "off", optimizer=OPTIMIZERS["sgd"], rematerialize=False)
    rng = np.random.default_rng(0)
    batch = make_batch(model, "mlp", 4, rng)
    assert Trainer.open(tmp_path / "on").step(batch) == Trainer.open(tmp_path / "off").step(batch)


@pytest.mark.parametrize("text, size", [("batch", 3), ("12*batch", 36), ("batch*seq", 48), ("seq + 1", 17),
                                        ("seq - 2", 14), ("width", None), ("batch/2", None), ("", None)])
def test_symbolic_dims_are_weighed_from_the_exporters_expressions(text: str, size: int | None) -> None:
    dim = onnx.TensorShapeProto.Dimension(dim_param=text)
    assert _dim_value(dim, {"batch": 3, "seq": 16}) == size


def test_rematerialize_matmuls_needs_rematerialize(tmp_path: Path) -> None:
    from exporters.errors import ExportError

    with pytest.raises(ExportError, match="rematerialize_matmuls extends rematerialize"):
        export(build_model("mlp", "lora"), example_inputs("mlp"), out=tmp_path / "b", rematerialize=False,
               rematerialize_matmuls=True)
    assert not (tmp_path / "b").exists()
