"""The D2mcMoE plugin's math on real SmolLM2-135M MLPs, and its CUDA kernels where a GPU exists.

A Dense2MoE block is built from three consecutive SmolLM2 layers (their MLPs become the experts, the router
fitted to nothing: random weights, which exercise every expert). The table reports, per routing setting:
- the plugin reference (tests/moe_reference.py) in fp32 against the PyTorch block, and against ONNX
  Runtime's com.microsoft::MoE op on the same tensors (the onnxruntime lowering's form);
- the reference at the kernels' fp16 rounding points against the fp32 block (what fp16 costs);
- on a CUDA GPU: the kernels against the fp16 reference, and their time for a decode token (GEMV path) and a
  128-token prefill (grouped path) next to bytes / bandwidth of the weights they must read.

    python benchmarks/moe_plugin.py [--layers 12 13 14] [--bandwidth-gbps 3350] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the plugin's references live with its tests
from _common import print_table, write_json  # noqa: E402


def ort_moe(hidden, logits, fc1, fc2, top_k: int, normalize: bool) -> torch.Tensor:
    """ONNX Runtime's contrib MoE op (CPU) on the plugin's tensors."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=top_k,
                            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                            swiglu_limit=1e9, normalize_routing_weights=int(normalize))
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                              helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(fc1.numpy(), "fc1"), numpy_helper.from_array(fc2.numpy(), "fc2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": hidden.numpy(), "logits": logits.numpy()})[0])


def kernel_rows(kernels, block, attributes, fc1, fc2, eps: float, bandwidth_gbps: float) -> list[dict]:
    from tests.moe_reference import moe_reference, rms

    rows = []
    w1, w2 = fc1.half().cuda(), fc2.half().cuda()
    h, inter = attributes.hidden_size, attributes.intermediate_size
    for tokens in (1, 128):
        hidden = torch.randn(tokens, h, generator=torch.Generator().manual_seed(tokens))
        normed, logits = rms(hidden, eps).half(), block.router(hidden).detach()
        expected = moe_reference(normed, logits, fc1.half(), fc2.half(), attributes)
        args = (normed.cuda(), logits.cuda(), w1, w2, attributes.num_experts, attributes.num_shared,
                attributes.top_k, bool(attributes.normalize))
        got = kernels.moe(*args).cpu()
        for _ in range(10):
            kernels.moe(*args)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            kernels.moe(*args)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 100 / 1e3
        experts_read = attributes.num_shared + (attributes.top_k if tokens == 1 else attributes.num_experts)
        weight_bytes = experts_read * 3 * h * inter * 2
        rows.append({"tokens": tokens, "path": "GEMV" if tokens <= 8 else "grouped",
                     "max_abs_err": float((got.float() - expected.float()).abs().max()), "us": seconds * 1e6,
                     "weight_bytes": weight_bytes, "bytes_over_bandwidth_us": weight_bytes / (bandwidth_gbps * 1e9) * 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs=3, default=[12, 13, 14])
    parser.add_argument("--bandwidth-gbps", type=float, default=3350.0,
                        help="the GPU's memory bandwidth for bytes / bandwidth (default H100 SXM)")
    parser.add_argument("--json")
    args = parser.parse_args()

    from d2mc.arch import BlockPlan
    from d2mc.loading import load_model
    from d2mc.restructure import dense_plan, restructure
    from tests.moe_reference import block_reference, moe_reference, plugin_weights, rms

    loaded = load_model(args.model, tokenizer=False)
    layers = loaded.model.config.num_hidden_layers
    first = args.layers[0]
    results = []
    settings = [(1, True, 0), (2, False, 0), (2, True, 0), (1, True, 1)]
    for top_k, normalize, shared in settings:
        model = load_model(args.model, tokenizer=False).model if results else loaded.model
        plan = dense_plan(layers)
        plan[first:first + 3] = [BlockPlan(first, args.layers, shared_experts=shared, top_k=top_k,
                                           normalize_topk=normalize)]
        block = restructure(model, plan).model.layers[first]
        torch.nn.init.normal_(block.router.weight, std=0.05)
        fc1, fc2, attributes = plugin_weights(block)
        eps = block.experts[0].post_attention_layernorm.variance_epsilon
        hidden = torch.randn(64, attributes.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = block.router(hidden)
            normed = rms(hidden, eps)
            reference = moe_reference(normed, logits, fc1, fc2, attributes)
            expected = block_reference(block, hidden) - hidden
            half = moe_reference(normed.half(), logits.half(), fc1.half(), fc2.half(), attributes).float()
        row = {"top_k": top_k, "normalize": normalize, "shared": shared, "experts": len(block.experts),
               "ref_vs_pytorch": float((reference - expected).abs().max()),
               "ref_fp16_vs_pytorch": float((half - expected).abs().max()),
               "output_abs_max": float(expected.abs().max())}
        if shared == 0:
            got = ort_moe(normed, logits, fc1, fc2, top_k, normalize)
            row["ref_vs_onnxruntime_moe"] = float((reference - got).abs().max())
        results.append(row)
    print(f"D2mcMoE reference on {args.model} layers {args.layers} (H={attributes.hidden_size}, "
          f"I={attributes.intermediate_size}), 64 tokens, max |difference|:")
    print_table(["top-k", "normalize", "shared", "ref fp32 vs PyTorch block", "ref fp32 vs ORT com.microsoft::MoE",
                 "ref fp16 vs PyTorch fp32", "max |output|"],
                [[r["top_k"], r["normalize"], r["shared"], r["ref_vs_pytorch"], r.get("ref_vs_onnxruntime_moe", "n/a"),
                  r["ref_fp16_vs_pytorch"], r["output_abs_max"]] for r in results])

    kernel_results = None
    if torch.cuda.is_available():
        from torch.utils.cpp_extension import load

        from d2mc.engine.build import plugin_sources

        source = plugin_sources()
        kernels = load("d2mc_moe_kernels", [str(source / "tests" / "torchBinding.cpp"), str(source / "moeKernels.cu")],
                       extra_include_paths=[str(source)])
        kernel_results = kernel_rows(kernels, block, attributes, fc1, fc2, eps, args.bandwidth_gbps)
        print(f"\nCUDA kernels on {torch.cuda.get_device_name(0)} (top-{attributes.top_k}, {attributes.num_shared} "
              f"shared), fp16:")
        print_table(["tokens", "path", "max |err| vs ref", "time us", "weight bytes", "bytes/bandwidth us"],
                    [[r["tokens"], r["path"], r["max_abs_err"], r["us"], r["weight_bytes"],
                      r["bytes_over_bandwidth_us"]] for r in kernel_results])
    else:
        print("\nCUDA kernels: not run (this machine has no CUDA GPU); they are compiled for sm_87 by the tests")
    write_json(args.json, {"reference": results, "kernels": kernel_results,
                           "numpy": np.__version__, "torch": torch.__version__})


if __name__ == "__main__":
    main()
