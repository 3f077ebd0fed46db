"""The CPU loss comparison, interleaved: ours against TRL's eager loss, forward + backward.

    python -m bench.compare_loss            # B=4, T=512, V=32768, fp32

pytest-benchmark (``bench/bench_loss.py``) times each implementation in its own block, so a
noisy neighbour can favour one of them; here the implementations take turns call by call,
and the peak extra memory (``timing.measure_peak``) is read three times each. Prints the
median time with its range, the speed-up over eager and the memory ratio to eager.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from hapo.cli import THREADS_HELP, default_threads, positive_int

from . import ops, timing

NAMES = ("eager (TRL)", "ours", "ours inplace_grad")


def progress(message: str) -> None:
    """One line of progress on stderr (the table goes to stdout)."""
    print(f"  ... {message}", file=sys.stderr, flush=True)


def compare(level: str, B: int, T: int, V: int, repeats: int) -> list:
    impls = {i.name: i for i in ops.implementations(level)}
    fns = {n: impls[n].build("cpu") for n in NAMES}
    inputs = {n: [ops.make_inputs(level, B, T, V, torch.float32, "cpu", seed=s,
                                shifted=impls[n].shifted) for s in range(2)] for n in NAMES}
    times = {n: [] for n in NAMES}
    for n in NAMES:
        fns[n](inputs[n][0])                              # warm-up
    for rep in range(repeats):
        for n in NAMES:
            t0 = time.perf_counter()
            fns[n](inputs[n][rep % 2])
            times[n].append(time.perf_counter() - t0)
        progress(f"{level}: timing round {rep + 1}/{repeats}")
    mem = {}
    for n in NAMES:
        progress(f"{level}: peak memory of {n}")
        mem[n] = [timing.measure_peak(lambda n=n: fns[n](inputs[n][0]), "cpu") / 2**20
                  for _ in range(3)]
    eager_t, eager_m = statistics.median(times[NAMES[0]]), max(mem[NAMES[0]])
    rows = []
    for n in NAMES:
        t = statistics.median(times[n])
        rows.append(dict(level=level, implementation=n, median_ms=1e3 * t,
                         min_ms=1e3 * min(times[n]), max_ms=1e3 * max(times[n]),
                         speedup=eager_t / t, peak_mib=max(mem[n]),
                         # None where eager's peak is below what RSS resolves (tiny shapes)
                         mem_ratio=max(mem[n]) / eager_m if eager_m > 0 else None))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=positive_int, default=4)
    p.add_argument("--T", type=positive_int, default=512)
    p.add_argument("--V", type=positive_int, default=32768)
    p.add_argument("--repeats", type=positive_int, default=7)
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    print(f"B={args.B} T={args.T} V={args.V} fp32, {torch.get_num_threads()} thread(s), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    print("| importance sampling | implementation | median ms (min-max) | x eager | "
          "peak extra MiB | / eager |\n|---|---|---|---|---|---|")
    for level in ("loss_token", "loss_seq"):
        for r in compare(level, args.B, args.T, args.V, args.repeats):
            print(f"| {'token' if level == 'loss_token' else 'sequence'} | "
                  f"{r['implementation']} | {r['median_ms']:.0f} ({r['min_ms']:.0f}-"
                  f"{r['max_ms']:.0f}) | {r['speedup']:.2f} | {r['peak_mib']:.0f} | "
                  f"{'n/a' if r['mem_ratio'] is None else format(r['mem_ratio'], '.3f')} |",
                  flush=True)


if __name__ == "__main__":
    main()
