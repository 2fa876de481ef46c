"""Measurement on the runtime at hand, the host profile's fits, the roofline pass and `d2mc profile` end to end."""

import json

import pytest
import torch
from click.testing import CliRunner

from d2mc.context import Context
from d2mc.errors import UserError
from d2mc.host_profile import FitPoint, HostMeasurement, RuntimeFit, fit_decode, write_profile
from d2mc.measure import Measurer, OtherLoad, TorchMeasurer, measure_quietly, quantile
from d2mc.pipeline import PassManager, create_pass
from d2mc.profiles import load_profile
from tests.conftest import tiny_model


def test_decode_step_is_repeatable_and_matches_an_uncached_forward():
    model = tiny_model("llama")
    measurer = TorchMeasurer(model)
    assert isinstance(measurer, Measurer)
    step = measurer._decode_step(context=12, batch=1)
    with torch.no_grad():
        first, again = step().logits[0, -1], step().logits[0, -1]
        history = measurer._ids(1, 12, 1)
        token = measurer._ids(1, 1, 2)
        expected = model(torch.cat([history, token], dim=1)).logits[0, -1]
    assert torch.equal(first, again)  # the cache was rewound: the same context every time
    assert torch.allclose(first, expected, atol=1e-5)


def test_measure_times_phases_and_blocks_of_dense_and_converted_models():
    from d2mc.restructure import dense_plan, restructure

    dense = TorchMeasurer(tiny_model("qwen2")).measure(prefill=8, context=16, repeats=2, warmup=1, per_block=True)
    assert dense.runtime == "pytorch-cpu" and dense.prefill_seconds > 0 and dense.decode_seconds > 0
    assert len(dense.blocks["prefill"]) == len(dense.blocks["decode"]) == 6
    plan = dense_plan(6)
    plan[2:4] = [{"attention_layer": 2, "expert_layers": [2, 3], "shared_experts": 0, "top_k": 1,
                  "normalize_topk": True}]
    converted = restructure(tiny_model("llama"), plan)
    m = TorchMeasurer(converted).measure(prefill=8, context=16, batch=2, repeats=2, warmup=1, per_block=True)
    assert len(m.blocks["decode"]) == 5 and m.batch == 2
    assert json.loads(json.dumps(m.to_dict()))["decode_seconds"] == m.decode_seconds


@pytest.mark.parametrize("kwargs, message", [
    ({"context": -3}, "^context must be a positive whole number, not -3"),
    ({"prefill": 0}, "^prefill must be a positive whole number, not 0"),
    ({"repeats": 0}, "^repeats must be a positive whole number"),
])
def test_bad_measurement_lengths_are_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        TorchMeasurer(tiny_model("llama")).measure(**kwargs)


def test_quiet_measurement_and_quantiles():
    with OtherLoad() as load:
        sum(range(100000))
    assert load.cores >= 0
    result, others = measure_quietly(lambda: 42, max_other_cores=100)
    assert result == 42 and others >= 0
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.25) == 2.0


def _synthetic_points(bandwidth, overhead_us, attention_fraction):
    points = []
    for name, weights, kernels, kv_per_token in (("a", 1e6, 100, 2e3), ("b", 2e8, 80, 8e3), ("c", 4e8, 50, 1e4)):
        for context in (64, 1024, 2048):
            kv = kv_per_token * context
            seconds = weights / bandwidth + kv / (bandwidth * attention_fraction) + kernels * overhead_us * 1e-6
            points.append(FitPoint(name, "decode", context, weights + kv, 0.0, kernels, seconds, kv))
    return points


def test_decode_fit_recovers_bandwidth_overhead_and_attention_fraction():
    bandwidth, overhead, fraction = fit_decode(_synthetic_points(12e9, 80.0, 0.25))
    assert bandwidth == pytest.approx(12.0, rel=1e-6)
    assert overhead == pytest.approx(80.0, rel=1e-6)
    assert fraction == pytest.approx(0.25, rel=1e-6)
    # attention streaming as well as the rest folds into one bandwidth
    assert fit_decode(_synthetic_points(12e9, 80.0, 1.0))[2] == pytest.approx(1.0)


def test_host_measurement_writes_a_valid_profile_with_one_fit_per_runtime(tmp_path):
    measured = HostMeasurement(bandwidth_gbps=16.0, tflops={"fp32": 0.12, "bf16": 0.02}, memory_gb=24, threads=2,
                              stream_gbps=16.0, fits=[RuntimeFit("onnxruntime-cpu", 12.8, 0.108, 5.0, 0.3),
                                                      RuntimeFit("pytorch-cpu", 8.0, 0.06, 70.0, 0.5)])
    profile = load_profile(write_profile(measured, tmp_path / "mine.toml"))
    assert profile.kind == "cpu" and profile.runtime == "onnxruntime-cpu"
    assert profile.achievable_bandwidth == pytest.approx(12.8e9)
    assert profile.achievable_flops("fp32") == pytest.approx(0.108e12)
    assert profile.bandwidth_for("attention") == pytest.approx(0.3 * 12.8e9)
    assert profile.kernel_overhead_us == pytest.approx(5.0)
    assert profile.source["kernel_overhead_us"].startswith("fitted")
    torch_view = profile.for_runtime("pytorch-cpu")
    assert torch_view.runtime == "pytorch-cpu" and torch_view.kernel_overhead_us == pytest.approx(70.0)
    assert torch_view.achievable_bandwidth == pytest.approx(8e9)
    assert torch_view.bandwidth_for("attention") == pytest.approx(0.5 * 8e9)
    assert profile.for_runtime("tensorrt") is profile  # no fit of its own: the profile's figures


def test_roofline_pass_provides_a_report(tiny_checkpoint):
    from d2mc.loading import load_model

    loaded = load_model(tiny_checkpoint("llama"), config_only=True, tokenizer=False)
    ctx = Context.from_loaded(loaded, profile=load_profile("orin-agx"))
    PassManager([create_pass("roofline", prefill=32, context=64)]).run(ctx)
    report = ctx.results["roofline"]
    assert report.decode.seconds < report.prefill.seconds and report.settings.precision == "fp16"
    assert ctx.report["roofline"]["settings"]["context"] == 64
    assert ctx.report["passes"][0]["decode_ms"] == pytest.approx(report.decode.seconds * 1e3)
    with pytest.raises(UserError, match="pass 'roofline' .*requires 'profile', which is not available"):
        PassManager([create_pass("roofline")]).run(Context.from_loaded(loaded))
    with pytest.raises(UserError, match="unknown precision 'fp9'"):
        create_pass("roofline", precision="fp9")


def _main(*args):
    from d2mc.cli import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    return info.value.code


@pytest.mark.parametrize("args, message", [
    (["--prefill", "-1"], "--prefill must be a positive whole number, not -1"),
    (["--precision", "fp7"], "unknown precision 'fp7'"),
    (["--context", "600"], "--context 600 is past the model's maximum of 512 positions"),
    (["--measure"], "--measure runs the model: drop --config-only"),
])
def test_profile_cli_errors_are_one_line(tiny_checkpoint, capsys, args, message):
    assert _main("profile", tiny_checkpoint("llama"), "--config-only", *args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_profile_cli_table_and_measure_host(tiny_checkpoint, tmp_path, monkeypatch):
    from d2mc.cli import cli

    result = CliRunner().invoke(cli, ["profile", str(tiny_checkpoint("qwen3")), "--config-only", "--target", "thor",
                                      "--precision", "int4", "--block-size", "32", "--kv-precision", "int8", "--batch", "4",
                                      "--context", "256"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "int4 weights (blocks of 32), int8 KV cache, batch 4" in result.output and "embed+head" in result.output

    import d2mc.host_profile

    fake = HostMeasurement(bandwidth_gbps=16.0, tflops={"fp32": 0.12}, memory_gb=24, threads=2, stream_gbps=16.0,
                       fits=[RuntimeFit("onnxruntime-cpu", 12.0, 0.1, 5.0)])
    monkeypatch.setattr(d2mc.host_profile, "measure_host", lambda progress=None: fake)
    out = tmp_path / "host.toml"
    result = CliRunner().invoke(cli, ["profile", "--measure-host", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and load_profile(out).memory_bandwidth_gbps == 16.0
    result = CliRunner().invoke(cli, ["profile", "--calibrate", "-o", str(tmp_path / "old.toml")],
                                catch_exceptions=False)  # the old spelling still works
    assert result.exit_code == 0 and load_profile(tmp_path / "old.toml").memory_bandwidth_gbps == 16.0
