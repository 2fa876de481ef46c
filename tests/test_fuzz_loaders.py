"""Seeded fuzzing of what d2mc reads: checkpoints (safetensors, GGUF), an artifact's ONNX external data, device
profiles and recipes, each truncated or with one bit flipped. Every case ends in a one-line error or in a
verified result, never in another exception or a silent success:

- a checkpoint that loads must hold exactly what the damaged file says, read independently (nothing missing,
  guessed or filled with random values);
- an artifact either fails to load (one line), FAILS verification (exit 1), or PASSES; a PASS must agree with a
  verification of every position;
- a profile that loads must be exactly what its TOML says, with figures in their ranges; a recipe that loads
  must convert a model or stop with a one-line error.
"""

import math
import random
import shutil
import tomllib

import numpy as np
import pytest
import torch

from d2mc.cli import main
from d2mc.errors import UserError
from d2mc.loading import load_model
from d2mc.profiles import load_profile_file
from d2mc.restructure import dense_plan, restructure
from tests.conftest import tiny_model, tiny_tokenizer
from tests.gguf_file import write_llama_gguf

pytestmark = pytest.mark.usefixtures("single_thread")

SEED = 2026
CASES = 12  # per loader
ARTIFACT_CASES = 8  # each verifies an artifact


def damage(data: bytes, rng: random.Random, header: int) -> tuple[bytes, str]:
    """Truncate ``data`` or flip one bit of it (half of the flips within the first ``header`` bytes)."""
    if rng.random() < 0.35:
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated to {cut} of {len(data)} bytes"
    where = rng.randrange(min(header, len(data))) if rng.random() < 0.5 else rng.randrange(len(data))
    bit = rng.randrange(8)
    flipped = bytearray(data)
    flipped[where] ^= 1 << bit
    return bytes(flipped), f"bit {bit} of byte {where} flipped"


def one_line_error(call) -> str | None:
    """Run ``call``: None when it succeeds, the message when it raises a one-line UserError (anything else fails
    the test, as the bug it is)."""
    try:
        call()
    except UserError as exc:
        assert "\n" not in str(exc), str(exc)
        return str(exc)
    return None


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny_model("llama", num_hidden_layers=2, max_position_embeddings=64)
    model.save_pretrained(root / "checkpoint")
    write_llama_gguf(model, root / "model.gguf")
    return root


@pytest.mark.parametrize("case", range(CASES))
def test_damaged_safetensors(case, sources, tmp_path):
    from safetensors.numpy import load_file

    rng = random.Random(f"{SEED}-safetensors-{case}")
    shutil.copytree(sources / "checkpoint", tmp_path / "checkpoint")
    target = tmp_path / "checkpoint" / "model.safetensors"
    data, what = damage(target.read_bytes(), rng, header=int.from_bytes(target.read_bytes()[:8], "little") + 8)
    target.write_bytes(data)
    loaded = []
    if one_line_error(lambda: loaded.append(load_model(tmp_path / "checkpoint", tokenizer=False))) is None:
        # verified: every parameter is what the file holds, read by safetensors itself
        state = loaded[0].model.state_dict()
        written = load_file(target)
        assert set(written) <= set(state), what
        for name, tensor in state.items():
            reference = written.get(name, written.get("model.embed_tokens.weight") if name == "lm_head.weight"
                                    and loaded[0].config.tie_word_embeddings else None)
            assert reference is not None and np.array_equal(tensor.numpy(), reference), (what, name)


def _gguf_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a q or k projection (rotary pairs interleaved per head)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


GGUF_NAMES = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k"}


def _gguf_name(name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    _, _, layer, *module, _ = name.split(".")
    return f"blk.{layer}.{GGUF_NAMES['.'.join(module)]}.weight"


@pytest.mark.parametrize("case", range(CASES))
def test_damaged_gguf(case, sources, tmp_path):
    import gguf

    rng = random.Random(f"{SEED}-gguf-{case}")
    original = (sources / "model.gguf").read_bytes()
    header = gguf.GGUFReader(sources / "model.gguf").tensors[0].data_offset
    data, what = damage(original, rng, header)
    (tmp_path / "model.gguf").write_bytes(data)
    loaded = []
    if one_line_error(lambda: loaded.append(load_model(tmp_path / "model.gguf", tokenizer=False))) is None:
        # verified: the dimensions and every tensor are what gguf's own reader finds in the damaged file
        reader = gguf.GGUFReader(tmp_path / "model.gguf")
        tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
        config = loaded[0].config

        def field(key):
            return reader.fields[key].parts[-1][0]

        assert (config.num_hidden_layers, config.hidden_size, config.max_position_embeddings) == (
            field("llama.block_count"), field("llama.embedding_length"), field("llama.context_length")), what
        assert math.isclose(config.rms_norm_eps, field("llama.attention.layer_norm_rms_epsilon"), rel_tol=1e-6)
        for name, tensor in loaded[0].model.state_dict().items():
            weight = tensor.numpy()
            if name.endswith(("q_proj.weight", "k_proj.weight")):  # as the file lays them out
                heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
                weight = _gguf_permute(weight, heads)
            assert np.array_equal(weight, tensors[_gguf_name(name)]), (what, name)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny MoE model (a block of three experts) with a short context, and its exported artifact."""
    from d2mc.targets.onnxruntime import export_onnx

    root = tmp_path_factory.mktemp("artifact")
    plan = dense_plan(6)
    plan[2:5] = [{"attention_layer": 2, "expert_layers": [2, 3, 4], "shared_experts": 0, "top_k": 1,
                  "normalize_topk": True}]
    model = restructure(tiny_model("llama", max_position_embeddings=64), plan)
    torch.nn.init.normal_(model.model.layers[2].router.weight, std=0.5)
    model.save_pretrained(root / "model")
    export_onnx(model, None, root / "artifact", source=str(root / "model"))
    return root


@pytest.mark.parametrize("case", range(ARTIFACT_CASES))
def test_damaged_onnx_external_data(case, artifact, tmp_path, capsys):
    from d2mc.verify import verify_onnx

    rng = random.Random(f"{SEED}-onnx-{case}")
    shutil.copytree(artifact / "artifact", tmp_path / "artifact")
    target = tmp_path / "artifact" / "model.onnx.data"
    data, what = damage(target.read_bytes(), rng, header=4096)
    target.write_bytes(data)
    with pytest.raises(SystemExit) as info:
        main(["verify", str(tmp_path / "artifact"), "--model", str(artifact / "model")])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    assert info.value.code in (0, 1), what
    if info.value.code == 1:  # a one-line error, or a verification that FAILED
        assert (err.startswith("error: ") and err.count("\n") == 1) or "FAILED" in out, (what, out, err)
        return
    # a PASS must be true at every position, not only at the sampled ones
    model = load_model(artifact / "model", tokenizer=False).model
    assert verify_onnx(model, tmp_path / "artifact" / "model.onnx", positions=64).passed, what


PROFILE_FIELDS = ("memory_bandwidth_gbps", "memory_gb", "bandwidth_efficiency", "compute_efficiency",
                  "kernel_overhead_us")


@pytest.mark.parametrize("case", range(CASES))
def test_damaged_profile(case, tmp_path):
    from d2mc.profiles import builtin_profiles

    rng = random.Random(f"{SEED}-profile-{case}")
    source = builtin_profiles()[case % len(builtin_profiles())].path
    data, what = damage(source.read_bytes(), rng, header=400)
    (tmp_path / "profile.toml").write_bytes(data)
    profile = []
    if one_line_error(lambda: profile.append(load_profile_file(tmp_path / "profile.toml"))) is None:
        # verified: the figures are the TOML's and within their ranges
        parsed = tomllib.loads(data.decode())
        for key in PROFILE_FIELDS:
            value = getattr(profile[0], key)
            assert value == parsed[key] and math.isfinite(value) and value >= 0, (what, key)
        assert 0 < profile[0].bandwidth_efficiency <= 1 and 0 < profile[0].compute_efficiency <= 1, what
        assert all(math.isfinite(v) and v > 0 for v in profile[0].peak_tflops.values()), what


RECIPE = """passes = ["analyze-redundancy", "plan-fusion", "prune-attention", "fuse-experts", "insert-router",
          "reconstruct-blocks"]

[options.plan-fusion]
method = "lfuc"
plan = "2-3"
top_k = 1

[options.reconstruct-blocks]
steps = 2
"""


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny"
    tokenizer = tiny_tokenizer()
    tiny_model("llama", num_hidden_layers=6, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
               pad_token_id=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", range(CASES))
def test_damaged_recipe(case, checkpoint_with_tokenizer, tmp_path, monkeypatch, capsys):
    from d2mc.pipeline import load_recipe

    rng = random.Random(f"{SEED}-recipe-{case}")
    data, what = damage(RECIPE.encode(), rng, header=len(RECIPE))
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(data)
    if one_line_error(lambda: load_recipe(recipe)) is not None:
        return
    # verified: the recipe converts a model, or stops with one line and leaves nothing
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["convert", str(checkpoint_with_tokenizer), "--recipe", str(recipe), "-o", "out", "-q",
              "--calib-sequences", "2", "--calib-length", "32"])
        raise SystemExit(0)
    err = capsys.readouterr().err
    if info.value.code == 0:
        assert (tmp_path / "out" / "model.safetensors").is_file(), what
    else:
        assert info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, (what, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"], what
