"""The sparse-reward demo: the task, the runner, the summary and the CLI (tiny settings)."""
import json
import os

import pytest
import torch

from hapo.demo.__main__ import main, run
from hapo.demo.experiment import METHODS, Settings, format_table, run_one, steps_to, summarize
from hapo.demo.task import BOS, SEP, ReverseTask

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


def test_run_one_every_method_tiny():
    settings = Settings(steps=2, seeds=(0,), **TINY)
    runs = [run_one(m, 0, settings) for m in METHODS]
    for r in runs:
        assert len(r["curves"]["success_rate"]) == 2
        assert 0.0 <= r["final_success"] <= 1.0
    summary = summarize(runs)
    assert set(summary) == set(METHODS)
    assert summary["sft"]["injection_rate_early"] is None
    assert summary["grpo"]["injection_rate_late"] == 0.0
    assert summary["always-inject"]["injection_rate_early"] == 1.0
    table = format_table(summary)
    assert all(m in table for m in METHODS)


def test_steps_to_uses_a_moving_average():
    assert steps_to([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]) == 3      # trailing mean 2/4 = 0.5
    assert steps_to([0.0] * 5 + [1.0] * 3) == 7               # 3/5 = 0.6
    assert steps_to([0.0] * 10) is None


def test_cli_writes_summary_and_plots(tmp_path, capsys, monkeypatch):
    import hapo.demo.__main__ as cli
    monkeypatch.setattr(cli, "Settings", lambda: Settings(**TINY))
    out = tmp_path / "demo"
    result = run(["--out", str(out), "--seeds", "0", "1", "--steps", "2",
                   "--methods", "grpo", "hapo-mean", "sft", "--threads", "1"])
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert set(summary["methods"]) == {"grpo", "hapo-mean", "sft"}
    entry = summary["methods"]["hapo-mean"]
    for key in ("final_success_mean", "final_success_std", "steps_to_50pct_mean",
                "injection_rate_early", "injection_rate_late", "collapsed_fraction_mean"):
        assert key in entry
    assert entry["seeds"] == [0, 1]
    assert result["methods"] == summary["methods"]
    for png in ("success.png", "injection.png"):
        assert os.path.getsize(out / png) > 1000
    printed = capsys.readouterr().out
    assert "hapo-mean" in printed and "final success" in printed


def test_console_entry_point_returns_none(tmp_path, monkeypatch):
    import hapo.demo.__main__ as cli
    monkeypatch.setattr(cli, "Settings", lambda: Settings(**TINY))
    assert main(["--out", str(tmp_path), "--seeds", "0", "--steps", "1", "--methods", "sft",
                 "--threads", "1"]) is None
    assert (tmp_path / "summary.json").exists()


def test_cli_rejects_unknown_method():
    with pytest.raises(SystemExit):
        main(["--methods", "ppo"])
