import numpy as np
import onnx
import pytest
import torch

from d2mc.lowering import LoweringOptions, lower_to_onnx
from d2mc.modeling import dense_plan, restructure
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


def test_kv_entries_only_for_blocks_with_attention(tmp_path):
    graph = onnx.load(lower_to_onnx(fused("llama"), tmp_path), load_external_data=False).graph
    past = [i.name for i in graph.input if i.name.startswith("past_key_values")]
    present = [o.name for o in graph.output if o.name.startswith("present")]
    assert len(past) == len(present) == 2 * 4  # 6 layers, 3 fused into one block: 4 attention blocks
    assert {n.op_type for n in graph.node} >= {"GroupQueryAttention", "SkipSimplifiedLayerNormalization",
                                                "ArgMax", "NonZero", "GatherND", "ScatterND"}


def test_fp16_export_within_its_tolerance(tmp_path):
    model = tiny_model("llama")
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
