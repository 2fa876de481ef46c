"""Measurement on the runtime at hand, the host profile's fits, the roofline pass and `d2mc profile` end to end."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from d2mc.context import Context
from d2mc.errors import OptionError, UserError
from d2mc.host_fit import (
    FIT_POINTS,
    FIT_PRECISIONS,
    FitPoint,
    PrecisionFit,
    RuntimeFit,
    fit_decode,
    fit_error,
    fit_runtime,
    fitted_profile,
    predict_point,
)
from d2mc.host_profile import (
    HostMeasurement,
    cached_profile_path,
    host_profile,
    machine_key,
    write_profile,
)
from d2mc.host_timing import (
    fit_repeats,
    measure_interleaved,
    measured_points,
    quantize_onnx,
)
from d2mc.latency import compare_latency, judging_profile
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


KNOWN = RuntimeFit("onnxruntime-cpu", 30.0, 0.18, 3.0, 0.25,
                   {"int4": PrecisionFit(11.0, 0.21, 6.0), "int8": PrecisionFit(9.0, 0.25, 4.0)})
TORCH = RuntimeFit("pytorch-cpu", 8.0, 0.06, 70.0, 0.5)


def _points_of(fit: RuntimeFit) -> list[FitPoint]:
    """Every point of the fit models, timed as the roofline of ``fit`` predicts it."""
    points = []
    for model, phases in FIT_POINTS.items():
        for precision in FIT_PRECISIONS[fit.runtime]:
            for phase, tokens in phases:
                point = FitPoint(model, fit.runtime, precision, phase, tokens, 0.0)
                points.append(dataclasses.replace(point, measured_s=predict_point(point, fitted_profile(fit))))
    return points


def test_the_fit_recovers_every_figure_from_times_its_roofline_predicts():
    fit = fit_runtime("onnxruntime-cpu", _points_of(KNOWN))
    assert fit.bandwidth_gbps == pytest.approx(30.0, rel=1e-6) and fit.tflops == pytest.approx(0.18, rel=1e-6)
    assert fit.overhead_us == pytest.approx(3.0, rel=1e-4) and fit.attention_fraction == pytest.approx(0.25, rel=1e-6)
    for precision, expected in KNOWN.precisions.items():
        got = fit.precisions[precision]
        assert got.bandwidth_gbps == pytest.approx(expected.bandwidth_gbps, rel=1e-6)
        assert got.overhead_us == pytest.approx(expected.overhead_us, rel=1e-4)
        assert got.tflops == pytest.approx(expected.tflops, rel=1e-6)
    # attention streaming as well as the rest folds into one bandwidth
    assert fit_decode(_points_of(dataclasses.replace(TORCH, attention_fraction=1.0)))[2] == pytest.approx(1.0)


def _measurement(**machine) -> HostMeasurement:
    return HostMeasurement(bandwidth_gbps=40.0, tflops={"fp32": 0.2, "bf16": 0.1, "int8": 0.5}, memory_gb=24,
                           threads=2, stream_gbps=16.0, fits=[KNOWN, TORCH], points=_points_of(KNOWN) + _points_of(TORCH),
                           machine={**machine_key(), "measured": "2026-12-01 12:00", **machine})


def test_host_measurement_writes_a_profile_that_predicts_what_was_fitted(tmp_path):
    profile = load_profile(write_profile(_measurement(), tmp_path / "mine.toml"))
    assert profile.kind == "cpu" and profile.runtime == "onnxruntime-cpu"
    assert profile.machine == {**machine_key(), "measured": "2026-12-01 12:00"}
    assert set(profile.precisions) == {"int4", "int8"} and profile.precisions["int4"]["compute_precision"] == "int8"
    for point in _points_of(KNOWN):  # the efficiencies are rounded to four decimals
        assert predict_point(point, profile) == pytest.approx(point.measured_s, rel=2e-3)
    assert profile.source["kernel_overhead_us"].startswith("fitted") and "MatMulNBits" in profile.source["precisions"]
    assert profile.source["fit"] == "the fitted figures reproduce their own fit points within 0.0% (onnxruntime-cpu), 0.0% (pytorch-cpu)"
    assert fit_error(KNOWN, [dataclasses.replace(p, measured_s=p.measured_s / 2) for p in _points_of(KNOWN)]) == 1.0
    torch_view = profile.for_runtime("pytorch-cpu")
    assert torch_view.runtime == "pytorch-cpu" and torch_view.kernel_overhead_us == pytest.approx(70.0)
    assert torch_view.achievable_bandwidth == pytest.approx(8e9, rel=1e-3) and torch_view.precisions == {}
    assert torch_view.bandwidth_for("attention") == pytest.approx(0.5 * 8e9, rel=1e-3)
    assert profile.for_runtime("tensorrt") is profile  # no fit of its own: the profile's figures


def test_interleaved_rounds_visit_every_call_in_turn():
    order = []
    samples = measure_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=2,
                                  repeats=lambda key: 2 if key == "a" else 1, say=lambda text: None)
    assert order == ["a", "b"] + ["a", "a", "b"] * 2  # one untimed call each, then the rounds
    assert len(samples["a"]) == 4 and len(samples["b"]) == 2 and all(s >= 0 for s in samples["a"])
    point = FitPoint("h64x16", "onnxruntime-cpu", "int4", "decode", 64, 0.0)
    assert fit_repeats(point) == 3 and fit_repeats(dataclasses.replace(point, phase="prefill")) == 1
    timed = measured_points({point: [5.0, 1.0, 4.0, 2.0, 3.0, 6.0]})  # the quiet quantile of the samples
    assert timed == [dataclasses.replace(point, measured_s=quantile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0.2))]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty d2mc cache, and no host profile chosen by the environment."""
    monkeypatch.setenv("D2MC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("D2MC_HOST_PROFILE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def measurements(monkeypatch):
    """Measuring the machine returns a fixed measurement of this machine; the list counts the measurements."""
    import d2mc.host_profile

    made = []
    monkeypatch.setattr(d2mc.host_profile, "measure_host", lambda progress=None: made.append(1) or _measurement())
    return made


def test_auto_measures_this_machine_once_then_uses_the_cache(cache, measurements):
    first = host_profile()
    assert first.origin == "measured" and measurements == [1]
    assert first.profile.path == cached_profile_path() and cached_profile_path().is_relative_to(cache)
    again = host_profile()
    assert again.origin == "cached" and measurements == [1]
    assert again.describe() == f"host-cpu measured on this machine on 2026-12-01 12:00 (cached in {again.profile.path})"
    assert host_profile("measure").origin == "measured" and measurements == [1, 1]
    shipped = host_profile("shipped")
    assert shipped.origin == "shipped" and shipped.profile == load_profile("host-cpu")
    assert shipped.describe().startswith("host-cpu shipped with d2mc (measured on ")


def test_a_profile_cached_for_another_machine_or_unreadable_is_measured_again(cache, measurements):
    write_profile(_measurement(cpu="Another CPU"), cached_profile_path())
    assert host_profile().origin == "measured" and measurements == [1]
    cached_profile_path().write_text("name = ")
    assert host_profile().origin == "measured" and measurements == [1, 1]


def test_without_measuring_a_missing_profile_is_the_shipped_one(cache, measurements):
    assert host_profile(measure_missing=False).origin == "shipped" and measurements == []


def test_a_profile_file_is_taken_as_it_is_and_says_where_it_was_measured(cache, tmp_path, measurements):
    path = write_profile(_measurement(cpu="Another CPU", cores=64), tmp_path / "other.toml")
    chosen = host_profile(str(path))
    assert chosen.origin == "file" and chosen.profile.path == path and measurements == []
    assert chosen.describe() == f"{path} (measured on Another CPU, 64 cores, 2026-12-01 12:00)"


def test_bad_host_profile_choices_are_one_line(cache, monkeypatch, tmp_path):
    with pytest.raises(OptionError, match="^host_profile must be auto, measure, shipped or a device profile .toml "
                                          "file, not 'fastest'$"):
        host_profile("fastest")
    with pytest.raises(UserError, match="device profile '.*none.toml' does not exist"):
        host_profile(str(tmp_path / "none.toml"))
    monkeypatch.setenv("D2MC_HOST_PROFILE", "fastest")
    with pytest.raises(UserError, match="^D2MC_HOST_PROFILE must be auto, measure, shipped or a device profile "):
        host_profile()
    monkeypatch.setenv("D2MC_HOST_PROFILE", "shipped")
    assert host_profile().origin == "shipped"


def test_a_cpu_measurement_is_judged_on_this_machines_profile(cache, tmp_path):
    write_profile(_measurement(), cached_profile_path())
    orin, host = load_profile("orin-agx"), load_profile("host-cpu")
    for target in (orin, host):
        profile, origin = judging_profile(target, "onnxruntime-cpu")
        assert profile.path == cached_profile_path() and origin.startswith("host-cpu measured on this machine on")
    profile, _ = judging_profile(orin, "pytorch-cpu")
    assert profile.runtime == "pytorch-cpu" and profile.kernel_overhead_us == pytest.approx(70.0)
    own = write_profile(_measurement(cpu="Another CPU"), tmp_path / "own.toml")
    profile, origin = judging_profile(load_profile(own), "onnxruntime-cpu")  # a CPU profile of the user's own
    assert profile.path == own and origin.startswith(f"{own} (measured on Another CPU")
    assert judging_profile(orin, "tensorrt") == (orin, "orin-agx (the target's profile)")
    assert judging_profile(orin, "onnxruntime-cpu", host="shipped")[0] == host
    chosen = host_profile()  # the cached profile, chosen before: judged on as what it is, not as a file
    assert judging_profile(chosen.profile, "onnxruntime-cpu", host=chosen)[1] == chosen.describe()


def test_a_quantized_artifact_is_judged_as_its_graph_stores_its_weights(tmp_path):
    from d2mc.arch import ModelArch
    from d2mc.lowering import lower_to_onnx
    from d2mc.measure import OnnxMeasurer
    from d2mc.roofline import RooflineSettings, estimate_phase
    from d2mc.weight_plan import MatrixFormat, WeightPlan, read_weight_plan

    model = tiny_model("llama")
    arch, host = ModelArch.from_config(model.config), load_profile("host-cpu")
    fp32 = lower_to_onnx(model, tmp_path / "fp32")
    assert read_weight_plan(fp32) is None
    int4 = quantize_onnx(fp32, tmp_path / "int4", "int4")  # ONNX Runtime's own quantizer: every matrix alike
    int8 = MatrixFormat("int8", 32)
    assert read_weight_plan(quantize_onnx(fp32, tmp_path / "int8", "int8")) == WeightPlan.uniform(arch.num_blocks,
                                                                                                   int8, int8)
    measurement = OnnxMeasurer(int4, vocab=256).measure(prefill=8, context=16, repeats=1, warmup=0)
    assert measurement.weights == WeightPlan.uniform(arch.num_blocks, MatrixFormat("int4", 32), MatrixFormat("int4", 32))
    latency = compare_latency(arch, host, measurement, "fp32", all_logits=True, host="shipped")
    settings = RooflineSettings(prefill=8, context=16, precision="int4", block_size=32, all_logits=True)
    expected = estimate_phase(arch, host.for_runtime("onnxruntime-cpu"), "decode", settings).seconds
    assert latency.precision == "int4" and latency.phases["decode"].predicted_s == pytest.approx(expected)
    assert latency.profile_origin.startswith("host-cpu shipped with d2mc")


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
    (["--target", "host-cpu", "--host-profile", "fastest"],
     "--host-profile must be auto, measure, shipped or a device profile .toml file, not 'fastest'"),
])
def test_profile_cli_errors_are_one_line(tiny_checkpoint, capsys, args, message):
    checkpoint = tiny_checkpoint("llama")
    capsys.readouterr()  # what writing the checkpoint printed
    assert _main("profile", checkpoint, "--config-only", *args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_profile_cli_table_and_measure_host(tiny_checkpoint, cache, monkeypatch):
    from d2mc.cli import cli

    result = CliRunner().invoke(cli, ["profile", str(tiny_checkpoint("qwen3")), "--config-only", "--target", "thor",
                                      "--precision", "int4", "--block-size", "32", "--kv-precision", "int8", "--batch", "4",
                                      "--context", "256"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "int4 weights (blocks of 32), int8 KV cache, batch 4" in result.output and "embed+head" in result.output
    result = CliRunner().invoke(cli, ["profile", str(tiny_checkpoint("llama")), "--config-only", "--target", "host-cpu",
                                      "--context", "256", "--host-profile", "shipped"], catch_exceptions=False)
    assert result.exit_code == 0 and "profile: host-cpu shipped with d2mc (measured on" in result.output

    import d2mc.host_profile

    monkeypatch.setattr(d2mc.host_profile, "measure_host", lambda progress=None: _measurement())
    out = cache.parent / "host.toml"
    result = CliRunner().invoke(cli, ["profile", "--measure-host", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and load_profile(out).memory_bandwidth_gbps == 40.0
    assert load_profile(cached_profile_path()).machine == load_profile(out).machine  # this machine's, from now on
    result = CliRunner().invoke(cli, ["profile", "--calibrate", "-o", str(cache.parent / "old.toml")],
                                catch_exceptions=False)  # the old spelling still works
    assert result.exit_code == 0 and load_profile(cache.parent / "old.toml").memory_bandwidth_gbps == 40.0
