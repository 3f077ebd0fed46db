"""The fused loss and group advantages on CUDA: compiled Triton kernels at larger sizes.

Runs where a GPU is present (``bench/gpu_check.sh``); skipped otherwise. The reference runs
in float64 on the same device.
"""
import pytest
import torch

import hapo_kernels as hk
from hapo_kernels import reference as R

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"


def _inputs(B, T, V, dtype, seed=0, strided=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    full = (torch.randn(B, T + 1, V, generator=g, device=DEV) * 2).to(dtype)
    x = full[:, :-1] if strided else full[:, :-1].contiguous()
    y = torch.randint(0, V, (B, T), generator=g, device=DEV)
    mask = (torch.rand(B, T, generator=g, device=DEV) > 0.1).float()
    mask[-1] = 0
    logp, _ = R.log_probs(x.double(), y)
    old = (logp + 0.3 * torch.randn(B, T, generator=g, device=DEV, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, device=DEV, dtype=torch.float64)).float()
    teacher = torch.zeros(B, dtype=torch.bool, device=DEV)
    teacher[0] = True
    adv = torch.randn(B, generator=g, device=DEV)
    return full, x, y, adv, dict(mask=mask, old_logp=old, ref_logp=ref, teacher_mask=teacher)


def _check(x, y, adv, kw, grad, out, opts, dtype):
    xr = x.detach().double().requires_grad_()
    ref = R.hapo_loss(xr, y, adv, **kw, **opts)
    ref.loss.backward()
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-6)
    for name in ("logp", "entropy", "kl", "clip_low", "clip_high", "ratio"):
        assert float(getattr(out, name)) == pytest.approx(float(getattr(ref, name)), rel=1e-5,
                                                          abs=1e-6), name
    scale = xr.grad.abs().max().item()
    tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 1e-2)
    torch.testing.assert_close(grad.double(), xr.grad, atol=tol[0] * scale, rtol=tol[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(importance_sampling="sequence", beta=0.04, entropy_coef=0.01, aggregation="grpo"),
    dict(teacher_objective="sft", dual_clip=3.0, temperature=0.7, aggregation="dr_grpo"),
    dict(teacher_objective="ratio", beta=0.1, entropy_coef=0.02, aggregation="dapo"),
])
@pytest.mark.parametrize("strided", [False, True])
def test_loss_matches_reference(dtype, opts, strided):
    full, x, y, adv, kw = _inputs(4, 96, 32003, dtype, strided=strided)
    fg = full.clone().requires_grad_() if strided else None
    xg = fg[:, :-1] if strided else x.clone().requires_grad_()
    out = hk.fused_hapo_loss(xg, y, adv, **kw, **opts)
    out.loss.backward()
    grad = fg.grad[:, :-1] if strided else xg.grad
    _check(x, y, adv, kw, grad, out, opts, dtype)


def test_large_vocab_bf16_inplace():
    _, x, y, adv, kw = _inputs(2, 64, 151936, torch.bfloat16, seed=1)
    xg = x.clone().requires_grad_()
    out = hk.fused_hapo_loss(xg, y, adv, **kw, beta=0.04)
    out.loss.backward()
    h = x.clone().requires_grad_()
    h2 = h * 1.0
    out2 = hk.fused_hapo_loss(h2, y, adv, **kw, beta=0.04, inplace_grad=True)
    out2.loss.backward()
    torch.testing.assert_close(h.grad, xg.grad)
    _check(x, y, adv, kw, xg.grad, out, dict(beta=0.04), torch.bfloat16)


def test_more_rows_than_grid_limit():
    """70,000 rows: a 1-D grid over rows (no 65,535 limit), packed [N, V]."""
    N, V = 70_000, 64
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(N, V, generator=g, device=DEV)
    y = torch.randint(0, V, (N,), generator=g, device=DEV)
    adv = torch.randn(N, generator=g, device=DEV)
    xg = x.clone().requires_grad_()
    out = hk.fused_hapo_loss(xg, y, adv, entropy_coef=0.01)
    out.loss.backward()
    assert torch.isfinite(xg.grad).all()
    _check(x, y, adv, {}, xg.grad, out, dict(entropy_coef=0.01), torch.float32)


@pytest.mark.parametrize("k", [1, 2])
def test_persistent_grid_large_vocab_bf16(k):
    """Programs looping over rows (triton/rows.py): bit-identical to one program per row."""
    from hapo_kernels.triton.rows import persistent_rows
    _, x, y, adv, kw = _inputs(4, 200, 151936, torch.bfloat16, seed=3)
    xg = x.clone().requires_grad_()
    out = hk.fused_hapo_loss(xg, y, adv, **kw, beta=0.04, entropy_coef=0.01)
    out.loss.backward()
    xp = x.clone().requires_grad_()
    with persistent_rows(k):
        out_p = hk.fused_hapo_loss(xp, y, adv, **kw, beta=0.04, entropy_coef=0.01)
    out_p.loss.backward()
    assert torch.equal(xp.grad, xg.grad) and out_p.loss.item() == out.loss.item()
    _check(x, y, adv, kw, xp.grad, out_p, dict(beta=0.04, entropy_coef=0.01), torch.bfloat16)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("stats", ["all", "on-policy"])
@pytest.mark.parametrize("G", [8, 17])
def test_group_advantages(scale, stats, G):
    P = 4096
    g = torch.Generator(device=DEV).manual_seed(G)
    rewards = (torch.rand(P * G, generator=g, device=DEV) > 0.7).float()
    inject = torch.rand(P, generator=g, device=DEV) > 0.5
    adv, replaced = hk.group_advantages(rewards, G, inject=inject, scale=scale, stats=stats)
    ref, ref_replaced = R.group_advantages(rewards, G, inject=inject, scale=scale, stats=stats)
    assert torch.equal(replaced, ref_replaced)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)
