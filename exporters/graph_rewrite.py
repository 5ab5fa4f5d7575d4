"""Shared tools of the train-step rewrites (`exporters.recompute`, `exporters.rematerialize`).

Both move forward work into the backward by cloning forward nodes. What they share: finding the gradient chain,
gating a clone on a gradient so onnxruntime runs it late, and putting the graph back in a stable topological order
without the nodes nothing reads any more.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from .errors import ExportError

__all__ = ["TrainStep", "clone_node", "reach", "gate_tensor", "gate_nodes", "replace_nodes"]

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


@dataclass
class TrainStep:
    """A traced train step indexed once for a rewrite: its nodes in order, which node makes each tensor, which
    nodes read it, and the forward (the nodes the loss depends on)."""

    nodes: list[onnx.NodeProto]
    producer: dict[str, int]
    consumers: dict[str, list[int]]
    forward: set[int]

    @classmethod
    def index(cls, graph: onnx.GraphProto, loss: str, rewrite: str) -> TrainStep:
        """Raises ExportError (an internal one: the exporter always names it) when the loss output is missing."""
        nodes = list(graph.node)
        producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
        if loss not in producer:
            raise ExportError(f"internal: {rewrite} needs the train step's {loss!r} output, which the graph lacks")
        consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(nodes):
            for name in node.input:
                consumers[name].append(i)
        forward = reach([producer[loss]], lambda i: (producer[n] for n in nodes[i].input if n in producer))
        return cls(nodes, producer, consumers, forward)

    def gradient_chain(self, after: int) -> set[int]:
        """The backward nodes downstream of the forward's top (its nodes past position `after`): the gradient chain.

        A backward node outside it reads nothing but saved forward tensors, so onnxruntime may run it during the
        forward; only chain nodes are sure to run after the loss.
        """
        readers = lambda i: (c for name in self.nodes[i].output for c in self.consumers.get(name, []))  # noqa: E731
        top = (i for i in self.forward if i > after)
        return reach((c for i in top for c in readers(i)), readers) - self.forward

    def redirect(self, name: str, new_name: str, readers: Callable[[int], bool]) -> None:
        """Make the nodes `readers` accepts read `new_name` where they read `name`."""
        for c in self.consumers.get(name, []):
            if readers(c):
                inputs = [new_name if n == name else n for n in self.nodes[c].input]
                del self.nodes[c].input[:]
                self.nodes[c].input.extend(inputs)


def clone_node(node: onnx.NodeProto, index: int, tag: str, rename: dict[str, str], suffix: str) -> onnx.NodeProto:
    """A copy of `node` (at `index`) named under `tag`, reading the renamed inputs; records its renamed outputs."""
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    clone.name = f"{tag}/{node.name or node.op_type + str(index)}"
    del clone.input[:], clone.output[:]
    clone.input.extend(rename.get(name, name) for name in node.input)
    for name in node.output:
        rename[name] = f"{name}{suffix}" if name else ""
        clone.output.append(rename[name])
    return clone


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
