"""What the engine builder reads from a TensorRT-flavoured ONNX: its inputs, its plugin nodes, its weights and
how they are quantized.

Only the graph is loaded (external weight data stays on disk), so this runs on any machine in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from d2mc.errors import UserError
from d2mc.ops.moe import PLUGIN_DOMAIN, PLUGIN_NAME, MoePluginAttributes

# dtypes as the manifest, trtexec and the device profile name them
ONNX_PRECISION = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
                  onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8",
                  onnx.TensorProto.BOOL: "bool", onnx.TensorProto.FLOAT8E4M3FN: "fp8"}
# ONNX Runtime contrib ops: TensorRT's ONNX parser has no importer for these
CONTRIB_DOMAINS = ("com.microsoft",)
# element types of quantized weights: their width, and whether they are unsigned (stored with a zero point)
QUANTIZED_TYPES = {onnx.TensorProto.INT4: (4, False), onnx.TensorProto.UINT4: (4, True),
                   onnx.TensorProto.INT8: (8, False), onnx.TensorProto.UINT8: (8, True)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    dims: tuple  # ints for fixed dimensions, strings for named dynamic ones


@dataclass(frozen=True)
class MoeNode:
    name: str
    attributes: MoePluginAttributes
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class WeightQuantization:
    """The quantized weights of a graph, weight-only and block-wise, as its operators carry them."""

    bits: tuple[int, ...]  # the widths present, narrowest first (4, or 4 and 8 with an int8 LM head)
    block_sizes: tuple[int, ...]  # along the input axis; empty when every scale covers a whole row or tensor
    dequantize_nodes: int  # DequantizeLinear nodes on weight initializers (dense projections)
    # (bits, block size) of those DequantizeLinear nodes; block size 0: per channel or per tensor
    dequantize_formats: tuple[tuple[int, int], ...]
    plugin_nodes: int  # D2mcMoE nodes with quantized experts
    unsigned: bool  # some DequantizeLinear reads unsigned codes with zero points (asymmetric)
    method: str | None  # the quantization method the export recorded, None where it recorded none

    @property
    def narrowest(self) -> int:
        return self.bits[0]

    def to_dict(self) -> dict:
        return {"method": self.method, "bits": list(self.bits), "block_sizes": list(self.block_sizes),
                "dequantize_nodes": self.dequantize_nodes, "plugin_nodes": self.plugin_nodes}


@dataclass
class GraphSummary:
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    moe_nodes: list[MoeNode]
    unparsable_ops: list[str]  # "domain::op" TensorRT cannot import
    weight_bytes: int
    precision: str  # the float type of the logits: a strongly typed network computes in the ONNX's types
    quantization: WeightQuantization | None = None  # None: every weight is float

    @property
    def kv_inputs(self) -> list[TensorSpec]:
        return [t for t in self.inputs if t.name.startswith("past_key_values.")]


def read_graph(onnx_path: str | Path) -> GraphSummary:
    """Summarise ``onnx_path`` without loading its external weights."""
    path = Path(onnx_path)
    if not path.is_file():
        raise UserError(f"no ONNX model at '{path}': export the tensorrt flavour with d2mc export --format tensorrt")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise UserError(f"'{path}' is not a readable ONNX model ({str(exc)[:120]}): export it again") from None
    graph = model.graph
    initializer_names = {i.name for i in graph.initializer}
    inputs = [_spec(v) for v in graph.input if v.name not in initializer_names]
    outputs = [_spec(v) for v in graph.output]
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    moe_nodes, unparsable = [], set()
    for node in graph.node:
        if node.op_type == PLUGIN_NAME and node.domain == PLUGIN_DOMAIN:
            moe_nodes.append(_moe_node(node, shapes))
        elif node.domain in CONTRIB_DOMAINS:
            unparsable.add(f"{node.domain}::{node.op_type}")
    logits = next((o for o in outputs if o.name == "logits"), outputs[0] if outputs else None)
    if logits is None:
        raise UserError(f"'{path}' has no outputs: export it again")
    return GraphSummary(path, inputs, outputs, moe_nodes, sorted(unparsable), _weight_bytes(path, model),
                        logits.dtype, _quantization(path, model, moe_nodes))


def _quantization(path: Path, model: onnx.ModelProto, moe_nodes: list[MoeNode]) -> WeightQuantization | None:
    """Which weights are quantized: DequantizeLinear nodes reading an integer initializer, and plugin nodes with
    quantized experts; the method comes from what the export recorded beside the ONNX (``d2mc_artifact.json``'s
    ``quantization.quant_method``)."""
    from d2mc.artifact import artifact_info

    types = {i.name: i.data_type for i in model.graph.initializer}
    bits, blocks, formats, dequantize, unsigned = set(), set(), set(), 0, False
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and \
                types.get(node.input[0]) in QUANTIZED_TYPES:
            width, is_unsigned = QUANTIZED_TYPES[types[node.input[0]]]
            bits.add(width)
            unsigned = unsigned or is_unsigned
            block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
            blocks.update({block} - {0})
            formats.add((width, block))
            dequantize += 1
    plugin = [n.attributes for n in moe_nodes if n.attributes.quantized]
    bits.update(a.weight_bits for a in plugin)
    blocks.update(a.block_size for a in plugin)
    if not bits:
        return None
    recorded = artifact_info(path.parent).get("quantization")  # QuantizedModel.to_dict()
    method = recorded.get("quant_method") if isinstance(recorded, dict) else None
    return WeightQuantization(tuple(sorted(bits)), tuple(sorted(blocks)), dequantize, tuple(sorted(formats)),
                              len(plugin), unsigned, str(method) if method else None)


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim)
    return TensorSpec(value.name, ONNX_PRECISION.get(tensor.elem_type, str(tensor.elem_type)), dims)


def _moe_node(node: onnx.NodeProto, shapes: dict) -> MoeNode:
    where = f"'{node.name}'"
    attributes = MoePluginAttributes.from_onnx({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute},
                                               where)
    if len(node.input) != len(attributes.inputs):
        raise UserError(f"{PLUGIN_NAME} node {where} has {len(node.input)} inputs; with weight_bits="
                        f"{attributes.weight_bits} the plugin takes {len(attributes.inputs)} "
                        f"({', '.join(attributes.inputs)})")
    for name, expected in zip(node.input[2:], attributes.weight_shapes().values(), strict=True):
        if name in shapes and shapes[name] != expected:
            raise UserError(f"{PLUGIN_NAME} node {where}: weight '{name}' has shape {list(shapes[name])}, its "
                            f"attributes say {list(expected)}")
    return MoeNode(node.name, attributes, tuple(node.input))


def _weight_bytes(path: Path, model: onnx.ModelProto) -> int:
    """Bytes of weights: the external data files plus the initializers stored inline."""
    files, inline = set(), 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in tensor.external_data if e.key == "location")
        else:
            inline += len(tensor.raw_data)
    return inline + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).exists())
