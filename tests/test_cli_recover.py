"""Recovery from the command line on a tiny model with a tokenizer: convert, recover and compile."""

import json

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from d2mc.cli import cli, main

TEXT = ("The council said the new bridge would open next year after a long delay. Fire crews worked through the "
        "night as strong winds pushed the blaze towards the town. ") * 30


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def train_text(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return path


def test_convert_with_recovery(tiny_checkpoint_with_tokenizer, train_text, tmp_path):
    out = tmp_path / "converted"
    result = invoke("convert", tiny_checkpoint_with_tokenizer, "--remove-attention", "2", "--calib-sequences", "2",
                    "--calib-length", "32", "--calib-data", train_text, "--recover-steps", "3",
                    "--recover-seq-len", "32", "--recover-batch-size", "2", "--recover-data", train_text, "-o", out)
    assert result.exit_code == 0, result.output
    assert "recovery: 3 steps, 192 tokens" in result.output
    plan = json.loads((out / "d2mc_plan.json").read_text())
    assert plan["recovery"]["steps"] == 3 and plan["recovery"]["trained"] == "all"
    curve = json.loads((out / "recovery_curve.json").read_text())["curve"]
    assert [c["step"] for c in curve] == [1, 3] and all(c["loss"] > 0 for c in curve)
    assert (out / "recovery_curve.png").stat().st_size > 1000
    assert not (tmp_path / "converted.recovery-checkpoints").exists()  # removed once the output is in place


def test_recover_command(tiny_checkpoint_with_tokenizer, train_text, tmp_path):
    converted = tmp_path / "converted"
    assert invoke("convert", tiny_checkpoint_with_tokenizer, "--plan", "2-3", "--calib-sequences", "2",
                  "--calib-length", "32", "--calib-data", train_text, "-o", converted, "-q").exit_code == 0
    out = tmp_path / "recovered"
    result = invoke("recover", converted, "-o", out, "--steps", "4", "--seq-len", "64", "--batch-size", "2",
                    "--data", train_text, "--eval-tokens", "1024", "--eval-every", "2", "--train", "all",
                    "--keep-checkpoints", "--save-steps", "2")
    assert result.exit_code == 0, result.output
    assert "held-out perplexity (1024 tokens)" in result.output
    plan = json.loads((out / "d2mc_plan.json").read_text())
    recovery = plan["recovery"]
    assert recovery["teacher_model"] == str(tiny_checkpoint_with_tokenizer)  # found in d2mc_plan.json
    assert recovery["perplexity"]["after"] > 0 and recovery["trained"] == "all"
    heldout = json.loads((out / "recovery_curve.json").read_text())["heldout_curve"]
    assert [h["step"] for h in heldout] == [0, 2, 4]
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "d2mc_moe"
    assert sorted(p.name for p in (tmp_path / "recovered.checkpoints").glob("checkpoint-*")) == \
        ["checkpoint-2", "checkpoint-4"]
    # the same command again resumes from the last checkpoint: nothing left to train
    result = invoke("recover", converted, "-o", out, "--steps", "4", "--seq-len", "64", "--batch-size", "2",
                    "--data", train_text, "--eval-tokens", "0", "--eval-every", "2", "--train", "all",
                    "--save-steps", "2", "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["steps"] == 4
    assert not (tmp_path / "recovered.checkpoints").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "{eval}", "--eval-data", "{eval}"], "is both the training data and the evaluation text"),
    (["--data", "missing.txt"], "no such text file"),
    (["--train", "routers"], "has no routers"),
])
def test_recover_mistakes_are_one_line(tiny_checkpoint_with_tokenizer, train_text, tmp_path, capsys, args, message):
    converted = tmp_path / "converted"
    assert invoke("convert", tiny_checkpoint_with_tokenizer, "--method", "drop-layers", "--plan", "2-3",
                  "--calib-sequences", "2", "--calib-length", "32", "--calib-data", train_text, "-o", converted,
                  "-q").exit_code == 0
    args = [a.replace("{eval}", str(train_text)) for a in args]
    with pytest.raises(SystemExit) as info:
        main(["recover", str(converted), "-o", str(tmp_path / "out"), "--steps", "1", "--seq-len", "32", *args])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error: ") and message in err.splitlines()[-1]
    assert "Traceback" not in err and err.count("error") == 1


@pytest.mark.slow
def test_compile_with_recovery(tiny_checkpoint_with_tokenizer, train_text, tmp_path):
    out = tmp_path / "out"
    result = invoke("compile", tiny_checkpoint_with_tokenizer, "--target", "orin-agx", "--remove-attention", "2",
                    "--calib-sequences", "2", "--calib-length", "32", "--eval-tokens", "1024", "--context", "256",
                    "--prefill", "32", "--no-measure", "--recover-steps", "3", "--recover-seq-len", "32",
                    "--recover-batch-size", "2", "--recover-data", train_text, "-o", out)
    assert result.exit_code == 0, result.output
    assert "-> after recovery" in result.output
    report = json.loads((out / "report.json").read_text())
    ppl = report["perplexity"]
    assert ppl["dense"] > 0 and ppl["converted"] > 0 and ppl["recovered"] > 0
    assert report["recovery"]["steps"] == 3 and report["recovery"]["tokens"] == 3 * 2 * 32
    assert json.loads((out / "model" / "d2mc_plan.json").read_text())["recovery"]["steps"] == 3
    markdown = (out / "report.md").read_text()
    assert "## Recovery training" in markdown and "| after recovery |" in markdown
    assert {"recovery_curve.json", "recovery_curve.png"} <= set(report["artifacts"])
    assert not (tmp_path / "out.recovery-checkpoints").exists()
