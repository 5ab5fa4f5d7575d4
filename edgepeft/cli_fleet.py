"""CLI verbs for fleets on Flower: `fleet digits-bundle` (the shared base), `fleet simulate` (a simulated fleet)
and `fleet app` (the Flower App directory a real SuperLink and SuperNodes run).

`register(group)` adds the `fleet` group to the `edgepeft` group; `edgepeft/cli.py` calls it once, before its
`__main__` guard, so `python -m edgepeft.cli fleet ...` works too. The cli helpers are imported inside the
commands for the same reason, and so is Flower: `edgepeft --help` must not need it. Output follows the rest of
the CLI: rich tables on stdout, one-line errors with meaningful exit codes, `--json` for machines.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import click
from rich.console import Console
from rich.table import Table

__all__ = ["fleet_group", "register"]


@click.group("fleet")
def fleet_group() -> None:
    """Federated personalization on Flower: devices train one shared adapter, then keep a personal one."""


@fleet_group.command("digits-bundle")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Bundle directory.")
@click.option("--rank", default=4, show_default=True, help="LoRA rank (fc1, fc2; BitFit trains the biases).")
@click.option("--lr", default=1e-2, show_default=True, help="AdamW learning rate stored in the bundle.")
@click.option("--seed", default=0, show_default=True, help="Seed of the digits split and the pretraining.")
@click.option("--json", "as_json", is_flag=True)
def digits_bundle_cmd(output: Path, rank: int, lr: float, seed: int, as_json: bool) -> None:
    """Export the digits fleet's base: the mlp pretrained on the base writers, with LoRA + BitFit."""
    from .cli import _Errors

    with _Errors():
        from .fleet.partition import PartitionConfig
        from .fleet.simulate import export_digits_base

        bundle = export_digits_base(output, PartitionConfig(seed=seed), rank=rank, lr=lr)
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle)}))
    else:
        Console().print(f"bundle: {bundle}\nnext: edgepeft fleet simulate {bundle} --clients 12 --rounds 20")


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _print_report(report: dict[str, Any], out: Console) -> None:
    table = Table(title="Accuracy per client on its own held-out digits")
    for col in ("client", "style", "train/test", "base", "local", "global", "personal", "local on all"):
        table.add_column(col, justify="left" if col == "style" else "right")
    for c in report["clients"]:
        table.add_row(str(c["client_id"]), c["style"], f"{c['train_examples']}/{c['test_examples']}",
                      _pct(c["base_accuracy"]), _pct(c["local_accuracy"]), _pct(c["global_accuracy"]),
                      _pct(c["personal_accuracy"]), _pct(c["local_accuracy_fleet"]))
    out.print(table)
    out.print("local: the client trained alone for as many steps; personal: global + local fine-tuning; "
              "local on all: its local adapter on every client's held-out digits")
    f, own, b = report["fleet_accuracy"], report["own_accuracy"], report["bytes"]
    out.print(f"everyone's held-out digits: base {_pct(f['base'])}, global (federated) {_pct(f['global'])}, "
              f"local-only adapters {_pct(f['local_mean'])} on average ({_pct(f['local_min'])}-"
              f"{_pct(f['local_max'])})")
    out.print(f"own held-out, mean over clients: base {_pct(own['base'])}, local {_pct(own['local'])}, "
              f"global {_pct(own['global'])}, personalized {_pct(own['personal'])}")
    out.print(f"bytes per client and round: down {b['downlink_per_client_round']['median']:,.0f}, up "
              f"{b['uplink_per_client_round']['median']:,.0f} (Flower's serialization); adapter tensors "
              f"{b['tensor_bytes']:,} B in {b['tensors']} tensors, adapter.safetensors {b['adapter_safetensors']:,} B; "
              f"the frozen base ({b['frozen_base_bytes']:,} B) never travels")
    s = report["screening"]
    out.print(f"screening: {s['accepted']} updates accepted, {s['clipped']} clipped, {s['rejected']} rejected; "
              f"torch loaded by a client: {'yes' if report['torch_loaded_on_clients'] else 'no'}")
    if report["dp"]:
        dp = report["dp"]
        out.print(f"DP: clip {dp['clip_norm']:g}, noise multiplier {dp['noise_multiplier']:g} -> epsilon "
                  f"{dp['epsilon']:.2f} at delta {dp['delta']:g} over {dp['rounds']} rounds")
    out.print(f"federated {report['seconds']['federated']:.1f} s, local-only baseline "
              f"{report['seconds']['local_only']:.1f} s; flwr {report['versions']['flwr']}, ray "
              f"{report['versions']['ray']}")


@fleet_group.command("simulate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--clients", default=12, show_default=True, help="Virtual devices (Flower SuperNodes).")
@click.option("--rounds", default=20, show_default=True, help="Federated rounds.")
@click.option("--data", type=click.Choice(["digits"]), default="digits", show_default=True,
              help="The fleet's data: scikit-learn digits split non-IID by class and handwriting style.")
@click.option("--class-alpha", default=0.5, show_default=True, help="Dirichlet class skew (lower: more skew).")
@click.option("--local-steps", default=30, show_default=True, help="Steps each client trains per round.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", default=1e-2, show_default=True, help="Clients' learning rate.")
@click.option("--proximal-mu", default=0.0, show_default=True, help="FedProx proximal weight (0: FedAvg).")
@click.option("--server-momentum", default=0.0, show_default=True, help="FedAvgM server momentum (0: FedAvg).")
@click.option("--server-lr", default=1.0, show_default=True, help="Server step on the mean update.")
@click.option("--personalize-steps", default=30, show_default=True,
              help="Local fine-tuning steps after the last round (0: skip).")
@click.option("--max-norm-ratio", default=5.0, show_default=True,
              help="An update above this multiple of the cohort's median norm is an outlier.")
@click.option("--outlier-action", type=click.Choice(["reject", "clip"]), default="reject", show_default=True)
@click.option("--no-robust", is_flag=True, help="Turn screening off (shape checks stay).")
@click.option("--dp-clip-norm", type=float, default=None, help="Turn on central DP: clip every update to this norm.")
@click.option("--dp-noise-multiplier", type=float, default=1.0, show_default=True,
              help="DP noise std on the sum, in units of the clip norm.")
@click.option("--dp-delta", type=float, default=1e-5, show_default=True)
@click.option("--cpus", default=2, show_default=True, help="CPUs for Flower's Ray engine (one client each).")
@click.option("--threads", default=1, show_default=True, help="onnxruntime threads per client.")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work directory for the clients' data and the report (default: a temp dir).")
@click.option("--verbose", is_flag=True, help="Flower's round-by-round log on stderr.")
@click.option("--json", "as_json", is_flag=True)
def simulate_cmd(bundle: Path, clients: int, rounds: int, data: str, class_alpha: float, local_steps: int,
                 batch_size: int, lr: float, proximal_mu: float, server_momentum: float, server_lr: float,
                 personalize_steps: int, max_norm_ratio: float, outlier_action: str, no_robust: bool,
                 dp_clip_norm: Optional[float], dp_noise_multiplier: float, dp_delta: float, cpus: int, threads: int,
                 seed: int, output: Optional[Path], verbose: bool, as_json: bool) -> None:
    """Run a fleet of CLIENTS devices on Flower's simulation engine and compare global, local and personal."""
    from .cli import _Errors

    work = output or Path(tempfile.mkdtemp(prefix="edgepeft-fleet-"))
    with _Errors():
        from .fleet import DPConfig, FleetConfig, PartitionConfig, RobustConfig, SimulationConfig, simulate_fleet

        config = SimulationConfig(
            fleet=FleetConfig(rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr,
                              proximal_mu=proximal_mu, server_momentum=server_momentum, server_lr=server_lr,
                              personalize_steps=personalize_steps, seed=seed,
                              robust=None if no_robust else RobustConfig(max_norm_ratio, outlier_action),
                              dp=DPConfig(dp_clip_norm, dp_noise_multiplier, dp_delta, seed)
                              if dp_clip_norm is not None else None),
            partition=PartitionConfig(num_clients=clients, class_alpha=class_alpha, seed=seed),
            cpus=cpus, threads=threads, verbose=verbose)
        report = simulate_fleet(bundle, config, work).to_dict()
    report["work_dir"] = str(work)
    from device_runtime.atomic_io import atomic_write_file

    text = json.dumps(report, indent=2, default=float)
    atomic_write_file(work / "report.json", lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    if as_json:
        click.echo(text)
    else:
        _print_report(report, Console())
        Console().print(f"report: {work / 'report.json'}")


@fleet_group.command("app")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Flower App directory to write (give it to `flwr run`).")
@click.option("--rounds", default=20, show_default=True)
@click.option("--local-steps", default=30, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", default=1e-2, show_default=True)
@click.option("--proximal-mu", default=0.0, show_default=True)
@click.option("--server-momentum", default=0.0, show_default=True)
@click.option("--personalize-steps", default=30, show_default=True)
@click.option("--min-clients", default=2, show_default=True, help="Rounds wait for this many SuperNodes.")
@click.option("--adapter-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the server writes the final global adapter.")
@click.option("--dp-clip-norm", type=float, default=None, help="Turn on central DP: clip every update to this norm.")
@click.option("--dp-noise-multiplier", type=float, default=1.0, show_default=True)
def app_cmd(bundle: Path, output: Path, rounds: int, local_steps: int, batch_size: int, lr: float,
            proximal_mu: float, server_momentum: float, personalize_steps: int, min_clients: int,
            adapter_out: Optional[Path], dp_clip_norm: Optional[float], dp_noise_multiplier: float) -> None:
    """Write a Flower App directory for a real SuperLink and SuperNodes (see docs/FLEET.md)."""
    from .cli import _Errors

    with _Errors():
        from .fleet.flower_app import write_flower_app
        from .fleet.robust import DPConfig
        from .fleet.server_app import FleetConfig

        config = FleetConfig(rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr,
                             proximal_mu=proximal_mu, server_momentum=server_momentum,
                             personalize_steps=personalize_steps, min_clients=min_clients,
                             dp=DPConfig(dp_clip_norm, dp_noise_multiplier) if dp_clip_norm is not None else None)
        out = write_flower_app(output, bundle, config, adapter_out)
    Console().print(f"Flower App: {out}\nrun it: flwr run {out} <superlink-connection> --stream")


def register(group: click.Group) -> None:
    """Add the `fleet` group to the CLI group."""
    group.add_command(fleet_group)
