"""Named points where the fault tests interrupt a run, chosen by environment variables.

``D2MC_FAULT_AT=POINT`` (or ``POINT#N`` for its N-th occurrence in the process) makes the run send itself
``D2MC_FAULT_SIGNAL`` (``TERM`` by default; ``INT``, ``HUP``, ``KILL``) when it reaches that point. With
``D2MC_FAULT_WAIT=1`` it prints ``fault point POINT reached`` on stderr instead and waits to be killed from
outside, as ``timeout`` or ``docker stop`` would. Without ``D2MC_FAULT_AT`` a point does nothing.

Points: ``model-loaded`` (a model's weights are in memory), ``verify`` (a lowered model is being compared with
its source), ``output-open`` (an output directory exists under its partial name), ``output-close`` (an output is
written in full but not yet renamed into place).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter

_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Interrupt the run here when ``D2MC_FAULT_AT`` names this point (see the module docstring)."""
    wanted = os.environ.get("D2MC_FAULT_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] != int(nth or 1):
        return
    if os.environ.get("D2MC_FAULT_WAIT"):
        print(f"fault point {wanted} reached", file=sys.stderr, flush=True)
        time.sleep(3600)
        return
    os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("D2MC_FAULT_SIGNAL", "TERM")))
    time.sleep(5)  # the handler raises at the next instruction; a signal left at its default ends the process


def reset_fault_points() -> None:
    """Forget which points were reached (for several runs in one process)."""
    _reached.clear()
