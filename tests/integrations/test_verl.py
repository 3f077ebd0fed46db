"""The verl integration against the real verl package (no mocks of verl).

Our ``"hapo"`` policy loss and advantage estimator, fetched back from verl's registries,
must equal verl's ``compute_policy_loss_vanilla`` (+ its ``agg_loss``) and
``compute_grpo_outcome_advantage`` for every aggregation mode, and differ only where SSI
injects; the ``logprobs_from_logits`` drop-in must equal verl's.
"""
import numpy as np
import pytest
import torch
import verl
import verl.utils.torch_functional as verl_F
from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig

import hapo.integrations.verl as hv
from hapo import HAPOConfig

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm"]
GLOBAL_INFO = {"dp_size": 2, "batch_num_tokens": 41, "global_batch_size": 11,
               "loss_scale_factor": 13}


def test_verl_version_is_the_tested_one():
    assert verl.__version__ == hv.TESTED_VERL


def test_registered_in_verls_registries():
    assert core_algos.get_policy_loss_fn("hapo") is hv.compute_policy_loss_hapo
    assert core_algos.get_adv_estimator_fn("hapo") is hv.compute_hapo_outcome_advantage


@pytest.fixture(autouse=True)
def _fresh_config():
    hv.configure(None)
    torch.manual_seed(0)
    yield
    hv.configure(None)


def actor_config(global_info=None, **clip):
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, **clip)
    config.global_batch_info.update(global_info or {})
    return config


def make_batch(bs=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 4, 0, 7, 1, 6])[:bs]           # row 2 fully masked
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    old = -torch.rand(bs, T, generator=g) * 3
    logp = (old + torch.randn(bs, T, generator=g)).clamp(max=-1e-3)  # ratios up to ~e^3
    old[0, :4], logp[0, :4] = -2.5, -1.3        # ratio e^1.2 > clip_ratio_c on a row with A < 0
    a = torch.randn(bs, generator=g)
    a[0] = -a[0].abs()
    adv = a[:, None].expand(bs, T) * mask
    weights = torch.rand(bs, T, generator=g) + 0.5
    return logp, old, adv, mask, weights


def run_loss(fn, logp, old, adv, mask, mode, config, weights=None, **extra):
    lp = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask,
                       loss_agg_mode=mode, config=config, rollout_is_weights=weights, **extra)
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("global_info", [None, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "rollout_is"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_equals_vanilla(mode, weighted, global_info):
    logp, old, adv, mask, weights = make_batch()
    config = actor_config(global_info, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5)
    w = weights if weighted else None
    ours = run_loss(core_algos.get_policy_loss_fn("hapo"), logp, old, adv, mask, mode, config, w)
    theirs = run_loss(core_algos.get_policy_loss_fn("vanilla"), logp, old, adv, mask, mode,
                      config, w)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-8)
    for key, value in theirs[2].items():
        assert ours[2][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert theirs[2]["actor/pg_clipfrac"] > 0 and theirs[2]["actor/pg_clipfrac_lower"] > 0


def test_policy_loss_default_clip_config():
    logp, old, adv, mask, _ = make_batch(seed=3)
    config = actor_config()
    for mode in AGG_MODES:
        ours = run_loss(hv.compute_policy_loss_hapo, logp, old, adv, mask, mode, config)
        theirs = run_loss(core_algos.compute_policy_loss_vanilla, logp, old, adv, mask, mode,
                          config)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_teacher_rows_differ_only_there(mode):
    """Teacher rows get the shaped objective -A p/(p + 0.1); every other row is vanilla's."""
    logp, old, adv, mask, _ = make_batch(seed=1)
    config = actor_config()
    teacher = torch.tensor([True, False, False, True, False, False])
    ours = run_loss(hv.compute_policy_loss_hapo, logp, old, adv, mask, mode, config,
                    teacher_mask=teacher)
    theirs = run_loss(core_algos.compute_policy_loss_vanilla, logp, old, adv, mask, mode, config)
    torch.testing.assert_close(ours[1][~teacher], theirs[1][~teacher], rtol=1e-6, atol=1e-8)
    # d/dlogp of -A p/(p+g) is -A g p/(p+g)^2, times the mode's per-token weight, which the
    # vanilla gradient reveals on an unclipped token: -A rho w (rho = exp(logp - old)).
    one = run_loss(core_algos.compute_policy_loss_vanilla, old, old, torch.ones_like(adv), mask,
                   mode, config)[1]                       # rho = 1, A = 1: grad = -w
    p = logp.exp()
    shaped = -adv * 0.1 * p / (p + 0.1) ** 2 * (-one)
    torch.testing.assert_close(ours[1][teacher], shaped[teacher], rtol=1e-5, atol=1e-8)
    assert not torch.allclose(ours[1][teacher], theirs[1][teacher])
    assert ours[2]["actor/hapo_teacher_fraction"] == pytest.approx(
        float(mask[teacher].sum() / mask.sum()))


def rewards_batch(P=5, G=8, seed=0, collapse=(1, 3)):
    """Binary outcome rewards, uids interleaved (not contiguous), groups in `collapse` all fail."""
    g = torch.Generator().manual_seed(seed)
    r = (torch.rand(P, G, generator=g) < 0.5).float()
    for p in collapse:
        r[p] = 0.0
    uids = np.array([f"uid-{p}" for p in range(P) for _ in range(G)], dtype=object)
    perm = torch.randperm(P * G, generator=g)
    T = 6
    mask = torch.ones(P * G, T)
    mask[:, 4:] = (torch.rand(P * G, 2, generator=g) < 0.5).float()
    scores = r.reshape(-1)[perm]
    token_rewards = torch.zeros(P * G, T)
    token_rewards[torch.arange(P * G), mask.sum(1).long() - 1] = scores
    return token_rewards, mask, uids[perm.numpy()], r


@pytest.mark.parametrize("norm", [True, False])
def test_estimator_equals_grpo_without_injection(norm):
    rewards, mask, uids, _ = rewards_batch()
    fn = core_algos.get_adv_estimator_fn("hapo")
    ours, ours_ret = fn(token_level_rewards=rewards, response_mask=mask, index=uids,
                        norm_adv_by_std_in_grpo=norm)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids,
                                                          norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_ret, ours)
    assert hv.last_injection()["teacher_rows"].numel() == 0


def test_estimator_reads_norm_from_algo_config():
    from verl.trainer.config import AlgoConfig
    rewards, mask, uids, _ = rewards_batch(seed=4)
    ours, _ = hv.compute_hapo_outcome_advantage(rewards, mask, uids,
                                                config=AlgoConfig(norm_adv_by_std_in_grpo=False))
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids,
                                                          norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_estimator_differs_only_where_ssi_injects():
    """The gate opens on the collapsed groups; SSI moves only their advantages."""
    P, G = 5, 8
    rewards, mask, uids, r = rewards_batch(P, G, collapse=(1, 3))
    succ = r.sum(1)
    hv.configure(HAPOConfig(inject="gate", gate_threshold=0.3))   # posterior mean < 0.3
    ours, _ = hv.compute_hapo_outcome_advantage(rewards, mask, uids)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids)
    last = hv.last_injection()
    expect = (1 + succ) / (2 + G) < 0.3
    assert expect[1] and expect[3]
    first_seen = [int(u.split("-")[1]) for u in dict.fromkeys(uids)]   # the estimator's order
    assert last["inject"].tolist() == expect[first_seen].tolist()
    group_of = torch.tensor([int(u.split("-")[1]) for u in uids])
    moved = expect[group_of]
    torch.testing.assert_close(ours[~moved], theirs[~moved], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[moved], theirs[moved])
    # docs/design.md section 6's worked check (G = 8, no success): teacher +2.475, failures -0.354.
    for p in (1, 3):
        rows = torch.nonzero(group_of == p).flatten()
        teacher_row = [i for i in last["teacher_rows"].tolist() if i in rows.tolist()]
        assert len(teacher_row) == 1 and teacher_row[0] == rows.min()   # first member on ties
        values = (ours[rows] * mask[rows]).sum(1) / mask[rows].sum(1)
        is_teacher = rows == teacher_row[0]
        torch.testing.assert_close(values[is_teacher], torch.tensor([2.4749]), atol=1e-3, rtol=0)
        torch.testing.assert_close(values[~is_teacher], torch.full((G - 1,), -0.35355),
                                   atol=1e-4, rtol=0)


def test_estimator_explicit_inject_and_bad_groups():
    rewards, mask, uids, _ = rewards_batch(P=3, G=4, collapse=())
    ours, _ = hv.compute_hapo_outcome_advantage(rewards, mask, uids, inject=[False, True, False])
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids)
    assert hv.last_injection()["inject"].tolist() == [False, True, False]
    injected_uid = list(dict.fromkeys(uids))[1]          # groups in first-appearance order
    same = torch.from_numpy(uids != injected_uid)
    torch.testing.assert_close(ours[same], theirs[same], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same number of responses"):
        hv.compute_hapo_outcome_advantage(rewards[:-1], mask[:-1], uids[:-1])


@pytest.mark.parametrize("shape", [(3, 5, 37), (11, 37)], ids=["BTV", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_logits_equals_verl(shape, dtype):
    logits = (torch.randn(shape) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = hv.logprobs_from_logits(a, labels)
    theirs = verl_F.logprobs_from_logits(b, labels)
    g = torch.randn(shape[:-1])
    (ours * g).sum().backward()
    (theirs.float() * g).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    assert ours.dtype == torch.float32 and ours.shape == labels.shape
    torch.testing.assert_close(ours, theirs.float(), **tol)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)


def test_patch_logprobs_from_logits():
    original = verl_F.logprobs_from_logits
    try:
        patched = hv.patch_logprobs_from_logits()
        assert "verl.utils.torch_functional" in patched
        assert verl_F.logprobs_from_logits is hv.logprobs_from_logits
    finally:
        verl_F.logprobs_from_logits = original
