"""Synthetic Success Injection (SSI): put a verified teacher demonstration into a group.

docs/design.md section 6. For each group the gate opened, one rollout gets the prompt's
teacher completion, the teacher's reward and a teacher flag. Which one: ``replace="worst"``
(HAPO: the lowest reward, first index on ties), ``"random"`` (a member drawn from a seeded
generator) or ``"fixed"`` (member ``slot``; LUFFY puts its demonstration in a fixed slot and
keeps every other rollout). The choice is delegated to ``hapo_kernels.group_advantages``
itself so the token batch and the advantages can never disagree about which member was
replaced. The teacher's reward is the constant ``teacher_reward``, or, with ``score=`` (a
reward function), the demonstration's own score: a verified teacher that is not optimal
gets the reward it earns.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import torch

import hapo_kernels as hk
from hapo_kernels.inputs import check_groups
from hapo_kernels.options import REPLACE, TEACHER_REWARD, choice

__all__ = ["RolloutBatch", "inject_successes", "lookup_demo", "swap_in_demonstrations"]

FIELDS = ("prompt_ids", "completion_ids", "completion_mask", "rewards", "prompt_index")


@dataclass
class RolloutBatch:
    """A padded batch of ``P * G`` rollouts, groups contiguous.

    ``prompt_ids`` ``[N, Lp]``, ``completion_ids`` ``[N, Lc]`` (right-padded),
    ``completion_mask`` ``[N, Lc]`` (1 on real tokens), ``rewards`` ``[N]``,
    ``prompt_index`` ``[N]`` (the prompt each rollout answers: the key into ``demos``),
    ``teacher_mask`` ``[N]`` bool (set by SSI).
    """
    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    rewards: torch.Tensor
    prompt_index: torch.Tensor
    teacher_mask: Optional[torch.Tensor] = None


def _get(batch, name):
    if isinstance(batch, dict):
        if name not in batch:
            raise ValueError(f"batch is missing {name!r} (needs {', '.join(FIELDS)})")
        return batch[name]
    if not hasattr(batch, name):
        raise ValueError(f"batch is missing {name!r} (needs {', '.join(FIELDS)})")
    return getattr(batch, name)


def lookup_demo(demos: Any, key: Any) -> Optional[torch.Tensor]:
    """The teacher completion for ``key`` (1-D long tensor) or None where there is none.

    ``demos`` is a mapping (missing key: none), a sequence indexed by ``key``
    (out of range or None: none) or a callable ``key -> completion or None``. An empty
    demonstration or a negative token id is a ``ValueError`` naming ``demos``.
    """
    if demos is None:
        return None
    if callable(demos) and not isinstance(demos, (dict, list, tuple)):
        demo = demos(key)
    elif hasattr(demos, "get"):
        demo = demos.get(key)
    else:
        demo = demos[key] if isinstance(key, int) and 0 <= key < len(demos) else None
    if demo is None:
        return None
    demo = torch.as_tensor(demo)
    if demo.dim() != 1 or demo.dtype.is_floating_point or demo.dtype == torch.bool:
        raise ValueError(f"demos: the demonstration for prompt {key!r} must be a 1-D integer "
                         f"sequence, got {demo.dtype} of shape {tuple(demo.shape)}")
    # An empty demonstration would be a "success" with no token to learn from; a negative
    # id is no token at all (the vocabulary's upper bound is checked by the loss).
    if demo.numel() == 0:
        raise ValueError(f"demos: the demonstration for prompt {key!r} is empty")
    if bool((demo < 0).any()):
        raise ValueError(f"demos: the demonstration for prompt {key!r} holds a negative "
                         f"token id ({int(demo.min())})")
    return demo


def swap_in_demonstrations(completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                           rows: Sequence[int], demos: Sequence[torch.Tensor],
                           teacher_mask: Optional[torch.Tensor] = None, *,
                           pad_token_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """The SSI operator on given rows: row ``rows[i]`` becomes demonstration ``demos[i]``
    (truncated to the completion width), its mask covers it, and it is marked teacher.

    Returns new ``(completion_ids, completion_mask, teacher_mask)``; the inputs are never
    written. ``inject_successes`` picks the rows (the worst rollout of each injected group);
    a trainer whose groups span processes picks this process's rows and calls this.
    """
    width = completion_ids.shape[1]
    completion, mask = completion_ids.clone(), completion_mask.clone()
    teacher = (torch.zeros(completion.shape[0], dtype=torch.bool, device=completion.device)
               if teacher_mask is None else teacher_mask.clone().bool())
    if len(rows) != len(demos):
        raise ValueError(f"rows and demos must have the same length, got {len(rows)} and "
                         f"{len(demos)}")
    for row, demo in zip(rows, demos):
        demo = demo.reshape(-1)[:width].to(completion.device, completion.dtype)
        completion[row].fill_(pad_token_id)
        completion[row, :demo.numel()] = demo
        mask[row].zero_()
        mask[row, :demo.numel()] = 1
        teacher[row] = True
    return completion, mask, teacher


def inject_successes(batch: Any, demos: Any, inject: torch.Tensor, group_size: int, *,
                     teacher_reward: float = TEACHER_REWARD, replace: str = "worst",
                     slot: int = 0, generator: Optional[torch.Generator] = None,
                     score: Optional[Callable] = None,
                     pad_token_id: int = 0) -> Tuple[Any, torch.Tensor]:
    """Replace one rollout per injected group by its prompt's teacher demonstration.

    Args:
        batch: a ``RolloutBatch``, another dataclass or a dict with the fields of
            ``RolloutBatch`` (``teacher_mask`` optional).
        demos: teacher completions looked up by the group's ``prompt_index`` (see
            ``lookup_demo``). A group without one is not injected.
        inject: bool ``[P]`` from the gate.
        teacher_reward: the demonstration's reward when ``score`` is None.
        replace: ``"worst"``, ``"random"`` (one member per group drawn from ``generator``,
            a CPU ``torch.Generator``; every group draws, injected or not, so the stream
            does not depend on the gate) or ``"fixed"`` (member ``slot``).
        score: a reward function ``(prompt_ids, completion_ids, completion_mask) ->
            rewards`` (the trainer's): each demonstration, as written into the batch, is
            scored by it and that score is its reward.
    Returns:
        ``(new_batch, replaced)``: a batch of the same type with new ``completion_ids``,
        ``completion_mask``, ``rewards`` and ``teacher_mask`` tensors (the input is never
        written), and the replaced member per group, ``[P]`` long, -1 where none.
        A demonstration longer than the batch's completion width is truncated to it,
        with a warning.
    """
    completion = _get(batch, "completion_ids")
    mask = _get(batch, "completion_mask")
    rewards = _get(batch, "rewards")
    prompt_index = _get(batch, "prompt_index")
    old_teacher = batch.get("teacher_mask") if isinstance(batch, dict) else \
        getattr(batch, "teacher_mask", None)
    P = check_groups(rewards, group_size, inject)
    choice("replace", replace, REPLACE)
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < group_size:
        raise ValueError(f"slot must be an int in [0, {group_size}), got {slot!r}")
    if replace == "random" and not isinstance(generator, torch.Generator):
        raise ValueError('replace="random" needs generator= (a seeded torch.Generator)')
    if score is not None and not callable(score):
        raise ValueError(f"score must be a reward function or None, got {score!r}")
    N, width = completion.shape if completion.dim() == 2 else (None, None)
    if completion.dim() != 2 or N != rewards.numel():
        raise ValueError(f"completion_ids must be [N={rewards.numel()}, L], got "
                         f"{tuple(completion.shape)}")
    if tuple(mask.shape) != tuple(completion.shape):
        raise ValueError(f"completion_mask must have shape {tuple(completion.shape)}, got "
                         f"{tuple(mask.shape)}")
    if tuple(prompt_index.shape) != (N,):
        raise ValueError(f"prompt_index must have shape ({N},), got {tuple(prompt_index.shape)}")

    keys = prompt_index.reshape(P, group_size)[:, 0].tolist()
    found = [lookup_demo(demos, k) if bool(inject[p]) else None for p, k in enumerate(keys)]
    effective = torch.tensor([d is not None for d in found], device=rewards.device)
    index = None
    if replace == "random":
        index = torch.randint(0, group_size, (P,), generator=generator).to(rewards.device)
    elif replace == "fixed":
        index = torch.full((P,), slot, dtype=torch.long, device=rewards.device)
    _, replaced = hk.group_advantages(rewards, group_size, effective, replace_index=index,
                                      replace=replace, teacher_reward=teacher_reward)

    rewards = rewards.clone()
    rows, row_demos = [], []
    for p in torch.nonzero(replaced >= 0).flatten().tolist():
        row = p * group_size + int(replaced[p])
        if found[p].numel() > width:
            warnings.warn(f"teacher demonstration for prompt {keys[p]!r} has "
                          f"{found[p].numel()} tokens; truncated to the batch's completion "
                          f"length {width}", stacklevel=2)
        rows.append(row)
        row_demos.append(found[p])
        rewards[row] = teacher_reward
    completion, mask, teacher = swap_in_demonstrations(completion, mask, rows, row_demos,
                                                       old_teacher, pad_token_id=pad_token_id)
    rows = (torch.nonzero(replaced >= 0).flatten() * group_size
            + replaced[replaced >= 0]).to(rewards.device)
    if score is not None and rows.numel():
        prompts = _get(batch, "prompt_ids")
        scored = torch.as_tensor(score(prompts[rows], completion[rows], mask[rows]),
                                 dtype=rewards.dtype, device=rewards.device).reshape(-1)
        if scored.numel() != rows.numel() or not bool(torch.isfinite(scored).all()):
            raise ValueError(f"score must return one finite reward per demonstration "
                             f"({rows.numel()}), got {scored.tolist()}")
        rewards[rows] = scored

    new = {"completion_ids": completion, "completion_mask": mask, "rewards": rewards,
           "teacher_mask": teacher}
    if isinstance(batch, dict):
        return {**batch, **new}, replaced
    if dataclasses.is_dataclass(batch):
        if not any(f.name == "teacher_mask" for f in dataclasses.fields(batch)):
            raise ValueError("a dataclass batch needs a teacher_mask field (use RolloutBatch)")
        return dataclasses.replace(batch, **new), replaced
    raise ValueError(f"batch must be a dict or a dataclass, got {type(batch).__name__}")
