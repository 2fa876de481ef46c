"""Where a model runs and whether it fits: a :class:`Placement` (device and dtype) checked against this machine
(:func:`resolve_placement`), and the memory a piece of work needs, estimated from the config before any weight is
read and compared with the memory present (:func:`check_memory`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from d2mc.arch import ModelArch
from d2mc.errors import OptionError

DTYPES = ("fp32", "bf16", "fp16")
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
# Peak memory of each kind of work, in multiples of the weights at the dtype they are held in, on top of
# FIXED_OVERHEAD. convert and export: above the peaks benchmarks/scale.py measured in fp32 on 135M- and 1B-shaped
# models (see the README), beyond FIXED_OVERHEAD: convert 0.9 times the weights (135M-shaped) to 1.7 (1B-shaped);
# export, whose verification holds the weights once (d2mc/verify.py), 1.1 to 2.2 times, the most on the small model,
# whose KV cache of 8,192 positions weighs most next to its weights; inference (the weights and one forward's
# activations) is not measured. Recovery training is costed separately (:func:`training_bytes`).
PEAK_FACTOR = {"inference": 1.3, "convert": 2.0, "export": 2.2}
FIXED_OVERHEAD = 1.0e9  # the Python process with torch, transformers and ONNX Runtime imported, and calibration
WORK_NAMES = {"inference": "running", "convert": "converting", "export": "exporting"}
SKIP_MEMORY_CHECK = "D2MC_SKIP_MEMORY_CHECK"  # set to 1 to load a model the estimate says will not fit


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


def check_no_placement(device: str, dtype: str, why: str) -> None:
    """Refuse ``device`` and ``dtype`` other than the defaults (auto or cpu, fp32) for work that runs no PyTorch
    model here, saying ``why`` ("an artifact runs in ONNX Runtime on the CPU")."""
    if str(device).strip().lower() not in ("auto", "cpu") or dtype_name(dtype) != "fp32":
        raise OptionError(f"{{device}} and {{dtype}} place a PyTorch model, and {why}: drop them")


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
    raise OptionError(f"{what} this {arch.total_params / 1e9:.2f}B-parameter model in {placement.dtype} needs "
                      f"about {needed / 2**30:.1f} GiB of memory and {where} has {free / 2**30:.1f} GiB free: "
                      f"{hint}use a machine with more memory, or set {SKIP_MEMORY_CHECK}=1 to try anyway")


def check_work_memory(arch: ModelArch, placement: Placement, work: str | None) -> None:
    """:func:`check_memory` for ``work`` (a key of :data:`PEAK_FACTOR`; None checks nothing)."""
    if work is not None:
        check_memory(arch, placement, needed_bytes(arch, placement.dtype, work), WORK_NAMES[work])


def release_weights(model) -> None:
    """Free ``model``'s weights and buffers in place, for every holder of the model (they move to the meta device);
    the model keeps its config and structure but cannot run any more."""
    model.to("meta")


def torch_dtype(dtype: str):
    """The torch dtype of a :data:`DTYPES` name (``float32`` and the like are accepted too)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name(dtype)]


def dtype_name(dtype: str) -> str:
    """``dtype`` in the short spelling of :data:`DTYPES` (``float32`` and the like are accepted too)."""
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
