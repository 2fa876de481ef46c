"""Where a model runs (device, dtype) and whether it fits, checked before any weight is read."""

import json

import pytest
import torch

from d2mc.errors import OptionError
from d2mc.loading import load_model
from d2mc.placement import (
    Placement,
    check_memory,
    model_bytes,
    needed_bytes,
    resolve_placement,
    training_bytes,
)
from tests.conftest import tiny_model

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")


@no_gpu
def test_auto_is_the_cpu_without_a_gpu():
    assert resolve_placement("auto", "bf16") == Placement("cpu", "bf16")


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "CUDA:0"])
def test_a_gpu_that_is_not_here_is_refused(device):
    with pytest.raises(OptionError, match=f"device {device}: no CUDA GPU is visible here"):
        resolve_placement(device)


@pytest.mark.parametrize("device, dtype, message", [
    ("tpu", "fp32", "device must be auto, cpu, cuda or cuda:N, not 'tpu'"),
    ("cuda:x", "fp32", "device must be auto, cpu, cuda or cuda:N, not 'cuda:x'"),
    ("cpu", "fp8", "dtype must be one of fp32, bf16, fp16, not 'fp8'"),
])
def test_bad_values_are_refused(device, dtype, message):
    with pytest.raises(OptionError, match=message):
        resolve_placement(device, dtype)


def test_fp16_training_on_a_cpu_is_refused_but_fp16_inference_runs():
    with pytest.raises(OptionError, match="dtype fp16 trains with mixed precision and loss scaling, which need a GPU"):
        resolve_placement("cpu", "fp16", training=True)
    assert resolve_placement("cpu", "fp16") == Placement("cpu", "fp16")
    assert resolve_placement("cpu", "bf16", training=True) == Placement("cpu", "bf16")


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    """A pre-Ampere GPU (compute capability 7.5) cannot run bf16: one line naming what it is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    with pytest.raises(OptionError, match="bf16 needs a GPU of compute capability 8.0 or newer; cuda:0 is 7.5"):
        resolve_placement("cuda", "bf16")
    assert resolve_placement("cuda", "fp16") == Placement("cuda:0", "fp16")
    with pytest.raises(OptionError, match="this machine has 1 GPU \\(cuda:0 to cuda:0\\)"):
        resolve_placement("cuda:2")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_checkpoint_loads_in_half_the_memory_with_close_logits(tiny_checkpoint, dtype):
    path = tiny_checkpoint("llama")
    full, half = load_model(path), load_model(path, placement=Placement("cpu", dtype))
    assert {p.dtype for p in half.model.parameters()} == {getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype])}
    assert sum(p.nbytes for p in half.model.parameters()) * 2 == sum(p.nbytes for p in full.model.parameters())
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b = full.model(ids).logits, half.model(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_the_estimate_counts_the_weights_in_their_dtype():
    from d2mc.arch import ModelArch

    model = tiny_model("llama")
    arch = ModelArch.from_config(model.config)
    assert model_bytes(arch, "fp32") == sum(p.nbytes for p in model.parameters())
    assert model_bytes(arch, "bf16") * 2 == model_bytes(arch, "fp32")
    assert needed_bytes(arch, "fp32", "convert") > needed_bytes(arch, "fp32", "inference")
    assert training_bytes(arch, Placement("cpu", "bf16"), shards=2) < training_bytes(arch, Placement("cpu", "bf16"))


def huge_checkpoint(path):
    """The config of a 70B-parameter Llama (no weights: the estimate must refuse before any is read)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}))
    return path


def test_a_model_too_large_for_the_memory_present_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.delenv("D2MC_SKIP_MEMORY_CHECK", raising=False)
    path = huge_checkpoint(tmp_path / "huge")
    with pytest.raises(OptionError, match=r"running this 70\.55B-parameter model in fp32 needs about \d+\.\d GiB of "
                                          r"memory and this machine has \d+\.\d GiB free: dtype bf16 halves"):
        load_model(path)
    with pytest.raises(OptionError, match="converting this 70.55B-parameter model in bf16 needs about"):
        load_model(path, placement=Placement("cpu", "bf16"), work="convert")


def test_the_memory_check_can_be_skipped(tmp_path, monkeypatch):
    from transformers import AutoConfig

    from d2mc.arch import ModelArch

    path = huge_checkpoint(tmp_path / "huge")
    arch = ModelArch.from_config(AutoConfig.from_pretrained(path))
    monkeypatch.setenv("D2MC_SKIP_MEMORY_CHECK", "1")
    check_memory(arch, Placement(), 1 << 60, "running")  # no error
