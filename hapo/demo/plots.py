"""PNG plots of the demo: success-rate and injection-rate curves (mean, min-max band)."""
from __future__ import annotations

import os
from typing import List


def _band(ax, runs, key, label):
    curves = [r["curves"][key] for r in runs]
    n = len(curves[0])
    steps = list(range(n))
    mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
    ax.plot(steps, mean, label=label)
    if len(curves) > 1:
        ax.fill_between(steps, [min(c[i] for c in curves) for i in range(n)],
                        [max(c[i] for c in curves) for i in range(n)], alpha=0.2)


def plot_runs(runs: List[dict], out_dir: str) -> List[str]:
    """Write success.png and injection.png into ``out_dir``; return their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in runs))
    paths = []
    for key, fname, title in (("success_rate", "success.png", "rollout success rate"),
                              ("injection_rate", "injection.png", "fraction of groups injected")):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for m in methods:
            rs = [r for r in runs if r["method"] == m]
            if rs[0]["curves"][key] is not None:
                _band(ax, rs, key, m)
        ax.set_xlabel("step")
        ax.set_ylabel(title)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"Reverse-digits task: {title} (mean, min-max over seeds)", fontsize=9)
        if ax.lines:                   # an SFT-only run has no injection curve
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
