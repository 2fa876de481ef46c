"""The Hugging Face Trainer subclass and callbacks of recovery training (transformers' Trainer is imported only
when training runs)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

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
            self.teacher, self.recovery = teacher, recovery
            self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean; the Trainer scales for GA
            self._router_logits: list[tuple[torch.Tensor, int]] = []
            self._parts: dict[str, list[torch.Tensor]] = {"ce": [], "kl": [], "balance": [], "hidden": []}
            self._hooks = [block.router.register_forward_hook(self._collector(getattr(block, "top_k", 1)))
                           for block in routed_blocks(self.model)]
            self._hidden: dict[str, dict[int, torch.Tensor]] = {"student": {}, "teacher": {}}
            self._boundaries = block_boundaries(self.model) if recovery.hidden_weight else []
            if self._boundaries and teacher is None:
                raise ValueError("the hidden-state loss needs the teacher model")
            for block, layer in self._boundaries:
                self._hooks.append(self.model.model.layers[block].register_forward_hook(
                    self._keeper("student", block)))
                self._hooks.append(teacher.model.layers[layer].register_forward_hook(self._keeper("teacher", block)))
            if teacher is not None:
                teacher.to(self.args.device)

        def _collector(self, k: int):
            def collect(module, args, output):
                self._router_logits.append((output, k))

            return collect

        def _keeper(self, side: str, block: int):
            def keep(module, args, output):
                self._hidden[side][block] = output[0] if isinstance(output, tuple) else output

            return keep

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


def duration(seconds: float) -> str:
    """``M:SS``, or ``H:MM:SS`` from an hour on."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
