"""Crash safety: SIGKILL a training process at random moments while it checkpoints after every step.

After every kill the checkpoint must load, hold a step no older than the last one the child reported as saved
(and at most one newer: the save that was cut short may or may not have landed), never go backwards across
trials, and hold exactly the tensors an uninterrupted run has at that step. The next trial resumes from it. A
kill mid-save may leave the temp file of that save behind, never more than one, and never a torn checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from .crash_worker import batch_for
from .handmade_bundle import Handmade

from device_runtime import Trainer, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("crash_worker.py")
TRIALS = 20
TEMP = re.compile(r"^\.checkpoint\.safetensors\..+\.tmp$")


class Reference:
    """An uninterrupted run of the same batches, remembering the state after every step."""

    def __init__(self, bundle_dir: Path) -> None:
        self.trainer = Trainer.open(bundle_dir, threads=1)
        self.states = {0: (self.trainer.trainable_state(), self.trainer.optimizer_state())}

    def at(self, step: int) -> tuple[dict, dict]:
        while self.trainer.step_count < step:
            self.trainer.step(batch_for(self.trainer.step_count + 1))
            self.states[self.trainer.step_count] = (self.trainer.trainable_state(), self.trainer.optimizer_state())
        return self.states[step]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_while_checkpointing_never_loses_or_tears_a_checkpoint(tmp_path: Path,
                                                                      adamw_bundle: Handmade) -> None:
    bundle_dir, ckpt = adamw_bundle.bundle.path, tmp_path / "ckpt"
    reference = Reference(bundle_dir)
    delays = random.Random(8)
    last_step = progressed = 0
    for trial in range(TRIALS):
        with subprocess.Popen([sys.executable, str(WORKER), str(REPO), str(bundle_dir), str(ckpt)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path) as child:
            try:
                first = child.stdout.readline().strip()
                time.sleep(delays.uniform(0.0, 0.25))
            finally:  # never leave a child training forever, even when an assertion below fails
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=30)
            acknowledged = [int(line) for line in child.stdout.read().split()]
        assert first == f"start {last_step}"  # the child resumed from the last checkpoint
        assert child.returncode == -signal.SIGKILL
        assert acknowledged == list(range(last_step + 1, last_step + 1 + len(acknowledged)))

        names = sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else []
        temps = [n for n in names if TEMP.match(n)]
        assert set(names) - set(temps) <= {"checkpoint.safetensors"}
        assert len(temps) <= 1  # the killed save's temp file; the next save removes it
        if not (ckpt / "checkpoint.safetensors").exists():
            assert not acknowledged and last_step == 0  # killed before the first save finished
            continue
        step, trainable, state = load_checkpoint(ckpt, adamw_bundle.bundle)
        floor = acknowledged[-1] if acknowledged else last_step
        assert floor <= step <= floor + 1
        assert step >= last_step
        want_trainable, want_state = reference.at(step)
        for got, want in ((trainable, want_trainable), (state, want_state)):
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"trial {trial}, step {step}, {name}")
        progressed += step > last_step
        last_step = step

    assert last_step > TRIALS and progressed >= TRIALS // 2  # the runs really trained between kills
    resumed = Trainer.open(bundle_dir, checkpoint=ckpt, threads=1)
    resumed.step(batch_for(last_step + 1))
    want_trainable, _ = reference.at(last_step + 1)
    for name, value in resumed.trainable_state().items():
        np.testing.assert_array_equal(value, want_trainable[name])
