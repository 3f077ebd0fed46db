"""``python -m hapo.demo`` (or ``hapo-demo``): the sparse-reward comparison.

``--scenario exact-teacher`` (default; the teacher gives the best answer there is) or
``suboptimal-teacher`` (a verified teacher that earns 0.6 where the policy can earn 1.0).
Writes ``summary.json``, ``runs.jsonl`` (one line per finished run, written as it goes),
``reward.png``, ``success.png``, ``injection.png`` and ``final_reward.png`` into ``--out``
and prints the tables. ``--quick`` took 76 s (exact-teacher) and 166 s (suboptimal-teacher)
on two CPU cores shared with other jobs (docs/demo.md).
``--merge DIR ...`` trains nothing: it summarizes the ``runs.jsonl`` of earlier runs (a long
run split over processes by ``--first-seed``/``--seeds``) into ``--out``.
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

from ..cli import THREADS_HELP, default_threads, positive_int
from .experiment import METHODS, comparisons, format_comparisons, format_table, run_all, summarize
from .plots import plot_runs
from .scenarios import SCENARIOS


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line's options (``argv``, else ``sys.argv[1:]``) as a ``Namespace``."""
    p = argparse.ArgumentParser(prog="hapo-demo", description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="exact-teacher", choices=list(SCENARIOS),
                   help="the task and its teacher (default exact-teacher)")
    p.add_argument("--quick", action="store_true", help="the scenario's short settings")
    p.add_argument("--out", default=os.path.join("out", "demo"),
                   help="output folder (default out/demo/)")
    p.add_argument("--seeds", type=positive_int,
                   help="number of seeds (default: the scenario's; seeds first-seed ...)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--steps", type=positive_int,
                   help="training steps per run (default: the scenario's)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="subset of methods")
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="summarize the runs.jsonl of these output folders instead of training")
    return p.parse_args(argv)


def load_runs(folders: Sequence[str], methods: Sequence[str]) -> list:
    """The runs in ``folders``' runs.jsonl files, by method order then seed (a seed run twice
    for a method is an error)."""
    runs, seen = [], set()
    for folder in folders:
        with open(os.path.join(folder, "runs.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                key = (r["method"], r["seed"])
                if key in seen:
                    raise SystemExit(f"{r['method']} seed {r['seed']} appears twice in {folders}")
                seen.add(key)
                runs.append(r)
    order = {m: i for i, m in enumerate(methods)}
    return sorted((r for r in runs if r["method"] in order),
                  key=lambda r: (order[r["method"]], r["seed"]))


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the demo; return what summary.json holds."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    scenario = SCENARIOS[args.scenario]
    settings = scenario.quick if args.quick else scenario.full
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(range(args.first_seed,
                                                       args.first_seed + args.seeds)))
    elif args.first_seed:
        settings = replace(settings, seeds=tuple(s + args.first_seed for s in settings.seeds))
    if args.steps is not None:
        settings = replace(settings, steps=args.steps)
    settings = replace(settings, methods=tuple(args.methods or METHODS))
    os.makedirs(args.out, exist_ok=True)
    task = scenario.task
    print(f"hapo demo, scenario {scenario.name}: {scenario.description}; "
          f"{len(settings.seeds)} seeds x {settings.steps} steps x "
          f"{settings.prompts_per_step} prompts x G={settings.group_size}; "
          f"{torch.get_num_threads()} thread(s)")
    start = time.perf_counter()
    log_path = os.path.join(args.out, "runs.jsonl")
    if args.merge:
        runs = load_runs(args.merge, settings.methods)
        steps = {len(r["curves"]["success_rate"]) for r in runs}
        if len(steps) != 1:
            raise SystemExit(f"--merge needs runs of one length, got {sorted(steps) or 'none'}")
        settings = replace(settings, seeds=tuple(sorted({r["seed"] for r in runs})),
                           steps=steps.pop(),
                           methods=tuple(dict.fromkeys(r["method"] for r in runs)))
        if os.path.abspath(args.out) not in {os.path.abspath(d) for d in args.merge}:
            with open(log_path, "w") as log:
                log.writelines(json.dumps(r) + "\n" for r in runs)
    else:
        with open(log_path, "w") as log:
            def on_run(r):
                log.write(json.dumps(r) + "\n")
                log.flush()
            runs = run_all(settings, scenario=scenario, on_run=on_run)
    summary = summarize(runs, teacher_reward=task.teacher_reward)
    pairs = comparisons(summary)
    elapsed = time.perf_counter() - start
    result = {"scenario": {"name": scenario.name, "description": scenario.description,
                           "teacher_reward": task.teacher_reward},
              "settings": asdict(settings), "command": "python -m hapo.demo " +
              " ".join(sys.argv[1:] if argv is None else argv),
              "wall_seconds": elapsed,
              "train_seconds_total": sum(r["train_seconds"] for r in runs),
              "merged_from": list(args.merge or []), "methods": summary, "comparisons": pairs,
              "curves": {f"{r['method']}/seed{r['seed']}": r["curves"] for r in runs}}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        plots = plot_runs(runs, args.out, title=scenario.name,
                          teacher_reward=task.teacher_reward)
    except ImportError as e:        # matplotlib is an optional dependency
        plots = []
        print(f"(no plots: {e})")
    print()
    print(format_table(summary))
    print(f"\nfinal reward: temperature-1 samples on {settings.eval_prompts} held-out prompts "
          f"x {settings.eval_samples}, mean ± std over seeds, 95% bootstrap interval of the "
          f"mean; beats teacher: seeds whose final reward is above the teacher's "
          f"({task.teacher_reward}); final success: reward >= 0.5; steps to 50%: 5-step "
          f"moving average of the rollout success rate, mean over the seeds that reach it")
    if pairs:
        print("\npaired by seed (final reward, first minus second):")
        print(format_comparisons(pairs))
    print(f"wrote {', '.join([os.path.join(args.out, 'summary.json'), log_path] + plots)} "
          f"in {elapsed:.0f}s")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``hapo-demo``): returns None so the exit status is 0."""
    run(argv)


if __name__ == "__main__":
    main()
