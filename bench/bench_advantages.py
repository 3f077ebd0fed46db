"""group_advantages with SSI substitution: ours against TRL-style eager group normalisation.

P prompts x G=8 rollouts; P from ``HAPO_BENCH_TOKENS`` (default 4096 CPU, 16384 CUDA).
"""
import pytest
import torch

from bench.suite import device, env_list, impl_names, run_benchmark

PROMPTS = env_list("HAPO_BENCH_TOKENS", [16384] if device() == "cuda" else [4096])


@pytest.mark.parametrize("prompts", PROMPTS)
@pytest.mark.parametrize("impl", impl_names("advantages"))
def test_group_advantages(benchmark, impl, prompts):
    run_benchmark(benchmark, "advantages", impl, 1, prompts, 0, torch.float32)
