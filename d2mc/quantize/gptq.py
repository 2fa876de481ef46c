"""GPTQ through GPTQModel's per-layer quantizer (``gptqmodel.quantization.gptq.GPTQ``), one weight matrix at a time.

GPTQModel's whole-model API knows only its own architectures (a converted d2mc model is not one of them), so d2mc
drives the layer order itself (:mod:`d2mc.quantize.model`) and hands each matrix to GPTQModel's ``GPTQ`` class
with the inputs that matrix saw: GPTQ's Hessian ``X^T X``, its error-compensating column sweep, its grid, damping
and fallbacks are GPTQModel's. Linears that read the same input (q, k and v; an MLP's gate and up) are one matrix
of stacked rows here: GPTQ treats rows independently given the Hessian, so this is the same result for one sweep.

GPTQ's symmetric grid is ``w = scale * (code - 2**(bits-1))`` with codes in ``[0, 2**bits)``: exactly
:class:`~d2mc.quantize.linear.QuantizedLinear`'s symmetric form.
"""

from __future__ import annotations

import contextlib
import io
import os

import torch
from torch import nn

from d2mc.quantize.linear import QuantizedLinear


@contextlib.contextmanager
def _quiet():
    """GPTQModel prints a banner on import and logs per matrix: keep d2mc's own output readable."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


@contextlib.contextmanager
def _single_thread():
    """GPTQ's column sweep is many small products: one thread ran it 3-10x faster than two here (no OpenMP
    hand-offs; measured on SmolLM2-sized matrices on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _gptqmodel():
    # GPTQModel sizes its worker pools from this; on a 2-core machine its default asks for more than there are
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    with _quiet():
        from gptqmodel import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ
    return GPTQ, QuantizeConfig


class GptqMatrix:
    """One weight matrix ``[out, in]`` under GPTQ: feed it the inputs it reads (:meth:`add`), then :meth:`quantize`."""

    def __init__(self, weight: torch.Tensor, bits: int, block_size: int):
        gptq_class, config_class = _gptqmodel()
        self.bits, self.block_size = bits, block_size
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.linear.weight.data = weight.detach().float().clone()
        config = config_class(bits=bits, group_size=block_size, sym=True, desc_act=False, offload_to_disk=False)
        with _quiet():
            self.task = gptq_class(self.linear, config)
            self.task.quantizer.configure(perchannel=True)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate the Hessian over ``inputs`` (``[..., in]``: the rows this matrix multiplies)."""
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if rows.shape[0]:
            self.task.add_batch(rows, None)
            self.tokens += rows.shape[0]

    def quantize(self) -> QuantizedLinear:
        """GPTQ's codes and scales for the rows seen so far (call once, after at least one :meth:`add`)."""
        with _quiet(), _single_thread():
            weight, scales, zero, *_ = self.task.quantize()
        self.task.free()
        half = 2 ** (self.bits - 1)
        if not torch.all(zero == half):
            raise RuntimeError(f"GPTQModel returned zero points other than {half} for a symmetric grid")
        step = scales.float().repeat_interleave(self.block_size, 1)
        codes = (weight.float() / step).round() + half
        return QuantizedLinear(self.bits, self.block_size, codes.clamp(0, 2 ** self.bits - 1).to(torch.uint8),
                               scales.float().contiguous())
