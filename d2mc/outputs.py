"""Output directories that appear complete or not at all."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from d2mc.errors import UserError


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` and rename it to ``path`` when the block succeeds.

    On any failure (an exception or an interrupt) the temporary directory is removed, so a half-written
    artifact never sits at ``path``. An existing ``path`` is replaced only when ``overwrite`` is set.
    """
    path = Path(path).expanduser().resolve()
    if path.exists() and not overwrite:
        raise UserError(f"output '{path}' already exists: remove it or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
