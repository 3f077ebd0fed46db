"""The implementations users would pick instead of ours, written as they are written upstream.

TRL (huggingface/trl, Apache-2.0): ``selective_log_softmax`` and ``entropy_from_logits`` follow
``trl/trainer/utils.py``; the loss follows ``GRPOTrainer._get_per_token_logps_and_entropies``
(``logits = logits[:, :-1]``, ``logits / self.temperature``, entropies under ``no_grad`` for the
metrics) and ``GRPOTrainer._compute_loss`` (ratio ``coef_1``, clipped ``coef_2``, k3 KL,
``importance_sampling_level`` token or sequence, ``loss_type="bnpo"`` = masked token mean)
of ``trl/trainer/grpo_trainer.py`` (TRL 0.19-0.21). They are re-typed here, not imported, so
the benchmark needs no ``trl`` install; the formulas are unchanged.

Liger-Kernel (linkedin/Liger-Kernel, BSD-2): ``triton_grpo_loss`` and
``fused_selective_log_softmax`` from ``liger_kernel.transformers.grpo_loss``, when importable.
Their Triton kernels need CUDA (or the interpreter), so on CPU tensors they are reported n/a.
Both take the unshifted ``[B, T+1, V]`` logits and drop the last position themselves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- TRL utils
def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: gather minus a per-row loop of logsumexp (fp32/fp64),
    or a per-row ``log_softmax`` loop for half precision (logsumexp is unstable in bf16)."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])  # loop: peak memory
        return selected - lse
    rows = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def trl_entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits``: chunks of 128 rows of ``-(exp(logp) * logp).sum(-1)``."""
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        out.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(out, dim=0).reshape(shape)


# --------------------------------------------------------------------------- TRL loss
def trl_logps(logits, completion_ids, temperature=1.0, compute_entropy=False):
    """``_get_per_token_logps_and_entropies`` on logits the model already produced.

    ``logits`` is the shifted ``[B, T, V]`` view (TRL slices ``[:, :-1]`` itself)."""
    logits = logits / temperature
    logps = trl_selective_log_softmax(logits, completion_ids)
    entropies = None
    if compute_entropy:
        with torch.no_grad():
            entropies = trl_entropy_from_logits(logits)
    return logps, entropies


def trl_grpo_loss(logits, completion_ids, advantages, completion_mask, old_logp, ref_logp, *,
                  temperature=1.0, eps_low=0.2, eps_high=0.2, beta=0.04,
                  importance_sampling="token"):
    """TRL's GRPO loss (``loss_type="bnpo"``: token mean over the batch) plus its metrics.

    Returns ``(loss, metrics)``; metrics are the entropy mean, KL mean and clip ratio TRL logs.
    """
    per_token_logps, entropies = trl_logps(logits, completion_ids, temperature, True)
    mask = completion_mask.to(per_token_logps.dtype)
    per_token_kl = None
    if beta != 0.0:
        per_token_kl = (torch.exp(ref_logp - per_token_logps) - (ref_logp - per_token_logps) - 1)
    old = per_token_logps.detach() if old_logp is None else old_logp
    log_ratio = per_token_logps - old
    if importance_sampling == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    adv = advantages.unsqueeze(1)
    per_token_loss1 = coef_1 * adv
    per_token_loss2 = coef_2 * adv
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)

    def masked_mean(x):
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    with torch.no_grad():
        is_clipped = ((coef_1 < 1 - eps_low) & (adv < 0)) | ((coef_1 > 1 + eps_high) & (adv > 0))
        metrics = {"entropy": masked_mean(entropies),
                   "clip_ratio": masked_mean(is_clipped.to(mask.dtype).expand_as(mask))}
        if per_token_kl is not None:
            metrics["kl"] = masked_mean(per_token_kl)
    return loss, metrics


def eager_group_advantages(rewards, group_size, inject, teacher_reward=1.0, eps=1e-4):
    """TRL's group normalisation (``view(-1, G)``, mean, std, ``repeat_interleave``) with the
    SSI substitution done the obvious eager way (argmin + index_put)."""
    r = rewards.view(-1, group_size).clone()
    worst = r.argmin(dim=1)
    rows = torch.nonzero(inject).squeeze(1)
    r[rows, worst[rows]] = teacher_reward
    mean = r.mean(dim=1)
    std = r.std(dim=1)
    mean = mean.repeat_interleave(group_size, dim=0)
    std = std.repeat_interleave(group_size, dim=0)
    adv = (r.view(-1) - mean) / (std + eps)
    replaced = torch.where(inject, worst, torch.full_like(worst, -1))
    return adv, replaced


# --------------------------------------------------------------------------- Liger
def liger_available() -> bool:
    try:
        import liger_kernel.transformers.grpo_loss  # noqa: F401
    except Exception:                     # ImportError, or a Triton/CUDA probe failing
        return False
    return True


def triton_runs(device: str) -> bool:
    """Triton kernels (Liger's or ours) run on ``device``: CUDA, or CPU under the interpreter."""
    from hapo_kernels.backends import triton_interpret
    return device == "cuda" or triton_interpret()


def liger_runnable(device: str) -> tuple[bool, str]:
    """(runs, why not). Liger's Triton kernels need CUDA or TRITON_INTERPRET=1."""
    if not liger_available():
        return False, "n/a (liger-kernel not installed)"
    if not triton_runs(device):
        return False, "n/a (Triton kernels need CUDA)"
    return True, ""


def liger_grpo_loss(full_logits, completion_ids, advantages, completion_mask, old_logp,
                    ref_logp, *, temperature=1.0, eps_low=0.2, eps_high=0.2, beta=0.04,
                    importance_sampling="token", inplace=True):
    """``triton_grpo_loss`` on the unshifted ``[B, T+1, V]`` logits, reduced like ours, with
    its default ``inplace=True`` (the gradient goes into the logits' storage), as users
    run it."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    loss, _metrics = triton_grpo_loss(
        full_logits, old_logp, ref_logp, completion_ids, advantages,
        completion_mask=completion_mask, temperature=temperature, beta=beta,
        eps_low=eps_low, eps_high=eps_high, inplace=inplace, loss_type="bnpo",
        importance_sampling_level=importance_sampling, reduce=True)
    return loss


def liger_selective_log_softmax(full_logits, completion_ids, temperature=1.0):
    from liger_kernel.transformers.grpo_loss import fused_selective_log_softmax
    return fused_selective_log_softmax(full_logits, completion_ids, temperature)
