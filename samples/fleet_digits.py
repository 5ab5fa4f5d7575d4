"""A fleet of phones learns one handwriting adapter together on Flower, then each keeps a personal one.

The story: twelve users, each writing digits in one of four styles and mostly writing a few digits (non-IID by
class and by style). Their data never leaves their phones. Each round, the server (a Flower ServerApp) sends the
shared adapter - LoRA + BitFit tensors, 8 KB; the 100 KB frozen base never travels - every phone (a Flower
ClientApp running the torch-free device_runtime) trains it on its own digits and sends it back, and the server
averages what came back, after rejecting any update that is NaN/Inf or far above the cohort's median norm. After
the last round every phone fine-tunes the global adapter on its own digits and keeps that personal adapter.

What we report: on everyone's held-out digits, the federated adapter vs the adapters the phones would have trained
alone (same number of steps); on each phone's own held-out digits, base vs global vs personalized; and the bytes
each phone sent and received per round.

Host half (torch): pretrain the base on the base writers and export the bundle.
Fleet half: Flower's simulation engine (Ray) runs the same ServerApp/ClientApp a real deployment runs.

    python samples/fleet_digits.py                      # 12 phones, 20 rounds of 30 steps: ~1-2 min on 2 cores
    python samples/fleet_digits.py --rounds 5 --json
    python samples/fleet_digits.py --dp-clip-norm 2 --dp-noise-multiplier 0.5   # with central DP
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from edgepeft.fleet import (  # noqa: E402
    DPConfig,
    FleetConfig,
    PartitionConfig,
    SimulationConfig,
    simulate_fleet,
)
from edgepeft.fleet.simulate import export_digits_base  # noqa: E402


def _pct(value: float | None) -> str:
    return "  —  " if value is None else f"{100 * value:5.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--personalize-steps", type=int, default=30)
    parser.add_argument("--dp-clip-norm", type=float, default=None)
    parser.add_argument("--dp-noise-multiplier", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="Work directory (default: a temp dir).")
    parser.add_argument("--json", action="store_true", help="Print the whole report as JSON.")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fleet-digits-"))

    # --- host (torch): the shared base ---------------------------------------------------------------------------
    partition = PartitionConfig(num_clients=args.clients)
    bundle = export_digits_base(out / "bundle", partition)

    # --- fleet (Flower; the clients run device_runtime only) ---------------------------------------------------------
    dp = DPConfig(args.dp_clip_norm, args.dp_noise_multiplier) if args.dp_clip_norm else None
    config = SimulationConfig(fleet=FleetConfig(rounds=args.rounds, local_steps=args.local_steps,
                                                personalize_steps=args.personalize_steps, dp=dp),
                              partition=partition)
    report = simulate_fleet(bundle, config, out / "work")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return

    print(f"{'phone':>5}  {'style':<10}  {'base':>6}  {'alone':>6}  {'global':>6}  {'personal':>8}   "
          "(accuracy on the phone's own held-out digits)")
    for c in report.clients:
        print(f"{c.client_id:>5}  {c.style:<10}  {_pct(c.base_accuracy)}  {_pct(c.local_accuracy)}  "
              f"{_pct(c.global_accuracy)}  {_pct(c.personal_accuracy):>8}")
    own, fleet, b = report.own_accuracy, report.fleet_accuracy, report.bytes
    print(f"{'mean':>5}  {'':<10}  {_pct(own['base'])}  {_pct(own['local'])}  {_pct(own['global'])}  "
          f"{_pct(own['personal']):>8}")
    print(f"\neveryone's held-out digits: federated adapter {_pct(fleet['global'])}; adapters trained alone "
          f"{_pct(fleet['local_mean'])} on average (best {_pct(fleet['local_max'])}); base {_pct(fleet['base'])}")
    print(f"per phone and round: {b['downlink_per_client_round']['median']:,.0f} B down, "
          f"{b['uplink_per_client_round']['median']:,.0f} B up (adapter tensors {b['tensor_bytes']:,} B, "
          f"adapter.safetensors {b['adapter_safetensors']:,} B, frozen base {b['frozen_base_bytes']:,} B stays home)")
    print(f"screening: {report.screening}; torch loaded on a phone: {report.torch_loaded_on_clients}")
    if report.dp:
        print(f"DP: clip {report.dp['clip_norm']:g}, noise multiplier {report.dp['noise_multiplier']:g}: epsilon "
              f"{report.dp['epsilon']:.2f} at delta {report.dp['delta']:g} after {report.dp['rounds']} rounds")
    print(f"federated part {report.seconds['federated']:.0f} s; everything is in {out}")


if __name__ == "__main__":
    main()
