"""The commands end to end on a tiny model with a tokenizer: convert, export, run, profile, compile."""

import json

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from d2mc.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_convert_export_run(tiny_checkpoint_with_tokenizer, tmp_path):
    converted = tmp_path / "converted"
    result = invoke("convert", tiny_checkpoint_with_tokenizer, "--remove-attention", "2", "--calib-sequences", "4",
                    "--calib-length", "64", "-o", converted, "--quiet")
    assert result.exit_code == 0, result.output
    plan = json.loads((converted / "d2mc_plan.json").read_text())
    assert len(plan["plan"]["removed_attention"]) == 2
    assert plan["parameters"]["active_per_token"] < plan["parameters"]["total"]
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert model.config.model_type == "d2mc_moe"

    artifact = tmp_path / "artifact"
    result = invoke("export", converted, "-o", artifact)
    assert result.exit_code == 0 and "verified against PyTorch" in result.output
    pytest.importorskip("onnxruntime_genai")
    result = invoke("run", artifact, "The fire", "--max-new-tokens", "5")
    assert result.exit_code == 0 and len(result.output.strip()) > 0


@pytest.mark.parametrize("method, extra", [("split-experts", ["--active-fraction", "0.75"]),
                                           ("lfuc-split", ["--remove-attention", "2", "--reconstruct-steps", "0"]),
                                           ("upcycle", ["--experts", "4", "--top-k", "2"])])
def test_convert_with_experts_cut_from_mlps(tiny_checkpoint_with_tokenizer, tmp_path, method, extra):
    out = tmp_path / method
    result = invoke("convert", tiny_checkpoint_with_tokenizer, "--method", method, *extra, "--calib-sequences", "2",
                    "--calib-length", "32", "-o", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "d2mc_plan.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    blocks = model.config.blocks
    if method == "upcycle":
        assert "upcycled: 8 MLPs into 4 experts (copy, 128 neurons each), top-2" in result.output
        assert summary["parameters"]["total"] > summary["parameters"]["active_per_token"]
    else:
        assert "split:" in result.output and summary["split"]["experts_per_mlp"] == 8
        assert all(b.routing_weights == "ones" for b in blocks)
    if method == "lfuc-split":
        assert summary["plan"]["removed_attention"]
        assert all(len(b.expert_layers) == 8 * len(set(b.expert_layers)) for b in blocks)
        assert max(len(set(b.expert_layers)) for b in blocks) > 1


@pytest.mark.parametrize("args, message", [
    (["--method", "split-experts", "--experts", "1000"], "error: split-experts: --experts 1000 is more than the 128 "
                                                         "neurons of each MLP"),
    (["--method", "split-experts", "--active-fraction", "1.5"], "error: --active-fraction 1.5 is out of range"),
    (["--method", "split-experts", "--speedup", "1.2"], "error: --speedup does not apply to split-experts"),
    (["--method", "split-experts", "--top-k", "2"], "error: --top-k does not apply to split-experts"),
    (["--method", "upcycle", "--experts", "4", "--top-k", "5"], "error: upcycle: --top-k 5 is more than the 4 "
                                                                "experts"),
])
def test_convert_refusals_are_one_line(tiny_checkpoint_with_tokenizer, tmp_path, capsys, args, message):
    from d2mc.cli import main

    with pytest.raises(SystemExit) as info:
        main(["convert", str(tiny_checkpoint_with_tokenizer), *args, "--calib-sequences", "2", "--calib-length", "32",
              "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()  # progress lines, then the error as the last line
    assert info.value.code == 1 and err[-1].startswith(message) and sum("error" in line for line in err) == 1, err
    assert not (tmp_path / "out").exists()


def test_profile_config_only_and_measured(tiny_checkpoint_with_tokenizer, tmp_path):
    result = invoke("profile", tiny_checkpoint_with_tokenizer, "--target", "orin-agx", "--config-only",
                    "--context", "128", "--prefill", "32", "-o", tmp_path / "roofline")
    assert result.exit_code == 0 and "decode at context 128" in result.output
    data = json.loads((tmp_path / "roofline" / "roofline.json").read_text())
    assert data["phases"]["decode"]["seconds"] < data["phases"]["prefill"]["seconds"]
    assert (tmp_path / "roofline" / "roofline.png").stat().st_size > 1000
    result = invoke("profile", tiny_checkpoint_with_tokenizer, "--target", "host-cpu", "--measure",
                    "--context", "64", "--prefill", "16", "--json")
    measured = json.loads(result.stdout)["measured"]
    assert measured["runtime"] == "pytorch-cpu" and measured["profile"] == "host-cpu"
    decode = measured["phases"]["decode"]
    assert decode["measured_s"] > 0 and len(decode["blocks"]) == 8
    result = invoke("profile", tiny_checkpoint_with_tokenizer, "--target", "host-cpu", "--measure", "--context", "64",
                    "--prefill", "16", "--repeats", "1", "--device", "cpu", "--dtype", "bf16", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["measured"]["precision"] == "bf16"


def test_profile_errors_are_one_line(tiny_checkpoint_with_tokenizer):
    from d2mc.cli import main

    for args, _message in ((["--context", "-4"], "--context must be a positive whole number"),
                          (["--context", "100000"], "past the model's maximum")):
        with pytest.raises(SystemExit) as info:
            main(["profile", str(tiny_checkpoint_with_tokenizer), "--config-only", *args])
        assert info.value.code == 1


@pytest.mark.slow
def test_compile_end_to_end(tiny_checkpoint_with_tokenizer, tmp_path):
    out = tmp_path / "out"
    result = invoke("compile", tiny_checkpoint_with_tokenizer, "--target", "orin-agx", "--remove-attention", "2",
                    "--calib-sequences", "4", "--calib-length", "64", "--eval-tokens", "1024", "--context", "256",
                    "--prefill", "32", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["active_per_token"] <= report["parameters"]["total"]
    assert report["predicted"]["decode"]["converted_s"] < report["predicted"]["decode"]["dense_s"]
    assert report["verify"]["passed"] and report["perplexity"]["converted"] > 0
    assert {"model/config.json", "onnx/model.onnx", "redundancy.png", "onnx-tensorrt/model.onnx",
            "engine-orin-agx/build.sh", "engine-orin-agx/plan.json"} <= set(report["artifacts"])
    assert "## Verification" in (out / "report.md").read_text()
    # measured here with ONNX Runtime, judged on this machine's profile (the tests choose the shipped one)
    assert report["measured"]["profile_origin"].startswith("host-cpu shipped with d2mc (measured on ")
    assert "Profile: host-cpu shipped with d2mc" in (out / "report.md").read_text()
    # no TensorRT here: the engine step leaves the device-side build and says where, relative to the final output
    engine = report["engine"]
    assert not engine["built"] and engine["onnx_verify"]["passed"]
    assert engine["summary"].endswith(f"on the orin-agx run: bash {out / 'engine-orin-agx' / 'build.sh'}")
    assert "d2mc build .. --target orin-agx" in (out / "engine-orin-agx" / "build.sh").read_text()


@pytest.mark.slow
def test_compile_plans_auto_by_default_and_reports_its_plan_search_and_task_scores(tiny_checkpoint_with_tokenizer,
                                                                                    tmp_path):
    from tests.test_evaluation import TASK, TASKS

    out = tmp_path / "out"
    result = invoke("compile", tiny_checkpoint_with_tokenizer, "--target", "orin-agx", "--speedup", "1.1",
                    "--calib-sequences", "4", "--calib-length", "64", "--reconstruct-steps", "5",
                    "--eval-tokens", "1024", "--context", "256", "--prefill", "32", "--tasks", TASK,
                    "--include-path", TASKS, "--task-limit", "5", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    search, decode = report["plan_search"], report["predicted"]["decode"]
    assert decode["converted_s"] <= decode["dense_s"] / 1.1
    assert search["chosen"]["predicted_ms"] == pytest.approx(decode["converted_s"] * 1e3)
    assert search["chosen"]["plan"] in [a["plan"] for a in search["alternatives"]]
    markdown = (out / "report.md").read_text()
    assert "## Plan search (auto)" in markdown and search["chosen"]["plan"] in markdown
    assert [t["task"] for t in report["tasks"]["tasks"]] == [TASK]
    assert "## Tasks" in markdown


@pytest.mark.slow
def test_compile_int4_scores_the_quantized_model_and_the_artifact(tiny_checkpoint_with_tokenizer, tmp_path):
    out = tmp_path / "out"
    # a speed-up plans at the quantized precision, in blocks of 32 (128, the roofline's default, does not divide 64)
    result = invoke("compile", tiny_checkpoint_with_tokenizer, "--target", "host-cpu", "--speedup", "1.1",
                    "--calib-sequences", "4", "--calib-length", "64", "--eval-tokens", "1024", "--context", "256",
                    "--prefill", "32", "--no-measure", "--precision", "int4", "--block-size", "32", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["precision"] == "int4" and report["verify"]["passed"]
    assert report["verify"]["precision"] == "quantized-fp32" and "unquantized" in report["verify"]
    ppl = report["perplexity"]
    assert ppl["artifact"] == pytest.approx(ppl["quantized"], rel=0.05)  # int8 activations in the artifact only
    assert "held-out perplexity of the shipped artifact (ONNX Runtime)" in result.output
    assert "quantized (PyTorch)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_compile_int4_for_orin_agx_plans_an_int4_engine(tiny_checkpoint_with_tokenizer, tmp_path):
    """On a device with TensorRT the one quantization takes TensorRT's forms (int4 in blocks of 64, calibrated mixed
    precision's int8 matrices per channel with the MoE block's experts left int4, a float LM head), and the engine
    step lowers the MoE block through the plugin's quantized path and plans an int4 engine."""
    out = tmp_path / "out"
    result = invoke("compile", tiny_checkpoint_with_tokenizer, "--target", "orin-agx", "--plan", "2-3",
                    "--calib-sequences", "4", "--calib-length", "64", "--eval-tokens", "512", "--context", "256",
                    "--prefill", "32", "--no-measure", "--precision", "int4", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert (report["quantization"]["block_size"], report["quantization"]["lm_head_precision"]) == (64, "float")
    engine = report["engine"]
    assert engine["precision"] == "int4" and engine["onnx_verify"]["passed"]
    assert engine["plan"]["quantization"]["plugin_nodes"] == 1 and engine["plan"]["quantization"]["bits"] == [4, 8]
    int8 = report["quantization"]["int8_matrices"]
    assert int8 and not any(name.startswith("model.layers.2.experts.") for name in int8)
    assert f"(calibrated: {len(int8)} matrices at int8 per channel)" in " ".join(result.output.split())


def test_predicted_latency_falls_as_more_attention_is_removed(tiny_checkpoint_with_tokenizer):
    from d2mc.convert import ConvertOptions, convert
    from d2mc.loading import load_model
    from d2mc.profiles import load_profile
    from d2mc.roofline import predict_decode_seconds

    profile = load_profile("orin-agx")
    latencies = []
    for k in (0, 2, 4):
        ctx = convert(load_model(tiny_checkpoint_with_tokenizer),
                      ConvertOptions(remove_attention=k, calib_sequences=2, calib_length=32))
        latencies.append(predict_decode_seconds(ctx.arch, profile, context=256))
    assert latencies[0] > latencies[1] > latencies[2]


def test_interrupted_compile_leaves_no_output(tiny_checkpoint_with_tokenizer, tmp_path, monkeypatch):
    import d2mc.targets.onnxruntime

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(d2mc.targets.onnxruntime, "export_onnx", interrupt)
    result = CliRunner().invoke(cli, [str(a) for a in (
        "compile", tiny_checkpoint_with_tokenizer, "--remove-attention", "2", "--calib-sequences", "2",
        "--calib-length", "32", "--eval-tokens", "0", "--context", "256", "-o", tmp_path / "out", "--quiet")])
    assert result.exit_code != 0  # click turns the interrupt into an abort
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_same_file_for_calibration_and_evaluation_is_refused(tiny_checkpoint_with_tokenizer):
    from d2mc.data import corpus_path
    from d2mc.errors import UserError

    with pytest.raises(UserError, match="holds the evaluation text"):
        from d2mc.data import training_ids
        from tests.conftest import tiny_tokenizer

        training_ids(tiny_tokenizer(), corpus_path())


RECIPE = """\
passes = ["analyze-redundancy", "plan-fusion", "prune-attention", "fuse-experts", "insert-router"]

[options.plan-fusion]
method = "lfuc"
remove_attention = 2
max_group = 2
top_k = 1
"""


def test_convert_from_a_recipe(tiny_checkpoint_with_tokenizer, tmp_path):
    recipe = tmp_path / "lfuc.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    result = invoke("convert", tiny_checkpoint_with_tokenizer, "--recipe", recipe, "--calib-sequences", "2",
                    "--calib-length", "32", "-o", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "d2mc_plan.json").read_text())
    assert summary["options"]["recipe"] == str(recipe) and summary["options"]["method"] == "lfuc"
    assert len(summary["plan"]["removed_attention"]) == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(b.attention_layer is None for b in model.config.blocks) == 0  # attention-less layers are fused
    assert len(model.config.blocks) == 8 - 2


@pytest.mark.parametrize("recipe_text, extra, message", [
    (RECIPE, ["--remove-attention", "3"], "error: --remove-attention and --recipe"),
    (RECIPE, ["--method", "drop-layers"], "error: --method and --recipe"),
    ('passes = ["analyze-redundancy"]\n', [], "error: recipe '{path}' converts nothing"),
    (RECIPE.replace("insert-router", "insert-routers"), [], "error: unknown pass 'insert-routers'"),
])
def test_recipe_refusals_are_one_line(tiny_checkpoint_with_tokenizer, tmp_path, capsys, recipe_text, extra, message):
    from d2mc.cli import main

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text)
    with pytest.raises(SystemExit) as info:
        main(["convert", str(tiny_checkpoint_with_tokenizer), "--recipe", str(recipe), *extra, "-o",
              str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == 1 and err[-1].startswith(message.format(path=recipe)), err
    assert not (tmp_path / "out").exists()


def test_the_documented_recipe_runs(tiny_checkpoint_with_tokenizer, tmp_path):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    text = doc.split("```toml\n")[1].split("```")[0]
    text = text.replace("remove_attention = 6", "remove_attention = 2").replace("steps = 150", "steps = 2")
    text = text.replace("steps = 200", "steps = 2\nseq_len = 16\nbatch_size = 2")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = invoke("convert", tiny_checkpoint_with_tokenizer, "--recipe", recipe, "--calib-sequences", "2",
                    "--calib-length", "32", "-o", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "d2mc_plan.json").read_text())
    assert summary["recovery"]["steps"] == 2 and len(summary["plan"]["removed_attention"]) == 2
    assert max(len(g) for g in summary["plan"]["groups"]) == 2
