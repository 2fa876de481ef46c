import pytest

from d2mc.errors import UserError
from d2mc.outputs import atomic_output_dir


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


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists: remove it or pass --overwrite"):
        with atomic_output_dir(tmp_path / "out"):
            pass
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new").write_text("x")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]
