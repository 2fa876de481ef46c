"""How right the roofline is on this machine: predicted against measured latency of real artifacts, in one run.

Judged are ONNX Runtime artifacts of SmolLM2-135M as d2mc exports them (``export_onnx``, the writer of ``d2mc
export``), one per item of ``--artifacts``, ``MODEL:WEIGHTS``: MODEL ``dense`` or ``lfuc`` (a Dense2MoE conversion,
LF-UC, four fused two-expert blocks), WEIGHTS ``fp32``, ``int8`` or ``int4[:METHOD:BLOCK:MIXED]`` (``int4`` alone:
``d2mc export --precision int4``'s defaults, HQQ in blocks of 64 with ``mixed-layers-ends``; e.g.
``int4:rtn:64:none``), each with the int8 LM head shared with the embedding and accuracy level 4; plus any artifact
given with ``--artifact`` (a ``d2mc export`` or ``d2mc compile`` output). Each is predicted on this machine's device
profile (``--host-profile``, as on ``d2mc profile``: by default the one measured here before, else measured now and
cached) as ONNX Runtime sees it, twice: with every matrix as the graph stores it (``per matrix``:
``d2mc.weight_plan.read_weight_plan``, what ``d2mc profile --measure`` and ``d2mc compile`` use: mixed precision's
int8 matrices at the int8 figures, HQQ's zero-point residuals and block sums as float kernels) and with one format
for all (``one format``: the most common precision of the body's matrices, their block size, zero points yes or no,
the LM head's precision: the accounting before per-matrix formats).

The profile's figures were fitted on random fit models (``d2mc.host_fit.FIT_MODELS``) at decode contexts 64
and 1024 and prefills of 64 and 192 tokens; judged here are other models at other lengths: decode at contexts 128,
512 and 2048, prefill of 128 and 512 tokens. Targets: decode error at most 10% and prefill at most 20% for the
fp32 and int4 artifacts.

Timing: every artifact, phase and length is visited in turn in interleaved rounds, so all share the machine's
load; the measured time is the 20th percentile of the samples (the median is printed too): on a shared host,
bursts of load from neighbours slow some steps by a third, and the low percentile is the machine undisturbed, the
statistic the host profile is fitted on. The load other processes put on the machine while timing is printed.
On a machine others share, the load changes from minute to minute: ``--fit-in-run`` also judges on a profile
fitted (as ``d2mc profile --measure-host`` fits it) on the fit models timed in the same interleaved rounds as the
artifacts, so that calibration and judging see the same load and differ only in models and lengths.

    python benchmarks/roofline_accuracy.py [--host-profile auto|measure|shipped|FILE] [--fit-in-run]
                                           [--artifacts dense:fp32,dense:int4,dense:int4:rtn:64:none,lfuc:int4]
                                           [--artifact DIR ...] [--rounds 5] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

CONVERSION_PLAN = "12-13,14-15,16-17,25-26"  # low block-influence pairs of SmolLM2 (see FACTS.md)
CONTEXTS = (128, 512, 2048)
PREFILLS = (128, 512)
TARGETS = {"decode": 0.10, "prefill": 0.20}
TARGETED = ("fp32", "int4")  # the weight precisions the targets are set for
RUNTIME = "onnxruntime-cpu"
MODELS = {"dense": "SmolLM2-135M dense", "lfuc": "SmolLM2-135M LF-UC"}
ARTIFACTS = "dense:fp32,dense:int4,dense:int4:rtn:64:none,lfuc:int4"
ACCOUNTINGS = ("one format", "per matrix")


def build_models() -> dict:
    """MODEL -> a function building the PyTorch model that is exported and its tokenizer (which calibrated
    quantization reads its calibration text with)."""
    from d2mc.convert import ConvertOptions, convert
    from d2mc.loading import load_model

    def dense():
        loaded = load_model("smollm2-135m")
        return loaded.model, loaded.tokenizer

    def lfuc():
        loaded = load_model("smollm2-135m")
        options = ConvertOptions(plan=CONVERSION_PLAN, reconstruct_steps=0, calib_sequences=4, calib_length=128)
        return convert(loaded, options).model, loaded.tokenizer

    return {"dense": dense, "lfuc": lfuc}


def parse_artifacts(text: str) -> list[tuple[str, str]]:
    """``MODEL:WEIGHTS`` items (comma-separated) as (MODEL, WEIGHTS); raises ValueError saying what is wrong."""
    items = []
    for item in filter(None, text.split(",")):
        model, _, weights = item.partition(":")
        if model not in MODELS:
            raise ValueError(f"'{item}': MODEL must be one of {', '.join(MODELS)}")
        quantize_options(weights)
        items.append((model, weights))
    return items


def quantize_options(weights: str):
    """The quantization of WEIGHTS (``fp32``: None; ``int8``; ``int4[:METHOD:BLOCK:MIXED]``)."""
    from d2mc.errors import UserError
    from d2mc.quantize import QuantizeOptions

    precision, *rest = weights.split(":")
    if precision == "fp32" and not rest:
        return None
    if precision not in ("int4", "int8") or (rest and (precision != "int4" or len(rest) != 3 or not rest[1].isdigit())):
        raise ValueError(f"'{weights}': WEIGHTS must be fp32, int8, int4 or int4:METHOD:BLOCK:MIXED")
    try:
        if not rest:
            return QuantizeOptions(precision)
        return QuantizeOptions("int4", rest[0], int(rest[1]), mixed_precision=rest[2])
    except UserError as exc:
        raise ValueError(f"'{weights}': {exc}") from None


def artifact_label(model: str, options) -> str:
    """How a row names an artifact: its model and weights."""
    if options is None:
        return f"{MODELS[model]} fp32"
    mixed = f" {options.mixed_precision}" if options.mixed else ""
    return f"{MODELS[model]} {options.precision} {options.quant_method} b{options.block_size}{mixed}"


def export_artifacts(models: dict, items: list[tuple[str, str]], out: Path, say) -> dict[str, tuple[Path, str]]:
    """Each (MODEL, WEIGHTS) exported by d2mc (``export_onnx``, the writer of ``d2mc export``) under ``out``: label ->
    (artifact directory, weight precision); each model built once."""
    from d2mc.targets.onnxruntime import export_onnx

    from d2mc.quantize import quantize_model

    artifacts = {}
    for model_name in dict.fromkeys(model for model, _ in items):
        say(f"{MODELS[model_name]}: building")
        model, tokenizer = models[model_name]()
        for weights in [w for m, w in items if m == model_name]:
            options = quantize_options(weights)
            name = artifact_label(model_name, options)
            say(f"{name}: quantizing and exporting")
            quantized = None if options is None else quantize_model(model, options, tokenizer)
            path = out / name.replace(" ", "-")
            export_onnx(model, None, path, verify=False, quantized=quantized)
            artifacts[name] = path, "fp32" if options is None else options.precision
        del model, tokenizer
    return artifacts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-profile", default=None,
                        help="this machine's profile: auto (default: measured here before, else now), measure, "
                             "shipped, or a .toml file")
    parser.add_argument("--fit-in-run", action="store_true",
                        help="also judge on a profile fitted on the fit models timed in the same rounds")
    parser.add_argument("--artifacts", default=ARTIFACTS,
                        help=f"SmolLM2 artifacts, comma-separated MODEL:WEIGHTS (default {ARTIFACTS})")
    parser.add_argument("--artifact", action="append", default=[], help="also judge this artifact directory")
    parser.add_argument("--no-smollm2", action="store_true", help="judge only the --artifact directories")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--decode-steps", type=int, default=6, help="decode steps per point and round")
    parser.add_argument("--quick", action="store_true", help="decode at 128 and 2048, prefill of 128 only")
    parser.add_argument("--json")
    args = parser.parse_args()
    try:
        items = [] if args.no_smollm2 else parse_artifacts(args.artifacts)
    except ValueError as exc:
        parser.error(f"--artifacts {exc}")

    import torch

    from d2mc.artifact import find_config, find_onnx
    from d2mc.host_fit import QUIET_QUANTILE, FitPoint, fit_error, fit_runtime, fitted_profile
    from d2mc.host_profile import host_profile
    from d2mc.host_timing import fit_point_calls, fit_repeats, measure_interleaved, measured_points
    from d2mc.latency import measured_settings
    from d2mc.loading import load_model
    from d2mc.measure import OnnxMeasurer, OtherLoad, quantile
    from d2mc.roofline import estimate_phase
    from d2mc.weight_plan import read_weight_plan

    def say(text):
        print(f"[{time.perf_counter() - started:6.0f}s] {text}", flush=True)

    started = time.perf_counter()
    chosen = host_profile(args.host_profile, progress=say)
    profiles = {"host": (chosen.profile.for_runtime(RUNTIME), chosen.describe())}  # key -> (profile, description)
    say(f"judging on {chosen.describe()}")
    contexts, prefills = ((128, 2048), (128,)) if args.quick else (CONTEXTS, PREFILLS)
    points = [("decode", c) for c in contexts] + [("prefill", n) for n in prefills]
    with tempfile.TemporaryDirectory(prefix="d2mc-roofline-") as tmp, contextlib.ExitStack() as stack:
        artifacts = export_artifacts(build_models(), items, Path(tmp), say)  # label -> (directory, weights)
        for path in args.artifact:
            plan = read_weight_plan(find_onnx(path, "onnxruntime"))
            artifacts[str(path)] = Path(path), plan.precision if plan else "fp32"
        judged = {}  # label -> (arch, measurer)
        for name, (path, _) in artifacts.items():
            arch = load_model(find_config(path), config_only=True, tokenizer=False).arch
            judged[name] = arch, OnnxMeasurer(find_onnx(path, "onnxruntime"), vocab=arch.vocab_size)
        calls = {(name, phase, length): measurer.phase_call(phase, length)
                 for name, (_, measurer) in judged.items() for phase, length in points}
        if args.fit_in_run:
            calls.update(fit_point_calls(stack, (RUNTIME,), say=say))
        load_before = os.getloadavg()
        say(f"timing {len(calls)} points in {args.rounds} interleaved rounds")
        with OtherLoad() as load:
            samples = measure_interleaved(calls, args.rounds, lambda key: fit_repeats(key) if isinstance(
                key, FitPoint) else args.decode_steps if key[1] == "decode" else 1, say)
        load_after = os.getloadavg()
    if args.fit_in_run:
        fit_points = measured_points({key: samples.pop(key) for key in [k for k in samples if isinstance(k, FitPoint)]})
        fit = fit_runtime(RUNTIME, fit_points)
        profiles["fit in run"] = fitted_profile(fit), (
            f"the fit models timed in this run's rounds, fitted as d2mc profile --measure-host fits them (the fit "
            f"misses its own points by up to {fit_error(fit, fit_points) * 100:.1f}%)")

    rows, records = [], []
    errors = {}  # (profile, accounting, artifact, phase) -> [(|p20 error|, |median error|)]
    for (name, phase, length), times in samples.items():
        arch, measurer = judged[name]
        settings = measured_settings(measurer.weights, precision="fp32", all_logits=measurer.all_logits,
                                     prefill=length if phase == "prefill" else 8,
                                     context=length if phase == "decode" else 8)
        accountings = {"one format": dataclasses.replace(settings, weights=None), "per matrix": settings}
        quiet, median = quantile(times, QUIET_QUANTILE), quantile(times, 0.5)
        where = f"decode @ {length}" if phase == "decode" else f"prefill {length}"
        row = [name, where, f"{quiet * 1e3:.2f}", f"{median * 1e3:.2f}"]
        for key, (profile, _) in profiles.items():
            for accounting, costed in accountings.items():
                cost = estimate_phase(arch, profile, phase, costed)
                error, median_error = (cost.seconds - quiet) / quiet, (cost.seconds - median) / median
                errors.setdefault((key, accounting, name, phase), []).append((abs(error), abs(median_error)))
                row += [f"{cost.seconds * 1e3:.2f}", f"{error * 100:+.1f}%"]
                records.append({"artifact": name, "profile": key, "accounting": accounting,
                                "weights": artifacts[name][1], "phase": phase, "length": length, "bytes": cost.bytes,
                                "flops": cost.flops, "kernels": sum(o.kernels for o in cost.ops),
                                "predicted_s": cost.seconds, "measured_p20_s": quiet, "measured_median_s": median,
                                "error": error, "median_error": median_error, "samples": len(times)})
        rows.append(row)

    print(f"\n{RUNTIME} runs on this machine ({torch.get_num_threads()} threads): "
          f"{QUIET_QUANTILE * 100:.0f}th percentile and median of {args.rounds} interleaved rounds "
          f"({args.decode_steps} decode steps or 1 prefill per round); {time.perf_counter() - started:.0f} s")
    print(f"load: other processes used {load.cores:.2f} of {os.cpu_count()} cores on average while timing; load "
          f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    for key, (profile, described) in profiles.items():
        line = (f"{key}: {described}\n  {profile.achievable_bandwidth / 1e9:.1f} GB/s, "
                f"{profile.achievable_flops('fp32') / 1e9:.0f} GFLOP/s, {profile.kernel_overhead_us:.1f} us/kernel")
        for precision in profile.precisions:
            q = profile.for_precision(precision)
            line += (f"; {precision} weights {q.achievable_bandwidth / 1e9:.1f} GB/s, "
                     f"{q.achievable_flops(precision) / 1e9:.0f} GFLOP/s, {q.kernel_overhead_us:.1f} us/kernel")
        print(line)
    print_table(["artifact", "phase", "measured p20 ms", "median ms"]
                + [f"{c} ({key}, {accounting})" for key in profiles for accounting in ACCOUNTINGS
                   for c in ("predicted ms", "error")], rows)
    summary_rows, summary = [], {}
    for (key, accounting, name, phase), values in errors.items():
        p20 = [v[0] for v in values]
        target = TARGETS[phase] if artifacts[name][1] in TARGETED else None
        verdict = "-" if target is None else ("met" if max(p20) <= target else "NOT met")
        entry = {"median": statistics.median(p20), "max": max(p20), "points": len(values),
                 "median_vs_median_step": statistics.median(v[1] for v in values)}
        summary[f"{key}: {accounting}: {name} {phase}"] = entry
        summary_rows.append([key, accounting, name, phase, len(values), f"{entry['median'] * 100:.1f}%",
                             f"{entry['max'] * 100:.1f}%", "-" if target is None else f"{target * 100:.0f}%", verdict,
                             f"{entry['median_vs_median_step'] * 100:.1f}%"])
    summary_rows.sort(key=lambda r: (r[0], r[3], r[2], r[1]))
    print("\nabsolute error per profile, accounting, artifact and phase (target: every point)")
    print_table(["profile", "accounting", "artifact", "phase", "points", "median |error|", "max |error|", "target",
                 "", "median |error| vs the median step"], summary_rows)
    write_json(args.json, {"points": records, "abs_error": summary,
                           "profiles": {key: described for key, (_, described) in profiles.items()},
                           "other_processes_cores": load.cores, "load_average": [load_before, load_after]})


if __name__ == "__main__":
    main()
