"""The latency/accuracy frontier at equal training: auto against dense, layer pruning, attention dropping and LF-UC.

SmolLM2-135M. For every deployment context (``--contexts``, cached tokens of the decode step) and predicted
speed-up (``--speedups``) on the device (``--target``, fp16), every method plans for that budget at that context:
drop-layers (ShortGPT: the whole layers of lowest block influence), drop-attention (the attention of those layers),
LF-UC with a fixed plan shape (groups of at most ``--lfuc-max-group`` layers, top-1) and auto (the mixed plan of
least measured damage, ``--method auto``). Every point, the dense model included, then gets the same recovery
training: ``--recover-steps`` steps of ``--recover-batch`` x ``--recover-seq-len`` tokens of distillation from the
dense parent on the same windows in the same order, text the dense parent generated itself (``--data generate``;
the held-out text's domain is never trained on), so that the equally trained dense model is the ceiling; with
``--train-sequences`` the dense parent writes fewer windows than the steps take, and they repeat as epochs (writing
is slow on a CPU: 3 s per 256-token window on one thread in batches of 32, 5 s in batches of 8). ``--eval-every``
scores the held-out perplexity on ``--curve-tokens`` tokens every that many steps (the learning curve). Each
point reports its predicted decode latency at its context and its held-out perplexity (the built-in corpus's
held-out tail, 512-token windows) before and after recovery; with ``--export`` it is also lowered to ONNX and
verified against PyTorch.

Points are written to ``--json`` as they finish; a rerun with the same settings skips the points already there
(the generated text and the teacher's top-k are kept in ``--work``), so the sweep can be stopped and resumed.

    python benchmarks/frontier.py [--contexts 512,4096] [--speedups 1.2,1.3] [--recover-steps 60]
                                [--points 512x1.3,4096x1.2] [--methods drop-layers,drop-attention,lfuc,auto]
                                [--train-sequences 160] [--generate-batch 32] [--eval-every 32 --curve-tokens 1024]
                                [--json frontier.json] [--reconstruct-steps 150] [--plot frontier.png] [--work frontier-work] [--export]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

METHODS = ("drop-layers", "drop-attention", "lfuc", "auto")
# the settings that decide a point's result: a JSON written with others is not resumed from
RESUMED_SETTINGS = ("recover_steps", "recover_seq_len", "recover_batch", "teacher_topk", "hidden_weight", "data",
                    "train_sequences", "generate_batch", "eval_tokens", "target", "lfuc_max_group", "auto_max_group",
                    "lr", "ce_weight", "reconstruct_steps", "calib_sequences", "calib_length")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Sweep:
    """The dense model, its redundancy analysis, the shared training windows and teacher cache, and the points done."""

    def __init__(self, args):
        from d2mc.data import calibration_batch, heldout_windows, perplexity
        from d2mc.loading import load_model
        from d2mc.profiles import load_profile

        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.base = load_model("smollm2-135m")
        self.teacher = self.base.model.eval().requires_grad_(False)  # every point converts a copy
        self.profile = load_profile(args.target)
        self.windows = heldout_windows(self.base.tokenizer, 512, args.eval_tokens)
        self.curve_windows = heldout_windows(self.base.tokenizer, 512, args.curve_tokens) if args.eval_every else None
        self.calibration = calibration_batch(self.base.tokenizer, args.calib_sequences, args.calib_length)
        self.state = self._resume()
        if "dense_untrained" not in self.state:
            self.state["dense_untrained"] = perplexity(self.teacher, self.windows)
            self.save()
        log(f"dense (untrained): held-out perplexity {self.state['dense_untrained']:.2f}")
        self._redundancy = None
        self._data = None

    def _resume(self) -> dict:
        settings = {k: getattr(self.args, k) for k in RESUMED_SETTINGS}
        path = Path(self.args.json) if self.args.json else None
        if path and path.exists():
            state = json.loads(path.read_text())
            if state.get("settings") == settings:
                log(f"resuming {path}: {len(state['points'])} points done")
                return state
            log(f"{path} holds a sweep with other settings: starting over")
        return {"settings": settings, "points": {}}

    def save(self) -> None:
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.state, indent=2, default=str) + "\n")

    @property
    def redundancy(self) -> dict:
        """Block, attention and MLP influence per layer, computed once for every point."""
        if self._redundancy is None:
            from d2mc.context import Context
            from d2mc.pipeline import PassManager, create_pass

            ctx = Context.from_loaded(self.base, calibration=self.calibration)
            PassManager([create_pass("analyze-redundancy")]).run(ctx)
            self._redundancy = ctx.results["redundancy"]
        return self._redundancy

    def data(self):
        """The training windows and the teacher's cached top-k over them, made once and kept in ``--work``."""
        if self._data is not None:
            return self._data
        import torch

        from d2mc.recovery.data import cache_teacher_topk, generate_windows, training_windows

        a = self.args
        sequences = a.train_sequences or a.recover_steps * a.recover_batch
        batch = "" if a.generate_batch == 8 else f"-b{a.generate_batch}"  # the default keeps its old file name
        path = self.work / f"data-{a.data}-{sequences}x{a.recover_seq_len}{batch}-top{a.teacher_topk}.pt"
        if path.exists():
            self._data = torch.load(path, weights_only=False)  # our own file: windows and a TeacherTopK
            return self._data
        start = time.perf_counter()
        if a.data == "generate":
            windows = generate_windows(self.teacher, self.base.tokenizer, sequences, a.recover_seq_len, seed=0,
                                       batch_size=a.generate_batch, progress=log)
        else:
            windows = training_windows(self.base.tokenizer, None, a.recover_seq_len)
            windows = windows[:a.train_sequences] if a.train_sequences else windows
        log(f"training text ({a.data}): {windows.shape[0]} x {windows.shape[1]} tokens "
            f"[{time.perf_counter() - start:.0f} s]")
        cache = cache_teacher_topk(self.teacher, windows, a.teacher_topk) if a.teacher_topk else None
        self._data = (windows, cache)
        torch.save(self._data, path)
        return self._data

    def convert(self, method: str, context: int, speedup: float):
        """The converted model of one point (method ``dense``: the dense parent as a converted model of one block
        per layer, so that it trains and exports as every other point does)."""
        from d2mc.convert import ConvertOptions, conversion_context, conversion_passes, conversion_summary
        from d2mc.pipeline import PassManager
        from d2mc.restructure import dense_plan, restructure

        loaded = copy.copy(self.base)
        loaded.model = copy.deepcopy(self.base.model)
        if method == "dense":
            from d2mc.context import Context

            model = restructure(loaded.model, dense_plan(self.base.arch.num_blocks))
            return Context(model=model, tokenizer=loaded.tokenizer), None
        max_group = {"lfuc": self.args.lfuc_max_group, "auto": self.args.auto_max_group}.get(method)
        options = ConvertOptions(method=method, speedup=speedup, target=self.args.target, context=context,
                                 max_group=max_group, calib_sequences=self.args.calib_sequences,
                                 calib_length=self.args.calib_length, reconstruct_steps=self.args.reconstruct_steps)
        passes = conversion_passes(options)[1:]  # the analysis is shared by every point
        ctx = conversion_context(loaded, options, passes)
        ctx.results["redundancy"] = self.redundancy
        PassManager(passes, progress=lambda text: log(f"  {text}") if "/" in text else None).run(ctx)
        return ctx, conversion_summary(ctx, options)

    def recover(self, model) -> dict:
        """Train ``model`` with the sweep's recovery budget; the summary keeps the held-out curve (``--eval-every``)."""
        from d2mc.recovery import RecoveryOptions, brief, train_recovery
        from d2mc.recovery.data import WindowDataset

        a = self.args
        windows, cache = self.data()
        options = RecoveryOptions(steps=a.recover_steps, seq_len=a.recover_seq_len, batch_size=a.recover_batch,
                                  lr=a.lr, data="generate" if a.data == "generate" else None,
                                  ce_weight=a.ce_weight, teacher_topk=a.teacher_topk, hidden_weight=a.hidden_weight,
                                  eval_every=a.eval_every, log_every=10, seed=0)
        summary = train_recovery(model, self.teacher, WindowDataset(windows, cache), options,
                                 eval_windows=self.curve_windows,
                                 progress=lambda text: log(f"  {text}") if "step" in text else None)
        return {**brief(summary), "heldout_curve": summary["heldout_curve"],
                "distinct_tokens": windows.numel(), "epochs": summary["tokens"] / windows.numel()}

    def point(self, method: str, context: int, speedup: float | None) -> dict:
        """Convert, score, recover, score (and export) one point, or return it from the JSON."""
        from d2mc.data import perplexity
        from d2mc.roofline import predict_decode_seconds

        key = "dense" if method == "dense" else f"{method}@{context}x{speedup:g}"
        if key in self.state["points"]:
            return self.state["points"][key]
        log(f"{key}: converting")
        start = time.perf_counter()
        ctx, summary = self.convert(method, context, speedup)
        from d2mc.arch import ModelArch

        arch = ModelArch.from_config(ctx.model.config)
        convert_s = time.perf_counter() - start
        converted = perplexity(ctx.model, self.windows) if method != "dense" else self.state["dense_untrained"]
        log(f"{key}: converted in {convert_s:.0f} s, held-out perplexity {converted:.2f}")
        recovery = self.recover(ctx.model)
        recovered = perplexity(ctx.model, self.windows)
        log(f"{key}: recovered in {recovery['seconds']:.0f} s, held-out perplexity {recovered:.2f}")
        verify = None
        if self.args.export:
            from d2mc.targets.onnxruntime import export_onnx

            verify = export_onnx(ctx.model, None, self.work / "onnx" / key, overwrite=True).verify
            log(f"{key}: exported, verified max |logit diff| {verify['max_abs_diff']:.3g}")
        plan = summary["plan"] if summary else None
        record = {
            "method": method, "context": context, "speedup_target": speedup,
            "plan": (summary["plan_search"]["chosen"]["plan"] if summary and summary.get("plan_search")
                     else describe(method, plan)),
            "plan_detail": plan, "plan_search": summary.get("plan_search") if summary else None,
            "predicted_ms": {str(c): predict_decode_seconds(arch, self.profile, c) * 1e3 for c in self.contexts},
            "attention_blocks": len(arch.attention_blocks), "blocks": arch.num_blocks,
            "active_params": arch.active_params, "total_params": arch.total_params,
            "convert_seconds": convert_s, "converted_perplexity": converted, "perplexity": recovered,
            "recovery": recovery, "verify": verify,
        }
        self.state["points"][key] = record
        self.save()
        del ctx
        return record

    @property
    def contexts(self) -> list[int]:
        return sorted({context for context, _ in grid(self.args)})


def grid(args) -> list[tuple[int, float]]:
    """The (context, speed-up) points of the sweep: ``--points``, or every context with every speed-up."""
    if args.points:
        return [(int(c), float(s)) for c, s in (p.split("x") for p in args.points.split(","))]
    return [(int(c), float(s)) for c in args.contexts.split(",") for s in args.speedups.split(",")]


def describe(method: str, plan: dict | None) -> str:
    """A fixed-shape method's plan in a line."""
    if not plan:
        return "dense"
    if method == "drop-layers":
        return "drop layers " + ",".join(str(x) for x in plan["dropped"] or plan["removed_attention"])
    if method == "drop-attention":
        return "drop attention " + ",".join(str(x) for x in plan["removed_attention"])
    return "fuse " + ", ".join(f"{g[0]}-{g[-1]}" for g in plan["groups"]) + f" (top-{plan['top_k']})"


def pareto_front(points: list[dict], context: int) -> set[int]:
    """Indices of the points no other point beats on both predicted latency at ``context`` and perplexity."""
    ms = [p["predicted_ms"][str(context)] for p in points]
    front = set()
    for i, p in enumerate(points):
        if not any(ms[j] <= ms[i] and q["perplexity"] <= p["perplexity"] and (ms[j], q["perplexity"])
                   != (ms[i], p["perplexity"]) for j, q in enumerate(points)):
            front.add(i)
    return front


def report(sweep: Sweep) -> None:
    args, state = sweep.args, sweep.state
    points = list(state["points"].values())
    dense = state["points"]["dense"]
    steps, batch, seq = args.recover_steps, args.recover_batch, args.recover_seq_len
    print(f"\nSmolLM2-135M: every point, dense included, after the same recovery ({steps} steps x {batch} x {seq} "
          f"= {steps * batch * seq:,} tokens of '{args.data}' text{epochs(dense)}, distillation from the dense parent, "
          f"top-{args.teacher_topk} teacher, hidden-state weight {args.hidden_weight:g}); held-out perplexity on "
          f"{sweep.windows.numel()} tokens never trained on (dense untrained {state['dense_untrained']:.2f}, "
          f"dense trained {dense['perplexity']:.2f}); decode predicted on {sweep.profile.name} (fp16)")
    for context in sweep.contexts:
        mine = [p for p in points if p["method"] == "dense" or p["context"] == context]
        front = pareto_front(mine, context)
        dense_ms = dense["predicted_ms"][str(context)]
        rows = []
        for i, p in sorted(enumerate(mine), key=lambda ip: (ip[1]["speedup_target"] or 0, ip[1]["method"])):
            ms = p["predicted_ms"][str(context)]
            rows.append([f"{p['speedup_target']:g}x" if p["speedup_target"] else "-", p["method"], p["plan"],
                         f"{ms:.3f}", f"{dense_ms / ms:.3f}", f"{p['converted_perplexity']:.2f}",
                         f"{p['perplexity']:.2f}", f"{p['perplexity'] / dense['perplexity']:.3f}",
                         f"{p['recovery']['seconds'] / 60:.0f}", "yes" if i in front else ""])
        print(f"\ncontext {context}")
        print_table(["target", "method", "plan", "predicted ms", "speed-up", "ppl converted", "ppl recovered",
                     "x dense trained", "recovery min", "on frontier"], rows)
        for speedup in sorted({p["speedup_target"] for p in mine if p["speedup_target"]}):
            at = {p["method"]: p for p in mine if p["speedup_target"] == speedup}
            if "auto" in at and len(at) > 1:
                others = {m: p for m, p in at.items() if m != "auto"}
                beaten = [m for m, p in others.items() if at["auto"]["perplexity"] < p["perplexity"]]
                print(f"{speedup:g}x at context {context}: auto {at['auto']['perplexity']:.2f} "
                      f"({at['auto']['perplexity'] / dense['perplexity']:.3f}x dense trained) beats "
                      f"{', '.join(beaten) or 'none'} of {', '.join(others)}")
    curves = {key: p["recovery"]["heldout_curve"] for key, p in state["points"].items()
              if p["recovery"].get("heldout_curve")}
    if curves:
        steps = sorted({h["step"] for curve in curves.values() for h in curve})
        print(f"\nheld-out perplexity ({args.curve_tokens} tokens) against recovery steps")
        print_table(["point", *map(str, steps)],
                    [[key, *(f"{by[s]:.2f}" if s in by else "" for s in steps)]
                     for key, by in ((key, {h["step"]: h["heldout_perplexity"] for h in curve})
                                     for key, curve in curves.items())])


def epochs(point: dict) -> str:
    """How many distinct tokens a point's recovery trained on, when it repeated them."""
    recovery = point["recovery"]
    if recovery.get("epochs", 1) <= 1:
        return ""
    return f" ({recovery['distinct_tokens']:,} distinct, {recovery['epochs']:.1f} epochs)"


def plot(sweep: Sweep, path: str) -> None:
    from d2mc.plots import pyplot, save_figure

    plt = pyplot()
    contexts = sweep.contexts
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
    points = list(sweep.state["points"].values())
    dense = sweep.state["points"]["dense"]
    for ax, context in zip(axes[0], contexts, strict=True):
        for method in METHODS:
            mine = sorted((p for p in points if p["method"] == method and p["context"] == context),
                          key=lambda p: p["predicted_ms"][str(context)])
            if mine:
                mine = [dense, *sorted(mine, key=lambda p: -p["predicted_ms"][str(context)])]
                ax.plot([p["predicted_ms"][str(context)] for p in mine], [p["perplexity"] for p in mine],
                        marker="o", label=method)
        ax.plot([dense["predicted_ms"][str(context)]], [dense["perplexity"]], marker="*", markersize=12,
                color="black", linestyle="none", label="dense (trained)")
        ax.set_xlabel(f"predicted decode ms on {sweep.profile.name} at context {context}")
        ax.set_ylabel("held-out perplexity after recovery")
        ax.legend(fontsize=7)
    save_figure(fig, path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="512,4096", help="decode contexts (cached tokens), comma-separated")
    parser.add_argument("--speedups", default="1.2,1.3", help="predicted decode speed-ups, comma-separated")
    parser.add_argument("--points", help="CONTEXTxSPEEDUP,... in this order, instead of --contexts x --speedups")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--target", default="orin-agx")
    parser.add_argument("--lfuc-max-group", type=int, default=2, help="LF-UC's fixed plan shape: most layers per group")
    parser.add_argument("--auto-max-group", type=int, help="most layers per group of auto (default: its own)")
    parser.add_argument("--reconstruct-steps", type=int, default=150, help="block-wise reconstruction of fused blocks")
    parser.add_argument("--recover-steps", type=int, default=60)
    parser.add_argument("--recover-seq-len", type=int, default=256)
    parser.add_argument("--recover-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ce-weight", type=float,
                        help="weight of the loss on the next token (default: recovery's, 0 on generated text)")
    parser.add_argument("--teacher-topk", type=int, default=64)
    parser.add_argument("--hidden-weight", type=float, default=0.0)
    parser.add_argument("--data", default="generate", choices=["generate", "corpus"],
                        help="training text: the dense parent's own, or the built-in corpus's training part")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="steps between held-out perplexity points of the learning curve (0: none)")
    parser.add_argument("--curve-tokens", type=int, default=1024, help="held-out tokens scored at each curve point")
    parser.add_argument("--train-sequences", type=int, default=0,
                        help="distinct training windows (0: one per step and batch slot; fewer repeat as epochs)")
    parser.add_argument("--generate-batch", type=int, default=8, help="sequences the dense parent writes at once")
    parser.add_argument("--calib-sequences", type=int, default=16)
    parser.add_argument("--calib-length", type=int, default=256)
    parser.add_argument("--export", action="store_true", help="lower every point to ONNX and verify it")
    parser.add_argument("--work", default="frontier-work", help="generated text, teacher cache and ONNX exports")
    parser.add_argument("--plot", default="frontier.png")
    parser.add_argument("--json", default="frontier.json")
    parser.add_argument("--report-only", action="store_true", help="print the table of the points in --json")
    args = parser.parse_args()

    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sweep = Sweep(args)
    if not args.report_only:
        sweep.point("dense", 0, None)
        for context, speedup in grid(args):
            for method in args.methods.split(","):
                sweep.point(method, context, speedup)
    report(sweep)
    if args.plot:
        plot(sweep, args.plot)
    write_json(args.json, sweep.state)


if __name__ == "__main__":
    main()
