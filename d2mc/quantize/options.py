"""What to quantize and how: :class:`QuantizeOptions`, checked before any work starts."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

from d2mc.arch import dividing_block_sizes, lm_head_block_size
from d2mc.engine.plan import TENSORRT_DEQUANTIZE_SOURCE, TENSORRT_INT4_BLOCKS
from d2mc.errors import MissingDependencyError, OptionError
from d2mc.quantize.sensitivity import INT8_SHARE

PRECISIONS = ("int4", "int8")
FLOAT_PRECISIONS = ("fp32", "fp16")
METHODS = ("rtn", "hqq", "gptq")
LM_HEAD_PRECISIONS = ("int8", "int4", "float")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# int4 models with some matrices at int8 (by round-to-nearest, symmetric), chosen by layer: "mixed-layers" is
# onnxruntime-genai's preset of that name (llama.cpp's Q4_K_M rule): q/k/v and down at int8 in the first and last
# eighth of the layers and in every third layer between; "mixed-layers-ends" also every other matrix of the first
# and last eighth; "calibrated" the matrices whose int4 error costs the calibration loss most per byte
# (:mod:`d2mc.quantize.sensitivity`; measured on SmolLM2-135M: docs/quantization.md)
MIXED_PRECISIONS = ("none", "mixed-layers", "mixed-layers-ends", "calibrated")
# int4 (but for QMoE) moves the matrices whose int4 error costs the calibration loss most per byte to int8 (measured
# on SmolLM2-135M, rtn block 64, ONNX Runtime, 4,096 held-out tokens; for TensorRT, int8 per channel with the MoE
# blocks' experts left int4: docs/quantization.md)
DEFAULT_MIXED = "calibrated"
MIXED_LEAVES = ("q_proj", "k_proj", "v_proj", "down_proj")
# int4 in blocks of 64 where 64 divides every input the model quantizes, else 32 (:meth:`QuantizeOptions.fitted`):
# on SmolLM2-135M rtn at 64 decodes 1.08-1.11x the onnxruntime-genai builder's int4 (block 32) and at 32 0.93-0.97x,
# at 1.01-1.03x its perplexity; 64 for int8 (1.003x the fp32 perplexity on SmolLM2-135M, fewer scales to read)
DEFAULT_BLOCK_SIZE = {"int4": 64, "int8": 64}
# round-to-nearest for int4 and int8: with calibrated mixed precision it meets both targets on SmolLM2-135M (decode
# within 1.05x of the peer's int4, 1.10x the fp32 perplexity), where hqq's zero-point residual MatMuls cost 7-14% of
# decode speed (under the target) for 2-3% lower perplexity: docs/quantization.md. hqq (float zero points,
# MatMulNBits only) and gptq (GPTQModel, a manual install: GPTQMODEL_INSTALL) are options; TensorRT and QMoE take
# integer zero points only.
DEFAULT_METHOD = {"int4": "rtn", "int8": "rtn"}
DEFAULT_LM_HEAD = "int8"  # an int8 LM head shared with the embedding: docs/quantization.md
# weights that also go to TensorRT: its DequantizeLinear takes int4 in blocks of 64 or 128 and int8 only per channel,
# so int4 in blocks of 64 (128 does not divide SmolLM2's 576) and a float LM head, as TensorRT Edge-LLM's INT4 AWQ
# ships (an int4 head is --lm-head-precision int4)
TENSORRT_DEFAULT_BLOCK_SIZE = TENSORRT_INT4_BLOCKS[0]
TENSORRT_DEFAULT_LM_HEAD = "float"
# GPTQModel cannot be installed with its declared dependencies here (it requires torch>=2.14.1 and the CUDA
# stack); its per-layer GPTQ runs on the CPU build of torch with these few packages
GPTQMODEL_INSTALL = "--no-deps gptqmodel==7.7.0 logbar tokenicer device-smi defuser pypcre"


@dataclass(frozen=True)
class QuantizeOptions:
    """Weight-only block-wise quantization of every Linear of a model (attention projections, every expert's MLP,
    the LM head at its own precision); routers, norms and, unless shared with a quantized LM head, the embedding
    stay float.

    ``precision``: int4 or int8; ``quant_method``: rtn (round-to-nearest, no data), hqq (ONNX Runtime's HQQ: float
    zero points, no data, MatMulNBits only) or gptq (GPTQModel's GPTQ, layer by layer from calibration
    activations), default by precision (:data:`DEFAULT_METHOD`; rtn for TensorRT and QMoE); ``block_size``:
    elements per scale along each weight's input, default by precision (:data:`DEFAULT_BLOCK_SIZE`, :meth:`fitted`);
    ``lm_head_precision``: int8, int4 or float; ``mixed_precision``: which int4 matrices go to int8 instead
    (:data:`MIXED_PRECISIONS`, :meth:`bits_of`; default :data:`DEFAULT_MIXED` for int4, none for QMoE);
    ``accuracy_level``: ONNX Runtime ``MatMulNBits``'s (4: int8 activations, the fast path on CPU); ``calib_data``:
    calibration text (default the built-in calibration text), ``calib_sequences`` x ``calib_length`` tokens of it,
    read by gptq and by calibrated mixed precision; ``int8_matrices``: the names of the matrices calibrated mixed
    precision moved to int8 (chosen by :func:`~d2mc.quantize.quantize_model`, which records them here; None before),
    within ``int8_share`` of the bytes every int4 matrix at int8 would add.
    ``tensorrt``: the weights also lower to TensorRT (the
    tensorrt format, or a compile for a device with TensorRT), whose ``DequantizeLinear`` takes int4 only in blocks
    of 64 or 128 and int8 only per channel: int4 with the block size 64 and a float LM head by default, calibrated
    mixed precision's int8 matrices with one scale per output channel (:meth:`block_size_for`) and the experts of
    MoE blocks (one ``D2mcMoE`` plugin node each, one bit width) left int4; int8 weights and LM head, float zero
    points and mixed precision by layer refused. ``qmoe``: MoE blocks lower to
    ``com.microsoft::QMoE`` (``--moe-op contrib``), which takes one bit width and integer zero points.
    """

    precision: str = "int4"
    quant_method: str | None = None
    block_size: int | None = None
    lm_head_precision: str | None = None  # default DEFAULT_LM_HEAD (TENSORRT_DEFAULT_LM_HEAD for TensorRT)
    accuracy_level: int = 4
    mixed_precision: str | None = None  # default DEFAULT_MIXED for int4 in MatMulNBits, else none
    calib_data: str | None = None
    calib_sequences: int = 16
    calib_length: int = 256
    seed: int = 0
    int8_share: float = INT8_SHARE
    int8_matrices: tuple[str, ...] | None = None
    tensorrt: bool = False
    qmoe: bool = False
    # the block size was not given: 64 becomes 32 for a model whose inputs 64 does not divide (fitted)
    block_size_default: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise OptionError(f"{{precision}} {self.precision} is not a quantized precision: choose "
                              f"{' or '.join(PRECISIONS)}")
        integer_only = self.tensorrt or self.qmoe  # takes integer zero points and one bit width only
        if self.quant_method is None:
            object.__setattr__(self, "quant_method", "rtn" if integer_only else DEFAULT_METHOD[self.precision])
        if self.block_size is None:
            object.__setattr__(self, "block_size", TENSORRT_DEFAULT_BLOCK_SIZE if self.tensorrt and
                               self.precision == "int4" else DEFAULT_BLOCK_SIZE[self.precision])
            object.__setattr__(self, "block_size_default", not self.tensorrt)
        if self.mixed_precision is None:
            object.__setattr__(self, "mixed_precision", DEFAULT_MIXED if self.precision == "int4" and not self.qmoe
                               else "none")
        if self.lm_head_precision is None:
            object.__setattr__(self, "lm_head_precision", TENSORRT_DEFAULT_LM_HEAD if self.tensorrt
                               else DEFAULT_LM_HEAD)
        if self.quant_method not in METHODS:
            raise OptionError(f"unknown {{quant_method}} '{self.quant_method}': choose one of {', '.join(METHODS)}")
        if isinstance(self.block_size, bool) or self.block_size not in (32, 64, 128):
            raise OptionError(f"{{block_size}} must be 32, 64 or 128, not {self.block_size}")
        if self.lm_head_precision not in LM_HEAD_PRECISIONS:
            raise OptionError(f"{{lm_head_precision}} must be one of {', '.join(LM_HEAD_PRECISIONS)}, not "
                              f"{self.lm_head_precision}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise OptionError(f"{{mixed_precision}} must be one of {', '.join(MIXED_PRECISIONS)}, not "
                              f"{self.mixed_precision}")
        if self.mixed and self.precision != "int4":
            raise OptionError(f"{{mixed_precision}} {self.mixed_precision} moves int4 matrices to int8: it needs "
                              f"{{precision}} int4, not {self.precision}")
        if not 0 < self.int8_share <= 1:
            raise OptionError(f"{{int8_share}} must be above 0 and at most 1, not {self.int8_share}")
        if self.int8_matrices is not None:
            if self.mixed_precision != "calibrated":
                raise OptionError(f"{{int8_matrices}} are what {{mixed_precision}} calibrated chose, not "
                                  f"{self.mixed_precision}")
            object.__setattr__(self, "int8_matrices", tuple(self.int8_matrices))
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise OptionError(f"{{accuracy_level}} must be one of 0-4, not {self.accuracy_level}")
        if self.calib_data is not None and not self.calibrated:
            raise OptionError(f"{{calib_data}} is the calibration text of GPTQ and calibrated mixed precision: "
                              f"{self.quant_method} with {{mixed_precision}} {self.mixed_precision} reads no data (add "
                              "{quant_method} gptq or {mixed_precision} calibrated, or drop it)")
        if self.calib_sequences < 1 or self.calib_length < 2:
            raise OptionError("{calib_sequences} must be at least 1 and {calib_length} at least 2")
        if self.tensorrt:
            self._check_tensorrt()
        if self.qmoe:
            self._check_qmoe()

    def _check_qmoe(self) -> None:
        """Refuse weights ``com.microsoft::QMoE`` cannot take: float zero points, or more than one bit width."""
        if self.float_zero_points:
            raise OptionError("{quant_method} hqq cannot go to {moe_op} contrib: com.microsoft::QMoE takes only "
                              "integer zero points; use {moe_op} dispatch, or {quant_method} rtn or gptq")
        if self.mixed:
            raise OptionError(f"{{mixed_precision}} {self.mixed_precision} cannot go to {{moe_op}} contrib: "
                              "com.microsoft::QMoE takes one bit width for all its experts' matrices; use {moe_op} "
                              "dispatch, or {mixed_precision} none")

    def _check_tensorrt(self) -> None:
        """Refuse weights TensorRT's DequantizeLinear cannot take (the plugin's experts alone would take them)."""
        int8 = ("TensorRT dequantizes int8 weights with one scale per channel, and the quantize step scales blocks "
                f"({TENSORRT_DEQUANTIZE_SOURCE})")
        if self.precision == "int8":
            raise OptionError(f"{{precision}} int8 cannot go to TensorRT: {int8}; choose int4 (or fp16)")
        if self.mixed and self.mixed_precision != "calibrated":
            raise OptionError(f"{{mixed_precision}} {self.mixed_precision} cannot go to TensorRT: its rule by layer "
                              "would put an MoE block's experts at int8, and the D2mcMoE plugin takes one bit "
                              "width and block size for all of them; choose {mixed_precision} calibrated (which "
                              "keeps them int4) or none")
        if self.float_zero_points:
            raise OptionError("{quant_method} hqq cannot go to TensorRT: HQQ's zero points are floats and ONNX "
                              "DequantizeLinear takes only integer ones; use {quant_method} rtn or gptq, or the "
                              "onnxruntime format")
        if self.block_size not in TENSORRT_INT4_BLOCKS:
            raise OptionError(f"{{block_size}} {self.block_size} cannot go to TensorRT, which takes int4 weights in "
                              f"blocks of {' or '.join(map(str, TENSORRT_INT4_BLOCKS))} ({TENSORRT_DEQUANTIZE_SOURCE})")
        if self.lm_head_precision == "int8":
            raise OptionError(f"{{lm_head_precision}} int8 cannot go to TensorRT: {int8}; choose int4 or float")

    @property
    def bits(self) -> int:
        return int(self.precision.removeprefix("int"))

    @property
    def mixed(self) -> bool:
        return self.mixed_precision != "none"

    def bits_of(self, name: str, layers: int) -> int:
        """The bits of the block Linear ``name`` (``model.layers.{i}...``) in a model of ``layers`` blocks."""
        if self.mixed_precision == "calibrated" and self.int8_matrices is None:
            raise ValueError("calibrated mixed precision has not chosen its int8 matrices yet: take the options of "
                             "the QuantizedModel (or the artifact's quantization record)")
        return self.bits_at(*block_leaf(name), layers)

    def bits_at(self, index: int, leaf: str, layers: int) -> int:
        """The bits of the matrix ``leaf`` (``q_proj``, ..., ``down_proj``; every expert's alike) of block ``index``
        in a model of ``layers`` blocks: the options' own, or 8 where mixed precision moves it to int8. Before
        calibrated mixed precision has chosen its matrices (a prediction before quantizing), the mixed-layers-ends
        rule stands in for the choice: on SmolLM2-135M the choice adds 3% more bytes (docs/quantization.md)."""
        if not self.mixed:
            return self.bits
        if self.mixed_precision == "calibrated" and self.int8_matrices is not None:
            return 8 if (index, leaf) in map(block_leaf, self.int8_matrices) else self.bits
        ends = index < layers / 8 or index >= 7 * layers / 8
        if (self.mixed_precision in ("mixed-layers-ends", "calibrated") and ends) or (leaf in MIXED_LEAVES and (
                ends or (index - round(layers / 8)) % 3 == 2)):
            return 8
        return self.bits

    def block_size_for(self, bits: int) -> int:
        """Elements per scale of the matrices at ``bits``: the options' block size, or 0 (one scale per output
        channel) for the int8 matrices of mixed precision when the weights also go to TensorRT, which dequantizes
        int8 weights only per channel."""
        return 0 if self.tensorrt and bits == 8 else self.block_size

    def method_for(self, bits: int) -> str:
        """The method that quantizes a matrix at ``bits``: the options' own, except that ``hqq`` leaves the matrices
        mixed precision moved to int8 to round-to-nearest (symmetric int8 is within 1.01x of fp32 already, and
        keeps MatMulNBits' fast path)."""
        return "rtn" if self.quant_method == "hqq" and bits != self.bits else self.quant_method

    @property
    def lm_head_bits(self) -> int | None:
        """The LM head's bits, None when it stays float."""
        return None if self.lm_head_precision == "float" else int(self.lm_head_precision.removeprefix("int"))

    def lm_head_block_size(self, hidden_size: int) -> int:
        """The LM head's block size (:func:`d2mc.arch.lm_head_block_size`: an int8 head in blocks of 64)."""
        return lm_head_block_size(self.lm_head_precision, self.block_size, hidden_size)

    @property
    def calibrated(self) -> bool:
        """The quantization reads calibration text (gptq, or calibrated mixed precision)."""
        return self.quant_method == "gptq" or self.mixed_precision == "calibrated"

    @property
    def float_zero_points(self) -> bool:
        """The weights carry float zero points (HQQ): only MatMulNBits holds them."""
        return self.quant_method == "hqq"


    def check_installed(self) -> None:
        """Refuse in one line a method whose library is missing, saying what to install."""
        if self.quant_method == "gptq" and importlib.util.find_spec("gptqmodel") is None:
            raise MissingDependencyError("gptqmodel", "GPTQ quantization", GPTQMODEL_INSTALL)

    def fitted(self, arch) -> QuantizeOptions:
        """These options for a model of ``arch``: a default block size that does not divide every input the model
        quantizes becomes 32."""
        if self.block_size_default and self.block_size != 32 and any(size % self.block_size
                                                                     for _, size in _inputs(arch)):
            return dataclasses.replace(self, block_size=32)
        return self

    def check_divides(self, arch) -> None:
        """Refuse a block size that does not divide the input size of a weight of ``arch`` it would quantize (a
        default one is :meth:`fitted` first)."""
        block_size = self.fitted(arch).block_size
        inputs = _inputs(arch)
        for what, size in inputs:
            if size % block_size:
                fits = dividing_block_sizes(n for _, n in inputs)
                hint = f"use {{block_size}} {' or '.join(fits)}" if fits else "no block size of 32 or more divides them all"
                raise OptionError(f"{{block_size}} {block_size} does not divide {what} ({size}) of the model: "
                                  f"{hint}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict) -> QuantizeOptions:
        """The options a record (:meth:`to_dict`, or an artifact's ``quantization``) holds; other keys are ignored.
        A record from before mixed precision existed quantized every matrix at its precision."""
        data = {"mixed_precision": "none", **data}
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.init and f.name in data})


def _inputs(arch) -> list[tuple[str, int]]:
    """The input sizes of the matrices a model of ``arch`` quantizes, each with what it is."""
    inputs = [("the hidden size", arch.hidden_size), ("the attention output", arch.num_heads * arch.head_dim)]
    return inputs + [("an MLP's intermediate size", n) for n in sorted({arch.expert_intermediate(b) for b in arch.blocks})]


def block_leaf(name: str) -> tuple[int, str]:
    """The block index and the matrix (``q_proj``, ..., ``down_proj``) of the block Linear ``name``
    (``model.layers.{i}...{leaf}``)."""
    return int(name.split(".")[2]), name.rpartition(".")[2]


def check_float_precision(precision: str, **given) -> None:
    """Refuse quantization options (``given``: option key -> value, None when not given) with a float ``precision``:
    they would be silently ignored."""
    keys = [key for key, value in given.items() if value is not None]
    if keys:
        names = " and ".join(f"{{{key}}}" for key in keys)
        raise OptionError(f"{names} quantize weights: they need {{precision}} int4 or int8, not {precision}")
