"""The package root: the public names, the re-exported optimizer specs, and no onnx / exporter import.

(onnxruntime may load: `device_runtime/__init__.py`, which the optimizer-spec re-export goes through, imports it.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import edgepeft
from device_runtime import optim_spec

ROOT = Path(__file__).resolve().parents[2]


def test_public_names():
    assert edgepeft.__version__ == "0.1.0"
    for name in edgepeft.__all__:
        assert hasattr(edgepeft, name), name
    assert edgepeft.SGD is optim_spec.SGD and edgepeft.AdamW is optim_spec.AdamW
    assert issubclass(edgepeft.ConfigError, edgepeft.EdgePeftError)
    assert issubclass(edgepeft.ModelError, edgepeft.EdgePeftError)


def test_import_does_not_load_onnx():
    code = "import sys, edgepeft; print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxscript', 'onnx_ir', 'exporters')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
