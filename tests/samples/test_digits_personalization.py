"""The digits sample end to end in a subprocess: a real base, two real bundles, on-device personalization.

Small step counts keep it quick; the exports dominate the time. The margins are what the sample claims: the
user's accuracy rises by a real margin with both methods, and replay does not make forgetting worse.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "digits_personalization.py"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_digits_sample_personalizes_with_lora_and_bitfit(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SAMPLE), "--steps", "60", "--json", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    rows = {(r["method"], r["replay_share"]): r for r in summary["results"]}
    assert sorted(rows) == [("bitfit", 0.0), ("bitfit", 0.25), ("lora", 0.0), ("lora", 0.25)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bitfit", "lora"]  # the two exported bundles
    for (method, share), r in rows.items():
        assert r["base_before"] > 0.95  # the base model reads the base writers well ...
        assert r["user_before"] < 0.5  # ... and the user's handwriting badly
        assert r["user_after"] - r["user_before"] > 0.25, (method, share, r)  # personalization wins it back
        assert r["held_out_after"] > r["held_out_before"]
        assert r["steps_run"] <= 60 and r["stop_reason"] in ("completed", "early_stopping")
        assert r["examples"] == {"offered": 359, "buffered": 256, "train": 205, "held_out": 51,
                                 "replay": 863 if share else 0}
    assert rows[("lora", 0.0)]["trainable_params"] > 10 * rows[("bitfit", 0.0)]["trainable_params"]
    for method in ("lora", "bitfit"):
        assert rows[(method, 0.25)]["forgetting"] <= rows[(method, 0.0)]["forgetting"] + 0.02
