"""HAPOLoss and HAPOConfig against the float64 reference."""
import pytest
import torch

from hapo import HAPOConfig, HAPOLoss
from hapo_kernels import reference


def inputs(B=5, T=7, V=11):
    logits = torch.randn(B, T, V, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.2).long()
    adv = torch.randn(B)
    old = (torch.randn(B, T) * 0.1 - 2.4)
    teacher = torch.tensor([True, False, False, True, False])
    return logits, targets, mask, adv, old, teacher


@pytest.mark.parametrize("overrides", [
    {}, dict(teacher_objective="sft", aggregation="grpo", eps_high=0.28),
    dict(importance_sampling="sequence", dual_clip=3.0, entropy_coef=0.01),
])
def test_matches_reference_value_and_gradient(overrides):
    logits, targets, mask, adv, old, teacher = inputs()
    module = HAPOLoss(HAPOConfig(), **overrides)
    out = module(logits, targets, adv, mask=mask, old_logp=old, teacher_mask=teacher)
    (g,) = torch.autograd.grad(out.loss, logits)
    ref = reference.hapo_loss(logits, targets, adv, mask=mask, old_logp=old,
                              teacher_mask=teacher, **{**HAPOConfig().loss.as_dict(),
                                                       **overrides})
    (g_ref,) = torch.autograd.grad(ref.loss, logits)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-6)
    assert out.teacher_fraction.item() == pytest.approx(ref.teacher_fraction.item(), abs=1e-6)


def test_kl_option_needs_and_uses_ref_logp():
    logits, targets, mask, adv, old, teacher = inputs()
    module = HAPOLoss(beta=0.05)
    ref_logp = old + 0.05
    out = module(logits, targets, adv, mask=mask, ref_logp=ref_logp)
    ref = reference.hapo_loss(logits, targets, adv, mask=mask, ref_logp=ref_logp,
                              **{**HAPOConfig().loss.as_dict(), "beta": 0.05})
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert out.kl is not None
    with pytest.raises(ValueError, match="ref_logp"):
        module(logits, targets, adv, mask=mask)


def test_paper_defaults():
    c = HAPOConfig()
    assert c.group_size == 8 and c.gate_threshold == 0.8 and c.gate_mode == "mean"
    assert c.loss.teacher_objective == "shaped" and c.loss.teacher_gamma == 0.1
    assert c.loss.eps_low == c.loss.eps_high == 0.2 and c.loss.beta == 0.0
    opts = HAPOLoss().options
    assert opts.teacher_objective == "shaped" and opts.beta == 0.0 and opts == c.loss
    gate = c.make_gate()
    assert gate.threshold == 0.8 and gate.mode == "mean" and gate.schedule is None


def test_config_builds_annealed_gate():
    c = HAPOConfig(gate_mode="thompson", gate_schedule="cosine", gate_gamma_min=0.5,
                   gate_schedule_steps=10, gate_seed=1)
    gate = c.make_gate()
    assert gate.mode == "thompson" and gate.gamma(0) == pytest.approx(0.8)
    assert gate.gamma(10) == pytest.approx(0.5)
    assert c.to_dict()["gate_schedule"] == "cosine"


@pytest.mark.parametrize("kwargs,name", [
    (dict(group_size=1), "group_size"), (dict(eps_low=1.5), "eps_low"),
    (dict(teacher_objective="kl"), "teacher_objective"), (dict(inject="sometimes"), "inject"),
    (dict(gate_mode="max"), "mode"), (dict(gate_schedule="step"), "gate_schedule"),
    (dict(scale="seq"), "scale"), (dict(aggregation="sum"), "aggregation"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(temperature=0.0), "temperature"),
])
def test_bad_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HAPOConfig.from_kwargs(**kwargs)


def test_config_from_flat_keywords():
    c = HAPOConfig.from_kwargs(group_size=4, beta=0.04, stats="on-policy")
    assert c.group_size == 4 and c.loss.beta == 0.04 and c.advantages.stats == "on-policy"
    with pytest.raises(TypeError, match="no_such"):
        HAPOConfig.from_kwargs(no_such=1)


def test_bad_module_option_raises():
    with pytest.raises(ValueError, match="eps_high"):
        HAPOLoss(eps_high=-1.0)
    with pytest.raises(TypeError):
        HAPOLoss(no_such_option=1.0)
