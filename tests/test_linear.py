"""fused_linear_hapo_loss / fused_linear_selective_log_softmax against the float64 reference
on ``hidden.double() @ weight.double().T + bias``: loss, metrics, and the gradients of
hidden, weight and bias; both backends, chunks that cut sequences, vocabulary blocks."""
import pytest
import torch

import hapo_kernels as hk
import hapo_kernels.head as head
from hapo_kernels import reference as R

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

B, T, H, V = 3, 5, 16, 37          # V odd; 15 tokens: chunks of 4 cut every sequence

# Pairwise over the options (every aggregation, both ratio levels, every teacher objective,
# KL, dual clip, entropy bonus, temperature, old_logp, per-token advantages).
CASES = [
    dict(),
    dict(importance_sampling="sequence"),
    dict(aggregation="seq-mean-token-mean", old=True, dual_clip=3.0),
    dict(aggregation="seq-mean-token-sum", teacher="seq", teacher_objective="sft",
         sft_weight=0.5, entropy_coef=0.02),
    dict(aggregation="dr_grpo", beta=0.05, ref=True, max_len=7, old=True),
    dict(aggregation="token-mean", normalizer=13.0, entropy_coef=0.01, temperature=0.8),
    dict(teacher="seq", old=True, importance_sampling="sequence", entropy_coef=0.02,
         aggregation="grpo"),
    dict(teacher="tok", teacher_objective="ratio", old=True, eps_high=0.28, adv="tok"),
    dict(aggregation="bnpo", ref=True, beta=0.1, importance_sampling="sequence",
         temperature=1.3, adv="tok", dual_clip=2.0, old=True),
    dict(aggregation="dapo", ref=True, teacher="tok", eps_low=0.1, old=True),
]
CHUNKINGS = [dict(chunk_size=4), dict(chunk_size=7, vocab_chunk_size=8), dict()]


def make_inputs(dtype=torch.float32, *, old=False, ref=False, teacher=None, adv="seq",
                shape=(B, T), V=V, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (1.5 / H ** 0.5)
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    y = torch.randint(0, V, shape, generator=g)
    n_seq = shape[0] if len(shape) == 2 else 1
    mask = torch.ones(shape)
    if len(shape) == 2 and shape[0] > 2:
        mask[-1] = 0                                   # a fully masked sequence
    if shape[-1] > 1:
        mask.view(-1)[1] = 0
        y.view(-1)[2] = -100                           # an ignored target
    A = torch.randn(n_seq if adv == "seq" else shape, generator=g)
    kw = dict(mask=mask)
    ref_lp, _ = R.log_probs(
        (hidden.to(dtype).double() @ weight.to(dtype).double().T).reshape(*shape, V), y)
    if old:
        kw["old_logp"] = (ref_lp + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
                          ).float()
    if ref:
        kw["ref_logp"] = (ref_lp + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
                          ).float()
    if teacher == "seq":
        kw["teacher_mask"] = torch.arange(n_seq) % 2 == 0
    elif teacher == "tok":
        kw["teacher_mask"] = torch.rand(shape, generator=g) < 0.4
    cast = [t.to(dtype) if t is not None else None for t in (hidden, weight, b)]
    return (*cast, y, A, kw)


def split_case(case):
    case = dict(case)
    make = {k: case.pop(k) for k in ("old", "ref", "teacher", "adv") if k in case}
    return make, case


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def reference(hidden, weight, bias, y, A, kw, opts):
    h, w, b = leaves(*(None if t is None else t.double() for t in (hidden, weight, bias)))
    logits = h @ w.T + (b if b is not None else 0.0)
    out = R.hapo_loss(logits, y, A, **kw, **opts)
    wrt = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(out.loss, wrt)
    return out, grads


def ours(hidden, weight, bias, y, A, kw, opts, **chunking):
    h, w, b = leaves(hidden, weight, bias)
    out = hk.fused_linear_hapo_loss(h, w, y, A, bias=b, **chunking, **kw, **opts)
    wrt = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(out.loss, wrt)
    return out, grads


def close(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def check(out, grads, ref, ref_grads, tol, gtol):
    close(out.loss, ref.loss, tol)
    close(out.per_token_logp, ref.per_token_logp, tol)
    close(out.per_token_entropy, ref.per_token_entropy, tol)
    for name in ("logp", "entropy", "ratio", "clip_low", "clip_high", "teacher_fraction"):
        close(getattr(out, name), getattr(ref, name), tol)
    assert (out.kl is None) == (ref.kl is None)
    if ref.kl is not None:
        close(out.kl, ref.kl, tol)
    for g, rg in zip(grads, ref_grads):
        close(g, rg, gtol)


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=["rows4", "rows7-vocab8", "default"])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_reference_fp32(backend, case, chunking):
    make, opts = split_case(case)
    hidden, weight, bias, y, A, kw = make_inputs(**make)
    ref, ref_grads = reference(hidden, weight, bias, y, A, kw, opts)
    out, grads = ours(hidden, weight, bias, y, A, kw, opts, **chunking)
    check(out, grads, ref, ref_grads, 2e-5, 2e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[6], CASES[4]], ids=["token", "gspo", "kl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, case, dtype):
    make, opts = split_case(case)
    hidden, weight, bias, y, A, kw = make_inputs(dtype, **make)
    ref, ref_grads = reference(hidden, weight, bias, y, A, kw, opts)
    for chunking in (dict(chunk_size=4), dict(chunk_size=6, vocab_chunk_size=16)):
        out, grads = ours(hidden, weight, bias, y, A, kw, opts, **chunking)
        assert grads[0].dtype == grads[1].dtype == dtype
        tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
        check(out, grads, ref, ref_grads, tol, tol)


def test_frozen_weight_packed_no_bias(backend):
    """A frozen head (LoRA): weight.grad stays None, the rest unchanged; packed [N, H]."""
    hidden, weight, _, y, A, kw = make_inputs(shape=(11,), adv="seq", bias=False, old=True)
    ref, (ref_gh, _) = reference(hidden, weight, None, y, A, kw, {})
    h = hidden.clone().requires_grad_()
    w = weight.clone()                                  # requires_grad False
    called = []
    real_add = head.addmm_into
    try:
        head.addmm_into = lambda *a: called.append(1) or real_add(*a)
        out = hk.fused_linear_hapo_loss(h, w, y, A, chunk_size=4, **kw)
        out.loss.backward()
    finally:
        head.addmm_into = real_add
    assert w.grad is None and not called                # the weight GEMM never ran
    close(out.loss, ref.loss, 2e-5)
    close(h.grad, ref_gh, 2e-5)


@pytest.mark.parametrize("shape", [(4, 1), (1, 1), (2, 9)])
def test_short_and_masked_sequences(backend, shape):
    """T = 1, a single token, and sequences wholly masked (their rows: zero gradient)."""
    hidden, weight, bias, y, A, kw = make_inputs(shape=shape, old=True)
    kw["mask"][0] = 0
    opts = dict(importance_sampling="sequence", aggregation="grpo")
    ref, ref_grads = reference(hidden, weight, bias, y, A, kw, opts)
    out, grads = ours(hidden, weight, bias, y, A, kw, opts, chunk_size=2)
    check(out, grads, ref, ref_grads, 2e-5, 2e-5)
    assert bool((grads[0][0] == 0).all())


def test_strided_hidden_view_and_grad_output(backend):
    """``hidden[:, :-1]`` (no flat view) and a loss scaled before backward."""
    full = torch.randn(B, T + 1, H)
    _, weight, bias, y, A, kw = make_inputs(old=True)
    h_full, w, b = leaves(full, weight, bias)
    out = hk.fused_linear_hapo_loss(h_full[:, :-1], w, y, A, bias=b, chunk_size=4, **kw)
    (3.0 * out.loss).backward()
    ref, ref_grads = reference(full[:, :-1], weight, bias, y, A, kw, {})
    close(out.loss, ref.loss, 2e-5)
    close(h_full.grad[:, :-1], 3.0 * ref_grads[0], 5e-5)
    assert bool((h_full.grad[:, -1] == 0).all())
    close(w.grad, 3.0 * ref_grads[1], 5e-5)
    close(b.grad, 3.0 * ref_grads[2], 5e-5)


def test_rewards_convenience(backend):
    """``rewards=`` / ``group_size=`` / ``inject=`` as in fused_hapo_loss: the SSI-replaced
    members train as teacher tokens."""
    hidden, weight, bias, y, _, kw = make_inputs(shape=(4, 3))
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0])
    inject = torch.tensor([True, False])
    adv, replaced = hk.group_advantages(rewards, 2, inject=inject)
    teacher = torch.zeros(4, dtype=torch.bool)
    teacher[0 * 2 + replaced[0]] = True
    ref, ref_grads = reference(hidden, weight, bias, y, adv, dict(kw, teacher_mask=teacher), {})
    h, w, b = leaves(hidden, weight, bias)
    out = hk.fused_linear_hapo_loss(h, w, y, bias=b, rewards=rewards, group_size=2,
                                    inject=inject, chunk_size=5, **kw)
    grads = torch.autograd.grad(out.loss, (h, w, b))
    check(out, grads, ref, ref_grads, 2e-5, 2e-5)
    assert torch.equal(out.replaced, replaced)



@pytest.mark.parametrize("opts", [{}, dict(importance_sampling="sequence"),
                                  dict(vocab_chunk_size=8)])
def test_every_output_written(backend, opts, poisoned_buffers):
    hidden, weight, bias, y, A, kw = make_inputs(ref=True)
    h, w, b = leaves(hidden, weight, bias)
    out = hk.fused_linear_hapo_loss(h, w, y, A, bias=b, chunk_size=4, **kw, **opts)
    out.loss.backward()
    for t in (out.loss, out.per_token_logp, out.per_token_entropy, out.kl, out.ratio,
              out.clip_low, out.clip_high, h.grad, w.grad, b.grad):
        assert bool(torch.isfinite(t).all())
    assert set(out.clip_low.unique().tolist()) <= {0.0, 1.0} or 0 <= float(out.clip_low) <= 1
    lp, ent = hk.fused_linear_selective_log_softmax(h, w, y, bias=b, return_entropy=True,
                                                    chunk_size=4)
    assert bool(torch.isfinite(lp).all() and torch.isfinite(ent).all())


def test_non_finite_hidden_gives_non_finite_loss(backend, request):
    hidden, weight, bias, y, A, kw = make_inputs()
    hidden[0, 0, 3] = float("nan")
    out = hk.fused_linear_hapo_loss(hidden, weight, y, A, bias=bias, chunk_size=4)
    assert not bool(torch.isfinite(out.loss))


def test_no_grad_skips_gradient_work(monkeypatch):
    hidden, weight, bias, y, A, kw = make_inputs()
    h, w, b = leaves(hidden, weight, bias)
    monkeypatch.setattr(head.Grads, "add", lambda *a, **k: pytest.fail("gradient work"))
    with torch.no_grad():
        out = hk.fused_linear_hapo_loss(h, w, y, A, bias=b, chunk_size=4, **kw)
    ref, _ = reference(hidden, weight, bias, y, A, kw, {})
    close(out.loss, ref.loss, 2e-5)


# --------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=["rows4", "rows7-vocab8", "default"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax(backend, chunking, temperature):
    hidden, weight, bias, y, _, _ = make_inputs()
    h, w, b = leaves(hidden, weight, bias)
    lp, ent = hk.fused_linear_selective_log_softmax(h, w, y, bias=b, temperature=temperature,
                                                    return_entropy=True, **chunking)
    g_lp, g_ent = torch.randn(B, T), torch.randn(B, T)
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h, w, b))
    hd, wd, bd = leaves(hidden.double(), weight.double(), bias.double())
    rlp, rent = R.log_probs(hd @ wd.T + bd, y, temperature)
    ref_grads = torch.autograd.grad((rlp * g_lp).sum() + (rent * g_ent).sum(), (hd, wd, bd),
                                    retain_graph=True)
    close(lp, rlp, 2e-5)
    close(ent, rent, 2e-5)
    for g, rg in zip(grads, ref_grads):
        close(g, rg, 5e-5)
    # Only logp used: the entropy term costs nothing and the result is the same.
    lp2 = hk.fused_linear_selective_log_softmax(h, w, y, bias=b, temperature=temperature,
                                                **chunking)
    g_h, = torch.autograd.grad(lp2.sum(), (h,))
    r_h, = torch.autograd.grad(rlp.sum(), (hd,))
    close(g_h, r_h, 5e-5)


def test_selective_log_softmax_bf16_frozen_head(backend):
    hidden, weight, _, y, _, _ = make_inputs(torch.bfloat16, bias=False)
    h = hidden.clone().requires_grad_()
    lp = hk.fused_linear_selective_log_softmax(h, weight, y, chunk_size=4, vocab_chunk_size=10)
    lp.sum().backward()
    hd = hidden.double().requires_grad_()
    rlp, _ = R.log_probs(hd @ weight.double().T, y)
    rlp.sum().backward()
    close(lp, rlp, 3e-2)
    assert h.grad.dtype == torch.bfloat16
    close(h.grad, hd.grad, 3e-2)


# --------------------------------------------------------------------------- chunk plan
def test_chunk_plan():
    cpu = torch.device("cpu")
    c = head.plan_chunks(4096, 32768, cpu)
    assert c.rows * 32768 * 4 <= head.CHUNK_BYTES["cpu"] and not c.split(32768)
    big = head.plan_chunks(4096, 10 ** 7, cpu)    # even 16 rows are too wide: split V
    assert big.rows == head.MIN_ROWS["cpu"] and big.split(10 ** 7)
    assert big.rows * big.vocab * 4 <= head.CHUNK_BYTES["cpu"]
    assert head.plan_chunks(10, 37, cpu, chunk_size=100).rows == 10
    g = head.plan_chunks(16384, 151936, torch.device("cuda"), torch.bfloat16)
    assert g.rows == (512 << 20) // (2 * 151936) == 1766 and not g.split(151936)


# --------------------------------------------------------------------------- bad input
BAD = {
    "hidden": lambda h, w, b, y: (h[..., :-1], w, b, y),
    "weight": lambda h, w, b, y: (h, w[:, :-1], b, y),
    "bias": lambda h, w, b, y: (h, w, b[:-1], y),
    "dtype": lambda h, w, b, y: (h, w.double(), b, y),
    "bias dtype": lambda h, w, b, y: (h, w, b.half(), y),
    "target_ids": lambda h, w, b, y: (h, w, b, y[:, :-1]),
    "target range": lambda h, w, b, y: (h, w, b, torch.where(y == y[0, 0], V, y)),
    "hidden rank": lambda h, w, b, y: (h[0, 0], w, b, y),
    "device": lambda h, w, b, y: (h, w.to("meta"), b, y),
}


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_bad_input_raises_before_compute(bad, monkeypatch):
    monkeypatch.setattr(head, "logits_block",
                        lambda *a: pytest.fail("computed before validating"))
    hidden, weight, bias, y, A, kw = make_inputs()
    h, w, b, yy = BAD[bad](hidden, weight, bias, y)
    with pytest.raises(ValueError):
        hk.fused_linear_hapo_loss(h, w, yy, A, bias=b)
    with pytest.raises(ValueError):
        hk.fused_linear_selective_log_softmax(h, w, yy, bias=b)


@pytest.mark.parametrize("kwargs", [dict(chunk_size=0), dict(vocab_chunk_size=-1),
                                    dict(chunk_size=2.5), dict(aggregation="nope"),
                                    dict(beta=0.1), dict(fp32_accumulate=1),
                                    dict(mask=torch.ones(B, T + 1))])
def test_bad_options_raise(kwargs, monkeypatch):
    monkeypatch.setattr(head, "logits_block",
                        lambda *a: pytest.fail("computed before validating"))
    hidden, weight, bias, y, A, _ = make_inputs()
    with pytest.raises(ValueError):
        hk.fused_linear_hapo_loss(hidden, weight, y, A, bias=bias, **kwargs)


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fp32_accumulate", [True, False])
def test_cuda_bf16(fp32_accumulate):
    """cuBLAS chunks + Triton loss kernel; the float32 weight-gradient sum (out_dtype)."""
    make, opts = split_case(CASES[8])
    hidden, weight, bias, y, A, kw = make_inputs(torch.bfloat16, shape=(6, 40), V=1031,
                                                 **make)
    ref, ref_grads = reference(hidden, weight, bias, y, A, kw, opts)
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in (hidden, weight, bias, y, A)]
    kwd = {k: v.cuda() for k, v in kw.items()}
    for chunking in (dict(chunk_size=64), dict(chunk_size=50, vocab_chunk_size=300)):
        h, w, b = leaves(*dev[:3])
        out = hk.fused_linear_hapo_loss(h, w, dev[3], dev[4], bias=b, **kwd, **opts,
                                        fp32_accumulate=fp32_accumulate, **chunking)
        grads = torch.autograd.grad(out.loss, (h, w, b))
        close(out.loss.cpu(), ref.loss, 3e-2)
        for g, rg in zip(grads, ref_grads):
            close(g.cpu(), rg, 3e-2)


@pytest.mark.parametrize("opts", [dict(aggregation="grpo"),
                                  dict(importance_sampling="sequence", aggregation="dr_grpo"),
                                  dict(importance_sampling="sequence", vocab_chunk_size=8)])
def test_packed_cu_seqlens(backend, opts):
    """Packed ``[N, H]`` with ``cu_seqlens``: equal to fused_hapo_loss on the materialised
    logits (itself held to the reference), chunks cutting segments."""
    hidden, weight, bias, y, _, kw = make_inputs(shape=(13,), old=True)
    cu = torch.tensor([0, 4, 4, 9, 13])
    A = torch.randn(4)
    teacher = torch.tensor([False, True, False, True])
    kw = dict(kw, teacher_mask=teacher, cu_seqlens=cu)
    h, w, b = leaves(hidden, weight, bias)
    logits_opts = {k: v for k, v in opts.items() if k != "vocab_chunk_size"}
    ref = hk.fused_hapo_loss(h @ w.T + b, y, A, **kw, **logits_opts)
    ref_grads = torch.autograd.grad(ref.loss, (h, w, b))
    h2, w2, b2 = leaves(hidden, weight, bias)
    out = hk.fused_linear_hapo_loss(h2, w2, y, A, bias=b2, chunk_size=3, **kw, **opts)
    grads = torch.autograd.grad(out.loss, (h2, w2, b2))
    check(out, grads, ref, ref_grads, 2e-5, 2e-5)


def test_process_group_plumbing(tmp_path):
    """``process_group`` (one gloo rank): ``rewards=`` groups and the ``dapo`` count go
    through torch.distributed and give the single-process result."""
    import torch.distributed as dist
    hidden, weight, bias, y, _, kw = make_inputs(shape=(4, 3))
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0])
    inject = torch.tensor([True, False])
    common = dict(bias=bias, rewards=rewards, group_size=2, inject=inject, chunk_size=5,
                  aggregation="dapo", **kw)
    plain = hk.fused_linear_hapo_loss(hidden, weight, y, **common)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        out = hk.fused_linear_hapo_loss(hidden, weight, y, process_group=dist.group.WORLD,
                                        **common)
    finally:
        dist.destroy_process_group()
    close(out.loss, plain.loss, 1e-6)
    assert torch.equal(out.replaced, plain.replaced)


def test_second_backward_refuses():
    """The gradients are handed over once (adopted as .grad without a copy)."""
    hidden, weight, bias, y, A, kw = make_inputs()
    h, w, b = leaves(hidden, weight, bias)
    out = hk.fused_linear_hapo_loss(h, w, y, A, bias=b, chunk_size=4, **kw)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


TRL_CASES = [  # TRL's options on the fused LM head: one pass and statistics-first
    dict(old=True, ref=True, objective="sapo", beta=0.05, kl_bias_correction=True,
         rollout="token"),
    dict(old=True, objective="clip", delta=0.9, aggregation="luspo", rollout="seq"),
    dict(old=True, ref=True, objective="vespo", beta=0.05, aggregation="dapo",
         rollout="token"),
    dict(old=True, objective="cispo", eps_high=1.5, top_entropy_quantile=0.5,
         entropy_coef=0.05, entropy_mean=True, off_policy_mask_threshold=0.0),
]


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=["rows4", "rows7-vocab8", "default"])
@pytest.mark.parametrize("case", TRL_CASES, ids=["sapo", "delta-luspo", "vespo", "masks"])
def test_trl_options_match_reference(backend, case, chunking):
    make, opts = split_case(case)
    rollout = opts.pop("rollout", None)
    hidden, weight, bias, y, A, kw = make_inputs(**make)
    g = torch.Generator().manual_seed(11)
    if rollout is not None:
        w = torch.rand(y.shape if rollout == "token" else y.shape[:1], generator=g) * 2
        kw["rollout_is_weights"] = w
    ref, ref_grads = reference(hidden, weight, bias, y, A, kw, opts)
    out, grads = ours(hidden, weight, bias, y, A, kw, opts, **chunking)
    check(out, grads, ref, ref_grads, 2e-5, 2e-5)
