"""Run by tests/test_train.py under torch.distributed.run (2 processes, gloo): a stdlib model
with every block and the root sharded by FSDP2's fully_shard, trained a few steps with a nestc
optimizer on each rank's half of the batch, against the same model trained in one process on
the whole batch. Rank 0 prints the largest parameter difference."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import nestc


def main(spec: str, name: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    prog = nestc.load(spec)
    model = prog.build(name, vocab=16, dim=16, depth=2, heads=2)
    ref = prog.build(name, vocab=16, dim=16, depth=2, heads=2)
    ref.load_state_dict(model.state_dict())
    for child in model.children():
        if isinstance(child, nestc.module.Built):  # the blocks (a layer each)
            fully_shard(child)
    fully_shard(model)
    sgd = nestc.load("std/optim/sgd.nest")
    opt = sgd.build("SGD", model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = sgd.build("SGD", ref.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    per = 2

    def loss_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                 tokens[:, 1:].flatten())

    for _ in range(3):
        tokens = torch.randint(0, 16, (per * world, 12), generator=generator)
        mine = tokens[rank * per:(rank + 1) * per]
        opt.zero_grad()
        loss_of(model(mine), mine).backward()  # FSDP averages the ranks' gradients
        opt.step()
        logits = ref(tokens)
        ref_opt.zero_grad()
        (sum(loss_of(logits[i * per:(i + 1) * per], tokens[i * per:(i + 1) * per])
             for i in range(world)) / world).backward()
        ref_opt.step()
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in model.state_dict().items()}
    err = max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items())
    if rank == 0:
        print(f"max parameter difference {err:.3g}")
    dist.barrier()  # no rank tears gloo down while another still uses it (as nestc.train's Ranks)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # leave without tearing the interpreter down: a process group's threads made that abort
    # ("terminate called without an active exception") about once in ten runs on a loaded
    # machine, after both ranks had destroyed the group (as `nestc` does, nestc.cli.script)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
