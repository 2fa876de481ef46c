"""Recovery at scale on what a CPU can run: bf16 autocast, gradient checkpointing, a streamed source that resumes
at its position, accelerate configs checked against this machine, DDP through accelerate launch, and the teacher
sharded by FSDP2 over gloo."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from d2mc.errors import OptionError
from d2mc.recovery import RecoveryOptions, train_recovery
from d2mc.recovery.data import STREAM_POSITION, StreamedWindows, WindowDataset
from d2mc.recovery.launch import launch_command, read_launch_config
from tests.conftest import saved_tiny_conversion, tiny_tokenizer
from tests.passes.test_recover import TEXT, converted, objective, windows

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}


def test_bf16_autocast_trains_fp32_weights_on_the_cpu():
    data = windows()
    plain, mixed = converted(), converted()
    before = objective(mixed.model, mixed.teacher, data)
    options = RecoveryOptions(steps=4, seq_len=32, batch_size=2, lr=1e-3, train="all", device="cpu")
    train_recovery(plain.model, plain.teacher, WindowDataset(data), options)
    summary = train_recovery(mixed.model, mixed.teacher, WindowDataset(data),
                             RecoveryOptions(**{**vars(options), "dtype": "bf16"}))
    assert summary["dtype"] == "bf16" and summary["final"]["loss"] > 0
    assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}  # master weights stay fp32
    assert objective(mixed.model, mixed.teacher, data) < before
    start, a, b = converted().model.state_dict(), plain.model.state_dict(), mixed.model.state_dict()
    apart = sum(float((a[n] - b[n]).norm() ** 2) for n in a) ** 0.5
    trained = sum(float((a[n] - start[n]).norm() ** 2) for n in a) ** 0.5
    assert 0 < apart < 0.5 * trained  # bf16 matmuls round otherwise than fp32, far less than training moves


def test_a_bf16_model_trains_in_fp32_and_comes_back_in_bf16_leaving_a_shared_teacher():
    from d2mc.teacher import frozen_alias

    ctx = converted()
    ctx.model.to(torch.bfloat16)
    teacher = frozen_alias(ctx.model)  # the worst case: every weight shared with the teacher
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    train_recovery(ctx.model, teacher, WindowDataset(windows()),
                   RecoveryOptions(steps=2, seq_len=32, batch_size=2, lr=1e-2, train="all", dtype="bf16"))
    assert {p.dtype for p in ctx.model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in reference.items())
    assert any(not torch.equal(ctx.model.state_dict()[k], v) for k, v in reference.items())


def test_gradient_checkpointing_trains_to_the_same_weights():
    data = windows()
    runs = []
    for checkpointing in (False, True):
        ctx = converted()
        train_recovery(ctx.model, ctx.teacher, WindowDataset(data),
                       RecoveryOptions(steps=3, seq_len=32, batch_size=2, lr=1e-3, train="all",
                                       gradient_checkpointing=checkpointing))
        runs.append(ctx.model.state_dict())
    for name, value in runs[1].items():
        torch.testing.assert_close(value, runs[0][name], rtol=0, atol=1e-6, msg=name)


def dataset_directory(path: Path, rows: int = 12) -> Path:
    """A local dataset directory (two .jsonl files) standing in for a hub corpus."""
    path.mkdir()
    sentences = TEXT.split(". ")
    for part in range(2):
        with open(path / f"part-{part}.jsonl", "w") as f:
            for i in range(rows // 2):
                n = part * rows // 2 + i
                f.write(json.dumps({"text": f"Item {n}. " + ". ".join(sentences[: 1 + n % 3])}) + "\n")
    return path


class Interrupt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_a_stream_is_tokenised_on_the_fly_and_resumes_at_its_position(tmp_path):
    tokenizer = tiny_tokenizer()
    source = str(dataset_directory(tmp_path / "corpus"))
    stream = StreamedWindows(source, tokenizer, 16)
    everything = [w["input_ids"] for w in stream]
    assert len(everything) >= 6 and all(w.shape == (16,) for w in everything)
    position = stream.position(4)  # a fresh stream started there yields the windows from the fifth on
    assert [w["input_ids"].tolist() for w in StreamedWindows(source, tokenizer, 16, start=position)] == \
        [w.tolist() for w in everything[4:]]

    def run(checkpoint_dir, callbacks=()):
        ctx = converted(vocab=len(tokenizer))
        options = RecoveryOptions(steps=8, seq_len=16, batch_size=2, lr=1e-3, train="all", save_steps=2, log_every=1,
                                  data=source, stream=True, checkpoint_dir=str(checkpoint_dir))
        summary = train_recovery(ctx.model, ctx.teacher, StreamedWindows(source, tokenizer, 16), options,
                                 callbacks=callbacks)
        return ctx.model, summary

    reference, _ = run(tmp_path / "reference")  # 16 windows: the stream holds fewer, so the run crosses epochs
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "checkpoints", [Interrupt(4)])
    kept = json.loads((tmp_path / "checkpoints" / "checkpoint-4" / STREAM_POSITION).read_text())
    assert kept["windows"] == 8
    resumed, summary = run(tmp_path / "checkpoints")
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["steps"] == 8
    expected = reference.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


def test_a_stream_refuses_evaluation_passages(tmp_path):
    from d2mc.errors import UserError

    tokenizer = tiny_tokenizer()
    source = str(dataset_directory(tmp_path / "corpus"))
    with pytest.raises(UserError, match="the training text contains the evaluation passage 'Item 3"):
        list(StreamedWindows(source, tokenizer, 16, snippets=["Item 3. The council"]))


def config(tmp_path, text: str) -> Path:
    path = tmp_path / "accelerate.yaml"
    path.write_text(text)
    return path


DDP_CPU = "distributed_type: MULTI_GPU\nuse_cpu: true\nnum_processes: 2\nnum_machines: 1\nmixed_precision: 'no'\n"
FSDP = ("distributed_type: FSDP\nnum_processes: 8\nmixed_precision: bf16\nfsdp_config:\n  fsdp_version: {version}\n"
        "  fsdp_offload_params: false\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")
@pytest.mark.parametrize("text, dtype, message", [
    (FSDP.format(version=2), "bf16", "asks for FSDP, which accelerate .* runs only on GPUs, and this machine has none"),
    (FSDP.format(version=1), "bf16", "asks for FSDP version 1: d2mc shards the teacher with FSDP version 2"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n", "fp32",
     "asks for DeepSpeed, which is not installed: pip install deepspeed"),
    ("distributed_type: MULTI_GPU\nnum_processes: 8\n", "fp32", "asks for GPUs and this machine has none: set use_cpu"),
    ("distributed_type: MULTI_CPU\nnum_processes: 2\n", "fp32", "accelerate starts several MULTI_CPU processes"),
    (DDP_CPU, "bf16", "trains with mixed_precision no and dtype is bf16: make them agree"),
    (DDP_CPU.replace("'no'", "fp16"), "fp16", "fp16 mixed precision needs a GPU"),
    ("distributed_type: WARP_DRIVE\n", "fp32", "unknown distributed_type 'WARP_DRIVE'"),
    ("- just a list\n", "fp32", "is not an accelerate config"),
    ("a: [unclosed\n", "fp32", "is not YAML or JSON"),
])
def test_an_accelerate_config_this_machine_cannot_run_is_one_line(tmp_path, text, dtype, message):
    if "DEEPSPEED" in text and __import__("importlib").util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    with pytest.raises(OptionError, match=message):
        read_launch_config(config(tmp_path, text), dtype)


def test_a_ddp_config_launches_d2mc_under_accelerate(tmp_path):
    launch = read_launch_config(config(tmp_path, DDP_CPU), "fp32")
    assert (launch.distributed_type, launch.num_processes, launch.dtype) == ("MULTI_GPU", 2, "fp32")
    assert launch_command(launch, ["recover", "in", "-o", "out"])[1:] == [
        "-m", "accelerate.commands.launch", "--config_file", str(launch.path), "-m", "d2mc", "recover", "in", "-o",
        "out"]


def shipped_configs() -> list[str]:
    """The accelerate configs of docs/recovery.md, each a ```yaml block."""
    text = (ROOT / "docs" / "recovery.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```yaml\n")[1:]]


def test_the_configs_in_the_docs_pass_the_check_on_a_gpu_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    configs = [read_launch_config(config(tmp_path, text), "bf16") for text in shipped_configs()]
    assert [(c.distributed_type, c.num_processes, c.num_machines, c.fsdp_version) for c in configs] == [
        ("NO", 1, 1, None), ("FSDP", 8, 1, 2), ("FSDP", 16, 2, 2)]
    assert {c.dtype for c in configs} == {"bf16"}


@pytest.mark.slow
def test_recover_with_an_accelerate_config_runs_ddp_in_two_processes(tmp_path):
    """``d2mc recover --accelerate-config``: checked, then accelerate launch starts two gloo processes."""
    saved_tiny_conversion(tmp_path, TEXT * 20)
    result = subprocess.run(
        [sys.executable, "-m", "d2mc", "recover", str(tmp_path / "converted"), "--teacher", str(tmp_path / "dense"),
         "-o", str(tmp_path / "out"), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--data",
         str(tmp_path / "train.txt"), "--eval-tokens", "0", "--json", "--accelerate-config",
         str(config(tmp_path, DDP_CPU))], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["tokens"] == 2 * 2 * 32 * 2
    assert (tmp_path / "out" / "d2mc_plan.json").exists()


@pytest.mark.slow
def test_the_teacher_sharded_by_fsdp2_over_gloo_gives_the_whole_teachers_logits(tmp_path):
    """FSDP through the Trainer needs GPUs (accelerate runs DDP on a CPU); torch's FSDP2 itself runs on gloo, so the
    teacher's sharding is checked here: the same logits, half the weights in each process."""
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "fsdp_worker.py"), str(out)], capture_output=True, text=True,
                            env=ENV, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2 and all(r["frozen"] for r in ranks)
    assert all(r["max_abs_diff"] < 1e-5 for r in ranks)
    assert sum(r["local"] for r in ranks) == ranks[0]["whole"]
    assert all(r["local"] < 0.6 * r["whole"] for r in ranks)


@pytest.mark.slow
def test_fsdp2_trains_as_ddp_does_holding_half_the_student_in_each_of_two_gloo_processes(tmp_path):
    """benchmarks/distributed.py on a tiny model: the same losses step by step under both engines (the same data from
    the same weights), each FSDP process holding half of the student."""
    out = tmp_path / "distributed.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--shape", "tiny", "--steps",
                             "2", "--seq-len", "32", "--json", str(out)], capture_output=True, text=True, env=ENV,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp, fsdp = json.loads(out.read_text())["runs"]
    assert (ddp["engine"], fsdp["engine"]) == ("ddp", "fsdp") and len(fsdp["processes"]) == 2
    assert all(p["local_parameters"] == p["parameters"] for p in ddp["processes"])
    assert sum(p["local_parameters"] for p in fsdp["processes"]) == fsdp["processes"][0]["parameters"]
    losses = ddp["processes"][0]["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and fsdp["loss_difference"] < 1e-5
    assert fsdp["tokens_per_second"] > 0 and ddp["tokens_per_second"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="accelerate 1.15 turns FSDP on only for GPU process groups (on a CPU it runs DDP), so "
                           "FSDP recovery through the Trainer needs two GPUs; the teacher's FSDP2 sharding is "
                           "tested over gloo above and the configs below")
def test_recovery_under_fsdp_on_two_gpus(tmp_path):
    from d2mc.loading import load_model

    ctx = saved_tiny_conversion(tmp_path, TEXT * 20)
    fsdp = config(tmp_path, FSDP.format(version=2).replace("num_processes: 8", "num_processes: 2"))
    result = subprocess.run(
        [sys.executable, "-m", "d2mc", "recover", str(tmp_path / "converted"), "--teacher", str(tmp_path / "dense"),
         "-o", str(tmp_path / "out"), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--dtype", "bf16",
         "--data", str(tmp_path / "train.txt"), "--eval-tokens", "0", "--json", "--accelerate-config", str(fsdp)],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["world_size"] == 2
    reloaded = load_model(tmp_path / "out")
    assert reloaded.model.config.blocks == ctx.model.config.blocks
