"""``d2mc eval``: held-out perplexity of a model (PyTorch) or an ONNX artifact (ONNX Runtime), or
lm-evaluation-harness tasks on a model."""

from __future__ import annotations

import click

from d2mc.cli.common import console, json_option, placement_options, print_json, table
from d2mc.errors import UserError


@click.command("eval")
@click.argument("model", metavar="MODEL|ARTIFACT")
@click.option("--data", type=click.Path(), help="Text file to score (plain text, or .jsonl with a 'text' field) "
                                                "[default: the built-in held-out text].")
@click.option("--tokens", type=int, help="Tokens to score [default: 4096, or all of --data when it holds fewer].")
@click.option("--window", type=int, help="Tokens per window, each scored from an empty cache [default: 512].")
@click.option("--tasks", help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy), instead of "
                              "perplexity; runs on the PyTorch model (pip install 'd2mc[eval]').")
@click.option("--include-path", type=click.Path(), help="A directory of your own task YAML files (--tasks).")
@click.option("--limit", type=int, help="Score at most this many documents per task (--tasks).")
@click.option("--num-fewshot", type=int, help="Examples in each prompt (--tasks) [default: each task's own].")
@placement_options
@json_option
def command(model, data, tokens, window, tasks, include_path, limit, num_fewshot, device, dtype, as_json):
    """Score MODEL or ARTIFACT: held-out perplexity (PyTorch for a model, ONNX Runtime for an export or compile
    output), or with --tasks the accuracy on lm-evaluation-harness tasks."""
    from d2mc import evaluation
    from d2mc.artifact import find_runnable_onnx
    from d2mc.placement import check_no_placement, resolve_placement

    placement = resolve_placement(device, dtype)
    if find_runnable_onnx(model) is not None and tasks is None:
        check_no_placement(device, dtype, "an artifact runs in ONNX Runtime on the CPU, at its exported precision")
    if tasks is None:
        task_only = [flag for flag, value in (("--include-path", include_path), ("--limit", limit),
                                              ("--num-fewshot", num_fewshot)) if value is not None]
        if task_only:
            raise UserError(f"{', '.join(task_only)} applies to --tasks: add --tasks NAMES or drop it")
        result = evaluation.evaluate_perplexity(model, data=data, tokens=tokens, window=window, placement=placement)
        if as_json:
            print_json(result.to_dict())
            return
        where = f"ONNX Runtime, {result.onnx}" if result.runtime == "onnxruntime" else "PyTorch"
        click.echo(f"perplexity {result.perplexity:.4f} of {model} ({where}, {result.precision}) on {result.tokens:,} "
                   f"tokens of {result.data} in {result.windows} windows of {result.window} [{result.seconds:.1f} s]")
        return
    ppl_only = [flag for flag, value in (("--data", data), ("--tokens", tokens), ("--window", window))
                if value is not None]
    if ppl_only:
        raise UserError(f"{', '.join(ppl_only)} applies to perplexity, not to --tasks: drop it, or run d2mc eval "
                        "without --tasks for perplexity")
    from d2mc.tasks import evaluate_tasks

    scores = evaluate_tasks(model, tasks.split(","), include_path=include_path, limit=limit,
                            num_fewshot=num_fewshot, placement=placement)
    if as_json:
        print_json(scores.to_dict())
        return
    rows = []
    for task in scores.tasks:
        for i, metric in enumerate(task.metrics):
            rows.append([task.task if i == 0 else "", task.samples if i == 0 and task.samples is not None else "",
                         task.num_fewshot if i == 0 and task.num_fewshot is not None else "", metric.name,
                         f"{metric.value:.4f}", f"{metric.stderr:.4f}" if metric.stderr is not None else "-"])
    out = console()
    out.print(table(None, ["task", "documents", "shots", "metric", "value", "stderr"], rows))
    out.print(f"{model} (PyTorch), lm-eval {scores.harness} [{scores.seconds:.1f} s]")
