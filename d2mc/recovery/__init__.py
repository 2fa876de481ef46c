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

The modules, by concern: :mod:`~d2mc.recovery.options` (:class:`RecoveryOptions`), :mod:`~d2mc.recovery.data`
(the training and evaluation text), :mod:`~d2mc.recovery.losses`, :mod:`~d2mc.recovery.trainable` (what trains,
and the routers' gate gradient), :mod:`~d2mc.recovery.trainer` (the Trainer subclass and callbacks),
:mod:`~d2mc.recovery.checkpoints`, :mod:`~d2mc.recovery.processes` (which process writes) and
:mod:`~d2mc.recovery.run` (one call: data, teacher, training, outputs). ``d2mc recover`` is
:func:`d2mc.recover.recover_model`.
"""

from d2mc.recovery.checkpoints import remove_checkpoints
from d2mc.recovery.options import RecoveryOptions
from d2mc.recovery.processes import is_main_process
from d2mc.recovery.run import brief, run_recovery, train_recovery, write_recovery_outputs

__all__ = ["RecoveryOptions", "brief", "is_main_process", "remove_checkpoints", "run_recovery", "train_recovery",
           "write_recovery_outputs"]
