"""Peak extra memory of one LM-head + loss training step, each implementation in a fresh process.

    python -m bench.memory_linear                          # CPU target: N=4096 H=512 V=32768 fp32
    python -m bench.memory_linear --device cuda            # GPU target shape, bf16

"Extra" is the peak above everything alive before the step (the inputs: hidden, weight,
targets, mask, advantages, old_logp), with the step's own outputs (the gradients of hidden
and weight) included, since the materialised path produces them too. Each implementation
runs in its own subprocess (allocator state, caches and freed-but-resident pages never carry
over from another implementation), is warmed up by one step, and the second step is
measured: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the resident-set high-water
mark (``VmHWM`` reset through ``/proc/self/clear_refs``, glibc told to unmap freed blocks
over 64 KiB at once: see bench/timing.py, whose 64 MiB calibration is tested in
tests/test_bench.py). Target: ours <= 1/4 of materialised on CPU, <= 10% on GPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from bench import bench_linear as BL
from bench import timing


def measure_one(impl, device, tokens, hidden, vocab, dtype, threads):
    torch.set_num_threads(threads)
    inp = BL.make_inputs(tokens, hidden, vocab, getattr(torch, dtype), device)
    try:
        fn = BL.build(impl, inp)
    except BL.Unavailable as exc:
        return dict(impl=impl, skipped=str(exc))
    fn()                                            # warm-up: lazy init, compile, caches
    inp["weight"].grad = None                       # else its freeing hides 4VH bytes
    if device == "cuda":
        torch.cuda.synchronize()
    peak = timing.measure_peak(fn, device)
    return dict(impl=impl, peak_extra_bytes=peak, grad_bytes=BL.grads_bytes(inp))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.memory_linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--impls", nargs="+", choices=BL.IMPLS, default=list(BL.IMPLS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)           # child process: one impl
    p.add_argument("--json")
    a = p.parse_args(argv)
    base = BL.GPU_SHAPE if a.device == "cuda" else BL.CPU_SHAPE
    shape = dict(tokens=a.tokens or base["tokens"], hidden=a.hidden or base["hidden"],
                 vocab=a.vocab or base["vocab"], dtype=a.dtype or base["dtype"])
    if a.one:
        print(json.dumps(measure_one(a.one, a.device, threads=a.threads, **shape)))
        return 0
    rows = []
    for impl in a.impls:
        cmd = [sys.executable, "-m", "bench.memory_linear", "--one", impl,
               "--device", a.device, "--threads", str(a.threads)] + \
              [f"--{k}={v}" for k, v in shape.items()]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append(dict(impl=impl, skipped=res.stderr.strip().splitlines()[-1:]))
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    ref = next((r.get("peak_extra_bytes") for r in rows if r["impl"] == "materialised"), None)
    print(f"{a.device} N={shape['tokens']} H={shape['hidden']} V={shape['vocab']} "
          f"{shape['dtype']}: peak memory above the inputs, fwd+bwd, gradients included")
    for r in rows:
        if "skipped" in r:
            print(f"  {r['impl']:<13} n/a  ({r['skipped']})")
            continue
        b = r["peak_extra_bytes"]
        ratio = f"  {b / ref:.3f} of materialised" if ref and b is not None else ""
        less = "" if b is None else \
            f"  ({(b - r['grad_bytes']) / 2**20:.1f} MiB less the returned gradients)"
        print(f"  {r['impl']:<13} {'n/a' if b is None else f'{b / 2**20:8.1f} MiB'}{ratio}{less}")
        if ref and b is not None:
            r["memory_vs_materialised"] = b / ref
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(shape=dict(device=a.device, **shape), rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
