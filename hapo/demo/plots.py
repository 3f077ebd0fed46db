"""PNG plots of the demo: reward, success and injection curves (mean and the seeds' 25-75%
band) and the final reward of every seed per method."""
from __future__ import annotations

import os
from typing import List, Optional

import torch


def _band(ax, runs, key, label):
    curves = torch.tensor([r["curves"][key] for r in runs], dtype=torch.float64)
    steps = list(range(curves.shape[1]))
    ax.plot(steps, curves.mean(0).tolist(), label=label)
    if curves.shape[0] > 1:
        lo, hi = torch.quantile(curves, torch.tensor([0.25, 0.75], dtype=torch.float64), dim=0)
        ax.fill_between(steps, lo.tolist(), hi.tolist(), alpha=0.2)


def plot_runs(runs: List[dict], out_dir: str, title: str = "",
              teacher_reward: Optional[float] = None) -> List[str]:
    """Write reward.png, success.png, injection.png and final_reward.png into ``out_dir``;
    return their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in runs))
    n_seeds = len({r["seed"] for r in runs})
    paths = []
    for key, fname, label in (("reward_mean", "reward.png", "rollout reward"),
                              ("success_rate", "success.png", "rollout success rate"),
                              ("injection_rate", "injection.png",
                               "fraction of groups injected")):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for m in methods:
            rs = [r for r in runs if r["method"] == m]
            if rs[0]["curves"].get(key) is not None:
                _band(ax, rs, key, m)
        if key == "reward_mean" and teacher_reward is not None:
            ax.axhline(teacher_reward, color="grey", linestyle=":", label="teacher's reward")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{title}: {label} (mean, 25-75% of {n_seeds} seeds)", fontsize=9)
        if ax.lines:                   # an SFT-only run has no injection curve
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, m in enumerate(methods):
        values = [r["final_reward"] for r in runs if r["method"] == m]
        jitter = [(j % 7 - 3) * 0.04 for j in range(len(values))]
        ax.scatter([i + x for x in jitter], values, s=14, alpha=0.7)
        ax.plot([i - 0.3, i + 0.3], [sum(values) / len(values)] * 2, color="black")
    if teacher_reward is not None:
        ax.axhline(teacher_reward, color="grey", linestyle=":", label="teacher's reward")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, fontsize=7, rotation=15)
    ax.set_ylabel("final reward (held-out samples)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}: final reward per seed (bar: mean)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "final_reward.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
