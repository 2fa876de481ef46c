"""How right the roofline is: predicted against measured latency on this machine, in one run.

Each model runs on ONNX Runtime (d2mc's own lowering: what d2mc artifacts run on here) and on PyTorch fp32 eager,
and is predicted on a device profile of this machine (default: the shipped host-cpu profile, made by
`d2mc profile --measure-host`), as each runtime sees it (`DeviceProfile.for_runtime`: the efficiencies and the
per-kernel overhead fitted for that runtime on three random fit models that are not among the models below).
Models: SmolLM2-135M dense, a Dense2MoE conversion of it with four fused two-expert blocks, and three random-weight
configurations (wider, deeper, another GQA ratio). Decode at contexts 128, 512 and 2048; prefill of 128 and 512
tokens. Prints every point and the median absolute error per runtime and phase; also the Orin sanity check from
the Llama-3.2-1B config alone.

Measured time is the 20th percentile of many steps (the median is printed too): on a shared host, bursts of
memory traffic from neighbours slow some steps by a third, and the low percentile is the machine undisturbed,
the same statistic the calibration fits on.

    python benchmarks/roofline_accuracy.py [--profile host-cpu | --measure-host new.toml] [--runtime R ...]
                                           [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
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
    for name, dims in CONFIGS.items():
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


def main() -> None:
    from d2mc.host_profile import RUNTIMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="host-cpu", help="device profile of this machine (name or .toml)")
    parser.add_argument("--measure-host", metavar="TOML",
                        help="measure this machine first (d2mc profile --measure-host), write the profile to TOML "
                             "and judge the roofline with it")
    parser.add_argument("--runtime", action="append", choices=RUNTIMES, help="runtimes to judge (default: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="dense models only, contexts 128 and 2048, prefill 128")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from d2mc.arch import ModelArch
    from d2mc.host_profile import QUIET_QUANTILE, runtime_measurer
    from d2mc.measure import measure_quietly, quantile
    from d2mc.profiles import load_profile
    from d2mc.roofline import RooflineSettings, estimate_phase

    if args.measure_host:
        from d2mc.host_profile import measure_host, write_profile

        measured = measure_host(progress=lambda text: print(f"measuring the host: {text}", flush=True))
        args.profile = str(write_profile(measured, args.measure_host))
    profile = load_profile(args.profile)
    runtimes = args.runtime or list(RUNTIMES)
    contexts, prefills = ((128, 2048), (128,)) if args.quick else (CONTEXTS, PREFILLS)
    rows, records = [], []
    errors = {(r, p): [] for r in runtimes for p in ("decode", "prefill")}
    median_errors = {key: [] for key in errors}
    started = time.perf_counter()
    for name, build in build_models(args.quick).items():
        model = build()
        arch = ModelArch.from_config(model.config)
        for runtime in runtimes:
            seen = profile.for_runtime(runtime)
            with runtime_measurer(runtime, model) as measurer:
                points = [("decode", 8, c) for c in contexts] + [("prefill", n, 8) for n in prefills]
                for phase, prefill, context in points:
                    settings = RooflineSettings(prefill=prefill, context=context, precision="fp32",
                                                all_logits=measurer.all_logits)
                    cost = estimate_phase(arch, seen, phase, settings)
                    length = context if phase == "decode" else prefill
                    repeats = args.repeats * 12 if phase == "decode" else args.repeats + 4
                    samples, others = measure_quietly(partial(measurer.samples, phase, length, warmup=4,
                                                              repeats=repeats))
                    quiet, median = quantile(samples, QUIET_QUANTILE), quantile(samples, 0.5)
                    error, median_error = (cost.seconds - quiet) / quiet, (cost.seconds - median) / median
                    errors[runtime, phase].append(abs(error))
                    median_errors[runtime, phase].append(abs(median_error))
                    label = f"decode @ {context}" if phase == "decode" else f"prefill {prefill}"
                    rows.append([name, runtime, label, f"{cost.bytes / 1e6:.0f}", f"{cost.flops / 1e9:.2f}",
                                 f"{cost.seconds * 1e3:.2f}", f"{quiet * 1e3:.2f}", f"{error * 100:+.1f}%",
                                 f"{median * 1e3:.2f}", f"{median_error * 100:+.1f}%"])
                    records.append({"model": name, "runtime": runtime, "phase": phase, "prefill": prefill,
                                    "context": context, "bytes": cost.bytes, "flops": cost.flops,
                                    "predicted_s": cost.seconds, "measured_p20_s": quiet, "measured_median_s": median,
                                    "error": error, "median_error": median_error, "samples": len(samples),
                                    "other_processes_cores": others})
                    print(f"{name:>44} {runtime:>15} {label:>14}: predicted {cost.seconds * 1e3:8.2f} ms, measured "
                          f"p20 {quiet * 1e3:8.2f} ms ({error * 100:+.1f}%), median {median * 1e3:8.2f} ms "
                          f"({median_error * 100:+.1f}%)", flush=True)
        del model
    print(f"\nroofline of {profile.name} as each runtime sees it, against fp32 runs on this machine "
          f"({torch.get_num_threads()} threads): 20th percentile and median of {args.repeats + 4} prefills / "
          f"{args.repeats * 12} decode steps; {time.perf_counter() - started:.0f} s")
    for runtime in runtimes:
        seen = profile.for_runtime(runtime)
        print(f"  {runtime}: {seen.achievable_bandwidth / 1e9:.1f} GB/s, {seen.achievable_flops('fp32') / 1e9:.0f} "
              f"GFLOP/s, {seen.kernel_overhead_us:.1f} us/kernel")
    print_table(["model", "runtime", "phase", "MB moved", "GFLOP", "predicted ms", "measured p20 ms", "error",
                 "median ms", "error vs median"], rows)
    targets = {"decode": 0.10, "prefill": 0.20}
    summary = {}
    print()
    for (runtime, phase), values in errors.items():
        value, vs_median = statistics.median(values), statistics.median(median_errors[runtime, phase])
        summary[f"{runtime} {phase}"] = {"p20": value, "median": vs_median}
        print(f"median absolute error, {runtime} {phase}: {value * 100:.1f}% (target <= {targets[phase] * 100:.0f}%: "
              f"{'met' if value <= targets[phase] else 'NOT met'}); against the median step time "
              f"{vs_median * 100:.1f}%")

    orin = orin_check()
    print(f"\nOrin sanity check: Llama-3.2-1B ({orin['params'] / 1e9:.2f} B parameters) fp16 decode at context 512 on "
          f"orin-agx: predicted {orin['predicted_s'] * 1e3:.2f} ms; weight bytes / peak bandwidth = "
          f"{orin['weight_bytes'] / 1e9:.2f} GB / 204.8 GB/s = {orin['ideal_s'] * 1e3:.2f} ms "
          f"(bandwidth efficiency {orin['bandwidth_efficiency']})")
    write_json(args.json, {"points": records, "median_abs_error": summary, "profile": profile.name,
                           "orin_check": orin})


if __name__ == "__main__":
    main()
