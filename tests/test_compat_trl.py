"""``hapo_kernels.compat.trl`` against TRL 1.16's helpers, restated here as TRL's eager path
computes them (trl/trainer/utils.py; tests/integrations/test_compat_trl.py holds them against
the real package): the same values and gradients, TRL's output dtype when asked."""
import pytest
import torch
import torch.nn.functional as F

from hapo_kernels.compat import trl as compat


def trl_selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    if temperature != 1.0:
        logits = logits / temperature
    squeeze = index.ndim == logits.ndim - 1
    if squeeze:
        index = index.unsqueeze(-1)
    out = torch.gather(logits.log_softmax(-1), -1, index)
    out = out.squeeze(-1) if squeeze else out
    return out if row_mask is None else out.masked_fill(row_mask == 0, 0.0)


def trl_entropy_from_logits(logits):
    logps = F.log_softmax(logits, dim=-1)
    return -(torch.exp(logps) * logps).sum(-1)


def grads_of(fn, logits, *args, **kwargs):
    x = logits.clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out.double() * g).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("shape", [(3, 5, 37), (7, 41), (29,)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_equals_trl(backend, shape, temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    index = torch.randint(0, shape[-1], shape[:-1], generator=g)
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    ours = grads_of(compat.selective_log_softmax, logits.float(), index, temperature, mask)
    want = grads_of(trl_selective_log_softmax, logits, index, temperature, mask)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0].double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1].double(), want[1], rtol=1e-4, atol=1e-5)


def test_selective_log_softmax_top_k_index_equals_trl(backend):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 33, generator=g, dtype=torch.float64)
    index = torch.randint(0, 33, (2, 4, 3), generator=g)
    ours = grads_of(compat.selective_log_softmax, logits.float(), index)
    want = grads_of(trl_selective_log_softmax, logits, index)
    torch.testing.assert_close(ours[0].double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1].double(), want[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 37), (11, 64)])
def test_entropy_from_logits_equals_trl(backend, shape):
    logits = torch.randn(shape, dtype=torch.float64) * 2
    ours = grads_of(compat.entropy_from_logits, logits.float(), chunk_size=4)
    want = grads_of(trl_entropy_from_logits, logits)
    torch.testing.assert_close(ours[0].double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1].double(), want[1], rtol=1e-4, atol=1e-5)


def test_selective_log_softmax_and_entropy(backend):
    logits = torch.randn(4, 6, 19)
    index = torch.randint(0, 19, (4, 6))
    mask = torch.rand(4, 6) > 0.5
    logp, ent = compat.selective_log_softmax_and_entropy(logits, index, False, 0.8, mask)
    torch.testing.assert_close(logp, trl_selective_log_softmax(logits, index, 0.8, mask))
    want = trl_entropy_from_logits(logits / 0.8).masked_fill(~mask, 0.0)
    torch.testing.assert_close(ent, want, rtol=1e-5, atol=1e-6)
    assert not ent.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_trl_output_dtype_convention(dtype):
    logits = torch.randn(2, 3, 17).to(dtype)
    index = torch.randint(0, 17, (2, 3))
    assert compat.selective_log_softmax(logits, index).dtype == torch.float32
    # TRL's eager path (CPU tensors) returns the logits' dtype; its CUDA kernel float32.
    assert compat.selective_log_softmax(logits, index, trl_dtype=True).dtype == dtype
    assert compat.entropy_from_logits(logits, trl_dtype=True).dtype == dtype
    assert compat.trl_output_dtype(logits) == dtype
    if torch.cuda.is_available():
        assert compat.trl_output_dtype(logits.cuda()) == torch.float32


def test_bad_shapes_are_named():
    logits = torch.randn(2, 3, 17)
    with pytest.raises(ValueError, match="index must have shape"):
        compat.selective_log_softmax(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="row_mask must have shape"):
        compat.selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long),
                                     row_mask=torch.ones(3))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        compat.entropy_from_logits(logits, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        compat.selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long), 0.0)
