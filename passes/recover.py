"""recover: heal a converted model by training it against its dense parent (CE + KL + router balance)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from d2mc.context import Context
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.recovery import RecoveryOptions, brief, run_recovery

log = logging.getLogger(__name__)


@register_pass
class Recover(Pass):
    """Continual pretraining with distillation from the dense parent (``ctx.teacher``), on the Hugging Face
    Trainer (see :mod:`d2mc.recovery`). Works on any converted model: its routers and changed blocks are found
    from the model. Options are the fields of :class:`~d2mc.recovery.RecoveryOptions` (a recipe's
    ``[options.recover]`` table), or ``options=`` one of them; ``progress`` receives loss, tokens/s and ETA."""

    name = "recover"
    requires = ("model", "teacher", "tokenizer")
    provides = ("recovery",)
    transforms_model = True

    def __init__(self, options: RecoveryOptions | None = None, progress: Callable[[str], None] | None = None,
                 **fields):
        if options is not None and fields:
            raise TypeError("give options= or separate option fields, not both")
        self.options = options or RecoveryOptions(**fields)
        self.progress = progress

    def run(self, ctx: Context) -> PassResult:
        def say(text: str) -> None:
            log.info("recover: %s", text)
            if self.progress:
                self.progress(text)

        summary = run_recovery(ctx.model, ctx.teacher, ctx.tokenizer, self.options, progress=say)
        ctx.model = summary.pop("model", ctx.model)  # gathered from the processes when the engine sharded it
        ctx.results["recovery"] = summary
        return PassResult(modified=summary["steps"] > 0, summary={"recovery": brief(summary)})
