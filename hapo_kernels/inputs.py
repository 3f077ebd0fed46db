"""Tensor inputs: checked before any kernel or collective runs, then laid out once.

``check_logits_and_targets`` / ``check_target_ids`` / ``check_groups`` raise a ``ValueError``
naming the argument (docs/design.md section 9). ``LossInputs`` is the one container of the
loss's per-token inputs, flat ``[rows]`` and contiguous, that every backend, the fused LM head
and the vocab-parallel path read; ``loss_inputs`` builds it from the caller's arguments.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch

from .aggregation import aggregation_weights
from .backends import scoped
from .options import IGNORE_INDEX, LOGIT_DTYPES, LossOptions, check_bool, check_ignore_index
from .packed import Segments, packed_segments, per_token

# A vocabulary size for ``check_logits_and_targets`` that checks only the lower bound of the
# target ids: a vocabulary slice, whose whole size is known after the ranks' handshake.
UNBOUNDED = 1 << 62

# --------------------------------------------------------------------------- value checks
# The checks that read tensor values (target ids in range, finite rewards and per-token
# inputs) each wait for the device: one host read per call. On by default; a CUDA training
# loop that wants no host sync (CUDA graphs, CPU/GPU overlap) turns them off for a block.
_value_checks: contextvars.ContextVar = contextvars.ContextVar("hapo_value_checks",
                                                               default=True)


def value_checks_enabled() -> bool:
    """Whether the checks that read tensor values run (``value_checks``)."""
    return _value_checks.get()


def value_checks(enabled: bool) -> contextlib.AbstractContextManager:
    """``with hk.value_checks(False):`` skips the checks that read tensor values (target ids
    in range, finite rewards, advantages, old/ref log-probs and rollout weights) inside the
    block, so a call on CUDA launches without waiting for the device. Shapes, dtypes,
    devices and options are still checked; a bad value then gives a bad result, not a
    ``ValueError``."""
    return scoped(_value_checks, check_bool("enabled", enabled))


# --------------------------------------------------------------------------- tensor checks
def check_target_ids(target_ids: Any, row_shape: Sequence[int], V: int, device: torch.device,
                     ignore_index: int = IGNORE_INDEX, *, source: str = "logits",
                     source_shape: Optional[Sequence[int]] = None) -> None:
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
        # The likeliest cause is Liger's argument order (logits, old_logp, ref_logp, ...).
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype} (the "
                         "arguments are (logits, target_ids, advantages, mask, old_logp, "
                         "ref_logp); hapo_kernels.compat.liger.triton_grpo_loss takes "
                         "Liger's order)")
    if tuple(target_ids.shape) != tuple(row_shape):
        raise ValueError(f"target_ids must have shape {tuple(row_shape)} to match "
                         f"{source} {tuple(source_shape or ())}, got {tuple(target_ids.shape)}")
    if target_ids.device != device:
        raise ValueError(f"target_ids is on {target_ids.device} but {source} on {device}")
    valid = target_ids != ignore_index
    if not value_checks_enabled():
        return
    if target_ids.numel() and bool(((target_ids < 0) | (target_ids >= V))[valid].any()):
        bad = target_ids[valid & ((target_ids < 0) | (target_ids >= V))][0].item()
        raise ValueError(f"target_ids holds {bad}, outside [0, {V}) (ignore_index="
                         f"{ignore_index} marks positions to skip)")


def check_logits_and_targets(logits: Any, target_ids: Any, ignore_index: int = IGNORE_INDEX,
                             *, dtypes: Sequence[torch.dtype] = LOGIT_DTYPES,
                             vocab_size: Optional[int] = None) -> int:
    """Check shapes, dtypes, devices and the target range; return the number of rows.

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
    check_target_ids(target_ids, logits.shape[:-1], V if vocab_size is None else vocab_size,
                     logits.device, ignore_index, source_shape=logits.shape)
    return target_ids.numel()


def _check_rewards(rewards: Any) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a 1-D tensor [P*G], got "
                         f"{getattr(rewards, 'shape', type(rewards).__name__)}")
    if rewards.dtype.is_complex or rewards.dtype == torch.bool:
        raise ValueError(f"rewards must be real numbers, got {rewards.dtype}")


def check_finite_rewards(rewards: torch.Tensor, *, group_size: Optional[int] = None,
                         offsets: Optional[torch.Tensor] = None) -> None:
    """A non-finite reward is a ``ValueError`` naming its group (groups of ``group_size``,
    or ``rewards[offsets[p]:offsets[p+1]]``). A NaN would make its group's (or, with
    ``scale="batch"``, the batch's) statistics NaN: never zeroed silently. One reduction
    over the rewards on their device."""
    if not value_checks_enabled() or not rewards.dtype.is_floating_point \
            or bool(torch.isfinite(rewards).all()):
        return
    i = int(torch.nonzero(~torch.isfinite(rewards))[0])
    if offsets is None:
        group, lo, hi = i // group_size, i - i % group_size, i - i % group_size + group_size
    else:
        group = int(torch.searchsorted(offsets, torch.tensor(i, device=offsets.device),
                                       right=True)) - 1
        lo, hi = (int(v) for v in offsets[group:group + 2].tolist())
    raise ValueError(f"rewards must be finite: rewards[{i}] = {float(rewards[i])} in group "
                     f"{group} (rollouts {lo} .. {hi - 1})")


def _check_inject(inject: Any, P: int, rewards: torch.Tensor) -> None:
    """``inject``: None, or one flag per group on the rewards' device."""
    if inject is None:
        return
    if not isinstance(inject, torch.Tensor) or tuple(inject.shape) != (P,):
        raise ValueError(f"inject must be a bool tensor of shape ({P},), got "
                         f"{getattr(inject, 'shape', type(inject).__name__)}")
    if inject.device != rewards.device:
        raise ValueError(f"inject is on {inject.device} but rewards on {rewards.device}")


def check_groups(rewards: Any, group_size: Any, inject: Any = None) -> int:
    """Validate group inputs (docs/design.md section 6); return the number of groups P.

    A non-finite reward is a ``ValueError`` naming its group (``check_finite_rewards``).
    """
    _check_rewards(rewards)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (group-normalised advantages need at least "
                         f"two rollouts), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of "
                         f"{rewards.numel()} rewards")
    P = rewards.numel() // group_size
    check_finite_rewards(rewards, group_size=group_size)
    _check_inject(inject, P, rewards)
    return P


def group_offsets_of(rewards: Any, group_size: Any = None, group_offsets: Any = None,
                     inject: Any = None) -> torch.Tensor:
    """The groups of ``rewards`` as int64 offsets ``[P + 1]`` on the rewards' device.

    Exactly one of ``group_size`` (every group has G >= 2 members, contiguous; checked by
    ``check_groups``) and ``group_offsets`` (group p is ``rewards[o[p]:o[p+1]]``: a 1-D
    integer tensor or sequence with ``o[0] = 0``, ``o[-1] = len(rewards)`` and every group
    non-empty; groups may differ in size and may have one member) describes them.
    """
    if (group_size is None) == (group_offsets is None):
        raise ValueError("pass exactly one of group_size (equal groups) and group_offsets "
                         "(group p is rewards[o[p]:o[p+1]])")
    if group_offsets is None:
        P = check_groups(rewards, group_size, inject)
        return torch.arange(P + 1, dtype=torch.int64, device=rewards.device) * group_size
    _check_rewards(rewards)
    offsets = group_offsets
    if not isinstance(offsets, torch.Tensor):
        try:
            offsets = torch.as_tensor(offsets)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"group_offsets must be a 1-D integer tensor [P + 1], got "
                             f"{type(group_offsets).__name__}") from None
        offsets = offsets.to(rewards.device)
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype.is_floating_point \
            or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise ValueError(f"group_offsets must be a 1-D integer tensor [P + 1], got "
                         f"{offsets.dtype} of shape {tuple(offsets.shape)}")
    if offsets.device != rewards.device:
        raise ValueError(f"group_offsets is on {offsets.device} but rewards on {rewards.device}")
    offsets = offsets.to(torch.int64)
    first, last = (int(v) for v in offsets[[0, -1]].tolist())
    if first != 0 or last != rewards.numel():
        raise ValueError(f"group_offsets must run from 0 to len(rewards) = {rewards.numel()}, "
                         f"got {first} .. {last}")
    if offsets.numel() > 1 and bool((offsets[1:] <= offsets[:-1]).any()):
        raise ValueError("group_offsets must be strictly increasing (every group holds at "
                         "least one reward)")
    P = offsets.numel() - 1
    check_finite_rewards(rewards, offsets=offsets)
    _check_inject(inject, P, rewards)
    return offsets


def check_replacement(replace_index: Any, teacher_rewards: Any, inject: Any,
                      offsets: torch.Tensor, opts: Any
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Validate SSI's per-group tensors (docs/design.md section 6); return them as int64 /
    float32 ``[P]`` on the offsets' device (``replace_index`` member 0 for
    ``replace="fixed"`` when not given, None for ``"worst"``).

    ``replace_index``: the member each injected group loses, counted from the group's first,
    in ``[0, size)`` where ``inject`` (any value in ``[-1, size)`` elsewhere); only with
    ``opts.replace`` ``"random"`` (required) or ``"fixed"``. ``teacher_rewards``: the
    demonstration's reward per group, finite.
    """
    P = offsets.numel() - 1
    device = offsets.device
    if replace_index is not None:
        if opts.replace == "worst":
            raise ValueError('replace_index is for replace="random" or "fixed"; replace="worst" '
                             "picks the lowest reward itself")
        if not isinstance(replace_index, torch.Tensor) or tuple(replace_index.shape) != (P,) \
                or replace_index.dtype.is_floating_point or replace_index.dtype == torch.bool \
                or replace_index.dtype.is_complex:
            raise ValueError(f"replace_index must be an integer tensor of shape ({P},), got "
                             f"{getattr(replace_index, 'dtype', type(replace_index).__name__)} "
                             f"{tuple(getattr(replace_index, 'shape', ()))}")
        if replace_index.device != device:
            raise ValueError(f"replace_index is on {replace_index.device} but rewards on {device}")
        replace_index = replace_index.long()
        low = 0 if inject is None else torch.where(inject.bool(), 0, -1)
        sizes = offsets[1:] - offsets[:-1]
        if bool(((replace_index < low) | (replace_index >= sizes)).any()):
            raise ValueError(f"replace_index must lie in [0, group size) for every injected "
                             f"group, got {replace_index.tolist()} for sizes {sizes.tolist()}")
    elif opts.replace == "random":
        raise ValueError('replace="random" needs replace_index= (the members the caller drew, '
                         "seeded; hapo.inject_successes draws them)")
    elif opts.replace == "fixed":
        replace_index = torch.zeros(P, dtype=torch.long, device=device)
    if teacher_rewards is not None:
        if not isinstance(teacher_rewards, torch.Tensor) \
                or tuple(teacher_rewards.shape) != (P,) \
                or not teacher_rewards.dtype.is_floating_point:
            raise ValueError(f"teacher_rewards must be a float tensor of shape ({P},), got "
                             f"{getattr(teacher_rewards, 'dtype', type(teacher_rewards).__name__)}"
                             f" {tuple(getattr(teacher_rewards, 'shape', ()))}")
        if teacher_rewards.device != device:
            raise ValueError(f"teacher_rewards is on {teacher_rewards.device} but rewards on "
                             f"{device}")
        if not bool(torch.isfinite(teacher_rewards).all()):
            raise ValueError(f"teacher_rewards must be finite, got {teacher_rewards.tolist()}")
        teacher_rewards = teacher_rewards.float()
    return replace_index, teacher_rewards


def _per_token_tensor(name: str, tensor: Any, batch_shape: tuple, device: torch.device,
                      source: str, *, per_sequence_ok: bool,
                      floating: bool = True) -> Optional[torch.Tensor]:
    """``tensor`` as ``[B, T]`` (or ``[B]`` where per-sequence values are allowed)."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but {source} on {device}")
    shape2d = batch_shape if len(batch_shape) == 2 else (1, batch_shape[0])
    if len(batch_shape) == 1:
        # Packed input without cu_seqlens is one sequence: [N] per token, [1] per sequence.
        if tuple(tensor.shape) == batch_shape:
            tensor = tensor.reshape(shape2d)
        elif per_sequence_ok and tuple(tensor.shape) in ((1,), ()):
            tensor = tensor.reshape(1)
    ok = tuple(tensor.shape) == shape2d or (per_sequence_ok and
                                            tuple(tensor.shape) == (shape2d[0],))
    if not ok:
        want = f"{tuple(batch_shape)}" + (f" or ({batch_shape[0]},)"
                                          if per_sequence_ok and len(batch_shape) == 2 else "")
        raise ValueError(f"{name} must have shape {want}, got {tuple(tensor.shape)}")
    if floating and not tensor.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    return tensor


def check_per_sequence(name: str, tensor: torch.Tensor, per_sequence: Optional[bool],
                       segments: Optional[Segments]) -> None:
    """With ``per_sequence`` given, ``tensor`` (checked, ``[B]`` or ``[B, T]``) must be
    what it says; packed input with ``cu_seqlens`` is checked by ``packed.per_token``."""
    if per_sequence is None or segments is not None:
        return
    if per_sequence is not (tensor.dim() == 1):
        raise ValueError(f"{name} must be one per {'sequence' if per_sequence else 'token'} "
                         f"(per_sequence={per_sequence}), got shape {tuple(tensor.shape)}")


def check_finite_where_counted(valid: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Each of ``tensors`` (``[B, T]``, or ``[B]`` per sequence) finite on every counted token.

    A non-finite ``old_logp`` makes the ratio infinite: the objective is then ``inf * 0``
    somewhere, which one backend turns into NaN and another into 0. Tokens outside
    ``valid`` are never read, whatever they hold. One reduction per tensor, one sync.
    """
    named = [(name, t if t.dim() == valid.dim() else t[:, None].expand(valid.shape))
             for name, t in tensors.items() if t is not None]
    if not named or valid.numel() == 0 or not value_checks_enabled():
        return
    bad = torch.stack([(~torch.isfinite(t) & valid).any() for _, t in named]).tolist()
    for (name, t), is_bad in zip(named, bad):
        if is_bad:
            where = tuple(int(i) for i in torch.nonzero(~torch.isfinite(t) & valid)[0])
            raise ValueError(f"{name} must be finite on every counted token; {name}"
                             f"{list(where)} = {float(t[where])} (mask the token out, or "
                             f"fix the value)")


# --------------------------------------------------------------------------- the container
@dataclass
class LossInputs:
    """The loss's per-token inputs, validated, flat ``[rows]`` and contiguous (rows = B*T).

    Packed ``[N]`` targets are one row of ``N`` tokens (``B = 1``) unless ``segments`` says
    where the sequences are. ``valid`` folds the mask and ``ignore_index`` together;
    per-sequence advantages and teacher flags are broadcast to their tokens; ``weights``
    are the aggregation weights (``loss = sum(weights * l)``, ``aggregation.py``).
    """
    B: int
    T: int
    targets: torch.Tensor               # the caller's integer dtype, ignore_index kept
    ignore_index: int
    valid: torch.Tensor                 # bool
    advantages: torch.Tensor            # float32
    old_logp: Optional[torch.Tensor]    # float32 or None
    ref_logp: Optional[torch.Tensor]    # float32 or None
    teacher: torch.Tensor               # bool
    weights: Optional[torch.Tensor]     # float32 (None until attach_weights)
    batch_shape: tuple                  # the caller's target shape, for per-token outputs
    segments: Optional[Segments] = None           # packed sequences (cu_seqlens)
    vocab_shard: Optional[Any] = None             # distributed.VocabShard
    computed_advantages: Optional[torch.Tensor] = None   # from rewards= (detached)
    replaced: Optional[torch.Tensor] = None       # SSI's replaced member per group
    rollout_is: Optional[torch.Tensor] = None     # float32 rollout importance weights
    sampling_logp: Optional[torch.Tensor] = None  # float32 sampler log-probs (masks.py)
    process_group: Optional[Any] = None           # data-parallel group (masks.py)

    @property
    def rows(self) -> int:
        """The number of token rows, ``B * T``."""
        return self.B * self.T

    def token_vectors(self, sl: slice = slice(None)) -> dict:
        """The per-token vectors ``objective.token_terms`` takes, for a slice of rows."""
        def cut(t):
            return None if t is None else t[sl]
        return dict(valid=self.valid[sl], advantages=self.advantages[sl],
                    old_logp=cut(self.old_logp), ref_logp=cut(self.ref_logp),
                    teacher=self.teacher[sl], weights=self.weights[sl],
                    rollout_is=cut(self.rollout_is))

    def sequence_vectors(self) -> dict:
        """``token_vectors`` shaped ``[B, T]`` (or packed with ``segments``), for terms that
        couple the tokens of a sequence."""
        def shape(t):
            return None if t is None else t.view(self.B, self.T)
        vec = {k: shape(v) for k, v in self.token_vectors().items()}
        vec["segments"] = self.segments
        return vec

    def slice_rows(self, r0: int, r1: int) -> LossInputs:
        """Rows ``r0..r1`` as a packed batch of one sequence (token-level terms only)."""
        def cut(t):
            return None if t is None else t[r0:r1]
        return dataclasses.replace(
            self, B=1, T=r1 - r0, targets=self.targets[r0:r1], valid=self.valid[r0:r1],
            advantages=self.advantages[r0:r1], old_logp=cut(self.old_logp),
            ref_logp=cut(self.ref_logp), teacher=self.teacher[r0:r1],
            weights=self.weights[r0:r1], batch_shape=(r1 - r0,), segments=None,
            rollout_is=cut(self.rollout_is), sampling_logp=cut(self.sampling_logp))


def loss_inputs(source: torch.Tensor, target_ids: torch.Tensor,
                advantages: Optional[torch.Tensor], opts: LossOptions, *, source_name: str,
                ignore_index: int = IGNORE_INDEX, mask: Optional[torch.Tensor] = None,
                old_logp: Optional[torch.Tensor] = None,
                ref_logp: Optional[torch.Tensor] = None,
                teacher_mask: Optional[torch.Tensor] = None,
                segments: Optional[Segments] = None, per_sequence: Optional[bool] = None,
                process_group: Any = None,
                vocab_shard: Any = None, replaced: Optional[torch.Tensor] = None,
                computed_advantages: Optional[torch.Tensor] = None,
                rollout_is_weights: Optional[torch.Tensor] = None,
                sampling_logp: Optional[torch.Tensor] = None,
                dtype: torch.dtype = torch.float32, weights: bool = True) -> LossInputs:
    """The loss's tensors checked against ``target_ids`` and laid out as ``LossInputs``.

    ``source`` (named ``source_name`` in errors) is the logits or the fused head's hidden
    states, whose shape and device ``target_ids`` has already been checked against.
    ``per_sequence``: ``advantages`` and ``teacher_mask`` are one per sequence (``True``)
    or one per token (``False``); ``None``: by shape, an error where a shape could mean
    either (``packed.per_token``). ``weights=False`` leaves the aggregation weights for
    ``attach_weights`` (after the ranks' handshake: it may be a collective).
    """
    device = source.device
    batch_shape = tuple(target_ids.shape)
    shape2d = batch_shape if len(batch_shape) == 2 else (1, batch_shape[0])

    def check(name, t, per_sequence_ok, floating=True):
        return _per_token_tensor(name, t, batch_shape, device, source_name,
                                 per_sequence_ok=per_sequence_ok, floating=floating)

    if per_sequence is not None:
        check_bool("per_sequence", per_sequence)
    if advantages is None:
        raise ValueError("advantages is required (or pass rewards= and group_size=)")
    # Advantages computed from rewards= are one per sequence whatever the caller says.
    adv_per_sequence = True if computed_advantages is not None else per_sequence
    adv = check("advantages", per_token("advantages", advantages, segments, adv_per_sequence),
                True)
    check_per_sequence("advantages", adv, adv_per_sequence, segments)
    adv = adv[:, None].expand(shape2d) if adv.dim() == 1 else adv
    old = check("old_logp", old_logp, False)
    ref = check("ref_logp", ref_logp, False)
    if opts.beta > 0 and ref is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")
    sampling = check("sampling_logp", sampling_logp, False)
    rollout_is = None
    if rollout_is_weights is not None:
        if not isinstance(rollout_is_weights, torch.Tensor):
            raise ValueError("rollout_is_weights must be a torch.Tensor, got "
                             f"{type(rollout_is_weights).__name__}")
        if opts.objective == "vespo" and tuple(rollout_is_weights.shape) != batch_shape:
            # VESPO sums the log-weights of a sequence's tokens (TRL refuses sequence
            # modes with it): a per-sequence weight would be counted once per token.
            raise ValueError(f"rollout_is_weights must be per token {batch_shape} with "
                             "objective='vespo'")
        if (rollout_is_weights.dim() == 2 and len(batch_shape) == 2
                and tuple(rollout_is_weights.shape) == (batch_shape[0], 1)):
            rollout_is_weights = rollout_is_weights[:, 0]      # TRL's (B, 1) sequence ratios
        rollout_is = check("rollout_is_weights",
                           per_token("rollout_is_weights", rollout_is_weights, segments), True)
        if rollout_is.dim() == 1:
            rollout_is = rollout_is[:, None].expand(shape2d)
        if value_checks_enabled() and (bool((rollout_is < 0).any())
                                       or not bool(torch.isfinite(rollout_is).all())):
            raise ValueError("rollout_is_weights must be finite and >= 0")
    targets = target_ids.reshape(shape2d)
    valid = targets != ignore_index
    if mask is not None:
        m = check("mask", mask, False, floating=False)
        valid = valid & (m != 0 if m.dtype.is_floating_point else m.bool())
    check_finite_where_counted(valid, advantages=adv, old_logp=old, ref_logp=ref)
    teacher = torch.zeros(shape2d, dtype=torch.bool, device=device)
    if teacher_mask is not None:
        t = check("teacher_mask", per_token("teacher_mask", teacher_mask, segments,
                                            per_sequence), True, floating=False)
        check_per_sequence("teacher_mask", t, per_sequence, segments)
        t = t != 0 if t.dtype.is_floating_point else t.bool()
        teacher = t[:, None].expand(shape2d) if t.dim() == 1 else t

    def flat(x, to=dtype):
        return None if x is None else x.reshape(-1).to(to).contiguous()

    B, T = shape2d
    inputs = LossInputs(B=B, T=T, targets=targets.reshape(-1).contiguous(),
                        ignore_index=int(ignore_index), valid=flat(valid, torch.bool),
                        advantages=flat(adv), old_logp=flat(old), ref_logp=flat(ref),
                        teacher=flat(teacher, torch.bool), weights=None,
                        batch_shape=batch_shape, segments=segments, vocab_shard=vocab_shard,
                        computed_advantages=computed_advantages, replaced=replaced,
                        rollout_is=flat(rollout_is), sampling_logp=flat(sampling),
                        process_group=process_group)
    if weights:
        attach_weights(inputs, opts, process_group, dtype)
    return inputs


def attach_weights(inputs: LossInputs, opts: LossOptions, process_group: Any = None,
                   dtype: torch.dtype = torch.float32) -> None:
    """Set ``inputs.weights`` (``aggregation.aggregation_weights``). With ``"dapo"`` (or a
    ``process_group``) the token count is all-reduced: a collective, so it comes after
    every check and the ranks' handshake."""
    valid = inputs.valid if inputs.segments is not None else inputs.valid.view(inputs.B,
                                                                                inputs.T)
    weights = aggregation_weights(valid, opts, inputs.segments, process_group)
    inputs.weights = weights.reshape(-1).to(dtype).contiguous()


def add_teachers(inputs: LossInputs, hit: torch.Tensor) -> None:
    """Mark more teacher tokens: ``hit`` per sequence, ``[B]`` (``[S]`` with segments)."""
    if inputs.segments is not None:
        per_token_hit = inputs.segments.broadcast(hit)
    else:
        per_token_hit = hit[:, None].expand(inputs.B, inputs.T).reshape(-1)
    inputs.teacher = inputs.teacher | per_token_hit


__all__ = ["UNBOUNDED", "LossInputs", "loss_inputs", "attach_weights", "add_teachers",
           "check_logits_and_targets", "check_target_ids", "check_groups", "group_offsets_of",
           "packed_segments"]
