"""Personalize the packaged bundle on this device: verify the package, train on the user's .npz, save the adapter.

This file ships at the top of every package built by `edgepeft package` and runs on the device. It imports only
the standard library, numpy and the `device_runtime` copy that ships beside it (which needs onnxruntime and
safetensors from requirements.txt): no torch, no edgepeft.

    python3 run_personalization.py --data user.npz [--eval-data held_out.npz] [--steps 100] [--batch-size 32]
        [--lr 1e-3] [--checkpoint-dir ckpt] [--resume] [--adapter-out adapter] [--threads 4] [--json]

The .npz holds one array per bundle input plus the labels (see bundle/manifest.json). Exit codes: 0 ok, 2 usage,
3 package or bundle rejected, 4 data rejected. Times are wall-clock on the machine that runs this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE_MANIFEST = "package.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_package(root: Path) -> dict:
    """Check every file package.json lists (size and sha256); return the package manifest."""
    manifest_path = root / PACKAGE_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(_fail(f"{manifest_path}: unreadable ({exc}); copy the package again", 3))
    for name, entry in manifest.get("files", {}).items():
        path = root / name
        if not path.is_file() or path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise SystemExit(_fail(f"{path}: missing or changed since packaging (size/sha256 differ from "
                                   f"{PACKAGE_MANIFEST}); copy the package again", 3))
    return manifest


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _peak_rss_bytes() -> int | None:
    """VmHWM of this process (Linux); under user-mode emulation it includes the emulator's own memory."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _load_npz(path: str) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise SystemExit(_fail(f"cannot read {path}: {exc}; pass an .npz written by numpy.savez", 4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help=".npz with one array per bundle input plus the labels")
    parser.add_argument("--eval-data", help="held-out .npz to evaluate before and after")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the bundle's)")
    parser.add_argument("--checkpoint-dir", help="where to save the checkpoint (atomic)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument("--adapter-out", help="write adapter.safetensors + adapter_config.json here")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")

    package = verify_package(HERE)
    sys.path.insert(0, str(HERE))  # the device_runtime shipped in this package, whatever else is installed
    from device_runtime import Trainer
    from device_runtime.errors import BatchError, RuntimeErrorBase
    from device_runtime.loop import LoopConfig, personalize

    started = time.perf_counter()
    try:
        trainer = Trainer.open(HERE / "bundle", checkpoint=args.checkpoint_dir if args.resume else None,
                               threads=args.threads)
        config = LoopConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            checkpoint_dir=args.checkpoint_dir)
        evaluation = _load_npz(args.eval_data) if args.eval_data else None
        report = personalize(trainer, _load_npz(args.data), config, evaluation=evaluation)
        if args.adapter_out:
            trainer.export_adapter(args.adapter_out)
    except BatchError as exc:
        return _fail(str(exc), 4)
    except (RuntimeErrorBase, ValueError) as exc:
        return _fail(str(exc), 3)
    import numpy
    import onnxruntime

    result = {
        "target": package.get("target", {}).get("id"), "bundle_id": trainer.bundle.bundle_id,
        "steps": len(report.losses), "step_count": trainer.step_count,
        "first_loss": report.losses[0] if report.losses else None,
        "last_loss": report.losses[-1] if report.losses else None, "losses": report.losses,
        "before": report.before, "after": report.after,
        "train_seconds": report.seconds, "total_seconds": time.perf_counter() - started,
        "peak_rss_bytes": _peak_rss_bytes(), "machine": __import__("platform").machine(),
        "python": sys.version.split()[0], "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['steps']} steps on {result['machine']} in {report.seconds:.2f} s; loss "
              f"{result['first_loss']:.4f} -> {result['last_loss']:.4f}; peak RSS "
              f"{(result['peak_rss_bytes'] or 0) / 2**20:.1f} MB")
        if report.before is not None:
            print(f"held-out before: {report.before}\nheld-out after:  {report.after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
