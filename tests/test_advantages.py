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
