"""How right the roofline is on this machine: predicted against measured latency of real artifacts, in one run.

Judged are ONNX Runtime artifacts of SmolLM2-135M as d2mc exports them (``export_onnx``, the writer of ``d2mc
export``): dense and a Dense2MoE conversion (LF-UC, four fused two-expert blocks), each with fp32 weights and with
int4 weights as ``d2mc export --precision int4`` writes them (``com.microsoft::MatMulNBits``, round-to-nearest,
blocks of 32, accuracy level 4: int8 products, an int8 LM head shared with the embedding), plus any artifact given
with ``--artifact`` (a ``d2mc export`` or ``d2mc compile`` output). Each is predicted on
this machine's device profile (``--host-profile``, as on ``d2mc profile``: by default the one measured here
before, else measured now and cached) as ONNX Runtime sees it, with the weight format read from the graph
(``d2mc.measure.read_weight_format``).

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
                                           [--precision int4 ...]
                                           [--artifact DIR ...] [--rounds 5] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
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
PRECISIONS = ("fp32", "int4", "int8")
TARGETS = {"decode": 0.10, "prefill": 0.20}
TARGETED = ("fp32", "int4")  # the weight precisions the targets are set for
RUNTIME = "onnxruntime-cpu"


def build_models() -> dict:
    """Name -> a function building the PyTorch model that is exported."""
    from d2mc.convert import ConvertOptions, convert
    from d2mc.loading import load_model

    return {
        "SmolLM2-135M dense": lambda: load_model("smollm2-135m", tokenizer=False).model,
        "SmolLM2-135M LF-UC": lambda: convert(
            load_model("smollm2-135m"), ConvertOptions(plan=CONVERSION_PLAN, reconstruct_steps=0, calib_sequences=4,
                                                       calib_length=128)).model,
    }


def export_artifacts(model, out: Path, precisions: list[str]) -> dict[str, Path]:
    """``model`` exported by d2mc (``export_onnx``, the writer of ``d2mc export``) as an artifact per weight precision
    under ``out``; int4/int8 as ``d2mc export --precision P`` writes them by default (``quantize_model``:
    round-to-nearest, blocks of 32 for int4 and 64 for int8, an int8 LM head shared with the embedding)."""
    from d2mc.targets.onnxruntime import export_onnx

    from d2mc.quantize import QuantizeOptions, quantize_model

    for precision in precisions:
        quantized = None if precision == "fp32" else quantize_model(model, QuantizeOptions(precision))
        export_onnx(model, None, out / precision, verify=False, quantized=quantized)
    return {precision: out / precision for precision in precisions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-profile", default=None,
                        help="this machine's profile: auto (default: measured here before, else now), measure, "
                             "shipped, or a .toml file")
    parser.add_argument("--fit-in-run", action="store_true",
                        help="also judge on a profile fitted on the fit models timed in the same rounds")
    parser.add_argument("--precision", action="append", choices=PRECISIONS,
                        help="weight precisions of the SmolLM2 artifacts (default: fp32 and int4)")
    parser.add_argument("--artifact", action="append", default=[], help="also judge this artifact directory")
    parser.add_argument("--no-smollm2", action="store_true", help="judge only the --artifact directories")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--decode-steps", type=int, default=6, help="decode steps per point and round")
    parser.add_argument("--quick", action="store_true", help="decode at 128 and 2048, prefill of 128 only")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from d2mc.artifact import find_config, find_onnx
    from d2mc.host_fit import QUIET_QUANTILE, FitPoint, fit_error, fit_runtime, fitted_profile
    from d2mc.host_profile import host_profile
    from d2mc.host_timing import fit_point_calls, fit_repeats, measure_interleaved, measured_points
    from d2mc.latency import measured_settings
    from d2mc.loading import load_model
    from d2mc.measure import OnnxMeasurer, OtherLoad, quantile
    from d2mc.roofline import estimate_phase

    def say(text):
        print(f"[{time.perf_counter() - started:6.0f}s] {text}", flush=True)

    started = time.perf_counter()
    precisions = args.precision or list(TARGETED)
    chosen = host_profile(args.host_profile, progress=say)
    profiles = {"host": (chosen.profile.for_runtime(RUNTIME), chosen.describe())}  # key -> (profile, description)
    say(f"judging on {chosen.describe()}")
    contexts, prefills = ((128, 2048), (128,)) if args.quick else (CONTEXTS, PREFILLS)
    points = [("decode", c) for c in contexts] + [("prefill", n) for n in prefills]
    with tempfile.TemporaryDirectory(prefix="d2mc-roofline-") as tmp, contextlib.ExitStack() as stack:
        artifacts = {}  # label -> artifact directory
        if not args.no_smollm2:
            for name, build in build_models().items():
                say(f"{name}: building and exporting")
                model = build()
                out = Path(tmp) / name.replace(" ", "-")
                for precision, path in export_artifacts(model, out, precisions).items():
                    artifacts[f"{name} {precision}"] = path
                del model
        for path in args.artifact:
            artifacts[str(path)] = Path(path)
        judged = {}  # label -> (arch, measurer)
        for label, path in artifacts.items():
            arch = load_model(find_config(path), config_only=True, tokenizer=False).arch
            judged[label] = arch, OnnxMeasurer(find_onnx(path, "onnxruntime"), vocab=arch.vocab_size)
        calls = {(label, phase, length): measurer.phase_call(phase, length)
                 for label, (_, measurer) in judged.items() for phase, length in points}
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
    errors = {}  # (profile, weights, phase) -> [(|p20 error|, |median error|)]
    for (label, phase, length), times in samples.items():
        arch, measurer = judged[label]
        settings = measured_settings(measurer.weights, precision="fp32", all_logits=measurer.all_logits,
                                     prefill=length if phase == "prefill" else 8,
                                     context=length if phase == "decode" else 8)
        quiet, median = quantile(times, QUIET_QUANTILE), quantile(times, 0.5)
        where = f"decode @ {length}" if phase == "decode" else f"prefill {length}"
        row = [label, where, f"{quiet * 1e3:.2f}", f"{median * 1e3:.2f}"]
        for key, (profile, _) in profiles.items():
            cost = estimate_phase(arch, profile, phase, settings)
            error, median_error = (cost.seconds - quiet) / quiet, (cost.seconds - median) / median
            errors.setdefault((key, settings.precision, phase), []).append((abs(error), abs(median_error)))
            row += [f"{cost.seconds * 1e3:.2f}", f"{error * 100:+.1f}%"]
            records.append({"artifact": label, "profile": key, "weights": settings.precision, "phase": phase,
                            "length": length, "bytes": cost.bytes, "flops": cost.flops, "predicted_s": cost.seconds,
                            "measured_p20_s": quiet, "measured_median_s": median, "error": error,
                            "median_error": median_error, "samples": len(times)})
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
                + [f"{c} ({key})" for key in profiles for c in ("predicted ms", "error")], rows)
    summary_rows, summary = [], {}
    for (key, weights, phase), values in sorted(errors.items()):
        p20 = [v[0] for v in values]
        target = TARGETS[phase] if weights in TARGETED else None
        verdict = "-" if target is None else ("met" if max(p20) <= target else "NOT met")
        entry = {"median": statistics.median(p20), "max": max(p20), "points": len(values),
                 "median_vs_median_step": statistics.median(v[1] for v in values)}
        summary[f"{key}: {weights} {phase}"] = entry
        summary_rows.append([key, weights, phase, len(values), f"{entry['median'] * 100:.1f}%",
                             f"{entry['max'] * 100:.1f}%", "-" if target is None else f"{target * 100:.0f}%", verdict,
                             f"{entry['median_vs_median_step'] * 100:.1f}%"])
    print("\nabsolute error per profile, weight precision and phase (target: every point)")
    print_table(["profile", "weights", "phase", "points", "median |error|", "max |error|", "target", "",
                 "median |error| vs the median step"], summary_rows)
    write_json(args.json, {"points": records, "abs_error": summary,
                           "profiles": {key: described for key, (_, described) in profiles.items()},
                           "other_processes_cores": load.cores, "load_average": [load_before, load_after]})


if __name__ == "__main__":
    main()
