"""Running a model over calibration batches while hooks record what the passes need."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
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
