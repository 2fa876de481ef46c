"""A Llama-3.2-1B-shaped model (random weights, the real config) through convert, export and verification, each as
its own ``d2mc`` process, by ``benchmarks/scale.py``. Marked ``large``: it takes longer than the rest of the suite
on a small machine, so it runs only when selected (``pytest -m large``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.large
def test_a_1b_shaped_model_converts_and_exports_verified(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--sizes", "1b", "--json",
                             str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=3 * 3600)
    assert result.returncode == 0, result.stderr[-3000:]
    record, = json.loads(out.read_text())
    if "skipped_needed_bytes" in record:
        pytest.skip(f"the 1B-shaped model needs about {record['skipped_needed_bytes'] / 2**30:.1f} GiB, "
                    f"{record['available_bytes'] / 2**30:.1f} GiB available here")
    assert record["parameters"] > 1.2e9 and record["onnx_bytes"] > 4e9  # export verifies, or exits 1
