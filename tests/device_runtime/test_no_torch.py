"""The runtime works where torch, onnx and the host packages cannot be imported (as on a device).

A subprocess installs an import hook that makes `torch`, `edgepeft`, `exporters` and `onnx` raise ImportError,
then trains, evaluates, predicts, checkpoints and resumes on a handmade bundle. Its numbers must equal an
in-process run, so the hook cannot be passing because something was silently skipped.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ..import_blocker import blocking_prelude
from .handmade_bundle import Handmade, make_batch

from device_runtime import Trainer

REPO = Path(__file__).resolve().parents[2]
# tokenizers (HF's Rust tokenizer, no torch) is the one optional extra: only device_runtime/tokenizer.py imports it,
# for on-device text tokenization; nothing else in the runtime needs it.
ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "safetensors", "tokenizers"}
# The ExecuTorch backend is the documented exception: ExecuTorch's Python bindings link libtorch and exchange
# torch.Tensors, so that one module imports torch and executorch, lazily, when an ExecuTorch trainer is opened.
ALLOWED_PER_FILE = {"executorch_backend.py": {"torch", "executorch"}}

SCRIPT = blocking_prelude("the device runtime") + r"""
sys.path.insert(0, sys.argv[1])
bundle_dir, work, batches_file = sys.argv[2], sys.argv[3], sys.argv[4]

import numpy as np
import device_runtime
from device_runtime import Trainer

data = np.load(batches_file)
batches = [{"x": data[f"x{i}"], "labels": data[f"labels{i}"]} for i in range(4)]
tr = Trainer.open(bundle_dir, threads=1)
losses = [tr.step(b) for b in batches[:2]]
tr.save_checkpoint(work + "/ck")
losses += [tr.step(b) for b in batches[2:]]
resumed = Trainer.open(bundle_dir, checkpoint=work + "/ck", threads=1)
resumed_losses = [resumed.step(b) for b in batches[2:]]
metrics = tr.evaluate(batches)
logits = tr.predict({"x": batches[0]["x"]})
tr.export_adapter(work + "/adapter")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"losses": losses, "resumed": resumed_losses, "metrics": metrics,
                  "logits": logits.tolist(), "loaded": loaded, "attempts": attempts}))
"""


def test_runtime_runs_without_torch_onnx_or_host_packages(tmp_path: Path, adamw_bundle: Handmade) -> None:
    rng = np.random.default_rng(30)
    batches = [make_batch(rng, n=4) for _ in range(4)]
    arrays = {f"{k}{i}": v for i, b in enumerate(batches) for k, v in b.items()}
    np.savez(tmp_path / "batches.npz", **arrays)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO), str(adamw_bundle.bundle.path), str(tmp_path),
         str(tmp_path / "batches.npz")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []

    reference = Trainer.open(adamw_bundle.bundle.path, threads=1)
    expected = [reference.step(b) for b in batches]
    assert result["losses"] == pytest.approx(expected, rel=1e-6)
    assert result["resumed"] == result["losses"][2:]
    assert result["metrics"] == pytest.approx(reference.evaluate(batches), rel=1e-6)
    np.testing.assert_allclose(result["logits"], reference.predict({"x": batches[0]["x"]}), rtol=1e-6)
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()


def test_runtime_sources_import_only_allowed_packages() -> None:
    """Static twin of the subprocess test: catches an import on a code path the run above does not reach."""
    offenders = []
    for source in sorted((REPO / "device_runtime").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                allowed = ALLOWED_THIRD_PARTY | ALLOWED_PER_FILE.get(source.name, set())
                if top not in sys.stdlib_module_names and top not in allowed:
                    offenders.append(f"{source.name}: import {name}")
    assert offenders == []
