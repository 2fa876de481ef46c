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
from d2mc.errors import OptionError, UserError
from d2mc.placement import resolve_placement
from d2mc.recovery.checkpoints import prepare_checkpoint_dir
from d2mc.recovery.data import (
    StreamedWindows,
    WindowDataset,
    cache_teacher_topk,
    check_no_overlap,
    evaluation_snippets,
    evaluation_windows,
    generate_windows,
    read_stream_position,
    training_windows,
)
from d2mc.recovery.engines import gathered_model
from d2mc.recovery.launch import check_launch_environment
from d2mc.recovery.options import GENERATE, RecoveryOptions
from d2mc.recovery.processes import is_main_process, world_size
from d2mc.recovery.trainable import changed_blocks, router_gradients, trainable, trainable_parameters
from d2mc.recovery.trainer import trainer_classes
from d2mc.teacher import own_parameters


def _checkpointing_argument() -> str:
    from transformers import TrainingArguments

    return "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else \
        "gradient_checkpointing"


def train_recovery(model, teacher, dataset, options: RecoveryOptions, *, eval_windows: torch.Tensor | None = None,
                   heldout: torch.Tensor | None = None, progress: Callable[[str], None] | None = None,
                   callbacks: Sequence = ()) -> dict:
    """Train ``model`` in place on ``dataset`` (a :class:`d2mc.recovery.data.WindowDataset`, or a
    :class:`~d2mc.recovery.data.StreamedWindows` stream) against ``teacher``; return the summary with the loss curve.
    ``eval_windows`` adds held-out perplexity points every ``options.eval_every`` steps; ``heldout`` is scored once
    training ends (``perplexity_after``). Resumes from ``options.checkpoint_dir`` when it holds a checkpoint of the
    same run (a stream resumes at the position the checkpoint kept).

    The parameters that train are fp32 (master weights; with ``options.dtype`` bf16 or fp16 the steps run under
    autocast) and get storage of their own first, so a teacher that shares the parent's weights
    (:func:`d2mc.teacher.frozen_alias`) keeps them; the model returns in the dtype it came in. When the engine
    sharded the model (FSDP, ZeRO-3), the summary's ``model`` is the trained model gathered into an ordinary one (on
    the first process; replace the model with it)."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    names = trainable_parameters(model, options.train)
    check_launch_environment()
    placement = resolve_placement(options.device if world_size() == 1 else "auto", options.dtype, training=True)
    if world_size() == 1 and placement.on_gpu and placement.device != "cuda:0":
        raise OptionError(f"{{device}} {placement.device}: a single training process uses the first GPU it sees; "
                          f"choose it with CUDA_VISIBLE_DEVICES={placement.device.split(':')[1]}")
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    came_in = next(model.parameters()).dtype
    if came_in != torch.float32:
        model.float()  # new storage: a teacher sharing the old keeps it
    else:
        own_parameters(model, names)
    temporary = None
    checkpoint_dir = options.checkpoint_dir
    if checkpoint_dir is None:
        temporary = checkpoint_dir = tempfile.mkdtemp(prefix="d2mc-recover-")
    streamed = isinstance(dataset, StreamedWindows)
    checkpointing = _checkpointing_argument()  # transformers 5.24 renamed gradient_checkpointing
    args = TrainingArguments(
        output_dir=checkpoint_dir, max_steps=options.steps, per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum, learning_rate=options.lr,
        lr_scheduler_type=options.schedule, warmup_steps=options.warmup_steps, weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm, optim="adamw_torch", seed=options.seed, data_seed=options.seed,
        logging_steps=options.log_every, logging_first_step=True, save_strategy="no" if temporary else "steps",
        save_steps=options.save_steps, save_total_limit=options.save_limit, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=not placement.on_gpu,
        bf16=options.dtype == "bf16", fp16=options.dtype == "fp16",
        **{checkpointing: options.gradient_checkpointing},
        ignore_data_skip=streamed,  # a stream resumes at its kept position instead of reading through the past
        ddp_backend=("nccl" if placement.on_gpu else "gloo") if world_size() > 1 else None,
        ddp_find_unused_parameters=True)
    resume = None
    if not temporary:
        resume = prepare_checkpoint_dir(Path(checkpoint_dir), options, args.process_index == 0)
        if resume:
            resume = get_last_checkpoint(checkpoint_dir)
    if streamed and resume:
        dataset.start = read_stream_position(resume)
    Trainer, LastStepLog, Progress, Heldout, StreamPosition = trainer_classes()
    tokens_per_step = options.tokens_per_step
    extra = [LastStepLog()] + ([Progress(progress, tokens_per_step)] if progress else [])
    heldout_callback = None
    if eval_windows is not None and options.eval_every:
        heldout_callback = Heldout(eval_windows, options.eval_every, tokens_per_step, progress)
        extra.append(heldout_callback)
    if streamed:
        extra.append(StreamPosition(dataset, options.batch_size * options.grad_accum * args.world_size))
    start = time.perf_counter()
    after = None
    with trainable(model, names), router_gradients(model, options.router_gradient) as gated:
        trainer = Trainer(model=model, args=args, train_dataset=dataset, teacher=teacher, recovery=options,
                          callbacks=[*extra, *callbacks])
        trainer.remove_callback(PrinterCallback)  # progress goes through ``progress`` only
        if heldout_callback is not None:
            heldout_callback.sharded = trainer.sharded
        try:
            if options.steps:
                trainer.train(resume_from_checkpoint=resume)
            if heldout is not None:
                model.eval()
                after = perplexity(model, heldout.to(args.device)) if trainer.sharded or is_main_process() else None
        finally:
            trainer.remove_hooks()
            if temporary:
                shutil.rmtree(temporary, ignore_errors=True)
    trained = gathered_model(trainer, model)
    trained.eval()
    if came_in != torch.float32:
        trained.to(came_in)
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    curve = [{k: v for k, v in h.items() if k in ("step", "tokens", "loss", "ce", "kl", "balance", "hidden",
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
        "final": {k: final[k] for k in ("loss", "ce", "kl", "balance", "hidden") if k in final},
        "curve": curve,
        "heldout_curve": heldout,
        "teacher": f"cached top-{options.teacher_topk}" if options.teacher_topk else "online",
        "perplexity_after": after,
        "dtype": options.dtype,
        "gradient_checkpointing": options.gradient_checkpointing,
        **({"model": trained} if trained is not model else {}),
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
    if options.stream:
        check_no_overlap(options.data, options.eval_data, "", tokenizer)
        dataset = StreamedWindows(options.data, tokenizer, options.seq_len, split=options.data_split,
                                  field=options.data_field,
                                  snippets=evaluation_snippets(tokenizer, options.eval_data))
        say(f"training text: streamed from {options.data}, tokenised as training goes ({needed:,} tokens to train)")
    else:
        if options.data == GENERATE:
            sequences = options.generate_sequences or max(1, options.steps * options.batch_size
                                                          * options.grad_accum * world)
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
        dataset = WindowDataset(windows, cache)
    curve_windows = None
    if options.eval_every:
        curve_windows = evaluation_windows(tokenizer, options.eval_data, 512, options.eval_curve_tokens)
    before = heldout = None
    if options.eval_tokens:
        heldout = evaluation_windows(tokenizer, options.eval_data, 512, options.eval_tokens)
        before = perplexity(model, heldout)
        say(f"held-out perplexity before recovery: {before:.2f}")
    summary = train_recovery(model, teacher, dataset, options, eval_windows=curve_windows, heldout=heldout,
                             progress=say, callbacks=callbacks)
    after = summary.pop("perplexity_after")
    if after is not None:
        say(f"held-out perplexity after recovery: {after:.2f}")
    summary["perplexity"] = {"before": before, "after": after, "tokens": options.eval_tokens or None}
    if options.stream:
        summary["data"] = {"source": options.data, "streamed": True, "sequences": summary["tokens"] // options.seq_len,
                           "tokens": summary["tokens"]}
    else:
        summary["data"] = {"source": options.data or "built-in corpus (training part)",
                           "sequences": windows.shape[0], "tokens": windows.numel(),
                           "epochs": summary["tokens"] / max(windows.numel(), 1)}
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
