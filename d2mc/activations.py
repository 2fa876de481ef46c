"""Running a model over calibration batches while hooks record what the passes need."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive batches of at most ``batch_size`` rows of ``ids``."""
    for start in range(0, ids.shape[0], batch_size):
        yield ids[start: start + batch_size]


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
    ``inputs`` and the output of each module of ``outputs``: two lists of ``[tokens, hidden]`` fp32 tensors."""
    recorded_in: list[list[torch.Tensor]] = [[] for _ in inputs]
    recorded_out: list[list[torch.Tensor]] = [[] for _ in outputs]

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).float()

    handles = [module.register_forward_pre_hook(lambda m, args, i=i: recorded_in[i].append(flat(args[0])))
               for i, module in enumerate(inputs)]
    handles += [module.register_forward_hook(lambda m, args, out, i=i: recorded_out[i].append(flat(output_tensor(out))))
                for i, module in enumerate(outputs)]
    with hooks(handles):
        for batch in batches(calibration, batch_size):
            model(batch, use_cache=False)
    return [torch.cat(x) for x in recorded_in], [torch.cat(y) for y in recorded_out]


def group_activations(dense, groups: Sequence[Sequence[int]], calibration: torch.Tensor, batch_size: int
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For each group of consecutive layers of the dense model: the post-attention hidden state of its first layer
    (what the fused block's experts and router see) and the output of its last layer (what the block replaces)."""
    layers = dense.model.layers
    return capture(dense, calibration, batch_size, inputs=[layers[g[0]].post_attention_layernorm for g in groups],
                   outputs=[layers[g[-1]] for g in groups])
