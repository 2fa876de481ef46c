"""The latency/accuracy frontier: Dense2MoE (LF-UC) against dense, layer pruning and attention dropping.

SmolLM2-135M. For K attention modules removed in {0, 2, 4, 6, 8, 10}, every method converts the model from the same
redundancy analysis (LF-UC: the K layers fused as experts of their kept neighbours, top-1; drop-layers: the K whole
layers of lowest block influence, ShortGPT; drop-attention: the attention of the same K layers); split-experts
keeps every layer with a share of each MLP's neurons active per token (``--split-fractions``), and sparse upcycling
makes each MLP ``--upcycle-experts`` copies with a router, top-1 (as many active parameters as dense, more in
total). Each point gets:

- held-out perplexity: text never used for calibration or training (the built-in corpus's held-out tail, 512-token
  windows);
- measured decode latency on ONNX Runtime here: the point's own ONNX export (verified against PyTorch), one decode
  step after 512 cached tokens, the 20th percentile of many steps, every model measured in turns over several
  rounds (median of the rounds) so that the ratios come from one run;
- predicted decode latency on orin-agx (roofline, fp16, context 512).

With ``--recover-steps N`` every point, the dense model (K=0) included, then gets the same recovery training
(distillation from the dense parent on the built-in corpus's training part, the same windows in the same order),
so that what training alone buys (the dense row) is told apart from what it repairs.

The dense model exported by the onnxruntime-genai model builder is the peer point. Writes the table (Markdown), a
Pareto plot (measured latency against perplexity, frontier marked) and JSON.

    python benchmarks/pareto.py [--ks 0,2,4,6,8,10] [--methods lfuc,drop-layers,drop-attention]
                                [--split-fractions 0.5,0.75] [--upcycle-experts 4] [--recover-steps 20]
                                [--rounds 3]
                                [--plot pareto.png] [--json out.json]
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

METHODS = ("lfuc", "drop-layers", "drop-attention")
PEER = "peer dense (onnxruntime-genai)"


def pareto_front(points: list[dict]) -> set[int]:
    """Indices of the points no other point beats on both latency and perplexity."""
    front = set()
    for i, p in enumerate(points):
        dominated = any(q["latency_ms"] <= p["latency_ms"] and q["perplexity"] <= p["perplexity"]
                        and (q["latency_ms"], q["perplexity"]) != (p["latency_ms"], p["perplexity"])
                        for q in points)
        if not dominated:
            front.add(i)
    return front


def convert_point(base, method: str, k: int, args, fraction: float | None = None):
    """The converted model of one point (K=0: the dense parent itself, as a converted model of one block per
    layer, so that every point goes through the same export; split-experts: ``fraction`` of the neurons active)."""
    from d2mc.convert import ConvertOptions, convert

    loaded = copy.copy(base)
    loaded.model = copy.deepcopy(base.model)
    if method == "split-experts":
        options = ConvertOptions(method=method, active_fraction=fraction, calib_sequences=args.calib_sequences,
                                 calib_length=args.calib_length)
    elif method == "upcycle":
        options = ConvertOptions(method=method, experts=args.upcycle_experts)
    else:
        options = ConvertOptions(method=method, remove_attention=k, calib_sequences=args.calib_sequences,
                                 calib_length=args.calib_length)
    return convert(loaded, options)


def recover_point(ctx, teacher, args) -> dict:
    """The same recovery budget for every point: ``--recover-steps`` steps of ``--recover-batch`` sequences of
    ``--recover-seq-len`` tokens, distillation from the dense parent (online teacher)."""
    from d2mc.pipeline import PassManager, create_pass
    from d2mc.recovery import RecoveryOptions, brief

    ctx.teacher = teacher
    options = RecoveryOptions(steps=args.recover_steps, seq_len=args.recover_seq_len,
                              batch_size=args.recover_batch, seed=0)
    PassManager([create_pass("recover", options=options)]).run(ctx)
    return brief(ctx.results["recovery"])


def plot(points: list[dict], front: set[int], path: str) -> None:
    from d2mc.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = [p for p in points if p["method"] == "dense"]
    for method in dict.fromkeys(p["method"] for p in points):
        mine = [p for p in points if p["method"] == method]
        if method not in (PEER, "dense"):
            mine += dense  # every method's line starts at the dense model (K=0)
        mine.sort(key=lambda p: p["latency_ms"])
        marker = "*" if method == PEER else "o"
        ax.plot([p["latency_ms"] for p in mine], [p["perplexity"] for p in mine], marker=marker, label=method,
                linestyle="-" if len(mine) > 1 else "none", markersize=10 if method == PEER else 5)
        for p in mine:
            if p.get("k") is not None:
                label = (f"{p['fraction']:.0%}" if p.get("fraction") else
                         f"{p['copies']} copies" if p.get("copies") else f"K={p['k']}")
                ax.annotate(label, (p["latency_ms"], p["perplexity"]), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
    frontier = sorted((points[i] for i in front), key=lambda p: p["latency_ms"])
    ax.plot([p["latency_ms"] for p in frontier], [p["perplexity"] for p in frontier], color="black",
            linestyle=":", linewidth=1, label="Pareto frontier")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("decode ms/token, ONNX Runtime on this machine (context 512)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M: latency against perplexity")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="0,2,4,6,8,10", help="attention modules removed, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--split-fractions", default="0.5,0.75",
                        help="split-experts points: shares of the MLP neurons active per token ('' for none)")
    parser.add_argument("--upcycle-experts", type=int, default=4,
                        help="the upcycling point: copies of each MLP, top-1 (0 for none)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-sequences", type=int, default=16)
    parser.add_argument("--calib-length", type=int, default=256)
    parser.add_argument("--context", type=int, default=512, help="cached tokens before the timed decode step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30, help="decode steps timed per round")
    parser.add_argument("--target", default="orin-agx")
    parser.add_argument("--recover-steps", type=int, default=0, help="recovery steps for every point (0: none)")
    parser.add_argument("--recover-seq-len", type=int, default=256)
    parser.add_argument("--recover-batch", type=int, default=4)
    parser.add_argument("--plot", default="pareto.png")
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="d2mc-pareto-") as tmp:
        run(args, Path(tmp))


def run(args, work: Path) -> None:
    from d2mc.targets.onnxruntime import export_onnx

    from d2mc.data import heldout_windows, perplexity
    from d2mc.host_fit import QUIET_QUANTILE
    from d2mc.loading import embedded_checkpoint, load_model
    from d2mc.measure import OnnxMeasurer, quantile
    from d2mc.profiles import load_profile
    from d2mc.roofline import predict_decode_seconds

    started = time.perf_counter()
    profile = load_profile(args.target)
    base = load_model("smollm2-135m")
    windows = heldout_windows(base.tokenizer, window=512, max_tokens=args.eval_tokens)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(embedded_checkpoint()),
                    "-o", str(work / "peer"), "-p", "fp32", "-e", "cpu", "-c", str(work / "peer-cache")],
                   check=True, capture_output=True)
    dense_ppl = perplexity(base.model, windows)
    teacher = base.model.eval().requires_grad_(False)  # every point converts a copy: the parent stays as it is
    points = [{"method": PEER, "k": None, "perplexity": dense_ppl, "onnx": work / "peer" / "model.onnx",
               "predicted_ms": predict_decode_seconds(base.arch, profile, args.context) * 1e3}]
    grid = [(k, method, None) for k in (int(x) for x in args.ks.split(",")) for method in args.methods.split(",")
            if k != 0 or method == METHODS[0]]  # K=0 is the dense model whatever the method
    grid += [(0, "split-experts", float(f)) for f in args.split_fractions.split(",") if f.strip()]
    grid += [(0, "upcycle", None)] if args.upcycle_experts else []
    for k, method, fraction in grid:
        ctx = convert_point(base, method, k, args, fraction)
        name = "dense" if k == 0 and method in METHODS else method
        converted_ppl = perplexity(ctx.model, windows)
        recovery = recover_point(ctx, teacher, args) if args.recover_steps else None
        ppl = perplexity(ctx.model, windows) if recovery else converted_ppl
        out = work / f"{method}-{k}-{fraction}"
        export_onnx(ctx.model, None, out)
        points.append({"method": name, "k": k, "fraction": fraction, "perplexity": ppl,
                       "copies": args.upcycle_experts if method == "upcycle" else None,
                       "converted_perplexity": converted_ppl, "recovery": recovery, "onnx": out / "model.onnx",
                       "predicted_ms": predict_decode_seconds(ctx.arch, profile, args.context) * 1e3,
                       "attention_blocks": len(ctx.arch.attention_blocks),
                       "active_params": ctx.arch.active_params, "total_params": ctx.arch.total_params,
                       "plan": ctx.results["plan"].to_dict() if "plan" in ctx.results else None})
        print(f"K={k:>2} {name:>15}{f' {fraction:.0%}' if fraction else ''}: perplexity {converted_ppl:8.2f}"
              + (f" -> {ppl:.2f} after recovery" if recovery else "") + ", predicted "
              f"{points[-1]['predicted_ms']:.3f} ms [{time.perf_counter() - started:.0f} s]", flush=True)
        del ctx

    rounds: dict[int, list[float]] = {i: [] for i in range(len(points))}
    measurers = [OnnxMeasurer(p["onnx"], base.arch.vocab_size) for p in points]
    for _ in range(args.rounds):
        for i, measurer in enumerate(measurers):
            samples = measurer.samples("decode", args.context, warmup=4, repeats=args.repeats)
            rounds[i].append(quantile(samples, QUIET_QUANTILE))
    for i, p in enumerate(points):
        p["latency_ms"] = statistics.median(rounds[i]) * 1e3
        p["latency_rounds_ms"] = [r * 1e3 for r in rounds[i]]
        del p["onnx"]
    front = pareto_front(points)
    peer_ms = points[0]["latency_ms"]
    rows = []
    recovered = args.recover_steps > 0
    for i, p in sorted(enumerate(points), key=lambda ip: (ip[1]["k"] if ip[1]["k"] is not None else -1,
                                                            ip[1]["method"])):
        rows.append([p["method"] + (f" {p['fraction']:.0%}" if p.get("fraction") else ""),
                     "-" if p["k"] is None else p["k"],
                     *([f"{p['converted_perplexity']:.2f}" if p.get("recovery") else "-"] if recovered else []),
                     f"{p['perplexity']:.2f}",
                     f"{p['latency_ms']:.2f}", f"{peer_ms / p['latency_ms']:.3f}", f"{p['predicted_ms']:.3f}",
                     "yes" if i in front else ""])
    print(f"\nSmolLM2-135M, held-out perplexity on {windows.numel()} tokens; decode latency measured on ONNX Runtime "
          f"here (fp32, step after {args.context} cached tokens, median of {args.rounds} rounds of the 20th "
          f"percentile of {args.repeats} steps) and predicted on {profile.name} (fp16); "
          + (f"every point but the peer after {args.recover_steps} recovery steps of {args.recover_batch} x "
             f"{args.recover_seq_len} tokens" if recovered else "no recovery training"))
    print_table(["method", "K", *(["perplexity before recovery"] if recovered else []), "perplexity", "measured ms", "speed-up vs peer", f"predicted {profile.name} ms",
                 "on frontier"], rows)
    plot(points, front, args.plot)
    write_json(args.json, {"points": points, "front": sorted(front), "settings": vars(args)})


if __name__ == "__main__":
    main()
