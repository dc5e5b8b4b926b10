"""Split an exported network into the part that sees sweep t alone and the part that needs the pair.

FastFlow3D encodes each sweep on its own before anything mixes them: the pillar encoder of
``(pc0, idx0)`` and the Siamese UNet stages on its pseudo-image depend on sweep t only. The node
sees every sweep twice (t+1 of one pair, t of the next), so it can run that part when the sweep
arrives, on the sweep worker, while the pair worker runs the previous pair; the pair worker then
runs only the rest. :func:`split_sweep_part` cuts any exported graph by data dependence (not by
node names), so it holds for a retrained model of any config; the two parts compute exactly the
ops of the whole graph (a test compares them with the whole graph).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)


@dataclass
class SplitGraph:
    sweep: bytes                    # ONNX: sweep inputs -> cut tensors
    pair: bytes                     # ONNX: cut tensors + pass-through inputs + other inputs -> outputs
    cut: list[str]                  # tensors handed from the sweep part to the pair part
    pass_through: list[str]         # sweep inputs the pair part reads too (e.g. idx0)
    sweep_nodes: int
    pair_nodes: int


def _dtype_of(node, inputs_type: dict[str, int]) -> int:
    from onnx import TensorProto
    if node.op_type == 'Cast':
        return next(a.i for a in node.attribute if a.name == 'to')
    if node.op_type in ('Shape', 'Size', 'NonZero', 'ArgMax', 'ArgMin'):
        return TensorProto.INT64
    if node.op_type in ('Equal', 'Less', 'Greater', 'Not', 'And', 'Or', 'Xor', 'IsNaN', 'IsInf'):
        return TensorProto.BOOL
    if node.op_type == 'ConstantOfShape':
        for a in node.attribute:
            if a.name == 'value':
                return a.t.data_type
        return TensorProto.FLOAT
    if node.op_type == 'Where' and len(node.input) > 1:
        return inputs_type.get(node.input[1], TensorProto.FLOAT)
    for i in node.input:
        if i in inputs_type:
            return inputs_type[i]
    return TensorProto.FLOAT


def _tensor_types(model) -> dict[str, int]:
    """Element type of every tensor, propagated op by op (the graph is topologically sorted)."""
    g = model.graph
    types = {i.name: i.type.tensor_type.elem_type for i in g.input}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == 'Constant':
            t = next((a.t.data_type for a in n.attribute if a.name == 'value'), None)
            for o in n.output:
                types[o] = t if t is not None else 1
            continue
        dt = _dtype_of(n, types)
        for o in n.output:
            types[o] = dt
    return types


def _closure(nodes: list, wanted: Iterable[str], stop: set[str]) -> list:
    """Nodes needed (backwards) to compute ``wanted`` from ``stop`` tensors, in graph order."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    need, todo = set(), [w for w in wanted if w not in stop]
    while todo:
        t = todo.pop()
        k = producer.get(t)
        if k is None or k in need:
            continue
        need.add(k)
        todo.extend(i for i in nodes[k].input if i and i not in stop)
    return [nodes[k] for k in sorted(need)]


def split_sweep_part(model_bytes: bytes,
                     sweep_inputs: tuple[str, ...] = ('pc0', 'idx0')) -> SplitGraph | None:
    """Cut the graph after everything that depends on ``sweep_inputs`` only; None if nothing does."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(model_bytes)
    g = model.graph
    init = {t.name for t in g.initializer}
    others = {i.name for i in g.input} - set(sweep_inputs) - init
    dep0, dep1 = set(sweep_inputs), set(others)
    for n in g.node:  # topological order: one pass marks what each tensor depends on
        ins = [i for i in n.input if i]
        if any(i in dep1 for i in ins):
            dep1.update(n.output)
        elif any(i in dep0 for i in ins):
            dep0.update(n.output)
    sweep_nodes = [n for n in g.node if n.output and n.output[0] in dep0 and n.output[0] not in sweep_inputs]
    if not sweep_nodes:
        return None
    produced0 = {o for n in sweep_nodes for o in n.output}
    pair_consumers = [n for n in g.node if n.output and n.output[0] in dep1]
    cut = sorted({i for n in pair_consumers for i in n.input if i in produced0})
    passed = sorted({i for n in pair_consumers for i in n.input if i in sweep_inputs})
    outputs = [o.name for o in g.output]
    if not cut or any(o in dep0 for o in outputs):
        return None
    types = _tensor_types(model)
    stop0 = set(sweep_inputs) | init
    part0 = _closure(list(g.node), cut, stop0)
    stop1 = set(cut) | set(passed) | others | init
    part1 = _closure(list(g.node), outputs, stop1)

    def make(nodes, inputs, outs, name):
        used = {i for n in nodes for i in n.input}
        gi = [next(i for i in g.input if i.name == x) if x in {i.name for i in g.input}
              else helper.make_tensor_value_info(x, types[x], None) for x in inputs]
        go = [next(o for o in g.output if o.name == x) if x in outputs
              else helper.make_tensor_value_info(x, types[x], None) for x in outs]
        graph = helper.make_graph(nodes, name, gi, go, [t for t in g.initializer if t.name in used])
        m = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        return m.SerializeToString()

    pair_inputs = cut + passed + sorted(others)
    return SplitGraph(make(part0, list(sweep_inputs), cut, 'sweep_part'),
                      make(part1, pair_inputs, outputs, 'pair_part'), cut, passed, len(part0), len(part1))
