"""``hapo_kernels.compat.liger`` against the real Liger-Kernel 0.8.5: the same call gives the
same loss, metrics and gradients.

``triton_grpo_loss``: Liger's Triton kernels run through Triton's interpreter
(``-m kernel``, ``TRITON_INTERPRET=1``), ours on both backends. ``LigerFusedLinearGRPOLoss``:
Liger's chunked torch module (``compiled=False``) on CPU, ours on both backends.
liger-kernel is in the dev extra that ``make setup`` installs: a missing one must fail.
"""
import pytest
import torch
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss as LigerModule

from hapo_kernels.compat import liger as compat

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

B, T, V, H = 3, 6, 37, 16
FAMILY = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]
TOKEN_ONLY = ("cispo", "sapo", "vespo")       # Liger rejects sequence level for these


def inputs(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T + 1, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(torch.int64)
    mask[:, 0] = 1
    adv = torch.randn(B, generator=g)
    # Log-probs near the policy's, so that ratios straddle the clip range.
    with torch.no_grad():
        lp = torch.log_softmax(logits[:, :-1].float() / 0.9, -1).gather(-1, ids[..., None])[..., 0]
    old = (lp + 0.3 * torch.randn(B, T, generator=g)).contiguous()
    ref = (lp + 0.3 * torch.randn(B, T, generator=g)).contiguous()
    return logits, ids, mask, adv, old, ref


def run_triton_grpo_loss(fn, logits, *args, reduce, upstream=None, inplace=False, **kwargs):
    x = logits.clone().requires_grad_()
    out = fn(x, *args, reduce=reduce, inplace=inplace, **kwargs)
    if reduce:
        loss, metrics = out
        loss.backward()
        return loss.detach(), [m.detach() for m in metrics], x.grad
    per_token, kl, clipped = out
    (per_token * upstream).sum().backward()
    return per_token.detach(), (None if kl is None else kl.detach(), clipped), x.grad


def close(a, b, what):
    # bf16 results (a bf16 gradient) agree to a couple of bf16 roundings, fp32 to ~1e-5.
    tol = 8e-3 if torch.bfloat16 in (a.dtype, b.dtype) else 2e-5
    torch.testing.assert_close(a.float(), b.float(), rtol=10 * tol,
                               atol=tol * max(1.0, b.float().abs().max().item()),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.kernel
@pytest.mark.parametrize("loss_type", FAMILY)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta, use_old", [(0.0, True), (0.04, True), (0.04, False)])
def test_triton_grpo_loss_reduced_equals_liger(backend, loss_type, level, beta, use_old):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger_fn
    if loss_type in TOKEN_ONLY and level == "sequence":
        with pytest.raises(ValueError, match="Sequence-level importance sampling"):
            compat.triton_grpo_loss(*inputs(0)[:1], None, None, *inputs(0)[1:2],
                                    inputs(0)[3], importance_sampling_level=level,
                                    loss_type=loss_type)
        return
    logits, ids, mask, adv, old, ref = inputs(1)
    args = (old if use_old else None, ref, ids, adv, mask)
    kwargs = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta,
                  eps_high=3.0 if loss_type == "cispo" else 0.28,
                  max_completion_length=9 if loss_type == "dr_grpo" else None)
    theirs = run_triton_grpo_loss(liger_fn, logits, *args, reduce=True, **kwargs)
    ours = run_triton_grpo_loss(compat.triton_grpo_loss, logits, *args, reduce=True, **kwargs)
    close(ours[0], theirs[0], "loss")
    assert len(ours[1]) == len(theirs[1]) == (2 if beta else 1)
    for a, b in zip(ours[1], theirs[1]):
        close(a, b, "metrics")
    if loss_type == "luspo":
        # Liger 0.8.5's reduced luspo backward reads a [B, 1] upstream gradient with [B, L]
        # indexing (past its end); its per-token path, given luspo's weights n_b / (B L),
        # gives the gradient of the same loss.
        upstream = mask.sum(-1, keepdim=True).double().expand(B, T) / (B * T)
        theirs = run_triton_grpo_loss(liger_fn, logits, *args, reduce=False,
                                      upstream=upstream, **kwargs)
    close(ours[2], theirs[2], "gradient")
    assert torch.count_nonzero(ours[2][:, -1]) == 0


@pytest.mark.kernel
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence"),
                                              ("cispo", "token")])
def test_triton_grpo_loss_per_token_equals_liger(backend, loss_type, level, inplace):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger_fn
    logits, ids, mask, adv, old, ref = inputs(2)
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(5))
    kwargs = dict(loss_type=loss_type, importance_sampling_level=level,
                  eps_high=3.0 if loss_type == "cispo" else 0.4)
    theirs = run_triton_grpo_loss(liger_fn, logits, old, ref, ids, adv, mask, reduce=False,
                                  upstream=upstream, **kwargs)
    ours = run_triton_grpo_loss(compat.triton_grpo_loss, logits, old, ref, ids, adv[:, None],
                                mask, reduce=False, upstream=upstream, inplace=inplace,
                                **kwargs)
    close(ours[0], theirs[0], "per-token loss")
    close(ours[1][0], theirs[1][0], "per-token kl")
    assert torch.equal(ours[1][1], theirs[1][1])
    assert ours[0].dtype == ours[1][1].dtype == torch.float32
    close(ours[2], theirs[2], "gradient")


@pytest.mark.kernel
@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence"),
                                              ("sapo", "token"), ("vespo", "token"),
                                              ("cispo", "token")])
@pytest.mark.parametrize("ratio_shape", [None, (B, T), (B, 1), (B,)])
def test_triton_grpo_loss_vllm_ratio_and_bias_corrected_kl_equal_liger(
        backend, loss_type, level, ratio_shape):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger_fn
    logits, ids, mask, adv, old, ref = inputs(8)
    g = torch.Generator().manual_seed(9)
    ratio = None if ratio_shape is None else torch.rand(ratio_shape, generator=g) * 1.5 + 0.2
    if ratio_shape == (B, T):   # 1 on padding, as TRL makes it (see the module docstring)
        ratio = torch.where(mask.bool(), ratio, 1.0)
    kwargs = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                  use_bias_correction_kl=True, vllm_is_ratio=ratio,
                  eps_high=3.0 if loss_type == "cispo" else 0.28,
                  sapo_temperature_pos=0.9, sapo_temperature_neg=1.2, vespo_k_pos=1.5,
                  vespo_lambda_neg=2.5)
    theirs = run_triton_grpo_loss(liger_fn, logits, old, ref, ids, adv, mask, reduce=True,
                                  **kwargs)
    ours = run_triton_grpo_loss(compat.triton_grpo_loss, logits, old, ref, ids, adv, mask,
                                reduce=True, **kwargs)
    close(ours[0], theirs[0], "loss")
    for a, b in zip(ours[1], theirs[1]):
        close(a, b, "metrics")
    close(ours[2], theirs[2], "gradient")


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_grpo_loss_inplace_and_delta_equal_liger(backend, dtype):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger_fn
    logits, ids, mask, adv, old, ref = inputs(3, dtype)
    grads = []
    for fn in (liger_fn, compat.triton_grpo_loss):
        x = logits.clone().requires_grad_()
        loss, _ = fn(x, old, ref, ids, adv, mask, reduce=True, delta=1.6,
                     num_items_in_batch=40)
        loss.backward()
        grads.append((loss.detach(), x.grad))
        if fn is compat.triton_grpo_loss:     # inplace=True: the logits hold the gradient
            assert x.grad.data_ptr() == x.data_ptr()
    close(grads[1][0], grads[0][0], "loss")
    close(grads[1][1], grads[0][1], "gradient")


def test_triton_grpo_loss_defaults_and_signature_are_liger_s():
    import inspect

    from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger_fn
    ours, theirs = (inspect.signature(f) for f in (compat.triton_grpo_loss, liger_fn))
    assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == \
        [(p.name, p.default, p.kind) for p in theirs.parameters.values()]
    ours, theirs = (inspect.signature(c.__init__) for c in (compat.LigerFusedLinearGRPOLoss,
                                                            LigerModule))
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]
    ours, theirs = (inspect.signature(c.forward) for c in (compat.LigerFusedLinearGRPOLoss,
                                                           LigerModule))
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]


def linear_inputs(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(torch.int64)
    mask[:, 0] = 1
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax((hidden.float() @ weight.float().T + bias.float()), -1)
        lp = lp.gather(-1, ids[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.3 * torch.randn(B, T, generator=g)
    return hidden, weight, bias, ids, mask, adv, old, ref


def run_module(module, hidden, weight, bias, *args, **kwargs):
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss, metrics = module(h, w, *args[:3], bias=b, **kwargs)
    loss.backward()
    return loss.detach(), [m.detach() for m in metrics], (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("loss_type", FAMILY)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_fused_linear_grpo_loss_equals_liger(backend, loss_type, level, beta):
    kwargs = dict(beta=beta, loss_type=loss_type, importance_sampling_level=level,
                  epsilon_high=3.0 if loss_type == "cispo" else 0.28, temperature=0.9,
                  max_completion_length=9 if loss_type == "dr_grpo" else None)
    unsupported = (loss_type in TOKEN_ONLY and level == "sequence") or (
        loss_type == "luspo" and (level == "token" or beta != 0.0))
    if unsupported:
        with pytest.raises(ValueError):
            compat.LigerFusedLinearGRPOLoss(**kwargs)
        return
    hidden, weight, bias, ids, mask, adv, old, ref = linear_inputs(4)
    call = dict(ref_per_token_logps=ref, old_per_token_logps=old)
    theirs = run_module(LigerModule(compiled=False, **kwargs), hidden, weight, bias, ids, mask,
                        adv, **call)
    ours = run_module(compat.LigerFusedLinearGRPOLoss(**kwargs), hidden, weight, bias, ids,
                      mask, adv, **call)
    close(ours[0], theirs[0], "loss")
    assert len(ours[1]) == len(theirs[1])
    for a, b in zip(ours[1], theirs[1]):
        close(a, b, "metrics")
    for a, b, name in zip(ours[2], theirs[2], ("hidden", "weight", "bias")):
        close(a, b, f"gradient of {name}")


@pytest.mark.parametrize("loss_type", ["dapo", "sapo", "vespo"])
def test_fused_linear_grpo_loss_options_equal_liger(backend, loss_type):
    hidden, weight, bias, ids, mask, adv, old, ref = linear_inputs(6)
    ratio = torch.rand(B, T, generator=torch.Generator().manual_seed(2)) + 0.5
    # 1 on padding, as TRL makes it (VESPO: Liger sums log r over padded positions too).
    ratio = torch.where(mask.bool(), ratio, 1.0)
    kwargs = dict(beta=0.04, loss_type=loss_type, delta=1.5, use_bias_correction_kl=True,
                  epsilon_high=0.28, sapo_temperature_neg=1.3, vespo_k_neg=2.0)
    call = dict(ref_per_token_logps=ref, old_per_token_logps=old, vllm_is_ratio=ratio,
                num_items_in_batch=31)
    theirs = run_module(LigerModule(compiled=False, **kwargs), hidden, weight, bias, ids, mask,
                        adv, **call)
    ours = run_module(compat.LigerFusedLinearGRPOLoss(**kwargs), hidden, weight, bias, ids,
                      mask, adv, **call)
    close(ours[0], theirs[0], "loss")
    for a, b in zip(ours[1], theirs[1]):
        close(a, b, "metrics")
    for a, b, name in zip(ours[2], theirs[2], ("hidden", "weight", "bias")):
        close(a, b, f"gradient of {name}")


def test_fused_linear_grpo_loss_ref_input_and_no_reference(backend):
    hidden, weight, bias, ids, mask, adv, old, ref = linear_inputs(5)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    for use_ref, call in ((True, dict(ref_input=ref_hidden, ref_weight=weight, ref_bias=bias)),
                          (False, dict(num_items_in_batch=25))):
        theirs = run_module(LigerModule(compiled=False, beta=0.1, use_ref_model=use_ref),
                            hidden, weight, bias, ids, mask, adv, old_per_token_logps=old,
                            **call)
        ours = run_module(compat.LigerFusedLinearGRPOLoss(beta=0.1, use_ref_model=use_ref),
                          hidden, weight, bias, ids, mask, adv, old_per_token_logps=old,
                          **call)
        close(ours[0], theirs[0], "loss")
        for a, b in zip(ours[1], theirs[1]):
            close(a, b, "metrics")
        for a, b in zip(ours[2], theirs[2]):
            close(a, b, "gradients")
    with pytest.raises(ValueError, match="ref_per_token_logps or ref_input must be provided"):
        compat.LigerFusedLinearGRPOLoss()(hidden, weight, ids, mask, adv)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="ppo"), "not one of Liger's loss types"),
    (dict(loss_type="sapo", delta=1.5), "delta .* not supported for loss_type='sapo'"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), "Sequence-level"),
    (dict(beta=0.04, ref_logp=None), "beta != 0 needs ref_logp"),
])
def test_what_liger_rejects_is_rejected(kwargs, match):
    logits, ids, mask, adv, old, ref = inputs(6)
    kwargs = dict(kwargs)
    ref = kwargs.pop("ref_logp", ref)
    with pytest.raises(ValueError, match=match):
        compat.triton_grpo_loss(logits, old, ref, ids, adv, mask, **kwargs)


def test_liger_weights_are_liger_s_reductions():
    from liger_kernel.transformers.grpo_loss import _reduce_grpo_loss
    g = torch.Generator().manual_seed(7)
    per_token = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    per_token = per_token * mask                      # Liger's kernel writes 0 where masked
    for loss_type in FAMILY:
        for max_len, items in ((None, None), (11, 30)):
            w = compat.liger_weights(mask, loss_type, max_len, items)
            want = _reduce_grpo_loss(per_token, mask, loss_type, max_len, items)
            assert (w.double() * per_token).sum().item() == pytest.approx(want.item(), rel=1e-6)
