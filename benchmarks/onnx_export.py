"""ONNX export and decode speed: the onnxruntime-genai model builder (the peer) against d2mc, in one run.

SmolLM2-135M, fp32, ONNX Runtime CPU through onnxruntime-genai for every model, greedy, 128 new tokens after a
13-token prompt. Rows: the peer's dense export, d2mc's dense export, d2mc's LF-UC model with 6 attention modules
removed (standard-op dispatch, and the com.microsoft::MoE contrib op for comparison). Models are timed in turns,
several rounds, and the medians reported; compare the ratios, which come from the same run.

    python benchmarks/onnx_export.py [--rounds 3] [--new-tokens 128] [--json out.json]
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()

    from d2mc.targets.onnxruntime import export_onnx

    from d2mc.convert import ConvertOptions, convert
    from d2mc.loading import embedded_checkpoint, load_model

    work = Path(tempfile.mkdtemp(prefix="d2mc-bench-"))
    models, export_seconds = {}, {}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(embedded_checkpoint()),
                    "-o", str(work / "peer"), "-p", "fp32", "-e", "cpu", "-c", str(work / "peer-cache")],
                   check=True, capture_output=True)
    export_seconds["peer dense (onnxruntime-genai builder)"] = time.perf_counter() - start
    models["peer dense (onnxruntime-genai builder)"] = work / "peer"

    loaded = load_model("smollm2-135m")
    result = export_onnx(loaded.model, loaded.tokenizer, work / "dense", source="smollm2-135m")
    export_seconds["d2mc dense"] = result.seconds
    models["d2mc dense"] = work / "dense"

    ctx = convert(loaded, ConvertOptions(remove_attention=args.remove_attention))
    for moe_op in ("dispatch", "contrib"):
        name = f"d2mc LF-UC -{args.remove_attention} attn ({moe_op})"
        result = export_onnx(ctx.model, ctx.tokenizer, work / f"lfuc-{moe_op}", moe_op=moe_op)
        export_seconds[name] = result.seconds
        models[name] = work / f"lfuc-{moe_op}"

    timings = {name: {"prefill": [], "decode": []} for name in models}
    for _ in range(args.rounds):
        for name, path in models.items():
            prefill, decode = time_generation(path, args.new_tokens)
            timings[name]["prefill"].append(prefill)
            timings[name]["decode"].append(decode)
    peer = statistics.median(timings["peer dense (onnxruntime-genai builder)"]["decode"])
    rows, records = [], []
    for name in models:
        decode = statistics.median(timings[name]["decode"])
        prefill = statistics.median(timings[name]["prefill"])
        rows.append([name, round(export_seconds[name], 1), round(prefill * 1e3, 1), round(decode * 1e3, 2),
                     round(decode / peer, 3), round(peer / decode, 3)])
        records.append({"model": name, "export_s": export_seconds[name], "prefill_ms": prefill * 1e3,
                        "decode_ms_per_token": decode * 1e3, "latency_vs_peer": decode / peer,
                        "speedup_vs_peer": peer / decode, "rounds": timings[name]})
    print(f"SmolLM2-135M fp32, ONNX Runtime CPU via onnxruntime-genai, {args.new_tokens} new tokens, "
          f"median of {args.rounds} rounds")
    print_table(["model", "export s", "prefill ms", "decode ms/token", "latency / peer", "speed-up vs peer"], rows)
    write_json(args.json, records)


if __name__ == "__main__":
    main()
