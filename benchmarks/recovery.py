"""Recovery training: held-out perplexity of every method after the same recovery budget.

SmolLM2-135M with 6 attention modules removed. One plan for every method: the groups that block influence
chooses (analyze-redundancy, plan-fusion; pairs by default, ``--max-group``), given to each method as an
explicit plan, so drop-layers, drop-attention and LF-UC remove the same layers' attention. Pairs, because on this
corpus one group of 7 layers (``--max-group 8``) converted better but recovered worse than drop-layers (README); on
text the dense parent wrote it recovers better than pairs (docs/recovery.md). Every method then gets the same
recovery budget (steps x batch x sequence length, distillation from the dense parent, the same training windows in
the same order) on the training part of the built-in corpus; the teacher's top-k log-probabilities are computed once
and shared. Held-out perplexity is scored on text never trained on (the corpus's held-out tail, 512-token
windows): on a small slice every ``--eval-every`` steps (perplexity against training tokens), and on
``--eval-tokens`` tokens after conversion and at the end.

    python benchmarks/recovery.py [--steps 80] [--json out.json]        # the comparison (about 35 min here)
    python benchmarks/recovery.py --choices [--choice-steps 40]         # first, what each training choice buys
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

METHODS = [("drop-layers", "drop-layers"), ("drop-attention", "drop-attention"), ("LF-UC", "lfuc")]


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Bench:
    """The dense model, its teacher copy, the shared plan, data and teacher cache."""

    def __init__(self, args):
        from d2mc.data import heldout_windows, perplexity
        from d2mc.loading import load_model
        from d2mc.profiles import load_profile

        self.args = args
        self.base = load_model("smollm2-135m")
        self.teacher = copy.deepcopy(self.base.model).eval().requires_grad_(False)
        self.profile = load_profile("orin-agx")
        self.final_windows = heldout_windows(self.base.tokenizer, 512, args.eval_tokens)
        self.curve_windows = heldout_windows(self.base.tokenizer, 512, args.curve_tokens)
        start = time.perf_counter()
        self.dense_ppl = perplexity(self.base.model, self.final_windows)
        log(f"dense: held-out perplexity {self.dense_ppl:.2f} on {self.final_windows.numel()} tokens "
            f"({time.perf_counter() - start:.0f} s)")
        self.plan = args.plan or self._plan(args.remove_attention, args.max_group)
        log(f"plan for every method: {self.plan}")
        self._data: dict[int, tuple] = {}
        self.records: dict = {}

    def _plan(self, remove: int, max_group: int) -> str:
        from d2mc.context import Context
        from d2mc.data import calibration_batch
        from d2mc.pipeline import PassManager, create_pass

        ctx = Context.from_loaded(self.base, calibration=calibration_batch(self.base.tokenizer, 16, 256))
        PassManager([create_pass("analyze-redundancy"),
                     create_pass("plan-fusion", remove_attention=remove, max_group=max_group)]).run(ctx)
        return ",".join(f"{g[0]}-{g[-1]}" for g in ctx.results["plan"].groups)

    def data(self, seq_len: int, topk: int):
        """Training windows of ``seq_len`` and (when ``topk``) the teacher's cached top-k over them: the built-in
        corpus's training part, or the windows and cache of ``--data-file`` (``benchmarks/frontier.py`` keeps the
        text the dense parent generated, and its teacher's top-k, in one in its ``--work``)."""
        import torch

        from d2mc.recovery.data import cache_teacher_topk, training_windows

        if seq_len not in self._data:
            if self.args.data_file:
                windows, cache = torch.load(self.args.data_file, weights_only=False)  # our own file
                if windows.shape[1] != seq_len:
                    sys.exit(f"{self.args.data_file} holds windows of {windows.shape[1]} tokens: give --seq-len "
                             f"{windows.shape[1]}")
                self._data[seq_len] = (windows, {cache.k: cache} if cache is not None else {})
            else:
                self._data[seq_len] = (training_windows(self.base.tokenizer, None, seq_len), {})
        windows, caches = self._data[seq_len]
        if topk and topk not in caches:
            start = time.perf_counter()
            caches[topk] = cache_teacher_topk(self.teacher, windows, topk)
            log(f"teacher top-{topk} over {windows.numel():,} training tokens: {time.perf_counter() - start:.0f} s")
        return windows, caches.get(topk)

    def convert(self, method: str, **changes):
        from d2mc.convert import ConvertOptions, convert

        loaded = copy.copy(self.base)
        loaded.model = copy.deepcopy(self.base.model)
        start = time.perf_counter()
        changes = {"plan": self.plan, "reconstruct_steps": self.args.reconstruct_steps, **changes}
        ctx = convert(loaded, ConvertOptions(method=method, **changes))
        return ctx, time.perf_counter() - start

    def recover(self, model, options, curve: bool = True) -> dict:
        from d2mc.recovery import train_recovery
        from d2mc.recovery.data import WindowDataset

        windows, cache = self.data(options.seq_len, options.teacher_topk)
        return train_recovery(model, self.teacher, WindowDataset(windows, cache), options,
                              eval_windows=self.curve_windows if curve else None, progress=log)


def recovery_options(args, **changes):
    from d2mc.recovery import RecoveryOptions

    options = RecoveryOptions(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                              train=args.train, teacher_topk=args.teacher_topk, eval_every=args.eval_every,
                              log_every=10, seed=0)
    return dataclasses.replace(options, **changes)


def compare(bench: Bench, args) -> None:
    from d2mc.data import perplexity
    from d2mc.roofline import predict_decode_seconds

    dense_ms = predict_decode_seconds(bench.base.arch, bench.profile) * 1e3
    rows = [["dense", 30, f"{bench.base.arch.active_params / 1e6:.1f}M", f"{dense_ms:.3f}", "-", "-",
             f"{bench.dense_ppl:.2f}", "1.00", "-", "-"]]
    records = {"plan": bench.plan, "dense": {"perplexity": bench.dense_ppl, "predicted_ms": dense_ms},
               "eval_tokens": bench.final_windows.numel(), "curve_tokens": bench.curve_windows.numel(),
               "methods": []}
    curves = {}
    for name, method in METHODS:
        if args.methods and name not in args.methods:
            continue
        ctx, convert_s = bench.convert(method)
        converted_ppl = perplexity(ctx.model, bench.final_windows)
        log(f"{name}: converted in {convert_s:.0f} s, held-out perplexity {converted_ppl:.2f}")
        options = recovery_options(args)
        summary = bench.recover(ctx.model, options)
        recovered_ppl = perplexity(ctx.model, bench.final_windows)
        rate = summary["tokens"] / summary["seconds"]
        log(f"{name}: recovered in {summary['seconds']:.0f} s ({rate:.0f} tokens/s), held-out perplexity "
            f"{recovered_ppl:.2f}")
        predicted = predict_decode_seconds(ctx.arch, bench.profile) * 1e3
        rows.append([name, len(ctx.arch.attention_blocks), f"{ctx.arch.active_params / 1e6:.1f}M",
                     f"{predicted:.3f}", f"{summary['trainable_parameters'] / 1e6:.1f}M", f"{converted_ppl:.2f}",
                     f"{recovered_ppl:.2f}", f"{recovered_ppl / bench.dense_ppl:.2f}", f"{summary['seconds']:.0f}",
                     f"{rate:.0f}"])
        curves[name] = {h["tokens"]: h["heldout_perplexity"] for h in summary["heldout_curve"]}
        records["methods"].append({"method": name, "convert_seconds": convert_s, "converted_perplexity": converted_ppl,
                                   "recovered_perplexity": recovered_ppl, "predicted_ms": predicted,
                                   "attention_blocks": len(ctx.arch.attention_blocks),
                                   "active_params": ctx.arch.active_params,
                                   "recovery": {k: v for k, v in summary.items() if k != "options"},
                                   "options": summary["options"]})
        bench.records["comparison"] = records
        write_json(args.json, bench.records)  # keep what is done if a later method fails
        del ctx
    o = recovery_options(args)
    print(f"\nSmolLM2-135M, plan {bench.plan} for every method; recovery budget {o.steps} steps x {o.batch_size} x "
          f"{o.seq_len} tokens = {o.steps * o.tokens_per_step:,} tokens, train '{o.train}', lr {o.lr}, teacher "
          f"{'top-' + str(o.teacher_topk) if o.teacher_topk else 'online'}; held-out perplexity on "
          f"{bench.final_windows.numel()} tokens (512-token windows, never trained on); predicted decode on "
          f"{bench.profile.name} at context 512 (fp16)")
    print_table(["model", "attention blocks", "active params", "predicted ms", "trained params",
                 "ppl converted", "ppl recovered", "x dense", "recovery s", "tokens/s"], rows)
    tokens = sorted({t for c in curves.values() for t in c})
    print(f"\nHeld-out perplexity against training tokens ({bench.curve_windows.numel()} held-out tokens; "
          f"dense {_ppl_on(bench, bench.curve_windows):.2f})")
    print_table(["training tokens", *curves], [[f"{t:,}", *(f"{c[t]:.2f}" if t in c else "-" for c in curves.values())]
                                               for t in tokens])
    write_json(args.json, bench.records)


def _ppl_on(bench: Bench, windows) -> float:
    from d2mc.data import perplexity

    return perplexity(bench.base.model, windows)


CHOICES = [
    # name, method, conversion changes, recovery changes (from the reference: train --choice-train, --lr,
    # --seq-len, --batch-size, --teacher-topk)
    ("reference: LF-UC, seq 256, cached top-64 teacher", "lfuc", {}, {}),
    ("teacher run every step (no cache)", "lfuc", {}, {"teacher_topk": 0}),
    ("cached top-16 teacher", "lfuc", {}, {"teacher_topk": 16}),
    ("train routers only", "lfuc", {}, {"train": "routers"}),
    ("train the whole model", "lfuc", {}, {"train": "all"}),
    ("train the whole model with the hidden-state loss at block boundaries (weight 1)", "lfuc", {},
     {"train": "all", "hidden_weight": 1.0}),
    ("no gate gradient for top-1 routers", "lfuc", {}, {"router_gradient": False}),
    ("sequences of 128 tokens", "lfuc", {}, {"seq_len": 128, "batch_size": 8}),
    ("sequences of 512 tokens", "lfuc", {}, {"seq_len": 512, "batch_size": 2}),
    ("no block-wise reconstruction first", "lfuc", {"reconstruct_steps": 0}, {}),
    ("CE only (no distillation)", "lfuc", {}, {"kl_weight": 0.0}),
    ("KL only (no CE)", "lfuc", {}, {"ce_weight": 0.0}),
    ("learning rate 1e-3", "lfuc", {}, {"lr": 1e-3}),
    ("drop-layers, same budget", "drop-layers", {}, {}),
    ("LF-UC, groups of at most 2 layers", "lfuc", {"plan": "pairs"}, {}),
    ("drop-layers, groups of at most 2 layers", "drop-layers", {"plan": "pairs"}, {}),
    ("router: balance weight 0", "lfuc", {}, {"balance_weight": 0.0}),
    ("router: balance weight 0.1", "lfuc", {}, {"balance_weight": 0.1}),
    ("router: learning rate x10", "lfuc", {}, {"router_lr_factor": 10.0}),
    ("shape: top-2", "lfuc", {"top_k": 2}, {}),
    ("shape: shared expert", "lfuc", {"shared_expert": True}, {}),
]


def choices(bench: Bench, args) -> None:
    from d2mc.data import perplexity

    windows = bench.final_windows[: max(1, args.choice_eval_tokens // 512)]
    dense = perplexity(bench.base.model, windows)
    rows, records = [], []
    converted = {}
    for name, method, convert_changes, changes in CHOICES:
        if args.only and not any(word in name for word in args.only):
            continue
        key = (method, tuple(sorted(convert_changes.items())))
        if convert_changes.get("plan") == "pairs":
            convert_changes = {**convert_changes, "plan": bench._plan(args.remove_attention, 2)}
        if key not in converted:
            ctx, seconds = bench.convert(method, **convert_changes)
            converted[key] = (ctx.model, perplexity(ctx.model, windows), seconds)
            log(f"{method} {convert_changes}: converted in {seconds:.0f} s, perplexity {converted[key][1]:.2f}")
        model, before, convert_s = converted[key]
        model = copy.deepcopy(model)
        options = recovery_options(args, steps=args.choice_steps, eval_every=0,
                                   **{"train": args.choice_train, **changes})
        options = dataclasses.replace(options, batch_size=changes.get("batch_size", args.batch_size
                                                                      * args.seq_len // options.seq_len))
        log(f"choice: {name}")
        bench.data(options.seq_len, options.teacher_topk)  # the cache is computed once, outside the timing
        summary = bench.recover(model, options, curve=False)
        after = perplexity(model, windows)
        rate = summary["tokens"] / summary["seconds"]
        log(f"  {summary['seconds']:.0f} s, {rate:.0f} tokens/s, perplexity {before:.2f} -> {after:.2f}")
        rows.append([name, f"{summary['trainable_parameters'] / 1e6:.1f}M", f"{summary['tokens']:,}",
                     f"{summary['seconds'] / summary['steps']:.2f}", f"{rate:.0f}",
                     f"{summary['final']['balance']:.2f}" if "balance" in summary["final"] else "-",
                     f"{before:.2f}", f"{after:.2f}"])
        records.append({"choice": name, "method": method, "conversion": convert_changes, "changes": changes,
                        "convert_seconds": convert_s, "before": before, "after": after,
                        "seconds": summary["seconds"], "tokens": summary["tokens"], "final": summary["final"],
                        "trainable_parameters": summary["trainable_parameters"]})
        bench.records["choices"] = {"plan": bench.plan, "dense": dense, "runs": records}
        write_json(args.json, bench.records)
    o = recovery_options(args, steps=args.choice_steps, train=args.choice_train)
    print(f"\nWhat each choice buys: SmolLM2-135M, plan {bench.plan}, {o.steps} steps of {o.tokens_per_step:,} "
          f"tokens each from the reference (train '{o.train}', lr {o.lr}); held-out perplexity on "
          f"{windows.numel()} tokens (dense {dense:.2f})")
    print_table(["choice", "trained params", "tokens", "s/step", "tokens/s", "balance (last step)", "ppl before",
                 "ppl after"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remove-attention", type=int, default=6)
    parser.add_argument("--max-group", type=int, default=2, help="most layers per group of the shared plan")
    parser.add_argument("--plan", help="An explicit plan for every method instead of the one block influence picks.")
    parser.add_argument("--reconstruct-steps", type=int, default=150, help="block-wise reconstruction of fused blocks")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--train", default="all", choices=["routers", "blocks", "all"])
    parser.add_argument("--teacher-topk", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--curve-tokens", type=int, default=2048)
    parser.add_argument("--methods", nargs="*", help="A subset of: drop-layers drop-attention LF-UC")
    parser.add_argument("--choices", action="store_true", help="First, short runs: what each training choice buys.")
    parser.add_argument("--no-compare", action="store_true", help="Only the short runs, not the comparison.")
    parser.add_argument("--choice-steps", type=int, default=40)
    parser.add_argument("--choice-eval-tokens", type=int, default=4096)
    parser.add_argument("--choice-train", default="blocks", choices=["routers", "blocks", "all"],
                        help="What the reference of the short runs trains.")
    parser.add_argument("--data-file", help="Training windows and teacher top-k saved by benchmarks/frontier.py "
                                            "(its --work), instead of the built-in corpus's training part.")
    parser.add_argument("--only", nargs="*", help="With --choices: run the choices whose name has one of these words.")
    parser.add_argument("--json")
    args = parser.parse_args()

    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    bench = Bench(args)
    if args.choices:
        choices(bench, args)
    if not args.no_compare:
        compare(bench, args)


if __name__ == "__main__":
    main()
