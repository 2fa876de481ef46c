"""Interrupted runs leave nothing that looks complete: SIGTERM, SIGINT and SIGHUP at several points of convert,
export and compile (chosen with ``D2MC_FAULT_AT``, see :mod:`d2mc.faults`) end the command with 128 + the signal
number and leave neither the output nor a partial directory; the next run succeeds. The slow test kills real
processes from outside, SIGKILL included, whose partial directory the next run removes."""

import os
import signal
import subprocess
import sys
import time

import pytest

from d2mc.cli import main
from d2mc.faults import reset_fault_points
from d2mc.outputs import MARKER
from tests.conftest import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

CONVERT = ["convert", "{tiny}", "--plan", "2-3", "--calib-sequences", "2", "--calib-length", "32",
           "--reconstruct-steps", "2", "-q"]
EXPORT = ["export", "{tiny}"]
COMPILE = ["compile", "{tiny}", "--plan", "2-3", "--calib-sequences", "2", "--calib-length", "32",
           "--reconstruct-steps", "2", "--eval-tokens", "0", "--context", "64", "--prefill", "16", "--no-measure",
           "-q"]

# (command, [(fault point, signal)]): compile writes its output, then onnx/, onnx-tensorrt/ and the engine
# directory inside it (each an output of its own), verifying each ONNX flavour
FAULTS = [
    (CONVERT, [("model-loaded", "TERM"), ("output-open", "INT"), ("output-close", "HUP")]),
    (EXPORT, [("model-loaded", "INT"), ("verify", "TERM"), ("output-open", "HUP"), ("output-close", "TERM")]),
    (COMPILE, [("output-close#1", "TERM"), ("verify#2", "INT"), ("output-close#4", "HUP")]),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tokenizer = tiny_tokenizer()
    tiny_model("llama", num_hidden_layers=8, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
               pad_token_id=2, max_position_embeddings=128).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(args, tiny, out, monkeypatch, point=None, signal_name="TERM") -> int:
    reset_fault_points()
    if point:
        monkeypatch.setenv("D2MC_FAULT_AT", point)
        monkeypatch.setenv("D2MC_FAULT_SIGNAL", signal_name)
    else:
        monkeypatch.delenv("D2MC_FAULT_AT", raising=False)
    try:
        main([a.replace("{tiny}", str(tiny)) for a in args] + ["-o", str(out)])
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.mark.parametrize("args, faults", FAULTS, ids=["convert", "export", "compile"])
def test_interrupted_runs_leave_nothing_and_the_next_run_succeeds(args, faults, tiny, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    for point, signal_name in faults:
        code = run(args, tiny, out, monkeypatch, point, signal_name)
        assert code == 128 + getattr(signal, "SIG" + signal_name), (point, capsys.readouterr().err)
        assert list(tmp_path.iterdir()) == [], (point, list(tmp_path.iterdir()))
        assert capsys.readouterr().err.endswith("aborted\n")
    assert run(args, tiny, out, monkeypatch) == 0
    assert (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_checkpoint_cut_short_is_not_resumed(tiny, tmp_path, monkeypatch):
    """A recovery run killed while it saved a checkpoint: the next run resumes from the last complete one."""
    monkeypatch.chdir(tmp_path)
    converted = tmp_path / "converted"
    assert run(CONVERT, tiny, converted, monkeypatch) == 0
    checkpoints = tmp_path / "checkpoints"
    recover = ["recover", str(converted), "--steps", "2", "--seq-len", "16", "--batch-size", "1", "--save-steps",
               "1", "--eval-tokens", "0", "--checkpoint-dir", str(checkpoints), "--keep-checkpoints", "-q"]
    assert run(recover, tiny, tmp_path / "first", monkeypatch) == 0
    partial = checkpoints / "checkpoint-9"  # what a save stopped after the weights leaves: no trainer state
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((checkpoints / "checkpoint-2" / "model.safetensors").read_bytes()[:999])
    assert run(recover, tiny, tmp_path / "second", monkeypatch) == 0
    assert not partial.exists() and (tmp_path / "second" / MARKER).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("args, point", [(CONVERT, "output-open"), (EXPORT, "verify"), (COMPILE, "verify#2")],
                         ids=["convert", "export", "compile"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_killed_from_outside(args, point, sig, tiny, tmp_path):
    """A real process, stopped at a point and killed from outside (as timeout, docker stop or Ctrl-C do)."""
    out = tmp_path / "out"
    env = {**os.environ, "D2MC_FAULT_AT": point, "D2MC_FAULT_WAIT": "1"}
    command = [sys.executable, "-m", "d2mc", *[a.replace("{tiny}", str(tiny)) for a in args], "-o", str(out)]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("fault point"):
            break
    process.send_signal(sig)
    code = process.wait(timeout=60)
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL and any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
    else:
        assert code == 128 + sig and list(tmp_path.iterdir()) == []
    start = time.perf_counter()
    result = subprocess.run(command, env={k: v for k, v in env.items() if not k.startswith("D2MC_FAULT")},
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], time.perf_counter() - start
