"""The options of a recovery run, checked when they are made."""

from __future__ import annotations

from dataclasses import dataclass

from d2mc.errors import OptionError, UserError

TRAIN_CHOICES = ("routers", "blocks", "all")
GENERATE = "generate"  # the data source the teacher writes itself
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
# options that change what the weights become; a checkpoint of other values is from another run
_RUN_IDENTITY = ("steps", "seq_len", "batch_size", "grad_accum", "lr", "schedule", "warmup", "weight_decay",
                 "max_grad_norm", "ce_weight", "kl_weight", "temperature", "balance_weight", "hidden_weight",
                 "train", "data", "data_split", "data_field", "generate_sequences", "teacher_topk", "router_gradient",
                 "router_lr_factor", "seed", "dtype", "stream")


@dataclass
class RecoveryOptions:
    """Everything a recovery run needs; see :mod:`d2mc.recovery` for the loss."""

    steps: int = 100
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: float = 0.05  # a fraction of the steps (< 1) or a number of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # None: 1 on real text; 0 on text the teacher generated, where the sampled token (top-p, a sharpened draw
    # from the teacher's own distribution) only adds noise and a bias to what the KL already gives exactly
    ce_weight: float | None = None
    kl_weight: float = 1.0
    temperature: float = 1.0
    balance_weight: float = 0.01
    hidden_weight: float = 0.0  # hidden-state loss after each converted block against the teacher's (0: none)
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
    router_lr_factor: float = 1.0  # the routers' learning rate as a multiple of lr
    seed: int = 0
    checkpoint_dir: str | None = None  # None: no checkpoints (a temporary directory)
    save_steps: int = 50
    save_limit: int = 2
    resume: bool = True
    log_every: int = 10
    device: str = "auto"  # a plain run's device (auto, cpu, cuda[:N]); under a launcher each process takes its own
    dtype: str = "fp32"  # bf16 or fp16: mixed precision over fp32 weights, and the teacher held in that dtype
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)
    stream: bool = False  # read a datasets name as a stream, tokenised on the fly (no windows prepared ahead)

    def __post_init__(self):
        if self.ce_weight is None:
            self.ce_weight = 0.0 if self.data == GENERATE else 1.0
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
        if not self.router_lr_factor > 0:
            raise UserError(f"--router-lr-factor must be positive, not {self.router_lr_factor}")
        if min(self.ce_weight, self.kl_weight, self.balance_weight, self.hidden_weight) < 0 or not (
                self.ce_weight or self.kl_weight):
            raise UserError("loss weights must be zero or more, and CE or KL must have a positive weight")
        if not self.warmup >= 0:
            raise UserError(f"--warmup must be zero or more (a fraction of the steps below 1, or steps), not "
                            f"{self.warmup}")
        if self.teacher_topk < 0 or self.save_steps < 1 or self.log_every < 1:
            raise UserError("--teacher-topk must be zero or more; save and log intervals at least 1")
        if self.stream and (self.data is None or self.data == GENERATE):
            raise OptionError("{stream} reads a datasets name (or a local dataset directory) as it trains: give it "
                              "with {data}")
        if self.stream and self.teacher_topk:
            raise OptionError("{teacher_topk} runs the teacher over every training window before training, which a "
                              "stream does not have: drop {teacher_topk} or {stream}")
        if self.data is not None and self.data == self.eval_data:
            raise UserError(f"'{self.data}' is both the training data and the evaluation text: train on text that "
                            "does not overlap the evaluation text")

    def identity(self) -> dict:
        """The options that decide the trained weights (compared before resuming from a checkpoint)."""
        return {k: getattr(self, k) for k in _RUN_IDENTITY}

    @property
    def warmup_steps(self) -> int:
        """Warm-up in optimizer steps, always leaving at least one step at a positive learning rate (one step
        of warm-up out of one would train at learning rate 0)."""
        steps = int(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)
        return max(0, min(steps, self.steps - 1))

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step in one process."""
        return self.seq_len * self.batch_size * self.grad_accum
