"""``d2mc convert``: a dense model into a Dense2MoE (or baseline) model in Hugging Face format."""

from __future__ import annotations

import click

from d2mc.cli.common import (
    console,
    json_option,
    model_argument,
    placement_options,
    print_json,
    quiet_option,
    stderr_console,
)
from d2mc.cli.recover import pipeline_recovery_options, pop_recovery_options
from d2mc.plan import METHODS, UPCYCLE_INITS


def plan_options(func):
    """The options that choose what to remove, shared by convert and compile."""
    for option in reversed([
        click.option("--method", type=click.Choice(METHODS),
                     help="Dense2MoE layer fusion, a baseline on the same plan, a mixed plan chosen per layer under "
                          "--budget-ms or --speedup (auto), MLPs split into experts (split-experts; lfuc-split: "
                          "LF-UC, then split), or sparse upcycling [default: convert lfuc; compile auto, or lfuc "
                          "when --remove-attention, --plan, --top-k, --shared-expert or --no-normalize shape the "
                          "plan]."),
        click.option("--remove-attention", type=int, help="Remove this many attention modules."),
        click.option("--budget-ms", type=float, help="Predicted decode latency budget on --target (ms)."),
        click.option("--speedup", type=float, help="Predicted decode speed-up over dense on --target."),
        click.option("--plan", "plan_text", help="Explicit groups of layers, e.g. 12-13,16-17."),
        click.option("--top-k", type=int, default=1, show_default=True, help="Routed experts per token."),
        click.option("--shared-expert", is_flag=True, help="Keep the kept layer's MLP always active."),
        click.option("--no-normalize", is_flag=True, help="Scale experts by their softmax probability."),
        click.option("--max-group", type=int, help="Most layers fused into one block (default: 8; auto: 6)."),
        click.option("--reconstruct-steps", type=int, default=150, show_default=True,
                     help="Block-wise reconstruction steps for the fused experts (0: routers only)."),
        click.option("--experts", type=int, default=8, show_default=True,
                     help="split-experts, lfuc-split, upcycle: experts made of each MLP."),
        click.option("--active-fraction", type=float, default=0.5, show_default=True,
                     help="split-experts, lfuc-split: share of each MLP's neurons active per token."),
        click.option("--split-shared", type=int,
                     help="split-experts, lfuc-split: experts of each always-active MLP kept always active "
                          "(default: a quarter of --experts, leaving at least one to route)."),
        click.option("--layers", help="split-experts, lfuc-split, upcycle: parent layers to convert, e.g. 2-27 "
                                      "(default: all)."),
        click.option("--upcycle-init", type=click.Choice(UPCYCLE_INITS), default="copy", show_default=True,
                     help="upcycle: experts as copies of the MLP or slices of its neurons."),
        click.option("--recipe", type=click.Path(), help="A TOML recipe: its passes and their options replace "
                                                         "--method and the options above (docs/recipes.md)."),
        click.option("--calib-data", type=click.Path(), help="Calibration text (.txt or .jsonl); default: the "
                                                             "built-in corpus, held-out part excluded."),
        click.option("--calib-sequences", type=int, default=16, show_default=True),
        click.option("--calib-length", type=int, default=256, show_default=True),
    ]):
        func = option(func)
    return func


def convert_options_from(target, method, remove_attention, budget_ms, speedup, plan_text, top_k, shared_expert,
                         no_normalize, max_group, reconstruct_steps, experts, active_fraction, split_shared, layers,
                         upcycle_init, recipe, calib_data, calib_sequences, calib_length):
    from d2mc.convert import ConvertOptions

    if recipe is not None:
        _refuse_plan_options_beside(recipe)

    return ConvertOptions(method=method or "lfuc", remove_attention=remove_attention, budget_ms=budget_ms,
                          speedup=speedup, plan=plan_text, target=target, top_k=top_k, shared_expert=shared_expert,
                          normalize_topk=not no_normalize, max_group=max_group,
                          reconstruct_steps=reconstruct_steps, calib_data=calib_data,
                          calib_sequences=calib_sequences, calib_length=calib_length, experts=experts,
                          active_fraction=active_fraction, split_shared=split_shared, layers=layers,
                          upcycle_init=upcycle_init, recipe=recipe)


def _refuse_plan_options_beside(recipe: str) -> None:
    """A recipe replaces the method and plan options: one given on the command line too is a mistake."""
    from click.core import ParameterSource

    from d2mc.errors import UserError

    ctx = click.get_current_context()
    recipe_decides = {p.name for p in plan_options(lambda: None).__click_params__} - {
        "recipe", "calib_data", "calib_sequences", "calib_length"}
    for param in ctx.command.params:
        if param.name in recipe_decides and ctx.get_parameter_source(param.name) is not ParameterSource.DEFAULT:
            raise UserError(f"{param.opts[0]} and --recipe {recipe}: the recipe's passes decide this; "
                                   f"set it in the recipe's [options] instead")


@click.command("convert")
@model_argument
@plan_options
@click.option("--target", help="Device profile for --budget-ms / --speedup (name or .toml).")
@click.option("--context", type=int, default=512, show_default=True,
              help="Cached tokens of the decode step that --budget-ms and --speedup are planned at.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output directory (Hugging Face format).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@pipeline_recovery_options
@placement_options
@quiet_option
@json_option
def command(model, target, context, output, overwrite, device, dtype, quiet, as_json, **plan):
    """Convert MODEL with Dense2MoE layer fusion (or a baseline) and save it loadable by from_pretrained."""
    from d2mc.checks import check_conversion_inputs
    from d2mc.convert import conversion_bytes, convert, save_converted
    from d2mc.loading import load_model
    from d2mc.outputs import check_output_path
    from d2mc.placement import check_memory, resolve_placement
    from d2mc.recovery import remove_checkpoints

    check_output_path(output, overwrite)
    placement = resolve_placement(device, dtype, training=bool(plan["recover_steps"]))
    recovery = pop_recovery_options(plan, output, placement)
    options = convert_options_from(target, **plan)
    options.context = context
    options.recovery = recovery
    progress = None if quiet or as_json else (lambda text: stderr_console().print(text))
    arch = check_conversion_inputs(options, model)
    check_memory(arch, placement, conversion_bytes(arch, placement, options), "converting")
    loaded = load_model(model, placement=placement, work=None)
    ctx = convert(loaded, options, progress=progress)
    save_converted(ctx, output, overwrite=overwrite)
    if recovery:
        remove_checkpoints(recovery)
    summary = ctx.report["conversion"]
    if as_json:
        print_json(summary)
        return
    out = console()
    from d2mc.convert import method_lines

    for line in method_lines(summary):
        out.print(line)
    for block, stats in summary["routers"].items():
        out.print(f"  router of block {block}: agreement {stats['agreement']:.3f}, "
                  f"load {[round(x, 3) for x in stats['load']]}")
    params = summary["parameters"]
    out.print(f"{params['total']:,} parameters, {params['active_per_token']:,} active per token; "
              f"{summary['attention_blocks']} of {summary['blocks']} blocks keep attention")
    if summary["recovery"]:
        r = summary["recovery"]
        out.print(f"recovery: {r['steps']} steps, {r['tokens']:,} tokens in {r['seconds']:.0f} s, final "
                  + ", ".join(f"{k} {v:.4f}" for k, v in r["final"].items()))
    out.print(f"wrote {output}")
