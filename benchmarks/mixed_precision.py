"""Mixed int4/int8 precision on SmolLM2-135M: held-out perplexity and quantized bytes of each choice of int8 matrices.

The PyTorch model carrying the quantized weights is scored (``d2mc eval``'s windows, ``--eval-tokens`` held-out
tokens; the ONNX artifact scores within about 1% of it at accuracy level 4, ``benchmarks/quantization.py``), so
choices compare without exporting. Rows: ``--rows``, comma-separated ``METHOD:BLOCK:MIXED[:SHARE]`` (mixed
precision none, mixed-layers, mixed-layers-ends or calibrated; SHARE: calibrated's byte budget,
``QuantizeOptions.int8_share``). Each row prints its perplexity, its ratio to fp32, the bytes of the quantized
matrices (LM head included), how many matrices went to int8 and the quantize time.

    python benchmarks/mixed_precision.py [--eval-tokens 4096]
        [--rows rtn:64:mixed-layers-ends,rtn:64:calibrated:0.2,rtn:64:calibrated:0.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--rows", default="rtn:64:mixed-layers-ends,rtn:64:calibrated:0.2,rtn:64:calibrated:0.3")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()

    from d2mc.evaluation import evaluate_model_perplexity
    from d2mc.loading import load_model
    from d2mc.quantize import QuantizeOptions, quantize_model

    loaded = load_model("smollm2-135m")
    fp32 = evaluate_model_perplexity(loaded.model, loaded.tokenizer, tokens=args.eval_tokens).perplexity
    rows, records = [["fp32", round(fp32, 3), 1, "-", "-", "-"]], []
    for row in args.rows.split(","):
        method, block, mixed, *share = row.split(":")
        print(f"quantizing {row}", file=sys.stderr, flush=True)
        options = QuantizeOptions("int4", method, int(block), mixed_precision=mixed,
                                  **({"int8_share": float(share[0])} if share else {}))
        quantized = quantize_model(loaded.model, options, loaded.tokenizer)
        ppl = evaluate_model_perplexity(quantized.model, loaded.tokenizer, tokens=args.eval_tokens).perplexity
        int8 = sum(q.bits == 8 for name, q in quantized.linears.items() if name != "lm_head")
        record = {"row": row, "perplexity": ppl, "vs_fp32": ppl / fp32, "quantized_mb": quantized.nbytes() / 1e6,
                  "int8_matrices": int8, "quantize_s": quantized.seconds}
        records.append(record)
        rows.append([row, round(ppl, 3), round(ppl / fp32, 3), round(record["quantized_mb"], 1), int8,
                     round(quantized.seconds, 1)])
        del quantized
    print(f"SmolLM2-135M, PyTorch with the quantized weights, {args.eval_tokens} held-out tokens; load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print_table(["weights", "perplexity", "vs fp32", "quantized MB", "int8 matrices", "quantize s"], rows)
    write_json(args.json, {"fp32": fp32, "rows": records, "settings": vars(args)})


if __name__ == "__main__":
    main()
