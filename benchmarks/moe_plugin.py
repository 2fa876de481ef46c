"""The D2mcMoE plugin's math on real SmolLM2-135M MLPs, and its CUDA kernels where a GPU exists.

A Dense2MoE block is built from three consecutive SmolLM2 layers (their MLPs become the experts, the router
fitted to nothing: random weights, which exercise every expert). The table reports, per routing setting:
- the plugin reference (tests/moe_reference.py) in fp32 against the PyTorch block, and against ONNX
  Runtime's com.microsoft::MoE op on the same tensors (the onnxruntime lowering's form);
- the reference at the kernels' fp16 rounding points against the fp32 block (what fp16 costs);
- with quantized experts (int4/int8, symmetric round-to-nearest, norms folded, as the tensorrt lowering packs
  them): the reference against the fp32 PyTorch block (what the codes cost), against the block computing with the
  dequantized weights (the packing), and ONNX Runtime running the node's standard-op expansion against the
  reference (the graph that verifies a quantized export);
- on a CUDA GPU: the kernels against the fp16 reference, and their time for a decode token (GEMV path) and a
  128-token prefill (grouped path) next to bytes / bandwidth of the weights they must read, fp16 and quantized.

    python benchmarks/moe_plugin.py [--layers 12 13 14] [--bandwidth-gbps 3350] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
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


def kernel_rows(kernels, block, attributes, fc1, fc2, eps: float, bandwidth_gbps: float, packed=None) -> list[dict]:
    """Kernels against the fp16 reference and their time; ``packed`` quantized experts run the quantized kernels
    (the reference then runs on the weights their codes and fp16 scales stand for)."""
    from tests.moe_reference import moe_reference, rms, unpack

    rows = []
    h, inter = attributes.hidden_size, attributes.intermediate_size
    if packed is None:
        weights, bytes_per_weight = (fc1.half().cuda(), fc2.half().cuda()), 2.0
        reference_weights, options, precision = (fc1.half(), fc2.half()), (), "fp16"
    else:
        scales = [s.astype(np.float16) for s in (packed.fc1_scales, packed.fc2_scales)]
        weights = tuple(torch.from_numpy(w).cuda() for w in (packed.fc1, packed.fc2)) + tuple(
            torch.from_numpy(s).cuda() for s in scales)
        reference_weights = tuple(unpack(w, s, packed.bits, packed.block_size)
                                  for w, s in zip((packed.fc1, packed.fc2), scales, strict=True))
        bytes_per_weight = packed.bits / 8 + 2 / packed.block_size
        options, precision = (packed.bits, packed.block_size), f"int{packed.bits} b{packed.block_size}"
    float_attributes = dataclasses.replace(attributes, weight_bits=0, block_size=0)
    run = kernels.moe_quantized if packed is not None else kernels.moe
    for tokens in (1, 128):
        hidden = torch.randn(tokens, h, generator=torch.Generator().manual_seed(tokens))
        normed, logits = rms(hidden, eps).half(), block.router(hidden).detach()
        expected = moe_reference(normed, logits, *reference_weights, float_attributes)
        args = (normed.cuda(), logits.cuda(), *weights, attributes.num_experts, attributes.num_shared,
                attributes.top_k, int(attributes.normalize), *options)
        got = run(*args).cpu()
        for _ in range(10):
            run(*args)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            run(*args)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 100 / 1e3
        experts_read = attributes.num_shared + (attributes.top_k if tokens == 1 else attributes.num_experts)
        weight_bytes = int(experts_read * 3 * h * inter * bytes_per_weight)
        rows.append({"weights": precision, "tokens": tokens, "path": "GEMV" if tokens <= 8 else "grouped",
                     "max_abs_err": float((got.float() - expected.float()).abs().max()), "us": seconds * 1e6,
                     "weight_bytes": weight_bytes, "bytes_over_bandwidth_us": weight_bytes / (bandwidth_gbps * 1e9) * 1e6})
    return rows


def quantized_rows(model, first: int, hidden: torch.Tensor, expected: torch.Tensor, eps: float,
                   formats: list[tuple[int, int]]) -> tuple[list[dict], dict]:
    """Block ``first`` of ``model`` with its experts quantized in each (bits, block size): the reference against
    the fp32 block's ``expected`` output, against the block on the dequantized weights, and ONNX Runtime's expanded
    node against the reference (fp32 hidden state). Returns the rows and the packed experts per format."""
    from tests.moe_reference import (
        block_quantized_experts,
        block_reference,
        moe_reference,
        plugin_node_onnx,
        plugin_weights,
        quantized_rtn,
        rms,
        run_expanded,
        unpack,
    )

    rows, packed_by_format = [], {}
    normed = rms(hidden, eps)
    for bits, block_size in formats:
        quantized = quantized_rtn(model, bits, block_size)
        block = quantized.model.model.layers[first]
        packed = block_quantized_experts(block, quantized.linears, first)
        attributes = plugin_weights(block, packed)[2]
        fc1, fc2 = (unpack(w, s, bits, block_size) for w, s in ((packed.fc1, packed.fc1_scales),
                                                                  (packed.fc2, packed.fc2_scales)))
        with torch.no_grad():
            logits = block.router(hidden)
            reference = moe_reference(normed, logits, fc1, fc2,
                                      dataclasses.replace(attributes, weight_bits=0, block_size=0))
            dequantized = block_reference(block, hidden) - hidden
        expanded = run_expanded(plugin_node_onnx(attributes, packed, "fp32"), normed, logits)
        rows.append({"bits": bits, "block_size": block_size,
                     "ref_vs_fp32_block": float((reference - expected).abs().max()),
                     "ref_vs_dequantized_block": float((reference - dequantized).abs().max()),
                     "expanded_onnx_vs_ref": float((expanded - reference).abs().max()),
                     "expert_bytes_vs_fp16": (bits / 8 + 2 / block_size) / 2})
        packed_by_format[(bits, block_size)] = (block, attributes, packed)
    return rows, packed_by_format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs=3, default=[12, 13, 14])
    parser.add_argument("--bandwidth-gbps", type=float, default=3350.0,
                        help="the GPU's memory bandwidth for bytes / bandwidth (default H100 SXM)")
    parser.add_argument("--formats", nargs="+", default=["4:64", "4:32", "8:64"],
                        help="quantized experts as bits:block_size (the block must divide H and I)")
    parser.add_argument("--json")
    args = parser.parse_args()
    formats = [tuple(int(v) for v in f.split(":")) for f in args.formats]

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
        converted = restructure(model, plan)
        block = converted.model.layers[first]
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

    # quantized experts of the last setting's block (its fp32 output is `expected`)
    quantized, packed_by_format = quantized_rows(converted, first, hidden, expected, eps, formats)
    print(f"\nQuantized experts (RTN, symmetric, norms folded) of the top-{top_k}, {shared}-shared block, fp32 "
          f"hidden state, max |difference| (max |output| {results[-1]['output_abs_max']:.4g}):")
    print_table(["bits", "block", "ref vs fp32 PyTorch block", "ref vs block on dequantized weights",
                 "ORT expanded node vs ref", "expert bytes vs fp16"],
                [[r["bits"], r["block_size"], r["ref_vs_fp32_block"], r["ref_vs_dequantized_block"],
                  r["expanded_onnx_vs_ref"], r["expert_bytes_vs_fp16"]] for r in quantized])

    kernel_results = None
    if torch.cuda.is_available():
        from torch.utils.cpp_extension import load

        from d2mc.engine.build import plugin_sources

        source = plugin_sources()
        kernels = load("d2mc_moe_kernels", [str(source / "tests" / "torchBinding.cpp"), str(source / "moeKernels.cu")],
                       extra_include_paths=[str(source)])
        kernel_results = kernel_rows(kernels, block, attributes, fc1, fc2, eps, args.bandwidth_gbps)
        for quantized_block, quantized_attributes, packed in packed_by_format.values():
            kernel_results += kernel_rows(kernels, quantized_block, quantized_attributes, fc1, fc2, eps,
                                          args.bandwidth_gbps, packed)
        print(f"\nCUDA kernels on {torch.cuda.get_device_name(0)} (top-{attributes.top_k}, {attributes.num_shared} "
              f"shared), fp16 activations:")
        print_table(["weights", "tokens", "path", "max |err| vs ref", "time us", "weight bytes", "bytes/bandwidth us"],
                    [[r["weights"], r["tokens"], r["path"], r["max_abs_err"], r["us"], r["weight_bytes"],
                      r["bytes_over_bandwidth_us"]] for r in kernel_results])
    else:
        print("\nCUDA kernels: not run (this machine has no CUDA GPU); they are compiled for sm_87 by the tests")
    write_json(args.json, {"reference": results, "quantized": quantized, "kernels": kernel_results,
                           "numpy": np.__version__, "torch": torch.__version__})


if __name__ == "__main__":
    main()
