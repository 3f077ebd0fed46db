"""Run the sparse-reward comparison: GRPO, HAPO (two gates), always-inject, SFT.

Every method trains the same tiny transformer from the same seed on the same prompt
stream, with the same number of prompts (and so of available demonstrations) per step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..config import HAPOConfig
from ..trainer import HAPOTrainer, policy_logits
from .model import TinyCausalLM
from .task import ReverseTask

# name -> HAPOConfig overrides (None: supervised fine-tuning on the demonstrations).
METHODS: Dict[str, Optional[dict]] = {
    "grpo": dict(inject="never"),
    "hapo-mean": dict(inject="gate", gate_mode="mean"),
    "hapo-thompson-annealed": dict(inject="gate", gate_mode="thompson",
                                   gate_schedule="cosine", gate_gamma_min=0.5),
    "always-inject": dict(inject="always"),
    "sft": None,
}


@dataclass(frozen=True)
class Settings:
    steps: int = 100
    seeds: Sequence[int] = (0, 1, 2, 3)
    prompts_per_step: int = 16
    group_size: int = 8
    length: int = 4
    digits: int = 10
    d_model: int = 64
    lr: float = 1e-2
    eval_prompts: int = 128
    eval_samples: int = 8
    methods: Sequence[str] = tuple(METHODS)


QUICK = Settings(steps=40, seeds=(0, 1))


def make_policy(task: ReverseTask, settings: Settings, seed: int) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(task.vocab_size, max_len=task.prompt_len + task.length,
                        d_model=settings.d_model, d_ff=2 * settings.d_model)


@torch.no_grad()
def sampled_success(policy: torch.nn.Module, task: ReverseTask, prompts: torch.Tensor,
                    samples: int, generator: torch.Generator, greedy: bool = False) -> float:
    """Success rate of temperature-1 samples (or of the greedy completion)."""
    seq = prompts.repeat_interleave(1 if greedy else samples, dim=0)
    plen = seq.shape[1]
    was_training = policy.training
    policy.eval()
    for _ in range(task.length):
        logits = policy_logits(policy, seq)[:, -1].float()
        nxt = (logits.argmax(-1) if greedy else
               torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0])
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    policy.train(was_training)
    comp = seq[:, plen:]
    return float(task.reward(seq[:, :plen], comp, torch.ones_like(comp)).mean())


def run_one(method: str, seed: int, settings: Settings) -> dict:
    """Train one method from one seed; return its per-step curves and final evaluation."""
    task = ReverseTask(settings.length, settings.digits)
    policy = make_policy(task, settings, seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=settings.lr)
    prompt_gen = torch.Generator().manual_seed(10_000 + seed)   # same stream for all methods
    sample_gen = torch.Generator().manual_seed(20_000 + seed)
    curves = {"success_rate": [], "injection_rate": [], "collapsed_fraction": []}
    overrides = METHODS[method]
    start = time.perf_counter()
    if overrides is None:                       # SFT on the teacher demonstrations
        for _ in range(settings.steps):
            prompts = task.sample_prompts(settings.prompts_per_step, prompt_gen)
            curves["success_rate"].append(
                sampled_success(policy, task, prompts, 1, sample_gen))
            answer = task.answer(prompts)
            seq = torch.cat([prompts, answer], dim=1)
            logits = policy_logits(policy, seq)[:, task.prompt_len - 1:-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     answer.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
        curves["injection_rate"] = curves["collapsed_fraction"] = None
    else:
        config = HAPOConfig.from_kwargs(group_size=settings.group_size, max_new_tokens=task.length,
                            gate_schedule_steps=settings.steps, gate_seed=seed, seed=seed,
                            progress=False, **overrides)
        trainer = HAPOTrainer(policy, optimizer, task.reward,
                              lambda key: task.demo(key), config)
        for _ in range(settings.steps):
            m = trainer.step(task.sample_prompts(settings.prompts_per_step, prompt_gen))
            for k in curves:
                curves[k].append(m[k])
    train_seconds = time.perf_counter() - start
    eval_gen = torch.Generator().manual_seed(99)                # one held-out set for all
    held_out = task.sample_prompts(settings.eval_prompts, eval_gen)
    return {"method": method, "seed": seed, "curves": curves, "train_seconds": train_seconds,
            "final_success": sampled_success(policy, task, held_out, settings.eval_samples,
                                             sample_gen),
            "final_greedy": sampled_success(policy, task, held_out, 1, sample_gen, greedy=True)}


# --------------------------------------------------------------------------- summary
def moving_average(x: List[float], k: int = 5) -> List[float]:
    return [sum(x[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(x))]


def steps_to(x: List[float], level: float = 0.5) -> Optional[int]:
    """First step whose 5-step moving average of the success rate reaches ``level``."""
    for i, v in enumerate(moving_average(x)):
        if v >= level:
            return i
    return None


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 \
        else 0.0
    return m, sd


def _window_mean(x, lo, hi):
    part = x[int(lo * len(x)):max(int(hi * len(x)), int(lo * len(x)) + 1)]
    return sum(part) / len(part)


def summarize(runs: List[dict]) -> dict:
    """Per method: final success mean/std/min/max over seeds, steps to 50% success (per
    seed; None = never), injection rate in the first and last 20% of steps, mean
    collapsed-group fraction."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        finals = [r["final_success"] for r in rs]
        mean, std = _mean_std(finals)
        s50 = [steps_to(r["curves"]["success_rate"]) for r in rs]
        entry = {"seeds": [r["seed"] for r in rs], "final_success_mean": mean,
                 "final_success_std": std, "final_success_min": min(finals),
                 "final_success_max": max(finals), "final_success_per_seed": finals,
                 "final_greedy_mean": _mean_std([r["final_greedy"] for r in rs])[0],
                 "steps_to_50pct_per_seed": s50,
                 "steps_to_50pct_mean": _mean_std(s50)[0],
                 "seeds_reaching_50pct": sum(s is not None for s in s50),
                 "injection_rate_early": None, "injection_rate_late": None,
                 "collapsed_fraction_mean": None,
                 "train_seconds_mean": _mean_std([r["train_seconds"] for r in rs])[0]}
        if rs[0]["curves"]["injection_rate"] is not None:
            entry["injection_rate_early"] = _mean_std(
                [_window_mean(r["curves"]["injection_rate"], 0.0, 0.2) for r in rs])[0]
            entry["injection_rate_late"] = _mean_std(
                [_window_mean(r["curves"]["injection_rate"], 0.8, 1.0) for r in rs])[0]
            entry["collapsed_fraction_mean"] = _mean_std(
                [_window_mean(r["curves"]["collapsed_fraction"], 0.0, 1.0) for r in rs])[0]
        out[method] = entry
    return out


def format_table(summary: dict) -> str:
    """A plain-text (also Markdown) table of the summary."""
    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)
    head = ["method", "final success (mean ± std)", "min-max", "steps to 50%",
            "seeds at 50%", "inject early", "inject late", "collapsed groups"]
    rows = []
    for method, e in summary.items():
        n = len(e["seeds"])
        rows.append([method, f"{f(e['final_success_mean'])} ± {f(e['final_success_std'])}",
                     f"{f(e['final_success_min'])}-{f(e['final_success_max'])}",
                     f(e["steps_to_50pct_mean"], ".0f"), f"{e['seeds_reaching_50pct']}/{n}",
                     f(e["injection_rate_early"]), f(e["injection_rate_late"]),
                     f(e["collapsed_fraction_mean"])])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def run_all(settings: Settings, log: Callable[[str], Any] = print) -> List[dict]:
    """``run_one``'s result for every method and seed of ``settings``; one ``log`` line each."""
    runs = []
    for method in settings.methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    for method in settings.methods:
        for seed in settings.seeds:
            r = run_one(method, seed, settings)
            log(f"  {method:<24} seed {seed}: final success {r['final_success']:.2f} "
                f"({r['train_seconds']:.1f}s)")
            runs.append(r)
    return runs
