"""The recover pass and the recovery training behind it, on tiny models built in code (seconds each)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from d2mc.arch import ModelArch
from d2mc.context import Context
from d2mc.convert import ConvertOptions, conversion_passes
from d2mc.errors import UserError
from d2mc.pipeline import PassManager, load_recipe
from d2mc.recovery import RecoveryOptions, train_recovery
from d2mc.recovery.data import (
    WindowDataset,
    cache_teacher_topk,
    check_no_overlap,
    generate_windows,
    source_text,
)
from d2mc.recovery.losses import balance_loss, hidden_loss, kl_full, kl_topk
from d2mc.recovery.trainable import block_boundaries, changed_blocks, router_gradients
from tests.conftest import requires_real_model, saved_tiny_conversion, tiny_model, tiny_tokenizer

TEXT = ("The council said the new bridge would open next year after a long delay. Fire crews worked through the "
        "night as strong winds pushed the blaze towards the town. The minister met union leaders on Tuesday to "
        "discuss pay and conditions in the public sector. ")


def converted(method="lfuc", plan="2-3,5-6", vocab=256, seed=0, top_k=1):
    """A tiny Llama converted with ``method``, and its dense parent as a frozen teacher."""
    model = tiny_model("llama", seed=seed, num_hidden_layers=8, vocab_size=vocab)
    ctx = Context(model=model, arch=ModelArch.from_config(model.config), teacher=copy.deepcopy(model),
                  calibration=torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0)))
    PassManager(conversion_passes(ConvertOptions(method=method, plan=plan, reconstruct_steps=20,
                                                             top_k=top_k))).run(ctx)
    return ctx


def windows(n=12, length=32, vocab=256, seed=1):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def objective(model, teacher, ids) -> float:
    """CE + KL of ``model`` on ``ids``: the training loss without the balance term."""
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return float(ce + kl_full(logits, teacher(ids, use_cache=False).logits, 1.0))


@pytest.mark.parametrize("train, top_k", [("routers", 2), ("blocks", 1), ("all", 1)])
def test_a_few_steps_lower_the_loss(train, top_k):
    """(A top-1 router changes the output only where its choice flips: routers alone are tested at top-2.)"""
    ctx = converted(top_k=top_k)
    data = windows()
    before = objective(ctx.model, ctx.teacher, data)
    options = RecoveryOptions(steps=12, seq_len=32, batch_size=4, lr=3e-3, train=train, warmup=0, log_every=4)
    summary = train_recovery(ctx.model, ctx.teacher, WindowDataset(data), options)
    after = objective(ctx.model, ctx.teacher, data)
    assert after < before, (before, after)
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 4 * 32
    assert [c["step"] for c in summary["curve"]] == [1, 4, 8, 12]
    assert summary["routers_with_gate_gradient"] == (2 if top_k == 1 else 0)


def test_what_trains():
    ctx = converted()
    before = copy.deepcopy(ctx.model.state_dict())
    train_recovery(ctx.model, ctx.teacher, WindowDataset(windows()),
                   RecoveryOptions(steps=3, seq_len=32, batch_size=2, lr=1e-3, train="routers"))
    changed = {k for k, v in ctx.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"model.layers.2.router.weight", "model.layers.4.router.weight"}
    assert all(p.requires_grad for p in ctx.model.parameters())  # flags restored after training


def test_the_routers_learning_rate_factor_scales_only_the_routers_steps():
    """AdamW's first step moves each weight by the learning rate times a ratio that does not depend on it, so from
    the same start on the same batch the routers move ``router_lr_factor`` times as far (up to the eps of the
    smallest gradients) and the rest alike."""
    start = converted()
    moved = []
    for factor in (1.0, 10.0):
        ctx = copy.deepcopy(start)
        train_recovery(ctx.model, ctx.teacher, WindowDataset(windows(n=2)),
                       RecoveryOptions(steps=1, seq_len=32, batch_size=2, lr=1e-3, warmup=0, schedule="constant",
                                       router_lr_factor=factor))
        moved.append({k: v - start.model.state_dict()[k] for k, v in ctx.model.state_dict().items()})
    routers = [k for k in moved[0] if k.endswith("router.weight")]
    assert len(routers) == 2
    for name, delta in moved[0].items():
        expected = delta * 10 if name in routers else delta
        assert torch.allclose(moved[1][name], expected, rtol=0.05, atol=1e-7), name  # Adam's eps
    with pytest.raises(UserError, match="factor"):
        RecoveryOptions(router_lr_factor=0)


def test_changed_blocks_of_each_method():
    assert changed_blocks(converted("lfuc").model) == [2, 4]  # the fused blocks
    assert changed_blocks(converted("drop-attention").model) == [3, 6]  # the blocks without attention
    assert changed_blocks(converted("drop-layers").model) == [2, 3, 4, 5]  # around the removed layers 3 and 6


def test_block_boundaries_pair_each_changed_block_with_a_parent_layer():
    # lfuc 2-3,5-6 of 8 layers: blocks 0 1 [2 3] 4 [5 6] 7; drop-layers 2-3,5-6 drops 3 and 6
    assert block_boundaries(converted("lfuc").model) == [(2, 3), (4, 6)]
    assert block_boundaries(converted("drop-layers").model) == [(2, 3), (3, 4), (4, 6), (5, 7)]


def test_the_hidden_state_loss_trains_towards_the_teacher_at_the_boundaries():
    ctx = converted()
    data = windows()
    boundaries = block_boundaries(ctx.model)

    def hidden_error() -> float:
        kept = {}
        handles = [ctx.model.model.layers[b].register_forward_hook(
            lambda m, a, o, b=b: kept.__setitem__(("s", b), o)) for b, _ in boundaries]
        handles += [ctx.teacher.model.layers[t].register_forward_hook(
            lambda m, a, o, b=b: kept.__setitem__(("t", b), o[0] if isinstance(o, tuple) else o))
            for b, t in boundaries]
        with torch.no_grad():
            ctx.model(data, use_cache=False)
            ctx.teacher(data, use_cache=False)
        for h in handles:
            h.remove()
        return float(hidden_loss([(kept[("s", b)], kept[("t", b)]) for b, _ in boundaries]))

    before = hidden_error()
    options = RecoveryOptions(steps=8, seq_len=32, batch_size=4, lr=1e-3, warmup=0, ce_weight=0, kl_weight=1e-6,
                              hidden_weight=1.0, train="blocks", log_every=4)
    summary = train_recovery(ctx.model, ctx.teacher, WindowDataset(data), options)
    assert hidden_error() < before
    assert "hidden" in summary["final"]


def test_drop_layers_has_no_routers_to_train():
    ctx = converted("drop-layers")
    with pytest.raises(UserError, match="has no routers"):
        train_recovery(ctx.model, ctx.teacher, WindowDataset(windows()),
                       RecoveryOptions(steps=1, seq_len=32, train="routers"))


def test_the_teacher_is_frozen():
    ctx = converted()
    reference = copy.deepcopy(ctx.teacher.state_dict())
    ctx.teacher.requires_grad_(True)  # even a teacher handed over trainable is frozen
    train_recovery(ctx.model, ctx.teacher, WindowDataset(windows()),
                   RecoveryOptions(steps=4, seq_len=32, batch_size=2, lr=1e-2, train="all"))
    state = ctx.teacher.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    assert all(p.grad is None and not p.requires_grad for p in ctx.teacher.parameters())


class Interrupt(TrainerCallback):
    """Stops a run right after the checkpoint of ``step`` is written, as a crash would."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path):
    data = windows(n=10)  # 5 batches per epoch: the run crosses epochs and is interrupted inside one
    options = RecoveryOptions(steps=8, seq_len=32, batch_size=2, lr=1e-3, train="all", save_steps=3, log_every=1)
    reference = converted()
    train_recovery(reference.model, reference.teacher, WindowDataset(data),
                   RecoveryOptions(**{**vars(options), "checkpoint_dir": str(tmp_path / "reference")}))
    options.checkpoint_dir = str(tmp_path / "checkpoints")
    first = converted()
    with pytest.raises(KeyboardInterrupt):
        train_recovery(first.model, first.teacher, WindowDataset(data), options, callbacks=[Interrupt(3)])
    resumed = converted()
    summary = train_recovery(resumed.model, resumed.teacher, WindowDataset(data), options)
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["steps"] == 8
    assert [c["step"] for c in summary["curve"]] == list(range(1, 9))  # the curve survives the interruption
    expected = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


def test_checkpoints_of_another_run_are_refused(tmp_path):
    options = RecoveryOptions(steps=3, seq_len=32, batch_size=2, save_steps=3, checkpoint_dir=str(tmp_path))
    ctx = converted()
    train_recovery(ctx.model, ctx.teacher, WindowDataset(windows()), options)
    other = RecoveryOptions(**{**vars(options), "lr": 1e-3})
    with pytest.raises(UserError, match=r"different recovery run \(differing: lr\)"):
        train_recovery(ctx.model, ctx.teacher, WindowDataset(windows()), other)


def test_gate_gradient_keeps_outputs_and_reaches_the_router():
    ctx = converted()
    ids = windows(n=2)
    block = ctx.model.model.layers[2]
    with torch.no_grad():
        reference = ctx.model(ids).logits
    ctx.model.zero_grad(set_to_none=True)
    ctx.model(ids).logits.sum().backward()
    assert block.router.weight.grad.abs().max() < 1e-9  # top-1, normalised: the gate is the constant p / p
    ctx.model.zero_grad(set_to_none=True)
    with router_gradients(ctx.model) as gated:
        logits = ctx.model(ids).logits
        logits.sum().backward()
    assert gated == 2 and torch.equal(logits.detach(), reference)
    assert block.router.weight.grad.abs().sum() > 0
    assert "route" not in vars(block) and not block.gate_gradient  # the block is as before


def test_balance_loss_is_switch_style():
    uniform = torch.zeros(8, 4)
    assert balance_loss([(uniform, 1)]).item() == pytest.approx(1.0)
    one_sided = torch.tensor([[10.0, 0.0]]).repeat(6, 1)  # every token to expert 0 with p ~ 1
    p0 = torch.softmax(one_sided[0], -1)[0].item()
    assert balance_loss([(one_sided, 1)]).item() == pytest.approx(2 * p0)
    assert balance_loss([]) is None


def test_topk_kl_matches_the_full_kl_when_k_is_the_vocabulary():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 16, generator=generator), torch.randn(2, 5, 16, generator=generator)
    for temperature in (1.0, 2.0):
        full = kl_full(student, teacher, temperature)
        logits = teacher / temperature
        top, idx = logits.topk(16, dim=-1)
        exact = kl_topk(student, top - logits.logsumexp(-1, keepdim=True), idx, temperature)
        torch.testing.assert_close(exact, full, rtol=1e-5, atol=1e-6)
        top, idx = logits.topk(4, dim=-1)
        coarse = kl_topk(student, top - logits.logsumexp(-1, keepdim=True), idx, temperature)
        assert 0 <= coarse <= full + 1e-6  # coarsening the distributions can only lower the KL


def test_cached_teacher_trains_like_the_online_teacher():
    data = windows()
    online, cached = converted(), converted()
    options = RecoveryOptions(steps=4, seq_len=32, batch_size=2, lr=1e-3, log_every=1, ce_weight=0)
    a = train_recovery(online.model, online.teacher, WindowDataset(data), options)
    cache = cache_teacher_topk(cached.teacher, data, k=256)  # the whole vocabulary: the same loss
    b = train_recovery(cached.model, None, WindowDataset(data, cache),
                       RecoveryOptions(**{**vars(options), "teacher_topk": 256}))
    for x, y in zip(a["curve"], b["curve"], strict=True):
        assert x["kl"] == pytest.approx(y["kl"], rel=1e-3, abs=1e-5)


def test_recover_pass_from_a_recipe(tmp_path):
    tokenizer = tiny_tokenizer()
    ctx = converted(vocab=len(tokenizer))
    ctx.tokenizer = tokenizer
    data = tmp_path / "train.txt"
    data.write_text(TEXT * 20)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'passes = ["recover"]\n[options.recover]\nsteps = 3\nseq_len = 32\nbatch_size = 2\n'
                      f'data = "{data}"\ntrain = "all"\n')
    PassManager(load_recipe(recipe)).run(ctx)
    result = ctx.results["recovery"]
    assert result["steps"] == 3 and result["data"]["source"] == str(data) and result["trained"] == "all"
    assert ctx.report["passes"][-1]["name"] == "recover"


@pytest.mark.parametrize("steps, warmup, expected", [(1, 0.05, 0), (1, 3, 0), (2, 5, 1), (100, 0.05, 5),
                                                      (100, 10, 10), (0, 0.05, 0)])
def test_warm_up_leaves_a_step_at_the_full_learning_rate(steps, warmup, expected):
    assert RecoveryOptions(steps=steps, warmup=warmup).warmup_steps == expected


def test_one_step_with_the_default_warm_up_changes_the_weights():
    ctx = converted()
    before = copy.deepcopy(ctx.model.state_dict())
    train_recovery(ctx.model, ctx.teacher, WindowDataset(windows()), RecoveryOptions(steps=1, seq_len=32, batch_size=2))
    assert any(not torch.equal(v, before[k]) for k, v in ctx.model.state_dict().items())


def test_evaluation_text_is_never_trained_on(tmp_path):
    tokenizer = tiny_tokenizer()
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text(TEXT * 10)
    with pytest.raises(UserError, match="is both the training data and the evaluation text"):
        RecoveryOptions(data=str(evaluation), eval_data=str(evaluation))
    link = tmp_path / "same.txt"
    link.symlink_to(evaluation)
    with pytest.raises(UserError, match="is both the training data and the evaluation text"):
        check_no_overlap(str(link), str(evaluation), link.read_text(), tokenizer)
    copied = tmp_path / "copy.txt"
    copied.write_text("Some other text first. " + evaluation.read_text())
    with pytest.raises(UserError, match="contains the evaluation passage"):
        check_no_overlap(str(copied), str(evaluation), copied.read_text(), tokenizer)
    reflowed = tmp_path / "reflowed.txt"
    reflowed.write_text("\n\n".join(" \n ".join(line.split()) for line in evaluation.read_text().splitlines()).upper())
    with pytest.raises(UserError, match="contains the evaluation passage"):
        check_no_overlap(str(reflowed), str(evaluation), reflowed.read_text(), tokenizer)
    other = tmp_path / "other.txt"
    other.write_text("An unrelated story about gardens, rivers and the people who fish in them. " * 20)
    check_no_overlap(str(other), str(evaluation), other.read_text(), tokenizer)  # no overlap: accepted


def test_the_built_in_evaluation_text_is_refused_as_training_data():
    from d2mc.data import corpus_path
    from d2mc.recovery import run_recovery

    tokenizer = tiny_tokenizer()
    ctx = converted(vocab=len(tokenizer))
    with pytest.raises(UserError, match="holds the evaluation text"):
        run_recovery(ctx.model, ctx.teacher, tokenizer, RecoveryOptions(steps=1, data=str(corpus_path())))


def test_a_datasets_name_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(UserError, match="pip install datasets"):
        source_text("wikitext:wikitext-2-raw-v1")


def test_the_teacher_writes_training_text_itself():
    tokenizer = tiny_tokenizer()
    teacher = tiny_model("llama", num_hidden_layers=2, vocab_size=len(tokenizer)).eval()
    first = generate_windows(teacher, tokenizer, sequences=5, seq_len=24, seed=3, batch_size=2)
    again = generate_windows(teacher, tokenizer, sequences=5, seq_len=24, seed=3, batch_size=2)
    assert first.shape == (5, 24) and torch.equal(first, again)
    prompt = tokenizer("The")["input_ids"]
    assert first[0, :len(prompt)].tolist() == prompt and len(set(first[:, -1].tolist())) > 1


def test_recovery_with_no_data_at_all():
    """``data="generate"``: the teacher writes the training text; one sequence per step and batch slot."""
    from d2mc.recovery import run_recovery

    tokenizer = tiny_tokenizer()
    ctx = converted(vocab=len(tokenizer))
    summary = run_recovery(ctx.model, ctx.teacher, tokenizer,
                           RecoveryOptions(steps=2, seq_len=16, batch_size=2, data="generate"))
    assert summary["data"]["source"] == "generate" and summary["data"]["sequences"] == 4
    assert summary["steps"] == 2 and summary["final"]["loss"] > 0
    assert "ce" not in summary["final"]  # the teacher's own samples: distillation only (ce_weight resolves to 0)


@pytest.mark.parametrize("data, given, expected", [("generate", None, 0.0), (None, None, 1.0), ("generate", 0.5, 0.5),
                                                   ("notes.txt", None, 1.0)])
def test_the_ce_weight_defaults_to_zero_only_on_generated_text(data, given, expected):
    assert RecoveryOptions(data=data, ce_weight=given).ce_weight == expected


@pytest.mark.slow
def test_two_processes_on_the_gloo_backend(tmp_path):
    """``torchrun --nproc_per_node 2 -m d2mc recover``: DDP over gloo on this CPU; the first process writes."""
    saved_tiny_conversion(tmp_path, TEXT * 20)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "d2mc",
         "recover", str(tmp_path / "converted"), "--teacher", str(tmp_path / "dense"), "-o", str(tmp_path / "out"),
         "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--data", str(tmp_path / "train.txt"),
         "--eval-tokens", "0", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # printed once: by the first process only
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["tokens"] == 3 * 2 * 32 * 2
    plan = json.loads((tmp_path / "out" / "d2mc_plan.json").read_text())
    assert plan["recovery"]["world_size"] == 2
    assert (tmp_path / "out" / "recovery_curve.png").exists()
    assert not (tmp_path / "out.checkpoints").exists()
    assert [p.name for p in Path(tmp_path).iterdir() if p.name.startswith(".out")] == []


@pytest.mark.real_model
@requires_real_model
def test_recovery_on_smollm2():
    """A few steps on the real model lower the training objective on the batch it trained on."""
    from d2mc.convert import convert
    from d2mc.loading import load_model

    loaded = load_model("smollm2-135m")
    teacher = copy.deepcopy(loaded.model)
    ctx = convert(loaded, ConvertOptions(method="drop-attention", plan="12-13,16-17", calib_sequences=2,
                                         calib_length=64))
    from d2mc.recovery.data import training_windows

    data = training_windows(loaded.tokenizer, None, 64)[:2]
    before = objective(ctx.model, teacher, data)
    summary = train_recovery(ctx.model, teacher, WindowDataset(data),
                             RecoveryOptions(steps=3, seq_len=64, batch_size=2, lr=1e-3, warmup=0,
                                             train="blocks"))
    assert objective(ctx.model, teacher, data) < before
    assert summary["blocks"] == [13, 17] and summary["trainable_parameters"] == 2 * (3 * 576 * 1536 + 576)
