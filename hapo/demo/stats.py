"""Uncertainty for the demo's per-seed results, without scipy.

Seeds are paired across methods (same initial weights, same prompt stream), so methods are
compared on the per-seed differences: a percentile bootstrap interval of the mean
difference and an exact sign-flip permutation test (Monte Carlo above 20 seeds). A
fraction of seeds gets a Wilson score interval.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Sequence

import torch

Z95 = 1.959963984540054


def mean_std(values: Sequence[float]) -> tuple:
    """Mean and Bessel standard deviation (0 for one value; (None, None) for none)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95, resamples: int = 20_000,
                      seed: int = 0) -> tuple:
    """Percentile bootstrap interval of the mean of ``values`` (seeded)."""
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if x.numel() < 2:
        m = float(x.mean()) if x.numel() else float("nan")
        return m, m
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (resamples, x.numel()), generator=g)
    means = x[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                dtype=torch.float64)).tolist()
    return lo, hi


def sign_flip_p_value(diffs: Sequence[float], resamples: int = 200_000, seed: int = 0) -> float:
    """Two-sided p-value of the paired permutation test of mean difference 0: every sign
    pattern of the differences (exact up to 20 pairs), else ``resamples`` random ones
    (then ``(hits + 1) / (resamples + 1)``, never 0)."""
    d = torch.tensor([float(v) for v in diffs], dtype=torch.float64)
    n = d.numel()
    if n == 0 or bool((d == 0).all()):
        return 1.0
    if n <= 20:
        signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=n)),
                             dtype=torch.float64)
    else:
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (resamples, n), generator=g).double() * 2 - 1
    observed = abs(float(d.mean()))
    hits = int(((signs * d).mean(1).abs() >= observed - 1e-12).sum())
    if n <= 20:
        return hits / signs.shape[0]
    return (hits + 1) / (resamples + 1)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_comparisons(per_seed: Dict[str, List[float]]) -> List[dict]:
    """Every pair of methods (in ``per_seed``'s order) compared on their paired per-seed
    values: mean difference (first minus second), its 95% bootstrap interval, the sign-flip
    p-value and the seeds where the first is higher / lower / equal."""
    out = []
    for a, b in itertools.combinations(per_seed, 2):
        xa, xb = per_seed[a], per_seed[b]
        if len(xa) != len(xb) or not xa:
            continue
        d = [x - y for x, y in zip(xa, xb)]
        lo, hi = bootstrap_mean_ci(d)
        out.append({"a": a, "b": b, "n": len(d), "mean_difference": sum(d) / len(d),
                    "ci95": [lo, hi], "p_value": sign_flip_p_value(d),
                    "a_higher": sum(v > 0 for v in d), "a_lower": sum(v < 0 for v in d),
                    "equal": sum(v == 0 for v in d)})
    return out
