"""How right the roofline is: predicted against measured latency on this machine, in one run.

Each model runs on ONNX Runtime through d2mc's own lowering with fp32 weights and with int4 and int8 weights
(`com.microsoft::MatMulNBits`, round-to-nearest, symmetric, blocks of 32, accuracy level 4: the form d2mc exports,
made here by ONNX Runtime's own quantizer over the fp32 graph), and on PyTorch fp32 eager. Each is predicted on a
device profile of this machine as its runtime sees it (`DeviceProfile.for_runtime`) and, for quantized graphs, with
the weight format read from the graph (`d2mc.measure.read_weight_format`). The profile is this machine's
(`--host-profile`, as on `d2mc profile`: by default the one measured here before, else measured now; `--measure-host
FILE` measures first and writes it). Its figures were fitted on random fit models (`d2mc.host_profile.FIT_MODELS`)
at decode contexts 64 and 1024 and prefills of 64 and 192 tokens; judged here are other models and other lengths:
SmolLM2-135M dense, a Dense2MoE conversion of it with four fused two-expert blocks, and three random-weight
configurations (wider, deeper, another GQA ratio), decode at contexts 128, 512 and 2048, prefill of 128 and 512
tokens. Prints every point and the median absolute error per runtime, precision and phase; also the Orin sanity
check from the Llama-3.2-1B config alone.

Timing: each model's variants and lengths are visited in turn in interleaved rounds; the measured time is the 20th
percentile of the samples (the median is printed too): on a shared host, bursts of load from neighbours slow some
steps by a third, and the low percentile is the machine undisturbed, the statistic the host profile is fitted on.
The load other processes put on the machine while timing is printed with the results.

    python benchmarks/roofline_accuracy.py [--host-profile auto|measure|shipped|FILE | --measure-host new.toml]
                                           [--variant onnxruntime-cpu:int4 ...] [--rounds 5] [--json out.json]
                                           [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "wider (h1024, i4096, 12 layers, GQA 4:1)": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                                                     num_attention_heads=16, num_key_value_heads=4),
    "deeper (h512, i1536, 40 layers, GQA 4:1)": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=40,
                                                     num_attention_heads=8, num_key_value_heads=2),
    "GQA 8:1 (h768, i2048, 16 layers)": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                                              num_attention_heads=16, num_key_value_heads=2),
}
CONVERSION_PLAN = "12-13,14-15,16-17,25-26"  # low block-influence pairs of SmolLM2 (see FACTS.md)
CONTEXTS = (128, 512, 2048)
PREFILLS = (128, 512)
VARIANTS = ("onnxruntime-cpu:fp32", "onnxruntime-cpu:int4", "onnxruntime-cpu:int8", "pytorch-cpu:fp32")
TARGETS = {"decode": 0.10, "prefill": 0.20}
TARGETED = ("onnxruntime-cpu:fp32", "onnxruntime-cpu:int4")  # the variants the targets are set for


def random_model(**dims):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=True, **dims)
    return LlamaForCausalLM(config).eval()


def build_models(quick: bool) -> dict:
    from d2mc.convert import ConvertOptions, convert
    from d2mc.loading import load_model

    models = {"SmolLM2-135M dense": lambda: load_model("smollm2-135m", tokenizer=False).model}
    if not quick:
        models[f"SmolLM2-135M LF-UC ({CONVERSION_PLAN})"] = lambda: convert(
            load_model("smollm2-135m"), ConvertOptions(plan=CONVERSION_PLAN, reconstruct_steps=0, calib_sequences=4,
                                                       calib_length=128)).model
    for name, dims in list(CONFIGS.items())[:1 if quick else None]:
        models[name] = lambda dims=dims: random_model(**dims)
    return models


def orin_check() -> dict:
    """Llama-3.2-1B fp16 decode on orin-agx from its config: compare with weight bytes over peak bandwidth."""
    from d2mc.loading import load_model
    from d2mc.profiles import load_profile
    from d2mc.roofline import RooflineSettings, estimate_phase

    arch = load_model(ROOT / "tests" / "data" / "llama-3.2-1b-config.json", config_only=True).arch
    profile = load_profile("orin-agx")
    cost = estimate_phase(arch, profile, "decode", RooflineSettings(context=512, precision="fp16"))
    weights = arch.total_params * 2
    return {"params": arch.total_params, "weight_bytes": weights, "ideal_s": weights / (profile.memory_bandwidth_gbps
            * 1e9), "predicted_s": cost.seconds, "bytes": cost.bytes, "bandwidth_efficiency":
            profile.bandwidth_efficiency}


def settings_for(measurer, precision: str, phase: str, length: int):
    """What the roofline costs for one measured point: the graph's own weight format where it has one."""
    from d2mc.roofline import RooflineSettings

    weights = getattr(measurer, "weights", None)
    stored = dict(precision=weights.precision, lm_head_precision=weights.lm_head_precision,
                  block_size=weights.block_size, zero_points=weights.zero_points) if weights else {}
    return RooflineSettings(prefill=length if phase == "prefill" else 8, context=length if phase == "decode" else 8,
                            all_logits=measurer.all_logits, **{"precision": precision, **stored})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-profile", default=None,
                        help="this machine's profile: auto (default: measured here before, else now), measure, "
                             "shipped, or a .toml file")
    parser.add_argument("--measure-host", metavar="TOML",
                        help="measure this machine first (as d2mc profile --measure-host), write the profile to TOML "
                             "and judge the roofline with it")
    parser.add_argument("--variant", action="append", choices=VARIANTS, help="runtime:precision to judge (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model")
    parser.add_argument("--decode-steps", type=int, default=6, help="decode steps per point and round")
    parser.add_argument("--quick", action="store_true", help="two models: SmolLM2-135M dense and the wider one")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from d2mc.arch import ModelArch
    from d2mc.host_profile import QUIET_QUANTILE, host_profile, measure_interleaved, measurers
    from d2mc.measure import OtherLoad, quantile
    from d2mc.roofline import estimate_phase

    def say(text):
        print(f"[{time.perf_counter() - started:6.0f}s] {text}", flush=True)

    started = time.perf_counter()
    load_before = os.getloadavg()
    if args.measure_host:
        from d2mc.host_profile import measure_host, write_profile

        args.host_profile = str(write_profile(measure_host(progress=lambda t: say(f"measuring the host: {t}")),
                                              args.measure_host))
    chosen = host_profile(args.host_profile, progress=say)
    profile = chosen.profile
    say(f"judging on {chosen.describe()}")
    variants = args.variant or list(VARIANTS)
    points = [("decode", c) for c in CONTEXTS] + [("prefill", n) for n in PREFILLS]
    rows, records, others = [], [], []
    errors = {(v, phase): [] for v in variants for phase in ("decode", "prefill")}
    median_errors = {key: [] for key in errors}
    for name, build in build_models(args.quick).items():
        say(f"{name}: building, lowering and quantizing")
        model = build()
        arch = ModelArch.from_config(model.config)
        with measurers(model, [tuple(v.split(":")) for v in variants]) as found:
            calls = {(f"{runtime}:{precision}", phase, length): measurer.phase_call(phase, length)
                     for (runtime, precision), measurer in found.items() for phase, length in points}
            say(f"{name}: timing {len(calls)} points in {args.rounds} interleaved rounds")
            with OtherLoad() as load:
                samples = measure_interleaved(calls, args.rounds,
                                              lambda key: args.decode_steps if key[1] == "decode" else 1,
                                              lambda text: None)
            others.append(load.cores)
            for (variant, phase, length), times in samples.items():
                runtime, precision = variant.split(":")
                measurer = found[runtime, precision]
                settings = settings_for(measurer, precision, phase, length)
                cost = estimate_phase(arch, profile.for_runtime(runtime), phase, settings)
                quiet, median = quantile(times, QUIET_QUANTILE), quantile(times, 0.5)
                error, median_error = (cost.seconds - quiet) / quiet, (cost.seconds - median) / median
                errors[variant, phase].append(abs(error))
                median_errors[variant, phase].append(abs(median_error))
                label = f"decode @ {length}" if phase == "decode" else f"prefill {length}"
                rows.append([name, variant, label, f"{cost.bytes / 1e6:.0f}", f"{cost.flops / 1e9:.2f}",
                             f"{cost.seconds * 1e3:.2f}", f"{quiet * 1e3:.2f}", f"{error * 100:+.1f}%",
                             f"{median * 1e3:.2f}", f"{median_error * 100:+.1f}%"])
                records.append({"model": name, "variant": variant, "phase": phase, "length": length,
                                "bytes": cost.bytes, "flops": cost.flops, "predicted_s": cost.seconds,
                                "measured_p20_s": quiet, "measured_median_s": median, "error": error,
                                "median_error": median_error, "samples": len(times)})
            say(f"{name}: done (other processes used {load.cores:.2f} cores while timing)")
        del model
    load_after = os.getloadavg()

    print(f"\nroofline of {chosen.describe()}, as each runtime sees it, against runs on this machine "
          f"({torch.get_num_threads()} threads): {QUIET_QUANTILE * 100:.0f}th percentile and median of "
          f"{args.rounds} interleaved rounds ({args.decode_steps} decode steps or 1 prefill per round); "
          f"{time.perf_counter() - started:.0f} s")
    print(f"load: other processes used {statistics.mean(others):.2f} cores on average while timing "
          f"(of {os.cpu_count()}; per model {', '.join(f'{c:.2f}' for c in others)}); load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    for runtime in sorted({v.split(":")[0] for v in variants}):
        seen = profile.for_runtime(runtime)
        line = (f"  {runtime}: {seen.achievable_bandwidth / 1e9:.1f} GB/s, {seen.achievable_flops('fp32') / 1e9:.0f} "
                f"GFLOP/s, {seen.kernel_overhead_us:.1f} us/kernel")
        for precision in seen.precisions:
            q = seen.for_precision(precision)
            line += (f"; {precision} weights {q.achievable_bandwidth / 1e9:.1f} GB/s, "
                     f"{q.achievable_flops('fp32') / 1e9:.0f} GFLOP/s, {q.kernel_overhead_us:.1f} us/kernel")
        print(line)
    print_table(["model", "runtime:weights", "phase", "MB moved", "GFLOP", "predicted ms", "measured p20 ms", "error",
                 "median ms", "error vs median"], rows)
    summary_rows, summary = [], {}
    for (variant, phase), values in errors.items():
        value, vs_median = statistics.median(values), statistics.median(median_errors[variant, phase])
        target = TARGETS[phase]
        verdict = ("met" if value <= target else "NOT met") if variant in TARGETED else "-"
        summary[f"{variant} {phase}"] = {"p20": value, "median": vs_median, "points": len(values)}
        summary_rows.append([variant, phase, len(values), f"{value * 100:.1f}%",
                             f"{target * 100:.0f}%" if variant in TARGETED else "-", verdict,
                             f"{vs_median * 100:.1f}%"])
    print("\nmedian absolute error per runtime, weights and phase")
    print_table(["runtime:weights", "phase", "points", "median |error|", "target", "", "against the median step"],
                summary_rows)

    orin = orin_check()
    print(f"\nOrin sanity check: Llama-3.2-1B ({orin['params'] / 1e9:.2f} B parameters) fp16 decode at context 512 on "
          f"orin-agx: predicted {orin['predicted_s'] * 1e3:.2f} ms; weight bytes / peak bandwidth = "
          f"{orin['weight_bytes'] / 1e9:.2f} GB / 204.8 GB/s = {orin['ideal_s'] * 1e3:.2f} ms "
          f"(bandwidth efficiency {orin['bandwidth_efficiency']})")
    write_json(args.json, {"points": records, "median_abs_error": summary, "profile": chosen.describe(),
                           "other_processes_cores": others, "load_average": [load_before, load_after],
                           "orin_check": orin})


if __name__ == "__main__":
    main()
