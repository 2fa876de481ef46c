"""Bad input to every command: exit code 1, one line on stderr, no traceback, nothing new on disk, and, where the
input can be checked before the model's weights are read, no weights read.

Each row is ``(command line, the start of the error, checked before the weights load)``. ``{NAME}`` in a command
line is a path from the ``inputs`` fixture; every command runs in a fresh empty working directory.
"""

import importlib.util
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2mc.cli import main
from d2mc.data import corpus_path, read_text
from d2mc.outputs import atomic_output_dir
from tests.conftest import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_TOML = """name = "tiny"
description = "a tiny device"
kind = "cpu"
memory_bandwidth_gbps = 10
memory_gb = 1
bandwidth_efficiency = 0.5
compute_efficiency = 0.5
kernel_overhead_us = 1
[peak_tflops]
fp32 = 1
[source]
memory_bandwidth_gbps = "test"
memory_gb = "test"
bandwidth_efficiency = "test"
compute_efficiency = "test"
kernel_overhead_us = "test"
peak_tflops = "test"
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Inputs, good and bad, shared by the rows: a tiny checkpoint with a tokenizer, its artifact, broken copies."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = tiny_tokenizer()
    tiny = root / "tiny"
    tiny_model("llama", num_hidden_layers=8, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
               pad_token_id=2).save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    from d2mc.targets.onnxruntime import export_onnx

    from d2mc.loading import load_model

    loaded = load_model(tiny)
    export_onnx(loaded.model, loaded.tokenizer, root / "artifact", source=str(tiny))
    export_onnx(loaded.model, None, root / "trt-artifact", flavour="tensorrt", source=str(tiny), verify=False)
    paths = {"tiny": tiny, "artifact": root / "artifact", "trt": root / "trt-artifact"}
    tiny_model("llama", num_hidden_layers=2).save_pretrained(root / "no-tokenizer")
    paths["no-tokenizer"] = root / "no-tokenizer"
    state = load_file(tiny / "model.safetensors")
    for name, change in (("missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
                         ("extra", lambda s: s.__setitem__("model.layers.1.mlp.extra.weight", torch.zeros(3))),
                         ("nan", lambda s: s["model.layers.2.mlp.down_proj.weight"].__setitem__((0, 0),
                                                                                              float("nan")))):
        shutil.copytree(tiny, root / name)
        broken = dict(state)
        change(broken)
        save_file(broken, root / name / "model.safetensors", metadata={"format": "pt"})
        paths[name] = root / name
    (root / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (root / "notes.txt").write_text("not a model\n")
    (root / "empty.txt").write_text("  \n")
    (root / "garbage.gguf").write_bytes(b"GGUF" + os.urandom(500))
    (root / "dir.gguf").mkdir()
    (root / "dir.toml").mkdir()
    (root / "no-config").mkdir()
    (root / "gpt2").mkdir()
    (root / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (root / "binary-config").mkdir()
    (root / "binary-config" / "config.json").write_bytes(os.urandom(300))
    (root / "profile.toml").write_text(TINY_TOML)
    (root / "huge").mkdir()  # a config of 1.2 trillion parameters, no weights: refused by the memory estimate
    (root / "huge" / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32768,
        "intermediate_size": 131072, "num_hidden_layers": 80, "num_attention_heads": 256, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 4096, "tie_word_embeddings": False}))
    for name, text in (("fsdp1", "distributed_type: FSDP\nmixed_precision: bf16\nfsdp_config:\n  fsdp_version: 1\n"),
                       ("deepspeed", "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n"),
                       ("warp", "distributed_type: WARP_DRIVE\n"),
                       ("ddp-bf16", "distributed_type: MULTI_GPU\nuse_cpu: true\nmixed_precision: bf16\n")):
        (root / f"{name}.yaml").write_text(text)
    (root / "no-int4.toml").write_text(TINY_TOML.replace("[peak_tflops]", 'tensorrt_precisions = ["fp32", "fp16", '
                                                         '"int8"]\n[peak_tflops]') + 'tensorrt_precisions = "test"\n')
    heldout = (root / "heldout-copy.txt")
    heldout.write_text(read_text(corpus_path())[-6000:])
    (root / "nan-free-bad.toml").write_text(TINY_TOML.replace("kind = \"cpu\"", "kind = \"fpga\""))
    (root / "binary.toml").write_bytes(os.urandom(300))
    (root / "recipe-unknown.toml").write_text('passes = ["analyze-redundancy", "no-such-pass"]\n')
    (root / "recipe-binary.toml").write_bytes(os.urandom(200))
    (root / "recipe-reuse.toml").write_text('passes = ["analyze-redundancy", "plan-fusion", "prune-attention", '
                                             '"fuse-experts", "insert-router", "reconstruct-blocks"]\n'
                                             '[options.plan-fusion]\nplan = "2-3"\n'
                                             '[options.reconstruct-blocks]\nreuse_search = "yes"\n')
    corrupt = root / "corrupt-artifact"
    shutil.copytree(root / "artifact", corrupt)
    (corrupt / "d2mc_artifact.json").write_text("{not json")
    for name in ("binary.txt", "notes.txt", "empty.txt", "garbage.gguf", "dir.gguf", "dir.toml", "no-config",
                 "gpt2", "binary-config", "profile.toml", "no-int4.toml", "heldout-copy.txt", "nan-free-bad.toml",
                 "binary.toml", "recipe-unknown.toml", "recipe-binary.toml", "recipe-reuse.toml", "corrupt-artifact",
                 "huge", "fsdp1.yaml", "deepspeed.yaml", "warp.yaml", "ddp-bf16.yaml"):
        paths[name.replace(".", "-")] = root / name
    victim = root / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    paths["victim"] = victim
    with atomic_output_dir(root / "old-output") as out:
        (out / "report.md").write_text("# an earlier run\n")
    paths["old-output"] = root / "old-output"
    paths["root"] = root
    return paths


T, A = "{tiny}", "{artifact}"
CALIB = ["--calib-sequences", "2", "--calib-length", "32"]

# (command line, start of the error, checked before any weights are read)
ROWS = [
    # inspect
    (["inspect", "/no/such/model"], "no such file or directory", True),
    (["inspect", "{notes-txt}"], "'{notes-txt}' is a file: give a checkpoint directory", True),
    (["inspect", "{no-config}"], "'{no-config}' has no config.json", True),
    (["inspect", "{gpt2}"], "unsupported architecture 'gpt2'", True),
    (["inspect", "{binary-config}"], "cannot read the config of", True),
    (["inspect", "{garbage-gguf}"], "cannot read GGUF file", True),
    (["inspect", "{dir-gguf}"], "'{dir-gguf}' is a directory, not a GGUF file", True),
    (["inspect", "{missing}"], "'{missing}' lacks 1 weight the model needs (model.layers.1.mlp.up_proj.weight)",
     False),
    (["inspect", "{extra}"], "'{extra}' holds 1 tensor the model has no place for", False),
    (["inspect", "{nan}"], "'{nan}' holds NaN or infinite values in model.layers.2.mlp.down_proj.weight", False),
    # option values click itself refuses
    (["profile", T, "--prefill", "abc"], "Invalid value for '--prefill': 'abc' is not a valid integer", True),
    (["export", T, "-o", "out", "--precision", "fp8"], "Invalid value for '--precision'", True),
    (["build", "{trt}", "--plugin", "/no/such.so"], "Invalid value for '--plugin'", True),
    (["no-such-command"], "No such command 'no-such-command'", True),
    # targets
    (["targets", "mars-rover"], "unknown device profile 'mars-rover'", True),
    (["targets", "{dir-toml}"], "device profile '{dir-toml}' is a directory", True),
    (["targets", "{binary-toml}"], "device profile '{binary-toml}': not valid TOML", True),
    (["targets", "{nan-free-bad-toml}"], "device profile '{nan-free-bad-toml}': field 'kind' must be one of", True),
    # profile
    (["profile"], "give a MODEL (or --measure-host)", True),
    (["profile", T, "--target", "{dir-toml}"], "device profile '{dir-toml}' is a directory", True),
    (["profile", T, "-o", "{notes-txt}/out"], "cannot write '{notes-txt}/out': '{notes-txt}' is a file", True),
    (["profile", T, "-o", "{victim}", "--overwrite"], "'{victim}' was not written by d2mc", True),
    (["profile", T, "-o", "{old-output}"], "output '{old-output}' already exists: remove it or pass --overwrite",
     True),
    (["profile", T, "-o", ".", "--overwrite"], "output '.' is the working directory or a directory above it", True),
    (["profile", T, "-o", "..", "--overwrite"], "output '..' is the working directory or a directory above it",
     True),
    (["profile", "--measure-host", "-o", "{notes-txt}"], "'{notes-txt}' has no .toml extension", True),
    (["profile", "--measure-host", "-o", "{binary-toml}", "--overwrite"], "'{binary-toml}' was not written by d2mc",
     True),
    (["profile", "--measure-host", "-o", "{profile-toml}"], "output '{profile-toml}' already exists", True),
    # analyze
    (["analyze", T, "--plot", "{notes-txt}/x.png"], "cannot write '{notes-txt}/x.png': '{notes-txt}' is a file",
     True),
    (["analyze", T, "--plot", "{victim}"], "'{victim}' is a directory: give a file name", True),
    (["analyze", T, "--plot", "plot.txt"], "'plot.txt' has no .png or .pdf or .svg extension", True),
    (["analyze", T, "--calib-data", "{binary-txt}"], "'{binary-txt}' is not text", True),
    (["analyze", T, "--calib-data", "{empty-txt}"], "'{empty-txt}' holds no text", True),
    (["analyze", T, "--calib-data", "/no/such.txt"], "no such text file: '/no/such.txt'", True),
    (["analyze", T, "--calib-sequences", "0"], "--calib-sequences must be at least 1, not 0", True),
    (["analyze", T, "--calib-length", "100000"], "--calib-length 100000 is longer than the model's 512 positions",
     True),
    # convert
    (["convert", T, "--plan", "2-x", "-o", "out", *CALIB], "bad plan group '2-x'", True),
    (["convert", T, "--plan", "2-30", "-o", "out", *CALIB], "plan group '2-30' is out of range", True),
    (["convert", T, "--plan", "2-4,4-5", "-o", "out", *CALIB], "plan groups", True),
    (["convert", T, "--plan", "2-3", "-o", "out", "--calib-length", "4096"],
     "--calib-length 4096 is longer than the model's 512 positions", True),
    (["convert", T, "--plan", "2-3", "-o", "out", "--calib-data", "{binary-txt}"], "'{binary-txt}' is not text",
     True),
    (["convert", T, "--plan", "2-3", "-o", "{old-output}"], "output '{old-output}' already exists", True),
    (["convert", T, "--plan", "2-3", "-o", "{notes-txt}/out"], "cannot write '{notes-txt}/out'", True),
    (["convert", T, "--plan", "2-3", "-o", "{victim}", "--overwrite"], "'{victim}' was not written by d2mc", True),
    (["convert", T, "--speedup", "1.2", "--target", "{dir-toml}", "-o", "out"], "device profile '{dir-toml}' is a",
     True),
    (["convert", T, "--recipe", "{recipe-unknown-toml}", "-o", "out"], "unknown pass 'no-such-pass'", True),
    (["convert", T, "--recipe", "{recipe-binary-toml}", "-o", "out"], "recipe '{recipe-binary-toml}': not valid",
     True),
    (["convert", T, "--recipe", "{recipe-reuse-toml}", "-o", "out"],
     "reconstruct-blocks: reuse_search is true or false, not 'yes'", True),
    (["convert", T, "--recipe", "/no/such/recipe.toml", "-o", "out"], "recipe '/no/such/recipe.toml' does not",
     True),
    (["convert", T, "--plan", "2-3", "--recover-steps", "2", "--recover-seq-len", "9999", "-o", "out", *CALIB],
     "--recover-seq-len 9999 is longer than the model's 512 positions", True),
    (["convert", "{missing}", "--plan", "2-3", "-o", "out"], "'{missing}' lacks 1 weight", False),
    (["convert", T, "--plan", "2-3", "--reconstruct-steps", "-1", "-o", "out"],
     "--reconstruct-steps must be at least 0, not -1", True),
    (["convert", T, "--remove-attention", "100", "-o", "out"], "--remove-attention 100: the model has 8 layers", True),
    (["convert", T, "--speedup", "1.2", "-o", "out"], "--budget-ms and --speedup need a device profile", True),
    (["convert", T, "--plan", "2-3", "--top-k", "0", "-o", "out"], "--top-k must be at least 1", True),
    (["convert", T, "--method", "split-experts", "--layers", "1-x", "-o", "out"], "bad layer range '1-x'", True),
    (["convert", T, "--method", "auto", "--speedup", "50", "--target", "orin-agx", "--context", "256", "-o", "out"],
     "--speedup 50 is out of reach on orin-agx at context 256", True),
    (["convert", T, "--method", "auto", "--budget-ms", "0.001", "--target", "orin-agx", "--context", "256", "-o",
      "out"], "--budget-ms 0.001 is out of reach on orin-agx at context 256", True),
    (["convert", T, "--method", "auto", "--speedup", "1.1", "--target", "orin-agx", "--context", "100000", "-o",
      "out"], "--context 100000 is past the model's maximum of 512 positions", True),
    (["convert", T, "--method", "auto", "--target", "orin-agx", "-o", "out"],
     "--method auto needs --budget-ms or --speedup", True),
    (["convert", T, "--method", "auto", "--plan", "2-3", "-o", "out"], "--plan does not apply to --method auto",
     True),
    # recover
    (["recover", T, "-o", "out", "--steps", "1"], "'{tiny}' is not a converted model", False),
    (["recover", T, "-o", "{old-output}"], "output '{old-output}' already exists", True),
    (["recover", T, "-o", "out", "--steps", "-1"], "recovery steps must be zero or more", True),
    (["recover", T, "-o", "out", "--warmup", "-1"], "--warmup must be zero or more", True),
    (["recover", T, "-o", "out", "--lr", "0"], "the learning rate and the temperature must be positive", True),
    (["recover", T, "-o", "out", "--ce-weight", "-1"], "loss weights must be zero or more", True),
    (["recover", T, "-o", "out", "--router-lr-factor", "0"], "--router-lr-factor must be positive, not 0.0", True),
    (["recover", T, "-o", "out", "--lr", "nan"], "--lr must be a finite number, not nan", True),
    (["recover", T, "-o", "out", "--seq-len", "9999"], "--seq-len 9999 is longer than the model's 512 positions",
     True),
    # where the model runs, and whether it fits
    (["analyze", T, "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, not 'tpu'", True),
    (["convert", T, "--plan", "2-3", "--dtype", "fp8", "-o", "out"], "--dtype must be one of fp32, bf16, fp16", True),
    (["convert", T, "--plan", "2-3", "--recover-steps", "2", "--dtype", "fp16", "-o", "out"],
     "--dtype fp16 trains with mixed precision and loss scaling, which need a GPU", True),
    (["recover", T, "-o", "out", "--dtype", "fp16", "--device", "cpu"], "--dtype fp16 trains with mixed precision",
     True),
    (["analyze", "{huge}"], "running this 1216.37B-parameter model in fp32 needs about 5891.7 GiB of memory", True),
    (["convert", "{huge}", "--plan", "2-3", "-o", "out", "--dtype", "bf16"],
     "converting this 1216.37B-parameter model in bf16 needs about", True),
    (["export", "{huge}", "-o", "out"], "exporting this 1216.37B-parameter model in fp32 needs about", True),
    (["recover", T, "-o", "out", "--accelerate-config", "/no/such.yaml"], "--accelerate-config: no such file", True),
    (["recover", T, "-o", "out", "--accelerate-config", "{fsdp1-yaml}"],
     "--accelerate-config '{fsdp1-yaml}' asks for FSDP version 1: d2mc shards the teacher with FSDP version 2", True),
    (["recover", T, "-o", "out", "--accelerate-config", "{warp-yaml}"],
     "--accelerate-config '{warp-yaml}': unknown distributed_type 'WARP_DRIVE'", True),
    (["recover", T, "-o", "out", "--accelerate-config", "{ddp-bf16-yaml}"],
     "--accelerate-config '{ddp-bf16-yaml}' trains with mixed_precision bf16 and --dtype is fp32", True),
    *([(["recover", T, "-o", "out", "--accelerate-config", "{deepspeed-yaml}"],
        "--accelerate-config '{deepspeed-yaml}' asks for DeepSpeed, which is not installed", True)]
      if importlib.util.find_spec("deepspeed") is None else []),
    (["eval", T, "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, not 'tpu'", True),
    (["eval", T, "--dtype", "fp8"], "--dtype must be one of fp32, bf16, fp16", True),
    (["eval", A, "--dtype", "bf16"], "--device and --dtype place a PyTorch model, and an artifact runs in ONNX Runtime",
     True),
    (["verify", A, "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, not 'tpu'", True),
    (["verify", A, "--dtype", "fp8"], "--dtype must be one of fp32, bf16, fp16", True),
    (["verify", A, "--dtype", "bf16"], "--dtype bf16 is less precise than the artifact's fp32 activations", True),
    (["verify", A, "--backend", "tensorrt", "--dtype", "fp16"],
     "--device and --dtype place a PyTorch model, and the tensorrt backend compares the engine", True),
    (["profile", T, "--measure", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, not 'tpu'", True),
    (["profile", T, "--measure", "--dtype", "fp8"], "--dtype must be one of fp32, bf16, fp16", True),
    (["profile", T, "--dtype", "bf16"], "--device and --dtype place a PyTorch model, and only --measure runs one",
     True),
    (["profile", A, "--measure", "--dtype", "bf16"], "--device and --dtype place a PyTorch model, and only --measure",
     True),
    *([(["analyze", T, "--device", "cuda"], "--device cuda: no CUDA GPU is visible here", True),
       (["convert", T, "--plan", "2-3", "--device", "cuda:1", "-o", "out"], "--device cuda:1: no CUDA GPU", True),
       (["recover", T, "-o", "out", "--device", "cuda"], "--device cuda: no CUDA GPU is visible here", True),
       (["eval", T, "--device", "cuda"], "--device cuda: no CUDA GPU is visible here", True),
       (["verify", A, "--device", "cuda"], "--device cuda: no CUDA GPU is visible here", True),
       (["profile", T, "--measure", "--device", "cuda"], "--device cuda: no CUDA GPU is visible here", True)]
      if not torch.cuda.is_available() else []),
    # export
    (["export", "/no/such/model", "-o", "out"], "no such file or directory", True),
    (["export", T, "-o", "{old-output}"], "output '{old-output}' already exists", True),
    (["export", T, "-o", "{victim}", "--overwrite"], "'{victim}' was not written by d2mc", True),
    (["export", T, "-o", ".", "--overwrite"], "output '.' is the working directory", True),
    (["export", "{missing}", "-o", "out"], "'{missing}' lacks 1 weight", False),
    (["export", "{nan}", "-o", "out"], "'{nan}' holds NaN or infinite values", False),
    (["export", T, "-o", "out", "--precision", "int4", "--block-size", "128"],
     "--block-size 128 does not divide the hidden size (64) of the model: use --block-size 64 or 32", True),
    (["export", T, "-o", "out", "--block-size", "64"],
     "--block-size quantize weights: they need --precision int4 or int8, not fp32", True),
    (["export", T, "-o", "out", "--precision", "fp16", "--quant-method", "rtn"],
     "--quant-method quantize weights: they need --precision int4 or int8, not fp16", True),
    (["export", T, "-o", "out", "--precision", "int8", "--calib-data", "{notes-txt}"],
     "--calib-data is the calibration text of GPTQ and calibrated mixed precision: rtn with --mixed-precision none "
     "reads no data", True),
    (["export", T, "-o", "out", "--format", "tensorrt", "--precision", "int4", "--block-size", "32"],
     "--block-size 32 cannot go to TensorRT, which takes int4 weights in blocks of 64 or 128", True),
    (["export", T, "-o", "out", "--format", "tensorrt", "--precision", "int8"],
     "--precision int8 cannot go to TensorRT: TensorRT dequantizes int8 weights with one scale per channel", True),
    (["export", T, "-o", "out", "--format", "tensorrt", "--precision", "int4", "--lm-head-precision", "int8"],
     "--lm-head-precision int8 cannot go to TensorRT", True),
    (["export", T, "-o", "out", "--format", "tensorrt", "--precision", "int4", "--quant-method", "hqq"],
     "--quant-method hqq cannot go to TensorRT: HQQ's zero points are floats and ONNX DequantizeLinear takes only "
     "integer ones; use --quant-method rtn or gptq, or the onnxruntime format", True),
    (["export", T, "-o", "out", "--format", "tensorrt", "--precision", "int4", "--accuracy-level", "4"],
     "--accuracy-level sets ONNX Runtime's MatMulNBits compute: the tensorrt format dequantizes to fp16", True),
    (["export", T, "-o", "out", "--precision", "int8", "--mixed-precision", "mixed-layers"],
     "--mixed-precision mixed-layers moves int4 matrices to int8: it needs --precision int4, not int8", True),
    (["export", T, "-o", "out", "--precision", "int8", "--mixed-precision", "calibrated"],
     "--mixed-precision calibrated moves int4 matrices to int8: it needs --precision int4, not int8", True),
    (["export", "{no-tokenizer}", "-o", "out", "--format", "tensorrt", "--precision", "int4"],
     "--quant-method rtn with --mixed-precision calibrated reads calibration text, which needs the model's tokenizer: "
     "save the tokenizer beside the weights, or choose --mixed-precision none", False),
    (["export", T, "-o", "out", "--format", "tensorrt", "--precision", "int4", "--mixed-precision", "mixed-layers"],
     "--mixed-precision mixed-layers cannot go to TensorRT: its rule by layer would put an MoE block's experts", True),
    (["export", T, "-o", "out", "--precision", "int4", "--mixed-precision", "calibrated", "--moe-op", "contrib"],
     "--mixed-precision calibrated cannot go to --moe-op contrib: com.microsoft::QMoE takes one bit width", True),
    (["export", T, "-o", "out", "--precision", "int4", "--quant-method", "hqq", "--moe-op", "contrib"],
     "--quant-method hqq cannot go to --moe-op contrib: com.microsoft::QMoE takes only integer zero points; use "
     "--moe-op dispatch", True),
    # run
    (["run", A, "hello", "--temperature", "-1"], "--temperature must be above 0, not -1", True),
    (["run", A, "hello", "--temperature", "nan"], "--temperature must be a finite number", True),
    (["run", A, "hello", "--top-p", "7"], "--top-p must be at most 1, not 7", True),
    (["run", A, "hello", "--top-p", "0"], "--top-p must be above 0, not 0", True),
    (["run", A, "hello", "--top-k", "0"], "--top-k must be at least 1, not 0", True),
    (["run", A, "hello", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, not 0", True),
    (["run", A, "hello", "--seed", "-3"], "--seed must be at least 0, not -3", True),
    (["run", A, ""], "the prompt is empty", True),
    (["run", A, "the council " * 400], "the prompt is 2002 tokens long and the model's context 512", True),
    (["run", "/no/such/artifact", "hello"], "no artifact directory at '/no/such/artifact'", True),
    (["run", "{tiny}", "hello"], "'{tiny}' is not a complete d2mc artifact", True),
    (["run", "{trt}", "hello"], "'{trt}' is a tensorrt artifact", True),
    # compile
    (["compile", T, "-o", "{old-output}"], "output '{old-output}' already exists", True),
    (["compile", T, "-o", "{notes-txt}/out"], "cannot write '{notes-txt}/out'", True),
    (["compile", T, "-o", ".", "--overwrite"], "output '.' is the working directory", True),
    (["compile", T, "--target", "{dir-toml}", "-o", "out"], "device profile '{dir-toml}' is a directory", True),
    (["compile", T, "--plan", "2-x", "-o", "out"], "bad plan group '2-x'", True),
    (["compile", T, "--context", "100000", "-o", "out"], "--context 100000 is past the model's maximum of 512", True),
    (["compile", T, "--eval-tokens", "-5", "-o", "out"], "--eval-tokens must be at least 0, not -5", True),
    (["compile", T, "--calib-length", "600", "-o", "out"], "--calib-length 600 is longer than the model's 512", True),
    (["compile", T, "--tasks", "no_such_task", "--context", "256", "-o", "out"], "unknown task 'no_such_task' for --tasks", True),
    (["compile", T, "--speedup", "40", "--context", "256", "-o", "out"],  # auto, compile's default method
     "--speedup 40 is out of reach on orin-agx at context 256", True),
    (["compile", T, "--method", "auto", "--top-k", "2", "--context", "256", "-o", "out"],
     "--top-k does not apply to --method auto", True),
    (["compile", T, "--precision", "int4", "--target", "{no-int4-toml}", "--context", "256", "-o", "out"],
     "--precision int4 is not a precision tiny's TensorRT supports (fp32, fp16, int8)", True),
    (["compile", T, "--precision", "int4", "--block-size", "128", "--context", "256", "-o", "out"],
     "--block-size 128 does not divide the hidden size (64)", True),
    (["compile", T, "--quant-method", "rtn", "--context", "256", "-o", "out"], "--quant-method quantize weights", True),
    (["compile", T, "--host-profile", "fastest", "--context", "256", "-o", "out"],
     "--host-profile must be auto, measure, shipped or a device profile .toml file, not 'fastest'", True),
    (["compile", T, "--host-profile", "{notes-txt}/none.toml", "--context", "256", "-o", "out"],
     "device profile '{notes-txt}/none.toml' does not exist", True),
    (["compile", T, "--precision", "int8", "--context", "256", "-o", "out"], "--precision int8 cannot go to TensorRT", True),
    (["compile", T, "--precision", "int4", "--quant-method", "hqq", "--context", "256", "-o", "out"],
     "--quant-method hqq cannot go to TensorRT", True),
    # build
    (["build", "{trt}", "--workspace-gb", "-1", "--no-build"], "--workspace-gb must be above 0, not -1", True),
    (["build", "{trt}", "--workspace-gb", "nan", "--no-build"], "--workspace-gb must be a finite number", True),
    (["build", "{trt}", "--max-batch", "0", "--no-build"], "--max-batch must be at least 1, not 0", True),
    (["build", "/no/such/artifact", "--no-build"], "no artifact directory at '/no/such/artifact'", True),
    (["build", "{trt}", "--target", "mars-rover", "--no-build"], "unknown device profile 'mars-rover'", True),
    # verify
    (["verify", "/no/such/artifact"], "no artifact directory at '/no/such/artifact'", True),
    (["verify", "{victim}"], "'{victim}' holds no model.onnx", True),
    (["verify", A, "--prefill", "0"], "--prefill must be at least 1, not 0", True),
    (["verify", A, "--positions", "-1"], "--positions must be at least 0, not -1", True),
    (["verify", "{corrupt-artifact}"], "'{corrupt-artifact}/d2mc_artifact.json' is corrupt", True),
    (["verify", A, "--model", "/no/such/model"], "no such file or directory: '/no/such/model'", True),
    (["verify", A, "--model", "{missing}"], "'{missing}' lacks 1 weight", False),
]


def tree(*roots) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")}


def fill(text: str, paths: dict) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.mark.parametrize("args, message, early", ROWS, ids=[" ".join(r[0])[:60] for r in ROWS])
def test_bad_input_is_one_line_and_leaves_nothing(args, message, early, inputs, tmp_path, monkeypatch, capsys):
    check_refused(args, message, early, inputs, tmp_path, monkeypatch, capsys)


GPTQ = ["--precision", "int4", "--quant-method", "gptq"]


@pytest.mark.parametrize("command", ["export", "compile"])
def test_a_missing_quantization_library_says_what_to_install(command, inputs, tmp_path, monkeypatch, capsys):
    import importlib.util

    from d2mc.quantize.options import GPTQMODEL_INSTALL

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else find_spec(name, *a))
    context = ["--context", "256"] if command == "compile" else []  # the tiny model's 512 positions
    check_refused([command, T, "-o", "out", *GPTQ, *context], "GPTQ quantization needs the package 'gptqmodel': pip install "
                  + GPTQMODEL_INSTALL, True, inputs, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("calibrated", [GPTQ, ["--precision", "int4", "--mixed-precision", "calibrated"]])
def test_calibration_text_that_repeats_the_evaluation_text_is_refused(calibrated, inputs, tmp_path, monkeypatch,
                                                                       capsys):
    if calibrated == GPTQ:
        pytest.importorskip("gptqmodel")
    check_refused(["export", T, "-o", "out", *calibrated, "--calib-data", "{heldout-copy-txt}"],
                  "'{heldout-copy-txt}' repeats the held-out evaluation text", False, inputs, tmp_path, monkeypatch,
                  capsys)


def check_refused(args, message, early, inputs, tmp_path, monkeypatch, capsys):
    """``args`` exits 1 with one line starting ``message``, no traceback, nothing new on disk and, when ``early``, no
    weights read."""
    import d2mc.loading

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    loads = []
    monkeypatch.setattr(d2mc.loading, "fault_point", lambda name: loads.append(name))
    before = tree(inputs["root"], tmp_path)
    with pytest.raises(SystemExit) as info:
        main([fill(a, inputs) for a in args])
    err = capsys.readouterr().err
    assert info.value.code == 1, err
    assert err.startswith("error: " + fill(message, inputs)), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert tree(inputs["root"], tmp_path) == before
    if early:
        assert loads == [], "the weights were read before the input was checked"


def test_a_directory_named_like_a_profile_does_not_shadow_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "orin-agx").mkdir()
    main(["targets", "orin-agx", "--json"])
    assert json.loads(capsys.readouterr().out)[0]["name"] == "orin-agx"

