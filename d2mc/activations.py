"""Running a model over calibration batches while hooks record what the passes need.

Batches go to the device the model is on and what the hooks record stays there, so router fitting and block
reconstruction run where the model is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def model_device(model) -> torch.device:
    """The device of the model's weights."""
    return next(model.parameters()).device


def batches(ids: torch.Tensor, batch_size: int, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    """Consecutive batches of at most ``batch_size`` rows of ``ids``, on ``device`` when given."""
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start: start + batch_size]
        yield batch if device is None else batch.to(device)


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Remove the given hook handles on exit, whatever happens."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def first_tensor(args, kwargs) -> torch.Tensor:
    """The hidden-state argument of a module call, positional or keyword."""
    if args:
        return args[0]
    return kwargs.get("hidden_states", next(iter(kwargs.values())))


def output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture(model, calibration: torch.Tensor, batch_size: int, *, inputs: Sequence[nn.Module] = (),
            outputs: Sequence[nn.Module] = ()) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ``model`` over the calibration batches and record, for every token, the (first) input of each module of
    ``inputs`` and the output of each module of ``outputs``: two lists of ``[tokens, hidden]`` fp32 tensors on the
    model's device, each filled in place as the batches pass (no second copy to concatenate)."""
    tokens = calibration.numel()
    recorded: list[torch.Tensor | None] = [None] * (len(inputs) + len(outputs))
    filled = [0]  # tokens of the batches before the current one

    def record(i: int, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if recorded[i] is None:
            recorded[i] = torch.empty(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        recorded[i][filled[0]: filled[0] + x.shape[0]] = x

    handles = [module.register_forward_pre_hook(lambda m, args, i=i: record(i, args[0]))
               for i, module in enumerate(inputs)]
    handles += [module.register_forward_hook(lambda m, args, out, i=i: record(len(inputs) + i, output_tensor(out)))
                for i, module in enumerate(outputs)]
    with hooks(handles):
        for batch in batches(calibration, batch_size, model_device(model)):
            model(batch, use_cache=False)
            filled[0] += batch.numel()
    return recorded[: len(inputs)], recorded[len(inputs):]


def group_activations(dense, groups: Sequence[Sequence[int]], calibration: torch.Tensor, batch_size: int
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For each group of consecutive layers of the dense model: the post-attention hidden state of its first layer
    (what the fused block's experts and router see) and the output of its last layer (what the block replaces)."""
    layers = dense.model.layers
    return capture(dense, calibration, batch_size, inputs=[layers[g[0]].post_attention_layernorm for g in groups],
                   outputs=[layers[g[-1]] for g in groups])
