"""Weight-only block-wise quantization (int4/int8) of a PyTorch model, read by both lowerings.

:class:`QuantizedLinear` (:mod:`d2mc.quantize.linear`) is the typed form of one quantized weight and the tensors
each lowering emits from it; :func:`quantize_model` (:mod:`d2mc.quantize.model`) quantizes every Linear of a dense
or converted model as :class:`QuantizeOptions` say (:mod:`d2mc.quantize.options`), by round-to-nearest, by ONNX
Runtime's HQQ (:mod:`d2mc.quantize.hqq`, float zero points) or by GPTQModel's GPTQ (:mod:`d2mc.quantize.gptq`).
"""

from d2mc.quantize.hqq import quantize_hqq
from d2mc.quantize.linear import QuantizedLinear, concat_rows, pack_signed, quantize_rtn, scaled
from d2mc.quantize.model import QuantizedModel, fold_expert_norms, quantize_model
from d2mc.quantize.options import (
    FLOAT_PRECISIONS,
    GPTQMODEL_INSTALL,
    PRECISIONS,
    QuantizeOptions,
    check_float_precision,
)

__all__ = ["FLOAT_PRECISIONS", "GPTQMODEL_INSTALL", "PRECISIONS", "QuantizeOptions", "QuantizedLinear",
           "QuantizedModel", "check_float_precision", "concat_rows", "fold_expert_norms", "pack_signed", "quantize_model",
           "quantize_hqq", "quantize_rtn", "scaled"]
