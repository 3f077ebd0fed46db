"""fused_hapo_loss reproduces TRL's GRPOTrainer loss and Liger-Kernel's triton_grpo_loss.

TRL: ``trl_compute_loss`` below restates ``GRPOTrainer._compute_loss`` (trl/trainer/
grpo_trainer.py: log-ratio, token / sequence importance weights, ``delta`` two-sided clip,
k3 KL, and the ``grpo`` / ``bnpo`` / ``dr_grpo`` / ``dapo`` reductions) and TRL's group
advantages, written independently here in float64 eager torch. TRL's ``delta`` clamps the
ratio at ``delta`` before the PPO min; for ``delta >= 1 + eps_high`` that is exactly our
``dual_clip`` (docs/design.md section 4).

Liger: ``liger_kernel.ops.grpo_loss.GrpoLossFunction`` (the Function behind
``triton_grpo_loss``), run through the Triton interpreter on the same inputs. Liger takes
``[B, L+1, V]`` logits and reads the first L positions; we get the view ``logits[:, :-1]``.
"""
import pytest
import torch

import hapo_kernels as hk

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


# --------------------------------------------------------------------------- TRL
def trl_selective_log_softmax(logits, index):
    return torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)


def trl_entropy(logits):
    p = logits.softmax(-1)
    return -(p * logits.log_softmax(-1)).sum(-1)


def trl_compute_loss(logits, completion_ids, completion_mask, advantages, old_per_token_logps,
                     ref_per_token_logps, *, temperature, beta, epsilon_low, epsilon_high,
                     loss_type, importance_sampling_level="token", max_completion_length=None,
                     num_items_in_batch=None, num_processes=1, delta=None):
    logits = logits / temperature
    per_token_logps = trl_selective_log_softmax(logits, completion_ids)
    entropies = trl_entropy(logits.detach())
    if beta != 0.0:
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                        - (ref_per_token_logps - per_token_logps) - 1)
    old_per_token_logps = (per_token_logps.detach() if old_per_token_logps is None
                           else old_per_token_logps)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * completion_mask).sum(-1)
                                  / completion_mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    mask = completion_mask
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "dapo":
        normalizer = num_items_in_batch / num_processes
        loss = (per_token_loss * mask).sum() / normalizer
    count = mask.sum().clamp(min=1.0)
    adv = advantages.unsqueeze(1)
    raw = torch.exp(log_importance_weights).detach().expand_as(per_token_loss)
    metrics = {
        "entropy": (entropies * mask).sum() / count,
        "clip_low": (((raw < 1 - epsilon_low) & (adv < 0)) * mask).sum() / count,
        "clip_high": (((raw > 1 + epsilon_high) & (adv > 0)) * mask).sum() / count,
    }
    if beta != 0.0:
        metrics["kl"] = (per_token_kl.detach() * mask).sum() / count
    return loss, metrics


def trl_advantages(rewards, num_generations, scale_rewards="group"):
    """TRL's group-relative advantages (rewards - group mean) / (std + 1e-4)."""
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages


def _inputs(B=4, T=6, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[-1] = 0.0
    logp = torch.log_softmax(logits.double() / 0.9, -1).gather(-1, ids[..., None])[..., 0]
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, generator=g)
    return logits, ids, mask, adv, old, ref


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,old,delta", [(0.0, True, None), (0.04, False, None),
                                            (0.04, True, 3.0)])
def test_trl_compute_loss(backend, loss_type, level, beta, old, delta):
    logits, ids, mask, adv, old_logp, ref_logp = _inputs()
    old_logp = old_logp if old else None
    max_len = 8
    n_items = mask.sum()
    xr = logits.double().requires_grad_()
    ref_loss, ref_metrics = trl_compute_loss(
        xr, ids, mask.double(), adv.double(), None if old_logp is None else old_logp.double(),
        ref_logp.double(), temperature=0.9, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
        loss_type=loss_type, importance_sampling_level=level, max_completion_length=max_len,
        num_items_in_batch=n_items.double(), delta=delta)
    ref_loss.backward()
    x = logits.clone().requires_grad_()
    out = hk.fused_hapo_loss(x, ids, adv, mask=mask, old_logp=old_logp, ref_logp=ref_logp,
                             temperature=0.9, beta=beta, eps_low=0.2, eps_high=0.28,
                             dual_clip=delta, importance_sampling=level, aggregation=loss_type,
                             max_len=max_len if loss_type == "dr_grpo" else None)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4,
                               atol=1e-5 * xr.grad.abs().max().item())
    for name, value in ref_metrics.items():
        assert float(getattr(out, name)) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name


def test_trl_dapo_with_num_items_in_batch(backend):
    """TRL's dapo normalizer is num_items_in_batch / num_processes: our ``normalizer``."""
    logits, ids, mask, adv, old_logp, ref_logp = _inputs(seed=1)
    n_items, procs = torch.tensor(57.0, dtype=torch.float64), 2
    xr = logits.double().requires_grad_()
    ref_loss, _ = trl_compute_loss(xr, ids, mask.double(), adv.double(), old_logp.double(),
                                   ref_logp.double(), temperature=0.9, beta=0.0,
                                   epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo",
                                   num_items_in_batch=n_items, num_processes=procs)
    ref_loss.backward()
    x = logits.clone().requires_grad_()
    out = hk.fused_hapo_loss(x, ids, adv, mask=mask, old_logp=old_logp, temperature=0.9,
                             aggregation="dapo", normalizer=float(n_items) / procs)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4,
                               atol=1e-5 * xr.grad.abs().max().item())


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_trl_advantages(backend, scale):
    rewards = torch.rand(24)
    rewards[:8] = 0.0
    ours, replaced = hk.group_advantages(rewards, 8, scale=scale)
    torch.testing.assert_close(ours.double(), trl_advantages(rewards.double(), 8, scale),
                               rtol=1e-5, atol=1e-5)
    assert replaced.tolist() == [-1, -1, -1]


# --------------------------------------------------------------------------- Liger
@pytest.mark.kernel
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,old", [(0.0, True), (0.04, True), (0.04, False)])
def test_liger_triton_grpo_loss(backend, loss_type, level, beta, old):
    # liger-kernel is in the dev extra that `make test` installs: a missing one must fail.
    import liger_kernel.ops.grpo_loss as liger
    B, T, V = 3, 4, 37
    logits, ids, mask, adv, old_logp, ref_logp = _inputs(B, T + 1, V, seed=2)
    ids, mask = ids[:, :T].contiguous(), mask[:, :T].to(torch.int32).contiguous()
    old_logp = old_logp[:, :T].contiguous() if old else None
    ref_logp = ref_logp[:, :T].contiguous()
    max_len = 7 if loss_type == "dr_grpo" else None

    xl = logits.clone().requires_grad_()
    liger_loss, *liger_metrics = liger.GrpoLossFunction.apply(
        xl, old_logp, ref_logp if beta else None, ids, adv, mask, 0.9, beta, 0.2, 0.28,
        False, loss_type, max_len, True, level)
    liger_loss.backward()

    x = logits.clone().requires_grad_()
    out = hk.fused_hapo_loss(x[:, :-1], ids, adv, mask=mask, old_logp=old_logp,
                             ref_logp=ref_logp if beta else None, temperature=0.9, beta=beta,
                             eps_low=0.2, eps_high=0.28, importance_sampling=level,
                             aggregation=loss_type, max_len=max_len)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(liger_loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(x.grad, xl.grad, rtol=1e-4,
                               atol=1e-5 * xl.grad.abs().max().item())
    clip_ratio = liger_metrics[-1]
    assert float(out.clip_low + out.clip_high) == pytest.approx(float(clip_ratio.detach()),
                                                                 abs=1e-6)
    if beta:
        assert float(out.kl) == pytest.approx(float(liger_metrics[0].detach()), rel=1e-5,
                                             abs=1e-6)
