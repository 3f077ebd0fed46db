"""``hapo_kernels.compat.trl`` against the real TRL (``make test-integrations``): swapping
``from trl.trainer.utils import ...`` for ``from hapo_kernels.compat.trl import ...`` gives
the same values, gradients and (with ``trl_dtype=True``) dtypes."""
import pytest
import torch
from trl.trainer import utils as trl_utils

from hapo_kernels.compat import trl as compat


def run(fn, logits, *args, **kwargs):
    x = logits.clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    (out * g).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_is_trl_s(dtype, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 257, generator=g) * 3).to(dtype)
    index = torch.randint(0, 257, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    ours = run(compat.selective_log_softmax, logits, index, temperature, mask, trl_dtype=True)
    theirs = run(trl_utils.selective_log_softmax, logits, index, temperature, mask)
    assert ours[0].dtype == theirs[0].dtype
    tol = dict(rtol=2e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    torch.testing.assert_close(ours[1], theirs[1], **tol)


def test_entropy_and_the_pair_are_trl_s():
    logits = torch.randn(4, 6, 97) * 2
    index = torch.randint(0, 97, (4, 6))
    ours, theirs = (run(f, logits, trl_dtype=True) if f is compat.entropy_from_logits
                    else run(f, logits) for f in (compat.entropy_from_logits,
                                                  trl_utils.entropy_from_logits))
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-6)
    mask = torch.rand(4, 6) > 0.5
    ours = compat.selective_log_softmax_and_entropy(logits, index, True, 0.9, mask)
    theirs = trl_utils.selective_log_softmax_and_entropy(logits, index, True, 0.9, mask)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
