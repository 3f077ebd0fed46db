"""fused_hapo_loss against the float64 reference: loss, gradients and metrics, both paths."""
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hapo_kernels as hk
import hapo_kernels.loss as hk_loss
from hapo_kernels import reference as R
from hapo_kernels.backends import force_backend

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

AGGREGATIONS = [  # (aggregation, extra options): every mode and alias
    ("token-mean", {}), ("seq-mean-token-mean", {}), ("seq-mean-token-sum", {}),
    ("seq-mean-token-sum-norm", {}), ("grpo", {}), ("dr_grpo", {}), ("bnpo", {}),
    ("dapo", {}), ("token-mean", {"normalizer": 7.5}), ("dr_grpo", {"max_len": 9}),
    ("token-sum", {}), ("seq-mean-token-mean", {"num_sequences": 5.0, "dp_size": 2}),
    ("token-mean", {"normalizer": 11.0, "dp_size": 4}),
    ("seq-mean-token-sum-norm", {"num_sequences": 7.0, "max_len": 13, "dp_size": 3}),
]
OPTION_VALUES = {
    "objective": list(hk.OBJECTIVES),          # every entry of the objective table
    "importance_sampling": ["token", "sequence", "sequence_token"],
    "teacher_objective": ["shaped", "sft", "ratio"],
    "beta": [0.0, 0.1],
    "dual_clip": [None, 3.0],
    "entropy_coef": [0.0, 0.01],
    "temperature": [1.0, 0.7],
    # TRL's options: delta below, inside and above the clip range; the bias-corrected KL;
    # the statistics-first masks and the batch-mean entropy bonus; the SAPO / VESPO knobs.
    "delta": [None, 0.9, 1.1, 2.0],
    "kl_bias_correction": [False, True],
    "top_entropy_quantile": [1.0, 0.4],
    "off_policy_mask_threshold": [None, 0.05],
    "entropy_mean": [False, True],
    "sapo_temperature_pos": [1.0, 2.5],
    "vespo_k_neg": [3.0, 1.5],
    "log_ratio_clamp": [None, 0.25],
}
# The options whose every combination test_full_option_product_cpu runs.
PRODUCT_OPTIONS = ("objective", "importance_sampling", "teacher_objective", "beta",
                   "dual_clip", "entropy_coef", "temperature")
INPUT_VALUES = {
    "rollout_is": [None, "token", "sequence"],
    "sampling": [False, True],
    "old": [True, False],
    "per_token_adv": [False, True],
    "per_token_teacher": [False, True],
    "dtype": [torch.float32, torch.bfloat16],
    "shape": [(3, 5, 37), (2, 1, 37), (3, 5, 37), (2, 3, 4099)],
}


def pairwise_configs(n=40):
    """n configurations covering every value of every option several times.

    Each option runs through balanced, independently shuffled cycles of its values, so
    pairs of values vary across configurations (not the full cartesian product: the
    interpreter is slow; the CPU path gets the product in test_full_option_product_cpu).
    """
    import random
    values = {**OPTION_VALUES, **INPUT_VALUES}
    columns = {}
    for k, (name, vals) in enumerate(values.items()):
        rng, col = random.Random(k), []
        while len(col) < n:
            cycle = list(range(len(vals)))
            rng.shuffle(cycle)
            col += cycle
        columns[name] = [vals[j] for j in col[:n]]
    configs = []
    for i in range(n):
        agg, extra = AGGREGATIONS[i % len(AGGREGATIONS)]
        configs.append({"aggregation": agg, **extra,
                        **{name: col[i] for name, col in columns.items()}})
    for name, vals in values.items():     # the claim above, checked
        for v in vals:
            assert sum(c[name] == v for c in configs) >= 2, (name, v)
    return configs


def make_inputs(shape, *, dtype=torch.float32, old=True, per_token_adv=False,
                per_token_teacher=False, packed=False, seed=0, rollout_is=None,
                sampling=False):
    """Fresh random inputs: a fully masked sequence, an ignore_index target, teacher rows;
    rollout importance weights per ``"token"`` or ``"sequence"`` (some 0, as TRL's mask
    modes make), the sampler's log-probs."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = shape
    x = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    if B > 2:
        mask[-1] = 0                       # a fully masked sequence
    if T > 1:
        y[0, 1] = -100                     # an ignored target
        mask[min(1, B - 1), T - 1] = 0
    logp_true, _ = R.log_probs(x.double(), y)
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    old_logp = (logp_true + 0.3 * torch.randn(B, T, generator=g)).float() if old else None
    ref_logp = (logp_true + 0.3 * torch.randn(B, T, generator=g)).float()
    if per_token_teacher:
        teacher = torch.rand(B, T, generator=g) < 0.3
    else:
        teacher = torch.zeros(B, dtype=torch.bool)
        teacher[0] = True
    kw = dict(mask=mask, old_logp=old_logp, ref_logp=ref_logp, teacher_mask=teacher)
    if rollout_is is not None:
        w = torch.rand(B, T if rollout_is == "token" else 1, generator=g) * 2
        w[0, 0] = 0.0                      # a masked-out ratio
        kw["rollout_is_weights"] = w if rollout_is == "token" else w[:, 0]
    if sampling:
        kw["sampling_logp"] = (logp_true + 0.2 * torch.randn(B, T, generator=g)).float()
    if packed:   # one sequence [N, V]
        x, y = x.reshape(B * T, V), y.reshape(B * T)
        adv = adv.reshape(-1) if per_token_adv else adv[:1]
        kw = {k: (v.reshape(-1) if v.dim() == 2 else v[:1]) for k, v in kw.items()
              if v is not None}
        kw.setdefault("old_logp", None)
    return x, y, adv, kw


def run_ours(x, y, adv, kw, **opts):
    xg = x.clone().requires_grad_()
    out = hk.fused_hapo_loss(xg, y, adv, **kw, **opts)
    out.loss.backward()
    assert torch.equal(xg.detach(), x) or not torch.isfinite(x).all()   # logits untouched
    return out, xg.grad


def run_reference(x, y, adv, kw, **opts):
    xr = x.double().requires_grad_()      # the same (rounded) logits the fast path reads
    out = R.hapo_loss(xr, y, adv, **kw, **opts)
    out.loss.backward()
    return out, xr.grad


def reference_upstream(x, y, adv, kw, **opts):
    """Largest ``|dL/dlogp|`` or ``|dL/dentropy|`` of the float64 reference.

    A float32 gradient ``a * (onehot - p)`` cancels terms of size ``|a|`` where ``p -> 1``,
    so its rounding error scales with ``|a|``, not with the (then tiny) gradient itself.
    """
    from hapo_kernels.inputs import loss_inputs
    from hapo_kernels.objective import token_objective
    from hapo_kernels.options import LossOptions
    o = LossOptions(**opts)
    t = loss_inputs(x, y, adv, o, source_name="logits", dtype=torch.float64, **kw)
    shape = (t.B, t.T)

    def rows(v):
        return None if v is None else v.view(shape)

    logp, ent = R.log_probs(x.double().reshape(*shape, x.shape[-1]), t.targets.view(shape),
                            o.temperature)
    logp, ent = logp.detach().requires_grad_(), ent.detach().requires_grad_()
    valid = t.valid.view(shape)
    obj = token_objective(logp, ent, rows(t.advantages), valid, old_logp=rows(t.old_logp),
                          ref_logp=rows(t.ref_logp), teacher=rows(t.teacher), opts=o)
    g = torch.autograd.grad(R.aggregate(obj.loss, valid, o), (logp, ent),
                            allow_unused=True, materialize_grads=True)
    upstream = max(float(g[0].abs().max()), float(g[1].abs().max()))
    if o.beta > 0 and t.ref_logp is not None and bool(valid.any()):
        # The KL's derivative w beta (1 - exp(ref - logp)) cancels two terms of size about
        # w beta: float32 rounds it to that scale, however small the difference.
        d = rows(t.ref_logp) - logp.detach()
        terms = o.beta * rows(t.weights).abs() * torch.maximum(torch.exp(d), torch.ones_like(d))
        upstream = max(upstream, float(terms[valid].max()))
    return upstream


def assert_close_to_reference(out, grad, ref, ref_grad, dtype=torch.float32, upstream=0.0):
    """``upstream``: ``reference_upstream`` of the inputs, a floor for the gradient's scale."""
    rel = 1e-5
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert abs(out.loss.item() - ref.loss.item()) <= rel * max(1.0, abs(ref.loss.item())), \
        (out.loss.item(), ref.loss.item())
    for name in ("logp", "entropy", "kl", "clip_low", "clip_high", "ratio",
                 "teacher_fraction"):
        a, b = getattr(out, name), getattr(ref, name)
        if b is None:
            assert a is None, name
            continue
        assert math.isfinite(float(a)), name
        assert abs(float(a) - float(b)) <= rel * max(1.0, abs(float(b))), (name, a, b)
    for a, b in ((out.per_token_logp, ref.per_token_logp),
                 (out.per_token_entropy, ref.per_token_entropy)):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=rel, atol=rel * max(1.0, b.abs().max()))
    assert grad.dtype == dtype and grad.shape == ref_grad.shape
    scale = max(ref_grad.abs().max().item(), upstream, 1e-12)
    # fp32: float32 math; bf16: the gradient is stored in bf16 (8 mantissa bits).
    atol, rtol = (1e-5 * scale, 1e-4) if dtype == torch.float32 else (1e-2 * scale, 1e-2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


def split(cfg):
    opts = {k: v for k, v in cfg.items() if k in OPTION_VALUES or k in
            ("aggregation", "normalizer", "max_len", "num_sequences", "dp_size")}
    inputs = {k: v for k, v in cfg.items() if k in INPUT_VALUES and k != "shape"}
    if opts["objective"] == "vespo" and inputs.get("rollout_is") == "sequence":
        inputs["rollout_is"] = "token"     # VESPO takes per-token weights only (TRL too)
    return with_own_ratio(opts), inputs


def with_own_ratio(opts):
    """An objective with its own sequence ratio (GMPO) takes importance_sampling="sequence"
    only (any other value is a ValueError, tested in test_options.py)."""
    if hk.OBJECTIVES[opts["objective"]].ratio is not None:
        opts = dict(opts, importance_sampling="sequence")
    return opts


@pytest.mark.parametrize("cfg", pairwise_configs(), ids=lambda c: "-".join(
    f"{v}" for k, v in c.items() if k not in ("dtype", "shape")) + f"-{c['dtype']}-{c['shape']}")
def test_matches_reference(backend, cfg):
    opts, inputs = split(cfg)
    x, y, adv, kw = make_inputs(cfg["shape"], **inputs)
    out, grad = run_ours(x, y, adv, kw, **opts)
    ref, ref_grad = run_reference(x, y, adv, kw, **opts)
    assert_close_to_reference(out, grad, ref, ref_grad, cfg["dtype"])


def test_full_option_product_cpu():
    """Every combination of the objective options on the CPU path (tiny shapes).

    Aggregation only sets the weights, so it cycles along instead of multiplying the count.
    """
    x, y, adv, kw = make_inputs((3, 4, 11), seed=1)
    names = list(PRODUCT_OPTIONS)
    combos = list(itertools.product(*(OPTION_VALUES[n] for n in names)))
    with force_backend("cpu"):
        for i, vals in enumerate(combos):
            agg, extra = AGGREGATIONS[i % len(AGGREGATIONS)]
            opts = with_own_ratio(dict(zip(names, vals), aggregation=agg, **extra))
            out, grad = run_ours(x, y, adv, kw, **opts)
            ref, ref_grad = run_reference(x, y, adv, kw, **opts)
            assert_close_to_reference(out, grad, ref, ref_grad)
    assert len(combos) == len(hk.OBJECTIVES) * 3 * 3 * 2 * 2 * 2 * 2


@pytest.mark.parametrize("per_token_adv", [False, True])
def test_packed_input(backend, per_token_adv):
    x, y, adv, kw = make_inputs((2, 4, 37), packed=True, per_token_adv=per_token_adv)
    for opts in (dict(), dict(importance_sampling="sequence", entropy_coef=0.01, beta=0.1),
                 dict(objective="geo_mean", importance_sampling="sequence", eps_low=0.1)):
        out, grad = run_ours(x, y, adv, kw, **opts)
        ref, ref_grad = run_reference(x, y, adv, kw, **opts)
        assert out.per_token_logp.shape == y.shape
        assert_close_to_reference(out, grad, ref, ref_grad)


@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_strided_view_without_copy(backend, importance_sampling):
    full = torch.randn(3, 6, 37)
    y = torch.randint(0, 37, (3, 5))
    adv = torch.randn(3)
    view = full[:, :-1]                    # not contiguous: rows at stride 6*37
    assert not view.is_contiguous()
    kw = dict(old_logp=None)
    opts = dict(importance_sampling=importance_sampling, entropy_coef=0.02)
    fg = full.clone().requires_grad_()
    out = hk.fused_hapo_loss(fg[:, :-1], y, adv, **kw, **opts)
    out.loss.backward()
    ref, ref_grad = run_reference(view.contiguous(), y, adv, kw, **opts)
    assert_close_to_reference(out, fg.grad[:, :-1], ref, ref_grad)
    assert fg.grad[:, -1].abs().max() == 0



@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_every_output_written(backend, importance_sampling, poisoned_buffers):
    """Buffers (per-token outputs, gradient) start as NaN / 3: every element gets written."""
    x, y, adv, kw = make_inputs((3, 5, 37), seed=3)
    opts = dict(importance_sampling=importance_sampling, beta=0.1, entropy_coef=0.01)
    out, grad = run_ours(x, y, adv, kw, **opts)
    assert torch.isfinite(grad).all()
    for t in (out.loss, out.per_token_logp, out.per_token_entropy):
        assert torch.isfinite(t).all()
    ref, ref_grad = run_reference(x, y, adv, kw, **opts)
    assert_close_to_reference(out, grad, ref, ref_grad)   # clip flags 3 would show here


@pytest.mark.parametrize("aggregation,rows_counted", [
    ("seq-mean-token-mean", 5), ("seq-mean-token-sum", 5), ("seq-mean-token-sum-norm", 5),
    ("grpo", 6), ("dr_grpo", 6)])
def test_fully_masked_rows_verl_names_and_trl_aliases(backend, aggregation, rows_counted):
    """verl's agg_loss leaves a fully masked sequence out of the sequence mean; TRL's
    aliases count it as 0. With one empty row of 6 the two differ by exactly 6/5."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, 19, generator=g)
    y = torch.randint(0, 19, (6, 5), generator=g)
    adv = torch.randn(6, generator=g)
    mask = torch.ones(6, 5)
    mask[2] = 0
    mask[4, 3:] = 0
    out = hk.fused_hapo_loss(x, y, adv, mask=mask, aggregation=aggregation)
    every_row = hk.fused_hapo_loss(x, y, adv, mask=mask, aggregation=aggregation,
                                   num_sequences=6.0)
    assert out.loss.item() == pytest.approx(every_row.loss.item() * 6 / rows_counted, rel=1e-6)
    ref = R.hapo_loss(x.double(), y, adv, mask=mask, aggregation=aggregation)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)


@pytest.mark.parametrize("objective", ["clip", "cispo"])
def test_log_ratio_clamp_by_hand(backend, objective):
    """verl's clamp: the ratio is exp(clamp(logp - old, -c, c)) and passes no gradient
    through the ratio where it clamps (CISPO's gradient is through log p: unchanged)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 13, generator=g)
    y = torch.randint(0, 13, (2, 3), generator=g)
    logp, _ = R.log_probs(x.double(), y)
    old = (logp + torch.tensor([[2.0, 0.1, -3.0], [0.3, 1.5, -0.2]], dtype=torch.float64)).float()
    adv = torch.tensor([-1.0, 1.0])
    opts = dict(objective=objective, eps_low=0.2, eps_high=5.0 if objective == "cispo" else 0.3,
                log_ratio_clamp=1.0, aggregation="token-sum")
    out, grad = run_ours(x, y, adv, dict(old_logp=old), **opts)
    d = (logp - old.double()).clamp(-1.0, 1.0)
    torch.testing.assert_close(out.per_token_ratio.double(), d.exp(), rtol=1e-5, atol=1e-6)
    p = torch.softmax(x.double(), -1)
    onehot = torch.nn.functional.one_hot(y, 13).double()
    rho, A = d.exp(), adv[:, None].double()
    if objective == "clip":       # unclipped (A rho smaller) and unclamped: -A rho; else 0
        live = (logp - old.double()).abs() <= 1.0
        unclipped = rho * A <= rho.clamp(0.8, 1.3) * A
        g_logp = torch.where(live & unclipped, -A * rho, torch.zeros_like(rho))
    else:
        g_logp = -rho.clamp(max=5.0) * A
    torch.testing.assert_close(grad.double(), g_logp[..., None] * (onehot - p),
                               rtol=1e-4, atol=1e-6)


def test_token_sum_and_dp_size(backend):
    """token-sum is the masked sum; dp_size multiplies every mode (verl's agg_loss)."""
    x, y, adv, kw = make_inputs((3, 4, 11), seed=2)
    total = hk.fused_hapo_loss(x, y, adv, aggregation="token-sum", **kw).loss
    mean = hk.fused_hapo_loss(x, y, adv, aggregation="token-mean", **kw).loss
    n = float((kw["mask"].bool() & (y != -100)).sum())
    assert total.item() == pytest.approx(mean.item() * n, rel=1e-6)
    scaled = hk.fused_hapo_loss(x, y, adv, aggregation="token-mean", normalizer=n, dp_size=3,
                                **kw).loss
    assert scaled.item() == pytest.approx(3 * mean.item(), rel=1e-6)
    with pytest.raises(ValueError, match="normalizer"):
        hk.fused_hapo_loss(x, y, adv, aggregation="token-mean", dp_size=2, **kw)
    with pytest.raises(ValueError, match="num_sequences"):
        hk.fused_hapo_loss(x, y, adv, aggregation="seq-mean-token-sum", dp_size=2, **kw)


def test_fully_masked_batch(backend):
    x, y, adv, kw = make_inputs((2, 3, 37))
    kw["mask"] = torch.zeros(2, 3)
    for agg in ("token-mean", "grpo", "dr_grpo", "seq-mean-token-sum"):
        out, grad = run_ours(x, y, adv, kw, aggregation=agg, beta=0.1)
        assert out.loss.item() == 0.0 and grad.abs().max() == 0
        assert out.logp.item() == 0.0 and out.kl.item() == 0.0


@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_no_tokens(backend, importance_sampling):
    """[B, 0, V] logits (every completion empty): loss 0, a [B, 0, V] gradient, on both
    backends (the CPU path divided by T = 0)."""
    x = torch.randn(3, 0, 37, requires_grad=True)
    y = torch.zeros(3, 0, dtype=torch.long)
    for agg in ("token-mean", "grpo", "dr_grpo", "seq-mean-token-sum"):
        out = hk.fused_hapo_loss(x, y, torch.randn(3), aggregation=agg,
                                 importance_sampling=importance_sampling)
        out.loss.backward()
        assert out.loss.item() == 0.0 and x.grad.shape == (3, 0, 37)
        assert out.per_token_logp.shape == (3, 0)
    logp, ent = hk.selective_log_softmax(x, y, return_entropy=True)
    assert logp.shape == ent.shape == (3, 0)


def test_grad_output_scaling_and_no_grad(backend):
    x, y, adv, kw = make_inputs((2, 3, 37))
    out, grad = run_ours(x, y, adv, kw)
    xg = x.clone().requires_grad_()
    (2.5 * hk.fused_hapo_loss(xg, y, adv, **kw).loss).backward()
    torch.testing.assert_close(xg.grad, 2.5 * grad)
    with torch.no_grad():
        loss = hk.fused_hapo_loss(x.clone().requires_grad_(), y, adv, **kw).loss
    assert not loss.requires_grad and loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    xg = x.clone().requires_grad_()
    with torch.no_grad():                        # no gradient: the logits stay untouched
        hk.fused_hapo_loss(xg, y, adv, **kw, inplace_grad=True)
    assert torch.equal(xg.detach(), x) and xg.grad is None
    plain = hk.fused_hapo_loss(x, y, adv, **kw)   # logits without grad: no gradient buffer
    assert plain.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


@pytest.mark.parametrize("importance_sampling,entropy_mean", [("token", False),
                                                              ("sequence", False),
                                                              ("token", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_scale_folds_into_the_forward(backend, importance_sampling, entropy_mean, dtype):
    """``loss_scale`` (a gradient-accumulation divisor) gives the scaled loss and gradient of
    the float64 reference, written by the forward: the backward's ``grad_output`` is 1 and
    nothing rescales the gradient. A further scale in the caller's graph stays exact."""
    x, y, adv, kw = make_inputs((3, 5, 37), dtype=dtype, seed=7)
    opts = dict(importance_sampling=importance_sampling, entropy_coef=0.01, beta=0.1,
                aggregation="grpo", entropy_mean=entropy_mean)
    ref, ref_grad = run_reference(x, y, adv, kw, **opts)
    ref_scaled, ref_grad_scaled = run_reference(x, y, adv, kw, **opts, loss_scale=0.25)
    assert ref_scaled.loss.item() == pytest.approx(0.25 * ref.loss.item(), rel=1e-12)
    torch.testing.assert_close(ref_grad_scaled, 0.25 * ref_grad, rtol=1e-12, atol=0)

    out, grad = run_ours(x, y, adv, kw, **opts, loss_scale=0.25)
    upstream = reference_upstream(x, y, adv, kw, **opts, loss_scale=0.25)
    assert_close_to_reference(out, grad, ref_scaled, ref_grad_scaled, dtype, upstream)

    xg = x.clone().requires_grad_()            # scaled forward and a scaled backward
    (3.0 * hk.fused_hapo_loss(xg, y, adv, **kw, **opts, loss_scale=0.25).loss).backward()
    assert_close_to_reference(out, xg.grad, ref_scaled, 3.0 * ref_grad_scaled, dtype,
                              3.0 * upstream)
    # The forward wrote the scaled gradient (into the logits, with inplace_grad): the
    # backward at grad_output 1 leaves it as it is.
    h = x.clone().requires_grad_() * 1.0
    hk.fused_hapo_loss(h, y, adv, **kw, **opts, loss_scale=0.25, inplace_grad=True)
    assert torch.equal(h.detach(), grad)
    with pytest.raises(ValueError, match="loss_scale"):
        hk.fused_hapo_loss(x, y, adv, **kw, loss_scale=0.0)


@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_inplace_grad(backend, importance_sampling):
    x, y, adv, kw = make_inputs((3, 5, 37), seed=4)
    opts = dict(importance_sampling=importance_sampling, entropy_coef=0.01)
    out, grad = run_ours(x, y, adv, kw, **opts)
    base = x.clone().requires_grad_()
    h = base * 1.0                               # a non-leaf: its grad flows to `base`
    squares = (h * h).sum()                      # another op that saved h
    out_inplace = hk.fused_hapo_loss(h, y, adv, **kw, **opts, inplace_grad=True)
    assert out_inplace.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    torch.testing.assert_close(h.detach(), grad)  # the gradient now lives in h's storage
    out_inplace.loss.backward(retain_graph=True)
    torch.testing.assert_close(base.grad, grad)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        squares.backward()                       # refuses, instead of silently wrong grads


@pytest.mark.parametrize("inplace_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_backward_never_reads_grad_output_on_the_host(backend, inplace_grad, dtype,
                                                              monkeypatch):
    """The Triton backend scales the saved gradient by ``grad_output`` on the device (no
    ``float(grad_output)``: no host sync on CUDA), exactly, at 1 and at another value; a
    second backward through the same loss refuses instead of rescaling again."""
    x, y, adv, kw = make_inputs((2, 3, 37), dtype=dtype)
    _, grad = run_ours(x, y, adv, kw)
    for g in (1.0, -2.5):
        base = x.clone().requires_grad_()
        h = base * 1 if inplace_grad else base
        loss = hk.fused_hapo_loss(h, y, adv, **kw, inplace_grad=inplace_grad).loss
        if backend == "triton":
            monkeypatch.setattr(torch.Tensor, "__float__", lambda t: pytest.fail("host read"))
            monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("host read"))
        loss.backward(torch.tensor(g), retain_graph=True)
        monkeypatch.undo()
        torch.testing.assert_close(base.grad, (g * grad.float()).to(dtype))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward(torch.tensor(g))


def test_inplace_grad_scaled_backward_refuses_second_use(backend):
    x, y, adv, kw = make_inputs((2, 3, 37))
    _, grad = run_ours(x, y, adv, kw)
    xg = x.clone().requires_grad_()
    h = xg * 1.0
    loss = hk.fused_hapo_loss(h, y, adv, **kw, inplace_grad=True).loss
    (3.0 * loss).backward(retain_graph=True)
    torch.testing.assert_close(xg.grad, 3.0 * grad)
    with pytest.raises(RuntimeError):
        (3.0 * loss).backward()                  # the saved gradient was rescaled in place


@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_minus_inf_logits_are_nan_free(backend, importance_sampling):
    """A -inf logit (a banned token) has p = 0 and adds nothing: no NaN (design section 3)."""
    x, y, adv, kw = make_inputs((3, 4, 37), seed=5)
    banned = torch.zeros(37, dtype=torch.bool)
    banned[[3, 17, 36]] = True
    y = torch.where(banned[y.clamp(min=0)], torch.zeros_like(y), y)
    x[:, :, banned] = float("-inf")
    opts = dict(importance_sampling=importance_sampling, entropy_coef=0.01, beta=0.1)
    out, grad = run_ours(x, y, adv, kw, **opts)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert grad[:, :, banned].abs().max() == 0
    finite = torch.where(banned, torch.full_like(x, -1e4), x)   # exp(-1e4) = 0 as well
    ref, ref_grad = run_reference(finite, y, adv, kw, **opts)
    assert_close_to_reference(out, grad, ref, ref_grad)


def test_very_unlikely_targets(backend):
    """Targets with p ~ 1e-35 (below float32's comfortable range) keep exact log-probs."""
    x, y, adv, kw = make_inputs((3, 4, 37), seed=6)
    rows = torch.arange(4)
    x[0, rows, y[0].clamp(min=0)] = -90.0
    x[1, :, 5] = 60.0                          # one dominant logit in every row
    kw.update(old_logp=None, ref_logp=None)    # ratios near 1, no exp(90) KL
    opts = dict(entropy_coef=0.01, teacher_objective="sft")
    out, grad = run_ours(x, y, adv, kw, **opts)
    ref, ref_grad = run_reference(x, y, adv, kw, **opts)
    assert_close_to_reference(out, grad, ref, ref_grad)
    assert out.per_token_logp[0, 0].item() < -80


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf_row"])
@pytest.mark.parametrize("seq", [0, 1], ids=["teacher", "on_policy"])
def test_non_finite_logits_give_non_finite_loss(backend, bad, seq):
    x, y, adv, kw = make_inputs((2, 3, 37))      # sequence 0 is a teacher, 1 on-policy
    if bad == "nan":
        x[seq, 0, 5] = float("nan")
    elif bad == "inf":
        x[seq, 0, 5] = float("inf")
    else:
        x[seq, 0, :] = float("-inf")
    out = hk.fused_hapo_loss(x, y, adv, **kw)
    assert not torch.isfinite(out.loss)


def test_rewards_instead_of_advantages(backend):
    B, T, V, G = 4, 3, 37, 2
    x, y, _, kw = make_inputs((B, T, V))
    kw.pop("teacher_mask")
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0])
    inject = torch.tensor([True, False])
    out = hk.fused_hapo_loss(x, y, rewards=rewards, group_size=G, inject=inject, **kw)
    adv, replaced = hk.group_advantages(rewards, G, inject=inject)
    assert replaced.tolist() == [0, -1]
    torch.testing.assert_close(out.advantages, adv)
    assert torch.equal(out.replaced, replaced)
    teacher = torch.tensor([True, False, False, False])   # the replaced member
    ref, _ = run_reference(x, y, adv, dict(kw, teacher_mask=teacher))
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert out.teacher_fraction.item() == pytest.approx(ref.teacher_fraction.item())
    plain = hk.fused_hapo_loss(x, y, rewards=rewards, group_size=G, scale="none", **kw)
    adv_none, _ = hk.group_advantages(rewards, G, scale="none")
    torch.testing.assert_close(plain.advantages, adv_none)
    assert plain.replaced.tolist() == [-1, -1]


# --------------------------------------------------------------------------- bad input
BAD = [
    (dict(aggregation="mean"), "aggregation"),
    (dict(importance_sampling="tokens"), "importance_sampling"),
    (dict(teacher_objective="luffy"), "teacher_objective"),
    (dict(beta=0.1, ref_logp=None), "ref_logp"),
    (dict(advantages=torch.randn(4)), "advantages"),
    (dict(advantages=torch.randn(3, 4)), "advantages"),
    (dict(mask=torch.ones(3, 4)), "mask"),
    (dict(old_logp=torch.randn(3)), "old_logp"),
    (dict(ref_logp=torch.randn(2, 4)), "ref_logp"),
    (dict(teacher_mask=torch.ones(4, dtype=torch.bool)), "teacher_mask"),
    (dict(eps_low=1.0), "eps_low"),
    (dict(eps_low=-0.1), "eps_low"),
    (dict(dual_clip=1.0), "dual_clip"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(temperature=0.0), "temperature"),
    (dict(max_len=0), "max_len"),
    (dict(max_len="abc"), "max_len"),
    (dict(normalizer=-1.0), "normalizer"),
    (dict(inplace_grad="yes"), "inplace_grad"),
    (dict(target_ids=torch.full((2, 3), 37)), "target_ids"),
    (dict(rewards=torch.randn(2), group_size=2), "advantages or rewards"),
    (dict(advantages=None, rewards=torch.randn(2), group_size=3), "group_size"),
    (dict(advantages=None, rewards=torch.randn(2), group_size=1), "group_size"),
    (dict(advantages=None, rewards=torch.randn(3)), "group_size"),
    (dict(advantages=None, rewards=torch.randn(4), group_size=2), "rewards"),
    (dict(group_size=2), "group_size"),
]


@pytest.mark.parametrize("bad,name", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_raises_value_error(backend, bad, name, monkeypatch):
    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before validation finished")
    monkeypatch.setattr(hk_loss.FusedHAPOLossFunction, "apply", no_kernel)
    x = torch.randn(2, 3, 37, requires_grad=True)
    args = dict(target_ids=torch.randint(0, 37, (2, 3)), advantages=torch.randn(2),
                ref_logp=torch.randn(2, 3))
    args.update(bad)
    with pytest.raises(ValueError, match=name):
        hk.fused_hapo_loss(x, **args)


# --------------------------------------------------------------------------- property
@st.composite
def configurations(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 4))
    V = draw(st.sampled_from([2, 5, 33, 130]))
    agg, extra = draw(st.sampled_from(AGGREGATIONS))
    opts = {name: draw(st.sampled_from(vals)) for name, vals in OPTION_VALUES.items()}
    opts.update(aggregation=agg, **extra,
                eps_low=draw(st.sampled_from([0.0, 0.1, 0.2])),
                eps_high=draw(st.sampled_from([0.0, 0.28, 2.0])),
                teacher_gamma=draw(st.sampled_from([0.1, 1.0])),
                sft_weight=draw(st.sampled_from([1.0, 0.5])))
    inputs = dict(old=draw(st.booleans()), per_token_adv=draw(st.booleans()),
                  per_token_teacher=draw(st.booleans()), seed=draw(st.integers(0, 10_000)))
    return (B, T, V), with_own_ratio(opts), inputs


def _property(shape, opts, inputs):
    x, y, adv, kw = make_inputs(shape, **inputs)
    out, grad = run_ours(x, y, adv, kw, **opts)
    ref, ref_grad = run_reference(x, y, adv, kw, **opts)
    assert_close_to_reference(out, grad, ref, ref_grad,
                              upstream=reference_upstream(x, y, adv, kw, **opts))


# A KL gradient w beta (1 - exp(ref - logp)) far smaller than w beta (found by hypothesis).
KL_CANCELLATION = ((1, 1, 2), dict(beta=0.1, temperature=0.7, aggregation="token-mean",
                                   eps_low=0.0, eps_high=0.0, teacher_gamma=1.0),
                   dict(old=False, per_token_adv=False, per_token_teacher=False, seed=1))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(configurations())
@example(KL_CANCELLATION)
def test_property_random_configurations_cpu(cfg):
    with force_backend("cpu"):
        _property(*cfg)


@pytest.mark.kernel
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(configurations())
def test_property_random_configurations_triton(cfg):
    with force_backend("triton"):
        _property(*cfg)


def test_masked_first_vocabulary_block(backend):
    """A row whose first 4096-column block is all -inf (a masked vocabulary range)."""
    x, y, adv, kw = make_inputs((2, 2, 4099))
    x[:, :, :4096] = float("-inf")
    y = torch.randint(4096, 4099, (2, 2))
    out, grad = run_ours(x, y, adv, kw)
    ref, ref_grad = run_reference(x, y, adv, kw)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert_close_to_reference(out, grad, ref, ref_grad)


# --------------------------------------------------------------------------- launch grid
@pytest.mark.kernel
@pytest.mark.parametrize("k", [1, 4, 64])          # 64 programs > 15 rows: min(rows, k*SMs)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_grid_matches_reference(k, dtype, poisoned_buffers):
    """k programs per SM (1 SM under the interpreter), each looping over many rows: every
    row written (poisoned buffers), the same numbers as the reference, in place too."""
    from hapo_kernels.triton.rows import persistent_rows
    x, y, adv, kw = make_inputs((3, 5, 4099), dtype=dtype, seed=11)
    opts = dict(beta=0.1, entropy_coef=0.01, dual_clip=3.0)
    ref, ref_grad = run_reference(x, y, adv, kw, **opts)
    with force_backend("triton"), persistent_rows(k):
        out, grad = run_ours(x, y, adv, kw, **opts)
        xi = x.clone().requires_grad_()
        h = xi * 1.0
        inplace = hk.fused_hapo_loss(h, y, adv, **kw, **opts, inplace_grad=True)
        inplace.loss.backward()
    assert torch.isfinite(grad).all() and torch.isfinite(out.per_token_logp).all()
    assert_close_to_reference(out, grad, ref, ref_grad, dtype)
    assert inplace.loss.item() == out.loss.item()
    torch.testing.assert_close(xi.grad, grad, rtol=0, atol=0)


@pytest.mark.kernel
def test_persistent_grid_is_bit_identical_to_one_program_per_row():
    """Each row is computed the same way whichever program runs it."""
    from hapo_kernels.triton.rows import persistent_rows
    x, y, adv, kw = make_inputs((2, 7, 300), seed=12)
    with force_backend("triton"):
        out, grad = run_ours(x, y, adv, kw, beta=0.1)
        with persistent_rows(3):
            out_p, grad_p = run_ours(x, y, adv, kw, beta=0.1)
    assert torch.equal(grad, grad_p) and torch.equal(out.per_token_logp, out_p.per_token_logp)
    assert out.loss.item() == out_p.loss.item()


def test_persistent_grid_settings(monkeypatch):
    from hapo_kernels.triton import rows
    cpu = torch.device("cpu")
    monkeypatch.delenv("HAPO_PROGRAMS_PER_SM", raising=False)
    assert rows.row_grid(100, cpu) == (100,)
    with rows.persistent_rows(4):
        assert rows.row_grid(100, cpu) == (4,) and rows.row_grid(3, cpu) == (3,)
        assert rows.row_grid(0, cpu) == (1,)
    monkeypatch.setenv("HAPO_PROGRAMS_PER_SM", "2")
    assert rows.row_grid(100, cpu) == (2,)
    with rows.persistent_rows(None):            # falls back to the environment
        assert rows.row_grid(100, cpu) == (2,)
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("HAPO_PROGRAMS_PER_SM", bad)
        with pytest.raises(ValueError, match="HAPO_PROGRAMS_PER_SM"):
            rows.row_grid(100, cpu)
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="persistent_rows"):
            with rows.persistent_rows(bad):
                pass


# --------------------------------------------------------------------------- on CUDA
# The compiled kernels at realistic sizes, against float64 on the same device: run where a
# GPU is present (bench/gpu_check.sh), skipped elsewhere.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device")
CUDA = "cuda"


def _cuda_inputs(B, T, V, dtype, seed=0, strided=False):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    full = (torch.randn(B, T + 1, V, generator=g, device=CUDA) * 2).to(dtype)
    x = full[:, :-1] if strided else full[:, :-1].contiguous()
    y = torch.randint(0, V, (B, T), generator=g, device=CUDA)
    mask = (torch.rand(B, T, generator=g, device=CUDA) > 0.1).float()
    mask[-1] = 0
    logp, _ = R.log_probs(x.double(), y)
    old = (logp + 0.3 * torch.randn(B, T, generator=g, device=CUDA, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, device=CUDA, dtype=torch.float64)).float()
    teacher = torch.zeros(B, dtype=torch.bool, device=CUDA)
    teacher[0] = True
    adv = torch.randn(B, generator=g, device=CUDA)
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


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(importance_sampling="sequence", beta=0.04, entropy_coef=0.01, aggregation="grpo"),
    dict(teacher_objective="sft", dual_clip=3.0, temperature=0.7, aggregation="dr_grpo"),
    dict(teacher_objective="ratio", beta=0.1, entropy_coef=0.02, aggregation="dapo"),
])
@pytest.mark.parametrize("strided", [False, True])
def test_cuda_loss_matches_reference(dtype, opts, strided):
    full, x, y, adv, kw = _cuda_inputs(4, 96, 32003, dtype, strided=strided)
    fg = full.clone().requires_grad_() if strided else None
    xg = fg[:, :-1] if strided else x.clone().requires_grad_()
    out = hk.fused_hapo_loss(xg, y, adv, **kw, **opts)
    out.loss.backward()
    grad = fg.grad[:, :-1] if strided else xg.grad
    _check(x, y, adv, kw, grad, out, opts, dtype)


@pytest.mark.cuda
@needs_cuda
def test_cuda_large_vocab_bf16_inplace():
    _, x, y, adv, kw = _cuda_inputs(2, 64, 151936, torch.bfloat16, seed=1)
    xg = x.clone().requires_grad_()
    out = hk.fused_hapo_loss(xg, y, adv, **kw, beta=0.04)
    out.loss.backward()
    h = x.clone().requires_grad_()
    h2 = h * 1.0
    out2 = hk.fused_hapo_loss(h2, y, adv, **kw, beta=0.04, inplace_grad=True)
    out2.loss.backward()
    torch.testing.assert_close(h.grad, xg.grad)
    _check(x, y, adv, kw, xg.grad, out, dict(beta=0.04), torch.bfloat16)


@pytest.mark.cuda
@needs_cuda
def test_cuda_more_rows_than_grid_limit():
    """70,000 rows: a 1-D grid over rows (no 65,535 limit), packed [N, V]."""
    N, V = 70_000, 64
    g = torch.Generator(device=CUDA).manual_seed(2)
    x = torch.randn(N, V, generator=g, device=CUDA)
    y = torch.randint(0, V, (N,), generator=g, device=CUDA)
    adv = torch.randn(N, generator=g, device=CUDA)
    xg = x.clone().requires_grad_()
    out = hk.fused_hapo_loss(xg, y, adv, entropy_coef=0.01)
    out.loss.backward()
    assert torch.isfinite(xg.grad).all()
    _check(x, y, adv, {}, xg.grad, out, dict(entropy_coef=0.01), torch.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("k", [1, 2])
def test_cuda_persistent_grid_large_vocab_bf16(k):
    """Programs looping over rows (triton/rows.py): bit-identical to one program per row."""
    from hapo_kernels.triton.rows import persistent_rows
    _, x, y, adv, kw = _cuda_inputs(4, 200, 151936, torch.bfloat16, seed=3)
    xg = x.clone().requires_grad_()
    out = hk.fused_hapo_loss(xg, y, adv, **kw, beta=0.04, entropy_coef=0.01)
    out.loss.backward()
    xp = x.clone().requires_grad_()
    with persistent_rows(k):
        out_p = hk.fused_hapo_loss(xp, y, adv, **kw, beta=0.04, entropy_coef=0.01)
    out_p.loss.backward()
    assert torch.equal(xp.grad, xg.grad) and out_p.loss.item() == out.loss.item()
    _check(x, y, adv, kw, xp.grad, out_p, dict(beta=0.04, entropy_coef=0.01), torch.bfloat16)



FUSED_KERNEL_CONFIGS = [  # token-level options the one-pass kernel runs (no statistics pass)
    dict(objective=o, delta=d, kl_bias_correction=k, beta=0.1, rollout_is=r, dtype=dt)
    for (o, d, k, r), dt in zip(itertools.product(
        ["clip", "cispo", "sapo"], [None, 0.9, 1.1, 2.0], [False, True],
        [None, "token", "sequence"]), itertools.cycle([torch.float32, torch.bfloat16]))
    if o == "clip" or d is None]


@pytest.mark.parametrize("cfg", FUSED_KERNEL_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_one_pass_options_match_reference(backend, cfg):
    """delta, SAPO, the bias-corrected KL and rollout importance weights stay one pass."""
    cfg = dict(cfg)
    dtype, rollout_is = cfg.pop("dtype"), cfg.pop("rollout_is")
    opts = dict(cfg, eps_high=0.28, sapo_temperature_neg=1.7)
    assert not hk.LossOptions(**opts).statistics_first
    x, y, adv, kw = make_inputs((3, 5, 37), dtype=dtype, rollout_is=rollout_is, seed=7)
    out, grad = run_ours(x, y, adv, kw, **opts)
    ref, ref_grad = run_reference(x, y, adv, kw, **opts)
    assert_close_to_reference(out, grad, ref, ref_grad, dtype)


@pytest.mark.parametrize("opts, kw_extra, word", [
    (dict(delta=0.0), {}, "delta"),
    (dict(sapo_temperature_pos=-1.0), {}, "sapo_temperature_pos"),
    (dict(top_entropy_quantile=1.5), {}, "top_entropy_quantile"),
    (dict(kl_bias_correction=1), {}, "kl_bias_correction"),
    (dict(entropy_mean="yes"), {}, "entropy_mean"),
    (dict(), dict(rollout_is_weights=-torch.ones(3, 5)), "rollout_is_weights"),
    (dict(), dict(rollout_is_weights=torch.ones(3, 4)), "rollout_is_weights"),
    (dict(objective="vespo"), dict(rollout_is_weights=torch.ones(3)), "rollout_is_weights"),
    (dict(), dict(sampling_logp=torch.zeros(3)), "sampling_logp"),
    (dict(objective="geo_mean"), {}, "importance_sampling='sequence'"),
    (dict(objective="geo_mean", importance_sampling="sequence_token"), {},
     "importance_sampling='sequence'"),
])
def test_bad_trl_options_raise(opts, kw_extra, word):
    x, y, adv, kw = make_inputs((3, 5, 11))
    with pytest.raises(ValueError, match=word):
        hk.fused_hapo_loss(x, y, adv, **kw, **kw_extra, **opts)


# --------------------------------------------------------------------------- refusals
def test_inplace_grad_refuses_a_leaf(backend):
    """A leaf that requires grad would have its data silently replaced by its gradient."""
    x, y, adv, kw = make_inputs((2, 3, 37))
    leaf = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="inplace_grad.*leaf"):
        hk.fused_hapo_loss(leaf, y, adv, **kw, inplace_grad=True)
    assert torch.equal(leaf.detach(), x)
    with torch.no_grad():                      # nothing would be written: accepted
        hk.fused_hapo_loss(leaf, y, adv, **kw, inplace_grad=True)


@pytest.mark.parametrize("layout", ["expand", "as_strided"])
def test_inplace_grad_refuses_memory_that_overlaps_itself(backend, layout):
    """Two rows sharing memory: gradients written over logits later rows still read (a
    wrong gradient, and on the kernels a wrong loss)."""
    x, y, adv, kw = make_inputs((2, 3, 37))
    base = x[:1].clone().requires_grad_() if layout == "expand" else \
        x.reshape(-1)[:4 * 37].clone().requires_grad_()
    h = base * 1.0
    view = h.expand(2, 3, 37) if layout == "expand" else \
        h.as_strided((2, 3, 37), (37, 18, 1))          # rows 18 elements apart: overlap
    before = h.detach().clone()
    with pytest.raises(ValueError, match="inplace_grad.*share"):
        hk.fused_hapo_loss(view, y, adv, **kw, inplace_grad=True)
    assert torch.equal(h.detach(), before)
    out = hk.fused_hapo_loss(view, y, adv, **kw)          # read-only use stays fine
    ref = hk.fused_hapo_loss(view.detach().contiguous(), y, adv, **kw)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)


def test_overlaps_itself_by_stride_analysis():
    from hapo_kernels.layout import overlaps_itself
    x = torch.zeros(4, 6, 10)
    assert not overlaps_itself(x) and not overlaps_itself(x[:, :-1])
    assert not overlaps_itself(x.transpose(0, 1)) and not overlaps_itself(x[::2, 1:, :5])
    assert not overlaps_itself(torch.zeros(0, 3, 5).expand(0, 3, 5))
    assert overlaps_itself(x[:1].expand(4, 6, 10))
    assert overlaps_itself(x.reshape(-1).as_strided((3, 10), (5, 1)))
    assert not overlaps_itself(x.reshape(-1).as_strided((3, 10), (10, 1)))


@pytest.mark.parametrize("fn", ["loss", "logprobs", "linear_loss", "linear_logprobs"])
def test_second_order_gradients_are_refused(backend, fn):
    """A gradient penalty differentiates the gradient: it would have been a constant (its
    second derivative silently zero). Now a RuntimeError."""
    x, y, adv, kw = make_inputs((2, 3, 37))
    if fn.startswith("linear"):
        h = torch.randn(2, 3, 8, requires_grad=True)
        w = torch.randn(37, 8, requires_grad=True)
        wrt = h
        out = (hk.fused_linear_hapo_loss(h, w, y, adv, **kw).loss if fn == "linear_loss"
               else hk.fused_linear_selective_log_softmax(h, w, y).sum())
    else:
        wrt = x.clone().requires_grad_()
        out = (hk.fused_hapo_loss(wrt, y, adv, **kw).loss if fn == "loss"
               else hk.selective_log_softmax(wrt, y).sum())
    with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
        (grad,) = torch.autograd.grad(out, wrt, create_graph=True, retain_graph=True)
        torch.autograd.grad(grad.pow(2).sum() + out, wrt)
    (grad,) = torch.autograd.grad(out, wrt)             # first order stays as it was
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["old_logp", "ref_logp", "advantages"])
@pytest.mark.parametrize("bad", [float("-inf"), float("inf"), float("nan")])
def test_non_finite_per_token_inputs(backend, name, bad):
    """old_logp = -inf on a counted token made the ratio infinite: NaN gradients on the CPU
    path, 0 on the kernels. Now a ValueError naming the argument on both; on a masked
    token the value is never read, and both backends agree."""
    x, y, adv, kw = make_inputs((2, 3, 37), old=True)
    kw = {**kw, "ref_logp": -torch.rand(2, 3), "beta": 0.1, "mask": torch.ones(2, 3)}
    args = {"old_logp": kw["old_logp"], "ref_logp": kw["ref_logp"],
            "advantages": adv[:, None].expand(2, 3).clone()}
    args[name][1, 2] = bad
    kw.update(old_logp=args["old_logp"], ref_logp=args["ref_logp"])
    with pytest.raises(ValueError, match=rf"{name}\[1, 2\]"):
        hk.fused_hapo_loss(x.clone().requires_grad_(), y, args["advantages"], **kw)
    kw["mask"][1, 2] = 0
    out, grad = run_ours(x, y, args["advantages"], kw)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    clean = {k: v.clone() for k, v in args.items()}
    clean[name][1, 2] = 0.0
    kw.update(old_logp=clean["old_logp"], ref_logp=clean["ref_logp"])
    want, want_grad = run_ours(x, y, clean["advantages"], kw)
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, want_grad)


def test_value_checks_can_be_turned_off(backend, monkeypatch):
    """``hk.value_checks(False)``: no check reads a tensor value on the host (a CUDA call
    launches without waiting); the default still refuses a bad target id."""
    x, y, adv, kw = make_inputs((2, 3, 37))
    _, grad = run_ours(x, y, adv, kw)
    bad = y.clone()
    bad[0, 0] = 37
    with pytest.raises(ValueError, match="target_ids"):
        hk.fused_hapo_loss(x, bad, adv, **kw)
    with hk.value_checks(False):
        xg = x.clone().requires_grad_()
        out = hk.fused_hapo_loss(xg, y, adv, **kw)
        reads = []
        for name, value in (("__bool__", True), ("__float__", 0.0), ("__int__", 0),
                            ("item", 0), ("tolist", [])):
            monkeypatch.setattr(torch.Tensor, name,
                                lambda t, value=value: reads.append(t) or value)
        hk.fused_hapo_loss(x.clone().requires_grad_(), y, adv, **kw)
        monkeypatch.undo()
        out.loss.backward()
    assert reads == [] or backend == "cpu"      # the CPU path itself reads values (no sync)
    torch.testing.assert_close(xg.grad, grad)
    with pytest.raises(ValueError, match="enabled"):
        hk.value_checks("no")
