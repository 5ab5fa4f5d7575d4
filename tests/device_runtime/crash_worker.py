"""Child process for the crash-safety test: resume from the checkpoint if there is one, then step and checkpoint
forever, printing each step once its checkpoint is on disk. The parent SIGKILLs it at random moments.

Batches depend only on the step number, so the state at step k is the same however many crashes it took to get
there, and the parent can compare every surviving checkpoint with an uninterrupted reference run.
usage: python crash_worker.py REPO_ROOT BUNDLE_DIR CHECKPOINT_DIR
"""

import sys

import numpy as np


def batch_for(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"x": rng.normal(size=(6, 4)).astype(np.float32), "labels": rng.integers(0, 3, size=6).astype(np.int64)}


def main() -> None:
    repo, bundle, checkpoint = sys.argv[1:4]
    sys.path.insert(0, repo)
    from pathlib import Path

    from device_runtime import Trainer

    resume = checkpoint if (Path(checkpoint) / "checkpoint.safetensors").exists() else None
    trainer = Trainer.open(bundle, checkpoint=resume, threads=1)
    print(f"start {trainer.step_count}", flush=True)
    while True:
        trainer.step(batch_for(trainer.step_count + 1))
        trainer.save_checkpoint(checkpoint)
        print(trainer.step_count, flush=True)


if __name__ == "__main__":
    main()
