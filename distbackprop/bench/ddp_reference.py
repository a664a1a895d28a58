"""The reference job under PyTorch DistributedDataParallel, for `bench scaling`'s comparison.

Run as a script by an interpreter that has torch (it is not a dependency of
distbackprop): ``python ddp_reference.py WORLD STEPS PER_WORKER`` prints one JSON
line ``{"samples_per_second": ..., "step_ms": ...}``. The job is the one `bench scaling`
times: the MLP 784-1024-1024-10 (ReLU), float32, softmax cross-entropy, Adam (lr 1e-3),
PER_WORKER examples per process per step, WORLD processes × 1 intra-op thread each,
gradients averaged by DDP over gloo on loopback. The timed window is STEPS steps after 5
warm-up steps, from a barrier to a barrier; samples/s = WORLD · PER_WORKER · STEPS / time.
Only torch and the standard library are imported (the script runs from its file path).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, steps: int, per_worker: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(4096, 784, generator=g)
    y = torch.randint(0, 10, (4096,), generator=g)
    batches = 4096 // per_worker

    def step(i: int) -> None:
        j = (i % batches) * per_worker
        opt.zero_grad(set_to_none=True)
        loss_fn(ddp(x[j:j + per_worker]), y[j:j + per_worker]).backward()
        opt.step()

    for i in range(5):
        step(i)
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        out.put({"samples_per_second": world * per_worker * steps / seconds,
                 "step_ms": seconds / steps * 1e3})
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    import torch.multiprocessing as mp
    world, steps, per_worker = (int(a) for a in argv[:3])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, steps, per_worker, port, out))
             for r in range(world)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    print(json.dumps(result), flush=True)
    return 0 if all(p.exitcode == 0 for p in procs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
