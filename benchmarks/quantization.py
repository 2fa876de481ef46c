"""Quantized artifacts: the onnxruntime-genai model builder (the peer) against d2mc, in one run.

SmolLM2-135M, ONNX Runtime CPU. Rows: the peer's fp32 and int4 exports (``-p fp32|int4``: round-to-nearest,
symmetric, block 32, accuracy_level 4, no calibration data), and d2mc's fp32, int4 and int8 (block 64) dense
exports and its int4 LF-UC model with ``--remove-attention`` attention modules removed (fused pairs, top-1,
MoE blocks through the standard-op dispatch and as ``com.microsoft::QMoE``, no block-wise reconstruction or recovery
training: its perplexity is the untrained conversion's, its speed is what the method buys; 0 leaves these rows
out). d2mc's int4/int8 rows are ``d2mc export --precision int4|int8`` with their defaults (LM head int8 in blocks of 64,
shared with the embedding; accuracy_level 4) unless a row's name says otherwise: one int4 dense row per item of ``--int4``,
``METHOD:BLOCK[:LM_HEAD[:MIXED]]`` (method rtn, hqq or gptq, which needs gptqmodel; LM head int8, float or int4;
mixed precision none, mixed-layers, mixed-layers-ends or calibrated).

For each artifact: decode speed through onnxruntime-genai (what ``d2mc run`` uses; greedy, ``--new-tokens`` new
tokens after a 13-token prompt, median per-token latency, models timed in turns over ``--rounds`` rounds; the
speed-up over the peer's int4 from the median round and from each model's fastest round, which a shared machine's
contention leaves alone),
held-out perplexity run by ONNX Runtime (``d2mc eval ARTIFACT``: ``--eval-tokens`` tokens in 512-token windows),
the ONNX size on disk, and the quantize time (d2mc: ``quantize_model``; the peer: its whole int4 build, which
includes its quantization). d2mc's exports here skip verification (``d2mc export`` runs it; the tests cover it).

    python benchmarks/quantization.py [--rounds 2] [--new-tokens 128] [--eval-tokens 4096]
        [--int4 rtn:32,hqq:32,hqq:64:int8:mixed-layers-ends] [--remove-attention 6] [--lfuc-block 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402
from onnx_export import time_generation  # noqa: E402

PEER = {"fp32": "peer fp32 (onnxruntime-genai builder)", "int4": "peer int4 (onnxruntime-genai builder)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--remove-attention", type=int, default=6)
    parser.add_argument("--lfuc-block", type=int, default=64, help="block size of the LF-UC rows (rtn, int4)")
    parser.add_argument("--int4", default="rtn:32,hqq:32,hqq:64:int8:mixed-layers-ends",
                        help="d2mc int4 dense rows, comma-separated METHOD:BLOCK[:LM_HEAD[:MIXED]]")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="d2mc-bench-") as tmp:
        run(args, Path(tmp))


def onnx_megabytes(path: Path) -> float:
    """The artifact's graph and external weights on disk."""
    return sum(f.stat().st_size for f in path.glob("model.onnx*")) / 1e6


def run(args, work: Path) -> None:
    from d2mc.targets.onnxruntime import export_onnx

    from d2mc.convert import ConvertOptions, convert
    from d2mc.evaluation import evaluate_artifact_perplexity
    from d2mc.loading import embedded_checkpoint, load_model
    from d2mc.quantize import QuantizeOptions, quantize_model

    models, quantize_seconds = {}, {}
    for precision, name in PEER.items():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(embedded_checkpoint()),
                        "-o", str(work / f"peer-{precision}"), "-p", precision, "-e", "cpu",
                        "-c", str(work / "peer-cache")], check=True, capture_output=True)
        if precision == "int4":
            quantize_seconds[name] = time.perf_counter() - start
        models[name] = work / f"peer-{precision}"

    loaded = load_model("smollm2-135m")
    variants = [("d2mc fp32", loaded.model, None)]
    for row in args.int4.split(","):
        parts = row.split(":")
        method, block, head, mixed = parts + ["int8", "none"][len(parts) - 2:]
        name = f"d2mc int4 {method} b{block}" + ("" if head == "int8" else f" {head} LM head") + (
            "" if mixed == "none" else f" {mixed} int8")
        variants.append((name, loaded.model, QuantizeOptions("int4", method, int(block), head, mixed_precision=mixed)))
    if args.remove_attention:
        source = copy.copy(loaded)  # conversion moves the parent's modules: keep `loaded` dense
        source.model = copy.deepcopy(loaded.model)
        lfuc = convert(source, ConvertOptions(remove_attention=args.remove_attention, max_group=2,
                                              reconstruct_steps=0))
        variants += [(f"d2mc int4 rtn b{args.lfuc_block} LF-UC -{args.remove_attention} attn ({moe_op})",
                      lfuc.model, QuantizeOptions("int4", "rtn", args.lfuc_block, mixed_precision="none"), moe_op)
                     for moe_op in ("dispatch", "contrib")]
    variants += [("d2mc int8 rtn b64", loaded.model, QuantizeOptions("int8"))]
    for i, (name, model, options, *moe_op) in enumerate(variants):
        quantized = None
        if options is not None:
            quantized = quantize_model(model, options, loaded.tokenizer)
            quantize_seconds[name] = quantized.seconds
        export_onnx(model, loaded.tokenizer, work / f"d2mc-{i}", verify=False, quantized=quantized,
                    moe_op=moe_op[0] if moe_op else "dispatch")
        models[name] = work / f"d2mc-{i}"
        del quantized

    perplexity = {name: evaluate_artifact_perplexity(path, tokens=args.eval_tokens).perplexity
                  for name, path in models.items()}
    decode = {name: [] for name in models}
    load = [os.getloadavg()[0]]  # the machine may be shared: the 1-minute load average around the timed rounds
    for _ in range(args.rounds):
        for name, path in models.items():
            decode[name].append(time_generation(path, args.new_tokens)[1])
        load.append(os.getloadavg()[0])
    median = {name: statistics.median(v) for name, v in decode.items()}
    # on a shared machine a round can lose one of ONNX Runtime's two threads to another process and run at half
    # speed: the fastest round of each model is the figure such contention leaves alone
    best = {name: min(v) for name, v in decode.items()}
    peer_int4, d2mc_fp32 = PEER["int4"], "d2mc fp32"
    rows, records = [], []
    for name, path in models.items():
        fp32 = PEER["fp32"] if name.startswith("peer") else d2mc_fp32
        record = {"model": name, "decode_tokens_per_s": 1 / median[name], "decode_ms_per_token": median[name] * 1e3,
                  "speedup_vs_peer_int4": median[peer_int4] / median[name],
                  "best_decode_ms_per_token": best[name] * 1e3,
                  "best_speedup_vs_peer_int4": best[peer_int4] / best[name], "perplexity": perplexity[name],
                  "perplexity_vs_own_fp32": perplexity[name] / perplexity[fp32], "onnx_mb": onnx_megabytes(path),
                  "quantize_s": quantize_seconds.get(name), "decode_rounds_s": decode[name]}
        records.append(record)
        rows.append([name, round(record["decode_tokens_per_s"], 1), round(record["speedup_vs_peer_int4"], 3),
                     round(record["best_speedup_vs_peer_int4"], 3), round(record["perplexity"], 3),
                     round(record["perplexity_vs_own_fp32"], 3),
                     round(record["onnx_mb"], 1),
                     "-" if record["quantize_s"] is None else round(record["quantize_s"], 1)])
    print(f"SmolLM2-135M, ONNX Runtime CPU. decode: onnxruntime-genai greedy, {args.new_tokens} new tokens, median "
          f"per-token latency of {args.rounds} rounds in turns; perplexity: ONNX Runtime, {args.eval_tokens} held-out "
          f"tokens in 512-token windows; load average {min(load):.1f}-{max(load):.1f} during the decode rounds")
    print_table(["artifact", "decode tok/s", "speed-up vs peer int4", "fastest rounds: speed-up", "perplexity",
                 "vs its fp32", "ONNX MB", "quantize s"], rows)
    write_json(args.json, {"rows": records, "settings": vars(args), "load_average": load})


if __name__ == "__main__":
    main()
