"""The ``onnxruntime`` target: export to an ONNX artifact that ONNX Runtime and onnxruntime-genai run.

An artifact directory (:mod:`d2mc.artifact`) holds ``model.onnx`` + ``model.onnx.data``, ``genai_config.json``,
the tokenizer files, ``config.json`` and ``d2mc_artifact.json`` (what was exported, with the verification figure).

The same export writes the TensorRT flavour (``flavour="tensorrt"``, ``d2mc export --format tensorrt``): standard
ops plus ``D2mcMoE`` plugin nodes, for ``d2mc build``; that artifact has no ``genai_config.json`` (onnxruntime-genai
cannot run the plugin) and is verified with its plugin nodes expanded into standard ops.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from d2mc.arch import ModelArch
from d2mc.artifact import MODEL_DIR, artifact_info, find_onnx, write_artifact_info
from d2mc.errors import OptionError, UserError
from d2mc.lowering import LoweringOptions, lower_to_onnx
from d2mc.outputs import atomic_output_dir


@dataclass
class ExportResult:
    path: Path
    seconds: float
    verify: dict | None


def export_onnx(model, tokenizer, out: str | Path, *, precision: str = "fp32", moe_op: str = "dispatch",
                flavour: str = "onnxruntime", verify: bool = True, polygraphy: bool = False,
                overwrite: bool = False, source: str = "", quantized=None, release_model: bool = False
                ) -> ExportResult:
    """Lower ``model`` into the artifact directory ``out`` (written atomically) and, by default, verify it.

    ``precision`` is the float format of the graph (fp32 | fp16). With ``quantized`` (a
    :class:`~d2mc.quantize.QuantizedModel` of ``model``), ``quantized.model`` is what is lowered, from its codes,
    and verified; the artifact records the quantization, and its logit difference to ``model`` itself. ``moe_op``:
    the onnxruntime flavour's MoE form, dispatch through standard ops or the contrib op (``MoE``, ``QMoE`` when
    quantized: docs/quantization.md).

    Verification compares PyTorch and ONNX Runtime logits (:func:`d2mc.verify.verify_onnx`) and refuses to write
    the artifact when they differ by more than :data:`d2mc.verify.TOLERANCE` for the precision;
    ``polygraphy`` also runs the comparison through Polygraphy's Comparator (recorded, and enforced the same way).

    ``release_model`` frees ``model``'s weights (:func:`d2mc.placement.release_weights`; the model cannot run
    afterwards) once the PyTorch side of the verification is recorded, before ONNX Runtime loads the artifact, so
    that the weights are never in memory twice; a quantized or Polygraphy export keeps the model, which its further
    comparisons run.
    """
    from d2mc.placement import release_weights
    from d2mc.polygraphy_compare import verify_with_polygraphy
    from d2mc.verify import QUANTIZED_FP32, record_reference, replay_reference, source_difference

    accuracy_level = quantized.options.accuracy_level if quantized else 0
    options = LoweringOptions(precision=precision, moe_op=moe_op, flavour=flavour, accuracy_level=accuracy_level)
    lowered = quantized.model if quantized else model
    judged = QUANTIZED_FP32 if quantized and precision == "fp32" else precision
    start = time.perf_counter()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        onnx_path = lower_to_onnx(lowered, tmp, options, quantized=quantized)
        if flavour == "onnxruntime":
            write_genai_config(lowered, tmp, precision)
        lowered.config.save_pretrained(tmp)  # lets d2mc profile read the architecture of the artifact
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        seconds = time.perf_counter() - start
        result = None
        if verify:
            reference = record_reference(lowered, onnx_path, judged)
            if release_model and not quantized and not polygraphy:
                release_weights(model)
            result = replay_reference(reference, onnx_path).to_dict()
            del reference
            if not result["passed"]:
                raise UserError(f"verification failed: max |logit difference| {result['max_abs_diff']:.3g} exceeds "
                                f"{result['tolerance']:g} ({judged}); the artifact was not written")
            if quantized and flavour == "onnxruntime":  # the graph as it ships (int8 activations at level 4)
                result["shipped"] = source_difference(lowered, onnx_path)
            if quantized:
                result["unquantized"] = source_difference(model, onnx_path)
        if polygraphy:
            result = {**(result or {}), "polygraphy": verify_with_polygraphy(lowered, onnx_path, judged)}
            if not result["polygraphy"]["passed"]:
                raise UserError(f"Polygraphy comparison failed: max |logit difference| "
                                f"{result['polygraphy']['max_abs_diff']:.3g} exceeds "
                                f"{result['polygraphy']['tolerance']:.3g}; the artifact was not written")
        arch = ModelArch.from_config(model.config)
        write_artifact_info(tmp, {
            "source": source, "flavour": flavour, "precision": quantized.precision if quantized else precision,
            "activations": precision, "moe_op": moe_op if flavour == "onnxruntime" else "plugin",
            "quantization": quantized.to_dict() if quantized else None,
            "model_type": model.config.model_type, "attention_blocks": len(arch.attention_blocks),
            "blocks": arch.num_blocks, "export_seconds": round(seconds, 2), "verify": result})
    return ExportResult(Path(out), seconds, result)


def verify(artifact: str | Path, model: str | None = None, prefill: int = 16, positions: int | None = None,
           placement=None) -> dict:
    """The artifact's onnxruntime-flavoured ONNX against its PyTorch source (``model``, else the converted model a
    compile output holds, else the source its export recorded) on the same tokens (see :func:`d2mc.verify.verify_onnx`
    for ``positions``). The source runs where ``placement`` says (default: the CPU in fp32), in a dtype at least as
    precise as the artifact's activations."""
    from d2mc.loading import load_model
    from d2mc.verify import POSITION_SAMPLES, record_reference, replay_reference

    onnx_path = find_onnx(artifact, "onnxruntime")
    info = artifact_info(onnx_path.parent)
    compiled = Path(artifact) / MODEL_DIR
    source = model or (str(compiled) if compiled.is_dir() else info.get("source"))
    if not source:
        raise OptionError(f"'{artifact}' does not name its source model: pass {{model}}")
    beside = Path(artifact).parent / source  # older artifacts record the path as given, relative to where it ran
    if not model and not Path(source).is_absolute() and not Path(source).exists() and beside.exists():
        source = str(beside)
    recorded = info.get("quantization")
    precision = info.get("activations") or info.get("precision", "fp32")
    if placement is not None and placement.dtype not in ("fp32", precision):
        raise OptionError(f"{{dtype}} {placement.dtype} is less precise than the artifact's {precision} activations, "
                          f"which verification judges against a reference at least as precise: use {{dtype}} fp32")
    try:
        loaded = load_model(source, tokenizer=bool(recorded), placement=placement)
    except UserError as exc:
        if model:
            raise
        raise OptionError(f"the source model the artifact names, '{source}', does not load ({exc}): pass it with "
                          "{model}") from None
    reference = loaded.model
    if recorded:  # the source with the same quantized weights, quantized again as the artifact records
        from d2mc.quantize import QuantizeOptions, quantize_model
        from d2mc.verify import QUANTIZED_FP32

        reference = quantize_model(loaded.model, QuantizeOptions.from_dict(recorded), loaded.tokenizer).model
        precision = QUANTIZED_FP32 if precision == "fp32" else precision
    expected = record_reference(reference, onnx_path, precision, prefill=prefill,
                                positions=POSITION_SAMPLES if positions is None else positions)
    del loaded, reference  # ONNX Runtime's session then never sits beside the PyTorch weights
    return replay_reference(expected, onnx_path).to_dict()


def write_genai_config(model, out_dir: Path, precision: str) -> Path:
    """``genai_config.json`` so that onnxruntime-genai loads the artifact and generates with it."""
    arch = ModelArch.from_config(model.config)
    config = model.config
    base = config.base_config if config.model_type == "d2mc_moe" else config
    eos = base.eos_token_id
    data = {
        "model": {
            "bos_token_id": base.bos_token_id,
            "context_length": arch.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "d2mc", "provider_options": []},
                "filename": "model.onnx",
                "head_size": arch.head_dim,
                "hidden_size": arch.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": arch.num_heads,
                "num_hidden_layers": len(arch.attention_blocks),
                "num_key_value_heads": arch.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": base.pad_token_id if base.pad_token_id is not None else (
                eos[0] if isinstance(eos, list) else eos),
            "type": arch.family if arch.family in ("llama", "qwen2", "qwen3", "mistral") else "llama",
            "vocab_size": arch.vocab_size,
        },
        "search": {"do_sample": False, "max_length": arch.max_position_embeddings, "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": True,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }
    path = out_dir / "genai_config.json"
    path.write_text(json.dumps(data, indent=4) + "\n")
    return path
