"""verl integration: the ``"hapo"`` policy loss and advantage estimator, a fast
``logprobs_from_logits``, verl's policy losses as ``LossOptions`` for the fused kernel.

Importing this module registers, through verl's own registries,

* policy loss ``"hapo"`` (``actor_rollout_ref.actor.policy_loss.loss_mode=hapo``): verl's
  ``compute_policy_loss_vanilla`` (clip ratios, dual clip ``clip_ratio_c``, the log-ratio
  clamp at 20, rollout-correction weights, verl's ``agg_loss`` with its global normalisers)
  with teacher rows trained by the shaped teacher objective;
* advantage estimator ``"hapo"`` (``algorithm.adv_estimator=hapo``): verl's GRPO on groups
  of any size (a single response: mean 0, std 1) with SSI substitution
  (``hk.group_advantages`` with ``group_offsets``) where the gate opens;

and, unless ``$HAPO_VERL_PATCH=0``, puts our ``logprobs_from_logits`` and ``hapo_ppo_loss``
(verl's actor loss that hands the batch's ``teacher_mask`` to the policy loss) in place of
verl's. Have every verl process import it: ``VERL_USE_EXTERNAL_MODULES=hapo.integrations.verl``
(``install``). HAPO end to end (gate, demonstrations in the batch): ``verl_trainer``.
``loss_options`` maps verl's actor config to the ``LossOptions`` under which
``hk.fused_hapo_loss`` computes verl's vanilla, gspo, cispo, sapo or geo_mean loss from the
logits.
"""
from __future__ import annotations

import contextvars
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import missing_extra

try:
    import verl.utils.torch_functional as verl_F
    import verl.workers.utils.losses as verl_losses
    from verl.trainer.ppo.core_algos import agg_loss, register_adv_est, register_policy_loss
except ImportError as exc:
    raise missing_extra("hapo.integrations.verl", "verl", exc) from exc

import hapo_kernels as hk
from hapo_kernels.objective import token_objective

from ..config import HAPOConfig

__all__ = ["logprobs_from_logits", "patch_logprobs_from_logits", "compute_policy_loss_hapo",
           "compute_hapo_outcome_advantage", "group_layout", "loss_options",
           "FUSED_LOSS_MODES", "configure", "configure_from",
           "hapo_config", "gate_state", "load_gate_state", "last_injection", "hapo_ppo_loss",
           "patch_ppo_loss", "install", "VERL_LOGPROBS_FROM_LOGITS", "TESTED_VERL",
           "current_config", "current_gate", "expect_injections", "DEMO_FIELD", "TRAINER_KEYS"]

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


DEMO_FIELD = "hapo_demonstration"     # extra_info key of a prompt's teacher demonstration
# Keys of ``algorithm.hapo`` that configure the verl trainer, not HAPOConfig.
TRAINER_KEYS = ("demo_field",)


def hapo_config(values: Any) -> HAPOConfig:
    """A ``HAPOConfig`` from a mapping of its flat keywords (``HAPOConfig.from_kwargs``):
    the ``algorithm.hapo`` node of verl's Hydra config (``TRAINER_KEYS`` left out), a dict,
    or a ``HAPOConfig``."""
    if isinstance(values, HAPOConfig):
        return values
    if hasattr(values, "items"):
        plain = {}
        for key, value in values.items():
            if key in TRAINER_KEYS:
                continue
            # OmegaConf lists (gate_prior) come as ListConfig: make them tuples.
            plain[str(key)] = tuple(value) if hasattr(value, "__len__") and \
                not isinstance(value, (str, bytes, dict)) and not hasattr(value, "items") \
                else value
        return HAPOConfig.from_kwargs(**plain)
    raise ValueError(f"algorithm.hapo must be a mapping of HAPOConfig options, got "
                     f"{type(values).__name__}")


def configure_from(algorithm: Any) -> None:
    """Configure from verl's ``algorithm`` config when it has a ``hapo`` node
    (``+algorithm.hapo.inject=gate ...`` on the command line). Rebuilds the gate only when
    the options change, so the gate's state carries across steps."""
    node = algorithm.get("hapo", None) if hasattr(algorithm, "get") else None
    if node is None:
        return
    cfg = hapo_config(node)
    if cfg != _state["config"]:
        configure(cfg)


def gate_state() -> Optional[dict]:
    """The gate's ``state_dict`` (None without a gate), for a checkpoint."""
    return None if _state["gate"] is None else _state["gate"].state_dict()


def load_gate_state(state: Optional[dict]) -> None:
    """Restore what ``gate_state`` returned into the configured gate."""
    if state is None:
        return
    if _state["gate"] is None:
        raise ValueError("a gate state was given but the configuration has no gate "
                         "(inject is not 'gate')")
    _state["gate"].load_state_dict(state)


def current_config() -> HAPOConfig:
    """The configured ``HAPOConfig``."""
    return _state["config"]


def current_gate() -> Any:
    """The configured gate (a ``hapo.ThompsonGate``), or None unless ``inject == "gate"``."""
    return _state["gate"]


def expect_injections(decided: Optional[dict]) -> None:
    """Tell the estimator's next call that the injections are done (``HAPORayPPOTrainer``
    has written the demonstrations and their scores into the batch): it then takes the
    rewards as they are, without gating again, and reports ``decided`` (``inject`` per
    group, ``teacher_rows``) as ``last_injection()``. None clears it."""
    _state["pending"] = decided


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


VERL_LOGPROBS_FROM_LOGITS = verl_F.logprobs_from_logits   # verl's own, kept for comparison


def _replace_in_verl_modules(attr: str, original: Any, replacement: Any) -> list:
    """Set ``attr`` to ``replacement`` in every loaded verl module whose ``attr`` is
    ``original`` (verl modules import these functions by name); the patched names."""
    patched = []
    for name, module in list(sys.modules.items()):
        if (name == "verl" or name.startswith("verl.")) and \
                getattr(module, attr, None) is original:
            setattr(module, attr, replacement)
            patched.append(name)
    return sorted(patched)


def patch_logprobs_from_logits() -> list:
    """Replace verl's ``logprobs_from_logits`` in ``verl.utils.torch_functional`` and in
    every loaded verl module that imported it by name; returns the patched module names.
    Modules imported later take ours from ``verl.utils.torch_functional``."""
    return _replace_in_verl_modules("logprobs_from_logits", VERL_LOGPROBS_FROM_LOGITS,
                                    logprobs_from_logits)


# --------------------------------------------------------------------------- in the workers
# verl's actor loss (``verl.workers.utils.losses.ppo_loss``) keeps only the fields it knows
# before it calls the policy loss, so the teacher rows of a batch are read here, first.
_teacher_rows: contextvars.ContextVar = contextvars.ContextVar("hapo_teacher_rows",
                                                               default=None)
_verl_ppo_loss = verl_losses.ppo_loss


def hapo_ppo_loss(config: Any, model_output: Any, data: Any, dp_group: Any = None) -> Any:
    """verl's ``ppo_loss`` that also hands the batch's ``teacher_mask`` (``[bs]`` or
    ``[bs, T]`` bool, written by ``HAPORayPPOTrainer``) to the ``"hapo"`` policy loss.
    Same signature and result; without ``teacher_mask`` in ``data`` it is verl's."""
    teacher = None
    if "teacher_mask" in data.keys():
        teacher = data["teacher_mask"]
        if getattr(teacher, "is_nested", False):
            teacher = teacher.to_padded_tensor(False)
        teacher = teacher.bool()
    token = _teacher_rows.set(teacher)
    try:
        return _verl_ppo_loss(config, model_output, data, dp_group)
    finally:
        _teacher_rows.reset(token)


def patch_ppo_loss() -> list:
    """Put ``hapo_ppo_loss`` in place of verl's ``ppo_loss`` in ``verl.workers.utils.losses``
    and every loaded verl module that imported it (the actor worker builds its loss from
    ``verl.workers.engine_workers.ppo_loss`` in ``init_model``); returns their names."""
    return _replace_in_verl_modules("ppo_loss", _verl_ppo_loss, hapo_ppo_loss)


# --------------------------------------------------------------------------- policy loss
# verl's loss modes the fused loss reproduces, and the LossOptions fields each one sets.
FUSED_LOSS_MODES = {
    "vanilla": {"log_ratio_clamp": 20.0},
    "hapo": {"log_ratio_clamp": 20.0},
    "gspo": {"importance_sampling": "sequence_token", "log_ratio_clamp": 10.0},
    "cispo": {"objective": "verl_cispo", "log_ratio_clamp": 20.0},
    # verl's sapo aggregates seq-mean-token-mean whatever loss_agg_mode says.
    "sapo": {"objective": "sapo", "log_ratio_clamp": 20.0,
             "aggregation": "seq-mean-token-mean"},
    # verl's geo_mean (GMPO) clips in log space with no clamp and averages its sequence
    # losses over every row, fully masked ones too, whatever loss_agg_mode and the global
    # normalisers say: TRL's "grpo" mean with the global counts left out.
    "geo_mean": {"objective": "geo_mean", "importance_sampling": "sequence",
                 "log_ratio_clamp": None, "aggregation": "grpo", "normalizer": None,
                 "num_sequences": None, "max_len": None, "dp_size": 1},
}


def loss_options(config: Any, loss_agg_mode: Optional[str] = None,
                 loss_mode: Optional[str] = None, **overrides: Any) -> hk.LossOptions:
    """The ``LossOptions`` under which ``hk.fused_hapo_loss`` computes verl's policy loss
    ``loss_mode`` (default: the actor config's ``policy_loss.loss_mode``) from logits.

    ``config`` is verl's actor config (``ActorConfig``): clip ratios, dual clip (vanilla and
    hapo only, as in verl), ``loss_agg_mode`` and the global normalisers of
    ``global_batch_info`` (``batch_num_tokens`` -> ``normalizer``, ``global_batch_size`` ->
    ``num_sequences``, ``loss_scale_factor`` -> ``max_len``, ``dp_size``). The teacher
    options come from the configured ``HAPOConfig``.
    """
    low, high, c = _clip_options(config)
    if loss_mode is None:
        loss_mode = config.policy_loss.get("loss_mode", "vanilla")
    if loss_mode not in FUSED_LOSS_MODES:
        raise ValueError(f"loss_mode={loss_mode!r} has no fused equivalent; the fused loss "
                         f"covers {sorted(FUSED_LOSS_MODES)}")
    info = dict(config.global_batch_info)
    mode = loss_agg_mode if loss_agg_mode is not None else config.loss_agg_mode
    values = dict(eps_low=low, eps_high=high,
                  dual_clip=c if loss_mode in ("vanilla", "hapo") else None,
                  aggregation=mode, normalizer=info.get("batch_num_tokens"),
                  num_sequences=info.get("global_batch_size"),
                  max_len=info.get("loss_scale_factor") or config.get("loss_scale_factor"),
                  dp_size=int(info.get("dp_size") or 1))
    values.update(FUSED_LOSS_MODES[loss_mode])
    if loss_mode == "sapo":
        values.update(sapo_temperature_pos=config.tau_pos, sapo_temperature_neg=config.tau_neg)
    values.update(overrides)
    return _state["config"].loss.updated(**{k: (float(v) if k in ("normalizer",
                                                                   "num_sequences")
                                                and v is not None else v)
                                           for k, v in values.items()})


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

    Per token: docs/design.md section 4 with ``eps_low/high = clip_ratio_low/high`` and dual
    clip ``clip_ratio_c``; rows of ``teacher_mask`` (``[bs]`` or ``[bs, T]``; inside verl's
    actor it comes from the batch through ``hapo_ppo_loss``) use the configured
    teacher objective (shaped by default). Aggregation is verl's ``agg_loss`` with the
    actor's ``global_batch_info``, so every ``loss_agg_mode`` and its global normalisers
    match verl. Metrics carry vanilla's names plus ``actor/hapo_teacher_fraction``.
    """
    low, high, c = _clip_options(config)
    cfg = _state["config"]
    opts = cfg.loss.updated(eps_low=low, eps_high=high, dual_clip=c,
                            **FUSED_LOSS_MODES["vanilla"])
    valid = response_mask.bool()
    teacher = None
    if teacher_mask is None:
        teacher_mask = _teacher_rows.get()
        if teacher_mask is not None and teacher_mask.shape[0] != valid.shape[0]:
            raise ValueError(f"the batch's teacher_mask has {teacher_mask.shape[0]} rows but "
                             f"the loss {valid.shape[0]}")
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
        "actor/ppo_kl": verl_F.masked_mean(-torch.log(obj.ratio), response_mask).item(),
        "actor/pg_clipfrac_lower": verl_F.masked_mean(dual.float(), response_mask).item(),
        "actor/hapo_teacher_fraction": 0.0 if teacher is None else
        verl_F.masked_mean(teacher.float(), response_mask).item(),
    }
    return pg_loss, metrics


# --------------------------------------------------------------------------- advantages
def group_layout(index: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """The groups of verl's ``index`` (uids, in any order, of any sizes): a stable order
    that makes each group contiguous (groups in first-appearance order of their uid) and the
    offsets ``[P + 1]`` of the groups in that order, for ``hk.group_advantages``."""
    ids: dict = {}
    group = np.array([ids.setdefault(k, len(ids)) for k in list(index)], dtype=np.int64)
    counts = np.bincount(group, minlength=len(ids)) if len(group) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return torch.from_numpy(np.argsort(group, kind="stable")), torch.from_numpy(offsets)


def _as_bool_tensor(values: Any, device: torch.device) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device).bool()
    return torch.as_tensor(np.asarray(values, dtype=bool), device=device)


@register_adv_est("hapo")
def compute_hapo_outcome_advantage(token_level_rewards: torch.Tensor,
                                   response_mask: torch.Tensor, index: np.ndarray,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                   config: Any = None,
                                   inject: Optional[Union[torch.Tensor, np.ndarray,
                                                          Sequence[bool]]] = None,
                                   prompt_ids: Optional[Sequence[Any]] = None,
                                   has_demo: Optional[Union[torch.Tensor, np.ndarray,
                                                            Sequence[bool]]] = None,
                                   **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantages with SSI substitution (docs/design.md section 6).

    Same inputs and outputs as verl's ``compute_grpo_outcome_advantage``: groups are the
    responses sharing an ``index`` (uid), in any order and of any sizes; a group of one
    response has mean 0 and std 1 (verl's rule). Without injection the result is verl's
    GRPO. ``inject`` (bool, one per group in first-appearance order of the uids) overrides
    the configured gate; ``prompt_ids`` (one per response: a prompt identity that outlives
    the step, for ``gate_memory="persistent"``; the uid by default) and ``has_demo`` (one
    per group: the gate only opens where a demonstration exists) go to the gate.
    ``config`` is verl's ``algorithm`` config: ``norm_adv_by_std_in_grpo`` is read from it
    and, when it has a ``hapo`` mapping (``+algorithm.hapo.*``), the HAPO options too.
    """
    if config is not None:
        norm_adv_by_std_in_grpo = config.get("norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
        configure_from(config)
    scores = token_level_rewards.sum(dim=-1)
    order, offsets = group_layout(index)
    order, offsets = order.to(scores.device), offsets.to(scores.device)
    rewards = scores[order]
    P = offsets.numel() - 1
    first = order[offsets[:-1]].tolist()              # each group's first response
    cfg = _state["config"]
    # (AdvantageOptions has an option named ``replace``, so it is rebuilt with from_kwargs.)
    adv_opts = hk.AdvantageOptions.from_kwargs(
        cfg.advantages, scale="group" if norm_adv_by_std_in_grpo else "none", eps=epsilon)
    pending = _state.pop("pending", None)
    if pending is not None and inject is None:
        # The trainer substituted and scored the teacher rows already: plain statistics.
        adv_sorted, _ = hk.group_advantages(
            rewards, group_offsets=offsets, options=adv_opts)
        adv = torch.empty_like(scores)
        adv[order] = adv_sorted.to(scores.dtype)
        _state["last"] = pending
        adv = adv.unsqueeze(-1) * response_mask
        return adv, adv
    if inject is not None:
        inject = _as_bool_tensor(inject, scores.device)
    elif cfg.inject == "always":
        inject = torch.ones(P, dtype=torch.bool, device=scores.device)
        if has_demo is not None:
            inject &= _as_bool_tensor(has_demo, scores.device)
    elif cfg.inject == "gate":
        keys = list(index) if prompt_ids is None else list(prompt_ids)
        inject = _state["gate"].decide(
            rewards, group_offsets=offsets, prompt_ids=[keys[i] for i in first],
            has_demo=None if has_demo is None else _as_bool_tensor(has_demo, torch.device("cpu")))
    adv_sorted, replaced = hk.group_advantages(
        rewards, group_offsets=offsets, inject=inject, options=adv_opts)
    adv = torch.empty_like(scores)
    adv[order] = adv_sorted.to(scores.dtype)
    hit = torch.nonzero(replaced >= 0).flatten()
    _state["last"] = {"inject": replaced >= 0,
                      "teacher_rows": order[offsets[hit] + replaced[hit]].sort().values}
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


# --------------------------------------------------------------------------- on import
CONFIG_ENV = "HAPO_VERL_CONFIG"          # JSON of HAPOConfig keywords, for worker processes
PATCH_ENV = "HAPO_VERL_PATCH"            # "0": register only, patch nothing


def install() -> dict:
    """What importing this module does in every verl process (driver, trainer, workers:
    ``VERL_USE_EXTERNAL_MODULES=hapo.integrations.verl``): the registrations above, the HAPO
    options from ``$HAPO_VERL_CONFIG`` (set by ``hapo.integrations.verl_trainer`` for the
    processes it starts), and unless ``$HAPO_VERL_PATCH=0`` our ``logprobs_from_logits`` and
    ``hapo_ppo_loss`` in place of verl's. Returns the patched module names."""
    raw = os.environ.get(CONFIG_ENV)
    if raw:
        configure(hapo_config(json.loads(raw)))
    if os.environ.get(PATCH_ENV, "1") == "0":
        return {"logprobs_from_logits": [], "ppo_loss": []}
    return {"logprobs_from_logits": patch_logprobs_from_logits(), "ppo_loss": patch_ppo_loss()}


INSTALLED = install()
