#!/usr/bin/env python
"""Train-step benchmark: the torch-free device runtime (onnxruntime) against PyTorch eager doing the same training.

For each model config the parent process builds the model (seeded), applies LoRA (r=8 on query, value) and trains
the classifier head, exports the bundle (timed), saves the initial model state with safetensors and writes the
batches to an .npz. Each backend then runs in a fresh interpreter started from this file:

  ort    imports only `device_runtime` (checked at the end: no torch, edgepeft, exporters or onnx in sys.modules),
         opens the bundle with `Trainer.open(threads=T)` and calls `Trainer.step`;
  torch  sets `torch.set_num_threads(T)`, rebuilds the same model and methods, loads the saved state, and trains
         with `torch.optim.AdamW` on the trainable parameters and `F.cross_entropy`.

Both run W warm-up steps and N timed steps on the same batches, and report every step's loss, the timed steps'
wall times, the RSS before the backend loads the model (baseline: interpreter + libraries + batches) and the peak RSS.
The parent checks that the two backends' losses agree (the same training, not just a similar one) and prints
median / p90 step time and peak RSS, with torch/ort (time) and ort/torch (RSS) ratios from the same run.
Each backend runs `--repeats` times in fresh children, alternating ort / torch so that drift in the machine's load
hits both; the timed steps of all runs are pooled. Peak RSS is the child's own high-water mark (`VmHWM` on Linux;
`ru_maxrss` would report the parent's peak, see `_measure.py`).

    python benchmarks/train_step.py [--configs transformer,large] [--threads 1] [--batch 8] [--seq 64]
                                    [--warmup 5] [--steps 20] [--repeats 2] [--json results.json]

Exit codes: 0 ok, 1 the backends' losses disagree, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import math
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

# Only stdlib and the stdlib-only helper at module level: the ort child must not import torch.
from _measure import (  # noqa: E402
    JSON_MARKER,
    current_rss_bytes,
    load_batches,
    measure_training,
    peak_rss_bytes,
    run_json_child,
    summarize_times,
    time_calls,
)

# Keyword arguments of `edgepeft.load_model("transformer", ...)`; {} is the built-in default
# (d_model 64, 4 layers, 4 heads, d_ff 128, vocab 1000).
CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "vocab_size": 100},
    "transformer": {},
    "large": {"d_model": 256, "n_layers": 6, "n_heads": 8, "d_ff": 1024, "vocab_size": 8000},
}
DEFAULT_CONFIGS = ("transformer", "large")
LORA = {"r": 8, "alpha": 16, "target_modules": ["query", "value"]}
OPTIMIZER = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2}
LOSS_CHECK_STEPS = 5  # the first steps whose losses must agree
LOSS_RTOL = 1e-3
CHILD_TIMEOUT_S = 900
HOST_MODULES = ("torch", "edgepeft", "exporters", "onnx")

MB = 1024 * 1024


# --------------------------------------------------------------------------------------------------------------
# Shared by the parent and the torch child
# --------------------------------------------------------------------------------------------------------------

def build_model(model_kwargs: dict[str, int], seed: int) -> Any:
    """The benchmarked model: a seeded transformer with LoRA on query/value and a trainable classifier head."""
    import torch

    import edgepeft

    torch.manual_seed(seed)
    model = edgepeft.load_model("transformer", **model_kwargs)
    edgepeft.apply(model, edgepeft.LoRAConfig(**LORA), edgepeft.TrainHeadConfig())
    return model


# --------------------------------------------------------------------------------------------------------------
# Children: each runs in a fresh interpreter and prints one JSON line
# --------------------------------------------------------------------------------------------------------------

def _child_ort(spec: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime

    from device_runtime import Trainer

    trainer, measured = measure_training(lambda: Trainer.open(spec["bundle"], threads=spec["threads"]), spec)
    host_modules = sorted(m for m in sys.modules if m.split(".")[0] in HOST_MODULES)
    assert "torch" not in sys.modules, f"the device-runtime child imported torch: {host_modules}"
    assert not host_modules, f"the device-runtime child imported host packages: {host_modules}"
    return {
        "backend": "ort", "version": onnxruntime.__version__, "threads": spec["threads"],
        "trainable": sorted(t.name for t in trainer.bundle.trainable), **measured,
        "host_modules_loaded": host_modules,
    }


def _child_torch(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    torch.set_num_threads(spec["threads"])
    # `import edgepeft` loads onnxruntime too (edgepeft -> device_runtime.optim_spec -> device_runtime/__init__ ->
    # trainer -> onnxruntime). Import it on its own first to report what it adds to this child's baseline.
    before_ort = current_rss_bytes()
    import onnxruntime  # noqa: F401
    ort_import_rss = current_rss_bytes() - before_ort
    import edgepeft  # noqa: F401  (imported before the baseline, as device_runtime is in the ort child)

    batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in load_batches(spec["batches"])]
    labels_name = spec["labels"]
    baseline = current_rss_bytes()
    start = time.perf_counter()
    model = build_model(spec["model_kwargs"], spec["seed"])
    model.load_state_dict(load_file(spec["state"]), strict=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=OPTIMIZER["lr"], betas=tuple(OPTIMIZER["betas"]),
                                  eps=OPTIMIZER["eps"], weight_decay=OPTIMIZER["weight_decay"])
    setup_s = time.perf_counter() - start
    after_setup = current_rss_bytes()

    def step(i: int) -> float:
        batch = batches[i]
        optimizer.zero_grad(set_to_none=True)
        logits = model(**{k: v for k, v in batch.items() if k != labels_name})
        loss = F.cross_entropy(logits, batch[labels_name])
        loss.backward()
        optimizer.step()
        return loss.item()

    losses, times = time_calls(step, spec["warmup"], spec["steps"])
    peak, peak_source = peak_rss_bytes()
    return {
        "backend": "torch", "version": torch.__version__, "threads": torch.get_num_threads(),
        "trainable": sorted(params),
        "losses": losses, "step_s": times, **summarize_times(times),
        "setup_s": setup_s, "baseline_rss": baseline, "after_setup_rss": after_setup,
        "peak_rss": peak, "peak_rss_source": peak_source, "onnxruntime_import_rss": ort_import_rss,
    }


def child_main(backend: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = _child_ort(spec) if backend == "ort" else _child_torch(spec)
    print(JSON_MARKER + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------------------

def _make_batches(count: int, batch: int, seq: int, vocab: int, num_classes: int, labels: str,
                  seed: int) -> dict[str, Any]:
    """`count` seeded batches stacked on axis 0; rows are padded to random lengths in [seq/2, seq], row 0 full."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(count, batch, seq), dtype=np.int64)
    lengths = rng.integers(max(1, seq // 2), seq + 1, size=(count, batch))
    lengths[:, 0] = seq
    mask = (np.arange(seq) < lengths[..., None]).astype(np.int64)
    targets = rng.integers(0, num_classes, size=(count, batch), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, labels: targets}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _rel_diffs(losses: list[float], reference: list[float]) -> tuple[float, float]:
    """(max relative difference over all steps, over the first LOSS_CHECK_STEPS); inf if the lengths differ."""
    if len(losses) != len(reference) or not losses:
        return math.inf, math.inf
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference)]
    return max(rel), max(rel[:LOSS_CHECK_STEPS])


def _check_losses(ort_losses: list[float], torch_losses: list[float]) -> tuple[bool, float, float]:
    """(the first LOSS_CHECK_STEPS agree within LOSS_RTOL, their max relative difference, max over all steps)."""
    all_rel, first_rel = _rel_diffs(ort_losses, torch_losses)
    return first_rel <= LOSS_RTOL, first_rel, all_rel


def _merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One backend's result over its repeated runs: timed steps pooled, the worst peak RSS, per-run medians kept."""
    merged = dict(runs[0])
    merged["step_s"] = [t for run in runs for t in run["step_s"]]
    merged.update(summarize_times(merged["step_s"]))
    for key in ("peak_rss", "baseline_rss", "after_setup_rss", "setup_s"):
        merged[key] = max(run[key] for run in runs)
    merged["run_median_ms"] = [run["median_ms"] for run in runs]
    # Repeated runs train the same; torch need not be bitwise reproducible across processes, so this is a tolerance.
    merged["runs_max_rel_loss_diff"] = max(_rel_diffs(run["losses"], runs[0]["losses"])[0] for run in runs)
    return merged


def bench_config(name: str, args: argparse.Namespace, work: Path, log: Any) -> dict[str, Any]:
    import numpy as np
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import save_file

    import edgepeft
    from exporters.onnx import export

    model_kwargs = CONFIGS[name]
    model = build_model(model_kwargs, args.seed)
    if args.seq > model.max_len:
        raise SystemExit(f"--seq {args.seq} exceeds the {name} model's max_len {model.max_len}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    config_dir = work / name
    config_dir.mkdir()

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(config_dir / "state.safetensors"))

    log(f"[{name}] exporting ({trainable:,} trainable / {total:,} parameters) ...")
    example = edgepeft.make_example_batch(model, batch_size=3, seq_len=7)
    start = time.perf_counter()
    bundle = export(model, example, out=config_dir / "bundle", loss="cross_entropy",
                    optimizer=edgepeft.AdamW(lr=OPTIMIZER["lr"], betas=tuple(OPTIMIZER["betas"]),
                                             eps=OPTIMIZER["eps"], weight_decay=OPTIMIZER["weight_decay"]))
    export_s = time.perf_counter() - start
    # The bundle's initial adapter is the saved state's trainable part, so both backends start from one point.
    adapter = load_numpy(str(bundle.path / "adapter.safetensors"))
    for key, value in adapter.items():
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=f"bundle adapter {key} != saved state")
    num_classes, labels_name = model.num_classes, bundle.labels.name
    vocab = model.vocab_size
    del model, state, example

    arrays = _make_batches(args.warmup + args.steps, args.batch, args.seq, vocab, num_classes, labels_name,
                           args.seed)
    np.savez(config_dir / "batches.npz", **arrays)
    spec = {
        "bundle": str(bundle.path), "state": str(config_dir / "state.safetensors"),
        "batches": str(config_dir / "batches.npz"), "labels": labels_name, "model_kwargs": model_kwargs,
        "seed": args.seed, "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
    }
    spec_path = config_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))

    runs: dict[str, list[dict[str, Any]]] = {"ort": [], "torch": []}
    for repeat in range(args.repeats):  # alternate the backends so slow drift on the machine hits both alike
        for backend in ("ort", "torch"):
            log(f"[{name}] {backend} (run {repeat + 1}/{args.repeats}): {args.warmup} warm-up + {args.steps} "
                "timed steps ...")
            argv = [sys.executable, str(Path(__file__).resolve()), "--child", backend, "--spec", str(spec_path)]
            runs[backend].append(run_json_child(argv, threads=args.threads, timeout=CHILD_TIMEOUT_S, cwd=config_dir))
    backends = {backend: _merge_runs(backend_runs) for backend, backend_runs in runs.items()}

    ort_r, torch_r = backends["ort"], backends["torch"]
    if ort_r["trainable"] != torch_r["trainable"]:
        raise RuntimeError(f"[{name}] the backends train different tensors: {ort_r['trainable']} vs "
                           f"{torch_r['trainable']}")
    agree, first_rel, all_rel = _check_losses(ort_r["losses"], torch_r["losses"])
    return {
        "config": name, "model_kwargs": model_kwargs, "trainable_params": trainable, "total_params": total,
        "export_s": export_s, "bundle_bytes": _dir_bytes(bundle.path),
        "losses_agree": agree, "loss_rtol": LOSS_RTOL, "loss_check_steps": LOSS_CHECK_STEPS,
        "max_rel_loss_diff_checked": first_rel, "max_rel_loss_diff_all": all_rel,
        "backends": backends,
        "ratios": {
            "time_torch_over_ort": torch_r["median_ms"] / ort_r["median_ms"],
            "peak_rss_ort_over_torch": ort_r["peak_rss"] / torch_r["peak_rss"],
            "rss_growth_ort_over_torch": ((ort_r["peak_rss"] - ort_r["baseline_rss"])
                                          / max(torch_r["peak_rss"] - torch_r["baseline_rss"], 1)),
        },
    }


def _describe(name: str) -> str:
    kw = {"d_model": 64, "n_layers": 4, "n_heads": 4, "d_ff": 128, "vocab_size": 1000, **CONFIGS[name]}
    return f"{name} (d{kw['d_model']} L{kw['n_layers']} h{kw['n_heads']} ff{kw['d_ff']} V{kw['vocab_size']})"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def print_table(results: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    versions = results[0]["backends"] if results else {}
    title = (f"Train step: device runtime (onnxruntime {versions.get('ort', {}).get('version', '?')}) vs PyTorch "
             f"eager ({versions.get('torch', {}).get('version', '?')}); threads {settings['threads']}, batch "
             f"{settings['batch']} x seq {settings['seq']}, median of {settings['steps']} steps after "
             f"{settings['warmup']} warm-up" + (f", x{settings['repeats']} runs" if settings["repeats"] > 1 else ""))
    table = Table(title=title, title_justify="left")
    for col, justify in (("config", "left"), ("params\ntrain / total", "right"), ("backend", "left"),
                         ("median\nms", "right"), ("p90\nms", "right"), ("peak RSS\nMB", "right"),
                         ("baseline\nRSS MB", "right"), ("peak -\nbaseline MB", "right"), ("setup\ns", "right"),
                         ("time ratio\ntorch/ort", "right"), ("RSS ratio\nort/torch", "right")):
        table.add_column(col, justify=justify)
    for r in results:
        for i, backend in enumerate(("ort", "torch")):
            b = r["backends"][backend]
            first = i == 0
            table.add_row(
                _describe(r["config"]) if first else "",
                f"{_count(r['trainable_params'])} / {_count(r['total_params'])}" if first else "",
                "ort (device)" if backend == "ort" else "torch eager",
                f"{b['median_ms']:.2f}", f"{b['p90_ms']:.2f}",
                f"{b['peak_rss'] / MB:.0f}", f"{b['baseline_rss'] / MB:.0f}",
                f"{(b['peak_rss'] - b['baseline_rss']) / MB:.0f}", f"{b['setup_s']:.2f}",
                f"{r['ratios']['time_torch_over_ort']:.2f}x" if first else "",
                f"{r['ratios']['peak_rss_ort_over_torch']:.2f}x" if first else "",
                end_section=not first,
            )
    console = Console()
    if not console.is_terminal:  # piped or captured: rich would wrap the table at 80 columns
        console = Console(width=150)
    console.print(table)
    for r in results:
        verdict = "agree" if r["losses_agree"] else "[bold red]DISAGREE[/]"
        console.print(
            f"{r['config']}: export {r['export_s']:.1f} s, bundle {r['bundle_bytes'] / MB:.1f} MB; losses {verdict} "
            f"(max rel diff {r['max_rel_loss_diff_checked']:.1e} over the first "
            f"{min(r['loss_check_steps'], len(r['backends']['ort']['losses']))} steps, "
            f"{r['max_rel_loss_diff_all']:.1e} over all {len(r['backends']['ort']['losses'])})"
        )
    ort_mb = max(r["backends"]["torch"]["onnxruntime_import_rss"] for r in results) / MB if results else 0.0
    console.print("time ratio > 1: the device runtime is faster; RSS ratio < 1: it needs less memory at peak. "
                  "Baseline = RSS after imports and batches, before the model is loaded. Setup = Trainer.open "
                  "(verify + session) vs build model + load state + optimizer. The torch rows include "
                  f"onnxruntime ({ort_mb:.0f} MB), which `import edgepeft` loads.")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _config_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=_config_list, default=list(DEFAULT_CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--threads", type=_positive_int, default=1, help="intra-op threads for both backends")
    parser.add_argument("--batch", type=_positive_int, default=8)
    parser.add_argument("--seq", type=_positive_int, default=64)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones (>= 0)")
    parser.add_argument("--steps", type=_positive_int, default=20, help="timed steps per run")
    parser.add_argument("--repeats", type=_positive_int, default=2,
                        help="fresh child runs per backend, alternating ort/torch; timed steps are pooled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    parser.add_argument("--child", choices=("ort", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.child and not args.spec:
        parser.error("--child needs --spec")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.spec)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    settings = {"configs": args.configs, "threads": args.threads, "batch": args.batch, "seq": args.seq,
                "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "seed": args.seed, "lora": LORA,
                "methods": ["lora", "train_head"], "optimizer": {"name": "adamw", **OPTIMIZER}}
    results = []
    with tempfile.TemporaryDirectory(prefix="edgepeft-bench-") as tmp:
        for name in args.configs:
            results.append(bench_config(name, args, Path(tmp), log))
    elapsed = time.perf_counter() - started
    print_table(results, settings)
    print(f"total wall time {elapsed:.1f} s", flush=True)
    if args.json:
        report = {
            "benchmark": "train_step", "settings": settings, "wall_s": elapsed,
            "environment": {"python": platform.python_version(), "platform": platform.platform(),
                            "machine": platform.machine(), "cpu_count": os.cpu_count()},
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["losses_agree"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
