"""Shared tools of the train-step rewrites (`exporters.recompute`, `exporters.rematerialize`).

Both move forward work into the backward by cloning forward nodes. What they share: finding the gradient chain,
gating a clone on a gradient so onnxruntime runs it late, and putting the graph back in a stable topological order
without the nodes nothing reads any more.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

import onnx
from onnx import TensorProto, helper

from .errors import ExportError

__all__ = ["reach", "gradient_chain", "gate_tensor", "gate_nodes", "replace_nodes"]

_FLOAT = TensorProto.FLOAT


def reach(seeds: Iterable[int], neighbours: Callable[[int], Iterable[int]]) -> set[int]:
    """Every node reachable from `seeds` through `neighbours` (producers: upstream; readers: downstream)."""
    seen: set[int] = set()
    stack = list(seeds)
    while stack:
        index = stack.pop()
        if index not in seen:
            seen.add(index)
            stack.extend(neighbours(index))
    return seen


def gradient_chain(nodes: list[onnx.NodeProto], forward: set[int], after: int) -> set[int]:
    """The backward nodes downstream of the forward's top (its nodes past position `after`): the gradient chain.

    A backward node outside it reads nothing but saved forward tensors, so onnxruntime may run it during the
    forward; only chain nodes are sure to run after the loss.
    """
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    readers = lambda i: (c for name in nodes[i].output for c in consumers.get(name, []))  # noqa: E731
    top = (i for i in forward if i > after)
    return reach((c for i in top for c in readers(i)), readers) - forward


def gate_tensor(nodes: list[onnx.NodeProto], chain: set[int], first_read: int, producer: dict[str, int]) -> str | None:
    """A gradient-chain tensor computed right before position `first_read`, to gate a clone on."""
    for name in nodes[first_read].input:
        if producer.get(name) in chain:
            return name
    for index in range(first_read - 1, -1, -1):
        if index in chain and nodes[index].output and nodes[index].output[0]:
            return nodes[index].output[0]
    return None


def gate_nodes(tensor: str, gate: str, tag: str) -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """tensor + 0 * float(gate.flatten()[0:1]): `tensor` again, now after the gradient `gate`.

    The data dependency keeps onnxruntime from running the clone early (its default order is a depth-first walk
    that would otherwise be free to) and common-subexpression elimination from merging it back. Adding +-0 leaves
    every finite value bit-identical; a non-finite gradient makes the step non-finite, which the runtime rejects.
    """
    names = {k: f"{tag}/{k}" for k in ("flat", "first", "float", "zero", "gated")}
    constants = [
        helper.make_tensor(f"{tag}/shape", TensorProto.INT64, [1], [-1]),
        helper.make_tensor(f"{tag}/start", TensorProto.INT64, [1], [0]),
        helper.make_tensor(f"{tag}/end", TensorProto.INT64, [1], [1]),
        helper.make_tensor(f"{tag}/zero_scalar", _FLOAT, [], [0.0]),
    ]
    new = [
        helper.make_node("Reshape", [gate, f"{tag}/shape"], [names["flat"]], name=f"{tag}/Reshape"),
        helper.make_node("Slice", [names["flat"], f"{tag}/start", f"{tag}/end"], [names["first"]], name=f"{tag}/Slice"),
        helper.make_node("Cast", [names["first"]], [names["float"]], to=_FLOAT, name=f"{tag}/Cast"),
        helper.make_node("Mul", [names["float"], f"{tag}/zero_scalar"], [names["zero"]], name=f"{tag}/Mul"),
        helper.make_node("Add", [tensor, names["zero"]], [names["gated"]], name=f"{tag}/Add"),
    ]
    return new, constants, names["gated"]


def _without_dead(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop nodes nothing reads any more (the originals of redirected backward-only nodes): onnxruntime would still
    run them, at the end, keeping their forward inputs alive the whole step."""
    alive: set[str] = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(name in alive for name in node.output if name):
            kept.append(node)
            alive.update(node.input)
    return kept[::-1]


def _topological(nodes: list[onnx.NodeProto], known: set[str]) -> list[onnx.NodeProto]:
    """Stable topological order (Kahn, earliest original position first): clones land right before their readers."""
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    waiting = [sum(1 for n in set(node.input) if n in producer and n not in known) for node in nodes]
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for n in set(node.input):
            if n in producer and n not in known:
                readers.setdefault(producer[n], []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for r in readers.get(i, []):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise ExportError("internal: a train-step rewrite made the graph cyclic; export without recompute")
    return order


def replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make `nodes` (originals first, then inserted clones) the graph's, in order, without dead nodes."""
    known = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    ordered = _without_dead(_topological(nodes, known), {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(ordered)
