"""Standard-op reference of the ``D2mcMoE`` plugin node, so ONNX Runtime can run a TensorRT-flavoured graph.

:func:`expand_plugin_nodes` replaces every ``d2mc::D2mcMoE`` node with operators ONNX Runtime has, reading the
node's own ``fc1``/``fc2`` tensors through their documented layout (:mod:`d2mc.ops.moe`): gate and up
rows interleaved, shared experts first. Every routed expert runs on every token and is weighted by its routing
weight (zero when not chosen): slow, but independent of the dispatch lowering, so verifying the expanded graph
against PyTorch checks the plugin contract's weight layout and routing math, not just the lowering's.

A node with quantized experts (``weight_bits`` 4 or 8) gets its weights through ``DequantizeLinear`` (opset 21,
``axis=2``, ``block_size``) and computes in fp32 from there, as the kernels do. Its packed int4 bytes are read as
an INT4 tensor of the logical shape: the plugin's packing is ONNX's own, so the new initializer points at the same
bytes (the same external data, or a copy of inline ones). ONNX Runtime would fuse a ``DequantizeLinear`` feeding a
``MatMul`` into ``MatMulNBits`` with int8 activations; here a Gather stands between them, and a session verifying a
quantized graph sets ``session.qdq_matmulnbits_accuracy_level`` to ``"0"`` all the same.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from d2mc.ops.moe import PLUGIN_DOMAIN, PLUGIN_NAME, MoePluginAttributes

DEQUANTIZE_OPSET = 21  # blocked DequantizeLinear and INT4 tensors


def expand_plugin_nodes(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place; returns how many plugin nodes were replaced."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    new_nodes, constants, replaced, quantized, replaced_inputs = [], [], 0, False, set()
    for node in graph.node:
        if node.op_type != PLUGIN_NAME or node.domain != PLUGIN_DOMAIN:
            new_nodes.append(node)
            continue
        replaced_inputs.update(node.input)
        attributes = MoePluginAttributes.from_onnx({a.name: helper.get_attribute_value(a) for a in node.attribute},
                                                   f"'{node.name}'")
        if len(node.input) != len(attributes.inputs):
            raise ValueError(f"{PLUGIN_NAME} node '{node.name}' has {len(node.input)} inputs; its attributes say "
                             f"{', '.join(attributes.inputs)}")
        # the tensor type: the weights' when they are float, the scales' when quantized
        typed = node.input[4] if attributes.quantized else node.input[2]
        expansion = _Expansion(f"{node.name}.ref", initializers[typed].data_type if typed in initializers
                               else TensorProto.FLOAT)
        fc1, fc2 = node.input[2:4]
        if attributes.quantized:
            fc1, fc2 = (expansion.dequantize(initializers, codes, scales, shape, attributes)
                        for codes, scales, shape in ((fc1, node.input[4], attributes.fc1_shape()),
                                                     (fc2, node.input[5], attributes.fc2_shape())))
        expansion.build(node.input[0], node.input[1], fc1, fc2, node.output[0], attributes)
        new_nodes.extend(expansion.nodes)
        constants.extend(expansion.constants)
        replaced += 1
        quantized = quantized or attributes.quantized
    if replaced:
        del graph.node[:]
        graph.node.extend(new_nodes)
        # the packed int4 weights are read through their INT4 views only
        used = {name for node in new_nodes for name in node.input} | {o.name for o in graph.output}
        kept_initializers = [i for i in graph.initializer if i.name in used or i.name not in replaced_inputs]
        del graph.initializer[:]
        graph.initializer.extend(kept_initializers + constants)
        kept = [o for o in model.opset_import if o.domain != PLUGIN_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
        if quantized:
            _require_opset(model, DEQUANTIZE_OPSET)
    return replaced


def _require_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default-domain opset to ``version``; the operators the lowerings emit keep their meaning from
    the tensorrt flavour's opset 18 to 21."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < version:
            opset.version = version


def _int4_view(tensor: onnx.TensorProto, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    """The plugin's packed int4 bytes as an ONNX INT4 tensor of the logical ``shape``: the same bytes (two codes per
    byte, the first in the low nibble), so external data is referenced, not copied."""
    view = onnx.TensorProto(name=name, data_type=TensorProto.INT4, dims=list(shape))
    if tensor.data_location == TensorProto.EXTERNAL:
        view.data_location = TensorProto.EXTERNAL
        view.external_data.extend(tensor.external_data)
    else:
        view.raw_data = tensor.raw_data or np.asarray(tensor.int32_data, np.int8).tobytes()
    return view


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

    def dequantize(self, initializers: dict, codes: str, scales: str, shape: tuple[int, ...],
                   a: MoePluginAttributes) -> str:
        """fp32 weights of the logical ``shape`` from a quantized weight input and its block scales."""
        if codes not in initializers:
            raise ValueError(f"{PLUGIN_NAME} weight '{codes}' is not an initializer: the reference reads its bytes")
        if a.weight_bits == 4:
            view = _int4_view(initializers[codes], self._name("int4"), shape)
            self.constants.append(view)
            codes = view.name
        scales32 = self.op("Cast", [scales], to=TensorProto.FLOAT)
        return self.op("DequantizeLinear", [codes, scales32], axis=2, block_size=a.block_size)

    def expert(self, x: str, fc1: str, fc2: str, index: int, a: MoePluginAttributes) -> str:
        """SwiGLU of expert ``index`` on every row of ``x [T, H]``, fp32 result. Quantized weights come dequantized
        in fp32 and ``x`` in fp32; the activation is rounded to the tensor type between the two products, as the
        kernels store it."""
        rows = self.op("Gather", [fc1, self.const(index)], axis=0)  # [2I, H]
        pairs = self.op("Reshape", [rows, self.const([a.intermediate_size, 2, a.hidden_size])])
        gate = self.op("Gather", [pairs, self.const(0)], axis=1)  # even rows: [I, H]
        up = self.op("Gather", [pairs, self.const(1)], axis=1)
        gate_out = self.op("MatMul", [x, self.op("Transpose", [gate], perm=[1, 0])])
        up_out = self.op("MatMul", [x, self.op("Transpose", [up], perm=[1, 0])])
        act = self.op("Mul", [self.op("Mul", [gate_out, self.op("Sigmoid", [gate_out])]), up_out])
        if a.quantized and self.dtype != TensorProto.FLOAT:
            act = self.op("Cast", [self.op("Cast", [act], to=self.dtype)], to=TensorProto.FLOAT)
        down = self.op("Gather", [fc2, self.const(index)], axis=0)  # [H, I]
        out = self.op("MatMul", [act, self.op("Transpose", [down], perm=[1, 0])])
        return self.op("Cast", [out], to=TensorProto.FLOAT)

    def build(self, hidden: str, logits: str, fc1: str, fc2: str, output: str, a: MoePluginAttributes) -> None:
        x = self.op("Reshape", [hidden, self.const([-1, a.hidden_size])])
        if a.quantized:
            x = self.op("Cast", [x], to=TensorProto.FLOAT)
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
