"""verl integration: the ``"hapo"`` policy loss and advantage estimator, and a fast
``logprobs_from_logits``.

Importing this module registers, through verl's own registries,

* policy loss ``"hapo"`` (``actor_rollout_ref.actor.policy_loss.loss_mode=hapo``): the
  clipped objective of docs/design.md section 4 with verl's ``clip_ratio_low/high`` and dual clip
  ``clip_ratio_c``, teacher rows (``teacher_mask=``) trained with the shaped objective, and
  verl's own ``agg_loss`` for every ``loss_agg_mode`` (global token / batch counts included);
* advantage estimator ``"hapo"`` (``algorithm.adv_estimator=hapo``): GRPO advantages with SSI
  substitution (``hk.group_advantages``): in each injected group the lowest reward is
  replaced by the teacher reward before the group statistics are taken.

In verl worker processes, have verl import it: ``VERL_USE_EXTERNAL_MODULES=hapo.integrations.verl``.
``patch_logprobs_from_logits()`` swaps verl's ``logprobs_from_logits`` for ours everywhere it
was imported.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import verl.utils.torch_functional as verl_F
from verl.trainer.ppo.core_algos import agg_loss, register_adv_est, register_policy_loss

import hapo_kernels as hk
from hapo_kernels.objective import token_objective

from ..config import HAPOConfig

__all__ = ["logprobs_from_logits", "patch_logprobs_from_logits", "compute_policy_loss_hapo",
           "compute_hapo_outcome_advantage", "configure", "last_injection", "TESTED_VERL"]

TESTED_VERL = "0.9.1"       # the version `make test-integrations` checks against

# The HAPO options the loss and the estimator read (teacher objective, gate, teacher reward,
# stats). verl's own config owns clipping, aggregation and the advantage epsilon.
_state = {"config": HAPOConfig(inject="never"), "gate": None, "last": None}


def configure(hapo: Optional[HAPOConfig] = None) -> None:
    """Set the HAPO options of the ``"hapo"`` loss and estimator (None: back to defaults).

    With ``hapo.inject == "gate"`` the estimator runs ``hapo.make_gate()`` on each batch's
    rewards; ``"always"`` injects into every group; ``"never"`` (the default) none, so that
    the estimator is plain GRPO until demonstrations are wired in.
    """
    if hapo is not None and not isinstance(hapo, HAPOConfig):
        raise ValueError(f"hapo must be a HAPOConfig or None, got {type(hapo).__name__}")
    cfg = hapo if hapo is not None else HAPOConfig(inject="never")
    _state.update(config=cfg, gate=cfg.make_gate() if cfg.inject == "gate" else None, last=None)


def last_injection() -> Optional[dict]:
    """What the estimator did on its last call: ``inject`` per group (in first-appearance
    order of the uids) and ``teacher_rows``, the batch rows whose reward SSI replaced, so
    the caller can put the teacher demonstration there and pass ``teacher_mask``."""
    return _state["last"]


# --------------------------------------------------------------------------- log-probs
def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                         inplace_backward: bool = True) -> torch.Tensor:
    """Drop-in for ``verl.utils.torch_functional.logprobs_from_logits`` on our kernel.

    ``logits`` ``[..., V]``, ``labels`` of ``logits.shape[:-1]``; returns float32 log-probs
    of that shape. ``inplace_backward`` is accepted for the signature: our backward never
    needs the logits' storage to be reused to stay lean.
    """
    if logits.dim() in (2, 3):
        return hk.selective_log_softmax(logits, labels)
    flat = hk.selective_log_softmax(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return flat.reshape(labels.shape)


def patch_logprobs_from_logits() -> list:
    """Replace verl's ``logprobs_from_logits`` in ``verl.utils.torch_functional`` and in
    every loaded verl module that imported it by name; returns the patched module names."""
    original = verl_F.logprobs_from_logits
    patched = []
    for name, module in list(sys.modules.items()):
        if (name == "verl" or name.startswith("verl.")) and \
                getattr(module, "logprobs_from_logits", None) is original:
            module.logprobs_from_logits = logprobs_from_logits
            patched.append(name)
    return sorted(patched)


# --------------------------------------------------------------------------- policy loss
def _clip_options(config):
    if config is None:
        raise ValueError("the hapo policy loss needs verl's actor config (clip_ratio, ...)")
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    return low, high, config.get("clip_ratio_c", 3.0)


@register_policy_loss("hapo")
def compute_policy_loss_hapo(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                             advantages: torch.Tensor, response_mask: torch.Tensor,
                             loss_agg_mode: str = "token-mean", config: Any = None,
                             rollout_is_weights: Optional[torch.Tensor] = None,
                             teacher_mask: Optional[torch.Tensor] = None
                             ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """verl's clipped PPO loss (``compute_policy_loss_vanilla``) plus HAPO teacher rows.

    Per token: docs/design.md section 4 with ``eps_low/high = clip_ratio_low/high`` and dual clip
    ``clip_ratio_c``; rows of ``teacher_mask`` (``[bs]`` or ``[bs, T]``) use the configured
    teacher objective (shaped by default). Aggregation is verl's ``agg_loss`` with the
    actor's ``global_batch_info``, so every ``loss_agg_mode`` and its global normalisers
    match verl. Metrics carry vanilla's names plus ``actor/hapo_teacher_fraction``.
    """
    low, high, c = _clip_options(config)
    cfg = _state["config"]
    opts = cfg.loss.replace(eps_low=low, eps_high=high, dual_clip=c)
    valid = response_mask.bool()
    teacher = None
    if teacher_mask is not None:
        teacher = teacher_mask.bool()
        teacher = teacher[:, None].expand(valid.shape) if teacher.dim() == 1 else teacher
    obj = token_objective(log_prob, None, advantages, valid, old_logp=old_log_prob,
                          teacher=teacher, opts=opts)
    pg_losses = obj.loss
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode,
                       **config.global_batch_info)

    on_policy = valid if teacher is None else valid & ~teacher
    dual = (obj.ratio > c) & (advantages < 0) & on_policy
    metrics = {
        "actor/pg_clipfrac": verl_F.masked_mean((obj.clip_low | obj.clip_high).float(),
                                                response_mask).item(),
        "actor/ppo_kl": verl_F.masked_mean((old_log_prob - log_prob).detach(),
                                           response_mask).item(),
        "actor/pg_clipfrac_lower": verl_F.masked_mean(dual.float(), response_mask).item(),
        "actor/hapo_teacher_fraction": 0.0 if teacher is None else
        verl_F.masked_mean(teacher.float(), response_mask).item(),
    }
    return pg_loss, metrics


# --------------------------------------------------------------------------- advantages
def _contiguous_groups(index):
    """A stable order that makes the groups of ``index`` contiguous, and the group size."""
    ids = {}
    group = np.array([ids.setdefault(k, len(ids)) for k in list(index)])
    counts = np.bincount(group)
    if counts.min() != counts.max():
        raise ValueError(f"index must give every prompt the same number of responses; got "
                         f"group sizes from {counts.min()} to {counts.max()}")
    return torch.from_numpy(np.argsort(group, kind="stable")), int(counts[0])


@register_adv_est("hapo")
def compute_hapo_outcome_advantage(token_level_rewards: torch.Tensor,
                                   response_mask: torch.Tensor, index: np.ndarray,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                   config: Any = None,
                                   inject: Optional[Union[torch.Tensor, np.ndarray,
                                                          Sequence[bool]]] = None,
                                   **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantages with SSI substitution (docs/design.md section 6).

    Same inputs and outputs as verl's ``compute_grpo_outcome_advantage``; groups are the
    responses sharing an ``index`` (uid), in any order, all of one size ``G >= 2``.
    ``inject`` (bool, one per group in first-appearance order of the uids) overrides the
    configured gate (see ``configure``). Without injection the result is verl's GRPO.
    ``norm_adv_by_std_in_grpo`` is read from ``config`` (verl's AlgoConfig) when given.
    """
    if config is not None:
        norm_adv_by_std_in_grpo = config.get("norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    scores = token_level_rewards.sum(dim=-1)
    order, G = _contiguous_groups(index)
    order = order.to(scores.device)
    rewards = scores[order]
    cfg = _state["config"]
    if inject is None:
        P = rewards.numel() // G
        if cfg.inject == "always":
            inject = torch.ones(P, dtype=torch.bool, device=scores.device)
        elif cfg.inject == "gate":
            inject = _state["gate"].decide(rewards, G)
    elif isinstance(inject, torch.Tensor):
        inject = inject.to(scores.device).bool()
    else:
        inject = torch.as_tensor(np.asarray(inject), dtype=torch.bool, device=scores.device)
    adv_sorted, replaced = hk.group_advantages(
        rewards, G, inject, options=cfg.advantages.replace(
            scale="group" if norm_adv_by_std_in_grpo else "none", eps=epsilon))
    adv = torch.empty_like(scores)
    adv[order] = adv_sorted.to(scores.dtype)
    hit = torch.nonzero(replaced >= 0).flatten()
    _state["last"] = {"inject": replaced >= 0,
                      "teacher_rows": order[hit * G + replaced[hit]].sort().values}
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv
