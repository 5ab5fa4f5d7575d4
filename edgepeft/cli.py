"""The `edgepeft` command line: quickstart, export, inspect, train.

Exit codes: 0 ok, 2 usage error (click), 3 bundle or checkpoint rejected, 4 data rejected, 5 export failed,
6 bad configuration, 7 refused by the memory guard. `--json` prints one machine-readable JSON document on stdout and nothing else.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from device_runtime.errors import (
    BatchError,
    BundleError,
    CheckpointError,
    LoopConfigError,
    MemoryBudgetError,
    OptimizerSpecError,
)
from device_runtime.guards import MONITORS
from device_runtime.open import BACKENDS
from device_runtime.sample_buffer import POLICIES
from device_runtime.schedule import SCHEDULES

from .errors import EdgePeftError

__all__ = ["main"]

EXIT_BUNDLE, EXIT_DATA, EXIT_EXPORT, EXIT_CONFIG, EXIT_MEMORY = 3, 4, 5, 6, 7
_console = Console(stderr=True)


def _fail(message: str, code: int) -> None:
    _console.print(f"[bold red]error:[/] {message}")
    sys.exit(code)


class _Errors:
    """Turn our exceptions into a one-line message and a meaningful exit code, never a traceback."""

    def __enter__(self) -> "_Errors":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        from exporters.errors import ExportError

        if exc is None:
            return False
        for types, code in (
            ((BundleError, CheckpointError), EXIT_BUNDLE),
            ((BatchError,), EXIT_DATA),
            ((ExportError,), EXIT_EXPORT),
            ((EdgePeftError, OptimizerSpecError, LoopConfigError), EXIT_CONFIG),
            ((MemoryBudgetError,), EXIT_MEMORY),
        ):
            if isinstance(exc, types):
                _fail(str(exc), code)
        return False


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.group()
@click.version_option(package_name="edgepeft")
def main() -> None:
    """Export PEFT train steps for devices and personalize models there without torch."""


@main.command()
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the bundle, checkpoint, adapter and data (default: a temp dir).")
@click.option("--steps", default=150, show_default=True, help="Personalization steps on the device.")
@click.option("--rank", default=8, show_default=True, help="LoRA rank.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores).")
@click.option("--quant", type=click.Choice(["none", "int8", "int4", "int8-dynamic"]), default="none",
              show_default=True, help="Quantize the frozen base before export.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def quickstart(output: Path | None, steps: int, rank: int, threads: int | None, quant: str, as_json: bool) -> None:
    """Pretrain a digits MLP, export LoRA+BitFit, personalize it on-device to a new handwriting."""
    from .quickstart import run_quickstart

    out_dir = output or Path(tempfile.mkdtemp(prefix="edgepeft-quickstart-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with _Errors(), _progress(steps, disable=as_json) as advance:
        result = run_quickstart(out_dir, steps=steps, rank=rank, threads=threads, on_step=advance,
                                quant=None if quant == "none" else quant)
    r = result.report
    summary = {
        "bundle": str(result.bundle_dir),
        "trainable_params": result.trainable,
        "total_params": result.total,
        "export_seconds": round(result.export_seconds, 2),
        "steps": steps,
        "train_seconds": round(r.seconds, 3),
        "ms_per_step": round(1000 * r.seconds / steps, 3),
        "user": {"before": r.before, "after": r.after},
        "original_writers": result.base_after,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(title="On-device personalization (scikit-learn digits, simulated user handwriting)")
    for col in ("", "loss before", "loss after", "accuracy before", "accuracy after"):
        table.add_column(col, justify="right")
    for label, before, after in (
        ("user's held-out digits", r.before, r.after),
        ("original writers", result.base_after["before"], result.base_after["after"]),
    ):
        table.add_row(label, f"{before['loss']:.4f}", f"{after['loss']:.4f}",
                      f"{100 * before['accuracy']:.1f}%", f"{100 * after['accuracy']:.1f}%")
    out = Console()
    out.print(table)
    out.print(f"trainable params: {result.trainable:,} of {result.total:,} "
              f"({100 * result.trainable / result.total:.2f}%)  export: {result.export_seconds:.1f} s  "
              f"device training: {steps} steps in {r.seconds:.2f} s ({1000 * r.seconds / steps:.1f} ms/step)")
    out.print(f"bundle: {result.bundle_dir}\nadapter: {out_dir / 'adapter'}\n"
              f"again on the device: edgepeft train {result.bundle_dir} --data {out_dir / 'user_train.npz'} "
              f"--eval-data {out_dir / 'user_test.npz'} --steps {steps}")


class _progress:
    """A rich progress bar on stderr, advanced by the loop's step callback."""

    def __init__(self, total: int, disable: bool) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                  TimeRemainingColumn(), console=_console, disable=disable or not _console.is_terminal)
        self._task = self._progress.add_task("training", total=total, info="")

    def __enter__(self):
        self._progress.start()

        def advance(event) -> None:
            self._progress.update(self._task, advance=1, info=f"loss {event.loss:.4f} lr {event.lr:.2e}")

        return advance

    def __exit__(self, *exc) -> bool:
        self._progress.stop()
        return False


@main.command("export")
@click.argument("model")
@click.option("--task", type=click.Choice(["text-classification", "image-classification", "text-generation"]),
              default="text-classification", show_default=True,
              help="For a Hugging Face model directory: the head to load it with.")
@click.option("--num-labels", type=int, default=None,
              help="Classifier size (a new head when it differs from the checkpoint's; built-ins: num_classes).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle directory.")
@click.option("--method", "methods", default="lora", show_default=True,
              help="Comma-separated PEFT methods, applied in order (lora, dora, lora_fa, ia3, adapter, "
                   "prompt_tuning, prefix_tuning, bitfit, train_head).")
@click.option("--rank", default=8, show_default=True, help="LoRA / DoRA / LoRA-FA rank.")
@click.option("--alpha", default=None, type=float, help="LoRA alpha (default: 2 x rank).")
@click.option("--target-modules", default=None,
              help="Comma-separated module name patterns for LoRA / DoRA / LoRA-FA (re:... for regex).")
@click.option("--layers", default=None,
              help="Comma-separated block indices LoRA-family, ia3, adapter and prefix_tuning are restricted to (e.g. 2,3).")
@click.option("--num-virtual-tokens", default=8, show_default=True, help="Prompt / prefix tuning length.")
@click.option("--bitfit-norm", is_flag=True, help="BitFit also trains norm-layer biases.")
@click.option("--train-modules", default=None,
              help="Modules train_head trains in full (default: the model's classifier, `head` for built-ins).")
@click.option("--loss", type=click.Choice(["cross_entropy", "mse"]), default="cross_entropy", show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--lr", type=float, default=None, help="Learning rate (default 1e-3 AdamW, 1e-2 SGD).")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-grad-norm", type=float, default=None, help="Global-norm gradient clipping.")
@click.option("--quant", type=click.Choice(["none", "int8", "int4", "int8-dynamic"]), default="none",
              show_default=True,
              help="Quantize the frozen base: int8 per-channel, int4 block-wise (Linear/Embedding); int8-dynamic: "
                   "int8 weights and run-time int8 activations (integer matmuls, onnx only).")
@click.option("--fp32-gradients", is_flag=True,
              help="int8-dynamic: compute the backward's input gradients in fp32 instead of int8 (slower; the "
                   "gradients are not rounded).")
@click.option("--block-size", default=32, show_default=True, help="int4 block size (a power of two >= 16).")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="onnx", show_default=True,
              help="onnx: onnxruntime graphs + shared weights; executorch: train.pte + XNNPACK infer.pte.")
@click.option("--max-batch", default=32, show_default=True,
              help="executorch: the largest batch the programs accept (memory is planned for it).")
@click.option("--recompute", is_flag=True,
              help="onnx: recompute the forward between LayerNorms in the backward (fewer live activations, "
                   "about one extra forward per step; transformers only).")
@click.option("--recompute-keep-last", type=click.IntRange(min=0), default=2, show_default=True,
              help="with --recompute: how many of the last segments (two per transformer layer) keep their "
                   "activations; more is faster and takes more memory.")
@click.option("--rematerialize/--no-rematerialize", default=True, show_default=True,
              help="onnx: rebuild cheap saved activations (attention probabilities, LayerNorm outputs) in the "
                   "backward instead of keeping them; bit-identical results.")
@click.option("--rematerialize-matmuls", is_flag=True,
              help="onnx: also re-run the weight matmuls that expand their input (FFN up-projections) in the "
                   "backward instead of keeping their outputs: less memory for one matmul per layer.")
@click.option("--seed", default=0, show_default=True, help="Seed for the model's random init.")
@click.option("--json", "as_json", is_flag=True)
def export_cmd(model: str, task: str, num_labels: int | None, output: Path, methods: str, rank: int, alpha: float | None, target_modules: str | None,
               layers: str | None, num_virtual_tokens: int, bitfit_norm: bool, train_modules: str | None, loss: str,
               optimizer: str, lr: float | None,
               momentum: float, weight_decay: float, max_grad_norm: float | None, quant: str, fp32_gradients: bool,
               block_size: int, backend: str, max_batch: int, recompute: bool, recompute_keep_last: int,
               rematerialize: bool, rematerialize_matmuls: bool, seed: int, as_json: bool) -> None:
    """Export MODEL with PEFT methods to a device bundle.

    MODEL is a built-in name (mlp, cnn, transformer, minilm) or a local Hugging Face model directory (config.json +
    weights, never downloaded; its tokenizer.json ships in the bundle).
    """
    import torch

    from device_runtime.optim_spec import SGD, AdamW
    from exporters import export as export_bundle

    from .methods import apply, method_config_class, trainable_parameters
    from .models import make_example_batch
    from .quantization import quantize_frozen

    with _Errors():
        torch.manual_seed(seed)
        net = _load_cli_model(model, task, num_labels)
        in_layers = {"layers_to_transform": [int(v) for v in _csv(layers) or []] or None}
        lora = {"r": rank, "alpha": alpha if alpha is not None else 2.0 * rank,
                "target_modules": _csv(target_modules), **in_layers}
        options: dict[str, dict[str, Any]] = {
            "lora": lora, "dora": lora, "lora_fa": lora,
            "ia3": in_layers, "adapter": in_layers,
            "prompt_tuning": {"num_virtual_tokens": num_virtual_tokens},
            "prefix_tuning": {"num_virtual_tokens": num_virtual_tokens, **in_layers},
            "bitfit": {"include_norm": bitfit_norm},
            "train_head": {"target_modules": _csv(train_modules) or list(getattr(net, "default_head_targets", ["head"]))},
        }
        configs = [method_config_class(name)(**options.get(name, {})) for name in _csv(methods) or []]
        apply(net, *configs)
        trainable, total = trainable_parameters(net)  # before quantization turns frozen weights into buffers
        quantize_frozen(net, None if quant == "none" else quant, block_size=block_size,
                        int8_gradients=not fp32_gradients)
        if optimizer == "adamw":
            opt = AdamW(lr=lr or 1e-3, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        else:
            opt = SGD(lr=lr or 1e-2, momentum=momentum, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        if recompute and backend != "onnx":
            raise click.UsageError("--recompute is for --backend onnx (ExecuTorch plans its memory ahead of time)")
        if recompute_keep_last != 2 and not recompute:
            raise click.UsageError("--recompute-keep-last needs --recompute")
        if not rematerialize and backend != "onnx":
            raise click.UsageError("--no-rematerialize is for --backend onnx (ExecuTorch plans its memory ahead of "
                                   "time)")
        if rematerialize_matmuls and (backend != "onnx" or not rematerialize):
            raise click.UsageError("--rematerialize-matmuls is for --backend onnx, with --rematerialize")
        backend_options = ({"max_batch": max_batch} if backend == "executorch"
                           else {"recompute": recompute, "recompute_keep_last": recompute_keep_last,
                                 "rematerialize": rematerialize, "rematerialize_matmuls": rematerialize_matmuls})
        bundle = export_bundle(net, make_example_batch(net, batch_size=3, seq_len=7), backend=backend, out=output,
                               loss=loss, optimizer=opt, **_model_origin(model),
                               **backend_options)
    info = {"bundle": str(output), "bundle_id": bundle.bundle_id, "trainable_params": trainable, "total_params": total,
            "files": bundle.manifest["files"]}
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        Console().print(f"exported {model} -> {output} ({backend})  trainable {trainable:,} / {total:,} params")


def _load_cli_model(model: str, task: str, num_labels: int | None) -> Any:
    """A built-in by name, or a Hugging Face model from a local directory (a path that exists)."""
    from .models import load_hf_model, load_model

    if Path(model).is_dir():
        return load_hf_model(Path(model), task=task, num_labels=num_labels)
    return load_model(model, **({"num_classes": num_labels} if num_labels is not None else {}))


def _model_origin(model: str) -> dict[str, str]:
    """A built-in's manifest id and source; a directory's come from `load_hf_model`'s description of it."""
    return {} if Path(model).is_dir() else {"model_id": model, "model_source": f"builtin:{model}"}


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect(bundle: Path, as_json: bool) -> None:
    """Verify BUNDLE and show what it holds."""
    from device_runtime.bundle import read_bundle

    with _Errors():
        b = read_bundle(bundle)
    m = b.manifest
    if as_json:
        click.echo(json.dumps({"bundle_id": b.bundle_id, "manifest": m}, indent=2))
        return
    out = Console()
    out.print(f"[bold]{bundle}[/] format v{m['format_version']}  id {b.bundle_id[:16]}  backend {m['backend']}  "
              f"model {m['model']['id']} ({m['model']['source']})")
    out.print("methods: " + ", ".join(f"{x['name']}({', '.join(f'{k}={v}' for k, v in x['config'].items())})"
                                      for x in m["methods"]) or "methods: none recorded")
    opt = m["optimizer"]
    out.print(f"optimizer: {opt['name']} lr={opt['lr']}  loss: {m['loss']['name']}  "
              f"quantization: {m['quantization'] or 'none (fp32 base)'}")
    if m.get("tokenizer"):
        out.print(f"tokenizer: {m['tokenizer']['file']} (max_len {m['tokenizer'].get('max_len', '-')}); on the "
                  "device: TextTokenizer.from_bundle")
    rows = (m.get("weights") or {}).get("row_tables")
    if rows:
        out.print("row tables (only the batch's rows resident on the device): "
                  + ", ".join(f"{name} by {index}" for name, index in rows.items()))
    if m.get("executorch"):
        et = m["executorch"]
        runs_on = "XNNPACK + CPU kernels" if et["train"].get("delegate") else "ExecuTorch CPU kernels"
        out.print(f"executorch {et['version']}: train.pte on {runs_on}; bounds {et['dim_bounds']}")
    table = Table("tensor", "dtype", "shape", title="inputs / labels / output")
    for spec in [*m["inputs"], m["labels"], m["output"]]:
        table.add_row(spec["name"], spec["dtype"], str(spec["shape"]))
    out.print(table)
    n_trainable = sum(int(np.prod(s["shape"])) for s in m["trainable"])
    out.print(f"trainable tensors: {len(m['trainable'])} ({n_trainable:,} values)  "
              f"optimizer state tensors: {len(opt['state'])}")
    files = Table("file", "bytes", "sha256", title="files (verified)")
    for name, entry in sorted(m["files"].items()):
        files.add_row(name, f"{entry['size']:,}", entry["sha256"][:16])
    out.print(files)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """One array per name from an .npz (no pickle); anything else is a data error naming the file."""
    from device_runtime.npz_io import NPZ_READ_ERRORS, read_npz

    try:
        return read_npz(path)
    except NPZ_READ_ERRORS as exc:
        raise BatchError(f"cannot read data file {path}: {exc}; pass an .npz written by numpy.savez "
                         "with one array per bundle input plus the labels") from exc


def _describe(metrics: dict | None) -> str:
    if metrics is None:
        return "-"
    text = f"loss {metrics['loss']:.4f}"
    return text + (f", accuracy {100 * metrics['accuracy']:.1f}%" if "accuracy" in metrics else "")


_KEPT = {
    "final": "kept the newly trained adapter",
    "best": "kept the best evaluated adapter (from step {step})",
    "previous": "kept the previous adapter: the new one scored worse on held-out data (quality guard)",
}


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help=".npz with one array per bundle input plus the labels array, in arrival order.")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Held-out .npz for before/after metrics, early stopping and the quality guard.")
@click.option("--holdout", type=float, default=0.0, show_default=True,
              help="Hold out this share of --data as the held-out split instead of --eval-data.")
@click.option("--steps", default=100, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: the bundle's).")
@click.option("--warmup", default=0, show_default=True, help="Linear warmup steps.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True)
@click.option("--eval-every", type=int, default=None,
              help="Evaluate on the held-out split every N steps (default: steps/20 with --patience, else never).")
@click.option("--patience", default=0, show_default=True,
              help="Stop after this many evaluations without improvement (0: never stop early).")
@click.option("--monitor", type=click.Choice(MONITORS), default="loss", show_default=True,
              help="Held-out score for early stopping, keeping the best adapter and the quality guard.")
@click.option("--quality-guard/--no-quality-guard", default=True, show_default=True,
              help="Keep the previous adapter if the new one scores worse on the held-out split.")
@click.option("--buffer-size", type=int, default=None,
              help="Keep at most this many examples of --data (default: all).")
@click.option("--buffer-policy", type=click.Choice(POLICIES), default="reservoir", show_default=True,
              help="reservoir: a uniform sample of all examples; fifo: the newest.")
@click.option("--replay-data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=".npz of base-distribution examples mixed into every batch to limit forgetting.")
@click.option("--replay-share", type=float, default=None,
              help="Share of every batch drawn from --replay-data (default 0.25 when it is given).")
@click.option("--memory-budget-mb", type=float, default=None,
              help="Refuse to start (exit 7) or stop early when this process uses more RAM than this.")
@click.option("--min-available-mb", type=float, default=None,
              help="Refuse to start (exit 7) when the system has less RAM available than this.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--checkpoint-every", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from --checkpoint-dir.")
@click.option("--adapter-out", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--threads", type=int, default=None)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def train(bundle: Path, data: Path, eval_data: Path | None, holdout: float, steps: int, batch_size: int,
          lr: float | None, warmup: int, schedule: str, eval_every: int | None, patience: int, monitor: str,
          quality_guard: bool, buffer_size: int | None, buffer_policy: str, replay_data: Path | None,
          replay_share: float | None, memory_budget_mb: float | None, min_available_mb: float | None,
          checkpoint_dir: Path | None, checkpoint_every: int, resume: bool, adapter_out: Path | None,
          threads: int | None, seed: int, as_json: bool) -> None:
    """Run the on-device personalization loop on BUNDLE here, with the device runtime (either backend)."""
    from device_runtime import open_trainer
    from device_runtime.loop import LoopConfig, personalize

    if resume and checkpoint_dir is None:
        raise click.UsageError("--resume needs --checkpoint-dir")
    if eval_every is None:
        eval_every = max(1, steps // 20) if patience else 0
    if replay_share is None:
        replay_share = 0.25 if replay_data is not None else 0.0
    with _Errors():
        config = LoopConfig(
            steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup, schedule=schedule, eval_every=eval_every,
            patience=patience, monitor=monitor, quality_guard=quality_guard, holdout_fraction=holdout,
            buffer_size=buffer_size, buffer_policy=buffer_policy, replay_share=replay_share,
            memory_budget_mb=memory_budget_mb, min_available_mb=min_available_mb, checkpoint_every=checkpoint_every,
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, seed=seed,
        )
        trainer = open_trainer(bundle, checkpoint=checkpoint_dir if resume else None, threads=threads)
        evaluation = _load_npz(eval_data) if eval_data else None
        replay = _load_npz(replay_data) if replay_data else None

        def on_evaluation(event) -> None:
            if not as_json:
                mark = "improved" if event.improved else f"no improvement for {event.stale}"
                _console.print(f"step {event.step}: held-out {_describe(event.metrics)} ({mark})")

        with _progress(steps, disable=as_json) as advance:
            report = personalize(trainer, _load_npz(data), config, evaluation=evaluation, on_step=advance,
                                 replay=replay, on_evaluation=on_evaluation)
        if adapter_out:
            trainer.export_adapter(adapter_out)
    losses = report.losses
    result = {"steps": steps, "step_count": trainer.step_count, "first_loss": losses[0] if losses else None,
              "last_loss": losses[-1] if losses else None, "seconds": round(report.seconds, 3),
              **{k: v for k, v in report.to_dict().items() if k not in ("losses", "seconds")}}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    out = Console()
    ms = 1000 * report.seconds / max(1, report.steps_run)
    loss_text = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no step applied"
    out.print(f"{report.steps_run} of {steps} steps in {report.seconds:.2f} s ({ms:.1f} ms/step), stopped: "
              f"{report.stop_reason}; {loss_text}; total steps on this adapter: {trainer.step_count}")
    if report.skipped_steps:
        out.print(f"[yellow]skipped {report.skipped_steps} non-finite step(s)[/]")
    if report.before is not None:
        out.print(f"held-out before: {_describe(report.before)}\nheld-out after:  {_describe(report.after)}  "
                  f"({_KEPT[report.kept].format(step=report.kept_step)})")


from .cli_deploy import register as _register_deploy; _register_deploy(main)  # noqa: E402,E702 profile/plan/package
from .cli_fleet import register as _register_fleet; _register_fleet(main)  # noqa: E402,E702 fleet simulate

if __name__ == "__main__":
    main()
