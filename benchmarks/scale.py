"""Time and peak host memory of convert and export against model size.

Models with random weights and the shapes of real ones (SmolLM2-135M, SmolLM2-360M, Llama-3.2-1B; tied
embeddings, the 1B with llama3 rope scaling) are made in code and saved with the SmolLM2 tokenizer. The 1B-shaped
model keeps 8192 of Llama-3.2-1B's 131072 positions: verification decodes at the last position after a past of
that length, whose KV cache alone would be 8.6 GB in fp32 on each side. Each stage runs as its own ``d2mc``
process, on the CPU in fp32: ``d2mc convert`` (LF-UC removing a quarter of the attention modules, 8 calibration
sequences of 128 tokens, 2 steps of block-wise reconstruction: enough to reach its memory peak, the trained experts
with their gradients and AdamW state; the default 150 steps take longer, not more memory) and ``d2mc export`` of
the converted model (ONNX Runtime format, fp32, verified against PyTorch). Peak memory is the process's maximum
resident set (``wait4``), so it includes the Python process with torch and ONNX Runtime imported; beside each wall
time, the process's CPU time (user and system), which a machine shared with other jobs does not inflate. A size whose
estimated peak (:mod:`d2mc.placement`) does not fit the memory available is left out, and the table says so.

    python benchmarks/scale.py [--sizes 135m,360m,1b] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

# the config.json fields of the real models (the rest are transformers' Llama defaults)
SHAPES = {
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
             "rms_norm_eps": 1e-5},
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
             "rms_norm_eps": 1e-5},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 8192,
           "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}},
}
CALIB = ["--calib-sequences", "8", "--calib-length", "128", "--reconstruct-steps", "2"]

MAKE_MODEL = """
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from d2mc.loading import embedded_checkpoint
shape, out = eval(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
config = LlamaConfig(**shape, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
LlamaForCausalLM(config).save_pretrained(out)
AutoTokenizer.from_pretrained(embedded_checkpoint()).save_pretrained(out)
"""


def model_config(size: str):
    """The transformers config of a size of :data:`SHAPES`."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[size], tie_word_embeddings=True)


def run_measured(command: list[str]) -> tuple[float, float, int]:
    """Run ``command``; its wall seconds, its CPU seconds (user and system: on a shared machine the wall time
    also counts the waits for a core) and the peak resident memory of its process in bytes."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def measure(size: str, root: Path) -> dict:
    """Make the ``size`` model, convert it and export the result; times and peaks of each stage."""
    from d2mc.arch import ModelArch

    arch = ModelArch.from_config(model_config(size))
    dense, converted, artifact = root / f"{size}-dense", root / f"{size}-lfuc", root / f"{size}-onnx"
    run_measured([sys.executable, "-c", MAKE_MODEL, repr(SHAPES[size]), str(dense)])
    remove = str(len(arch.blocks) // 4)
    convert_s, convert_cpu, convert_peak = run_measured([sys.executable, "-m", "d2mc", "convert", str(dense), "--remove-attention",
                                            remove, *CALIB, "--device", "cpu", "-o", str(converted), "--quiet"])
    export_s, export_cpu, export_peak = run_measured([sys.executable, "-m", "d2mc", "export", str(converted), "-o", str(artifact)])
    onnx_bytes = sum(f.stat().st_size for f in artifact.glob("model.onnx*"))
    return {"size": size, "parameters": arch.total_params, "fp32_bytes": 4 * arch.total_params,
            "convert_seconds": convert_s, "convert_cpu_seconds": convert_cpu, "convert_peak_bytes": convert_peak,
            "export_seconds": export_s, "export_cpu_seconds": export_cpu, "export_peak_bytes": export_peak,
            "onnx_bytes": onnx_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,360m,1b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--json")
    args = parser.parse_args()

    import psutil

    from d2mc.arch import ModelArch
    from d2mc.placement import needed_bytes

    records, rows = [], []
    for size in args.sizes.split(","):
        arch = ModelArch.from_config(model_config(size))
        needed = max(needed_bytes(arch, "fp32", "convert"), needed_bytes(arch, "fp32", "export"))
        available = psutil.virtual_memory().available
        if needed > available:
            rows.append([size, f"{arch.total_params / 1e6:.0f}M", f"left out: needs about {needed / 2**30:.1f} GiB, "
                         f"{available / 2**30:.1f} GiB available", "", "", "", "", "", "", "", "", ""])
            records.append({"size": size, "parameters": arch.total_params, "skipped_needed_bytes": needed,
                            "available_bytes": available})
            continue
        with tempfile.TemporaryDirectory(prefix=f"d2mc-scale-{size}-") as tmp:
            record = measure(size, Path(tmp))
        records.append(record)
        fp32 = record["fp32_bytes"]
        rows.append([size, f"{record['parameters'] / 1e6:.0f}M", f"{fp32 / 2**30:.2f}",
                     f"{record['convert_seconds']:.0f}", f"{record['convert_cpu_seconds']:.0f}",
                     f"{record['convert_peak_bytes'] / 2**30:.2f}", f"{record['convert_peak_bytes'] / fp32:.2f}",
                     f"{record['export_seconds']:.0f}", f"{record['export_cpu_seconds']:.0f}",
                     f"{record['export_peak_bytes'] / 2**30:.2f}", f"{record['export_peak_bytes'] / fp32:.2f}",
                     f"{record['onnx_bytes'] / 2**30:.2f}"])
    print_table(["model", "parameters", "fp32 GiB", "convert s", "convert CPU s", "convert peak GiB",
                 "convert peak / fp32", "export s", "export CPU s", "export peak GiB", "export peak / fp32",
                 "ONNX GiB"], rows)
    write_json(args.json, records)


if __name__ == "__main__":
    main()
