"""``d2mc recover``: recovery training of a converted model against its dense parent; also the ``--recover-*``
options that ``d2mc convert`` and ``d2mc compile`` share."""

from __future__ import annotations

import click

from d2mc.cli.common import (
    command_line,
    console,
    json_option,
    placement_options,
    print_json,
    quiet_option,
    stderr_console,
)

TRAIN_HELP = "What trains: the routers, the blocks the conversion changed, or the whole model."
DATA_HELP = ("Training text: a .txt or .jsonl file, a datasets name (NAME or NAME:CONFIG), or 'generate' (the "
             "dense parent writes it); default: the built-in corpus without its held-out part.")


def pipeline_recovery_options(func):
    """``--recover-steps N`` and a few ``--recover-*`` options for convert and compile."""
    for option in reversed([
        click.option("--recover-steps", type=int, default=0, show_default=True,
                     help="Recovery training steps after conversion (0: none)."),
        click.option("--recover-train", type=click.Choice(["routers", "blocks", "all"]), default="all",
                     show_default=True, help=TRAIN_HELP),
        click.option("--recover-data", help=DATA_HELP),
        click.option("--recover-seq-len", type=int, default=256, show_default=True),
        click.option("--recover-batch-size", type=int, default=4, show_default=True),
        click.option("--recover-lr", type=float, default=2e-4, show_default=True),
        click.option("--recover-checkpoint-dir", type=click.Path(),
                     help="Checkpoints of the recovery run (default: OUTPUT.recovery-checkpoints); a rerun resumes."),
    ]):
        func = option(func)
    return func


def pop_recovery_options(kwargs: dict, output: str, placement=None):
    """Take the ``--recover-*`` values out of ``kwargs``; a :class:`RecoveryOptions` or None (no recovery). The
    training runs where the conversion ran (``placement``), with mixed precision in its dtype."""
    values = {k[len("recover_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("recover_")}
    if not values.get("steps"):
        return None
    from d2mc.recovery import RecoveryOptions

    checkpoint_dir = values.pop("checkpoint_dir") or f"{str(output).rstrip('/')}.recovery-checkpoints"
    where = {"device": placement.device, "dtype": placement.dtype} if placement is not None else {}
    return RecoveryOptions(checkpoint_dir=checkpoint_dir, **where, **values)


@click.command("recover")
@click.argument("converted", metavar="CONVERTED")
@click.option("--teacher", help="The dense parent (any MODEL form); default: the source named in d2mc_plan.json.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output directory for the recovered model.")
@click.option("--steps", type=int, default=100, show_default=True, help="Optimizer steps.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per training sequence.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per step and process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Gradient accumulation steps.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant", "constant_with_warmup"]),
              default="cosine", show_default=True)
@click.option("--warmup", type=float, default=0.05, show_default=True, help="Warm-up: a fraction of the steps, or steps.")
@click.option("--train", type=click.Choice(["routers", "blocks", "all"]), default="all", show_default=True,
              help=TRAIN_HELP)
@click.option("--ce-weight", type=float, default=None,
              help="Weight of next-token cross-entropy.  [default: 1; 0 with --data generate]")
@click.option("--kl-weight", type=float, default=1.0, show_default=True, help="Weight of KL to the teacher.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Distillation temperature.")
@click.option("--balance-weight", type=float, default=0.01, show_default=True, help="Weight of router load balance.")
@click.option("--router-lr-factor", type=float, default=1.0, show_default=True,
              help="The routers' learning rate as a multiple of --lr.")
@click.option("--hidden-weight", type=float, default=0.0, show_default=True,
              help="Weight of the hidden-state loss after each block the conversion changed, against the dense "
                   "parent's at the same depth (0: none).")
@click.option("--teacher-topk", type=int, default=0, show_default=True,
              help="Run the teacher once over the data and keep its top-k log-probabilities (0: run it every step).")
@click.option("--data", help=DATA_HELP)
@click.option("--data-split", default="train", show_default=True, help="Split of a datasets name.")
@click.option("--data-field", default="text", show_default=True, help="Text field of a datasets name.")
@click.option("--generate-sequences", type=int, default=0, help="Sequences to generate with --data generate "
                                                                 "(default: one per step and batch slot).")
@click.option("--eval-data", type=click.Path(), help="Evaluation text (never trained on); default: the built-in "
                                                     "held-out text.")
@click.option("--eval-tokens", type=int, default=4096, show_default=True,
              help="Held-out tokens scored before and after (0: skip).")
@click.option("--eval-every", type=int, default=0, help="Score held-out perplexity every N steps for the curve.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-dir", type=click.Path(), help="Checkpoints (default: OUTPUT.checkpoints); a rerun "
                                                          "of the same command resumes from the last one.")
@click.option("--save-steps", type=int, default=50, show_default=True, help="Steps between checkpoints.")
@click.option("--no-resume", is_flag=True, help="Start over even if the checkpoint directory holds a checkpoint.")
@click.option("--keep-checkpoints", is_flag=True, help="Keep the checkpoint directory after success.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@placement_options
@click.option("--gradient-checkpointing", is_flag=True,
              help="Keep only each block's input for the backward pass and recompute the rest (less memory).")
@click.option("--stream", is_flag=True, help="Read --data (a datasets name, a dataset directory or a text file) as "
                                             "a stream, tokenised as training goes; resumes at its position.")
@click.option("--accelerate-config", type=click.Path(),
              help="Launch under accelerate launch with this config (DDP, FSDP, DeepSpeed; processes, nodes), "
                   "checked against this machine first (docs/recovery.md).")
@quiet_option
@json_option
def command(converted, teacher, output, no_resume, keep_checkpoints, overwrite, accelerate_config, quiet, as_json,
            **fields):
    """Recovery training of a CONVERTED model: CE + KL to the dense parent + router balance.

    Runs as is on one CPU or GPU; for several GPUs or nodes give --accelerate-config (FSDP, DeepSpeed ZeRO-3 or
    DDP), or launch the same command with `torchrun --nproc_per_node N -m d2mc recover ...` (DDP); only the first
    process writes OUTPUT.
    """
    from d2mc.checks import check_recovery_inputs
    from d2mc.outputs import check_output_path
    from d2mc.recover import recover_model
    from d2mc.recovery import RecoveryOptions, is_main_process

    check_output_path(output, overwrite)
    fields["checkpoint_dir"] = fields["checkpoint_dir"] or f"{str(output).rstrip('/')}.checkpoints"
    options = RecoveryOptions(resume=not no_resume, **fields)
    check_recovery_inputs(options, converted)
    if accelerate_config:
        import subprocess
        import sys

        from d2mc.recovery.launch import launch_command, read_launch_config

        config = read_launch_config(accelerate_config, options.dtype)
        ctx = click.get_current_context()
        sys.exit(subprocess.run(launch_command(config, command_line(ctx, drop={"accelerate_config"}))).returncode)
    err = stderr_console()
    show = not (quiet or as_json) and is_main_process()
    summary = recover_model(converted, output, options, teacher=teacher, overwrite=overwrite,
                            keep_checkpoints=keep_checkpoints, progress=err.print if show else None)
    if not is_main_process():
        return
    if as_json:
        print_json({k: v for k, v in summary.items() if k not in ("curve", "heldout_curve")})
        return
    out = console()
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    out.print(f"recovered {converted}: {summary['steps']} steps, {summary['tokens']:,} tokens in "
              f"{summary['seconds']:.0f} s on {summary['world_size']} process(es); final {final or 'no steps'}")
    ppl = summary["perplexity"]
    if ppl["before"] is not None:
        out.print(f"held-out perplexity ({ppl['tokens']} tokens): {ppl['before']:.2f} -> {ppl['after']:.2f}")
    out.print(f"wrote {output} (model, recovery_curve.json, recovery_curve.png)")
