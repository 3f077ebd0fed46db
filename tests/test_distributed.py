"""torch.distributed on CPU (gloo), 2 and 3 processes, against the single-process results.

One spawn per world size (a module-scoped fixture) runs every scenario in the workers and
saves each rank's results; the tests then compare them with the single-process path and
the float64 reference computed here on the same seeded data:

* vocab-parallel ``selective_log_softmax`` and ``fused_hapo_loss``: uneven vocabulary
  slices; values, metrics and every rank's slice gradient equal the unsharded ones;
* data-parallel ``group_advantages`` with groups that span ranks, ``decide_injections``
  (the gate decides once; every rank agrees), ``dapo`` / ``token-mean`` with the global
  token count, and ``rewards=`` across ranks.
"""
import datetime
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hapo_kernels as hk
from hapo_kernels import reference as R

B, T, V = 3, 5, 37
VOCAB_CUTS = {2: [0, 15, 37], 3: [0, 5, 25, 37]}           # uneven slices, rank order
REWARD_CUTS = {2: [0, 7, 20], 3: [0, 6, 15, 20]}           # groups of 4 span ranks
G = 4
TOKEN_CUTS = {2: [0, 1, 4], 3: [0, 2, 3, 4]}               # data-parallel sequences per rank


# --------------------------------------------------------------------------- shared data
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def vocab_batch(dtype=torch.float32, packed=False):
    g = _gen(7)
    x = (torch.randn(B, T + 1, V, generator=g) * 2.5).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 1] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 3:] = 0
    d = dict(logits=x, targets=y, mask=mask, adv=torch.randn(B, generator=g),
             old_logp=-torch.rand(B, T, generator=g) * 3,
             ref_logp=-torch.rand(B, T, generator=g) * 3,
             teacher=torch.tensor([False, True, False]),
             g_logp=torch.randn(B, T, generator=g), g_ent=torch.randn(B, T, generator=g))
    if packed:
        # Sequences of lengths 5, 3, 7 packed into N = 15 rows.
        d = {k: (v.reshape(B * T, *v.shape[2:]) if k in ("targets", "mask", "old_logp",
                                                          "ref_logp", "g_logp", "g_ent")
                 else v) for k, v in d.items()}
        d["logits"] = d["logits"][:, :T].reshape(B * T, V)
        d["cu"] = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    return d


LOSS_CONFIGS = {
    "token": dict(aggregation="token-mean", beta=0.05, entropy_coef=0.01, temperature=0.8,
                  eps_low=0.1, eps_high=0.1),
    "gspo": dict(aggregation="grpo", importance_sampling="sequence",
                 teacher_objective="sft", eps_low=0.1, eps_high=0.1),
    "inplace": dict(aggregation="dr_grpo", dual_clip=3.0, inplace_grad=True,
                    entropy_coef=0.01, teacher_objective="ratio"),
    "bf16": dict(aggregation="seq-mean-token-sum", entropy_coef=0.02, dtype=torch.bfloat16),
    "packed": dict(aggregation="seq-mean-token-mean", importance_sampling="sequence",
                   entropy_coef=0.01, packed=True),
    # -inf logits (a masked vocabulary range) take the NaN-safe route on every slice.
    "masked_vocab": dict(aggregation="token-mean", entropy_coef=0.01, masked_vocab=True),
}
MASKED_COLUMNS = [3, 4, 20, 30]


def loss_inputs(cfg):
    cfg = dict(cfg)
    dtype, packed = cfg.pop("dtype", torch.float32), cfg.pop("packed", False)
    d = vocab_batch(dtype, packed)
    if cfg.pop("masked_vocab", False):
        d["logits"][..., MASKED_COLUMNS] = float("-inf")
        d["targets"][torch.isin(d["targets"], torch.tensor(MASKED_COLUMNS))] = 0
    logits = d["logits"] if packed else d["logits"][:, :-1]        # a strided view
    kw = dict(target_ids=d["targets"], advantages=d["adv"], mask=d["mask"],
              old_logp=d["old_logp"], ref_logp=d["ref_logp"], teacher_mask=d["teacher"],
              **cfg)
    if packed:
        kw["cu_seqlens"] = d["cu"]
    return logits, kw


def loss_and_grad(logits, **kw):
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1.0 if kw.get("inplace_grad") else leaf      # in-place needs a non-leaf
    out = hk.fused_hapo_loss(x, **kw)
    (out.loss * 1.5).backward()                              # grad_output != 1
    return out, leaf.grad


def dp_rewards():
    g = _gen(11)
    rewards = (torch.rand(20, generator=g) > 0.7).float()
    inject = torch.tensor([True, False, True, True, False])
    return rewards, inject


def dp_batch():
    g = _gen(13)
    x = torch.randn(4, T, V, generator=g) * 2
    y = torch.randint(0, V, (4, T), generator=g)
    mask = (torch.rand(4, T, generator=g) > 0.3).long()
    mask[0] = 1
    adv = torch.randn(4, generator=g)
    return x, y, mask, adv


# --------------------------------------------------------------------------- the workers
def _vocab_scenarios(rank, world):
    group = dist.group.WORLD
    lo, hi = VOCAB_CUTS[world][rank], VOCAB_CUTS[world][rank + 1]
    res = {}
    d = vocab_batch()
    leaf = d["logits"].clone().requires_grad_()
    logp, ent = hk.selective_log_softmax(leaf[:, :-1, lo:hi], d["targets"], 0.7,
                                         return_entropy=True, vocab_parallel_group=group)
    (logp * d["g_logp"] + ent * d["g_ent"]).sum().backward()
    res["logprobs"] = dict(logp=logp.detach(), ent=ent.detach(),
                           grad=leaf.grad[:, :-1, lo:hi].clone())
    bad = d["targets"].clone()
    bad[0, 0] = V                       # in no rank's slice: outside the global vocabulary
    try:
        hk.selective_log_softmax(leaf[:, :-1, lo:hi], bad, vocab_parallel_group=group)
        res["bad_target"] = "no error"
    except ValueError as e:
        res["bad_target"] = str(e)
    for name, cfg in LOSS_CONFIGS.items():
        logits, kw = loss_inputs(cfg)
        out, grad = loss_and_grad(logits[..., lo:hi], vocab_parallel_group=group, **kw)
        res["loss_" + name] = dict(loss=out.loss.detach(), grad=grad,
                                   per_token_logp=out.per_token_logp, metrics=out.metrics())
    return res


def _dp_scenarios(rank, world):
    from hapo.gate import ThompsonGate
    from hapo_kernels.distributed import decide_injections
    group = dist.group.WORLD
    res = {}
    rewards, inject = dp_rewards()
    lo, hi = REWARD_CUTS[world][rank], REWARD_CUTS[world][rank + 1]
    # Only the first rank's decisions count: the others pass garbage on purpose.
    mine = inject if rank == 0 else ~inject
    for scale, stats in (("group", "all"), ("batch", "on-policy")):
        adv, replaced = hk.group_advantages(rewards[lo:hi], G, mine, scale=scale, stats=stats,
                                            process_group=group)
        res[f"adv_{scale}_{stats}"] = dict(adv=adv, replaced=replaced)

    gate = ThompsonGate(mode="thompson", threshold=0.6, seed=100 + rank)
    decisions = [decide_injections(gate, rewards[lo:hi], G, group) for _ in range(3)]
    persistent = ThompsonGate(memory="persistent", discount=0.5)
    keys = [10, 11, 12, 13, 14]
    pers = [decide_injections(persistent, rewards[lo:hi] * s, G, group, prompt_ids=keys)
            for s in (1.0, 0.0)]
    res["gate"] = dict(thompson=torch.stack(decisions), persistent=torch.stack(pers),
                       counts=dict(persistent.counts))

    x, y, mask, adv = dp_batch()
    tlo, thi = TOKEN_CUTS[world][rank], TOKEN_CUTS[world][rank + 1]
    for agg, pg in (("dapo", None), ("token-mean", group)):
        out, grad = loss_and_grad(x[tlo:thi], target_ids=y[tlo:thi], advantages=adv[tlo:thi],
                                  mask=mask[tlo:thi], aggregation=agg, process_group=pg)
        res["dp_" + agg] = dict(loss=out.loss.detach(), grad=grad)

    # rewards= across ranks: the sequences of this rank are rollouts lo..hi of 20.
    g = _gen(17)
    xr = torch.randn(20, 3, V, generator=g)
    yr = torch.randint(0, V, (20, 3), generator=g)
    out, grad = loss_and_grad(xr[lo:hi], target_ids=yr[lo:hi], rewards=rewards[lo:hi],
                              group_size=G, inject=mine, process_group=group,
                              aggregation="seq-mean-token-sum")
    res["dp_rewards"] = dict(loss=out.loss.detach(), grad=grad, adv=out.advantages,
                             replaced=out.replaced, teacher_fraction=out.teacher_fraction)
    return res


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        res = {**_vocab_scenarios(rank, world), **_dp_scenarios(rank, world)}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(fn, args, nprocs, deadline=900):
    """``mp.spawn`` with a deadline: every collective is bounded by the process group's
    timeout, and this bounds the rest, so that no run of the suite can hang."""
    import time
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    stop = time.monotonic() + deadline
    while not context.join(timeout=5):
        if time.monotonic() > stop:
            for proc in context.processes:
                proc.kill()
            pytest.fail(f"the {nprocs} workers did not finish within {deadline} s")


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def ranks(request, tmp_path_factory):
    """Every rank's results, for world sizes 2 and 3 (one spawn each)."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"dist{world}")
    spawn(_worker, (world, str(tmp / "init"), str(tmp)), world)
    return world, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


# --------------------------------------------------------------------------- vocab-parallel
def test_vocab_parallel_selective_log_softmax(ranks):
    check_vocab_logprobs(ranks[1])


def test_vocab_parallel_targets_are_checked_against_the_whole_vocabulary(ranks):
    for r in ranks[1]:
        assert f"outside [0, {V})" in r["bad_target"]


@pytest.mark.parametrize("name", list(LOSS_CONFIGS))
def test_vocab_parallel_loss_equals_unsharded(ranks, name):
    check_vocab_loss(ranks[1], name)


def _vocab_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        torch.save(_vocab_scenarios(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.kernel
def test_vocab_parallel_on_the_triton_kernels(tmp_path):
    """The same checks with the Triton kernels as each slice's backend: the workers
    inherit TRITON_INTERPRET=1 and run them on CPU tensors through the interpreter."""
    from hapo_kernels.backends import backend_name
    assert backend_name(torch.zeros(1)) == "triton", "run with TRITON_INTERPRET=1"
    spawn(_vocab_worker, (2, str(tmp_path / "init"), str(tmp_path)), 2)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    check_vocab_logprobs(res)
    for name in LOSS_CONFIGS:
        check_vocab_loss(res, name)


def check_vocab_logprobs(res):
    d = vocab_batch()
    x64 = d["logits"].double().requires_grad_()
    logp, ent = R.log_probs(x64[:, :-1], d["targets"], 0.7)
    (logp * d["g_logp"] + ent * d["g_ent"]).sum().backward()
    grads = []
    for r in res:
        torch.testing.assert_close(r["logprobs"]["logp"].double(), logp.detach(),
                                   rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(r["logprobs"]["ent"].double(), ent.detach(),
                                   rtol=1e-5, atol=2e-6)
        grads.append(r["logprobs"]["grad"])
    torch.testing.assert_close(torch.cat(grads, -1).double(), x64.grad[:, :-1],
                               rtol=1e-5, atol=2e-6)


def check_vocab_loss(res, name):
    logits, kw = loss_inputs(LOSS_CONFIGS[name])
    ref, ref_grad = loss_and_grad(logits, **kw)              # the single-process path
    low = logits.dtype == torch.bfloat16
    for r in res:
        got = r["loss_" + name]
        torch.testing.assert_close(got["loss"], ref.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["per_token_logp"], ref.per_token_logp,
                                   rtol=1e-5, atol=2e-6)
        for k, v in ref.metrics().items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    grad = torch.cat([r["loss_" + name]["grad"] for r in res], -1)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2 if low else 1e-5,
                               atol=1e-5 if low else 1e-6)
    assert grad.abs().sum() > 0


# --------------------------------------------------------------------------- data-parallel
@pytest.mark.parametrize("scale, stats", [("group", "all"), ("batch", "on-policy")])
def test_group_advantages_across_ranks(ranks, scale, stats):
    world, res = ranks
    rewards, inject = dp_rewards()
    adv, replaced = hk.group_advantages(rewards, G, inject, scale=scale, stats=stats)
    ref, _ = R.group_advantages(rewards, G, inject, scale=scale, stats=stats)
    got = [r[f"adv_{scale}_{stats}"] for r in res]
    torch.testing.assert_close(torch.cat([g["adv"] for g in got]), adv)
    torch.testing.assert_close(torch.cat([g["adv"] for g in got]).double(), ref,
                               rtol=1e-5, atol=1e-6)
    for g in got:
        assert torch.equal(g["replaced"], replaced)
    cuts = REWARD_CUTS[world]
    assert any(c % G for c in cuts), "some group must span two ranks"


def test_gate_decides_once_and_ranks_agree(ranks):
    from hapo.gate import ThompsonGate
    world, res = ranks
    rewards, _ = dp_rewards()
    gate = ThompsonGate(mode="thompson", threshold=0.6, seed=100)     # rank 0's seed
    want = torch.stack([gate.decide(rewards, G) for _ in range(3)])
    persistent = ThompsonGate(memory="persistent", discount=0.5)
    keys = [10, 11, 12, 13, 14]
    want_p = torch.stack([persistent.decide(rewards * s, G, prompt_ids=keys)
                          for s in (1.0, 0.0)])
    for r in res:
        assert torch.equal(r["gate"]["thompson"], want)
        assert torch.equal(r["gate"]["persistent"], want_p)
        assert r["gate"]["counts"] == persistent.counts
    assert 0 < int(want.sum()) < want.numel()       # a real mix of decisions


@pytest.mark.parametrize("agg", ["dapo", "token-mean"])
def test_global_token_count(ranks, agg):
    """Per-rank loss / world size sums to the global token mean; so do the gradients
    (what DDP's gradient mean gives)."""
    world, res = ranks
    x, y, mask, adv = dp_batch()
    ref, ref_grad = loss_and_grad(x, target_ids=y, advantages=adv, mask=mask,
                                  aggregation="token-mean")
    total = sum(r["dp_" + agg]["loss"] for r in res) / world
    torch.testing.assert_close(total, ref.loss.detach(), rtol=1e-5, atol=1e-6)
    grad = torch.cat([r["dp_" + agg]["grad"] for r in res]) / world
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_loss_with_rewards_across_ranks(ranks):
    world, res = ranks
    rewards, inject = dp_rewards()
    g = _gen(17)
    xr = torch.randn(20, 3, V, generator=g)
    yr = torch.randint(0, V, (20, 3), generator=g)
    ref, ref_grad = loss_and_grad(xr, target_ids=yr, rewards=rewards, group_size=G,
                                  inject=inject, aggregation="seq-mean-token-sum")
    cuts = REWARD_CUTS[world]
    for k, r in enumerate(res):
        got = r["dp_rewards"]
        lo, hi = cuts[k], cuts[k + 1]
        torch.testing.assert_close(got["adv"], ref.advantages[lo:hi])
        assert torch.equal(got["replaced"], ref.replaced)
        # seq-mean-token-sum over this rank's sequences: sum_r n_r * loss_r / n = global.
        torch.testing.assert_close(got["grad"] * (hi - lo) / 20, ref_grad[lo:hi],
                                   rtol=1e-5, atol=1e-7)
    total = sum(r["dp_rewards"]["loss"] * (cuts[k + 1] - cuts[k]) for k, r in enumerate(res))
    torch.testing.assert_close(total / 20, ref.loss.detach(), rtol=1e-5, atol=1e-6)
    teacher_tokens = sum(float(r["dp_rewards"]["teacher_fraction"]) * (cuts[k + 1] - cuts[k])
                         for k, r in enumerate(res))
    assert teacher_tokens / 20 == pytest.approx(float(ref.teacher_fraction), abs=1e-6)


def test_without_init_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    x = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="init_process_group"):
        hk.selective_log_softmax(x, y, vocab_parallel_group=object())
    with pytest.raises(ValueError, match="init_process_group"):
        hk.group_advantages(torch.rand(4), 2, process_group=object())


def test_example_runs_under_torchrun():
    """``examples/distributed_hapo.py`` trains for two steps with two CPU processes."""
    root = pathlib.Path(__file__).resolve().parent.parent
    torchrun = pathlib.Path(sys.executable).parent / "torchrun"
    cmd = ([str(torchrun)] if torchrun.exists() else [sys.executable, "-m",
                                                       "torch.distributed.run"])
    cmd += ["--standalone", "--nproc_per_node=2", str(root / "examples/distributed_hapo.py"),
            "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "step   1" in done.stdout
