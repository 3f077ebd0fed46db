"""No size limits on a GPU: one case with logits over 2^31 elements.

    python bench/big_tensor_check.py [--out-dir DIR] [--rows 70000] [--vocab 32768]

Packed bf16 logits ``[70000, 32768]`` (2.29e9 elements, 4.6 GB; more than 65,535 rows), a
``[B, T, V]`` strided view of them whose batch stride puts rows past 2^31 elements, and
``group_advantages`` over 100,000 groups (more than 65,535 programs). Rows sampled across
the whole range (the first, around 65,535, around the 2^31-element mark, the last) are
checked against the float64 reference evaluated on just those rows: a wrapped int32 offset
or a grid limit would read or write the wrong row. Exit status 1 on any mismatch.
Called by ``bench/gpu_check.sh``; writes ``big_tensor_check.json`` into ``--out-dir``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hapo_kernels as hk  # noqa: E402
from hapo_kernels import reference as R  # noqa: E402

INT32_MAX = 2 ** 31 - 1


def sample_rows(n_rows: int, V: int) -> torch.Tensor:
    past = INT32_MAX // V                        # the first row that starts past 2^31 - 1
    rows = {0, 1, 65_534, 65_535, 65_536, past - 1, past, past + 1, n_rows - 2, n_rows - 1}
    rows |= set(torch.randint(0, n_rows, (22,)).tolist())
    return torch.tensor(sorted(r for r in rows if 0 <= r < n_rows))


def close(name, got, want, rtol, atol, report):
    err = (got.double() - want.double()).abs()
    bad = err > atol + rtol * want.double().abs()
    ok = not bool(bad.any()) and bool(torch.isfinite(got).all())
    report[name] = {"ok": ok, "max_abs_err": float(err.max()) if err.numel() else 0.0}
    print(f"  {name:40s} {'ok' if ok else 'MISMATCH'}  max |err| {report[name]['max_abs_err']:.3g}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=70_000)
    ap.add_argument("--vocab", type=int, default=32_768)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a small smoke run of this script")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("big_tensor_check: no CUDA device")
        return 1
    torch.manual_seed(0)
    N, V = args.rows, args.vocab
    report = {"rows": N, "vocab": V, "elements": N * V,
              "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    print(f"big_tensor_check: logits [{N}, {V}] bf16 = {N * V / 1e9:.2f}e9 elements "
          f"({'past' if N * V > INT32_MAX else 'NOT past'} 2^31)")
    t0 = time.perf_counter()
    logits = torch.randn(N, V, device=dev, dtype=torch.bfloat16)
    targets = torch.randint(0, V, (N,), device=dev)
    targets[torch.rand(N, device=dev) < 0.05] = -100
    rows = sample_rows(N, V).to(dev)
    targets[rows[-1]] = 7                        # the last row is never ignored
    ok = True

    # 1. selective_log_softmax forward and backward over every row.
    leaf = logits.requires_grad_()
    logp, ent = hk.selective_log_softmax(leaf, targets, return_entropy=True)
    g_logp = torch.randn(N, device=dev)
    (logp * g_logp).sum().backward()
    sub = logits.detach()[rows].double().requires_grad_()
    ref_logp, ref_ent = R.log_probs(sub, targets[rows])
    (ref_logp * g_logp[rows].double()).sum().backward()
    ok &= close("selective_log_softmax logp", logp.detach()[rows], ref_logp.detach(), 1e-5,
                2e-5, report)
    ok &= close("selective_log_softmax entropy", ent.detach()[rows], ref_ent.detach(), 1e-5,
                2e-5, report)
    ok &= close("selective_log_softmax grad rows", leaf.grad[rows], sub.grad, 1e-2, 1e-6,
                report)
    leaf.grad = None
    leaf.requires_grad_(False)
    del logp, ent

    # 2. The fused loss and its gradient (explicit normalizer: row-independent weights).
    adv = torch.randn(N, device=dev)
    old = -torch.rand(N, device=dev) * 5
    count = float((targets != -100).sum())
    leaf = logits.requires_grad_()
    out = hk.fused_hapo_loss(leaf, targets, adv, old_logp=old, normalizer=count,
                             entropy_coef=0.01)
    out.loss.backward()
    sub = logits.detach()[rows].double().requires_grad_()
    ref = R.hapo_loss(sub, targets[rows], adv[rows].double(), old_logp=old[rows].double(),
                      normalizer=count, entropy_coef=0.01)
    ref.loss.backward()
    ok &= close("fused_hapo_loss per-token logp", out.per_token_logp[rows],
                ref.per_token_logp, 1e-5, 2e-5, report)
    ok &= close("fused_hapo_loss grad rows", leaf.grad[rows], sub.grad, 1e-2, 1e-9, report)
    ok &= bool(torch.isfinite(out.loss))
    leaf.grad = None
    leaf.requires_grad_(False)

    # 3. A strided [B, T, V] view: row (b, t) at b * stride_b + t * stride_t, past 2^31.
    half = N // 2
    view = logits[: 2 * half].view(2, half, V)[:, :-1]
    y3 = targets[: 2 * half].view(2, half)[:, :-1].contiguous()
    lp3 = hk.selective_log_softmax(view, y3)
    bt = torch.tensor([[0, 0], [0, half - 2], [1, 0], [1, half // 2], [1, half - 2]],
                      device=dev)
    ref3, _ = R.log_probs(view[bt[:, 0], bt[:, 1]], y3[bt[:, 0], bt[:, 1]])
    ok &= close("strided [B, T, V] view logp", lp3[bt[:, 0], bt[:, 1]], ref3, 1e-5, 2e-5,
                report)
    report["strided_last_row_offset"] = int(view.stride(0) + (half - 2) * view.stride(1))
    del logits, leaf, out, view

    # 4. group_advantages over more groups than a grid's y/z dimension allows.
    P = 100_000 if dev.type == "cuda" else 1000
    rewards = torch.rand(P * 2, device=dev)
    inject = torch.rand(P, device=dev) < 0.5
    adv_g, rep_g = hk.group_advantages(rewards, 2, inject)
    ref_g, ref_rep = R.group_advantages(rewards.cpu(), 2, inject.cpu())
    ok &= close("group_advantages (100k groups)", adv_g.cpu(), ref_g, 1e-4, 1e-4, report)
    same = bool(torch.equal(rep_g.cpu(), ref_rep))
    report["group_advantages replaced"] = {"ok": same}
    ok &= same

    report["seconds"] = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        report["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        report["peak_gb"] = 0.0
    report["ok"] = bool(ok)
    print(f"big_tensor_check: {'PASS' if ok else 'FAIL'} in {report['seconds']:.1f} s, "
          f"peak {report['peak_gb']:.1f} GB")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "big_tensor_check.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
