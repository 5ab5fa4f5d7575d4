"""Activation recomputation for an exported train step: trade one extra forward for most of the saved activations.

A train step keeps every forward tensor its backward reads alive from the forward until that read: for a 6-layer
MiniLM at batch 8 x seq 64 that is ~70 MB (GELU inputs, attention probabilities, Q/K/V per layer), the largest
part of a device's peak memory. This pass rewrites the ONNX graph the way gradient checkpointing does in PyTorch,
but after tracing, so it works for every model we export without touching its code:

- checkpoints are the forward outputs of `LayerNormalization` nodes (the residual stream between the attention and
  feed-forward blocks of every transformer family we export); the forward between two checkpoints is a segment;
- the backward's reads of a segment's tensors are redirected to a clone of the segment's nodes, computed again from
  its checkpoint, so the originals die inside the forward;
- each clone starts from `checkpoint + 0 * g`, where g is one element of a gradient produced right before the
  segment's backward. That data dependency is what keeps onnxruntime from running the clone early (its default
  order is a depth-first walk that would otherwise be free to do so) and from merging it back into the original by
  common-subexpression elimination. Adding +-0 leaves every finite value bit-identical, so parity with torch
  autograd is unchanged; a non-finite gradient makes the step non-finite, which the runtime rejects anyway.

The last two segments are not recomputed: their backward runs right after the loss, when their tensors are still
the live ones, so recomputing them would cost time and save nothing at the peak.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from .errors import ExportError
from .graph_rewrite import TrainStep, clone_node, gate_nodes, gate_tensor, reach, replace_nodes

__all__ = ["RecomputeReport", "recompute_segments", "CHECKPOINT_OP"]

CHECKPOINT_OP = "LayerNormalization"
_SUFFIX = "__recompute"


@dataclass(frozen=True)
class RecomputeReport:
    """What the pass did, for the manifest: segments recomputed and nodes cloned (the extra forward's size)."""

    checkpoints: int
    segments: int
    cloned_nodes: int
    forward_nodes: int

    def manifest_entry(self) -> dict[str, object]:
        return {"checkpoint_op": CHECKPOINT_OP, "checkpoints": self.checkpoints, "segments": self.segments,
                "cloned_nodes": self.cloned_nodes, "forward_nodes": self.forward_nodes}


def _segments(nodes: list[onnx.NodeProto], forward: set[int], chain: set[int], boundaries: list[int],
              producer: dict[str, int]) -> dict[int, int]:
    """Segment of every node outside the gradient chain: a forward node's by position (k = boundaries before it),
    anything else (aliases torch saves for the backward, shape arithmetic) the latest segment among its inputs."""
    segment_of: dict[int, int] = {}
    for index in range(len(nodes)):
        if index in chain:
            continue
        if index in forward:
            segment_of[index] = bisect.bisect_left(boundaries, index)  # boundaries before it
        else:
            segment_of[index] = max((segment_of.get(producer[n], 0) for n in nodes[index].input if n in producer),
                                    default=0)
    return segment_of


def _clone_nodes(nodes: list[onnx.NodeProto], members: list[int], origin: str, saved: list[str],
                 producer: dict[str, int]) -> set[int]:
    """The members that depend on the checkpoint and lead to a saved tensor: what has to run again."""
    depends: set[int] = set()
    for i in sorted(members):
        node = nodes[i]
        if node.op_type == "Constant" or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                             for a in node.attribute):
            continue
        if any(name == origin or producer.get(name) in depends for name in node.input):
            depends.add(i)
    return reach((producer[name] for name in saved if producer[name] in depends),
                  lambda i: (producer[n] for n in nodes[i].input if producer.get(n) in depends))


def recompute_segments(model: onnx.ModelProto, loss: str = "loss", keep_last: int = 2) -> RecomputeReport:
    """Rewrite `model` (a traced train step, in topological order) in place; see the module docstring.

    Raises ExportError when the graph has no LayerNormalization checkpoint (nothing to segment on: an MLP or a CNN
    has no residual stream this pass recognizes) or when the loss output is missing.
    """
    graph = model.graph
    step = TrainStep.index(graph, loss, "recompute")
    nodes, producer, consumers, forward = step.nodes, step.producer, step.consumers, step.forward
    boundaries = [i for i in sorted(forward) if nodes[i].op_type == CHECKPOINT_OP]
    if not boundaries:
        raise ExportError(
            "recompute=True needs LayerNormalization checkpoints (transformer blocks), and this model's forward has "
            "none; export without recompute (an MLP or a CNN keeps few activations anyway)"
        )
    checkpoints = [nodes[i].output[0] for i in boundaries]
    last_segment = len(boundaries)
    chain = step.gradient_chain(after=boundaries[-1])  # backward of the forward after the last checkpoint
    segment_of = _segments(nodes, forward, chain, boundaries, producer)
    members_of: dict[int, list[int]] = defaultdict(list)
    for index, segment in segment_of.items():
        members_of[segment].append(index)
    keep = set(checkpoints) | {o.name for o in graph.output}
    inserted: list[onnx.NodeProto] = []
    new_initializers: list[TensorProto] = []
    cloned = segments = 0
    for k in range(1, last_segment - keep_last + 1):
        origin = checkpoints[k - 1]
        members = members_of[k]
        saved = sorted({name for i in members for name in nodes[i].output
                        if name and name not in keep and any(c in chain for c in consumers.get(name, []))})
        needed = _clone_nodes(nodes, members, origin, saved, producer)
        redirected = [name for name in saved if producer[name] in needed]
        if not redirected:
            continue
        first_read = min(c for name in redirected for c in consumers[name] if c in chain)
        gate = gate_tensor(nodes, chain, first_read, producer)
        if gate is None:
            continue
        tag = f"recompute/segment{k}"
        gate_nodes_, constants, gated = gate_nodes(origin, gate, tag)
        new_initializers.extend(constants)
        rename = {origin: gated}
        clones = [clone_node(nodes[i], i, tag, rename, _SUFFIX) for i in sorted(needed)]
        for name in redirected:
            step.redirect(name, rename[name], chain.__contains__)
        inserted.extend([*gate_nodes_, *clones])
        cloned += len(clones)
        segments += 1
    graph.initializer.extend(new_initializers)
    replace_nodes(graph, nodes + inserted)
    return RecomputeReport(len(checkpoints), segments, cloned, len(forward))
