"""Measure a bundle in a fresh process that can import only the device runtime (run this file as a script).

    python device_child.py measure RUNTIME_ROOT BUNDLE '{"batch_size": 32, "seq_len": 64, "warmup": 5, "steps": 30}'
    python device_child.py ops     RUNTIME_ROOT BUNDLE '{...same...}'

It is run by path, never imported from `edgepeft`, so the process holds what a device would: the interpreter,
numpy, onnxruntime, safetensors and `device_runtime` (found under RUNTIME_ROOT). An import hook makes torch, onnx
and the host packages raise, and the result lists any that were loaded anyway (it must be empty).

`measure` runs the Trainer exactly as a device does and reads memory at each stage:
  rss_start         VmRSS when the script starts (the bare interpreter)
  rss_imports       after importing numpy + device_runtime (onnxruntime, safetensors): the runtime baseline
  rss_train_session after Trainer.open (bundle verified, adapter read, train-step session created)
  rss_after_train   after the warm-up and timed train steps
  rss_infer_session after the first predict (creates the inference session)
  peak_rss          VmHWM at the end: the high-water mark of the whole process since exec
Times are per call, wall clock, after `warmup` untimed calls. `ops` is a separate process because onnxruntime's
profiler allocates and so would move the peak: it profiles the train-step and infer graphs node by node.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
import tempfile
import time

BLOCKED = ("torch", "edgepeft", "exporters", "onnx")
MARKER = "EDGEPEFT_PROFILE "


class _BlockHostPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the device runtime must not need it")
        return None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _peak_rss() -> tuple[int, str]:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "VmHWM"
    import resource  # no procfs (macOS): ru_maxrss is bytes there, KiB on Linux

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (maxrss if sys.platform == "darwin" else maxrss * 1024), "ru_maxrss"


def _dims(shape, batch_size: int, seq_len: int) -> list[int]:
    """Symbolic 'batch' becomes the batch size; every other symbolic dim (seq, ...) the sequence length."""
    return [d if isinstance(d, int) else (batch_size if d == "batch" else seq_len) for d in shape]


def make_batch(bundle, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """A seeded synthetic batch that passes validation: floats ~N(0,1), masks all ones, other ints 0, valid labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batch = {}
    for spec in bundle.inputs:
        shape = _dims(spec.shape, batch_size, seq_len)
        if spec.numpy_dtype.kind == "f":
            batch[spec.name] = rng.standard_normal(shape).astype(spec.numpy_dtype)
        elif "mask" in spec.name:
            batch[spec.name] = np.ones(shape, spec.numpy_dtype)
        else:  # token ids: the manifest does not record the vocabulary size, and id 0 is always valid
            batch[spec.name] = np.zeros(shape, spec.numpy_dtype)
    labels = bundle.labels
    shape = _dims(labels.shape, batch_size, seq_len)
    if bundle.loss["name"] == "cross_entropy":
        batch[labels.name] = rng.integers(0, bundle.loss["num_classes"], shape).astype(labels.numpy_dtype)
    else:
        batch[labels.name] = rng.standard_normal(shape).astype(labels.numpy_dtype)
    return batch


def _timed(fn, warmup: int, steps: int) -> tuple[list, list[float]]:
    results, seconds = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        results.append(fn())
        elapsed = time.perf_counter() - start
        if i >= warmup:
            seconds.append(elapsed)
    return results, seconds


def measure(bundle_dir: str, options: dict) -> dict:
    rss_start = _rss()
    import numpy  # noqa: F401 - part of the baseline being measured

    from device_runtime import Trainer

    rss_imports = _rss()
    started = time.perf_counter()
    trainer = Trainer.open(bundle_dir, threads=options.get("threads"))
    open_seconds = time.perf_counter() - started
    rss_train_session = _rss()
    batch = make_batch(trainer.bundle, options["batch_size"], options["seq_len"])
    losses, train_seconds = _timed(lambda: trainer.step(batch), options["warmup"], options["steps"])
    rss_after_train = _rss()
    inputs = {spec.name: batch[spec.name] for spec in trainer.bundle.inputs}
    trainer.predict(inputs)
    rss_infer_session = _rss()
    _, infer_seconds = _timed(lambda: trainer.predict(inputs), options["warmup"], options["steps"])
    peak, peak_source = _peak_rss()
    return {
        "rss_start": rss_start, "rss_imports": rss_imports, "rss_train_session": rss_train_session,
        "rss_after_train": rss_after_train, "rss_infer_session": rss_infer_session, "rss_end": _rss(),
        "peak_rss": peak, "peak_rss_source": peak_source, "open_seconds": open_seconds,
        "train_step_seconds": train_seconds, "infer_seconds": infer_seconds,
        "losses": [float(v) for v in losses],
    }


def _feeds(trainer, graph: str, batch: dict) -> dict:
    """The graph's inputs by the graph contract, from the trainer's current tensors."""
    import numpy as np

    from device_runtime.graph_contract import LR, STATE, STEP, TRAINABLE

    bundle = trainer.bundle
    feeds = {spec.name: batch[spec.name] for spec in bundle.inputs}
    feeds.update({TRAINABLE + name: value for name, value in trainer.trainable_state().items()})
    if graph != "infer":
        feeds[bundle.labels.name] = batch[bundle.labels.name]
    if graph == "train_step":
        feeds.update({STATE + name: value for name, value in trainer.optimizer_state().items()})
        feeds[STEP] = np.array(1.0, np.float32)
        feeds[LR] = np.array(bundle.optimizer.lr, np.float32)
    return feeds


def _parse_profile(path: str, warmup: int) -> dict:
    """Per-node kernel time from onnxruntime's profile: the median over the timed runs, in microseconds.

    The median, not the mean: with the profiler on, a run now and then stalls for tens of ms (the profiler's own
    bookkeeping), and a mean would smear that stall over every node. The allocator figures onnxruntime attaches to
    each node event give the session's arena: `mem_in_use_peak` is the most the planner had in use at once.
    """
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")
    timed = runs[warmup:]
    nodes: dict[str, dict] = {}
    arena_in_use_peak = arena_held = 0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        arena_in_use_peak = max(arena_in_use_peak, int(args.get("mem_in_use_peak", 0)))
        arena_held = max(arena_held, int(args.get("mem_arena_held", 0)))
        if not any(lo <= event["ts"] <= hi for lo, hi in timed):
            continue
        name = event["name"][: -len("_kernel_time")]
        entry = nodes.setdefault(name, {"node": name, "op_type": args.get("op_name", "?"),
                                        "provider": args.get("provider", "?"), "durations": []})
        entry["durations"].append(float(event["dur"]))
    for entry in nodes.values():
        durations = sorted(entry.pop("durations"))
        entry["us_per_run"] = durations[len(durations) // 2]
    run_us = sorted(hi - lo for lo, hi in timed)
    return {"runs": len(timed), "nodes": sorted(nodes.values(), key=lambda e: -e["us_per_run"]),
            "model_run_us_median": run_us[len(run_us) // 2] if run_us else None,
            "arena_in_use_peak_bytes": arena_in_use_peak, "arena_held_bytes": arena_held}


def _gemm_gflops(threads) -> dict:
    """Measured fp32 GEMM throughput of onnxruntime's MatMul here: the denominator of the host compute floor."""
    import numpy as np
    import onnxruntime as ort

    n = 512
    # A one-node MatMul model, serialized by hand: onnx itself is not available in this process.
    model = _one_matmul_model(n)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    _, seconds = _timed(lambda: session.run(None, {"A": a, "B": a}), 3, 20)
    best = min(seconds)
    return {"n": n, "gflops": 2 * n**3 / best / 1e9, "best_seconds": best}


def _one_matmul_model(n: int) -> bytes:
    """ModelProto bytes for Y = A @ B with A, B float [n, n] (protobuf wire format, opset 13, IR 7)."""

    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                return bytes(out)

    def field(number: int, payload: bytes) -> bytes:  # length-delimited
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    def int_field(number: int, value: int) -> bytes:
        return varint(number << 3) + varint(value)

    def value_info(name: str) -> bytes:
        dim = field(1, int_field(1, n))  # TensorShapeProto.dim { dim_value }
        tensor = int_field(1, 1) + field(2, dim + dim)  # elem_type FLOAT, shape
        return field(1, name.encode()) + field(2, field(1, tensor))  # name, type { tensor_type }

    node = field(1, b"A") + field(1, b"B") + field(2, b"Y") + field(4, b"MatMul")
    graph = field(1, node) + field(2, b"g") + field(11, value_info("A")) + field(11, value_info("B"))
    graph += field(12, value_info("Y"))
    return int_field(1, 7) + field(7, graph) + field(8, int_field(2, 13))


def ops(bundle_dir: str, options: dict) -> dict:
    import onnxruntime as ort

    from device_runtime import Trainer

    trainer = Trainer.open(bundle_dir, threads=options.get("threads"))
    batch = make_batch(trainer.bundle, options["batch_size"], options["seq_len"])
    result = {"onnxruntime": ort.__version__, "gemm": _gemm_gflops(options.get("threads"))}
    with tempfile.TemporaryDirectory(prefix="edgepeft-ortprof-") as tmp:
        for graph in ("train_step", "infer"):
            so = ort.SessionOptions()
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, graph)
            if options.get("threads"):
                so.intra_op_num_threads = options["threads"]
            session = ort.InferenceSession(str(trainer.bundle.graph_path(graph)), so,
                                           providers=["CPUExecutionProvider"])
            feeds = _feeds(trainer, graph, batch)
            for _ in range(options["warmup"] + options["steps"]):
                session.run(None, feeds)
            result[graph] = _parse_profile(session.end_profiling(), options["warmup"])
    return result


def main(argv: list[str]) -> int:
    phase, runtime_root, bundle_dir, raw = argv[1:5]
    sys.meta_path.insert(0, _BlockHostPackages())
    sys.path.insert(0, runtime_root)
    options = json.loads(raw)
    result = measure(bundle_dir, options) if phase == "measure" else ops(bundle_dir, options)
    result["forbidden_modules_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    result["python"] = sys.version.split()[0]
    result["machine"] = os.uname().machine if hasattr(os, "uname") else sys.platform
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
