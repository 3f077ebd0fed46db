"""``python -m hapo.demo`` (or ``hapo-demo``): the sparse-reward comparison.

Writes ``summary.json``, ``success.png`` and ``injection.png`` into ``--out`` and prints
the table. ``--quick`` (2 seeds x 40 steps) takes about two minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from typing import Optional, Sequence

import torch

from .experiment import METHODS, QUICK, Settings, format_table, run_all, summarize
from .plots import plot_runs


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line's options (``argv``, else ``sys.argv[1:]``) as a ``Namespace``."""
    p = argparse.ArgumentParser(prog="hapo-demo", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 seeds x 40 steps (~2 min on 2 CPUs)")
    p.add_argument("--out", default="hapo_demo_out", help="output folder (default hapo_demo_out/)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2 3; quick: 0 1)")
    p.add_argument("--steps", type=int, help="training steps per run (default 100; quick: 40)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="subset of methods")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model is fastest on one)")
    return p.parse_args(argv)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the demo; return what summary.json holds."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else Settings()
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.steps:
        if args.steps < 1:
            raise SystemExit("--steps must be >= 1")
        settings = replace(settings, steps=args.steps)
    if args.methods:
        settings = replace(settings, methods=tuple(args.methods))
    os.makedirs(args.out, exist_ok=True)
    print(f"hapo demo: reverse {settings.length} digits, reward 1 only for an exact match; "
          f"{len(settings.seeds)} seeds x {settings.steps} steps x "
          f"{settings.prompts_per_step} prompts x G={settings.group_size}")
    start = time.perf_counter()
    runs = run_all(settings)
    summary = summarize(runs)
    elapsed = time.perf_counter() - start
    result = {"settings": asdict(settings), "command": "python -m hapo.demo " +
              " ".join(sys.argv[1:] if argv is None else argv),
              "wall_seconds": elapsed, "methods": summary,
              "curves": {f"{r['method']}/seed{r['seed']}": r["curves"] for r in runs}}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        plots = plot_runs(runs, args.out)
    except ImportError as e:        # matplotlib is an optional dependency
        plots = []
        print(f"(no plots: {e})")
    print()
    print(format_table(summary))
    print(f"\nfinal success: temperature-1 samples on {settings.eval_prompts} held-out prompts "
          f"x {settings.eval_samples}; steps to 50%: 5-step moving average, mean over the "
          f"seeds that reach it")
    print(f"wrote {', '.join([os.path.join(args.out, 'summary.json')] + plots)} "
          f"in {elapsed:.0f}s")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``hapo-demo``): returns None so the exit status is 0."""
    run(argv)


if __name__ == "__main__":
    main()
