"""group_advantages (docs/design.md section 6) against the float64 reference, both paths."""
import itertools

import pytest
import torch

import hapo_kernels as hk
from hapo_kernels import reference as R

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _poison_free(adv, replaced, P, G):
    assert adv.dtype == torch.float32 and adv.shape == (P * G,)
    assert replaced.dtype == torch.int64 and replaced.shape == (P,)
    assert torch.isfinite(adv).all()


def test_worked_example(backend):
    """G = 8, binary rewards, 0 successes: teacher +2.475, each failure -0.354."""
    rewards = torch.zeros(8)
    adv, replaced = hk.group_advantages(rewards, 8, inject=torch.tensor([True]))
    assert replaced.tolist() == [0]                       # all tied: the first index
    assert adv[0].item() == pytest.approx(2.475, abs=1e-3)
    torch.testing.assert_close(adv[1:], torch.full((7,), -0.354), atol=1e-3, rtol=0)


def test_ties_pick_first_lowest(backend):
    rewards = torch.tensor([0.5, 0.2, 0.9, 0.2,   0.3, 0.3, 0.3, 0.3,   1.0, 0.7, 0.8, 0.7])
    inject = torch.tensor([True, True, True])
    adv, replaced = hk.group_advantages(rewards, 4, inject=inject)
    assert replaced.tolist() == [1, 0, 1]
    ref, ref_replaced = R.group_advantages(rewards, 4, inject=inject)
    assert torch.equal(replaced, ref_replaced)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale,stats", list(itertools.product(["group", "batch", "none"],
                                                               ["all", "on-policy"])))
@pytest.mark.parametrize("G", [2, 5, 8, 17])
def test_matches_reference(backend, scale, stats, G):
    P = 6
    g = torch.Generator().manual_seed(G)
    rewards = torch.randn(P * G, generator=g)
    rewards[:G] = 0.0                                      # a constant group
    rewards[G:2 * G] = (torch.rand(G, generator=g) > 0.5).float()   # binary with ties
    inject = torch.tensor([True, True, False, True, False, True])
    for inj, teacher_reward, eps in ((None, 1.0, 1e-4), (inject, 2.5, 1e-4), (inject, 1.0, 0.0)):
        adv, replaced = hk.group_advantages(rewards, G, inject=inj, teacher_reward=teacher_reward,
                                            scale=scale, stats=stats, eps=eps)
        _poison_free(adv, replaced, P, G)
        ref, ref_replaced = R.group_advantages(rewards, G, inject=inj,
                                               teacher_reward=teacher_reward, scale=scale,
                                               stats=stats, eps=eps)
        assert torch.equal(replaced, ref_replaced)
        torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("stats", ["all", "on-policy"])
def test_never_nan(backend, scale, stats):
    """Constant groups with eps = 0, G = 2 with on-policy stats (one counted member)."""
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 3.0, 3.0])
    for inject in (None, torch.tensor([True, False, True])):
        adv, _ = hk.group_advantages(rewards, 2, inject=inject, scale=scale, stats=stats,
                                     eps=0.0)
        assert torch.isfinite(adv).all()
    adv, _ = hk.group_advantages(torch.full((4,), 0.7), 2, scale=scale, eps=0.0)
    assert torch.equal(adv, torch.zeros(4))


@pytest.mark.parametrize("replace", ["random", "fixed"])
@pytest.mark.parametrize("scale,stats", list(itertools.product(["group", "batch", "none"],
                                                               ["all", "on-policy"])))
@pytest.mark.parametrize("G", [3, 8, 13])
def test_given_member_and_teacher_rewards(backend, replace, scale, stats, G):
    """replace="random"/"fixed": the member the caller chose is replaced (not the worst),
    with the per-group teacher reward; both paths equal the float64 reference."""
    P = 7
    g = torch.Generator().manual_seed(100 + G)
    rewards = torch.rand(P * G, generator=g)
    rewards[:G] = 0.0                                      # all tied
    inject = torch.rand(P, generator=g) > 0.3
    inject[0] = inject[1] = True
    index = torch.randint(0, G, (P,), generator=g)
    index[1] = G - 1
    index[~inject] = -1                                    # as SSI returns it
    teacher_r = torch.rand(P, generator=g) * 2 - 0.5
    for ti in (None, teacher_r):
        adv, replaced = hk.group_advantages(rewards, G, inject=inject, replace_index=index,
                                            teacher_rewards=ti, replace=replace, scale=scale,
                                            stats=stats)
        _poison_free(adv, replaced, P, G)
        assert torch.equal(replaced, torch.where(inject, index, -1))
        ref, ref_replaced = R.group_advantages(rewards, G, inject=inject, replace_index=index,
                                               teacher_rewards=ti, replace=replace,
                                               scale=scale, stats=stats)
        assert torch.equal(replaced, ref_replaced)
        torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stats", ["all", "on-policy"])
def test_given_member_uneven_groups(backend, stats):
    """group_offsets with replace="fixed"/"random": the member counted from each group's
    first; a member past a group's end is refused."""
    g = torch.Generator().manual_seed(5)
    offsets = torch.tensor([0, 3, 4, 9, 11])
    rewards = torch.rand(11, generator=g)
    inject = torch.tensor([True, False, True, True])
    index = torch.tensor([2, -1, 4, 1])
    teacher_r = torch.tensor([0.6, 0.0, 1.5, -0.2])
    adv, replaced = hk.group_advantages(rewards, group_offsets=offsets, inject=inject,
                                        replace_index=index, teacher_rewards=teacher_r,
                                        replace="random", stats=stats)
    assert replaced.tolist() == [2, -1, 4, 1]
    ref, _ = R.group_advantages(rewards, group_offsets=offsets, inject=inject,
                                replace_index=index, teacher_rewards=teacher_r,
                                replace="random", stats=stats)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="replace_index"):
        hk.group_advantages(rewards, group_offsets=offsets, inject=inject, replace="fixed",
                            replace_index=torch.tensor([3, -1, 0, 0]))


def test_given_member_by_hand(backend):
    """G = 4, rewards [0, 1, 0, 1], the teacher in slot 1 scored 0.6, scale "none": the
    substituted group is [0, 0.6, 0, 1], mean 0.4 (all) or 1/3 (on-policy)."""
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0])
    inject = torch.tensor([True])
    kw = dict(inject=inject, replace_index=torch.tensor([1]),
              teacher_rewards=torch.tensor([0.6]), replace="fixed", scale="none")
    adv, replaced = hk.group_advantages(rewards, 4, **kw)
    assert replaced.tolist() == [1]
    torch.testing.assert_close(adv, torch.tensor([-0.4, 0.2, -0.4, 0.6]))
    adv, _ = hk.group_advantages(rewards, 4, stats="on-policy", **kw)
    torch.testing.assert_close(adv, torch.tensor([-1, 0.8, -1, 2]) / 3)
    # "fixed" without an index: member 0 (LUFFY's layout), even where it is not the worst.
    adv, replaced = hk.group_advantages(torch.tensor([0.5, 0.0, 0.0, 0.0]), 4, inject=inject,
                                        replace="fixed", scale="none")
    assert replaced.tolist() == [0]
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))
    # "worst" with a teacher reward per group: the lowest member, the given reward.
    adv, replaced = hk.group_advantages(torch.tensor([0.5, 0.0, 0.2, 0.0]), 4, inject=inject,
                                        teacher_rewards=torch.tensor([0.3]), scale="none")
    assert replaced.tolist() == [1]
    torch.testing.assert_close(adv, torch.tensor([0.5, 0.3, 0.2, 0.0]) - 0.25)


@pytest.mark.parametrize("kwargs,name", [
    (dict(replace="worst", replace_index=torch.tensor([0, 1, 0])), "replace_index"),
    (dict(replace="random"), "replace_index"),
    (dict(replace="random", replace_index=torch.tensor([0, 2, 0])), "replace_index"),
    (dict(replace="random", replace_index=torch.tensor([0, -1, 0])), "replace_index"),
    (dict(replace="fixed", replace_index=torch.tensor([0.0, 1.0, 0.0])), "replace_index"),
    (dict(replace="fixed", replace_index=torch.tensor([0, 1])), "replace_index"),
    (dict(replace="middle"), "replace"),
    (dict(teacher_rewards=torch.tensor([1.0, float("nan"), 1.0])), "teacher_rewards"),
    (dict(teacher_rewards=torch.tensor([1, 1, 1])), "teacher_rewards"),
    (dict(teacher_rewards=torch.ones(2)), "teacher_rewards"),
])
def test_bad_replacement(backend, kwargs, name):
    with pytest.raises(ValueError, match=name):
        hk.group_advantages(torch.zeros(6), 2, inject=torch.tensor([True, True, False]),
                            **kwargs)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_on_policy_zero_std_counts_as_one(backend, scale):
    """LUFFY's rule: every rollout failed, the teacher is left out of the statistics, whose
    std is then 0; it counts as 1, so the teacher gets 1 / (1 + eps), not 1 / eps."""
    rewards = torch.cat([torch.zeros(8), torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])])
    inject = torch.tensor([True, False])
    adv, replaced = hk.group_advantages(rewards, 8, inject, stats="on-policy", scale=scale)
    ref, _ = R.group_advantages(rewards, 8, inject, stats="on-policy", scale=scale)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)
    assert replaced.tolist() == [0, -1]
    if scale == "group":
        assert adv[0].item() == pytest.approx(1 / (1 + 1e-4), rel=1e-6)
        assert torch.equal(adv[1:8], torch.zeros(7))
    assert adv.abs().max() < 3
    # The whole batch failed: the batch's on-policy std is 0 and counts as 1 too.
    adv, _ = hk.group_advantages(torch.zeros(16), 8, inject, stats="on-policy", scale=scale)
    assert adv[0].item() == pytest.approx(1 / (1 + 1e-4), rel=1e-6)
    assert torch.equal(adv[1:], torch.zeros(15))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_non_finite_reward_names_its_group(backend, bad, scale):
    """Never zeroed silently (a NaN made its group, or with scale="batch" the batch, all
    zeros; with inject= the CPU path replaced the NaN member, the kernel another one)."""
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    rewards[9] = bad
    for inject in (None, torch.tensor([True, False, True])):
        with pytest.raises(ValueError, match=r"rewards\[9\].*group 2"):
            hk.group_advantages(rewards, 4, inject, scale=scale)
    x, y = torch.randn(12, 3, 5), torch.randint(0, 5, (12, 3))
    with pytest.raises(ValueError, match="group 2"):
        hk.fused_hapo_loss(x, y, rewards=rewards, group_size=4)


def test_options_object_with_keyword_overrides(backend):
    """options= and keywords together: the keywords win, and ``updated`` changes a field
    while ``replace`` stays the SSI option (design section 6)."""
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0])
    opts = hk.AdvantageOptions(scale="group", replace="fixed")
    adv, replaced = hk.group_advantages(rewards, 4, inject=torch.tensor([True]), options=opts,
                                        scale="none")
    assert replaced.tolist() == [0]
    torch.testing.assert_close(adv, torch.tensor([1.0, 1.0, 0.0, 1.0]) - 0.75)
    assert opts.updated(scale="none") == hk.AdvantageOptions(scale="none", replace="fixed")
    assert opts.replace == "fixed"


def test_integer_rewards_and_empty_batch(backend):
    adv, replaced = hk.group_advantages(torch.tensor([0, 1, 1, 1]), 2)
    ref, _ = R.group_advantages(torch.tensor([0, 1, 1, 1]), 2)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-6, atol=1e-6)
    adv, replaced = hk.group_advantages(torch.zeros(0), 4)
    assert adv.shape == (0,) and replaced.shape == (0,)


@pytest.mark.parametrize("kwargs,name", [
    (dict(group_size=1), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(group_size=4), "does not divide"),
    (dict(group_size=2.0), "group_size"),
    (dict(rewards=torch.zeros(2, 3)), "rewards"),
    (dict(inject=torch.tensor([True])), "inject"),
    (dict(inject=torch.tensor([1, 0, 1])), "inject"),
    (dict(scale="std"), "scale"),
    (dict(stats="teacher"), "stats"),
    (dict(eps=-1.0), "eps"),
    (dict(teacher_reward=float("nan")), "teacher_reward"),
])
def test_bad_input(backend, kwargs, name):
    args = dict(rewards=torch.zeros(6), group_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        hk.group_advantages(**args)


# --------------------------------------------------------------------------- uneven groups
def uneven_offsets(sizes):
    return torch.tensor([0] + list(itertools.accumulate(sizes)), dtype=torch.int64)


@pytest.mark.parametrize("scale,stats", list(itertools.product(["group", "batch", "none"],
                                                               ["all", "on-policy"])))
def test_uneven_groups_match_reference(backend, scale, stats):
    """Groups of 1 to 19 members (singletons included) at odd sizes, with ties and SSI."""
    sizes = [3, 1, 7, 2, 19, 1, 5, 4]
    offsets = uneven_offsets(sizes)
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(int(offsets[-1]), generator=g)
    rewards[offsets[2]:offsets[3]] = (torch.rand(7, generator=g) > 0.5).float()   # ties
    rewards[offsets[6]:offsets[7]] = 0.25                                        # constant
    inject = torch.tensor([True, True, False, True, True, False, True, False])
    for inj, teacher_reward, eps in ((None, 1.0, 1e-4), (inject, 2.5, 1e-4), (inject, 1.0, 0.0)):
        adv, replaced = hk.group_advantages(rewards, group_offsets=offsets, inject=inj,
                                            teacher_reward=teacher_reward, scale=scale,
                                            stats=stats, eps=eps)
        ref, ref_replaced = R.group_advantages(rewards, group_offsets=offsets, inject=inj,
                                               teacher_reward=teacher_reward, scale=scale,
                                               stats=stats, eps=eps)
        assert adv.dtype == torch.float32 and adv.shape == rewards.shape
        assert torch.isfinite(adv).all()
        assert torch.equal(replaced, ref_replaced)
        torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)


def test_single_response_groups_follow_verl(backend):
    """verl's GRPO rule: a group of one has mean 0 and std 1, so A = r / (1 + eps)."""
    rewards = torch.tensor([1.0, 0.0, 2.0, 3.0, -0.5])
    adv, replaced = hk.group_advantages(rewards, group_offsets=torch.arange(6), eps=1e-6)
    torch.testing.assert_close(adv, rewards / (1 + 1e-6))
    assert replaced.tolist() == [-1] * 5
    adv, _ = hk.group_advantages(rewards, group_offsets=torch.arange(6), scale="none")
    torch.testing.assert_close(adv, rewards)
    # an injected singleton is the teacher alone: its reward over 1 + eps
    adv, replaced = hk.group_advantages(rewards[:1], group_offsets=torch.tensor([0, 1]),
                                        inject=torch.tensor([True]), teacher_reward=1.5)
    assert replaced.tolist() == [0] and adv.item() == pytest.approx(1.5 / (1 + 1e-4))


def test_offsets_equal_fixed_group_size(backend):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(5 * 6, generator=g)
    inject = torch.tensor([True, False, True, True, False])
    fixed = hk.group_advantages(rewards, 6, inject=inject)
    offs = hk.group_advantages(rewards, group_offsets=torch.arange(0, 31, 6), inject=inject)
    assert torch.equal(fixed[1], offs[1])
    torch.testing.assert_close(fixed[0], offs[0], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,name", [
    (dict(group_size=2), "exactly one of group_size"),
    (dict(group_offsets=None), "exactly one of group_size"),
    (dict(group_offsets=torch.tensor([0.0, 3.0, 6.0])), "group_offsets"),
    (dict(group_offsets=torch.tensor([[0, 3, 6]])), "group_offsets"),
    (dict(group_offsets=torch.tensor([1, 3, 6])), "group_offsets"),
    (dict(group_offsets=torch.tensor([0, 3, 5])), "group_offsets"),
    (dict(group_offsets=torch.tensor([0, 3, 3, 6])), "strictly increasing"),
    (dict(group_offsets=[0, 4, 2, 6]), "strictly increasing"),
    (dict(inject=torch.tensor([True])), "inject"),
])
def test_bad_offsets(backend, kwargs, name):
    args = dict(rewards=torch.zeros(6), group_offsets=torch.tensor([0, 2, 6]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        hk.group_advantages(**args)


# --------------------------------------------------------------------------- on CUDA
# The compiled kernels at realistic sizes, against float64 on the same device: run where a
# GPU is present (bench/gpu_check.sh), skipped elsewhere.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device")
CUDA = "cuda"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("stats", ["all", "on-policy"])
@pytest.mark.parametrize("G", [8, 17])
def test_cuda_group_advantages(scale, stats, G):
    P = 4096
    g = torch.Generator(device=CUDA).manual_seed(G)
    rewards = (torch.rand(P * G, generator=g, device=CUDA) > 0.7).float()
    inject = torch.rand(P, generator=g, device=CUDA) > 0.5
    adv, replaced = hk.group_advantages(rewards, G, inject=inject, scale=scale, stats=stats)
    ref, ref_replaced = R.group_advantages(rewards, G, inject=inject, scale=scale, stats=stats)
    assert torch.equal(replaced, ref_replaced)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_cuda_uneven_groups():
    g = torch.Generator(device=CUDA).manual_seed(5)
    sizes = torch.randint(1, 40, (3000,), generator=g, device=CUDA)
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    rewards = (torch.rand(int(offsets[-1]), generator=g, device=CUDA) > 0.6).float()
    inject = torch.rand(3000, generator=g, device=CUDA) > 0.5
    adv, replaced = hk.group_advantages(rewards, group_offsets=offsets, inject=inject)
    ref, ref_replaced = R.group_advantages(rewards, group_offsets=offsets, inject=inject)
    assert torch.equal(replaced, ref_replaced)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)
