"""Option parsing: TRL's, Liger's and verl's names for our options and tensor arguments give
the same loss as ours; a name whose meaning differs is a TypeError naming what to pass."""
import pytest
import torch

import hapo_kernels as hk
from hapo import HAPOConfig
from hapo_kernels.options import (
    ARGUMENT_ALIASES,
    NOT_THE_SAME,
    OPTION_ALIASES,
    LossOptions,
    canonical_options,
    split_options,
)

B, T, V = 3, 5, 37


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.1 - 3.0
    ref = torch.randn(B, T, generator=g) * 0.1 - 3.0
    mask = torch.rand(B, T, generator=g) > 0.3
    return logits, targets, adv, old, ref, mask


def loss_and_grad(logits, *args, **kwargs):
    x = logits.clone().requires_grad_(True)
    out = hk.fused_hapo_loss(x, *args, **kwargs)
    out.loss.backward()
    return out.loss.detach(), x.grad


@pytest.mark.parametrize("theirs, ours", [
    (dict(epsilon_low=0.1, epsilon_high=0.3), dict(eps_low=0.1, eps_high=0.3)),
    (dict(clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=2.5),
     dict(eps_low=0.1, eps_high=0.3, dual_clip=2.5)),
    (dict(importance_sampling_level="sequence"), dict(importance_sampling="sequence")),
    (dict(loss_agg_mode="seq-mean-token-sum"), dict(aggregation="seq-mean-token-sum")),
    (dict(loss_type="dr_grpo", max_completion_length=9),
     dict(aggregation="dr_grpo", max_len=9)),
    (dict(loss_type="cispo", epsilon_high=1.5),
     dict(objective="cispo", aggregation="dapo", eps_high=1.5)),
    (dict(entropy_coeff=0.01), dict(entropy_coef=0.01)),
    (dict(loss_type="sapo", sapo_temperature_neg=1.3),
     dict(objective="sapo", aggregation="grpo", sapo_temperature_neg=1.3)),
    (dict(loss_type="vespo"), dict(objective="vespo", aggregation="dapo")),
    (dict(loss_type="luspo", importance_sampling_level="sequence"),
     dict(aggregation="luspo", importance_sampling="sequence")),
    (dict(use_bias_correction_kl=True), dict(kl_bias_correction=True)),
])
def test_their_option_names_give_our_loss(theirs, ours):
    logits, targets, adv, old, ref, mask = batch()
    got = loss_and_grad(logits, targets, adv, mask, old, **theirs)
    want = loss_and_grad(logits, targets, adv, mask, old, **ours)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert LossOptions.from_kwargs(**canonical_options(theirs)) == LossOptions(**ours)


def test_their_rollout_weight_names_give_our_loss():
    logits, targets, adv, old, ref, mask = batch(3)
    w = torch.rand(B, T) + 0.5
    want = loss_and_grad(logits, targets, adv, mask, old, rollout_is_weights=w,
                         sampling_logp=old - 0.1, off_policy_mask_threshold=0.05)
    for names in (("importance_sampling_ratio", "sampling_per_token_logps"),
                  ("vllm_is_ratio", "sampling_logp")):
        got = loss_and_grad(logits, targets, adv, mask, old, off_policy_mask_threshold=0.05,
                            **{names[0]: w, names[1]: old - 0.1})
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    plain = loss_and_grad(logits, targets, adv, mask, old)
    assert not torch.equal(plain[0], want[0])


@pytest.mark.parametrize("mask_name", ["completion_mask", "attention_mask", "response_mask"])
@pytest.mark.parametrize("logp_names", [("old_per_token_logps", "ref_per_token_logps"),
                                        ("old_log_prob", "ref_log_prob")])
def test_their_tensor_names_give_our_loss(mask_name, logp_names):
    logits, targets, adv, old, ref, mask = batch(1)
    got = loss_and_grad(logits, targets, adv, beta=0.04,
                        **{mask_name: mask, logp_names[0]: old, logp_names[1]: ref})
    want = loss_and_grad(logits, targets, adv, mask, old, ref, beta=0.04)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # The masked-out tokens really are left out (the alias is not dropped).
    unmasked = loss_and_grad(logits, targets, adv, None, old, ref, beta=0.04)
    assert not torch.equal(got[0], unmasked[0])


def test_fused_linear_and_modules_take_the_same_names():
    logits, targets, adv, old, ref, mask = batch(2)
    hidden, weight = torch.randn(B, T, 8), torch.randn(V, 8)
    a = hk.fused_linear_hapo_loss(hidden, weight, targets, adv, completion_mask=mask,
                                  old_per_token_logps=old, epsilon_high=0.28, loss_type="bnpo")
    b = hk.fused_linear_hapo_loss(hidden, weight, targets, adv, mask=mask, old_logp=old,
                                  eps_high=0.28, aggregation="bnpo")
    assert torch.equal(a.loss, b.loss)
    module = hk.FusedHAPOLoss(epsilon_low=0.1, loss_agg_mode="seq-mean-token-mean")
    assert module.options == LossOptions(eps_low=0.1, aggregation="seq-mean-token-mean")
    out = module(logits, targets, adv, attention_mask=mask)
    assert torch.equal(out.loss, hk.fused_hapo_loss(logits, targets, adv, mask, eps_low=0.1,
                                                    aggregation="grpo").loss)
    assert HAPOConfig.from_kwargs(clip_ratio_high=0.28).loss.eps_high == 0.28


@pytest.mark.parametrize("name", sorted(NOT_THE_SAME))
def test_a_name_that_means_something_else_names_ours(name):
    logits, targets, adv, *_ = batch()
    with pytest.raises(TypeError, match=rf"'{name}' is not an option.*pass \w+="):
        hk.fused_hapo_loss(logits, targets, adv, **{name: 1.0})


def test_one_option_under_two_names_is_an_error():
    with pytest.raises(TypeError, match="'eps_low' given twice: as 'eps_low' and as "
                                        "'epsilon_low'"):
        split_options(dict(eps_low=0.1, epsilon_low=0.2))
    with pytest.raises(TypeError, match="'aggregation' given twice"):
        split_options(dict(loss_type="dapo", loss_agg_mode="token-mean"))
    logits, targets, adv, old, ref, mask = batch()
    with pytest.raises(TypeError, match="'mask' given twice: as 'mask' and as "
                                        "'completion_mask'"):
        hk.fused_hapo_loss(logits, targets, adv, mask, completion_mask=mask)


def test_unknown_loss_type_and_unknown_names():
    with pytest.raises(ValueError, match="loss_type='ppo' is not one of"):
        split_options(dict(loss_type="ppo"))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['clip_eps'\]"):
        split_options(dict(clip_eps=0.2, scale="group"))


def test_liger_positional_order_gets_a_hint():
    logits, targets, adv, old, ref, mask = batch()
    with pytest.raises(ValueError, match="target_ids must be an integer tensor.*Liger's order"):
        hk.fused_hapo_loss(logits, old, ref, targets, adv)


def test_alias_tables_name_real_options():
    names = set(LossOptions.names())
    assert set(OPTION_ALIASES.values()) <= names
    assert set(ARGUMENT_ALIASES.values()) == {"mask", "old_logp", "ref_logp",
                                              "rollout_is_weights", "sampling_logp"}
    assert not set(OPTION_ALIASES) & names and not set(NOT_THE_SAME) & names
