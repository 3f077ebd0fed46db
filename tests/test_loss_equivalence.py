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


# --------------------------------------------------------------------------- TRL 1.16
def trl116_gamma_weights(advantages, log_ratio_per_token, mask, importance_sampling_ratio,
                         k_pos, lambda_pos, k_neg, lambda_neg):
    """TRL 1.16's ``GRPOTrainer.get_gamma_weights`` (VESPO), line for line."""
    import math
    lower_clamp = math.log(1e-8)
    log_ratio_clamped = torch.clamp(log_ratio_per_token, -20.0, 20.0)
    seq_log_ratio = torch.sum(log_ratio_clamped * mask, dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_is_ratio = torch.clamp(torch.log(importance_sampling_ratio), lower_clamp, 20.0)
        seq_log_ratio += torch.sum(log_is_ratio, dim=-1, keepdim=True)
    log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = advantages >= 0
    k_seq = torch.where(is_nonneg_adv, k_pos, k_neg)
    lambda_seq = torch.where(is_nonneg_adv, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).detach()


def trl116_compute_loss(logits, completion_ids, mask, advantages, old_per_token_logps,
                        ref_per_token_logps, *, temperature, beta, epsilon_low, epsilon_high,
                        loss_type, importance_sampling_level="token", max_completion_length=8,
                        num_items_in_batch=None, delta=None, use_bias_correction_kl=True,
                        importance_sampling_ratio=None, sampling_per_token_logps=None,
                        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                        entropy_coef=0.0, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                        vespo=(2.0, 3.0, 3.0, 2.0)):
    """``GRPOTrainer._compute_loss`` of TRL 1.16.0 (one process, GA = S = 1), restated."""
    logits = logits / temperature
    per_token_logps = trl_selective_log_softmax(logits, completion_ids)
    entropies = trl_entropy(logits)            # differentiable (TRL's fused head)
    if top_entropy_quantile < 1.0:
        local = entropies.detach()[mask.bool()]
        threshold = torch.quantile(local, 1 - top_entropy_quantile)
        entropy_mask = ((entropies.detach() * mask) >= threshold) & mask.bool()
    else:
        entropy_mask = None
    advantages = advantages.unsqueeze(1)
    old_per_token_logps = (per_token_logps.detach() if old_per_token_logps is None
                           else old_per_token_logps)
    if off_policy_mask_threshold is not None:
        sampling = (sampling_per_token_logps if sampling_per_token_logps is not None
                    else old_per_token_logps)
        kl_div = torch.nan_to_num(sampling - per_token_logps.detach(), nan=0.0)
        avg_seq_kl = ((kl_div * mask).sum(1, keepdim=True)
                      / mask.sum(1, keepdim=True).clamp(min=1.0))
        off_policy_mask = ((advantages >= 0)
                           | (avg_seq_kl <= off_policy_mask_threshold)).to(mask.dtype)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1)
                                  / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                        - (ref_per_token_logps - per_token_logps) - 1)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    elif loss_type == "vespo":
        phi_seq = trl116_gamma_weights(advantages, log_ratio, mask, importance_sampling_ratio,
                                       *vespo)
        per_token_loss = -phi_seq * advantages * per_token_logps
    if off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type in ["cispo", "dapo", "vespo"]:
        loss = (per_token_loss * mask).sum() / num_items_in_batch.clamp(min=1.0)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    if entropy_coef != 0.0:
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - entropy_coef * ((entropies * effective_mask).sum()
                                      / effective_mask.sum().clamp(min=1.0))
    return loss


def trl116_vllm_ratio(old, sampling, mask, mode, clip_min=None, clip_max=3.0):
    """TRL 1.16's vLLM importance-sampling ratio (``_generate_and_score_completions``)."""
    import math
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), value=0.0)


TRL116_LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]
VLLM_MODES = [None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def trl116_configs():
    """Every loss type x level x KL setting, with delta, the vLLM IS mode and the entropy
    options rotating through their values (a covering, not the full product)."""
    import itertools
    kl = [(0.0, True), (0.05, True), (0.05, False)]
    deltas = itertools.cycle([None, 1.1, 0.9, 2.5])
    modes = itertools.cycle(VLLM_MODES)
    entropy = itertools.cycle([dict(), dict(top_entropy_quantile=0.5),
                               dict(entropy_coef=0.05), dict(off_policy_mask_threshold=0.02),
                               dict(top_entropy_quantile=0.3, entropy_coef=0.1,
                                    off_policy_mask_threshold=0.0)])
    configs = []
    for loss_type, level, (beta, bias) in itertools.product(TRL116_LOSS_TYPES,
                                                            ["token", "sequence"], kl):
        mode = next(modes)
        if loss_type == "vespo" and mode and mode.startswith("sequence"):
            mode = "token_mask"                # TRL refuses sequence modes with vespo
        configs.append(dict(loss_type=loss_type, level=level, beta=beta, bias=bias,
                            delta=next(deltas), mode=mode, **next(entropy)))
    return configs


@pytest.mark.parametrize("cfg", trl116_configs(), ids=lambda c: "-".join(map(str, c.values())))
def test_trl116_compute_loss(backend, cfg):
    """Loss and logits gradient equal TRL 1.16's on every loss type and option."""
    cfg = dict(cfg)
    loss_type, level, beta, bias = (cfg.pop(k) for k in ("loss_type", "level", "beta", "bias"))
    delta, mode = cfg.pop("delta"), cfg.pop("mode")
    logits, ids, mask, adv, old_logp, ref_logp = _inputs(seed=3)
    g = torch.Generator().manual_seed(5)
    sampling = (old_logp + 0.3 * torch.randn(old_logp.shape, generator=g)) * mask
    ratio = None if mode is None else trl116_vllm_ratio(old_logp.double(), sampling.double(),
                                                         mask.double(), mode)
    n_items = mask.sum()
    xr = logits.double().requires_grad_()
    ref_loss = trl116_compute_loss(
        xr, ids, mask.double(), adv.double(), old_logp.double(), ref_logp.double(),
        temperature=0.9, beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
        importance_sampling_level=level, num_items_in_batch=n_items.double(), delta=delta,
        use_bias_correction_kl=bias, importance_sampling_ratio=ratio,
        sampling_per_token_logps=sampling.double(), sapo_temperature_neg=1.3, **cfg)
    ref_loss.backward()
    objective = loss_type if loss_type in ("cispo", "sapo", "vespo") else "clip"
    aggregation = {"sapo": "grpo", "cispo": "dapo", "vespo": "dapo"}.get(loss_type, loss_type)
    x = logits.clone().requires_grad_()
    out = hk.fused_hapo_loss(
        x, ids, adv, mask=mask, old_logp=old_logp, ref_logp=ref_logp if beta else None,
        rollout_is_weights=None if ratio is None else ratio.float(), sampling_logp=sampling,
        temperature=0.9, beta=beta, kl_bias_correction=bias, eps_low=0.2, eps_high=0.28,
        delta=delta if objective == "clip" else None, objective=objective,
        importance_sampling=level, aggregation=aggregation, sapo_temperature_neg=1.3,
        normalizer=float(n_items) if aggregation == "dapo" else None,
        max_len=8 if loss_type == "dr_grpo" else None, entropy_mean=True, **cfg)
    out.loss.backward()
    assert abs(ref_loss.item()) > 1e-4
    # VESPO's exp(lambda + k log w - lambda w) multiplies the float32 log-probs' rounding
    # by |k - lambda w| (tens here): float32 rounding, amplified.
    rel = 1e-4 if loss_type == "vespo" else 1e-5
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=rel, abs=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=10 * rel,
                               atol=10 * rel * xr.grad.abs().max().item())


# (loss_type, delta, bias-corrected KL, vLLM ratio shape): Liger 0.8.5's options. delta stays
# above 1 + eps_high here: below it Liger's kernel treats the clipped branch as constant,
# where TRL's autograd (and ours, test_trl116_compute_loss) lets its gradient through
# inside the clip range (delta < rho <= 1 + eps_high with A < 0).
LIGER_NEW = [
    ("cispo", None, False, None), ("cispo", None, True, "token"),
    ("sapo", None, False, "token"), ("sapo", None, True, "sequence"),
    ("vespo", None, False, None), ("vespo", None, True, "token"),
    ("dapo", 1.3, True, "token"), ("grpo", 1.5, False, "sequence"),
    ("bnpo", 2.5, True, None), ("dr_grpo", None, True, "token"),
]


@pytest.mark.kernel
@pytest.mark.parametrize("loss_type,delta,bias,is_shape", LIGER_NEW)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_liger_triton_grpo_loss_new_options(backend, loss_type, delta, bias, is_shape, beta):
    """Liger 0.8.5's ``triton_grpo_loss`` (reduce=True) with CISPO, SAPO, VESPO, delta, the
    bias-corrected KL and ``vllm_is_ratio``, against ours through the interpreter.
    (LUSPO is left out: Liger keeps the aggregation TRL replaced in 1.16.)"""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    B, T, V = 3, 4, 37
    logits, ids, mask, adv, old_logp, ref_logp = _inputs(B, T + 1, V, seed=4)
    ids, mask = ids[:, :T].contiguous(), mask[:, :T].contiguous()
    old_logp, ref_logp = old_logp[:, :T].contiguous(), ref_logp[:, :T].contiguous()
    g = torch.Generator().manual_seed(9)
    ratio = None
    if is_shape is not None:
        ratio = torch.rand(B, T if is_shape == "token" else 1, generator=g) * 2
        if is_shape == "token":            # TRL's ratio is exp(0) = 1 on masked tokens
            ratio = torch.where(mask > 0, ratio, torch.ones_like(ratio))
    n_items = mask.sum()
    xl = logits.clone().requires_grad_()
    liger_loss, liger_metrics = triton_grpo_loss(
        xl, old_logp, ref_logp if beta else None, ids, adv, mask, temperature=0.9, beta=beta,
        eps_low=0.2, eps_high=0.28, inplace=False, loss_type=loss_type, reduce=True,
        max_completion_length=7 if loss_type == "dr_grpo" else None,
        sapo_temperature_neg=1.3, vllm_is_ratio=ratio, delta=delta,
        use_bias_correction_kl=bias, num_items_in_batch=n_items)
    liger_loss.backward()

    objective = loss_type if loss_type in ("cispo", "sapo", "vespo") else "clip"
    aggregation = {"sapo": "grpo", "cispo": "dapo", "vespo": "dapo"}.get(loss_type, loss_type)
    x = logits.clone().requires_grad_()
    out = hk.fused_hapo_loss(
        x[:, :-1], ids, adv, mask=mask, old_logp=old_logp, ref_logp=ref_logp if beta else None,
        rollout_is_weights=ratio, temperature=0.9, beta=beta, kl_bias_correction=bias,
        eps_low=0.2, eps_high=0.28, delta=delta, objective=objective, aggregation=aggregation,
        sapo_temperature_neg=1.3, normalizer=float(n_items) if aggregation == "dapo" else None,
        max_len=7 if loss_type == "dr_grpo" else None)
    out.loss.backward()
    rel = 1e-4 if loss_type == "vespo" else 1e-5   # see test_trl116_compute_loss
    assert out.loss.item() == pytest.approx(liger_loss.item(), rel=rel, abs=1e-6)
    torch.testing.assert_close(x.grad, xl.grad, rtol=10 * rel,
                               atol=10 * rel * xl.grad.abs().max().item())
    if beta:
        assert float(out.kl) == pytest.approx(float(liger_metrics[0]), rel=1e-5, abs=1e-6)
