"""d2mc eval: perplexity of a model (PyTorch) and of its ONNX artifact (ONNX Runtime) agree; lm-evaluation-harness
tasks on the loaded model give what a direct computation of the same comparison gives; bad input is one line."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from d2mc.targets.onnxruntime import export_onnx

from d2mc.arch import BlockPlan
from d2mc.artifact import find_runnable_onnx
from d2mc.cli import cli, main
from d2mc.errors import UserError
from d2mc.evaluation import DEFAULT_TOKENS, PERPLEXITY_TOLERANCE, evaluate_perplexity
from d2mc.restructure import dense_plan, restructure
from d2mc.tasks import evaluate_model_tasks
from tests.conftest import requires_real_model, tiny_model, tiny_tokenizer

TASKS = Path(__file__).parent / "data" / "eval-tasks"
TASK = "d2mc_facts"
requires_harness = pytest.mark.skipif(
    __import__("importlib").util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'd2mc[eval]'; make install brings it)")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def tiny_with_tokenizer(family: str = "llama", converted: bool = False):
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if converted:  # layers 2-4 fused into one top-2 block of three experts, with a random router
        plan = dense_plan(6)
        plan[2:5] = [BlockPlan(attention_layer=2, expert_layers=(2, 3, 4), top_k=2)]
        model = restructure(model, plan)
        torch.nn.init.normal_(model.model.layers[2].router.weight, std=0.5)
    return model, tokenizer


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def relative_difference(a, b) -> float:
    return abs(a.perplexity / b.perplexity - 1)


# ---- perplexity: ONNX Runtime equals PyTorch ------------------------------------------------------------------

@pytest.mark.parametrize("converted", [False, True], ids=["dense", "converted"])
def test_artifact_perplexity_equals_the_model_s(family, converted, tmp_path):
    model, tokenizer = tiny_with_tokenizer(family, converted)
    checkpoint = save(model, tokenizer, tmp_path / "model")
    export_onnx(model, tokenizer, tmp_path / "artifact")
    torch_ppl = evaluate_perplexity(checkpoint)
    onnx_ppl = evaluate_perplexity(tmp_path / "artifact")
    assert (torch_ppl.runtime, onnx_ppl.runtime) == ("pytorch", "onnxruntime")
    assert torch_ppl.tokens == onnx_ppl.tokens == DEFAULT_TOKENS and onnx_ppl.windows == 8
    assert relative_difference(onnx_ppl, torch_ppl) < PERPLEXITY_TOLERANCE["fp32"], (torch_ppl, onnx_ppl)
    assert 1 < torch_ppl.perplexity < 2 * len(tokenizer)  # a random model: about the vocabulary size


@pytest.mark.parametrize("precision, moe_op, flavour", [("fp32", "contrib", "onnxruntime"),
                                                        ("fp16", "dispatch", "onnxruntime"),
                                                        ("fp32", "plugin", "tensorrt")])
def test_every_artifact_form_matches(precision, moe_op, flavour, tmp_path):
    """The contrib MoE op, fp16 weights, and the TensorRT flavour (plugin nodes expanded into standard ops)."""
    model, tokenizer = tiny_with_tokenizer("qwen2", converted=True)
    text = tmp_path / "text.txt"
    text.write_text("The council said the new bridge would open next year after the floods. " * 60)
    export_onnx(model, tokenizer, tmp_path / "artifact", precision=precision, flavour=flavour,
                moe_op="dispatch" if moe_op == "plugin" else moe_op)
    torch_ppl = evaluate_perplexity(save(model, tokenizer, tmp_path / "model"), data=text, window=128)
    onnx_ppl = evaluate_perplexity(tmp_path / "artifact", data=text, window=128)
    assert onnx_ppl.precision == precision and onnx_ppl.data == str(text)
    assert relative_difference(onnx_ppl, torch_ppl) < PERPLEXITY_TOLERANCE[precision], (torch_ppl, onnx_ppl)


def test_compile_layout_runs_the_onnxruntime_flavour(tmp_path):
    """A compile output holds onnx/ and onnx-tensorrt/: ONNX Runtime scores the onnx/ one."""
    model, tokenizer = tiny_with_tokenizer()
    export_onnx(model, tokenizer, tmp_path / "compiled" / "onnx")
    export_onnx(model, None, tmp_path / "compiled" / "onnx-tensorrt", flavour="tensorrt")
    assert find_runnable_onnx(tmp_path / "compiled") == tmp_path / "compiled" / "onnx" / "model.onnx"
    shutil.rmtree(tmp_path / "compiled" / "onnx")
    # the TensorRT flavour alone has no tokenizer of its own: a compile output's model/ holds it
    tokenizer.save_pretrained(tmp_path / "compiled" / "model")
    result = evaluate_perplexity(tmp_path / "compiled", tokens=1024, window=256)
    assert result.onnx.endswith("onnx-tensorrt/model.onnx") and result.windows == 4


def test_cli_table_and_json(tmp_path):
    model, tokenizer = tiny_with_tokenizer()
    checkpoint = save(model, tokenizer, tmp_path / "model")
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Fire crews worked through night {i}."}) for i in range(80)))
    result = invoke("eval", checkpoint, "--data", text, "--window", "64")
    assert result.exit_code == 0, result.output
    assert "(PyTorch, fp32)" in result.output and f"of {text} in " in result.output
    data = json.loads(invoke("eval", checkpoint, "--data", text, "--tokens", "256", "--window", "64",
                             "--json").stdout)
    assert (data["tokens"], data["windows"], data["window"], data["runtime"]) == (256, 4, 64, "pytorch")
    data = json.loads(invoke("eval", checkpoint, "--data", text, "--tokens", "256", "--window", "64", "--device",
                             "cpu", "--dtype", "bf16", "--json").stdout)
    assert data["precision"] == "bf16" and data["perplexity"] > 1


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny checkpoint, its artifact, and data files of every kind."""
    root = tmp_path_factory.mktemp("eval")
    model, tokenizer = tiny_with_tokenizer()
    save(model, tokenizer, root / "model")
    export_onnx(model, tokenizer, root / "artifact", source=str(root / "model"))
    (root / "empty.txt").write_text(" \n\n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "short.txt").write_text("A short text.")
    (root / "neither").mkdir()
    return root


@pytest.mark.parametrize("args, message", [
    (["/no/such/model"], "no such file or directory: '/no/such/model'"),
    (["{root}/neither"], "'{root}/neither' is neither a model (no config.json) nor an ONNX artifact"),
    (["{root}/model", "--tokens", "0"], "--tokens must be at least 1 (got 0)"),
    (["{root}/model", "--tokens", "-5"], "--tokens must be at least 1 (got -5)"),
    (["{root}/artifact", "--tokens", "10000000"], "--tokens 10000000 is more than the "),
    (["{root}/model", "--tokens", "100"], "--tokens 100 is less than one window of 512 tokens"),
    (["{root}/model", "--window", "1"], "--window must be at least 2 tokens (got 1)"),
    (["{root}/model", "--window", "1024"], "--window 1024 is more than the model's maximum of 512 positions"),
    (["{root}/artifact", "--window", "1024"], "--window 1024 is more than the model's maximum of 512 positions"),
    (["{root}/model", "--data", "{root}/empty.txt"], "--data: '{root}/empty.txt' holds no text"),
    (["{root}/model", "--data", "{root}/binary.bin"], "--data: '{root}/binary.bin' is not text"),
    (["{root}/model", "--data", "{root}/missing.txt"], "--data: no such text file: '{root}/missing.txt'"),
    (["{root}/model", "--data", "{root}/short.txt"], "{root}/short.txt holds 10 tokens, fewer than one --window"),
    (["{root}/artifact", "--tasks", TASK], "--tasks needs the PyTorch model, not an ONNX artifact: give the model "
                                           "'{root}/artifact' was exported from ('{root}/model' for this one)"),
    (["{root}/model", "--limit", "3"], "--limit applies to --tasks"),
    (["{root}/model", "--tasks", TASK, "--window", "64"], "--window applies to perplexity, not to --tasks"),
])
def test_bad_input_is_one_line_with_exit_code_1(made, args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", *(a.format(root=made) for a in args)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(root=made)) and err.count("\n") == 1, err


def test_tasks_without_the_harness_say_what_to_install(made, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"needs the package 'lm-eval': pip install 'd2mc\[eval\]'"):
        evaluate_model_tasks(None, None, [TASK], include_path=TASKS)


@requires_harness
@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "unknown task 'no_such_task' for --tasks"),
    (["--tasks", "d2mc_fact", "--include-path", str(TASKS)], "unknown task 'd2mc_fact' for --tasks (close: "
                                                               "d2mc_facts"),
    (["--tasks", TASK, "--include-path", "{root}/missing"], "--include-path '{root}/missing' is not a directory"),
    (["--tasks", TASK, "--include-path", str(TASKS), "--limit", "0"], "--limit must be at least 1"),
    (["--tasks", TASK, "--include-path", str(TASKS), "--num-fewshot", "-1"], "--num-fewshot must be 0 or more"),
    (["--tasks", ","], "--tasks names no task"),
])
def test_bad_task_options_are_one_line(made, args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", str(made / "model"), *(a.format(root=made) for a in args)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(root=made)) and err.count("\n") == 1, err


@requires_harness
def test_a_task_whose_data_is_not_at_hand_offline(made, tmp_path, monkeypatch, capsys):
    """A task over a hub dataset, with the hub offline and nothing cached: one line naming --include-path."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "hub.yaml").write_text(
        "task: hub_only\ndataset_path: d2mc-tests/never-published\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: a\n")
    with pytest.raises(SystemExit):
        main(["eval", str(made / "model"), "--tasks", "hub_only", "--include-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert err.startswith("error: the data of task 'hub_only' (--tasks) cannot be found (") and err.count("\n") == 1
    assert "--include-path DIR" in err


# ---- lm-evaluation-harness tasks ------------------------------------------------------------------------------

def direct_scores(model, tokenizer) -> dict[str, float]:
    """The task's comparison computed here: each choice's summed log-probability after the question (the
    continuation's tokens are those of question + " " + choice beyond the question's own); the most likely choice
    is the answer (acc), or the most likely per character of the choice (acc_norm)."""
    docs = [json.loads(line) for line in (TASKS / "facts.jsonl").read_text().splitlines()]
    hits = {"acc": 0, "acc_norm": 0}
    with torch.no_grad():
        for doc in docs:
            context = tokenizer(doc["question"])["input_ids"]
            scores = []
            for choice in doc["choices"]:
                whole = tokenizer(doc["question"] + " " + choice)["input_ids"]
                logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
                scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
            hits["acc"] += max(range(len(scores)), key=lambda i: scores[i]) == doc["answer"]
            normed = [s / len(c) for s, c in zip(scores, doc["choices"], strict=True)]
            hits["acc_norm"] += max(range(len(normed)), key=lambda i: normed[i]) == doc["answer"]
    return {k: v / len(docs) for k, v in hits.items()}


@requires_harness
@pytest.mark.parametrize("converted", [False, True], ids=["dense", "converted"])
def test_task_accuracy_equals_a_direct_computation(converted, tmp_path):
    model, tokenizer = tiny_with_tokenizer("llama", converted)
    checkpoint = save(model, tokenizer, tmp_path / "model")
    result = invoke("eval", checkpoint, "--tasks", TASK, "--include-path", TASKS, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    (task,) = scores["tasks"]
    assert (task["task"], task["samples"], task["num_fewshot"]) == (TASK, 20, 0)
    metrics = {m["name"]: m["value"] for m in task["metrics"]}
    assert metrics == pytest.approx(direct_scores(model, tokenizer), abs=1e-9)


@requires_harness
def test_task_options_and_table(tmp_path):
    model, tokenizer = tiny_with_tokenizer()
    scores = evaluate_model_tasks(model, tokenizer, [TASK], include_path=TASKS, limit=5, num_fewshot=2)
    (task,) = scores.tasks
    assert (task.samples, task.num_fewshot, scores.limit) == (5, 2, 5)
    assert [m.name for m in task.metrics] == ["acc", "acc_norm"] and all(m.stderr is not None for m in task.metrics)
    result = invoke("eval", save(model, tokenizer, tmp_path / "model"), "--tasks", TASK, "--include-path", TASKS,
                    "--limit", "4")
    assert result.exit_code == 0 and "d2mc_facts" in result.output and "acc_norm" in result.output


# ---- the real model -------------------------------------------------------------------------------------------

@pytest.mark.real_model
@pytest.mark.slow
@requires_real_model
def test_smollm2_artifact_perplexity_equals_pytorch(tmp_path):
    from d2mc.loading import load_model

    loaded = load_model("smollm2-135m")
    export_onnx(loaded.model, loaded.tokenizer, tmp_path / "artifact", source="smollm2-135m")
    torch_ppl = evaluate_perplexity("smollm2-135m")
    onnx_ppl = evaluate_perplexity(tmp_path / "artifact")
    assert relative_difference(onnx_ppl, torch_ppl) < PERPLEXITY_TOLERANCE["fp32"], (torch_ppl, onnx_ppl)
    assert 20 < torch_ppl.perplexity < 50  # held-out English news prose (33.7 measured)


@pytest.mark.real_model
@pytest.mark.slow
@requires_real_model
@requires_harness
def test_smollm2_answers_the_local_task():
    from d2mc.loading import load_model

    loaded = load_model("smollm2-135m")
    (task,) = evaluate_model_tasks(loaded.model, loaded.tokenizer, [TASK], include_path=TASKS).tasks
    metrics = {m.name: m.value for m in task.metrics}
    assert metrics == pytest.approx(direct_scores(loaded.model, loaded.tokenizer), abs=1e-9)
    assert metrics["acc"] >= 0.75  # far above chance (0.25): 0.9 measured
