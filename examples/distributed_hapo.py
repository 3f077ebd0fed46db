"""Data-parallel HAPO on CPU with torch.distributed (gloo) and DDP.

    torchrun --standalone --nproc_per_node=2 examples/distributed_hapo.py [--steps 20]

Trains the demo's tiny transformer (``hapo.demo``) on the sparse-reward reversal task.
Every step the ranks share one global batch of ``P`` prompts x ``G`` rollouts, groups
contiguous, and rank ``k`` generates a contiguous slice of those ``P * G`` rollouts, so a
group's rollouts may live on two ranks. Then:

1. the gate decides once per group on the gathered rewards; every rank gets the same
   decisions (``hapo_kernels.distributed.decide_injections``);
2. ``group_advantages(..., process_group=)`` gathers the rewards, does the SSI substitution
   and returns this rank's advantages and every group's replaced member;
3. the rank that holds a replaced member swaps in the teacher demonstration;
4. ``fused_hapo_loss(aggregation="dapo")`` divides by the global token count / world size,
   so DDP's gradient mean is the gradient of the global token-mean loss.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hapo_kernels as hk  # noqa: E402
from hapo import ThompsonGate  # noqa: E402
from hapo.demo.model import TinyCausalLM  # noqa: E402
from hapo.demo.task import ReverseTask  # noqa: E402
from hapo_kernels.distributed import decide_injections  # noqa: E402


@torch.no_grad()
def sample(policy, prompts, length, generator):
    seq = prompts
    for _ in range(length):
        logits = policy(seq)[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompts.shape[1]:]


def main(argv=None):
    ap = argparse.ArgumentParser(description="data-parallel HAPO on CPU (torchrun)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=6, help="prompts per step (global)")
    ap.add_argument("--group-size", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args(argv)

    dist.init_process_group("gloo")                # torchrun sets RANK, WORLD_SIZE, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    task = ReverseTask(length=3, digits=5)
    torch.manual_seed(0)                           # DDP also broadcasts rank 0's weights
    policy = TinyCausalLM(task.vocab_size, max_len=task.prompt_len + task.length,
                          d_model=32, d_ff=64)
    model = DDP(policy)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    gate = ThompsonGate(threshold=0.8)             # the paper's posterior-mean gate
    P, G = args.prompts, args.group_size
    n = P * G
    lo, hi = rank * n // world, (rank + 1) * n // world      # this rank's rollouts
    sample_gen = torch.Generator().manual_seed(1000 + rank)

    for step in range(args.steps):
        prompts = task.sample_prompts(P, torch.Generator().manual_seed(step))  # shared
        prompt_rows = prompts.repeat_interleave(G, dim=0)[lo:hi]
        completions = sample(policy, prompt_rows, task.length, sample_gen)
        mask = torch.ones_like(completions)
        rewards = task.reward(prompt_rows, completions, mask)

        inject = decide_injections(gate, rewards, G, step=step)
        adv, replaced = hk.group_advantages(rewards, G, inject,
                                            process_group=dist.group.WORLD)
        teacher = torch.zeros(hi - lo, dtype=torch.bool)
        for p in torch.nonzero(replaced >= 0).flatten().tolist():
            row = p * G + int(replaced[p])          # global rollout index
            if lo <= row < hi:
                completions[row - lo] = task.answer(prompts[p:p + 1])[0]
                teacher[row - lo] = True

        input_ids = torch.cat([prompt_rows, completions], dim=1)
        logits = model(input_ids)[:, task.prompt_len - 1:-1]      # a strided view, no copy
        out = hk.fused_hapo_loss(logits, completions, adv, mask=mask, teacher_mask=teacher,
                                 aggregation="dapo")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()                        # DDP averages the gradients
        optimizer.step()

        # Each rank's dapo loss is its share; their mean is the global token-mean loss.
        stats = torch.tensor([float(rewards.sum()), float(rewards.numel()),
                              float(out.loss.detach())])
        dist.all_reduce(stats)
        if rank == 0:
            print(f"step {step:3d}  success {stats[0] / stats[1]:.3f}  "
                  f"injected {int((replaced >= 0).sum())}/{P}  loss {stats[2] / world:+.4f}",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
