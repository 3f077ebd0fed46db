"""The SSI operator on a padded token batch."""
import dataclasses
import warnings

import pytest
import torch

import hapo_kernels as hk
from hapo import RolloutBatch, inject_successes
from hapo_kernels import reference

G, LP, LC = 4, 3, 5


def make_batch(P=3, rewards=None, as_dict=False):
    N = P * G
    completion = torch.randint(3, 20, (N, LC))
    mask = torch.ones(N, LC, dtype=torch.long)
    mask[1, 3:] = 0
    completion[1, 3:] = 0
    if rewards is None:
        rewards = torch.tensor([0.0, 1.0, 0.5, 0.0] * P)
    fields = dict(prompt_ids=torch.randint(3, 20, (N, LP)), completion_ids=completion,
                  completion_mask=mask, rewards=rewards,
                  prompt_index=torch.arange(P).repeat_interleave(G))
    return fields if as_dict else RolloutBatch(**fields)


def snapshot(batch):
    d = batch if isinstance(batch, dict) else dataclasses.asdict(batch)
    return {k: v.clone() for k, v in d.items() if isinstance(v, torch.Tensor)}


def test_replaces_the_lowest_reward_member_with_the_demo():
    batch = make_batch()
    before = snapshot(batch)
    demos = {0: torch.tensor([7, 8]), 2: torch.tensor([9, 10, 11, 12])}
    inject = torch.tensor([True, False, True])
    new, replaced = inject_successes(batch, demos, inject, G, teacher_reward=2.0,
                                     pad_token_id=0)
    # Rewards [0, 1, 0.5, 0]: the lowest is 0, first index on ties -> member 0.
    assert replaced.tolist() == [0, -1, 0]
    assert new.completion_ids[0].tolist() == [7, 8, 0, 0, 0]
    assert new.completion_mask[0].tolist() == [1, 1, 0, 0, 0]
    assert new.completion_ids[8].tolist() == [9, 10, 11, 12, 0]
    assert new.rewards[0].item() == 2.0 and new.rewards[8].item() == 2.0
    assert new.teacher_mask.tolist() == [i in (0, 8) for i in range(3 * G)]
    untouched = [i for i in range(3 * G) if i not in (0, 8)]
    assert torch.equal(new.completion_ids[untouched], before["completion_ids"][untouched])
    assert torch.equal(new.rewards[untouched], before["rewards"][untouched])
    assert isinstance(new, RolloutBatch)
    # The inputs are never written.
    for k, v in snapshot(batch).items():
        assert torch.equal(v, before[k]), k
    assert batch.teacher_mask is None


def test_selection_agrees_with_group_advantages():
    for _ in range(20):
        P = 6
        rewards = torch.randint(0, 3, (P * G,)).float() / 2     # many ties
        inject = torch.rand(P) < 0.7
        batch = make_batch(P, rewards)
        demos = [torch.tensor([5, 6])] * P
        new, replaced = inject_successes(batch, demos, inject, G)
        _, ref_replaced = reference.group_advantages(rewards, G, inject)
        _, hk_replaced = hk.group_advantages(rewards, G, inject=inject)
        assert torch.equal(replaced, ref_replaced)
        assert torch.equal(replaced, hk_replaced)
        rows = [p * G + int(k) for p, k in enumerate(replaced) if k >= 0]
        assert new.teacher_mask.nonzero().flatten().tolist() == rows


def test_missing_demo_means_no_injection():
    batch = make_batch()
    demos = {1: torch.tensor([4])}                  # only prompt 1 has one
    new, replaced = inject_successes(batch, demos, torch.ones(3, dtype=torch.bool), G)
    assert replaced.tolist() == [-1, 0, -1]
    assert new.teacher_mask.sum().item() == 1
    assert torch.equal(new.completion_ids[:4], batch.completion_ids[:4])
    # A sequence with a None entry and a callable work the same way.
    _, r2 = inject_successes(batch, [None, torch.tensor([4]), None],
                             torch.ones(3, dtype=torch.bool), G)
    _, r3 = inject_successes(batch, lambda k: torch.tensor([4]) if k == 1 else None,
                             torch.ones(3, dtype=torch.bool), G)
    assert r2.tolist() == r3.tolist() == [-1, 0, -1]


def test_long_demo_is_truncated_with_a_warning():
    batch = make_batch(P=1)
    with pytest.warns(UserWarning, match="truncated"):
        new, _ = inject_successes(batch, {0: torch.arange(3, 3 + LC + 3)}, torch.tensor([True]),
                                  G)
    assert new.completion_ids[0].tolist() == list(range(3, 3 + LC))
    assert new.completion_mask[0].tolist() == [1] * LC
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_successes(batch, {0: torch.arange(3, 3 + LC)}, torch.tensor([True]), G)


def test_dict_batch_keeps_extra_keys_and_is_not_mutated():
    batch = make_batch(as_dict=True)
    batch["extra"] = "kept"
    batch["teacher_mask"] = torch.tensor([False] * 11 + [True])
    before = snapshot(batch)
    new, replaced = inject_successes(batch, {0: [5, 6]}, torch.tensor([True, True, False]), G)
    assert isinstance(new, dict) and new["extra"] == "kept"
    assert new["teacher_mask"].tolist() == [True] + [False] * 10 + [True]   # OR-ed
    assert replaced.tolist() == [0, -1, -1]
    for k, v in before.items():
        assert torch.equal(batch[k], v), k


def test_no_injection_returns_equal_copy():
    batch = make_batch()
    new, replaced = inject_successes(batch, {0: [5]}, torch.zeros(3, dtype=torch.bool), G)
    assert (replaced == -1).all()
    assert torch.equal(new.completion_ids, batch.completion_ids)
    assert not new.teacher_mask.any()


@pytest.mark.parametrize("change,name", [
    (lambda b: b.pop("rewards"), "rewards"),
    (lambda b: b.update(completion_mask=torch.ones(12, 2)), "completion_mask"),
    (lambda b: b.update(prompt_index=torch.zeros(5, dtype=torch.long)), "prompt_index"),
    (lambda b: b.update(completion_ids=torch.zeros(11, LC, dtype=torch.long)),
     "completion_ids"),
])
def test_bad_batch_raises(change, name):
    batch = make_batch(as_dict=True)
    change(batch)
    with pytest.raises(ValueError, match=name):
        inject_successes(batch, {0: [5]}, torch.ones(3, dtype=torch.bool), G)


def test_bad_inject_and_demo_raise():
    batch = make_batch()
    with pytest.raises(ValueError, match="inject"):
        inject_successes(batch, {0: [5]}, torch.ones(2, dtype=torch.bool), G)
    with pytest.raises(ValueError, match="demonstration"):
        inject_successes(batch, {0: torch.tensor([[5]])}, torch.ones(3, dtype=torch.bool), G)
    with pytest.raises(ValueError, match="group_size"):
        inject_successes(batch, {0: [5]}, torch.ones(12, dtype=torch.bool), 1)


def test_fixed_slot_replaces_that_member_whatever_its_reward():
    """LUFFY's layout: the demonstration in slot 2 of every injected group, even where
    that member succeeded; every other rollout is kept."""
    batch = make_batch(rewards=torch.tensor([0.0, 1.0, 0.9, 0.0] * 3))
    demos = {p: torch.tensor([7, 8, 9]) for p in range(3)}
    inject = torch.tensor([True, False, True])
    new, replaced = inject_successes(batch, demos, inject, G, replace="fixed", slot=2,
                                     teacher_reward=0.5)
    assert replaced.tolist() == [2, -1, 2]
    assert new.teacher_mask.tolist() == [i in (2, 10) for i in range(3 * G)]
    assert new.rewards[[2, 10]].tolist() == [0.5, 0.5]
    assert new.completion_ids[10, :3].tolist() == [7, 8, 9]
    adv, adv_replaced = hk.group_advantages(batch.rewards, G, replaced >= 0,
                                            replace_index=replaced, replace="fixed",
                                            teacher_reward=0.5)
    assert torch.equal(adv_replaced, replaced)


def test_random_member_is_seeded_and_agrees_with_group_advantages():
    P = 40
    batch = make_batch(P=P, rewards=torch.rand(P * G))
    demos = {p: torch.tensor([7]) for p in range(P)}
    inject = torch.rand(P) > 0.3

    def draw(seed):
        return inject_successes(batch, demos, inject, G, replace="random",
                                generator=torch.Generator().manual_seed(seed))

    (new, replaced), (_, again) = draw(3), draw(3)
    assert torch.equal(replaced, again)                    # reproducible given the seed
    assert not torch.equal(replaced, draw(4)[1])
    hit = replaced[inject]
    assert set(hit.tolist()) == set(range(G))              # not only the worst member
    assert (replaced[~inject] == -1).all()
    rows = torch.nonzero(inject).flatten() * G + hit
    assert new.teacher_mask.nonzero().flatten().tolist() == rows.tolist()
    ref, ref_replaced = reference.group_advantages(batch.rewards, G, inject,
                                                   replace_index=replaced, replace="random")
    assert torch.equal(ref_replaced, replaced)


def test_score_gives_each_demonstration_its_own_reward():
    """With score=, the teacher's reward is the reward function's score of the
    demonstration as written into the batch (here: its length / 10)."""
    batch = make_batch()
    demos = {0: torch.tensor([7, 8]), 2: torch.tensor([9, 10, 11, 12, 13, 14])}
    seen = {}

    def score(prompt_ids, completion_ids, completion_mask):
        seen["shape"] = tuple(completion_ids.shape)
        seen["prompts"] = prompt_ids.clone()
        return completion_mask.sum(1).float() / 10

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # the long demo is truncated
        new, replaced = inject_successes(batch, demos, torch.tensor([True, True, True]), G,
                                         teacher_reward=1.0, score=score)
    assert replaced.tolist() == [0, -1, 0]                  # prompt 1 has no demo
    assert seen["shape"] == (2, LC)
    assert torch.equal(seen["prompts"], batch.prompt_ids[[0, 8]])
    torch.testing.assert_close(new.rewards[[0, 8]], torch.tensor([0.2, 0.5]))
    torch.testing.assert_close(new.rewards[1:8], batch.rewards[1:8])


@pytest.mark.parametrize("kwargs,name", [
    (dict(replace="best"), "replace"),
    (dict(replace="fixed", slot=G), "slot"),
    (dict(replace="fixed", slot=True), "slot"),
    (dict(replace="random"), "generator"),
    (dict(score=1.0), "score"),
    (dict(score=lambda p, c, m: torch.ones(5)), "score"),
    (dict(score=lambda p, c, m: torch.full((c.shape[0],), float("nan"))), "score"),
])
def test_bad_replacement_options_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        inject_successes(make_batch(), {0: torch.tensor([7])}, torch.tensor([True] * 3), G,
                         **kwargs)


@pytest.mark.parametrize("demo, what", [([], "empty"), ([5, -3, 7], "negative token id")])
def test_empty_or_negative_demo_names_demos(demo, what):
    batch = make_batch()
    with pytest.raises(ValueError, match=f"demos: .*prompt 1.*{what}"):
        inject_successes(batch, {1: torch.tensor(demo, dtype=torch.long)},
                         torch.ones(3, dtype=torch.bool), G)
