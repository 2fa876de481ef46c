"""Verification fails when it should: damage far into the context, in an expert the text never picks, in one
block's cache; ``d2mc verify`` exits 1 when it FAILED."""

import json

import numpy as np
import onnx
import pytest
import torch
from d2mc.targets.onnxruntime import export_onnx

from d2mc.cli import main
from d2mc.restructure import dense_plan, restructure
from d2mc.verify import sample_positions, verify_onnx
from tests.conftest import tiny_model
from tests.test_lowering import fused

pytestmark = pytest.mark.usefixtures("single_thread")


def overwrite_initializer_rows(onnx_path, name: str, first_row: int, value: float, rows: int | None = None) -> None:
    """Overwrite ``rows`` rows (default: all) from ``first_row`` of an fp32 initializer in the artifact's external
    data file, in place."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    info = {e.key: e.value for e in tensor.external_data}
    total, width = tensor.dims
    with open(onnx_path.parent / info["location"], "r+b") as data:
        data.seek(int(info.get("offset", 0)) + first_row * width * 4)
        data.write(np.full((rows or total - first_row, width), value, np.float32).tobytes())


@pytest.fixture
def exported(tmp_path):
    model = tiny_model("llama")
    source = tmp_path / "tiny"
    model.save_pretrained(source)
    export_onnx(model, None, tmp_path / "artifact", source=str(source))
    return model, tmp_path / "artifact"


def test_damaged_rotary_rows_far_into_the_context_fail(exported, capsys):
    model, artifact = exported
    overwrite_initializer_rows(artifact / "model.onnx", "cos_cache", 200, 0.5)
    first_only = verify_onnx(model, artifact / "model.onnx", positions=0)
    assert first_only.max_abs_diff < first_only.tolerance  # the first positions do not reach the damage...
    assert not first_only.passed and first_only.failing_table == "cos_cache"  # ...the table check does
    result = verify_onnx(model, artifact / "model.onnx")  # and so do the sampled positions
    assert result.max_abs_diff > result.tolerance and result.positions[-1] == 511 and "position" in result.worst
    with pytest.raises(SystemExit) as info:
        main(["verify", str(artifact)])
    out = capsys.readouterr().out
    assert info.value.code == 1 and "FAILED" in out and "up to 511 (context 512)" in out and "cos_cache" in out


@pytest.mark.parametrize("table, row", [("cos_cache", 300), ("embed_tokens", 17)])
def test_one_damaged_row_of_a_lookup_table_fails(exported, table, row):
    """A single row: one position no sample reaches, one token no input holds."""
    model, artifact = exported
    overwrite_initializer_rows(artifact / "model.onnx", table, row, 0.25, rows=1)
    result = verify_onnx(model, artifact / "model.onnx")
    assert not result.passed and result.failing_table == table and result.max_abs_diff < 1e-5


def test_verify_passes_with_exit_0_and_json(exported, capsys):
    _, artifact = exported
    main(["verify", str(artifact), "--json"])
    result = json.loads(capsys.readouterr().out)["verify"]
    assert result["passed"] and result["max_position"] == 511 and len(result["kv_max_abs_diff"]) == 6
    main(["verify", str(artifact), "--device", "cpu", "--dtype", "fp32", "--json"])  # where the reference runs
    assert json.loads(capsys.readouterr().out)["verify"]["passed"]


def test_an_artifact_exported_from_a_relative_path_verifies_from_anywhere(tmp_path, monkeypatch, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    main(["export", "tiny", "-o", "artifact", "--json"])
    assert json.loads((tmp_path / "artifact" / "d2mc_artifact.json").read_text())["source"] == str(tmp_path / "tiny")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    main(["verify", str(tmp_path / "artifact")])
    assert "PASSED" in capsys.readouterr().out


def test_every_expert_is_forced(tmp_path):
    model = fused("llama", top_k=1)
    router = model.model.layers[2].router
    with torch.no_grad():  # expert 2 never wins: its logit is 0, and one of the other two is positive
        router.weight[1] = -router.weight[0]
        router.weight[2] = 0.0
    path = export_onnx(model, None, tmp_path / "artifact").path / "model.onnx"
    with torch.no_grad():  # the PyTorch side differs from the artifact only in the expert no token picks
        model.model.layers[2].experts[2].mlp.down_proj.weight.mul_(1.5)
    assert verify_onnx(model, path, force_experts=False).passed
    result = verify_onnx(model, path)
    assert result.experts_forced == {2: 3} and not result.passed and result.worst.endswith("expert 2 forced")


def test_the_first_block_whose_cache_differs_is_named(tmp_path):
    model = tiny_model("qwen2")
    path = export_onnx(model, None, tmp_path / "artifact").path / "model.onnx"
    with torch.no_grad():
        model.model.layers[3].self_attn.v_proj.bias.add_(0.1)
    result = verify_onnx(model, path, positions=1)
    assert not result.passed and result.failing_block == 3


def test_nan_never_passes(tmp_path):
    model = restructure(tiny_model("llama"), dense_plan(6))
    path = export_onnx(model, None, tmp_path / "artifact").path / "model.onnx"
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    result = verify_onnx(model, path, positions=0)
    assert result.max_abs_diff == float("inf") and not result.passed


def test_sample_positions_reach_the_last_one():
    assert sample_positions(24, 511, 8) == [85, 146, 207, 268, 328, 389, 450, 511]
    assert sample_positions(24, 8191, 1) == [8191]
    assert sample_positions(600, 511) == [] and sample_positions(0, 10, 0) == []


def test_a_past_beyond_the_memory_bound_is_not_sampled(exported, monkeypatch):
    import d2mc.verify

    model, artifact = exported
    per_position = 2 * 6 * 2 * 16 * 4  # keys and values of 6 blocks, 2 KV heads of 16, fp32
    monkeypatch.setattr(d2mc.verify, "MAX_PAST_BYTES", 300 * per_position)
    result = verify_onnx(model, artifact / "model.onnx")
    assert result.passed and result.positions[-1] == 300 and result.max_position == 511
