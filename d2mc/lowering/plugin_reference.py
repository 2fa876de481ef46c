"""Standard-op reference of the ``D2mcMoE`` plugin node, so ONNX Runtime can run a TensorRT-flavoured graph.

:func:`expand_plugin_nodes` replaces every ``d2mc::D2mcMoE`` node with operators ONNX Runtime has, reading the
node's own ``fc1``/``fc2`` tensors through their documented layout (:mod:`d2mc.ops.moe`): gate and up
rows interleaved, shared experts first. Every routed expert runs on every token and is weighted by its routing
weight (zero when not chosen): slow, but independent of the dispatch lowering, so verifying the expanded graph
against PyTorch checks the plugin contract's weight layout and routing math, not just the lowering's.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from d2mc.ops.moe import PLUGIN_DOMAIN, PLUGIN_NAME, MoePluginAttributes


def expand_plugin_nodes(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place; returns how many plugin nodes were replaced."""
    graph = model.graph
    dtypes = {i.name: i.data_type for i in graph.initializer}
    new_nodes, constants, replaced = [], [], 0
    for node in graph.node:
        if node.op_type != PLUGIN_NAME or node.domain != PLUGIN_DOMAIN:
            new_nodes.append(node)
            continue
        attributes = MoePluginAttributes.from_onnx({a.name: helper.get_attribute_value(a) for a in node.attribute},
                                                   f"'{node.name}'")
        expansion = _Expansion(f"{node.name}.ref", dtypes.get(node.input[2], TensorProto.FLOAT))
        expansion.build(*node.input, node.output[0], attributes)
        new_nodes.extend(expansion.nodes)
        constants.extend(expansion.constants)
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(constants)
        kept = [o for o in model.opset_import if o.domain != PLUGIN_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return replaced


class _Expansion:
    def __init__(self, prefix: str, dtype: int):
        self.prefix, self.dtype = prefix, dtype
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []

    def _name(self, hint: str) -> str:
        return f"{self.prefix}.{hint}_{len(self.nodes) + len(self.constants)}"

    def const(self, values, dtype=np.int64) -> str:
        name = self._name("const")
        self.constants.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def expert(self, x: str, fc1: str, fc2: str, index: int, a: MoePluginAttributes) -> str:
        """SwiGLU of expert ``index`` on every row of ``x [T, H]``, fp32 result."""
        rows = self.op("Gather", [fc1, self.const(index)], axis=0)  # [2I, H]
        pairs = self.op("Reshape", [rows, self.const([a.intermediate_size, 2, a.hidden_size])])
        gate = self.op("Gather", [pairs, self.const(0)], axis=1)  # even rows: [I, H]
        up = self.op("Gather", [pairs, self.const(1)], axis=1)
        gate_out = self.op("MatMul", [x, self.op("Transpose", [gate], perm=[1, 0])])
        up_out = self.op("MatMul", [x, self.op("Transpose", [up], perm=[1, 0])])
        act = self.op("Mul", [self.op("Mul", [gate_out, self.op("Sigmoid", [gate_out])]), up_out])
        down = self.op("Gather", [fc2, self.const(index)], axis=0)  # [H, I]
        out = self.op("MatMul", [act, self.op("Transpose", [down], perm=[1, 0])])
        return self.op("Cast", [out], to=TensorProto.FLOAT)

    def build(self, hidden: str, logits: str, fc1: str, fc2: str, output: str, a: MoePluginAttributes) -> None:
        x = self.op("Reshape", [hidden, self.const([-1, a.hidden_size])])
        flat_logits = self.op("Cast", [self.op("Reshape", [logits, self.const([-1, a.num_experts])])],
                              to=TensorProto.FLOAT)
        probs = self.op("Softmax", [flat_logits], axis=-1)
        top = self._name("topk")
        indices = self._name("indices")
        # chosen by the logits, as the plugin chooses: a saturated softmax rounds probabilities to equal values
        self.nodes.append(helper.make_node("TopK", [flat_logits, self.const([a.top_k])], [top, indices], name=top,
                                           axis=-1))
        weights = self.op("GatherElements", [probs, indices], axis=-1)
        if a.normalize == 2:
            weights = self.op("Add", [self.op("Mul", [weights, self.const(0.0, np.float32)]),
                                      self.const(1.0, np.float32)])
        elif a.normalize:
            weights = self.op("Div", [weights, self.op("ReduceSum", [weights, self.const([-1])], keepdims=1)])
        total = None
        for s in range(a.num_shared):
            out = self.expert(x, fc1, fc2, s, a)
            total = out if total is None else self.op("Add", [total, out])
        zero = self.const(0.0, np.float32)
        for e in range(a.num_experts):
            chosen = self.op("Equal", [indices, self.const([e])])  # [T, k]
            weight = self.op("ReduceSum", [self.op("Where", [chosen, weights, zero]), self.const([-1])],
                             keepdims=1)  # [T, 1]: 0 for tokens that did not pick e
            out = self.op("Mul", [self.expert(x, fc1, fc2, a.num_shared + e, a), weight])
            total = out if total is None else self.op("Add", [total, out])
        shaped = self.op("Reshape", [self.op("Cast", [total], to=self.dtype), self.op("Shape", [hidden])])
        self.nodes.append(helper.make_node("Identity", [shaped], [output], name=self._name("out")))
