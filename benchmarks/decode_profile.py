"""Where one decode step spends its time: ONNX Runtime's profiler, per operator type, for ONNX artifacts side by side.

Each artifact (a directory with ``model.onnx``: d2mc's, or the onnxruntime-genai builder's) runs one decode step
after ``--past`` cached tokens (random cache, batch 1) in a session of ``--threads`` intra-op threads, ``--steps``
profiled steps after a warm-up, the artifacts in turns over ``--rounds`` rounds. Printed: the median wall time of a
step, the kernels' sum, each operator type's time per step (the median over rounds) and the LM head's (the
``MatMulNBits`` node writing ``logits``, or the largest one). Compare artifacts within one run: on a shared machine
absolute times move from run to run.

    python -m onnxruntime_genai.models.builder -i HF_DIR -o peer-int4 -p int4 -e cpu -c CACHE
    d2mc export smollm2-135m -o d2mc-int4 --precision int4
    python benchmarks/decode_profile.py peer-int4 d2mc-int4 [--threads 1] [--past 128] [--steps 30] [--rounds 2]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

WARMUP = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="directories holding model.onnx")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: steadier on a shared machine)")
    parser.add_argument("--past", type=int, default=128, help="cached tokens before the profiled step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    runs = {path: [] for path in args.artifacts}
    with tempfile.TemporaryDirectory(prefix="d2mc-profile-") as tmp:
        for _ in range(args.rounds):
            for path in args.artifacts:
                runs[path].append(profile_step(Path(path), args, Path(tmp)))
    results = {path: summarize(rounds) for path, rounds in runs.items()}
    names = {path: Path(path).name for path in args.artifacts}
    print(f"one decode step after {args.past} cached tokens, {args.threads} intra-op thread(s), {args.steps} profiled "
          f"steps x {args.rounds} rounds; ms per step; load average {os.getloadavg()[0]:.1f}")
    ops = sorted({op for r in results.values() for op in r["ops"]},
                 key=lambda op: -max(r["ops"].get(op, 0.0) for r in results.values()))
    rows = [["step (wall)", *(round(r["wall_ms"], 3) for r in results.values())],
            ["kernels (sum)", *(round(r["kernel_ms"], 3) for r in results.values())],
            ["LM head", *(round(r["lm_head_ms"], 3) for r in results.values())]]
    rows += [[f"{op} ({'/'.join(str(r['nodes'].get(op, 0)) for r in results.values())} nodes)",
              *(round(r["ops"].get(op, 0.0), 3) for r in results.values())] for op in ops]
    print_table(["ms per step", *names.values()], rows)
    write_json(args.json, {"settings": vars(args), "results": {names[p]: r for p, r in results.items()}})


def profile_step(path: Path, args, tmp: Path) -> dict:
    """One round for one artifact: per-op-type kernel time and node count per step, wall time per step."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp / path.name)
    session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feed = decode_feed(session, args.past, head_size(path), np)
    for _ in range(WARMUP):
        session.run(None, feed)
    walls = []
    for _ in range(args.steps):
        start = time.perf_counter()
        session.run(None, feed)
        walls.append(time.perf_counter() - start)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = WARMUP + args.steps
    by_op, nodes, by_node = Counter(), Counter(), Counter()
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        by_op[op] += event["dur"]
        nodes[op] += 1
        if op == "MatMulNBits":
            by_node[event["name"].removesuffix("_kernel_time")] += event["dur"]
    head = lm_head_node(path) or (max(by_node, key=by_node.get) if by_node else None)
    return {"wall_ms": statistics.median(walls) * 1e3, "ops": {op: us / runs / 1e3 for op, us in by_op.items()},
            "nodes": {op: n // runs for op, n in nodes.items()},
            "lm_head_ms": by_node.get(head, 0.0) / runs / 1e3}


def lm_head_node(path: Path) -> str | None:
    """The name of the ``MatMulNBits`` node that writes ``logits``."""
    import onnx

    for node in onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits" and "logits" in node.output:
            return node.name
    return None


def head_size(path: Path) -> int | None:
    """The attention head size from ``genai_config.json`` (the builder leaves the cache's last axis symbolic)."""
    config = path / "genai_config.json"
    return json.loads(config.read_text())["model"]["decoder"]["head_size"] if config.exists() else None


def decode_feed(session, past: int, head: int | None, np) -> dict:
    """Inputs of one decode step: one new token after ``past`` cached ones (a random cache)."""
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = np.array([[42]], np.int64)
        elif i.name == "attention_mask":
            feed[i.name] = np.ones((1, past + 1), np.int64)
        elif i.name == "position_ids":
            feed[i.name] = np.array([[past]], np.int64)
        else:  # past_key_values.{i}.key/value [batch, kv_heads, past, head_dim]
            shape = [1, i.shape[1], past, i.shape[3] if isinstance(i.shape[3], int) else head]
            if not all(isinstance(d, int) for d in shape):
                raise SystemExit(f"{i.name}: cannot tell the cache shape from {i.shape}")
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def summarize(rounds: list[dict]) -> dict:
    """The median over rounds of every figure."""
    ops = {op for r in rounds for op in r["ops"]}
    return {"wall_ms": statistics.median(r["wall_ms"] for r in rounds),
            "kernel_ms": statistics.median(sum(r["ops"].values()) for r in rounds),
            "lm_head_ms": statistics.median(r["lm_head_ms"] for r in rounds),
            "ops": {op: statistics.median(r["ops"].get(op, 0.0) for r in rounds) for op in ops},
            "nodes": rounds[0]["nodes"], "rounds": rounds}


if __name__ == "__main__":
    main()
