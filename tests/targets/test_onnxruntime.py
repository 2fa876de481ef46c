import json

import pytest
import torch
from d2mc.targets.onnxruntime import export_onnx

from d2mc.artifact import read_artifact
from d2mc.errors import UserError
from d2mc.onnx_session import OrtDecoder
from tests.conftest import requires_real_model, tiny_model


def test_export_writes_a_complete_verified_artifact(tmp_path):
    out = tmp_path / "artifact"
    result = export_onnx(tiny_model("qwen2"), None, out)
    assert result.verify["passed"]
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "config.json", "d2mc_artifact.json"} <= names
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 6 and genai["model"]["type"] == "qwen2"
    assert read_artifact(out)["verify"]["max_abs_diff"] < 1e-3


def test_export_can_free_the_model_before_onnx_runtime_loads_the_artifact(tmp_path):
    """What d2mc export does: verification records PyTorch's side, the weights go, ONNX Runtime replays."""
    model = tiny_model("llama")
    result = export_onnx(model, None, tmp_path / "artifact", release_model=True)
    assert result.verify["passed"] and result.verify["positions"]
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_failed_verification_leaves_no_artifact(tmp_path, monkeypatch):
    import d2mc.verify

    monkeypatch.setitem(d2mc.verify.TOLERANCE, "fp32", 0.0)
    with pytest.raises(UserError, match="verification failed"):
        export_onnx(tiny_model("llama"), None, tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_incomplete_artifacts_are_one_line(tmp_path):
    out = tmp_path / "artifact"
    export_onnx(tiny_model("llama"), None, out, verify=False)
    (out / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="corrupt or incomplete"):
        OrtDecoder(out / "model.onnx")
    (out / "genai_config.json").unlink()
    with pytest.raises(UserError, match="not a complete d2mc artifact"):
        read_artifact(out)
    with pytest.raises(UserError, match="no artifact directory"):
        read_artifact(tmp_path / "none")


@pytest.mark.slow
def test_onnxruntime_genai_generates_the_pytorch_greedy_tokens(tmp_path):
    """onnxruntime-genai, driven by the exported genai_config.json, decodes exactly what PyTorch decodes."""
    og = pytest.importorskip("onnxruntime_genai")
    model = tiny_model("llama")
    export_onnx(model, None, tmp_path / "artifact")
    assert genai_greedy(og, tmp_path / "artifact") == pytorch_greedy(model)


GREEDY_PROMPT = [3, 17, 42, 99, 7]


def genai_greedy(og, artifact, prompt=GREEDY_PROMPT, new_tokens: int = 10) -> list[int]:
    """The tokens onnxruntime-genai (module ``og``) decodes greedily from ``artifact`` after ``prompt``."""
    genai_model = og.Model(str(artifact))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens,
                              do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def pytorch_greedy(model, prompt=GREEDY_PROMPT, new_tokens: int = 10) -> list[int]:
    """The tokens ``model.generate`` decodes greedily after ``prompt``."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


def test_tensorrt_artifact_is_verified_and_refused_by_run(tmp_path):
    from d2mc.generate import stream_tokens
    from tests.test_lowering import fused

    out = tmp_path / "trt"
    result = export_onnx(fused("qwen2", top_k=2, shared=1), None, out, flavour="tensorrt", precision="fp16")
    assert result.verify["passed"] and result.verify["tolerance_rule"].startswith("0.01 x max |logit|")
    info = read_artifact(out)
    assert info["flavour"] == "tensorrt" and info["moe_op"] == "plugin" and info["attention_blocks"] == 4
    assert not (out / "genai_config.json").exists()
    assert not [p for p in out.iterdir() if "reference" in p.name]  # the verification copy is gone
    with pytest.raises(UserError, match="is a tensorrt artifact"):
        next(stream_tokens(out, "hello"))


def test_mismatched_model_is_one_line(tmp_path):
    from d2mc.verify import verify_onnx

    export_onnx(tiny_model("llama"), None, tmp_path / "artifact", verify=False)
    with pytest.raises(UserError, match="does not match the PyTorch model"):
        verify_onnx(tiny_model("llama", num_hidden_layers=4), tmp_path / "artifact" / "model.onnx")


def test_missing_weights_are_one_line(tmp_path):
    out = tmp_path / "artifact"
    export_onnx(tiny_model("llama"), None, out, verify=False)
    (out / "model.onnx.data").unlink()
    with pytest.raises(UserError, match=r"missing model\.onnx\.data"):
        read_artifact(out)
    with pytest.raises(UserError, match="corrupt or incomplete"):
        OrtDecoder(out / "model.onnx")


@pytest.mark.slow
def test_run_streams_the_pytorch_greedy_text(tmp_path):
    """``d2mc run``'s generator, tokenizer included, gives the tokens PyTorch's greedy decoding gives."""
    pytest.importorskip("onnxruntime_genai")
    from d2mc.generate import generate_ids, stream_tokens
    from tests.conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    export_onnx(model, tokenizer, tmp_path / "artifact")
    tokens = [t for t, _ in generate_ids(tmp_path / "artifact", "The council said", max_new_tokens=12)]
    ids = tokenizer("The council said", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert tokens == expected[0, ids.shape[1]:].tolist()
    sampled = list(stream_tokens(tmp_path / "artifact", "The council said", max_new_tokens=12, sample=True, seed=3))
    assert len(sampled) == 12


def test_run_refuses_greedy_with_sampling_options(tmp_path, capsys):
    from d2mc.cli import main

    out = tmp_path / "artifact"
    export_onnx(tiny_model("llama"), None, out, verify=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(out), "hi", "--greedy", "--temperature", "0.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert "--greedy cannot be combined with --temperature" in err


def test_polygraphy_comparison_passes_and_catches_a_difference(tmp_path):
    pytest.importorskip("polygraphy")
    from d2mc.polygraphy_compare import verify_with_polygraphy
    from tests.test_lowering import fused

    model = fused("llama", top_k=2)
    result = export_onnx(model, None, tmp_path / "artifact", flavour="tensorrt", polygraphy=True)
    assert result.verify["polygraphy"]["passed"] and result.verify["polygraphy"]["max_abs_diff"] < 1e-4
    with torch.no_grad():  # the artifact no longer matches the model it is compared with
        model.model.layers[2].experts[1].mlp.down_proj.weight.mul_(1.5)
    failed = verify_with_polygraphy(model, tmp_path / "artifact" / "model.onnx")
    assert not failed["passed"] and failed["max_abs_diff"] > 1e-3


@pytest.mark.real_model
@requires_real_model
@pytest.mark.parametrize("flavour, precision", [("onnxruntime", "fp32"), ("tensorrt", "fp16")])
def test_smollm2_exports_verified(tmp_path, flavour, precision):
    from d2mc.loading import load_model

    loaded = load_model("smollm2-135m")
    result = export_onnx(loaded.model, loaded.tokenizer, tmp_path / "artifact", flavour=flavour, precision=precision)
    assert result.verify["passed"] and result.verify["greedy_agreement"] == 1.0
    assert result.seconds < 60
