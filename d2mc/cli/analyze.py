"""``d2mc analyze``: per-layer redundancy on calibration text."""

from __future__ import annotations

import click

from d2mc.cli.common import console, json_option, model_argument, placement_options, print_json, table

PLOT_SUFFIXES = (".png", ".pdf", ".svg")  # formats matplotlib writes, chosen by the extension


@click.command("analyze")
@model_argument
@click.option("--calib-data", type=click.Path(), help="Calibration text; default: the built-in corpus.")
@click.option("--calib-sequences", type=int, default=16, show_default=True)
@click.option("--calib-length", type=int, default=256, show_default=True)
@click.option("--plot", type=click.Path(),
              help="Write a plot of the influences to this file (.png, .pdf or .svg).")
@placement_options
@json_option
def command(model, calib_data, calib_sequences, calib_length, plot, device, dtype, as_json):
    """Print block, attention and MLP influence per layer (low = redundant)."""
    from d2mc.checks import check_number, check_sequence_length
    from d2mc.context import Context
    from d2mc.data import calibration_batch, read_text
    from d2mc.errors import UserError
    from d2mc.loading import load_model
    from d2mc.outputs import atomic_output_file, check_output_file
    from d2mc.pipeline import PassManager, create_pass
    from d2mc.placement import resolve_placement

    placement = resolve_placement(device, dtype)
    check_number(calib_sequences, "--calib-sequences", minimum=1)
    check_number(calib_length, "--calib-length", minimum=2)
    if plot:
        check_output_file(plot, PLOT_SUFFIXES)
    if calib_data:
        read_text(calib_data)
    arch = load_model(model, config_only=True, tokenizer=False).arch
    check_sequence_length(calib_length, arch.max_position_embeddings, "--calib-length")
    loaded = load_model(model, placement=placement)
    if loaded.tokenizer is None:
        raise UserError(f"'{model}' has no tokenizer, which calibration needs")
    ctx = Context.from_loaded(loaded, calibration=calibration_batch(loaded.tokenizer, calib_sequences,
                                                                    calib_length, calib_data))
    PassManager([create_pass("analyze-redundancy")]).run(ctx)
    result = ctx.results["redundancy"]
    if plot:
        from d2mc.plots import plot_redundancy

        with atomic_output_file(plot) as tmp:
            plot_redundancy(result, tmp, title=model)
    if as_json:
        print_json(result)
        return
    rows = [[i, f"{b:.4f}", f"{a:.4f}", f"{m:.4f}"]
            for i, (b, a, m) in enumerate(zip(result["block"], result["attention"], result["mlp"], strict=False))]
    console().print(table(f"redundancy of {model} (1 - cosine; low = redundant)",
                          ["layer", "block", "attention", "mlp"], rows))
    if plot:
        console().print(f"wrote {plot}")

