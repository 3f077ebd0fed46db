"""The options of the loss and of group advantages: named, defaulted and validated once.

``LossOptions`` holds every scalar option of the objective (docs/design.md sections 4-5) and
``AdvantageOptions`` every option of group advantages (section 6). Each is built once,
checked in ``__post_init__`` (a ``ValueError`` naming the option), and then passed whole: to
the backends, to the Triton launcher (``LossOptions.kernel_params``), to ``HAPOConfig`` and to
the integrations. The public functions take the same names as keyword arguments and build
the object with ``from_kwargs``; nothing else lists the options. ``split_options`` also
accepts TRL's, Liger-Kernel's and verl's names for the same options (``OPTION_ALIASES``,
``loss_type``) and says what to pass for a name whose meaning differs (``NOT_THE_SAME``).

Adding a scalar option of an objective: a field here and its name in ``KERNEL_PARAMS``, its
formula in ``objective.py`` and its Triton branch in ``triton/objective.py``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple, TypeVar

import torch

from .objective import OBJECTIVES, TEACHER_OBJECTIVES

# --------------------------------------------------------------------------- constants
IGNORE_INDEX = -100
TEACHER_GAMMA = 0.1          # f(p) = p / (p + gamma) for the shaped teacher objective
ADVANTAGE_EPS = 1e-4         # A = (r - mean) / (std + eps)
TEACHER_REWARD = 1.0

AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm")
# TRL's loss_type names. "dapo" is token-mean with the global token count as normalizer.
# TRL's sequence means count every row, a fully masked one as 0; verl's names leave fully
# masked rows out of the mean (``aggregation.sequence_count``).
# "luspo" (TRL >= 1.16) sums each sequence's tokens and averages over sequences.
AGGREGATION_ALIASES = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                       "bnpo": "token-mean", "dapo": "token-mean",
                       "luspo": "seq-mean-token-sum"}
# "sequence_token": the sequence's ratio as each token's value, the gradient through the
# token's own log-prob only (GSPO-token; verl's gspo).
IMPORTANCE_SAMPLING = ("token", "sequence", "sequence_token")
SCALES = ("group", "batch", "none")
STATS = ("all", "on-policy")
# Which member of an injected group SSI replaces: the lowest reward (HAPO), a member drawn by
# the caller (seeded), or a set member (LUFFY's layout: the demonstration in a fixed slot).
REPLACE = ("worst", "random", "fixed")

# Integer codes the Triton advantage kernel takes as constexprs.
SCALE_CODE = {name: i for i, name in enumerate(SCALES)}
STATS_CODE = {name: i for i, name in enumerate(STATS)}

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The scalar options the Triton loss kernel reads, in the order of its ``params`` tuple.
# ``triton/objective.py`` names each position; a new scalar option is appended here.
KERNEL_PARAMS = ("eps_low", "eps_high", "dual_clip", "beta", "entropy_coef", "teacher_gamma",
                 "sft_weight", "delta", "sapo_temperature_pos", "sapo_temperature_neg",
                 "kl_bias_correction", "log_ratio_clamp")


# --------------------------------------------------------------------------- validators
def choice(name: str, value: Any, choices: Sequence[str],
           aliases: Optional[Mapping[str, str]] = None) -> str:
    """``value`` if it is one of ``choices`` (or its canonical name if an alias)."""
    if aliases and isinstance(value, str) and value in aliases:
        return aliases[value]
    if not isinstance(value, str) or value not in choices:
        allowed = list(choices) + list(aliases or {})
        raise ValueError(f"{name}={value!r} is not one of {allowed}")
    return value


def number(name: str, value: Any, *, low: Optional[float] = None,
           high: Optional[float] = None, low_open: bool = False, high_open: bool = False,
           allow_none: bool = False) -> Optional[float]:
    """A finite float within the bounds (``low_open``: ``> low``), or None where allowed."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number, got None")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, str)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    bad = ((low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        raise ValueError(f"{name}={value} is outside {lo or '(-inf'}, {hi or 'inf)'}")
    return value


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> Optional[int]:
    """A whole number >= 1 (an integral float is accepted), or None where allowed."""
    if value is None and allow_none:
        return None
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and float(value).is_integer() and value >= 1)
    if not ok:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ``ValueError`` naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_temperature(temperature: Any) -> float:
    """``temperature`` as a float > 0, else a ``ValueError``."""
    return number("temperature", temperature, low=0.0, low_open=True)


def check_ignore_index(ignore_index: Any) -> int:
    """``ignore_index`` if it is an int, else a ``ValueError``."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    return ignore_index


def resolve_aggregation(aggregation: str) -> str:
    """The canonical (verl) name of an aggregation mode or TRL alias."""
    return choice("aggregation", aggregation, AGGREGATIONS, AGGREGATION_ALIASES)


# --------------------------------------------------------------------------- the objects
OptionsT = TypeVar("OptionsT", bound="_Options")


class _Options:
    """What both option objects share: built from keywords, copied with changes."""

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls: type[OptionsT], options: Optional[OptionsT] = None,
                    **kwargs: Any) -> OptionsT:
        """``options`` (or the defaults) with ``kwargs`` applied; unknown names raise."""
        if options is not None and not isinstance(options, cls):
            raise ValueError(f"options must be a {cls.__name__}, got {type(options).__name__}")
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown {cls.__name__} option(s) {unknown}; the options are "
                            f"{list(cls.names())}")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base

    def updated(self: OptionsT, **changes: Any) -> OptionsT:
        """A copy with ``changes`` (checked). Not named ``replace``: that is an option of
        ``AdvantageOptions`` (design section 6), and a field would hide the method."""
        return self.from_kwargs(self, **changes)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.names()}


@dataclass(frozen=True)
class LossOptions(_Options):
    """Every scalar option of the GRPO/HAPO objective (docs/design.md sections 4-5).

    Args:
        temperature: logits are divided by it (> 0).
        objective: the on-policy per-token objective, a name of ``objective.OBJECTIVES``
            (``"clip"``: PPO/GRPO/DAPO/GSPO; ``"geo_mean"``: GMPO, verl's ``geo_mean``,
            which clips each token's log-ratio to ``[-eps_low, eps_high]``).
        eps_low, eps_high: the clip range ``[1 - eps_low, 1 + eps_high]``.
        dual_clip: verl's ``clip_ratio_c`` (> 1): for ``A < 0`` the loss is at most ``-c A``.
        beta: weight of the k3 KL to the reference policy (needs ``ref_logp``).
        entropy_coef: ``loss -= entropy_coef * entropy`` per token.
        importance_sampling: ``"token"`` ratios, ``"sequence"`` (GSPO; required by
            ``"geo_mean"``, whose sequence ratio is its own) or ``"sequence_token"``
            (GSPO-token).
        teacher_objective: for teacher tokens (``objective.TEACHER_OBJECTIVES``).
        teacher_gamma: ``f(p) = p / (p + gamma)`` of the shaped teacher objective.
        sft_weight: ``w`` of the ``"sft"`` teacher objective ``-w log p``.
        aggregation: a verl ``loss_agg_mode`` or a TRL ``loss_type`` alias.
        normalizer: the token count of ``token-mean`` (default: the batch's); verl's
            ``batch_num_tokens``.
        max_len: the width of ``seq-mean-token-sum-norm`` (default: T); verl's
            ``loss_scale_factor``.
        log_ratio_clamp: ``c > 0`` clamps the log-ratio before the exp, with no gradient
            where it clamps (verl's): a token-level log-ratio to ``[-c, c]`` (verl's vanilla,
            cispo, sapo: 20), a sequence-level one from above at ``c`` (verl's gspo: 10);
            with ``"geo_mean"`` each token's log-ratio to ``[-c, c]`` before its clip.
            None: no clamp (TRL).
        num_sequences: the sequence count of the ``seq-mean-*`` modes (default: the batch's
            rows that hold a valid token; every row under TRL's aliases); verl's
            ``global_batch_size``.
        dp_size: the loss is multiplied by it (verl's ``dp_size``: data-parallel ranks
            average their gradients, so each rank's share of a global sum is scaled up).
            Above 1 it needs the global ``normalizer`` (``token-mean``) or ``num_sequences``
            (``seq-mean-*``), as verl's ``agg_loss`` does.
        delta: TRL's two-sided clip: the unclipped branch of ``"clip"`` uses
            ``min(rho, delta)`` (any value > 0; None: off).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's ``tau`` for ``A > 0`` / else.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma weight
            ``exp(lambda + k log w - lambda w)`` for ``A >= 0`` / ``A < 0``.
        kl_bias_correction: the KL term is ``rho * k3`` (TRL's ``use_bias_correction_kl``),
            its gradient through both factors.
        top_entropy_quantile: the policy term is kept only on tokens whose entropy is at or
            above the ``1 - q`` quantile of the batch's valid tokens (1.0: off).
        off_policy_mask_threshold: the policy term of a sequence with ``A < 0`` and a mean
            ``sampling_logp - logp`` above this is dropped (None: off).
        entropy_mean: the entropy bonus is ``-entropy_coef`` times the masked token mean of
            the entropy over the batch (TRL's definition; over the entropy-quantile mask's
            tokens where it is on) instead of a per-token term aggregated like the loss.
        loss_scale: the whole loss and its gradient are multiplied by it (> 0), folded into
            the per-token weights before the launch: dividing by the gradient-accumulation
            steps this way costs no pass over the gradient (``loss / k`` in the caller's
            graph does: the backward then scales the saved gradient).
    """
    temperature: float = 1.0
    objective: str = "clip"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    beta: float = 0.0
    entropy_coef: float = 0.0
    importance_sampling: str = "token"
    teacher_objective: str = "shaped"
    teacher_gamma: float = TEACHER_GAMMA
    sft_weight: float = 1.0
    aggregation: str = "token-mean"
    normalizer: Optional[float] = None
    max_len: Optional[int] = None
    log_ratio_clamp: Optional[float] = None
    num_sequences: Optional[float] = None
    dp_size: int = 1
    delta: Optional[float] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    kl_bias_correction: bool = False
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: Optional[float] = None
    entropy_mean: bool = False
    loss_scale: float = 1.0

    def __post_init__(self) -> None:
        checked = dict(
            temperature=check_temperature(self.temperature),
            objective=choice("objective", self.objective, tuple(OBJECTIVES)),
            eps_low=number("eps_low", self.eps_low, low=0.0, high=1.0, high_open=True),
            eps_high=number("eps_high", self.eps_high, low=0.0),
            dual_clip=number("dual_clip", self.dual_clip, low=1.0, low_open=True,
                             allow_none=True),
            beta=number("beta", self.beta, low=0.0),
            entropy_coef=number("entropy_coef", self.entropy_coef),
            importance_sampling=choice("importance_sampling", self.importance_sampling,
                                       IMPORTANCE_SAMPLING),
            teacher_objective=choice("teacher_objective", self.teacher_objective,
                                     tuple(TEACHER_OBJECTIVES)),
            teacher_gamma=number("teacher_gamma", self.teacher_gamma, low=0.0, low_open=True),
            sft_weight=number("sft_weight", self.sft_weight),
            normalizer=number("normalizer", self.normalizer, low=0.0, low_open=True,
                              allow_none=True),
            max_len=positive_int("max_len", self.max_len, allow_none=True),
            log_ratio_clamp=number("log_ratio_clamp", self.log_ratio_clamp, low=0.0,
                                   low_open=True, allow_none=True),
            num_sequences=number("num_sequences", self.num_sequences, low=0.0, low_open=True,
                                 allow_none=True),
            dp_size=positive_int("dp_size", self.dp_size),
            delta=number("delta", self.delta, low=0.0, low_open=True, allow_none=True),
            sapo_temperature_pos=number("sapo_temperature_pos", self.sapo_temperature_pos,
                                        low=0.0, low_open=True),
            sapo_temperature_neg=number("sapo_temperature_neg", self.sapo_temperature_neg,
                                        low=0.0, low_open=True),
            vespo_k_pos=number("vespo_k_pos", self.vespo_k_pos),
            vespo_lambda_pos=number("vespo_lambda_pos", self.vespo_lambda_pos),
            vespo_k_neg=number("vespo_k_neg", self.vespo_k_neg),
            vespo_lambda_neg=number("vespo_lambda_neg", self.vespo_lambda_neg),
            kl_bias_correction=check_bool("kl_bias_correction", self.kl_bias_correction),
            top_entropy_quantile=number("top_entropy_quantile", self.top_entropy_quantile,
                                        low=0.0, high=1.0),
            off_policy_mask_threshold=number("off_policy_mask_threshold",
                                             self.off_policy_mask_threshold, allow_none=True),
            entropy_mean=check_bool("entropy_mean", self.entropy_mean),
            loss_scale=number("loss_scale", self.loss_scale, low=0.0, low_open=True),
        )
        agg = resolve_aggregation(self.aggregation)
        if OBJECTIVES[checked["objective"]].ratio is not None and \
                checked["importance_sampling"] != "sequence":
            raise ValueError(f"objective={checked['objective']!r} has a per-sequence ratio of its "
                             "own (the geometric mean of its tokens' clipped ratios): pass "
                             "importance_sampling='sequence'")
        if checked["dp_size"] > 1:
            if agg == "token-mean" and checked["normalizer"] is None:
                raise ValueError("dp_size > 1 needs normalizer (the global token count, "
                                 "verl's batch_num_tokens) for token-mean")
            if agg.startswith("seq-mean") and checked["num_sequences"] is None:
                raise ValueError("dp_size > 1 needs num_sequences (the global sequence count, "
                                 "verl's global_batch_size) for the seq-mean modes")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def aggregation_mode(self) -> str:
        """The canonical (verl) aggregation name; ``aggregation`` keeps the caller's alias."""
        return resolve_aggregation(self.aggregation)

    @property
    def sequence_level(self) -> bool:
        """Whether the importance ratio is per sequence (GSPO, GSPO-token)."""
        return self.importance_sampling in ("sequence", "sequence_token")

    @property
    def statistics_first(self) -> bool:
        """Whether a token's loss needs statistics of its sequence or of the batch, so the
        loss runs as a statistics pass then a gradient pass (``twopass.py``): sequence-level
        ratios, an objective with a per-sequence weight or ratio (VESPO, GMPO), the
        entropy-quantile and off-policy masks, and the batch-mean entropy bonus (where it
        differs per token)."""
        return (self.sequence_level or not OBJECTIVES[self.objective].fused
                or self.top_entropy_quantile < 1.0
                or self.off_policy_mask_threshold is not None
                or (self.entropy_mean and self.entropy_coef != 0))

    def kernel_params(self) -> tuple:
        """The scalar options in ``KERNEL_PARAMS`` order (None as 0.0), for the Triton kernel."""
        return tuple(float(getattr(self, name) or 0.0) for name in KERNEL_PARAMS)


@dataclass(frozen=True)
class AdvantageOptions(_Options):
    """Every option of group advantages with SSI substitution (docs/design.md section 6).

    Args:
        scale: ``"group"`` ``(r - mean) / (std + eps)``, ``"batch"`` (one std for the batch)
            or ``"none"`` (``r - mean``, Dr. GRPO).
        stats: mean and std over ``"all"`` members or the ``"on-policy"`` ones only
            (LUFFY's rule: a zero on-policy std counts as 1).
        eps: added to the std.
        teacher_reward: the reward of a substituted teacher demonstration (a per-group
            tensor, ``group_advantages(teacher_rewards=)``, overrides it).
        replace: the member an injected group loses: ``"worst"`` (the lowest reward, first
            index on ties; HAPO), ``"random"`` (drawn by the caller, seeded, and passed as
            ``group_advantages(replace_index=)``) or ``"fixed"`` (a set member:
            ``replace_index``, member 0 when not given; LUFFY's layout).
    """
    scale: str = "group"
    stats: str = "all"
    eps: float = ADVANTAGE_EPS
    teacher_reward: float = TEACHER_REWARD
    replace: str = "worst"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", choice("scale", self.scale, SCALES))
        object.__setattr__(self, "stats", choice("stats", self.stats, STATS))
        object.__setattr__(self, "eps", number("eps", self.eps, low=0.0))
        object.__setattr__(self, "teacher_reward",
                           number("teacher_reward", self.teacher_reward))
        object.__setattr__(self, "replace", choice("replace", self.replace, REPLACE))


# --------------------------------------------------------------------------- other libraries' names
# TRL's, Liger-Kernel's and verl's names for our options and tensor arguments. A name that
# means the same thing is accepted and renamed (``canonical_options``, called by
# ``split_options``); a name whose meaning differs raises a ``TypeError`` saying what to pass.
OPTION_ALIASES = {
    "epsilon_low": "eps_low",                              # Liger, TRL's trainer
    "epsilon_high": "eps_high",                            # Liger, TRL
    "clip_ratio_low": "eps_low",                           # verl
    "clip_ratio_high": "eps_high",                         # verl
    "clip_ratio_c": "dual_clip",                           # verl
    "importance_sampling_level": "importance_sampling",    # TRL, Liger
    "loss_agg_mode": "aggregation",                        # verl
    "max_completion_length": "max_len",                    # TRL, Liger (dr_grpo's width)
    "entropy_coeff": "entropy_coef",                       # verl
    "use_bias_correction_kl": "kl_bias_correction",        # TRL, Liger
}
ARGUMENT_ALIASES = {
    "completion_mask": "mask",                             # TRL, Liger's triton_grpo_loss
    "attention_mask": "mask",                              # Liger's chunked loss
    "response_mask": "mask",                               # verl
    "old_per_token_logps": "old_logp",                     # TRL, Liger
    "old_log_prob": "old_logp",                            # verl
    "ref_per_token_logps": "ref_logp",                     # TRL, Liger
    "ref_log_prob": "ref_logp",                            # verl
    "importance_sampling_ratio": "rollout_is_weights",     # TRL (vLLM IS correction)
    "vllm_is_ratio": "rollout_is_weights",                 # Liger
    "sampling_per_token_logps": "sampling_logp",           # TRL
}
# TRL's and Liger's ``loss_type`` names an aggregation (AGGREGATION_ALIASES), and for these
# an objective too, aggregated the way TRL aggregates it.
LOSS_TYPE_OBJECTIVES = {"cispo": ("cispo", "dapo"), "sapo": ("sapo", "grpo"),
                        "vespo": ("vespo", "dapo")}
NOT_THE_SAME = {
    "epsilon": "eps_low= and eps_high= (TRL's epsilon is eps_low, and eps_high too unless "
               "epsilon_high is set)",
    "clip_ratio": "eps_low= and eps_high= (verl's clip_ratio sets both)",
    "num_items_in_batch": "normalizer= (TRL's and Liger's dapo divide by "
                          "num_items_in_batch / world_size)",
    "kl_loss_coef": "beta= (the k3 KL; verl's kl_loss_type 'low_var_kl' also clamps it to "
                    "[-10, 10])",
}


def loss_type_options(loss_type: Any) -> dict:
    """TRL's / Liger's ``loss_type`` as our options: ``aggregation``, and ``objective``
    where the name picks one (``LOSS_TYPE_OBJECTIVES``)."""
    if isinstance(loss_type, str) and loss_type in LOSS_TYPE_OBJECTIVES:
        objective, aggregation = LOSS_TYPE_OBJECTIVES[loss_type]
        return {"objective": objective, "aggregation": aggregation}
    if not isinstance(loss_type, str) or loss_type not in AGGREGATION_ALIASES:
        raise ValueError(f"loss_type={loss_type!r} is not one of "
                         f"{list(AGGREGATION_ALIASES) + list(LOSS_TYPE_OBJECTIVES)}")
    return {"aggregation": loss_type}


def canonical_options(kwargs: Mapping[str, Any]) -> dict:
    """``kwargs`` with TRL's, Liger's and verl's option names renamed to ours.

    ``OPTION_ALIASES`` are renamed and ``loss_type`` expanded (``loss_type_options``). A
    name in ``NOT_THE_SAME`` or one option given under two names raises ``TypeError``.
    """
    out, origin = {}, {}
    for name, value in kwargs.items():
        if name in NOT_THE_SAME:
            raise TypeError(f"{name!r} is not an option of hapo-kernels; pass "
                            f"{NOT_THE_SAME[name]}")
        if name == "loss_type":
            renamed = loss_type_options(value)
        else:
            renamed = {OPTION_ALIASES.get(name, name): value}
        for key, v in renamed.items():
            if key in out:
                raise TypeError(f"option {key!r} given twice: as {origin[key]!r} and as "
                                f"{name!r}")
            out[key], origin[key] = v, name
    return out


def canonical_arguments(kwargs: Mapping[str, Any], **given: Any) -> Tuple[dict, dict]:
    """Take other libraries' names for tensor arguments (``ARGUMENT_ALIASES``) out of
    ``kwargs``: ``(the other kwargs, given)`` with ``given`` (our names, as the caller
    received them) filled in; a tensor passed under two names raises ``TypeError``."""
    rest, given = {}, dict(given)
    for name, value in kwargs.items():
        ours = ARGUMENT_ALIASES.get(name)
        if ours is None:
            rest[name] = value
        elif ours not in given:
            raise TypeError(f"{name!r} ({ours!r} here) is not an argument of this function")
        elif given[ours] is not None:
            raise TypeError(f"{ours!r} given twice: as {ours!r} and as {name!r}")
        else:
            given[ours] = value
    return rest, given


def split_options(kwargs: Mapping[str, Any], loss: Optional[LossOptions] = None,
                  advantages: Optional[AdvantageOptions] = None
                  ) -> Tuple[LossOptions, AdvantageOptions]:
    """``(LossOptions, AdvantageOptions)`` from one mapping of keyword options, the one
    place keyword options are parsed: other libraries' names are renamed first
    (``canonical_options``), and a name that is neither's raises ``TypeError`` listing both
    sets."""
    kwargs = canonical_options(kwargs)
    loss_names, adv_names = set(LossOptions.names()), set(AdvantageOptions.names())
    unknown = sorted(set(kwargs) - loss_names - adv_names)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; loss options are "
                        f"{list(LossOptions.names())}, advantage options "
                        f"{list(AdvantageOptions.names())}")
    return (LossOptions.from_kwargs(loss, **{k: v for k, v in kwargs.items() if k in loss_names}),
            AdvantageOptions.from_kwargs(advantages,
                                         **{k: v for k, v in kwargs.items() if k in adv_names}))
