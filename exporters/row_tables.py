"""Find the frozen tables the device runtime may stage row by row (manifest `weights.row_tables`).

A frozen table qualifies when, in every graph of the bundle, its only readers are Gathers along axis 0 whose
indices are one integer model input, as a word-embedding lookup is. The runtime then keeps only the batch's rows
in memory (`device_runtime.row_tables`), which is exact for such a table: a Gather reads the rows its indices name
and nothing else. A table anything else reads (a tied LM head's MatMul, a reshape, a graph output) stays mapped
whole. Small tables are left alone: staging costs a read per row and saves at most their size.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

__all__ = ["MIN_TABLE_BYTES", "find_row_tables"]

MIN_TABLE_BYTES = 1 << 18


def _names_in_subgraphs(node: onnx.NodeProto) -> set[str]:
    """Every name a control-flow node's subgraphs read: such a reader is never a plain Gather."""
    names: set[str] = set()
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs]:
            for inner in graph.node:
                names.update(inner.input)
                names |= _names_in_subgraphs(inner)
    return names


def _readers(graph: onnx.GraphProto) -> tuple[dict[str, list[tuple[onnx.NodeProto, int]]], set[str]]:
    """(name -> the nodes that read it and at which input, names that must stay whole) for one graph, in one walk:
    graph outputs and whatever a control-flow node's subgraphs read are never plain Gathers."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    whole = {o.name for o in graph.output}
    for node in graph.node:
        whole |= _names_in_subgraphs(node)
        for position, used in enumerate(node.input):
            readers.setdefault(used, []).append((node, position))
    return readers, whole


def _gather_index(readers: list[tuple[onnx.NodeProto, int]], integer_inputs: set[str]) -> set[str] | None:
    """The model inputs that index a table with these readers, or None if anything but such a Gather reads it."""
    indices: set[str] = set()
    for node, position in readers:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or position != 0 or axis != 0:
            return None
        if node.input[1] not in integer_inputs:
            return None
        indices.add(node.input[1])
    return indices


def find_row_tables(graphs: Mapping[str, onnx.ModelProto], frozen: Mapping[str, int], prefix: str,
                    integer_inputs: set[str]) -> dict[str, str]:
    """{frozen tensor: the model input that indexes it} for every table that qualifies in all `graphs`.

    `frozen` maps frozen tensor names (without the graph's `prefix`) to their size in bytes.
    """
    walked = [_readers(model.graph) for model in graphs.values()]
    tables: dict[str, str] = {}
    for name, nbytes in frozen.items():
        if nbytes < MIN_TABLE_BYTES:
            continue
        indices: set[str] = set()
        for readers, whole in walked:
            found = None if prefix + name in whole else _gather_index(readers.get(prefix + name, []), integer_inputs)
            if found is None:
                break
            indices |= found
        else:
            if len(indices) == 1:
                tables[name] = indices.pop()
    return tables
