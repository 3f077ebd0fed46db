"""selective_log_softmax on CUDA: the compiled Triton kernels at realistic sizes.

Runs where a GPU is present (``bench/gpu_check.sh``); skipped otherwise. The reference runs
in float64 on the same device, on the same (rounded) logits.
"""
import pytest
import torch

import hapo_kernels as hk
from hapo_kernels import reference as R
from hapo_kernels.backends import force_backend
from hapo_kernels.triton import logprobs as triton_logprobs

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _logits(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEV) * scale).to(dtype)


def _targets(shape, V, seed=1, ignore_frac=0.1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    y = torch.randint(0, V, shape, generator=g, device=DEV)
    y[torch.rand(shape, generator=g, device=DEV) < ignore_frac] = -100
    return y


def _check(leaf, targets, temperature=1.0, view_fn=lambda x: x, tol=5e-5):
    """Values and both gradients of ``view_fn(leaf)`` against the float64 reference."""
    logits = view_fn(leaf)
    g_logp = torch.randn(targets.shape, device=DEV, dtype=torch.float64)
    g_ent = torch.randn(targets.shape, device=DEV, dtype=torch.float64)

    x = leaf.detach().clone().requires_grad_()
    logp, ent = hk.selective_log_softmax(view_fn(x), targets, temperature, return_entropy=True)
    (logp * g_logp.float() + ent * g_ent.float()).sum().backward()
    grad = view_fn(x.grad)
    del x

    x64 = logits.detach().double().requires_grad_()
    ref_logp, ref_ent = R.log_probs(x64, targets, temperature)
    (ref_logp * g_logp + ref_ent * g_ent).sum().backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=tol, atol=tol)
    assert grad.dtype == leaf.dtype
    torch.testing.assert_close(grad.double(), x64.grad, rtol=GRAD_RTOL[leaf.dtype],
                               atol=GRAD_ATOL[leaf.dtype])
    ignored = targets == -100
    assert torch.all(logp[ignored] == 0) and torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_4096_by_32000(dtype):
    _check(_logits((4096, 32000), dtype), _targets((4096,), 32000), 1.0)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_qwen_vocab(dtype, temperature):
    _check(_logits((2, 8, 151936), dtype), _targets((2, 8), 151936), temperature, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_strided_views(dtype):
    base = _logits((4, 513, 32003), dtype)
    _check(base, _targets((4, 512), 32003), 1.0, view_fn=lambda x: x[:, :-1])
    _check(base, _targets((4, 512), 32003, seed=2), 0.8, view_fn=lambda x: x[:, 1:])


def test_more_rows_than_a_2d_grid_allows():
    """A 1-D grid over rows: more than 65,535 rows in one launch."""
    _check(_logits((70001, 64), torch.bfloat16), _targets((70001,), 64), 1.3)


def test_int64_offsets():
    """More than 2^31 elements: row offsets must not wrap around in int32."""
    N, V = 16400, 131072                          # 2.15e9 elements, 4.3 GB in bf16
    logits = _logits((N, V), torch.bfloat16, scale=1.0)
    targets = _targets((N,), V, ignore_frac=0.0)
    logp, ent, lse, spz = triton_logprobs.row_stats(logits, targets, 1.0, -100)
    tail = slice(N - 4, N)                        # rows beyond the int32 range
    ref_logp, ref_ent = R.log_probs(logits[tail], targets[tail])
    torch.testing.assert_close(logp[tail].double(), ref_logp, rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(ent[tail].double(), ref_ent, rtol=5e-5, atol=5e-5)
    g = torch.ones(N, device=DEV)
    x64 = logits[tail].double().requires_grad_()
    R.log_probs(x64, targets[tail])[0].sum().backward()
    triton_logprobs.grad_logits(logits, targets, lse, spz, g, None, 1.0, -100, out=logits)
    torch.testing.assert_close(logits[tail].double(), x64.grad, rtol=1e-2, atol=1e-5)


def test_poisoned_outputs_are_fully_written():
    N, V = 1000, 50257
    logits = _logits((N, V), torch.bfloat16)
    targets = _targets((N,), V, ignore_frac=0.2)
    outs = tuple(torch.full((N,), float("nan"), device=DEV) for _ in range(4))
    triton_logprobs.row_stats(logits, targets, 1.0, -100, out=outs)
    assert all(torch.isfinite(t).all() for t in outs)
    grad = torch.full_like(logits, float("nan"))
    g = torch.randn(N, device=DEV)
    triton_logprobs.grad_logits(logits, targets, outs[2], outs[3], g, g, 1.0, -100, out=grad)
    assert torch.isfinite(grad).all()


def test_cuda_bad_input():
    logits = _logits((2, 3, 11), torch.float32)
    with pytest.raises(ValueError, match="target_ids"):
        hk.selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="target_ids"):
        hk.selective_log_softmax(logits, torch.full((2, 3), 11, device=DEV))
    with pytest.raises(ValueError, match="cpu backend"):
        with force_backend("cpu"):
            hk.selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long, device=DEV))
