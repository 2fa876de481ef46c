"""The Hugging Face Trainer subclass and callbacks of recovery training (transformers' Trainer is imported only
when training runs)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from d2mc.recovery.data import STREAM_POSITION
from d2mc.recovery.engines import teacher_for_deepspeed, teacher_for_fsdp
from d2mc.recovery.losses import balance_loss, hidden_loss, kl_full, kl_topk
from d2mc.recovery.options import RecoveryOptions
from d2mc.recovery.trainable import block_boundaries, routed_blocks


def trainer_classes():
    """The Trainer subclass and callbacks (transformers' Trainer is imported only when training runs)."""
    from transformers import Trainer, TrainerCallback

    class DistillationTrainer(Trainer):
        """Trainer whose loss is CE + KL to the teacher + router balance, and with ``hidden_weight`` the hidden-state
        loss at the boundaries of converted blocks (see :mod:`d2mc.recovery`)."""

        def __init__(self, *args, teacher=None, recovery: RecoveryOptions, **kwargs):
            super().__init__(*args, **kwargs)
            self.recovery = recovery
            self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean; the Trainer scales for GA
            self._router_logits: list[tuple[torch.Tensor, int]] = []
            self._collecting = False  # only the loss's forward; not a gradient-checkpointing recompute
            self._parts: dict[str, list[torch.Tensor]] = {"ce": [], "kl": [], "balance": [], "hidden": []}
            self._hooks = [block.router.register_forward_hook(self._collector(getattr(block, "top_k", 1)))
                           for block in routed_blocks(self.model)]
            self._hidden: dict[str, dict[int, torch.Tensor]] = {"student": {}, "teacher": {}}
            self._boundaries = block_boundaries(self.model) if recovery.hidden_weight else []
            if self._boundaries and teacher is None:
                raise ValueError("the hidden-state loss needs the teacher model")
            for block, layer in self._boundaries:  # on the modules themselves, before an engine wraps the teacher
                self._hooks.append(self.model.model.layers[block].register_forward_hook(
                    self._keeper("student", block)))
                self._hooks.append(teacher.model.layers[layer].register_forward_hook(self._keeper("teacher", block)))
            self.teacher = None if teacher is None else self._place_teacher(teacher)

        def _place_teacher(self, teacher):
            """The teacher where the engine wants it: sharded like the student under FSDP or ZeRO-3, whole on
            this process's device otherwise."""
            if self.is_fsdp_enabled:
                return teacher_for_fsdp(teacher, self.accelerator.state.fsdp_plugin)
            if self.is_deepspeed_enabled:
                return teacher_for_deepspeed(teacher, self.accelerator)
            return teacher.to(self.args.device)

        def create_optimizer(self, model=None):
            """The Trainer's optimizer, with the routers' parameters in groups of their own at ``router_lr_factor``
            times the learning rate (the schedule scales every group alike)."""
            optimizer = super().create_optimizer(model)
            factor = self.recovery.router_lr_factor
            routers = {id(p) for block in routed_blocks(self.model) for p in block.router.parameters()}
            if factor == 1 or not routers:
                return optimizer
            groups = []
            for group in optimizer.param_groups:
                for router in (False, True):
                    params = [p for p in group["params"] if (id(p) in routers) == router]
                    if params:
                        groups.append({**group, "params": params, "lr": group["lr"] * (factor if router else 1)})
            optimizer.param_groups.clear()
            for group in groups:
                optimizer.add_param_group(group)
            return optimizer

        @property
        def sharded(self) -> bool:
            """Whether the engine splits the model's weights among the processes (every process runs each
            forward)."""
            return self.is_fsdp_enabled or self.is_deepspeed_enabled

        def _collector(self, k: int):
            def collect(module, args, output):
                if self._collecting:
                    self._router_logits.append((output, k))

            return collect

        def _keeper(self, side: str, block: int):
            def keep(module, args, output):
                if side == "teacher" or self._collecting:  # not a gradient-checkpointing recompute
                    self._hidden[side][block] = output[0] if isinstance(output, tuple) else output

            return keep

        def remove_hooks(self) -> None:
            for handle in self._hooks:
                handle.remove()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            r = self.recovery
            ids = inputs["input_ids"]
            self._router_logits.clear()
            self._collecting = True
            try:
                outputs = model(input_ids=ids, use_cache=False)
            finally:
                self._collecting = False
            logits = outputs.logits
            loss = torch.zeros((), device=logits.device)
            if r.ce_weight:
                ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1))
                loss = loss + r.ce_weight * ce
                self._parts["ce"].append(ce.detach())
            teacher_logits = None
            if (r.kl_weight and "teacher_logprobs" not in inputs) or self._boundaries:
                with torch.no_grad():
                    teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
            if r.kl_weight:
                if "teacher_logprobs" in inputs:
                    kl = kl_topk(logits, inputs["teacher_logprobs"], inputs["teacher_indices"], r.temperature)
                else:
                    kl = kl_full(logits, teacher_logits, r.temperature)
                loss = loss + r.kl_weight * kl
                self._parts["kl"].append(kl.detach())
            if self._boundaries:
                student, teacher = self._hidden["student"], self._hidden["teacher"]
                hidden = hidden_loss([(student.pop(b), teacher.pop(b)) for b, _ in self._boundaries])
                loss = loss + r.hidden_weight * hidden
                self._parts["hidden"].append(hidden.detach())
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
            parts = ", ".join(f"{k} {logs[k]:.4f}" for k in ("ce", "kl", "balance", "hidden") if k in logs)
            self.progress(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f} ({parts}), "
                          f"{rate:,.0f} tokens/s, ETA {duration(eta)}")

    class HeldoutCallback(TrainerCallback):
        """Held-out perplexity at step 0 and every ``every`` steps, kept in the Trainer state (so it survives a
        resume) for the curve. The first process evaluates; the others go on to the next step."""

        def __init__(self, windows: torch.Tensor, every: int, tokens_per_step: int, progress=None,
                     sharded: bool = False):
            self.windows, self.every, self.tokens_per_step, self.progress = windows, every, tokens_per_step, progress
            self.sharded = sharded

        def _evaluate(self, args, state, model):
            # a sharded model's forward needs every process; otherwise the first one evaluates alone
            if not (state.is_world_process_zero or self.sharded):
                return
            from d2mc.data import perplexity

            was_training = model.training
            model.eval()
            ppl = perplexity(model, self.windows.to(args.device))
            model.train(was_training)
            state.log_history.append({"step": state.global_step, "heldout_perplexity": ppl,
                                      "tokens": state.global_step * self.tokens_per_step * args.world_size})
            if self.progress and state.is_world_process_zero:
                self.progress(f"step {state.global_step}: held-out perplexity {ppl:.2f}")

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self._evaluate(args, state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every == 0 or state.global_step == state.max_steps:
                self._evaluate(args, state, model)

    class StreamPositionCallback(TrainerCallback):
        """Keep the position of a streamed source in each checkpoint (:data:`d2mc.recovery.data.STREAM_POSITION`),
        for the windows its steps trained on; the first process, which reads the stream, writes it."""

        def __init__(self, dataset, windows_per_step: int):
            self.dataset, self.windows_per_step = dataset, windows_per_step

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            position = self.dataset.position(state.global_step * self.windows_per_step)
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (checkpoint / STREAM_POSITION).write_text(json.dumps(position) + "\n")

    return DistillationTrainer, LastStepLogCallback, ProgressCallback, HeldoutCallback, StreamPositionCallback


def duration(seconds: float) -> str:
    """``M:SS``, or ``H:MM:SS`` from an hour on."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
