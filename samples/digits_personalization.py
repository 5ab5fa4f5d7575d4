"""Handwriting personalization on real offline data (scikit-learn's digits), with LoRA and with BitFit.

The story: a digit recognizer is trained on the "base" writers and shipped to a phone. Its new owner writes
differently (slanted, thicker strokes: `edgepeft.data.digits.UserStyle`), so it misreads most of their digits.
The phone collects the user's labelled samples as they come (a bounded reservoir buffer), and personalizes the
model on-device with the `device_runtime` loop: a fifth of the buffer held out for early stopping and the
quality guard, and, in the "+ replay" runs, a quarter of every batch replayed from the base writers to limit
forgetting. We report what a user would check: accuracy on their own held-out digits before and after, and on
the base writers' test digits (how much the model forgot).

Host half (torch): pretrain the base, apply LoRA or BitFit, export two bundles.
Device half (no torch): everything after `--- device ---` uses only `device_runtime`.

    python samples/digits_personalization.py                 # MLP base, ~30-60 s (mostly the two exports)
    python samples/digits_personalization.py --model cnn     # a small CNN base instead
    python samples/digits_personalization.py --json --steps 60
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from device_runtime import LoopConfig, SampleBuffer, Trainer, personalize  # noqa: E402

RANK = 8
BUFFER = 256  # the phone keeps at most this many of the user's samples
ARRIVAL_CHUNK = 16  # samples arrive a few at a time, as a user writes them


@dataclass(frozen=True)
class Method:
    name: str
    lr: float


METHODS = (Method("lora", 5e-3), Method("bitfit", 2e-2))


# --- host (torch) -------------------------------------------------------------------------------------------------
def model_arrays(split: tuple[np.ndarray, np.ndarray], model: str) -> dict[str, np.ndarray]:
    """A digits split as the bundle's named arrays: flat 64-vectors for the MLP, 1x8x8 images for the CNN."""
    from edgepeft.quickstart import digits_arrays

    arrays = digits_arrays(split)
    if model == "cnn":
        arrays["x"] = arrays["x"].reshape(-1, 1, 8, 8)
    return arrays


def pretrain_base(splits, model: str, seed: int):  # type: ignore[no-untyped-def]
    """The base model on the base writers. The MLP reuses the quickstart's recipe; the CNN gets the same one."""
    import torch

    from edgepeft import load_model
    from edgepeft.quickstart import pretrain_digits_mlp

    if model == "mlp":
        return pretrain_digits_mlp(splits, seed=seed)
    torch.manual_seed(seed)
    net = load_model("cnn").train()
    data = model_arrays(splits.base_train, "cnn")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["labels"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(150):  # full batch, like pretrain_digits_mlp; BatchNorm learns its running statistics here
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.eval()


def export_bundles(base, model: str, out: Path) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """One bundle per method, each from its own copy of the same base."""
    from edgepeft import AdamW, BitFitConfig, LoRAConfig, apply, make_example_batch
    from exporters.onnx import export

    bundles = {}
    for method in METHODS:
        net = copy.deepcopy(base)
        config = LoRAConfig(r=RANK, alpha=2 * RANK) if method.name == "lora" else BitFitConfig(include_norm=True)
        apply(net, config)
        bundles[method.name] = out / method.name
        export(net, make_example_batch(net, batch_size=3), out=bundles[method.name],
               optimizer=AdamW(lr=method.lr, weight_decay=0.0), model_id=f"{model}-digits",
               model_source=f"builtin:{model} pretrained by samples/digits_personalization.py")
    return bundles


# --- device (device_runtime only) ---------------------------------------------------------------------------------
def collect_user_samples(user_train: dict[str, np.ndarray], seed: int) -> SampleBuffer:
    """The phone's buffer after the user wrote every training digit, a few at a time."""
    buffer = SampleBuffer(BUFFER, "reservoir", seed=seed)
    n = len(user_train["labels"])
    for start in range(0, n, ARRIVAL_CHUNK):
        buffer.add({k: v[start : start + ARRIVAL_CHUNK] for k, v in user_train.items()})
    return buffer


def personalize_on_device(bundle: Path, lr: float, buffer: SampleBuffer, replay: dict[str, np.ndarray],
                          replay_share: float, steps: int, data: dict[str, dict[str, np.ndarray]],
                          seed: int, threads: int | None) -> dict:
    trainer = Trainer.open(bundle, threads=threads)
    user_before, base_before = trainer.evaluate([data["user_test"]]), trainer.evaluate([data["base_test"]])
    config = LoopConfig(steps=steps, batch_size=32, lr=lr, warmup_steps=max(1, steps // 10),
                        eval_every=max(1, steps // 10), patience=3, holdout_fraction=0.2, replay_share=replay_share,
                        seed=seed)
    report = personalize(trainer, buffer, config, replay=replay if replay_share else None)
    user_after, base_after = trainer.evaluate([data["user_test"]]), trainer.evaluate([data["base_test"]])
    trainable = sum(int(np.prod(t.shape)) for t in trainer.bundle.trainable)
    return {
        "trainable_params": trainable,
        "replay_share": replay_share,
        "user_before": user_before["accuracy"], "user_after": user_after["accuracy"],
        "base_before": base_before["accuracy"], "base_after": base_after["accuracy"],
        "forgetting": base_before["accuracy"] - base_after["accuracy"],
        "steps_run": report.steps_run, "stop_reason": report.stop_reason, "kept": report.kept,
        "held_out_before": report.before["accuracy"], "held_out_after": report.after["accuracy"],
        "train_seconds": report.seconds, "ms_per_step": 1000 * report.seconds / max(1, report.steps_run),
        "examples": report.examples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="base architecture")
    parser.add_argument("--steps", type=int, default=200, help="most personalization steps per run")
    parser.add_argument("--out", type=Path, default=None, help="directory for the bundles (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay-share", type=float, default=0.25,
                        help="share of every batch replayed from the base writers in the '+ replay' runs")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)

    from edgepeft.data.digits import load_digits_splits

    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="edgepeft-digits-"))
    splits = load_digits_splits(seed=args.seed)
    data = {name: model_arrays(getattr(splits, name), args.model)
            for name in ("base_train", "base_test", "user_train", "user_test")}
    base = pretrain_base(splits, args.model, args.seed)
    bundles = export_bundles(base, args.model, out)
    host_seconds = time.perf_counter() - started

    # --- device --- from here on only device_runtime runs, as on the phone.
    buffer = collect_user_samples(data["user_train"], args.seed)
    results = []
    for method in METHODS:
        for replay_share in (0.0, args.replay_share):
            row = personalize_on_device(bundles[method.name], method.lr, buffer, data["base_train"], replay_share,
                                        args.steps, data, args.seed, args.threads)
            results.append({"method": method.name, **row})
    summary = {"model": args.model, "steps": args.steps, "buffer": {"capacity": BUFFER, "seen": buffer.seen},
               "host_seconds": round(host_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
               "bundles": {k: str(v) for k, v in bundles.items()}, "results": results}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"Digits personalization: {args.model} base, user samples {buffer.seen} -> buffer {len(buffer)} "
          f"(reservoir), a fifth held out, at most {args.steps} steps, early stopping patience 3")
    header = f"{'method':<20}{'trainable':>10}  {'user digits':>17}  {'base writers (forgetting)':>27}  " \
             f"{'steps':>5}  {'stop':<15}{'ms/step':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        name = r["method"] + (f" + replay {r['replay_share']:.0%}" if r["replay_share"] else "")
        print(f"{name:<20}{r['trainable_params']:>10,}  {100 * r['user_before']:>6.1f}% -> {100 * r['user_after']:5.1f}%  "
              f"{100 * r['base_before']:>6.1f}% -> {100 * r['base_after']:5.1f}% ({100 * r['forgetting']:+5.1f})  "
              f"{r['steps_run']:>5}  {r['stop_reason']:<15}{r['ms_per_step']:>8.2f}")
    print(f"host (pretrain + 2 exports): {host_seconds:.1f} s; total {summary['total_seconds']} s; bundles in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
