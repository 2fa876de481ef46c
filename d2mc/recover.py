"""The recovery API behind ``d2mc recover``: a converted model and its dense parent in, the recovered model out."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from d2mc.context import Context
from d2mc.convert import write_converted
from d2mc.errors import UserError
from d2mc.loading import load_model
from d2mc.outputs import atomic_output_dir
from d2mc.pipeline import PassManager, create_pass
from d2mc.placement import check_memory, resolve_placement, training_bytes
from d2mc.recovery import RecoveryOptions, is_main_process, remove_checkpoints
from d2mc.recovery.processes import leave_processes, world_size


def recover_model(converted: str, output: str, options: RecoveryOptions, *, teacher: str | None = None,
                  overwrite: bool = False, keep_checkpoints: bool = False,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Load a converted model and its dense parent, train, and write the recovered model (Hugging Face format,
    tokenizer, ``d2mc_plan.json`` with a ``recovery`` section, the loss curve) to ``output`` atomically. Under
    ``torchrun`` every process trains; only the first one writes."""
    if Path(output).exists() and not overwrite:
        raise UserError(f"output '{output}' already exists: remove it or pass --overwrite")
    # a plain run loads where it trains; launched processes load on the CPU and the engine places the weights
    placement = resolve_placement(options.device if world_size() == 1 else "cpu", options.dtype, training=True)
    config = load_model(converted, config_only=True, tokenizer=False)
    if getattr(config.config, "blocks", None) is None:
        raise UserError(f"'{converted}' is not a converted model: convert it first (d2mc convert)")
    if world_size() == 1:
        check_memory(config.arch, placement, training_bytes(config.arch, placement), "training")
    loaded = load_model(converted, placement=replace(placement, dtype="fp32"), work=None)  # fp32 master weights
    plan_file = loaded.path / "d2mc_plan.json" if loaded.path else None
    plan = json.loads(plan_file.read_text()) if plan_file and plan_file.exists() else {}
    teacher = teacher or plan.get("source")
    if not teacher:
        raise UserError(f"'{converted}' does not name its dense parent: give it with --teacher")
    parent = load_model(teacher, tokenizer=False, placement=placement, work=None)
    if getattr(parent.config, "blocks", None) is not None:
        raise UserError(f"the teacher '{teacher}' is a converted model: give the dense parent")
    ctx = Context.from_loaded(loaded)
    ctx.teacher = parent.model.eval().requires_grad_(False)
    PassManager([create_pass("recover", options=options, progress=progress)]).run(ctx)
    summary = ctx.results["recovery"]
    summary["teacher_model"] = teacher
    if is_main_process():
        with atomic_output_dir(output, overwrite=overwrite) as tmp:
            write_converted(tmp, ctx.model, ctx.tokenizer, plan, summary)
        if not keep_checkpoints:
            remove_checkpoints(options)
    leave_processes()
    return summary
