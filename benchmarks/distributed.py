"""Recovery training on the CPU under DDP and under FSDP2 in two gloo processes: tokens per second and peak memory of
each process.

accelerate turns FSDP on only for GPU process groups (on a CPU its FSDP config falls back to DDP, which is why
``d2mc recover --accelerate-config`` refuses FSDP without a GPU), so the Trainer cannot run FSDP here. This benchmark
drives both engines through torch directly, with recovery's own parts and the same step for both: the student (a
copy of the parent, every parameter trained with AdamW) and the frozen teacher (the parent), the loss of recovery's
defaults (next-token CE + KL to the teacher, :mod:`d2mc.recovery.losses`). DDP: ``DistributedDataParallel`` on the
student, the whole teacher in every process. FSDP: ``fully_shard`` on each decoder layer and then the root of the
student (what accelerate's FSDP2 plugin does with ``TRANSFORMER_BASED_WRAP``), the teacher sharded by
:func:`d2mc.recovery.engines.shard_teacher` (what ``d2mc recover`` does under FSDP). Models have random weights and
the shapes of ``benchmarks/scale.py`` (``tiny`` for a quick check). Each process gets ``--batch-size`` windows of
``--seq-len`` random tokens a step, one thread; tokens per second count both processes' tokens over the timed steps
(after one untimed step); peak memory is each process's peak resident set during training (reset after the models
are built and what their build freed is handed back to the system), and ``overall`` its peak since it started. Both engines see the same data from the same weights, so
their losses must agree step by step: the table shows the largest difference.

    python benchmarks/distributed.py [--shape 135m] [--steps 4] [--seq-len 128] [--batch-size 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import print_table, write_json  # noqa: E402
from scale import SHAPES  # noqa: E402

SHAPES = {**SHAPES, "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
                             "max_position_embeddings": 256}}
ENGINES = ("ddp", "fsdp")
WORKER_TIMEOUT_S = 300  # a collective waiting longer than this for its peer fails instead of hanging
LAUNCH_TIMEOUT_S = 1200  # one engine's whole run, launcher and workers


def _resident_gib(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` of this process, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def train(engine: str, shape: dict, steps: int, seq_len: int, batch_size: int) -> dict:
    """One process of a run (under ``torch.distributed.run``): build, wrap, train; what it measured."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    from transformers import LlamaConfig, LlamaForCausalLM

    from d2mc.recovery.engines import layer_classes, shard_teacher
    from d2mc.recovery.losses import kl_full

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=WORKER_TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same weights in every process and for both engines
    config = LlamaConfig(**shape, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(config).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    parameters = sum(p.numel() for p in student.parameters())
    if engine == "fsdp":
        for module in list(student.modules()):
            if isinstance(module, layer_classes(student)):
                fully_shard(module)
        fully_shard(student)
        shard_teacher(teacher)
        model = student
    else:
        model = DistributedDataParallel(student)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in student.parameters())
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps what the build freed (FSDP's full weights) otherwise
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (world, batch_size, seq_len), generator=generator)[rank]
               for _ in range(steps + 1)]
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: training, not building
    losses, start = [], 0.0
    for step, ids in enumerate(batches):
        if step == 1:
            dist.barrier()
            start = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               ids[:, 1:].reshape(-1))
        loss = ce + kl_full(logits, teacher_logits, 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    dist.barrier()
    seconds = time.perf_counter() - start
    record = {"rank": rank, "parameters": parameters, "local_parameters": local,
              "training_peak_gib": _resident_gib("VmHWM"),
              "overall_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "seconds": seconds, "tokens": world * batch_size * seq_len * steps, "losses": losses}
    gathered = [None] * world
    dist.all_gather_object(gathered, record)
    # DDP's reducer holds the process group: freed after destroy_process_group, it would join gloo's threads while
    # holding the interpreter lock that one of them waits for (a deadlock at exit); free it while the group lives
    del model, student, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return {"engine": engine, "processes": gathered}


def run_engine(engine: str, args) -> dict:
    """Two gloo processes of ``engine`` started by ``torch.distributed.run``; their records."""
    with tempfile.TemporaryDirectory(prefix="d2mc-distributed-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
               "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.processes), str(Path(__file__).resolve()), "--worker", engine, "--out", str(out),
                   "--shape", args.shape, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size)]
        launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    start_new_session=True)
        try:
            _, stderr = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and its workers: none outlives the run
            launcher.communicate()
            raise SystemExit(f"{engine} did not finish in {LAUNCH_TIMEOUT_S} s") from None
        if launcher.returncode != 0:
            raise SystemExit(f"{engine} failed:\n{stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="135m", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=4, help="Timed steps (after one untimed).")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2, help="Windows per process and step.")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--json")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        record = train(args.worker, SHAPES[args.shape], args.steps, args.seq_len, args.batch_size)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(record))
        return

    records = [run_engine(engine, args) for engine in args.engines.split(",")]
    reference = records[0]["processes"][0]["losses"]
    rows = []
    for record in records:
        processes = record["processes"]
        first = processes[0]
        record["tokens_per_second"] = first["tokens"] / max(p["seconds"] for p in processes)
        record["loss_difference"] = max(abs(a - b) for a, b in zip(first["losses"], reference, strict=True))
        rows.append([record["engine"], f"{first['parameters'] / 1e6:.0f}M",
                     f"{first['local_parameters'] / first['parameters']:.2f}", f"{record['tokens_per_second']:.0f}",
                     " / ".join(f"{p['training_peak_gib']:.2f}" for p in processes),
                     " / ".join(f"{p['overall_peak_gib']:.2f}" for p in processes),
                     f"{first['losses'][-1]:.4f}", f"{record['loss_difference']:.1e}"])
    print(f"{args.shape}-shaped model, {args.processes} gloo processes of one thread, {args.batch_size} x "
          f"{args.seq_len} tokens per process and step, {args.steps} timed steps")
    print_table(["engine", "parameters", "held per process", "tokens/s", "training peak GiB per process",
                 "overall peak GiB per process", "last loss", f"loss vs {records[0]['engine']}"], rows)
    write_json(args.json, {"shape": args.shape, "steps": args.steps, "seq_len": args.seq_len,
                           "batch_size": args.batch_size, "runs": records})


if __name__ == "__main__":
    main()
