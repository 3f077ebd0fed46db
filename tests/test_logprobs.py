"""selective_log_softmax against the float64 reference, on both backends.

docs/design.md sections 3, 8 and 9.

Every check runs on the chunked CPU path and on the Triton kernels (under the interpreter,
or on a GPU) through the ``backend`` fixture. Low-precision inputs are compared with the
reference evaluated on the same rounded values, so tolerances stay tight.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hapo_kernels as hk
from hapo_kernels import reference as R
from hapo_kernels.backends import get_backend
from hapo_kernels.cpu import logprobs as cpu_logprobs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Gradients come back in the logits dtype: allow about one rounding of that dtype.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_ATOL = {torch.float32: 2e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def make_logits(shape, dtype, scale=3.0):
    return (torch.randn(shape) * scale).to(dtype)


def make_targets(shape, V, ignore_frac=0.0, ignore_index=-100):
    y = torch.randint(0, V, shape)
    if ignore_frac:
        y[torch.rand(shape) < ignore_frac] = ignore_index
    return y


def reference_and_grads(logits, targets, temperature, ignore_index, g_logp, g_ent):
    """float64 reference values and d(sum g_logp*logp + g_ent*ent)/d logits."""
    x64 = logits.detach().double().requires_grad_()
    logp, ent = R.log_probs(x64, targets, temperature, ignore_index)
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), x64.grad


def run_op(leaf, view_fn, targets, temperature, ignore_index, g_logp, g_ent):
    """Our op on ``view_fn(leaf)``; returns values and the gradient of the leaf."""
    leaf = leaf.detach().clone().requires_grad_()
    logp, ent = hk.selective_log_softmax(view_fn(leaf), targets, temperature, ignore_index,
                                         return_entropy=True)
    (logp * g_logp.float() + ent * g_ent.float()).sum().backward()
    return logp.detach(), ent.detach(), leaf.grad


def check(leaf, targets, temperature=1.0, ignore_index=-100, view_fn=lambda x: x,
          tol_scale=1.0):
    """Forward and both gradients of ``view_fn(leaf)`` against the reference.

    ``tol_scale`` widens the tolerances for large ``|z|``, where fp32 rounding of ``z`` and
    ``p = exp(z - lse)`` grows with the magnitude.
    """
    logp_tol = 2e-5 * tol_scale
    logits = view_fn(leaf)
    g_logp = torch.randn(targets.shape, dtype=torch.float64)
    g_ent = torch.randn(targets.shape, dtype=torch.float64)
    ref_logp, ref_ent, ref_grad = reference_and_grads(logits, targets, temperature,
                                                      ignore_index, g_logp, g_ent)
    logp, ent, leaf_grad = run_op(leaf, view_fn, targets, temperature, ignore_index,
                                  g_logp, g_ent)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert logp.shape == targets.shape and ent.shape == targets.shape
    torch.testing.assert_close(logp.double(), ref_logp, rtol=logp_tol, atol=logp_tol)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=logp_tol, atol=logp_tol)
    assert leaf_grad.dtype == leaf.dtype
    grad = view_fn(leaf_grad)
    torch.testing.assert_close(grad.double(), ref_grad,
                               rtol=max(GRAD_RTOL[leaf.dtype], 1e-5 * tol_scale),
                               atol=max(GRAD_ATOL[leaf.dtype], 2e-6 * tol_scale))
    return logp, ent, leaf_grad


# ------------------------------------------------------------------ values and gradients
ROWS_FOR_V = {1: (3, 5), 7: (3, 5), 4097: (2, 3), 32003: (1, 3)}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("V", [1, 7, 4097, 32003])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_matches_reference(backend, dtype, V, temperature):
    B, T = ROWS_FOR_V[V]
    logits = make_logits((B, T, V), dtype)
    targets = make_targets((B, T), V)
    check(logits, targets, temperature)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_strided_view_read_in_place(backend, dtype, monkeypatch):
    """``logits[:, :-1]`` is passed to the kernel as is, and its result equals the copy's."""
    B, T, V = 2, 6, 37
    base = make_logits((B, T + 1, V), dtype)
    targets = make_targets((B, T), V, ignore_frac=0.2)
    impl = get_backend(backend)
    seen = []
    real = impl.row_stats

    def spy(logits, *args, **kwargs):
        seen.append(logits.stride())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(impl, "row_stats", spy)
    view = lambda x: x[:, :-1]  # noqa: E731
    logp, ent, grad = check(base, targets, 0.7, view_fn=view)
    assert seen == [base.stride()]          # the view itself reaches the kernel, not a copy
    assert torch.all(grad[:, -1] == 0)                    # the dropped position gets nothing
    c_logp, c_ent = hk.selective_log_softmax(base[:, :-1].contiguous(), targets, 0.7,
                                             return_entropy=True)
    torch.testing.assert_close(logp, c_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, c_ent, rtol=1e-6, atol=1e-6)


def test_other_strided_layouts(backend):
    """Offset views and a [T, B, V] tensor seen as [B, T, V] (no [rows, V] view exists)."""
    B, T, V = 3, 4, 29
    targets = make_targets((B, T), V, ignore_frac=0.2)
    check(make_logits((B, T + 1, V), torch.float32), targets, 1.3, view_fn=lambda x: x[:, 1:])
    check(make_logits((T, B, V), torch.bfloat16), targets, 0.9,
          view_fn=lambda x: x.transpose(0, 1))
    # Every other token of a packed sequence, with strided targets.
    packed_targets = make_targets((5, 2), V)[:, 0]
    assert packed_targets.stride() == (2,)
    check(make_logits((10, V), torch.float16), packed_targets, 1.0, view_fn=lambda x: x[::2])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_packed(backend, dtype):
    N, V = 11, 300
    check(make_logits((N, V), dtype), make_targets((N,), V, ignore_frac=0.3), 0.8)


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_ignore_index_rows(backend, ignore_index):
    B, T, V = 3, 5, 7
    logits = make_logits((B, T, V), torch.float32)
    targets = make_targets((B, T), V)
    targets[0, 1] = targets[2, 4] = targets[1, 0] = ignore_index
    ignored = targets == ignore_index
    logp, ent, grad = check(logits, targets, 1.0, ignore_index)
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(grad[ignored] == 0)
    assert torch.all(logp[~ignored] < 0)


def test_ignored_rows_may_hold_garbage(backend):
    """Ignored rows never leak into values or gradients, even when they hold NaN/inf."""
    B, T, V = 2, 4, 19
    logits = make_logits((B, T, V), torch.float32)
    targets = make_targets((B, T), V)
    targets[0, 2] = targets[1, 0] = -100
    logits[0, 2] = float("nan")
    logits[1, 0, :5] = float("inf")
    leaf = logits.clone().requires_grad_()
    logp, ent = hk.selective_log_softmax(leaf, targets, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert torch.isfinite(leaf.grad).all()
    assert logp[0, 2] == 0 and ent[1, 0] == 0
    assert torch.all(leaf.grad[0, 2] == 0) and torch.all(leaf.grad[1, 0] == 0)


def test_single_token(backend):
    V = 50
    check(make_logits((1, 1, V), torch.bfloat16), make_targets((1, 1), V), 1.0)
    check(make_logits((1, V), torch.float32), make_targets((1,), V), 2.0)


def test_fully_ignored(backend):
    B, T, V = 2, 3, 11
    leaf = make_logits((B, T, V), torch.bfloat16).requires_grad_()
    targets = torch.full((B, T), -100)
    logp, ent = hk.selective_log_softmax(leaf, targets, return_entropy=True)
    assert torch.all(logp == 0) and torch.all(ent == 0)
    (logp.sum() + 2 * ent.sum()).backward()
    assert torch.all(leaf.grad == 0)


def test_empty_batch(backend):
    logits = make_logits((0, 13), torch.float32).requires_grad_()
    logp = hk.selective_log_softmax(logits, torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,)
    logp.sum().backward()
    assert logits.grad.shape == (0, 13)


def test_gradient_through_one_output(backend):
    """An unused output costs nothing and contributes nothing (g_logp or g_ent is None)."""
    B, T, V = 2, 3, 23
    logits = make_logits((B, T, V), torch.float32)
    targets = make_targets((B, T), V, ignore_frac=0.2)
    x64 = logits.double().requires_grad_()
    ref_logp, ref_ent = R.log_probs(x64, targets, 1.5)
    ref_logp_only = torch.autograd.grad(ref_logp.sum(), x64, retain_graph=True)[0]
    ref_ent_only = torch.autograd.grad(ref_ent.sum(), x64)[0]

    leaf = logits.clone().requires_grad_()
    hk.selective_log_softmax(leaf, targets, 1.5).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref_logp_only, rtol=1e-5, atol=2e-6)

    leaf = logits.clone().requires_grad_()
    _, ent = hk.selective_log_softmax(leaf, targets, 1.5, return_entropy=True)
    ent.sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref_ent_only, rtol=1e-5, atol=2e-6)


def test_large_and_masked_logits(backend):
    """Huge logits stay accurate; -inf logits (masked vocabulary) give p = 0, no NaN."""
    B, T, V = 2, 3, 40
    big = make_logits((B, T, V), torch.float32, scale=1e4)
    check(big, make_targets((B, T), V), 1.0, tol_scale=5.0)

    logits = make_logits((B, T, V), torch.float32)
    allowed = V // 2
    targets = make_targets((B, T), allowed)
    masked = logits.clone()
    masked[..., allowed:] = float("-inf")
    leaf = masked.clone().requires_grad_()
    logp, ent = hk.selective_log_softmax(leaf, targets, 0.7, return_entropy=True)
    g_logp, g_ent = torch.randn(B, T), torch.randn(B, T)
    (logp * g_logp + ent * g_ent).sum().backward()
    # The same as the reference over the allowed vocabulary only.
    ref_logp, ref_ent, ref_grad = reference_and_grads(logits[..., :allowed].contiguous(),
                                                      targets, 0.7, -100, g_logp.double(),
                                                      g_ent.double())
    torch.testing.assert_close(logp.double(), ref_logp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(leaf.grad[..., :allowed].double(), ref_grad, rtol=1e-5,
                               atol=2e-6)
    assert torch.all(leaf.grad[..., allowed:] == 0)


def test_masked_first_block(backend):
    """A whole leading block of -inf logits (wider than the kernel's 4096-column block)."""
    B, T, V, masked = 1, 3, 4200, 4100
    logits = make_logits((B, T, V), torch.float32) - 150.0       # exp underflows from 0
    logits[..., :masked] = float("-inf")
    targets = make_targets((B, T), V - masked) + masked
    leaf = logits.clone().requires_grad_()
    logp, ent = hk.selective_log_softmax(leaf, targets, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    ref_logp, ref_ent, ref_grad = reference_and_grads(
        logits[..., masked:].contiguous(), targets - masked, 1.0, -100,
        torch.ones(B, T, dtype=torch.float64), torch.ones(B, T, dtype=torch.float64))
    torch.testing.assert_close(logp.double(), ref_logp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(leaf.grad[..., masked:].double(), ref_grad, rtol=1e-5,
                               atol=2e-6)
    assert torch.all(leaf.grad[..., :masked] == 0)


def test_non_finite_logits_give_non_finite_values(backend):
    logits = make_logits((2, 3, 9), torch.float32)
    logits[1, 2, 4] = float("nan")
    logp, ent = hk.selective_log_softmax(logits, make_targets((2, 3), 9), return_entropy=True)
    assert torch.isnan(logp[1, 2]) and torch.isnan(ent[1, 2])
    assert torch.isfinite(logp[0]).all() and torch.isfinite(logp[1, :2]).all()


# ------------------------------------------------------------------ internal API, poisoned
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_internal_api_writes_every_element(backend, dtype):
    """row_stats / grad_logits fill NaN-poisoned ``out`` buffers completely and correctly."""
    impl = get_backend(backend)
    B, T, V, temp = 3, 4, 133, 0.6
    base = make_logits((B, T + 1, V), dtype)
    logits = base[:, :-1]
    targets = make_targets((B, T), V, ignore_frac=0.25)
    targets[0, 0] = -100
    rows = B * T
    bufs = tuple(torch.full((rows,), float("nan")) for _ in range(4))
    logp, ent, lse, spz = impl.row_stats(logits, targets, temp, -100, out=bufs)
    assert all(a is b for a, b in zip((logp, ent, lse, spz), bufs))
    for t in (logp, ent, lse, spz):
        assert torch.isfinite(t).all()

    # lse and sum_pz are the documented statistics of z = logits / T on valid rows.
    valid = (targets != -100).reshape(-1)
    z = logits.double().reshape(rows, V) / temp
    ref_lse = torch.logsumexp(z, -1)
    ref_spz = (torch.softmax(z, -1) * z).sum(-1)
    torch.testing.assert_close(lse.double()[valid], ref_lse[valid], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(spz.double()[valid], ref_spz[valid], rtol=2e-5, atol=2e-5)
    assert torch.all(lse[~valid] == 0) and torch.all(spz[~valid] == 0)

    g_logp, g_ent = torch.randn(rows), torch.randn(rows)
    _, _, ref_grad = reference_and_grads(logits, targets, temp, -100,
                                         g_logp.double().reshape(B, T),
                                         g_ent.double().reshape(B, T))
    # A strided, poisoned destination: the view is written fully, its neighbours never.
    out_base = torch.full((B, T + 1, V), float("nan"), dtype=dtype)
    out = out_base[:, 1:]
    got = impl.grad_logits(logits, targets, lse, spz, g_logp, g_ent, temp, -100, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all() and torch.isnan(out_base[:, 0]).all()
    torch.testing.assert_close(out.double(), ref_grad, rtol=GRAD_RTOL[dtype],
                               atol=GRAD_ATOL[dtype])

    # In place over the logits themselves (what inplace_grad=True does).
    inplace = base.clone()
    impl.grad_logits(inplace[:, :-1], targets, lse, spz, g_logp, g_ent, temp, -100,
                     out=inplace[:, :-1])
    torch.testing.assert_close(inplace[:, :-1], out, rtol=0, atol=0)
    assert torch.equal(inplace[:, -1], base[:, -1])

    # g_ent = None skips the entropy term.
    _, _, ref_logp_grad = reference_and_grads(logits, targets, temp, -100,
                                              g_logp.double().reshape(B, T),
                                              torch.zeros(B, T, dtype=torch.float64))
    only = impl.grad_logits(logits, targets, lse, spz, g_logp, None, temp, -100)
    assert only.shape == logits.shape and only.dtype == dtype
    torch.testing.assert_close(only.double(), ref_logp_grad, rtol=GRAD_RTOL[dtype],
                               atol=GRAD_ATOL[dtype])


# ------------------------------------------------------------------ CPU chunking
def test_cpu_path_is_chunked(monkeypatch):
    """Tiny chunks (several per tensor, both the view and the gather path) change nothing."""
    assert cpu_logprobs.chunk_rows(151936) * 151936 * 4 <= cpu_logprobs.CHUNK_BYTES
    B, T, V = 3, 5, 64
    base = make_logits((B, T + 1, V), torch.bfloat16)
    targets = make_targets((B, T), V, ignore_frac=0.2)
    g_logp, g_ent = torch.randn(B, T), torch.randn(B, T)
    whole = run_op(base, lambda x: x[:, :-1], targets, 0.9, -100, g_logp, g_ent)
    monkeypatch.setattr(cpu_logprobs, "CHUNK_BYTES", 4 * V * 2)     # two rows per chunk
    assert cpu_logprobs.chunk_rows(V) == 2
    with hk.force_backend("cpu"):
        for view in (lambda x: x[:, :-1], lambda x: x[:, :-1].contiguous()):
            chunked = run_op(base, view, targets, 0.9, -100, g_logp, g_ent)
            for a, b in zip(whole[:2], chunked[:2]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with hk.force_backend("cpu"):
        check(base, targets, 0.9, view_fn=lambda x: x[:, :-1])


# ------------------------------------------------------------------ bad input
def _bad_inputs():
    x = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    return [
        ("temperature", dict(logits=x, target_ids=y, temperature=0.0)),
        ("temperature", dict(logits=x, target_ids=y, temperature=-1.0)),
        ("temperature", dict(logits=x, target_ids=y, temperature=float("nan"))),
        ("target_ids", dict(logits=x, target_ids=torch.full((2, 3), 5))),
        ("target_ids", dict(logits=x, target_ids=torch.full((2, 3), -1))),
        ("target_ids", dict(logits=x, target_ids=y.float())),
        ("target_ids", dict(logits=x, target_ids=y.bool())),
        ("target_ids", dict(logits=x, target_ids=y[:, :2])),
        ("logits", dict(logits=torch.randn(5), target_ids=torch.tensor(1))),
        ("logits", dict(logits=torch.randn(2, 3, 4, 5), target_ids=torch.zeros(2, 3, 4).long())),
        ("logits", dict(logits=x.double(), target_ids=y)),
        ("logits", dict(logits=x.long(), target_ids=y)),
        ("logits", dict(logits=x.transpose(1, 2).contiguous().transpose(1, 2), target_ids=y)),
        ("logits", dict(logits=torch.randn(2, 3, 0), target_ids=torch.zeros(2, 3).long())),
        ("logits", dict(logits=x.numpy(), target_ids=y)),
        ("ignore_index", dict(logits=x, target_ids=y, ignore_index=1.5)),
        ("return_entropy", dict(logits=x, target_ids=y, return_entropy="yes")),
    ]


@pytest.mark.parametrize("name,kwargs", _bad_inputs(),
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(_bad_inputs())])
def test_bad_input_raises_before_any_kernel(backend, monkeypatch, name, kwargs):
    impl = get_backend(backend)

    def no_kernel(*args, **kw):
        raise AssertionError("a kernel ran on invalid input")

    monkeypatch.setattr(impl, "row_stats", no_kernel)
    with pytest.raises(ValueError, match=name):
        hk.selective_log_softmax(**kwargs)


# ------------------------------------------------------------------ property test
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), T=st.integers(1, 5), V=st.integers(1, 300),
       dtype=st.sampled_from(DTYPES), temperature=st.floats(0.25, 4.0),
       scale=st.floats(0.01, 20.0), ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
       packed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes(backend, B, T, V, dtype, temperature, scale, ignore_frac,
                                packed, seed):
    torch.manual_seed(seed)
    shape = (B * T,) if packed else (B, T)
    logits = make_logits(shape + (V,), dtype, scale)
    targets = make_targets(shape, V, ignore_frac)
    # fp32 rounding of z = x / T grows with |z|: scale the tolerance by the logit range.
    z_max = float(logits.float().abs().max()) / temperature
    check(logits, targets, temperature, tol_scale=max(1.0, z_max / 10))


# ------------------------------------------------------------------ log-probs only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_logp_only_matches_reference(backend, dtype, temperature):
    """``return_entropy=False`` (the CPU path's one-``logsumexp`` route): values and the
    gradient, on a strided view with ignored rows."""
    B, T, V = 3, 6, 1031
    base = make_logits((B, T + 1, V), dtype)
    targets = make_targets((B, T), V, ignore_frac=0.2)
    g_logp = torch.randn(B, T, dtype=torch.float64)
    x64 = base[:, :-1].detach().double().requires_grad_()
    ref, _ = R.log_probs(x64, targets, temperature)
    (ref * g_logp).sum().backward()
    leaf = base.detach().clone().requires_grad_()
    logp = hk.selective_log_softmax(leaf[:, :-1], targets, temperature)
    (logp * g_logp.float()).sum().backward()
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    torch.testing.assert_close(logp.detach().double(), ref.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(leaf.grad[:, :-1].double(), x64.grad,
                               rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype])
    assert torch.all(leaf.grad[:, -1] == 0)


# --------------------------------------------------------------------------- on CUDA
# The compiled kernels at realistic sizes, against float64 on the same device: run where a
# GPU is present (bench/gpu_check.sh), skipped elsewhere.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device")
CUDA = "cuda"
CUDA_GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CUDA_GRAD_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _cuda_logits(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=CUDA) * scale).to(dtype)


def _cuda_targets(shape, V, seed=1, ignore_frac=0.1):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    y = torch.randint(0, V, shape, generator=g, device=CUDA)
    y[torch.rand(shape, generator=g, device=CUDA) < ignore_frac] = -100
    return y


def _cuda_check(leaf, targets, temperature=1.0, view_fn=lambda x: x, tol=5e-5):
    """Values and both gradients of ``view_fn(leaf)`` against the float64 reference."""
    logits = view_fn(leaf)
    g_logp = torch.randn(targets.shape, device=CUDA, dtype=torch.float64)
    g_ent = torch.randn(targets.shape, device=CUDA, dtype=torch.float64)

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
    torch.testing.assert_close(grad.double(), x64.grad, rtol=CUDA_GRAD_RTOL[leaf.dtype],
                               atol=CUDA_GRAD_ATOL[leaf.dtype])
    ignored = targets == -100
    assert torch.all(logp[ignored] == 0) and torch.all(grad[ignored] == 0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_packed_4096_by_32000(dtype):
    _cuda_check(_cuda_logits((4096, 32000), dtype), _cuda_targets((4096,), 32000), 1.0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_qwen_vocab(dtype, temperature):
    _cuda_check(_cuda_logits((2, 8, 151936), dtype), _cuda_targets((2, 8), 151936),
                temperature, tol=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_strided_views(dtype):
    base = _cuda_logits((4, 513, 32003), dtype)
    _cuda_check(base, _cuda_targets((4, 512), 32003), 1.0, view_fn=lambda x: x[:, :-1])
    _cuda_check(base, _cuda_targets((4, 512), 32003, seed=2), 0.8, view_fn=lambda x: x[:, 1:])


@pytest.mark.cuda
@needs_cuda
def test_cuda_more_rows_than_a_2d_grid_allows():
    """A 1-D grid over rows: more than 65,535 rows in one launch."""
    _cuda_check(_cuda_logits((70001, 64), torch.bfloat16), _cuda_targets((70001,), 64), 1.3)


@pytest.mark.cuda
@needs_cuda
def test_cuda_int64_offsets():
    """More than 2^31 elements: row offsets must not wrap around in int32."""
    N, V = 16400, 131072                          # 2.15e9 elements, 4.3 GB in bf16
    logits = _cuda_logits((N, V), torch.bfloat16, scale=1.0)
    targets = _cuda_targets((N,), V, ignore_frac=0.0)
    logp, ent, lse, spz = get_backend("triton").row_stats(logits, targets, 1.0, -100)
    tail = slice(N - 4, N)                        # rows beyond the int32 range
    ref_logp, ref_ent = R.log_probs(logits[tail], targets[tail])
    torch.testing.assert_close(logp[tail].double(), ref_logp, rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(ent[tail].double(), ref_ent, rtol=5e-5, atol=5e-5)
    g = torch.ones(N, device=CUDA)
    x64 = logits[tail].double().requires_grad_()
    R.log_probs(x64, targets[tail])[0].sum().backward()
    get_backend("triton").grad_logits(logits, targets, lse, spz, g, None, 1.0, -100, out=logits)
    torch.testing.assert_close(logits[tail].double(), x64.grad, rtol=1e-2, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_cuda_poisoned_outputs_are_fully_written():
    N, V = 1000, 50257
    logits = _cuda_logits((N, V), torch.bfloat16)
    targets = _cuda_targets((N,), V, ignore_frac=0.2)
    outs = tuple(torch.full((N,), float("nan"), device=CUDA) for _ in range(4))
    get_backend("triton").row_stats(logits, targets, 1.0, -100, out=outs)
    assert all(torch.isfinite(t).all() for t in outs)
    grad = torch.full_like(logits, float("nan"))
    g = torch.randn(N, device=CUDA)
    get_backend("triton").grad_logits(logits, targets, outs[2], outs[3], g, g, 1.0, -100, out=grad)
    assert torch.isfinite(grad).all()


@pytest.mark.cuda
@needs_cuda
def test_cuda_bad_input():
    logits = _cuda_logits((2, 3, 11), torch.float32)
    with pytest.raises(ValueError, match="target_ids"):
        hk.selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="target_ids"):
        hk.selective_log_softmax(logits, torch.full((2, 3), 11, device=CUDA))
    with pytest.raises(ValueError, match="cpu backend"):
        with hk.force_backend("cpu"):
            hk.selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long, device=CUDA))
