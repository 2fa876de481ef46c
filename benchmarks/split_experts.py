"""Experts cut from MLPs next to Dense2MoE: held-out perplexity at predicted orin-agx decode latency.

SmolLM2-135M; held-out text of the built-in corpus (never used for calibration), 512-token windows. Rows:
split-experts (ToMoE / MoEfication without training: every MLP cut into 8 experts by co-activation, a fitted
router, 50% and 75% of the neurons active per token), LF-UC planned by the same roofline for the speed-up each
split predicts, LF-UC followed by a split of its fused experts, and sparse upcycling (copies, and slices with a
random router). split-experts keeps 2 of the 8 experts of each MLP always active by default; the rows without
shared experts show what that buys. The "with recovery" column runs the ``recover`` pass when this d2mc has one (``--recover``).

    python benchmarks/split_experts.py [--eval-tokens 8192] [--recover [--recover-steps N]] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dense_baseline, print_table, write_json  # noqa: E402

SPLITS = [("split-experts 50%", {"method": "split-experts", "active_fraction": 0.5}),
          ("split-experts 75%", {"method": "split-experts", "active_fraction": 0.75})]
OTHERS = [("split-experts 50%, no shared experts", {"method": "split-experts", "active_fraction": 0.5,
                                                    "split_shared": 0}),
          ("split-experts 75%, no shared experts", {"method": "split-experts", "active_fraction": 0.75,
                                                    "split_shared": 0}),
          ("LF-UC 6 attention removed + split 75%", {"method": "lfuc-split", "remove_attention": 6,
                                                     "active_fraction": 0.75}),
          ("upcycle, 8 copies, top-1", {"method": "upcycle", "experts": 8, "top_k": 1}),
          ("upcycle, 8 slices, top-4, random router", {"method": "upcycle", "experts": 8, "top_k": 4,
                                                       "upcycle_init": "partition"})]


def recover(ctx, teacher, steps: int | None) -> bool:
    """The hook of the "with recovery" column: run the recover pass (distillation from the dense parent, the same
    for every method) on the converted model, if this d2mc has one."""
    from d2mc.pipeline import PassManager, create_pass, registered_passes

    if "recover" not in registered_passes():
        return False
    ctx.teacher = teacher
    PassManager([create_pass("recover", **({"steps": steps} if steps is not None else {}))]).run(ctx)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--target", default="orin-agx")
    parser.add_argument("--recover", action="store_true", help="also run the recover pass (the last column)")
    parser.add_argument("--recover-steps", type=int, help="training steps of the recover pass (default: its own)")
    parser.add_argument("--json")
    args = parser.parse_args()

    from d2mc.arch import ModelArch
    from d2mc.convert import ConvertOptions, convert
    from d2mc.data import perplexity
    from d2mc.roofline import predict_decode_seconds

    base, profile, windows, dense_ms, dense_ppl = dense_baseline(args.target, args.eval_tokens)
    dense_mlp = base.arch.param_counts()["mlp"]
    rows = [["dense", "-", f"{base.arch.total_params / 1e6:.1f}M", "100%", f"{dense_ms:.3f}", "1.000",
             f"{dense_ppl:.2f}", "-"]]
    records = [{"method": "dense", "predicted_ms": dense_ms, "perplexity": dense_ppl}]

    def run(name: str, options: dict) -> float | None:
        loaded = copy.copy(base)
        loaded.model = copy.deepcopy(base.model)
        start = time.perf_counter()
        try:
            ctx = convert(loaded, ConvertOptions(target=args.target, **options))
        except Exception as exc:  # an unreachable budget is a result, not a crash
            rows.append([name, _setting(options), "-", "-", "-", "-", "-", str(exc)[:60]])
            return None
        seconds = time.perf_counter() - start
        arch = ModelArch.from_config(ctx.model.config)
        predicted = predict_decode_seconds(arch, profile) * 1e3
        ppl = perplexity(ctx.model, windows)
        recovered = None
        if args.recover and recover(ctx, copy.deepcopy(base.model).eval().requires_grad_(False),
                                    args.recover_steps):
            recovered = perplexity(ctx.model, windows)
        active_mlp = arch.active_param_counts()["mlp"] / dense_mlp
        rows.append([name, _setting(options), f"{arch.total_params / 1e6:.1f}M", f"{active_mlp:.0%}",
                     f"{predicted:.3f}", f"{dense_ms / predicted:.3f}", f"{ppl:.2f}",
                     f"{recovered:.2f}" if recovered is not None else ("n/a (no recover pass)" if args.recover
                                                                       else "not run")])
        routers = ctx.report["conversion"]["routers"]
        records.append({"method": name, "options": options, "predicted_ms": predicted, "perplexity": ppl,
                        "perplexity_recovered": recovered, "total_params": arch.total_params,
                        "active_params": arch.active_params, "active_mlp_share": active_mlp,
                        "attention_blocks": len(arch.attention_blocks), "convert_seconds": seconds,
                        "router_agreement": [round(v["agreement"], 3) for v in routers.values()],
                        "groups": ctx.results["plan"].groups if "plan" in ctx.results else None})
        print(f"{name:>45}: predicted {predicted:.3f} ms, perplexity {ppl:.2f} ({seconds:.0f} s)", flush=True)
        return predicted

    for name, options in SPLITS:
        predicted = run(name, options)
        if predicted is not None:  # LF-UC planned for the same predicted speed-up
            speedup = round(dense_ms / predicted, 4)
            run(f"LF-UC at the speed-up of {name}", {"method": "lfuc", "speedup": speedup})
    for name, options in OTHERS:
        run(name, options)
    print(f"\nSmolLM2-135M, held-out perplexity on {windows.numel()} tokens (never used for calibration), predicted "
          f"decode at context 512 on {profile.name} (fp16, roofline); no recovery training unless the last column "
          "says so")
    print_table(["method", "setting", "parameters", "active MLP", "predicted ms", "speed-up", "perplexity",
                 "perplexity with recovery"], rows)
    write_json(args.json, records)


def _setting(options: dict) -> str:
    shown = {k: v for k, v in options.items() if k != "method"}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "-"


if __name__ == "__main__":
    main()
