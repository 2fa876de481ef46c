"""Output paths that appear complete or not at all, and that never replace what d2mc did not write.

Every output directory is written under a hidden partial name beside it (``.NAME.partial-PID-XXXXXXXX``) and
renamed into place when complete; it carries a marker file (:data:`MARKER`), and ``--overwrite`` replaces only a
directory that has one, never the working directory or a directory above it. Ctrl-C, SIGTERM and SIGHUP remove
the partial directory on the way out; a partial directory left by a run that died without cleaning up (SIGKILL,
power loss) is removed by the next run that writes the same output. A partial directory's lock file beside it
(``.NAME.partial-PID-XXXXXXXX.lock``) is held for as long as its run lives, which is how the next run tells a
live partial directory from a stale one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from d2mc.errors import UserError
from d2mc.faults import fault_point

MARKER = ".d2mc-output"
_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C raises KeyboardInterrupt so that every cleanup on the way out runs."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def interrupt_status(exc: BaseException) -> int:
    """The shell's exit status for an interrupted run: 128 + the signal number (130 for Ctrl-C)."""
    while exc is not None and not isinstance(exc, Terminated):
        exc = exc.__cause__ or exc.__context__
    return 128 + (exc.signum if exc is not None else signal.SIGINT)


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt), as Ctrl-C does.

    Only the main thread can install signal handlers; elsewhere the block runs unchanged. A signal the process
    ignores (``nohup`` ignores SIGHUP) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, _frame):
        raise Terminated(signum)

    previous = {s: signal.getsignal(s) for s in _TERMINATING}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, interrupt)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(s, handler)


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work starts, an output directory that cannot be written or must not be replaced.

    Returns the absolute path. Refused: the working directory or a directory above it; an existing path
    without ``overwrite``; with ``overwrite``, an existing path that is not a d2mc output (no :data:`MARKER`);
    a path under a regular file or under a directory this user cannot write.
    """
    shown = str(path)
    path = Path(path).expanduser().absolute()
    resolved = path.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserError(f"output '{shown}' is the working directory or a directory above it: give a new directory "
                        "for the output")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UserError(f"output '{shown}' already exists: remove it or pass --overwrite")
        if not is_d2mc_output(path):
            raise UserError(f"'{shown}' was not written by d2mc (it has no {MARKER} marker): --overwrite replaces "
                            "only d2mc's own outputs; remove it yourself or choose another output")
    check_writable_parent(path, shown)
    return path


def check_writable_parent(path: Path, shown: str) -> None:
    """The nearest existing directory above ``path`` must be a directory this user can create entries in."""
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise UserError(f"cannot write '{shown}': '{ancestor}' is a broken symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write '{shown}': '{ancestor}' is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write '{shown}': no permission to write in '{ancestor}'")


def is_d2mc_output(path: Path) -> bool:
    """Whether ``path`` is a directory d2mc wrote (it holds the marker file)."""
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...], *, overwrite: bool = True,
                      owned: Callable[[Path], bool] | None = None) -> Path:
    """Refuse, before any work, an output file path that cannot be written: a directory, a path under a regular
    file or an unwritable directory, or a name without one of ``suffixes`` (the format is chosen by it). An
    existing file is replaced only with ``overwrite`` and, given ``owned``, only if ``owned(path)`` says d2mc
    wrote it."""
    shown = str(path)
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise UserError(f"'{shown}' is a directory: give a file name such as {path.name or 'out'}{suffixes[0]}")
    if path.suffix.lower() not in suffixes:
        raise UserError(f"'{shown}' has no {' or '.join(suffixes)} extension, which chooses the file format")
    if path.exists() and not overwrite:
        raise UserError(f"output '{shown}' already exists: remove it or pass --overwrite")
    if path.exists() and owned is not None and not owned(path):
        raise UserError(f"'{shown}' was not written by d2mc: --overwrite replaces only d2mc's own outputs; remove "
                        "it yourself or choose another output")
    check_writable_parent(path, shown)
    return path


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path`` (same extension) and rename it to ``path`` on success."""
    path = Path(path).expanduser().absolute()
    _create_parents(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    with termination_as_interrupt():
        try:
            yield tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with _signals_deferred():
            tmp.replace(path)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` and rename it to ``path`` when the block succeeds.

    The checks of :func:`check_output_path` come first. On any failure, Ctrl-C, SIGTERM or SIGHUP the temporary
    directory is removed, so a half-written artifact never sits at ``path``; stale partial directories of the same
    output, left by runs that are gone, are removed first. The finished directory holds :data:`MARKER`, the mark
    ``--overwrite`` looks for, and has the permissions the user's umask gives.
    """
    path = check_output_path(path, overwrite)
    remove_stale_partials(path)
    _create_parents(path)
    with termination_as_interrupt():
        tmp, lock = _new_partial(path)
        try:
            fault_point("output-open")
            yield tmp
            (tmp / MARKER).write_text(json.dumps({"written_by": "d2mc"}) + "\n")
            fault_point("output-close")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.release()
            raise
        with _signals_deferred():
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
            lock.release()


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the partial and replaced directories of ``path`` that no live run holds; return what was removed."""
    removed = []
    pattern = glob.escape(f".{path.name}")
    for candidate in sorted(path.parent.glob(f"{pattern}.partial-*")) + sorted(path.parent.glob(f"{pattern}.old-*")):
        if candidate.suffix == ".lock" or not candidate.is_dir() or candidate.is_symlink() or _in_use(candidate):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        _lock_path(candidate).unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def remove_incomplete_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Remove the Trainer checkpoints (``checkpoint-N``) in ``directory`` that a run stopped while writing them
    (the Trainer writes ``trainer_state.json`` last), so that resuming never picks one; return what was removed."""
    removed = []
    for candidate in sorted(Path(directory).glob("checkpoint-*")):
        state = candidate / "trainer_state.json"
        try:
            json.loads(state.read_text())
        except (OSError, ValueError):
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
    return removed


def _create_parents(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create '{path.parent}' ({exc.strerror}): choose another output") from None


def _lock_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".lock")


@dataclass(frozen=True)
class _Lock:
    """The open, locked descriptor of a partial directory's lock file, held while the run writes it."""

    fd: int
    path: Path

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _new_partial(path: Path) -> tuple[Path, _Lock]:
    """A new partial directory (mode 0777 less the umask, as any new directory) and its held lock."""
    import fcntl

    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    lock = _Lock(os.open(_lock_path(tmp), os.O_CREAT | os.O_RDWR, 0o666), _lock_path(tmp))
    fcntl.flock(lock.fd, fcntl.LOCK_EX)
    try:
        tmp.mkdir(0o777)
    except OSError as exc:
        lock.release()
        raise UserError(f"cannot create a directory in '{path.parent}' ({exc.strerror}): choose another output") \
            from None
    return tmp, lock


def _in_use(partial: Path) -> bool:
    """Whether a live run holds ``partial``: its lock file is locked, or, with no lock file (a directory being
    created or moved aside), the process named in it is alive."""
    import fcntl

    try:
        fd = os.open(_lock_path(partial), os.O_RDWR)
    except FileNotFoundError:
        return _pid_alive(partial)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _pid_alive(partial: Path) -> bool:
    match = re.search(r"\.(?:partial|old)-(\d+)-[0-9a-f]+$", partial.name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block is done (the rename of a finished output), so that an
    interrupt cannot fall between moving the old output aside and moving the new one in."""
    signals = {signal.SIGINT, *_TERMINATING}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
