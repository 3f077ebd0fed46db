"""Packed input with ``cu_seqlens`` equals the right-padded batch.

The same sequences are laid out twice: packed ``[N, V]`` with ``cu_seqlens`` and padded
``[S, max_len, V]`` with a mask. Loss, gradients, per-token outputs and metrics must agree
for every aggregation, both importance-sampling levels, teacher flags, per-sequence and
per-token advantages, and with ``rewards=`` (SSI); the padded batch is itself held to the
float64 reference by tests/test_loss.py, and here once more.
"""
import pytest
import torch

import hapo_kernels as hk
from hapo_kernels import reference as R

V = 11
LENGTHS = [3, 1, 5, 0, 4, 2]            # an empty sequence too: a fully masked padded row
METRICS = ("logp", "entropy", "kl", "clip_low", "clip_high", "ratio", "teacher_fraction")


def make_batch(dtype=torch.float32, lengths=LENGTHS):
    S, L = len(lengths), max(lengths)
    N = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    seq = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    pos = torch.arange(N) - cu.long()[seq]
    logits = (torch.randn(N, V) * 2).to(dtype)
    targets = torch.randint(0, V, (N,))
    targets[2] = -100                                  # an ignored token
    mask = torch.ones(N, dtype=torch.long)
    mask[7] = 0                                        # a masked token
    per_token = dict(old_logp=-torch.rand(N) * 3, ref_logp=-torch.rand(N) * 3,
                     token_adv=torch.randn(N))
    per_seq = dict(adv=torch.randn(S), teacher=torch.tensor([0, 1, 0, 0, 1, 0]).bool()[:S],
                   rewards=(torch.rand(S) > 0.6).float())
    return dict(S=S, L=L, N=N, cu=cu, seq=seq, pos=pos, logits=logits, targets=targets,
                mask=mask, **per_token, **per_seq)


def pad(b, x, fill=0):
    """``[N, ...]`` packed -> ``[S, L, ...]`` padded."""
    out = torch.full((b["S"], b["L"]) + tuple(x.shape[1:]), fill, dtype=x.dtype)
    out[b["seq"], b["pos"]] = x
    return out


def unpad(b, x):
    return x[b["seq"], b["pos"]]


def run(logits, **kw):
    leaf = logits.detach().clone().requires_grad_()
    out = hk.fused_hapo_loss(leaf, **kw)
    out.loss.backward()
    return out, leaf.grad


def assert_same(b, packed, padded, grad_packed, grad_padded, tol=1e-5):
    torch.testing.assert_close(packed.loss, padded.loss, rtol=tol, atol=1e-6)
    torch.testing.assert_close(grad_packed, unpad(b, grad_padded), rtol=tol, atol=1e-6)
    # Padding positions of the padded batch get no gradient (nothing is lost by packing).
    assert float(grad_padded.abs().sum()) == pytest.approx(float(grad_packed.abs().sum()),
                                                           rel=1e-5)
    torch.testing.assert_close(packed.per_token_logp, unpad(b, padded.per_token_logp))
    torch.testing.assert_close(packed.per_token_entropy, unpad(b, padded.per_token_entropy))
    for name in METRICS:
        p, q = getattr(packed, name), getattr(padded, name)
        assert (p is None) == (q is None), name
        if p is not None:
            torch.testing.assert_close(p, q, rtol=tol, atol=1e-6, msg=name)


AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm", "grpo", "dr_grpo", "bnpo", "dapo"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("importance_sampling", ["token", "sequence", "geo_mean"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_packed_equals_padded(backend, aggregation, importance_sampling, per_token_adv):
    """"geo_mean": GMPO's own sequence ratio (objective="geo_mean")."""
    b = make_batch()
    ratio = dict(objective="geo_mean", importance_sampling="sequence") \
        if importance_sampling == "geo_mean" else dict(importance_sampling=importance_sampling)
    opts = dict(aggregation=aggregation, **ratio, beta=0.05,
                entropy_coef=0.01, eps_low=0.1, eps_high=0.1, temperature=0.9,
                teacher_objective="shaped")
    adv_packed = b["token_adv"] if per_token_adv else b["adv"]
    adv_padded = pad(b, b["token_adv"]) if per_token_adv else b["adv"]
    packed, gp = run(b["logits"], target_ids=b["targets"], advantages=adv_packed,
                     mask=b["mask"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
                     teacher_mask=b["teacher"], cu_seqlens=b["cu"], **opts)
    padded, gq = run(pad(b, b["logits"]), target_ids=pad(b, b["targets"], -100),
                     advantages=adv_padded, mask=pad(b, b["mask"]),
                     old_logp=pad(b, b["old_logp"]), ref_logp=pad(b, b["ref_logp"]),
                     teacher_mask=b["teacher"], **opts)
    assert_same(b, packed, padded, gp, gq)
    assert packed.clip_low + packed.clip_high > 0        # the clip branches are exercised

    # ... and the padded batch is the float64 reference's.
    x64 = pad(b, b["logits"]).double().requires_grad_()
    ref = R.hapo_loss(x64, pad(b, b["targets"], -100), adv_padded.double(),
                      mask=pad(b, b["mask"]), old_logp=pad(b, b["old_logp"]),
                      ref_logp=pad(b, b["ref_logp"]), teacher_mask=b["teacher"], **opts)
    ref.loss.backward()
    torch.testing.assert_close(packed.loss.double(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp.double(), unpad(b, x64.grad), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("teacher_objective", ["shaped", "sft", "ratio"])
def test_packed_teacher_objectives_and_max_len(backend, teacher_objective):
    b = make_batch()
    opts = dict(aggregation="dr_grpo", max_len=9, teacher_objective=teacher_objective,
                importance_sampling="sequence")
    packed, gp = run(b["logits"], target_ids=b["targets"], advantages=b["adv"],
                     mask=b["mask"], old_logp=b["old_logp"], teacher_mask=b["teacher"],
                     cu_seqlens=b["cu"], **opts)
    padded, gq = run(pad(b, b["logits"]), target_ids=pad(b, b["targets"], -100),
                     advantages=b["adv"], mask=pad(b, b["mask"]),
                     old_logp=pad(b, b["old_logp"]), teacher_mask=b["teacher"], **opts)
    assert_same(b, packed, padded, gp, gq)


def test_packed_bf16(backend):
    b = make_batch(torch.bfloat16)
    kw = dict(advantages=b["adv"], teacher_mask=b["teacher"], aggregation="grpo",
              importance_sampling="sequence")
    packed, gp = run(b["logits"], target_ids=b["targets"], cu_seqlens=b["cu"],
                     old_logp=b["old_logp"], **kw)
    padded, gq = run(pad(b, b["logits"]), target_ids=pad(b, b["targets"], -100),
                     old_logp=pad(b, b["old_logp"]), **kw)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp.float(), unpad(b, gq).float(), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("stats", ["all", "on-policy"])
def test_packed_rewards_and_ssi(backend, stats):
    """``rewards=`` per sequence: advantages, replaced members and teacher flags as padded."""
    b = make_batch()
    inject = torch.tensor([True, False])
    kw = dict(rewards=b["rewards"], group_size=3, inject=inject, stats=stats,
              aggregation="seq-mean-token-mean", old_logp=b["old_logp"])
    packed, gp = run(b["logits"], target_ids=b["targets"], cu_seqlens=b["cu"],
                     mask=b["mask"], **kw)
    padded, gq = run(pad(b, b["logits"]), target_ids=pad(b, b["targets"], -100),
                     mask=pad(b, b["mask"]), old_logp=pad(b, b["old_logp"]),
                     **{k: v for k, v in kw.items() if k != "old_logp"})
    assert_same(b, packed, padded, gp, gq)
    torch.testing.assert_close(packed.advantages, padded.advantages)
    assert torch.equal(packed.replaced, padded.replaced) and int(packed.replaced[0]) >= 0
    assert float(packed.teacher_fraction) > 0


def test_selective_log_softmax_packed(backend):
    b = make_batch()
    logits = b["logits"].clone().requires_grad_()
    logp, ent = hk.selective_log_softmax(logits, b["targets"], return_entropy=True,
                                         cu_seqlens=b["cu"])
    ref, ref_ent = R.log_probs(b["logits"], b["targets"])
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-6)
    plain, plain_ent = hk.selective_log_softmax(b["logits"], b["targets"], return_entropy=True)
    assert torch.equal(logp.detach(), plain) and torch.equal(ent.detach(), plain_ent)


def test_group_advantages_accepts_cu_seqlens():
    b = make_batch()
    adv, rep = hk.group_advantages(b["rewards"], 3, cu_seqlens=b["cu"])
    adv2, rep2 = hk.group_advantages(b["rewards"], 3)
    assert torch.equal(adv, adv2) and torch.equal(rep, rep2)
    with pytest.raises(ValueError, match="rewards"):
        hk.group_advantages(b["rewards"][:3], 3, cu_seqlens=b["cu"])


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([0, 3, 2, 15], dtype=torch.int32), "non-decreasing"),
    (torch.tensor([1, 3, 15], dtype=torch.int32), "start at 0"),
    (torch.tensor([0, 3, 14], dtype=torch.int32), "end at"),
    (torch.tensor([0.0, 15.0]), "int32 or int64"),
    (torch.tensor([[0, 15]]), "1-D"),
    ([0, 15], "torch.Tensor"),
])
def test_bad_cu_seqlens(cu, match):
    b = make_batch()
    with pytest.raises(ValueError, match="cu_seqlens.*" if match != "start at 0" else match):
        hk.fused_hapo_loss(b["logits"], b["targets"], b["adv"], cu_seqlens=cu)
    with pytest.raises(ValueError, match=match):
        hk.selective_log_softmax(b["logits"], b["targets"], cu_seqlens=cu)


def test_bad_packed_shapes():
    b = make_batch()
    with pytest.raises(ValueError, match="advantages"):
        hk.fused_hapo_loss(b["logits"], b["targets"], torch.randn(4), cu_seqlens=b["cu"])
    with pytest.raises(ValueError, match="teacher_mask"):
        hk.fused_hapo_loss(b["logits"], b["targets"], b["adv"], cu_seqlens=b["cu"],
                           teacher_mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed"):
        hk.fused_hapo_loss(pad(b, b["logits"]), pad(b, b["targets"], -100), b["adv"],
                           cu_seqlens=b["cu"])


# --------------------------------------------------------------------------- ambiguity
def small_batch(lengths):
    """``make_batch``'s layout for a few tokens (no ignored or masked token)."""
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    N = sum(lengths)
    return dict(S=len(lengths), L=max(lengths), N=N, cu=cu, seq=seq,
                pos=torch.arange(N) - cu.long()[seq], logits=torch.randn(N, V) * 2,
                targets=torch.randint(0, V, (N,)))


def test_as_many_sequences_as_tokens_is_an_error_unless_said(backend):
    """Lengths 2 and 0: two sequences of two packed tokens. [2] advantages could be one
    per sequence or one per token; they were read per token, so the first sequence's two
    tokens got -1.07 and 0.12 instead of -1.07 twice."""
    b = small_batch([2, 0])
    adv = torch.tensor([-1.07, 0.12])
    x, kw = b["logits"], dict(target_ids=b["targets"], cu_seqlens=b["cu"])
    with pytest.raises(ValueError, match="advantages.*per_sequence=True or per_sequence"):
        hk.fused_hapo_loss(x, advantages=adv, **kw)
    with pytest.raises(ValueError, match="teacher_mask.*per_sequence"):
        hk.fused_hapo_loss(x, rewards=torch.tensor([0.0, 1.0]), group_size=2,
                           teacher_mask=torch.tensor([True, False]), **kw)
    padded_kw = dict(target_ids=pad(b, b["targets"], -100), advantages=adv)
    padded, gq = run(pad(b, x), **padded_kw)
    ref = R.hapo_loss(pad(b, x).double(), **padded_kw)
    per_seq, gp = run(x, advantages=adv, per_sequence=True, **kw)
    torch.testing.assert_close(per_seq.loss, padded.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_seq.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp, unpad(b, gq))
    per_tok, _ = run(x, advantages=adv, per_sequence=False, **kw)
    want, _ = run(pad(b, x), target_ids=pad(b, b["targets"], -100), advantages=pad(b, adv))
    torch.testing.assert_close(per_tok.loss, want.loss, rtol=1e-6, atol=1e-7)
    assert abs(per_tok.loss.item() - per_seq.loss.item()) > 1e-3
    # Every sequence of length 1: both readings are the same, no error.
    b1 = small_batch([1, 1, 1])
    hk.fused_hapo_loss(b1["logits"], b1["targets"], torch.randn(3), cu_seqlens=b1["cu"])


@pytest.mark.parametrize("per_sequence, adv_shape, ok", [
    (True, (2,), True), (True, (5,), False), (False, (5,), True), (False, (2,), False)])
def test_per_sequence_is_enforced(per_sequence, adv_shape, ok):
    b = small_batch([3, 2])
    packed = dict(target_ids=b["targets"], advantages=torch.randn(adv_shape),
                  cu_seqlens=b["cu"], per_sequence=per_sequence)
    padded = dict(target_ids=pad(b, b["targets"], -100), per_sequence=per_sequence,
                  advantages=torch.randn(2) if adv_shape == (2,) else torch.randn(2, 3))
    for logits, call in ((b["logits"], packed), (pad(b, b["logits"]), padded)):
        if ok:
            hk.fused_hapo_loss(logits, **call)
        else:
            with pytest.raises(ValueError, match="advantages.*per_sequence"):
                hk.fused_hapo_loss(logits, **call)
    with pytest.raises(ValueError, match="per_sequence must be a bool"):
        hk.fused_hapo_loss(b["logits"], **{**packed, "per_sequence": "yes"})


def test_rewards_with_as_many_sequences_as_tokens(backend):
    """rewards= gives one advantage per sequence: never ambiguous."""
    b = small_batch([2, 0, 1, 1])
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0])
    packed, gp = run(b["logits"], target_ids=b["targets"], cu_seqlens=b["cu"],
                     rewards=rewards, group_size=2)
    padded, gq = run(pad(b, b["logits"]), target_ids=pad(b, b["targets"], -100),
                     rewards=rewards, group_size=2)
    torch.testing.assert_close(packed.loss, padded.loss)
    torch.testing.assert_close(gp, unpad(b, gq))
    assert packed.loss.item() != 0
