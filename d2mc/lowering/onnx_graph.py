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
  slower than dispatch on CPU (benchmarks/onnx_export.py); with quantized experts ``com.microsoft::QMoE``
  (docs/quantization.md).

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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from d2mc.arch import BlockPlan
from d2mc.errors import OptionError, UserError
from d2mc.lowering.attention import FusedAttention, StandardAttention
from d2mc.lowering.builder import (
    MS_DOMAIN,
    PRECISIONS,
    ExternalData,
    GraphBuilder,
    matmul,
    nbits_attributes,
    nbits_inputs,
    norm,
)
from d2mc.lowering.experts import LoweredBlock, lower_experts

OPSET = {"onnxruntime": 21, "tensorrt": 18}
QUANTIZED_OPSET = 21
MOE_OPS = ("dispatch", "contrib")
FLAVOURS = ("onnxruntime", "tensorrt")
DATA_FILE = "model.onnx.data"  # the weights, beside model.onnx
LM_HEAD_TABLE = "lm_head.weight_t"  # [hidden, vocab]; with tied embeddings also the token embedding, by column


@dataclass(frozen=True)
class LoweringOptions:
    """What to emit: ``flavour`` (onnxruntime | tensorrt), the float ``precision`` (fp32 | fp16) of activations and
    float weights and, for the onnxruntime flavour, the MoE form ``moe_op`` (dispatch | contrib; the tensorrt
    flavour always uses the plugin) and the ``accuracy_level`` of quantized weights' ``MatMulNBits`` and ``QMoE``
    nodes. Which weights are quantized, and how, is the :class:`~d2mc.quantize.QuantizedModel` lowered."""

    precision: str = "fp32"
    moe_op: str = "dispatch"
    flavour: str = "onnxruntime"
    accuracy_level: int = 4

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise UserError(f"unknown ONNX flavour '{self.flavour}': choose one of {', '.join(FLAVOURS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}' for ONNX: choose fp32 or fp16")
        if self.moe_op not in MOE_OPS:
            raise UserError(f"unknown MoE lowering '{self.moe_op}': choose one of {', '.join(MOE_OPS)}")
        if self.accuracy_level not in range(5):
            raise OptionError(f"{{accuracy_level}} must be one of 0-4, not {self.accuracy_level}")


def lower_to_onnx(model, out_dir: str | Path, options: LoweringOptions | None = None, *, flavour: str | None = None,
                  precision: str | None = None, moe_op: str | None = None, quantized=None) -> Path:
    """Write ``model.onnx`` (+ ``model.onnx.data``) for a dense or converted model into ``out_dir``.

    ``options`` or the keywords ``flavour``, ``precision``, ``moe_op`` (keywords win) choose what is emitted.
    ``quantized``: the :class:`~d2mc.quantize.QuantizedModel` whose ``model`` is ``model``: its quantized Linears
    are emitted from their codes. Returns the path of ``model.onnx``.
    """
    options = options or LoweringOptions()
    overrides = {k: v for k, v in (("flavour", flavour), ("precision", precision), ("moe_op", moe_op)) if v}
    if overrides:
        options = LoweringOptions(**{**options.__dict__, **overrides})
    by_module = {}
    if quantized is not None:
        if quantized.model is not model:
            raise ValueError("lower a QuantizedModel's own model (quantized.model) with it")
        by_module = quantized.by_module()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ExternalData(out_dir / DATA_FILE)
    try:
        graph = _build_graph(model, options, GraphBuilder(*PRECISIONS[options.precision], data, by_module,
                                                          options.accuracy_level))
    finally:
        data.close()
    domains = {n.domain for n in graph.node} - {""}
    opset = QUANTIZED_OPSET if by_module else OPSET[options.flavour]  # block-wise DequantizeLinear is opset 21
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in sorted(domains)]
    onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="d2mc")
    onnx_model.ir_version = 10
    path = out_dir / "model.onnx"
    onnx.save_model(onnx_model, path)
    return path


def _build_graph(model, options: LoweringOptions, g: GraphBuilder) -> onnx.GraphProto:
    """The graph of ``model``, its weights written to ``g``'s external data file as they are lowered."""
    from d2mc.arch import ModelArch

    trt = options.flavour == "tensorrt"
    arch = ModelArch.from_config(model.config)
    onnx_dtype = g.onnx_dtype
    g.trt = trt
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

    head = g.quantized.get(model.lm_head)
    tied = embedding_is_tied(model)
    # a tied embedding reads the quantized LM head's own bytes (one copy of the vocabulary matrix)
    shared = head is not None and tied and not trt
    if head is None:
        logits_w = g.weight(LM_HEAD_TABLE, model.lm_head.weight.T)
    if shared:
        head_inputs = nbits_inputs(g, head, "lm_head.weight")
        rows = g.op1("Reshape", [head_inputs[0], g.const([head.shape[0], -1])])
        residual = g.op1("GatherBlockQuantized", [rows, "input_ids", *head_inputs[1:]], MS_DOMAIN, bits=head.bits,
                         block_size=head.block_size, gather_axis=0, quantize_axis=1)
    elif head is None and tied:  # the head's table, gathered by column ([hidden, batch, seq]), is the embedding
        residual = g.op1("Transpose", [g.op1("Gather", [logits_w, "input_ids"], axis=1)], perm=[1, 2, 0])
    else:
        residual = g.op1("Gather", [g.weight("embed_tokens", model.model.embed_tokens.weight), "input_ids"])
    delta = None
    attention_idx = 0
    for b, block in enumerate(blocks):
        if block.attention is not None:
            normed, residual = norm(g, residual, delta, block.input_norm, eps, f"blocks.{b}.input_norm")
            delta = attend(block.attention, normed, attention_idx, f"blocks.{b}")
            attention_idx += 1
        delta, residual = lower_experts(g, block, residual, delta, arch, eps, options.moe_op, f"blocks.{b}")
    normed, _ = norm(g, residual, delta, model.model.norm.weight, eps, "final_norm")
    if head is None:
        g.op("MatMul", [normed, logits_w], ["logits"])
    elif shared:
        g.op("MatMulNBits", [normed, *head_inputs], ["logits"], MS_DOMAIN, **nbits_attributes(g, head))
    else:
        matmul(g, normed, head, "lm_head.weight", "logits")

    return helper.make_graph(g.nodes, f"d2mc_{arch.family}_{options.flavour}", inputs, outputs, g.initializers)


def embedding_is_tied(model) -> bool:
    """Whether the LM head and the token embedding are one tensor (then the graph stores it once)."""
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


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
