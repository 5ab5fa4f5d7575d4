"""Trainer against an independent numpy computation: SGD and AdamW steps, evaluate, predict, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from .handmade_bundle import B_NAME, IGNORE, NUM_CLASSES, W_NAME, Handmade, build_bundle, edit_manifest, make_batch
from safetensors.numpy import load_file

from device_runtime import (
    AdamW,
    BatchError,
    BundleError,
    BundleIntegrityError,
    NonFiniteStepError,
    OptimizerSpecError,
    OutputPathError,
    RuntimeOptionError,
    Trainer,
)


# ---- numpy reference (float64), written from the maths, not from the graph ----
def ref_logits(proj: np.ndarray, weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) @ proj) @ weight + bias


def ref_loss_and_grads(proj, weight, bias, x, labels):  # type: ignore[no-untyped-def]
    h = x.astype(np.float64) @ proj
    z = h @ weight + bias
    valid = labels != IGNORE
    safe = np.where(valid, labels, 0)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    denom = max(valid.sum(), 1)
    loss = -logp[np.arange(len(labels)), safe][valid].sum() / denom
    dz = (np.exp(logp) - np.eye(NUM_CLASSES)[safe]) * valid[:, None] / denom
    return loss, h.T @ dz, dz.sum(axis=0)


class RefAdamW:
    """torch.optim.AdamW's update rule, step by step."""

    def __init__(self, opt: AdamW, params: list[np.ndarray]) -> None:
        self.opt = opt
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def update(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> list[np.ndarray]:
        b1, b2 = self.opt.betas
        self.t += 1
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            p = p * (1 - lr * self.opt.weight_decay)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            denom = np.sqrt(self.v[i]) / np.sqrt(1 - b2**self.t) + self.opt.eps
            out.append(p - lr / (1 - b1**self.t) * self.m[i] / denom)
        return out


def test_sgd_steps_match_numpy(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path, threads=1)
    w, b = sgd_bundle.weight.astype(np.float64), sgd_bundle.bias.astype(np.float64)
    rng = np.random.default_rng(1)
    for i in range(6):
        batch = make_batch(rng, n=5 + i, ignored=i % 3)
        loss, gw, gb = ref_loss_and_grads(sgd_bundle.proj, w, b, batch["x"], batch["labels"])
        assert tr.step(batch) == pytest.approx(loss, rel=1e-5)
        assert tr.last_grad_norm == pytest.approx(np.sqrt((gw**2).sum() + (gb**2).sum()), rel=1e-5)
        w, b = w - 0.1 * gw, b - 0.1 * gb
    state = tr.trainable_state()
    np.testing.assert_allclose(state[W_NAME], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[B_NAME], b, rtol=1e-5, atol=1e-6)
    assert tr.step_count == 6
    assert tr.optimizer_state() == {}


def test_adamw_steps_match_numpy_with_lr_override(adamw_bundle: Handmade) -> None:
    tr = Trainer.open(adamw_bundle.bundle.path, threads=1)
    params = [adamw_bundle.weight.astype(np.float64), adamw_bundle.bias.astype(np.float64)]
    ref = RefAdamW(adamw_bundle.optimizer, params)
    rng = np.random.default_rng(2)
    lrs = [None, None, 0.01, None, 0.2]  # None -> the bundle's lr (0.05); the others exercise schedules
    for lr in lrs:
        batch = make_batch(rng, n=6, ignored=1)
        loss, gw, gb = ref_loss_and_grads(adamw_bundle.proj, *params, batch["x"], batch["labels"])
        assert tr.step(batch, lr=lr) == pytest.approx(loss, rel=1e-5)
        params = ref.update(params, [gw, gb], 0.05 if lr is None else lr)
    state = tr.trainable_state()
    np.testing.assert_allclose(state[W_NAME], params[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state[B_NAME], params[1], rtol=1e-4, atol=1e-6)
    opt_state = tr.optimizer_state()
    np.testing.assert_allclose(opt_state[f"exp_avg/{W_NAME}"], ref.m[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(opt_state[f"exp_avg_sq/{B_NAME}"], ref.v[1], rtol=1e-5, atol=1e-9)


def test_evaluate_weights_loss_by_counted_targets(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    rng = np.random.default_rng(3)
    batches = [make_batch(rng, n=4, ignored=0), make_batch(rng, n=7, ignored=3), make_batch(rng, n=2, ignored=1)]
    total, counted, correct = 0.0, 0, 0
    for batch in batches:
        params = (sgd_bundle.proj, sgd_bundle.weight, sgd_bundle.bias)
        loss, _, _ = ref_loss_and_grads(*params, batch["x"], batch["labels"])
        valid = batch["labels"] != IGNORE
        total += loss * valid.sum()
        counted += valid.sum()
        pred = ref_logits(sgd_bundle.proj, sgd_bundle.weight, sgd_bundle.bias, batch["x"]).argmax(axis=1)
        correct += (pred == batch["labels"])[valid].sum()
    metrics = tr.evaluate(iter(batches))  # any iterable, consumed once
    assert metrics["loss"] == pytest.approx(total / counted, rel=1e-5)
    assert metrics["examples"] == 13
    assert metrics["targets"] == counted == 9
    assert metrics["accuracy"] == pytest.approx(correct / counted)


def test_evaluate_refuses_empty_input(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    with pytest.raises(BatchError, match="no batches"):
        tr.evaluate([])
    batch = make_batch(np.random.default_rng(0), n=2, ignored=2)
    with pytest.raises(BatchError, match="no counted targets"):
        tr.evaluate([batch])


def test_predict_matches_numpy_and_follows_training(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    batch = make_batch(np.random.default_rng(4), n=3)
    expected = ref_logits(sgd_bundle.proj, sgd_bundle.weight, sgd_bundle.bias, batch["x"])
    np.testing.assert_allclose(tr.predict({"x": batch["x"]}), expected, rtol=1e-5, atol=1e-6)
    tr.step(batch)
    s = tr.trainable_state()
    expected = ref_logits(sgd_bundle.proj, s[W_NAME].astype(np.float64), s[B_NAME], batch["x"])
    np.testing.assert_allclose(tr.predict({"x": batch["x"]}), expected, rtol=1e-5, atol=1e-6)


def test_non_finite_step_leaves_everything_unchanged(adamw_bundle: Handmade) -> None:
    tr = Trainer.open(adamw_bundle.bundle.path)
    rng = np.random.default_rng(5)
    tr.step(make_batch(rng))
    before = (tr.step_count, tr.last_grad_norm, tr.trainable_state(), tr.optimizer_state())
    bad = make_batch(rng)
    bad["x"][:] = 3e38  # finite input, but the logits overflow to inf inside the graph
    with pytest.raises(NonFiniteStepError, match=r"step 2 gave loss .*still at step 1"):
        tr.step(bad)
    assert (tr.step_count, tr.last_grad_norm) == before[:2]
    for now, then in ((tr.trainable_state(), before[2]), (tr.optimizer_state(), before[3])):
        assert now.keys() == then.keys()
        for name in now:
            np.testing.assert_array_equal(now[name], then[name])
    assert np.isfinite(tr.step(make_batch(rng)))
    assert tr.step_count == 2


def test_state_accessors_return_copies(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    tr.trainable_state()[W_NAME][:] = 123.0
    np.testing.assert_array_equal(tr.trainable_state()[W_NAME], sgd_bundle.weight)


def test_graph_breaking_the_contract_is_refused_at_open(tmp_path: Path) -> None:
    hm = build_bundle(tmp_path / "b", drop_output="grad_norm")
    expected = r"train_step graph's outputs break the graph contract \(missing \['grad_norm'\]"
    with pytest.raises(BundleError, match=expected):
        Trainer.open(hm.bundle.path)


def test_adapter_not_matching_manifest_is_refused(tmp_path: Path) -> None:
    hm = build_bundle(tmp_path / "b")
    edit_manifest(hm.bundle.path, lambda m: m["trainable"][1].update(shape=[4]))
    expected = rf"adapter\.safetensors: '{B_NAME}' has shape \[3\], the bundle declares \[4\]"
    with pytest.raises(BundleIntegrityError, match=expected):
        Trainer.open(hm.bundle.path)


def test_eval_and_infer_sessions_open_lazily(sgd_bundle: Handmade) -> None:
    tr = Trainer.open(sgd_bundle.bundle.path)
    assert sorted(tr._sessions) == ["train_step"]
    tr.predict({"x": np.zeros((1, 4), np.float32)})
    assert sorted(tr._sessions) == ["infer", "train_step"]


def test_export_adapter(tmp_path: Path, adamw_bundle: Handmade) -> None:
    tr = Trainer.open(adamw_bundle.bundle.path)
    rng = np.random.default_rng(6)
    for _ in range(3):
        tr.step(make_batch(rng))
    out = tr.export_adapter(tmp_path / "adapter")
    tensors = load_file(str(out / "adapter.safetensors"))
    for name, value in tr.trainable_state().items():
        np.testing.assert_array_equal(tensors[name], value)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["bundle_id"] == adamw_bundle.bundle.bundle_id
    assert config["step"] == 3
    assert config["methods"] == adamw_bundle.bundle.manifest["methods"]
    tr.step(make_batch(rng))
    tr.export_adapter(out)  # replacing an earlier adapter is allowed
    assert json.loads((out / "adapter_config.json").read_text())["step"] == 4


def test_nothing_is_written_into_the_bundle(tmp_path: Path) -> None:
    hm = build_bundle(tmp_path / "bundle")
    snapshot = {p.name: p.stat().st_mtime_ns for p in hm.bundle.path.iterdir()}
    tr = Trainer.open(hm.bundle.path)
    batch = make_batch(np.random.default_rng(7))
    tr.step(batch)
    tr.evaluate([batch])
    tr.predict({"x": batch["x"]})
    for target in (hm.bundle.path, hm.bundle.path / "ckpt"):
        with pytest.raises(OutputPathError, match="inside the bundle"):
            tr.save_checkpoint(target)
        with pytest.raises(OutputPathError, match="inside the bundle"):
            tr.export_adapter(target)
    assert {p.name: p.stat().st_mtime_ns for p in hm.bundle.path.iterdir()} == snapshot


def test_bad_options(sgd_bundle: Handmade) -> None:
    with pytest.raises(RuntimeOptionError, match="threads must be an int >= 1"):
        Trainer.open(sgd_bundle.bundle.path, threads=0)
    tr = Trainer.open(sgd_bundle.bundle.path, threads=2)
    batch = make_batch(np.random.default_rng(8))
    for lr in (float("nan"), -0.1, "0.1"):
        with pytest.raises(OptimizerSpecError, match="lr must be"):
            tr.step(batch, lr=lr)  # type: ignore[arg-type]
    assert tr.step_count == 0
