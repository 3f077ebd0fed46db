"""The sparse-reward demo: tasks, scenarios, the runner, the statistics, the summary and the
CLI (tiny settings)."""
import json
import math
import os
from dataclasses import replace

import pytest
import torch

import hapo.demo.__main__ as cli
from hapo import HAPOConfig
from hapo.demo import scenarios
from hapo.demo.__main__ import main, run
from hapo.demo.experiment import (
    LUFFY,
    METHODS,
    Settings,
    comparisons,
    format_comparisons,
    format_table,
    run_one,
    steps_to,
    summarize,
)
from hapo.demo.stats import (
    bootstrap_mean_ci,
    paired_comparisons,
    sign_flip_p_value,
    wilson_interval,
)
from hapo.demo.task import BOS, END, SEP, STYLE, ReverseTask, StyledReverseTask

# Tiny models run fastest on one thread (and do not fight other processes for cores).
pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(prompts_per_step=2, group_size=2, d_model=16, eval_prompts=4, eval_samples=2)


def test_task_reward_is_exact_match_only():
    task = ReverseTask(length=4, digits=10)
    prompts = task.sample_prompts(5, torch.Generator().manual_seed(0))
    assert prompts.shape == (5, 6)
    assert (prompts[:, 0] == BOS).all() and (prompts[:, -1] == SEP).all()
    answer = task.answer(prompts)
    assert torch.equal(answer, prompts[:, 1:5].flip(1))
    ones = torch.ones_like(answer)
    assert task.reward(prompts, answer, ones).tolist() == [1.0] * 5
    wrong = answer.clone()
    wrong[:, 2] = (wrong[:, 2] - 3 + 1) % 10 + 3        # one digit off
    assert task.reward(prompts, wrong, ones).tolist() == [0.0] * 5
    masked = ones.clone()
    masked[:, -1] = 0                                    # truncated answer fails
    assert task.reward(prompts, answer, masked).tolist() == [0.0] * 5
    assert torch.equal(task.demo(tuple(prompts[0].tolist())), answer[0])
    assert task.random_success_rate() < 1e-4
    assert task.teacher_reward == 1.0 and task.completion_len == 4


def test_styled_task_rewards_and_its_suboptimal_teacher():
    """Answer then END: 1.0; answer then STYLE (the teacher's): 0.6; anything else 0."""
    task = StyledReverseTask(length=3, digits=5, style_reward=0.6)
    prompts = task.sample_prompts(4, torch.Generator().manual_seed(1))
    assert ((prompts[:, 1:4] >= STYLE + 1) & (prompts[:, 1:4] < task.vocab_size)).all()
    answer = task.answer(prompts)
    demo = torch.stack([task.demo(tuple(p)) for p in prompts.tolist()])
    assert torch.equal(demo[:, :3], answer) and (demo[:, 3] == STYLE).all()
    ones = torch.ones_like(demo)
    torch.testing.assert_close(task.reward(prompts, demo, ones), torch.full((4,), 0.6))
    assert task.teacher_reward == 0.6 and task.completion_len == 4
    best = demo.clone()
    best[:, 3] = END
    assert task.reward(prompts, best, ones).tolist() == [1.0] * 4
    other = demo.clone()
    other[:, 3] = answer[:, 0]                            # a digit is no close
    assert task.reward(prompts, other, ones).tolist() == [0.0] * 4
    wrong = best.clone()
    wrong[:, 0] = STYLE                                   # the answer is wrong
    assert task.reward(prompts, wrong, ones).tolist() == [0.0] * 4
    unclosed = ones.clone()
    unclosed[:, 3] = 0
    assert task.reward(prompts, best, unclosed).tolist() == [0.0] * 4


def test_scenarios_and_the_luffy_settings():
    assert set(scenarios.SCENARIOS) >= {"exact-teacher", "suboptimal-teacher"}
    sub = scenarios.SCENARIOS["suboptimal-teacher"]
    assert sub.task.teacher_reward < 1.0 and len(sub.full.seeds) >= 16
    assert list(METHODS)[:3] == ["grpo", "luffy", "hapo-mean"]
    cfg = HAPOConfig.from_kwargs(**LUFFY)
    assert cfg.inject == "always" and cfg.score_teacher
    assert (cfg.advantages.replace, cfg.advantages.stats, cfg.advantages.scale) == \
        ("fixed", "all", "none")
    assert (cfg.loss.objective, cfg.loss.teacher_objective, cfg.loss.aggregation_mode,
            cfg.loss.entropy_coef, cfg.loss.beta) == \
        ("unclipped", "shaped", "seq-mean-token-sum-norm", 0.001, 0.0)


@pytest.mark.parametrize("name", ["exact-teacher", "suboptimal-teacher"])
def test_run_one_every_method_tiny(name):
    scenario = scenarios.SCENARIOS[name]
    settings = Settings(steps=2, seeds=(0,), **TINY)
    runs = [run_one(m, 0, settings, scenario) for m in METHODS]
    for r in runs:
        assert len(r["curves"]["success_rate"]) == 2 == len(r["curves"]["reward_mean"])
        assert 0.0 <= r["final_success"] <= 1.0 and 0.0 <= r["final_reward"] <= 1.0
    summary = summarize(runs, teacher_reward=scenario.task.teacher_reward)
    assert set(summary) == set(METHODS)
    assert summary["sft"]["injection_rate_early"] is None
    assert summary["sft"]["injection_curve"] is None
    assert summary["grpo"]["injection_rate_late"] == 0.0
    assert summary["always-inject"]["injection_rate_early"] == 1.0
    assert summary["luffy"]["injection_curve"] == [1.0, 1.0]
    table = format_table(summary)
    assert all(m in table for m in METHODS)


def fake_run(method, seed, reward, inject=None):
    return {"method": method, "seed": seed, "final_success": float(reward >= 0.5),
            "final_greedy": 0.0, "final_reward": reward, "final_greedy_reward": reward,
            "train_seconds": 1.0,
            "curves": {"success_rate": [0.0, 1.0], "reward_mean": [0.0, reward],
                       "injection_rate": inject, "collapsed_fraction": inject}}


def test_summary_fields_by_hand():
    a_rewards = [0.6, 1.0, 0.9, 0.6000001]
    runs = [fake_run("a", s, r, [1.0, 0.5]) for s, r in enumerate(a_rewards)] + \
           [fake_run("b", s, r) for s, r in enumerate([0.6, 0.6, 0.6, 0.7])]
    summary = summarize(runs, teacher_reward=0.6)
    a, b = summary["a"], summary["b"]
    assert a["final_reward_per_seed"] == [0.6, 1.0, 0.9, 0.6000001]   # float32's 0.6: no win
    assert a["final_reward_mean"] == pytest.approx(0.775)
    assert a["fraction_beating_teacher"] == 0.5 and b["fraction_beating_teacher"] == 0.25
    assert a["injection_curve"] == [1.0, 0.5] and b["injection_curve"] is None
    assert a["reward_curve"] == [0.0, pytest.approx(0.775)]
    lo, hi = a["final_reward_ci95"]
    assert 0.6 <= lo <= 0.775 <= hi <= 1.0
    (pair,) = comparisons(summary)
    assert (pair["a"], pair["b"], pair["n"]) == ("a", "b", 4)
    assert pair["mean_difference"] == pytest.approx(0.15)
    assert (pair["a_higher"], pair["a_lower"], pair["equal"]) == (2, 1, 1)
    assert "+0.150" in format_comparisons([pair])


def test_statistics_by_hand():
    # Sign flips of [1, 1, 1, 1, 1]: only all-plus and all-minus reach |mean| 1: p = 2/32.
    assert sign_flip_p_value([1.0] * 5) == pytest.approx(2 / 32)
    # [3, -1, -1, -1]: |mean| 0 ... every pattern reaches it: p = 1.
    assert sign_flip_p_value([3.0, -1.0, -1.0, -1.0]) == 1.0
    assert sign_flip_p_value([0.0, 0.0]) == 1.0
    assert 0 < sign_flip_p_value([0.5] * 25) < 1e-4            # Monte Carlo above 20 pairs
    lo, hi = bootstrap_mean_ci([0.0, 1.0] * 8)
    assert 0.2 < lo < 0.5 < hi < 0.8
    assert bootstrap_mean_ci([0.3] * 5) == (pytest.approx(0.3), pytest.approx(0.3))
    # Wilson interval of 3/16 (z = 1.96), by the formula.
    p, n, z = 3 / 16, 16, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(3, 16) == (pytest.approx(centre - half), pytest.approx(centre + half))
    assert paired_comparisons({"x": [1.0], "y": [1.0, 2.0]}) == []


def test_steps_to_uses_a_moving_average():
    assert steps_to([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]) == 3      # trailing mean 2/4 = 0.5
    assert steps_to([0.0] * 5 + [1.0] * 3) == 7               # 3/5 = 0.6
    assert steps_to([0.0] * 10) is None


@pytest.fixture
def tiny_scenarios(monkeypatch):
    """Every scenario's full and quick settings made tiny."""
    tiny = {name: replace(s, full=Settings(steps=2, seeds=(0, 1), **TINY),
                          quick=Settings(steps=2, seeds=(0, 1), **TINY))
            for name, s in scenarios.SCENARIOS.items()}
    monkeypatch.setattr(cli, "SCENARIOS", tiny)
    return tiny


def test_cli_suboptimal_teacher_quick_writes_per_seed_rewards(tmp_path, capsys,
                                                              tiny_scenarios):
    out = tmp_path / "demo"
    result = run(["--scenario", "suboptimal-teacher", "--quick", "--out", str(out),
                  "--methods", "grpo", "luffy", "hapo-mean", "sft"])
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["scenario"]["name"] == "suboptimal-teacher"
    assert summary["scenario"]["teacher_reward"] == 0.6
    assert list(summary["methods"]) == ["grpo", "luffy", "hapo-mean", "sft"]
    for entry in summary["methods"].values():
        for key in ("final_success_mean", "final_success_std", "steps_to_50pct_mean",
                    "injection_rate_early", "injection_rate_late", "collapsed_fraction_mean",
                    "final_reward_mean", "fraction_beating_teacher", "injection_curve"):
            assert key in entry
        assert entry["seeds"] == [0, 1] and len(entry["final_reward_per_seed"]) == 2
    assert len(summary["methods"]["luffy"]["injection_curve"]) == 2
    assert len(summary["comparisons"]) == 6                   # 4 methods, every pair
    assert result["methods"] == summary["methods"]
    with open(out / "runs.jsonl") as f:
        assert len(f.readlines()) == 8
    for png in ("reward.png", "success.png", "injection.png", "final_reward.png"):
        assert os.path.getsize(out / png) > 1000
    printed = capsys.readouterr().out
    assert "luffy" in printed and "final reward" in printed and "paired by seed" in printed


def test_cli_seed_count_first_seed_and_steps(tmp_path, tiny_scenarios):
    result = run(["--out", str(tmp_path), "--seeds", "2", "--first-seed", "5", "--steps", "1",
                  "--methods", "grpo"])
    assert result["methods"]["grpo"]["seeds"] == [5, 6]
    assert result["settings"]["steps"] == 1
    assert result["scenario"]["name"] == "exact-teacher"


def test_console_entry_point_returns_none(tmp_path, tiny_scenarios):
    assert main(["--out", str(tmp_path), "--seeds", "1", "--steps", "1", "--methods", "sft",
                 "--threads", "1"]) is None
    assert (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("argv", [["--methods", "ppo"], ["--scenario", "nope"],
                                  ["--seeds", "0"], ["--steps", "0"]])
def test_cli_rejects_bad_arguments(argv, tmp_path):
    with pytest.raises(SystemExit):
        main(argv + ["--out", str(tmp_path)])


def test_cli_merge_summarizes_runs_split_over_processes(tmp_path, tiny_scenarios):
    """Two processes (--first-seed) merged give the summary of one run over both seed sets."""
    a, b, merged, whole = (tmp_path / n for n in ("a", "b", "merged", "whole"))
    common = ["--scenario", "suboptimal-teacher", "--steps", "2", "--methods", "grpo", "luffy"]
    run(common + ["--out", str(a), "--seeds", "1"])
    run(common + ["--out", str(b), "--seeds", "1", "--first-seed", "1"])
    one = run(common + ["--out", str(whole), "--seeds", "2"])
    result = run(common + ["--out", str(merged), "--merge", str(a), str(b)])
    assert result["methods"]["luffy"]["seeds"] == [0, 1]
    for method in ("grpo", "luffy"):
        assert result["methods"][method]["final_reward_per_seed"] == \
            one["methods"][method]["final_reward_per_seed"]
    assert result["comparisons"] == one["comparisons"]
    with open(merged / "runs.jsonl") as f:
        assert len(f.readlines()) == 4
    with pytest.raises(SystemExit):
        run(common + ["--out", str(merged), "--merge", str(a), str(a)])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--steps", "two"], "argument --steps: 'two' is not a whole number"),
])
def test_cli_rejects_bad_numbers_before_running(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_defaults_write_to_the_ignored_out_folder():
    from hapo.demo.__main__ import parse_args
    assert parse_args([]).out == os.path.join("out", "demo")
    assert parse_args([]).threads is None          # hapo.cli.default_threads() at run time
