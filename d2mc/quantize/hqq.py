"""HQQ (half-quadratic quantization) through ONNX Runtime's MatMulNBits quantizer, one weight matrix at a time.

ONNX Runtime's ``HQQWeightOnlyQuantizer`` quantizes an ONNX graph's MatMuls, but its solver works on torch tensors
(``quantize_internal``, the reference implementation's min/max start and proximal steps on the zero points): d2mc
hands it each Linear weight of the PyTorch model, so the one quantization both keeps d2mc's layout and needs no
package beyond ONNX Runtime and torch. No calibration data: the solver minimises each block's weight error.

HQQ's grid is ``w = (code - zero) * scale`` with codes in ``[0, 2**bits)`` and a *float* zero point per block:
:class:`~d2mc.quantize.linear.QuantizedLinear` with float32 zero points. ONNX ``DequantizeLinear`` takes only
integer zero points, so these weights lower to ONNX Runtime's MatMulNBits only.
"""

from __future__ import annotations

import torch

from d2mc.quantize.linear import QuantizedLinear


def quantize_hqq(weight: torch.Tensor, bits: int = 4, block_size: int = 64) -> QuantizedLinear:
    """HQQ block-wise quantization of a Linear weight ``[out, in]`` (``block_size`` dividing ``in``)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantizer,
    )

    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    with torch.no_grad():
        codes, scales, zero = quantizer.quantize_internal(weight.detach().float(), bits=bits, group_size=block_size)
    return QuantizedLinear(bits, block_size, codes.to(torch.uint8).contiguous(), scales.float().contiguous(),
                           zero.float().contiguous())
