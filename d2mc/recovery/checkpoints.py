"""Checkpoint directories of recovery runs: resume only a checkpoint of the same run, remove it when done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from d2mc.errors import UserError
from d2mc.outputs import remove_incomplete_checkpoints
from d2mc.recovery.options import RecoveryOptions


def prepare_checkpoint_dir(path: Path, options: RecoveryOptions, writer: bool) -> bool:
    """Whether to resume from ``path``. Refuses checkpoints of a different run; ``resume=False`` starts over."""
    record = path / "recovery_run.json"
    identity = options.identity()
    remove_incomplete_checkpoints(path)  # a run stopped while saving leaves one that must not be resumed
    has_checkpoint = path.exists() and any(path.glob("checkpoint-*"))
    if has_checkpoint and options.resume:
        saved = json.loads(record.read_text()) if record.exists() else None
        if saved != identity:
            differing = sorted(k for k in identity if not saved or saved.get(k) != identity[k])
            raise UserError(f"the checkpoints in '{path}' come from a different recovery run (differing: "
                            f"{', '.join(differing) or 'unknown'}): remove the directory, give another checkpoint "
                            "directory, or start over with --no-resume")
        return True
    if writer:
        if has_checkpoint:
            for old in path.glob("checkpoint-*"):
                shutil.rmtree(old)
        path.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(identity, indent=2) + "\n")
    return False


def remove_checkpoints(options: RecoveryOptions) -> None:
    """Delete a finished run's checkpoint directory (call once its output is safely written)."""
    if options.checkpoint_dir and Path(options.checkpoint_dir).exists():
        shutil.rmtree(options.checkpoint_dir, ignore_errors=True)
