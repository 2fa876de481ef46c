"""HQQ's float zero points in ONNX Runtime's MatMulNBits on CPU: the float zero points themselves, or rounded with
the residual as a float MatMul on the input's block sums (what d2mc emits), against a symmetric int4 weight.

SmolLM2-sized matrices (576 -> 1536 and 1536 -> 576), HQQ-quantized (``d2mc.quantize.quantize_hqq``), one
MatMulNBits per graph at ``--acc`` (4: int8 activations), T=1 (decode) and T=128 (prefill) tokens, one thread.
Interleaved rounds, median microseconds per call; max |difference| to ``x @ W.T`` with the dequantized weight.

    python benchmarks/zero_points.py [--rounds 5] [--block 64] [--acc 4] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

SHAPES = ((576, 1536), (1536, 576))  # (in, out): gate/up, down


def session(form: str, q, acc: int) -> ort.InferenceSession:
    """One MatMulNBits of ``q`` as ``form`` says, from d2mc's own lowering helpers."""
    from d2mc.lowering.builder import MS_DOMAIN, GraphBuilder, matmul, nbits_attributes, nbits_inputs
    from d2mc.quantize import QuantizedLinear

    g = GraphBuilder(np.float32, TensorProto.FLOAT, accuracy_level=acc)
    if form == "float zero points":
        inputs = nbits_inputs(g, QuantizedLinear(q.bits, q.block_size, q.codes, q.scales), "w", "x")
        inputs.append(g.weight("w_zero_points_float", q.zero_points))
        g.op("MatMulNBits", inputs, ["y"], MS_DOMAIN, **nbits_attributes(g, q))
    elif form == "symmetric (rtn)":
        matmul(g, "x", QuantizedLinear(q.bits, q.block_size, q.codes, q.scales), "w", "y")
    else:  # rounded zero points + residual
        matmul(g, "x", q, "w", "y")
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, q.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    from d2mc.quantize import quantize_hqq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--acc", type=int, default=4)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    forms = ("symmetric (rtn)", "float zero points", "rounded + residual (d2mc)")
    rng = np.random.default_rng(0)
    rows, records = [], []
    for in_features, out_features in SHAPES:
        weight = torch.from_numpy(rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.05)
        q = quantize_hqq(weight, 4, args.block)
        sessions = {form: session(form, q, args.acc) for form in forms}
        for tokens in (1, 128):
            x = rng.standard_normal((1, tokens, in_features)).astype(np.float32)
            exact = x @ q.dequantize().T.numpy()
            calls = 200 if tokens == 1 else 10
            times = {form: [] for form in forms}
            for _ in range(args.rounds):
                for form, s in sessions.items():
                    s.run(None, {"x": x})
                    start = time.perf_counter()
                    for _ in range(calls):
                        s.run(None, {"x": x})
                    times[form].append((time.perf_counter() - start) / calls * 1e6)
            base = statistics.median(times[forms[0]])
            for form, s in sessions.items():
                us = statistics.median(times[form])
                diff = float(np.abs(s.run(None, {"x": x})[0] - exact).max()) if form != forms[0] else None
                records.append({"shape": [in_features, out_features], "tokens": tokens, "form": form, "us": us,
                                "vs_symmetric": us / base, "max_abs_diff": diff, "rounds_us": times[form]})
                rows.append([f"{in_features}->{out_features}", tokens, form, round(us, 1), round(us / base, 2),
                             "-" if diff is None else f"{diff:.2g}"])
    print(f"MatMulNBits int4 block {args.block}, accuracy_level {args.acc}, 1 thread, median of {args.rounds} rounds")
    print_table(["matrix", "tokens", "form", "us per call", "x symmetric", "max |diff| to exact"], rows)
    write_json(args.json, {"rows": records, "settings": vars(args)})


if __name__ == "__main__":
    main()
