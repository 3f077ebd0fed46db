"""fused_hapo_loss forward+backward against TRL's eager GRPO loss.

The shape is the issue's: B=4, T=512, V=32768, fp32 logits, 2 torch threads (conftest).
On CPU tensors ``ours`` is the chunked CPU path. The eager loss is TRL's: gather minus
logsumexp, entropy for the metrics, clip, k3 KL, masked token mean (bench/baselines.py).
Targets: ours >= 2x faster and <= 1/3 of the eager peak extra memory; the
numbers are printed at the end of the run (peak extra MiB column) and in
``--benchmark-json`` extra_info.

    pytest bench/bench_loss.py --benchmark-only
"""
import pytest
import torch

from bench.suite import impl_names, run_benchmark

B, T, V = 4, 512, 32768


@pytest.mark.parametrize("level", ["loss_token", "loss_seq"])
@pytest.mark.parametrize("impl", impl_names("loss_token"))
def test_fused_loss_fwd_bwd(benchmark, impl, level):
    run_benchmark(benchmark, level, impl, B, T, V, torch.float32, rounds=5)
