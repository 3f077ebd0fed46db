"""The float64 reference checked against independent formulas and hand-computed values.

Every fast path is tested against ``hapo_kernels.reference``, so the reference itself is
held here to torch's own log_softmax, to numbers worked out by hand, and to the worked
check of docs/design.md section 6.
"""
import math

import pytest
import torch

from hapo_kernels import options
from hapo_kernels import reference as R


# ------------------------------------------------------------------ section 3
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_log_probs_match_torch(temperature, dtype):
    B, T, V = 3, 4, 17
    logits = (torch.randn(B, T, V) * 2).to(dtype)
    y = torch.randint(0, V, (B, T))
    y[1, 2] = -100
    logp, ent = R.log_probs(logits, y, temperature)
    assert logp.dtype == torch.float64 and ent.dtype == torch.float64
    logsm = torch.log_softmax(logits.double() / temperature, dim=-1)
    want = logsm.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want_ent = -(logsm.exp() * logsm).sum(-1)
    valid = y != -100
    torch.testing.assert_close(logp[valid], want[valid], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent[valid], want_ent[valid], rtol=1e-12, atol=1e-12)
    assert logp[1, 2] == 0 and ent[1, 2] == 0


def test_log_probs_by_hand():
    # p = [1/4, 3/4]
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], dtype=torch.float64)
    logp, ent = R.log_probs(logits, torch.tensor([1, 0]))
    assert logp[0].item() == pytest.approx(math.log(0.75), abs=1e-12)
    assert ent[0].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)),
                                          abs=1e-12)
    assert logp[1].item() == pytest.approx(-math.log(2.0), abs=1e-12)
    assert ent[1].item() == pytest.approx(math.log(2.0), abs=1e-12)
    # Temperature 2 on logits [0, 2 log 3] is the same distribution as row 0.
    logp_t, _ = R.log_probs(torch.tensor([[0.0, 2 * math.log(3.0)]], dtype=torch.float64),
                            torch.tensor([1]), 2.0)
    assert logp_t.item() == pytest.approx(math.log(0.75), abs=1e-12)


# ------------------------------------------------------------------ section 4
def test_hapo_loss_token_mean_value_and_gradient():
    """old_logp None: loss = -mean_valid(A) and d loss/d z = -A/N (onehot - p)."""
    B, T, V, temp = 2, 3, 5, 0.7
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    y[1, 2] = -100
    A = torch.tensor([0.5, -1.5], dtype=torch.float64)
    out = R.hapo_loss(logits, y, A, temperature=temp)
    valid = y != -100
    N = valid.sum()
    assert out.loss.item() == pytest.approx(-(3 * 0.5 + 2 * -1.5) / N.item())
    out.loss.backward()
    p = torch.softmax(logits.detach() / temp, -1)
    onehot = torch.nn.functional.one_hot(y.clamp(min=0), V).double()
    want = -(A[:, None, None] / N) * (onehot - p) / temp * valid[..., None]
    torch.testing.assert_close(logits.grad, want)
    assert out.per_token_logp[1, 2] == 0 and out.teacher_fraction == 0


# ------------------------------------------------------------------ section 5
L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
V_MASK = torch.tensor([[True, True, False], [True, False, False]])


@pytest.mark.parametrize("aggregation,kw,want", [
    ("token-mean", {}, 7 / 3),
    ("bnpo", {}, 7 / 3),
    ("dapo", {}, 7 / 3),                       # no process group: the local count
    ("token-mean", {"normalizer": 10.0}, 0.7),
    ("seq-mean-token-mean", {}, (3 / 2 + 4 / 1) / 2),
    ("grpo", {}, (3 / 2 + 4 / 1) / 2),
    ("seq-mean-token-sum", {}, (3 + 4) / 2),
    ("seq-mean-token-sum-norm", {}, 7 / (2 * 3)),
    ("dr_grpo", {}, 7 / (2 * 3)),
    ("seq-mean-token-sum-norm", {"max_len": 7}, 7 / (2 * 7)),
])
def test_aggregation_by_hand(aggregation, kw, want):
    assert R.aggregate(L, V_MASK, options.LossOptions(aggregation=aggregation, **kw)).item() == \
        pytest.approx(want)


def test_aggregation_of_an_empty_sequence():
    valid = torch.tensor([[True, True, False], [False, False, False]])
    grpo = options.LossOptions(aggregation="grpo")
    assert R.aggregate(L, valid, grpo).item() == pytest.approx(1.5 / 2)
    assert R.aggregate(L, valid & False, options.LossOptions()).item() == 0.0


# ------------------------------------------------------------------ section 6
def test_group_advantages_worked_check():
    """docs/design.md section 6: G = 8, no success, inject -> teacher +2.475, failures -0.354."""
    adv, replaced = R.group_advantages(torch.zeros(8), 8, inject=torch.tensor([True]))
    assert replaced.tolist() == [0]                      # ties: the lowest index
    assert adv[0].item() == pytest.approx(2.475, abs=1e-3)
    torch.testing.assert_close(adv[1:], torch.full((7,), -0.354, dtype=torch.float64),
                               atol=1e-3, rtol=0)
    # Exactly: mean 1/8, Bessel std sqrt(1/8).
    assert adv[0].item() == pytest.approx((7 / 8) / (math.sqrt(1 / 8) + 1e-4), rel=1e-12)


def test_group_advantages_by_hand():
    r = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    # No injection: group 0 = [0,1,0,1]: mean .5, std sqrt(1/3); group 1 = [1,1,0,1].
    adv, replaced = R.group_advantages(r, 4)
    s = math.sqrt(1 / 3)
    assert replaced.tolist() == [-1, -1]
    torch.testing.assert_close(adv[:4], torch.tensor([-.5, .5, -.5, .5], dtype=torch.float64)
                               / (s + 1e-4))
    # Inject group 1 only: its minimum (index 2) becomes the teacher with reward 1.
    adv, replaced = R.group_advantages(r, 4, inject=torch.tensor([False, True]))
    assert replaced.tolist() == [-1, 2]
    assert torch.all(adv[4:] == 0)                       # all ones now: no signal, no NaN
    # stats="on-policy": the teacher is left out of the statistics of its group.
    r2 = torch.tensor([0.0, 1.0, 0.0, 1.0])
    adv, replaced = R.group_advantages(r2, 4, inject=torch.tensor([True]), stats="on-policy")
    assert replaced.tolist() == [0]
    mean, std = 2 / 3, math.sqrt(1 / 3)                  # over [1, 0, 1]
    want = torch.tensor([1 - mean, 1 - mean, 0 - mean, 1 - mean], dtype=torch.float64)
    torch.testing.assert_close(adv, want / (std + 1e-4))
    # stats="on-policy" with every rollout failed: the on-policy std is 0 and counts as 1
    # (LUFFY), so the teacher gets 1 / (1 + eps) and each failure 0.
    adv, _ = R.group_advantages(torch.zeros(8), 8, inject=torch.tensor([True]),
                                stats="on-policy")
    torch.testing.assert_close(adv, torch.tensor([1 / (1 + 1e-4)] + [0.0] * 7,
                                                 dtype=torch.float64))
    # scale="none": r - mean (Dr. GRPO); scale="batch": one std over the batch.
    adv, _ = R.group_advantages(r, 4, scale="none")
    torch.testing.assert_close(adv, torch.tensor([-.5, .5, -.5, .5, .25, .25, -.75, .25],
                                                 dtype=torch.float64))
    adv, _ = R.group_advantages(r, 4, scale="batch", eps=0.0)
    torch.testing.assert_close(adv, (r.double() - torch.tensor([.5] * 4 + [.75] * 4,
                                                               dtype=torch.float64))
                               / r.double().std())
    # eps = 0 and a constant group: A = 0, not NaN.
    adv, _ = R.group_advantages(torch.ones(4), 2, eps=0.0)
    assert torch.all(adv == 0)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kw,name", [
    ({"aggregation": "mean"}, "aggregation"),
    ({"eps_low": 1.0}, "eps_low"),
    ({"eps_low": -0.1}, "eps_low"),
    ({"eps_high": -0.1}, "eps_high"),
    ({"dual_clip": 1.0}, "dual_clip"),
    ({"dual_clip": 0.5}, "dual_clip"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"beta": -1.0}, "beta"),
    ({"importance_sampling": "seq"}, "importance_sampling"),
    ({"teacher_objective": "luffy"}, "teacher_objective"),
    ({"teacher_gamma": 0.0}, "teacher_gamma"),
    ({"normalizer": 0.0}, "normalizer"),
    ({"max_len": 0}, "max_len"),
    ({"max_len": 2.5}, "max_len"),
])
def test_option_errors(kw, name):
    with pytest.raises(ValueError, match=name):
        options.LossOptions(**kw)


def test_beta_needs_ref_logp():
    logits = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="ref_logp"):
        R.hapo_loss(logits, y, torch.ones(2), beta=0.1)


def test_loss_tensor_errors():
    logits = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="advantages"):
        R.hapo_loss(logits, y, torch.ones(3))
    with pytest.raises(ValueError, match="old_logp"):
        R.hapo_loss(logits, y, torch.ones(2), old_logp=torch.zeros(2))
    with pytest.raises(ValueError, match="mask"):
        R.hapo_loss(logits, y, torch.ones(2), mask=torch.ones(2, 4))


@pytest.mark.parametrize("args,kw,name", [
    ((torch.zeros(8), 1), {}, "group_size"),
    ((torch.zeros(8), 3), {}, "group_size"),
    ((torch.zeros(8), 2.0), {}, "group_size"),
    ((torch.zeros(2, 4), 4), {}, "rewards"),
    ((torch.zeros(8), 4), {"inject": torch.tensor([True])}, "inject"),
    ((torch.zeros(8), 4), {"scale": "std"}, "scale"),
    ((torch.zeros(8), 4), {"stats": "teacher"}, "stats"),
])
def test_group_errors(args, kw, name):
    with pytest.raises(ValueError, match=name):
        R.group_advantages(*args, **kw)
