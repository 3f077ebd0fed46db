"""Option names, aliases, defaults and validation: the one source for every path.

The float64 reference, the chunked CPU path and the Triton kernels all read their
option values, integer codes and defaults from here, so that a name or a constant can
never drift between them (DESIGN sections 3-9).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# --------------------------------------------------------------------------- constants
IGNORE_INDEX = -100
TEACHER_GAMMA = 0.1          # f(p) = p / (p + gamma) for the shaped teacher objective
ADVANTAGE_EPS = 1e-4         # A = (r - mean) / (std + eps)
TEACHER_REWARD = 1.0

# --------------------------------------------------------------------------- names
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm")
# TRL's loss_type names. "dapo" is token-mean with the global token count as normalizer.
AGGREGATION_ALIASES = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                       "bnpo": "token-mean", "dapo": "token-mean"}
IMPORTANCE_SAMPLING = ("token", "sequence")
TEACHER_OBJECTIVES = ("shaped", "sft", "ratio")
SCALES = ("group", "batch", "none")
STATS = ("all", "on-policy")

# Integer codes passed to the kernels as constexprs.
TEACHER_OBJECTIVE_CODE = {name: i for i, name in enumerate(TEACHER_OBJECTIVES)}
SCALE_CODE = {name: i for i, name in enumerate(SCALES)}
STATS_CODE = {name: i for i, name in enumerate(STATS)}

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The float64 reference also takes float64 logits, so tests can differentiate it in float64.
REFERENCE_DTYPES = LOGIT_DTYPES + (torch.float64,)


def _choice(name: str, value, choices, aliases=None) -> str:
    if aliases and value in aliases:
        return aliases[value]
    if value not in choices:
        allowed = list(choices) + list(aliases or {})
        raise ValueError(f"{name}={value!r} is not one of {allowed}")
    return value


def _number(name: str, value, *, low=None, high=None, low_open=False, high_open=False,
            allow_none=False) -> Optional[float]:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number, got None")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
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


def check_temperature(temperature) -> float:
    return _number("temperature", temperature, low=0.0, low_open=True)


def resolve_aggregation(aggregation: str) -> str:
    return _choice("aggregation", aggregation, AGGREGATIONS, AGGREGATION_ALIASES)


def check_scale(scale: str) -> str:
    return _choice("scale", scale, SCALES)


def check_stats(stats: str) -> str:
    return _choice("stats", stats, STATS)


# --------------------------------------------------------------------------- loss options
@dataclass(frozen=True)
class LossOptions:
    """Every scalar option of the HAPO/GRPO objective, validated (DESIGN sections 4-5)."""
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    beta: float = 0.0
    entropy_coef: float = 0.0
    importance_sampling: str = "token"
    teacher_objective: str = "shaped"
    teacher_gamma: float = TEACHER_GAMMA
    sft_weight: float = 1.0
    aggregation: str = "token-mean"     # canonical verl name after alias resolution
    aggregation_alias: str = "token-mean"   # the name the caller used ("dapo" matters)
    normalizer: Optional[float] = None
    max_len: Optional[int] = None

    @property
    def teacher_code(self) -> int:
        return TEACHER_OBJECTIVE_CODE[self.teacher_objective]


def parse_loss_options(*, temperature=1.0, eps_low=0.2, eps_high=0.2, dual_clip=None,
                       beta=0.0, entropy_coef=0.0, importance_sampling="token",
                       teacher_objective="shaped", teacher_gamma=TEACHER_GAMMA, sft_weight=1.0,
                       aggregation="token-mean", normalizer=None, max_len=None) -> LossOptions:
    """Validate every option; raise ValueError naming the offending argument."""
    max_len_value = None
    if max_len is not None:
        if isinstance(max_len, bool) or not float(max_len).is_integer() or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        max_len_value = int(max_len)
    return LossOptions(
        temperature=check_temperature(temperature),
        eps_low=_number("eps_low", eps_low, low=0.0, high=1.0, high_open=True),
        eps_high=_number("eps_high", eps_high, low=0.0),
        dual_clip=_number("dual_clip", dual_clip, low=1.0, low_open=True, allow_none=True),
        beta=_number("beta", beta, low=0.0),
        entropy_coef=_number("entropy_coef", entropy_coef),
        importance_sampling=_choice("importance_sampling", importance_sampling,
                                    IMPORTANCE_SAMPLING),
        teacher_objective=_choice("teacher_objective", teacher_objective, TEACHER_OBJECTIVES),
        teacher_gamma=_number("teacher_gamma", teacher_gamma, low=0.0, low_open=True),
        sft_weight=_number("sft_weight", sft_weight),
        aggregation=resolve_aggregation(aggregation),
        aggregation_alias=aggregation,
        normalizer=_number("normalizer", normalizer, low=0.0, low_open=True, allow_none=True),
        max_len=max_len_value,
    )


# --------------------------------------------------------------------------- tensor checks
def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    return ignore_index


def check_target_ids(target_ids, row_shape, V: int, device, ignore_index=IGNORE_INDEX, *,
                     source: str = "logits", source_shape=None):
    """Integer ``target_ids`` of ``row_shape`` on ``device`` with ids in ``[0, V)``.

    ``row_shape`` / ``device`` are those of ``source`` (the logits, or the hidden states of a
    fused LM head, whose ``V`` is the head's) without its last dimension; messages name it.
    Reads the targets once (a reduction on their device).
    """
    check_ignore_index(ignore_index)
    if not isinstance(target_ids, torch.Tensor):
        raise ValueError(f"target_ids must be a torch.Tensor, got {type(target_ids).__name__}")
    if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex \
            or target_ids.dtype == torch.bool:
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if tuple(target_ids.shape) != tuple(row_shape):
        raise ValueError(f"target_ids must have shape {tuple(row_shape)} to match "
                         f"{source} {tuple(source_shape)}, got {tuple(target_ids.shape)}")
    if target_ids.device != device:
        raise ValueError(f"target_ids is on {target_ids.device} but {source} on {device}")
    valid = target_ids != ignore_index
    if target_ids.numel() and bool(((target_ids < 0) | (target_ids >= V))[valid].any()):
        bad = target_ids[valid & ((target_ids < 0) | (target_ids >= V))][0].item()
        raise ValueError(f"target_ids holds {bad}, outside [0, {V}) (ignore_index="
                         f"{ignore_index} marks positions to skip)")


def check_logits_and_targets(logits: torch.Tensor, target_ids: torch.Tensor,
                             ignore_index: int = IGNORE_INDEX, *, dtypes=LOGIT_DTYPES,
                             vocab_size=None):
    """Check shapes, dtypes, devices and target range; return (rows, V, batch_shape).

    ``logits`` is ``[B, T, V]`` with targets ``[B, T]`` or packed ``[N, V]`` with ``[N]``.
    The check reads the targets once (a reduction on their device), never the logits.
    ``vocab_size``: the range of the target ids when ``logits`` holds a slice of the
    vocabulary (vocab-parallel); ``V`` by default.
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError("logits must be [B, T, V] or packed [N, V] (a vocabulary dimension "
                         f"last), got shape {tuple(logits.shape)}")
    if logits.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"logits must be one of {names}; got {logits.dtype}")
    V = logits.shape[-1]
    if V < 1:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in the vocabulary dimension (stride 1); "
                         "call .contiguous() on the tensor first")
    V = V if vocab_size is None else vocab_size
    check_target_ids(target_ids, logits.shape[:-1], V, logits.device, ignore_index,
                     source_shape=logits.shape)
    return target_ids.numel(), V, tuple(target_ids.shape)


def check_like(name: str, tensor, shape, device, *, allow_per_seq: bool = False,
               floating: bool = True, source: str = "logits"):
    """A per-token tensor (or per-sequence where allowed) of the right shape and device."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but {source} on {device}")
    ok = tuple(tensor.shape) == tuple(shape)
    if allow_per_seq and len(shape) == 2:
        ok = ok or tuple(tensor.shape) == (shape[0],)
    if not ok:
        want = f"{tuple(shape)}" + (f" or ({shape[0]},)" if allow_per_seq and len(shape) == 2
                                    else "")
        raise ValueError(f"{name} must have shape {want}, got {tuple(tensor.shape)}")
    if floating and not tensor.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    return tensor


@dataclass
class LossTensors:
    """The per-token inputs of the loss, validated and laid out as ``[B, T]``.

    Packed ``[N]`` targets are one row (``B = 1``). ``valid`` folds the mask and
    ``ignore_index`` together; per-sequence advantages and teacher flags are broadcast.
    Values keep the caller's dtype; each path casts to its own accumulation type.
    """
    targets: torch.Tensor               # [B, T] long-compatible
    valid: torch.Tensor                 # [B, T] bool
    advantages: torch.Tensor            # [B, T] (broadcast view for per-sequence input)
    old_logp: Optional[torch.Tensor]    # [B, T] or None
    ref_logp: Optional[torch.Tensor]    # [B, T] or None
    teacher: torch.Tensor               # [B, T] bool
    batch_shape: tuple                  # the caller's target shape, for per-token outputs


def check_loss_tensors(logits, target_ids, advantages, *, mask=None, old_logp=None,
                       ref_logp=None, teacher_mask=None, ignore_index=IGNORE_INDEX,
                       opts: LossOptions, dtypes=LOGIT_DTYPES, vocab_size=None) -> LossTensors:
    """Validate every tensor input of the loss before any kernel runs (DESIGN section 9)."""
    check_logits_and_targets(logits, target_ids, ignore_index, dtypes=dtypes,
                             vocab_size=vocab_size)
    return check_token_tensors(target_ids, advantages, mask=mask, old_logp=old_logp,
                               ref_logp=ref_logp, teacher_mask=teacher_mask,
                               ignore_index=ignore_index, opts=opts, device=logits.device)


def check_token_tensors(target_ids, advantages, *, mask=None, old_logp=None, ref_logp=None,
                        teacher_mask=None, ignore_index=IGNORE_INDEX, opts: LossOptions,
                        device, source: str = "logits") -> LossTensors:
    """``check_loss_tensors`` past the logits: the per-token inputs beside ``target_ids``.

    ``target_ids`` must already be checked against ``source`` (``check_logits_and_targets``,
    or the fused LM head's check of its hidden states); ``device`` is ``source``'s.
    """
    batch_shape = tuple(target_ids.shape)
    shape2d = batch_shape if len(batch_shape) == 2 else (1, batch_shape[0])

    def as2d(name, t, per_seq_ok, floating=True):
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if len(batch_shape) == 1:
            # Packed input is one sequence: accept [N] per token, or [1] per sequence.
            if tuple(t.shape) == batch_shape:
                t = t.reshape(shape2d)
            elif per_seq_ok and tuple(t.shape) in ((1,), ()):
                t = t.reshape(1)
        t = check_like(name, t, shape2d, device, allow_per_seq=per_seq_ok, floating=floating,
                       source=source)
        return t

    if advantages is None:
        raise ValueError("advantages is required (or pass rewards= and group_size=)")
    adv = as2d("advantages", advantages, True)
    adv = adv[:, None].expand(shape2d) if adv.dim() == 1 else adv
    old = as2d("old_logp", old_logp, False)
    ref = as2d("ref_logp", ref_logp, False)
    if opts.beta > 0 and ref is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")
    targets = target_ids.reshape(shape2d)
    valid = targets != ignore_index
    if mask is not None:
        m = as2d("mask", mask, False, floating=False)
        if m.dtype.is_floating_point:
            valid = valid & (m != 0)
        else:
            valid = valid & m.bool()
    if teacher_mask is None:
        teacher = torch.zeros(shape2d, dtype=torch.bool, device=device)
    else:
        t = as2d("teacher_mask", teacher_mask, True, floating=False)
        t = t.bool() if not t.dtype.is_floating_point else t != 0
        teacher = t[:, None].expand(shape2d) if t.dim() == 1 else t
    return LossTensors(targets, valid, adv, old, ref, teacher, batch_shape)
