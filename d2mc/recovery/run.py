"""Recovery training in one call: the data, the teacher, the Trainer run, and what is written beside the model."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from d2mc.data import perplexity
from d2mc.errors import UserError
from d2mc.recovery.checkpoints import prepare_checkpoint_dir
from d2mc.recovery.data import (
    GENERATE,
    WindowDataset,
    cache_teacher_topk,
    evaluation_windows,
    generate_windows,
    training_windows,
)
from d2mc.recovery.options import RecoveryOptions
from d2mc.recovery.processes import world_size
from d2mc.recovery.trainable import changed_blocks, router_gradients, trainable, trainable_parameters
from d2mc.recovery.trainer import trainer_classes


def train_recovery(model, teacher, dataset, options: RecoveryOptions, *, eval_windows: torch.Tensor | None = None,
                   progress: Callable[[str], None] | None = None, callbacks: Sequence = ()) -> dict:
    """Train ``model`` in place on ``dataset`` (a :class:`d2mc.recovery.data.WindowDataset`) against
    ``teacher``; return the summary with the loss curve. ``eval_windows`` adds held-out perplexity points
    every ``options.eval_every`` steps. Resumes from ``options.checkpoint_dir`` when it holds a checkpoint of
    the same run."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    names = trainable_parameters(model, options.train)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    temporary = None
    checkpoint_dir = options.checkpoint_dir
    if checkpoint_dir is None:
        temporary = checkpoint_dir = tempfile.mkdtemp(prefix="d2mc-recover-")
    args = TrainingArguments(
        output_dir=checkpoint_dir, max_steps=options.steps, per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum, learning_rate=options.lr,
        lr_scheduler_type=options.schedule, warmup_steps=options.warmup_steps, weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm, optim="adamw_torch", seed=options.seed, data_seed=options.seed,
        logging_steps=options.log_every, logging_first_step=True, save_strategy="no" if temporary else "steps", save_steps=options.save_steps,
        save_total_limit=options.save_limit, report_to="none", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        ddp_backend=("nccl" if torch.cuda.is_available() else "gloo") if world_size() > 1 else None,
        ddp_find_unused_parameters=True)
    resume = None
    if not temporary:
        resume = prepare_checkpoint_dir(Path(checkpoint_dir), options, args.process_index == 0)
        if resume:
            resume = get_last_checkpoint(checkpoint_dir)
    Trainer, LastStepLog, Progress, Heldout = trainer_classes()
    tokens_per_step = options.tokens_per_step
    extra = [LastStepLog()] + ([Progress(progress, tokens_per_step)] if progress else [])
    if eval_windows is not None and options.eval_every:
        extra.append(Heldout(eval_windows, options.eval_every, tokens_per_step, progress))
    start = time.perf_counter()
    with trainable(model, names), router_gradients(model, options.router_gradient) as gated:
        trainer = Trainer(model=model, args=args, train_dataset=dataset, teacher=teacher, recovery=options,
                          callbacks=[*extra, *callbacks])
        trainer.remove_callback(PrinterCallback)  # progress goes through ``progress`` only
        try:
            if options.steps:
                trainer.train(resume_from_checkpoint=resume)
        finally:
            trainer.remove_hooks()
            if temporary:
                shutil.rmtree(temporary, ignore_errors=True)
    model.eval()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    curve = [{k: v for k, v in h.items() if k in ("step", "tokens", "loss", "ce", "kl", "balance",
                                                  "learning_rate", "grad_norm")} for h in history if "loss" in h]
    heldout = [h for h in history if "heldout_perplexity" in h]
    final = curve[-1] if curve else {}
    return {
        "options": asdict(options),
        "steps": trainer.state.global_step,
        "tokens": trainer.state.global_step * tokens_per_step * args.world_size,
        "seconds": seconds,
        "world_size": args.world_size,
        "resumed_from": str(resume) if resume else None,
        "trainable_parameters": sum(p.numel() for n, p in model.named_parameters() if n in set(names)),
        "trained": options.train,
        "blocks": changed_blocks(model) if options.train == "blocks" else None,
        "routers_with_gate_gradient": gated,
        "final": {k: final[k] for k in ("loss", "ce", "kl", "balance") if k in final},
        "curve": curve,
        "heldout_curve": heldout,
        "teacher": f"cached top-{options.teacher_topk}" if options.teacher_topk else "online",
    }


def run_recovery(model, teacher, tokenizer, options: RecoveryOptions,
                 progress: Callable[[str], None] | None = None, callbacks: Sequence = ()) -> dict:
    """Prepare the data (checked against the evaluation text), optionally cache the teacher's top-k, train,
    and score held-out perplexity before and after when ``options.eval_tokens``."""
    if teacher is None:
        raise UserError("recovery needs the dense parent as teacher")
    if tokenizer is None:
        raise UserError("recovery needs a tokenizer for its training text")
    if teacher.config.vocab_size != model.config.vocab_size:
        raise UserError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the model's "
                        f"({model.config.vocab_size}): give the dense parent the model was converted from")
    trainable_parameters(model, options.train)  # refuse an impossible choice before any work
    say = progress or (lambda text: None)
    world = world_size()
    needed = options.steps * options.tokens_per_step * world
    if options.data == GENERATE:
        sequences = options.generate_sequences or max(1, options.steps * options.batch_size * options.grad_accum
                                                      * world)
        windows = generate_windows(teacher, tokenizer, sequences, options.seq_len, options.seed, progress=say)
    else:
        windows = training_windows(tokenizer, options.data, options.seq_len, eval_source=options.eval_data,
                                   split=options.data_split, field=options.data_field,
                                   max_tokens=needed if options.data else None)
    say(f"training text: {windows.shape[0]} sequences of {options.seq_len} tokens "
        f"({windows.numel():,} tokens for {needed:,} trained)")
    cache = None
    if options.teacher_topk and options.kl_weight and options.steps:
        cache = cache_teacher_topk(teacher, windows, options.teacher_topk, options.temperature, progress=say)
    curve_windows = None
    if options.eval_every:
        curve_windows = evaluation_windows(tokenizer, options.eval_data, 512, options.eval_curve_tokens)
    before = after = None
    if options.eval_tokens:
        heldout = evaluation_windows(tokenizer, options.eval_data, 512, options.eval_tokens)
        before = perplexity(model, heldout)
        say(f"held-out perplexity before recovery: {before:.2f}")
    summary = train_recovery(model, teacher, WindowDataset(windows, cache), options, eval_windows=curve_windows,
                             progress=say, callbacks=callbacks)
    if options.eval_tokens:
        after = perplexity(model, heldout)
        say(f"held-out perplexity after recovery: {after:.2f}")
    summary["perplexity"] = {"before": before, "after": after, "tokens": options.eval_tokens or None}
    summary["data"] = {"source": options.data or "built-in corpus (training part)", "sequences": windows.shape[0],
                       "tokens": windows.numel(), "epochs": summary["tokens"] / max(windows.numel(), 1)}
    return summary


def write_recovery_outputs(summary: dict, directory: str | Path) -> None:
    """The loss curve beside a recovered model: ``recovery_curve.json`` and ``recovery_curve.png``."""
    directory = Path(directory)
    (directory / "recovery_curve.json").write_text(json.dumps(
        {"curve": summary["curve"], "heldout_curve": summary["heldout_curve"], "final": summary["final"],
         "steps": summary["steps"], "tokens": summary["tokens"], "seconds": summary["seconds"]}, indent=2) + "\n")
    if summary["curve"]:
        from d2mc.plots import plot_recovery_curve

        plot_recovery_curve(summary, directory / "recovery_curve.png")


def brief(summary: dict) -> dict:
    """A summary without the per-step curves (for plan files and reports)."""
    return {k: v for k, v in summary.items() if k not in ("curve", "heldout_curve")}
