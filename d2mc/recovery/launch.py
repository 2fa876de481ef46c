"""Recovery under ``accelerate launch``: an accelerate config checked against this machine and the installed
packages before any process starts, and the command that launches ``d2mc recover`` with it.

accelerate reads the config (distributed type, processes, nodes, FSDP or DeepSpeed settings, mixed precision) and
starts the processes; in each, the Hugging Face Trainer of :mod:`d2mc.recovery.run` takes the settings from the
environment accelerate sets. ``docs/recovery.md`` has example configs for one GPU, 8 GPUs and 2 nodes.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from d2mc.errors import OptionError, UserError, first_line

MIXED_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # accelerate's mixed_precision -> d2mc's dtype


@dataclass(frozen=True)
class LaunchConfig:
    """What d2mc needs to know of an accelerate config file."""

    path: Path
    distributed_type: str  # accelerate's DistributedType name: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ...
    num_processes: int
    num_machines: int
    mixed_precision: str  # no, bf16, fp16
    fsdp_version: int | None = None
    zero_stage: int | None = None

    @property
    def dtype(self) -> str:
        return MIXED_PRECISION[self.mixed_precision]


def read_launch_config(path: str | Path, dtype: str) -> LaunchConfig:
    """Read an accelerate config (YAML or JSON) and refuse, in one line, one this machine or the installed packages
    cannot run: DeepSpeed without the package, FSDP without a GPU (accelerate runs FSDP only on GPUs and quietly
    falls back to DDP on a CPU), FSDP version 1 (d2mc shards the teacher with version 2), fp16 without a GPU, a GPU
    type on a machine without one (with ``use_cpu: true`` a MULTI_GPU config runs DDP over gloo on the CPU), several
    MULTI_CPU processes without mpirun, or a mixed precision other than the run's ``dtype``."""
    import torch
    import yaml
    from accelerate.utils import DistributedType

    path = Path(path).expanduser()
    if not path.is_file():
        raise OptionError(f"{{accelerate_config}}: no such file '{path}'; write one with accelerate config or take "
                          "an example from docs/recovery.md")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise OptionError(f"{{accelerate_config}} '{path}' is not YAML or JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise OptionError(f"{{accelerate_config}} '{path}' is not an accelerate config (a mapping of settings)")
    kind = str(data.get("distributed_type", "NO")).upper()
    known = [t.value for t in DistributedType]
    if kind not in known:
        raise OptionError(f"{{accelerate_config}} '{path}': unknown distributed_type '{kind}' for accelerate "
                          f"{version('accelerate')} (it knows {', '.join(known)})")
    precision = str(data.get("mixed_precision", "no")).lower()
    if precision not in MIXED_PRECISION:
        raise OptionError(f"{{accelerate_config}} '{path}': mixed_precision '{precision}' is not one d2mc trains "
                          f"with: choose {', '.join(MIXED_PRECISION)}")
    fsdp = data.get("fsdp_config") or {}
    deepspeed = data.get("deepspeed_config") or {}
    config = LaunchConfig(path, kind, int(data.get("num_processes", 1)), int(data.get("num_machines", 1)), precision,
                          fsdp_version=int(fsdp.get("fsdp_version", 1)) if kind == "FSDP" else None,
                          zero_stage=int(deepspeed.get("zero_stage", 0)) if kind == "DEEPSPEED" else None)
    gpu = torch.cuda.is_available() and not data.get("use_cpu", False)
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise OptionError(f"{{accelerate_config}} '{path}' asks for DeepSpeed, which is not installed: pip install "
                          "deepspeed, or launch with an FSDP or multi-GPU config")
    if kind == "DEEPSPEED" and deepspeed.get("deepspeed_config_file"):
        file = Path(deepspeed["deepspeed_config_file"]).expanduser()
        if not file.is_absolute():
            file = path.parent / file
        if not file.is_file():
            raise OptionError(f"{{accelerate_config}} '{path}' names the DeepSpeed config '{file}', which does not "
                              "exist")
    if kind == "FSDP" and config.fsdp_version != 2:
        raise OptionError(f"{{accelerate_config}} '{path}' asks for FSDP version {config.fsdp_version}: d2mc "
                          "shards the teacher with FSDP version 2; set fsdp_config.fsdp_version: 2")
    why = "the config sets use_cpu" if torch.cuda.is_available() else "this machine has none"
    if kind in ("FSDP", "DEEPSPEED") and not gpu:
        raise OptionError(f"{{accelerate_config}} '{path}' asks for {'FSDP' if kind == 'FSDP' else 'DeepSpeed'}, "
                          f"which accelerate {version('accelerate')} runs only on GPUs, and {why}: on a CPU launch "
                          "DDP (distributed_type MULTI_GPU with use_cpu: true)")
    if kind == "MULTI_GPU" and not gpu and not data.get("use_cpu", False):
        raise OptionError(f"{{accelerate_config}} '{path}' asks for GPUs and this machine has none: set use_cpu: "
                          "true to run DDP over gloo on the CPU")
    if kind == "MULTI_CPU" and config.num_processes > 1 and not data.get("mpirun_hostfile"):
        raise OptionError(f"{{accelerate_config}} '{path}': accelerate starts several MULTI_CPU processes through "
                          "mpirun (mpirun_hostfile), which the config does not name; on one machine use "
                          "distributed_type MULTI_GPU with use_cpu: true (DDP over gloo)")
    if precision == "fp16" and not gpu:
        raise OptionError(f"{{accelerate_config}} '{path}': fp16 mixed precision needs a GPU; use bf16 or no")
    if config.dtype != dtype:
        raise OptionError(f"{{accelerate_config}} '{path}' trains with mixed_precision {precision} and {{dtype}} "
                          f"is {dtype}: make them agree ({{dtype}} {config.dtype}, or mixed_precision "
                          f"{next(k for k, v in MIXED_PRECISION.items() if v == dtype)})")
    return config


def launch_command(config: LaunchConfig, arguments: list[str]) -> list[str]:
    """The command that runs ``d2mc`` with ``arguments`` in every process the config asks for."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config.path), "-m", "d2mc",
            *arguments]


def check_launch_environment() -> None:
    """Inside a launched process: refuse settings accelerate put in the environment that this machine or the
    installed packages cannot honour (``accelerate launch`` run directly with such a config)."""
    import torch

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and (
            importlib.util.find_spec("deepspeed") is None):
        raise UserError("the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        raise UserError(f"the accelerate config asks for FSDP, which accelerate {version('accelerate')} runs only on "
                        "GPUs (on a CPU it would run DDP instead): launch with a multi-CPU config here")
