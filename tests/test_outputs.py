import os
import signal
from pathlib import Path

import pytest

from d2mc.errors import UserError
from d2mc.outputs import (
    MARKER,
    Terminated,
    atomic_output_dir,
    atomic_output_file,
    check_output_file,
    check_output_path,
    interrupt_status,
    remove_stale_partials,
    termination_as_interrupt,
)


def test_complete_or_absent(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(target) as tmp:
            (tmp / "model.onnx").write_text("half")
            raise KeyboardInterrupt
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(target) as tmp:
        (tmp / "model.onnx").write_text("whole")
    assert (target / "model.onnx").read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock or partial left beside it


def test_existing_output_needs_overwrite_and_a_marker(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "old").write_text("x")
    assert (tmp_path / "out" / MARKER).is_file()
    with pytest.raises(UserError, match="already exists: remove it or pass --overwrite"):
        with atomic_output_dir(tmp_path / "out"):
            pass
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "new"]


def test_overwrite_refuses_what_d2mc_did_not_write(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="was not written by d2mc .*remove it yourself or choose another output"):
        with atomic_output_dir(victim, overwrite=True):
            pass
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="was not written by d2mc"):
        check_output_path(tmp_path / "notes.txt", overwrite=True)
    assert (victim / "thesis.tex").read_text() == "years of work"


def test_overwrite_never_replaces_the_working_directory_or_above(tmp_path, monkeypatch):
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / MARKER).write_text("{}")  # even one that looks like an output
    monkeypatch.chdir(here)
    for path in (".", "..", str(tmp_path), "./"):
        with pytest.raises(UserError, match="is the working directory or a directory above it"):
            check_output_path(path, overwrite=True)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_keeps_the_permissions_of_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_parent_is_a_file_or_unwritable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="'.*file' is a file, not a directory"):
        check_output_path(tmp_path / "file" / "out")
    with pytest.raises(UserError, match="is a file, not a directory"):
        check_output_path(tmp_path / "file" / "deeper" / "out")
    locked = tmp_path / "locked"
    locked.mkdir(0o555)
    if os.access(locked, os.W_OK):  # root writes anywhere, except in a process's /proc directory
        locked = Path("/proc/1")
    if os.access(locked, os.W_OK):
        pytest.skip("no directory this user cannot write in")
    with pytest.raises(UserError, match="no permission to write in"):
        check_output_path(locked / "out")


def test_output_file_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(UserError, match="is a file, not a directory"):
        check_output_file(tmp_path / "file" / "x.png", (".png",))
    with pytest.raises(UserError, match="is a directory"):
        check_output_file(tmp_path / "dir.png", (".png",))
    with pytest.raises(UserError, match="has no .png extension"):
        check_output_file(tmp_path / "plot.txt", (".png",))
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_file(tmp_path / "plot.png") as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "file"]
    with atomic_output_file(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png"
        tmp.write_text("whole")
    assert (tmp_path / "plot.png").read_text() == "whole"


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(Terminated) as info:
        with atomic_output_dir(target) as tmp:
            (tmp / "model.onnx").write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
    assert interrupt_status(info.value) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored afterwards


def test_ignored_sighup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with termination_as_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)  # as under nohup: nothing happens
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_stale_partials_of_dead_runs_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    # a run killed with SIGKILL while writing: its partial directory and lock stay behind
    child = os.fork()
    if child == 0:
        with atomic_output_dir(target) as tmp:
            (tmp / "big").write_text("x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(child, 0)
    legacy = tmp_path / ".out.partial-k2j4h1"  # the name of an older d2mc's partial directory
    legacy.mkdir()
    stale = sorted(p.name for p in tmp_path.iterdir())
    assert len(stale) == 3 and not target.exists()
    other = tmp_path / ".other.partial-1-00000000"
    other.mkdir()
    with atomic_output_dir(target) as tmp:
        # a live run's partial directory of the same output is left alone
        assert remove_stale_partials(target) == []
        assert tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-1-00000000", "out"]
