import json

import pytest
import torch
from d2mc.targets.onnxruntime import export_onnx, read_artifact

from d2mc.errors import UserError
from d2mc.verify import OrtDecoder
from tests.conftest import tiny_model


def test_export_writes_a_complete_verified_artifact(tmp_path):
    out = tmp_path / "artifact"
    result = export_onnx(tiny_model("qwen2"), None, out)
    assert result.verify["passed"]
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "config.json", "d2mc_artifact.json"} <= names
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 6 and genai["model"]["type"] == "qwen2"
    assert read_artifact(out)["verify"]["max_abs_diff"] < 1e-3


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
    prompt = [3, 17, 42, 99, 7]
    genai_model = og.Model(str(tmp_path / "artifact"))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(prompt) + 10, min_length=len(prompt) + 10, do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert tokens == expected[0, len(prompt):].tolist()
