"""How a model's weight matrices are stored, one format per matrix: what the roofline counts the bytes of.

A :class:`WeightPlan` holds a :class:`MatrixFormat` for each weight matrix of each block, by the matrix's name in the
source model (:data:`LEAVES`: ``q_proj`` ... ``down_proj``; every expert of a block alike, as the quantize step
treats them), and one for the LM head. It comes from one of three places:

- an exported graph (:func:`read_weight_plan`): the bits, block size and zero points of each ``MatMulNBits`` (and
  ``QMoE``) node, and whether a float zero-point residual follows it; what a measured artifact really stores;
- quantization options, before anything is quantized (:meth:`WeightPlan.from_quantization`): per matrix what the
  quantize step will store, by the options' own rule (:meth:`~d2mc.quantize.QuantizeOptions.bits_at` for mixed
  precision, :meth:`~d2mc.quantize.QuantizeOptions.method_for` for the method, the LM head's block size);
- one format for every matrix and one for the LM head (:meth:`WeightPlan.uniform`): a roofline asked for a
  precision and block size, and the fit models, which are quantized so.

A quantized matrix ``[out, in]`` stores its codes packed (``in * out * bits / 8`` bytes), one scale per block of
``block_size`` along its input in the graph's float type, and, with ``zero_points``, integer zero points packed per
row at the weight's width (``out * ceil(in / block_size * bits / 8)`` bytes), as ``MatMulNBits`` takes them. HQQ's
float zero points are stored rounded to integers with a ``residual``: a float matrix ``[in / block_size, out]`` that
a ``MatMul`` on the input's block sums (another ``MatMul``, one per input) multiplies and an ``Add`` adds to the
product (:meth:`d2mc.quantize.QuantizedLinear.zero_point_residual`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from d2mc.arch import BYTES_PER_ELEMENT, ModelArch

if TYPE_CHECKING:
    from d2mc.quantize import QuantizeOptions

QUANTIZED = ("int4", "int8")  # stored block-wise with scales (and optional zero points)
LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the lowering's initializer names: "blocks.{i}.[...]{leaf}.weight_q{bits}" (q, k and v packed as "qkv_proj"),
# "{weight}_zero_point_residual", QMoE's "blocks.{i}.moe.fc1_q{bits}" / "fc2" (gate and up rows, down rows)
_MATRIX = re.compile(r"(?:^|\.)blocks\.(\d+)\.(?:[^.]+\.)*?(qkv_proj|q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
                     r"down_proj)\.weight")
_QMOE = re.compile(r"(?:^|\.)blocks\.(\d+)\.moe\.(fc1|fc2)")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_QMOE_LEAVES = {"fc1": ("gate_proj", "up_proj"), "fc2": ("down_proj",)}


@dataclass(frozen=True)
class MatrixFormat:
    """How one weight matrix is stored: ``precision``; for int4/int8 the elements per scale along its input
    (``block_size``; 0: one scale per output channel), whether blocks carry integer zero points, and whether a float
    ``residual`` restores float zero points (see the module text)."""

    precision: str
    block_size: int = 0
    zero_points: bool = False
    residual: bool = False

    @property
    def quantized(self) -> bool:
        return self.precision in QUANTIZED

    @property
    def bits(self) -> int:
        return int(BYTES_PER_ELEMENT[self.precision] * 8)

    def stored_bytes(self, in_features: int, out_features: int, scale_bytes: float) -> float:
        """Bytes of one ``[out, in]`` matrix in this format: float values, or packed codes, scales of
        ``scale_bytes`` each and packed zero points (the residual apart: :meth:`residual_bytes`)."""
        if not self.quantized:
            return in_features * out_features * BYTES_PER_ELEMENT[self.precision]
        blocks = in_features // self.block_size if self.block_size else 1
        total = in_features * out_features * self.bits / 8 + out_features * blocks * scale_bytes
        if self.zero_points:
            total += out_features * math.ceil(blocks * self.bits / 8)
        return total

    def residual_bytes(self, in_features: int, out_features: int, scale_bytes: float) -> float:
        """Bytes of the float zero-point residual ``[in / block_size, out]`` (0 without one)."""
        return in_features // self.block_size * out_features * scale_bytes if self.residual else 0.0

    def describe(self) -> str:
        if not self.quantized:
            return self.precision
        extra = " zero points + residual" if self.residual else " zero points" if self.zero_points else ""
        return f"{self.precision} {f'b{self.block_size}' if self.block_size else 'per channel'}{extra}"


@dataclass(frozen=True)
class BlockWeights:
    """The formats of one block's matrices (each expert's gate, up and down alike)."""

    q_proj: MatrixFormat
    k_proj: MatrixFormat
    v_proj: MatrixFormat
    o_proj: MatrixFormat
    gate_proj: MatrixFormat
    up_proj: MatrixFormat
    down_proj: MatrixFormat

    @classmethod
    def alike(cls, fmt: MatrixFormat) -> BlockWeights:
        return cls(*[fmt] * len(LEAVES))

    def of(self, leaf: str) -> MatrixFormat:
        return getattr(self, leaf)

    def formats(self) -> tuple[MatrixFormat, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


def matrix_shapes(arch: ModelArch, index: int) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each matrix of block ``index`` of ``arch`` (one expert's, for the MLP)."""
    h, q_dim, kv_dim = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    inter = arch.expert_intermediate(arch.blocks[index])
    return {"q_proj": (h, q_dim), "k_proj": (h, kv_dim), "v_proj": (h, kv_dim), "o_proj": (q_dim, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


@dataclass(frozen=True)
class WeightPlan:
    """The format of every weight matrix of a model: per block (:class:`BlockWeights`) and the LM head's."""

    blocks: tuple[BlockWeights, ...]
    lm_head: MatrixFormat

    @classmethod
    def uniform(cls, num_blocks: int, weights: MatrixFormat, lm_head: MatrixFormat) -> WeightPlan:
        """Every block matrix in ``weights``, the LM head in ``lm_head``."""
        return cls(tuple(BlockWeights.alike(weights) for _ in range(num_blocks)), lm_head)

    @classmethod
    def from_quantization(cls, arch: ModelArch, options: QuantizeOptions, float_precision: str) -> WeightPlan:
        """What quantizing a model of ``arch`` as ``options`` say will store (before it is quantized): each matrix at
        the bits the options give it, HQQ's matrices with rounded zero points and their residual; a float LM head
        at ``float_precision``, the graph's float type."""
        blocks = []
        for index in range(arch.num_blocks):
            formats = []
            for leaf in LEAVES:
                bits = options.bits_at(index, leaf, arch.num_blocks)
                hqq = options.method_for(bits) == "hqq"
                formats.append(MatrixFormat(f"int{bits}", options.block_size_for(bits), zero_points=hqq,
                                            residual=hqq))
            blocks.append(BlockWeights(*formats))
        head_bits = options.lm_head_bits  # round-to-nearest, symmetric, whatever the method (d2mc.quantize.model)
        head = (MatrixFormat(f"int{head_bits}", options.lm_head_block_size(arch.hidden_size)) if head_bits
                else MatrixFormat(float_precision))
        return cls(tuple(blocks), head)

    def formats(self) -> list[MatrixFormat]:
        """The format of every block matrix, block by block (each expert's once)."""
        return [fmt for block in self.blocks for fmt in block.formats()]

    @property
    def precision(self) -> str:
        """The most common precision of the block matrices."""
        return Counter(f.precision for f in self.formats()).most_common(1)[0][0]

    @property
    def block_size(self) -> int:
        """The most common block size of the quantized block matrices (0: none is quantized)."""
        sizes = Counter(f.block_size for f in self.formats() if f.quantized)
        return sizes.most_common(1)[0][0] if sizes else 0

    @property
    def zero_points(self) -> bool:
        return any(f.zero_points for f in self.formats())

    @property
    def quantized(self) -> bool:
        return self.lm_head.quantized or any(f.quantized for f in self.formats())

    def summary(self) -> dict:
        """How many block matrices (each expert's once) are in each format, and the LM head's: for reports."""
        counts = Counter(f.describe() for f in self.formats())
        return {"matrices": dict(counts.most_common()), "lm_head": self.lm_head.describe()}

    def quantized_bytes(self, arch: ModelArch, scale_bytes: float = 4.0) -> float:
        """Bytes of the quantized matrices as stored (every expert's; codes, scales and zero points, residuals
        included; scales and residuals of ``scale_bytes`` each: 4 in an fp32 graph), the LM head once."""
        self.check(arch)
        matrices = [(arch.hidden_size, arch.vocab_size, self.lm_head, 1)]
        for index, (block, spec) in enumerate(zip(self.blocks, arch.blocks, strict=True)):
            for leaf, shape in matrix_shapes(arch, index).items():
                attention = leaf in ("q_proj", "k_proj", "v_proj", "o_proj")
                if spec.attention or not attention:
                    matrices.append((*shape, block.of(leaf), 1 if attention else spec.experts))
        return sum(copies * (fmt.stored_bytes(k, n, scale_bytes) + fmt.residual_bytes(k, n, scale_bytes))
                   for k, n, fmt, copies in matrices if fmt.quantized)

    def check(self, arch: ModelArch) -> None:
        """Refuse a plan for another model: another number of blocks, or a block size that does not divide a
        matrix's input."""
        if len(self.blocks) != arch.num_blocks:
            raise ValueError(f"the weight plan describes {len(self.blocks)} blocks, the model has {arch.num_blocks}")
        for index, block in enumerate(self.blocks):
            for leaf, (in_features, _) in matrix_shapes(arch, index).items():
                fmt = block.of(leaf)
                if fmt.quantized and fmt.block_size and in_features % fmt.block_size:
                    raise ValueError(f"block {index}'s {leaf}: block size {fmt.block_size} does not divide its input "
                                     f"size {in_features}")
        if self.lm_head.quantized and arch.hidden_size % self.lm_head.block_size:
            raise ValueError(f"the LM head's block size {self.lm_head.block_size} does not divide the hidden size "
                             f"{arch.hidden_size}")


def read_weight_plan(onnx_path: str | Path) -> WeightPlan | None:
    """How the graph at ``onnx_path`` (the onnxruntime flavour, as d2mc lowers it) stores each weight matrix: every
    ``com.microsoft::MatMulNBits`` node's bits, block size and zero points and whether a zero-point residual follows
    it, every ``com.microsoft::QMoE`` node's experts; the LM head is the node that writes ``logits``; matrices
    without such a node are in the graph's float type. None when no matrix is quantized. Reads the graph only, not
    its weights."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type in ("MatMulNBits", "QMoE")]
    if not nodes:
        return None
    names = {t.name for t in graph.initializer}
    logits = next((o for o in graph.output if o.name == "logits"), None)
    floating = "fp16" if logits is not None and logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "fp32"
    found: dict[tuple[int, str], MatrixFormat] = {}
    head = MatrixFormat(floating)
    for node in nodes:
        attributes = {a.name: a.i for a in node.attribute}
        if node.op_type == "QMoE":
            fmt = MatrixFormat(f"int{attributes.get('expert_weight_bits', 4)}", attributes["block_size"])
            matches = [(_QMOE.search(name), name) for name in node.input if name]
            targets = [(int(m[1]), leaf) for m, _ in matches if m for leaf in _QMOE_LEAVES[m[2]]]
        else:
            weight = node.input[1]
            stem = weight.rsplit("_q", 1)[0]  # "{weight}_q{bits}": the name of the weight it stands for
            fmt = MatrixFormat(f"int{attributes.get('bits', 4)}", attributes["block_size"],  # 4: the op's default
                               zero_points=len(node.input) > 3 and bool(node.input[3]),
                               residual=f"{stem}_zero_point_residual" in names)
            if "logits" in node.output or stem.startswith("lm_head"):
                head = fmt
                continue
            match = _MATRIX.search(weight)
            if not match:
                raise ValueError(f"the MatMulNBits node '{node.name}' reads '{weight}', not a block matrix d2mc "
                                 "lowers")
            leaves = ("q_proj", "k_proj", "v_proj") if match[2] == "qkv_proj" else (match[2],)
            targets = [(int(match[1]), leaf) for leaf in leaves]
        for key in targets:
            if found.setdefault(key, fmt) != fmt:
                raise ValueError(f"block {key[0]}'s {key[1]} is stored as {found[key].describe()} and as "
                                 f"{fmt.describe()}: one format per matrix of a block expected")
    indices = [int(m[1]) for name in names if (m := _BLOCK.match(name))] + [block for block, _ in found]
    blocks = tuple(BlockWeights(*(found.get((index, leaf), MatrixFormat(floating)) for leaf in LEAVES))
                   for index in range(max(indices) + 1))
    return WeightPlan(blocks, head)
