"""The tensorrt target: plugin contract, reference math, engine plan, manifest, device-side script.

Everything here runs without a GPU; the tests that build or run an engine (or the CUDA kernels) skip with the
reason where TensorRT or a GPU is missing.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from d2mc.engine.build import plan_from_onnx, plugin_sources, trtexec_command
from d2mc.engine.device import local_gpu, tensorrt_version
from d2mc.engine.graph import read_graph
from d2mc.engine.manifest import (
    EngineManifest,
    check_engine_file,
    check_manifest,
    read_manifest,
    write_manifest,
)
from d2mc.engine.plan import EngineSettings, check_precision, plan_engine
from d2mc.engine.retarget import retarget_moe_nodes
from d2mc.errors import UserError
from d2mc.lowering import LoweringOptions, lower_to_onnx
from d2mc.ops.moe import MoePluginAttributes
from d2mc.profiles import load_profile
from tests.conftest import requires_real_model
from tests.moe_reference import (
    block_quantized_experts,
    block_reference,
    moe_block_onnx,
    moe_reference,
    plugin_node_onnx,
    plugin_weights,
    quantized_rtn,
    rms,
    run_expanded,
    unpack,
)
from tests.test_lowering import fused

gs = pytest.importorskip("onnx_graphsurgeon")
D2MC = str(Path(sys.executable).with_name("d2mc"))

needs_engine_machine = pytest.mark.skipif(
    tensorrt_version() is None or local_gpu() is None,
    reason="building or running an engine needs TensorRT and a CUDA GPU (this machine has "
           f"{'TensorRT ' + tensorrt_version() if tensorrt_version() else 'no TensorRT'} and "
           f"{'a GPU' if local_gpu() else 'no GPU'})")


def retargeted(tmp_path, precision="fp16", **plan):
    """A tiny converted model's contrib lowering with its MoE nodes turned into D2mcMoE plugin nodes."""
    model = fused("llama", **plan)
    path = lower_to_onnx(model, tmp_path / "lowered", LoweringOptions(precision=precision, moe_op="contrib"))
    proto = onnx.load(str(path), load_external_data=False)
    assert retarget_moe_nodes(proto) == 1
    out = tmp_path / "lowered" / "retargeted.onnx"
    onnx.save(proto, out)
    return model, out


def block_artifact(tmp_path, precision="fp16", bits=0, **plan):
    """An artifact whose tensorrt flavour is one MoE block of a tiny converted model (its experts quantized to
    ``bits``, block 32, when ``bits`` is 4 or 8)."""
    model = fused("llama", **plan)
    packed = None
    if bits:
        quantized = quantized_rtn(model, bits, 32)
        model, packed = quantized.model, block_quantized_experts(quantized.model.model.layers[2], quantized.linears, 2)
    moe_block_onnx(model.model.layers[2], tmp_path / "artifact" / "tensorrt" / "model.onnx", precision,
                   quantized=packed)
    return model, tmp_path / "artifact"


def test_plugin_nodes_carry_the_documented_attributes(tmp_path):
    _, path = retargeted(tmp_path, top_k=2, normalize=True, shared=1)
    graph = gs.import_onnx(onnx.load(str(path)))
    (node,) = [n for n in graph.nodes if n.op == "D2mcMoE"]
    assert node.domain == "d2mc"
    assert node.attrs == {"num_experts": 2, "num_shared": 0, "top_k": 2, "hidden_size": 64, "intermediate_size": 128,
                          "activation": "swiglu", "normalize": 1, "plugin_version": "1", "plugin_namespace": "d2mc"}
    hidden, logits, fc1, fc2 = node.inputs
    assert isinstance(fc1, gs.Constant) and list(fc1.shape) == [2, 256, 64] and fc1.dtype == np.float16
    assert isinstance(fc2, gs.Constant) and list(fc2.shape) == [2, 64, 128]
    assert not [n for n in graph.nodes if n.domain == "com.microsoft" and n.op == "MoE"]


def test_block_graph_holds_shared_experts_in_the_plugin(tmp_path):
    _, artifact = block_artifact(tmp_path, top_k=1, shared=1)
    model = onnx.load(str(artifact / "tensorrt" / "model.onnx"))
    onnx.checker.check_model(model)
    graph = gs.import_onnx(model)
    (node,) = [n for n in graph.nodes if n.op == "D2mcMoE"]
    assert (node.attrs["num_experts"], node.attrs["num_shared"]) == (2, 1)
    assert list(node.inputs[2].shape) == [3, 256, 64] and list(node.inputs[3].shape) == [3, 64, 128]
    assert {n.domain or "" for n in graph.nodes} == {"", "d2mc"}  # nothing TensorRT cannot parse


def _captured_moe_tensors(path, model, tokens=12):
    """Run the contrib lowering in ONNX Runtime and capture the MoE node's inputs and output."""
    import onnxruntime as ort

    proto = onnx.load(str(path))
    (node,) = [n for n in proto.graph.node if n.op_type == "MoE"]
    for name in (node.input[0], node.input[1], node.output[0]):
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0)).numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(tokens)[None, :]}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, 2, 0, 16), np.float32)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    return [torch.from_numpy(np.array(a)) for a in (outputs[node.input[0]], outputs[node.input[1]], weights[node.input[2]],
                                          weights[node.input[4]], outputs[node.output[0]])]


@pytest.mark.parametrize("top_k, normalize", [(1, True), (2, False), (2, True)])
def test_reference_matches_the_onnxruntime_lowering_of_the_block(tmp_path, top_k, normalize):
    model = fused("llama", top_k=top_k, normalize=normalize)
    path = lower_to_onnx(model, tmp_path, LoweringOptions(moe_op="contrib"))
    hidden, logits, fc1, fc2, expected = _captured_moe_tensors(path, model)
    attributes = MoePluginAttributes(num_experts=3, num_shared=0, top_k=top_k, hidden_size=64,
                                     intermediate_size=128, normalize=int(normalize))
    got = moe_reference(hidden, logits, fc1, fc2, attributes)
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("top_k, normalize, shared", [(1, True, 1), (2, False, 0), (2, True, 1)])
def test_reference_matches_the_pytorch_block(top_k, normalize, shared):
    block = fused("llama", top_k=top_k, normalize=normalize, shared=shared).model.layers[2]
    fc1, fc2, attributes = plugin_weights(block)
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    eps = block.experts[0].post_attention_layernorm.variance_epsilon
    with torch.no_grad():
        logits = block.router(hidden)
        got = hidden + moe_reference(rms(hidden, eps), logits, fc1, fc2, attributes)
        expected = block_reference(block, hidden)
        assert (got - expected).abs().max() < 1e-5
        # fp16: the kernels' rounding points, against the fp32 block
        half = moe_reference(rms(hidden, eps).half(), logits.half(), fc1.half(), fc2.half(), attributes)
        assert half.dtype == torch.float16
        assert ((hidden + half.float()) - expected).abs().max() < 2e-2


def split_block_model(shared=1, top_k=2):
    """A tiny model whose block 2 is layer 2's MLP cut into 4 experts of 32 neurons, each chosen one weighted 1."""
    from d2mc.restructure import dense_plan, restructure
    from tests.conftest import tiny_model

    plan = dense_plan(6)
    plan[2] = {"attention_layer": 2, "expert_layers": [2] * 4, "shared_experts": shared, "top_k": top_k,
               "normalize_topk": True, "expert_intermediate": 32, "routing_weights": "ones"}
    model = restructure(tiny_model("llama"), plan)
    torch.nn.init.normal_(model.model.layers[2].router.weight, std=0.5)
    return model


def test_unit_weights_reach_the_plugin_as_normalize_2(tmp_path):
    """Experts cut from one MLP count in full: the plugin node says normalize=2 and its reference (and the
    standard-op expansion ONNX Runtime runs) match the PyTorch block."""
    model = split_block_model()
    block = model.model.layers[2]
    fc1, fc2, attributes = plugin_weights(block)
    assert (attributes.num_experts, attributes.num_shared, attributes.top_k, attributes.intermediate_size,
            attributes.normalize) == (3, 1, 2, 32, 2)
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    eps = block.experts[0].post_attention_layernorm.variance_epsilon
    with torch.no_grad():
        got = hidden + moe_reference(rms(hidden, eps), block.router(hidden), fc1, fc2, attributes)
        assert (got - block_reference(block, hidden)).abs().max() < 1e-5
    path = lower_to_onnx(model, tmp_path, flavour="tensorrt")
    (node,) = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "D2mcMoE"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["normalize"], attrs["intermediate_size"], attrs["top_k"]) == (2, 32, 2)
    from d2mc.verify import verify_onnx

    assert verify_onnx(model, path, prefill=12, decode_steps=6).max_abs_diff < 1e-4
    with pytest.raises(UserError, match="normalize=3 must be 0, 1 or 2"):
        dataclasses.replace(attributes, normalize=3)


def quantized_model(bits=4, block_size=32, **plan):
    """A tiny converted model through the quantize step (round-to-nearest, every Linear but the router, the LM head
    int8), and its block 2's experts packed for the plugin."""
    quantized = quantized_rtn(fused("llama", **plan), bits, block_size)
    return quantized, block_quantized_experts(quantized.model.model.layers[2], quantized.linears, 2)


def dequantize_inputs(graph):
    """``{MatMul node name: its DequantizeLinear}`` over the MatMuls of ``graph`` (onnx-graphsurgeon) whose weight
    is dequantized, and the names of the float constant weights MatMuls read."""
    dequantized, float_weights = {}, []
    for node in graph.nodes:
        if node.op != "MatMul":
            continue
        weight = node.inputs[1]
        if weight.inputs and weight.inputs[0].op == "DequantizeLinear":
            dequantized[node.name] = weight.inputs[0]
        elif isinstance(weight, gs.Constant):
            float_weights.append(weight.name)
    return dequantized, float_weights


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_quantized_dense_graph_dequantizes_before_every_matmul(tmp_path, family, precision):
    """A dense model with every Linear int4 in blocks of 64 (the LM head int8 per channel): DequantizeLinear (opset
    21, signed codes, no zero point, scales in the graph's type; block-wise on axis 0, per channel on axis 1) before
    each projection's MatMul; onnx.checker passes, the engine planner takes it, ONNX Runtime runs it and it matches
    PyTorch computing with the dequantized weights."""
    from d2mc.verify import verify_onnx
    from tests.conftest import tiny_model

    quantized = quantized_rtn(tiny_model(family), 4, 64, "int8")  # H = 64: one int8 block per row of the LM head
    model = quantized.model
    path = lower_to_onnx(model, tmp_path, flavour="tensorrt", precision=precision, quantized=quantized)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 21)]
    dequantized, float_weights = dequantize_inputs(gs.import_onnx(proto))
    assert float_weights == [] and len(dequantized) == len(quantized.linears) == 6 * 7 + 1
    scale_type = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    initializers = {i.name: i for i in proto.graph.initializer}
    for matmul, node in dequantized.items():
        codes, scales = (initializers[t.name] for t in node.inputs)
        head = "lm_head" in codes.name
        assert node.attrs == ({"axis": 1} if head else {"axis": 0, "block_size": 64}), matmul
        assert codes.data_type == (onnx.TensorProto.INT8 if head else onnx.TensorProto.INT4), codes.name
        assert scales.data_type == scale_type, scales.name
        assert list(scales.dims) == ([codes.dims[1]] if head else [codes.dims[0] // 64, codes.dims[1]]), scales.name
    summary = read_graph(path)
    assert (summary.quantization.bits, summary.quantization.block_sizes, summary.quantization.dequantize_nodes,
            summary.quantization.dequantize_formats, summary.quantization.plugin_nodes) == (
        (4, 8), (64,), 43, ((4, 64), (8, 0)), 0)
    if precision == "fp16":
        plan = plan_engine(summary, load_profile("orin-agx"), EngineSettings(), 512)
        assert plan.precision == "int4" and plan.quantization()["activations"] == "fp16"
    result = verify_onnx(model, path, precision, prefill=12, decode_steps=6)
    assert result.passed and result.greedy_agreement == 1.0
    assert result.max_abs_diff < (1e-4 if precision == "fp32" else 5e-3)


@pytest.mark.parametrize("bits, block_size", [(4, 32), (8, 64)])
def test_quantized_plugin_node_carries_packed_weights_scales_and_attributes(tmp_path, bits, block_size):
    quantized, _ = quantized_model(bits, block_size, top_k=2, shared=1)
    path = lower_to_onnx(quantized.model, tmp_path, flavour="tensorrt", precision="fp16", quantized=quantized)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    graph = gs.import_onnx(proto)
    (node,) = [n for n in graph.nodes if n.op == "D2mcMoE"]
    assert node.attrs == {"num_experts": 2, "num_shared": 1, "top_k": 2, "hidden_size": 64, "intermediate_size": 128,
                          "activation": "swiglu", "normalize": 1, "weight_bits": bits, "block_size": block_size,
                          "plugin_version": "1", "plugin_namespace": "d2mc"}
    _, _, fc1, fc2, fc1_scales, fc2_scales = node.inputs
    assert all(isinstance(t, gs.Constant) for t in (fc1, fc2, fc1_scales, fc2_scales))
    assert (list(fc1.shape), fc1.dtype) == ([3, 256, 64 * bits // 8], np.int8)
    assert (list(fc2.shape), fc2.dtype) == ([3, 64, 128 * bits // 8], np.int8)
    assert (list(fc1_scales.shape), fc1_scales.dtype) == ([3, 256, 64 // block_size], np.float16)
    assert (list(fc2_scales.shape), fc2_scales.dtype) == ([3, 64, 128 // block_size], np.float16)
    summary = read_graph(path)
    assert summary.moe_nodes[0].attributes.weight_bits == bits


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips_against_the_reference(bits):
    quantized, packed = quantized_model(bits, 32, top_k=2, shared=1)
    block = quantized.model.model.layers[2]
    fc1 = unpack(packed.fc1, packed.fc1_scales, bits, 32)
    fc2 = unpack(packed.fc2, packed.fc2_scales, bits, 32)
    float_fc1, float_fc2 = plugin_weights(block)[:2]  # the same experts in the float layout: dequantized weights
    assert torch.equal(fc1, float_fc1) and torch.equal(fc2, float_fc2)
    # the bytes are ONNX's own INT4 (INT8) tensor of the logical shape, which the reference graph relies on
    gate = quantized.linears["model.layers.2.experts.1.mlp.gate_proj"]
    signed = gate.codes.to(torch.int16) - 2 ** (bits - 1)
    tensor = onnx.TensorProto(data_type=onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8,
                              dims=[256, 64], raw_data=packed.fc1[1].tobytes())
    assert np.array_equal(onnx.numpy_helper.to_array(tensor)[0::2], signed.numpy())
    if bits == 4:
        assert packed.fc1.shape[-1] == 32 and packed.fc1.view(np.uint8)[1, 0, 0] == (
            (int(signed[0, 0]) & 0xF) | (int(signed[0, 1]) & 0xF) << 4)  # column 0 in the low nibble


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("bits, top_k, normalize, shared", [(4, 2, True, 1), (4, 1, True, 0), (8, 2, False, 1)])
def test_quantized_reference_equals_the_expanded_graph(precision, bits, top_k, normalize, shared):
    """The plugin's quantized math on CPU (the reference on unpacked weights) against ONNX Runtime running the
    standard-op expansion of the node (DequantizeLinear on the packed bytes)."""
    quantized, packed = quantized_model(bits, 32, top_k=top_k, normalize=normalize, shared=shared)
    attributes = plugin_weights(quantized.model.model.layers[2], packed)[2]
    proto = plugin_node_onnx(attributes, packed, precision)
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(10, 64, generator=generator)
    hidden = hidden.half() if precision == "fp16" else hidden
    logits = torch.randn(10, attributes.num_experts, generator=generator)
    got = run_expanded(proto, hidden, logits)
    onnx.checker.check_model(proto)
    assert "DequantizeLinear" in {n.op_type for n in proto.graph.node} and got.dtype == hidden.dtype
    scale_type = np.float16 if precision == "fp16" else np.float32  # the scales the graph holds
    fc1, fc2 = (unpack(codes, scales.astype(scale_type), bits, 32)
                for codes, scales in ((packed.fc1, packed.fc1_scales), (packed.fc2, packed.fc2_scales)))
    expected = moe_reference(hidden, logits, fc1, fc2, dataclasses.replace(attributes, weight_bits=0, block_size=0))
    difference = (got.float() - expected.float()).abs().max()
    assert difference < (1e-5 if precision == "fp32" else 2e-3), difference


@pytest.mark.parametrize("bits, block_size, precision", [(4, 32, "fp32"), (4, 64, "fp16"), (8, 32, "fp16")])
def test_quantized_tensorrt_export_verifies_against_pytorch(tmp_path, bits, block_size, precision):
    """The whole tiny converted model quantized, its experts int4 (int8) in the plugin and every other Linear but the
    router dequantized before its MatMul, run by ONNX Runtime with the node expanded, against PyTorch computing with
    the dequantized weights."""
    from d2mc.verify import verify_onnx

    quantized, _ = quantized_model(bits, block_size, top_k=2, shared=1)
    path = lower_to_onnx(quantized.model, tmp_path, flavour="tensorrt", precision=precision, quantized=quantized)
    dequantized, float_weights = dequantize_inputs(gs.import_onnx(onnx.load(str(path))))
    assert float_weights == ["blocks.2.router.weight_t"]  # routers stay float
    assert len(dequantized) == len(quantized.linears) - 3 * 3  # the plugin reads the experts' codes itself
    result = verify_onnx(quantized.model, path, precision, prefill=12, decode_steps=6)
    assert result.passed and result.greedy_agreement == 1.0
    assert result.max_abs_diff < (1e-5 if precision == "fp32" else 5e-3)


@pytest.mark.real_model
@pytest.mark.slow
@requires_real_model
@pytest.mark.parametrize("plan", ["dense", "12-13,16-17"])
def test_smollm2_int4_tensorrt_onnx_verifies_with_the_plugin_expanded(tmp_path, plan):
    """SmolLM2-135M dense, and converted by LF-UC (layers 12-13 and 16-17 fused), every Linear but the routers int4
    (the quantize step by RTN, block 64: 128 does not divide H = 576; the LM head int4 too, and the tied embedding
    follows it), lowered to the tensorrt
    flavour in fp16 and run by ONNX Runtime with DequantizeLinear and the plugin nodes expanded, against PyTorch
    computing with the same dequantized weights: within the fp16 tolerance (1% of the largest logit), every greedy
    token the same."""
    from d2mc.convert import ConvertOptions, convert
    from d2mc.loading import load_model
    from d2mc.verify import verify_onnx

    loaded = load_model("smollm2-135m")
    if plan == "dense":
        model = loaded.model.eval()
    else:
        model = convert(loaded, ConvertOptions(plan=plan, calib_sequences=2, calib_length=32,
                                               reconstruct_steps=5)).model.eval()
    quantized = quantized_rtn(model, 4, 64, "int4")
    path = lower_to_onnx(quantized.model, tmp_path, flavour="tensorrt", precision="fp16", quantized=quantized)
    summary = read_graph(path)
    experts = 2 * 2 * 3 if plan != "dense" else 0  # two MoE blocks of two experts, read by the plugin
    assert summary.quantization.dequantize_nodes == len(quantized.linears) - experts
    assert [(n.attributes.weight_bits, n.attributes.block_size) for n in summary.moe_nodes] == [(4, 64)] * (
        2 if experts else 0)
    assert plan_engine(summary, load_profile("orin-agx"), EngineSettings(), 8192).precision == "int4"
    result = verify_onnx(quantized.model, path, "fp16", prefill=16, decode_steps=8)
    print(f"{plan}: max |logit difference| {result.max_abs_diff:.4f} (tolerance {result.tolerance:.4f})")
    assert result.passed and result.greedy_agreement == 1.0


def test_quantized_experts_the_plugin_cannot_take_are_refused(tmp_path):
    from d2mc.ops.moe import pack_quantized_experts
    from d2mc.quantize import quantize_rtn

    quantized, _ = quantized_model(4, 32, top_k=2)
    model, linears = quantized.model, quantized.linears
    experts = model.model.layers[2].experts
    up = "model.layers.2.experts.0.mlp.up_proj"

    def lower(changed):
        lower_to_onnx(model, tmp_path, flavour="tensorrt", quantized=dataclasses.replace(quantized, linears=changed))

    with pytest.raises(UserError, match="takes symmetric expert weights"):
        lower({**linears, up: quantize_rtn(experts[0].mlp.up_proj.weight, 4, 32, symmetric=False)})
    with pytest.raises(UserError, match="must share one bit width and block size, not 4 bits / block 32, 8 bits"):
        lower({**linears, up: quantize_rtn(experts[0].mlp.up_proj.weight, 8, 32)})
    with pytest.raises(ValueError, match="some expert projections are quantized and some are not"):
        lower({k: v for k, v in linears.items() if ".experts.1." not in k})
    with torch.no_grad():
        experts[1].post_attention_layernorm.weight.mul_(2)
    with pytest.raises(ValueError, match="expert 1 keeps its norm weight beside quantized projections"):
        lower(linears)
    with pytest.raises(ValueError, match="takes 4 inputs"):
        pack = pack_quantized_experts([(linears["model.layers.2.experts.0.mlp.gate_proj"],) * 3])
        assert pack.bits == 4
        from d2mc.ops.moe import moe_plugin_node

        moe_plugin_node("moe", "h", "l", "fc1", "fc2", "out", MoePluginAttributes(2, 0, 1, 64, 128), ("s1", "s2"))
    attributes = MoePluginAttributes(2, 0, 1, 64, 128, weight_bits=4, block_size=32)
    assert attributes.weight_shapes() == {"fc1": (2, 256, 32), "fc2": (2, 64, 64), "fc1_scales": (2, 256, 2),
                                          "fc2_scales": (2, 64, 4)}
    with pytest.raises(UserError, match=r"block_size=48 must be a multiple of 16 dividing hidden_size=64"):
        dataclasses.replace(attributes, block_size=48)
    with pytest.raises(UserError, match="weight_bits=3 must be 0"):
        dataclasses.replace(attributes, weight_bits=3)
    with pytest.raises(UserError, match="block_size=32 needs quantized weights"):
        dataclasses.replace(attributes, weight_bits=0)


def test_engine_profiles_from_the_tiny_model_onnx(tmp_path):
    _, path = retargeted(tmp_path)
    graph = read_graph(path)
    assert graph.precision == "fp16" and len(graph.moe_nodes) == 1 and graph.weight_bytes > 0
    plan = plan_engine(graph, load_profile("orin-agx"), EngineSettings(max_input=64, max_kv=255, opt_kv=100), 512)
    prefill, decode = plan.shapes["prefill"], plan.shapes["decode"]
    assert (prefill["input_ids"].min, prefill["input_ids"].opt, prefill["input_ids"].max) == ((1, 1), (1, 64), (1, 64))
    assert prefill["past_key_values.0.key"].max == (1, 2, 0, 16)  # no past in a prefill
    assert (decode["input_ids"].min, decode["input_ids"].max) == ((1, 1), (1, 1))
    assert (decode["past_key_values.3.value"].min, decode["past_key_values.3.value"].opt,
            decode["past_key_values.3.value"].max) == ((1, 2, 0, 16), (1, 2, 100, 16), (1, 2, 255, 16))
    assert decode["attention_mask"].max == (1, 256)  # past + the new token
    assert len(prefill) == 3 + 2 * 4  # ids, mask, positions and 4 attention blocks' K and V
    # 4 blocks x K,V x 2 KV heads x 16 x 256 tokens x fp16, past in and present out
    assert plan.kv_bytes == 2 * 8 * 2 * 16 * 256 * 2
    assert plan.workspace_bytes == int(64e9 * 0.25)
    profiles = plan.polygraphy_profiles()
    assert [tuple(p.keys()) for p in profiles] == [tuple(prefill), tuple(decode)]
    assert profiles[1]["past_key_values.0.key"].max == (1, 2, 255, 16)


def test_unsupported_precisions_are_refused_with_the_reason(tmp_path):
    with pytest.raises(UserError, match=r"^orin-agx \(SM 8\.7\) has no TensorRT fp8: it supports fp32, fp16, bf16, "
                                        r"int8, int4 \(source: TensorRT Support Matrix"):
        check_precision(load_profile("orin-agx"), "fp8")
    with pytest.raises(UserError, match=r"^bf16 engines need a bf16 ONNX, which d2mc does not export: choose one "
                                        r"of fp16, fp32, int8, int4$"):
        check_precision(load_profile("orin-agx"), "bf16")
    check_precision(load_profile("orin-agx"), "int4")
    with pytest.raises(UserError, match="has no TensorRT"):
        check_precision(load_profile("host-cpu"), "fp16")
    check_precision(load_profile("thor"), "fp16")
    _, path = retargeted(tmp_path)
    with pytest.raises(UserError, match="computes in fp16 but fp32 was asked: .* export it with --precision fp32"):
        plan_engine(read_graph(path), load_profile("orin-agx"), EngineSettings(precision="fp32"))


def test_memory_of_the_device_bounds_the_plan(tmp_path):
    _, path = retargeted(tmp_path)
    graph = read_graph(path)
    small = dataclasses.replace(load_profile("orin-agx"), memory_gb=0.2)
    with pytest.raises(UserError, match=r"^orin-agx has 0.2 GB; weights \(0.00 GB\) and the KV cache at 511 past "
                                        r"tokens, batch 1000 \(0.52 GB\) leave no room for TensorRT's workspace: "
                                        r"lower max_kv or max_batch$"):
        plan_engine(graph, small, EngineSettings(max_kv=511, max_batch=1000), 512)
    assert plan_engine(graph, small, EngineSettings(max_kv=16), 512).workspace_bytes == int(0.2e9 * 0.25)
    plan = plan_engine(graph, small, EngineSettings(max_kv=16, workspace_gb=1), 512)
    assert plan.workspace_bytes < 0.2e9 * 0.9 and "capped" in plan.notes[0]
    with pytest.raises(UserError, match="exceed the model's context of 512 tokens"):
        plan_engine(graph, load_profile("orin-agx"), EngineSettings(max_kv=600), 512)


def test_the_onnxruntime_flavour_is_refused_in_one_line(tmp_path):
    path = lower_to_onnx(fused("llama"), tmp_path)
    with pytest.raises(UserError, match=r"is the onnxruntime flavour: TensorRT cannot parse "
                                        r"com\.microsoft::GroupQueryAttention.*d2mc export MODEL --format tensorrt"):
        plan_from_onnx(path, load_profile("orin-agx"))


def test_build_writes_the_device_side_script_and_says_so(tmp_path):
    from d2mc.cli import main

    _, artifact = block_artifact(tmp_path, top_k=2, shared=1)
    if tensorrt_version() is not None and local_gpu() is not None:
        pytest.skip("this machine could build the engine itself")
    result = subprocess.run([D2MC, "build", str(artifact), "--target", "orin-agx",
                             "--max-input", "256"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    out = artifact / "engine-orin-agx"
    assert lines == [f"engine not built here (TensorRT is not installed here); on the orin-agx run: bash "
                     f"{out.resolve()}/build.sh"] and not result.stderr
    assert {p.name for p in out.iterdir()} == {"plan.json", "build.sh", "plugin", ".d2mc-output"}
    assert (out / "plugin" / "CMakeLists.txt").is_file() and (out / "plugin" / "moeKernels.cu").is_file()
    script = (out / "build.sh").read_text()
    assert subprocess.run(["bash", "-n", str(out / "build.sh")]).returncode == 0
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in script
    assert "exec d2mc build .. --target orin-agx --precision fp16 --max-input 256 --max-kv 4095 --max-batch 1" in script
    trtexec = script[script.index('"$TRTEXEC"'):]
    for expected in ("--onnx=../tensorrt/model.onnx", "--saveEngine=model.engine", "--stronglyTyped",
                     "--profile=0", "--minShapes=hidden:1x1x64", "--optShapes=hidden:1x128x64",
                     "--maxShapes=hidden:1x256x64", "--profile=1", "--maxShapes=hidden:1x1x64",
                     "--dynamicPlugins=plugin/build/libd2mc_moe_plugin.so",
                     "--setPluginsToSerialize=plugin/build/libd2mc_moe_plugin.so", "--memPoolSize=workspace:"):
        assert expected in trtexec, expected
    plan = json.loads((out / "plan.json").read_text())
    assert plan["device"] == "orin-agx" and plan["moe_nodes"][0]["top_k"] == 2
    # the same through the Python API, and an unknown target is one line
    with pytest.raises(SystemExit) as exit_info:
        main(["build", str(artifact), "--target", "nope"])
    assert exit_info.value.code == 1


def test_int4_tensorrt_export_and_engine_plan_end_to_end(tmp_path, tiny_checkpoint_with_tokenizer):
    """d2mc export --format tensorrt --precision int4 quantizes as TensorRT takes it (blocks of 64, a float LM head),
    verifies, and d2mc build plans the int4 engine from it without --precision; a converted model's MoE blocks go
    through the plugin's quantized path in the same export."""
    from d2mc.targets.onnxruntime import export_onnx

    from d2mc.quantize import QuantizeOptions, quantize_model

    out = tmp_path / "dense-int4"
    result = subprocess.run([D2MC, "export", str(tiny_checkpoint_with_tokenizer), "--format", "tensorrt",
                             "--precision", "int4", "-o", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ("(tensorrt, int4 rtn block 64 (calibrated at int8 per channel), LM head float, fp16 activations"
            in " ".join(result.stdout.split()))
    assert "as shipped" not in result.stdout  # the tensorrt format ships what was verified
    info = json.loads((out / "d2mc_artifact.json").read_text())
    assert info["precision"] == "int4" and info["quantization"]["tensorrt"] and info["verify"]["passed"]
    result = subprocess.run([D2MC, "build", str(out), "--target", "orin-agx", "--no-build"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    plan = json.loads((out / "engine-orin-agx" / "plan.json").read_text())
    assert plan["precision"] == "int4" and plan["quantization"] == {
        "method": "rtn", "bits": [4, 8], "block_sizes": [64], "dequantize_nodes": 8 * 7, "plugin_nodes": 0,
        "weight_only": True, "activations": "fp16"}
    quantized = quantize_model(fused("llama", top_k=2, shared=1), QuantizeOptions("int4", tensorrt=True,
                                                                                 mixed_precision="none"))
    exported = export_onnx(quantized.model, None, tmp_path / "moe-int4", flavour="tensorrt", precision="fp16",
                           quantized=quantized)
    assert exported.verify["passed"] and exported.verify["greedy_agreement"] == 1.0
    summary = read_graph(tmp_path / "moe-int4" / "model.onnx")
    assert (summary.quantization.plugin_nodes, summary.quantization.dequantize_formats) == (1, ((4, 64),))
    assert plan_engine(summary, load_profile("orin-agx"), EngineSettings(), 512).precision == "int4"


def _profile_without_int4(tmp_path):
    """orin-agx's profile, as a file, without int4 in its TensorRT precisions (as a device whose TensorRT has no
    int4 weight-only kernels would say)."""
    text = load_profile("orin-agx").path.read_text()
    text = text.replace('name = "orin-agx"', 'name = "gpu-without-int4"').replace(
        'aliases = ["jetson-agx-orin-64gb", "agx-orin-64gb"]', "aliases = []").replace(
        'tensorrt_precisions = ["fp32", "fp16", "bf16", "int8", "int4"]', 'tensorrt_precisions = ["fp32", "fp16"]')
    path = tmp_path / "gpu-without-int4.toml"
    path.write_text(text)
    return path


def test_int4_engine_plan_and_build_script_for_orin_agx(tmp_path):
    """Weight-only int4 on orin-agx, the precision the ONNX holds when none is asked: the plan records the
    quantization, and build.sh builds a strongly typed network with no precision flags (the int4 codes, their fp16
    scales and the fp16 activations are the ONNX's own types)."""
    _, artifact = block_artifact(tmp_path, bits=4, top_k=2, shared=1)
    (artifact / "tensorrt" / "d2mc_artifact.json").write_text(json.dumps({"quantization": {"quant_method": "rtn"}}))
    if tensorrt_version() is not None and local_gpu() is not None:
        pytest.skip("this machine could build the engine itself")
    result = subprocess.run([D2MC, "build", str(artifact), "--target", "orin-agx",
                             "--max-input", "256"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = artifact / "engine-orin-agx"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["precision"] == "int4"
    assert plan["quantization"] == {"method": "rtn", "bits": [4], "block_sizes": [32], "dequantize_nodes": 0,
                                    "plugin_nodes": 1, "weight_only": True, "activations": "fp16"}
    assert plan["moe_nodes"][0]["weight_bits"] == 4 and plan["moe_nodes"][0]["block_size"] == 32
    script = (out / "build.sh").read_text()
    assert subprocess.run(["bash", "-n", str(out / "build.sh")]).returncode == 0
    assert ("# Build the TensorRT engine for orin-agx (SM 8.7, int4 weight-only: int4 codes in blocks of 32, fp16 "
            "activations, from the ONNX's types) on the device.") in script
    assert "exec d2mc build .. --target orin-agx --precision int4 --max-input 256" in script
    trtexec = script[script.index('"$TRTEXEC"'):]
    assert "--stronglyTyped" in trtexec and "--dynamicPlugins=plugin/build/libd2mc_moe_plugin.so" in trtexec
    assert not {"--fp16", "--int8", "--best", "--bf16"} & {a.strip(" \\\n") for a in trtexec.split()}
    # the Python API writes the same plan, and the manifest of a build records the quantization
    from d2mc.targets.tensorrt import build

    engine = build(artifact, "orin-agx", EngineSettings(precision="int4", max_input=256))
    assert engine.engine_plan.quantization() == plan["quantization"]
    _, path = retargeted(tmp_path)  # a float ONNX: its own type
    assert plan_engine(read_graph(path), load_profile("orin-agx"), EngineSettings(), 512).precision == "fp16"


def test_quantized_precisions_are_checked_against_the_profile_and_the_onnx(tmp_path):
    _, artifact = block_artifact(tmp_path, bits=4, top_k=2)
    graph = read_graph(artifact / "tensorrt" / "model.onnx")
    assert graph.quantization.bits == (4,) and graph.quantization.method is None
    profile = load_profile("orin-agx")
    assert plan_engine(graph, profile, EngineSettings(precision="int4"), 512).quantization()["method"] is None
    with pytest.raises(UserError, match=r"holds int4 weights \(weight-only, fp16 activations\) but fp16 was asked: "
                                        r"build it with --precision int4$"):
        plan_engine(graph, profile, EngineSettings(precision="fp16"), 512)
    with pytest.raises(UserError, match=r"^int8 engines are weight-only int8, and the ONNX at .* holds int4 weights: "
                                        r"export it with --precision int8$"):
        plan_engine(graph, profile, EngineSettings(precision="int8"), 512)
    _, path = retargeted(tmp_path)
    with pytest.raises(UserError, match=r"^int4 engines are weight-only int4, and the ONNX at .* holds float "
                                        r"weights: export it with --precision int4$"):
        plan_engine(read_graph(path), profile, EngineSettings(precision="int4"), 512)
    # a device whose TensorRT has no int4: refused first, with the profile's reason, on the command line too
    without = _profile_without_int4(tmp_path)
    with pytest.raises(UserError, match=r"^gpu-without-int4 \(SM 8\.7\) has no TensorRT int4: it supports fp32, "
                                        r"fp16 \(source: TensorRT Support Matrix"):
        plan_engine(graph, load_profile(str(without)), EngineSettings(precision="int4"), 512)
    result = subprocess.run([D2MC, "build", str(artifact), "--target", str(without), "--precision", "int4"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: gpu-without-int4 (SM 8.7) has no TensorRT int4: it supports fp32, fp16 (source: TensorRT Support "
        "Matrix: SM 8.7 supports FP32, FP16, BF16, INT8 and INT4 weight-only; no FP8)"]
    assert not (artifact / "engine-gpu-without-int4").exists()


def _dense_qdq_graph(path, symmetric=True, block=64):
    """``logits = x @ DequantizeLinear(W)`` with W a block-quantized int4 (or uint4 with zero points) initializer
    ``[in, out]`` (opset 21, axis 0, ``block``), as another exporter would write a dense projection."""
    from onnx import helper, numpy_helper

    from d2mc.quantize import quantize_rtn

    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_rtn(weight, 4, block, symmetric)
    codes = (q.signed_codes() if symmetric else q.codes.numpy()).T
    scales = q.scales.T.numpy()
    zero_points = None if symmetric else q.zero_points.T.numpy()
    kind = onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4
    initializers = [helper.make_tensor("w", kind, codes.shape, codes.flatten().tolist()),
                    numpy_helper.from_array(scales.astype(np.float16), "w_scale")]
    inputs = ["w", "w_scale"]
    if zero_points is not None:
        initializers.append(helper.make_tensor("w_zero", kind, zero_points.shape, zero_points.flatten().tolist()))
        inputs.append("w_zero")
    nodes = [helper.make_node("DequantizeLinear", inputs, ["w_fp16"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w_fp16"], ["logits"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16,
                                                                           ["batch_size", "sequence_length", 64])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT16,
                                                             ["batch_size", "sequence_length", 48])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)
    return model, q


def test_dense_qdq_weights_are_read_and_what_tensorrt_cannot_dequantize_refused(tmp_path):
    import onnxruntime as ort

    model, q = _dense_qdq_graph(tmp_path / "model.onnx")
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(1)).half()
    (got,) = session.run(None, {"x": x.numpy()})
    expected = x.float() @ q.dequantize().half().float().T  # the fp16 weights DequantizeLinear gives
    assert np.abs(got.astype(np.float32) - expected.numpy()).max() < 2e-2
    graph = read_graph(tmp_path / "model.onnx")
    assert graph.quantization is not None
    assert (graph.quantization.bits, graph.quantization.block_sizes, graph.quantization.dequantize_nodes,
            graph.quantization.dequantize_formats, graph.quantization.plugin_nodes) == ((4,), (64,), 1, ((4, 64),), 0)
    from d2mc.engine.plan import check_graph_precision

    check_graph_precision(graph, "int4")
    _dense_qdq_graph(tmp_path / "asym.onnx", symmetric=False)
    with pytest.raises(UserError, match="TensorRT dequantizes symmetric weights only"):
        check_graph_precision(read_graph(tmp_path / "asym.onnx"), "int4")
    _dense_qdq_graph(tmp_path / "block32.onnx", block=32)
    with pytest.raises(UserError, match=r"dequantizes int4 weights in blocks of 32; TensorRT takes int4 in blocks of "
                                        r"64 or 128 \(TensorRT documentation, Quantization Schemes: .*\): export it "
                                        r"with --block-size 64 or 128$"):
        check_graph_precision(read_graph(tmp_path / "block32.onnx"), "int4")


def test_int8_weights_are_dequantized_per_channel_for_tensorrt(tmp_path):
    """int8 codes with one scale per row lower to a per-channel DequantizeLinear (axis 1), the form TensorRT takes
    and plans; int8 in blocks lowers (ONNX Runtime runs it) but the engine planner refuses it with the reason."""
    from d2mc.quantize import QuantizedModel, QuantizeOptions, quantize_rtn
    from d2mc.verify import verify_onnx
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    linears = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears[name] = quantize_rtn(module.weight, 8, module.in_features)  # one block per row
            with torch.no_grad():
                module.weight.copy_(linears[name].dequantize())
    quantized = QuantizedModel(model, linears, QuantizeOptions("int8", "rtn"), "", 0.0)
    path = lower_to_onnx(model, tmp_path / "per-channel", flavour="tensorrt", precision="fp16", quantized=quantized)
    dequantized, _ = dequantize_inputs(gs.import_onnx(onnx.load(str(path))))
    assert {tuple(sorted(n.attrs.items())) for n in dequantized.values()} == {(("axis", 1),)}
    summary = read_graph(path)
    assert summary.quantization.dequantize_formats == ((8, 0),)
    plan = plan_engine(summary, load_profile("orin-agx"), EngineSettings(), 512)
    assert plan.precision == "int8" and plan.quantization()["block_sizes"] == []
    result = verify_onnx(model, path, "fp16", prefill=12, decode_steps=6)
    assert result.passed and result.greedy_agreement == 1.0
    blocked = dataclasses.replace(quantized, linears={n: quantize_rtn(q.dequantize(), 8, 32) for n, q in linears.items()})
    path = lower_to_onnx(model, tmp_path / "blocked", flavour="tensorrt", precision="fp16", quantized=blocked)
    with pytest.raises(UserError, match=r"dequantizes int8 weights in blocks of 32; TensorRT takes int8 weights with "
                                        r"one scale per channel"):
        plan_engine(read_graph(path), load_profile("orin-agx"), EngineSettings(), 512)


def test_trtexec_command_lists_both_profiles_for_every_input(tmp_path):
    _, path = retargeted(tmp_path)
    plan = plan_engine(read_graph(path), load_profile("orin-nano-8gb"), EngineSettings(max_input=32, max_kv=127), 512)
    args = trtexec_command(plan, "model.onnx", "model.engine", None)
    assert args.count("--profile=0") == args.count("--profile=1") == 1
    decode_max = args[args.index("--profile=1") + 3]
    assert decode_max.startswith("--maxShapes=input_ids:1x1,attention_mask:1x128,position_ids:1x1,")
    assert "past_key_values.3.value:1x2x127x16" in decode_max
    assert not any(a.startswith("--dynamicPlugins") for a in args)


def _manifest(**overrides):
    values = dict(tensorrt_version="10.3.0", device="orin-agx", gpu="Orin", sm="8.7", precision="fp16",
                  profiles={}, max_input=256, max_kv=511, max_batch=1, workspace_bytes=1 << 30,
                  onnx={"path": "../tensorrt/model.onnx", "sha256": "0"},
                  engine={"file": "model.engine", "sha256": "0", "bytes": 5}, plugin=None)
    values.update(overrides)
    return EngineManifest(**values)


def test_manifest_round_trip_and_its_mismatch_errors(tmp_path):
    from d2mc.engine.manifest import sha256_of

    (tmp_path / "model.engine").write_bytes(b"plan!")
    manifest = _manifest(engine={"file": "model.engine", "sha256": sha256_of(tmp_path / "model.engine"), "bytes": 5},
                         precision="int4", quantization={"method": "gptq", "bits": [4], "block_sizes": [64],
                                                         "weight_only": True, "activations": "fp16"})
    write_manifest(manifest, tmp_path)
    assert read_manifest(tmp_path) == manifest and read_manifest(tmp_path).quantization["bits"] == [4]
    # a manifest written before quantized engines reads as a float engine
    older = json.loads((tmp_path / "manifest.json").read_text())
    del older["quantization"]
    (tmp_path / "manifest.json").write_text(json.dumps(older))
    assert read_manifest(tmp_path).quantization is None
    write_manifest(manifest, tmp_path)
    check_manifest(manifest, "10.3.0", "8.7", tmp_path)
    check_engine_file(manifest, tmp_path)
    with pytest.raises(UserError) as error:
        check_manifest(manifest, "11.4.0", "9.0", tmp_path)
    assert str(error.value) == (f"the engine in '{tmp_path}' was built with TensorRT 10.3.0, this machine has 11.4.0 "
                                f"and for SM 8.7 (Orin), this machine has SM 9.0: rebuild it on this machine with "
                                f"d2mc build")
    with pytest.raises(UserError, match=r"built with SM 8\.7 \(Orin\), this machine has no CUDA GPU"):
        check_manifest(manifest, "10.3.0", None, tmp_path)
    (tmp_path / "model.engine").write_bytes(b"plan?")
    with pytest.raises(UserError, match="does not match its manifest"):
        check_engine_file(manifest, tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="is corrupt"):
        read_manifest(tmp_path)
    with pytest.raises(UserError, match="no manifest.json in .*: build the engine with d2mc build"):
        read_manifest(tmp_path / "none")


@pytest.mark.skipif(tensorrt_version() is not None and local_gpu() is not None, reason="this machine runs engines")
def test_verify_tensorrt_without_tensorrt_is_one_line(tmp_path):
    _, artifact = block_artifact(tmp_path)
    engine_dir = artifact / "engine-orin-agx"
    engine_dir.mkdir()
    write_manifest(_manifest(), engine_dir)
    result = subprocess.run([D2MC, "verify", str(artifact), "--backend", "tensorrt"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: verify --backend tensorrt runs the engine on its device (orin-agx, SM 8.7): TensorRT is not "
        "installed here"]


def test_profile_measure_engine_without_tensorrt_is_one_line(tmp_path):
    model, artifact = block_artifact(tmp_path)
    model.config.save_pretrained(artifact)
    engine_dir = artifact / "engine-orin-agx"
    engine_dir.mkdir()
    write_manifest(_manifest(), engine_dir)
    result = subprocess.run([D2MC, "profile", str(artifact), "--target", "orin-agx", "--context", "64", "--measure",
                             "--engine"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: measuring the engine runs the engine on its device (orin-agx, SM 8.7): TensorRT is not installed here"]


def test_plugin_sources_ship_with_the_package():
    names = {p.name for p in plugin_sources().iterdir()}
    assert {"CMakeLists.txt", "d2mcMoePlugin.cpp", "d2mcMoePlugin.h", "moeKernels.cu", "moeKernels.h"} <= names


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="the CUDA compiler (nvcc) is not installed")
def test_cuda_kernels_compile_for_jetson_orin(tmp_path):
    result = subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_87", "-c", str(plugin_sources() / "moeKernels.cu"),
                             "-o", str(tmp_path / "moe.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "moe.o").stat().st_size > 0


def _tensorrt_headers():
    import os
    from pathlib import Path

    for root in (os.environ.get("TENSORRT_ROOT"), "/usr", "/usr/local/tensorrt"):
        if root:
            for include in (Path(root) / "include", Path(root) / "include" / "x86_64-linux-gnu",
                            Path(root) / "include" / "aarch64-linux-gnu"):
                if (include / "NvInferRuntime.h").is_file():
                    return Path(root)
    return None


@pytest.mark.slow
@pytest.mark.skipif(_tensorrt_headers() is None or shutil.which("cmake") is None or shutil.which("nvcc") is None,
                    reason="the plugin build needs cmake, nvcc and TensorRT headers (set TENSORRT_ROOT)")
def test_plugin_library_builds_and_passes_its_host_checks(tmp_path):
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(plugin_sources()), "-B", str(build), "-DD2MC_PLUGIN_TESTS=ON",
                                f"-DTENSORRT_ROOT={_tensorrt_headers()}", "-DCMAKE_CUDA_ARCHITECTURES=87",
                                f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}"], capture_output=True, text=True)
    assert configure.returncode == 0, configure.stderr
    compiled = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout[-2000:]
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(build / "libd2mc_moe_plugin.so")],
                             capture_output=True, text=True).stdout
    assert " T getCreators" in symbols and " T setLoggerFinder" in symbols
    checks = subprocess.run([str(build / "plugin_host_checks")], capture_output=True, text=True)
    assert checks.returncode == 0 and checks.stdout.startswith("ok "), checks.stdout


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the CUDA kernels run on a CUDA GPU; this machine has none")


def _kernels():
    """The plugin's kernels as a PyTorch extension (compiled once per process)."""
    from torch.utils.cpp_extension import load

    source = plugin_sources()
    return load("d2mc_moe_kernels", [str(source / "tests" / "torchBinding.cpp"), str(source / "moeKernels.cu")],
                extra_include_paths=[str(source)])


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 100])
@pytest.mark.parametrize("top_k, normalize, shared", [(1, True, 0), (2, False, 1), (2, True, 1)])
def test_cuda_kernels_match_the_reference(tokens, top_k, normalize, shared):
    kernels = _kernels()
    block = fused("llama", top_k=top_k, normalize=normalize, shared=shared).model.layers[2]
    fc1, fc2, attributes = plugin_weights(block)
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 64, generator=generator).half()
    logits = torch.randn(tokens, attributes.num_experts, generator=generator)
    expected = moe_reference(hidden, logits, fc1.half(), fc2.half(), attributes)
    got = kernels.moe(hidden.cuda(), logits.cuda(), fc1.half().cuda(), fc2.half().cuda(), attributes.num_experts,
                      attributes.num_shared, attributes.top_k, attributes.normalize).cpu()
    assert (got.float() - expected.float()).abs().max() < 1e-2


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 3, 9, 100])  # GEMV path up to 8 tokens, grouped path above
@pytest.mark.parametrize("bits, block_size", [(4, 32), (4, 64), (8, 32)])
def test_quantized_cuda_kernels_match_the_reference(tokens, bits, block_size):
    """int4/int8 experts dequantized inside the GEMV and grouped kernels, against the reference on the weights the
    codes stand for (the fp16 scales the kernels read)."""
    kernels = _kernels()
    quantized, packed = quantized_model(bits, block_size, top_k=2, shared=1)
    attributes = plugin_weights(quantized.model.model.layers[2], packed)[2]
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 64, generator=generator).half()
    logits = torch.randn(tokens, attributes.num_experts, generator=generator)
    scales = [torch.from_numpy(s.astype(np.float16)) for s in (packed.fc1_scales, packed.fc2_scales)]
    fc1, fc2 = (unpack(codes, s.numpy(), bits, block_size) for codes, s in zip((packed.fc1, packed.fc2), scales,
                                                                                 strict=True))
    expected = moe_reference(hidden, logits, fc1, fc2, dataclasses.replace(attributes, weight_bits=0, block_size=0))
    got = kernels.moe_quantized(hidden.cuda(), logits.cuda(), torch.from_numpy(packed.fc1).cuda(),
                                torch.from_numpy(packed.fc2).cuda(), scales[0].cuda(), scales[1].cuda(),
                                attributes.num_experts, attributes.num_shared, attributes.top_k, attributes.normalize,
                                bits, block_size).cpu()
    assert (got.float() - expected.float()).abs().max() < 1e-2


@needs_engine_machine
@pytest.mark.parametrize("bits", [0, 4])
def test_block_engine_matches_the_pytorch_block(tmp_path, bits):
    from polygraphy.backend.trt import TrtRunner

    from d2mc.engine.build import prepare_engine_build
    from d2mc.engine.manifest import load_engine

    model, artifact = block_artifact(tmp_path, bits=bits, top_k=2, shared=1)
    # the GPU at hand stands in for the Orin: same plugin, same kernels, its own SM
    profile = dataclasses.replace(load_profile("orin-agx"), sm=local_gpu().sm)
    settings = EngineSettings(precision=f"int{bits}" if bits else "fp16", max_input=128)
    result = prepare_engine_build(artifact / "tensorrt", profile, artifact / "engine", settings)
    assert result.built, result.reason
    engine, manifest = load_engine(result.out_dir)
    assert manifest.plugin["sha256"] and manifest.sm == local_gpu().sm
    assert (manifest.quantization or {}).get("bits") == ([bits] if bits else None)
    block = model.model.layers[2]
    hidden = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(3))
    for profile_index, rows in ((0, hidden), (1, hidden[:, :1])):  # grouped path, then the GEMV path
        with TrtRunner(engine, optimization_profile=profile_index) as runner:
            got = runner.infer({"hidden": rows.half().numpy()})["output"]
        expected = block_reference(block, rows).numpy()
        assert np.abs(got.astype(np.float32) - expected).max() < 5e-2
