"""Which process this is under ``torchrun`` (or a plain run)."""

from __future__ import annotations

import os


def world_size() -> int:
    """The number of training processes (1 in a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in the process that writes outputs (rank 0 under torchrun, or a plain run)."""
    return int(os.environ.get("RANK", "0")) == 0
