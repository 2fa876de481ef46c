"""Block-wise quantized Linear weights: one typed form that every lowering reads.

A quantization method (GPTQ through GPTQModel, HQQ through ONNX Runtime's quantizer, or plain round-to-nearest)
turns a PyTorch Linear weight ``[out, in]`` into integer codes, per-block scales and, when asymmetric, per-block zero
points, blocks running along the input axis. :class:`QuantizedLinear` holds exactly that, in the convention of ONNX
Runtime's ``com.microsoft::MatMulNBits``: unsigned codes in ``[0, 2**bits)`` and ``w = (code - zero_point) * scale``,
with the zero point ``2**(bits - 1)`` when none is stored (symmetric). Zero points are integers (uint8) or, from
HQQ, floats: the grid's offset is then any fraction of a step. An activation-aware method may also leave a
per-input-channel ``pre_scale`` that multiplies the layer's input (AWQ's pre-quant scale when it could not be
folded into the previous operator).

Lowerings take their tensors from it:
- :meth:`QuantizedLinear.matmul_nbits`: ``B``, ``scales`` and ``zero_points`` inputs of ``MatMulNBits`` (and, stacked
  per expert, of ``com.microsoft::QMoE`` with ``weights_prepacked=0``).
- :meth:`QuantizedLinear.signed_codes`: the signed codes ``[out, in]`` of a symmetric weight (``w = code * scale``),
  stored by :func:`pack_signed` as ONNX's and TensorRT's INT4/INT8 tensors: transposed for a ``DequantizeLinear``
  (opset 21) feeding a ``MatMul`` (the tensorrt flavour's dense weights), packed per expert for the ``D2mcMoE``
  plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from d2mc.errors import OptionError

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class QuantizedLinear:
    """A Linear weight ``[out, in]`` quantized in blocks of ``block_size`` along ``in``.

    ``codes``: uint8 ``[out, in]`` in ``[0, 2**bits)``; ``scales``: float32 ``[out, in // block_size]``;
    ``zero_points``: like ``scales``, uint8 or float32 (a float offset of the grid, as HQQ leaves it), or None
    (symmetric: ``2**(bits - 1)``); ``pre_scale``: float32 ``[in]`` multiplying the input, or None.
    """

    bits: int
    block_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None = None
    pre_scale: torch.Tensor | None = None

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {self.bits}")
        out_features, in_features = self.codes.shape
        if in_features % self.block_size:
            raise ValueError(f"block size {self.block_size} does not divide the input size {in_features}")
        blocks = (out_features, in_features // self.block_size)
        if tuple(self.scales.shape) != blocks:
            raise ValueError(f"scales must be {list(blocks)}, not {list(self.scales.shape)}")
        if self.zero_points is not None and tuple(self.zero_points.shape) != blocks:
            raise ValueError(f"zero points must be {list(blocks)}, not {list(self.zero_points.shape)}")
        if self.zero_points is not None and self.zero_points.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"zero points must be uint8 or float32, not {self.zero_points.dtype}")
        if self.codes.dtype != torch.uint8 or int(self.codes.max()) >= 2 ** self.bits:
            raise ValueError(f"codes must be uint8 in [0, {2 ** self.bits})")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def float_zero_points(self) -> bool:
        return self.zero_points is not None and self.zero_points.is_floating_point()

    def _zero_points(self) -> torch.Tensor:
        if self.zero_points is None:
            return torch.full(self.scales.shape, 2 ** (self.bits - 1), dtype=torch.uint8)
        return self.zero_points

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[out, in]`` these codes stand for (``pre_scale`` folded into its columns)."""
        out_features, in_features = self.shape
        blocks = self.codes.view(out_features, -1, self.block_size).float()
        weight = ((blocks - self._zero_points().float()[..., None]) * self.scales.float()[..., None]).view(
            out_features, in_features)
        return weight * self.pre_scale.float()[None, :] if self.pre_scale is not None else weight

    def nbytes(self) -> int:
        """Bytes a deployment reads: packed codes, scales (float32), zero points (packed; float ones also as their
        float32 residual) and the pre-scale."""
        out_features, in_features = self.shape
        blocks = self.scales.numel()
        total = out_features * in_features * self.bits // 8 + blocks * 4
        if self.zero_points is not None:
            total += out_features * -(-self.scales.shape[1] * self.bits // 8)
        if self.float_zero_points:
            total += blocks * 4
        return total + (in_features * 4 if self.pre_scale is not None else 0)

    def matmul_nbits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(B [N, k_blocks, block_size * bits / 8] uint8, scales [N, k_blocks] float32, zero_points)`` for
        ``com.microsoft::MatMulNBits`` with ``K = in``, ``N = out``; zero points packed ``[N, ceil(k_blocks * bits /
        8)]`` uint8, or None when symmetric. Float zero points go in rounded to the nearest code (add
        :meth:`zero_point_residual`'s product). Apply ``pre_scale`` to the input before the node."""
        out_features, in_features = self.shape
        blocks = in_features // self.block_size
        codes = self.codes.numpy()
        packed = _pack_rows(codes, self.bits).reshape(out_features, blocks, self.block_size * self.bits // 8)
        zero_points = None if self.zero_points is None else _pack_rows(self._integer_zero_points().numpy(), self.bits)
        return np.ascontiguousarray(packed), self.scales.float().numpy().copy(), zero_points

    def zero_point_residual(self) -> np.ndarray:
        """For float zero points: ``R [k_blocks, N]`` float32 with ``x @ W.T = MatMulNBits(x) + block_sums(x) @ R``,
        ``block_sums(x) [..., k_blocks]`` the sums of ``x`` over each block (``R = (rounded - float) * scale``).

        ONNX Runtime's MatMulNBits also takes the float zero points themselves, but its CPU kernels then dequantize
        the whole weight on every call (tens of times slower per decode matmul:
        ``benchmarks/zero_points.py``): rounded zero points keep its int8-activation kernels."""
        if not self.float_zero_points:
            raise ValueError("only float zero points leave a residual")
        residual = (self._integer_zero_points().float() - self.zero_points) * self.scales.float()
        return np.ascontiguousarray(residual.T.numpy(), dtype=np.float32)

    def _integer_zero_points(self) -> torch.Tensor:
        if not self.float_zero_points:
            return self.zero_points
        return self.zero_points.round().clamp(0, 2 ** self.bits - 1).to(torch.uint8)

    def in_blocks(self, block_size: int) -> QuantizedLinear:
        """The same weight in blocks of ``block_size``, which divides this one's: each scale (and zero point)
        repeated over the smaller blocks it covers. ``MatMulNBits`` takes blocks of 16 to 256 (a power of two), so
        a weight with one scale per output channel goes to it in such blocks."""
        if self.block_size % block_size:
            raise ValueError(f"blocks of {block_size} do not divide blocks of {self.block_size}")
        repeat = self.block_size // block_size
        zero_points = None if self.zero_points is None else self.zero_points.repeat_interleave(repeat, 1)
        return QuantizedLinear(self.bits, block_size, self.codes, self.scales.repeat_interleave(repeat, 1), zero_points,
                               self.pre_scale)

    def signed_codes(self) -> np.ndarray:
        """The codes of a symmetric weight as signed int8 values ``[out, in]``: ``w = code * scale``."""
        if not self.symmetric:
            raise ValueError("signed codes stand for a symmetric weight; this one has zero points")
        return (self.codes.numpy().astype(np.int16) - 2 ** (self.bits - 1)).astype(np.int8)



def pack_signed(signed: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes (int8 holding int4/int8 values) as ONNX and TensorRT store INT4/INT8 tensors: int8 as they are;
    int4 two per byte along the last axis (of even length), the even column in the low nibble. Returns int8."""
    if bits == 8:
        return np.ascontiguousarray(signed, dtype=np.int8)
    nibbles = signed.astype(np.uint8) & 0x0F  # two's complement: -1 -> 0xF
    return np.ascontiguousarray(nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).view(np.int8)


def concat_rows(parts: list[QuantizedLinear]) -> QuantizedLinear:
    """One QuantizedLinear whose output rows are those of ``parts`` in order (a packed projection such as q, k and v
    read from one input; or an MoE op's gate and up rows): the same bits and block size, and no pre-scale."""
    first = parts[0]
    if any(p.bits != first.bits or p.block_size != first.block_size or p.pre_scale is not None for p in parts) or (
            len({(p.symmetric, p.float_zero_points) for p in parts}) > 1):
        raise ValueError("only parts with the same bits, block size and kind of zero points and no pre-scale "
                         "concatenate")
    zero_points = None if first.symmetric else torch.cat([p.zero_points for p in parts])
    return QuantizedLinear(first.bits, first.block_size, torch.cat([p.codes for p in parts]),
                           torch.cat([p.scales for p in parts]), zero_points)


def scaled(q: QuantizedLinear, factor: float) -> QuantizedLinear:
    """``q`` standing for its weight times ``factor`` (its scales multiplied; the codes unchanged)."""
    return QuantizedLinear(q.bits, q.block_size, q.codes, q.scales * factor, q.zero_points, q.pre_scale)


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack each row of uint8 ``values`` (in ``[0, 2**bits)``) into bytes, low bits first; an odd row is padded
    with the default zero point ``2**(bits-1)``, as ONNX Runtime's quantizer pads it."""
    if bits == 8:
        return np.ascontiguousarray(values, dtype=np.uint8)
    rows, cols = values.shape
    if cols % 2:
        values = np.concatenate([values, np.full((rows, 1), 2 ** (bits - 1), np.uint8)], axis=1)
    return np.ascontiguousarray((values[:, 0::2] & 0x0F) | ((values[:, 1::2] & 0x0F) << 4), dtype=np.uint8)


def quantize_rtn(weight: torch.Tensor, bits: int = 4, block_size: int = 32, symmetric: bool = True) -> QuantizedLinear:
    """Round-to-nearest block-wise quantization of a Linear weight ``[out, in]`` (no calibration data).

    Symmetric: ``scale = amax / -2**(bits-1)`` with the sign of the block's largest magnitude, so that value maps
    to code 0 exactly and the full range ``[-2**(bits-1), 2**(bits-1) - 1]`` is used (ONNX Runtime's convention).
    Asymmetric: the block's range widened to include 0, ``2**bits - 1`` steps, an integer zero point.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, not {bits}")
    out_features, in_features = weight.shape
    if (block_size not in BLOCK_SIZES and block_size != in_features) or in_features % block_size:
        raise OptionError(f"{{block_size}} {block_size} does not divide the input size {in_features} of a weight: "
                          f"choose one of {', '.join(map(str, BLOCK_SIZES))} that does")
    blocks = weight.detach().float().reshape(out_features, in_features // block_size, block_size)
    levels = 2 ** bits
    if symmetric:
        high = blocks.amax(-1)
        low = blocks.amin(-1)
        extreme = torch.where(high.abs() > low.abs(), high, low)
        scales = extreme / -(levels // 2)
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        codes = (blocks / safe[..., None]).round() + levels // 2
        zero_points = None
    else:
        low = blocks.amin(-1).clamp(max=0)
        high = blocks.amax(-1).clamp(min=0)
        scales = (high - low) / (levels - 1)
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        zero = (-low / safe).round().clamp(0, levels - 1)
        codes = (blocks / safe[..., None]).round() + zero[..., None]
        zero_points = zero.to(torch.uint8)
    codes = codes.clamp(0, levels - 1).to(torch.uint8).reshape(out_features, in_features)
    return QuantizedLinear(bits, block_size, codes, scales.float(), zero_points)
