"""Run a scenario's comparison: GRPO, LUFFY, HAPO (two gates), always-inject, SFT.

Every method trains the same tiny transformer from the same seed on the same prompt
stream, with the same number of prompts (and so of available demonstrations) per step.
Every teacher demonstration is scored by the task's reward function (``HAPOConfig``'s
default ``score_teacher=True``).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional

import torch

from ..config import HAPOConfig
from ..trainer import HAPOTrainer, policy_logits
from .model import TinyCausalLM
from .scenarios import SCENARIOS, Scenario, Settings
from .stats import bootstrap_mean_ci, mean_std, paired_comparisons, wilson_interval

__all__ = ["METHODS", "LUFFY", "QUICK", "Settings", "run_one", "run_all", "summarize",
           "format_table", "format_comparisons", "sampled_eval", "steps_to"]

# LUFFY's released training script (exp_scripts/train.sh of the LUFFY repository): the
# demonstration in a fixed slot of every group (rollout.n = 8 with n_prefix = 1 and prefix
# ratio 1.0: one member of eight), advantages over all eight without std scaling
# (adv_estimator=grpo, grpo_use_std=False), shaped teacher tokens (off_policy_reshape
# "p_div_p_0.1"), no clip (loss_remove_clip=True), a token sum divided by the response length
# (loss_remove_token_mean=True) and entropy_coeff=0.001, no KL. Its token sum is divided by
# the length only; seq-mean-token-sum-norm also divides by the number of sequences, a
# constant factor that Adam all but removes (it changes what the gradient-norm clip of 1.0
# sees), and it applies to the entropy term too (LUFFY's entropy term is a token mean).
LUFFY = dict(inject="always", replace="fixed", stats="all", scale="none",
             objective="unclipped", teacher_objective="shaped",
             aggregation="seq-mean-token-sum-norm", entropy_coef=0.001)

# name -> HAPOConfig overrides (None: supervised fine-tuning on the demonstrations).
METHODS: Dict[str, Optional[dict]] = {
    "grpo": dict(inject="never"),
    "luffy": LUFFY,
    "hapo-mean": dict(inject="gate", gate_mode="mean"),
    "hapo-thompson-annealed": dict(inject="gate", gate_mode="thompson",
                                   gate_schedule="cosine", gate_gamma_min=0.5),
    "always-inject": dict(inject="always"),      # HAPO's operator without the gate
    "sft": None,
}

QUICK = SCENARIOS["exact-teacher"].quick
BEAT_TOLERANCE = 1e-6
DEFAULT_SCENARIO = "exact-teacher"


def make_policy(task: Any, settings: Settings, seed: int) -> TinyCausalLM:
    """A fresh ``TinyCausalLM`` for the task, seeded."""
    torch.manual_seed(seed)
    return TinyCausalLM(task.vocab_size, max_len=task.prompt_len + task.completion_len,
                        d_model=settings.d_model, d_ff=2 * settings.d_model)


@torch.no_grad()
def sample(policy: torch.nn.Module, task: Any, prompts: torch.Tensor, samples: int,
           generator: torch.Generator, greedy: bool = False) -> tuple:
    """``(prompts, completions)``: ``samples`` temperature-1 completions per prompt (one
    greedy completion with ``greedy``), ``task.completion_len`` tokens each."""
    seq = prompts.repeat_interleave(1 if greedy else samples, dim=0)
    plen = seq.shape[1]
    was_training = policy.training
    policy.eval()
    for _ in range(task.completion_len):
        logits = policy_logits(policy, seq)[:, -1].float()
        nxt = (logits.argmax(-1) if greedy else
               torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0])
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    policy.train(was_training)
    return seq[:, :plen], seq[:, plen:]


def sampled_eval(policy: torch.nn.Module, task: Any, prompts: torch.Tensor, samples: int,
                 generator: torch.Generator, success_threshold: float = 0.5
                 ) -> Dict[str, float]:
    """Mean reward and success rate (reward >= ``success_threshold``) of temperature-1
    samples, and the mean reward of the greedy completions."""
    p, c = sample(policy, task, prompts, samples, generator)
    r = task.reward(p, c, torch.ones_like(c)).float()
    pg, cg = sample(policy, task, prompts, 1, generator, greedy=True)
    rg = task.reward(pg, cg, torch.ones_like(cg)).float()
    return {"reward": float(r.mean()), "success": float((r >= success_threshold).float().mean()),
            "greedy_reward": float(rg.mean()),
            "greedy_success": float((rg >= success_threshold).float().mean())}


def _scenario(scenario: Optional[Scenario]) -> Scenario:
    return SCENARIOS[DEFAULT_SCENARIO] if scenario is None else scenario


def run_one(method: str, seed: int, settings: Settings,
            scenario: Optional[Scenario] = None) -> dict:
    """Train one method from one seed on ``scenario`` (default exact-teacher); return its
    per-step curves and final evaluation."""
    scenario = _scenario(scenario)
    task = scenario.task
    evaluate = scenario.evaluate or sampled_eval
    policy = make_policy(task, settings, seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=settings.lr)
    prompt_gen = torch.Generator().manual_seed(10_000 + seed)   # same stream for all methods
    sample_gen = torch.Generator().manual_seed(20_000 + seed)
    curves = {"success_rate": [], "reward_mean": [], "injection_rate": [],
              "collapsed_fraction": []}
    overrides = METHODS[method]
    start = time.perf_counter()
    if overrides is None:                       # SFT on the teacher demonstrations
        for _ in range(settings.steps):
            prompts = task.sample_prompts(settings.prompts_per_step, prompt_gen)
            p, c = sample(policy, task, prompts, 1, sample_gen)
            r = task.reward(p, c, torch.ones_like(c)).float()
            curves["success_rate"].append(float((r >= 0.5).float().mean()))
            curves["reward_mean"].append(float(r.mean()))
            answer = torch.stack([task.demo(tuple(row)) for row in prompts.tolist()])
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
        config = HAPOConfig.from_kwargs(
            group_size=settings.group_size, max_new_tokens=task.completion_len,
            gate_schedule_steps=settings.steps, gate_seed=seed, seed=seed, progress=False,
            **overrides)
        trainer = HAPOTrainer(policy, optimizer, task.reward, lambda key: task.demo(key),
                              config)
        for _ in range(settings.steps):
            m = trainer.step(task.sample_prompts(settings.prompts_per_step, prompt_gen))
            for k in curves:
                curves[k].append(m[k])
    train_seconds = time.perf_counter() - start
    eval_gen = torch.Generator().manual_seed(99)                # one held-out set for all
    held_out = task.sample_prompts(settings.eval_prompts, eval_gen)
    final = evaluate(policy, task, held_out, settings.eval_samples, sample_gen)
    return {"method": method, "seed": seed, "curves": curves, "train_seconds": train_seconds,
            "final_success": final["success"], "final_greedy": final["greedy_success"],
            "final_reward": final["reward"], "final_greedy_reward": final["greedy_reward"]}


# --------------------------------------------------------------------------- summary
def moving_average(x: List[float], k: int = 5) -> List[float]:
    """Trailing ``k``-step mean of ``x`` (shorter at the start)."""
    return [sum(x[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(x))]


def steps_to(x: List[float], level: float = 0.5) -> Optional[int]:
    """First step whose 5-step moving average of the success rate reaches ``level``."""
    for i, v in enumerate(moving_average(x)):
        if v >= level:
            return i
    return None


def _window_mean(x, lo, hi):
    part = x[int(lo * len(x)):max(int(hi * len(x)), int(lo * len(x)) + 1)]
    return sum(part) / len(part)


def _mean_curve(curves: List[List[float]]) -> List[float]:
    return [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]


def summarize(runs: List[dict], teacher_reward: float = 1.0) -> dict:
    """Per method: final success mean/std/min/max over seeds, steps to 50% success (per
    seed; None = never), injection rate in the first and last 20% of steps, mean
    collapsed-group fraction; the final reward per seed, its mean, std and 95% bootstrap
    interval, the fraction of seeds whose final reward beats ``teacher_reward`` (by more
    than ``BEAT_TOLERANCE``; with a Wilson interval), and the injection and reward curves
    (mean over seeds, per step)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        finals = [r["final_success"] for r in rs]
        mean, std = mean_std(finals)
        s50 = [steps_to(r["curves"]["success_rate"]) for r in rs]
        rewards = [r["final_reward"] for r in rs]
        # Rewards are float32: 0.6 reads 0.6000000238, so "above" means by more than 1e-6.
        beats = sum(v > teacher_reward + BEAT_TOLERANCE for v in rewards)
        entry = {"seeds": [r["seed"] for r in rs], "final_success_mean": mean,
                 "final_success_std": std, "final_success_min": min(finals),
                 "final_success_max": max(finals), "final_success_per_seed": finals,
                 "final_greedy_mean": mean_std([r["final_greedy"] for r in rs])[0],
                 "steps_to_50pct_per_seed": s50,
                 "steps_to_50pct_mean": mean_std(s50)[0],
                 "seeds_reaching_50pct": sum(s is not None for s in s50),
                 "injection_rate_early": None, "injection_rate_late": None,
                 "collapsed_fraction_mean": None,
                 "train_seconds_mean": mean_std([r["train_seconds"] for r in rs])[0],
                 "final_reward_per_seed": rewards,
                 "final_reward_mean": mean_std(rewards)[0],
                 "final_reward_std": mean_std(rewards)[1],
                 "final_reward_ci95": list(bootstrap_mean_ci(rewards)),
                 "final_greedy_reward_mean": mean_std(
                     [r["final_greedy_reward"] for r in rs])[0],
                 "teacher_reward": teacher_reward,
                 "fraction_beating_teacher": beats / len(rs),
                 "fraction_beating_teacher_ci95": list(wilson_interval(beats, len(rs))),
                 "reward_curve": _mean_curve([r["curves"]["reward_mean"] for r in rs]),
                 "injection_curve": None}
        if rs[0]["curves"]["injection_rate"] is not None:
            entry["injection_rate_early"] = mean_std(
                [_window_mean(r["curves"]["injection_rate"], 0.0, 0.2) for r in rs])[0]
            entry["injection_rate_late"] = mean_std(
                [_window_mean(r["curves"]["injection_rate"], 0.8, 1.0) for r in rs])[0]
            entry["collapsed_fraction_mean"] = mean_std(
                [_window_mean(r["curves"]["collapsed_fraction"], 0.0, 1.0) for r in rs])[0]
            entry["injection_curve"] = _mean_curve([r["curves"]["injection_rate"]
                                                    for r in rs])
        out[method] = entry
    return out


def comparisons(summary: dict) -> List[dict]:
    """Paired comparisons of every method pair on the final reward per seed."""
    per_seed = {}
    for method, e in summary.items():
        per_seed[method] = dict(zip(e["seeds"], e["final_reward_per_seed"]))
    common = sorted(set.intersection(*(set(v) for v in per_seed.values()))) if per_seed else []
    return paired_comparisons({m: [v[s] for s in common] for m, v in per_seed.items()})


def _table(head: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def _f(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def format_table(summary: dict) -> str:
    """A plain-text (also Markdown) table of the summary."""
    head = ["method", "final reward (mean ± std)", "95% CI", "beats teacher",
            "final success", "steps to 50%", "inject early", "inject late",
            "collapsed groups"]
    rows = []
    for method, e in summary.items():
        n = len(e["seeds"])
        lo, hi = e["final_reward_ci95"]
        beats = round(e["fraction_beating_teacher"] * n)
        rows.append([method, f"{_f(e['final_reward_mean'], '.3f')} ± "
                             f"{_f(e['final_reward_std'], '.3f')}",
                     f"{lo:.3f}-{hi:.3f}", f"{beats}/{n}",
                     f"{_f(e['final_success_mean'])}", _f(e["steps_to_50pct_mean"], ".0f"),
                     _f(e["injection_rate_early"]), _f(e["injection_rate_late"]),
                     _f(e["collapsed_fraction_mean"])])
    return _table(head, rows)


def format_comparisons(pairs: List[dict]) -> str:
    """The paired comparisons as a table: difference of final reward (first - second)."""
    head = ["first", "second", "mean difference", "95% CI", "p (sign-flip)",
            "seeds higher / lower / equal"]
    rows = [[c["a"], c["b"], f"{c['mean_difference']:+.3f}",
             f"{c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}", f"{c['p_value']:.3g}",
             f"{c['a_higher']} / {c['a_lower']} / {c['equal']}"] for c in pairs]
    return _table(head, rows)


def run_all(settings: Settings, log: Callable[[str], Any] = print,
            scenario: Optional[Scenario] = None,
            on_run: Optional[Callable[[dict], Any]] = None) -> List[dict]:
    """``run_one``'s result for every seed and method of ``settings`` (seed by seed, so a
    partial run holds paired results); one ``log`` line and one ``on_run(result)`` each."""
    methods = tuple(settings.methods) or tuple(METHODS)
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    runs = []
    for seed in settings.seeds:
        for method in methods:
            r = run_one(method, seed, settings, scenario)
            log(f"  {method:<24} seed {seed}: final reward {r['final_reward']:.3f} "
                f"success {r['final_success']:.2f} ({r['train_seconds']:.1f}s)")
            if on_run is not None:
                on_run(r)
            runs.append(r)
    order = {m: i for i, m in enumerate(methods)}
    return sorted(runs, key=lambda r: order[r["method"]])


def with_methods(settings: Settings) -> Settings:
    """``settings`` with its method list filled in (every method when empty)."""
    return replace(settings, methods=tuple(settings.methods) or tuple(METHODS))
