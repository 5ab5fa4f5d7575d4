"""Frozen base in fp32 vs int8 vs int4 vs int8-dynamic: bundle size, train-step time and peak RSS of the device
runtime, one run.

    python benchmarks/quantized_step.py [--steps 20] [--warmup 3] [--threads 1] [--json out.json]

A transformer encoder (d_model 256, 6 layers, 8 heads, d_ff 1024, vocab 8000; 8.4M frozen parameters) with LoRA r=8
on query/value plus BitFit is exported four times (fp32, int8, int4, int8-dynamic base). Each bundle is then
trained in a fresh process that imports only the device runtime, under two memory policies: `fast` (onnxruntime may
keep pre-packed private copies of fp32 matmul weights) and `lean` (no pre-packing). Both recycle activations in the arena and
share one read-only mapping of weights.bin between the graphs. Batch 8 x seq 64, same seeded batches for every variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import JSON_MARKER, current_rss_bytes, peak_rss_bytes, run_json_child, summarize_times, time_calls  # noqa: E402

CONFIG = dict(d_model=256, n_layers=6, n_heads=8, d_ff=1024, vocab_size=8000, max_len=128, num_classes=4)
SCHEMES = ("fp32", "int8", "int4", "int8-dynamic")
POLICIES = {"fast": dict(share_weights=True, prepack=True, arena=True),
            "lean": dict(share_weights=True, prepack=False, arena=True)}


def _child(bundle: str, policy: str, threads: int, warmup: int, steps: int, batch: int, seq: int) -> None:
    import numpy as np

    baseline = current_rss_bytes()
    from device_runtime import Trainer

    trainer = Trainer.open(bundle, threads=threads, **POLICIES[policy])
    after_open = current_rss_bytes()
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        mask = np.ones((batch, seq), np.int64)
        mask[1:, seq // 2 :] = 0
        batches.append({"input_ids": rng.integers(0, CONFIG["vocab_size"], (batch, seq)).astype(np.int64),
                        "attention_mask": mask, "labels": rng.integers(0, CONFIG["num_classes"], batch).astype(np.int64)})
    losses, times = time_calls(lambda i: trainer.step(batches[i % len(batches)]), warmup, steps)
    peak, source = peak_rss_bytes()
    assert "torch" not in sys.modules
    print(JSON_MARKER + json.dumps({"losses": losses, **summarize_times(times), "peak_rss": peak,
                                    "peak_rss_source": source, "baseline_rss": baseline, "after_open_rss": after_open}))


def _export(work: Path) -> dict[str, dict[str, Any]]:
    import torch

    from edgepeft import BitFitConfig, LoRAConfig, apply, load_model, quantize_frozen
    from edgepeft.models import make_example_batch
    from exporters.onnx import export

    bundles = {}
    for scheme in SCHEMES:
        torch.manual_seed(0)
        model = apply(load_model("transformer", **CONFIG), LoRAConfig(r=8, alpha=16, target_modules=["query", "value"]),
                      BitFitConfig())
        quantize_frozen(model, None if scheme == "fp32" else scheme)
        bundle = export(model, make_example_batch(model, 3, 7), out=work / scheme)
        files = bundle.manifest["files"]
        bundles[scheme] = {"path": str(work / scheme), "bundle_bytes": sum(f["size"] for f in files.values()),
                           "weights_bytes": files["weights.bin"]["size"]}
    return bundles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("BUNDLE", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], args.threads, args.warmup, args.steps, args.batch, args.seq)
        return 0

    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="edgepeft-quant-bench-") as tmp:
        bundles = _export(Path(tmp))
        rows = []
        for scheme, info in bundles.items():
            for policy in POLICIES:
                result = run_json_child([sys.executable, __file__, "--child", info["path"], policy, "--steps",
                                         str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                                         "--batch", str(args.batch), "--seq", str(args.seq)],
                                        threads=args.threads, timeout=1800)
                rows.append({"scheme": scheme, "policy": policy, **info, **result})
    fp32 = {r["policy"]: r for r in rows if r["scheme"] == "fp32"}
    table = Table(title=f"Train step, device runtime, batch {args.batch} x seq {args.seq}, {args.threads} thread(s)")
    for col in ("base", "memory policy", "bundle MB", "weights.bin x fp32", "median ms", "p90 ms", "peak RSS MB",
                "RSS after open MB", "peak RSS x fp32", "time x fp32"):
        table.add_column(col, justify="right")
    for r in rows:
        ref = fp32[r["policy"]]
        table.add_row(r["scheme"], r["policy"], f"{r['bundle_bytes'] / 1e6:.2f}",
                      f"{r['weights_bytes'] / ref['weights_bytes']:.3f}", f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}",
                      f"{r['peak_rss'] / 1e6:.1f}", f"{r['after_open_rss'] / 1e6:.1f}",
                      f"{r['peak_rss'] / ref['peak_rss']:.2f}", f"{r['median_ms'] / ref['median_ms']:.2f}")
    (Console() if Console().is_terminal else Console(width=160)).print(table)  # a pipe or log file: full width
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
