"""Quantized artifacts on tiny models of every family, dense and converted: ONNX Runtime against the PyTorch model
with the same quantized weights, the graph's quantized ops, the perplexity of the artifact against PyTorch's, and
generation through onnxruntime-genai and the command line."""

from __future__ import annotations

import onnx
import pytest
from d2mc.targets.onnxruntime import export_onnx

from d2mc.artifact import read_artifact
from d2mc.cli import main
from d2mc.evaluation import evaluate_artifact_perplexity, evaluate_model_perplexity
from d2mc.quantize import QuantizeOptions, quantize_model
from tests.conftest import tiny_model, tiny_tokenizer
from tests.quantize.test_model import converted
from tests.targets.test_onnxruntime import genai_greedy, pytorch_greedy

TOKENIZER = tiny_tokenizer()
VOCAB = len(TOKENIZER)


def op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("kind, moe_op", [("dense", "dispatch"), ("converted", "contrib"), ("converted", "dispatch")])
def test_the_artifact_matches_the_model_with_the_same_quantized_weights(family, kind, moe_op, tmp_path):
    model = tiny_model(family, vocab_size=VOCAB) if kind == "dense" else converted(family)
    # the defaults: round-to-nearest with calibrated mixed precision, without it for QMoE
    quantized = quantize_model(model, QuantizeOptions("int4", block_size=32, qmoe=moe_op == "contrib"), TOKENIZER)
    result = export_onnx(model, TOKENIZER, tmp_path / "q", quantized=quantized, moe_op=moe_op)
    verify = result.verify
    assert verify["passed"] and verify["max_abs_diff"] < 1e-3 and verify["precision"] == "quantized-fp32"
    # as shipped, int8 activations (accuracy level 4) move the logits a little: a few % of the largest on random
    # tiny models (SmolLM2-135M: 3.7%, docs/quantization.md)
    assert 0 < verify["shipped"]["max_abs_diff"] < 0.15 * verify["shipped"]["logit_scale"]
    assert verify["unquantized"]["max_abs_diff"] > verify["max_abs_diff"]
    ops = op_counts(tmp_path / "q")
    assert ops["MatMulNBits"] >= 1
    assert ops.get("QMoE", 0) == (1 if moe_op == "contrib" else 0)
    assert ops.get("GatherBlockQuantized", 0) == (1 if model.config.tie_word_embeddings else 0)
    info = read_artifact(tmp_path / "q")
    assert info["precision"] == "int4"
    assert info["quantization"]["quant_method"] == "rtn"
    assert info["quantization"]["mixed_precision"] == ("none" if moe_op == "contrib" else "calibrated")


@pytest.mark.parametrize("kind", ["dense", "converted"])
def test_float_zero_points_and_mixed_precision_match_the_model_with_the_same_weights(kind, tmp_path):
    model = tiny_model("qwen2", vocab_size=VOCAB) if kind == "dense" else converted()
    # mixed precision on the converted model: some blocks' matrices (experts' too) at int8, integer zero points
    mixed = "none" if kind == "dense" else "mixed-layers"
    quantized = quantize_model(model, QuantizeOptions("int4", "hqq", 32, mixed_precision=mixed), TOKENIZER)
    verify = export_onnx(model, TOKENIZER, tmp_path / "q", quantized=quantized).verify
    assert verify["passed"] and verify["max_abs_diff"] < 1e-3
    assert 0 < verify["shipped"]["max_abs_diff"] < 0.15 * verify["shipped"]["logit_scale"]
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    residuals = [t.name for t in graph.initializer if t.name.endswith("_zero_point_residual")]
    zero_points = [t for t in graph.initializer if t.name.endswith("_zero_points")]
    # every int4 matrix (q, k and v packed as one; the LM head is int8): rounded uint8 zero points and a residual
    int4 = [n for n in graph.node if n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 4 for a in n.attribute)]
    assert len(residuals) == len(zero_points) == len(int4) > 0
    assert all(t.data_type == onnx.TensorProto.UINT8 for t in zero_points)
    assert read_artifact(tmp_path / "q")["quantization"]["quant_method"] == "hqq"


def test_int8_and_the_tensorrt_flavour_match_too(tmp_path):
    model = converted()
    int8 = quantize_model(model, QuantizeOptions("int8", block_size=32), TOKENIZER)
    assert export_onnx(model, TOKENIZER, tmp_path / "int8", quantized=int8).verify["passed"]
    dense = tiny_model("qwen3", vocab_size=VOCAB)
    int4 = quantize_model(dense, QuantizeOptions("int4", "rtn", 32, mixed_precision="none"), TOKENIZER)
    result = export_onnx(dense, None, tmp_path / "trt", flavour="tensorrt", precision="fp16", quantized=int4)
    assert result.verify["passed"] and op_counts(tmp_path / "trt")["DequantizeLinear"] >= 1


def test_calibrated_mixed_precision_for_tensorrt_lowers_to_both_formats_and_plans_an_int4_engine(tmp_path):
    """Its int8 matrices (one scale per channel) go to TensorRT as per-channel DequantizeLinear and to ONNX Runtime's
    MatMulNBits in blocks of 64 that repeat the channel's scale; the MoE block's experts stay int4 for the plugin."""
    from d2mc.engine.graph import read_graph
    from d2mc.engine.plan import EngineSettings, plan_engine
    from d2mc.profiles import load_profile

    model = converted()
    options = QuantizeOptions("int4", block_size=64, mixed_precision="calibrated", calib_sequences=4, calib_length=64,
                              tensorrt=True)
    quantized = quantize_model(model, options, TOKENIZER)
    assert quantized.options.int8_matrices
    trt = export_onnx(quantized.model, None, tmp_path / "trt", flavour="tensorrt", precision="fp16",
                      quantized=quantized)
    assert trt.verify["passed"] and trt.verify["greedy_agreement"] == 1.0
    summary = read_graph(tmp_path / "trt" / "model.onnx")
    assert summary.quantization.plugin_nodes == 1
    assert set(summary.quantization.dequantize_formats) == {(4, 64), (8, 0)}
    assert plan_engine(summary, load_profile("orin-agx"), EngineSettings(), 512).precision == "int4"
    ort = export_onnx(quantized.model, TOKENIZER, tmp_path / "ort", quantized=quantized)
    assert ort.verify["passed"]
    graph = onnx.load(str(tmp_path / "ort" / "model.onnx"), load_external_data=False).graph
    attributes = [{a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"]
    assert {(a["bits"], a["block_size"]) for a in attributes} >= {(8, 64), (4, 64)}


def test_eval_of_the_artifact_equals_the_pytorch_perplexity(tmp_path):
    model = converted("qwen2")
    quantized = quantize_model(model, QuantizeOptions("int4", block_size=32, accuracy_level=0), TOKENIZER)
    export_onnx(model, TOKENIZER, tmp_path / "q", quantized=quantized, verify=False)
    text = tmp_path / "text.txt"
    text.write_text("The council met on Tuesday to discuss the new budget for the city's schools and parks. " * 40)
    onnx_ppl = evaluate_artifact_perplexity(tmp_path / "q", data=text, tokens=256, window=64).perplexity
    torch_ppl = evaluate_model_perplexity(quantized.model, TOKENIZER, data=text, tokens=256, window=64).perplexity
    assert onnx_ppl == pytest.approx(torch_ppl, rel=1e-4)


@pytest.mark.slow
def test_onnxruntime_genai_decodes_the_quantized_model_greedily(tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    model = tiny_model("llama", vocab_size=VOCAB)
    quantized = quantize_model(model, QuantizeOptions("int4", block_size=32, accuracy_level=0), TOKENIZER)
    export_onnx(model, None, tmp_path / "q", quantized=quantized, verify=False)
    assert genai_greedy(og, tmp_path / "q") == pytorch_greedy(quantized.model)


def test_export_run_eval_and_verify_from_the_command_line(tiny_checkpoint_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "int4"
    main(["export", str(tiny_checkpoint_with_tokenizer), "--precision", "int4", "--block-size", "32", "-o", str(out)])
    printed = capsys.readouterr().out
    assert "int4 rtn block 32 (calibrated at int8), LM head int8" in printed
    assert "with the same quantized weights" in printed
    assert "against the unquantized model" in printed
    main(["run", str(out), "the council", "--max-new-tokens", "4"])  # generates through onnxruntime-genai
    capsys.readouterr()  # a random tiny model's tokens may decode to whitespace; the genai test checks the tokens
    main(["eval", str(out), "--tokens", "256", "--window", "64"])
    assert "ONNX Runtime" in capsys.readouterr().out
    main(["verify", str(out)])  # re-quantizes the source as the artifact records: a failure would exit 1
    assert "PASSED" in capsys.readouterr().out


def test_calibrated_mixed_precision_is_recorded_and_verified_again(tiny_checkpoint_with_tokenizer, tmp_path, capsys):
    """The int8 matrices calibrated mixed precision chose travel in the artifact's record: ``verify`` quantizes the
    source again as recorded (without choosing again) and matches the shipped graph."""
    out = tmp_path / "int4"
    main(["export", str(tiny_checkpoint_with_tokenizer), "--precision", "int4", "--quant-method", "rtn", "--block-size",
          "32", "--mixed-precision", "calibrated", "--calib-sequences", "4", "--calib-length", "64", "-o", str(out)])
    assert "(calibrated at int8)" in capsys.readouterr().out
    recorded = read_artifact(out)["quantization"]
    int8 = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 8 for a in n.attribute)]
    # the LM head is int8 too; q/k/v go as one packed node
    assert recorded["mixed_precision"] == "calibrated" and len(recorded["int8_matrices"]) > 0 and len(int8) > 1
    assert QuantizeOptions.from_dict(recorded).int8_matrices == tuple(recorded["int8_matrices"])
    main(["verify", str(out)])
    assert "PASSED" in capsys.readouterr().out
