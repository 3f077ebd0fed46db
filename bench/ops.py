"""What is benchmarked: each operation's inputs, implementations, float64 check and byte floor.

Every implementation is a function ``inputs -> dict of tensors`` that does the op's whole
work (forward, and backward where the op has a gradient) and returns what the correctness
check compares with ``hapo_kernels.reference``: ``logp``, ``loss``, ``grad``, ``adv``,
``replaced``. ``grad`` is the gradient w.r.t. the tensor the implementation was handed: the
``[:, :-1]`` view for TRL and ours (taken with ``autograd.grad`` on the view, so the slice's
backward, which would allocate a full-size zero gradient in any implementation, is not run),
the whole ``[B, T+1, V]`` tensor for Liger (its last position is dropped before the check).

Loss settings are the same for every implementation: token mean over the batch (TRL's
``bnpo``), ``old_logp`` and ``ref_logp`` given, ``beta = 0.04``, ``eps = 0.2``, temperature 1,
a mask with a few padded positions. Logits arrive as a model produces them, ``[B, T+1, V]``;
TRL and ours take the ``[:, :-1]`` view, Liger takes the whole tensor (its API).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from hapo_kernels import reference as ref

from . import baselines as bl

BETA, EPS, TEMPERATURE = 0.04, 0.2, 1.0
# The persistent-grid row: fewer rows in flight, so a row's gradient pass finds more of it
# in L2 (at 16384 x 151936 bf16 one row per SM is 132 x 297 KB = 39 MB against 50 MB of L2).
PERSISTENT_PROGRAMS_PER_SM = 1
PERSISTENT = "ours persistent"
GROUP = 8                       # rollouts per prompt for group_advantages
LOSS_KW = dict(temperature=TEMPERATURE, eps_low=EPS, eps_high=EPS, beta=BETA)


class Unavailable(Exception):
    """This implementation cannot run here (the message says why, e.g. 'n/a (no CUDA)')."""


# --------------------------------------------------------------------------- inputs
def make_inputs(op: str, B: int, T: int, V: int, dtype, device, seed: int = 0,
                shifted: bool = True) -> dict:
    """Fresh random inputs (never zeros), drawn on the device (a 5 GB CPU draw would take
    longer than the benchmark). ``requires_grad`` only where the op has a gradient.

    ``shifted``: ``full`` is ``[B, T+1, V]`` and implementations use ``full[:, :-1]``; else
    ``full`` is a contiguous ``[B, T, V]`` used whole (a model called with
    ``logits_to_keep=T``), which is how ``ours inplace_grad`` is run (see ``implementations``)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=device)

    if op == "advantages":
        P = B * T
        rewards = (rand(P * GROUP) < 0.3).float() + 0.1 * rand(P * GROUP)
        return {"rewards": rewards, "inject": rand(P) < 0.5, "P": P}
    T1 = T + 1 if shifted else T
    full = torch.empty(B, T1, V, device=device, dtype=dtype)
    for b in range(B):                   # a row of the batch at a time: no fp32 full copy
        full[b] = 2.0 * randn(T1, V)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)
    inp = {"full": full, "ids": ids, "B": B, "T": T, "V": V, "shifted": shifted}
    if op == "sls_grad":
        full.requires_grad_(True)
        inp["g"] = randn(B, T)
    if op.startswith("loss"):
        full.requires_grad_(True)
        tail = max(1, T - T // 8)
        mask = torch.ones(B, T, dtype=torch.int64, device=device)
        mask[:, tail:] = (rand(B, T - tail) < 0.5).long()
        inp["mask"] = mask
        inp["adv"] = randn(B)
        # old/ref log-probs near the current ones so that some ratios clip and some don't.
        with torch.no_grad():
            lp = torch.stack([torch.log_softmax(full[b, :T].float(), -1)
                              .gather(-1, ids[b, :, None]).squeeze(-1) for b in range(B)])
        inp["old"] = (lp + 0.3 * randn(B, T)).contiguous()
        inp["ref"] = (lp + 0.3 * randn(B, T)).contiguous()
    return inp


def _logits(inp: dict) -> torch.Tensor:
    """The ``[B, T, V]`` logits an implementation is handed (a view when ``shifted``)."""
    return inp["full"][:, :-1] if inp["shifted"] else inp["full"]


def input_bytes(inp: dict) -> int:
    return sum(v.numel() * v.element_size() for v in inp.values() if isinstance(v, torch.Tensor))


# --------------------------------------------------------------------------- byte floors
def floor_bytes(op: str, B: int, T: int, V: int, dtype) -> int:
    """The fewest bytes the op must move through memory (docs/design.md section 10).

    sls_nograd   read the logits once                                     1 pass
    sls_grad     forward read; backward (needs the upstream grad) reads
                 again and writes the gradient                            3 passes
    loss_token   read once, write the gradient in the same launch         2 passes
    loss_seq     the sequence ratio needs every token first: a second
                 read (a sequence is larger than L2), then the write      3 passes
    plus the per-token vectors (ids, mask, advantages, old/ref, outputs).
    """
    N, s = B * T, torch.empty((), dtype=dtype).element_size()
    if op == "advantages":
        P = B * T
        return P * GROUP * (4 + 4) + P * (1 + 8)
    passes = {"sls_nograd": 1, "sls_grad": 3, "loss_token": 2, "loss_seq": 3}[op]
    vectors = {"sls_nograd": 8 + 4, "sls_grad": 8 + 4 + 4,
               "loss_token": 8 + 8 + 4 + 4 + 4, "loss_seq": 8 + 8 + 4 + 4 + 4}[op]
    return passes * N * V * s + N * vectors


# --------------------------------------------------------------------------- reference
def reference_outputs(op: str, inp: dict) -> dict:
    """float64 expected outputs from hapo_kernels.reference (gradients by float64 autograd)."""
    if op == "advantages":
        adv, replaced = ref.group_advantages(inp["rewards"], GROUP, inject=inp["inject"])
        return {"adv": adv, "replaced": replaced}
    full = inp["full"].detach().clone().requires_grad_(op != "sls_nograd")
    logits = _logits(dict(inp, full=full))
    if op.startswith("sls"):
        logp, _ = ref.log_probs(logits, inp["ids"], TEMPERATURE)
        out = {"logp": logp.detach()}
        if op == "sls_grad":
            (grad,) = torch.autograd.grad(logp, logits, inp["g"].double())
            out["grad"] = grad
        return out
    res = ref.hapo_loss(logits, inp["ids"], inp["adv"], mask=inp["mask"], old_logp=inp["old"],
                        ref_logp=inp["ref"], importance_sampling=_level(op), **LOSS_KW)
    (grad,) = torch.autograd.grad(res.loss, logits)
    return {"loss": res.loss.detach(), "grad": grad}


def _level(op: str) -> str:
    return "sequence" if op == "loss_seq" else "token"


# --------------------------------------------------------------------------- implementations
@dataclass
class Impl:
    name: str                    # column label: ours, eager (TRL), torch.compile, Liger
    kind: str                    # "ours" | "baseline"
    build: Callable[[str], Callable[[dict], dict]]   # device -> fn; raises Unavailable
    shifted: bool = True         # handed the [:, :-1] view of [B, T+1, V] (see make_inputs)


def _grad(out: torch.Tensor, wrt: torch.Tensor, upstream=None) -> torch.Tensor:
    (grad,) = torch.autograd.grad(out, wrt, upstream)
    return grad


def _eager_sls_nograd(inp):
    with torch.no_grad():
        return {"logp": bl.trl_logps(_logits(inp), inp["ids"], TEMPERATURE)[0]}


def _eager_sls_grad(inp):
    logits = _logits(inp)
    logp = bl.trl_logps(logits, inp["ids"], TEMPERATURE)[0]
    return {"logp": logp.detach(), "grad": _grad(logp, logits, inp["g"])}


def _eager_loss(level):
    def fn(inp, loss_fn=bl.trl_grpo_loss):
        logits = _logits(inp)
        loss, _metrics = loss_fn(logits, inp["ids"], inp["adv"], inp["mask"],
                                 inp["old"], inp["ref"], importance_sampling=level, **LOSS_KW)
        return {"loss": loss.detach(), "grad": _grad(loss, logits)}
    return fn


def _eager_advantages(inp):
    adv, replaced = bl.eager_group_advantages(inp["rewards"], GROUP, inp["inject"])
    return {"adv": adv, "replaced": replaced}


_COMPILED: Dict[str, Callable] = {}


def _compiled(op: str) -> Callable[[dict], dict]:
    """torch.compile of the eager baseline (one compiled function per op, reused across
    shapes; dynamo recompiles per new shape then goes dynamic)."""
    if op not in _COMPILED:
        if op == "sls_nograd" or op == "sls_grad":
            logps = torch.compile(lambda logits, ids: bl.trl_logps(logits, ids, TEMPERATURE)[0])

            def fn(inp):
                if op == "sls_nograd":
                    with torch.no_grad():
                        return {"logp": logps(_logits(inp), inp["ids"])}
                logits = _logits(inp)
                logp = logps(logits, inp["ids"])
                return {"logp": logp.detach(), "grad": _grad(logp, logits, inp["g"])}
        elif op.startswith("loss"):
            eager, compiled_loss = _eager_loss(_level(op)), torch.compile(bl.trl_grpo_loss)

            def fn(inp):
                return eager(inp, loss_fn=compiled_loss)
        else:
            compiled = torch.compile(bl.eager_group_advantages)

            def fn(inp):
                adv, replaced = compiled(inp["rewards"], GROUP, inp["inject"])
                return {"adv": adv, "replaced": replaced}
        _COMPILED[op] = fn
    return _COMPILED[op]


def liger_impl(op: str, device: str):
    ok, why = bl.liger_runnable(device)
    if not ok:
        raise Unavailable(why)
    if op == "sls_nograd":
        return lambda inp: {"logp": bl.liger_selective_log_softmax(inp["full"].detach(),
                                                                   inp["ids"], TEMPERATURE)}
    if op.startswith("loss"):
        def fn(inp):
            loss = bl.liger_grpo_loss(inp["full"], inp["ids"], inp["adv"], inp["mask"],
                                      inp["old"], inp["ref"], importance_sampling=_level(op),
                                      **LOSS_KW)
            return {"loss": loss.detach(), "grad": _grad(loss, inp["full"])}
        return fn
    raise Unavailable("n/a (Liger has no such op)")


def _hk():
    import hapo_kernels as hk
    return hk


def ours(op: str, inplace: bool = False):
    hk = _hk()
    need = {"sls_nograd": "selective_log_softmax", "sls_grad": "selective_log_softmax",
            "loss_token": "fused_hapo_loss", "loss_seq": "fused_hapo_loss",
            "advantages": "group_advantages"}[op]
    if not hasattr(hk, need):
        raise Unavailable(f"n/a (hapo_kernels has no {need})")
    if op == "sls_nograd":
        def fn(inp):
            with torch.no_grad():
                return {"logp": hk.selective_log_softmax(_logits(inp), inp["ids"],
                                                         temperature=TEMPERATURE)}
        return fn
    if op == "sls_grad":
        def fn(inp):
            logits = _logits(inp)
            logp = hk.selective_log_softmax(logits, inp["ids"], temperature=TEMPERATURE)
            return {"logp": logp.detach(), "grad": _grad(logp, logits, inp["g"])}
        return fn
    if op == "advantages":
        def fn(inp):
            adv, replaced = hk.group_advantages(inp["rewards"], GROUP, inject=inp["inject"])
            return {"adv": adv, "replaced": replaced}
        return fn

    def fn(inp):
        logits = _logits(inp)
        wrt = logits
        if inplace:
            # A view (no copy), as a model's output is a non-leaf: in-place gradients refuse
            # a leaf. The write makes autograd rebuild the view's grad_fn, so the gradient
            # is taken w.r.t. the leaf; it is the same [B, T, V] gradient.
            logits = logits.view_as(logits)
        out = hk.fused_hapo_loss(logits, inp["ids"], inp["adv"], mask=inp["mask"],
                                 old_logp=inp["old"], ref_logp=inp["ref"],
                                 importance_sampling=_level(op), aggregation="token-mean",
                                 inplace_grad=inplace, **LOSS_KW)
        return {"loss": out.loss.detach(), "grad": _grad(out.loss, wrt)}
    return fn


def ours_persistent(op: str, device: str):
    """Ours on a persistent grid (``hapo_kernels.triton.rows``): PERSISTENT_PROGRAMS_PER_SM
    programs per SM loop over the rows, instead of one program per row. A launch-grid
    variant of the Triton kernel, so it needs CUDA or the interpreter."""
    from hapo_kernels.triton.rows import persistent_rows
    if not bl.triton_runs(device):                    # --device cpu on a GPU machine
        raise Unavailable("n/a (a Triton launch-grid variant)")
    plain = ours(op)

    def fn(inp):
        with persistent_rows(PERSISTENT_PROGRAMS_PER_SM):
            return plain(inp)
    return fn


EAGER = {"sls_nograd": _eager_sls_nograd, "sls_grad": _eager_sls_grad,
         "loss_token": _eager_loss("token"), "loss_seq": _eager_loss("sequence"),
         "advantages": _eager_advantages}


def _eager(op):
    return lambda device: EAGER[op]


def implementations(op: str) -> list:
    """Every implementation of ``op`` in table order: baselines first, ours last."""
    impls = [Impl("eager (TRL)", "baseline", _eager(op)),
             Impl("torch.compile", "baseline", lambda device: _compiled(op))]
    if op != "advantages" and op != "sls_grad":
        impls.append(Impl("Liger", "baseline", lambda device: liger_impl(op, device)))
    impls.append(Impl("ours", "ours", lambda device: ours(op)))
    if op.startswith("loss"):
        # In-place gradients go into the storage of the tensor handed over; autograd cannot
        # return them for a [:, :-1] view (its grad_fn is rebuilt after the in-place write),
        # so this row gets a contiguous [B, T, V] leaf, as from logits_to_keep=T.
        impls.append(Impl("ours inplace_grad", "ours", lambda device: ours(op, inplace=True),
                          shifted=False))
    if op == "loss_token" and bl.triton_runs("cuda" if torch.cuda.is_available() else "cpu"):
        # a GPU-tuning row: not listed where only the CPU path runs
        impls.append(Impl(PERSISTENT, "ours", lambda device: ours_persistent(op, device)))
    return impls


OPS = {
    "sls_nograd": "selective_log_softmax, no grad",
    "sls_grad": "selective_log_softmax, fwd+bwd",
    "loss_token": "fused_hapo_loss fwd+bwd, token IS",
    "loss_seq": "fused_hapo_loss fwd+bwd, sequence IS",
    "advantages": "group_advantages (SSI, G=8)",
}


# --------------------------------------------------------------------------- correctness
# ‖out − ref‖/‖ref‖ bounds. Ours accumulates in float32 whatever the logits dtype; only its
# bf16/fp16 gradient output is rounded (2^-9 relative). TRL's eager path computes
# log_softmax and the whole backward in the logits' dtype, so its bf16 error is larger
# (about 2e-2 on the loss gradient): baselines get the looser bound, and the table shows it.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
BASELINE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def rel_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere never passes (returns inf).

    A scalar (the loss) is a sum of terms of both signs and can land near 0 by chance,
    which would turn float32 rounding into a large relative error: its denominator is at
    least 0.1 (the loss of a unit advantage is of order 1)."""
    o, e = out.detach().double().cpu(), expected.detach().double().cpu()
    if o.shape != e.shape or not torch.isfinite(o).all():
        return float("inf")
    denom = e.norm().item()
    if e.numel() == 1:
        denom = max(denom, 0.1)
    return (o - e).norm().item() / (denom if denom > 0 else 1.0)


@dataclass
class CheckResult:
    op: str
    impl: str
    dtype: str
    ok: Optional[bool]           # None: the implementation was not available
    errors: dict = field(default_factory=dict)
    tolerance: Optional[float] = None
    note: str = ""


def check(op: str, impl_name: str, fn: Callable[[dict], dict], dtype, device,
          B=2, T=5, V=1031, seed=1234, kind: str = "ours", shifted: bool = True) -> CheckResult:
    """Run ``fn`` on fresh small inputs (odd V, padded tokens) against the float64 reference.

    ``kind="baseline"`` uses the looser bounds of BASELINE_TOLERANCE."""
    inp = make_inputs(op, B, T, V, dtype, device, seed=seed, shifted=shifted)
    expected = reference_outputs(op, inp)
    tol = (BASELINE_TOLERANCE if kind == "baseline" else TOLERANCE).get(dtype, 1e-4)
    res = CheckResult(op, impl_name, str(dtype).replace("torch.", ""), True, tolerance=tol)
    try:
        got = fn(inp)
    except Exception as exc:                    # a crash is a failure, named in the table
        res.ok, res.note = False, f"{type(exc).__name__}: {exc}"[:120]
        return res
    for key, want in expected.items():
        if key not in got:
            res.ok, res.note = False, f"missing output {key!r}"
            continue
        value = got[key]
        if key == "grad" and value.dim() == 3 and value.shape[1] == want.shape[1] + 1:
            value = value[:, :-1]                 # Liger: gradient of the whole [B, T+1, V]
        if key == "replaced":
            err = 0.0 if torch.equal(got[key].cpu().long(), want.cpu().long()) else float("inf")
        else:
            err = rel_error(value, want)
        res.errors[key] = err
        if not err <= tol:
            res.ok = False
    return res
