"""How the frozen teacher and the trained model meet the engine the Trainer runs on.

Under DDP (``torchrun``, or ``accelerate launch`` with a multi-GPU or multi-CPU config) every process holds the whole
teacher. Under FSDP (version 2) the teacher is sharded like the student: each of its decoder layers and then the
whole model are ``fully_shard``-ed with the plugin's settings (resharding after forward, CPU offload, mixed
precision), so each process holds ``1/N`` of it between forwards. Under DeepSpeed ZeRO-3 the teacher is partitioned
by a DeepSpeed inference engine made from the run's DeepSpeed config (ZeRO stages 1 and 2 do not partition
parameters: the teacher is replicated, as in DDP). After training, a sharded model is gathered back into an
ordinary model that ``save_pretrained`` writes.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from d2mc.errors import UserError

log = logging.getLogger(__name__)


def layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes of the model's decoder layers (its ``_no_split_modules``): the units FSDP shards."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def shard_teacher(teacher: nn.Module, *, reshard_after_forward: bool = True, offload_policy=None,
                  mp_policy=None) -> nn.Module:
    """Shard a frozen teacher with FSDP2 across the default process group: each decoder layer, then the root (the
    embedding, final norm and LM head), so each process holds ``1/N`` of the weights between forwards. Every process
    must run each forward (the layers gather their shards as they run)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs = {"reshard_after_forward": reshard_after_forward, "offload_policy": offload_policy or OffloadPolicy(),
              "mp_policy": mp_policy or MixedPrecisionPolicy()}
    classes = layer_classes(teacher)
    if not classes:
        raise ValueError(f"{type(teacher).__name__} names no decoder layer class to shard (_no_split_modules)")
    teacher.requires_grad_(False)
    for module in list(teacher.modules()):
        if isinstance(module, classes):
            fully_shard(module, **kwargs)
    fully_shard(teacher, **kwargs)
    return teacher.eval()


def teacher_for_fsdp(teacher: nn.Module, plugin) -> nn.Module:
    """:func:`shard_teacher` with the settings of accelerate's FSDP plugin of the run (FSDP version 2 only)."""
    if plugin.fsdp_version != 2:
        raise UserError(f"the accelerate config asks for FSDP version {plugin.fsdp_version}: d2mc shards the teacher "
                        "with FSDP version 2; set fsdp_version: 2 in the config")
    return shard_teacher(teacher, reshard_after_forward=plugin.reshard_after_forward is not False,
                         offload_policy=plugin.cpu_offload if plugin.cpu_offload else None,
                         mp_policy=plugin.mixed_precision_policy)


def teacher_for_deepspeed(teacher: nn.Module, accelerator) -> nn.Module:
    """The teacher as a DeepSpeed engine for inference made from the run's DeepSpeed config: partitioned under
    ZeRO-3, replicated (stage 0) otherwise; no optimizer."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    hidden = getattr(teacher.config, "hidden_size", None)
    if zero.get("stage") == 3 and hidden:
        zero.update(reduce_bucket_size=hidden * hidden, stage3_param_persistence_threshold=10 * hidden,
                    stage3_prefetch_bucket_size=int(0.9 * hidden * hidden))
    else:
        zero["stage"] = 0
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    return engine.eval()


def gathered_model(trainer, model: nn.Module) -> nn.Module:
    """The trained model as an ordinary module on the CPU with full weights: ``model`` itself under DDP or a plain
    run; under FSDP or ZeRO-3 a new model of the same class, loaded from the full state dict that every process helps
    gather (call it on every process)."""
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return model
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped if trainer.is_deepspeed_enabled else model)
    with torch.device("meta"):
        plain = type(model)(copy.deepcopy(model.config))
    if state is None:  # the processes other than the first receive nothing
        return plain
    plain.load_state_dict(state, assign=True, strict=False)
    plain.tie_weights()
    missing = [name for name, p in plain.named_parameters() if p.device.type == "meta"]
    if missing:
        raise RuntimeError(f"the gathered state dict lacks {missing[:3]}")
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary tables) are not in the state dict
        module_name, _, buffer_name = name.rpartition(".")
        target = plain.get_submodule(module_name)
        if getattr(target, buffer_name).device.type == "meta":
            target.register_buffer(buffer_name, buffer.detach().cpu(), persistent=False)
    return plain.eval()
