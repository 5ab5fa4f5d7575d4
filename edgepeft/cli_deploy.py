"""CLI verbs for deployment: `profile` (measure + project a bundle), `plan` (fit a target's RAM), `package`.

`register(group)` adds them to the `edgepeft` group; `edgepeft/cli.py` calls it once, before its `__main__` guard,
so `python -m edgepeft.cli profile ...` works too (a `@main.command` here would register on a second copy of the
cli module when cli.py runs as `__main__`). For the same reason the cli helpers are imported inside the commands. Output conventions follow the
rest of the CLI: rich tables on stdout, errors as one line on stderr with a meaningful exit code, JSON for machines
(`--json F` writes the JSON document to F; `-` means stdout, and then nothing else is printed there).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .profiles import profile_names

__all__ = ["profile_cmd", "plan_cmd", "package_cmd", "register"]

_TARGET = click.Choice(profile_names())


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.2f} MB"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.3f} ms"


def _write_json(document: dict[str, Any], destination: str | None) -> bool:
    """Write to a file or to stdout ('-'); True when stdout was used (then the tables are not printed)."""
    if destination is None:
        return False
    text = json.dumps(document, indent=2)
    if destination == "-":
        click.echo(text)
        return True
    _atomic_write_text(Path(destination), text + "\n")
    return False


def _atomic_write_text(path: Path, text: str) -> None:
    from device_runtime.atomic_io import atomic_write_file

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _print_profile(report: dict[str, Any], out: Console) -> None:
    m = report["measured"]
    latency = Table(title=f"Latency — {m['label']}")
    for col in ("graph", "median", "p90", "min", "host compute floor", "MFLOPs/run"):
        latency.add_column(col, justify="right" if col != "graph" else "left")
    for graph in ("train_step", "infer"):
        latency.add_row(graph, _ms(m[graph]["median_ms"]), _ms(m[graph]["p90_ms"]), _ms(m[graph]["min_ms"]),
                        _ms(report["compute"][graph].get("host_compute_floor_ms")),
                        f"{report['compute'][graph]['flops'] / 1e6:,.1f}")
    out.print(latency)
    memory = Table(title="Memory: planned vs measured (this host)")
    for col in ("item", "planned", "measured", "how"):
        memory.add_column(col, justify="right" if col in ("planned", "measured") else "left")
    for row in report["memory"]["rows"]:
        memory.add_row(row["item"], _mb(row["planned"]), _mb(row["measured"]), row["how"])
    mem = report["memory"]
    memory.add_row("[bold]peak[/]", _mb(mem["planned_peak_with_baseline"]),
                   f"{_mb(mem['measured_peak'])} ({mem['measured_peak_source']})", "planned: baseline + plan")
    out.print(memory)
    if report.get("ops"):
        ops = Table(title="Top op types by time (onnxruntime profiler, median µs per run)")
        for col in ("graph", "op type", "nodes", "µs/run", "share"):
            ops.add_column(col, justify="right" if col in ("nodes", "µs/run", "share") else "left")
        for graph in ("train_step", "infer"):
            for entry in report["ops"][graph]["by_op_type"][:6]:
                ops.add_row(graph, entry["op_type"], str(entry["nodes"]), f"{entry['us_per_run']:,.0f}",
                            f"{100 * entry['share']:.1f}%")
        out.print(ops)
    if report.get("projection"):
        p = report["projection"]
        proj = Table(title=f"PROJECTION for {p['profile']['name']} (roofline; not a measurement)")
        for col in ("graph", "roofline bound", "compute term", "memory term", "bound by", "scaled by host efficiency"):
            proj.add_column(col, justify="left" if col in ("graph", "bound by") else "right")
        for graph in ("train_step", "infer"):
            g = p[graph]
            proj.add_row(graph, _ms(g["projected_ms"]), _ms(g["compute_ms"]), _ms(g["memory_ms"]), g["bound"],
                         _ms(g.get("scaled_ms")))
        out.print(proj)
        out.print(f"[dim]{p['scaled_label']}[/]\npeak RSS measured here = {100 * p['peak_rss_share_of_ram']:.1f}% of "
                  f"the target's {p['profile']['ram_bytes'] / 2**30:.1f} GB RAM")
    npu = report.get("npu")
    if npu and npu.get("paths"):
        table = Table(title="NPU paths: nodes each EP could take (onnxruntime mobile usability checker)")
        for col in ("path", "graph", "EP nodes", "partitions", "ORT verdict", "falls back to CPU"):
            table.add_column(col)
        for entry in npu["paths"].values():
            for graph in ("infer", "train_step"):
                g = entry[graph]
                fallback = ", ".join(f"{op}×{n}" for op, n in list(g["cpu_fallback_ops"].items())[:5]) or "none"
                table.add_row(entry["name"], graph, f"{g['ep_nodes']}/{g['nodes']} ({100 * g['coverage']:.0f}%)",
                              str(g["partitions"]), g["suitability"], fallback)
        out.print(table)


@click.command("profile")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", type=_TARGET, default=None, help="Device profile to project onto (see `edgepeft plan`).")
@click.option("--json", "json_out", default=None, metavar="F", help="Write the report as JSON to F ('-': stdout).")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="F",
              help="Write the HTML report (inline SVG charts) to F.")
@click.option("--steps", default=30, show_default=True, help="Timed train steps / predicts after warm-up.")
@click.option("--warmup", default=5, show_default=True, help="Untimed calls before timing.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--seq-len", default=64, show_default=True, help="Used for every non-batch symbolic dim.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores).")
@click.option("--no-ops", is_flag=True, help="Skip the onnxruntime profiler run.")
@click.option("--no-npu", is_flag=True, help="Skip the NPU coverage report.")
def profile_cmd(bundle: Path, target: str | None, json_out: str | None, html_out: Path | None, steps: int,
                warmup: int, batch_size: int, seq_len: int, threads: int | None, no_ops: bool, no_npu: bool) -> None:
    """Measure BUNDLE here (latency, memory, top ops) and project it onto a target device."""
    from .cli import _console, _Errors
    from .profiling import profile_bundle
    from .profiling.html_report import render_html

    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--seq-len", seq_len)):
        if value < 1:
            raise click.BadParameter(f"must be >= 1, got {value}", param_hint=name)
    with _Errors():
        _console.print(f"profiling {bundle} (children import only device_runtime) ...")
        report = profile_bundle(bundle, target, batch_size=batch_size, seq_len=seq_len, warmup=warmup, steps=steps,
                                threads=threads, with_ops=not no_ops, with_npu=not no_npu)
        if html_out:
            _atomic_write_text(html_out, render_html(report))
        used_stdout = _write_json(report, json_out)
    if not used_stdout:
        _print_profile(report, Console())
        for label, path in (("json", json_out), ("html", html_out)):
            if path:
                Console().print(f"{label}: {path}")


def _probe_bundle(model: str, out_dir: Path) -> Path:
    """Export `model` with LoRA (rank 8, its default targets) + AdamW: the probe the memory model measures."""
    import torch

    from device_runtime.optim_spec import AdamW
    from exporters import export as export_bundle

    from .methods import LoRAConfig, apply
    from .models import load_model, make_example_batch

    torch.manual_seed(0)
    net = load_model(model)
    apply(net, LoRAConfig(r=8, alpha=16))
    export_bundle(net, make_example_batch(net, batch_size=3, seq_len=7), backend="onnx", out=out_dir,
                  loss="cross_entropy", optimizer=AdamW(lr=1e-3), model_id=model, model_source=f"builtin:{model}")
    return out_dir


@click.command("plan")
@click.option("--target", type=_TARGET, required=True, help="Device profile whose RAM to fit.")
@click.option("--model", default=None, help="Built-in model to plan for (exports a LoRA probe bundle first).")
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Plan from an exported bundle instead of --model.")
@click.option("--headroom", default=0.5, show_default=True, help="Share of RAM kept free for the OS and other apps.")
@click.option("--ram-mb", type=int, default=None, help="Override the target's RAM (e.g. a 1 GB Pi 4: 1024).")
@click.option("--seq-len", type=int, default=None, help="Fix the sequence length instead of choosing it.")
@click.option("--batch-size", type=int, default=None, help="Fix the batch size instead of choosing it.")
@click.option("--no-eval", is_flag=True, help="Plan without held-out evaluation during the loop.")
@click.option("--json", "json_out", default=None, metavar="F", help="Write the plan as JSON to F ('-': stdout).")
def plan_cmd(target: str, model: str | None, bundle_dir: Path | None, headroom: float, ram_mb: int | None,
             seq_len: int | None, batch_size: int | None, no_eval: bool, json_out: str | None) -> None:
    """Pick batch size, sequence length, LoRA rank/layers and quantization that fit TARGET's RAM, and say why."""
    from device_runtime import read_bundle

    from .cli import _console, _Errors
    from .profiles import load_profile
    from .profiling.planner import MemoryModel, plan_for_target

    if (model is None) == (bundle_dir is None):
        raise click.UsageError("pass exactly one of --model NAME or --bundle DIR")
    with _Errors():
        profile = load_profile(target)
        with tempfile.TemporaryDirectory(prefix="edgepeft-plan-") as tmp:
            if bundle_dir is None:
                _console.print(f"exporting a LoRA probe of {model} to measure its memory model ...")
                bundle_dir = _probe_bundle(model, Path(tmp) / "probe")
            _console.print("measuring the probe (two child runs) and planning ...")
            memory_model = MemoryModel(read_bundle(bundle_dir))
            result = plan_for_target(memory_model, profile, headroom=headroom,
                                     ram_bytes=ram_mb * 2**20 if ram_mb else None, seq_len=seq_len,
                                     batch_size=batch_size, evaluation=not no_eval)
        result["model"] = model or memory_model.bundle.manifest["model"]["id"]
        used_stdout = _write_json(result, json_out)
    if used_stdout:
        return
    out = Console()
    if not result["fits"]:
        out.print(f"[bold red]no configuration fits {profile['name']}:[/] {result['why']}")
        raise SystemExit(6)
    c = result["choice"]
    table = Table(title=f"Plan for {profile['name']} — planned peak memory by item")
    table.add_column("item")
    table.add_column("planned", justify="right")
    for item, value in result["breakdown"].items():
        table.add_row(item if item != "total" else "[bold]total[/]", _mb(value))
    out.print(table)
    quant = c["quant"] or "none"
    layers = "" if c["layers"] == "all" else " --layers " + ",".join(str(i) for i in c["layer_indices"])
    out.print(f"[bold]choice:[/] batch {c['batch_size']}, seq {c['seq_len']}, LoRA rank {c['rank']} on {c['layers']} "
              f"layers, frozen weights {quant}")
    for line in result["why"]:
        out.print(f"  why: {line}")
    out.print(f"export with: edgepeft export {result['model']} --rank {c['rank']}{layers} --quant {quant} -o BUNDLE; "
              f"train with --batch-size {c['batch_size']}")


@click.command("package")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", type=_TARGET, required=True, help="Device profile to package for.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The package to write (e.g. build.tar.gz).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def package_cmd(bundle: Path, target: str, output: Path, as_json: bool) -> None:
    """Package BUNDLE for TARGET: bundle, runtime source, pinned requirements, launcher, mobile ORT files."""
    from .cli import _Errors
    from .deploy import build_package

    with _Errors():
        result = build_package(bundle, target, output)
    info = {"package": str(result.path), "target": result.target, "size": result.size, "sha256": result.sha256,
            "files": result.files}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    out = Console()
    out.print(f"packaged {bundle} for {target} -> {result.path} ({result.size / 1024:,.1f} KiB, sha256 "
              f"{result.sha256[:16]}), {len(result.files)} files")
    mobile = sorted(f for f in result.files if f.startswith("mobile/"))
    if mobile:
        out.print("mobile: " + ", ".join(mobile))
    else:
        out.print("on the device: python3 -m pip install -r requirements.txt && "
                  "python3 run_personalization.py --data user.npz")


def register(group: click.Group) -> None:
    """Add profile, plan and package to the CLI group."""
    for command in (profile_cmd, plan_cmd, package_cmd):
        group.add_command(command)
