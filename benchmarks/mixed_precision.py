"""Mixed int4/int8 precision on SmolLM2-135M: held-out perplexity and quantized bytes of each choice of int8 matrices.

The PyTorch model carrying the quantized weights is scored (``d2mc eval``'s windows, ``--eval-tokens`` held-out
tokens; the ONNX artifact scores within about 1% of it at accuracy level 4, ``benchmarks/quantization.py``), so
choices compare without exporting. Rows: ``--rows``, comma-separated ``METHOD:BLOCK:MIXED[:SHARE]`` (mixed
precision none, mixed-layers, mixed-layers-ends or calibrated; SHARE: calibrated's byte budget,
``QuantizeOptions.int8_share``). Each row prints its perplexity, its ratio to fp32, the bytes of the quantized
matrices (LM head included), how many matrices went to int8, the quantize time and the decode the roofline of
``--target`` predicts for those weights (context 512, as ``compile`` plans it). ``--model``: another model (a
converted one, a compile's ``model/``); ``--tensorrt``: quantize as for a device with TensorRT (int8 matrices with
one scale per output channel, the experts of MoE blocks left int4, the LM head float).

    python benchmarks/mixed_precision.py [--eval-tokens 4096] [--model smollm2-135m] [--tensorrt] [--target orin-agx]
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
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tensorrt", action="store_true", help="quantize as for a device with TensorRT")
    parser.add_argument("--target", default="orin-agx", help="device profile of the predicted decode")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()

    from d2mc.compile import CompileOptions, planned_settings, roofline_settings
    from d2mc.evaluation import evaluate_model_perplexity
    from d2mc.loading import load_model
    from d2mc.profiles import load_profile
    from d2mc.quantize import QuantizeOptions, quantize_model
    from d2mc.roofline import estimate_phase

    loaded = load_model(args.model)
    profile = load_profile(args.target)

    def predicted_ms(options) -> float:
        """Decode at context 512 with the weights ``options`` give (None: float), as compile costs them."""
        settings = roofline_settings(CompileOptions(args.model, "", target=args.target, quantize=options), profile)
        settings = planned_settings(settings, loaded.arch, options, profile)
        return estimate_phase(loaded.arch, profile, "decode", settings).seconds * 1e3

    fp32 = evaluate_model_perplexity(loaded.model, loaded.tokenizer, tokens=args.eval_tokens).perplexity
    rows, records = [["float", round(fp32, 3), 1, "-", "-", "-", round(predicted_ms(None), 3)]], []
    for row in args.rows.split(","):
        method, block, mixed, *share = row.split(":")
        print(f"quantizing {row}", file=sys.stderr, flush=True)
        options = QuantizeOptions("int4", method, int(block), mixed_precision=mixed, tensorrt=args.tensorrt,
                                  **({"int8_share": float(share[0])} if share else {}))
        quantized = quantize_model(loaded.model, options, loaded.tokenizer)
        ppl = evaluate_model_perplexity(quantized.model, loaded.tokenizer, tokens=args.eval_tokens).perplexity
        int8 = sum(q.bits == 8 for name, q in quantized.linears.items() if name != "lm_head")
        record = {"row": row, "perplexity": ppl, "vs_fp32": ppl / fp32, "quantized_mb": quantized.nbytes() / 1e6,
                  "int8_matrices": int8, "quantize_s": quantized.seconds,
                  "predicted_decode_ms": predicted_ms(quantized.options)}
        records.append(record)
        rows.append([row, round(ppl, 3), round(ppl / fp32, 3), round(record["quantized_mb"], 1), int8,
                     round(quantized.seconds, 1), round(record["predicted_decode_ms"], 3)])
        del quantized
    print(f"{args.model}{' (for TensorRT)' if args.tensorrt else ''}, PyTorch with the quantized weights, "
          f"{args.eval_tokens} held-out tokens; predicted decode on {profile.name} at context 512; load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print_table(["weights", "perplexity", "vs fp32", "quantized MB", "int8 matrices", "quantize s",
                 f"predicted ms ({profile.name})"], rows)
    write_json(args.json, {"fp32": fp32, "rows": records, "settings": vars(args)})


if __name__ == "__main__":
    main()
