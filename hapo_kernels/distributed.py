"""The loss on ``torch.distributed``: vocab-parallel LM heads and data-parallel groups.

Everything here runs on the user's own process groups (gloo, NCCL, ...) through
``torch.distributed`` collectives; nothing else moves data between ranks.

**Vocab-parallel** (a tensor-parallel LM head): rank ``k`` of ``vocab_parallel_group``
holds columns ``start_k .. start_k + V_k - 1`` of the logits, slices contiguous and in
rank order (uneven sizes allowed); target ids are global. Each rank runs the ordinary
row-statistics kernel on its slice, giving per row its slice's ``logp_k`` (of a stand-in
target), ``entropy_k`` and ``lse_k``. Two all-reduces of ``[tokens]``-sized vectors combine
them exactly (the slices are a partition of the vocabulary, softmax mass ``q_k``):

    M      = max_k lse_k                          (all-reduce MAX, [N])
    e_k    = exp(lse_k - M),  S = sum_k e_k       lse = M + log S,  q_k = e_k / S
    entropy = sum_k q_k entropy_k - sum_k q_k log q_k      (the chain rule of entropy)
    logp   = (logp_k + lse_k - M) - log S         (k: the rank holding the target)

``S``, ``sum e_k entropy_k``, ``sum e_k (lse_k - M)`` and the target term travel in one
all-reduce SUM of a ``[4, N]`` tensor. Every number is relative to ``M``: no cancellation
of large ``lse`` values. After the reduction ``logp``, ``entropy``, ``lse`` and
``sum_z p z = lse - entropy`` are the unsharded values on every rank, so the loss and its
per-token derivatives ``dL/dlogp``, ``dL/dentropy`` are too, and each rank computes the
gradient of its own slice analytically with the ordinary gradient kernel
(``p = exp(z - lse)`` with the global ``lse``; the one-hot term only where it holds the
target). The collectives run inside the forward of the autograd Function and nothing runs
in the backward: a plain ``all_reduce`` inside autograd would back-propagate as the
identity and give wrong gradients (ms-swift PR #9947).

**Data-parallel**: ``hapo_kernels.group_advantages(..., process_group=)`` over groups whose
rollouts span ranks gathers the rewards here (``gather_rewards``), computes on the whole
batch on every rank and keeps this rank's slice; injection decisions are broadcast from the
group's first rank (``broadcast_decisions``) so that every rank uses the same ones.
``decide_injections`` runs a gate once per group on the gathered rewards, with the same
broadcast.

**Agreement first** (``handshake``): the first collective of every call on a group is one
all-gather of a small int64 vector per rank: a digest of the call, whether the rank's own
validation failed, a digest (or an exact checksum) of everything that must be equal on every
rank (options, shapes, dtypes; for a vocabulary split the targets and per-token inputs too),
and the sizes the call needs (slice widths, reward and token counts). Every rank then raises
the same ``ValueError`` together (a rank whose own input was bad raises its own), instead of
one rank raising while the others wait in a collective, or different shapes aborting inside
the collective library, or disagreeing ranks returning identical wrong results.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .backends import Backend, RowStats

__all__ = ["VocabShard", "vocab_shard", "VocabParallelOps", "combine_vocab_stats",
           "rank_offset", "gather_rewards", "gather_values", "broadcast_decisions",
           "decide_injections", "handshake", "checksum", "HANDSHAKE_WORDS"]

# Words per rank in the agreement all-gather: fixed, so that ranks in different calls still
# exchange equal-sized tensors (and learn that they are in different calls).
HANDSHAKE_WORDS = 32


def _digest(value: Any) -> int:
    """A signed 64-bit digest of ``repr(value)`` (equal on every rank for equal values)."""
    raw = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


def checksum(tensor: Optional[torch.Tensor]) -> torch.Tensor:
    """An exact int64 checksum of ``tensor``'s values (its bits, position-weighted), a 0-d
    tensor on its device: equal tensors give equal sums on every rank. One reduction."""
    if tensor is None:
        return torch.zeros((), dtype=torch.int64)
    x = tensor.detach().reshape(-1)
    if x.dtype.is_floating_point:
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
        x = x.contiguous().view(bits)
    x = x.to(torch.int64)
    weights = torch.arange(x.numel(), device=x.device) % 65521 + 1
    return (x * weights).sum()


def _handshake_device(group: Any) -> torch.device:
    """NCCL exchanges CUDA tensors (the current device); every other backend CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def handshake(group: Any, op: str, fields: Mapping[str, Any], *,
              error: Optional[BaseException] = None,
              counts: Sequence[Any] = ()) -> List[List[int]]:
    """The first collective of ``op`` on ``group``: agreement and sizes in one all-gather.

    ``fields``: what must be equal on every rank, each a plain value (compared by digest)
    or a 0-d integer tensor (compared exactly: ``checksum``). ``error``: this rank's own
    validation error, if any (raised here, after the exchange, so that no rank is left
    waiting). ``counts``: ints or 0-d integer tensors each rank contributes. Returns every
    rank's ``counts`` (rank order). Raises ``ValueError`` on every rank together when any
    rank's validation failed, the ranks are in different calls, or a field differs.
    """
    _require_initialized(f"{op}'s process group")
    names = list(fields)
    if 2 + len(names) + len(counts) > HANDSHAKE_WORDS:
        raise ValueError(f"{op}: too many fields for one handshake")
    device = _handshake_device(group)
    words = [torch.tensor([_digest((op, names)), int(error is not None)], dtype=torch.int64)]
    for value in [fields[name] for name in names]:
        words.append(value.detach().reshape(1).to("cpu", torch.int64)
                     if isinstance(value, torch.Tensor)
                     else torch.tensor([_digest(value)], dtype=torch.int64))
    for value in counts:
        words.append(value.detach().reshape(1).to("cpu", torch.int64)
                     if isinstance(value, torch.Tensor)
                     else torch.tensor([int(value)], dtype=torch.int64))
    mine = torch.zeros(HANDSHAKE_WORDS, dtype=torch.int64)
    used = torch.cat(words)
    mine[:used.numel()] = used
    mine = mine.to(device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    rows = torch.stack(parts).cpu().tolist()
    rank = dist.get_rank(group)
    other_calls = [k for k, row in enumerate(rows) if row[0] != rows[rank][0]]
    if other_calls:
        raise ValueError(f"{op}: rank(s) {other_calls} of the process group are in another "
                         f"call (every rank must make the same calls in the same order)")
    failed = [k for k, row in enumerate(rows) if row[1]]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{op}: rank(s) {failed} of the process group rejected their input "
                         f"(their own error says why); no rank ran a kernel or collective")
    for i, name in enumerate(names):
        values = [row[2 + i] for row in rows]
        differ = [k for k, v in enumerate(values) if v != values[0]]
        if differ:
            shown = fields[name]
            shown = "" if isinstance(shown, torch.Tensor) else f" (this rank: {shown!r})"
            raise ValueError(f"{op}: the ranks of the process group disagree on {name}: "
                             f"rank(s) {differ} differ from rank 0{shown}; every rank must "
                             f"pass the same")
    first = 2 + len(names)
    return [row[first:first + len(counts)] for row in rows]


def _require_initialized(what: str):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{what} needs torch.distributed to be initialised "
                         "(torch.distributed.init_process_group)")


def _first_rank(group) -> int:
    """The global rank of ``group``'s rank 0 (the source of broadcasts)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def _all_gather_sizes(n: int, device, group) -> list:
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def rank_offset(n: int, device: torch.device, group: Any = None) -> int:
    """Where this rank's ``n`` items start in the rank-ordered concatenation."""
    _require_initialized("process_group")
    return sum(_all_gather_sizes(n, device, group)[:dist.get_rank(group)])


# --------------------------------------------------------------------------- vocab-parallel
@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: columns ``start .. start + size - 1``."""
    group: object
    start: int
    size: int
    vocab_size: int         # the whole vocabulary (the range of the target ids)


def vocab_shard(group: Any, sizes: Sequence[int]) -> VocabShard:
    """Where this rank's slice sits, from every rank's slice width (rank order; the
    ``handshake`` of the call gathers them)."""
    rank = dist.get_rank(group)
    return VocabShard(group, sum(sizes[:rank]), sizes[rank], sum(sizes))


def combine_vocab_stats(logp_k: torch.Tensor, ent_k: torch.Tensor, lse_k: torch.Tensor,
                        held: torch.Tensor, valid: torch.Tensor, group: Any) -> RowStats:
    """Unsharded ``(logp, entropy, lse, sum_pz)`` from every rank's slice statistics.

    ``logp_k`` counts only where this rank ``held`` the target. Two all-reduces of
    ``[tokens]``-sized vectors (the formulas are in the module docstring). Rows that are
    not ``valid`` give 0, as the single-device kernels do.
    """
    M = lse_k.clone()
    dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
    shift = lse_k - M
    e = torch.exp(shift)
    sums = torch.stack([e, e * ent_k, e * shift, torch.where(held, logp_k + shift, 0.0)])
    dist.all_reduce(sums, group=group)
    S, e_ent, e_shift, target = sums.unbind(0)
    log_s = S.log()
    entropy = (e_ent - e_shift) / S + log_s
    lse = M + log_s
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    return (torch.where(valid, target - log_s, zero), torch.where(valid, entropy, zero),
            torch.where(valid, lse, zero), torch.where(valid, lse - entropy, zero))


class VocabParallelOps:
    """A backend's ``row_stats`` / ``grad_logits`` over a vocabulary slice, global results.

    The same two operations as ``backends.Backend`` (target ids global), so it slots into
    ``SelectiveLogSoftmaxFunction`` and ``twopass.two_pass_loss`` unchanged.
    """

    def __init__(self, base: Backend, shard: VocabShard) -> None:
        self.base, self.shard = base, shard

    def _local_targets(self, target_ids, ignore_index, absent):
        """Targets in slice coordinates; ``absent`` where another rank holds the target."""
        y = target_ids.reshape(-1)
        valid = y != ignore_index
        local = y - self.shard.start
        held = valid & (local >= 0) & (local < self.shard.size)
        other = torch.where(valid, torch.full_like(y, absent), y)   # keeps ignore_index
        return torch.where(held, local, other), held, valid

    def row_stats(self, logits: torch.Tensor, target_ids: torch.Tensor,
                  temperature: float = 1.0, ignore_index: int = -100, *,
                  out: Optional[RowStats] = None) -> RowStats:
        """Unsharded float32 ``(logp, entropy, lse, sum_pz)`` per row, into ``out`` if given."""
        # Column 0 stands in for a target held elsewhere: its logp_k is not used.
        y, held, valid = self._local_targets(target_ids, ignore_index, 0)
        logp_k, ent_k, lse_k, _ = self.base.row_stats(logits, y, temperature, ignore_index)
        stats = combine_vocab_stats(logp_k, ent_k, lse_k, held, valid, self.shard.group)
        if out is None:
            return stats
        for buf, value in zip(out, stats):
            buf.copy_(value)
        return out

    def grad_logits(self, logits: torch.Tensor, target_ids: torch.Tensor, lse: torch.Tensor,
                    sum_pz: torch.Tensor, g_logp: Optional[torch.Tensor],
                    g_ent: Optional[torch.Tensor], temperature: float = 1.0,
                    ignore_index: int = -100,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gradient of this rank's logits slice (its shape and dtype), into ``out``."""
        # A target id outside [0, V_k) adds no one-hot term (both backends).
        absent = self.shard.size if ignore_index != self.shard.size else self.shard.size + 1
        y, _, _ = self._local_targets(target_ids, ignore_index, absent)
        return self.base.grad_logits(logits, y, lse, sum_pz, g_logp, g_ent, temperature,
                                     ignore_index, out=out)


# --------------------------------------------------------------------------- data-parallel
def gather_rewards(rewards: torch.Tensor, group: Any = None,
                   sizes: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, int]:
    """Every rank's rewards concatenated in rank order, and where this rank's slice starts.

    Ranks may hold different numbers of rollouts. ``sizes``: every rank's count, from a
    ``handshake`` already made; without it one is made here (the rewards' dtype must agree).
    Then one all-gather of the rewards padded to the largest count.
    """
    if sizes is None:
        error = None
        if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
            error = ValueError("rewards must be a 1-D tensor (this rank's rollouts), got "
                               f"{getattr(rewards, 'shape', type(rewards).__name__)}")
        rows = handshake(group, "gather_rewards", {"rewards dtype": str(rewards.dtype)
                                                   if error is None else None},
                         error=error, counts=[0 if error else rewards.numel()])
        sizes = [row[0] for row in rows]
    return gather_values(rewards, group, sizes)


def gather_values(values: torch.Tensor, group: Any = None,
                  sizes: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, int]:
    """A 1-D tensor of every rank (lengths may differ) concatenated in rank order, and where
    this rank's part starts. ``sizes``: every rank's length when already known (else one
    all-gather of the lengths first)."""
    _require_initialized("process_group")
    if sizes is None:
        sizes = _all_gather_sizes(values.numel(), values.device, group)
    width = max(sizes)
    padded = torch.zeros(width, dtype=values.dtype, device=values.device)
    padded[:values.numel()] = values.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def broadcast_decisions(inject: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The group's first rank's bool decisions, on every rank (same shape on each)."""
    _require_initialized("process_group")
    if not isinstance(inject, torch.Tensor):
        raise ValueError(f"inject must be a bool tensor, got {type(inject).__name__}")
    as_bytes = inject.to(torch.uint8).contiguous()     # gloo has no bool collectives
    dist.broadcast(as_bytes, src=_first_rank(group), group=group)
    return as_bytes.bool()


def decide_injections(gate: Any, rewards: torch.Tensor, group_size: int,
                      process_group: Any = None, **decide_kwargs: Any) -> torch.Tensor:
    """A gate's decision per group, made once on the gathered rewards; every rank agrees.

    Every rank runs ``gate.decide`` on the whole batch (so a persistent gate's state stays
    the same everywhere), then the first rank's decisions are broadcast (a sampling gate
    with different seeds per rank would otherwise disagree). ``decide_kwargs``
    (``prompt_ids``, ``has_demo``, ``step``) describe the whole batch's groups.
    """
    all_rewards, _ = gather_rewards(rewards, process_group)
    inject = gate.decide(all_rewards, group_size, **decide_kwargs)
    return broadcast_decisions(inject, process_group).to(rewards.device)
