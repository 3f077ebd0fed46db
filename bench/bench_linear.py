"""LM head + loss, forward and backward: ``fused_linear_hapo_loss`` against the materialised path.

Implementations (each a full training step of the head: loss, then the gradients of hidden
and weight):

* ``ours``: ``hk.fused_linear_hapo_loss(hidden, weight, ...)``, chunk by chunk.
* ``ours-lowp-acc``: the same with ``fp32_accumulate=False`` (bf16 / fp16 inputs: the weight
  gradient is summed in its own dtype instead of a float32 ``[V, H]`` buffer; identical to
  ``ours`` for fp32).
* ``materialised``: ``logits = hidden @ weight.T`` then ``hk.fused_hapo_loss(logits, ...)``
  (the issue's baseline; its loss is our fused one, so the difference is only the logits).
* ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (chunked torch, torch.compile'd on
  CUDA), when installed; same clip, no KL, token-mean (its ``loss_type="bnpo"``).

Memory is the peak above everything alive before the step (the inputs), gradients
included, measured as in ``bench/timing.py``: ``torch.cuda.max_memory_allocated`` on CUDA;
on CPU the process's resident high-water mark (``VmHWM`` reset through
``/proc/self/clear_refs``, glibc set to return freed blocks at once), since torch's CPU
allocator does not cache and has no counters.

Targets: CPU, N=4096, H=512, V=32768, fp32: ours <= 1/4 of materialised's peak
extra memory. GPU, N=16384, H=4096, V=151936, bf16: <= 10% of its memory, time <= 1.15x.

    python -m bench.bench_linear                      # CPU target shape, 2 threads
    python -m bench.bench_linear --device cuda        # GPU target shape (bf16), with Liger
    pytest bench/bench_linear.py --benchmark-only     # the same through pytest-benchmark
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import hapo_kernels as hk
from bench import timing

CPU_SHAPE = dict(tokens=4096, hidden=512, vocab=32768, dtype="float32")
GPU_SHAPE = dict(tokens=16384, hidden=4096, vocab=151936, dtype="bfloat16")
SEQ_LEN = 512
IMPLS = ("ours", "ours-lowp-acc", "materialised", "liger")


def make_inputs(tokens, hidden, vocab, dtype, device, seed=0):
    """``[B, T, H]`` hidden states, an LM head and the loss inputs (B = tokens / SEQ_LEN)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    T = min(SEQ_LEN, tokens)
    B = tokens // T
    h = torch.randn(B, T, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    y = torch.randint(0, vocab, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) < 0.9).float().to(device)
    adv = torch.randn(B, generator=g).to(device)
    old = (-torch.rand(B, T, generator=g) * 8 - 8).to(device)    # near log(1/V): ratios ~ 1
    w.requires_grad_(True)
    return dict(hidden=h, weight=w, target_ids=y, mask=mask, advantages=adv, old_logp=old)


def grads_bytes(inp) -> int:
    """Bytes of the step's outputs, the gradients of hidden and weight (in their dtypes)."""
    return sum(inp[k].numel() * inp[k].element_size() for k in ("hidden", "weight"))


class Unavailable(Exception):
    pass


def build(impl: str, inp: dict):
    """A callable running one forward + backward; returns the gradients (kept alive to the
    end of the call, so they count in the peak)."""
    w = inp["weight"]
    kw = dict(mask=inp["mask"], old_logp=inp["old_logp"])

    def ours(fp32_accumulate=True):
        h = inp["hidden"].detach().requires_grad_()
        w.grad = None
        out = hk.fused_linear_hapo_loss(h, w, inp["target_ids"], inp["advantages"], **kw,
                                        fp32_accumulate=fp32_accumulate)
        out.loss.backward()
        return h.grad, w.grad

    def materialised():
        h = inp["hidden"].detach().requires_grad_()
        w.grad = None
        logits = h @ w.T
        out = hk.fused_hapo_loss(logits, inp["target_ids"], inp["advantages"], **kw)
        out.loss.backward()
        return h.grad, w.grad

    if impl == "ours":
        return ours
    if impl == "ours-lowp-acc":
        return lambda: ours(fp32_accumulate=False)
    if impl == "materialised":
        return materialised
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as exc:
        raise Unavailable(f"liger-kernel not importable ({exc})") from None
    on_cuda = inp["hidden"].is_cuda
    liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo",
                                     compiled=on_cuda, chunk_size=1)

    def run_liger():
        h = inp["hidden"].detach().requires_grad_()
        w.grad = None
        loss, _ = liger(h, w, inp["target_ids"], inp["mask"], inp["advantages"],
                        old_per_token_logps=inp["old_logp"])
        loss.backward()
        return h.grad, w.grad
    return run_liger


def run(device="cpu", tokens=None, hidden=None, vocab=None, dtype=None, impls=IMPLS,
        reps=5, max_seconds=60.0, threads=2):
    """The runner's entry point: one row per implementation with median seconds and peak
    extra bytes (``None`` where not measurable) and the ratios against ``materialised``."""
    base = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    tokens, hidden, vocab = tokens or base["tokens"], hidden or base["hidden"], \
        vocab or base["vocab"]
    dt = getattr(torch, dtype or base["dtype"])
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    inp = make_inputs(tokens, hidden, vocab, dt, device)
    rows = []
    for name in impls:
        try:
            fn = build(name, inp)
        except Unavailable as exc:
            rows.append(dict(impl=name, skipped=str(exc)))
            continue
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def step(fn=fn, sync=sync):
            out = fn()
            sync()
            return out
        step()                                             # warm-up: lazy init, compile
        inp["weight"].grad = None                          # else its freeing hides 4VH bytes
        peak = timing.measure_peak(step, device)
        t = timing.time_stats(step, device, warmup=1, reps=reps, max_seconds=max_seconds)
        rows.append(dict(impl=name, median_s=t["median"], min_s=t["min"], n=t["n"],
                         peak_extra_bytes=peak))
    grad_bytes = grads_bytes(inp)
    for r in rows:       # the returned gradients: every implementation must produce them
        if r.get("peak_extra_bytes") is not None:
            r["peak_extra_minus_grads"] = r["peak_extra_bytes"] - grad_bytes
    ref = next((r for r in rows if r["impl"] == "materialised" and "median_s" in r), None)
    for r in rows:
        if ref and "median_s" in r:
            r["time_vs_materialised"] = r["median_s"] / ref["median_s"]
            if r["peak_extra_bytes"] is not None and ref["peak_extra_bytes"]:
                r["memory_vs_materialised"] = r["peak_extra_bytes"] / ref["peak_extra_bytes"]
    shape = dict(device=device, tokens=tokens, hidden=hidden, vocab=vocab,
                 dtype=str(dt).replace("torch.", ""), threads=torch.get_num_threads(),
                 input_bytes=sum(t.numel() * t.element_size() for t in inp.values()),
                 grad_bytes=grad_bytes)
    return dict(shape=shape, rows=rows)


def format_table(result) -> str:
    from tabulate import tabulate
    s = result["shape"]
    head = (f"{s['device']}  N={s['tokens']} H={s['hidden']} V={s['vocab']} {s['dtype']}  "
            f"threads={s['threads']}  inputs={s['input_bytes'] / 2**20:.0f} MiB")
    table = []
    for r in result["rows"]:
        if "skipped" in r:
            table.append([r["impl"], "n/a", "n/a", "", "", "", r["skipped"]])
            continue
        p = r["peak_extra_bytes"]
        table.append([r["impl"], f"{1e3 * r['median_s']:.1f}",
                      "n/a" if p is None else f"{p / 2**20:.1f}",
                      "n/a" if p is None else f"{r['peak_extra_minus_grads'] / 2**20:.1f}",
                      f"{r.get('time_vs_materialised', float('nan')):.2f}x",
                      f"{r.get('memory_vs_materialised', float('nan')):.3f}", ""])
    return head + "\n" + tabulate(table, headers=["impl", "median ms", "peak extra MiB",
                                                  "same, less grads", "time / mat.",
                                                  "memory / mat.", "note"],
                                  tablefmt="github", disable_numparse=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    res = run(a.device, a.tokens, a.hidden, a.vocab, a.dtype, a.impls, a.reps,
              threads=a.threads)
    print(format_table(res))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


# --------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:                      # the command line needs no pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("impl", IMPLS)
    def test_linear_fwd_bwd(benchmark, impl):
        """HAPO_BENCH_LINEAR="N,H,V" overrides the issue's shape (dtype stays)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        shape = dict(GPU_SHAPE if device == "cuda" else CPU_SHAPE)
        if os.environ.get("HAPO_BENCH_LINEAR"):
            n, h, v = (int(x) for x in os.environ["HAPO_BENCH_LINEAR"].split(","))
            shape.update(tokens=n, hidden=h, vocab=v)
        inp = make_inputs(shape["tokens"], shape["hidden"], shape["vocab"],
                          getattr(torch, shape["dtype"]), device)
        try:
            fn = build(impl, inp)
        except Unavailable as exc:
            pytest.skip(str(exc))
        benchmark.group = (f"linear+loss | N={shape['tokens']} H={shape['hidden']} "
                           f"V={shape['vocab']} {shape['dtype']} | {device}")
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def step(fn=fn, sync=sync):
            out = fn()
            sync()
            return out
        step()
        inp["weight"].grad = None
        peak = timing.measure_peak(step, device)
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
        benchmark.extra_info.update(peak_extra_bytes=peak)
        from bench.suite import MEMORY_ROWS
        MEMORY_ROWS.append((benchmark.group, impl, benchmark.stats.stats.median, peak, 0))


if __name__ == "__main__":
    sys.exit(main())
