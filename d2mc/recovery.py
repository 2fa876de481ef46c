"""Recovery training: heal a converted model by continual pretraining with distillation from its dense parent.

    loss = ce_weight * CE(student, next token)
         + kl_weight * T^2 * KL(teacher_T || student_T)          # T: temperature
         + balance_weight * mean over routers of E * sum_e f_e P_e  # Switch-style load balance

``f_e`` is the share of tokens a router sends to expert ``e``, ``P_e`` its mean routing probability; router logits
are collected with forward hooks, the model's math is untouched. What trains is ``routers``, ``blocks`` (the
blocks the conversion changed: fused, attention removed, or next to removed layers) or ``all``.

Training runs on the Hugging Face :class:`~transformers.Trainer`, so one command runs on this CPU, on a GPU, or
under ``torchrun --nproc_per_node N`` (DDP; gloo on CPU, nccl on GPU); only the first process writes outputs.
Checkpoints go to ``checkpoint_dir`` every ``save_steps``; a rerun with the same options resumes from the last
one and reaches the same weights as an uninterrupted run at the same seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from d2mc.errors import UserError
from d2mc.outputs import remove_incomplete_checkpoints

log = logging.getLogger(__name__)

TRAIN_CHOICES = ("routers", "blocks", "all")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
# options that change what the weights become; a checkpoint of other values is from another run
_RUN_IDENTITY = ("steps", "seq_len", "batch_size", "grad_accum", "lr", "schedule", "warmup", "weight_decay",
                 "max_grad_norm", "ce_weight", "kl_weight", "temperature", "balance_weight", "train", "data",
                 "data_split", "data_field", "generate_sequences", "teacher_topk", "router_gradient", "seed")


@dataclass
class RecoveryOptions:
    """Everything a recovery run needs; see the module docstring for the loss."""

    steps: int = 100
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: float = 0.05  # a fraction of the steps (< 1) or a number of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    temperature: float = 1.0
    balance_weight: float = 0.01
    train: str = "all"  # measured best for the held-out perplexity (docs/recovery.md)
    data: str | None = None  # None: built-in corpus (training part); a .txt/.jsonl file; a datasets name; "generate"
    data_split: str = "train"
    data_field: str = "text"
    generate_sequences: int = 0  # for data="generate"; 0: one sequence per step and batch slot
    eval_data: str | None = None  # the evaluation text (never trained on); None: the built-in held-out text
    eval_tokens: int = 0  # held-out tokens scored before and after training (0: skip)
    eval_every: int = 0  # steps between held-out perplexity points on the curve (0: none)
    eval_curve_tokens: int = 2048  # held-out tokens scored at each curve point
    teacher_topk: int = 0  # > 0: run the teacher once over the data and keep its top-k log-probabilities
    router_gradient: bool = True  # top-1 normalised routers: pass a gradient through the (constant) gate
    seed: int = 0
    checkpoint_dir: str | None = None  # None: no checkpoints (a temporary directory)
    save_steps: int = 50
    save_limit: int = 2
    resume: bool = True
    log_every: int = 10

    def __post_init__(self):
        if self.steps < 0:
            raise UserError("recovery steps must be zero or more")
        if self.seq_len < 2 or self.batch_size < 1 or self.grad_accum < 1:
            raise UserError("recovery needs --seq-len of at least 2 and a batch of at least 1")
        if self.train not in TRAIN_CHOICES:
            raise UserError(f"unknown --train '{self.train}': choose one of {', '.join(TRAIN_CHOICES)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule '{self.schedule}': choose one of {', '.join(SCHEDULES)}")
        if self.lr <= 0 or self.temperature <= 0:
            raise UserError("the learning rate and the temperature must be positive")
        if min(self.ce_weight, self.kl_weight, self.balance_weight) < 0 or not (self.ce_weight or self.kl_weight):
            raise UserError("loss weights must be zero or more, and CE or KL must have a positive weight")
        if self.teacher_topk < 0 or self.save_steps < 1 or self.log_every < 1:
            raise UserError("--teacher-topk must be zero or more; save and log intervals at least 1")
        if self.data is not None and self.data == self.eval_data:
            raise UserError(f"'{self.data}' is both the training data and the evaluation text: train on text that "
                            "does not overlap the evaluation text")

    def identity(self) -> dict:
        """The options that decide the trained weights (compared before resuming from a checkpoint)."""
        return {k: getattr(self, k) for k in _RUN_IDENTITY}

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step in one process."""
        return self.seq_len * self.batch_size * self.grad_accum


# --- what trains ------------------------------------------------------------------------------------------


def routed_blocks(model) -> list[nn.Module]:
    """Modules with a linear ``router`` (every MoE block of a converted model, whatever the method)."""
    return [m for m in model.modules() if isinstance(getattr(m, "router", None), nn.Linear)]


def changed_blocks(model) -> list[int]:
    """Blocks the conversion changed: those with a router or several experts, without attention, or next to
    parent layers that are gone."""
    config = model.config
    plans = getattr(config, "blocks", None)
    if not plans:
        raise UserError("recovery trains converted models: convert the model first (d2mc convert)")
    present = set()
    for plan in plans:
        present.update(_layers_of(plan))
    parent_layers = config.base_config.num_hidden_layers
    changed = []
    for i, (plan, block) in enumerate(zip(plans, model.model.layers, strict=True)):
        layers = _layers_of(plan)
        gone_next = any(0 <= n < parent_layers and n not in present for n in (min(layers) - 1, max(layers) + 1))
        if (plan.get("attention_layer") is None or len(plan["expert_layers"]) > 1 or gone_next
                or plan["attention_layer"] != plan["expert_layers"][0]
                or isinstance(getattr(block, "router", None), nn.Linear)):
            changed.append(i)
    return changed


def _layers_of(plan: dict) -> set[int]:
    layers = set(plan["expert_layers"])
    if plan.get("attention_layer") is not None:
        layers.add(plan["attention_layer"])
    return layers


def trainable_parameters(model, train: str) -> list[str]:
    """Names of the parameters ``train`` selects (``routers``, ``blocks`` or ``all``)."""
    if train == "all":
        return [name for name, _ in model.named_parameters()]
    if train == "routers":
        names = [name for name, _ in model.named_parameters() if name.split(".")[-2:-1] == ["router"]]
        if not names:
            raise UserError("the model has no routers (drop-layers and drop-attention models have none): train "
                            "'blocks' or 'all'")
        return names
    prefixes = tuple(f"model.layers.{i}." for i in changed_blocks(model))
    names = [name for name, _ in model.named_parameters() if name.startswith(prefixes)]
    if not names:
        raise UserError("the conversion changed no block: there is nothing to recover with --train blocks")
    return names


@contextlib.contextmanager
def trainable(model, names: Sequence[str]):
    """Only ``names`` require gradients inside the block; the previous flags come back afterwards."""
    chosen = set(names)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in chosen)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


@contextlib.contextmanager
def router_gradients(model, enabled: bool = True):
    """Give top-1 normalised routers a gradient during training.

    With one routed expert per token and normalised weights the gate is always exactly 1, so the task loss
    never reaches the router. Inside this block such a block's gate is computed as ``p / p.detach()``: the same
    value (exactly 1) with the gradient of ``log p`` scaled by how much the chosen expert's output helps, as in
    Switch Transformers. Outputs are bit-identical; only training sees the difference."""
    patched = [b for b in routed_blocks(model) if enabled and getattr(b, "top_k", None) == 1
               and getattr(b, "normalize_topk", False) and hasattr(b, "route")]
    for block in patched:
        block.route = types.MethodType(_route_with_gate_gradient, block)
    try:
        yield len(patched)
    finally:
        for block in patched:
            del block.route


def _route_with_gate_gradient(self, hidden: torch.Tensor):
    logits = self.router(hidden).float()
    indices = logits.argmax(-1, keepdim=True)
    top = torch.softmax(logits, dim=-1).gather(-1, indices)
    return (top / top.detach()).to(hidden.dtype), indices


# --- the loss ---------------------------------------------------------------------------------------------


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)`` per token, averaged over tokens."""
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def kl_topk(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """KL to a cached top-k teacher: the k tokens plus one bucket for the rest of the vocabulary."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices)
    p = teacher_logprobs.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-8)
    q_rest = (1 - s.exp().sum(-1)).clamp_min(1e-8)
    kl = (p * (teacher_logprobs - s)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean() * temperature ** 2


def balance_loss(router_logits: list[tuple[torch.Tensor, int]]) -> torch.Tensor | None:
    """Switch-style load balance ``E * sum_e f_e P_e``, averaged over routers (1 when perfectly balanced)."""
    terms = []
    for logits, k in router_logits:
        probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        experts = probs.shape[-1]
        chosen = probs.topk(min(k, experts), dim=-1).indices
        share = torch.zeros(experts, device=probs.device).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)) / chosen.numel()
        terms.append(experts * (share * probs.mean(0)).sum())
    return torch.stack(terms).mean() if terms else None


# --- training on the Hugging Face Trainer -----------------------------------------------------------------


def _trainer_classes():
    """The Trainer subclass and callbacks (transformers' Trainer is imported only when training runs)."""
    from transformers import Trainer, TrainerCallback

    class DistillationTrainer(Trainer):
        """Trainer whose loss is CE + KL to the teacher + router balance (see the module docstring)."""

        def __init__(self, *args, teacher=None, recovery: RecoveryOptions, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.recovery = teacher, recovery
            self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean; the Trainer scales for GA
            self._router_logits: list[tuple[torch.Tensor, int]] = []
            self._parts: dict[str, list[torch.Tensor]] = {"ce": [], "kl": [], "balance": []}
            self._hooks = [block.router.register_forward_hook(self._collector(getattr(block, "top_k", 1)))
                           for block in routed_blocks(self.model)]
            if teacher is not None:
                teacher.to(self.args.device)

        def _collector(self, k: int):
            def collect(module, args, output):
                self._router_logits.append((output, k))

            return collect

        def remove_hooks(self) -> None:
            for handle in self._hooks:
                handle.remove()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            r = self.recovery
            ids = inputs["input_ids"]
            self._router_logits.clear()
            outputs = model(input_ids=ids, use_cache=False)
            logits = outputs.logits
            loss = torch.zeros((), device=logits.device)
            if r.ce_weight:
                ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1))
                loss = loss + r.ce_weight * ce
                self._parts["ce"].append(ce.detach())
            if r.kl_weight:
                if "teacher_logprobs" in inputs:
                    kl = kl_topk(logits, inputs["teacher_logprobs"], inputs["teacher_indices"], r.temperature)
                else:
                    with torch.no_grad():
                        teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
                    kl = kl_full(logits, teacher_logits, r.temperature)
                loss = loss + r.kl_weight * kl
                self._parts["kl"].append(kl.detach())
            balance = balance_loss(self._router_logits)
            self._router_logits.clear()
            if balance is not None:
                if r.balance_weight:
                    loss = loss + r.balance_weight * balance
                self._parts["balance"].append(balance.detach())
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                for name, values in self._parts.items():
                    if values:
                        mean = torch.stack(values).mean().reshape(1)
                        logs[name] = round(float(self.accelerator.gather(mean).mean()), 5)
                    values.clear()
                logs["tokens"] = self.state.global_step * self.recovery.tokens_per_step * self.args.world_size
            super().log(logs, start_time)

    class LastStepLogCallback(TrainerCallback):
        """Log the last step too, so the curve ends where training ended."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                control.should_log = True

    class ProgressCallback(TrainerCallback):
        """Loss, tokens/s and ETA through ``progress`` (first process only)."""

        def __init__(self, progress: Callable[[str], None], tokens_per_step: int):
            self.progress, self.tokens_per_step = progress, tokens_per_step
            self.start, self.first_step = 0.0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first_step = time.perf_counter(), state.global_step
            if state.global_step and state.is_world_process_zero:
                self.progress(f"resumed at step {state.global_step}/{state.max_steps}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            done = state.global_step - self.first_step
            elapsed = time.perf_counter() - self.start
            rate = done * self.tokens_per_step * args.world_size / max(elapsed, 1e-9)
            eta = (state.max_steps - state.global_step) * elapsed / max(done, 1)
            parts = ", ".join(f"{k} {logs[k]:.4f}" for k in ("ce", "kl", "balance") if k in logs)
            self.progress(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f} ({parts}), "
                          f"{rate:,.0f} tokens/s, ETA {_duration(eta)}")

    class HeldoutCallback(TrainerCallback):
        """Held-out perplexity at step 0 and every ``every`` steps, kept in the Trainer state (so it survives a
        resume) for the curve. The first process evaluates; the others go on to the next step."""

        def __init__(self, windows: torch.Tensor, every: int, tokens_per_step: int, progress=None):
            self.windows, self.every, self.tokens_per_step, self.progress = windows, every, tokens_per_step, progress

        def _evaluate(self, args, state, model):
            if not state.is_world_process_zero:
                return
            from d2mc.data import perplexity

            was_training = model.training
            model.eval()
            ppl = perplexity(model, self.windows.to(args.device))
            model.train(was_training)
            state.log_history.append({"step": state.global_step, "heldout_perplexity": ppl,
                                      "tokens": state.global_step * self.tokens_per_step * args.world_size})
            if self.progress:
                self.progress(f"step {state.global_step}: held-out perplexity {ppl:.2f}")

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self._evaluate(args, state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every == 0 or state.global_step == state.max_steps:
                self._evaluate(args, state, model)

    return DistillationTrainer, LastStepLogCallback, ProgressCallback, HeldoutCallback


def train_recovery(model, teacher, dataset, options: RecoveryOptions, *, eval_windows: torch.Tensor | None = None,
                   progress: Callable[[str], None] | None = None, callbacks: Sequence = ()) -> dict:
    """Train ``model`` in place on ``dataset`` (a :class:`d2mc.recovery_data.WindowDataset`) against
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
        lr_scheduler_type=options.schedule, warmup_steps=options.warmup, weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm, optim="adamw_torch", seed=options.seed, data_seed=options.seed,
        logging_steps=options.log_every, logging_first_step=True, save_strategy="no" if temporary else "steps", save_steps=options.save_steps,
        save_total_limit=options.save_limit, report_to="none", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        ddp_backend=("nccl" if torch.cuda.is_available() else "gloo") if _world_size() > 1 else None,
        ddp_find_unused_parameters=True)
    resume = None
    if not temporary:
        resume = _prepare_checkpoint_dir(Path(checkpoint_dir), options, args.process_index == 0)
        if resume:
            resume = get_last_checkpoint(checkpoint_dir)
    Trainer, LastStepLog, Progress, Heldout = _trainer_classes()
    tokens_per_step = options.tokens_per_step
    extra = [LastStepLog()] + ([Progress(progress, tokens_per_step)] if progress else [])
    if eval_windows is not None and options.eval_every:
        extra.append(Heldout(eval_windows, options.eval_every, tokens_per_step, progress))
    start = time.perf_counter()
    with trainable(model, names), router_gradients(model, options.router_gradient) as patched:
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
        "routers_with_gate_gradient": patched,
        "final": {k: final[k] for k in ("loss", "ce", "kl", "balance") if k in final},
        "curve": curve,
        "heldout_curve": heldout,
        "teacher": f"cached top-{options.teacher_topk}" if options.teacher_topk else "online",
    }


def _prepare_checkpoint_dir(path: Path, options: RecoveryOptions, writer: bool) -> bool:
    """Whether to resume from ``path``. Refuses checkpoints of a different run; ``resume=False`` starts over."""
    record = path / "recovery_run.json"
    identity = options.identity()
    remove_incomplete_checkpoints(path)  # a run stopped while saving leaves one that must not be resumed
    has_checkpoint = path.exists() and any(path.glob("checkpoint-*"))
    if has_checkpoint and options.resume:
        saved = json.loads(record.read_text()) if record.exists() else None
        if saved != identity:
            differing = sorted(k for k in identity if not saved or saved.get(k) != identity[k])
            raise UserError(f"the checkpoints in '{path}' come from a different recovery run (differing: "
                            f"{', '.join(differing) or 'unknown'}): remove the directory, give another checkpoint "
                            "directory, or start over with --no-resume")
        return True
    if writer:
        if has_checkpoint:
            for old in path.glob("checkpoint-*"):
                shutil.rmtree(old)
        path.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(identity, indent=2) + "\n")
    return False


def remove_checkpoints(options: RecoveryOptions) -> None:
    """Delete a finished run's checkpoint directory (call once its output is safely written)."""
    if options.checkpoint_dir and Path(options.checkpoint_dir).exists():
        shutil.rmtree(options.checkpoint_dir, ignore_errors=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


# --- one call: data, teacher, training ------------------------------------------------------------------


def run_recovery(model, teacher, tokenizer, options: RecoveryOptions,
                 progress: Callable[[str], None] | None = None, callbacks: Sequence = ()) -> dict:
    """Prepare the data (checked against the evaluation text), optionally cache the teacher's top-k, train,
    and score held-out perplexity before and after when ``options.eval_tokens``."""
    from d2mc.data import perplexity
    from d2mc.recovery_data import (
        GENERATE,
        WindowDataset,
        cache_teacher_topk,
        evaluation_windows,
        generate_windows,
        training_windows,
    )

    if teacher is None:
        raise UserError("recovery needs the dense parent as teacher")
    if tokenizer is None:
        raise UserError("recovery needs a tokenizer for its training text")
    if teacher.config.vocab_size != model.config.vocab_size:
        raise UserError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the model's "
                        f"({model.config.vocab_size}): give the dense parent the model was converted from")
    trainable_parameters(model, options.train)  # refuse an impossible choice before any work
    say = progress or (lambda text: None)
    world = _world_size()
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


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in the process that writes outputs (rank 0 under torchrun, or a plain run)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


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


def recover_model(converted: str, output: str, options: RecoveryOptions, *, teacher: str | None = None,
                  overwrite: bool = False, keep_checkpoints: bool = False,
                  progress: Callable[[str], None] | None = None) -> dict:
    """``d2mc recover``: load a converted model and its dense parent, train, and write the recovered model
    (Hugging Face format, tokenizer, ``d2mc_plan.json`` with a ``recovery`` section, the loss curve) to
    ``output`` atomically. Under ``torchrun`` every process trains; only the first one writes."""
    from d2mc.context import Context
    from d2mc.loading import load_model
    from d2mc.outputs import atomic_output_dir
    from d2mc.pipeline import PassManager, create_pass

    if Path(output).exists() and not overwrite:
        raise UserError(f"output '{output}' already exists: remove it or pass --overwrite")
    loaded = load_model(converted)
    if getattr(loaded.config, "blocks", None) is None:
        raise UserError(f"'{converted}' is not a converted model: convert it first (d2mc convert)")
    plan_file = loaded.path / "d2mc_plan.json" if loaded.path else None
    plan = json.loads(plan_file.read_text()) if plan_file and plan_file.exists() else {}
    teacher = teacher or plan.get("source")
    if not teacher:
        raise UserError(f"'{converted}' does not name its dense parent: give it with --teacher")
    parent = load_model(teacher, tokenizer=False)
    if getattr(parent.config, "blocks", None) is not None:
        raise UserError(f"the teacher '{teacher}' is a converted model: give the dense parent")
    ctx = Context.from_loaded(loaded)
    ctx.teacher = parent.model.eval().requires_grad_(False)
    PassManager([create_pass("recover", options=options, progress=progress)]).run(ctx)
    summary = ctx.results["recovery"]
    summary["teacher_model"] = teacher
    if is_main_process():
        with atomic_output_dir(output, overwrite=overwrite) as tmp:
            ctx.model.save_pretrained(tmp)
            if ctx.tokenizer is not None:
                ctx.tokenizer.save_pretrained(tmp)
            plan["recovery"] = brief(summary)
            (tmp / "d2mc_plan.json").write_text(json.dumps(plan, indent=2, default=str) + "\n")
            write_recovery_outputs(summary, tmp)
        if not keep_checkpoints:
            remove_checkpoints(options)
    return summary
