#!/usr/bin/env python
"""Train-step benchmark of the ExecuTorch backend next to the ONNX backend and PyTorch eager, in one run.

The model, methods (LoRA r=8 on query/value + trainable head), optimizer (AdamW), batches and child-process protocol
are `train_step.py`'s: the parent builds the seeded model, exports an ONNX bundle and two ExecuTorch bundles (timed),
then runs each backend in a fresh interpreter, alternating them `--repeats` times:

  torch       PyTorch eager, torch.optim.AdamW (train_step.py's child)
  ort         device_runtime.Trainer on onnxruntime (train_step.py's child)
  et          ExecuTorchTrainer, every op on ExecuTorch's CPU kernels (the pip runtime links its `optimized` kernel
              library: mm/bmm/linear/add/mul/gelu/layer_norm/log_softmax... forward ops; the backward ops such as
              native_layer_norm_backward, gelu_backward, embedding_dense_backward run on `portable` kernels)
  et_xnnpack  the same with train.pte's methods partitioned for XNNPACK (`export(..., delegate_train=True)`)

Every child reports step times, the RSS before the model is loaded (baseline = interpreter + runtime imports) and
its peak RSS (VmHWM). The ExecuTorch children also report what their imports cost: the runtime needs torch (its
bindings link libtorch), and `executorch.extension.training` would add the exporter (exir); both measured. Losses
of every backend must agree with torch's over the first steps (exit 1 otherwise). `--profile` adds an ETDump
profile of the `train` method: time per operator, top 15.

    python benchmarks/executorch_step.py [--configs transformer] [--threads 1] [--batch 8] [--seq 64]
                                         [--warmup 3] [--steps 10] [--repeats 2] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Stdlib-only at module level (train_step keeps to that too), so a child imports only what its backend needs.
import train_step as ts  # noqa: E402
from _measure import (  # noqa: E402
    JSON_MARKER,
    current_rss_bytes,
    measure_training,
    run_json_child,
)

BACKENDS = ("torch", "ort", "et", "et_xnnpack")
MB = 1024 * 1024


def _child_et(spec: dict[str, Any], bundle: str) -> dict[str, Any]:
    start_rss = current_rss_bytes()
    start = time.perf_counter()
    from device_runtime.executorch_backend import ExecuTorchTrainer, load_runtime

    load_runtime()  # torch + ExecuTorch bindings: the runtime's fixed cost
    import_s, import_rss = time.perf_counter() - start, current_rss_bytes() - start_rss
    trainer, measured = measure_training(lambda: ExecuTorchTrainer.open(bundle, threads=spec["threads"]), spec)
    loaded = {"torch": "torch" in sys.modules, "exir": any(m.startswith("executorch.exir") for m in sys.modules)}
    # What executorch.extension.training (the documented Python API) would have added: it imports exir.
    before, start = current_rss_bytes(), time.perf_counter()
    import executorch.extension.training  # noqa: F401
    exir_s, exir_rss = time.perf_counter() - start, current_rss_bytes() - before
    return {
        "backend": "et", "threads": spec["threads"], "trainable": sorted(trainer.bundle.trainable_names),
        "native_sgd": trainer.uses_native_sgd, **measured, "runtime_import_s": import_s,
        "runtime_import_rss": import_rss,
        "modules_loaded_while_training": loaded, "training_api_import_s": exir_s, "training_api_import_rss": exir_rss,
    }


def child_main(backend: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if backend == "ort":
        result = ts._child_ort(spec)
    elif backend == "torch":
        result = ts._child_torch(spec)
    else:
        result = _child_et(spec, spec["bundles"][backend])
        result["backend"] = backend
    print(JSON_MARKER + json.dumps(result), flush=True)
    return 0


def profile_train_method(pte: Path, batch: dict[str, Any], names: list[str], repeats: int = 3) -> dict[str, Any]:
    """Where `train` spends its time, from an ETDump over `repeats` runs: the top leaf events (CPU kernels
    `native_call_<op>`, XNNPACK ops by name) with total ms, calls and share of the leaf time, plus the totals of
    the wrapper events (OPERATOR_CALL wraps each CPU kernel call, DELEGATE_CALL each XNNPACK subgraph)."""
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import _C

    module = _C._load_for_executorch(str(pte), enable_etdump=True)
    inputs = [torch.from_numpy(batch[n]) for n in names]
    for _ in range(repeats):
        module.run_method("train", inputs, clone_outputs=False)
    with tempfile.TemporaryDirectory() as tmp:
        module.write_etdump_result_to_file(f"{tmp}/train.etdp")
        inspector = Inspector(etdump_path=f"{tmp}/train.etdp")
    total: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is not None and not event.name.startswith(("Method::", "Program::")):
                total[event.name] += sum(event.perf_data.raw) / repeats
                calls[event.name] += len(event.perf_data.raw) // repeats
    wrappers = {name: total.pop(name, 0.0) for name in ("OPERATOR_CALL", "DELEGATE_CALL")}
    leaf_ms = sum(total.values())
    return {"per_step_ms": wrappers, "top": [(name, ms, calls[name], ms / leaf_ms) for name, ms in total.most_common(15)]}


def bench_config(name: str, args: argparse.Namespace, work: Path, log: Any) -> dict[str, Any]:
    import numpy as np
    from safetensors.torch import save_file

    import edgepeft
    from exporters.executorch import export as export_et
    from exporters.onnx import export as export_onnx

    model = ts.build_model(ts.CONFIGS[name], args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    config_dir = work / name
    config_dir.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(config_dir / "state.safetensors"))
    example = edgepeft.make_example_batch(model, batch_size=3, seq_len=7)
    optimizer = edgepeft.AdamW(lr=ts.OPTIMIZER["lr"], betas=tuple(ts.OPTIMIZER["betas"]), eps=ts.OPTIMIZER["eps"],
                               weight_decay=ts.OPTIMIZER["weight_decay"])
    exports: dict[str, dict[str, Any]] = {}
    bundles: dict[str, str] = {}
    for backend, fn, kwargs in (("ort", export_onnx, {}),
                                ("et", export_et, {"max_batch": args.batch, "delegate_train": False}),
                                ("et_xnnpack", export_et, {"max_batch": args.batch, "delegate_train": True})):
        log(f"[{name}] exporting for {backend} ({trainable:,} trainable / {total:,} parameters) ...")
        start = time.perf_counter()
        bundle = fn(model, example, out=config_dir / backend, optimizer=optimizer, **kwargs)
        exports[backend] = {"export_s": time.perf_counter() - start, "bundle_bytes": ts._dir_bytes(bundle.path),
                            **({"planned_memory_bytes": bundle.manifest["executorch"]["planned_memory_bytes"]}
                               if "executorch" in bundle.manifest else {})}
        bundles[backend] = str(bundle.path)
    arrays = ts._make_batches(args.warmup + args.steps, args.batch, args.seq, model.vocab_size, model.num_classes,
                              "labels", args.seed)
    np.savez(config_dir / "batches.npz", **arrays)
    spec = {"bundle": bundles["ort"], "bundles": bundles, "state": str(config_dir / "state.safetensors"),
            "batches": str(config_dir / "batches.npz"), "labels": "labels", "model_kwargs": ts.CONFIGS[name],
            "seed": args.seed, "threads": args.threads, "warmup": args.warmup, "steps": args.steps}
    spec_path = config_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))

    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in BACKENDS}
    for repeat in range(args.repeats):
        for backend in BACKENDS:
            log(f"[{name}] {backend} (run {repeat + 1}/{args.repeats}) ...")
            argv = [sys.executable, str(Path(__file__).resolve()), "--child", backend, "--spec", str(spec_path)]
            runs[backend].append(run_json_child(argv, threads=args.threads, timeout=ts.CHILD_TIMEOUT_S,
                                                cwd=config_dir))
    results = {b: ts._merge_runs(r) for b, r in runs.items()}
    agreement = {b: ts._rel_diffs(results[b]["losses"], results["torch"]["losses"]) for b in BACKENDS}
    profile = None
    if args.profile:
        log(f"[{name}] profiling the ExecuTorch train method ...")
        first = {k: v[0] for k, v in arrays.items()}
        profile = {b: profile_train_method(Path(bundles[b]) / "train.pte", first,
                                           ["input_ids", "attention_mask", "labels"]) for b in ("et", "et_xnnpack")}
    del model
    return {"config": name, "trainable_params": trainable, "total_params": total, "exports": exports,
            "backends": results, "max_rel_loss_diff_vs_torch": {b: a[1] for b, a in agreement.items()},
            "losses_agree": all(a[1] <= ts.LOSS_RTOL for a in agreement.values()), "profile": profile}


def print_report(results: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    print(f"Train step, threads {settings['threads']}, batch {settings['batch']} x seq {settings['seq']}, "
          f"median/p90 of {settings['steps']} steps after {settings['warmup']} warm-up, x{settings['repeats']} runs")
    header = f"{'config':12s} {'backend':11s} {'median ms':>10s} {'p90 ms':>8s} {'peak RSS MB':>12s} " \
             f"{'baseline MB':>12s} {'setup s':>8s} {'export s':>9s} {'bundle MB':>10s} {'loss rel diff':>14s}"
    print(header)
    for r in results:
        for backend in BACKENDS:
            b = r["backends"][backend]
            ex = r["exports"].get(backend if backend != "torch" else "", {})
            print(f"{r['config']:12s} {backend:11s} {b['median_ms']:10.1f} {b['p90_ms']:8.1f} "
                  f"{b['peak_rss'] / MB:12.0f} {b['baseline_rss'] / MB:12.0f} {b['setup_s']:8.2f} "
                  f"{ex.get('export_s', float('nan')):9.1f} {ex.get('bundle_bytes', 0) / MB:10.2f} "
                  f"{r['max_rel_loss_diff_vs_torch'][backend]:14.1e}")
        et = r["backends"]["et"]
        print(f"  ExecuTorch runtime imports (torch + bindings): {et['runtime_import_rss'] / MB:.0f} MB, "
              f"{et['runtime_import_s']:.1f} s; executorch.extension.training would add "
              f"{et['training_api_import_rss'] / MB:.0f} MB, {et['training_api_import_s']:.1f} s (it imports exir). "
              f"While training: torch loaded={et['modules_loaded_while_training']['torch']}, "
              f"exir loaded={et['modules_loaded_while_training']['exir']}.")
        planned = r["exports"]["et"]["planned_memory_bytes"]
        print("  planned memory per method (MB): " + ", ".join(f"{k} {v / MB:.1f}" for k, v in planned.items()))
        for backend, prof in (r["profile"] or {}).items():
            wrappers = ", ".join(f"{k} {v:.1f} ms" for k, v in prof["per_step_ms"].items())
            print(f"  {backend}: `train` per step: {wrappers}; top leaf events (share of leaf time):")
            for op, ms, calls, share in prof["top"][:10]:
                print(f"    {op:55s} {share * 100:5.1f}%  {ms:7.2f} ms/step, {calls} calls")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=ts._config_list, default=["transformer"])
    parser.add_argument("--threads", type=ts._positive_int, default=1)
    parser.add_argument("--batch", type=ts._positive_int, default=8)
    parser.add_argument("--seq", type=ts._positive_int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=ts._positive_int, default=10)
    parser.add_argument("--repeats", type=ts._positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="ETDump operator profile of the train method")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.spec)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("configs", "threads", "batch", "seq", "warmup", "steps", "repeats",
                                              "seed")}
    with tempfile.TemporaryDirectory(prefix="edgepeft-et-bench-") as tmp:
        results = [bench_config(name, args, Path(tmp), log) for name in args.configs]
    print_report(results, settings)
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    if args.json:
        report = {"benchmark": "executorch_step", "settings": settings, "results": results,
                  "environment": {"python": platform.python_version(), "platform": platform.platform(),
                                  "cpu_count": os.cpu_count()}}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["losses_agree"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
