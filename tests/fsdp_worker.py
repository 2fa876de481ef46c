"""Run by ``torch.distributed.run`` in two gloo processes: the teacher sharded with FSDP2 gives the logits of the
whole teacher while each process holds half of it. Writes what it found as JSON to the path in argv[1].

Both processes meet at a barrier before the group is destroyed and leave with ``os._exit``: gloo's worker threads can
abort the process while the interpreter shuts down after the work is done ("terminate called without an active
exception"), which would fail the check for a reason that is not the sharding's."""

import json
import os
import sys

import torch
import torch.distributed as dist

from d2mc.recovery.engines import shard_teacher
from tests.conftest import tiny_model


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    teacher = tiny_model("llama", num_hidden_layers=4)
    whole = sum(p.numel() for p in teacher.parameters())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(dist.get_rank()))
    with torch.no_grad():
        expected = teacher(ids, use_cache=False).logits
    shard_teacher(teacher)
    with torch.no_grad():
        got = teacher(ids, use_cache=False).logits
    local = sum(p.to_local().numel() for p in teacher.parameters())
    result = {"rank": dist.get_rank(), "max_abs_diff": float((got - expected).abs().max()), "local": local,
              "whole": whole, "frozen": not any(p.requires_grad for p in teacher.parameters())}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
