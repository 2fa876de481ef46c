"""``d2mc analyze``: per-layer redundancy on calibration text."""

from __future__ import annotations

import click

from d2mc.cli.common import console, json_option, model_argument, print_json, table


@click.command("analyze")
@model_argument
@click.option("--calib-data", type=click.Path(), help="Calibration text; default: the built-in corpus.")
@click.option("--calib-sequences", type=int, default=16, show_default=True)
@click.option("--calib-length", type=int, default=256, show_default=True)
@click.option("--plot", type=click.Path(), help="Write a PNG of the influences to this path.")
@json_option
def command(model, calib_data, calib_sequences, calib_length, plot, as_json):
    """Print block, attention and MLP influence per layer (low = redundant)."""
    from d2mc.context import Context
    from d2mc.data import calibration_batch
    from d2mc.errors import UserError
    from d2mc.loading import load_model
    from d2mc.pipeline import PassManager, create_pass

    loaded = load_model(model)
    if loaded.tokenizer is None:
        raise UserError(f"'{model}' has no tokenizer, which calibration needs")
    ctx = Context.from_loaded(loaded, calibration=calibration_batch(loaded.tokenizer, calib_sequences,
                                                                    calib_length, calib_data))
    PassManager([create_pass("analyze-redundancy")]).run(ctx)
    result = ctx.results["redundancy"]
    if plot:
        from d2mc.plots import plot_redundancy

        plot_redundancy(result, plot, title=model)
    if as_json:
        print_json(result)
        return
    rows = [[i, f"{b:.4f}", f"{a:.4f}", f"{m:.4f}"]
            for i, (b, a, m) in enumerate(zip(result["block"], result["attention"], result["mlp"], strict=False))]
    console().print(table(f"redundancy of {model} (1 - cosine; low = redundant)",
                          ["layer", "block", "attention", "mlp"], rows))
    if plot:
        console().print(f"wrote {plot}")

