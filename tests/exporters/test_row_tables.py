"""Row tables (manifest `weights.row_tables`): which frozen tables qualify, and training on them stays exact.

A qualifying table is staged row by row by the device runtime (`device_runtime.row_tables`); these tests check the
exporter's rule on hand-built graphs, then train a transformer whose word table is staged (fp32 and int8 base)
against torch autograd and against the same bundle opened with the whole table loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch
from onnx import TensorProto

from device_runtime import Trainer
from device_runtime.errors import BatchError, BundleError
from edgepeft import BitFitConfig, LoRAConfig, apply, load_model, quantize_frozen
from exporters.onnx import export
from exporters.row_tables import MIN_TABLE_BYTES, find_row_tables

from ..device_runtime.handmade_bundle import edit_manifest
from .parity_cases import OPTIMIZERS, TorchReference

RTOL, ATOL = 1e-4, 1e-5
# 4096 x 64: 1 MiB in fp32, 256 KiB in int8 (the threshold), so both precisions stage the word table.
WIDE_VOCAB = dict(vocab_size=4096, d_model=64, n_layers=2, n_heads=4, d_ff=64, max_len=16, num_classes=5)
BIG = MIN_TABLE_BYTES


def _graph(nodes: list[onnx.NodeProto], extra_inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ("y",)):
    inputs = [oh.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
              oh.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])]
    inputs += [oh.make_tensor_value_info(n, TensorProto.FLOAT, [1000, 8]) for n in extra_inputs]
    return oh.make_model(oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                                for o in outputs]))


def _find(*graphs: onnx.ModelProto, nbytes: int = BIG) -> dict[str, str]:
    return find_row_tables(dict(enumerate(graphs)), {"table": nbytes}, "frozen::", {"ids"})


def test_a_table_only_gathers_read_by_a_model_input_qualifies() -> None:
    gather = _graph([oh.make_node("Gather", ["frozen::table", "ids"], ["y"])], ("frozen::table",))
    twice = _graph([oh.make_node("Gather", ["frozen::table", "ids"], ["a"]),
                    oh.make_node("Gather", ["frozen::table", "ids"], ["b"], axis=0),
                    oh.make_node("Add", ["a", "b"], ["y"])], ("frozen::table",))
    assert _find(gather, twice) == {"table": "ids"}
    assert _find(gather, nbytes=BIG - 1) == {}  # too small to be worth a read per row


@pytest.mark.parametrize("case", ["matmul", "computed indices", "axis 1", "graph output", "one graph disagrees"])
def test_any_other_reader_keeps_the_table_whole(case: str) -> None:
    gather = oh.make_node("Gather", ["frozen::table", "ids"], ["y"])
    graphs = {
        "matmul": [_graph([gather, oh.make_node("MatMul", ["x", "frozen::table"], ["z"])], ("frozen::table",))],
        "computed indices": [_graph([oh.make_node("Abs", ["ids"], ["j"]),
                                     oh.make_node("Gather", ["frozen::table", "j"], ["y"])], ("frozen::table",))],
        "axis 1": [_graph([oh.make_node("Gather", ["frozen::table", "ids"], ["y"], axis=1)], ("frozen::table",))],
        "graph output": [_graph([gather], ("frozen::table",), outputs=("y", "frozen::table"))],
        "one graph disagrees": [_graph([gather], ("frozen::table",)),
                                _graph([oh.make_node("Transpose", ["frozen::table"], ["y"])], ("frozen::table",))],
    }[case]
    assert _find(*graphs) == {}


def _wide_transformer(quant: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model("transformer", **WIDE_VOCAB)
    apply(model, LoRAConfig(r=4, alpha=8), BitFitConfig(target_modules=["query", "value", "head"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    if quant:
        quantize_frozen(model, quant)
    return model.eval()


def _batch(rng: np.random.Generator, batch: int, seq: int) -> dict[str, np.ndarray]:
    ids = rng.integers(0, WIDE_VOCAB["vocab_size"], (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[1:, seq // 2 + 1:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "labels": rng.integers(0, WIDE_VOCAB["num_classes"], batch).astype(np.int64)}


@pytest.mark.slow
@pytest.mark.parametrize("quant", [None, "int8"])
def test_training_on_staged_rows_matches_torch_and_the_whole_table(tmp_path: Path, quant: str | None) -> None:
    model = _wide_transformer(quant)
    reference = TorchReference(model, OPTIMIZERS["adamw"])
    example = {k: torch.from_numpy(v) for k, v in _batch(np.random.default_rng(0), 3, 7).items() if k != "labels"}
    bundle = export(model, example, out=tmp_path / "bundle", optimizer=OPTIMIZERS["adamw"])
    table = "token_embedding.qweight" if quant else "token_embedding.weight"
    assert bundle.manifest["weights"]["row_tables"] == {table: "input_ids"}

    staged, whole = Trainer.open(tmp_path / "bundle"), Trainer.open(tmp_path / "bundle", share_weights=False)
    rng = np.random.default_rng(1)
    for step in range(10):
        batch = _batch(rng, *((5, 9) if step % 2 == 0 else (2, 4)))
        expected = reference.step(batch)
        loss = staged.step(batch)
        assert loss == whole.step(batch)  # the same graph on the same rows: bit for bit
        np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL, err_msg=f"loss, step {step + 1}")
        got, want = staged.trainable_state(), reference.trainable()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=f"{name}, step {step + 1}")
    batch = _batch(rng, 4, 6)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    np.testing.assert_array_equal(staged.predict(inputs), whole.predict(inputs))
    assert staged.evaluate([batch]) == whole.evaluate([batch])
    (row_table,) = [t for t in staged._frozen.row_tables if t.name == table]
    assert not row_table.array.any()  # every staged row was handed back after the run


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    example = {k: torch.from_numpy(v) for k, v in _batch(np.random.default_rng(0), 3, 7).items() if k != "labels"}
    out = tmp_path_factory.mktemp("rows") / "bundle"
    export(_wide_transformer(None), example, out=out, optimizer=OPTIMIZERS["sgd"])
    return out


def test_ids_outside_the_table_are_a_batch_error(fp32_bundle: Path, tmp_path: Path) -> None:
    trainer = Trainer.open(fp32_bundle)
    batch = _batch(np.random.default_rng(2), 2, 5)
    batch["input_ids"][1, 3] = WIDE_VOCAB["vocab_size"]
    with pytest.raises(BatchError, match=r"ids from \d+ to 4096.*4096 rows.*different tokenizer"):
        trainer.step(batch)
    assert trainer.step_count == 0 and not trainer._frozen.row_tables[0].array.any()

    damaged = tmp_path / "damaged"
    shutil.copytree(fp32_bundle, damaged)
    edit_manifest(damaged, lambda m: m["weights"]["row_tables"].update({"token_embedding.weight": "labels"}))
    with pytest.raises(BundleError, match="not an integer model input"):
        Trainer.open(damaged)


def test_the_memory_plan_counts_only_the_rows_a_batch_can_name(fp32_bundle: Path) -> None:
    from device_runtime import read_bundle
    from edgepeft.profiling.memory_model import plan_memory

    row_bytes = WIDE_VOCAB["d_model"] * 4
    on_disk = (fp32_bundle / "weights.bin").stat().st_size
    plan = plan_memory(read_bundle(fp32_bundle), batch_size=2, seq_len=5)
    assert plan.frozen_weights == on_disk - (WIDE_VOCAB["vocab_size"] - 2 * 5) * row_bytes
