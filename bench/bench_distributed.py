"""Vocab-parallel cost: sharded loss per rank vs unsharded, and the all-reduces alone.

    python bench/bench_distributed.py [--world 2] [--tokens 2048] [--vocab 32768]
                                      [--repeats 7] [--out bench/results/distributed_cpu.json]

Spawns ``--world`` CPU processes on gloo (one thread each). On every rank, timed at the
same moment on all ranks (a barrier before each repetition; median of ``--repeats``):

* ``unsharded``: ``fused_hapo_loss`` forward + backward on the whole ``[tokens, vocab]``;
* ``sharded``: the same with ``vocab_parallel_group`` on this rank's ``vocab / world``
  columns (two all-reduces of ``[tokens]``-sized vectors and a size all-gather inside);
* ``collectives``: those collectives alone, on vectors of the same sizes;
* the same three for ``selective_log_softmax`` (forward + backward).

The claim to check: ``sharded <= unsharded + collectives`` per rank.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(fn, repeats):
    times = []
    for _ in range(repeats + 1):                   # the first run warms up
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _collectives(N, device):
    """The vocab-parallel path's communication alone (see hapo_kernels.distributed)."""
    sizes = [torch.empty(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([1], dtype=torch.int64))
    m = torch.randn(N, device=device)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    s = torch.randn(4, N, device=device)
    dist.all_reduce(s)


def _worker(rank, world, init, args, out_path):
    import hapo_kernels as hk
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    N, V = args.tokens, args.vocab
    torch.manual_seed(0)
    full = torch.randn(N, V) * 2
    y = torch.randint(0, V, (N,))
    adv = torch.randn(N)
    old = -torch.rand(N) * 3
    cuts = [k * V // world for k in range(world + 1)]
    local = full[:, cuts[rank]:cuts[rank + 1]].contiguous()
    group = dist.group.WORLD

    def loss(x, **kw):
        leaf = x.detach().requires_grad_()
        hk.fused_hapo_loss(leaf, y, adv, old_logp=old, entropy_coef=0.01, **kw).loss.backward()

    def logprobs(x, **kw):
        leaf = x.detach().requires_grad_()
        hk.selective_log_softmax(leaf, y, **kw).sum().backward()

    res = {
        "loss_unsharded": _timed(lambda: loss(full), args.repeats),
        "loss_sharded": _timed(lambda: loss(local, vocab_parallel_group=group), args.repeats),
        "logprobs_unsharded": _timed(lambda: logprobs(full), args.repeats),
        "logprobs_sharded": _timed(lambda: logprobs(local, vocab_parallel_group=group),
                                   args.repeats),
        "collectives": _timed(lambda: _collectives(N, full.device), args.repeats),
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "res.json")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "init"), args, out_path),
                 nprocs=args.world, join=True)
        with open(out_path) as f:
            per_rank = json.load(f)
    print(f"vocab-parallel on CPU/gloo: world {args.world}, fp32 [{args.tokens}, "
          f"{args.vocab}], 1 thread per rank, median of {args.repeats} (ms, per rank)")
    print(f"{'rank':>4} {'op':>9} {'unsharded':>10} {'sharded':>9} {'collectives':>12} "
          f"{'sharded - (unsharded + coll.)':>30}")
    for r, res in enumerate(per_rank):
        for op in ("loss", "logprobs"):
            u, s, c = res[f"{op}_unsharded"], res[f"{op}_sharded"], res["collectives"]
            print(f"{r:>4} {op:>9} {u * 1e3:10.1f} {s * 1e3:9.1f} {c * 1e3:12.2f} "
                  f"{(s - u - c) * 1e3:+30.1f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "per_rank_seconds": per_rank}, f, indent=1)


if __name__ == "__main__":
    main()
