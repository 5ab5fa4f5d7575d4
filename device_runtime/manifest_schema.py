"""Schema check of a bundle's manifest.json (format v1): every key, type and cross-reference, no file access.

Kept apart from the file handling in `bundle.py` so that the writer can validate a manifest before it copies
hundreds of MB of graphs, and the reader can validate it before it hashes them. Messages name the manifest and
the key, and say what to do: a bad manifest is nearly always a bundle from another version or a hand edit.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import BundleError, BundleIntegrityError, BundleVersionError, OptimizerSpecError
from .optim_spec import OptimizerSpec, optimizer_from_manifest
from .tensor_spec import DTYPES, TensorSpec

__all__ = [
    "ADAPTER_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "LOSS_NAMES",
    "MANIFEST_FILE",
    "MANIFEST_SHA256",
    "ONNX_GRAPHS",
    "EXECUTORCH_GRAPHS",
    "RESERVED_INPUT_NAMES",
    "ParsedManifest",
    "check_file_name",
    "check_format_version",
    "check_manifest_sha256",
    "manifest_sha256",
    "parse_manifest",
]

FORMAT = "edgepeft-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# The manifest's own checksum: the files' hashes live in the manifest, so without this a flipped byte in the
# manifest itself (an lr, a label's ignore_index, a name) would go unnoticed.
MANIFEST_SHA256 = "manifest_sha256"
ADAPTER_FILE = "adapter.safetensors"
# Optional: the text tokenizer the model was exported with (Hugging Face tokenizer.json), manifest key "tokenizer".
TOKENIZER_FILE = "tokenizer.json"
LOSS_NAMES = ("cross_entropy", "mse", "custom")
ONNX_GRAPHS = ("train_step", "eval", "infer")
# An executorch bundle: train.pte (train / evaluate / predict / optimizer_step methods) and infer.pte (merged).
EXECUTORCH_GRAPHS = ("train", "infer")
# Graph input names the train step uses for itself; a model input with one of these names would be ambiguous.
RESERVED_INPUT_NAMES = ("step", "lr")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REEXPORT = "re-export the bundle with `edgepeft export`"


@dataclass(frozen=True)
class ParsedManifest:
    """The typed pieces of a valid manifest (what `Bundle` exposes besides path and id)."""

    inputs: tuple[TensorSpec, ...]
    labels: TensorSpec
    output: TensorSpec
    trainable: tuple[TensorSpec, ...]
    optimizer: OptimizerSpec
    optimizer_state: tuple[TensorSpec, ...]
    loss: dict[str, Any]
    graphs: dict[str, str]
    files: dict[str, dict[str, Any]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    """Small helpers that raise BundleError with the manifest's location in the message."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, problem: str, fix: str = _REEXPORT) -> BundleError:
        return BundleError(f"{self.where}: {problem}; {fix}")

    def get(self, obj: dict[str, Any], key: str, types: type | tuple[type, ...], path: str) -> Any:
        if key not in obj:
            raise self.fail(f"required key {path}{key!r} is missing")
        value = obj[key]
        ok = _is_int(value) if types is int else isinstance(value, types)
        if not ok:
            raise self.fail(f"{path}{key!r} must be {_type_names(types)}, got {type(value).__name__} {value!r}")
        return value

    def tensor(self, entry: Any, path: str, fixed: bool = False) -> TensorSpec:
        if not isinstance(entry, dict):
            raise self.fail(f"{path} must be an object with name, dtype and shape, got {type(entry).__name__}")
        name = self.get(entry, "name", str, f"{path}.")
        dtype = self.get(entry, "dtype", str, f"{path}.")
        shape = self.get(entry, "shape", list, f"{path}.")
        if not name:
            raise self.fail(f"{path}.name is empty")
        if dtype not in DTYPES:
            raise self.fail(f"{path} ({name!r}) has dtype {dtype!r}, known dtypes are {sorted(DTYPES)}")
        for dim in shape:
            if _is_int(dim) and dim >= 0:
                continue
            if isinstance(dim, str) and dim and not fixed:
                continue
            kind = "a non-negative int" if fixed else "a non-negative int or a non-empty symbol string"
            raise self.fail(f"{path} ({name!r}) has dimension {dim!r}; each dimension must be {kind}")
        return TensorSpec(name, dtype, tuple(shape))


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             type(None): "null"}
    seq = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in seq)


def check_file_name(name: str, error: type[Exception], where: str) -> None:
    """Refuse file names that could escape the bundle dir: absolute, `..`, `.`, backslashes, drive letters."""
    bad = (
        not name
        or name.startswith("/")
        or "\\" in name
        or ":" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
    )
    if bad:
        raise error(
            f"{where}: file name {name!r} is not a plain relative path inside the bundle "
            f"(absolute paths, '..', '.', empty parts, '\\' and ':' are refused); {_REEXPORT}"
        )


def check_format_version(manifest: dict[str, Any], where: str) -> None:
    """Check `format` and `format_version` first, so a future bundle gets a version error, not a schema error."""
    c = _Checker(where)
    fmt = c.get(manifest, "format", str, "")
    if fmt != FORMAT:
        raise c.fail(f"format is {fmt!r}, not {FORMAT!r}, so this is not an edgepeft bundle",
                     "pass the directory that `edgepeft export` wrote")
    version = c.get(manifest, "format_version", int, "")
    if version != FORMAT_VERSION:
        raise BundleVersionError(
            f"{where}: bundle format_version is {version}, this runtime reads format_version {FORMAT_VERSION}; "
            "re-export the bundle with the edgepeft release that matches this runtime, or upgrade the runtime"
        )


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest as canonical JSON (sorted keys, no whitespace, ASCII), without its own checksum.

    Canonical rather than raw bytes so that re-indenting the file does not matter but any change of a value does.
    """
    body = {k: v for k, v in manifest.items() if k != MANIFEST_SHA256}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def check_manifest_sha256(manifest: dict[str, Any], where: str) -> None:
    """Refuse a manifest whose content does not hash to its `manifest_sha256` (a byte changed after export)."""
    recorded = manifest.get(MANIFEST_SHA256)
    if not isinstance(recorded, str) or not _SHA256.match(recorded):
        raise BundleIntegrityError(
            f"{where}: {MANIFEST_SHA256} is missing or not a 64-hex sha256 ({recorded!r}), so the manifest cannot "
            f"be verified; it was damaged or written by an older exporter: {_REEXPORT}, or copy it again"
        )
    try:
        actual = manifest_sha256(manifest)
    except (TypeError, ValueError, RecursionError) as exc:  # e.g. NaN, which json.loads accepts but JSON lacks
        raise BundleIntegrityError(f"{where}: holds values that are not plain JSON ({exc}); the manifest is "
                                   f"damaged, copy the bundle again or {_REEXPORT}") from exc
    if actual != recorded:
        raise BundleIntegrityError(
            f"{where}: content hashes to {actual}, its {MANIFEST_SHA256} says {recorded} (the manifest changed "
            f"after export); copy the bundle to the device again, or {_REEXPORT}"
        )


def _parse_loss(c: _Checker, manifest: dict[str, Any], labels: TensorSpec, output: TensorSpec) -> dict[str, Any]:
    loss = c.get(manifest, "loss", dict, "")
    name = c.get(loss, "name", str, "loss.")
    if name not in LOSS_NAMES:
        raise c.fail(f"loss.name is {name!r}, this runtime knows {list(LOSS_NAMES)}")
    if name == "cross_entropy":
        c.get(loss, "ignore_index", int, "loss.")
        num_classes = c.get(loss, "num_classes", int, "loss.")
        if num_classes < 1:
            raise c.fail(f"loss.num_classes must be >= 1, got {num_classes}")
        if labels.dtype != "int64":
            raise c.fail(f"cross_entropy labels must be int64 class ids, the manifest declares {labels.dtype}")
        if output.shape and _is_int(output.shape[-1]) and output.shape[-1] != num_classes:
            raise c.fail(f"output's last dimension is {output.shape[-1]} but loss.num_classes is {num_classes}")
    elif name == "mse":
        if labels.dtype != "float32" or labels.shape != output.shape:
            raise c.fail(f"mse labels must be float32 shaped like the output {list(output.shape)}, "
                         f"the manifest declares {labels.dtype} {list(labels.shape)}")
    return dict(loss)


def _parse_optimizer(
    c: _Checker, manifest: dict[str, Any], trainable: tuple[TensorSpec, ...]
) -> tuple[OptimizerSpec, tuple[TensorSpec, ...]]:
    entry = c.get(manifest, "optimizer", dict, "")
    try:
        spec = optimizer_from_manifest(entry)
    except (OptimizerSpecError, TypeError) as exc:
        raise c.fail(f"optimizer entry is invalid ({exc})") from exc
    raw_state = c.get(entry, "state", list, "optimizer.")
    state = tuple(c.tensor(s, f"optimizer.state[{i}]", fixed=True) for i, s in enumerate(raw_state))
    by_param = {t.name: t for t in trainable}
    expected = spec.state_names([t.name for t in trainable])
    found = [s.name for s in state]
    if found != expected:
        raise c.fail(f"optimizer.state names {found} do not match what {spec.name} needs for the trainable "
                     f"tensors, in order: {expected}")
    for s in state:
        param = by_param[s.name.split("/", 1)[1]]
        if (s.dtype, s.shape) != (param.dtype, param.shape):
            raise c.fail(f"optimizer state {s.name!r} is {s.dtype} {list(s.shape)}, its parameter is "
                         f"{param.dtype} {list(param.shape)}")
    return spec, state


def _parse_files(c: _Checker, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    files = c.get(manifest, "files", dict, "")
    for name, entry in files.items():
        check_file_name(name, BundleError, c.where)
        if name == MANIFEST_FILE:
            raise c.fail("files lists manifest.json itself, which cannot hold its own hash")
        if not isinstance(entry, dict):
            raise c.fail(f"files[{name!r}] must be an object with size and sha256")
        size = c.get(entry, "size", int, f"files[{name!r}].")
        digest = c.get(entry, "sha256", str, f"files[{name!r}].")
        if size < 0 or not _SHA256.match(digest):
            raise c.fail(f"files[{name!r}] needs a size >= 0 and a lowercase 64-hex sha256, got {size}, {digest!r}")
    if ADAPTER_FILE not in files:
        raise c.fail(f"files does not list {ADAPTER_FILE}, the initial trainable tensors")
    return dict(files)


def _parse_graphs(c: _Checker, manifest: dict[str, Any], files: dict[str, Any]) -> dict[str, str]:
    graphs = c.get(manifest, "graphs", dict, "")
    if not graphs:
        raise c.fail("graphs is empty")
    for key, file_name in graphs.items():
        if not isinstance(file_name, str):
            raise c.fail(f"graphs[{key!r}] must be a file name string, got {file_name!r}")
        check_file_name(file_name, BundleError, c.where)
        if file_name not in files:
            raise c.fail(f"graph {key!r} refers to {file_name!r}, which files does not list (so it is not verified)")
    required = {"onnx": ONNX_GRAPHS, "executorch": EXECUTORCH_GRAPHS}.get(manifest["backend"], ())
    missing = [g for g in required if g not in graphs]
    if missing:
        raise c.fail(f"an {manifest['backend']} bundle needs graphs {list(required)}, missing {missing}")
    return dict(graphs)


def _parse_tokenizer(c: _Checker, manifest: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
    """The optional `tokenizer` entry: {"file": a listed file, "max_len": int >= 1 or absent}."""
    entry = manifest.get("tokenizer")
    if entry is None:
        return
    if not isinstance(entry, dict):
        raise c.fail(f"tokenizer must be an object with a file, got {type(entry).__name__}")
    name = c.get(entry, "file", str, "tokenizer.")
    if name not in files:
        raise c.fail(f"tokenizer.file {name!r} is not listed in files, so it cannot be verified")
    max_len = entry.get("max_len")
    if max_len is not None and not (_is_int(max_len) and max_len >= 1):
        raise c.fail(f"tokenizer.max_len must be an int >= 1, got {max_len!r}")


def parse_manifest(manifest: Any, where: str) -> ParsedManifest:
    """Validate a decoded manifest.json against format v1 and return its typed pieces.

    Unknown top-level keys are allowed (additions within v1 stay readable by older runtimes); anything the
    runtime relies on must be present with the right type.
    """
    c = _Checker(where)
    if not isinstance(manifest, dict):
        raise c.fail(f"the manifest must be a JSON object, got {type(manifest).__name__}")
    check_format_version(manifest, where)
    c.get(manifest, "created_by", str, "")
    model = c.get(manifest, "model", dict, "")
    c.get(model, "id", str, "model.")
    c.get(model, "source", str, "model.")
    for i, method in enumerate(c.get(manifest, "methods", list, "")):
        if not isinstance(method, dict):
            raise c.fail(f"methods[{i}] must be an object with name and config")
        c.get(method, "name", str, f"methods[{i}].")
        c.get(method, "config", dict, f"methods[{i}].")
    c.get(manifest, "quantization", (type(None), str, dict), "")
    c.get(manifest, "backend", str, "")
    c.get(manifest, "target", (type(None), str), "")

    raw_inputs = c.get(manifest, "inputs", list, "")
    if not raw_inputs:
        raise c.fail("inputs is empty; a model needs at least one input")
    inputs = tuple(c.tensor(e, f"inputs[{i}]") for i, e in enumerate(raw_inputs))
    labels = c.tensor(c.get(manifest, "labels", dict, ""), "labels")
    output = c.tensor(c.get(manifest, "output", dict, ""), "output")
    batch_names = [s.name for s in inputs] + [labels.name]
    if len(set(batch_names)) != len(batch_names):
        raise c.fail(f"input and label names must be unique, got {batch_names}")
    for name in batch_names:
        if name in RESERVED_INPUT_NAMES or "::" in name:
            raise c.fail(f"input name {name!r} collides with the graph contract (reserved: "
                         f"{list(RESERVED_INPUT_NAMES)} and names containing '::')",
                         "rename the model input and re-export")
    loss = _parse_loss(c, manifest, labels, output)

    raw_trainable = c.get(manifest, "trainable", list, "")
    if not raw_trainable:
        raise c.fail("trainable is empty; there is nothing to train")
    trainable = tuple(c.tensor(e, f"trainable[{i}]", fixed=True) for i, e in enumerate(raw_trainable))
    names = [t.name for t in trainable]
    if len(set(names)) != len(names):
        raise c.fail(f"trainable names must be unique, got {names}")
    for t in trainable:
        if t.dtype not in ("float32", "float16"):
            raise c.fail(f"trainable tensor {t.name!r} has dtype {t.dtype}; "
                         "trainable tensors must be float32 or float16")
    optimizer, state = _parse_optimizer(c, manifest, trainable)

    files = _parse_files(c, manifest)
    graphs = _parse_graphs(c, manifest, files)
    _parse_tokenizer(c, manifest, files)
    return ParsedManifest(inputs, labels, output, trainable, optimizer, state, loss, graphs, files)
