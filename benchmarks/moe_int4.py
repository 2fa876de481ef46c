"""MoE blocks on CPU with int4 experts: com.microsoft::QMoE against standard-op dispatch with MatMulNBits experts.

12 blocks of SmolLM2-sized SwiGLU MLPs (H=576, I=1536), residual in between, E experts, top-1; T=1 and T=128
tokens. Rows: dense MLP (fp32 MatMul, int4 MatMulNBits), dispatch (router MatMul, ArgMax, per expert Equal, NonZero,
GatherND, the expert MLP, ScatterND add) with fp32 or MatMulNBits experts, ONNX Runtime's MoE (fp32) and QMoE (int4,
weights_prepacked=0, the raw MatMulNBits layout stacked per expert). Interleaved rounds, medians, ratios to the fp32
dense MLP of the same run. The int4 forms share the same packed weights; their outputs are compared.
Int4 weights of 12 blocks (20 MB dense, 40-60 MB with 2-3 experts) partly fit a large L3 cache: compare forms
with each other, and confirm a choice on the whole model.

    python benchmarks/moe_int4.py [--rounds 5] [--experts 2 3] [--block 32] [--acc 4 0] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from d2mc.quantize import quantize_rtn

H, INTER, BLOCKS = 576, 1536, 12


class G:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, h):
        self.n += 1
        return f"{h}_{self.n}"

    def w(self, arr, h="w"):
        n = self.name(h)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def op(self, t, ins, domain="", n_out=1, **a):
        outs = [self.name(t) for _ in range(n_out)]
        self.nodes.append(helper.make_node(t, ins, outs, name=self.name(t + "_n"), domain=domain, **a))
        return outs[0] if n_out == 1 else outs


def pack4(w_kn, block):
    """[K, N] float -> MatMulNBits B [N, K/block, block/2] uint8 and scales [N, K/block] (RTN symmetric)."""
    packed, scales, _ = quantize_rtn(torch.from_numpy(np.ascontiguousarray(w_kn.T)), 4, block).matmul_nbits()
    return packed, scales


def linear(g, x, w_kn, form, block, acc):
    if form == "fp32":
        return g.op("MatMul", [x, g.w(w_kn)])
    b, s = pack4(w_kn, block)
    attrs = dict(K=w_kn.shape[0], N=w_kn.shape[1], bits=4, block_size=block)
    if acc:
        attrs["accuracy_level"] = acc
    return g.op("MatMulNBits", [x, g.w(b, "B"), g.w(s, "S")], "com.microsoft", **attrs)


def swiglu(g, x, e, form, block, acc):
    gate = linear(g, x, e["gate"].T, form, block, acc)
    up = linear(g, x, e["up"].T, form, block, acc)
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    return linear(g, act, e["down"].T, form, block, acc)


def const(g, v, dt=np.int64):
    return g.w(np.asarray(v, dt), "c")


def build(kind, experts_per_block, router, form, block, acc, n_experts):
    g = G()
    x = "x"
    for b in range(BLOCKS):
        experts = experts_per_block[b][:n_experts]
        if kind == "dense":
            out = swiglu(g, x, experts[0], form, block, acc)
        else:
            logits = g.op("MatMul", [x, g.w(router[b][:, :n_experts])])
            if kind == "dispatch":
                idx = g.op("ArgMax", [logits], axis=-1, keepdims=1)
                acc_ = g.op("Mul", [x, const(g, [0.0], np.float32)])
                for e, ex in enumerate(experts):
                    chosen = g.op("Equal", [idx, const(g, [e])])
                    where = g.op("Transpose", [g.op("NonZero", [chosen])], perm=[1, 0])
                    tok = g.op("Slice", [where, const(g, [0]), const(g, [1]), const(g, [1])])
                    rows = g.op("GatherND", [x, tok])
                    acc_ = g.op("ScatterND", [acc_, tok, swiglu(g, rows, ex, form, block, acc)], reduction="add")
                out = acc_
            else:  # contrib MoE (fp32) or QMoE (int4)
                fc1 = np.stack([np.stack([ex["gate"], ex["up"]], 1).reshape(2 * INTER, H) for ex in experts])  # [E, 2I, H]
                fc2 = np.stack([ex["down"] for ex in experts])  # [E, H, I]
                common = dict(k=1, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                              activation_beta=0.0, swiglu_limit=1e9, normalize_routing_weights=1)
                if form == "fp32":
                    out = g.op("MoE", [x, logits, g.w(fc1), "", g.w(fc2)], "com.microsoft", **common)
                else:
                    p1 = [pack4(f.T, block) for f in fc1]
                    p2 = [pack4(f.T, block) for f in fc2]
                    w1 = np.stack([p[0].reshape(2 * INTER, H // 2) for p in p1])
                    s1 = np.stack([p[1] for p in p1])
                    w2 = np.stack([p[0].reshape(H, INTER // 2) for p in p2])
                    s2 = np.stack([p[1] for p in p2])
                    attrs = dict(common, expert_weight_bits=4, block_size=block, weights_prepacked=0)
                    if acc:
                        attrs["accuracy_level"] = acc
                    out = g.op("QMoE", [x, logits, g.w(w1), g.w(s1), "", g.w(w2), g.w(s2)], "com.microsoft", **attrs)
        x = g.op("Add", [x, out])
    g.nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(g.nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--acc", type=int, nargs="+", default=[4, 0], help="accuracy levels of the int4 forms")
    ap.add_argument("--no-fp32-moe", action="store_true", help="leave out the fp32 dispatch and MoE rows")
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    experts = [[{k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in
                 (("gate", (INTER, H)), ("up", (INTER, H)), ("down", (H, INTER)))} for _ in range(3)] for _ in range(BLOCKS)]
    router = [(rng.standard_normal((H, 3)) * 0.05).astype(np.float32) for _ in range(BLOCKS)]
    bs = args.block
    variants = {"dense fp32": ("dense", "fp32", bs, 0, 1)}
    for acc in args.acc:
        variants[f"dense int4 b{bs} acc{acc}"] = ("dense", "int4", bs, acc, 1)
    for e in args.experts:
        if not args.no_fp32_moe:
            variants[f"E={e} dispatch fp32"] = ("dispatch", "fp32", bs, 0, e)
            variants[f"E={e} MoE fp32 (contrib)"] = ("moe", "fp32", bs, 0, e)
        for acc in args.acc:
            variants[f"E={e} dispatch int4 b{bs} acc{acc}"] = ("dispatch", "int4", bs, acc, e)
            variants[f"E={e} QMoE int4 b{bs} acc{acc}"] = ("moe", "int4", bs, acc, e)
    o = ort.SessionOptions()
    o.log_severity_level = 3
    sessions = {n: ort.InferenceSession(build(k, experts, router, f, b, a, e).SerializeToString(), o,
                                        providers=["CPUExecutionProvider"]) for n, (k, f, b, a, e) in variants.items()}
    inputs = {t: rng.standard_normal((t, H)).astype(np.float32) for t in (1, 128)}
    outs = {n: s.run(None, {"x": inputs[128]})[0] for n, s in sessions.items()}
    for e in args.experts:
        for acc in args.acc:
            d = np.abs(outs[f"E={e} QMoE int4 b{bs} acc{acc}"] - outs[f"E={e} dispatch int4 b{bs} acc{acc}"]).max()
            print(f"E={e} acc{acc}: max |QMoE - dispatch| over T=128: {d:.3g}")
        if not args.no_fp32_moe:
            print(f"E={e}: max |MoE fp32 - dispatch fp32|: {np.abs(outs[f'E={e} MoE fp32 (contrib)'] - outs[f'E={e} dispatch fp32']).max():.3g}")
    reps = {1: 40, 128: 4}
    t = {n: {1: [], 128: []} for n in sessions}
    for _ in range(args.rounds):
        for n, s in sessions.items():
            for T in (1, 128):
                feed = {"x": inputs[T]}
                s.run(None, feed)
                xs = []
                for _ in range(reps[T]):
                    st = time.perf_counter()
                    s.run(None, feed)
                    xs.append(time.perf_counter() - st)
                t[n][T].append(statistics.median(xs))
    med = {n: {T: statistics.median(v) for T, v in d.items()} for n, d in t.items()}
    ref = med["dense fp32"]
    print(f"12 blocks H={H} I={INTER}, top-1, ONNX Runtime {ort.__version__} CPU, median of {args.rounds} interleaved rounds")
    print("| form | T=1 ms | T=1 vs dense fp32 | T=128 ms | T=128 vs dense fp32 |")
    print("|---|---|---|---|---|")
    for n in sessions:
        print(f"| {n} | {med[n][1]*1e3:.2f} | {med[n][1]/ref[1]:.2f} | {med[n][128]*1e3:.1f} | {med[n][128]/ref[128]:.2f} |")
    if args.json:
        json.dump({"median_ms": {n: {str(T): v * 1e3 for T, v in d.items()} for n, d in med.items()}, "rounds": t,
                   "settings": vars(args)}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
