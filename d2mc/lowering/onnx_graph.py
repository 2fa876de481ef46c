"""Build the ONNX graph of a dense or converted model from its weights.

Two flavours share the I/O contract (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/value`` in; ``logits``, ``present.{i}.key/value`` out; dynamic batch, sequence and past;
one graph for prefill and decode) and differ in operators.

Flavour ``onnxruntime``: the graph follows what ONNX Runtime runs fastest on CPU: RMSNorm as ``SimplifiedLayerNormalization`` and
``SkipSimplifiedLayerNormalization`` (residual add fused in), attention as ``com.microsoft::GroupQueryAttention``
with packed QKV, rotary applied inside it from cos/sin caches, and the KV cache as graph inputs/outputs
(``past_key_values.{i}.key/value`` -> ``present.{i}.key/value``, ``i`` counting only blocks that keep attention).

MoE blocks (see :mod:`d2mc.modeling`) lower to a router ``MatMul`` on the post-attention hidden state and an
expert dispatch. Each expert's own post-attention norm weight is folded into its gate and up projections, so the
block normalises once (``rms(h)``) and every expert reads that. Two dispatch forms:
- ``dispatch`` (default): standard ops; TopK (or ArgMax for top-1), then per expert Equal, NonZero, GatherND,
  the SwiGLU MLP on the selected rows only, and ScatterND(add). A token costs only the experts it picked.
- ``contrib``: ONNX Runtime's ``com.microsoft::MoE`` op (swiglu, interleaved fc1), kept for comparison: it is
  slower than dispatch on CPU (benchmarks/onnx_export.py).

Flavour ``tensorrt``: only operators TensorRT's ONNX parser imports natively (opset 18, no ``com.microsoft``):
RMSNorm as ``Pow, ReduceMean, Add, Sqrt, Div`` in fp32 then the weight; rotary from cos/sin tables gathered by
``position_ids``; the new keys and values concatenated to the past (``Concat`` on the sequence axis gives
``present``); grouped-query attention as broadcast ``MatMul`` over ``[B, kv_heads, group, S, T]`` with a causal
(and sliding-window) mask built from ``attention_mask``, softmax in fp32. Each MoE block is one ``d2mc::D2mcMoE``
plugin node whose inputs and attributes follow :mod:`d2mc.ops.moe` (docs/tensorrt-plugin.md):
``D2mcMoE(rms(h), router(h), fc1, fc2)``, gate/up rows interleaved, shared experts first, each expert's norm weight
folded into fc1. With quantized weights (``quantized``: weight-only, symmetric, block-wise int4/int8) the flavour
moves to opset 21: every quantized projection and the LM head read ``DequantizeLinear`` of their codes before the
``MatMul``, and the plugin node takes its experts' packed codes and block scales (``weight_bits``, ``block_size``).
ONNX Runtime cannot run the plugin: :func:`d2mc.lowering.plugin_reference.expand_plugin_nodes`
rewrites it into standard ops so that the flavour is verified against PyTorch like the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from d2mc.arch import BlockPlan
from d2mc.errors import UserError
from d2mc.lowering.attention import FusedAttention, StandardAttention
from d2mc.lowering.builder import PRECISIONS, GraphBuilder, matmul, norm
from d2mc.lowering.experts import LoweredBlock, lower_experts
from d2mc.quantize import QuantizedLinear

OPSET = {"onnxruntime": 21, "tensorrt": 18}
QUANTIZED_OPSET = 21
MOE_OPS = ("dispatch", "contrib")
FLAVOURS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class LoweringOptions:
    """What to emit: ``flavour`` (onnxruntime | tensorrt), weight ``precision`` (fp32 | fp16) and, for the
    onnxruntime flavour, the MoE form ``moe_op`` (dispatch | contrib; the tensorrt flavour always uses the plugin)."""

    precision: str = "fp32"
    moe_op: str = "dispatch"
    flavour: str = "onnxruntime"

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise UserError(f"unknown ONNX flavour '{self.flavour}': choose one of {', '.join(FLAVOURS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}' for ONNX: choose fp32 or fp16")
        if self.moe_op not in MOE_OPS:
            raise UserError(f"unknown MoE lowering '{self.moe_op}': choose one of {', '.join(MOE_OPS)}")


def lower_to_onnx(model, out_dir: str | Path, options: LoweringOptions | None = None, *, flavour: str | None = None,
                  precision: str | None = None, moe_op: str | None = None,
                  quantized: Mapping[str, QuantizedLinear] | None = None) -> Path:
    """Write ``model.onnx`` (+ ``model.onnx.data``) for a dense or converted model into ``out_dir``.

    ``options`` or the keywords ``flavour``, ``precision``, ``moe_op`` (keywords win) choose what is emitted.
    ``quantized`` maps Linear module names of ``model`` to their quantized weights, which the tensorrt flavour
    emits from their codes (``model`` carries the weights they stand for). Returns the path of ``model.onnx``.
    """
    from d2mc.arch import ModelArch

    options = options or LoweringOptions()
    overrides = {k: v for k, v in (("flavour", flavour), ("precision", precision), ("moe_op", moe_op)) if v}
    if overrides:
        options = LoweringOptions(**{**options.__dict__, **overrides})
    trt = options.flavour == "tensorrt"
    if quantized and not trt:
        raise ValueError("quantized weights lower to the tensorrt flavour (DequantizeLinear and the D2mcMoE plugin)")
    arch = ModelArch.from_config(model.config)
    np_dtype, onnx_dtype = PRECISIONS[options.precision]
    g = GraphBuilder(np_dtype, onnx_dtype)
    g.trt = trt
    g.quantized = {model.get_submodule(name): q for name, q in (quantized or {}).items()}
    blocks = _blocks_of(model)
    base = model.config.base_config if model.config.model_type == "d2mc_moe" else model.config
    eps = float(base.rms_norm_eps)
    head_dim = arch.head_dim
    n_attention = len(arch.attention_blocks)

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", onnx_dtype, ["batch_size", "sequence_length", arch.vocab_size])]
    for i in range(n_attention):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", onnx_dtype,
                                                        ["batch_size", arch.num_kv_heads, "past_sequence_length",
                                                         head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", onnx_dtype,
                                                         ["batch_size", arch.num_kv_heads,
                                                          "total_sequence_length", head_dim]))

    if n_attention:
        cos, sin = _rotary_caches(model, arch)
        g.weight("cos_cache", cos)
        g.weight("sin_cache", sin)
    if trt:
        attend = StandardAttention(g, arch)
    else:
        attend = FusedAttention(g, arch)

    embed = g.weight("embed_tokens", model.model.embed_tokens.weight)
    residual = g.op1("Gather", [embed, "input_ids"])
    delta = None
    attention_idx = 0
    for b, block in enumerate(blocks):
        if block.attention is not None:
            normed, residual = norm(g, residual, delta, block.input_norm, eps, f"blocks.{b}.input_norm")
            delta = attend(block.attention, normed, attention_idx, f"blocks.{b}")
            attention_idx += 1
        delta, residual = lower_experts(g, block, residual, delta, arch, eps, options.moe_op, f"blocks.{b}")
    normed, _ = norm(g, residual, delta, model.model.norm.weight, eps, "final_norm")
    head = g.quantized.get(model.lm_head)
    matmul(g, normed, head if head is not None else model.lm_head.weight, "lm_head.weight", "logits")

    graph = helper.make_graph(g.nodes, f"d2mc_{arch.family}_{options.flavour}", inputs, outputs, g.initializers)
    domains = {n.domain for n in g.nodes} - {""}
    opset = QUANTIZED_OPSET if g.quantized else OPSET[options.flavour]  # block-wise DequantizeLinear
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in sorted(domains)]
    onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="d2mc")
    onnx_model.ir_version = 10
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    onnx.save_model(onnx_model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return path


def _blocks_of(model) -> list[LoweredBlock]:
    """Each block's plan and modules; a dense layer is the block :meth:`BlockPlan.dense` describes."""
    if model.config.model_type == "d2mc_moe":
        return [LoweredBlock(plan, block.self_attn, getattr(block.input_layernorm, "weight", None),
                             tuple(block.experts), block.router)
                for plan, block in zip(model.config.blocks, model.model.layers, strict=True)]
    return [LoweredBlock(BlockPlan.dense(i), layer.self_attn, layer.input_layernorm.weight, (layer,), None)
            for i, layer in enumerate(model.model.layers)]


def _rotary_caches(model, arch) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables ``[max_positions, head_dim / 2]`` from the model's own rotary module (scaling included)."""
    rotary = model.model.rotary_emb
    positions = torch.arange(arch.max_position_embeddings).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    half = arch.head_dim // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()
