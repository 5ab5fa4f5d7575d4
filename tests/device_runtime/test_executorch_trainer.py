"""ExecuTorchTrainer: the Trainer API over an executorch bundle (dispatch, checkpoints, snapshots, SGD, limits).

Parity over the model x method x optimizer matrix lives in tests/exporters/test_executorch_parity.py; this file
checks the runtime's own behaviour on one exported MLP (LoRA + BitFit, AdamW) and one BitFit MLP on plain SGD.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_runtime import (SGD, AdamW, BatchError, BundleError, NonFiniteStepError, OutputPathError, Trainer,
                            open_trainer)
from device_runtime.executorch_backend import ExecuTorchTrainer, MergedInference, _TrainingProgram, load_runtime

pytest.importorskip("executorch")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]


def _mlp(method: str, seed: int = 0):  # type: ignore[no-untyped-def]
    from tests.exporters.parity_cases import build_model

    return build_model("mlp", method, seed)


def _batch(rng: np.random.Generator, n: int = 4) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((n, 64)).astype(np.float32),
            "labels": rng.integers(0, 10, n).astype(np.int64)}


@pytest.fixture(scope="module")
def adamw_et(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An executorch bundle of the MLP with LoRA + BitFit, AdamW, batch bound 8, XNNPACK-delegated (read-only)."""
    from exporters.executorch import export

    out = tmp_path_factory.mktemp("et") / "bundle"
    export(_mlp("lora+bitfit"), {"x": torch.randn(3, 64)}, out=out, optimizer=AdamW(lr=1e-2, eps=1e-6),
           max_batch=8)
    return out


@pytest.fixture(scope="module")
def sgd_et(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BitFit MLP on SGD without momentum or clipping: ExecuTorch's own SGD runs it."""
    from exporters.executorch import export

    out = tmp_path_factory.mktemp("et_sgd") / "bundle"
    export(_mlp("bitfit"), {"x": torch.randn(3, 64)}, out=out, optimizer=SGD(lr=0.1, weight_decay=1e-2),
           delegate_infer=False, delegate_train=False)
    return out


def test_open_trainer_picks_the_backend(adamw_et: Path, adamw_bundle) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(open_trainer(adamw_et), ExecuTorchTrainer)
    assert isinstance(open_trainer(adamw_bundle.bundle.path), Trainer)
    with pytest.raises(BundleError, match="backend is 'executorch'"):
        Trainer.open(adamw_et)
    with pytest.raises(BundleError, match="backend is 'onnx'"):
        ExecuTorchTrainer.open(adamw_bundle.bundle.path)


def test_starts_from_the_bundle_adapter_and_matches_official_training_module(adamw_et: Path) -> None:
    """The lean driver reads the same parameters and returns the same loss and gradients as TrainingModule."""
    from executorch.extension.training import _load_for_executorch_for_training
    from safetensors.numpy import load_file

    trainer = ExecuTorchTrainer.open(adamw_et)
    initial = load_file(str(adamw_et / "adapter.safetensors"))
    for name, value in trainer.trainable_state().items():
        np.testing.assert_array_equal(value, initial[name])

    batch = _batch(np.random.default_rng(0))
    inputs = [torch.from_numpy(batch["x"]), torch.from_numpy(batch["labels"])]
    official = _load_for_executorch_for_training(str(adamw_et / "train.pte"))
    (loss,) = official.forward_backward("train", inputs)
    ours = _TrainingProgram(load_runtime(), adamw_et / "train.pte")
    assert ours.forward_backward(inputs) == pytest.approx(float(loss), rel=1e-6)
    assert ours.gradients.keys() == official.named_gradients().keys()
    for name, grad in official.named_gradients().items():
        np.testing.assert_allclose(ours.gradients[name].numpy(), grad.numpy(), rtol=1e-6, atol=1e-8)


def test_checkpoint_resume_and_adapter_export(adamw_et: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    batches = [_batch(rng, n) for n in (3, 5, 2, 4, 6)]
    trainer = ExecuTorchTrainer.open(adamw_et)
    for b in batches[:3]:
        trainer.step(b)
    trainer.save_checkpoint(tmp_path / "ck")
    tail = [trainer.step(b) for b in batches[3:]]
    resumed = ExecuTorchTrainer.open(adamw_et, checkpoint=tmp_path / "ck")
    assert resumed.step_count == 3
    assert [resumed.step(b) for b in batches[3:]] == tail
    for name, value in trainer.trainable_state().items():
        np.testing.assert_array_equal(resumed.trainable_state()[name], value)
    assert resumed.optimizer_state().keys() == {f"{k}/{n}" for k in ("exp_avg", "exp_avg_sq")
                                                for n in trainer.trainable_state()}

    trainer.export_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["step"] == 5 and config["bundle_id"] == trainer.bundle.bundle_id
    with pytest.raises(OutputPathError, match="inside the bundle"):
        trainer.save_checkpoint(adamw_et / "ck")


def test_snapshot_restore_and_load_trainable(adamw_et: Path) -> None:
    rng = np.random.default_rng(2)
    batches = [_batch(rng) for _ in range(4)]
    trainer = ExecuTorchTrainer.open(adamw_et)
    trainer.step(batches[0])
    snap = trainer.snapshot()
    after = [trainer.step(b) for b in batches[1:]]
    trainer.restore(snap)
    assert trainer.step_count == 1
    assert [trainer.step(b) for b in batches[1:]] == after

    zeros = {n: np.zeros_like(v) for n, v in trainer.trainable_state().items()}
    trainer.load_trainable(zeros, reset_optimizer=True)
    assert trainer.step_count == 0 and all(not v.any() for v in trainer.trainable_state().values())
    assert all(not v.any() for v in trainer.optimizer_state().values())


def test_batches_above_the_bound(adamw_et: Path) -> None:
    """A training step refuses a batch above max_batch; evaluate and predict split it (exactly)."""
    trainer = ExecuTorchTrainer.open(adamw_et)
    big = _batch(np.random.default_rng(3), n=19)
    with pytest.raises(BatchError, match="batch <= 8"):
        trainer.step(big)
    assert trainer.step_count == 0
    logits = trainer.predict({"x": big["x"]})
    assert logits.shape == (19, 10)
    np.testing.assert_allclose(logits[8:16], trainer.predict({"x": big["x"][8:16]}), rtol=1e-6)
    whole = trainer.evaluate([big])
    parts = [trainer.evaluate([{k: v[i : i + 8] for k, v in big.items()}]) for i in (0, 8, 16)]
    assert whole["examples"] == 19
    assert whole["loss"] == pytest.approx(sum(p["loss"] * p["targets"] for p in parts) / 19, rel=1e-6)


def test_non_finite_step_changes_nothing(adamw_et: Path) -> None:
    trainer = ExecuTorchTrainer.open(adamw_et)
    trainer.step(_batch(np.random.default_rng(4)))
    before, state = trainer.trainable_state(), trainer.optimizer_state()
    with pytest.raises(NonFiniteStepError, match="still at step 1"):
        trainer.step({"x": np.full((4, 64), 3e38, np.float32), "labels": np.zeros(4, np.int64)})  # overflows
    assert trainer.step_count == 1
    for name, value in trainer.trainable_state().items():
        np.testing.assert_array_equal(value, before[name])
    for name, value in trainer.optimizer_state().items():
        np.testing.assert_array_equal(value, state[name])


def test_native_sgd_update_that_overflows_is_undone(sgd_et: Path) -> None:
    """ExecuTorch's SGD updates the program's parameters in place: a non-finite result must be rolled back."""
    trainer = ExecuTorchTrainer.open(sgd_et)
    assert trainer.uses_native_sgd
    batch = _batch(np.random.default_rng(5))
    trainer.step(batch)
    trainer.step(batch, lr=3e38)  # finite, huge parameters; the next such update overflows to inf
    before = trainer.trainable_state()
    messages = []
    for _ in range(2):  # the second refusal sees the same parameters, so the same loss
        with pytest.raises(NonFiniteStepError, match="produced non-finite values.*still at step 2") as refused:
            trainer.step(batch, lr=3e38)
        messages.append(str(refused.value))
    assert trainer.step_count == 2 and messages[0] == messages[1]
    for name, value in trainer.trainable_state().items():
        np.testing.assert_array_equal(value, before[name])  # read from the program's own parameter memory


def test_merged_inference_serves_the_exported_adapter(adamw_et: Path) -> None:
    x = np.random.default_rng(6).standard_normal((5, 64)).astype(np.float32)
    trainer = ExecuTorchTrainer.open(adamw_et)
    np.testing.assert_allclose(MergedInference.open(adamw_et).predict({"x": x}), trainer.predict({"x": x}),
                               rtol=1e-5, atol=1e-6)
    entry = json.loads((adamw_et / "manifest.json").read_text())["executorch"]
    assert entry["infer"]["delegated_subgraphs"] >= 1 and entry["train"] == {"delegate": "XnnpackBackend"}


def test_native_sgd_matches_torch_and_the_optimizer_program(sgd_et: Path) -> None:
    """ExecuTorch's SGD (momentum 0, weight decay) == torch.optim.SGD == the bundle's optimizer_step, with lr
    schedules (a new lr every step)."""
    from tests.exporters.parity_cases import TorchReference

    native, program = ExecuTorchTrainer.open(sgd_et), ExecuTorchTrainer.open(sgd_et, native_sgd=False)
    assert native.uses_native_sgd and not program.uses_native_sgd
    reference = TorchReference(_mlp("bitfit"), SGD(lr=0.1, weight_decay=1e-2))
    rng = np.random.default_rng(7)
    for step in range(10):
        batch, lr = _batch(rng, 3 + step % 3), 0.1 * (1 - step / 10)
        for group in reference.optimizer.param_groups:
            group["lr"] = lr
        expected = reference.step(batch)
        assert native.step(batch, lr=lr) == pytest.approx(expected, rel=1e-5)
        assert program.step(batch, lr=lr) == pytest.approx(expected, rel=1e-5)
        for name, want in reference.trainable().items():
            np.testing.assert_allclose(native.trainable_state()[name], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(program.trainable_state()[name], want, rtol=1e-5, atol=1e-6)
    assert native.last_grad_norm == pytest.approx(program.last_grad_norm, rel=1e-5)


RUNTIME_SCRIPT = r"""
import importlib.abc, json, sys
BLOCKED = ("edgepeft", "exporters", "onnx", "executorch.exir", "executorch.extension.training.pybindings._training_module")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import numpy as np
from device_runtime import open_trainer

tr = open_trainer(sys.argv[2])
rng = np.random.default_rng(0)
losses = [tr.step({"x": rng.standard_normal((4, 64)).astype(np.float32),
                   "labels": rng.integers(0, 10, 4).astype(np.int64)}) for _ in range(3)]
tr.save_checkpoint(sys.argv[3])
print(json.dumps({"losses": losses, "torch": "torch" in sys.modules, "native_sgd": tr.uses_native_sgd,
                  "exir": sorted(m for m in sys.modules if m.startswith("executorch.exir"))}))
"""


@pytest.mark.slow
def test_runtime_needs_torch_but_not_the_exporter(sgd_et: Path, tmp_path: Path) -> None:
    """The documented limit: ExecuTorch's bindings load torch. Not loaded: exir, onnx and our host packages."""
    proc = subprocess.run([sys.executable, "-c", RUNTIME_SCRIPT, str(REPO), str(sgd_et), str(tmp_path / "ck")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch"] is True and result["exir"] == [] and result["native_sgd"] is True
    expected = ExecuTorchTrainer.open(sgd_et)
    rng = np.random.default_rng(0)
    want = [expected.step({"x": rng.standard_normal((4, 64)).astype(np.float32),
                           "labels": rng.integers(0, 10, 4).astype(np.int64)}) for _ in range(3)]
    assert result["losses"] == pytest.approx(want, rel=1e-6)
