"""Dense2MoE conversion without recovery training: held-out perplexity at equal predicted latency.

SmolLM2-135M; held-out text of the built-in corpus (never used for calibration), 512-token windows. For each
plan source (6 attention modules removed; predicted orin-agx decode speed-ups of 1.15x and 1.3x) every method
is planned by the same roofline: dense, drop-layers (ShortGPT), drop-attention, LF-UC with every MLP routed (with
its fitted router only, and after block-wise reconstruction of the fused experts on calibration activations), and
LF-UC keeping the kept layer's MLP as an always-active shared expert. No end-to-end recovery training.

    python benchmarks/conversion.py [--eval-tokens 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dense_baseline, print_table, write_json  # noqa: E402

VARIANTS = [
    ("drop-layers", {"method": "drop-layers"}),
    ("drop-attention", {"method": "drop-attention"}),
    ("LF-UC routed, router only", {"method": "lfuc", "reconstruct_steps": 0}),
    ("LF-UC routed", {"method": "lfuc"}),
    ("LF-UC shared", {"method": "lfuc", "shared_expert": True}),
]
SOURCES = [("6 attention removed", {"remove_attention": 6}), ("speed-up 1.15", {"speedup": 1.15}),
           ("speed-up 1.3", {"speedup": 1.3})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--target", default="orin-agx")
    parser.add_argument("--json")
    args = parser.parse_args()

    from d2mc.convert import ConvertOptions, convert
    from d2mc.data import perplexity
    from d2mc.roofline import predict_decode_seconds

    base, profile, windows, dense_ms, dense_ppl = dense_baseline(args.target, args.eval_tokens)
    rows = [["dense", "-", 30, f"{dense_ms:.3f}", "1.000", f"{dense_ppl:.2f}", "-"]]
    records = [{"source": "dense", "method": "dense", "predicted_ms": dense_ms, "perplexity": dense_ppl}]
    for source_name, source in SOURCES:
        for name, variant in VARIANTS:
            loaded = copy.copy(base)
            loaded.model = copy.deepcopy(base.model)
            start = time.perf_counter()
            try:
                ctx = convert(loaded, ConvertOptions(target=args.target, **source, **variant))
            except Exception as exc:  # an unreachable budget for one method is a result, not a crash
                rows.append([name, source_name, "-", "-", "-", "-", str(exc)[:60]])
                continue
            seconds = time.perf_counter() - start
            predicted = predict_decode_seconds(ctx.arch, profile) * 1e3
            ppl = perplexity(ctx.model, windows)
            plan = ctx.results["plan"]
            agreement = [round(v["agreement"], 2) for v in ctx.report["conversion"]["routers"].values()]
            rows.append([name, source_name, len(ctx.arch.attention_blocks), f"{predicted:.3f}",
                         f"{dense_ms / predicted:.3f}", f"{ppl:.2f}", str(plan.dropped or plan.groups)])
            records.append({"source": source_name, "method": name, "predicted_ms": predicted, "perplexity": ppl,
                            "groups": plan.groups, "dropped": plan.dropped, "router_agreement": agreement,
                            "convert_seconds": seconds, "attention_blocks": len(ctx.arch.attention_blocks)})
            print(f"{source_name:>20} {name:>15}: predicted {predicted:.3f} ms, perplexity {ppl:.2f}", flush=True)
    print(f"\nSmolLM2-135M, no recovery training, held-out perplexity on {windows.numel()} tokens, predicted "
          f"decode at context 512 on {profile.name} (fp16)")
    print_table(["method", "plan from", "attention blocks", "predicted ms", "speed-up", "perplexity",
                 "groups / dropped layers"], rows)
    write_json(args.json, records)


if __name__ == "__main__":
    main()
