import numpy as np
import onnx
import pytest
import torch

from d2mc.lowering import LoweringOptions, lower_to_onnx
from d2mc.restructure import dense_plan, restructure
from d2mc.verify import verify_onnx
from tests.conftest import tiny_model


def fused(family, top_k=1, normalize=True, shared=0, attention=2):
    plan = dense_plan(6)
    plan[2:5] = [{"attention_layer": attention, "expert_layers": [2, 3, 4], "shared_experts": shared,
                  "top_k": top_k, "normalize_topk": normalize}]
    model = restructure(tiny_model(family), plan)
    torch.nn.init.normal_(model.model.layers[2].router.weight, std=0.5)
    return model


def test_dense_export_matches_pytorch_through_the_cache(family, tmp_path):
    model = tiny_model(family)
    result = verify_onnx(model, lower_to_onnx(model, tmp_path), prefill=12, decode_steps=8)
    assert result.passed and result.max_abs_diff < 1e-4 and result.greedy_agreement == 1.0


@pytest.mark.parametrize("top_k, normalize, shared, attention", [
    (1, True, 0, 2), (2, False, 0, 2), (2, True, 0, 2), (1, True, 1, 2), (1, True, 0, None)])
@pytest.mark.parametrize("moe_op", ["dispatch", "contrib"])
def test_moe_export_matches_pytorch(tmp_path, top_k, normalize, shared, attention, moe_op):
    model = fused("llama", top_k, normalize, shared, attention)
    path = lower_to_onnx(model, tmp_path, LoweringOptions(moe_op=moe_op))
    result = verify_onnx(model, path, prefill=12, decode_steps=8)
    assert result.passed and result.max_abs_diff < 1e-4


def test_converted_families_export(family, tmp_path):
    model = fused(family)
    assert verify_onnx(model, lower_to_onnx(model, tmp_path)).max_abs_diff < 1e-4


@pytest.mark.parametrize("top_k", [1, 3])
def test_unit_weight_blocks_in_the_contrib_form(tmp_path, top_k):
    """ONNX Runtime's MoE op weights by softmax only: a block whose chosen experts count in full hands it logits
    that make the top-k equally likely and down projections scaled by k; the result is the PyTorch block's."""
    plan = dense_plan(6)
    plan[3] = {"attention_layer": 3, "expert_layers": [3] * 4, "shared_experts": 0, "top_k": top_k,
               "normalize_topk": True, "expert_intermediate": 32, "routing_weights": "ones"}
    model = restructure(tiny_model("llama"), plan)
    torch.nn.init.normal_(model.model.layers[3].router.weight, std=0.5)
    for moe_op in ("contrib", "dispatch"):
        path = lower_to_onnx(model, tmp_path / moe_op, LoweringOptions(moe_op=moe_op))
        result = verify_onnx(model, path, prefill=12, decode_steps=8)
        assert result.passed and result.max_abs_diff < 1e-4, (moe_op, result)
    graph = onnx.load(path, load_external_data=False).graph
    assert "Mul" not in {n.op_type for n in graph.node if n.name.startswith("GatherND")}  # dispatch: no weights


@pytest.mark.parametrize("routing_weights", ["ones", "softmax"])
def test_saturated_router_chooses_the_same_experts(tmp_path, routing_weights):
    """A router whose softmax saturates (probabilities of exactly 0 below the best expert) still chooses its
    top-k the same way in PyTorch and ONNX Runtime: by the logits, never by the tied probabilities."""
    plan = dense_plan(6)
    plan[3] = {"attention_layer": 3, "expert_layers": [3] * 4, "shared_experts": 0, "top_k": 2,
               "normalize_topk": False, "expert_intermediate": 32, "routing_weights": routing_weights}
    model = restructure(tiny_model("llama"), plan)
    torch.nn.init.normal_(model.model.layers[3].router.weight, std=500.0)
    for moe_op in ("dispatch", "contrib") if routing_weights == "ones" else ("dispatch",):
        path = lower_to_onnx(model, tmp_path / moe_op, LoweringOptions(moe_op=moe_op))
        result = verify_onnx(model, path, prefill=12, decode_steps=8)
        assert result.passed and result.max_abs_diff < 1e-4, (moe_op, result)


def test_kv_entries_only_for_blocks_with_attention(tmp_path):
    graph = onnx.load(lower_to_onnx(fused("llama"), tmp_path), load_external_data=False).graph
    past = [i.name for i in graph.input if i.name.startswith("past_key_values")]
    present = [o.name for o in graph.output if o.name.startswith("present")]
    assert len(past) == len(present) == 2 * 4  # 6 layers, 3 fused into one block: 4 attention blocks
    assert {n.op_type for n in graph.node} >= {"GroupQueryAttention", "SkipSimplifiedLayerNormalization",
                                                "ArgMax", "NonZero", "GatherND", "ScatterND"}


@pytest.mark.parametrize("top_k", [0, 1, 2])  # 0: dense; 1 and 2: MoE dispatch, whose fp16 ScatterND adds in fp32
def test_fp16_export_within_its_tolerance(tmp_path, top_k):
    model = fused("llama", top_k) if top_k else tiny_model("llama")
    path = lower_to_onnx(model, tmp_path, LoweringOptions(precision="fp16"))
    result = verify_onnx(model, path, precision="fp16")
    assert result.passed, result


def test_bad_options_are_one_line():
    from d2mc.errors import UserError

    with pytest.raises(UserError, match="unknown precision 'int3'"):
        LoweringOptions(precision="int3")
    with pytest.raises(UserError, match="unknown MoE lowering"):
        LoweringOptions(moe_op="magic")


def test_decode_step_costs_only_the_chosen_expert(tmp_path):
    """With top-1 dispatch, a single token runs exactly one expert: the other experts see zero rows."""
    import onnxruntime as ort

    model = fused("llama")
    path = lower_to_onnx(model, tmp_path)
    graph = onnx.load(path, load_external_data=False)
    gathers = [n.output[0] for n in graph.graph.node if n.op_type == "GatherND"]
    for name in gathers:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(graph, tmp_path / "probe.onnx")
    session = ort.InferenceSession(str(tmp_path / "probe.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[5]]), "attention_mask": np.ones((1, 1), np.int64),
             "position_ids": np.zeros((1, 1), np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros((1, 2, 0, 16), np.float32)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=False))
    assert sorted(outputs[name].shape[0] for name in gathers) == [0, 0, 1]


@pytest.mark.parametrize("flavour", ["onnxruntime", "tensorrt"])
def test_a_tied_embedding_is_stored_once(flavour, tmp_path):
    """The LM head's [hidden, vocab] table is also the token embedding (gathered by column); verify checks it."""
    from tests.test_verify import overwrite_initializer_rows

    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = lower_to_onnx(model, tmp_path, flavour=flavour)
    tables = [t for t in onnx.load(path, load_external_data=False).graph.initializer if 256 in t.dims]
    assert [(t.name, list(t.dims)) for t in tables] == [("lm_head.weight_t", [64, 256])]
    result = verify_onnx(model, path, prefill=12, decode_steps=8)
    assert result.passed and result.max_abs_diff < 1e-4 and "lm_head.weight_t" in result.tables_max_abs_diff
    overwrite_initializer_rows(path, "lm_head.weight_t", 5, 0.25, rows=1)
    assert verify_onnx(model, path).failing_table == "lm_head.weight_t"


# --- the TensorRT flavour: standard ops plus one D2mcMoE plugin node per MoE block

PLUGIN_ATTRIBUTES = {"num_experts", "num_shared", "top_k", "hidden_size", "intermediate_size", "activation",
                     "normalize", "plugin_version", "plugin_namespace"}


def test_tensorrt_flavour_dense_matches_pytorch(family, tmp_path):
    model = tiny_model(family)
    path = lower_to_onnx(model, tmp_path, flavour="tensorrt")
    onnx.checker.check_model(str(path))
    graph = onnx.load(path, load_external_data=False).graph
    assert {n.domain for n in graph.node} == {""}  # nothing but standard ops: ONNX Runtime runs it as is
    assert {"Concat", "Softmax", "ReduceMean"} <= {n.op_type for n in graph.node}
    result = verify_onnx(model, path, prefill=12, decode_steps=8)
    assert result.max_abs_diff < 1e-4 and result.greedy_agreement == 1.0


@pytest.mark.parametrize("top_k, normalize, shared", [(1, True, 0), (2, False, 0), (2, True, 1)])
def test_tensorrt_flavour_plugin_nodes(tmp_path, top_k, normalize, shared):
    """One plugin node per MoE block, with the documented attributes, passing onnx.checker and matching PyTorch
    when the node is expanded into standard ops (which reads fc1/fc2 through the documented layout)."""
    model = fused("llama", top_k, normalize, shared)
    path = lower_to_onnx(model, tmp_path, flavour="tensorrt")
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} == {"", "d2mc"}
    (node,) = [n for n in proto.graph.node if n.op_type == "D2mcMoE"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert set(attrs) == PLUGIN_ATTRIBUTES
    assert attrs == {"num_experts": 3 - shared, "num_shared": shared, "top_k": top_k, "hidden_size": 64,
                     "intermediate_size": 128, "activation": b"swiglu", "normalize": int(normalize),
                     "plugin_version": b"1", "plugin_namespace": b"d2mc"}
    weights = {i.name: i for i in proto.graph.initializer}
    assert list(weights[node.input[2]].dims) == [3, 256, 64] and list(weights[node.input[3]].dims) == [3, 64, 128]
    assert verify_onnx(model, path, prefill=12, decode_steps=8).max_abs_diff < 1e-4


def test_tensorrt_flavour_is_what_the_engine_planner_reads(tmp_path):
    from d2mc.engine.graph import read_graph

    summary = read_graph(lower_to_onnx(fused("llama", 2, True, 1), tmp_path, flavour="tensorrt", precision="fp16"))
    assert summary.unparsable_ops == [] and summary.precision == "fp16"
    assert len(summary.moe_nodes) == 1 and len(summary.kv_inputs) == 8


def test_tensorrt_flavour_fp16_within_its_tolerance(tmp_path):
    model = fused("qwen3")
    result = verify_onnx(model, lower_to_onnx(model, tmp_path, flavour="tensorrt", precision="fp16"), "fp16")
    assert result.passed, result


def test_tensorrt_flavour_masks_padding_and_keeps_the_window(tmp_path):
    """Left padding in a batch and a sliding window: the standard-op attention masks what PyTorch masks."""
    import onnxruntime as ort

    model = tiny_model("mistral", sliding_window=5)
    path = lower_to_onnx(model, tmp_path, flavour="tensorrt")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    for i in session.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros((2, 2, 0, 16), np.float32)
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=positions).logits.numpy()
    assert np.abs(got - ref)[mask.bool().numpy()].max() < 1e-4  # padded query rows are free to differ


def test_unknown_flavour_is_one_line():
    from d2mc.errors import UserError

    with pytest.raises(UserError, match="unknown ONNX flavour 'tflite': choose one of onnxruntime, tensorrt"):
        LoweringOptions(flavour="tflite")
