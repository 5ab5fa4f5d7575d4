"""The one reader and the one writer of the bundle format v1 (a directory of graphs, weights and manifest.json).

The exporters write bundles with `write_bundle` and the device reads them with `read_bundle`, so the format has
a single definition. Reading verifies what a flaky copy to a device can break (missing, truncated or flipped
files) before any graph runs: a corrupt bundle must fail with the file's name, not train garbage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .atomic_io import copy_and_hash, sha256_file, staged_dir, write_and_hash
from .errors import BundleError, BundleIntegrityError
from .manifest_schema import (
    ADAPTER_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MANIFEST_SHA256,
    TOKENIZER_FILE,
    ParsedManifest,
    check_file_name,
    check_format_version,
    check_manifest_sha256,
    manifest_sha256,
    parse_manifest,
)
from .optim_spec import OptimizerSpec
from .tensor_spec import TensorSpec

__all__ = ["ADAPTER_FILE", "FORMAT", "FORMAT_VERSION", "MANIFEST_FILE", "TOKENIZER_FILE", "Bundle", "read_bundle",
           "write_bundle"]

FileSource = Union[Path, str, bytes]
_RECOPY = "the bundle is damaged: copy it to the device again, or re-export it"


@dataclass(frozen=True)
class Bundle:
    """A validated bundle directory: the raw manifest plus its parsed pieces.

    `bundle_id` is the sha256 of the manifest.json bytes. The manifest lists every file's sha256, so the id
    pins the whole bundle; checkpoints and adapters record it to refuse being loaded into another bundle.
    """

    path: Path
    manifest: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    labels: TensorSpec
    output: TensorSpec
    trainable: tuple[TensorSpec, ...]
    optimizer: OptimizerSpec
    optimizer_state: tuple[TensorSpec, ...]
    loss: dict[str, Any]
    graphs: dict[str, str]
    bundle_id: str

    def graph_path(self, graph: str) -> Path:
        """Path of a graph file by its role (`train_step`, `eval`, `infer`)."""
        if graph not in self.graphs:
            raise BundleError(f"{self.path}: the bundle has no {graph!r} graph (it has {sorted(self.graphs)}); "
                              "re-export the bundle with that graph")
        return self.path / self.graphs[graph]

    @property
    def adapter_path(self) -> Path:
        """The initial trainable tensors (safetensors, keyed by parameter name)."""
        return self.path / ADAPTER_FILE

    @property
    def trainable_names(self) -> list[str]:
        return [t.name for t in self.trainable]

    @property
    def state_names(self) -> list[str]:
        return [s.name for s in self.optimizer_state]


def _make_bundle(path: Path, manifest: dict[str, Any], parsed: ParsedManifest, bundle_id: str) -> Bundle:
    return Bundle(
        path=path,
        manifest=manifest,
        inputs=parsed.inputs,
        labels=parsed.labels,
        output=parsed.output,
        trainable=parsed.trainable,
        optimizer=parsed.optimizer,
        optimizer_state=parsed.optimizer_state,
        loss=parsed.loss,
        graphs=parsed.graphs,
        bundle_id=bundle_id,
    )


def _verify_files(root: Path, files: dict[str, dict[str, Any]], verify: bool) -> None:
    """Every listed file exists with the listed size; with `verify`, also the listed sha256 (chunked read)."""
    for name, entry in files.items():
        file_path = root / name
        if not file_path.is_file():
            raise BundleIntegrityError(f"{file_path}: listed in {MANIFEST_FILE} but missing; {_RECOPY}")
        size = file_path.stat().st_size
        if size != entry["size"]:
            raise BundleIntegrityError(
                f"{file_path}: size is {size} bytes, {MANIFEST_FILE} says {entry['size']} (truncated or replaced); "
                f"{_RECOPY}"
            )
        if verify:
            _, digest = sha256_file(file_path)
            if digest != entry["sha256"]:
                raise BundleIntegrityError(
                    f"{file_path}: sha256 is {digest}, {MANIFEST_FILE} says {entry['sha256']} (its content changed); "
                    f"{_RECOPY}"
                )


def read_bundle(path: Union[str, Path], verify: bool = True) -> Bundle:
    """Read and validate a bundle directory.

    Always checks the format version, the manifest's own checksum, its schema, and that every listed file exists
    with its listed size. `verify=True` (the default) also checks every file's sha256; turn it off only when the bundle was
    verified earlier on the same storage, since hashing hundreds of MB takes seconds on a small device.
    """
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory; pass the bundle directory that `edgepeft export` wrote")
    if not manifest_path.is_file():
        raise BundleIntegrityError(f"{manifest_path}: missing, so {root} is not a bundle or is incomplete; {_RECOPY}")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or an int with
        # more digits than Python converts; RecursionError: arrays nested thousands deep
        raise BundleError(f"{manifest_path}: not valid UTF-8 JSON ({str(exc)[:200]}); {_RECOPY}") from exc
    if isinstance(manifest, dict):  # parse_manifest names anything else
        check_format_version(manifest, str(manifest_path))  # a future bundle gets a version error, not a hash error
        check_manifest_sha256(manifest, str(manifest_path))
    parsed = parse_manifest(manifest, str(manifest_path))
    _verify_files(root, parsed.files, verify)
    return _make_bundle(root, manifest, parsed, hashlib.sha256(raw).hexdigest())


def _encode_manifest(manifest: dict[str, Any], where: str) -> bytes:
    try:
        text = json.dumps(manifest, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: the manifest is not plain JSON ({exc}); use only dicts, lists, str, "
                          "finite numbers, bools and None") from exc
    return (text + "\n").encode("utf-8")


def write_bundle(
    out_dir: Union[str, Path], manifest_without_files: dict[str, Any], files: dict[str, FileSource]
) -> Bundle:
    """Write a bundle atomically: stage every file beside `out_dir`, add sizes and hashes, rename into place.

    `files` maps a bundle-relative name to a source path (copied) or bytes (written). The manifest is
    validated before anything is copied. If `out_dir` exists (and is an earlier bundle or empty) it is
    replaced only once the new bundle is complete, so `out_dir` never holds a half-written bundle.
    """
    out_dir = Path(out_dir)
    where = f"write_bundle({out_dir})"
    for computed in ("files", MANIFEST_SHA256):
        if computed in manifest_without_files:
            raise BundleError(f"{where}: the manifest already has a {computed!r} entry; leave it out, write_bundle "
                              "computes sizes and hashes itself")
    for name, source in files.items():
        check_file_name(name, BundleError, where)
        if name == MANIFEST_FILE:
            raise BundleError(f"{where}: {MANIFEST_FILE} is written by write_bundle; pass the manifest as a dict")
        if not isinstance(source, (bytes, str, Path)):
            raise BundleError(f"{where}: file {name!r} must be given as a path or bytes, got {type(source).__name__}")
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise BundleError(f"{where}: source file {source} for {name!r} does not exist; write it first")
    # A JSON round trip gives the manifest a private copy and refuses non-JSON values before any copying.
    manifest = json.loads(_encode_manifest(manifest_without_files, where))
    placeholder = {name: {"size": 0, "sha256": "0" * 64} for name in files}
    parse_manifest({**manifest, "files": placeholder}, where)

    with staged_dir(out_dir, marker=MANIFEST_FILE) as staged:
        listed: dict[str, dict[str, Any]] = {}
        for name, source in files.items():
            dst = staged / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                size, digest = write_and_hash(source, dst)
            else:
                size, digest = copy_and_hash(Path(source), dst)
            listed[name] = {"size": size, "sha256": digest}
        manifest["files"] = listed
        manifest[MANIFEST_SHA256] = manifest_sha256(manifest)
        raw = _encode_manifest(manifest, where)
        write_and_hash(raw, staged / MANIFEST_FILE)
        parsed = parse_manifest(manifest, where)
    return _make_bundle(out_dir, manifest, parsed, hashlib.sha256(raw).hexdigest())
