"""ONNX export and decode speed: the onnxruntime-genai model builder (the peer) against d2mc, in one run.

SmolLM2-135M, fp32, ONNX Runtime CPU. Rows: the peer's dense export, d2mc's dense export, d2mc's LF-UC model with
6 attention modules removed (by default as 6 fused pairs, top-1: standard-op dispatch, and the com.microsoft::MoE
contrib op for comparison). Two measurements of the same files:

1. onnxruntime-genai generation (what ``d2mc run`` uses), greedy, 128 new tokens after a 13-token prompt:
   prefill time and the median per-token decode latency.
2. ONNX Runtime sessions driven by the same loop for every model (d2mc.measure.OnnxMeasurer): a prefill of 128
   tokens and one decode step after 512 cached tokens, medians. This is where the MoE forms differ most.

Models are timed in turns, several rounds, and the medians reported; compare the ratios, which come from the same
run. Export times include d2mc's verification against PyTorch; the TensorRT flavour's export is timed too.
The LF-UC model skips block-wise reconstruction: latency does not depend on the weights' values.

    python benchmarks/onnx_export.py [--rounds 3] [--new-tokens 128] [--max-group 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

PROMPT = "The history of the city begins in the early nineteenth century, when"


def time_generation(model_dir: Path, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, median seconds per decoded token) for one greedy generation."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)
    prefill = time.perf_counter() - start
    steps = []
    while not generator.is_done():
        start = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - start)
    return prefill, statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--remove-attention", type=int, default=6)
    parser.add_argument("--max-group", type=int, default=2, help="most layers per fused block (2: pairs)")
    parser.add_argument("--prefill", type=int, default=128, help="prefill length of the session measurement")
    parser.add_argument("--context", type=int, default=512, help="cached tokens before the timed decode step")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="d2mc-bench-") as tmp:
        run(args, Path(tmp))


def run(args, work: Path) -> None:
    from d2mc.targets.onnxruntime import export_onnx

    from d2mc.convert import ConvertOptions, convert
    from d2mc.loading import embedded_checkpoint, load_model
    from d2mc.measure import OnnxMeasurer

    peer = "peer dense (onnxruntime-genai builder)"
    models, export_seconds, verified = {}, {}, {}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(embedded_checkpoint()),
                    "-o", str(work / "peer"), "-p", "fp32", "-e", "cpu", "-c", str(work / "peer-cache")],
                   check=True, capture_output=True)
    export_seconds[peer] = time.perf_counter() - start
    models[peer] = work / "peer"

    loaded = load_model("smollm2-135m")
    result = export_onnx(loaded.model, loaded.tokenizer, work / "dense", source="smollm2-135m")
    export_seconds["d2mc dense"], verified["d2mc dense"] = result.seconds, result.verify["max_abs_diff"]
    models["d2mc dense"] = work / "dense"

    source = copy.copy(loaded)  # conversion moves the parent's modules: keep `loaded` dense for the exports below
    source.model = copy.deepcopy(loaded.model)
    ctx = convert(source, ConvertOptions(remove_attention=args.remove_attention, max_group=args.max_group,
                                         reconstruct_steps=0))
    blocks = sum(1 for b in ctx.model.config.blocks if len(b.expert_layers) > 1)
    lfuc = f"d2mc LF-UC -{args.remove_attention} attn, {blocks} MoE blocks"
    for moe_op in ("dispatch", "contrib"):
        name = f"{lfuc} ({moe_op})"
        result = export_onnx(ctx.model, ctx.tokenizer, work / f"lfuc-{moe_op}", moe_op=moe_op)
        export_seconds[name], verified[name] = result.seconds, result.verify["max_abs_diff"]
        models[name] = work / f"lfuc-{moe_op}"
    trt_exports = {}
    for label, model in (("dense", loaded.model), ("LF-UC", ctx.model)):
        result = export_onnx(model, None, work / f"trt-{label}", flavour="tensorrt", precision="fp16")
        trt_exports[label] = {"export_s": result.seconds, "max_abs_diff": result.verify["max_abs_diff"],
                              "tolerance": result.verify["tolerance"]}

    timings = {name: {"prefill": [], "decode": [], "session_prefill": [], "session_decode": []} for name in models}
    measurers = {name: OnnxMeasurer(path / "model.onnx", loaded.arch.vocab_size) for name, path in models.items()}
    for _ in range(args.rounds):
        for name, path in models.items():
            prefill, decode = time_generation(path, args.new_tokens)
            timings[name]["prefill"].append(prefill)
            timings[name]["decode"].append(decode)
            m = measurers[name].measure(prefill=args.prefill, context=args.context, warmup=1, repeats=3)
            timings[name]["session_prefill"].append(m.prefill_seconds)
            timings[name]["session_decode"].append(m.decode_seconds)
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in timings.items()}
    rows, records = [], []
    for name in models:
        m, p = med[name], med[peer]
        rows.append([name, round(export_seconds[name], 1), f"{verified[name]:.2g}" if name in verified else "-",
                     round(m["prefill"] * 1e3, 1), round(m["decode"] * 1e3, 2), round(m["decode"] / p["decode"], 3),
                     round(p["decode"] / m["decode"], 3), round(m["session_prefill"] * 1e3, 1),
                     round(m["session_decode"] * 1e3, 2), round(p["session_decode"] / m["session_decode"], 3)])
        records.append({"model": name, "export_s": export_seconds[name], "verify_max_abs_diff": verified.get(name),
                        "prefill_ms": m["prefill"] * 1e3, "decode_ms_per_token": m["decode"] * 1e3,
                        "latency_vs_peer": m["decode"] / p["decode"], "speedup_vs_peer": p["decode"] / m["decode"],
                        f"session_prefill_{args.prefill}_ms": m["session_prefill"] * 1e3,
                        f"session_decode_at_{args.context}_ms": m["session_decode"] * 1e3,
                        "rounds": timings[name]})
    print(f"SmolLM2-135M fp32, ONNX Runtime CPU, median of {args.rounds} rounds. genai: onnxruntime-genai greedy, "
          f"{args.new_tokens} new tokens after a 13-token prompt; session: prefill {args.prefill}, decode after "
          f"{args.context} cached tokens")
    print_table(["model", "export s", "verify max|diff|", "genai prefill ms", "genai decode ms/token",
                 "latency / peer", "speed-up vs peer", f"session prefill-{args.prefill} ms",
                 f"session decode@{args.context} ms", "session speed-up vs peer"], rows)
    print()
    print("TensorRT flavour (fp16, D2mcMoE plugin nodes; verified in ONNX Runtime with the plugin expanded)")
    print_table(["model", "export s", "verify max|diff|", "tolerance"],
                [[label, round(r["export_s"], 1), f"{r['max_abs_diff']:.2g}", f"{r['tolerance']:.3g}"]
                 for label, r in trt_exports.items()])
    write_json(args.json, {"rows": records, "tensorrt_flavour": trt_exports, "settings": vars(args)})


if __name__ == "__main__":
    main()
