"""Which process this is under ``torchrun`` (or a plain run)."""

from __future__ import annotations

import os


def world_size() -> int:
    """The number of training processes (1 in a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in the process that writes outputs (rank 0 under torchrun, or a plain run)."""
    return int(os.environ.get("RANK", "0")) == 0


def leave_processes() -> None:
    """Under ``torchrun``: wait until every process has got here (the first one has written the outputs), then take
    the process group down. A process that left while another still worked could take that one down with it (its
    communication threads abort at exit, and the launcher then stops the others)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
