"""The conversion API behind ``d2mc convert``: a dense model in, a Dense2MoE (or baseline) model out."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from d2mc.arch import ModelArch
from d2mc.context import Context
from d2mc.data import calibration_batch
from d2mc.errors import UserError
from d2mc.loading import LoadedModel
from d2mc.outputs import atomic_output_dir
from d2mc.pipeline import Pass, PassManager, create_pass, load_recipe
from d2mc.placement import Placement, needed_bytes, training_bytes
from d2mc.plan import METHODS, PLANNED_METHODS
from d2mc.profiles import load_profile
from d2mc.recovery import RecoveryOptions, brief, write_recovery_outputs
from d2mc.teacher import frozen_alias

# the keys under which passes leave router statistics, in the order they fit routers: the last fit of a block wins
ROUTER_RESULTS = ("routers", "reconstructed_routers", "split_routers")


@dataclass
class ConvertOptions:
    """What to convert and how. Methods that remove layers (lfuc, drop-layers, drop-attention, lfuc-split) need
    exactly one of the four plan sources; ``auto`` (a mixed plan, :mod:`passes.plan_auto`) a budget or a speed-up
    at ``context``, with groups of at most ``max_group`` layers (6 unless given); split-experts and upcycle take
    none. ``experts``, ``active_fraction``, ``split_shared`` and ``layers`` shape split-experts (and the split of
    lfuc-split); ``experts``, ``top_k``, ``upcycle_init`` and ``layers`` shape upcycle."""

    method: str = "lfuc"
    remove_attention: int | None = None
    budget_ms: float | None = None
    speedup: float | None = None
    plan: str | None = None
    target: str | None = None
    top_k: int = 1
    shared_expert: bool = False
    normalize_topk: bool = True
    max_group: int | None = None  # None: the planning pass's own (8 for the fixed-shape methods, 6 for auto)
    reconstruct_steps: int = 150
    calib_data: str | None = None
    calib_sequences: int = 16
    calib_length: int = 256
    seed: int = 0
    context: int = 512
    precision: str = "fp16"
    block_size: int = 128  # int4/int8 weights' block, for planning at that precision
    lm_head_precision: str | None = None  # the LM head's, for planning (None: the weights')
    experts: int = 8
    active_fraction: float = 0.5
    split_shared: int | None = None
    layers: str | None = None
    upcycle_init: str = "copy"
    recovery: RecoveryOptions | None = None  # recovery training after the conversion (None or 0 steps: none)
    recipe: str | None = None  # a TOML recipe whose passes replace the method's (see conversion_passes)

    def __post_init__(self):
        if self.recipe is not None:
            self.method = recipe_method(load_recipe(self.recipe), self.recipe)
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.method == "auto":
            given = [k for k, v in {"--remove-attention": self.remove_attention, "--plan": self.plan}.items()
                     if v is not None]
            shaped = [k for k, v in {"--top-k": self.top_k != 1, "--shared-expert": self.shared_expert,
                                     "--no-normalize": not self.normalize_topk}.items() if v]
            if given or shaped:
                raise UserError(f"{(given + shaped)[0]} does not apply to --method auto, which chooses each layer's "
                                "action and each group's routing itself: give --budget-ms or --speedup")
            if self.budget_ms is None and self.speedup is None:
                raise UserError("--method auto needs --budget-ms or --speedup (and --target)")
        elif self.method not in PLANNED_METHODS:
            given = [k for k, v in {"--remove-attention": self.remove_attention, "--budget-ms": self.budget_ms,
                                    "--speedup": self.speedup, "--plan": self.plan}.items() if v is not None]
            if given:
                raise UserError(f"{given[0]} does not apply to {self.method}, which keeps every layer: "
                                + ("choose the active share with --active-fraction" if self.method == "split-experts"
                                   else "choose --experts and --top-k"))
            if self.shared_expert:
                raise UserError(f"--shared-expert keeps an LF-UC block's own MLP active and does not apply to "
                                f"{self.method}" + (" (--split-shared keeps experts always active)"
                                                    if self.method == "split-experts" else ""))
        if self.method == "split-experts" and self.top_k != 1:
            raise UserError("--top-k does not apply to split-experts: the experts active per token follow from "
                            "--active-fraction")


def conversion_passes(options: ConvertOptions, progress: Callable[[str], None] | None = None) -> list[Pass]:
    """The passes of a method, in the order the method description reads; or those of the recipe. ``progress``
    hears the plan search's steps (auto)."""
    if options.recipe is not None:
        return load_recipe(options.recipe)
    if options.method == "split-experts":
        return [_split_pass(options)]
    if options.method == "upcycle":
        return [create_pass("upcycle", experts=options.experts, top_k=options.top_k, init=options.upcycle_init,
                            layers=options.layers, normalize_topk=options.normalize_topk, seed=options.seed)]
    if options.method == "auto":
        plan = create_pass("plan-auto", budget_ms=options.budget_ms, speedup=options.speedup,
                           context=options.context, precision=options.precision, block_size=options.block_size,
                           lm_head_precision=options.lm_head_precision, max_group=options.max_group,
                           reconstruct_steps=options.reconstruct_steps, progress=progress)
        return [create_pass("analyze-redundancy"), plan, *fusion_passes(options)]
    plan = create_pass("plan-fusion", method=options.method, remove_attention=options.remove_attention,
                       budget_ms=options.budget_ms, speedup=options.speedup, plan=options.plan,
                       top_k=options.top_k, shared_expert=options.shared_expert,
                       normalize_topk=options.normalize_topk, max_group=options.max_group,
                       context=options.context, precision=options.precision, block_size=options.block_size,
                       lm_head_precision=options.lm_head_precision,
                       **({"experts": options.experts, "active_fraction": options.active_fraction,
                           "split_shared": options.split_shared, "layers": options.layers}
                          if options.method == "lfuc-split" else {}))
    passes = [create_pass("analyze-redundancy"), plan]
    if options.method == "drop-layers":
        return passes + [create_pass("drop-layers")]
    if options.method == "drop-attention":
        return passes + [create_pass("prune-attention")]
    passes += fusion_passes(options)
    if options.method == "lfuc-split":
        passes.append(_split_pass(options))
    return passes


def fusion_passes(options: ConvertOptions) -> list[Pass]:
    """What LF-UC (and a mixed plan) does once the plan is made: prune, fuse, fit routers, reconstruct."""
    passes = [create_pass("prune-attention"), create_pass("fuse-experts"), create_pass("insert-router")]
    if options.reconstruct_steps:
        passes.append(create_pass("reconstruct-blocks", steps=options.reconstruct_steps, reuse_search=True))
    return passes


def _split_pass(options: ConvertOptions) -> Pass:
    return create_pass("split-experts", experts=options.experts, active_fraction=options.active_fraction,
                       shared=options.split_shared, layers=options.layers, seed=options.seed)


def recipe_method(passes: list[Pass], path: str) -> str:
    """The method a recipe carries out: plan-fusion's ``method``, else split-experts or upcycle."""
    names = [p.name for p in passes]
    method = next((p.method for p in passes if p.name == "plan-fusion"), None)
    method = method or next((n for n in ("split-experts", "upcycle") if n in names), None)
    if method is None:
        raise UserError(f"recipe '{path}' converts nothing: it needs 'plan-fusion', 'split-experts' or 'upcycle' "
                        f"among its passes")
    return method


def conversion_bytes(arch: ModelArch, placement: Placement, options: ConvertOptions) -> int:
    """Estimated peak memory of converting (and, when the options ask for it, recovering) a model of ``arch``."""
    needed = needed_bytes(arch, placement.dtype, "convert")
    if recovers(options):
        needed = max(needed, training_bytes(arch, placement))
    return needed


def recovers(options: ConvertOptions) -> bool:
    """Whether the options ask for recovery training."""
    return options.recovery is not None and options.recovery.steps > 0


def conversion_context(loaded: LoadedModel, options: ConvertOptions, passes: list[Pass]) -> Context:
    """A context with calibration text, the device profile and, when a pass or the recovery needs it, the dense
    parent frozen as the teacher (sharing the parent's weights: :func:`d2mc.teacher.frozen_alias`)."""
    if loaded.config_only:
        raise UserError("conversion needs the weights: drop --config-only")
    if loaded.tokenizer is None:
        raise UserError(f"'{loaded.source}' has no tokenizer, which calibration needs")
    if loaded.config.model_type != "d2mc_moe" and options.method not in METHODS:
        raise UserError(f"unknown method '{options.method}'")
    calibration = calibration_batch(loaded.tokenizer, options.calib_sequences, options.calib_length,
                                    options.calib_data, options.seed)
    profile = load_profile(options.target) if options.target else None
    ctx = Context.from_loaded(loaded, profile=profile, calibration=calibration)
    if recovers(options) or any("teacher" in p.requires for p in passes):
        ctx.teacher = frozen_alias(loaded.model)
    return ctx


def convert(loaded: LoadedModel, options: ConvertOptions, progress: Callable[[str], None] | None = None,
            recover: bool = True) -> Context:
    """Run the method's passes over ``loaded``; the converted model is ``ctx.model``. With ``recover=False``
    the recovery training the options ask for is left to the caller (the teacher is kept for it)."""
    if loaded.config.model_type == "d2mc_moe":
        raise UserError(f"'{loaded.source}' is already converted: convert its dense parent")
    passes = conversion_passes(options, progress)
    if recovers(options) and any(p.name == "recover" for p in passes):
        raise UserError("the recipe has a 'recover' pass: set its options in [options.recover], not --recover-*")
    ctx = conversion_context(loaded, options, passes)
    if recover and recovers(options):
        passes.append(create_pass("recover", options=options.recovery, progress=progress))
    PassManager(passes, progress=progress).run(ctx)
    ctx.report["conversion"] = conversion_summary(ctx, options)
    return ctx


def conversion_summary(ctx: Context, options: ConvertOptions) -> dict:
    """Plan, options and parameter counts of a finished conversion (what ``d2mc_plan.json`` holds)."""
    arch = ModelArch.from_config(ctx.model.config)
    return {
        "source": ctx.source,
        "options": asdict(options),
        "plan": ctx.results["plan"].to_dict() if "plan" in ctx.results else None,
        "plan_search": ctx.results.get("plan_search"),
        "split": ctx.results.get("split"),
        "upcycle": ctx.results.get("upcycled"),
        "redundancy": ctx.results.get("redundancy"),
        "routers": router_statistics(ctx.results),
        "reconstruction": ctx.results.get("reconstruction", {}),
        "recovery": brief(ctx.results["recovery"]) if "recovery" in ctx.results else None,
        "parameters": {"total": arch.total_params, "active_per_token": arch.active_params},
        "attention_blocks": len(arch.attention_blocks),
        "blocks": len(arch.blocks),
    }


def router_statistics(results: dict) -> dict:
    """Each block's router as last fitted: by insert-router, refitted by reconstruct-blocks, or by split-experts."""
    stats: dict = {}
    for key in ROUTER_RESULTS:
        stats.update(results.get(key, {}))
    return stats


def method_lines(summary: dict) -> list[str]:
    """What the conversion did, in a line or two: the fusion plan, the split, the upcycling."""
    lines = []
    if summary.get("plan"):
        lines.append(f"plan: {summary['plan']['groups']} ({summary['plan']['reason']})")
    if summary.get("split"):
        s = summary["split"]
        shared = "/".join(str(n) for n in sorted(set(s["shared_per_block"])))
        lines.append(f"split: {len(s['blocks'])} blocks, each MLP into {s['experts_per_mlp']} experts of "
                     f"{s['expert_intermediate']} neurons ({shared} always active per block), "
                     f"{s['active_fraction']:.0%} of the neurons active per token")
    if summary.get("upcycle"):
        u = summary["upcycle"]
        lines.append(f"upcycled: {len(u['blocks'])} MLPs into {u['experts']} experts ({u['init']}, "
                     f"{u['expert_intermediate']} neurons each), top-{u['top_k']}")
    return lines


def write_converted(directory: str | Path, model, tokenizer, plan: dict, recovery: dict | None = None) -> None:
    """Write a converted model into ``directory``: the model in Hugging Face format, its tokenizer (if any) and
    ``plan`` (the conversion summary) as ``d2mc_plan.json``. Given the summary of a ``recovery`` run, its brief
    becomes the plan's ``recovery`` section and its loss curve is written beside the model."""
    directory = Path(directory)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if recovery is not None:
        plan = {**plan, "recovery": brief(recovery)}
    (directory / "d2mc_plan.json").write_text(json.dumps(plan, indent=2, default=str) + "\n")
    if recovery is not None:
        write_recovery_outputs(recovery, directory)


def save_converted(ctx: Context, out: str | Path, overwrite: bool = False) -> Path:
    """Write the converted model of a finished :func:`convert` to ``out`` atomically (:func:`write_converted`)."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_converted(tmp, ctx.model, ctx.tokenizer, ctx.report["conversion"], ctx.results.get("recovery"))
    return Path(out)
