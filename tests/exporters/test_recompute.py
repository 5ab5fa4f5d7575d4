"""Activation recomputation (`export(recompute=True)`): same training, fewer forward tensors kept for the backward.

Parity against torch autograd on the built-in 4-layer post-LN transformer (LoRA + BitFit, SGD and AdamW, 12
steps at mixed batch / sequence sizes) and on a tiny pre-LN GPT-2 (the residual stream crosses the checkpoints);
the graph rewrite itself: every recomputed forward tensor is read only by the forward afterwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from device_runtime import Trainer
from edgepeft import BitFitConfig, LoRAConfig, apply, load_model
from exporters.errors import ExportError
from exporters.onnx import export
from exporters.recompute import recompute_segments

from .parity_cases import OPTIMIZERS, TorchReference, build_model, example_inputs, make_batch

RTOL, ATOL = 1e-4, 1e-5
STEPS = 12
DEEP = dict(vocab_size=50, d_model=32, n_layers=4, n_heads=4, d_ff=64, max_len=16, num_classes=5)


def _deep_transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model("transformer", **DEEP)
    apply(model, LoRAConfig(r=4, alpha=8), BitFitConfig(target_modules=["query", "value", "out", "ffn", "head"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _ancestors(nodes: list[onnx.NodeProto], target: str) -> set[str]:
    """Names of the nodes `target` depends on."""
    producer = {o: n for n in nodes for o in n.output if o}
    seen: set[str] = set()
    stack = [producer[target]]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_recomputed_train_step_matches_torch(tmp_path: Path, optimizer: str) -> None:
    model = _deep_transformer()
    reference = TorchReference(model, OPTIMIZERS[optimizer])
    bundle = export(model, example_inputs("transformer"), out=tmp_path / "bundle", optimizer=OPTIMIZERS[optimizer],
                    recompute=True)
    info = bundle.manifest["recompute"]
    assert info["checkpoint_op"] == "LayerNormalization" and info["segments"] >= 4 and info["cloned_nodes"] > 0

    trainer = Trainer.open(tmp_path / "bundle")
    rng = np.random.default_rng(1)
    for step in range(STEPS):
        batch_size, seq = (5, 9) if step % 2 == 0 else (2, 4)
        batch = make_batch(model, "transformer", batch_size, rng, seq=seq)
        expected = reference.step(batch)
        np.testing.assert_allclose(trainer.step(batch), expected, rtol=RTOL, atol=ATOL, err_msg=f"loss, step {step + 1}")
        got, want = trainer.trainable_state(), reference.trainable()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=f"{name}, step {step + 1}")


@pytest.mark.slow
def test_recompute_on_a_pre_ln_hf_model_matches_torch(tmp_path: Path) -> None:
    from .test_hf_models import ADAMW, _check_parity, _tiny

    torch.manual_seed(0)
    model = _tiny("gpt2")
    apply(model, LoRAConfig(r=4, alpha=8))
    trainer = _check_parity(model, tmp_path, ADAMW, steps=4, recompute=True)
    assert trainer.bundle.manifest["recompute"]["segments"] >= 1


def test_backward_reads_only_the_clones(tmp_path: Path) -> None:
    """After the rewrite, no backward node reads a forward tensor of a recomputed segment: it reads the clone."""
    from exporters.onnx import plan_export

    proto = plan_export(_deep_transformer(), example_inputs("transformer")).trace("train_step")
    report = recompute_segments(proto)
    assert report.segments >= 4
    nodes = list(proto.graph.node)
    forward = _ancestors(nodes, "loss")
    cloned = {n.name.split("/", 2)[2] for n in nodes if n.name.startswith("recompute/") and "/node_" in n.name}
    assert cloned, "no node was cloned"
    # the checkpoints (LayerNorm outputs) stay: the gates read them to start the clones
    checkpoints = {n.output[0] for n in nodes if n.op_type == "LayerNormalization"}
    originals = {o for n in nodes if n.name in cloned for o in n.output if o and o not in checkpoints}
    readers = {i: [n.name for n in nodes if i in n.input and n.name not in forward] for i in originals}
    stray = {i: r for i, r in readers.items() if r}
    assert not stray, f"backward still reads original forward tensors: {dict(list(stray.items())[:3])}"
    # every clone runs after a gradient: its gate reads a tensor the loss does not depend on
    gates = [n for n in nodes if n.name.startswith("recompute/") and n.name.endswith("/Reshape")]
    producer = {o: n for n in nodes for o in n.output if o}
    assert gates and all(producer[g.input[0]].name not in forward for g in gates)


def test_model_without_layernorm_is_refused(tmp_path: Path) -> None:
    model = build_model("mlp", "lora")
    with pytest.raises(ExportError, match="LayerNormalization checkpoints"):
        export(model, example_inputs("mlp"), out=tmp_path / "bundle", recompute=True)
    assert not (tmp_path / "bundle").exists()



@pytest.mark.slow
def test_keep_last_trades_recomputed_segments_and_stays_exact(tmp_path: Path) -> None:
    """Keeping more of the last segments recomputes fewer; the step is still torch's (SGD, 6 steps)."""
    segments = {}
    for keep in (2, 5):
        model = _deep_transformer()
        bundle = export(model, example_inputs("transformer"), out=tmp_path / f"k{keep}", optimizer=OPTIMIZERS["sgd"],
                        recompute=True, recompute_keep_last=keep)
        segments[keep] = bundle.manifest["recompute"]["segments"]
    assert segments[5] == segments[2] - 3, segments
    reference, trainer = TorchReference(model, OPTIMIZERS["sgd"]), Trainer.open(tmp_path / "k5")
    rng = np.random.default_rng(3)
    for step in range(6):
        batch = make_batch(model, "transformer", 4, rng, seq=7)
        np.testing.assert_allclose(trainer.step(batch), reference.step(batch), rtol=RTOL, atol=ATOL)
    for name, want in reference.trainable().items():
        np.testing.assert_allclose(trainer.trainable_state()[name], want, rtol=RTOL, atol=ATOL, err_msg=name)


def test_keep_last_refusals_name_the_fix(tmp_path: Path) -> None:
    model = _deep_transformer()
    example = example_inputs("transformer")
    with pytest.raises(ExportError, match="only applies with recompute=True"):
        export(model, example, out=tmp_path / "a", recompute_keep_last=3)
    with pytest.raises(ExportError, match="must be an int >= 0"):
        export(model, example, out=tmp_path / "b", recompute=True, recompute_keep_last=-1)
    with pytest.raises(ExportError, match="leaves no segment to recompute"):
        export(model, example, out=tmp_path / "c", recompute=True, recompute_keep_last=100)
    assert not any((tmp_path / name).exists() for name in "abc")
