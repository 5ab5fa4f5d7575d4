"""`edgepeft train`: the device loop's options on the command line, JSON output and meaningful exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepeft.cli import main

from ..device_runtime.handmade_bundle import Handmade, build_bundle
from ..device_runtime.handmade_bundle import teacher_task as task


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Handmade, Path]:
    root = tmp_path_factory.mktemp("cli-train")
    from device_runtime import AdamW

    hm = build_bundle(root / "bundle", AdamW(lr=0.05))
    np.savez(root / "user.npz", **task(hm, 120, 1))
    np.savez(root / "test.npz", **task(hm, 60, 2))
    np.savez(root / "base.npz", **task(hm, 80, 3))
    np.savez(root / "wrong.npz", **task(hm, 120, 4, wrong=True))
    np.save(root / "plain.npy", np.zeros(3))
    np.savez(root / "nan.npz", **{**task(hm, 10, 5), "x": np.full((10, 4), np.nan, np.float32)})
    return hm, root


def run(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["train", *args])
    return result.exit_code, result.stdout, result.stderr


def test_train_with_every_loop_option(setup: tuple[Handmade, Path]) -> None:
    hm, root = setup
    code, out, err = run([str(hm.bundle.path), "--data", str(root / "user.npz"), "--holdout", "0.25", "--steps", "40",
                          "--batch-size", "16", "--warmup", "4", "--eval-every", "10", "--patience", "2",
                          "--buffer-size", "100", "--buffer-policy", "fifo", "--replay-data", str(root / "base.npz"),
                          "--replay-share", "0.25", "--memory-budget-mb", "100000", "--checkpoint-dir",
                          str(root / "ck"), "--checkpoint-every", "20", "--adapter-out", str(root / "adapter"),
                          "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["examples"] == {"offered": 120, "buffered": 100, "train": 75, "held_out": 25, "replay": 80}
    assert result["steps_run"] <= 40 and result["stop_reason"] in ("completed", "early_stopping")
    assert result["after"]["loss"] < result["before"]["loss"]
    assert [e["step"] for e in result["evaluations"]] == [10, 20, 30][: len(result["evaluations"])]
    assert result["checkpoints"][-1] == result["step_count"]
    assert (root / "ck" / "checkpoint.safetensors").is_file() and (root / "adapter" / "adapter.safetensors").is_file()
    assert result["memory"]["rss_mb"] > 0


def test_quality_guard_flag(setup: tuple[Handmade, Path]) -> None:
    hm, root = setup
    common = [str(hm.bundle.path), "--data", str(root / "wrong.npz"), "--eval-data", str(root / "test.npz"),
              "--steps", "30", "--json"]
    guarded = json.loads(run(common)[1])
    assert (guarded["kept"], guarded["step_count"], guarded["after"]) == ("previous", 0, guarded["before"])
    unguarded = json.loads(run([*common, "--no-quality-guard"])[1])
    assert (unguarded["kept"], unguarded["step_count"]) == ("final", 30)
    assert unguarded["after"]["loss"] > unguarded["before"]["loss"]
    code, out, err = run(common[:-1])  # the human-readable summary says what happened
    assert code == 0 and "kept the previous adapter" in out


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--memory-budget-mb", "1"], 7, "over the 1 MB budget"),
        (["--min-available-mb", "1e12"], 7, "under the 1e+12 MB floor"),
        (["--patience", "2"], 6, "patience needs held-out data"),
        (["--replay-share", "0.5"], 6, "replay_share needs replay data"),
        (["--holdout", "1.5"], 6, r"holdout_fraction must be a number in [0, 1)"),
        (["--buffer-size", "0"], 6, "buffer_size must be an int >= 1"),
        (["--warmup", "500"], 6, "warmup_steps must be an int in [0, total_steps=100]"),
        (["--eval-data", "plain.npy"], 4, "holds a single array (.npy), not named arrays"),
        (["--replay-data", "nan.npz"], 4, "replay data: input 'x' holds NaN or Inf"),
    ],
)
def test_refusals_have_meaningful_exit_codes(setup: tuple[Handmade, Path], extra: list[str], code: int,
                                             message: str) -> None:
    hm, root = setup
    extra = [str(root / e) if e.endswith((".npy", ".npz")) else e for e in extra]
    got, out, err = run([str(hm.bundle.path), "--data", str(root / "user.npz"), *extra])
    assert got == code, err
    assert message in " ".join(err.split())  # rich wraps long lines
    assert "Traceback" not in err and out == ""


def test_resume_continues_the_step_count(setup: tuple[Handmade, Path], tmp_path: Path) -> None:
    hm, root = setup
    args = [str(hm.bundle.path), "--data", str(root / "user.npz"), "--steps", "5", "--checkpoint-dir",
            str(tmp_path / "ck"), "--json"]
    assert json.loads(run(args)[1])["step_count"] == 5
    assert json.loads(run([*args, "--resume"])[1])["step_count"] == 10
