"""onnxruntime sessions for a bundle's graphs: create one, check it against the graph contract, run it bound.

Sessions are created from the graph's file path (not from bytes) so onnxruntime resolves the frozen weights in
`weights.bin` as external data next to the graph, mapping them instead of copying them through Python. The
interface check turns an exporter/runtime disagreement into one clear error at open time instead of a
cryptic failure at the first step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from .bundle import Bundle
from .errors import BundleError, RuntimeOptionError
from .frozen_weights import FrozenWeights
from .graph_contract import graph_interface

__all__ = ["create_session", "run_bound"]

_PROVIDERS = ["CPUExecutionProvider"]


def _check_interface(session: ort.InferenceSession, bundle: Bundle, graph: str) -> None:
    """Names must be exactly the contract's; types must match the manifest's dtypes."""
    path = bundle.graph_path(graph)
    want = graph_interface(bundle, graph)
    for kind, args, expected in (
        ("inputs", session.get_inputs(), want.inputs),
        ("outputs", session.get_outputs(), want.outputs),
    ):
        got = {a.name: a.type for a in args}
        missing = [n for n in expected if n not in got]
        extra = [n for n in got if n not in expected]
        if missing or extra:
            raise BundleError(
                f"{path}: the {graph} graph's {kind} break the graph contract (missing {missing}, unexpected "
                f"{extra}); the graph and manifest.json disagree, re-export the bundle with a matching exporter"
            )
        wrong = [f"{n} is {got[n]} but should be {t}" for n, t in expected.items() if got[n] != t]
        if wrong:
            raise BundleError(f"{path}: the {graph} graph's {kind} have the wrong types ({'; '.join(wrong)}); "
                              "re-export the bundle")


_ARENA_REGISTERED: bool | None = None  # None: not tried yet in this process


def _shared_arena() -> bool:
    """Register, once per process, the CPU arena our sessions share; False if onnxruntime refuses.

    Measured on MiniLM (batch 8 x 64, benchmarks/minilm_step.py): a session's own arena grows by doubling chunks
    (kNextPowerOfTwo), so a train step's last big request can leave up to half a chunk unused; an arena that grows
    by exactly what is asked (kSameAsRequested) peaked 7-16 MB lower (int8 + recompute 153 -> 146 MB, fp32
    320 -> 304 MB) at the same step time. onnxruntime sets that strategy only on an allocator registered with its
    process-wide environment, which sessions then opt into; the train, eval and infer sessions of a trainer thus
    also recycle one another's freed blocks instead of each keeping its own.
    """
    global _ARENA_REGISTERED
    if _ARENA_REGISTERED is None:
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        config = ort.OrtArenaCfg({"arena_extend_strategy": 1})  # 1 = kSameAsRequested
        try:
            ort.create_and_register_allocator(memory, config)
            _ARENA_REGISTERED = True
        except Exception:  # the application registered its own already, or unsupported: sessions keep their own arenas
            _ARENA_REGISTERED = False
    return _ARENA_REGISTERED


def create_session(
    bundle: Bundle,
    graph: str,
    threads: int | None = None,
    frozen: FrozenWeights | None = None,
    prepack: bool = True,
    arena: bool = True,
) -> ort.InferenceSession:
    """Open one graph of the bundle on the CPU provider and check its interface.

    `threads` sets onnxruntime's intra-op thread count; None keeps its default (one per physical core). `frozen`
    shares one read-only mapping of weights.bin between sessions; `prepack=False` stops onnxruntime from making
    private pre-packed copies of weights (less memory, slower matmuls). With the arena on (the default) the sessions
    share one process-wide arena that grows by what is requested (see `_shared_arena`). `arena=False` returns freed
    activations to malloc instead of onnxruntime's arena: with glibc that fragments and measured a higher peak
    (MiniLM int8: 330 vs 193 MB), so it is for allocators that give memory back, or for checking the arena's own
    overhead.

    A quantized bundle is opened with constant folding off: its backward dequantizes frozen codes with plain ops
    whose inputs are all initializers, and folding would precompute every fp32 weight at load (measured: int4
    base, +193 MB at open instead of +35 MB), undoing the quantization in memory.
    """
    path = bundle.graph_path(graph)
    options = ort.SessionOptions()
    # Errors only: with constant folding off, onnxruntime warns about every initializer its other passes leave
    # unused (dozens per quantized graph); nothing the user can act on, and errors still raise.
    options.log_severity_level = 3
    if frozen is not None:
        frozen.add_to(options)
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    # Measured on MiniLM int8 (batch 8 x 64, benchmarks/minilm_step.py): onnxruntime's memory pattern (one block
    # laid out for the whole run, next to the arena) added ~100 MB of peak RSS for no speed, and its planner's
    # buffer reuse (a tensor takes over a dead tensor's buffer, chaining their lifetimes) ~30 MB more than letting
    # the arena recycle freed blocks; a train step's saved activations make those chains long. Neither is faster.
    # Without the arena the planner's reuse is the only recycling (glibc malloc alone fragments: +130 MB).
    options.enable_mem_pattern = False
    if arena:
        options.enable_mem_reuse = False
        if _shared_arena():
            options.add_session_config_entry("session.use_env_allocators", "1")
    else:
        options.enable_cpu_mem_arena = False
    disabled = ["ConstantFolding"] if bundle.manifest.get("quantization") else None
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise RuntimeOptionError(
                f"threads must be an int >= 1 or None, got {threads!r}; try the number of big cores"
            )
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=_PROVIDERS,
                                       disabled_optimizers=disabled)
    except Exception as exc:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, NoSuchFile, ...)
        raise BundleError(f"{path}: onnxruntime cannot load the {graph} graph ({exc}); the graph or weights.bin "
                          "is damaged or needs a newer onnxruntime, re-export or copy the bundle again") from exc
    _check_interface(session, bundle, graph)
    return session


def run_bound(
    session: ort.InferenceSession,
    graph: str,
    arrays: Mapping[str, np.ndarray],
    values: Mapping[str, ort.OrtValue],
    outputs: Sequence[str],
) -> list[ort.OrtValue]:
    """Run with io_binding: numpy `arrays` and resident `values` in, ORT-allocated CPU OrtValues out.

    Binding keeps tensors that live across calls (trainable, optimizer state) as OrtValues, so a step neither
    copies them into numpy nor back. Outputs come back in the order of `outputs`.
    """
    binding = session.io_binding()
    for name, array in arrays.items():
        binding.bind_cpu_input(name, array)
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name, "cpu")
    try:
        session.run_with_iobinding(binding)
    except Exception as exc:  # onnxruntime's pybind error types carry the node that failed
        raise BundleError(f"onnxruntime failed running the {graph} graph ({exc}); the batch passed validation "
                          "against manifest.json, so the graph and manifest disagree: re-export the bundle") from exc
    return binding.get_outputs()
