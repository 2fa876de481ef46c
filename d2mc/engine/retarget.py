"""Turn ONNX Runtime's ``com.microsoft::MoE`` nodes into ``D2mcMoE`` plugin nodes.

The ``contrib`` form of the ONNX Runtime lowering already carries what the plugin consumes, in its layout:
``MoE(input [T, H], router_probs [T, E] (raw logits), fc1 [E, 2I, H] (gate/up interleaved), "", fc2 [E, H, I])``
with ``activation_type="swiglu"``, ``swiglu_fusion=1``, ``k`` and ``normalize_routing_weights``. The rewrite
keeps every tensor and only changes the node, so a graph's MoE blocks can be checked against ONNX Runtime
before the rewrite and handed to TensorRT after it.
"""

from __future__ import annotations

import onnx
from onnx import helper

from d2mc.errors import UserError
from d2mc.ops.moe import PLUGIN_DOMAIN, MoePluginAttributes, moe_plugin_node


def retarget_moe_nodes(model: onnx.ModelProto) -> int:
    """Replace each ``com.microsoft::MoE`` node of ``model`` in place; returns how many were replaced."""
    graph = model.graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    replaced = 0
    for index, node in enumerate(list(graph.node)):
        if node.domain != "com.microsoft" or node.op_type != "MoE":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        activation = attrs.get("activation_type", b"relu")
        activation = activation.decode() if isinstance(activation, bytes) else activation
        if activation != "swiglu" or attrs.get("swiglu_fusion", 0) != 1:
            raise UserError(f"MoE node '{node.name}': only swiglu with interleaved gate/up rows (swiglu_fusion=1) "
                            "maps to the D2mcMoE plugin")
        inputs = list(node.input) + [""] * (5 - len(node.input))
        if inputs[3] or any(inputs[5:]):
            raise UserError(f"MoE node '{node.name}': biases and fc3 have no place in the D2mcMoE plugin")
        fc1, fc2 = inputs[2], inputs[4]
        if fc1 not in shapes or fc2 not in shapes:
            raise UserError(f"MoE node '{node.name}': expert weights must be initializers")
        experts, two_inter, hidden = shapes[fc1]
        attributes = MoePluginAttributes(num_experts=experts, num_shared=0, top_k=int(attrs.get("k", 1)),
                                         hidden_size=hidden, intermediate_size=two_inter // 2,
                                         normalize=int(attrs.get("normalize_routing_weights", 0)))
        new = moe_plugin_node(node.name or f"moe_{index}", inputs[0], inputs[1], fc1, fc2, node.output[0], attributes)
        graph.node.remove(node)
        graph.node.insert(index, new)
        replaced += 1
    if replaced and not any(o.domain == PLUGIN_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    return replaced
