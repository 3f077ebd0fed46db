"""The per-token objective table (hapo_kernels.objective) against values worked out by hand.

Each entry's torch formula is the one the CPU path and the float64 reference evaluate; the
Triton branches are held to it in test_loss.py.
"""
import math

import pytest
import torch

from hapo_kernels.objective import token_objective
from hapo_kernels.options import LossOptions


def objective(logp, A, *, entropy=None, valid=None, **kw):
    """token_objective on [1, T] float64 vectors built from Python lists."""
    logp = torch.tensor([logp], dtype=torch.float64)
    A = torch.tensor([A], dtype=torch.float64).expand_as(logp)
    ent = torch.zeros_like(logp) if entropy is None else torch.tensor([entropy],
                                                                      dtype=torch.float64)
    valid = torch.ones_like(logp, dtype=torch.bool) if valid is None else \
        torch.tensor([valid])
    tensors = {k: torch.tensor([kw.pop(k)], dtype=torch.float64)
               for k in ("old_logp", "ref_logp") if k in kw}
    teacher = torch.tensor([kw.pop("teacher")]) if "teacher" in kw else None
    return token_objective(logp, ent, A, valid, teacher=teacher, opts=LossOptions(**kw),
                           **tensors)._asdict()


def test_on_policy_without_old_logp_is_minus_advantage():
    out = objective([-1.0, -2.0, -0.5], [0.7, -1.3, 2.0])
    torch.testing.assert_close(out["loss"], torch.tensor([[-0.7, 1.3, -2.0]],
                                                         dtype=torch.float64))
    assert torch.all(out["ratio"] == 1)


def test_clipping_by_hand():
    # rho = e^0.5 = 1.6487 > 1.2 with A = 1: clipped, l = -1.2.
    # rho = e^-0.5 = 0.6065 < 0.8 with A = -1: clipped, l = 0.8.
    # rho = e^-0.5 with A = +1: not clipped (min picks rho*A), l = -0.6065.
    # rho = 2 with A = -1: l = -min(-2, -1.2) = 2.
    logp = [0.0, 0.0, 0.0, math.log(2.0)]
    old = [-0.5, 0.5, 0.5, 0.0]
    A = [1.0, -1.0, 1.0, -1.0]
    out = objective(logp, A, old_logp=old)
    want = [-1.2, 0.8, -math.exp(-0.5), 2.0]
    torch.testing.assert_close(out["loss"][0], torch.tensor(want, dtype=torch.float64))
    assert out["clip_high"][0].tolist() == [True, False, False, False]
    assert out["clip_low"][0].tolist() == [False, True, False, False]
    # Dual clip c = 1.5 caps the A < 0 loss at -c*A = 1.5; c = 3 leaves 2 alone.
    assert objective(logp, A, old_logp=old, dual_clip=1.5)["loss"][0, 3].item() == \
        pytest.approx(1.5)
    assert objective(logp, A, old_logp=old, dual_clip=3.0)["loss"][0, 3].item() == \
        pytest.approx(2.0)
    # Asymmetric clipping (DAPO's clip-higher).
    assert objective([0.0], [1.0], old_logp=[-0.5], eps_high=0.28)["loss"].item() == \
        pytest.approx(-1.28)


def test_clipped_tokens_have_no_gradient():
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    valid = torch.ones(1, 2, dtype=torch.bool)
    old = torch.tensor([[-0.5, 0.0]], dtype=torch.float64)   # rho = 1.65 (clipped), 1
    out = token_objective(logp, torch.zeros_like(logp), A, valid, old_logp=old,
                            opts=LossOptions())._asdict()
    out["loss"].sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1].item() == pytest.approx(-1.0)


def test_sequence_importance_sampling_by_hand():
    # r = [0.05, 0.15] on the valid tokens -> rho = exp(0.1) for both (inside the clip
    # range); the masked token's r = 5 does not count.
    out = objective([0.05, 0.15, 5.0], [0.5, 0.5, 0.5], old_logp=[0.0, 0.0, 0.0],
                    valid=[True, True, False], importance_sampling="sequence")
    rho = math.exp(0.1)
    torch.testing.assert_close(out["ratio"][0, :2], torch.full((2,), rho, dtype=torch.float64))
    torch.testing.assert_close(out["loss"][0], torch.tensor([-0.5 * rho, -0.5 * rho, 0.0],
                                                            dtype=torch.float64))
    # The gradient reaches every valid token: d(sum_t l_t)/d logp_s = n * (-A rho / n).
    logp = torch.tensor([[0.05, 0.15, 5.0]], dtype=torch.float64, requires_grad=True)
    out = token_objective(logp, torch.zeros_like(logp), torch.full((1, 3), 0.5).double(),
                            torch.tensor([[True, True, False]]),
                            old_logp=torch.zeros(1, 3, dtype=torch.float64),
                            opts=LossOptions(importance_sampling="sequence"))._asdict()
    out["loss"].sum().backward()
    torch.testing.assert_close(logp.grad[0], torch.tensor([-0.5 * rho, -0.5 * rho, 0.0],
                                                          dtype=torch.float64))


def test_teacher_objectives_by_hand():
    logp = [math.log(0.5), math.log(0.5)]
    A, old = [2.0, 2.0], [math.log(0.5) - 1.0, math.log(0.5) - 1.0]
    teacher = [True, False]
    shaped = objective(logp, A, old_logp=old, teacher=teacher)["loss"][0]
    assert shaped[0].item() == pytest.approx(-2.0 * 0.5 / 0.6)          # -A p / (p + 0.1)
    assert shaped[1].item() == pytest.approx(-2.0 * 1.2)                # on-policy, clipped
    gamma = objective(logp, A, teacher=teacher, teacher_gamma=0.5)["loss"][0, 0]
    assert gamma.item() == pytest.approx(-2.0 * 0.5 / 1.0)
    sft = objective(logp, A, teacher=teacher, teacher_objective="sft", sft_weight=0.3)
    assert sft["loss"][0, 0].item() == pytest.approx(0.3 * math.log(2.0))
    ratio = objective(logp, A, old_logp=old, teacher=teacher, teacher_objective="ratio")
    assert ratio["loss"][0, 0].item() == pytest.approx(-2.0 * 1.2)


def test_cispo_by_hand():
    """CISPO: l = -sg(min(rho, eps_high)) A logp; the capped ratio carries no gradient and
    there is no lower bound (TRL's ``cispo``)."""
    logp = torch.tensor([[math.log(0.5), math.log(0.5), math.log(0.2)]], dtype=torch.float64,
                        requires_grad=True)
    old = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.8)]], dtype=torch.float64)
    A = torch.tensor([[1.0, -2.0, 1.0]], dtype=torch.float64)       # rho = 2, 1, 0.25
    out = token_objective(logp, torch.zeros_like(logp), A, torch.ones(1, 3, dtype=torch.bool),
                          old_logp=old, opts=LossOptions(objective="cispo", eps_high=1.5))
    want = [-1.5 * math.log(0.5), 2.0 * math.log(0.5), -0.25 * math.log(0.2)]
    torch.testing.assert_close(out.loss[0], torch.tensor(want, dtype=torch.float64))
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad[0], torch.tensor([-1.5, 2.0, -0.25],
                                                          dtype=torch.float64))
    assert out.clip_high[0].tolist() == [True, False, False] and not out.clip_low.any()


def test_unclipped_by_hand():
    """"unclipped": l = -rho A with its full gradient -rho A at every ratio, where "clip"
    would have cut it (rho = 2 with A > 0, rho = 0.25 with A < 0); no clip flags."""
    logp = torch.tensor([[math.log(0.5), math.log(0.5), math.log(0.2)]], dtype=torch.float64,
                        requires_grad=True)
    old = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.8)]], dtype=torch.float64)
    A = torch.tensor([[1.0, -2.0, -1.0]], dtype=torch.float64)      # rho = 2, 1, 0.25
    out = token_objective(logp, torch.zeros_like(logp), A, torch.ones(1, 3, dtype=torch.bool),
                          old_logp=old, opts=LossOptions(objective="unclipped"))
    want = torch.tensor([-2.0, 2.0, 0.25], dtype=torch.float64)
    torch.testing.assert_close(out.loss[0], want)
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad[0], want)
    assert not out.clip_high.any() and not out.clip_low.any()
    clipped = token_objective(logp.detach(), torch.zeros_like(logp), A,
                              torch.ones(1, 3, dtype=torch.bool), old_logp=old,
                              opts=LossOptions())
    assert clipped.loss[0, 0].item() == pytest.approx(-1.2)      # the clip would cap it


def test_verl_cispo_by_hand():
    """verl's cispo: l = -sg(clip(rho, 1 - eps_low, 1 + eps_high)) A logp; both bounds, and
    the clip flags count a moved ratio whatever the sign of A."""
    logp = torch.tensor([[math.log(0.5), math.log(0.5), math.log(0.2)]], dtype=torch.float64,
                        requires_grad=True)
    old = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.8)]], dtype=torch.float64)
    A = torch.tensor([[-1.0, -2.0, 1.0]], dtype=torch.float64)      # rho = 2, 1, 0.25
    out = token_objective(logp, torch.zeros_like(logp), A, torch.ones(1, 3, dtype=torch.bool),
                          old_logp=old, opts=LossOptions(objective="verl_cispo", eps_low=0.2,
                                                         eps_high=0.28))
    want = [1.28 * math.log(0.5), 2.0 * math.log(0.5), -0.8 * math.log(0.2)]
    torch.testing.assert_close(out.loss[0], torch.tensor(want, dtype=torch.float64))
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad[0], torch.tensor([1.28, 2.0, -0.8],
                                                          dtype=torch.float64))
    assert out.clip_high[0].tolist() == [True, False, False]
    assert out.clip_low[0].tolist() == [False, False, True]


def test_kl_and_entropy_terms_by_hand():
    d = 0.4                                              # ref - logp
    out = objective([-1.0], [1.0], ref_logp=[-1.0 + d], beta=0.1, entropy=[0.9],
                    entropy_coef=0.01)
    k3 = math.exp(d) - d - 1.0
    assert out["kl"].item() == pytest.approx(k3)
    assert out["loss"].item() == pytest.approx(-1.0 + 0.1 * k3 - 0.01 * 0.9)
    # The KL metric is reported even with beta = 0, but does not enter the loss.
    out0 = objective([-1.0], [1.0], ref_logp=[-1.0 + d])
    assert out0["kl"].item() == pytest.approx(k3) and out0["loss"].item() == pytest.approx(-1.0)




def grad_of(logp_values, A_values, old_values, ref_values=None, **opts):
    """(loss, d loss / d logp) of token_objective on [1, T] float64 rows."""
    logp = torch.tensor([logp_values], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([A_values], dtype=torch.float64)
    old = torch.tensor([old_values], dtype=torch.float64)
    ref = None if ref_values is None else torch.tensor([ref_values], dtype=torch.float64)
    out = token_objective(logp, torch.zeros_like(logp), A, torch.ones_like(A, dtype=torch.bool),
                          old_logp=old, ref_logp=ref, opts=LossOptions(**opts))
    out.loss.sum().backward()
    return out, logp.grad[0]


def test_delta_below_the_clip_range_by_hand():
    # delta = 0.9 < 1 + eps_high = 1.2. rho = 1.1, A = -1: -min(0.9 * -1, 1.1 * -1) = 1.1 via
    # the clip branch, inside the clip range: gradient -A rho = 1.1 (TRL's autograd).
    # rho = 1.1, A = +1: -min(0.9, 1.1) = -0.9, the capped branch: no gradient.
    # rho = 0.5, A = +1: -min(0.5, 0.8) = -0.5, gradient -rho = -0.5.
    r = [math.log(1.1), math.log(1.1), math.log(0.5)]
    out, g = grad_of([0.0] * 3, [-1.0, 1.0, 1.0], [-x for x in r], delta=0.9)
    torch.testing.assert_close(out.loss[0], torch.tensor([1.1, -0.9, -0.5], dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([1.1, 0.0, -0.5], dtype=torch.float64))
    # The clip flags count on the capped ratio (TRL): min(1.1, 0.9) is inside the range.
    assert not out.clip_high.any() and not out.clip_low.any()
    # delta = 1.5 above the clip range is verl's dual clip at c = 1.5 for A < 0.
    out, _ = grad_of([0.0], [-1.0], [-math.log(2.0)], delta=1.5)
    assert out.loss.item() == pytest.approx(1.5)


def test_sapo_by_hand():
    # tau = 1 for A > 0, 1.05 otherwise: l = -(4 / tau) sigmoid(tau (rho - 1)) A.
    r = math.log(1.3)
    out, g = grad_of([0.0, 0.0], [2.0, -1.0], [-r, -r], objective="sapo")
    sig = [1 / (1 + math.exp(-0.3)), 1 / (1 + math.exp(-1.05 * 0.3))]
    want = [-4.0 * sig[0] * 2.0, 4.0 / 1.05 * sig[1]]
    torch.testing.assert_close(out.loss[0], torch.tensor(want, dtype=torch.float64))
    want_g = [-4.0 * sig[0] * (1 - sig[0]) * 1.3 * 2.0, 4.0 * sig[1] * (1 - sig[1]) * 1.3]
    torch.testing.assert_close(g, torch.tensor(want_g, dtype=torch.float64))
    # At rho = 1 the soft gate weighs -2 A (sigmoid(0) * 4), gradient -A (like PPO's).
    out, g = grad_of([0.0], [1.0], [0.0], objective="sapo", sapo_temperature_pos=7.0)
    assert out.loss.item() == pytest.approx(-4.0 / 7.0 * 0.5)
    assert g.item() == pytest.approx(-1.0)


def test_vespo_by_hand():
    # A sequence of two tokens, log-ratios 0.2 and 0.1: log w = 0.3; A >= 0: k = 2, lambda = 3.
    # phi = exp(3 + 2 * 0.3 - 3 e^0.3); l = -phi A logp, no gradient through phi.
    out, g = grad_of([-1.0, -2.0], [0.5, 0.5], [-1.2, -2.1], objective="vespo")
    phi = math.exp(3.0 + 2 * 0.3 - 3.0 * math.exp(0.3))
    torch.testing.assert_close(out.loss[0], torch.tensor([phi * 0.5, phi * 1.0],
                                                         dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([-phi * 0.5] * 2, dtype=torch.float64))
    # On-policy (w = 1): phi = exp(lambda + 0 - lambda) = 1 for either sign of A.
    out, g = grad_of([-1.0], [-2.0], [-1.0], objective="vespo")
    assert out.loss.item() == pytest.approx(-2.0) and g.item() == pytest.approx(2.0)


def test_bias_corrected_kl_by_hand():
    # rho = e^0.3, d = ref - logp = 0.4: KL = rho k3; d(rho k3)/dlogp = rho (logp - ref).
    rho, d = math.exp(0.3), 0.4
    out, g = grad_of([-1.0], [0.0], [-1.3], [-0.6], beta=1.0, kl_bias_correction=True)
    k3 = math.exp(d) - d - 1.0
    assert out.kl.item() == pytest.approx(rho * k3)
    assert out.loss.item() == pytest.approx(rho * k3)
    assert g.item() == pytest.approx(-rho * d)


def test_rollout_weights_multiply_the_policy_term_only():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    A = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    ref = torch.tensor([[-0.5, -2.5]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    valid = torch.ones(1, 2, dtype=torch.bool)
    opts = LossOptions(beta=0.1)
    plain = token_objective(logp, None, A, valid, ref_logp=ref, opts=opts)
    weighted = token_objective(logp, None, A, valid, ref_logp=ref, rollout_is=w, opts=opts)
    kl = 0.1 * plain.kl
    torch.testing.assert_close(weighted.loss, w * (plain.loss - kl) + kl)


def test_geo_mean_by_hand():
    """GMPO (verl's geo_mean): each token's log-ratio clipped on its advantage's side, the
    sequence ratio the exp of their mean, l = -A rho per token; flags on the token's own
    log-ratio outside [-eps_low, eps_high]; rollout weights as their geometric mean."""
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.5, 0.6, 0.5, -0.4]], dtype=torch.float64)     # d = -old
    A = torch.tensor([[1.0, 1.0, -1.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0, 0.5, 4.0]], dtype=torch.float64)
    opts = LossOptions(objective="geo_mean", importance_sampling="sequence", eps_low=0.2,
                       eps_high=0.3)
    out = token_objective(logp, torch.zeros_like(logp), A, torch.ones(1, 4, dtype=torch.bool),
                          old_logp=old, rollout_is=w, opts=opts)
    # d = 0.5, A > 0: capped at 0.3 (no gradient); d = -0.6, A > 0: kept; d = -0.5, A < 0:
    # raised to -0.2 (no gradient); A = 0: 0. Mean -0.125 over 4 tokens.
    rho = math.exp((0.3 - 0.6 - 0.2 + 0.0) / 4)
    weight = (1.0 * 2.0 * 0.5 * 4.0) ** 0.25
    torch.testing.assert_close(out.ratio[0], torch.full((4,), rho, dtype=torch.float64))
    torch.testing.assert_close(out.loss[0], torch.tensor([-rho, -rho, rho, 0.0],
                                                         dtype=torch.float64) * weight)
    out.loss.sum().backward()              # -sum(A) rho w: only token 1's log-ratio is live
    torch.testing.assert_close(logp.grad[0], torch.tensor([0.0, -rho * weight / 4, 0.0, 0.0],
                                                          dtype=torch.float64))
    assert out.clip_high[0].tolist() == [True, True, False, False]
    assert out.clip_low[0].tolist() == [False, False, True, False]


def test_geo_mean_masked_tokens_and_empty_rows():
    """Masked tokens neither enter a row's mean nor its weight; a fully masked row has ratio
    1 and loss 0."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    old = logp - torch.tensor([[0.1, 0.05, 9.0], [0.1, 0.1, 0.1]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False], [False, False, False]])
    A = torch.ones(2, 3, dtype=torch.float64)
    w = torch.tensor([[2.0, 8.0, 1e-30], [3.0, 3.0, 3.0]], dtype=torch.float64)
    out = token_objective(logp, None, A, valid, old_logp=old, rollout_is=w,
                          opts=LossOptions(objective="geo_mean", importance_sampling="sequence"))
    rho = math.exp(0.075)
    torch.testing.assert_close(out.loss[0], torch.tensor([-4 * rho, -4 * rho, 0.0],
                                                         dtype=torch.float64))
    assert out.ratio[1].tolist() == [1.0, 1.0, 1.0] and out.loss[1].abs().sum() == 0
